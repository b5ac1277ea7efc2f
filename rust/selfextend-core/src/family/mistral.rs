//! Mistral: the Llama block with a sliding window on every layer where the config sets
//! one (v0.1: 4096; later releases: none).
//!
//! llama.cpp converts Mistral checkpoints to its `llama` arch, without the window, so
//! a Mistral GGUF loads as Llama.

use super::{hf_base, usize_or, Family, GgufLayout, HfDefaults};
use crate::config::{Config, HfConfig};
use crate::error::Result;

pub(super) static FAMILY: Family = Family {
    model_type: "mistral",
    architectures: &["MistralForCausalLM"],
    gguf_arch: None,
    from_hf,
    from_gguf: |m| (super::llama::FAMILY.from_gguf)(m),
    gguf: GgufLayout::PERMUTED,
};

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults::LLAMA;
    let mut cfg = hf_base(c, "mistral", &defaults)?;
    cfg.attention_kinds[0].sliding_window = usize_or(c, "sliding_window", Some(4096))?;
    Ok(cfg)
}
