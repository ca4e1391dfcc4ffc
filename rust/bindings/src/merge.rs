//! Merge entry points: a whole plan (folders in, folder out) and in-memory arrays.
use crate::errors::{Failure, Res};
use merge_fast_core::dtype::Dtype;
use merge_fast_core::engine::{self, Progress};
use merge_fast_core::kernel;
use merge_fast_core::plan::PlanSpec;
use merge_fast_core::reader::Checkpoint;
use merge_fast_core::writer::{OutSpec, ShardedWriter};
use merge_fast_core::{methods, Error};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Res<T> {
    serde_json::from_str(s).map_err(|e| Failure::from(Error::config(format!("invalid {what}: {e}"))))
}

/// Hands the freed bookkeeping of a merge (plan, headers, layout: ~1 KB per tensor, so
/// hundreds of MB on 200k-tensor models) back to the OS: glibc keeps freed small blocks in
/// the process otherwise, and a long-lived Python process would carry them on.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only returns free heap pages to the OS; it touches no live block.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Runs a JSON plan into the existing folder `out_dir`. `progress(done, total, bytes_done,
/// bytes_total)` is called after each tensor on this thread; if it raises (or Ctrl-C
/// arrives) the merge stops and that exception propagates.
#[pyfunction]
#[pyo3(signature = (plan_json, out_dir, threads=None, progress=None))]
fn execute_plan<'py>(
    py: Python<'py>,
    plan_json: &str,
    out_dir: PathBuf,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> Res<Bound<'py, PyDict>> {
    let mut plan: PlanSpec = parse_json("plan", plan_json)?;
    // grown by doubling while parsed: up to twice the space, held for the whole merge
    plan.tensors.shrink_to_fit();
    let result = crate::errors::work(py, || {
        let ckpts = plan.inputs.iter().map(Checkpoint::open).collect::<Result<Vec<_>, _>>()?;
        let pool = kernel::pool(threads)?;
        // Ctrl-C or an exception raised by `progress` stops the merge and travels back as
        // `Error::Callback`, which the conversion to Python re-raises unchanged.
        let mut cb = |p: &Progress| -> Result<(), Error> {
            Python::attach(|py| {
                py.check_signals()
                    .and_then(|_| match &progress {
                        Some(f) => f.call1(py, (p.tensors_done, p.tensors_total, p.bytes_done, p.bytes_total)).map(drop),
                        None => Ok(()),
                    })
                    .map_err(|e| Error::Callback(Box::new(e)))
            })
        };
        engine::run(&plan, &ckpts, &out_dir, &pool, &mut cb)
    });
    drop(plan);
    release_freed_memory();
    let summary = result?;
    let d = PyDict::new(py);
    d.set_item("tensors_written", summary.tensors_written)?;
    d.set_item("bytes_read", summary.bytes_read)?;
    d.set_item("bytes_written", summary.bytes_written)?;
    d.set_item("files", summary.files)?;
    d.set_item("notes", summary.notes)?;
    Ok(d)
}

/// The output layout of a JSON plan, checked exactly as `execute_plan` checks it, without
/// writing: `{"shards": [(file, [tensor names], data bytes)], "index": text or None}`.
#[pyfunction]
fn plan_layout<'py>(py: Python<'py>, plan_json: &str) -> Res<Bound<'py, PyDict>> {
    let mut plan: PlanSpec = parse_json("plan", plan_json)?;
    plan.tensors.shrink_to_fit();
    let (specs, shards, index) = py.detach(|| {
        let ckpts = plan.inputs.iter().map(Checkpoint::open).collect::<Result<Vec<_>, _>>()?;
        engine::layout(&plan, &ckpts)
    })?;
    let d = PyDict::new(py);
    let rows: Vec<(String, Vec<String>, u64)> =
        shards.into_iter().map(|s| (s.file, s.tensors.iter().map(|&t| specs[t].name.to_string()).collect(), s.data_bytes)).collect();
    d.set_item("shards", rows)?;
    d.set_item("index", index)?;
    Ok(d)
}

/// Merges flat float32 arrays of `shape` with a named method; returns a flat float32 array.
#[pyfunction]
#[pyo3(signature = (method, params_json, shape, base, inputs, seed=0, tensor="array", threads=None))]
#[allow(clippy::too_many_arguments)]
fn merge_arrays<'py>(
    py: Python<'py>,
    method: &str,
    params_json: &str,
    shape: Vec<usize>,
    base: Option<PyReadonlyArray1<'py, f32>>,
    inputs: Vec<PyReadonlyArray1<'py, f32>>,
    seed: u64,
    tensor: &str,
    threads: Option<usize>,
) -> Res<Bound<'py, PyArray1<f32>>> {
    let params: serde_json::Map<String, serde_json::Value> = parse_json("parameters", params_json)?;
    let merger = merge_fast_core::error::no_panic(|| methods::build(method, &params, inputs.len(), base.is_some()))?;
    let base_s = base.as_ref().map(contiguous).transpose()?;
    let input_s = inputs.iter().map(contiguous).collect::<Res<Vec<_>>>()?;
    let out = crate::errors::work(py, || {
        let pool = kernel::pool(threads)?;
        kernel::merge_arrays(merger.as_ref(), tensor, &shape, seed, base_s, &input_s, &pool)
    })?;
    Ok(PyArray1::from_vec(py, out))
}

fn contiguous<'a>(a: &'a PyReadonlyArray1<'_, f32>) -> Res<&'a [f32]> {
    a.as_slice().map_err(|_| Failure::from(Error::config("arrays must be contiguous float32")))
}

/// Writes float32 arrays to one safetensors file, each rounded to its dtype.
/// `tensors`: list of (name, flat float32 array, shape, dtype name).
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
fn save_file(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, PyReadonlyArray1<'_, f32>, Vec<usize>, String)>,
    metadata: Option<BTreeMap<String, String>>,
) -> Res<()> {
    let mut specs = Vec::with_capacity(tensors.len());
    let mut data = Vec::with_capacity(tensors.len());
    for (name, arr, shape, dtype) in &tensors {
        let dt = Dtype::parse(dtype)
            .filter(|d| d.writable())
            .ok_or_else(|| Failure::from(Error::config(format!("tensor '{name}': cannot write dtype '{dtype}'"))))?;
        let vals = contiguous(arr)?;
        if vals.len() != shape.iter().product::<usize>() {
            return Err(Failure::from(Error::mismatch(name.as_str(), format!("{} values for shape {shape:?}", vals.len()))));
        }
        specs.push(OutSpec::new(name.clone(), dt, shape.clone()));
        data.push(vals);
    }
    let mut meta = metadata.unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    crate::errors::work(py, || {
        let w = ShardedWriter::create_file(&path, specs, &meta)?;
        let mut bytes = Vec::new();
        for (i, vals) in data.iter().enumerate() {
            let dt = w.specs()[i].dtype;
            bytes.resize(vals.len() * dt.size(), 0);
            merge_fast_core::dtype::encode_f32(dt, vals, &mut bytes);
            w.write(i, 0, &bytes)?;
        }
        w.finish().map(drop)
    })
    .map_err(Failure::from)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(execute_plan, m)?)?;
    m.add_function(wrap_pyfunction!(merge_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(plan_layout, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    Ok(())
}
