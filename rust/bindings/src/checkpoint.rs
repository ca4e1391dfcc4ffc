//! `Checkpoint`: a validated, memory-mapped view of a safetensors model for Python, used by
//! the planner to list tensors and by tools to read one tensor at a time.
use crate::errors::Res;
use merge_fast_core::reader;
use numpy::PyArray1;
use pyo3::prelude::*;
use std::collections::BTreeMap;

#[pyclass(module = "merge_fast._core", frozen)]
pub struct Checkpoint {
    inner: reader::Checkpoint,
}

#[pymethods]
impl Checkpoint {
    #[new]
    fn new(py: Python<'_>, path: std::path::PathBuf) -> Res<Self> {
        let inner = crate::errors::work(py, || reader::Checkpoint::open(&path))?;
        Ok(Checkpoint { inner })
    }

    #[getter]
    fn root(&self) -> std::path::PathBuf {
        self.inner.root().to_path_buf()
    }

    /// Tensor names in file order.
    fn names(&self) -> Vec<String> {
        self.inner.names().map(str::to_owned).collect()
    }

    /// `[(name, dtype, shape)]` in file order; dtype is the safetensors name ("BF16").
    fn tensors(&self) -> Vec<(String, String, Vec<usize>)> {
        self.inner.infos().iter().map(|i| (i.name.to_string(), format!("{:?}", i.raw_dtype), i.shape.to_vec())).collect()
    }

    fn __len__(&self) -> usize {
        self.inner.names().len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.info(name).is_some()
    }

    /// The first shard's `__metadata__`.
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.metadata()
    }

    /// One tensor widened to float32 (flat; reshape with its shape).
    fn read_f32<'py>(&self, py: Python<'py>, name: &str) -> Res<Bound<'py, PyArray1<f32>>> {
        let info = self.inner.get(name)?;
        let mut out = vec![0f32; info.numel()];
        crate::errors::work(py, || {
            let r = self.inner.read_f32(info, 0..info.numel(), &mut out);
            // Callers read tensor by tensor: drop the mapped pages so RSS stays flat.
            self.inner.release(info);
            r
        })?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// The sum of one tensor's entries in float64, read in parallel (fisher_dampened's layer
    /// means); the same value for any number of threads.
    fn sum(&self, py: Python<'_>, name: &str) -> Res<f64> {
        let info = self.inner.get(name)?;
        Ok(crate::errors::work(py, || {
            let r = merge_fast_core::methods::data_aware::fisher_dampened::entry_sum(&self.inner, info);
            self.inner.release(info);
            r
        })?)
    }

    fn __repr__(&self) -> String {
        format!("Checkpoint({:?}, {} tensors)", self.inner.root(), self.inner.names().len())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Checkpoint>()?;
    Ok(())
}
