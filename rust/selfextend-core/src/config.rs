//! Model configuration: one runtime [`Config`] that describes every supported family
//! as data (see [`crate::family`]), read from a Hugging Face `config.json` (as
//! `transformers` 4.x or 5.x writes it) or from GGUF metadata.
//!
//! A field that changes the arithmetic is either understood or refused by name: a
//! checkpoint never loads with part of its configuration silently ignored.

use std::path::Path;
use std::sync::Arc;

/// More layers than any checkpoint has (the largest have a few hundred).
const MAX_LAYERS: usize = 1 << 16;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::family;

/// RoPE frequency scaling: from a model's files, or a per-call override.
///
/// The training-free baselines (`Linear`, `Ntk`, `DynamicNtk`) follow their published
/// formulas exactly; `crate::rope` writes them out.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation (Chen et al., 2023): every frequency divided by `factor`.
    Linear { factor: f64 },
    /// "NTK-aware" scaling (bloc97, 2023): the base raised to
    /// `theta * factor^(d / (d - 2))`, for rotary dimension `d`.
    Ntk { factor: f64 },
    /// Dynamic NTK (emozilla, 2023; `transformers`' `"dynamic"`): NTK scaling whose base
    /// follows the sequence length `n` once it passes the trained context `L`:
    /// `theta * (factor * n / L - (factor - 1))^(d / (d - 2))`.
    DynamicNtk {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    /// The Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// One divisor per frequency: how llama.cpp stores Llama 3.1's scaling
    /// (`rope_freqs.weight`).
    Frequencies { factors: Arc<[f64]> },
    /// LongRoPE (Phi-3's `longrope`, formerly `su`): frequencies divided by the short
    /// factors up to `original_max_position_embeddings` positions and by the long ones
    /// past it, cos and sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Arc<[f64]>,
        long_factor: Arc<[f64]>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// The rotary embedding of one kind of layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// The leading dimensions of each head that rotate (`head_dim` unless the model
    /// has a `partial_rotary_factor`); the rest pass through.
    pub rotary_dim: usize,
    pub scaling: Option<RopeScaling>,
}

/// One kind of attention layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAttention {
    /// Keys at distance `window` or more are masked (`i - j >= window`); `None` is
    /// global attention.
    pub sliding_window: Option<usize>,
    pub rope: RopeConfig,
}

/// How RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `x / rms(x) * w` (Llama and most families).
    Rms,
    /// `x / rms(x) * (1 + w)` (Gemma: checkpoints store the weight minus one).
    RmsPlusOne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// What one family's decoder block does differently from another's; the same for
/// every layer of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub norm: Norm,
    /// Gemma 2/3: norms after attention and after the MLP too, before each residual add.
    pub sandwich_norms: bool,
    /// One `qkv_proj` (Phi-3) instead of `q_proj`, `k_proj` and `v_proj`.
    pub fused_qkv: bool,
    /// One `gate_up_proj` (Phi-3), gate rows first, instead of `gate_proj` and `up_proj`.
    pub fused_gate_up: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Multiplies the token embeddings (Gemma: `sqrt(hidden_size)`).
    pub embedding_scale: Option<f64>,
    pub activation: Activation,
    /// Multiplies `q . k`: `1 / sqrt(head_dim)`, or Gemma's `query_pre_attn_scalar^-0.5`.
    pub attention_scale: f64,
    /// Attention scores become `cap * tanh(score / cap)` (Gemma 2).
    pub attn_logit_softcap: Option<f64>,
    /// Logits become `cap * tanh(logit / cap)` (Gemma 2).
    pub final_logit_softcap: Option<f64>,
}

impl Block {
    /// The Llama block: pre-norm, separate projections, SiLU, no biases.
    pub fn llama(head_dim: usize) -> Self {
        Self {
            norm: Norm::Rms,
            sandwich_norms: false,
            fused_qkv: false,
            fused_gate_up: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            embedding_scale: None,
            activation: Activation::Silu,
            attention_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_logit_softcap: None,
            final_logit_softcap: None,
        }
    }
}

