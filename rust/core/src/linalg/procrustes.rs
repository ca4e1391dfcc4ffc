//! Orthogonal Procrustes (Schönemann 1966): `R = argmin_{RᵀR = I} ||A - B R||_F = U Vᵀ`
//! with `U S Vᵀ = svd(Bᵀ A)`.
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, Par};

use super::svd::exact_rowmajor;
use super::{check_finite, check_shape, par_map, MatRef};
use crate::error::{Error, Result};

/// Orthogonal Procrustes for row-major `A` (`m x ka`) and `B` (`m x kb`): returns the
/// row-major `kb x ka` matrix `R` minimizing `||A - B R||_F` subject to `R` having
/// orthonormal columns (`kb >= ka`) or orthonormal rows (`kb < ka`); for `ka == kb` it is
/// orthogonal. When `Bᵀ A` is rank-deficient the minimizer is not unique; the SVD still
/// supplies complete orthonormal singular vectors, so `R` is still (semi-)orthogonal.
pub fn procrustes(a: &[f32], b: &[f32], m: usize, ka: usize, kb: usize) -> Result<Vec<f32>> {
    check_shape(a, m, ka, "procrustes A")?;
    check_shape(b, m, kb, "procrustes B")?;
    check_finite(a, "procrustes A")?;
    check_finite(b, "procrustes B")?;
    let am = faer::MatRef::from_row_major_slice(a, m, ka);
    let bm = faer::MatRef::from_row_major_slice(b, m, kb);
    let r = procrustes_faer(am, bm, Par::Seq)?;
    let mut out = vec![0.0f32; kb * ka];
    MatMut::from_row_major_slice_mut(&mut out, kb, ka).copy_from(&r);
    Ok(out)
}

/// [`procrustes`] over a batch of `(A, B)` pairs, in parallel across pairs.
pub fn procrustes_batch(pairs: &[(MatRef<'_>, MatRef<'_>)]) -> Result<Vec<Vec<f32>>> {
    par_map(pairs, |(a, b)| {
        if a.rows != b.rows {
            return Err(Error::mismatch(super::WHAT, format!("procrustes: A has {} rows but B has {}", a.rows, b.rows)));
        }
        procrustes(a.data, b.data, a.rows, a.cols, b.cols)
    })
}

/// faer-level Procrustes: `R` (`kb x ka`) for `A` (`m x ka`) and `B` (`m x kb`).
/// Inputs are assumed finite (the slice API [`procrustes`] checks).
pub fn procrustes_faer(a: faer::MatRef<'_, f32>, b: faer::MatRef<'_, f32>, par: Par) -> Result<Mat<f32>> {
    if a.nrows() != b.nrows() {
        return Err(Error::mismatch(super::WHAT, format!("procrustes: A has {} rows but B has {}", a.nrows(), b.nrows())));
    }
    let (ka, kb) = (a.ncols(), b.ncols());
    let mut r = Mat::<f32>::zeros(kb, ka);
    if ka == 0 || kb == 0 {
        return Ok(r);
    }
    // Bᵀ A (kb x ka) row-major is (Aᵀ B) column-major: build it so, for `exact_rowmajor`,
    // which dispatches to LAPACK with the `lapack` feature.
    let mut cross = vec![0.0f32; kb * ka];
    matmul(MatMut::from_column_major_slice_mut(&mut cross, ka, kb), Accum::Replace, a.transpose(), b, 1.0, par);
    let d = exact_rowmajor(&cross, kb, ka, par)?;
    let rank = d.rank();
    matmul(
        r.as_mut(),
        Accum::Replace,
        faer::MatRef::from_row_major_slice(&d.u, kb, rank),
        faer::MatRef::from_row_major_slice(&d.vt, rank, ka),
        1.0,
        par,
    );
    Ok(r)
}
