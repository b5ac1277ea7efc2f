//! Fused SelfExtend attention for the CPU, in the style of FlashAttention (Dao et al.,
//! 2022) and its split-key decoding: query and key tiles, an online f32 softmax, and no
//! `q_len × kv_len` buffer.
//!
//! Each (query tile, key tile) pair computes only the scores it needs: neighbor scores
//! where every pair is within the window, grouped scores where every pair is beyond
//! it, and both only on the rows the window boundary crosses. So SelfExtend costs about
//! one attention, not two.
//!
//! Keys stay un-rotated in the cache and are rotated per key tile into thread-local
//! buffers, once for all query heads that share their key/value head. Caching rotated
//! keys instead would add one (plain) or two (SelfExtend) extra key caches; the
//! rotation costs `1 / (heads per kv head × query tile)` of the score work in prefill,
//! and in decode it reads the same bytes the scores read anyway. Extra memory is
//! `O(tile × head_dim)` per thread.
//!
//! With many query rows per tile (prefill) the rotated keys are stored transposed, so
//! scores vectorise across keys; with few (decode) they stay row-major and each score
//! is a dot product. When there are fewer (batch, kv head, query tile) items than
//! threads can use, the key range is split and the partial softmaxes are merged.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use super::{AttentionParams, Positions, SelfExtend};
use crate::error::Result;
use crate::rope::CosSinTable;

const Q_TILE: usize = 32;
const K_TILE: usize = 64;
/// Rows (query heads × positions) per item from which keys are transposed.
const TRANSPOSE_FROM_ROWS: usize = 16;
/// The shortest key range a split-key item gets.
const MIN_SPLIT: usize = 4 * K_TILE;

#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    // `mul_add` is a libm call without the FMA instruction; plain `a * b + c` then.
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for `x <= 0`, branch-free so loops over it vectorise. Relative error
/// below 2e-7; inputs under -87 give about 1e-38 instead of smaller values or 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = fma(x, LOG2E, 0.5).floor();
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, x));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = fma(p, r, c);
    }
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let LLVM keep a full vector register busy.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = fma(x[l], y[l], acc[l]);
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum = fma(*x, *y, sum);
    }
    sum
}

#[inline]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let mut m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for x in chunks {
        for l in 0..8 {
            acc[l] = acc[l].max(x[l]);
        }
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

/// `p[j] = exp(s[j] - max)` in place; returns the sum of `p`.
#[inline]
fn exp_and_sum(s: &mut [f32], max: f32) -> f32 {
    for x in s.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut acc = [0f32; 8];
    let chunks = s.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `out[j] = q . k[j]` for the `K_TILE` keys of `kt`, stored transposed `(d, K_TILE)`.
#[inline]
fn scores_transposed(q: &[f32], kt: &[f32], out: &mut [f32; K_TILE]) {
    let mut acc = [0f32; K_TILE];
    for (c, &qc) in q.iter().enumerate() {
        let row: &[f32; K_TILE] = kt[c * K_TILE..][..K_TILE].try_into().expect("K_TILE row");
        for j in 0..K_TILE {
            acc[j] = fma(qc, row[j], acc[j]);
        }
    }
    *out = acc;
}

/// `acc += Σ_j p[j] · v(j)`, the probability-weighted sum of value rows.
#[inline]
fn accumulate_values<'v>(acc: &mut [f32], p: &[f32], v: impl Fn(usize) -> &'v [f32]) {
    const B: usize = 32;
    let d = acc.len();
    let full = d - d % B;
    for c0 in (0..full).step_by(B) {
        let mut a: [f32; B] = acc[c0..c0 + B].try_into().expect("B lanes");
        for (j, &pj) in p.iter().enumerate() {
            let row: &[f32; B] = v(j)[c0..c0 + B].try_into().expect("B lanes");
            for x in 0..B {
                a[x] = fma(pj, row[x], a[x]);
            }
        }
        acc[c0..c0 + B].copy_from_slice(&a);
    }
    if full < d {
        for (j, &pj) in p.iter().enumerate() {
            for (a, &x) in acc[full..].iter_mut().zip(&v(j)[full..]) {
                *a = fma(pj, x, *a);
            }
        }
    }
}

/// A read-only `(batch, heads, seq, head_dim)` f32 view with unit inner stride.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 3],
    head_dim: usize,
}

impl<'a> View<'a> {
    #[inline]
    fn row(&self, b: usize, h: usize, t: usize) -> &'a [f32] {
        let o = self.offset + b * self.strides[0] + h * self.strides[1] + t * self.strides[2];
        &self.data[o..o + self.head_dim]
    }
}