/// The runtime configuration of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The family, as `transformers` names it (`model_type`): "llama", "qwen2", ...
    pub model_type: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// The context length the model was trained on.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub block: Block,
    /// The distinct kinds of attention layer (one, or global and sliding).
    pub attention_kinds: Vec<LayerAttention>,
    /// For each layer, its index into `attention_kinds`.
    pub layer_kinds: Vec<usize>,
}

impl Config {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is only used in error messages.
    pub fn from_hf_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = &value else {
            return Err(Error::Config {
                path: path.to_path_buf(),
                msg: "expected a JSON object".into(),
            });
        };
        family::from_hf(&HfConfig { path, map })
    }

    /// Query heads that share one key/value head (1 without GQA).
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The attention of layer `layer`.
    pub fn layer_attention(&self, layer: usize) -> &LayerAttention {
        &self.attention_kinds[self.layer_kinds[layer]]
    }

    /// Whether layers of kind `kind` take SelfExtend (and per-call RoPE scalings): a
    /// layer whose sliding window is no longer than the trained context never sees a
    /// relative position past it, so it keeps plain attention within its window. A
    /// global layer, or one whose declared window exceeds the trained context, extends.
    pub fn extends(&self, kind: usize) -> bool {
        self.attention_kinds[kind]
            .sliding_window
            .is_none_or(|w| w > self.max_position_embeddings)
    }

    /// The layers that take SelfExtend.
    pub fn extended_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.extends(self.layer_kinds[l]))
            .collect()
    }

    /// The RoPE of the layers SelfExtend applies to (the first kind when none does).
    pub fn rope(&self) -> &RopeConfig {
        let kind = (0..self.attention_kinds.len())
            .find(|&k| self.extends(k))
            .unwrap_or(0);
        &self.attention_kinds[kind].rope
    }

    /// The same attention for every layer. Every reader of a layer count builds its
    /// per-layer tables here first, so a corrupt count (say 2^63) is refused here,
    /// before anything per layer is allocated.
    pub(crate) fn uniform_layers(
        num_layers: usize,
        attention: LayerAttention,
    ) -> std::result::Result<(Vec<LayerAttention>, Vec<usize>), String> {
        if num_layers > MAX_LAYERS {
            return Err(format!(
                "{num_layers} layers is more than any model has (at most {MAX_LAYERS}); \
                 the file is corrupt"
            ));
        }
        Ok((vec![attention], vec![0; num_layers]))
    }

    /// Layers whose `sliding[l]` is set get `local`, the others `global`; kinds no layer
    /// uses are left out.
    pub(crate) fn mixed_layers(
        sliding: &[bool],
        global: LayerAttention,
        local: LayerAttention,
    ) -> (Vec<LayerAttention>, Vec<usize>) {
        let mut kinds = vec![];
        let mut index = [None, None];
        let layer_kinds = sliding
            .iter()
            .map(|&s| {
                *index[s as usize].get_or_insert_with(|| {
                    kinds.push(if s { local.clone() } else { global.clone() });
                    kinds.len() - 1
                })
            })
            .collect();
        (kinds, layer_kinds)
    }

    /// Checks what every family must satisfy; `Err` holds the message.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(format!("`{name}` must be positive, got 0"));
            }
        }
        let kv = self.num_key_value_heads;
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "`num_attention_heads` ({}) must be a positive multiple of `num_key_value_heads` ({kv})",
                self.num_attention_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "`head_dim` must be a positive even number for RoPE, got {}",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!(
                "`rms_norm_eps` must be a finite number >= 0, got {}",
                self.rms_norm_eps
            ));
        }
        let b = &self.block;
        for (name, cap) in [
            ("attn_logit_softcapping", b.attn_logit_softcap),
            ("final_logit_softcapping", b.final_logit_softcap),
        ] {
            if let Some(cap) = cap.filter(|c| !(c.is_finite() && *c > 0.0)) {
                return Err(format!("`{name}` must be a positive number, got {cap}"));
            }
        }
        if !(b.attention_scale.is_finite() && b.attention_scale > 0.0) {
            return Err(format!(
                "the attention scale must be a positive number, got {}",
                b.attention_scale
            ));
        }
        if self.layer_kinds.len() != self.num_hidden_layers
            || self
                .layer_kinds
                .iter()
                .any(|&k| k >= self.attention_kinds.len())
        {
            return Err(format!(
                "{} layer types for {} layers",
                self.layer_kinds.len(),
                self.num_hidden_layers
            ));
        }
        for kind in &self.attention_kinds {
            if kind.sliding_window == Some(0) {
                return Err("`sliding_window` must be >= 1".into());
            }
            let rope = &kind.rope;
            if !(rope.theta.is_finite() && rope.theta > 1.0) {
                return Err(format!(
                    "`rope_theta` must be a finite number > 1, got {}",
                    rope.theta
                ));
            }
            if rope.rotary_dim == 0 || rope.rotary_dim % 2 != 0 || rope.rotary_dim > self.head_dim {
                return Err(format!(
                    "the rotary dimension must be even and in 2..={}, got {}",
                    self.head_dim, rope.rotary_dim
                ));
            }
            let half = rope.rotary_dim / 2;
            let lengths: Vec<(&str, usize)> = match &rope.scaling {
                Some(RopeScaling::Frequencies { factors }) => vec![("rope_freqs", factors.len())],
                Some(RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    ..
                }) => vec![
                    ("short_factor", short_factor.len()),
                    ("long_factor", long_factor.len()),
                ],
                _ => vec![],
            };
            for (name, len) in lengths {
                if len != half {
                    return Err(format!(
                        "`{name}` has {len} values, expected {half} (rotary dimension / 2)"
                    ));
                }
            }
            // Every loader checks its own fields; this catches what a format leaves
            // unchecked (a GGUF scaling factor of 0, a NaN low_freq_factor).
            let factors: Vec<f64> = match &rope.scaling {
                Some(
                    RopeScaling::Linear { factor }
                    | RopeScaling::Ntk { factor }
                    | RopeScaling::DynamicNtk { factor, .. },
                ) => vec![*factor],
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    ..
                }) => vec![*factor, *low_freq_factor, *high_freq_factor],
                Some(RopeScaling::Frequencies { factors }) => factors.to_vec(),
                Some(RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    attention_factor,
                    ..
                }) => short_factor
                    .iter()
                    .chain(long_factor.iter())
                    .chain([attention_factor])
                    .copied()
                    .collect(),
                _ => vec![],
            };
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(format!("RoPE factors must be positive numbers, got {bad}"));
            }
        }
        Ok(())
    }
}

