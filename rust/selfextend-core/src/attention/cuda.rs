//! SelfExtend attention (Jin et al., ICML 2024) fused into one CUDA kernel
//! (`cuda/selfextend.cu`): flash-style, an f32 online softmax, each tile of keys loading
//! only the rotated set (neighbor, grouped or both) its pairs need, `O(tile)` memory
//! beyond the inputs.
//!
//! Queries and keys are rotated beforehand with candle's RoPE op, once at neighbor and
//! once at grouped positions (see [`super::tiled::rotated`]), and stacked into one
//! tensor each, so the kernel is a plain two-set masked attention.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::{tiled, AttentionParams, Positions};
use crate::error::Result;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/selfextend.ptx"));

/// Head dimensions the kernel is instantiated for.
const HEAD_DIMS: [usize; 8] = [16, 24, 32, 48, 64, 80, 96, 128];

/// Query rows per thread block, and threads per row (`ROWS` and `LANES` in the kernel).
const ROWS: usize = 32;
const LANES: usize = 8;

/// Calls with fewer query rows (decode) run the tiled backend: the kernel spreads work
/// over query rows only, so a single row would stream every key through one block
/// while the rest of the GPU idles, where the tiled matmuls spread over the keys.
const MIN_ROWS: usize = 8;

/// The launch settings the tensors' shapes do not carry.
struct FusedAttention {
    window: usize,
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "selfextend-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(
            "the fused CUDA attention runs on CUDA devices only".into(),
        ))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (sets, batch, heads, q_len, d) = q_layout.shape().dims5()?;
        let (_, _, kv_heads, kv_len, _) = k_layout.shape().dims5()?;
        for layout in [q_layout, k_layout, v_layout] {
            if !layout.is_contiguous() {
                return Err(candle_core::Error::Msg(
                    "fused attention expects contiguous inputs".into(),
                ));
            }
        }
        let dev = q.device.clone();
        let q = q.as_cuda_slice::<f32>()?.slice(q_layout.start_offset()..);
        let k = k.as_cuda_slice::<f32>()?.slice(k_layout.start_offset()..);
        let v = v.as_cuda_slice::<f32>()?.slice(v_layout.start_offset()..);
        let shape = Shape::from((batch, heads, q_len, d));
        // SAFETY: the kernel writes every element of `out`.
        let out = unsafe { dev.alloc::<f32>(shape.elem_count())? };
        let func = dev.get_or_load_custom_func(
            &format!("selfextend_attention_d{d}"),
            "selfextend_attention",
            PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (q_len.div_ceil(ROWS) as u32, heads as u32, batch as u32),
            block_dim: ((ROWS * LANES) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [batch, heads, kv_heads, q_len, kv_len, sets, self.window]
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        let mut launch = func.builder();
        launch.arg(&q).arg(&k).arg(&v).arg(&out);
        for n in &ints {
            launch.arg(n);
        }
        launch.arg(&self.scale);
        // SAFETY: argument types and order match `selfextend_attention_d*`, and the
        // grid covers (q_len, heads, batch) as the kernel expects.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// The fused kernel on a CUDA device; `None` elsewhere, for a head dimension it is not
/// built for, for fewer than [`MIN_ROWS`] queries, or for layers with a sliding window
/// or soft-capped scores (the kernel has neither), where the caller runs the tiled
/// backend.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Positions,
    params: &AttentionParams,
) -> Result<Option<Tensor>> {
    let d = q.dim(3)?;
    let plain_layer = params.sliding_window.is_none() && params.softcap.is_none();
    if !q.device().is_cuda() || !HEAD_DIMS.contains(&d) || q.dim(2)? < MIN_ROWS || !plain_layer {
        return Ok(None);
    }
    let out_dtype = q.dtype();
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let ((qn, kn), grouped) = tiled::rotated(q, k, positions, params)?;
    let (qs, ks, window) = match (grouped, params.self_extend) {
        (Some((qg, kg)), Some(se)) => (
            Tensor::stack(&[qn, qg], 0)?,
            Tensor::stack(&[kn, kg], 0)?,
            se.window(),
        ),
        _ => (qn.unsqueeze(0)?, kn.unsqueeze(0)?, usize::MAX),
    };
    let op = FusedAttention {
        window: window.min(i32::MAX as usize),
        scale: params.scale as f32,
    };
    let out = qs
        .contiguous()?
        .apply_op3_no_bwd(&ks.contiguous()?, &v, &op)?;
    Ok(Some(out.to_dtype(out_dtype)?))
}
