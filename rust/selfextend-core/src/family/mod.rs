//! Model families as data. Every family runs on the one decoder in
//! [`crate::model::decoder`]; what differs between them is a [`crate::config::Block`]
//! and the per-layer attention of a [`Config`], plus how each file format names and
//! stores the weights. Each family file holds only that: how to read its
//! `config.json` and its GGUF metadata, and its GGUF conventions.
//!
//! The registry is keyed by `transformers`' `model_type` (checked against
//! `architectures`) and by GGUF's `general.architecture`.

mod gemma2;
mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use std::sync::Arc;

use crate::config::{Activation, Block, Config, HfConfig, LayerAttention, RopeConfig, RopeScaling};
use crate::error::Result;
use crate::loader::gguf::ArchMetadata;
use crate::rope::longrope_attention_factor;

/// One model family.
pub(crate) struct Family {
    /// `transformers`' `model_type`, which `ModelConfig.model_type` reports.
    pub model_type: &'static str,
    /// The `architectures` entries of its `config.json`.
    pub architectures: &'static [&'static str],
    /// Its GGUF `general.architecture`, when llama.cpp's converter gives it its own
    /// (Mistral converts to `llama`).
    pub gguf_arch: Option<&'static str>,
    pub from_hf: fn(&HfConfig) -> Result<Config>,
    pub from_gguf: fn(&ArchMetadata) -> Result<Config>,
    pub gguf: GgufLayout,
}

/// How llama.cpp's converter stores a family's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GgufLayout {
    /// q/k rows are permuted for llama.cpp's interleaved RoPE (the `llama` arch only).
    pub permute_qk: bool,
    /// Added to every norm weight (Gemma's `1 + w` is stored as is).
    pub norm_offset: f32,
}

impl GgufLayout {
    /// The `llama` arch: q/k rows permuted.
    pub const PERMUTED: Self = Self {
        permute_qk: true,
        norm_offset: 0.0,
    };
    /// Weights as in the Hugging Face checkpoint ("NeoX" RoPE in llama.cpp).
    pub const AS_HF: Self = Self {
        permute_qk: false,
        norm_offset: 0.0,
    };
    /// Gemma: as in the checkpoint, norm weights stored as `1 + w`.
    pub const GEMMA: Self = Self {
        permute_qk: false,
        norm_offset: 1.0,
    };
}

const FAMILIES: [&Family; 7] = [
    &llama::FAMILY,
    &mistral::FAMILY,
    &qwen2::FAMILY,
    &qwen3::FAMILY,
    &gemma2::FAMILY,
    &gemma3::FAMILY,
    &phi3::FAMILY,
];

/// The supported `model_type`s, for error messages.
fn supported_model_types() -> String {
    FAMILIES.map(|f| format!("'{}'", f.model_type)).join(", ")
}

/// The [`Config`] of a Hugging Face `config.json`.
pub(crate) fn from_hf(c: &HfConfig) -> Result<Config> {
    let model_type = c.str("model_type")?.ok_or_else(|| {
        c.err(format!(
            "missing field `model_type` (supported: {})",
            supported_model_types()
        ))
    })?;
    // A multimodal Gemma 3 checkpoint wraps the text model's config.
    if model_type == "gemma3" {
        let text = c
            .nested("text_config")?
            .ok_or_else(|| c.err("model_type 'gemma3' needs a `text_config`"))?;
        check_quantization(c)?;
        let mut cfg = from_hf_family(&gemma3::FAMILY, &text, None)?;
        if cfg.bos_token_id.is_none() {
            cfg.bos_token_id = c.token_ids("bos_token_id")?.first().copied();
        }
        if cfg.eos_token_ids.is_empty() {
            cfg.eos_token_ids = c.token_ids("eos_token_id")?;
        }
        return Ok(cfg);
    }
    let family = FAMILIES
        .iter()
        .find(|f| f.model_type == model_type)
        .ok_or_else(|| {
            c.unsupported(format!(
                "model_type '{model_type}' is not supported (supported: {})",
                supported_model_types()
            ))
        })?;
    check_quantization(c)?;
    from_hf_family(family, c, c.strs("architectures")?)
}

