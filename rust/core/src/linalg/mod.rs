//! Dense linear algebra for merges: exact and randomized thin SVD, orthogonal Procrustes,
//! and their batched forms.
//!
//! Public functions take row-major `f32` slices with explicit shapes and return owned,
//! row-major `Vec<f32>`; faer does the work (or system LAPACK for the exact SVD with the
//! `lapack` feature). Everything is computed in f32: faer's and LAPACK's f32 SVDs are
//! backward stable, so singular values carry an absolute error of about `eps * s_max`,
//! which is what numpy's float32 `svd` delivers as well.
//!
//! Parallelism and determinism: each matrix is factored with faer's sequential code path
//! (`Par::Seq`) and batches run in parallel across matrices (rayon `par_iter`). On two
//! cores, whole-matrix parallelism keeps both busy with no synchronization inside the
//! factorization; faer's intra-SVD parallelism measured at most ~1.2x on one 4096x4096
//! matrix here, and its rounding changes with the thread count. So every result is
//! bit-identical whatever the size of the rayon pool, and a batch result equals the
//! single-matrix call.

mod op;
mod procrustes;
mod svd;

pub use op::{AffineMap, LinOp, Minus};

pub use procrustes::{polar, polar_batch, procrustes, procrustes_batch, procrustes_cross, procrustes_faer};
pub use svd::{
    gaussian_matrix, orthonormalize, svd, svd_batch, svd_faer_mat, svd_topk, svd_topk_batch, svd_topk_op, topk_probes, Svd, TopkSvd,
    DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS,
};

use crate::error::{Error, Result};

/// A borrowed row-major `rows x cols` f32 matrix, for the batched entry points.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> MatRef<'a> {
    /// Checks that `data` holds exactly `rows * cols` values.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        check_shape(data, rows, cols, "matrix")?;
        Ok(Self { data, rows, cols })
    }

    /// The same matrix as a faer view (row-major strides).
    pub fn as_faer(&self) -> faer::MatRef<'a, f32> {
        faer::MatRef::from_row_major_slice(self.data, self.rows, self.cols)
    }
}

/// Label used in `Error::numerical` / `Error::mismatch`: these kernels do not know tensor
/// names, callers that do should wrap the error.
pub(crate) const WHAT: &str = "<linalg>";

pub(crate) fn check_shape(data: &[f32], rows: usize, cols: usize, what: &str) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(len) if len == data.len() => Ok(()),
        _ => Err(Error::mismatch(WHAT, format!("{what}: {} values do not make a {rows}x{cols} matrix", data.len()))),
    }
}

pub(crate) fn check_finite(data: &[f32], what: &str) -> Result<()> {
    if data.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::numerical(WHAT, format!("{what} contains NaN or infinite values")))
    }
}

/// Runs `f` over `items` in parallel and returns the results in order; on failure the
/// error of the first failing item (by index), so errors are deterministic too.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> Result<R> + Sync + Send) -> Result<Vec<R>> {
    use rayon::prelude::*;
    let out: Vec<Result<R>> = items.par_iter().with_max_len(1).map(f).collect();
    out.into_iter().collect()
}
