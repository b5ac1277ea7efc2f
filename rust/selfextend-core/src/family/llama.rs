//! Llama 2, 3, 3.1 and 3.2, and models that reuse its architecture (SmolLM).

use super::{gguf_base, hf_base, Family, GgufLayout, HfDefaults};
use crate::config::{Config, HfConfig, RopeScaling};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;

pub(super) static FAMILY: Family = Family {
    model_type: "llama",
    architectures: &["LlamaForCausalLM"],
    gguf_arch: Some("llama"),
    from_hf,
    from_gguf,
    gguf: GgufLayout::PERMUTED,
};

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults::LLAMA;
    let mut cfg = hf_base(c, "llama", &defaults)?;
    super::hf_attention_bias(c, &mut cfg.block)?;
    cfg.block.mlp_bias = c.bool("mlp_bias")?.unwrap_or(false);
    Ok(cfg)
}

/// Also the GGUF of Mistral, which llama.cpp converts to the `llama` arch. Llama 3.1
/// files carry their RoPE scaling as one divisor per frequency (`rope_freqs.weight`).
fn from_gguf(m: &ArchMetadata) -> Result<Config> {
    let mut cfg = gguf_base(m, "llama")?;
    if let Some(factors) = m.tensor_values("rope_freqs.weight")? {
        cfg.attention_kinds[0].rope.scaling = Some(RopeScaling::Frequencies {
            factors: factors.into(),
        });
    }
    Ok(cfg)
}
