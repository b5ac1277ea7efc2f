//! Model configuration: the Hugging Face `config.json` schema for Llama-family
//! checkpoints, validated into one runtime [`Config`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// RoPE frequency scaling: `config.json`'s `rope_scaling`, or a per-call override.
///
/// The training-free baselines (`Linear`, `Ntk`, `DynamicNtk`) follow their published
/// formulas exactly; `crate::rope` writes them out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation (Chen et al., 2023): every frequency divided by `factor`.
    Linear { factor: f64 },
    /// "NTK-aware" scaling (bloc97, 2023): the base raised to
    /// `theta * factor^(d / (d - 2))`, for head dimension `d`.
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
}

/// The runtime configuration of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// The context length the model was trained on.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// `config.json` as written by `transformers` for `LlamaForCausalLM`.
#[derive(Debug, Deserialize)]
struct HfLlamaConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<RawRopeScaling>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    hidden_act: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl Config {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is only used in error messages.
    pub fn from_hf_json_str(text: &str, path: &Path) -> Result<Self> {
        let config_err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let unsupported = |msg: String| Error::Unsupported {
            path: path.to_path_buf(),
            msg,
        };

        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| config_err(format!("not valid JSON: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str());
        match model_type {
            Some("llama") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "model_type '{other}' is not supported (expected 'llama')"
                )))
            }
            None => {
                return Err(config_err(
                    "missing field `model_type` (expected 'llama')".into(),
                ))
            }
        }
        let raw: HfLlamaConfig =
            serde_json::from_value(value).map_err(|e| config_err(e.to_string()))?;
        debug_assert_eq!(raw.model_type.as_deref(), Some("llama"));

        if let Some(archs) = &raw.architectures {
            if let Some(bad) = archs.iter().find(|a| a.as_str() != "LlamaForCausalLM") {
                return Err(unsupported(format!(
                    "architecture '{bad}' is not supported (expected 'LlamaForCausalLM')"
                )));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(unsupported(format!(
                    "hidden_act '{act}' is not supported (expected 'silu')"
                )));
            }
        }

        for (name, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(config_err(format!("`{name}` must be positive, got 0")));
            }
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads == 0 || raw.num_attention_heads % num_key_value_heads != 0 {
            return Err(config_err(format!(
                "`num_attention_heads` ({}) must be a positive multiple of `num_key_value_heads` ({num_key_value_heads})",
                raw.num_attention_heads
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size % raw.num_attention_heads == 0 => {
                raw.hidden_size / raw.num_attention_heads
            }
            None => {
                return Err(config_err(format!(
                    "`hidden_size` ({}) is not divisible by `num_attention_heads` ({}) and no `head_dim` is given",
                    raw.hidden_size, raw.num_attention_heads
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(config_err(format!(
                "`head_dim` must be a positive even number for RoPE, got {head_dim}"
            )));
        }
        if !(raw.rope_theta.is_finite() && raw.rope_theta > 1.0) {
            return Err(config_err(format!(
                "`rope_theta` must be a finite number > 1, got {}",
                raw.rope_theta
            )));
        }
        if !(raw.rms_norm_eps.is_finite() && raw.rms_norm_eps >= 0.0) {
            return Err(config_err(format!(
                "`rms_norm_eps` must be a finite number >= 0, got {}",
                raw.rms_norm_eps
            )));
        }
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(s) => parse_rope_scaling(s, raw.max_position_embeddings).map_err(config_err)?,
        };
        let eos_token_ids = match raw.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        };
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        })
    }

    /// Query heads that share one key/value head (1 without GQA).
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn parse_rope_scaling(
    raw: RawRopeScaling,
    max_position_embeddings: usize,
) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = raw.rope_type.as_deref().unwrap_or("default");
    let factor = || -> std::result::Result<f64, String> {
        match raw.factor {
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            Some(f) => Err(format!("`rope_scaling.factor` must be > 0, got {f}")),
            None => Err(format!(
                "`rope_scaling.factor` is required for type '{kind}'"
            )),
        }
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "dynamic" => Ok(Some(RopeScaling::DynamicNtk {
            factor: factor()?,
            original_max_position_embeddings: raw
                .original_max_position_embeddings
                .unwrap_or(max_position_embeddings)
                .max(1),
        })),
        "llama3" => {
            let field = |name: &str, v: Option<f64>| {
                v.ok_or_else(|| format!("`rope_scaling.{name}` is required for type 'llama3'"))
            };
            let low_freq_factor = field("low_freq_factor", raw.low_freq_factor)?;
            let high_freq_factor = field("high_freq_factor", raw.high_freq_factor)?;
            if high_freq_factor <= low_freq_factor {
                return Err(format!(
                    "`rope_scaling.high_freq_factor` ({high_freq_factor}) must exceed `low_freq_factor` ({low_freq_factor})"
                ));
            }
            let original_max_position_embeddings = raw
                .original_max_position_embeddings
                .filter(|&n| n > 0)
                .ok_or(
                    "`rope_scaling.original_max_position_embeddings` is required for type 'llama3'",
                )?;
            Ok(Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }))
        }
        other => Err(format!(
            "`rope_scaling` type '{other}' is not supported (expected 'linear', 'dynamic' or 'llama3')"
        )),
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
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let c = parse(r#", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}"#).unwrap();
        assert_eq!(
            c.rope_scaling,
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
        let err = Config::from_hf_json_str("{", Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }
}
