//! One error type for the whole core. The bindings map each variant onto a Python
//! exception class under `merge_fast.MergeError`, so messages must stand alone:
//! they name the file, the tensor and what is wrong.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint file or index that cannot be trusted (bad header, bad offsets, truncated...).
    #[error("invalid checkpoint {file}: {tensor_part}{msg}", tensor_part = tensor_prefix(tensor))]
    InvalidCheckpoint { file: PathBuf, tensor: Option<String>, msg: String },

    /// Inputs that do not line up: missing tensors, shapes or dtypes that differ.
    #[error("tensor mismatch for '{tensor}': {msg}")]
    TensorMismatch { tensor: String, msg: String },

    /// A plan, method or parameter that makes no sense.
    #[error("config error: {0}")]
    Config(String),

    /// A merge produced a non-finite value, or a kernel could not compute.
    #[error("numerical error in tensor '{tensor}': {msg}")]
    Numerical { tensor: String, msg: String },

    /// The caller asked to stop (Ctrl-C, a progress callback that raised).
    #[error("merge interrupted")]
    Interrupted,

    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
}

fn tensor_prefix(t: &Option<String>) -> String {
    match t {
        Some(t) => format!("tensor '{t}': "),
        None => String::new(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn invalid(file: impl Into<PathBuf>, tensor: Option<&str>, msg: impl Into<String>) -> Self {
        Error::InvalidCheckpoint { file: file.into(), tensor: tensor.map(str::to_owned), msg: msg.into() }
    }
    pub fn mismatch(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::TensorMismatch { tensor: tensor.into(), msg: msg.into() }
    }
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
    pub fn numerical(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Numerical { tensor: tensor.into(), msg: msg.into() }
    }
}
