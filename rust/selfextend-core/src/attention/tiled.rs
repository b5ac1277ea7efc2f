//! SelfExtend attention (Jin et al., ICML 2024) from candle ops, over blocks of queries,
//! so it runs on any candle device (CPU, CUDA, Metal) in `O(block * kv_len)` memory.
//!
//! Queries and keys are rotated once per call at both kinds of positions; each block of
//! query rows then scores the keys it can see, picks neighbor or grouped scores per
//! pair with masks built on the device, and takes one f32 softmax.

use candle_core::{DType, Device, Tensor};

use super::naive::gqa_matmul;
use super::{AttentionParams, Positions};
use crate::error::Result;
use crate::rope::apply_rotary;

/// Query rows per block unless the context is long.
pub(super) const QUERY_BLOCK: usize = 256;

/// About this many f32 scores per block (64 MiB), across heads.
const SCORE_BUDGET: usize = 1 << 24;

/// Rotation tables for one call: neighbor positions, and grouped ones with SelfExtend.
pub(super) struct Tables {
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    grouped: Option<((Tensor, Tensor), (Tensor, Tensor))>,
}

impl Tables {
    /// Rows of the rotary embedding's table on the device, gathered by position, so
    /// that no angle is computed per call.
    fn new(positions: &Positions, params: &AttentionParams, dev: &Device) -> Result<Self> {
        let pos = positions.rotary_positions(params.self_extend);
        let grouped_top = pos
            .grouped
            .as_ref()
            .and_then(|(gq, _)| gq.iter().max().copied());
        let rows = positions.kv_len.max(grouped_top.map_or(0, |p| p + 1));
        let (cos, sin) = positions.rope.device_table(rows, dev)?;
        let at = |p: &[usize]| -> Result<(Tensor, Tensor)> {
            let index: Vec<u32> = p.iter().map(|&x| x as u32).collect();
            let index = Tensor::from_vec(index, p.len(), dev)?;
            Ok((cos.index_select(&index, 0)?, sin.index_select(&index, 0)?))
        };
        let (q_start, q_len) = (positions.kv_len - positions.q_len, positions.q_len);
        let grouped = match &pos.grouped {
            Some((gq, gk)) => Some((at(gq)?, at(gk)?)),
            None => None,
        };
        Ok(Self {
            q: (
                cos.narrow(0, q_start, q_len)?,
                sin.narrow(0, q_start, q_len)?,
            ),
            k: (
                cos.narrow(0, 0, positions.kv_len)?,
                sin.narrow(0, 0, positions.kv_len)?,
            ),
            grouped,
        })
    }
}

fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    apply_rotary(x, cos, sin)
}

/// Queries and keys (as f32) rotated to their neighbor positions, and with SelfExtend
/// to their grouped positions: `((q, k), Some((q, k)))`.
#[allow(clippy::type_complexity)]
pub(super) fn rotated(
    q: &Tensor,
    k: &Tensor,
    positions: &Positions,
    params: &AttentionParams,
) -> Result<((Tensor, Tensor), Option<(Tensor, Tensor)>)> {
    let tables = super::cached(&positions.tiled, || {
        Tables::new(positions, params, q.device())
    })?;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let neighbor = (rotate(&q, &tables.q)?, rotate(&k, &tables.k)?);
    let grouped = match &tables.grouped {
        Some((gq, gk)) => Some((rotate(&q, gq)?, rotate(&k, gk)?)),
        None => None,
    };
    Ok((neighbor, grouped))
}

/// Query rows per block: at most `query_block`, and few enough that one block's
/// `(heads, rows, kv_len)` scores stay within [`SCORE_BUDGET`].
pub(super) fn block_rows(query_block: usize, n_heads: usize, kv_len: usize) -> usize {
    (SCORE_BUDGET / (n_heads * kv_len).max(1)).clamp(1, query_block.max(1))
}

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Positions,
    params: &AttentionParams,
    query_block: usize,
) -> Result<Tensor> {
    let (_, n_heads, q_len, _) = q.dims4()?;
    let (_, n_kv_heads, kv_len, _) = k.dims4()?;
    let dev = q.device();
    let out_dtype = q.dtype();
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let scale = params.scale;
    let (neighbor, grouped) = rotated(q, k, positions, params)?;
    let start = kv_len - q_len;
    let rows = block_rows(query_block, n_heads, kv_len);
    let mut blocks = Vec::with_capacity(q_len.div_ceil(rows));
    for b0 in (0..q_len).step_by(rows) {
        let rows = rows.min(q_len - b0);
        // Keys past the block's last query, or before its first query's window, are
        // masked for every row: leave them out.
        let visible = start + b0 + rows;
        let first = params
            .sliding_window
            .map_or(0, |w| (start + b0 + 1).saturating_sub(w));
        let keys = visible - first;
        let scores = |(q, k): &(Tensor, Tensor)| -> Result<Tensor> {
            let q = q.narrow(2, b0, rows)?;
            let k = k.narrow(2, first, keys)?;
            Ok((gqa_matmul(&q, &k.t()?, n_kv_heads)? * scale)?)
        };
        // Absolute positions: i of the block's queries (a column), j of the keys (a row).
        let i = Tensor::arange((start + b0) as u32, visible as u32, dev)?.unsqueeze(1)?;
        let j = Tensor::arange(first as u32, visible as u32, dev)?.unsqueeze(0)?;
        let mut s = scores(&neighbor)?;
        if let (Some(g), Some(se)) = (&grouped, params.self_extend) {
            // Grouped pairs exist in this block once its last query is W past key 0.
            if visible > se.window() {
                let window = Tensor::new(se.window() as u32, dev)?;
                let is_neighbor = j.broadcast_add(&window)?.broadcast_gt(&i)?;
                s = is_neighbor
                    .broadcast_as(s.shape())?
                    .where_cond(&s, &scores(g)?)?;
            }
        }
        let s = super::softcap(s, params.softcap)?;
        let mut visible_pair = j.broadcast_le(&i)?;
        if let Some(w) = params.sliding_window {
            let w = Tensor::new(w as u32, dev)?;
            let in_window = j.broadcast_add(&w)?.broadcast_gt(&i)?;
            visible_pair = (visible_pair.broadcast_mul(&in_window))?;
        }
        let masked = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(s.shape())?;
        let s = visible_pair
            .broadcast_as(s.shape())?
            .where_cond(&s, &masked)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        blocks.push(gqa_matmul(&p, &v.narrow(2, first, keys)?, n_kv_heads)?);
    }
    Ok(Tensor::cat(&blocks, 2)?.to_dtype(out_dtype)?)
}
