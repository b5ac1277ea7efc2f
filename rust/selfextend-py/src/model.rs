//! `Model`, `Tokenizer` and `TextStream`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use selfextend_core::chat::Message;
use selfextend_core::generate::{Completion, GenerateOptions, Generation};
use selfextend_core::model::{parse_attention, parse_device, parse_dtype, parse_kv_cache_dtype};
use selfextend_core::sampling::SamplingParams;
use selfextend_core::{Error, Model, RopeScaling, SelfExtend};

use crate::errors::{invalid_argument, to_py, ContextLengthWarning, SelfExtendError};
use crate::types::{PyCompletion, PyModelConfig, PyRopeScaling, PySelfExtend};

type Check<'a> = dyn FnMut(usize, usize) -> selfextend_core::Result<()> + 'a;

/// Releases the GIL and runs `f`, handing it a callback that re-takes the GIL between
/// chunks and steps to check for Ctrl-C and to report prefill progress. Panics are
/// caught here and never cross into Python.
pub(crate) fn detached<T: Send>(
    py: Python<'_>,
    during_load: bool,
    progress: Option<&Py<PyAny>>,
    f: impl FnOnce(&mut Check<'_>) -> selfextend_core::Result<T> + Send,
) -> PyResult<T> {
    let mut raised: Option<PyErr> = None;
    let mut reported = 0usize;
    let result = py.detach(|| {
        let mut check = |done: usize, total: usize| {
            Python::attach(|py| {
                py.check_signals()?;
                // Decode steps repeat (total, total); report each position once.
                if let Some(callback) = progress {
                    if done > reported || (done == 0 && reported == 0 && total == 0) {
                        reported = done;
                        callback.bind(py).call1((done, total))?;
                    }
                }
                Ok::<(), PyErr>(())
            })
            .map_err(|e| {
                raised = Some(e);
                Error::Interrupted
            })
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut check)))
    });
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(Error::Interrupted)) => {
            Err(raised.unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted")))
        }
        Ok(Err(e)) => Err(to_py(e, during_load)),
        Err(panic) => {
            let what = selfextend_core::error::panic_message(panic.as_ref());
            Err(SelfExtendError::new_err(format!(
                "internal error (please report it): {what}"
            )))
        }
    }
}

/// `progress=True` draws the built-in bar; a callable is called as `fn(done, total)`.
fn progress_callback(
    py: Python<'_>,
    progress: Option<Bound<'_, PyAny>>,
    desc: &str,
) -> PyResult<Option<Py<PyAny>>> {
    let Some(progress) = progress else {
        return Ok(None);
    };
    if progress.is_none() {
        return Ok(None);
    }
    if let Ok(flag) = progress.cast::<pyo3::types::PyBool>() {
        if !flag.is_true() {
            return Ok(None);
        }
        let bar = py
            .import("selfextend_rs._progress")?
            .getattr("ProgressBar")?
            .call1((desc,))?;
        return Ok(Some(bar.unbind()));
    }
    if !progress.is_callable() {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "progress must be a bool or a callable taking (done, total)",
        ));
    }
    Ok(Some(progress.unbind()))
}

/// `self_extend=`: a `SelfExtend`, `"auto"`, or `None`.
#[derive(FromPyObject)]
pub(crate) enum SelfExtendArg {
    Setting(PySelfExtend),
    Named(String),
}

impl SelfExtendArg {
    /// Resolves `"auto"` for a sequence of `total` tokens.
    fn resolve(self, total: usize, trained: usize) -> PyResult<SelfExtend> {
        match self {
            Self::Setting(s) => Ok(s.0),
            Self::Named(name) if name == "auto" => {
                SelfExtend::auto(total.max(1), trained).map_err(|e| to_py(e, false))
            }
            Self::Named(name) => Err(invalid_argument(format!(
                "invalid argument `self_extend`: expected a SelfExtend, \"auto\" or None, got {name:?}"
            ))),
        }
    }
}

