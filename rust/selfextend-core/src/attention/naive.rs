//! The reference SelfExtend attention: full score matrices, built from candle ops.
//!
//! Memory is `O(q_len * kv_len)` per head; chunked prefill keeps `q_len` small.

use candle_core::{DType, Device, Tensor, D};

use super::{AttentionParams, Positions};
use crate::error::Result;
use crate::rope::{apply_rotary, RotaryEmbedding};

/// cos/sin tables for one set of query and key positions.
struct Rotation {
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
}

impl Rotation {
    fn new(rope: &RotaryEmbedding, q_pos: &[usize], k_pos: &[usize], dev: &Device) -> Result<Self> {
        Ok(Self {
            q: rope.cos_sin(q_pos, DType::F32, dev)?,
            k: rope.cos_sin(k_pos, DType::F32, dev)?,
        })
    }
}

/// Everything position-dependent, shared by all layers of one forward call.
pub(super) struct Tables {
    neighbor: Rotation,
    /// Grouped rotations and the `(q_len, kv_len)` mask of neighbor pairs, when the
    /// call has any grouped pair at all.
    grouped: Option<(Rotation, Tensor)>,
    causal_bias: Tensor,
}

impl Tables {
    fn new(positions: &Positions, params: &AttentionParams, dev: &Device) -> Result<Self> {
        let (q_len, kv_len, rope) = (positions.q_len, positions.kv_len, positions.rope);
        let index_pos = kv_len - q_len;
        let pos = positions.rotary_positions(params.self_extend);
        let neighbor = Rotation::new(rope, &pos.q, &pos.k, dev)?;
        let grouped = match (params.self_extend, &pos.grouped) {
            (Some(se), Some((gq, gk))) => {
                let mask = pair_mask(q_len, kv_len, index_pos, dev, |i, j| {
                    j > i || se.is_neighbor(i, j)
                })?;
                Some((Rotation::new(rope, gq, gk, dev)?, mask))
            }
            _ => None,
        };
        Ok(Self {
            neighbor,
            grouped,
            causal_bias: causal_bias(q_len, kv_len, index_pos, params.sliding_window, dev)?,
        })
    }
}

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Positions,
    params: &AttentionParams,
) -> Result<Tensor> {
    let (b, n_heads, q_len, head_dim) = q.dims4()?;
    let n_kv_heads = k.dim(1)?;
    let out_dtype = q.dtype();
    let tables = super::cached(&positions.naive, || {
        Tables::new(positions, params, q.device())
    })?;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let v = v.to_dtype(DType::F32)?;

    let scores_at = |rot: &Rotation| -> Result<Tensor> {
        let q = apply_rotary(&q, &rot.q.0, &rot.q.1)?;
        let k = apply_rotary(&k, &rot.k.0, &rot.k.1)?;
        let scores = gqa_matmul(&q, &k.t()?, n_kv_heads)?;
        Ok((scores * params.scale)?)
    };
    let mut scores = scores_at(&tables.neighbor)?;
    if let Some((rotation, neighbor)) = &tables.grouped {
        let grouped = scores_at(rotation)?;
        scores = neighbor
            .broadcast_as(scores.shape())?
            .where_cond(&scores, &grouped)?;
    }
    let scores = super::softcap(scores, params.softcap)?.broadcast_add(&tables.causal_bias)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = gqa_matmul(&probs, &v, n_kv_heads)?;
    debug_assert_eq!(out.dims(), [b, n_heads, q_len, head_dim]);
    Ok(out.to_dtype(out_dtype)?)
}

/// `lhs: (b, n_heads, m, k) @ rhs: (b, n_kv_heads, k, n)` with query heads grouped onto
/// their shared key/value head, without materialising repeated keys.
pub(super) fn gqa_matmul(lhs: &Tensor, rhs: &Tensor, n_kv_heads: usize) -> Result<Tensor> {
    let (b, n_heads, m, k) = lhs.dims4()?;
    let n = rhs.dim(D::Minus1)?;
    let groups = n_heads / n_kv_heads;
    let lhs = lhs.contiguous()?.reshape((b, n_kv_heads, groups * m, k))?;
    let out = lhs.matmul(&rhs.contiguous()?)?;
    Ok(out.reshape((b, n_heads, m, n))?)
}

/// `(q_len, kv_len)` u8 mask of `keep(i, j)` for absolute positions `i`, `j`.
fn pair_mask(
    q_len: usize,
    kv_len: usize,
    index_pos: usize,
    device: &Device,
    keep: impl Fn(usize, usize) -> bool,
) -> Result<Tensor> {
    let mask: Vec<u8> = (0..q_len)
        .flat_map(|t| (0..kv_len).map(move |j| (t, j)))
        .map(|(t, j)| keep(index_pos + t, j) as u8)
        .collect();
    Ok(Tensor::from_vec(mask, (q_len, kv_len), device)?)
}

/// 0 where query `i` sees key `j` (causal, and within `window` when set), else -inf.
fn causal_bias(
    q_len: usize,
    kv_len: usize,
    index_pos: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let window = window.unwrap_or(usize::MAX);
    let bias: Vec<f32> = (0..q_len)
        .flat_map(|t| (0..kv_len).map(move |j| (index_pos + t, j)))
        .map(|(i, j)| {
            if j <= i && i - j < window {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Ok(Tensor::from_vec(bias, (q_len, kv_len), device)?)
}
