//! Python bindings: type and error conversion only; all work happens in merge_fast_core
//! with the GIL released.
use pyo3::prelude::*;

mod checkpoint;
mod errors;
mod linalg;
mod merge;
mod specs;
mod subspace;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    checkpoint::register(m)?;
    merge::register(m)?;
    specs::register(m)?;
    linalg::register(m)?;
    subspace::register(m)?;
    Ok(())
}
