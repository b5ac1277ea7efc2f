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
//! scores vectorise across keys; with few (decode) they stay row-major and scores are
//! taken four keys at a time. An f16 cache is read where it lies: keys are widened as
//! they are rotated and values as they are summed (prefill, whose many row groups all
//! read a tile's values, copies them once per tile into one dense f32 block). When
//! there are fewer (batch, kv head, query tile) items than threads can use, the key
//! range is split and the partial softmaxes are merged.
//!
//! Scores are in log2 units (log2 e is folded into the queries with the softmax scale),
//! so the softmax takes 2^x, which needs no range reduction by ln 2.
//!
//! A ragged batch (the sequences of one decode step, each with its own cache, positions
//! and settings) runs as one set of items, on candle's worker pool, the one the
//! matmuls around attention use: one small call per sequence would leave the other
//! cores idle.

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::{f16, slice::HalfFloatSliceExt};

use super::{AttentionParams, Positions, Ragged, SelfExtend};
use crate::error::Result;
use crate::math::{exp2_nonpositive, fma, transpose8, Widen};
use crate::rope::CosSinTable;

const Q_TILE: usize = 32;
const K_TILE: usize = 64;
/// Rows (query heads × positions) per item from which keys are transposed.
const TRANSPOSE_FROM_ROWS: usize = 16;
/// Keys rotated together and transposed as square blocks ([`transpose8`]'s width).
const TRANSPOSE_BY: usize = 8;
/// Calls with fewer (query rows × keys × heads) than this run on the calling thread.
const SEQUENTIAL_BELOW: usize = 1 << 11;
/// The shortest key range a split-key item gets.
const MIN_SPLIT: usize = 4 * K_TILE;

#[inline]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
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

/// `p[j] = 2^(s[j] - max)` in place (scores in log2 units); returns the sum of `p`.
#[inline]
fn exp2_and_sum(s: &mut [f32], max: f32) -> f32 {
    let (chunks, rest) = s.as_chunks_mut::<8>();
    let mut acc = [0f32; 8];
    for x in chunks {
        for l in 0..8 {
            x[l] = exp2_nonpositive(x[l] - max);
            acc[l] += x[l];
        }
    }
    let mut tail = 0f32;
    for x in rest {
        *x = exp2_nonpositive(*x - max);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `s[r][j] = q[r] . k[j]` for `R` query rows (`q`, row-major with stride `d`) and the
/// `K_TILE` keys of `kt`, stored transposed `(d, K_TILE)`. `R × 16` accumulators stay
/// in registers; each key load feeds `R` FMAs.
#[inline(always)]
fn scores_block<const R: usize>(q: &[f32], d: usize, kt: &[f32], s: &mut [[f32; K_TILE]]) {
    const B: usize = 16;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &q[r * d..][..d]);
    // Whole rows of keys, and blocks counted rather than stepped through, so that every
    // index below is in bounds by construction: no checks in the FMA loop.
    let kt = &kt.as_chunks::<K_TILE>().0[..d];
    for jb in 0..K_TILE / B {
        let mut acc = [[0f32; B]; R];
        for (c, keys) in kt.iter().enumerate() {
            let k: &[f32; B] = keys[jb * B..][..B].try_into().expect("B lanes");
            for r in 0..R {
                let x = rows[r][c];
                for l in 0..B {
                    acc[r][l] = fma(x, k[l], acc[r][l]);
                }
            }
        }
        for r in 0..R {
            s[r][jb * B..][..B].copy_from_slice(&acc[r]);
        }
    }
}

/// `s[r][j] = q[r] . k[j]` for `R` query rows (`q`, row-major with stride `d`) and the
/// `n` keys of `k`, row-major `(n, d)`: decode's layout, where transposing each key
/// would cost more than the scores. Four keys at a time give `4 R` independent
/// accumulator chains; one dot product at a time waits on each FMA's latency.
#[inline(always)]
fn scores_rows<const R: usize>(q: &[f32], d: usize, k: &[f32], n: usize, s: &mut [[f32; K_TILE]]) {
    const KEYS: usize = 4;
    const L: usize = 8;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &q[r * d..][..d]);
    let full = d - d % L;
    for j in (0..n).step_by(KEYS) {
        let kb = KEYS.min(n - j);
        // A short last block repeats its last key; the repeats are not stored.
        let keys: [&[f32]; KEYS] = std::array::from_fn(|x| &k[(j + x.min(kb - 1)) * d..][..d]);
        let mut acc = [[[0f32; L]; KEYS]; R];
        for c in (0..full).step_by(L) {
            let qs: [&[f32; L]; R] =
                std::array::from_fn(|r| rows[r][c..c + L].try_into().expect("L lanes"));
            for x in 0..KEYS {
                let kv: &[f32; L] = keys[x][c..c + L].try_into().expect("L lanes");
                for r in 0..R {
                    fma8(&mut acc[r][x], qs[r], kv);
                }
            }
        }
        for r in 0..R {
            for x in 0..kb {
                let mut sum = lane_sum(&acc[r][x]);
                for c in full..d {
                    sum = fma(rows[r][c], keys[x][c], sum);
                }
                s[r][j + x] = sum;
            }
        }
    }
}