/// A prompt: text, or token ids.
#[derive(FromPyObject)]
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<i64>),
}

#[derive(FromPyObject)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

fn to_ids(ids: &[i64], vocab: usize, name: &str) -> PyResult<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    invalid_argument(format!(
                        "invalid argument `{name}`: id {id} at index {pos} is out of range for a vocabulary of {vocab}"
                    ))
                })
        })
        .collect()
}

fn optional_positive(value: Option<i64>, name: &str) -> PyResult<Option<usize>> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(v as usize)),
        Some(v) => Err(invalid_argument(format!(
            "invalid argument `{name}`: must be >= 1 or None, got {v}"
        ))),
    }
}

/// A language model of a supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3)
/// with its tokenizer.
///
/// Load one with `Model.load(path)`. A model is immutable and thread-safe: every call
/// owns its KV cache, so several threads may use one model at the same time.
#[pyclass(name = "Model", module = "selfextend_rs", frozen)]
pub struct PyModel {
    inner: Arc<Model>,
    /// The `selfextend_rs._aio.AsyncEngine` behind `agenerate` and `astream`, started
    /// on first use.
    engine: OnceLock<Py<PyAny>>,
}

pub(crate) struct Request {
    pub(crate) prompt: Vec<u32>,
    pub(crate) opts: GenerateOptions,
}

struct Scoring {
    ids: Vec<u32>,
    params: selfextend_core::AttentionParams,
    chunk_size: Option<usize>,
}

