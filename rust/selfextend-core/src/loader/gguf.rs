//! GGUF files (llama.cpp's format): a bounds-checked reader for the header, metadata
//! and tensor table, and a [`TensorSource`] that serves the weights under their
//! Hugging Face names, quantized (for `QMatMul`) or dequantized.
//!
//! The reader never trusts a length or count from the file: each is checked against
//! the bytes that remain before anything is allocated.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::TensorSource;
use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;

/// Block types whose candle CPU dot product has no SIMD path (see `load_quantized`).
const SCALAR_ONLY: [GgmlDType; 4] = [
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_1,
];

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v as i64),
            Self::I16(v) => Some(v as i64),
            Self::I32(v) => Some(v as i64),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor table, with dims in candle (row-major) order.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    /// Byte range of the data within the file.
    pub start: usize,
    pub len: usize,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> ParseResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "truncated file: {what} needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long: bounded by what remains.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> ParseResult<usize> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(format!(
                "{what} is {n}, more than the {} remaining bytes can hold",
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> ParseResult<String> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> ParseResult<Value> {
        let what = || format!("value of '{key}'");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what())?[0]),
            1 => Value::I8(self.array::<1>(&what())?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => Value::U32(self.u32(&what())?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{} is a bool byte of {b}", what())),
            },
            8 => Value::String(self.string(&what())?),
            9 => {
                if depth > 0 {
                    return Err(format!(
                        "{} is a nested array, which GGUF does not allow",
                        what()
                    ));
                }
                let item_ty = self.u32(&what())?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 1,
                };
                let n = self.count(&format!("length of '{key}'"), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(&what())?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            other => return Err(format!("'{key}' has unknown value type {other}")),
        })
    }
}

fn ggml_dtype(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; the file is assumed not to change while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let parsed = Self::parse(&mmap).map_err(|msg| Error::Weights {
            what: "the GGUF header".into(),
            path: path.to_path_buf(),
            msg,
        })?;
        let (version, metadata, tensors) = parsed;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        buf: &[u8],
    ) -> ParseResult<(u32, BTreeMap<String, Value>, HashMap<String, TensorInfo>)> {
        let mut c = Cursor { buf, pos: 0 };
        let magic = c
            .take(4, "the magic number")
            .map_err(|_| "not a GGUF file: too short".to_string())?;
        if magic != MAGIC {
            return Err(format!(
                "not a GGUF file: magic is {magic:?}, expected \"GGUF\""
            ));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (expected 2 or 3)"
            ));
        }
        // A tensor-table entry takes at least 8 (name) + 4 + 8 + 4 + 8 bytes.
        let n_tensors = c.count("the tensor count", 32)?;
        let n_kv = c.count("the metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32(&format!("the type of '{key}'"))?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&format!("the rank of '{name}'"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor '{name}' has {n_dims} dimensions (expected 1 to {MAX_DIMS})"
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("the shape of '{name}'"))?);
            }
            let code = c.u32(&format!("the type of '{name}'"))?;
            let dtype = ggml_dtype(code)
                .ok_or_else(|| format!("tensor '{name}' has unknown or unsupported type {code}"))?;
            let offset = c.u64(&format!("the offset of '{name}'"))?;
            infos.push((name, dims, dtype, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(format!(
                "general.alignment is {alignment}, expected a power of two"
            ));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = HashMap::with_capacity(infos.len());
        for (name, ne, dtype, offset) in infos {
            let elems = ne
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("tensor '{name}' has an invalid shape {ne:?}"))?;
            let block = dtype.block_size() as u64;
            if ne[0] % block != 0 {
                return Err(format!(
                    "tensor '{name}': row length {} is not a multiple of the {dtype:?} block size {block}",
                    ne[0]
                ));
            }
            let len = elems / block * dtype.type_size() as u64;
            if offset % alignment != 0 {
                return Err(format!("tensor '{name}' is misaligned (offset {offset})"));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= buf.len() as u64 => {
                    let dims = ne.iter().rev().map(|&d| d as usize).collect();
                    let info = TensorInfo {
                        dtype,
                        dims,
                        start: start as usize,
                        len: len as usize,
                    };
                    if tensors.insert(name.clone(), info).is_some() {
                        return Err(format!("tensor '{name}' appears twice"));
                    }
                }
                _ => {
                    return Err(format!(
                        "truncated file: tensor '{name}' needs bytes up to {} but the file has {}",
                        end.map_or("overflow".to_string(), |e| e.to_string()),
                        buf.len()
                    ))
                }
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn config_err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg,
        }
    }

    fn required<T>(&self, key: &str, what: &str, f: impl Fn(&Value) -> Option<T>) -> Result<T> {
        match self.metadata.get(key) {
            None => Err(self.config_err(format!("missing metadata key '{key}'"))),
            Some(v) => f(v).ok_or_else(|| {
                self.config_err(format!(
                    "metadata key '{key}' should be {what}, found {v:?}"
                ))
            }),
        }
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        let v = self.required(key, "a positive integer", |v| v.as_u64())?;
        usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| {
            self.config_err(format!("metadata key '{key}' must be positive, got {v}"))
        })
    }

    /// The model configuration from the `{arch}.*` and `tokenizer.ggml.*` keys.
    pub fn config(&self) -> Result<Config> {
        let arch = self.required("general.architecture", "a string", |v| {
            v.as_str().map(str::to_string)
        })?;
        if arch != "llama" {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                msg: format!("architecture '{arch}' is not supported (expected 'llama')"),
            });
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden_size = self.required_usize(&key("embedding_length"))?;
        let num_attention_heads = self.required_usize(&key("attention.head_count"))?;
        let num_key_value_heads = match self.get(&key("attention.head_count_kv")) {
            Some(_) => self.required_usize(&key("attention.head_count_kv"))?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.config_err(format!(
                "head_count ({num_attention_heads}) must be a multiple of head_count_kv ({num_key_value_heads})"
            )));
        }
        let head_dim = match self.get(&key("attention.key_length")) {
            Some(_) => self.required_usize(&key("attention.key_length"))?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(self.config_err(format!(
                    "embedding_length ({hidden_size}) is not divisible by head_count ({num_attention_heads})"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.config_err(format!("head dimension {head_dim} must be even for RoPE")));
        }
        if let Some(rot) = self
            .get(&key("rope.dimension_count"))
            .and_then(Value::as_u64)
        {
            if rot as usize != head_dim {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    msg: format!("partial rotary embeddings (rope.dimension_count {rot} != head dim {head_dim}) are not supported"),
                });
            }
        }
        if self.tensors.contains_key("rope_freqs.weight") {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                msg: "per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are not supported".into(),
            });
        }
        let rope_scaling = match self.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => None,
            Some("linear") => {
                let factor =
                    self.required(&key("rope.scaling.factor"), "a number", Value::as_f64)?;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(
                        self.config_err(format!("rope.scaling.factor must be > 0, got {factor}"))
                    );
                }
                Some(RopeScaling::Linear { factor })
            }
            Some(other) => {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    msg: format!(
                        "RoPE scaling '{other}' is not supported (expected none or linear)"
                    ),
                })
            }
        };
        let tokens = self
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len);
        let vocab_size = match self.get(&key("vocab_size")) {
            Some(_) => self.required_usize(&key("vocab_size"))?,
            None => tokens.ok_or_else(|| {
                self.config_err("missing 'llama.vocab_size' and 'tokenizer.ggml.tokens'".into())
            })?,
        };
        let token_id = |k: &str| {
            self.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let rope_theta = self
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let rms_norm_eps = self
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5);
        Ok(Config {
            vocab_size,
            hidden_size,
            intermediate_size: self.required_usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.required_usize(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.required_usize(&key("context_length"))?,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            attention_bias: self.tensors.contains_key("blk.0.attn_q.bias"),
            mlp_bias: self.tensors.contains_key("blk.0.ffn_up.bias"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        })
    }

    /// The chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template").and_then(Value::as_str)
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }
}