/// `acc += a · b` lane-wise. As a function of its own the lanes vectorise; written
/// inline in `scores_rows`'s nested loops they compiled to scalar code.
#[inline(always)]
fn fma8(acc: &mut [f32; 8], a: &[f32; 8], b: &[f32; 8]) {
    for l in 0..8 {
        acc[l] = fma(a[l], b[l], acc[l]);
    }
}

/// The sum of eight lanes as a tree, which compiles to a few shuffles and adds.
#[inline(always)]
fn lane_sum(a: &[f32; 8]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

/// `acc[r] += Σ_j p[r][j] · v[j]` for `R` rows (`acc` row-major with stride `d`) over
/// the value rows `v` of a key tile (at most [`K_TILE`]), widened from the cache's type
/// as they are read. Prefill passes `chunks_exact` over one dense block, whose fixed row
/// length lets the compiler check bounds once per tile rather than per row; decode
/// passes the rows where they lie in the cache.
#[inline(always)]
fn values_block<'v, T: Widen, const R: usize>(
    p: &[[f32; K_TILE]],
    v: impl Iterator<Item = &'v [T]> + Clone,
    acc: &mut [f32],
    d: usize,
) {
    const B: usize = 16;
    let p: &[[f32; K_TILE]; R] = p[..R].try_into().expect("R rows");
    let full = d - d % B;
    for c0 in (0..full).step_by(B) {
        let mut a: [[f32; B]; R] =
            std::array::from_fn(|r| acc[r * d + c0..][..B].try_into().expect("B lanes"));
        for (row, j) in v.clone().zip(0..K_TILE) {
            let lanes = &row[c0..c0 + B];
            let lo = T::widen8(lanes[..8].try_into().expect("8 lanes"));
            let hi = T::widen8(lanes[8..].try_into().expect("8 lanes"));
            for r in 0..R {
                let pr = p[r][j];
                for l in 0..8 {
                    a[r][l] = fma(pr, lo[l], a[r][l]);
                    a[r][l + 8] = fma(pr, hi[l], a[r][l + 8]);
                }
            }
        }
        for r in 0..R {
            acc[r * d + c0..][..B].copy_from_slice(&a[r]);
        }
    }
    if full < d {
        for r in 0..R {
            for (row, j) in v.clone().zip(0..K_TILE) {
                let pr = p[r][j];
                for (a, &x) in acc[r * d + full..][..d - full].iter_mut().zip(&row[full..]) {
                    *a = fma(pr, x.widen(), *a);
                }
            }
        }
    }
}

