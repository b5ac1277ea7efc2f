//! Qwen2 and Qwen2.5 (also Qwen1.5): the Llama block with q/k/v biases (no o bias), and
//! a sliding window on layers from `max_window_layers` on when `use_sliding_window`
//! is set.

use super::{gguf_base, hf_base, Family, GgufLayout, HfDefaults};
use crate::config::{Config, HfConfig};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;

pub(super) static FAMILY: Family = Family {
    model_type: "qwen2",
    architectures: &["Qwen2ForCausalLM"],
    gguf_arch: Some("qwen2"),
    from_hf,
    from_gguf,
    gguf: GgufLayout::AS_HF,
};

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults::LLAMA;
    let mut cfg = hf_base(c, "qwen2", &defaults)?;
    cfg.block.qkv_bias = true;
    super::qwen3::sliding_layers(c, &mut cfg, 28)?;
    Ok(cfg)
}

/// llama.cpp runs Qwen2 GGUFs without a sliding window.
fn from_gguf(m: &ArchMetadata) -> Result<Config> {
    let mut cfg = gguf_base(m, "qwen2")?;
    cfg.block.qkv_bias = true;
    Ok(cfg)
}
