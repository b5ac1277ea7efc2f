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
use crate::config::Config;
use crate::error::{Error, Result};
use crate::family::{self, GgufLayout};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;

/// Block types whose candle CPU dot product has no SIMD path (see `load_quantized`).
/// On the CPU, Q4_1 and Q5_0 (like Q4_0, Q8_0 and Q4_K) run on our own kernel instead
/// (`model/qmatrix.rs`).
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
            let len = (elems / block)
                .checked_mul(dtype.type_size() as u64)
                .ok_or_else(|| format!("tensor '{name}' has an invalid shape {ne:?}"))?;
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

    /// The model configuration from the `{arch}.*` and `tokenizer.ggml.*` keys, read
    /// by the family of `general.architecture`.
    pub fn config(&self) -> Result<Config> {
        let arch = self.required("general.architecture", "a string", |v| {
            v.as_str().map(str::to_string)
        })?;
        let family = family::for_gguf_arch(&arch).ok_or_else(|| Error::Unsupported {
            path: self.path.clone(),
            msg: format!(
                "architecture '{arch}' is not supported (supported: {})",
                family::supported_gguf_archs()
            ),
        })?;
        let cfg = (family.from_gguf)(&ArchMetadata {
            file: self,
            arch: &arch,
        })?;
        cfg.validate().map_err(|msg| self.config_err(msg))?;
        Ok(cfg)
    }

    /// How the family of `general.architecture` stores its weights.
    pub(crate) fn layout(&self) -> Option<GgufLayout> {
        let arch = self.get("general.architecture")?.as_str()?;
        Some(family::for_gguf_arch(arch)?.gguf)
    }

    /// The chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template").and_then(Value::as_str)
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }
}

/// A GGUF file's metadata under one architecture's `{arch}.` prefix, as the family
/// files read it.
pub(crate) struct ArchMetadata<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl ArchMetadata<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub fn err(&self, msg: String) -> Error {
        self.file.config_err(msg)
    }

    pub fn unsupported(&self, msg: String) -> Error {
        Error::Unsupported {
            path: self.file.path.clone(),
            msg,
        }
    }

    pub fn required_usize(&self, k: &str) -> Result<usize> {
        self.file.required_usize(&self.key(k))
    }

    /// `{arch}.k` as a positive integer, when present.
    pub fn usize(&self, k: &str) -> Result<Option<usize>> {
        let key = self.key(k);
        match self.file.get(&key) {
            None => Ok(None),
            Some(_) => self.file.required_usize(&key).map(Some),
        }
    }

    /// `{arch}.k` where 0 (or absence) means "none", as llama.cpp writes a missing
    /// sliding window.
    pub fn usize_or_zero(&self, k: &str) -> Result<Option<usize>> {
        let key = self.key(k);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| (n > 0).then_some(n as usize))
                .ok_or_else(|| {
                    self.err(format!(
                        "metadata key '{key}' should be an integer, found {v:?}"
                    ))
                }),
        }
    }

    /// Which of `layers` slide: `{arch}.attention.sliding_window_pattern` as a bool per
    /// layer or as a period `P` (layer `l` slides unless `l % P == P - 1`), else the
    /// period `default`, as llama.cpp's `set_swa_pattern` reads it.
    pub fn sliding_pattern(&self, layers: usize, default: usize) -> Result<Vec<bool>> {
        let key = self.key("attention.sliding_window_pattern");
        let period =
            |p: usize| -> Vec<bool> { (0..layers).map(|l| p == 0 || l % p < p - 1).collect() };
        match self.file.get(&key) {
            None => Ok(period(default)),
            Some(Value::Array(flags)) if flags.len() == layers => flags
                .iter()
                .map(|f| {
                    f.as_bool()
                        .ok_or_else(|| self.err(format!("'{key}' must hold bools")))
                })
                .collect(),
            Some(v) => match v.as_u64() {
                Some(p) => Ok(period(p as usize)),
                None => Err(self.err(format!(
                    "metadata key '{key}' should be a period or one bool per layer, found {v:?}"
                ))),
            },
        }
    }

    pub fn f64(&self, k: &str) -> Result<Option<f64>> {
        let key = self.key(k);
        match self.file.get(&key) {
            None => Ok(None),
            Some(_) => self
                .file
                .required(&key, "a number", Value::as_f64)
                .map(Some),
        }
    }

    pub fn required_f64(&self, k: &str) -> Result<f64> {
        let key = self.key(k);
        let v = self.file.required(&key, "a number", Value::as_f64)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(self.err(format!("metadata key '{key}' must be > 0, got {v}")));
        }
        Ok(v)
    }

    pub fn str(&self, k: &str) -> Result<Option<&str>> {
        let key = self.key(k);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata key '{key}' should be a string, found {v:?}"
                ))
            }),
        }
    }

    /// `{arch}.vocab_size`, or the length of `tokenizer.ggml.tokens`.
    pub fn vocab_size(&self) -> Result<usize> {
        if self.file.get(&self.key("vocab_size")).is_some() {
            return self.required_usize("vocab_size");
        }
        self.file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len)
            .ok_or_else(|| {
                self.err(format!(
                    "missing '{}' and 'tokenizer.ggml.tokens'",
                    self.key("vocab_size")
                ))
            })
    }

    pub fn token_id(&self, key: &str) -> Option<u32> {
        self.file
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.file.tensors.contains_key(name)
    }

    /// The values of a small 1-D tensor (RoPE factors), when the file has it.
    pub fn tensor_values(&self, name: &str) -> Result<Option<Vec<f64>>> {
        let Some(info) = self.file.tensors.get(name) else {
            return Ok(None);
        };
        let err = |msg: String| Error::Weights {
            what: format!("tensor '{name}'"),
            path: self.file.path.clone(),
            msg,
        };
        if info.dims.len() != 1 {
            return Err(err(format!(
                "expected one dimension, found {:?}",
                info.dims
            )));
        }
        let q = qtensor_from_ggml(
            info.dtype,
            &aligned_copy(self.file.bytes(info)),
            info.dims.clone(),
            &Device::Cpu,
        )
        .map_err(|e| err(e.to_string()))?;
        let values = q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
        Ok(Some(values.into_iter().map(f64::from).collect()))
    }
}

