//! Gemma 3 text models (Gemma Team, "Gemma 3 Technical Report", 2025): Gemma 2's block
//! with q/k norms in place of soft-capping, five local layers to one global, a separate
//! RoPE base for local layers, and linear RoPE scaling on the global layers (4B and up).
//! Multimodal checkpoints (`model_type` "gemma3") load their text model.

use super::gemma2::{query_pre_attn_scalar, set_sliding};
use super::{
    gguf_base, hf_attention_bias, hf_base, hf_layer_types, hf_rope, make_gemma, usize_or, Family,
    GgufLayout, HfDefaults,
};
use crate::config::{Config, HfConfig, RopeConfig, RopeScaling};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;

pub(super) static FAMILY: Family = Family {
    model_type: "gemma3_text",
    architectures: &["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"],
    gguf_arch: Some("gemma3"),
    from_hf,
    from_gguf,
    gguf: GgufLayout::GEMMA,
};

const LOCAL_BASE: f64 = 10_000.0;

fn from_hf(c: &HfConfig) -> Result<Config> {
    let defaults = HfDefaults {
        rope_theta: 1_000_000.0,
        tie_word_embeddings: true,
        head_dim: Some(256),
        vocab_size: Some(262_208),
        max_position_embeddings: Some(131_072),
        ..HfDefaults::LLAMA
    };
    let mut cfg = hf_base(c, "gemma3_text", &defaults)?;
    super::check_activation(c, "hidden_activation", "gelu_pytorch_tanh")?;
    if c.bool("use_bidirectional_attention")?.unwrap_or(false) {
        return Err(c.unsupported(
            "`use_bidirectional_attention` (an embedding model) is not supported: this library runs causal language models",
        ));
    }
    let scalar = c.f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    make_gemma(&mut cfg.block, cfg.hidden_size, scalar);
    hf_attention_bias(c, &mut cfg.block)?;
    cfg.block.qk_norm = true;
    // `transformers` keeps Gemma 3's `attn_logit_softcapping` but never applies it (and
    // llama.cpp's converter requires it to be null): no cap on scores.
    cfg.block.final_logit_softcap = c.f64("final_logit_softcapping")?;
    let n = cfg.num_hidden_layers;
    let sliding = match hf_layer_types(c, n)? {
        Some(types) => types,
        None => {
            let pattern = c.usize("sliding_window_pattern")?.unwrap_or(6).max(1);
            (0..n).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let window = usize_or(c, "sliding_window", Some(4096))?;
    set_sliding(&mut cfg, &sliding, window);
    let local_rope = match c.get("rope_parameters") {
        Some(_) => hf_rope(
            c,
            "sliding_attention",
            LOCAL_BASE,
            cfg.head_dim,
            cfg.max_position_embeddings,
        )?,
        None => RopeConfig {
            theta: c.f64("rope_local_base_freq")?.unwrap_or(LOCAL_BASE),
            scaling: None,
            ..cfg.attention_kinds[0].rope.clone()
        },
    };
    set_local_rope(&mut cfg, local_rope);
    Ok(cfg)
}

fn set_local_rope(cfg: &mut Config, rope: RopeConfig) {
    for kind in &mut cfg.attention_kinds {
        if kind.sliding_window.is_some() {
            kind.rope = rope.clone();
        }
    }
}

/// As llama.cpp reads it: a sliding window only when `gemma3.attention.sliding_window`
/// is set, then the pattern from `attention.sliding_window_pattern` (default: every
/// sixth layer global); local layers at `rope.freq_base_swa` (default 10000)
/// unscaled; the global layers' linear scaling in `gemma3.rope.scaling.*`.
fn from_gguf(m: &ArchMetadata) -> Result<Config> {
    let mut cfg = gguf_base(m, "gemma3_text")?;
    let scalar = query_pre_attn_scalar(m, &cfg, 62)?;
    make_gemma(&mut cfg.block, cfg.hidden_size, scalar);
    cfg.block.qk_norm = true;
    cfg.block.final_logit_softcap = m.f64("final_logit_softcapping")?.filter(|&c| c != 0.0);
    if cfg.attention_kinds[0].rope.scaling.is_none() {
        if let Some(factor) = m.f64("rope.scaling.factor")?.filter(|&f| f != 1.0) {
            cfg.attention_kinds[0].rope.scaling = Some(RopeScaling::Linear { factor });
        }
    }
    let window = m.usize_or_zero("attention.sliding_window")?;
    let sliding = m.sliding_pattern(cfg.num_hidden_layers, 6)?;
    set_sliding(&mut cfg, &sliding, window);
    let local = RopeConfig {
        theta: m.f64("rope.freq_base_swa")?.unwrap_or(LOCAL_BASE),
        scaling: None,
        ..cfg.attention_kinds[0].rope.clone()
    };
    set_local_rope(&mut cfg, local);
    Ok(cfg)
}
