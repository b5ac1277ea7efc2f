//! A loaded model: weights, tokenizer and the chunked forward passes built on them.

pub mod decoder;
mod qmatrix;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::attention::{AttentionBackend, AttentionParams, SelfExtend};
use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::loader::gguf::{GgufFile, GgufSource};
use crate::loader::safetensors::SafetensorsSource;
use crate::loader::{LoadCheck, Renamed, TensorSource, Weights};
use crate::memory;
use crate::tokenizer::Tokenizer;
pub use decoder::{BatchLayout, Decoder, LinearCost, LogitsFor, SequenceStep};

/// Prefill chunk length when the caller does not choose one. Bounds a chunk's
/// activations (and the naive backend's `chunk * context` scores per head).
pub const DEFAULT_CHUNK_SIZE: usize = 512;

/// Prefill chunks of at least this many tokens also call the chunk callback between
/// layers (reporting no new position), so an interrupt lands within part of a chunk.
const CHECK_LAYERS_FROM: usize = 64;

/// Called between prefill chunks with `(positions done, positions total)`, and between
/// the layers of long chunks with the positions done before the chunk; an error
/// (typically [`Error::Interrupted`]) stops the computation.
pub type ChunkCallback<'a> = dyn FnMut(usize, usize) -> Result<()> + 'a;

/// A model of a supported family with its tokenizer, ready to run. Immutable: every call owns
/// its own KV cache, so one model may serve many threads at once.
#[derive(Debug, Clone)]
pub struct Model {
    decoder: Decoder,
    tokenizer: Tokenizer,
    source: PathBuf,
    chat: Option<ChatTemplate>,
    quantized: bool,
    /// A cap on the memory one request may plan to use, below what the system has.
    max_memory: Option<usize>,
    /// The attention backend, when not the fastest one for the device.
    attention: Option<AttentionBackend>,
    /// The KV cache's dtype, when not [`Model::kv_cache_dtype`]'s default.
    kv_cache_dtype: Option<DType>,
}

/// A Jinja chat template with the special tokens it may refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// Parses the dtype [`Model::set_kv_cache_dtype`] takes, as [`parse_dtype`] does,
/// with errors naming `kv_cache`.
pub fn parse_kv_cache_dtype(name: &str) -> Result<DType> {
    parse_dtype(name).map_err(|_| {
        Error::invalid(
            "kv_cache",
            format!("unknown KV cache dtype '{name}' (expected 'f32', 'f16' or 'bf16')"),
        )
    })
}

/// Parses `"f32" | "bf16" | "f16"` (and the long `float32`-style names).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        _ => Err(Error::invalid(
            "dtype",
            format!("unknown dtype '{name}' (expected 'f32', 'bf16' or 'f16')"),
        )),
    }
}

/// Parses `"auto"`, `"naive"`, `"tiled"` or `"fused"`; `"auto"` is `None`, the fastest
/// backend for the device.
pub fn parse_attention(name: &str) -> Result<Option<AttentionBackend>> {
    match name.to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "naive" => Ok(Some(AttentionBackend::Naive)),
        "tiled" => Ok(Some(AttentionBackend::TILED)),
        "fused" => Ok(Some(AttentionBackend::Fused)),
        _ => Err(Error::invalid(
            "attention",
            format!(
                "unknown attention backend '{name}' (expected 'auto', 'naive', 'tiled' or 'fused')"
            ),
        )),
    }
}

/// Parses `"cpu"`, `"cuda"`, `"cuda:N"` or `"metal"` into a device this build supports.
pub fn parse_device(name: &str) -> Result<Device> {
    let lower = name.to_ascii_lowercase();
    let (kind, ordinal) = match lower.split_once(':') {
        Some((kind, n)) => {
            let n = n
                .parse::<usize>()
                .map_err(|_| Error::invalid("device", format!("bad device ordinal in '{name}'")))?;
            (kind, n)
        }
        None => (lower.as_str(), 0),
    };
    match kind {
        "cpu" if ordinal == 0 => Ok(Device::Cpu),
        "cuda" | "metal" => {
            let available = match kind {
                "cuda" => candle_core::utils::cuda_is_available(),
                _ => candle_core::utils::metal_is_available(),
            };
            if !available {
                return Err(Error::invalid(
                    "device",
                    format!("'{name}' is not available: this build of selfextend-rs was compiled without {kind} support"),
                ));
            }
            let device = if kind == "cuda" {
                Device::new_cuda(ordinal)
            } else {
                Device::new_metal(ordinal)
            };
            device
                .map_err(|e| Error::invalid("device", format!("'{name}' could not be opened: {e}")))
        }
        _ => Err(Error::invalid(
            "device",
            format!("unknown device '{name}' (expected 'cpu', 'cuda', 'cuda:N' or 'metal')"),
        )),
    }
}