/// Serves a GGUF file's tensors under Hugging Face names, converted back to Hugging
/// Face conventions, so both formats share one decoder:
///
/// - llama.cpp's converter permutes the rows of `q_proj`/`k_proj` (weights and biases)
///   of the `llama` arch so its interleaved RoPE can be used; we undo that;
/// - it stores Gemma's norm weights as `1 + w`; we subtract the one again.
pub struct GgufSource {
    file: GgufFile,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layout: GgufLayout,
    sandwich_norms: bool,
    keep_quantized: bool,
}

impl GgufSource {
    pub fn new(file: GgufFile, cfg: &Config, keep_quantized: bool) -> Self {
        let layout = file.layout().unwrap_or(GgufLayout::PERMUTED);
        Self {
            file,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layout,
            sandwich_norms: cfg.block.sandwich_norms,
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

    fn gguf_name(&self, hf_name: &str) -> Option<String> {
        family::gguf_name(hf_name, self.sandwich_norms)
    }

    /// The tensor as a `QTensor`, rows restored to Hugging Face order.
    fn qtensor(&self, hf_name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let name = self
            .gguf_name(hf_name)
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
        let rows = shape[0];
        let (q_rows, kv_rows) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        // Row ranges that llama.cpp permuted: q and k, alone or inside a fused qkv.
        let permuted: &[(usize, usize)] = match () {
            _ if !self.layout.permute_qk => &[],
            _ if hf_name.contains("self_attn.q_proj") => &[(0, rows)],
            _ if hf_name.contains("self_attn.k_proj") => &[(0, rows)],
            _ if hf_name.contains("self_attn.qkv_proj") => &[(0, q_rows), (q_rows, kv_rows)],
            _ => &[],
        };
        let mut bytes = aligned_copy(raw);
        let row_bytes = info.len / rows.max(1);
        for &(start, len) in permuted {
            let range = start * row_bytes..(start + len) * row_bytes;
            let restored = unpermute_rows(&raw[range.clone()], len, row_bytes, self.head_dim);
            bytes.as_mut()[range].copy_from_slice(&restored);
        }
        qtensor_from_ggml(info.dtype, &bytes, shape.to_vec(), device)
            .map_err(|e| self.err(&name, e.to_string()))
    }

    fn is_norm(hf_name: &str) -> bool {
        hf_name.ends_with("norm.weight")
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

impl AsMut<[u8]> for AlignedBytes {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `aligned_copy`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
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
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| self.err(name, e.to_string()))?;
        if self.layout.norm_offset != 0.0 && Self::is_norm(name) {
            t = (t - f64::from(self.layout.norm_offset))?;
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|n| self.file.tensors.contains_key(&n))
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
        let info = self.gguf_name(name).and_then(|n| self.file.tensors.get(&n));
        match info {
            Some(info)
                if !matches!(
                    info.dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                ) =>
            {
                let q = self.qtensor(name, shape, &Device::Cpu)?;
                let own_kernel =
                    matches!(info.dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0) && device.is_cpu();
                let q = if SCALAR_ONLY.contains(&info.dtype) && !own_kernel {
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
