//! Gemma 2 (Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
//! 2024): `1 + w` norms around attention and the MLP, GELU-tanh, embeddings scaled by
//! `sqrt(hidden_size)`, `query_pre_attn_scalar^-0.5` as the attention scale, soft-capped
//! attention scores and logits, and local (sliding-window) layers alternating with
//! global ones, the first local.

use super::{
    gguf_base, hf_attention_bias, hf_base, hf_layer_types, make_gemma, usize_or, Family,
    GgufLayout, HfDefaults,
};
use crate::config::{Config, HfConfig, LayerAttention};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;

pub(super) static FAMILY: Family = Family {
    model_type: "gemma2",
    architectures: &["Gemma2ForCausalLM"],
    gguf_arch: Some("gemma2"),
    from_hf,
    from_gguf,
    gguf: GgufLayout::GEMMA,
};

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults {
        tie_word_embeddings: true,
        head_dim: Some(256),
        ..HfDefaults::LLAMA
    };
    let mut cfg = hf_base(c, "gemma2", &defaults)?;
    super::check_activation(c, "hidden_activation", "gelu_pytorch_tanh")?;
    let scalar = c.f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    make_gemma(&mut cfg.block, cfg.hidden_size, scalar);
    hf_attention_bias(c, &mut cfg.block)?;
    cfg.block.attn_logit_softcap =
        c.f64("attn_logit_softcapping")?
            .or(default_cap(c, "attn_logit_softcapping", 50.0));
    cfg.block.final_logit_softcap =
        c.f64("final_logit_softcapping")?
            .or(default_cap(c, "final_logit_softcapping", 30.0));
    let n = cfg.num_hidden_layers;
    let sliding = hf_layer_types(c, n)?.unwrap_or_else(|| (0..n).map(|i| i % 2 == 0).collect());
    let window = usize_or(c, "sliding_window", Some(4096))?;
    set_sliding(&mut cfg, &sliding, window);
    Ok(cfg)
}

/// `transformers`' default for a soft-cap the config leaves out; `None` for an explicit `null`.
fn default_cap(c: &HfConfig, key: &str, default: f64) -> Option<f64> {
    (!c.map.contains_key(key)).then_some(default)
}

/// Layers where `sliding[l]` get `window` (if any) with the global RoPE.
pub(super) fn set_sliding(cfg: &mut Config, sliding: &[bool], window: Option<usize>) {
    if let Some(window) = window {
        let global = cfg.attention_kinds[0].clone();
        let local = LayerAttention {
            sliding_window: Some(window),
            ..global.clone()
        };
        (cfg.attention_kinds, cfg.layer_kinds) = Config::mixed_layers(sliding, global, local);
    }
}

/// As llama.cpp reads it: soft-caps 50 and 30 and a window of 4096 unless the file
/// says otherwise, and the pattern from `attention.sliding_window_pattern` (default:
/// even layers local).
fn from_gguf(m: &ArchMetadata) -> Result<Config> {
    let mut cfg = gguf_base(m, "gemma2")?;
    let scalar = query_pre_attn_scalar(m, &cfg, 46)?;
    make_gemma(&mut cfg.block, cfg.hidden_size, scalar);
    cfg.block.attn_logit_softcap = Some(m.f64("attn_logit_softcapping")?.unwrap_or(50.0));
    cfg.block.final_logit_softcap = Some(m.f64("final_logit_softcapping")?.unwrap_or(30.0));
    let sliding = m.sliding_pattern(cfg.num_hidden_layers, 2)?;
    let window = m.usize("attention.sliding_window")?.unwrap_or(4096);
    set_sliding(&mut cfg, &sliding, Some(window));
    if let Some(theta) = m.f64("rope.freq_base_swa")? {
        for kind in &mut cfg.attention_kinds {
            if kind.sliding_window.is_some() {
                kind.rope.theta = theta;
            }
        }
    }
    Ok(cfg)
}

/// GGUF files carry no `query_pre_attn_scalar`. llama.cpp uses the head dimension,
/// except for the 27B model (`hidden / heads`), which it recognises by its layer count
/// (`layers_27b`: 46 for Gemma 2, 62 for Gemma 3).
pub(super) fn query_pre_attn_scalar(
    m: &ArchMetadata,
    cfg: &Config,
    layers_27b: usize,
) -> Result<f64> {
    if let Some(s) = m.f64("attention.query_pre_attn_scalar")? {
        return Ok(s);
    }
    Ok(if cfg.num_hidden_layers == layers_27b {
        (cfg.hidden_size / cfg.num_attention_heads) as f64
    } else {
        cfg.head_dim as f64
    })
}