impl PyModel {
    /// Another handle on the same model (without its engine), for the bindings that
    /// convert arguments as the model's methods do.
    pub(crate) fn handle(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            engine: OnceLock::new(),
        }
    }

    pub(crate) fn model(&self) -> &Arc<Model> {
        &self.inner
    }

    /// The model's `AsyncEngine` (default options), started on first use.
    fn async_engine(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let this = slf.get();
        if let Some(engine) = this.engine.get() {
            return Ok(engine.clone_ref(slf.py()));
        }
        let engine = slf
            .py()
            .import("selfextend_rs._aio")?
            .getattr("AsyncEngine")?
            .call1((slf,))?
            .unbind();
        // Another thread may have won the race; either engine works, keep the first.
        let _ = this.engine.set(engine);
        Ok(this.engine.get().expect("set above").clone_ref(slf.py()))
    }

    fn encode_prompt(&self, py: Python<'_>, prompt: Prompt) -> PyResult<Vec<u32>> {
        match prompt {
            Prompt::Text(text) if text.is_empty() => Err(invalid_argument(
                "invalid argument `prompt`: is empty: at least one token is needed",
            )),
            Prompt::Text(text) => {
                let model = self.inner.clone();
                detached(py, false, None, move |_| {
                    model.tokenizer().encode(&text, true)
                })
            }
            Prompt::Ids(ids) => to_ids(&ids, self.inner.config().vocab_size, "prompt"),
        }
    }

    /// Warns when the sequence outruns what the model (with these settings) covers.
    fn warn_context(
        &self,
        py: Python<'_>,
        total: usize,
        se: Option<SelfExtend>,
        rope: Option<&RopeScaling>,
    ) -> PyResult<()> {
        let cfg = self.inner.config();
        let trained = cfg.max_position_embeddings;
        let rope = rope.or(cfg.rope().scaling.as_ref());
        let msg = match (se, rope) {
            // Every layer has a sliding window within the trained context: no relative
            // position ever exceeds it.
            _ if cfg.extended_layers().is_empty() => None,
            (
                _,
                Some(
                    RopeScaling::DynamicNtk { .. }
                    | RopeScaling::Llama3 { .. }
                    | RopeScaling::Frequencies { .. }
                    | RopeScaling::LongRope { .. },
                ),
            ) => None,
            (_, Some(&(RopeScaling::Linear { factor } | RopeScaling::Ntk { factor }))) => {
                let covered = (trained as f64 * factor).floor() as usize;
                (total > covered).then(|| {
                    format!(
                        "the sequence ({total} tokens) is longer than {rope:?} covers \
                         ({trained} * {factor} = {covered} tokens); increase its factor"
                    )
                })
            }
            (None, None) => (total > trained).then(|| {
                format!(
                    "the sequence ({total} tokens) is longer than the model's trained context \
                     ({trained}); plain attention degrades past it. Pass \
                     self_extend=SelfExtend(group_size, window) with (L - W) * G + W >= {total}"
                )
            }),
            (Some(se), None) => {
                let covered = se.max_context(trained);
                (total > covered).then(|| {
                    format!(
                        "the sequence ({total} tokens) is longer than {se:?} covers \
                         ((L - W) * G + W = {covered} for L = {trained}); increase group_size"
                    )
                })
            }
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        let msg = std::ffi::CString::new(msg).expect("no NUL in message");
        PyErr::warn(py, &py.get_type::<ContextLengthWarning>(), &msg, 2)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn request(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_new_tokens: i64,
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<i128>,
        stop: Option<Stop>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
    ) -> PyResult<Request> {
        if max_new_tokens < 0 {
            return Err(invalid_argument(format!(
                "invalid argument `max_new_tokens`: must be >= 0, got {max_new_tokens}"
            )));
        }
        let seed = seed
            .map(|s| {
                u64::try_from(s).map_err(|_| {
                    invalid_argument(format!(
                        "invalid argument `seed`: must be in [0, 2**64), got {s}"
                    ))
                })
            })
            .transpose()?;
        let prompt = self.encode_prompt(py, prompt)?;
        let trained = self.inner.config().max_position_embeddings;
        let total = prompt.len().saturating_add(max_new_tokens as usize);
        let self_extend = self_extend.map(|s| s.resolve(total, trained)).transpose()?;
        let rope_scaling = rope_scaling.map(|r| r.resolve(trained));
        let opts = GenerateOptions {
            max_new_tokens: max_new_tokens as usize,
            sampling: SamplingParams {
                temperature,
                top_k: optional_positive(top_k, "top_k")?,
                top_p,
                repetition_penalty,
                seed,
            },
            stop: match stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            self_extend,
            rope_scaling,
            chunk_size: optional_positive(chunk_size, "chunk_size")?,
        };
        opts.sampling.validate().map_err(|e| to_py(e, false))?;
        if opts.stop.iter().any(String::is_empty) {
            return Err(invalid_argument(
                "invalid argument `stop`: stop strings must not be empty",
            ));
        }
        if prompt.is_empty() {
            return Err(invalid_argument(
                "invalid argument `prompt`: is empty: at least one token is needed",
            ));
        }
        self.warn_context(
            py,
            prompt.len() + opts.max_new_tokens,
            opts.self_extend,
            opts.rope_scaling.as_ref(),
        )?;
        Ok(Request { prompt, opts })
    }

    /// Converts and checks the arguments shared by `logits` and `token_logprobs`.
    fn scoring(
        &self,
        py: Python<'_>,
        token_ids: &[i64],
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
    ) -> PyResult<Scoring> {
        let cfg = self.inner.config();
        let ids = to_ids(token_ids, cfg.vocab_size, "token_ids")?;
        if ids.is_empty() {
            return Err(invalid_argument(
                "invalid argument `token_ids`: is empty: at least one token is needed",
            ));
        }
        let chunk_size = optional_positive(chunk_size, "chunk_size")?;
        let trained = cfg.max_position_embeddings;
        let se = self_extend
            .map(|s| s.resolve(ids.len(), trained))
            .transpose()?;
        let rope = rope_scaling.map(|r| r.resolve(trained));
        self.warn_context(py, ids.len(), se, rope.as_ref())?;
        Ok(Scoring {
            params: self.inner.attention_params_with(se, rope),
            ids,
            chunk_size,
        })
    }

    fn start(&self, py: Python<'_>, req: Request) -> PyResult<Generation> {
        let model = self.inner.clone();
        detached(py, false, None, move |_| {
            Generation::new(model, req.prompt, req.opts)
        })
    }

    /// Renders a conversation with the model's chat template into prompt ids.
    pub(crate) fn chat_prompt(
        &self,
        py: Python<'_>,
        messages: Vec<HashMap<String, String>>,
    ) -> PyResult<Prompt> {
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, mut m)| match (m.remove("role"), m.remove("content")) {
                (Some(role), Some(content)) => Ok(Message::new(role, content)),
                _ => Err(invalid_argument(format!(
                    "invalid argument `messages`: message {i} needs 'role' and 'content' keys"
                ))),
            })
            .collect::<PyResult<Vec<_>>>()?;
        let model = self.inner.clone();
        let ids = detached(py, false, None, move |_| {
            let template = model
                .chat_template()
                .ok_or_else(|| Error::InvalidArgument {
                    name: "messages",
                    msg: "this model has no chat template; use generate() with a plain prompt"
                        .into(),
                })?;
            let text = selfextend_core::chat::render(template, &messages, true)?;
            model.tokenizer().encode(&text, false)
        })?;
        Ok(Prompt::Ids(ids.into_iter().map(i64::from).collect()))
    }
}