/// [`values_block`] for a group of `rows` (1 to 4) query rows.
fn values_group<'v, T: Widen>(
    rows: usize,
    p: &[[f32; K_TILE]],
    v: impl Iterator<Item = &'v [T]> + Clone,
    acc: &mut [f32],
    d: usize,
) {
    match rows {
        4 => values_block::<T, 4>(p, v, acc, d),
        3 => values_block::<T, 3>(p, v, acc, d),
        2 => values_block::<T, 2>(p, v, acc, d),
        _ => values_block::<T, 1>(p, v, acc, d),
    }
}

/// A read-only `(batch, heads, seq, head_dim)` view with unit inner stride, of f32
/// data or of an f16 KV cache.
struct View<'a> {
    data: Data<'a>,
    offset: usize,
    strides: [usize; 3],
    head_dim: usize,
}

enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// The rows of a key tile in the cache's type; rows past the tile's end are empty.
enum Tile<'a> {
    F32([&'a [f32]; K_TILE]),
    F16([&'a [f16]; K_TILE]),
}

impl<'a> View<'a> {
    /// `t`'s data if it is f32 or f16 on the CPU with unit inner stride; `storage` is
    /// `t`'s, held for reading while the view lives.
    fn of(storage: &'a Storage, layout: &Layout) -> Option<Self> {
        let data = match storage {
            Storage::Cpu(CpuStorage::F32(data)) => Data::F32(data),
            Storage::Cpu(CpuStorage::F16(data)) => Data::F16(data),
            _ => return None,
        };
        let s = layout.stride();
        if s.len() != 4 || s[3] != 1 {
            return None;
        }
        Some(Self {
            data,
            offset: layout.start_offset(),
            strides: [s[0], s[1], s[2]],
            head_dim: layout.dims()[3],
        })
    }

    /// Row `(b, h, t)` in f32: the data itself, or converted into `buf` (`head_dim`
    /// long) from f16.
    #[inline]
    fn row<'s>(&'s self, b: usize, h: usize, t: usize, buf: &'s mut [f32]) -> &'s [f32] {
        let o = self.at(b, h, t);
        match self.data {
            Data::F32(data) => &data[o..o + self.head_dim],
            Data::F16(data) => {
                data[o..o + self.head_dim].convert_to_f32_slice(buf);
                buf
            }
        }
    }

    /// Rows `(b, h, t0 .. t1)` (at most [`K_TILE`]) as stored: the kernels widen f16
    /// as they read it, so no converted copy of a tile passes through memory.
    fn tile(&self, b: usize, h: usize, (t0, t1): (usize, usize)) -> Tile<'a> {
        let d = self.head_dim;
        let rows = |t: usize| (t0 + t < t1).then(|| self.at(b, h, t0 + t));
        match self.data {
            Data::F32(data) => Tile::F32(std::array::from_fn(|t| {
                rows(t).map_or(&[][..], |o| &data[o..o + d])
            })),
            Data::F16(data) => Tile::F16(std::array::from_fn(|t| {
                rows(t).map_or(&[][..], |o| &data[o..o + d])
            })),
        }
    }

    #[inline]
    fn at(&self, b: usize, h: usize, t: usize) -> usize {
        self.offset + b * self.strides[0] + h * self.strides[1] + t * self.strides[2]
    }
}

/// One unit of parallel work: the rows of query tile `tile` of the query heads that
/// share kv head `g`, against keys `keys.0 .. keys.1`.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Which sequence of the call.
    seq: usize,
    b: usize,
    g: usize,
    tile: usize,
    keys: (usize, usize),
}

/// An un-normalised softmax over part of the keys: running max (in log2 units, as the
/// scores are), sum and weighted values.
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
    /// [`TRANSPOSE_BY`] rotated keys, row-major, on their way into a transposed tile.
    rotated: Vec<f32>,
    /// One f16 query in f32.
    raw: Vec<f32>,
    /// A tile's values as one dense f32 block (f16 widened, f32 gathered where its rows
    /// are not adjacent), where many row groups read them (prefill).
    values: Vec<f32>,
}

#[derive(Clone, Copy)]
struct Shape {
    rep: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
}

