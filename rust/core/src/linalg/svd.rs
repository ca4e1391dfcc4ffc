//! Exact thin SVD (faer, or LAPACK `sgesdd` with the `lapack` feature) and randomized
//! top-k SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 + 5.1).
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_scratch;
use faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_with_conj;
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor as qr;
use faer::linalg::svd::{self as fsvd, ComputeSvdVectors};
use faer::{Accum, Conj, Mat, MatMut, Par};

use super::{check_finite, check_shape, par_map, LinOp, MatRef, WHAT};
use crate::error::{Error, Result};

pub const DEFAULT_OVERSAMPLE: usize = 10;
pub const DEFAULT_POWER_ITERS: usize = 2;

/// Thin SVD `X = U diag(s) Vt` of an `m x n` matrix, `r` components kept.
/// `u` is `m x r` and `vt` is `r x n`, both row-major; `s` is descending.
/// Signs are fixed so that the largest-magnitude entry of each column of `u` is positive
/// (as sklearn's `svd_flip`), which makes backends and runs agree.
#[derive(Clone, Debug, PartialEq)]
pub struct Svd {
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    pub vt: Vec<f32>,
    pub m: usize,
    pub n: usize,
}

/// Result of [`svd_topk`]: the top-k SVD and the fraction of `||X||_F^2` it captures,
/// `sum(s_i^2, i < k) / ||X||_F^2` (1.0 for a zero matrix: nothing is lost).
#[derive(Clone, Debug, PartialEq)]
pub struct TopkSvd {
    pub svd: Svd,
    pub energy: f64,
    /// True when the request was close enough to full rank that the exact SVD was used.
    pub exact: bool,
}

impl Svd {
    /// Number of components kept.
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// Keeps the leading `k` components (no-op if `k >= rank`).
    pub fn truncate(&mut self, k: usize) {
        let r = self.rank();
        if k >= r {
            return;
        }
        // u is row-major m x r: repack each row's first k entries.
        for i in 0..self.m {
            self.u.copy_within(i * r..i * r + k, i * k);
        }
        self.u.truncate(self.m * k);
        self.s.truncate(k);
        self.vt.truncate(k * self.n);
    }

    /// `U diag(s) Vt` as a row-major `m x n` matrix.
    pub fn reconstruct(&self) -> Vec<f32> {
        let (m, n, r) = (self.m, self.n, self.rank());
        let mut us = self.u.clone();
        for row in us.chunks_exact_mut(r.max(1)).take(m) {
            for (x, s) in row.iter_mut().zip(&self.s) {
                *x *= s;
            }
        }
        let mut out = vec![0.0f32; m * n];
        if r > 0 {
            matmul(
                MatMut::from_row_major_slice_mut(&mut out, m, n),
                Accum::Replace,
                faer::MatRef::from_row_major_slice(&us, m, r),
                faer::MatRef::from_row_major_slice(&self.vt, r, n),
                1.0,
                Par::Seq,
            );
        }
        out
    }

    fn empty(m: usize, n: usize) -> Self {
        Svd { u: Vec::new(), s: Vec::new(), vt: Vec::new(), m, n }
    }