#[macro_export]
macro_rules! generation_doc {
    () => {
        r#"    prompt: Text (encoded with the tokenizer's special tokens) or token ids.
    max_new_tokens: Upper bound on generated tokens (>= 0).
    temperature: 0.0 is greedy; higher samples more freely.
    top_k: Sample only among the k most likely tokens.
    top_p: Sample only from the smallest set of tokens with this much mass.
    repetition_penalty: > 1.0 discourages tokens already in the sequence.
    seed: Makes sampling reproducible.
    stop: A string or list of strings that end generation (excluded from text).
    self_extend: A SelfExtend, "auto" (chosen for prompt + max_new_tokens), or None
        for plain attention.
    rope_scaling: A RopeScaling replacing the model's own for this call, or None.
    chunk_size: Prefill chunk length (default 512); results do not depend on it.
    progress: True draws a prefill progress bar on stderr; a callable is called
        as fn(done, total) after each prefill chunk."#
    };
}

#[pymethods]
impl PyModel {
    /// Loads a model.
    ///
    /// Args:
    ///     path: A llama.cpp GGUF file, or a Hugging Face model directory with
    ///         config.json, tokenizer.json and model.safetensors (or a sharded
    ///         model.safetensors.index.json), of a supported family: Llama
    ///         (2, 3, 3.1, 3.2, SmolLM), Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3
    ///         (text) or Phi-3 (3, 3.5, Phi-4-mini). Any other raises
    ///         UnsupportedModelError naming the supported ones. None loads the default model,
    ///         SmolLM2-135M-Instruct (see default_model()).
    ///     device: "cpu" (default), "cuda", "cuda:N" or "metal" where the build has them.
    ///     dtype: Compute dtype: None, "f32", "bf16" or "f16". None is f32 and keeps
    ///         GGUF weights quantized; naming a dtype dequantizes them.
    ///     max_memory: A cap, in bytes, on the memory one call may plan to use (KV
    ///         cache, logits and workspace, beyond the weights). Calls that would need
    ///         more raise OutOfMemoryError before allocating. Free system memory is
    ///         always a cap as well.
    ///     attention: The attention implementation: "auto" (the fastest for the
    ///         device), "fused" (one kernel: the CPU kernel, or the CUDA kernel of a CUDA
    ///         build), "tiled" (candle ops over blocks of queries, any device) or "naive"
    ///         (full score matrices; the test oracle). All compute the same function.
    ///     kv_cache: The dtype keys and values are stored in: None (f16 for quantized
    ///         GGUF weights on the CPU, halving what long-context decode reads, else
    ///         the compute dtype), "f32" (exact: what the parity tests check), "f16"
    ///         or "bf16".
    ///
    /// Returns:
    ///     The loaded Model.
    ///
    /// Raises:
    ///     ModelLoadError: the files are missing, corrupt, inconsistent or unsupported.
    ///     InvalidArgumentError: unknown device, dtype, attention or kv_cache.
    #[staticmethod]
    #[pyo3(signature = (path = None, *, device = "cpu", dtype = None, max_memory = None,
        attention = "auto", kv_cache = None))]
    fn load(
        py: Python<'_>,
        path: Option<PathBuf>,
        device: &str,
        dtype: Option<&str>,
        max_memory: Option<usize>,
        attention: &str,
        kv_cache: Option<&str>,
    ) -> PyResult<Self> {
        let path = match path {
            Some(p) => p,
            None => py
                .import("selfextend_rs._models")?
                .getattr("default_model")?
                .call0()?
                .extract()?,
        };
        let backend = parse_attention(attention).map_err(|e| to_py(e, false))?;
        let device = parse_device(device).map_err(|e| to_py(e, false))?;
        let dtype = dtype
            .map(parse_dtype)
            .transpose()
            .map_err(|e| to_py(e, false))?;
        let kv_cache = kv_cache
            .map(parse_kv_cache_dtype)
            .transpose()
            .map_err(|e| to_py(e, false))?;
        let mut model = detached(py, true, None, move |check| {
            let check = RefCell::new(check);
            Model::load_with_check(&path, &device, dtype, &|| (check.borrow_mut())(0, 0))
        })?;
        model.set_max_memory(max_memory);
        model.set_attention_backend(backend);
        model.set_kv_cache_dtype(kv_cache);
        Ok(Self {
            engine: OnceLock::new(),
            inner: Arc::new(model),
        })
    }

    /// The model's architecture.
    #[getter]
    fn config(&self) -> PyModelConfig {
        self.inner.config().into()
    }

    /// The attention implementation calls run on: "naive", "tiled" or "fused".
    #[getter]
    fn attention(&self) -> &'static str {
        self.inner.attention_backend().name()
    }

    /// The max_memory cap given at load, in bytes, or None.
    #[getter]
    fn max_memory(&self) -> Option<usize> {
        self.inner.max_memory()
    }

    /// The model's tokenizer.
    #[getter]
    fn tokenizer(&self) -> PyTokenizer {
        PyTokenizer {
            model: self.inner.clone(),
        }
    }

    /// Where the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.source().to_path_buf()
    }

    /// The dtype the KV cache stores keys and values in: "f32", "f16" or "bf16".
    #[getter]
    fn kv_cache(&self) -> String {
        self.inner.kv_cache_dtype().as_str().to_string()
    }

    /// The compute dtype: "f32", "bf16" or "f16".
    #[getter]
    fn dtype(&self) -> String {
        self.inner.dtype().as_str().to_string()
    }

    /// Whether linear layers run on quantized GGUF weights.
    #[getter]
    fn quantized(&self) -> bool {
        self.inner.is_quantized()
    }

    /// The chat template from the model's files, or None.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(|t| t.source.clone())
    }

    /// Logits of every position of a token sequence.
    ///
    /// Args:
    ///     token_ids: The sequence, a list of ints below vocab_size.
    ///     self_extend: A SelfExtend, "auto", or None for plain attention.
    ///     rope_scaling: A RopeScaling replacing the model's own for this call, or None.
    ///     chunk_size: Prefill chunk length (default 512); results do not depend on it.
    ///     progress: True draws a progress bar on stderr; a callable is called as
    ///         fn(done, total) after each chunk.
    ///
    /// Returns:
    ///     numpy.ndarray of float32, shape (len(token_ids), vocab_size).
    #[pyo3(signature = (token_ids, *, self_extend = None, rope_scaling = None, chunk_size = None,
        progress = None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
        progress: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let vocab = self.inner.config().vocab_size;
        let scoring = self.scoring(py, &token_ids, self_extend, rope_scaling, chunk_size)?;
        let progress = progress_callback(py, progress, "prefill")?;
        let model = self.inner.clone();
        let n = scoring.ids.len();
        let logits = detached(py, false, progress.as_ref(), move |check| {
            model.logits(&scoring.ids, &scoring.params, scoring.chunk_size, check)
        })?;
        let array = Array2::from_shape_vec((n, vocab), logits)
            .map_err(|e| SelfExtendError::new_err(format!("internal error: {e}")))?;
        Ok(array.into_pyarray(py))
    }

    /// Log-probabilities the model gives each token of a sequence after its prefix:
    /// log p(token_ids[t] | token_ids[:t]) for t = start, ..., len(token_ids) - 1.
    ///
    /// The same numbers as the log-softmax of `logits()` rows start - 1 onwards, but
    /// only a chunk of logits is held at a time, so long texts can be scored. The
    /// perplexity of those tokens is exp(-mean(result)).
    ///
    /// Args:
    ///     token_ids: The sequence, a list of ints below vocab_size.
    ///     start: The first position scored, 1 <= start < len(token_ids) (default 1:
    ///         every token that has a prefix).
    ///     self_extend: A SelfExtend, "auto", or None for plain attention.
    ///     rope_scaling: A RopeScaling replacing the model's own for this call, or None.
    ///     chunk_size: Prefill chunk length (default 512); results do not depend on it.
    ///     progress: True draws a progress bar on stderr; a callable is called as
    ///         fn(done, total) after each chunk.
    ///
    /// Returns:
    ///     numpy.ndarray of float32, shape (len(token_ids) - start,).
    #[pyo3(signature = (token_ids, *, start = 1, self_extend = None, rope_scaling = None,
        chunk_size = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn token_logprobs<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        start: i64,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
        progress: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let scoring = self.scoring(py, &token_ids, self_extend, rope_scaling, chunk_size)?;
        let n = scoring.ids.len();
        if start < 1 || start as u64 >= n as u64 {
            return Err(invalid_argument(format!(
                "invalid argument `start`: must be in [1, {n}) for a sequence of {n} tokens \
                 (the first token has no prediction), got {start}"
            )));
        }
        let progress = progress_callback(py, progress, "scoring")?;
        let model = self.inner.clone();
        let logprobs = detached(py, false, progress.as_ref(), move |check| {
            model.token_logprobs(
                &scoring.ids,
                start as usize,
                &scoring.params,
                scoring.chunk_size,
                check,
            )
        })?;
        Ok(logprobs.into_pyarray(py))
    }

    #[doc = concat!("Generates a completion.\n\nArgs:\n", generation_doc!(), "\n\nReturns:\n    A Completion with text, token_ids, finish_reason and timings.")]
    #[pyo3(signature = (prompt, max_new_tokens = 128, *, temperature = 0.0, top_k = None,
        top_p = None, repetition_penalty = 1.0, seed = None, stop = None, self_extend = None,
        rope_scaling = None, chunk_size = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_new_tokens: i64,
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<i128>,
        stop: Option<Stop>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyCompletion> {
        let req = self.request(
            py,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            self_extend,
            rope_scaling,
            chunk_size,
        )?;
        let progress = progress_callback(py, progress, "prefill")?;
        let generation = self.start(py, req)?;
        let completion = detached(py, false, progress.as_ref(), move |check| {
            generation.run(check)
        })?;
        Ok(completion.into())
    }

    #[doc = concat!("Like generate(), but yields text pieces as they are decoded.\n\nPieces end on UTF-8 character boundaries, and text that might begin a stop string\nis held back until it is known not to.\n\nArgs:\n", generation_doc!(), "\n\nReturns:\n    A TextStream: an iterator of str whose `completion` is set once exhausted.")]
    #[pyo3(signature = (prompt, max_new_tokens = 128, *, temperature = 0.0, top_k = None,
        top_p = None, repetition_penalty = 1.0, seed = None, stop = None, self_extend = None,
        rope_scaling = None, chunk_size = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_new_tokens: i64,
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<i128>,
        stop: Option<Stop>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyTextStream> {
        let req = self.request(
            py,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            self_extend,
            rope_scaling,
            chunk_size,
        )?;
        let progress = progress_callback(py, progress, "prefill")?;
        let generation = self.start(py, req)?;
        Ok(PyTextStream {
            state: Mutex::new(StreamState::Running(Box::new(generation))),
            progress,
        })
    }

    #[doc = concat!("Answers a conversation, formatted with the model's own chat template.\n\nArgs:\n    messages: A list of {\"role\": ..., \"content\": ...} dicts, e.g. roles\n        \"system\", \"user\" and \"assistant\".\n", generation_doc!(), "\n\nReturns:\n    A Completion; its text is the assistant's reply.")]
    #[pyo3(signature = (messages, max_new_tokens = 128, *, temperature = 0.0, top_k = None,
        top_p = None, repetition_penalty = 1.0, seed = None, stop = None, self_extend = None,
        rope_scaling = None, chunk_size = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: Vec<HashMap<String, String>>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<i128>,
        stop: Option<Stop>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyCompletion> {
        let prompt = self.chat_prompt(py, messages)?;
        self.generate(
            py,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            self_extend,
            rope_scaling,
            chunk_size,
            progress,
        )
    }

    #[doc = concat!("Like chat(), but yields the reply as text pieces.\n\nArgs:\n    messages: A list of {\"role\": ..., \"content\": ...} dicts.\n", generation_doc!(), "\n\nReturns:\n    A TextStream.")]
    #[pyo3(signature = (messages, max_new_tokens = 128, *, temperature = 0.0, top_k = None,
        top_p = None, repetition_penalty = 1.0, seed = None, stop = None, self_extend = None,
        rope_scaling = None, chunk_size = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat_stream(
        &self,
        py: Python<'_>,
        messages: Vec<HashMap<String, String>>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<i128>,
        stop: Option<Stop>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyTextStream> {
        let prompt = self.chat_prompt(py, messages)?;
        self.stream(
            py,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            self_extend,
            rope_scaling,
            chunk_size,
            progress,
        )
    }

    /// Like generate(), as a coroutine served by the model's continuous-batching
    /// engine: concurrent calls share each decoding step. Takes generate()'s
    /// arguments (without progress).
    ///
    /// Returns:
    ///     A coroutine whose result is the Completion.
    #[pyo3(signature = (*args, **kwargs))]
    fn agenerate(
        slf: &Bound<'_, Self>,
        args: &Bound<'_, pyo3::types::PyTuple>,
        kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        Self::async_engine(slf)?.call_method(slf.py(), "agenerate", args, kwargs)
    }

    /// Like stream(), served by the model's engine: `async for piece in
    /// model.astream(...)`. Takes generate()'s arguments (without progress).
    ///
    /// Returns:
    ///     An AsyncTextStream; its `completion` is set once exhausted.
    #[pyo3(signature = (*args, **kwargs))]
    fn astream(
        slf: &Bound<'_, Self>,
        args: &Bound<'_, pyo3::types::PyTuple>,
        kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        Self::async_engine(slf)?.call_method(slf.py(), "astream", args, kwargs)
    }

    /// Like chat(), as a coroutine served by the model's engine.
    ///
    /// Returns:
    ///     A coroutine whose result is the Completion.
    #[pyo3(signature = (*args, **kwargs))]
    fn achat(
        slf: &Bound<'_, Self>,
        args: &Bound<'_, pyo3::types::PyTuple>,
        kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        Self::async_engine(slf)?.call_method(slf.py(), "achat", args, kwargs)
    }

    /// Like chat_stream(), served by the model's engine.
    ///
    /// Returns:
    ///     An AsyncTextStream.
    #[pyo3(signature = (*args, **kwargs))]
    fn achat_stream(
        slf: &Bound<'_, Self>,
        args: &Bound<'_, pyo3::types::PyTuple>,
        kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        Self::async_engine(slf)?.call_method(slf.py(), "achat_stream", args, kwargs)
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Model(path={:?}, layers={}, trained_context={}, dtype={}{})",
            self.inner.source().display().to_string(),
            c.num_hidden_layers,
            c.max_position_embeddings,
            self.inner.dtype().as_str(),
            if self.inner.is_quantized() {
                ", quantized"
            } else {
                ""
            }
        )
    }
}

