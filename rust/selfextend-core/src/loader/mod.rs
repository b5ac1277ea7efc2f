//! Weight loading: a source of named tensors, and a prefix-scoped view over it that
//! model code uses the way candle models use a `VarBuilder`.

pub mod gguf;
pub mod safetensors;

use std::collections::HashMap;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Somewhere named tensors come from: checkpoint files, or memory in tests.
pub trait TensorSource: Send + Sync {
    /// Loads `name`, checks it has exactly `shape`, and converts it to `dtype` on `device`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    fn contains(&self, name: &str) -> bool;

    /// The tensor in its quantized form, for sources that keep weights quantized;
    /// `None` means "load it dense".
    fn load_quantized(
        &self,
        _name: &str,
        _shape: &[usize],
        _device: &Device,
    ) -> Result<Option<QTensor>> {
        Ok(None)
    }
}

/// Tensors already in memory, keyed by checkpoint name.
impl TensorSource for HashMap<String, Tensor> {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let err = |msg: String| Error::Weights {
            what: format!("tensor '{name}'"),
            path: "<memory>".into(),
            msg,
        };
        let t = self
            .get(name)
            .ok_or_else(|| err("tensor not found".into()))?;
        if t.dims() != shape {
            return Err(err(format!(
                "expected shape {shape:?}, found {:?}",
                t.dims()
            )));
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

/// A source whose tensors sit under other names: the decoder asks for
/// `model.layers.0...`, a multimodal checkpoint stores its text model under a prefix.
pub struct Renamed<S> {
    pub source: S,
    pub rename: fn(&str) -> String,
}

impl<S: TensorSource> TensorSource for Renamed<S> {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.source.load(&(self.rename)(name), shape, dtype, device)
    }

    fn contains(&self, name: &str) -> bool {
        self.source.contains(&(self.rename)(name))
    }

    fn load_quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<QTensor>> {
        self.source
            .load_quantized(&(self.rename)(name), shape, device)
    }
}

/// A view of a [`TensorSource`] under a name prefix, with the dtype and device that
/// loaded weights take.
#[derive(Clone)]
pub struct Weights<'a> {
    source: &'a dyn TensorSource,
    prefix: String,
    dtype: DType,
    device: &'a Device,
    check: Option<&'a LoadCheck<'a>>,
}

/// Called before each tensor loads; an error (e.g. [`Error::Interrupted`] on Ctrl-C)
/// stops the load with it.
pub type LoadCheck<'a> = dyn Fn() -> Result<()> + 'a;

impl<'a> Weights<'a> {
    pub fn new(source: &'a dyn TensorSource, dtype: DType, device: &'a Device) -> Self {
        Self {
            source,
            prefix: String::new(),
            dtype,
            device,
            check: None,
        }
    }

    /// These weights, calling `check` before each tensor loads.
    pub fn with_check(self, check: &'a LoadCheck<'a>) -> Self {
        Self {
            check: Some(check),
            ..self
        }
    }

    fn checked(&self) -> Result<()> {
        self.check.map_or(Ok(()), |check| check())
    }

    /// The view one level down, e.g. `vb.pp("self_attn").pp("q_proj")`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: self.path(&name.to_string()),
            ..self.clone()
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn get(&self, shape: impl Into<Vec<usize>>, name: &str) -> Result<Tensor> {
        self.checked()?;
        self.source
            .load(&self.path(name), &shape.into(), self.dtype, self.device)
    }

    /// The quantized tensor when the source keeps this weight quantized.
    pub fn get_quantized(
        &self,
        shape: impl Into<Vec<usize>>,
        name: &str,
    ) -> Result<Option<QTensor>> {
        self.checked()?;
        self.source
            .load_quantized(&self.path(name), &shape.into(), self.device)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.path(name))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &'a Device {
        self.device
    }
}
