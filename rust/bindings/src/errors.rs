//! The Python exception hierarchy, one class per core error variant, and the conversion of
//! core errors into it (`Failure`: binding functions return `Res<T>`, so `?` converts a core
//! error and passes a Python exception through).
use merge_fast_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(merge_fast, MergeError, PyException, "Base class of every merge_fast error.");
create_exception!(merge_fast, InvalidCheckpoint, MergeError, "A checkpoint file or index is malformed, truncated or inconsistent.");
create_exception!(merge_fast, TensorMismatch, MergeError, "Inputs do not line up: a tensor is missing or its shape differs.");
create_exception!(merge_fast, ConfigError, MergeError, "A method, parameter, plan or config is invalid.");
create_exception!(merge_fast, NumericalError, MergeError, "A merge produced non-finite values or a kernel failed to converge.");
create_exception!(merge_fast, MergeInterrupted, MergeError, "The merge was interrupted.");

/// An error on its way to Python: a core error mapped onto its exception class, or a Python
/// exception (raised by a callback, or by a conversion) passed through unchanged.
pub struct Failure(PyErr);

pub type Res<T> = Result<T, Failure>;

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        Failure(match e {
            Error::InvalidCheckpoint { .. } => InvalidCheckpoint::new_err(msg),
            Error::TensorMismatch { .. } => TensorMismatch::new_err(msg),
            Error::Config(_) => ConfigError::new_err(msg),
            Error::Numerical { .. } => NumericalError::new_err(msg),
            Error::Interrupted => MergeInterrupted::new_err(msg),
            Error::Io { .. } => MergeIOError::new_err(msg),
            Error::Internal(_) => MergeError::new_err(msg),
            // the exception a progress callback raised, as it was raised
            Error::Callback(inner) => match inner.downcast::<PyErr>() {
                Ok(e) => *e,
                Err(other) => MergeError::new_err(other.to_string()),
            },
        })
    }
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure(e)
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> Self {
        f.0
    }
}

/// Runs core work with the GIL released; a panic anywhere inside (rayon workers included)
/// comes back as an `Error::Internal`, never as pyo3's PanicException.
pub fn work<T: Send>(py: Python<'_>, f: impl FnOnce() -> merge_fast_core::Result<T> + Send) -> merge_fast_core::Result<T> {
    py.detach(|| merge_fast_core::error::no_panic(f))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MergeError", py.get_type::<MergeError>())?;
    m.add("InvalidCheckpoint", py.get_type::<InvalidCheckpoint>())?;
    m.add("TensorMismatch", py.get_type::<TensorMismatch>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("NumericalError", py.get_type::<NumericalError>())?;
    m.add("MergeIOError", MergeIOError::type_object(py))?;
    m.add("MergeInterrupted", py.get_type::<MergeInterrupted>())?;
    Ok(())
}

/// `MergeIOError(MergeError, OSError)`: an I/O failure is also an `OSError`, as Python's
/// own are (`create_exception!` takes one base, so the class is made with `type()`).
pub struct MergeIOError;

use pyo3::types::{PyDict, PyTuple, PyType};

impl MergeIOError {
    /// The class, made once per interpreter.
    pub fn type_object(py: Python<'_>) -> &Bound<'_, PyType> {
        static TYPE: pyo3::sync::PyOnceLock<Py<PyType>> = pyo3::sync::PyOnceLock::new();
        TYPE.get_or_init(py, || {
            let bases = PyTuple::new(py, [py.get_type::<MergeError>(), py.get_type::<pyo3::exceptions::PyOSError>()]).expect("a tuple of two types");
            let ns = PyDict::new(py);
            ns.set_item("__doc__", "Reading or writing a file failed (missing file, full disk...).").expect("a str key");
            ns.set_item("__module__", "merge_fast").expect("a str key");
            let t = py.get_type::<PyType>().call1(("MergeIOError", bases, ns)).expect("type() makes the class");
            t.cast_into::<PyType>().expect("type() returns a type").unbind()
        })
        .bind(py)
    }

    pub fn new_err(msg: String) -> PyErr {
        Python::attach(|py| PyErr::from_type(Self::type_object(py).clone(), msg))
    }
}
