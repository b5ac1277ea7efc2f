//! Qwen3: the Llama block with an RMSNorm on each query and key head before RoPE (the
//! cache then holds normed, un-rotated keys), and Qwen2's sliding-window rule.

use super::{gguf_base, hf_base, hf_layer_types, usize_or, Family, GgufLayout, HfDefaults};
use crate::config::{Config, HfConfig, LayerAttention};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;

pub(super) static FAMILY: Family = Family {
    model_type: "qwen3",
    architectures: &["Qwen3ForCausalLM"],
    gguf_arch: Some("qwen3"),
    from_hf,
    from_gguf,
    gguf: GgufLayout::AS_HF,
};

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults {
        head_dim: Some(128),
        ..HfDefaults::LLAMA
    };
    let mut cfg = hf_base(c, "qwen3", &defaults)?;
    super::hf_attention_bias(c, &mut cfg.block)?;
    cfg.block.qk_norm = true;
    sliding_layers(c, &mut cfg, 28)?;
    Ok(cfg)
}

/// Qwen's rule: with `use_sliding_window`, layers listed as sliding in `layer_types`
/// (or, without it, layers `max_window_layers` and up) get `sliding_window`.
pub(super) fn sliding_layers(
    c: &HfConfig,
    cfg: &mut Config,
    max_window_layers: usize,
) -> Result<()> {
    let window = match c.bool("use_sliding_window")?.unwrap_or(false) {
        true => usize_or(c, "sliding_window", Some(4096))?,
        false => None,
    };
    let n = cfg.num_hidden_layers;
    let max_window_layers = c.usize("max_window_layers")?.unwrap_or(max_window_layers);
    let sliding = match hf_layer_types(c, n)? {
        Some(types) => types,
        None => (0..n).map(|i| i >= max_window_layers).collect(),
    };
    if let Some(window) = window {
        let global = cfg.attention_kinds[0].clone();
        let local = LayerAttention {
            sliding_window: Some(window),
            ..global.clone()
        };
        (cfg.attention_kinds, cfg.layer_kinds) = Config::mixed_layers(&sliding, global, local);
    }
    Ok(())
}

fn from_gguf(m: &ArchMetadata) -> Result<Config> {
    let mut cfg = gguf_base(m, "qwen3")?;
    cfg.block.qk_norm = true;
    Ok(cfg)
}
