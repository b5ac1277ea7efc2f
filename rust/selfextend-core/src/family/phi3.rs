//! Phi-3, Phi-3.5 and Phi-4-mini (`model_type` "phi3"): the Llama block with fused
//! `qkv_proj` and `gate_up_proj`, partial rotary embeddings, LongRoPE, and a sliding
//! window on every layer where the config sets one.

use super::{gguf_base, hf_base, usize_or, Family, GgufLayout, HfDefaults};
use crate::config::{Config, HfConfig, RopeScaling};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;

pub(super) static FAMILY: Family = Family {
    model_type: "phi3",
    architectures: &["Phi3ForCausalLM"],
    gguf_arch: Some("phi3"),
    from_hf,
    from_gguf,
    gguf: GgufLayout::AS_HF,
};

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults {
        rms_norm_eps: 1e-5,
        ..HfDefaults::LLAMA
    };
    let mut cfg = hf_base(c, "phi3", &defaults)?;
    cfg.block.fused_qkv = true;
    cfg.block.fused_gate_up = true;
    cfg.attention_kinds[0].sliding_window = usize_or(c, "sliding_window", None)?;
    Ok(cfg)
}

/// LongRoPE in GGUF: `rope_factors_short.weight` and `rope_factors_long.weight`, the
/// original context in `phi3.rope.scaling.original_context_length` and the attention
/// factor in `phi3.rope.scaling.attn_factor` (1 when absent, as llama.cpp reads it).
///
/// The converter writes the sliding window (0 for none); llama.cpp ignores it, but we
/// apply it as `transformers` does, so a GGUF gives the logits of its checkpoint.
fn from_gguf(m: &ArchMetadata) -> Result<Config> {
    let mut cfg = gguf_base(m, "phi3")?;
    cfg.block.fused_qkv = true;
    cfg.block.fused_gate_up = true;
    let trained = cfg.max_position_embeddings;
    let short = m.tensor_values("rope_factors_short.weight")?;
    let long = m.tensor_values("rope_factors_long.weight")?;
    let kind = &mut cfg.attention_kinds[0];
    kind.sliding_window = m.usize_or_zero("attention.sliding_window")?;
    if let (Some(short), Some(long)) = (short, long) {
        let original = m
            .usize("rope.scaling.original_context_length")?
            .unwrap_or(trained);
        let attention_factor = m.f64("rope.scaling.attn_factor")?.unwrap_or(1.0);
        kind.rope.scaling = Some(RopeScaling::LongRope {
            short_factor: short.into(),
            long_factor: long.into(),
            original_max_position_embeddings: original,
            attention_factor,
        });
    }
    Ok(cfg)
}