fn from_hf_family(
    family: &Family,
    c: &HfConfig,
    architectures: Option<Vec<&str>>,
) -> Result<Config> {
    for arch in architectures.unwrap_or_default() {
        if !family.architectures.contains(&arch) {
            return Err(c.unsupported(format!(
                "architecture '{arch}' is not supported for model_type '{}' (expected {})",
                family.model_type,
                family.architectures.join(" or ")
            )));
        }
    }
    let cfg = (family.from_hf)(c)?;
    cfg.validate().map_err(|msg| c.err(msg))?;
    Ok(cfg)
}

fn check_quantization(c: &HfConfig) -> Result<()> {
    if let Some(q) = c.nested("quantization_config")? {
        let method = q.str("quant_method").ok().flatten().unwrap_or("unknown");
        return Err(c.unsupported(format!(
            "quantized checkpoints (`quantization_config`, method '{method}') are not supported; \
             load the unquantized checkpoint or a GGUF file"
        )));
    }
    Ok(())
}

/// The family of a GGUF `general.architecture`.
pub(crate) fn for_gguf_arch(arch: &str) -> Option<&'static Family> {
    FAMILIES.into_iter().find(|f| f.gguf_arch == Some(arch))
}

/// The supported GGUF architectures, for error messages.
pub(crate) fn supported_gguf_archs() -> String {
    FAMILIES
        .iter()
        .filter_map(|f| f.gguf_arch)
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A family's `transformers` defaults for the fields every family reads.
pub(crate) struct HfDefaults {
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Defaults for fields some families' released configs leave out (Gemma 3's
    /// `text_config`); `None`: required.
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
}

impl HfDefaults {
    /// `LlamaConfig`'s, which most families share.
    pub const LLAMA: Self = Self {
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        head_dim: None,
        vocab_size: None,
        max_position_embeddings: None,
    };
}

/// The [`Config`] every family starts from: the shared dimensions, a Llama block with
/// `hidden_act` (SiLU only), and every layer global with the `full_attention` RoPE.
pub(crate) fn hf_base(c: &HfConfig, model_type: &'static str, d: &HfDefaults) -> Result<Config> {
    let num_attention_heads = c.required_usize("num_attention_heads")?;
    let hidden_size = c.required_usize("hidden_size")?;
    let head_dim = match c.usize("head_dim")?.or(d.head_dim) {
        Some(h) => h,
        None if num_attention_heads > 0 && hidden_size % num_attention_heads == 0 => {
            hidden_size / num_attention_heads
        }
        None => {
            return Err(c.err(format!(
                "`hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` \
                 ({num_attention_heads}) and no `head_dim` is given"
            )))
        }
    };
    check_activation(c, "hidden_act", "silu")?;
    let required = |key: &str, default: Option<usize>| -> Result<usize> {
        match c.usize(key)?.or(default) {
            Some(n) => Ok(n),
            None => c.required_usize(key),
        }
    };
    let max_position_embeddings = required("max_position_embeddings", d.max_position_embeddings)?;
    let rope = hf_rope(
        c,
        "full_attention",
        d.rope_theta,
        head_dim,
        max_position_embeddings,
    )?;
    let num_hidden_layers = c.required_usize("num_hidden_layers")?;
    let (attention_kinds, layer_kinds) = Config::uniform_layers(
        num_hidden_layers,
        LayerAttention {
            sliding_window: None,
            rope,
        },
    )
    .map_err(|e| c.err(format!("`num_hidden_layers`: {e}")))?;
    Ok(Config {
        model_type,
        vocab_size: required("vocab_size", d.vocab_size)?,
        hidden_size,
        intermediate_size: c.required_usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: c
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads),
        head_dim,
        rms_norm_eps: c.f64("rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
        max_position_embeddings,
        tie_word_embeddings: c
            .bool("tie_word_embeddings")?
            .unwrap_or(d.tie_word_embeddings),
        bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: c.token_ids("eos_token_id")?,
        block: Block::llama(head_dim),
        attention_kinds,
        layer_kinds,
    })
}

/// Refuses an activation other than `expected` in `key` (absent is `expected`).
pub(crate) fn check_activation(c: &HfConfig, key: &str, expected: &str) -> Result<()> {
    match c.str(key)? {
        Some(act) if act != expected => Err(c.unsupported(format!(
            "`{key}` '{act}' is not supported for this model type (expected '{expected}')"
        ))),
        _ => Ok(()),
    }
}

/// A field whose absence means `default` but whose explicit `null` means "none" (as
/// `transformers`' config classes treat `sliding_window`).
pub(crate) fn usize_or(c: &HfConfig, key: &str, default: Option<usize>) -> Result<Option<usize>> {
    match c.map.get(key) {
        None => Ok(default),
        Some(_) => c.usize(key),
    }
}

/// `layer_types` when the config lists them (`transformers` >= 4.54 and 5.x), as
/// "is this layer sliding"; `None` when absent.
pub(crate) fn hf_layer_types(c: &HfConfig, num_layers: usize) -> Result<Option<Vec<bool>>> {
    let Some(types) = c.strs("layer_types")? else {
        return Ok(None);
    };
    if types.len() != num_layers {
        return Err(c.err(format!(
            "`layer_types` has {} entries for {num_layers} layers",
            types.len()
        )));
    }
    types
        .iter()
        .map(|t| match *t {
            "full_attention" => Ok(false),
            "sliding_attention" => Ok(true),
            other => Err(c.unsupported(format!(
                "`layer_types` entry '{other}' is not supported (expected 'full_attention' or 'sliding_attention')"
            ))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The RoPE of layers of `layer_type` ("full_attention" or "sliding_attention"):
/// `transformers` 5's `rope_parameters` (one set, or one per layer type), else 4.x's
/// `rope_theta` and `rope_scaling`. `partial_rotary_factor` may sit at the top level or
/// in the parameters.
pub(crate) fn hf_rope(
    c: &HfConfig,
    layer_type: &str,
    default_theta: f64,
    head_dim: usize,
    max_position_embeddings: usize,
) -> Result<RopeConfig> {
    let mut partial = c.f64("partial_rotary_factor")?;
    let (theta, scaling) = match c.nested("rope_parameters")? {
        Some(params) => {
            let per_type =
                params.get("full_attention").is_some() || params.get("sliding_attention").is_some();
            let params = if per_type {
                params.nested(layer_type)?.ok_or_else(|| {
                    c.err(format!("`rope_parameters` has no entry for '{layer_type}'"))
                })?
            } else {
                params
            };
            let field = if per_type {
                format!("rope_parameters.{layer_type}")
            } else {
                "rope_parameters".to_string()
            };
            partial = params.f64("partial_rotary_factor")?.or(partial);
            let theta = params.f64("rope_theta")?.unwrap_or(default_theta);
            (
                theta,
                parse_scaling(c, &params, &field, max_position_embeddings)?,
            )
        }
        None => {
            let theta = c.f64("rope_theta")?.unwrap_or(default_theta);
            let scaling = match c.nested("rope_scaling")? {
                Some(s) => parse_scaling(c, &s, "rope_scaling", max_position_embeddings)?,
                None => None,
            };
            (theta, scaling)
        }
    };
    let partial = partial.unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(c.err(format!(
            "`partial_rotary_factor` must be in (0, 1], got {partial}"
        )));
    }
    Ok(RopeConfig {
        theta,
        rotary_dim: (head_dim as f64 * partial) as usize,
        scaling,
    })
}

/// One `rope_scaling` / `rope_parameters` object. Every key must be one its type reads.
fn parse_scaling(
    top: &HfConfig,
    s: &HfConfig,
    field: &str,
    max_position_embeddings: usize,
) -> Result<Option<RopeScaling>> {
    let kind = match (s.str("rope_type")?, s.str("type")?) {
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => "default",
    };
    let keys: &[&str] = match kind {
        "default" => &[],
        "linear" => &["factor"],
        "dynamic" => &["factor", "original_max_position_embeddings"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "longrope" | "su" => &[
            "short_factor",
            "long_factor",
            "original_max_position_embeddings",
            "attention_factor",
            "factor",
        ],
        other => {
            return Err(s.unsupported(format!(
                "`{field}` type '{other}' is not supported (expected 'default', 'linear', \
                 'dynamic', 'llama3' or 'longrope')"
            )))
        }
    };
    const ALWAYS: [&str; 4] = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    for key in s.map.keys() {
        if !ALWAYS.contains(&key.as_str()) && !keys.contains(&key.as_str()) {
            return Err(s.unsupported(format!(
                "`{field}.{key}` is not supported for type '{kind}' (it would change the \
                 positions, and ignoring it would be wrong)"
            )));
        }
    }
    let factor = || -> Result<f64> {
        match s.f64("factor")? {
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            Some(f) => Err(s.err(format!("`{field}.factor` must be > 0, got {f}"))),
            None => Err(s.err(format!("`{field}.factor` is required for type '{kind}'"))),
        }
    };
    let original = || -> Result<Option<usize>> {
        Ok(s.usize("original_max_position_embeddings")?
            .filter(|&n| n > 0))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "dynamic" => Some(RopeScaling::DynamicNtk {
            factor: factor()?,
            original_max_position_embeddings: original()?.unwrap_or(max_position_embeddings),
        }),
        "llama3" => {
            let required = |key: &str| -> Result<f64> {
                s.f64(key)?
                    .ok_or_else(|| s.err(format!("`{field}.{key}` is required for type 'llama3'")))
            };
            let low_freq_factor = required("low_freq_factor")?;
            let high_freq_factor = required("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(s.err(format!(
                    "`{field}.high_freq_factor` ({high_freq_factor}) must exceed `low_freq_factor` ({low_freq_factor})"
                )));
            }
            Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original()?.ok_or_else(|| {
                    s.err(format!(
                        "`{field}.original_max_position_embeddings` is required for type 'llama3'"
                    ))
                })?,
            })
        }
        _ => {
            let factors = |key: &str| -> Result<Arc<[f64]>> {
                Ok(s.f64s(key)?
                    .ok_or_else(|| s.err(format!("`{field}.{key}` is required for type '{kind}'")))?
                    .into())
            };
            // The stretch that sets the default attention factor. transformers 4.x: from
            // the top-level `original_max_position_embeddings` (Phi-3) when present,
            // else the scaling's `factor` over max_position_embeddings. 5.x
            // (`rope_parameters`): an explicit `factor` first, else max / original.
            let top_original = top
                .usize("original_max_position_embeddings")?
                .filter(|&n| n > 0);
            let v5 = field.starts_with("rope_parameters");
            let original = match v5 {
                true => original()?.or(top_original),
                false => top_original.or(original()?),
            };
            let (original, stretch) = match (original, s.f64("factor")?) {
                (Some(o), Some(f)) if v5 => (o, f),
                (Some(o), _) => (o, max_position_embeddings as f64 / o as f64),
                (None, f) => (max_position_embeddings, f.unwrap_or(1.0)),
            };
            let attention_factor = match s.f64("attention_factor")? {
                Some(f) => f,
                None => longrope_attention_factor(stretch, original),
            };
            Some(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
    })
}

/// Makes `block` Gemma's: `1 + w` norms, sandwich norms, GELU-tanh, embeddings scaled
/// by `sqrt(hidden_size)`, and `query_pre_attn_scalar^-0.5` as the attention scale.
/// Projections and biases stay as the files describe them.
pub(crate) fn make_gemma(block: &mut Block, hidden_size: usize, query_pre_attn_scalar: f64) {
    block.norm = crate::config::Norm::RmsPlusOne;
    block.sandwich_norms = true;
    block.embedding_scale = Some((hidden_size as f64).sqrt());
    block.activation = Activation::GeluTanh;
    block.attention_scale = query_pre_attn_scalar.powf(-0.5);
}

/// `attention_bias`: biases on q, k, v and o (Llama, Qwen3, Gemma).
pub(crate) fn hf_attention_bias(c: &HfConfig, block: &mut Block) -> Result<()> {
    let bias = c.bool("attention_bias")?.unwrap_or(false);
    block.qkv_bias = bias;
    block.o_bias = bias;
    Ok(())
}

/// The [`Config`] every family starts from in GGUF: the `{arch}.*` dimensions, the
/// `tokenizer.ggml.*` ids, a Llama block, and every layer global with `{arch}.rope.*`.
pub(crate) fn gguf_base(m: &ArchMetadata, model_type: &'static str) -> Result<Config> {
    let hidden_size = m.required_usize("embedding_length")?;
    let num_attention_heads = m.required_usize("attention.head_count")?;
    let num_key_value_heads = m
        .usize("attention.head_count_kv")?
        .unwrap_or(num_attention_heads);
    let head_dim = match m.usize("attention.key_length")? {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(m.err(format!(
                "embedding_length ({hidden_size}) is not divisible by head_count ({num_attention_heads})"
            )))
        }
    };
    let scaling = match m.str("rope.scaling.type")? {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: m.required_f64("rope.scaling.factor")?,
        }),
        Some(other) => {
            return Err(m.unsupported(format!(
                "RoPE scaling '{other}' is not supported here (expected none or linear)"
            )))
        }
    };
    let rope = RopeConfig {
        theta: m.f64("rope.freq_base")?.unwrap_or(10_000.0),
        rotary_dim: m.usize("rope.dimension_count")?.unwrap_or(head_dim),
        scaling,
    };
    let num_hidden_layers = m.required_usize("block_count")?;
    let (attention_kinds, layer_kinds) = Config::uniform_layers(
        num_hidden_layers,
        LayerAttention {
            sliding_window: None,
            rope,
        },
    )
    .map_err(|e| m.err(format!("`block_count`: {e}")))?;
    let mut block = Block::llama(head_dim);
    // llama.cpp's converter fuses q, k and v into `attn_qkv` with `--fuse-qkv`; biases
    // are whatever tensors the file has.
    block.fused_qkv = m.has_tensor("blk.0.attn_qkv.weight");
    block.qkv_bias = m.has_tensor("blk.0.attn_q.bias") || m.has_tensor("blk.0.attn_qkv.bias");
    block.o_bias = m.has_tensor("blk.0.attn_output.bias");
    block.mlp_bias = m.has_tensor("blk.0.ffn_up.bias");
    Ok(Config {
        model_type,
        vocab_size: m.vocab_size()?,
        hidden_size,
        intermediate_size: m.required_usize("feed_forward_length")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: m.f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        max_position_embeddings: m.required_usize("context_length")?,
        tie_word_embeddings: !m.has_tensor("output.weight"),
        bos_token_id: m.token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: m
            .token_id("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
        block,
        attention_kinds,
        layer_kinds,
    })
}

