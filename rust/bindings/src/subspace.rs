//! Subspace masks: streamed SVDs of instruction-tuning deltas, written as safetensors.
use crate::errors::Res;
use merge_fast_core::dtype::Dtype;
use merge_fast_core::kernel;
use merge_fast_core::reader::Checkpoint;
use merge_fast_core::subspace;
use merge_fast_core::writer::{OutSpec, ShardedWriter};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Writes `<name>.U` (out x r) and `<name>.V` (in x r) float32 tensors for every tensor in
/// `names` to the file `out`; returns {name: (rank, energy, exact)}.
#[pyfunction]
#[pyo3(signature = (it_path, pt_path, names, rank, out, seed=0, threads=None, metadata=None))]
#[allow(clippy::too_many_arguments)]
fn subspace_masks<'py>(
    py: Python<'py>,
    it_path: PathBuf,
    pt_path: PathBuf,
    names: Vec<String>,
    rank: usize,
    out: PathBuf,
    seed: u64,
    threads: Option<usize>,
    metadata: Option<BTreeMap<String, String>>,
) -> Res<Bound<'py, PyDict>> {
    let masks = crate::errors::work(py, || -> merge_fast_core::Result<_> {
        let it = Checkpoint::open(&it_path)?;
        let pt = Checkpoint::open(&pt_path)?;
        let pool = kernel::pool(threads)?;
        let masks = pool.install(|| subspace::subspace_masks(&it, &pt, &names, rank, seed))?;
        let mut specs = Vec::new();
        for m in &masks {
            specs.push(OutSpec::new(format!("{}.U", m.name), Dtype::F32, vec![m.rows, m.rank]));
            specs.push(OutSpec::new(format!("{}.V", m.name), Dtype::F32, vec![m.cols, m.rank]));
        }
        let mut meta = metadata.unwrap_or_default();
        meta.insert("format".into(), "pt".into());
        let energy: BTreeMap<&str, f64> = masks.iter().map(|m| (m.name.as_str(), m.energy)).collect();
        meta.insert("energy".into(), serde_json::to_string(&energy).expect("floats serialize"));
        meta.insert("rank".into(), rank.to_string());
        let w = ShardedWriter::create_file(&out, specs, &meta)?;
        let mut bytes = Vec::new();
        for (i, m) in masks.iter().enumerate() {
            for (j, vals) in [&m.u, &m.v].into_iter().enumerate() {
                bytes.resize(vals.len() * 4, 0);
                merge_fast_core::dtype::encode_f32(Dtype::F32, vals, &mut bytes);
                w.write(2 * i + j, 0, &bytes)?;
            }
        }
        w.finish()?;
        Ok(masks)
    })?;
    let d = PyDict::new(py);
    for m in masks {
        d.set_item(m.name, (m.rank, m.energy, m.exact))?;
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(subspace_masks, m)?)
}