/// What a layer adds to plain causal attention besides SelfExtend.
#[derive(Clone, Copy)]
struct Layer {
    /// Keys at this distance or more are masked (`usize::MAX`: none).
    sliding_window: usize,
    softcap: Option<f32>,
}

/// Writes the first `n` keys of `keys` (at positions `j0 ..`) rotated to `pos(j)` into
/// `out`, transposed `(d, K_TILE)` or row-major `(K_TILE, d)`.
fn rotate_keys(
    keys: &Tile,
    n: usize,
    j0: usize,
    (table, pos): (&CosSinTable, impl Fn(usize) -> usize),
    transposed: bool,
    rotated: &mut [f32],
    out: &mut [f32],
) {
    match keys {
        Tile::F32(rows) => rotate_rows(&rows[..n], j0, (table, pos), transposed, rotated, out),
        Tile::F16(rows) => rotate_rows(&rows[..n], j0, (table, pos), transposed, rotated, out),
    }
}

fn rotate_rows<T: Widen>(
    keys: &[&[T]],
    j0: usize,
    (table, pos): (&CosSinTable, impl Fn(usize) -> usize),
    transposed: bool,
    rotated: &mut [f32],
    out: &mut [f32],
) {
    const T: usize = TRANSPOSE_BY;
    let d = rotated.len() / T;
    if !transposed {
        for (jj, key) in keys.iter().enumerate() {
            table.rotate(key, pos(j0 + jj), &mut out[jj * d..][..d]);
        }
        return;
    }
    // Eight keys at a time, rotated row-major and then written as transposed 8 × 8
    // blocks: register shuffles and whole-vector stores, not a scalar store per element.
    // A short last block fills the columns past the tile's keys with stale keys, whose
    // scores are never used.
    let full = d - d % T;
    for (block, batch) in keys.chunks(T).enumerate() {
        let jj = block * T;
        for (x, key) in batch.iter().enumerate() {
            table.rotate(key, pos(j0 + jj + x), &mut rotated[x * d..][..d]);
        }
        for c0 in (0..full).step_by(T) {
            let m: [[f32; T]; T] =
                std::array::from_fn(|x| rotated[x * d + c0..][..T].try_into().expect("T lanes"));
            for (c, column) in transpose8(&m).iter().enumerate() {
                out[(c0 + c) * K_TILE + jj..][..T].copy_from_slice(column);
            }
        }
        for c in full..d {
            for x in 0..batch.len() {
                out[c * K_TILE + jj + x] = rotated[x * d + c];
            }
        }
    }
}