    /// Flip component signs so the largest-|.| entry of each column of `u` is positive.
    fn normalize_signs(&mut self) {
        let r = self.rank();
        for j in 0..r {
            let mut best = 0.0f32;
            for i in 0..self.m {
                let v = self.u[i * r + j];
                if v.abs() > best.abs() {
                    best = v;
                }
            }
            if best < 0.0 {
                for i in 0..self.m {
                    self.u[i * r + j] = -self.u[i * r + j];
                }
                for v in &mut self.vt[j * self.n..(j + 1) * self.n] {
                    *v = -*v;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Exact SVD

/// Exact thin SVD of the row-major `m x n` matrix `x`.
pub fn svd(x: &[f32], m: usize, n: usize) -> Result<Svd> {
    check_shape(x, m, n, "svd input")?;
    check_finite(x, "svd input")?;
    exact_rowmajor(x, m, n, Par::Seq)
}

/// [`svd`] over a batch, in parallel across matrices; results in input order.
pub fn svd_batch(mats: &[MatRef<'_>]) -> Result<Vec<Svd>> {
    par_map(mats, |a| svd(a.data, a.rows, a.cols))
}

/// Exact SVD of a checked row-major matrix through the configured backend.
pub(crate) fn exact_rowmajor(x: &[f32], m: usize, n: usize, par: Par) -> Result<Svd> {
    if m == 0 || n == 0 {
        return Ok(Svd::empty(m, n));
    }
    #[cfg(feature = "lapack")]
    let mut out = {
        let _ = par;
        lapack_backend::sgesdd(x, m, n)?
    };
    #[cfg(not(feature = "lapack"))]
    let mut out = exact_faer(x, m, n, par)?;
    out.normalize_signs();
    Ok(out)
}

/// faer thin SVD of a faer matrix: `(U, s, V)` with `U` `m x r`, `V` `n x r`.
/// Exposed for callers that already hold faer matrices; unlike [`svd`] it does not
/// check for NaN/inf (faer then fails to converge or returns garbage).
pub fn svd_faer_mat(a: faer::MatRef<'_, f32>, par: Par) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let (m, n) = a.shape();
    let r = m.min(n);
    let mut u = Mat::<f32>::zeros(m, r);
    let mut v = Mat::<f32>::zeros(n, r);
    let mut s = faer::diag::Diag::<f32>::zeros(r);
    let thin = ComputeSvdVectors::Thin;
    let mut buf = MemBuffer::new(fsvd::svd_scratch::<f32>(m, n, thin, thin, par, Default::default()));
    fsvd::svd(a, s.as_mut(), Some(u.as_mut()), Some(v.as_mut()), par, MemStack::new(&mut buf), Default::default())
        .map_err(|e| Error::numerical(WHAT, format!("SVD did not converge ({e:?})")))?;
    let s = s.column_vector().iter().copied().collect();
    Ok((u, s, v))
}

#[cfg_attr(feature = "lapack", allow(dead_code))]
fn exact_faer(x: &[f32], m: usize, n: usize, par: Par) -> Result<Svd> {
    // The row-major X is the column-major Xᵀ (n x m), faer's preferred layout.
    // Xᵀ = P S Qᵀ gives X = Q S Pᵀ: U = Q, and P (column-major n x r) is Vt row-major.
    let xt = faer::MatRef::from_column_major_slice(x, n, m);
    let (p, s, q) = svd_faer_mat(xt, par)?;
    let r = s.len();
    let mut vt = vec![0.0f32; r * n];
    MatMut::from_column_major_slice_mut(&mut vt, n, r).copy_from(&p);
    let mut u = vec![0.0f32; m * r];
    MatMut::from_row_major_slice_mut(&mut u, m, r).copy_from(&q);
    Ok(Svd { u, s, vt, m, n })
}

#[cfg(feature = "lapack")]
mod lapack_backend {
    use super::Svd;
    use crate::error::{Error, Result};
    use crate::linalg::WHAT;

    // lapack-sys only declares the Fortran symbols; Debian's libopenblas provides them.
    #[link(name = "openblas")]
    extern "C" {}

    /// `sgesdd` on the column-major view Xᵀ (n x m) of the row-major X: with
    /// Xᵀ = P S Qᵀ, LAPACK's column-major P (n x r) is Vt row-major and its Qᵀ (r x m)
    /// is U row-major, so no transposes are needed.
    pub(super) fn sgesdd(x: &[f32], m: usize, n: usize) -> Result<Svd> {
        let r = m.min(n);
        let too_big = |_| Error::config(format!("{m}x{n} matrix too large for LAPACK (i32)"));
        let (mi, ni, ri): (i32, i32, i32) = (n.try_into().map_err(too_big)?, m.try_into().map_err(too_big)?, r.try_into().map_err(too_big)?);
        let mut a = x.to_vec(); // sgesdd destroys its input
        let mut s = vec![0.0f32; r];
        let mut vt = vec![0.0f32; n * r]; // LAPACK's U (n x r)
        let mut u = vec![0.0f32; r * m]; // LAPACK's VT (r x m)
        let mut iwork = vec![0i32; 8 * r];
        let mut info = 0i32;
        // SAFETY (both calls): buffers are sized for jobz = 'S' with these leading
        // dimensions: A n x m (lda = n), U n x r (ldu = n), VT r x m (ldvt = r), 8r iwork.
        let mut query = [0.0f32];
        unsafe { lapack::sgesdd(b'S', mi, ni, &mut a, mi, &mut s, &mut vt, mi, &mut u, ri, &mut query, -1, &mut iwork, &mut info) };
        if info != 0 {
            let msg = format!("sgesdd workspace query failed (info={info})");
            return Err(Error::numerical(WHAT, msg));
        }
        // The size comes back as an f32 and can round down for large problems: pad it.
        let lwork = (query[0] as f64 * 1.01) as usize + 64;
        let mut work = vec![0.0f32; lwork];
        let lwork_i: i32 = lwork.try_into().map_err(too_big)?;
        unsafe { lapack::sgesdd(b'S', mi, ni, &mut a, mi, &mut s, &mut vt, mi, &mut u, ri, &mut work, lwork_i, &mut iwork, &mut info) };
        if info != 0 {
            // info > 0: the divide-and-conquer iteration did not converge.
            return Err(Error::numerical(WHAT, format!("sgesdd failed (info={info})")));
        }
        Ok(Svd { u, s, vt, m, n })
    }
}

// ---------------------------------------------------------------------------------------
// Randomized top-k SVD

/// Top-`k` SVD of the row-major `m x n` matrix `x` by randomized range finding:
/// `l = k + oversample` Gaussian probes (seeded, counter-based: identical for any thread
/// count), `power_iters` subspace iterations re-orthonormalized by QR each half-step, then
/// the exact SVD of the small `l x n` projection. Falls back to the exact SVD when `2l`
/// reaches `min(m, n)` (randomization would not save work). `k` is capped at `min(m, n)`.
pub fn svd_topk(x: &[f32], m: usize, n: usize, k: usize, oversample: usize, power_iters: usize, seed: u64) -> Result<TopkSvd> {
    check_shape(x, m, n, "svd_topk input")?;
    check_finite(x, "svd_topk input")?;
    if k == 0 {
        return Err(Error::config("svd_topk: k must be at least 1"));
    }
    topk(x, m, n, k, oversample, power_iters, seed, Par::Seq)
}

/// [`svd_topk`] over a batch, in parallel across matrices; every matrix uses the same
/// `seed`, so each result equals the single-matrix call.
pub fn svd_topk_batch(mats: &[MatRef<'_>], k: usize, oversample: usize, power_iters: usize, seed: u64) -> Result<Vec<TopkSvd>> {
    par_map(mats, |a| svd_topk(a.data, a.rows, a.cols, k, oversample, power_iters, seed))
}

/// The probes [`svd_topk`] takes for the top `k` of an `m x n` matrix, `min(k, r) + oversample`
/// capped at `r = min(m, n)`; `None` where it takes the exact SVD instead (twice the probes
/// reach `r`: randomization would not save work).
pub fn topk_probes(m: usize, n: usize, k: usize, oversample: usize) -> Option<usize> {
    let r = m.min(n);
    let l = k.min(r).saturating_add(oversample).min(r);
    (r > 0 && 2 * l < r).then_some(l)
}

#[allow(clippy::too_many_arguments)]
fn topk(x: &[f32], m: usize, n: usize, k: usize, oversample: usize, power_iters: usize, seed: u64, par: Par) -> Result<TopkSvd> {
    let r = m.min(n);
    let k = k.min(r);
    // f64 accumulation: ||X||_F^2 over millions of entries loses digits in f32.
    let frob2: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let energy_of = |s: &[f32]| {
        if frob2 > 0.0 {
            (s.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / frob2).min(1.0)
        } else {
            1.0
        }
    };
    let Some(l) = topk_probes(m, n, k, oversample) else {
        let mut svd = exact_rowmajor(x, m, n, par)?;
        svd.truncate(k);
        let energy = energy_of(&svd.s);
        return Ok(TopkSvd { svd, energy, exact: true });
    };

    let a = faer::MatRef::from_row_major_slice(x, m, n);
    let svd = randomized(&a, k, gaussian_matrix(n, l, seed).as_ref(), power_iters, par)?;
    let energy = energy_of(&svd.s);
    Ok(TopkSvd { svd, energy, exact: false })
}

/// Top-`k` SVD of a map known by its products (see [`LinOp`]), by the randomized range
/// finding of [`svd_topk`] from the probes `omega` (`ncols × l`, `l >= k`; [`svd_topk`]'s are
/// `gaussian_matrix(n, k + oversample, seed)`, and a dense matrix then gives the same bits
/// either way): maps that share them (an anchor's tensor less each donor's) make them once.
/// For maps whose `2l` is below `min(m, n)`, where that saves work; the caller forms smaller
/// ones and takes [`svd_topk`]'s exact path.
pub fn svd_topk_op(a: &dyn LinOp, k: usize, omega: faer::MatRef<'_, f32>, power_iters: usize) -> Result<Svd> {
    let k = k.min(a.nrows().min(a.ncols()));
    if k == 0 || omega.ncols() < k || omega.nrows() != a.ncols() {
        return Err(Error::config(format!("svd_topk: k = {k} with {} x {} probes for {} columns", omega.nrows(), omega.ncols(), a.ncols())));
    }
    randomized(a, k, omega, power_iters, Par::Seq)
}

/// The randomized top-`k` SVD of `a` from the probes `omega` (`l >= k` columns).
fn randomized(a: &dyn LinOp, k: usize, omega: faer::MatRef<'_, f32>, power_iters: usize, par: Par) -> Result<Svd> {
    let (m, n, l) = (a.nrows(), a.ncols(), omega.ncols());
    let mut y = Mat::<f32>::zeros(m, l);
    a.apply_probes(omega, y.as_mut(), par);
    let mut q = orthonormalize(y.as_ref(), par);
    let mut z = Mat::<f32>::zeros(n, l);
    for _ in 0..power_iters {
        // Re-orthonormalize after each product: otherwise the small singular directions
        // drown in rounding after (s_1/s_l)^(2q) growth.
        a.apply_t(q.as_ref(), z.as_mut(), par);
        let zq = orthonormalize(z.as_ref(), par);
        a.apply(zq.as_ref(), y.as_mut(), par);
        q = orthonormalize(y.as_ref(), par);
    }

    // Bᵀ = Xᵀ Q (n x l); Bᵀ = P S Wᵀ, so X ≈ Q B = (Q W) S Pᵀ.
    a.apply_t(q.as_ref(), z.as_mut(), par);
    let (p, s, w) = svd_faer_mat(z.as_ref(), par)?;
    let s: Vec<f32> = s[..k].to_vec();
    let mut vt = vec![0.0f32; k * n];
    MatMut::from_column_major_slice_mut(&mut vt, n, k).copy_from(p.get(.., ..k));
    let mut u = vec![0.0f32; m * k];
    matmul(MatMut::from_row_major_slice_mut(&mut u, m, k), Accum::Replace, q.as_ref(), w.get(.., ..k), 1.0, par);
    let mut svd = Svd { u, s, vt, m, n };
    svd.normalize_signs();
    Ok(svd)
}

/// Orthonormal basis (thin Q of a Householder QR) of the columns of `a` (`m x l`, `l <= m`).
pub fn orthonormalize(a: faer::MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let (m, l) = a.shape();
    let size = m.min(l);
    let bs = qr::recommended_block_size::<f32>(m, l);
    let mut qr_mat = a.to_owned();
    let mut coeff = Mat::<f32>::zeros(bs, size);
    let mut q = Mat::<f32>::identity(m, size);
    let req = qr::qr_in_place_scratch::<f32>(m, l, bs, par, Default::default())
        .or(apply_block_householder_sequence_on_the_left_in_place_scratch::<f32>(m, bs, size));
    let mut buf = MemBuffer::new(req);
    let stack = MemStack::new(&mut buf);
    qr::qr_in_place(qr_mat.as_mut(), coeff.as_mut(), par, stack, Default::default());
    apply_block_householder_sequence_on_the_left_in_place_with_conj(qr_mat.get(.., ..size), coeff.as_ref(), Conj::No, q.as_mut(), par, stack);
    q
}

/// `rows x cols` matrix of independent standard normals. Entry `(i, j)` depends only on
/// `(seed, i + j * rows)` (splitmix64 counter hash + Box-Muller), so it is the same for
/// any thread count and any evaluation order.
pub fn gaussian_matrix(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    let key = splitmix64(seed ^ 0x6a09_e667_f3bc_c908);
    // Column-major, so entry `idx` is element `idx` of the buffer: each Box-Muller pair is
    // made once for its two entries.
    let mut v = vec![0f32; rows * cols];
    for (pair, two) in v.chunks_mut(2).enumerate() {
        let pair = pair as u64;
        let h1 = splitmix64(key ^ splitmix64(2 * pair));
        let h2 = splitmix64(key ^ splitmix64(2 * pair + 1));
        // 53-bit uniforms; u1 in (0, 1] so ln(u1) is finite.
        let u1 = ((h1 >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
        let u2 = (h2 >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        two[0] = (radius * angle.cos()) as f32;
        if let Some(odd) = two.get_mut(1) {
            *odd = (radius * angle.sin()) as f32;
        }
    }
    faer::MatRef::from_column_major_slice(&v, rows, cols).to_owned()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
