use std::path::PathBuf;

/// Everything that can go wrong in `selfextend-core`.
///
/// Variants are coarse on purpose: each maps to one Python exception class, and the
/// message carries the context (file, field, tensor, argument) a user needs to act.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `config.json` (or another metadata source) is malformed or inconsistent.
    #[error("invalid model config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// The checkpoint is for a model family or feature we do not implement.
    #[error("unsupported model {path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },

    /// A weight file is corrupt, or a tensor is missing or has the wrong shape or dtype.
    #[error("while loading {what} from {path}: {msg}")]
    Weights {
        what: String,
        path: PathBuf,
        msg: String,
    },

    /// `tokenizer.json` could not be loaded, or encoding/decoding failed.
    #[error("tokenizer error ({context}): {msg}")]
    Tokenizer { context: String, msg: String },

    /// A caller-supplied argument is out of its valid range.
    #[error("invalid argument `{name}`: {msg}")]
    InvalidArgument { name: &'static str, msg: String },

    /// An allocation (KV cache, workspace) would not fit in the memory budget.
    #[error("out of memory: {msg}")]
    OutOfMemory { msg: String },

    /// The engine's queue is full; the request was not taken.
    #[error("overloaded: {msg}")]
    Overloaded { msg: String },

    /// The serving engine cannot take or finish requests: its thread could not start,
    /// it has stopped, or a step hit a bug. Not the request's fault.
    #[error("engine error: {msg}")]
    Engine { msg: String },

    /// The caller asked to stop (Ctrl-C, a closed stream).
    #[error("interrupted")]
    Interrupted,

    /// A tensor operation failed at run time.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn invalid(name: &'static str, msg: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name,
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The message carried by a panic caught with `std::panic::catch_unwind`.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}
