//! Inference for open LLMs (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) on candle with
//! exact SelfExtend attention (Jin et al., "LLM Maybe LongLM: Self-Extend LLM Context
//! Window Without Tuning", ICML 2024): models run far beyond their trained context,
//! with no fine-tuning.
//!
//! ```no_run
//! use std::sync::Arc;
//! use selfextend_core::{generate::{generate, GenerateOptions}, Model, SelfExtend};
//!
//! let model = Arc::new(Model::load("path/to/llama".as_ref(), &candle_core::Device::Cpu, None)?);
//! let ids = model.tokenizer().encode("Once upon a time", true)?;
//! let opts = GenerateOptions {
//!     max_new_tokens: 32,
//!     self_extend: Some(SelfExtend::new(8, 512)?),
//!     ..Default::default()
//! };
//! let out = generate(&model, ids, opts, &mut |_, _| Ok(()))?;
//! println!("{}", out.text);
//! # Ok::<(), selfextend_core::Error>(())
//! ```

pub mod attention;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod family;
pub mod generate;
pub mod kv_cache;
pub mod loader;
mod math;
pub mod memory;
pub mod model;
mod parallel;
pub mod rope;
pub mod sampling;
pub mod tokenizer;

/// The spin limit [`tune_thread_pools`] gives candle's quantized-matmul workers.
pub const CANDLE_SPIN_LIMIT: u32 = 2000;

/// candle runs quantized matmuls on its own worker pool, whose idle workers spin for
/// 25 000 `pause`s (about a millisecond) before parking. Between two matmuls candle's
/// element-wise ops run on rayon, and on a machine with few cores a spinning worker
/// takes a core from them. On the 2-core CI machine, decoding at 2k context went from
/// 24 to 35 tokens/s with a limit of [`CANDLE_SPIN_LIMIT`] (see `BENCHMARKS.md`), when
/// attention also ran on rayon; it now runs on candle's pool, and the two limits
/// measure alike.
///
/// Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` unless it is already set. candle reads it
/// once, when its pool starts, so call this before the first quantized matmul, at a
/// point where no other thread reads the environment (program or module start).
pub fn tune_thread_pools() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, CANDLE_SPIN_LIMIT.to_string());
    }
}

pub use attention::{AttentionBackend, AttentionParams, SelfExtend};
pub use config::{Config, RopeScaling};
pub use error::{Error, Result};
pub use model::Model;
pub use tokenizer::Tokenizer;