fn run_item(item: Item, seq: &Sequence, s: &mut Scratch) -> Partial {
    let Item {
        b, g, tile, keys, ..
    } = item;
    let Sequence {
        q: qv,
        k: kv,
        v: vv,
        shape,
        table,
        se,
        layer,
        scale,
    } = seq;
    let (se, layer, scale) = (*se, *layer, *scale);
    let d = shape.d;
    let index_pos = shape.kv_len - shape.q_len;
    let t0 = tile * Q_TILE;
    let tile_len = (t0 + Q_TILE).min(shape.q_len) - t0;
    let rows = shape.rep * tile_len;
    // Row r is query head g * rep + r / tile_len at position index_pos + t0 + r % tile_len.
    let pos = |r: usize| index_pos + t0 + r % tile_len;
    let transposed = rows >= TRANSPOSE_FROM_ROWS;

    s.qn.resize(rows * d, 0.0);
    s.rotated.resize(TRANSPOSE_BY * d, 0.0);
    s.raw.resize(d, 0.0);
    s.kn.resize(K_TILE * d, 0.0);
    if se.is_some() {
        s.qg.resize(rows * d, 0.0);
        s.kg.resize(K_TILE * d, 0.0);
    }
    // The softmax scale is folded into the rotated queries, and with it log2 e: scores,
    // and the running maxima, are in log2 units, so the softmax takes 2^x.
    let scale = scale * std::f32::consts::LOG2_E;
    for r in 0..rows {
        let x = qv.row(
            b,
            g * shape.rep + r / tile_len,
            t0 + r % tile_len,
            &mut s.raw,
        );
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
    const GROUP: usize = 4;
    let mut sn = [[0f32; K_TILE]; GROUP];
    let mut sg = [[0f32; K_TILE]; GROUP];
    // Keys before the first row's window are masked for every row of the tile.
    let mut j0 = keys.0.max((i_min + 1).saturating_sub(layer.sliding_window));
    let end = keys.1.min(i_max + 1);
    while j0 < end {
        let j1 = (j0 + K_TILE).min(end);
        // Some pair of the tile is a neighbor / is grouped.
        let need_n = i_min < (j1 - 1).saturating_add(window);
        let need_g = i_max >= j0.saturating_add(window);
        let kt = j1 - j0;
        let key_rows = kv.tile(b, g, (j0, j1));
        if need_n {
            let n = (&**table, |j| j);
            rotate_keys(&key_rows, kt, j0, n, transposed, &mut s.rotated, &mut s.kn);
        }
        if let (true, Some(se)) = (need_g, se) {
            let g = (&**table, |j| se.grouped_key_position(j));
            rotate_keys(&key_rows, kt, j0, g, transposed, &mut s.rotated, &mut s.kg);
        }
        let values = vv.tile(b, g, (j0, j1));
        // Prefill's many row groups all read the tile's values as one dense block,
        // which the values loop walks without per-row slices: a copy made once per
        // tile (f16 widened). Even adjacent f32 rows are copied: read in place from the
        // cache, they made the values loop slower than the copy costs. Decode's few
        // rows read them where they lie.
        let dense: &[f32] = if !transposed {
            &[]
        } else {
            s.values.resize(kt * d, 0.0);
            let out = s.values.chunks_exact_mut(d);
            match &values {
                Tile::F16(rows) => rows[..kt]
                    .iter()
                    .zip(out)
                    .for_each(|(row, out)| row.convert_to_f32_slice(out)),
                Tile::F32(rows) => rows[..kt]
                    .iter()
                    .zip(out)
                    .for_each(|(row, out)| out.copy_from_slice(row)),
            }
            &s.values
        };
        for r0 in (0..rows).step_by(GROUP) {
            let group = GROUP.min(rows - r0);
            // Row r0 + x sees keys j0 + lo[x] .. j0 + n[x] (the ones before lo[x] are
            // outside its sliding window); the first split[x] from j0 are grouped.
            let mut n = [0usize; GROUP];
            let mut lo = [0usize; GROUP];
            let mut split = [0usize; GROUP];
            for x in 0..group {
                let i = pos(r0 + x);
                n[x] = (i + 1).saturating_sub(j0).min(kt);
                lo[x] = (i + 1)
                    .saturating_sub(layer.sliding_window)
                    .saturating_sub(j0)
                    .min(n[x]);
                split[x] = (i + 1).saturating_sub(j0).saturating_sub(window).min(n[x]);
            }
            if (0..group).all(|x| n[x] == lo[x]) {
                continue;
            }
            let any_n = (0..group).any(|x| split[x] < n[x]);
            let any_g = (0..group).any(|x| split[x] > 0);
            let qn = &s.qn[r0 * d..];
            let qg = if any_g { &s.qg[r0 * d..] } else { &[][..] };
            // Where no row of the group has a neighbor in this tile (past the window:
            // most tiles), grouped scores go straight into `sn`; else into `sg`, and the
            // grouped part of each row is copied over below.
            let both = any_n && any_g;
            let grouped_out = if both { &mut sg } else { &mut sn };
            if transposed {
                let blocks = |q: &[f32], k: &[f32], out: &mut [[f32; K_TILE]; GROUP]| match group {
                    4 => scores_block::<4>(q, d, k, out),
                    3 => scores_block::<3>(q, d, k, out),
                    2 => scores_block::<2>(q, d, k, out),
                    _ => scores_block::<1>(q, d, k, out),
                };
                if any_g {
                    blocks(qg, &s.kg, grouped_out);
                }
                if any_n {
                    blocks(qn, &s.kn, &mut sn);
                }
            } else {
                let rows = |q: &[f32], k: &[f32], out: &mut [[f32; K_TILE]; GROUP]| match group {
                    4 => scores_rows::<4>(q, d, k, kt, out),
                    3 => scores_rows::<3>(q, d, k, kt, out),
                    2 => scores_rows::<2>(q, d, k, kt, out),
                    _ => scores_rows::<1>(q, d, k, kt, out),
                };
                if any_g {
                    rows(qg, &s.kg, grouped_out);
                }
                if any_n {
                    rows(qn, &s.kn, &mut sn);
                }
            }
            if both {
                for x in 0..group {
                    sn[x][..split[x]].copy_from_slice(&sg[x][..split[x]]);
                }
            }
            for x in 0..group {
                let r = r0 + x;
                let scores = &mut sn[x];
                if n[x] == lo[x] {
                    scores[..kt].fill(0.0);
                    continue;
                }
                let seen = &mut scores[lo[x]..n[x]];
                if let Some(cap) = layer.softcap {
                    // cap · tanh(s / cap) in natural units is this in log2 units.
                    let cap = cap * std::f32::consts::LOG2_E;
                    seen.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
                }
                let m_old = part.m[r];
                let m_new = m_old.max(max_of(seen));
                let sum = exp2_and_sum(seen, m_new);
                scores[..lo[x]].fill(0.0);
                scores[n[x]..kt].fill(0.0);
                let correction = exp2_nonpositive(m_old - m_new);
                if correction != 1.0 {
                    part.acc[r * d..][..d]
                        .iter_mut()
                        .for_each(|a| *a *= correction);
                }
                part.l[r] = part.l[r] * correction + sum;
                part.m[r] = m_new;
            }
            let acc = &mut part.acc[r0 * d..];
            match &values {
                _ if transposed => values_group(group, &sn, dense.chunks_exact(d), acc, d),
                Tile::F32(rows) => values_group(group, &sn, rows[..kt].iter().copied(), acc, d),
                Tile::F16(rows) => values_group(group, &sn, rows[..kt].iter().copied(), acc, d),
            }
        }
        j0 = j1;
    }
    part
}

/// One sequence of a call, viewed: its operands and settings.
struct Sequence<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    shape: Shape,
    table: &'a CosSinTable,
    se: Option<SelfExtend>,
    layer: Layer,
    scale: f32,
}

