//! The Python exception hierarchy and the one place core errors become Python ones.

use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyUserWarning, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use selfextend_core::Error;

pyo3::create_exception!(
    selfextend_rs,
    SelfExtendError,
    PyException,
    "Base class of every error raised by selfextend_rs."
);
pyo3::create_exception!(
    selfextend_rs,
    ModelLoadError,
    SelfExtendError,
    "A model file or directory is missing, corrupt, inconsistent or unsupported."
);
pyo3::create_exception!(
    selfextend_rs,
    UnsupportedModelError,
    ModelLoadError,
    "The model is of a family, or uses a feature (a RoPE scaling, a config field, a GGUF \
     architecture or tokenizer), that selfextend_rs does not implement; the message names it."
);
pyo3::create_exception!(
    selfextend_rs,
    TokenizerError,
    SelfExtendError,
    "Encoding or decoding text failed."
);
pyo3::create_exception!(
    selfextend_rs,
    OutOfMemoryError,
    SelfExtendError,
    "A request would need more memory than is available; nothing was allocated."
);
pyo3::create_exception!(
    selfextend_rs,
    OverloadedError,
    SelfExtendError,
    "The serving engine's queue is full and the request was not taken; try again later."
);
pyo3::create_exception!(
    selfextend_rs,
    InferenceError,
    SelfExtendError,
    "A tensor operation failed while running the model."
);
pyo3::create_exception!(
    selfextend_rs,
    ContextLengthWarning,
    PyUserWarning,
    "A sequence runs past the context the model (or its SelfExtend setting) covers."
);

static INVALID_ARGUMENT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `InvalidArgumentError(SelfExtendError, ValueError)`: catchable as either.
/// `create_exception!` takes a single base, so this class is built with `type()`.
pub fn invalid_argument_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    INVALID_ARGUMENT
        .get_or_try_init(py, || {
            let bases = PyTuple::new(
                py,
                [
                    py.get_type::<SelfExtendError>(),
                    py.get_type::<PyValueError>(),
                ],
            )?;
            let dict = PyDict::new(py);
            dict.set_item("__module__", "selfextend_rs")?;
            dict.set_item(
                "__doc__",
                "An argument is out of its valid range (also a ValueError).",
            )?;
            let ty = py
                .get_type::<PyType>()
                .call1(("InvalidArgumentError", bases, dict))?;
            Ok(ty.cast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

pub fn invalid_argument(msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::attach(|py| match invalid_argument_type(py) {
        Ok(ty) => PyErr::from_type(ty.clone(), msg),
        Err(e) => e,
    })
}

/// Maps a core error to its Python class; `during_load` turns file-level problems
/// (I/O, config, tokenizer, weights) into `ModelLoadError`.
pub fn to_py(err: Error, during_load: bool) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Io { .. } | Error::Config { .. } | Error::Weights { .. } => {
            ModelLoadError::new_err(msg)
        }
        Error::Unsupported { .. } => UnsupportedModelError::new_err(msg),
        Error::Tokenizer { .. } if during_load => ModelLoadError::new_err(msg),
        Error::Tokenizer { .. } => TokenizerError::new_err(msg),
        Error::InvalidArgument { .. } => invalid_argument(msg),
        Error::OutOfMemory { .. } => OutOfMemoryError::new_err(msg),
        Error::Overloaded { .. } => OverloadedError::new_err(msg),
        Error::Engine { .. } => SelfExtendError::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
        Error::Candle(_) if during_load => ModelLoadError::new_err(msg),
        Error::Candle(_) => InferenceError::new_err(msg),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SelfExtendError", py.get_type::<SelfExtendError>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    m.add(
        "UnsupportedModelError",
        py.get_type::<UnsupportedModelError>(),
    )?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("OutOfMemoryError", py.get_type::<OutOfMemoryError>())?;
    m.add("InferenceError", py.get_type::<InferenceError>())?;
    m.add("OverloadedError", py.get_type::<OverloadedError>())?;
    m.add("InvalidArgumentError", invalid_argument_type(py)?)?;
    m.add(
        "ContextLengthWarning",
        py.get_type::<ContextLengthWarning>(),
    )?;
    Ok(())
}
