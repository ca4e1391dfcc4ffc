//! Linear algebra for Python: exact / randomized top-k SVD and orthogonal Procrustes over
//! stacks of matrices. Inputs are C-contiguous float32 3-D arrays `(batch, rows, cols)`
//! (the Python wrapper adds the batch axis for single matrices); the work runs in
//! `merge_fast_core::linalg` with the GIL released, in parallel across the batch.
use crate::errors::{Failure, Res};
use merge_fast_core::linalg::{self, MatRef};
use merge_fast_core::Error;
use numpy::ndarray::{Array1, Array2, Array3};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::prelude::*;

fn slice3<'a>(a: &'a PyReadonlyArray3<'_, f32>, what: &str) -> Res<(&'a [f32], [usize; 3])> {
    let s = a.shape();
    let shape = [s[0], s[1], s[2]];
    let data = a.as_slice().map_err(|_| Failure::from(Error::config(format!("{what}: array must be C-contiguous float32"))))?;
    Ok((data, shape))
}

fn mats<'a>(data: &'a [f32], [b, m, n]: [usize; 3]) -> Res<Vec<MatRef<'a>>> {
    let step = m * n;
    (0..b).map(|i| MatRef::new(&data[i * step..(i + 1) * step], m, n).map_err(Failure::from)).collect()
}

type SvdOut<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray2<f32>>, Bound<'py, PyArray3<f32>>, Bound<'py, PyArray1<f64>>);

/// SVD of each matrix of a `(batch, m, n)` stack: `(U (batch, m, r), S (batch, r),
/// Vt (batch, r, n), energy (batch,))`. `k=None`: exact thin SVD, `r = min(m, n)`, energy 1.
/// Otherwise randomized top-k (`r = min(k, m, n)`; exact when k is close to full rank) and
/// `energy` is the captured fraction of `||X||_F^2`.
#[pyfunction]
#[pyo3(signature = (x, k=None, oversample=10, power_iters=2, seed=0))]
fn svd_stack<'py>(
    py: Python<'py>,
    x: PyReadonlyArray3<'py, f32>,
    k: Option<usize>,
    oversample: usize,
    power_iters: usize,
    seed: u64,
) -> Res<SvdOut<'py>> {
    let (data, shape) = slice3(&x, "svd")?;
    let [b, m, n] = shape;
    let ms = mats(data, shape)?;
    let res = crate::errors::work(py, || -> Result<(Vec<linalg::Svd>, Vec<f64>), Error> {
        match k {
            None => {
                let s = linalg::svd_batch(&ms)?;
                let e = vec![1.0; s.len()];
                Ok((s, e))
            }
            Some(k) => {
                let t = linalg::svd_topk_batch(&ms, k, oversample, power_iters, seed)?;
                let e = t.iter().map(|t| t.energy).collect();
                Ok((t.into_iter().map(|t| t.svd).collect(), e))
            }
        }
    })?;
    let (svds, energy) = res;
    let r = match k {
        None => m.min(n),
        Some(k) => k.min(m).min(n),
    };
    let mut u = Vec::with_capacity(b * m * r);
    let mut s = Vec::with_capacity(b * r);
    let mut vt = Vec::with_capacity(b * r * n);
    for d in &svds {
        // Every matrix of the stack has the same shape, so the same rank; pad defensively.
        let dr = d.rank();
        if dr == r {
            u.extend_from_slice(&d.u);
            s.extend_from_slice(&d.s);
            vt.extend_from_slice(&d.vt);
        } else {
            for i in 0..m {
                for j in 0..r {
                    u.push(if j < dr { d.u[i * dr + j] } else { 0.0 });
                }
            }
            for j in 0..r {
                s.push(if j < dr { d.s[j] } else { 0.0 });
            }
            for j in 0..r {
                if j < dr {
                    vt.extend_from_slice(&d.vt[j * n..(j + 1) * n]);
                } else {
                    vt.resize(vt.len() + n, 0.0);
                }
            }
        }
    }
    drop(svds);
    let bad = |e: numpy::ndarray::ShapeError| Failure::from(Error::config(format!("svd: {e}")));
    let u = Array3::from_shape_vec((b, m, r), u).map_err(bad)?;
    let s = Array2::from_shape_vec((b, r), s).map_err(bad)?;
    let vt = Array3::from_shape_vec((b, r, n), vt).map_err(bad)?;
    Ok((u.into_pyarray(py), s.into_pyarray(py), vt.into_pyarray(py), Array1::from_vec(energy).into_pyarray(py)))
}