/// The tokenizer of a model (from its tokenizer.json).
#[pyclass(name = "Tokenizer", module = "selfextend_rs", frozen)]
pub struct PyTokenizer {
    model: Arc<Model>,
}

#[pymethods]
impl PyTokenizer {
    /// Encodes text to token ids.
    ///
    /// Args:
    ///     text: The text.
    ///     add_special_tokens: Apply the tokenizer's post-processor (e.g. a BOS token).
    ///
    /// Returns:
    ///     list[int]
    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let model = self.model.clone();
        detached(py, false, None, move |_| {
            model.tokenizer().encode(&text, add_special_tokens)
        })
    }

    /// Decodes token ids to text.
    ///
    /// Args:
    ///     ids: Token ids below vocab_size.
    ///     skip_special_tokens: Drop special tokens such as BOS/EOS from the text.
    ///
    /// Returns:
    ///     str
    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, py: Python<'_>, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = to_ids(&ids, self.model.config().vocab_size, "ids")?;
        let model = self.model.clone();
        detached(py, false, None, move |_| {
            model.tokenizer().decode(&ids, skip_special_tokens)
        })
    }

    /// Number of tokens, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.tokenizer().vocab_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={})",
            self.model.tokenizer().vocab_size()
        )
    }
}

enum StreamState {
    Running(Box<Generation>),
    Done(Option<Completion>),
}