/// Where output row `(b, h, t)` of a sequence starts in the call's buffer:
/// `offset + b * batch + h * head + t * pos` (the row's `head_dim` values are contiguous).
#[derive(Clone, Copy)]
struct Dest {
    offset: usize,
    batch: usize,
    head: usize,
    pos: usize,
}

/// One sequence's operands in f32 and its settings, before they are viewed.
struct Prepared<'p> {
    qkv: [Tensor; 3],
    batch: usize,
    n_heads: usize,
    n_kv_heads: usize,
    shape: Shape,
    table: &'p CosSinTable,
    /// The call's SelfExtend, `None` while no pair can be grouped.
    self_extend: Option<SelfExtend>,
    params: &'p AttentionParams,
    dest: Dest,
}

impl<'p> Prepared<'p> {
    fn new(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        positions: &'p Positions,
        params: &'p AttentionParams,
        dest: Dest,
    ) -> Result<Self> {
        let (batch, n_heads, q_len, d) = q.dims4()?;
        let (_, n_kv_heads, kv_len, _) = k.dims4()?;
        // No pair is grouped until the keys outnumber the window; past that, every
        // grouped position lies below `kv_len`, so the table never outgrows the call
        // (a window of 10^10 costs nothing until a sequence reaches it).
        let self_extend = params.self_extend.filter(|se| kv_len > se.window());
        let table = positions.fused.get_or_init(|| {
            let grouped = self_extend.map_or(0, |se| {
                se.grouped_query_position(kv_len.saturating_sub(1)) + 1
            });
            positions.rope.table(kv_len.max(grouped))
        });
        Ok(Self {
            // An f16 cache is read as it is; queries (few) and other dtypes become f32.
            qkv: [q.to_dtype(DType::F32)?, readable(k)?, readable(v)?],
            batch,
            n_heads,
            n_kv_heads,
            shape: Shape {
                rep: n_heads / n_kv_heads,
                q_len,
                kv_len,
                d,
            },
            table,
            self_extend,
            params,
            dest,
        })
    }

