//! Small value types: `SelfExtend`, `RopeScaling`, `ModelConfig`, `Completion`.

use pyo3::prelude::*;
use selfextend_core::generate::Completion;
use selfextend_core::{Config, RopeScaling, SelfExtend};

use crate::errors::{invalid_argument, to_py};

/// SelfExtend's two knobs.
///
/// Keys closer than `window` tokens to a query keep their ordinary positions;
/// farther keys are seen at positions floor-divided by `group_size`, so a model
/// trained on L tokens reads about (L - window) * group_size + window tokens.
///
/// Args:
///     group_size: G >= 1, how many distant positions share one position.
///     window: W >= 1, the neighbor window that keeps exact positions.
#[pyclass(
    name = "SelfExtend",
    module = "selfextend_rs",
    frozen,
    eq,
    hash,
    from_py_object
)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PySelfExtend(pub SelfExtend);

#[pymethods]
impl PySelfExtend {
    #[new]
    #[pyo3(signature = (group_size, window))]
    fn new(group_size: i64, window: i64) -> PyResult<Self> {
        for (name, value) in [("group_size", group_size), ("window", window)] {
            if value < 1 {
                return Err(invalid_argument(format!(
                    "invalid argument `{name}`: must be >= 1, got {value}"
                )));
            }
        }
        SelfExtend::new(group_size as usize, window as usize)
            .map(Self)
            .map_err(|e| to_py(e, false))
    }

    /// Picks a setting for reading `target_length` tokens with a model trained on
    /// `trained_context` tokens, by the paper's rules:
    ///
    /// - W is a quarter of L (a multiple of 64 once L >= 256): the authors use
    ///   windows of L/8 to 3L/8.
    /// - G is the smallest group size that keeps every grouped position at or below
    ///   2L/3, which implies (L - W) * G + W >= target_length.
    /// - Targets within 2L/3 get G = 1, which is exactly plain attention.
    ///
    /// Args:
    ///     target_length: Tokens to cover (prompt plus new tokens).
    ///     trained_context: L, the model's trained context (config.trained_context).
    ///
    /// Returns:
    ///     A SelfExtend.
    #[staticmethod]
    #[pyo3(signature = (target_length, trained_context))]
    fn auto(target_length: i64, trained_context: i64) -> PyResult<Self> {
        for (name, value, min) in [
            ("target_length", target_length, 1),
            ("trained_context", trained_context, 4),
        ] {
            if value < min {
                return Err(invalid_argument(format!(
                    "invalid argument `{name}`: must be >= {min}, got {value}"
                )));
            }
        }
        SelfExtend::auto(target_length as usize, trained_context as usize)
            .map(Self)
            .map_err(|e| to_py(e, false))
    }

    /// G: how many distant positions share one position.
    #[getter]
    fn group_size(&self) -> usize {
        self.0.group_size()
    }

    /// W: the neighbor window that keeps exact positions.
    #[getter]
    fn window(&self) -> usize {
        self.0.window()
    }

    /// The context reachable from a model trained on `trained_context` tokens:
    /// (L - W) * G + W, and never less than L.
    ///
    /// Args:
    ///     trained_context: L, the model's trained context length.
    ///
    /// Returns:
    ///     The number of tokens the model can read with this setting.
    #[pyo3(signature = (trained_context))]
    fn max_context(&self, trained_context: usize) -> usize {
        self.0.max_context(trained_context)
    }

    /// Pickling (multiprocessing, Ray) rebuilds the setting through `SelfExtend(G, W)`.
    fn __getnewargs__(&self) -> (usize, usize) {
        (self.0.group_size(), self.0.window())
    }

    fn __repr__(&self) -> String {
        format!(
            "SelfExtend(group_size={}, window={})",
            self.0.group_size(),
            self.0.window()
        )
    }
}

/// A RoPE scaling: the training-free baselines to compare SelfExtend against.
///
/// Pass one as `rope_scaling=` to `logits`, `token_logprobs`, `generate` and the
/// other calls; it replaces the model's own scaling for that call. Each follows its
/// published formula, with `d` the head dimension and `theta` the RoPE base:
///
/// - `linear(s)`: position interpolation (Chen et al., 2023), every frequency / s.
/// - `ntk(s)`: "NTK-aware" scaling (bloc97, 2023), base theta * s ** (d / (d - 2)).
/// - `dynamic_ntk(s)`: dynamic NTK (emozilla, 2023; transformers' "dynamic"): for a
///   sequence of n > L tokens, base theta * (s * n / L - (s - 1)) ** (d / (d - 2)),
///   where L is the trained context. n is the prompt length during the prefill and
///   the current length at each decode step; the cache keeps un-rotated keys, so
///   every key is rotated with the current base.
#[pyclass(
    name = "RopeScaling",
    module = "selfextend_rs",
    frozen,
    eq,
    from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyRopeScaling {
    scaling: RopeScaling,
    /// Dynamic NTK's L is the model's trained context, filled in per call.
    trained_from_model: bool,
}

