//! Memory-mapped `.safetensors` checkpoints, single-file or sharded through
//! `model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::TensorSource;
use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// Every tensor of a checkpoint, indexed by name; data stays in the page cache until
/// a tensor is loaded.
pub struct SafetensorsSource {
    files: Vec<MappedFile>,
    by_name: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let weights_err = |msg: String| Error::Weights {
                what: "the shard index".into(),
                path: index.clone(),
                msg,
            };
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| weights_err(format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| weights_err("missing object field `weight_map`".into()))?;
            let mut shards = BTreeSet::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    weights_err(format!("`weight_map.{name}` must be a file name"))
                })?;
                if Path::new(file).components().count() != 1 {
                    return Err(weights_err(format!(
                        "`weight_map.{name}` must name a file in the model directory, got '{file}'"
                    )));
                }
                shards.insert(file.to_string());
            }
            let paths: Vec<PathBuf> = shards.iter().map(|f| dir.join(f)).collect();
            return Self::open_files(&paths);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in the model directory"),
            ),
        ))
    }

    /// Maps and validates every file; a tensor name may appear in only one of them.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut by_name = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; like every mmap-based loader we assume the
            // checkpoint is not truncated or rewritten while the model is alive.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
                    what: "the safetensors header".into(),
                    path: path.clone(),
                    msg: format!("corrupt or truncated file: {e}"),
                })?;
            let idx = files.len();
            for name in metadata.offset_keys() {
                if let Some(&other) = by_name.get(&name) {
                    let other: &MappedFile = &files[other];
                    return Err(Error::Weights {
                        what: format!("tensor '{name}'"),
                        path: path.clone(),
                        msg: format!("also present in {}", other.path.display()),
                    });
                }
                by_name.insert(name, idx);
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(Self { files, by_name })
    }

    /// The files backing this source, for error messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!("{} safetensors shards", many.len()),
        }
    }
}

fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

impl TensorSource for SafetensorsSource {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(&idx) = self.by_name.get(name) else {
            return Err(Error::Weights {
                what: format!("tensor '{name}'"),
                path: self.describe().into(),
                msg: "tensor not found in the checkpoint".into(),
            });
        };
        let file = &self.files[idx];
        let err = |msg: String| Error::Weights {
            what: format!("tensor '{name}'"),
            path: file.path.clone(),
            msg,
        };
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| err("tensor not found in the header".into()))?;
        if info.shape != shape {
            return Err(err(format!(
                "expected shape {shape:?}, found {:?}",
                info.shape
            )));
        }
        let stored = candle_dtype(info.dtype).ok_or_else(|| {
            err(format!(
                "dtype {:?} is not supported (expected F32, F16 or BF16)",
                info.dtype
            ))
        })?;
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let tensor = Tensor::from_raw_buffer(bytes, stored, shape, &Device::Cpu)
            .map_err(|e| err(e.to_string()))?;
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}