impl Model {
    /// Loads a model from a Hugging Face model directory (`config.json`,
    /// `tokenizer.json`, `model.safetensors` or a sharded index) or a llama.cpp GGUF
    /// file, of any family in [`crate::family`].
    ///
    /// `dtype` is the compute dtype, f32 when `None`. GGUF weights stay quantized when
    /// `dtype` is `None`; naming a dtype dequantizes them into a dense model.
    pub fn load(path: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        Self::load_with_check(path, device, dtype, &|| Ok(()))
    }

    /// [`Model::load`], calling `check` before each tensor loads: a large model takes
    /// a while, and an error from `check` (Ctrl-C) stops it.
    pub fn load_with_check(
        path: &Path,
        device: &Device,
        dtype: Option<DType>,
        check: &LoadCheck<'_>,
    ) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path.is_dir() {
            return Self::load_hf_dir(path, device, dtype, check);
        }
        if is_gguf(path) {
            return Self::load_gguf(path, device, dtype, check);
        }
        Err(Error::Unsupported {
            path: path.to_path_buf(),
            msg: "expected a .gguf file or a model directory holding config.json, tokenizer.json and model.safetensors".into(),
        })
    }

    fn load_hf_dir(
        path: &Path,
        device: &Device,
        dtype: Option<DType>,
        check: &LoadCheck<'_>,
    ) -> Result<Self> {
        let cfg = Config::from_hf_json_file(&path.join("config.json"))?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let source = SafetensorsSource::open_dir(path)?;
        let dtype = dtype.unwrap_or(DType::F32);
        let decoder = match text_model_prefix(&source) {
            Some(rename) => Decoder::load(
                &Weights::new(&Renamed { source, rename }, dtype, device).with_check(check),
                &cfg,
            )?,
            None => Decoder::load(
                &Weights::new(&source, dtype, device).with_check(check),
                &cfg,
            )?,
        };
        let chat = hf_chat_template(path)?;
        Ok(Self {
            decoder,
            tokenizer,
            source: path.to_path_buf(),
            chat,
            quantized: false,
            max_memory: None,
            kv_cache_dtype: None,
            attention: None,
        })
    }

    fn load_gguf(
        path: &Path,
        device: &Device,
        dtype: Option<DType>,
        check: &LoadCheck<'_>,
    ) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let cfg = file.config()?;
        let tokenizer = crate::tokenizer::gguf::from_metadata(&file.metadata, path)?;
        let token = |id: Option<u32>| id.and_then(|id| tokenizer.inner().id_to_token(id));
        let chat = file.chat_template().map(|t| ChatTemplate {
            source: t.to_string(),
            bos_token: token(cfg.bos_token_id),
            eos_token: token(cfg.eos_token_ids.first().copied()),
        });
        let has_blocks = file.tensors.values().any(|t| {
            use candle_core::quantized::GgmlDType as G;
            !matches!(t.dtype, G::F32 | G::F16 | G::BF16)
        });
        let quantized = dtype.is_none() && has_blocks;
        let source = GgufSource::new(file, &cfg, quantized);
        let decoder = Decoder::load(
            &Weights::new(&source, dtype.unwrap_or(DType::F32), device).with_check(check),
            &cfg,
        )?;
        Ok(Self {
            decoder,
            tokenizer,
            source: path.to_path_buf(),
            chat,
            quantized,
            max_memory: None,
            kv_cache_dtype: None,
            attention: None,
        })
    }

    pub fn from_parts(decoder: Decoder, tokenizer: Tokenizer, source: PathBuf) -> Self {
        Self {
            quantized: decoder.is_quantized(),
            decoder,
            tokenizer,
            source,
            chat: None,
            max_memory: None,
            kv_cache_dtype: None,
            attention: None,
        }
    }

    /// The model's chat template, when its files carry one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Whether linear layers run on quantized GGUF blocks.
    pub fn is_quantized(&self) -> bool {
        self.quantized
    }

    pub fn config(&self) -> &Config {
        self.decoder.config()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn dtype(&self) -> DType {
        self.decoder.dtype()
    }

    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// Caps the memory one request may plan to use (KV cache, logits, workspace) at
    /// `bytes`, below whatever the system has available; `None` removes the cap.
    pub fn set_max_memory(&mut self, bytes: Option<usize>) {
        self.max_memory = bytes;
    }

    pub fn max_memory(&self) -> Option<usize> {
        self.max_memory
    }

    /// Runs every call on `backend`; `None` is [`AttentionBackend::for_device`].
    pub fn set_attention_backend(&mut self, backend: Option<AttentionBackend>) {
        self.attention = backend;
    }

    pub fn attention_backend(&self) -> AttentionBackend {
        self.attention
            .unwrap_or_else(|| AttentionBackend::for_device(self.device()))
    }

    /// Stores keys and values in `dtype`; `None` is [`Self::kv_cache_dtype`]'s default.
    pub fn set_kv_cache_dtype(&mut self, dtype: Option<DType>) {
        self.kv_cache_dtype = dtype;
    }

    /// The dtype of the KV cache: f16 for quantized weights on the CPU (half the bytes
    /// decode reads at long context; llama.cpp's default too), else the compute
    /// dtype, unless [`Self::set_kv_cache_dtype`] chose one. An f32 cache is the exact
    /// path the parity tests check.
    pub fn kv_cache_dtype(&self) -> DType {
        self.kv_cache_dtype
            .unwrap_or(match self.quantized && self.device().is_cpu() {
                true => DType::F16,
                false => self.dtype(),
            })
    }

    /// An empty KV cache for this model, in [`Self::kv_cache_dtype`], with room for
    /// `reserve` positions.
    pub fn new_cache(&self, reserve: usize) -> KvCache {
        KvCache::new(
            self.config().num_hidden_layers,
            reserve,
            Some(self.kv_cache_dtype()),
        )
    }

    /// Attention settings for this model (plain or SelfExtend), on the default backend.
    pub fn attention_params(&self, self_extend: Option<SelfExtend>) -> AttentionParams {
        AttentionParams {
            backend: self.attention_backend(),
            ..AttentionParams::new(self.config().head_dim, self_extend)
        }
    }

    /// Attention settings with a per-call RoPE scaling replacing the config's.
    pub fn attention_params_with(
        &self,
        self_extend: Option<SelfExtend>,
        rope_scaling: Option<RopeScaling>,
    ) -> AttentionParams {
        AttentionParams {
            rope_scaling,
            ..self.attention_params(self_extend)
        }
    }

    /// Rejects an empty sequence or ids outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid(
                "prompt",
                "is empty: at least one token is needed",
            ));
        }
        let vocab = self.config().vocab_size;
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::invalid(
                "token_ids",
                format!("id {id} at index {pos} is out of range for a vocabulary of {vocab}"),
            ));
        }
        Ok(())
    }

    /// Fails with [`Error::OutOfMemory`] when a sequence of `positions` tokens, run in
    /// chunks of `chunk`, would not fit in memory, holding the logits `held` says.
    pub fn check_memory(&self, positions: usize, chunk: usize, held: LogitsHeld) -> Result<()> {
        let cfg = self.config();
        let f32_size = 4;
        let (hidden, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        // No budget holds 2^32 rows of activations; the cap keeps the products below
        // in range for any chunk size a caller passes.
        let chunk = chunk.min(positions).clamp(1, 1 << 32);
        let kv_dtype = self.kv_cache_dtype();
        let kv = KvCache::bytes_for(1, cfg.num_hidden_layers, kv_heads, d, kv_dtype);
        // Returned logits live twice for a moment: ours, then the caller's copy.
        let logits = match held {
            LogitsHeld::Every => 2 * f32_size * vocab,
            LogitsHeld::LastRow | LogitsHeld::PerChunk => 0,
        };
        // A chunk's rows of logits, and for scoring their log-softmax and its
        // intermediate, exist together.
        let chunk_logits = f32_size
            * vocab
            * match held {
                LogitsHeld::LastRow => 1,
                LogitsHeld::Every => chunk,
                LogitsHeld::PerChunk => 3 * chunk,
            };
        let attention = match self.attention_params(None).backend {
            // About four f32 (heads, rows, context) score buffers.
            AttentionBackend::Naive => 4 * f32_size * heads * chunk,
            AttentionBackend::Tiled { query_block } => {
                let rows = AttentionBackend::tiled_rows(query_block, heads, positions);
                4 * f32_size * heads * rows.min(chunk)
            }
            // Tile buffers only, plus f32 copies of one layer's keys and values when
            // the cache holds neither f32 nor f16.
            AttentionBackend::Fused if !matches!(kv_dtype, DType::F32 | DType::F16) => {
                2 * f32_size * kv_heads * d
            }
            AttentionBackend::Fused => 0,
        };
        let per_position = kv + logits + attention;
        // One chunk's activations, and the largest weight a quantized layer
        // dequantizes for a prefill chunk.
        let activations = f32_size * chunk * (4 * hidden + 3 * inter + (heads + 2 * kv_heads) * d);
        let dequantized = if self.is_quantized() {
            let lm_head = match held {
                LogitsHeld::LastRow => 0,
                LogitsHeld::Every | LogitsHeld::PerChunk => vocab * hidden,
            };
            f32_size
                * lm_head
                    .max(2 * inter * hidden)
                    .max((heads + 2 * kv_heads) * d * hidden)
        } else {
            0
        };
        memory::ensure_fits(
            activations + chunk_logits + dequantized,
            per_position,
            positions,
            self.max_memory,
        )
    }

    /// Runs `ids` through the model in chunks, appending to `cache`; returns the logits
    /// of the rows `logits_for` selects (over the whole of `ids`), row-major.
    pub fn forward_chunked(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        params: &AttentionParams,
        chunk_size: usize,
        logits_for: LogitsFor,
        on_chunk: &mut ChunkCallback<'_>,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.forward_each_chunk(
            ids,
            cache,
            params,
            chunk_size,
            logits_for,
            on_chunk,
            &mut |logits| {
                out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// [`Model::forward_chunked`], handing each chunk's selected logits,
    /// `(rows, vocab)` f32, to `sink` instead of keeping them all.
    #[allow(clippy::too_many_arguments)]
    fn forward_each_chunk(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        params: &AttentionParams,
        chunk_size: usize,
        logits_for: LogitsFor,
        on_chunk: &mut ChunkCallback<'_>,
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let chunk_size = chunk_size.max(1);
        let total = ids.len();
        let first_row = match logits_for {
            LogitsFor::All => 0,
            LogitsFor::Last => total.saturating_sub(1),
            LogitsFor::From(row) => row.min(total.saturating_sub(1)),
        };
        // Length-dependent RoPE scaling sees the whole prompt in every chunk.
        let params = AttentionParams {
            rope_length: params.rope_length.or(Some(cache.len() + total)),
            ..params.clone()
        };
        for (n, chunk) in ids.chunks(chunk_size).enumerate() {
            let done = n * chunk_size;
            let wanted = done + chunk.len() > first_row;
            // Long chunks also check between layers, so an interrupt lands within a
            // fraction of a chunk; the progress callback sees no new position there.
            let mut between_layers = || -> Result<()> {
                if chunk.len() >= CHECK_LAYERS_FROM {
                    on_chunk(done, total)?;
                }
                Ok(())
            };
            let rows = match wanted {
                true => LogitsFor::From(first_row.saturating_sub(done)),
                false => LogitsFor::Last,
            };
            let logits =
                self.decoder
                    .forward_checked(chunk, cache, &params, rows, &mut between_layers)?;
            if wanted {
                sink(logits.squeeze(0)?)?;
            }
            on_chunk(done + chunk.len(), total)?;
        }
        Ok(())
    }

    /// Logits of every position of `ids`, `ids.len() * vocab_size` f32 values, row-major.
    pub fn logits(
        &self,
        ids: &[u32],
        params: &AttentionParams,
        chunk_size: Option<usize>,
        on_chunk: &mut ChunkCallback<'_>,
    ) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let chunk = resolve_chunk_size(chunk_size)?;
        self.check_memory(ids.len(), chunk, LogitsHeld::Every)?;
        let mut cache = self.new_cache(ids.len());
        self.forward_chunked(ids, &mut cache, params, chunk, LogitsFor::All, on_chunk)
    }

    /// `log p(ids[t] | ids[..t])` for `t` in `from .. ids.len()` (`from >= 1`), with the
    /// log-softmax taken in f32 per chunk, so that scoring a long text keeps only a
    /// chunk of logits at a time.
    pub fn token_logprobs(
        &self,
        ids: &[u32],
        from: usize,
        params: &AttentionParams,
        chunk_size: Option<usize>,
        on_chunk: &mut ChunkCallback<'_>,
    ) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        if from == 0 || from >= ids.len() {
            return Err(Error::invalid(
                "start",
                format!(
                    "must be in [1, {}) for a sequence of {} tokens (the first token has no prediction)",
                    ids.len(),
                    ids.len()
                ),
            ));
        }
        let chunk = resolve_chunk_size(chunk_size)?;
        self.check_memory(ids.len(), chunk, LogitsHeld::PerChunk)?;
        let mut cache = self.new_cache(ids.len());
        // Row `t - 1` predicts token `t`; the last row predicts nothing, so it is not
        // run, but length-dependent RoPE scaling still sees the whole sequence, as in
        // `logits`.
        let scored = &ids[..ids.len() - 1];
        let params = AttentionParams {
            rope_length: params.rope_length.or(Some(ids.len())),
            ..params.clone()
        };
        let mut targets = ids[from..].iter().copied();
        let mut out = Vec::with_capacity(ids.len() - from);
        let mut sink = |logits: Tensor| -> Result<()> {
            let rows = logits.dim(0)?;
            let chunk_targets: Vec<u32> = targets.by_ref().take(rows).collect();
            let index = Tensor::new(chunk_targets.as_slice(), logits.device())?.unsqueeze(1)?;
            let logprobs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
            out.extend(logprobs.gather(&index, 1)?.squeeze(1)?.to_vec1::<f32>()?);
            Ok(())
        };
        self.forward_each_chunk(
            scored,
            &mut cache,
            &params,
            chunk,
            LogitsFor::From(from - 1),
            on_chunk,
            &mut sink,
        )?;
        Ok(out)
    }
}

