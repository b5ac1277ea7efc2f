//! The reference SelfExtend attention: full score matrices, built from candle ops.
//!
//! Memory is `O(q_len * kv_len)` per head; chunked prefill keeps `q_len` small.

use candle_core::{DType, Device, Tensor, D};

use super::AttentionParams;
use crate::error::Result;
use crate::rope::RotaryEmbedding;

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &RotaryEmbedding,
    params: &AttentionParams,
) -> Result<Tensor> {
    let (b, n_heads, q_len, head_dim) = q.dims4()?;
    let (_, n_kv_heads, kv_len, _) = k.dims4()?;
    let index_pos = kv_len - q_len;
    let device = q.device();
    let out_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;

    let q_pos: Vec<usize> = (index_pos..kv_len).collect();
    let k_pos: Vec<usize> = (0..kv_len).collect();
    let scores_at = |q_pos: &[usize], k_pos: &[usize]| -> Result<Tensor> {
        let q = rope.apply(&q, q_pos)?;
        let k = rope.apply(&k, k_pos)?;
        let scores = gqa_matmul(&q, &k.t()?, n_kv_heads)?;
        Ok((scores * params.scale)?)
    };

    let mut scores = scores_at(&q_pos, &k_pos)?;
    if let Some(se) = params.self_extend {
        // Grouped pairs exist only once some query is W or more past key 0.
        if kv_len > se.window() {
            let gq: Vec<usize> = q_pos.iter().map(|&i| se.grouped_query_position(i)).collect();
            let gk: Vec<usize> = k_pos.iter().map(|&j| se.grouped_key_position(j)).collect();
            let grouped = scores_at(&gq, &gk)?;
            let neighbor = pair_mask(q_len, kv_len, index_pos, device, |i, j| {
                j > i || se.is_neighbor(i, j)
            })?;
            scores = neighbor
                .broadcast_as(scores.shape())?
                .where_cond(&scores, &grouped)?;
        }
    }
    let causal = causal_bias(q_len, kv_len, index_pos, device)?;
    let scores = scores.broadcast_add(&causal)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = gqa_matmul(&probs, &v, n_kv_heads)?;
    debug_assert_eq!(out.dims(), [b, n_heads, q_len, head_dim]);
    Ok(out.to_dtype(out_dtype)?)
}

/// `lhs: (b, n_heads, m, k) @ rhs: (b, n_kv_heads, k, n)` with query heads grouped onto
/// their shared key/value head, without materialising repeated keys.
fn gqa_matmul(lhs: &Tensor, rhs: &Tensor, n_kv_heads: usize) -> Result<Tensor> {
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

fn causal_bias(q_len: usize, kv_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
    let bias: Vec<f32> = (0..q_len)
        .flat_map(|t| (0..kv_len).map(move |j| (index_pos + t, j)))
        .map(|(i, j)| if j <= i { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    Ok(Tensor::from_vec(bias, (q_len, kv_len), device)?)
}
