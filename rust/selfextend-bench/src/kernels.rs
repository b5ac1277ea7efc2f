//! `--attention-kernels`: one layer's causal attention over a whole prompt, alone, on the
//! model's shapes: our fused kernel (plain and SelfExtend, RoPE applied inside) against
//! candle's CPU flash attention (`candle_nn::attention::flash_attn`, plain only, given
//! keys and queries already rotated, in its `(batch, seq, heads, head_dim)` layout).
//! Layouts are prepared outside the timed calls, and the two plain outputs are checked
//! to agree before anything is timed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::attention::{flash_attn, AttnMask};
use selfextend_core::attention::{run_attention, AttentionBackend, Positions};
use selfextend_core::{Model, SelfExtend};
use serde::Serialize;

use crate::BenchResult;

#[derive(Serialize)]
pub(crate) struct KernelTime {
    pub(crate) kernel: &'static str,
    pub(crate) length: usize,
    /// Median seconds of one layer's attention over the whole prompt.
    pub(crate) median_seconds: f64,
    /// Prompt tokens per second through that one layer.
    pub(crate) tokens_per_second: f64,
}

/// Times each kernel at each length, `repeats` times (median), interleaved.
pub(crate) fn compare(
    model: &Model,
    lengths: &[usize],
    se: SelfExtend,
    repeats: usize,
) -> BenchResult<Vec<KernelTime>> {
    let cfg = model.config();
    let (heads, kv_heads, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let device = Device::Cpu;
    let rope = model.decoder().rope_for(0, None);
    let mut out = vec![];
    for &n in lengths {
        let q = Tensor::randn(0f32, 1.0, (1, heads, n, d), &device)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv_heads, n, d), &device)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv_heads, n, d), &device)?;
        let positions = Positions::new(&rope, n, n);
        let plain = model.attention_params(None);
        let grouped = model.attention_params(Some(se));
        // candle's kernel takes rotated inputs and `(batch, seq, heads, head_dim)`.
        let (cos, sin) = rope.device_table(n, &device)?;
        let (cos, sin) = (cos.narrow(0, 0, n)?, sin.narrow(0, 0, n)?);
        let rotate = |x: &Tensor| -> BenchResult<Tensor> {
            Ok(selfextend_core::rope::apply_rotary(x, &cos, &sin)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (qr, kr, vr) = (rotate(&q)?, rotate(&k)?, v.transpose(1, 2)?.contiguous()?);
        let scale = plain.scale as f32;
        let candle = |qr: &Tensor, kr: &Tensor, vr: &Tensor| {
            flash_attn::<f32>(qr, kr, vr, scale, AttnMask::causal(), None, None)
        };
        // Both compute the same attention, or the comparison means nothing.
        let ours = run_attention(&q, &k, &v, &positions, &plain)?;
        let theirs = candle(&qr, &kr, &vr)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if diff.is_nan() || diff >= 1e-3 {
            return Err(
                format!("candle's flash_attn differs from ours by {diff} at length {n}").into(),
            );
        }
        let mut times: [Vec<f64>; 3] = Default::default();
        for _ in 0..repeats {
            for (slot, kernel) in times.iter_mut().zip(0..) {
                let start = Instant::now();
                match kernel {
                    0 => drop(run_attention(&q, &k, &v, &positions, &plain)?),
                    1 => drop(run_attention(&q, &k, &v, &positions, &grouped)?),
                    _ => drop(candle(&qr, &kr, &vr)?),
                }
                slot.push(start.elapsed().as_secs_f64());
            }
        }
        let names = [
            "ours, plain",
            "ours, SelfExtend",
            "candle flash_attn, plain",
        ];
        for (kernel, seconds) in names.into_iter().zip(times) {
            let median_seconds = crate::median(&seconds);
            eprintln!("  {kernel:<26} length {n:>7}: {median_seconds:.3} s");
            out.push(KernelTime {
                kernel,
                length: n,
                median_seconds,
                tokens_per_second: n as f64 / median_seconds,
            });
        }
    }
    Ok(out)
}

/// Whether `model` runs attention where this comparison means something: our fused
/// kernel, on the CPU, in f32.
pub(crate) fn check(model: &Model) -> BenchResult<()> {
    if !model.device().is_cpu() || model.attention_backend() != AttentionBackend::Fused {
        return Err("--attention-kernels compares CPU kernels: use --device cpu and --backend auto or fused".into());
    }
    if model.dtype() != DType::F32 {
        return Err("--attention-kernels runs f32 attention: leave --dtype unset or f32".into());
    }
    Ok(())
}