/// The GGUF name of a weight the decoder asks for by its Hugging Face name.
/// `sandwich`: Gemma's `post_attention_layernorm` follows attention (`post_attention_norm`)
/// and `pre_feedforward_layernorm` is llama.cpp's `ffn_norm`; elsewhere
/// `post_attention_layernorm` is the pre-MLP `ffn_norm`.
pub(crate) fn gguf_name(hf: &str, sandwich: bool) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let module = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if sandwich => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{module}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        let name = |hf: &str| gguf_name(hf, false).unwrap();
        assert_eq!(
            name("model.layers.12.self_attn.o_proj.weight"),
            "blk.12.attn_output.weight"
        );
        assert_eq!(
            name("model.layers.0.self_attn.q_proj.bias"),
            "blk.0.attn_q.bias"
        );
        assert_eq!(
            name("model.layers.3.post_attention_layernorm.weight"),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(name("lm_head.weight"), "output.weight");
        assert!(gguf_name("model.layers.x.mlp.up_proj.weight", false).is_none());
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight", true).unwrap(),
            "blk.3.post_attention_norm.weight"
        );
        assert_eq!(
            gguf_name("model.layers.3.pre_feedforward_layernorm.weight", true).unwrap(),
            "blk.3.ffn_norm.weight"
        );
    }

    #[test]
    fn every_family_is_registered_once() {
        let mut types: Vec<_> = FAMILIES.iter().map(|f| f.model_type).collect();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), FAMILIES.len());
        let mut archs: Vec<_> = FAMILIES.iter().filter_map(|f| f.gguf_arch).collect();
        let n = archs.len();
        archs.sort();
        archs.dedup();
        assert_eq!(archs.len(), n);
    }
}
