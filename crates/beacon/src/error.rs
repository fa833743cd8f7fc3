//! Typed errors. Every message names the file/key and what was expected versus found.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BeaconError {
    /// The message already ends with the I/O error's text, so it is not also chained as a source
    /// (error chains would print it twice: "x.gguf: No such file…: No such file…").
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: cannot parse: {message}")]
    Parse { path: String, message: String },
    #[error("{source_name}: `{key}`: expected {expected}, found {found}")]
    Config {
        source_name: String,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{0}")]
    Invalid(String),
    /// The memory plan does not fit (see `memory_plan`): raised before any weight is read.
    #[error("memory plan: {0}")]
    Memory(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = BeaconError> = std::result::Result<T, E>;

impl BeaconError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        BeaconError::Io {
            path: path.display().to_string(),
            error: source,
        }
    }
    pub fn config(source: &str, key: &str, expected: &str, found: &str) -> Self {
        BeaconError::Config {
            source_name: source.to_string(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        BeaconError::Invalid(msg.into())
    }
}