/// The logits a request holds besides the model's own buffers, for
/// [`Model::check_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsHeld {
    /// The last row only: generation.
    LastRow,
    /// One chunk's rows at a time, with their log-softmax: [`Model::token_logprobs`].
    PerChunk,
    /// Every row, returned to the caller: [`Model::logits`].
    Every,
}

/// `None` is [`DEFAULT_CHUNK_SIZE`]; zero is rejected.
pub fn resolve_chunk_size(chunk_size: Option<usize>) -> Result<usize> {
    match chunk_size {
        None => Ok(DEFAULT_CHUNK_SIZE),
        Some(0) => Err(Error::invalid(
            "chunk_size",
            "must be >= 1 (or None for the default)",
        )),
        Some(n) => Ok(n),
    }
}

/// Where a multimodal checkpoint (Gemma 3 4B and up) keeps its text model:
/// `language_model.model.*` (transformers 4.x) or `model.language_model.*` (5.x).
fn text_model_prefix(source: &SafetensorsSource) -> Option<fn(&str) -> String> {
    const EMBED: &str = "model.embed_tokens.weight";
    if source.contains(EMBED) {
        return None;
    }
    let v4: fn(&str) -> String = |name| format!("language_model.{name}");
    let v5: fn(&str) -> String = |name| match name.strip_prefix("model.") {
        Some(rest) => format!("model.language_model.{rest}"),
        None => name.to_string(),
    };
    [v4, v5]
        .into_iter()
        .find(|rename| source.contains(&rename(EMBED)))
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let has_magic = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    has_magic
        || path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// `chat_template.jinja`, or `chat_template` in `tokenizer_config.json` (a string, or
/// a list of named templates of which "default" is taken).
fn hf_chat_template(dir: &Path) -> Result<Option<ChatTemplate>> {
    let config_path = dir.join("tokenizer_config.json");
    let config: Option<serde_json::Value> = if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        Some(serde_json::from_str(&text).map_err(|e| Error::Config {
            path: config_path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?)
    } else {
        None
    };
    let token = |key: &str| -> Option<String> {
        let v = config.as_ref()?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(|c| c.as_str()))
            .map(str::to_string)
    };
    let jinja = dir.join("chat_template.jinja");
    let source = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
    } else {
        match config.as_ref().and_then(|c| c.get("chat_template")) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        }
    };
    Ok(source.map(|source| ChatTemplate {
        source,
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
    }))
}
