//! Llama-family inference on candle with exact SelfExtend attention (Jin et al., "LLM
//! Maybe LongLM: Self-Extend LLM Context Window Without Tuning", ICML 2024): models run
//! far beyond their trained context, with no fine-tuning.
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
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod loader;
pub mod memory;
pub mod model;
pub mod rope;
pub mod sampling;
pub mod tokenizer;

pub use attention::{AttentionBackend, AttentionParams, SelfExtend};
pub use config::{Config, RopeScaling};
pub use error::{Error, Result};
pub use model::Model;
pub use tokenizer::Tokenizer;
