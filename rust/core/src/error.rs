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

    /// The caller asked to stop.
    #[error("merge interrupted")]
    Interrupted,

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An error raised by the caller's progress callback (in the bindings: the Python
    /// exception itself), carried back unchanged.
    #[error("{0}")]
    Callback(Box<dyn std::error::Error + Send + Sync>),

    /// A panic caught at the API boundary: a bug, never the user's fault.
    #[error("internal error (a bug in merge_fast; please report it with the command that caused it): {0}")]
    Internal(String),
}

fn tensor_prefix(t: &Option<String>) -> String {
    match t {
        Some(t) => format!("tensor '{t}': "),
        None => String::new(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `f`, turning a panic (in this thread or re-raised from a rayon worker, which
/// propagates to the caller of the parallel operation) into `Error::Internal`.
pub fn no_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(Error::Internal(panic_text(&*payload))))
}

pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_owned()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn panics_become_internal_errors_even_inside_rayon() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {})); // keep the test output clean
        let direct = no_panic::<()>(|| panic!("boom {}", 1));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let in_pool = no_panic(|| Ok(pool.install(|| (0..64).into_par_iter().map(|i| if i == 37 { panic!("min > max") } else { i }).sum::<i32>())));
        std::panic::set_hook(hook);
        for (e, want) in [(direct.unwrap_err(), "boom 1"), (in_pool.unwrap_err(), "min > max")] {
            assert!(matches!(&e, Error::Internal(m) if m == want), "{e}");
            assert!(e.to_string().contains("a bug in merge_fast"), "{e}");
        }
        assert_eq!(no_panic(|| Ok(3)).unwrap(), 3);
        assert!(matches!(no_panic::<()>(|| Err(Error::config("x"))), Err(Error::Config(_))));
    }
}
