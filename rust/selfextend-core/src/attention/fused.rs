//! Fused SelfExtend attention for the CPU, in the style of FlashAttention (Dao et al.,
//! 2022): query and key tiles, an online f32 softmax, and no `q_len × kv_len` buffer.
//!
//! Each (query tile, key tile) pair computes only the scores it needs: neighbor scores
//! where every pair is within the window, grouped scores where every pair is beyond
//! it, and both, chosen per element, only on the tiles the window boundary crosses. So
//! SelfExtend costs about one attention, not two. Keys are rotated per tile from the
//! un-rotated cache into thread-local buffers; all query heads that share a key/value
//! head are processed together, so each key is rotated once per query tile. Extra
//! memory is `O(tile × head_dim)` per thread.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use super::{AttentionParams, Positions};
use crate::error::Result;

const Q_TILE: usize = 32;
const K_TILE: usize = 128;

/// cos/sin of every rotary position a forward call can use, row `p` at `p * half`.
pub(super) struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(positions: &Positions, params: &AttentionParams) -> Self {
        let kv_len = positions.kv_len;
        let max_grouped = params
            .self_extend
            .map_or(0, |se| se.grouped_query_position(kv_len.saturating_sub(1)) + 1);
        let len = kv_len.max(max_grouped);
        let inv_freq = positions.rope.inv_freq();
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Writes `x` rotated to position `pos` into `out` ("rotate half" layout).
    #[inline]
    fn rotate(&self, x: &[f32], pos: usize, out: &mut [f32]) {
        let h = self.half;
        let (cos, sin) = (&self.cos[pos * h..][..h], &self.sin[pos * h..][..h]);
        let (x1, x2) = x.split_at(h);
        let (o1, o2) = out.split_at_mut(h);
        for i in 0..h {
            o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
            o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let LLVM keep a full AVX register busy.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

#[inline]
fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += p * x;
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
    let (b_sz, n_heads, q_len, head_dim) = q.dims4()?;
    let (_, n_kv_heads, kv_len, _) = k.dims4()?;
    let rep = n_heads / n_kv_heads;
    let index_pos = kv_len - q_len;
    let out_dtype = q.dtype();
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let table = match positions.fused.get() {
        Some(t) => t,
        None => positions.fused.get_or_init(|| RopeTable::new(positions, params)),
    };
    let scale = params.scale as f32;
    let se = params.self_extend;
    let n_tiles = q_len.div_ceil(Q_TILE);
    let items: Vec<(usize, usize, usize)> = (0..b_sz)
        .flat_map(|b| (0..n_kv_heads).flat_map(move |g| (0..n_tiles).map(move |t| (b, g, t))))
        .collect();

    let computed = with_view(&q, |qv| {
        with_view(&k, |kv| {
            with_view(&v, |vv| {
                items
                    .par_iter()
                    .map(|&(b, g, tile)| {
                        let t0 = tile * Q_TILE;
                        let t1 = (t0 + Q_TILE).min(q_len);
                        let rows = rep * (t1 - t0);
                        let d = head_dim;
                        // Row r is query head g * rep + r / tile_len, position t0 + r % tile_len.
                        let tile_len = t1 - t0;
                        let pos = |r: usize| index_pos + t0 + r % tile_len;
                        let mut qn = vec![0f32; rows * d];
                        let mut qg = if se.is_some() { vec![0f32; rows * d] } else { vec![] };
                        for r in 0..rows {
                            let x = qv.row(b, g * rep + r / tile_len, t0 + r % tile_len);
                            table.rotate(x, pos(r), &mut qn[r * d..][..d]);
                            if let Some(se) = se {
                                table.rotate(x, se.grouped_query_position(pos(r)), &mut qg[r * d..][..d]);
                            }
                        }
                        let mut acc = vec![0f32; rows * d];
                        let mut m = vec![f32::NEG_INFINITY; rows];
                        let mut l = vec![0f32; rows];
                        let mut kn = vec![0f32; K_TILE * d];
                        let mut kg = if se.is_some() { vec![0f32; K_TILE * d] } else { vec![] };
                        let mut scores = vec![0f32; K_TILE];
                        let (i_min, i_max) = (index_pos + t0, index_pos + t1 - 1);
                        let mut j0 = 0;
                        while j0 <= i_max {
                            let j1 = (j0 + K_TILE).min(i_max + 1);
                            let (need_n, need_g) = match se {
                                None => (true, false),
                                Some(se) => (i_min < (j1 - 1) + se.window(), i_max >= j0 + se.window()),
                            };
                            for j in j0..j1 {
                                let x = kv.row(b, g, j);
                                let o = (j - j0) * d;
                                if need_n {
                                    table.rotate(x, j, &mut kn[o..o + d]);
                                }
                                if let (true, Some(se)) = (need_g, se) {
                                    table.rotate(x, se.grouped_key_position(j), &mut kg[o..o + d]);
                                }
                            }
                            for r in 0..rows {
                                let i = pos(r);
                                if j0 > i {
                                    continue;
                                }
                                let end = j1.min(i + 1);
                                let qn_r = &qn[r * d..][..d];
                                let mut tile_max = f32::NEG_INFINITY;
                                for j in j0..end {
                                    let o = (j - j0) * d;
                                    let s = match se {
                                        Some(se) if !se.is_neighbor(i, j) => dot(&qg[r * d..][..d], &kg[o..o + d]),
                                        _ => dot(qn_r, &kn[o..o + d]),
                                    } * scale;
                                    scores[j - j0] = s;
                                    tile_max = tile_max.max(s);
                                }
                                let m_new = m[r].max(tile_max);
                                let correction = (m[r] - m_new).exp();
                                let acc_r = &mut acc[r * d..][..d];
                                if correction != 1.0 {
                                    acc_r.iter_mut().for_each(|a| *a *= correction);
                                }
                                let mut sum = 0f32;
                                for j in j0..end {
                                    let p = (scores[j - j0] - m_new).exp();
                                    sum += p;
                                    axpy(acc_r, p, vv.row(b, g, j));
                                }
                                l[r] = l[r] * correction + sum;
                                m[r] = m_new;
                            }
                            j0 = j1;
                        }
                        for r in 0..rows {
                            let inv = 1.0 / l[r];
                            acc[r * d..][..d].iter_mut().for_each(|a| *a *= inv);
                        }
                        acc
                    })
                    .collect::<Vec<Vec<f32>>>()
            })
        })
    });
    let Some(Some(Some(tiles))) = computed else {
        return Ok(None);
    };
    let mut out = vec![0f32; b_sz * n_heads * q_len * head_dim];
    for (&(b, g, tile), acc) in items.iter().zip(tiles) {
        let t0 = tile * Q_TILE;
        let tile_len = (t0 + Q_TILE).min(q_len) - t0;
        for r in 0..rep {
            let h = g * rep + r;
            let dst = ((b * n_heads + h) * q_len + t0) * head_dim;
            out[dst..dst + tile_len * head_dim]
                .copy_from_slice(&acc[r * tile_len * head_dim..][..tile_len * head_dim]);
        }
    }
    let out = Tensor::from_vec(out, (b_sz, n_heads, q_len, head_dim), q.device())?;
    Ok(Some(out.to_dtype(out_dtype)?))
}
