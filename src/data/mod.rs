//! Everything about tokens on disk: raw-text inputs, shard I/O, tokenizers, `prepare`, and the
//! windows that training and eval read.

mod columnar;
pub mod inputs;
mod json_field;
pub mod loader;
pub mod mixture;
pub mod prepare;
pub mod records;
pub mod shards;
pub mod tokenizer;

pub use loader::{Batch, EvalStream, TrainLoader};
pub use mixture::{Mixture, ValSource};
pub use shards::Shard;
pub use tokenizer::Tokenizer;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Shard { path: PathBuf, message: String },
    #[error("glob {pattern:?}: {message}")]
    Glob { pattern: String, message: String },
    #[error("{what} hold fewer than {needed} tokens (one window of seq_len + 1)")]
    TooShort { needed: usize, what: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A record (or file) `prepare` or `tokenizer train` could not read, under
    /// `--on-bad-record fail` or for a corrupt file by default.
    #[error("{location}: {message}")]
    BadRecord { location: String, message: String },
    /// A problem with the shards of one `[[data.sources]]` entry, named by `key`.
    #[error("{key}: {inner}")]
    Source { key: String, inner: Box<DataError> },
    #[error("{0}")]
    Invalid(String),
}

impl From<crate::run_dir::RunDirError> for DataError {
    fn from(e: crate::run_dir::RunDirError) -> DataError {
        match e {
            crate::run_dir::RunDirError::Io { path, error } => DataError::Io { path, error },
            e => DataError::Invalid(e.to_string()),
        }
    }
}

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> DataError {
        DataError::Io { path: path.to_path_buf(), error: source }
    }
}