fn with_view<T>(t: &Tensor, f: impl FnOnce(&View) -> T) -> Option<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let s = layout.stride();
    if s.len() != 4 || s[3] != 1 {
        return None;
    }
    let view = View {
        data,
        offset: layout.start_offset(),
        strides: [s[0], s[1], s[2]],
        head_dim: layout.dims()[3],
    };
    Some(f(&view))
}

/// One unit of parallel work: the rows of query tile `tile` of the query heads that
/// share kv head `g`, against keys `keys.0 .. keys.1`.
#[derive(Debug, Clone, Copy)]
struct Item {
    b: usize,
    g: usize,
    tile: usize,
    keys: (usize, usize),
}

/// An un-normalised softmax over part of the keys: running max, sum and weighted values.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

/// Thread-local buffers, reused across items.
#[derive(Default)]
struct Scratch {
    qn: Vec<f32>,
    qg: Vec<f32>,
    kn: Vec<f32>,
    kg: Vec<f32>,
    rotated: Vec<f32>,
}

struct Shape {
    rep: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
}

/// Writes the keys `j0 .. j1` rotated to `pos(j)` into `out`, transposed `(d, K_TILE)`
/// or row-major `(K_TILE, d)`.
#[allow(clippy::too_many_arguments)]
fn rotate_keys(
    kv: &View,
    b: usize,
    g: usize,
    (j0, j1): (usize, usize),
    table: &CosSinTable,
    pos: impl Fn(usize) -> usize,
    transposed: bool,
    rotated: &mut [f32],
    out: &mut [f32],
) {
    let d = rotated.len();
    for j in j0..j1 {
        let jj = j - j0;
        if transposed {
            table.rotate(kv.row(b, g, j), pos(j), rotated);
            for (c, &x) in rotated.iter().enumerate() {
                out[c * K_TILE + jj] = x;
            }
        } else {
            table.rotate(kv.row(b, g, j), pos(j), &mut out[jj * d..][..d]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_item(
    item: Item,
    shape: &Shape,
    (qv, kv, vv): (&View, &View, &View),
    table: &CosSinTable,
    se: Option<SelfExtend>,
    scale: f32,
    s: &mut Scratch,
) -> Partial {
    let Item { b, g, tile, keys } = item;
    let d = shape.d;
    let index_pos = shape.kv_len - shape.q_len;
    let t0 = tile * Q_TILE;
    let tile_len = (t0 + Q_TILE).min(shape.q_len) - t0;
    let rows = shape.rep * tile_len;
    // Row r is query head g * rep + r / tile_len at position index_pos + t0 + r % tile_len.
    let pos = |r: usize| index_pos + t0 + r % tile_len;
    let transposed = rows >= TRANSPOSE_FROM_ROWS;

    s.qn.resize(rows * d, 0.0);
    s.rotated.resize(d, 0.0);
    s.kn.resize(K_TILE * d, 0.0);
    if se.is_some() {
        s.qg.resize(rows * d, 0.0);
        s.kg.resize(K_TILE * d, 0.0);
    }
    // The softmax scale is folded into the rotated queries.
    for r in 0..rows {
        let x = qv.row(b, g * shape.rep + r / tile_len, t0 + r % tile_len);
        let qn = &mut s.qn[r * d..][..d];
        table.rotate(x, pos(r), qn);
        qn.iter_mut().for_each(|x| *x *= scale);
        if let Some(se) = se {
            let qg = &mut s.qg[r * d..][..d];
            table.rotate(x, se.grouped_query_position(pos(r)), qg);
            qg.iter_mut().for_each(|x| *x *= scale);
        }
    }

    let mut part = Partial {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0f32; rows],
        acc: vec![0f32; rows * d],
    };
    let (i_min, i_max) = (index_pos + t0, index_pos + t0 + tile_len - 1);
    let window = se.map_or(usize::MAX, |se| se.window());
    let mut sn = [0f32; K_TILE];
    let mut sg = [0f32; K_TILE];
    let mut j0 = keys.0;
    while j0 < keys.1.min(i_max + 1) {
        let j1 = (j0 + K_TILE).min(keys.1).min(i_max + 1);
        // Some pair of the tile is a neighbor / is grouped.
        let need_n = i_min < (j1 - 1).saturating_add(window);
        let need_g = i_max >= j0.saturating_add(window);
        if need_n {
            rotate_keys(kv, b, g, (j0, j1), table, |j| j, transposed, &mut s.rotated, &mut s.kn);
        }
        if let (true, Some(se)) = (need_g, se) {
            let gpos = |j| se.grouped_key_position(j);
            rotate_keys(kv, b, g, (j0, j1), table, gpos, transposed, &mut s.rotated, &mut s.kg);
        }
        for r in 0..rows {
            let i = pos(r);
            if j0 > i {
                continue;
            }
            let n = j1.min(i + 1) - j0;
            // Keys j0 .. j0 + split are grouped for this row, the rest neighbors.
            let split = (i + 1 - j0).saturating_sub(window).min(n);
            let scores = if transposed {
                if split < n {
                    scores_transposed(&s.qn[r * d..][..d], &s.kn, &mut sn);
                }
                if split > 0 {
                    scores_transposed(&s.qg[r * d..][..d], &s.kg, &mut sg);
                    sn[..split].copy_from_slice(&sg[..split]);
                }
                &mut sn[..n]
            } else {
                for (jj, out) in sn[..n].iter_mut().enumerate() {
                    let (q, k) = if jj < split { (&s.qg, &s.kg) } else { (&s.qn, &s.kn) };
                    *out = dot(&q[r * d..][..d], &k[jj * d..][..d]);
                }
                &mut sn[..n]
            };
            let m_old = part.m[r];
            let m_new = m_old.max(max_of(scores));
            let sum = exp_and_sum(scores, m_new);
            let correction = (m_old - m_new).exp();
            let acc = &mut part.acc[r * d..][..d];
            if correction != 1.0 {
                acc.iter_mut().for_each(|a| *a *= correction);
            }
            accumulate_values(acc, scores, |jj| vv.row(b, g, j0 + jj));
            part.l[r] = part.l[r] * correction + sum;
            part.m[r] = m_new;
        }
        j0 = j1;
    }
    part
}

/// The fused kernel; `None` when the inputs are not f32 CPU tensors with unit inner
/// stride, which the caller then runs on another backend.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Positions,
    params: &AttentionParams,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() {
        return Ok(None);
    }
    let (b_sz, n_heads, q_len, d) = q.dims4()?;
    let (_, n_kv_heads, kv_len, _) = k.dims4()?;
    let shape = Shape {
        rep: n_heads / n_kv_heads,
        q_len,
        kv_len,
        d,
    };
    let out_dtype = q.dtype();
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let se = params.self_extend;
    let table = positions.fused.get_or_init(|| {
        let grouped = se.map_or(0, |se| se.grouped_query_position(kv_len.saturating_sub(1)) + 1);
        positions.rope.table(kv_len.max(grouped))
    });

    let n_tiles = q_len.div_ceil(Q_TILE);
    let base = b_sz * n_kv_heads * n_tiles;
    let threads = rayon::current_num_threads();
    let splits = if base >= 2 * threads {
        1
    } else {
        (4 * threads).div_ceil(base).min(kv_len / MIN_SPLIT).max(1)
    };
    let split_len = kv_len.div_ceil(splits).div_ceil(K_TILE) * K_TILE;
    let items: Vec<Item> = (0..b_sz)
        .flat_map(|b| (0..n_kv_heads).flat_map(move |g| (0..n_tiles).map(move |t| (b, g, t))))
        .flat_map(|(b, g, tile)| {
            (0..splits).map(move |s| Item {
                b,
                g,
                tile,
                keys: (s * split_len, ((s + 1) * split_len).min(kv_len)),
            })
        })
        .collect();

    let scale = params.scale as f32;
    let computed = with_view(&q, |qv| {
        with_view(&k, |kv| {
            with_view(&v, |vv| {
                items
                    .par_iter()
                    .map_init(Scratch::default, |scratch, &item| {
                        run_item(item, &shape, (qv, kv, vv), table, se, scale, scratch)
                    })
                    .collect::<Vec<Partial>>()
            })
        })
    });
    let Some(Some(Some(partials))) = computed else {
        return Ok(None);
    };

    let mut out = vec![0f32; b_sz * n_heads * q_len * d];
    for (group, parts) in items.chunks(splits).zip(partials.chunks(splits)) {
        let Item { b, g, tile, .. } = group[0];
        let t0 = tile * Q_TILE;
        let tile_len = (t0 + Q_TILE).min(q_len) - t0;
        for r in 0..shape.rep * tile_len {
            let h = g * shape.rep + r / tile_len;
            let dst = ((b * n_heads + h) * q_len + t0 + r % tile_len) * d;
            let dst = &mut out[dst..dst + d];
            let m = parts.iter().map(|p| p.m[r]).fold(f32::NEG_INFINITY, f32::max);
            let mut l = 0f32;
            for p in parts {
                let w = (p.m[r] - m).exp();
                l += p.l[r] * w;
                for (o, &a) in dst.iter_mut().zip(&p.acc[r * d..][..d]) {
                    *o += w * a;
                }
            }
            let inv = 1.0 / l;
            dst.iter_mut().for_each(|o| *o *= inv);
        }
    }
    let out = Tensor::from_vec(out, (b_sz, n_heads, q_len, d), q.device())?;
    Ok(Some(out.to_dtype(out_dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_its_range() {
        let mut worst = 0f64;
        for k in 0..=870_000 {
            let x = -(k as f32) * 1e-4;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