/// Maps a Hugging Face Llama tensor name to its GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
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
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{module}.{param}"))
}

/// Serves a GGUF file's tensors under Hugging Face names.
///
/// llama.cpp's converter permutes the rows of `q_proj`/`k_proj` (weights and biases)
/// so its interleaved RoPE can be used; we undo that permutation on load, so GGUF and
/// safetensors models share one RoPE layout and one attention path.
pub struct GgufSource {
    file: GgufFile,
    num_heads: usize,
    num_kv_heads: usize,
    keep_quantized: bool,
}

impl GgufSource {
    pub fn new(file: GgufFile, cfg: &Config, keep_quantized: bool) -> Self {
        Self {
            file,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            keep_quantized,
        }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn err(&self, name: &str, msg: String) -> Error {
        Error::Weights {
            what: format!("tensor '{name}'"),
            path: self.file.path.clone(),
            msg,
        }
    }

    /// The tensor as a `QTensor`, rows restored to Hugging Face order.
    fn qtensor(&self, hf_name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let name = gguf_name(hf_name)
            .ok_or_else(|| self.err(hf_name, "no GGUF equivalent for this tensor".into()))?;
        let info =
            self.file.tensors.get(&name).ok_or_else(|| {
                self.err(&name, format!("tensor not found (needed for '{hf_name}')"))
            })?;
        if info.dims != shape {
            return Err(self.err(
                &name,
                format!("expected shape {shape:?}, found {:?}", info.dims),
            ));
        }
        let raw = self.file.bytes(info);
        let heads = if hf_name.contains("self_attn.q_proj") {
            Some(self.num_heads)
        } else if hf_name.contains("self_attn.k_proj") {
            Some(self.num_kv_heads)
        } else {
            None
        };
        let wrap = |e: candle_core::Error| self.err(&name, e.to_string());
        match heads {
            None => qtensor_from_ggml(info.dtype, &aligned_copy(raw), shape.to_vec(), device)
                .map_err(wrap),
            Some(heads) => {
                let rows = shape[0];
                let row_bytes = info.len / rows;
                let head_dim = rows / heads;
                let permuted = unpermute_rows(raw, rows, row_bytes, head_dim);
                qtensor_from_ggml(info.dtype, &permuted, shape.to_vec(), device).map_err(wrap)
            }
        }
    }
}

/// `parts` stacked along their rows (the first dimension) into one quantized matrix,
/// or `None` when they differ in block type or row length, or are not on the CPU.
pub(crate) fn concat_rows(parts: &[&QTensor]) -> Result<Option<QTensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let (dtype, cols) = (first.dtype(), first.shape().dims().get(1).copied());
    let alike = parts.iter().all(|q| {
        q.dtype() == dtype && q.shape().rank() == 2 && q.shape().dims().get(1).copied() == cols
    });
    if !alike || !first.device().is_cpu() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    let mut rows = 0;
    for q in parts {
        bytes.extend_from_slice(&q.data()?);
        rows += q.shape().dims()[0];
    }
    let cols = cols.unwrap_or(0);
    let expected = rows * cols / dtype.block_size() * dtype.type_size();
    if bytes.len() != expected {
        return Ok(None);
    }
    Ok(Some(qtensor_from_ggml(
        dtype,
        &aligned_copy(&bytes),
        vec![rows, cols],
        &Device::Cpu,
    )?))
}