impl PyRopeScaling {
    pub fn from_config(scaling: RopeScaling) -> Self {
        Self {
            scaling,
            trained_from_model: false,
        }
    }

    /// The core setting for a model trained on `trained` tokens.
    pub fn resolve(&self, trained: usize) -> RopeScaling {
        match self.scaling {
            RopeScaling::DynamicNtk { factor, .. } if self.trained_from_model => {
                RopeScaling::DynamicNtk {
                    factor,
                    original_max_position_embeddings: trained,
                }
            }
            ref s => s.clone(),
        }
    }

    fn checked_factor(factor: f64) -> PyResult<f64> {
        if factor.is_finite() && factor >= 1.0 {
            Ok(factor)
        } else {
            Err(invalid_argument(format!(
                "invalid argument `factor`: must be a finite number >= 1 (how many times the \
                 trained context to cover), got {factor}"
            )))
        }
    }
}

#[pymethods]
impl PyRopeScaling {
    /// Position interpolation: every RoPE frequency divided by `factor`.
    ///
    /// Args:
    ///     factor: s >= 1; positions up to s times the trained context map into it.
    #[staticmethod]
    fn linear(factor: f64) -> PyResult<Self> {
        Ok(Self::from_config(RopeScaling::Linear {
            factor: Self::checked_factor(factor)?,
        }))
    }

    /// "NTK-aware" scaling: the RoPE base raised to theta * factor ** (d / (d - 2)).
    ///
    /// Args:
    ///     factor: s >= 1; the lowest frequency is stretched s times, the highest kept.
    #[staticmethod]
    fn ntk(factor: f64) -> PyResult<Self> {
        Ok(Self::from_config(RopeScaling::Ntk {
            factor: Self::checked_factor(factor)?,
        }))
    }

    /// Dynamic NTK: NTK scaling whose base grows with the sequence length n once it
    /// passes the trained context L: theta * (factor * n / L - (factor - 1)) ** (d / (d - 2)).
    ///
    /// Args:
    ///     factor: s >= 1 (transformers' `rope_scaling.factor`; 1 makes length n
    ///         exactly ntk(n / L)).
    ///     original_context: L; None (the default) is the model's trained context.
    #[staticmethod]
    #[pyo3(signature = (factor, original_context = None))]
    fn dynamic_ntk(factor: f64, original_context: Option<i64>) -> PyResult<Self> {
        let factor = Self::checked_factor(factor)?;
        let original = match original_context {
            None => None,
            Some(n) if n >= 1 => Some(n as usize),
            Some(n) => {
                return Err(invalid_argument(format!(
                    "invalid argument `original_context`: must be >= 1 or None, got {n}"
                )))
            }
        };
        Ok(Self {
            scaling: RopeScaling::DynamicNtk {
                factor,
                original_max_position_embeddings: original.unwrap_or(0),
            },
            trained_from_model: original.is_none(),
        })
    }

    /// "linear", "ntk" or "dynamic_ntk"; from a model's files also "llama3",
    /// "rope_freqs" (Llama 3.1 scaling as llama.cpp stores it: a divisor per
    /// frequency) or "longrope" (Phi-3).
    #[getter]
    fn kind(&self) -> &'static str {
        match self.scaling {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Ntk { .. } => "ntk",
            RopeScaling::DynamicNtk { .. } => "dynamic_ntk",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Frequencies { .. } => "rope_freqs",
            RopeScaling::LongRope { .. } => "longrope",
        }
    }

    /// The scale factor s; for "rope_freqs" and "longrope" (whose factors differ per
    /// frequency), the largest divisor (of the long factors for "longrope").
    #[getter]
    fn factor(&self) -> f64 {
        let largest = |f: &[f64]| f.iter().copied().fold(1.0, f64::max);
        match &self.scaling {
            RopeScaling::Linear { factor }
            | RopeScaling::Ntk { factor }
            | RopeScaling::DynamicNtk { factor, .. }
            | RopeScaling::Llama3 { factor, .. } => *factor,
            RopeScaling::Frequencies { factors } => largest(factors),
            RopeScaling::LongRope { long_factor, .. } => largest(long_factor),
        }
    }

    /// The context L the scaling starts from, when fixed (dynamic NTK with an explicit
    /// one, llama3 and longrope); None otherwise.
    #[getter]
    fn original_context(&self) -> Option<usize> {
        match self.scaling {
            RopeScaling::DynamicNtk {
                original_max_position_embeddings: n,
                ..
            } if !self.trained_from_model => Some(n),
            RopeScaling::Llama3 {
                original_max_position_embeddings: n,
                ..
            }
            | RopeScaling::LongRope {
                original_max_position_embeddings: n,
                ..
            } => Some(n),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        match (self.kind(), self.original_context()) {
            ("dynamic_ntk", Some(n)) => {
                format!(
                    "RopeScaling.dynamic_ntk({:?}, original_context={n})",
                    self.factor()
                )
            }
            (kind @ ("llama3" | "longrope"), Some(n)) => format!(
                "RopeScaling(kind='{kind}', factor={:?}, original_context={n})",
                self.factor()
            ),
            ("rope_freqs", _) => {
                format!("RopeScaling(kind='rope_freqs', factor={:?})", self.factor())
            }
            (kind, _) => format!("RopeScaling.{kind}({:?})", self.factor()),
        }
    }
}

