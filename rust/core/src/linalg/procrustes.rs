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
    if ka == 0 || kb == 0 {
        return Ok(Mat::<f32>::zeros(kb, ka));
    }
    polar_faer(&cross_product(a, b, par), kb, ka, par)
}

/// `Bᵀ A` (row-major `kb x ka`) for row-major `A` (`m x ka`) and `B` (`m x kb`): the matrix
/// whose polar factor is their Procrustes rotation. Fits that share `A` (one anchor, several
/// donors) take their products one at a time and their polar factors together
/// ([`polar_batch`]); `polar(procrustes_cross(A, B))` is [`procrustes`] bit for bit.
pub fn procrustes_cross(a: &[f32], b: &[f32], m: usize, ka: usize, kb: usize) -> Result<Vec<f32>> {
    check_shape(a, m, ka, "procrustes A")?;
    check_shape(b, m, kb, "procrustes B")?;
    check_finite(a, "procrustes A")?;
    check_finite(b, "procrustes B")?;
    if ka == 0 || kb == 0 {
        return Ok(vec![0.0; ka * kb]);
    }
    Ok(cross_product(faer::MatRef::from_row_major_slice(a, m, ka), faer::MatRef::from_row_major_slice(b, m, kb), Par::Seq))
}

/// The polar factor `U Vᵀ` of row-major `M` (`kb x ka`, `U S Vᵀ = svd(M)`), row-major.
pub fn polar(m: &[f32], kb: usize, ka: usize) -> Result<Vec<f32>> {
    check_shape(m, kb, ka, "polar M")?;
    check_finite(m, "polar M")?;
    let mut out = vec![0.0f32; kb * ka];
    if ka > 0 && kb > 0 {
        MatMut::from_row_major_slice_mut(&mut out, kb, ka).copy_from(polar_faer(m, kb, ka, Par::Seq)?);
    }
    Ok(out)
}

/// [`polar`] of each matrix, in parallel across them.
pub fn polar_batch(mats: &[MatRef<'_>]) -> Result<Vec<Vec<f32>>> {
    par_map(mats, |m| polar(m.data, m.rows, m.cols))
}

fn polar_faer(cross: &[f32], kb: usize, ka: usize, par: Par) -> Result<Mat<f32>> {
    let d = exact_rowmajor(cross, kb, ka, par)?;
    let rank = d.rank();
    let mut r = Mat::<f32>::zeros(kb, ka);
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

/// Rows from which [`cross_product`] splits its sum in two.
const SPLIT_ROWS: usize = 4096;

/// `Bᵀ A` (`kb x ka` row-major, i.e. `Aᵀ B` column-major). Over many rows (an embedding's
/// 32k) as the sum of the two halves' products, computed side by side: the halves are fixed,
/// so the sum is the same for any number of threads (a 1.1B model's fit: 2.7 s on one core).
fn cross_product(a: faer::MatRef<'_, f32>, b: faer::MatRef<'_, f32>, par: Par) -> Vec<f32> {
    let (m, ka, kb) = (a.nrows(), a.ncols(), b.ncols());
    let product = |a: faer::MatRef<'_, f32>, b: faer::MatRef<'_, f32>| {
        let mut c = vec![0.0f32; ka * kb];
        matmul(MatMut::from_column_major_slice_mut(&mut c, ka, kb), Accum::Replace, a.transpose(), b, 1.0, par);
        c
    };
    if m < SPLIT_ROWS {
        return product(a, b);
    }
    let h = m / 2;
    let (mut c, c2) = rayon::join(|| product(a.subrows(0, h), b.subrows(0, h)), || product(a.subrows(h, m - h), b.subrows(h, m - h)));
    c.iter_mut().zip(&c2).for_each(|(x, &y)| *x += y);
    c
}