/// An iterator of generated text pieces, from `Model.stream`.
///
/// Closing it (or dropping it) stops generation and frees its KV cache.
#[pyclass(name = "TextStream", module = "selfextend_rs", frozen)]
pub struct PyTextStream {
    state: Mutex<StreamState>,
    progress: Option<Py<PyAny>>,
}

#[pymethods]
impl PyTextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let state = &self.state;
        detached(py, false, self.progress.as_ref(), move |check| {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let StreamState::Running(generation) = &mut *state else {
                    return Ok(None);
                };
                match generation.step(check) {
                    // Steps that yield no text (held-back stop prefixes, skipped special
                    // tokens) can run long: Ctrl-C must still reach them.
                    Ok(Some(piece)) if piece.is_empty() => {
                        let at = generation.prompt_len();
                        check(at, at)?;
                    }
                    Ok(Some(piece)) => return Ok(Some(piece)),
                    Ok(None) => {
                        let done = std::mem::replace(&mut *state, StreamState::Done(None));
                        if let StreamState::Running(g) = done {
                            *state = StreamState::Done(Some(g.into_completion()));
                        }
                        return Ok(None);
                    }
                    Err(e) => {
                        *state = StreamState::Done(None);
                        return Err(e);
                    }
                }
            }
        })
    }

    /// Stops generation and frees its memory; iteration then ends.
    fn close(&self, py: Python<'_>) {
        // Another thread's __next__ may hold the lock while it waits for the GIL.
        py.detach(|| {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*state, StreamState::Running(_)) {
                *state = StreamState::Done(None);
            }
        })
    }

    /// The finished Completion once the stream is exhausted, else None.
    #[getter]
    fn completion(&self, py: Python<'_>) -> Option<PyCompletion> {
        let completion = py.detach(|| {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match &*state {
                StreamState::Done(Some(c)) => Some(c.clone()),
                _ => None,
            }
        });
        completion.map(Into::into)
    }
}