/// A parsed `config.json` object, with typed accessors whose errors name the field.
/// A `null` value counts as absent, as `transformers` treats it.
pub(crate) struct HfConfig<'a> {
    pub path: &'a Path,
    pub map: &'a Map<String, Value>,
}

impl<'a> HfConfig<'a> {
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn unsupported(&self, msg: impl Into<String>) -> Error {
        Error::Unsupported {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The same accessors over a nested object (`text_config`, `rope_parameters`).
    pub fn nested(&self, key: &str) -> Result<Option<HfConfig<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(HfConfig {
                path: self.path,
                map,
            })),
            Some(other) => Err(self.err(format!("`{key}` must be an object, got {other}"))),
        }
    }

    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        self.err(format!("`{key}` must be a non-negative integer, got {v}"))
                    })
            })
            .transpose()
    }

    pub fn required_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}")))
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}")))
            })
            .transpose()
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(format!("`{key}` must be a string, got {v}")))
            })
            .transpose()
    }

    pub fn f64s(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.err(format!("`{key}` must be a list of numbers")))?;
        list.iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| self.err(format!("`{key}` must be a list of numbers")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn strs(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let err = || self.err(format!("`{key}` must be a list of strings"));
        let list = v.as_array().ok_or_else(err)?;
        list.iter()
            .map(|x| x.as_str().ok_or_else(err))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `eos_token_id`: absent, one id, or a list.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let err = || self.err(format!("`{key}` must be a token id or a list of them"));
        let id = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(err)
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(ids)) => ids.iter().map(id).collect(),
            Some(v) => Ok(vec![id(v)?]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 32"#;

    fn parse(extra: &str) -> Result<Config> {
        Config::from_hf_json_str(&format!("{BASE}{extra}}}"), Path::new("config.json"))
    }

    #[test]
    fn defaults_and_eos_forms() {
        let c = parse("").unwrap();
        assert_eq!((c.head_dim, c.num_key_value_heads), (4, 2));
        assert!(c.eos_token_ids.is_empty());
        assert_eq!(parse(r#", "eos_token_id": 3"#).unwrap().eos_token_ids, [3]);
        assert_eq!(
            parse(r#", "eos_token_id": [3, 4]"#).unwrap().eos_token_ids,
            [3, 4]
        );
    }

    #[test]
    fn rope_scaling_variants() {
        let c = parse(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#).unwrap();
        assert_eq!(c.rope().scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let c = parse(r#", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}"#).unwrap();
        assert_eq!(
            c.rope().scaling,
            Some(RopeScaling::DynamicNtk {
                factor: 2.0,
                original_max_position_embeddings: 32
            })
        );
        let err = parse(r#", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}"#).unwrap_err();
        assert!(err.to_string().contains("'yarn'"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse(r#", "num_key_value_heads": 3"#).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let err =
            Config::from_hf_json_str(r#"{"model_type": "gpt2"}"#, Path::new("c.json")).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(
            err.to_string().contains("qwen2"),
            "names the supported families: {err}"
        );
        let err = Config::from_hf_json_str("{", Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        // Found by the fuzzer: a huge layer count was a capacity-overflow panic.
        let huge = format!("{BASE}}}").replace(
            r#""num_hidden_layers": 1"#,
            r#""num_hidden_layers": 9223372036854775808"#,
        );
        assert!(huge.contains("9223372036854775808"));
        let err = Config::from_hf_json_str(&huge, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers"), "{err}");
        // high > low holds, but a negative frequency factor is no scaling at all.
        let err = parse(
            r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": -1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("RoPE factors"), "{err}");
    }

    #[test]
    fn transformers_5_rope_parameters_equal_the_4_x_fields() {
        let v4 = parse(
            r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}"#,
        )
        .unwrap();
        let v5 = parse(
            r#", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}"#,
        )
        .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v5.rope().theta, 500000.0);
        assert!(matches!(
            v5.rope().scaling,
            Some(RopeScaling::Llama3 { .. })
        ));
    }

    #[test]
    fn arithmetic_fields_are_understood_or_refused_by_name() {
        for (extra, name) in [
            (
                r#", "rope_scaling": {"rope_type": "linear", "factor": 2.0, "mscale": 1.0}"#,
                "mscale",
            ),
            (
                r#", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}"#,
                "yarn",
            ),
            (
                r#", "quantization_config": {"quant_method": "gptq"}"#,
                "quantization_config",
            ),
            (r#", "hidden_act": "gelu""#, "hidden_act"),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.to_string().contains(name), "{extra}: {err}");
        }
        let c = parse(r#", "partial_rotary_factor": 0.5, "attention_bias": true"#).unwrap();
        assert_eq!(c.rope().rotary_dim, 2);
        assert!(c.block.qkv_bias && c.block.o_bias);
    }
}