/// A copy of `bytes` in an 8-byte aligned buffer: candle reads the data as blocks of
/// f16/f32 fields.
fn aligned_copy(bytes: &[u8]) -> AlignedBytes {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: the u64 buffer has at least bytes.len() bytes and u8 has no alignment needs.
    let view =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len()) };
    view.copy_from_slice(bytes);
    AlignedBytes {
        words,
        len: bytes.len(),
    }
}

struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl std::ops::Deref for AlignedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: as in `aligned_copy`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Undoes llama.cpp's q/k permutation: within each head, GGUF row `2 * i + s` holds
/// Hugging Face row `s * head_dim / 2 + i`.
fn unpermute_rows(raw: &[u8], rows: usize, row_bytes: usize, head_dim: usize) -> AlignedBytes {
    let mut out = aligned_copy(raw);
    let half = head_dim / 2;
    // SAFETY: `out` owns `raw.len()` bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(out.words.as_mut_ptr() as *mut u8, out.len) };
    for row in 0..rows {
        let (head, r) = (row / head_dim, row % head_dim);
        let (s, i) = (r / half, r % half);
        let src_row = head * head_dim + 2 * i + s;
        dst[row * row_bytes..][..row_bytes]
            .copy_from_slice(&raw[src_row * row_bytes..][..row_bytes]);
    }
    out
}

impl TensorSource for GgufSource {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let q = self.qtensor(name, shape, &Device::Cpu)?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| self.err(name, e.to_string()))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|n| self.file.tensors.contains_key(&n))
    }

    fn load_quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<QTensor>> {
        if !self.keep_quantized {
            return Ok(None);
        }
        let info = gguf_name(name).and_then(|n| self.file.tensors.get(&n));
        match info {
            Some(info)
                if !matches!(
                    info.dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                ) =>
            {
                let q = self.qtensor(name, shape, &Device::Cpu)?;
                let q = if SCALAR_ONLY.contains(&info.dtype) {
                    // candle has SIMD dot products for Q4_0, Q8_0 and the K-quants only;
                    // these blocks (32 values, like Q8_0) would run on a scalar loop.
                    // Re-quantizing to Q8_0 costs 1.7x the memory of Q4_1 and adds an
                    // error far below the 4/5-bit one already there.
                    let dense = q.dequantize(&Device::Cpu)?;
                    QTensor::quantize(&dense, GgmlDType::Q8_0)?
                } else {
                    q
                };
                Ok(Some(match device {
                    Device::Cpu => q,
                    _ => QTensor::quantize(
                        &q.dequantize(&Device::Cpu)?.to_device(device)?,
                        q.dtype(),
                    )?,
                }))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").unwrap(),
            "blk.12.attn_output.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_proj.bias").unwrap(),
            "blk.0.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").unwrap(),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.x.mlp.up_proj.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        // The converter: w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2).
        let (heads, hd) = (2, 8);
        let hf: Vec<u8> = (0..(heads * hd) as u8).collect();
        let mut gguf = vec![0u8; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    gguf[h * hd + i * 2 + s] = hf[h * hd + s * hd / 2 + i];
                }
            }
        }
        assert_eq!(&*unpermute_rows(&gguf, heads * hd, 1, hd), hf.as_slice());
    }

    #[test]
    fn rejects_bad_headers() {
        let err = |b: &[u8]| GgufFile::parse(b).err().unwrap();
        assert!(err(b"GGU").contains("too short"));
        assert!(err(b"GGML\x03\0\0\0").contains("magic"));
        assert!(err(b"GGUF\x01\0\0\0").contains("version 1"));
        let mut huge = b"GGUF\x03\0\0\0".to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        assert!(err(&huge).contains("tensor count"));
    }
}