    fn work(&self) -> usize {
        self.batch * self.n_heads * self.shape.q_len * self.shape.kv_len
    }
}

/// `t` as the kernel reads it: f32 and f16 as they are, other dtypes in f32.
fn readable(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F32 | DType::F16 => t.clone(),
        _ => t.to_dtype(DType::F32)?,
    })
}

/// Runs every sequence of `seqs` as one set of parallel items and writes their outputs
/// into a buffer of `len` values at their [`Dest`]s; `None` if some operand is not f32
/// CPU data with unit inner stride.
fn compute(seqs: &[Prepared], len: usize) -> Option<Vec<f32>> {
    let held: Vec<[_; 3]> = seqs
        .iter()
        .map(|p| p.qkv.each_ref().map(|t| t.storage_and_layout()))
        .collect();
    let viewed = seqs
        .iter()
        .zip(&held)
        .map(|(p, [q, k, v])| {
            Some(Sequence {
                q: View::of(&q.0, q.1)?,
                k: View::of(&k.0, k.1)?,
                v: View::of(&v.0, v.1)?,
                shape: p.shape,
                table: p.table,
                se: p.self_extend,
                layer: Layer {
                    sliding_window: p.params.sliding_window.unwrap_or(usize::MAX),
                    softcap: p.params.softcap.map(|c| c as f32),
                },
                scale: p.params.scale as f32,
            })
        })
        .collect::<Option<Vec<Sequence>>>()?;

    // Items of one (sequence, batch, kv head, query tile) are consecutive: the key
    // range split in `splits[seq]` parts. A sequence is split as it would be as the only
    // sequence of a call on the whole pool, so its result depends neither on what else
    // is in the batch nor on the thread that runs it (see `crate::parallel`).
    let tiles = |p: &Prepared| p.shape.q_len.div_ceil(Q_TILE);
    let threads = crate::parallel::threads();
    let mut items = Vec::new();
    let mut splits = Vec::with_capacity(seqs.len());
    for (seq, p) in seqs.iter().enumerate() {
        let (kv_len, base) = (p.shape.kv_len, p.batch * p.n_kv_heads * tiles(p));
        let wanted = if base >= 2 * threads {
            1
        } else {
            (4 * threads).div_ceil(base.max(1))
        };
        let most = kv_len / MIN_SPLIT;
        let mut n = wanted.min(most).max(1);
        // Whole rounds of items per thread: in a short last round some threads idle.
        while n > 1 && n < most && (base * n) % threads != 0 {
            n += 1;
        }
        let split_len = kv_len.div_ceil(n).div_ceil(K_TILE) * K_TILE;
        for b in 0..p.batch {
            for g in 0..p.n_kv_heads {
                for tile in 0..tiles(p) {
                    items.extend((0..n).map(|s| Item {
                        seq,
                        b,
                        g,
                        tile,
                        keys: (s * split_len, ((s + 1) * split_len).min(kv_len)),
                    }));
                }
            }
        }
        splits.push(n);
    }

    // Small calls (decode at short context) run on this thread: waking the workers
    // costs more than the work.
    let sequential = seqs.iter().map(Prepared::work).sum::<usize>() < SEQUENTIAL_BELOW;
    let partials = run_items(&items, sequential, |item, scratch| {
        run_item(item, &viewed[item.seq], scratch)
    });

    let mut out = vec![0f32; len];
    let mut at = 0;
    while at < items.len() {
        let Item {
            seq, b, g, tile, ..
        } = items[at];
        let n = splits[seq];
        let parts = &partials[at..at + n];
        at += n;
        let (shape, dest) = (&seqs[seq].shape, seqs[seq].dest);
        let d = shape.d;
        let t0 = tile * Q_TILE;
        let tile_len = (t0 + Q_TILE).min(shape.q_len) - t0;
        for r in 0..shape.rep * tile_len {
            let h = g * shape.rep + r / tile_len;
            let t = t0 + r % tile_len;
            let dst = dest.offset + b * dest.batch + h * dest.head + t * dest.pos;
            let dst = &mut out[dst..dst + d];
            let m = parts
                .iter()
                .map(|p| p.m[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut l = 0f32;
            for p in parts {
                let w = (p.m[r] - m).exp2();
                l += p.l[r] * w;
                for (o, &a) in dst.iter_mut().zip(&p.acc[r * d..][..d]) {
                    *o += w * a;
                }
            }
            let inv = 1.0 / l;
            dst.iter_mut().for_each(|o| *o *= inv);
        }
    }
    Some(out)
}

/// `run` over every item, on candle's worker pool (the one the matmuls around
/// attention use, so no second pool competes for the cores) unless `sequential`.
fn run_items(
    items: &[Item],
    sequential: bool,
    run: impl Fn(Item, &mut Scratch) -> Partial + Sync,
) -> Vec<Partial> {
    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }
    let with_scratch = |item: Item| SCRATCH.with_borrow_mut(|scratch| run(item, scratch));
    if sequential {
        return items.iter().map(|&item| with_scratch(item)).collect();
    }
    let slots: Vec<OnceLock<Partial>> = items.iter().map(|_| OnceLock::new()).collect();
    crate::parallel::execute_chunked(items.len(), |range| {
        for i in range {
            // Each index is handed out once, so the slot is empty.
            let _ = slots[i].set(with_scratch(items[i]));
        }
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("the pool runs every item"))
        .collect()
}

/// The fused kernel for one call, `(batch, n_heads, q_len, head_dim)`; `None` off the
/// CPU, where the caller runs another backend.
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
    let dest = Dest {
        offset: 0,
        batch: n_heads * q_len * d,
        head: q_len * d,
        pos: d,
    };
    let seq = Prepared::new((q, k, v), positions, params, dest)?;
    let Some(out) = compute(&[seq], b_sz * n_heads * q_len * d) else {
        return Ok(None);
    };
    let out = Tensor::from_vec(out, (b_sz, n_heads, q_len, d), q.device())?;
    Ok(Some(out.to_dtype(q.dtype())?))
}

/// The fused kernel over the sequences of a ragged batch in one pass, `(1, Σ q_len,
/// n_heads * head_dim)`; `None` off the CPU. The caller has checked that the sequences
/// share one batch row, `n_heads`, `head_dim` and dtype.
pub(super) fn ragged(seqs: &[Ragged]) -> Result<Option<Tensor>> {
    let Some(first) = seqs.first() else {
        return Ok(None);
    };
    if seqs.iter().any(|s| !s.q.device().is_cpu()) {
        return Ok(None);
    }
    let (_, n_heads, _, d) = first.q.dims4()?;
    let mut rows = 0;
    let mut prepared = Vec::with_capacity(seqs.len());
    for s in seqs {
        let dest = Dest {
            offset: rows * n_heads * d,
            batch: 0,
            head: d,
            pos: n_heads * d,
        };
        prepared.push(Prepared::new(
            (&s.q, &s.k, &s.v),
            s.positions,
            s.params,
            dest,
        )?);
        rows += s.q.dim(2)?;
    }
    let Some(out) = compute(&prepared, rows * n_heads * d) else {
        return Ok(None);
    };
    let out = Tensor::from_vec(out, (1, rows, n_heads * d), first.q.device())?;
    Ok(Some(out.to_dtype(first.q.dtype())?))
}