/// The architecture of a loaded model.
#[pyclass(name = "ModelConfig", module = "selfextend_rs", frozen, get_all)]
#[derive(Clone)]
pub struct PyModelConfig {
    /// The family, as transformers names it: "llama", "mistral", "qwen2", "qwen3",
    /// "gemma2", "gemma3_text" or "phi3".
    pub model_type: String,
    /// The context length the model was trained on (`max_position_embeddings`).
    pub trained_context: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// The RoPE base of the layers SelfExtend applies to.
    pub rope_theta: f64,
    /// The RoPE scaling of those layers from the model's files, or None.
    pub rope_scaling: Option<PyRopeScaling>,
    /// Per layer, "full_attention" or "sliding_attention".
    pub layer_types: Vec<&'static str>,
    /// The window of the sliding-attention layers, or None when every layer is global.
    pub sliding_window: Option<usize>,
    /// The layers SelfExtend (and a per-call rope_scaling) applies to: the global
    /// ones, and sliding ones whose window exceeds the trained context. The others keep
    /// plain attention within their window, which never reaches past the trained
    /// context.
    pub self_extend_layers: Vec<usize>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl From<&Config> for PyModelConfig {
    fn from(c: &Config) -> Self {
        let kinds = &c.attention_kinds;
        Self {
            model_type: c.model_type.to_string(),
            trained_context: c.max_position_embeddings,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rope_theta: c.rope().theta,
            rope_scaling: c.rope().scaling.clone().map(PyRopeScaling::from_config),
            layer_types: c
                .layer_kinds
                .iter()
                .map(|&k| match kinds[k].sliding_window {
                    Some(_) => "sliding_attention",
                    None => "full_attention",
                })
                .collect(),
            sliding_window: kinds.iter().find_map(|k| k.sliding_window),
            self_extend_layers: c.extended_layers(),
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids: c.eos_token_ids.clone(),
        }
    }
}

#[pymethods]
impl PyModelConfig {
    fn __repr__(&self) -> String {
        format!(
            "ModelConfig(model_type={:?}, trained_context={}, num_layers={}, num_heads={}, \
             num_kv_heads={}, head_dim={}, hidden_size={}, vocab_size={}, rope_theta={})",
            self.model_type,
            self.trained_context,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.hidden_size,
            self.vocab_size,
            self.rope_theta
        )
    }
}

/// The result of `Model.generate`.
#[pyclass(name = "Completion", module = "selfextend_rs", frozen, get_all)]
#[derive(Clone)]
pub struct PyCompletion {
    /// The generated text (without the prompt, cut before a stop string).
    pub text: String,
    /// The generated token ids (without the prompt or a final EOS).
    pub token_ids: Vec<u32>,
    /// "eos", "stop" or "length".
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_tokens_per_second: f64,
}

impl From<Completion> for PyCompletion {
    fn from(c: Completion) -> Self {
        Self {
            decode_tokens_per_second: c.decode_tokens_per_second(),
            finish_reason: c.finish_reason.as_str(),
            text: c.text,
            token_ids: c.token_ids,
            prompt_tokens: c.prompt_tokens,
            prefill_seconds: c.prefill_seconds,
        }
    }
}

#[pymethods]
impl PyCompletion {
    fn __repr__(&self) -> String {
        format!(
            "Completion(text={:?}, finish_reason={:?}, prompt_tokens={}, new_tokens={})",
            self.text,
            self.finish_reason,
            self.prompt_tokens,
            self.token_ids.len()
        )
    }
}