/// Orthogonal Procrustes for each pair of a stack: `A (batch, m, ka)`, `B (batch, m, kb)`
/// -> `R (batch, kb, ka)` minimizing `||A - B R||_F` with `R` (semi-)orthogonal.
#[pyfunction]
fn procrustes_stack<'py>(py: Python<'py>, a: PyReadonlyArray3<'py, f32>, b: PyReadonlyArray3<'py, f32>) -> Res<Bound<'py, PyArray3<f32>>> {
    let (ad, ash) = slice3(&a, "procrustes A")?;
    let (bd, bsh) = slice3(&b, "procrustes B")?;
    if ash[0] != bsh[0] || ash[1] != bsh[1] {
        return Err(Failure::from(Error::config(format!(
            "procrustes: A is {:?} but B is {:?}; they need the same batch size and row count",
            ash, bsh
        ))));
    }
    let am = mats(ad, ash)?;
    let bm = mats(bd, bsh)?;
    let pairs: Vec<_> = am.into_iter().zip(bm).collect();
    let rs = crate::errors::work(py, || linalg::procrustes_batch(&pairs))?;
    let (nb, ka, kb) = (ash[0], ash[2], bsh[2]);
    let mut out = Vec::with_capacity(nb * kb * ka);
    for r in &rs {
        out.extend_from_slice(r);
    }
    drop(rs);
    let out = Array3::from_shape_vec((nb, kb, ka), out).map_err(|e| Failure::from(Error::config(format!("procrustes: {e}"))))?;
    Ok(out.into_pyarray(py))
}

/// `Bᵀ A` (`(kb, ka)`) of `A (m, ka)` and `B (m, kb)`: the cross product whose polar factor
/// is their Procrustes rotation (`polar_stack`).
#[pyfunction]
fn procrustes_cross<'py>(py: Python<'py>, a: PyReadonlyArray2<'py, f32>, b: PyReadonlyArray2<'py, f32>) -> Res<Bound<'py, PyArray2<f32>>> {
    let (ash, bsh) = (a.shape().to_vec(), b.shape().to_vec());
    if ash[0] != bsh[0] {
        return Err(Failure::from(Error::config(format!("procrustes: A has {} rows but B has {}", ash[0], bsh[0]))));
    }
    let contiguous = |what: &str| Failure::from(Error::config(format!("{what}: array must be C-contiguous float32")));
    let (ad, bd) = (a.as_slice().map_err(|_| contiguous("procrustes A"))?, b.as_slice().map_err(|_| contiguous("procrustes B"))?);
    let c = crate::errors::work(py, || linalg::procrustes_cross(ad, bd, ash[0], ash[1], bsh[1]))?;
    let c = Array2::from_shape_vec((bsh[1], ash[1]), c).map_err(|e| Failure::from(Error::config(format!("procrustes: {e}"))))?;
    Ok(c.into_pyarray(py))
}

/// The polar factor `U Vᵀ` (`U S Vᵀ = svd(M)`) of each matrix of a `(batch, kb, ka)` stack.
#[pyfunction]
fn polar_stack<'py>(py: Python<'py>, m: PyReadonlyArray3<'py, f32>) -> Res<Bound<'py, PyArray3<f32>>> {
    let (data, shape) = slice3(&m, "polar M")?;
    let ms = mats(data, shape)?;
    let rs = crate::errors::work(py, || linalg::polar_batch(&ms))?;
    let out = Array3::from_shape_vec((shape[0], shape[1], shape[2]), rs.concat()).map_err(|e| Failure::from(Error::config(format!("polar: {e}"))))?;
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(procrustes_cross, m)?)?;
    m.add_function(wrap_pyfunction!(polar_stack, m)?)?;
    m.add_function(wrap_pyfunction!(svd_stack, m)?)?;
    m.add_function(wrap_pyfunction!(procrustes_stack, m)?)?;
    Ok(())
}
