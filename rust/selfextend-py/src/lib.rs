//! `selfextend_rs._native`: Python bindings for `selfextend-core`.
//!
//! Every entry point converts its Python arguments first, then releases the GIL for
//! all tensor work, re-taking it only between prefill chunks and decode steps to
//! check for Ctrl-C.

mod engine;
mod errors;
mod model;
mod types;

use pyo3::prelude::*;

/// Whether this build has CUDA support (the `cuda` feature, see scripts/build-cuda) and
/// a CUDA device can be opened: what `Model.load(..., device="cuda")` needs.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    candle_core::utils::cuda_is_available()
        && py.detach(|| {
            std::panic::catch_unwind(|| candle_core::Device::new_cuda(0).is_ok()).unwrap_or(false)
        })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    selfextend_core::tune_thread_pools();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    errors::register(m)?;
    m.add_class::<types::PySelfExtend>()?;
    m.add_class::<types::PyRopeScaling>()?;
    m.add_class::<types::PyModelConfig>()?;
    m.add_class::<types::PyCompletion>()?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyTokenizer>()?;
    m.add_class::<model::PyTextStream>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyEngineRequest>()?;
    Ok(())
}
