//! Linear maps known by their products with thin matrices. The randomized SVD needs only
//! `A X` and `Aᵀ Y` (`X`, `Y` of `k + oversample` columns), so a matrix given as a product of
//! factors need not be formed: a donor's tensor carried into an anchor's residual stream is
//! `S · R` (`R` hidden × hidden), and forming it costs `2·m·n·hidden` flops, more than all of
//! its SVD's products together.
use faer::linalg::matmul::matmul;
use faer::reborrow::ReborrowMut;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// A real `nrows × ncols` map.
pub trait LinOp: Sync {
    fn nrows(&self) -> usize;
    fn ncols(&self) -> usize;
    /// `out = A x` (`x` is `ncols × l`, `out` `nrows × l`).
    fn apply(&self, x: MatRef<'_, f32>, out: MatMut<'_, f32>, par: Par);
    /// `out = Aᵀ y` (`y` is `nrows × l`, `out` `ncols × l`).
    fn apply_t(&self, y: MatRef<'_, f32>, out: MatMut<'_, f32>, par: Par);
    /// `out = A Ω`, the randomized SVD's first product (its seeded probes `Ω`): a map that
    /// holds part of it already ([`Minus::b_probes`]) overrides this.
    fn apply_probes(&self, omega: MatRef<'_, f32>, out: MatMut<'_, f32>, par: Par) {
        self.apply(omega, out, par)
    }
}

impl LinOp for MatRef<'_, f32> {
    fn nrows(&self) -> usize {
        MatRef::nrows(self)
    }
    fn ncols(&self) -> usize {
        MatRef::ncols(self)
    }
    fn apply(&self, x: MatRef<'_, f32>, out: MatMut<'_, f32>, par: Par) {
        matmul(out, Accum::Replace, *self, x, 1.0, par);
    }
    fn apply_t(&self, y: MatRef<'_, f32>, out: MatMut<'_, f32>, par: Par) {
        matmul(out, Accum::Replace, self.transpose(), y, 1.0, par);
    }
}

/// `L · S · R · diag(d)`, row-major: `S` `[m, n]`, `L` `[p, m]`, `R` `[n, q]` (`L` and `R`
/// optional: `p = m`, `q = n` without them), `d` `[q]`.
#[derive(Debug, Clone)]
pub struct AffineMap {
    pub s: Vec<f32>,
    pub m: usize,
    pub n: usize,
    /// `(L, p)`.
    pub left: Option<(Vec<f32>, usize)>,
    /// `(R, q)`.
    pub right: Option<(Vec<f32>, usize)>,
    pub d: Vec<f32>,
}

impl AffineMap {
    fn p(&self) -> usize {
        self.left.as_ref().map_or(self.m, |l| l.1)
    }

    fn q(&self) -> usize {
        self.right.as_ref().map_or(self.n, |r| r.1)
    }

    fn mat(v: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(v, rows, cols)
    }

    /// Flops of one product with `l` columns (either side).
    pub fn product_flops(&self, l: usize) -> f64 {
        let (m, n, p, q) = (self.m, self.n, self.p(), self.q());
        let side = self.right.as_ref().map_or(0, |_| n * q) + self.left.as_ref().map_or(0, |_| p * m);
        2.0 * l as f64 * (m * n + side) as f64
    }

    /// Flops of forming the `p × q` matrix.
    pub fn form_flops(&self) -> f64 {
        let (m, n, p, q) = (self.m, self.n, self.p(), self.q());
        2.0 * (self.right.as_ref().map_or(0, |_| m * n * q) + self.left.as_ref().map_or(0, |_| p * m * q)) as f64
    }

    /// Every value finite (the factors of a finite input).
    pub fn is_finite(&self) -> bool {
        let parts = [Some(&self.s), self.left.as_ref().map(|l| &l.0), self.right.as_ref().map(|r| &r.0), Some(&self.d)];
        parts.into_iter().flatten().all(|v| crate::dtype::first_non_finite(v).is_none())
    }
}

impl LinOp for AffineMap {
    fn nrows(&self) -> usize {
        self.p()
    }
    fn ncols(&self) -> usize {
        self.q()
    }

    fn apply(&self, x: MatRef<'_, f32>, mut out: MatMut<'_, f32>, par: Par) {
        let l = x.ncols();
        let dx = Mat::from_fn(self.q(), l, |i, j| self.d[i] * x[(i, j)]);
        let rx = match &self.right {
            Some((r, q)) => {
                let mut t = Mat::zeros(self.n, l);
                matmul(t.as_mut(), Accum::Replace, Self::mat(r, self.n, *q), dx.as_ref(), 1.0, par);
                t
            }
            None => dx,
        };
        let s = Self::mat(&self.s, self.m, self.n);
        match &self.left {
            Some((lm, p)) => {
                let mut t = Mat::zeros(self.m, l);
                matmul(t.as_mut(), Accum::Replace, s, rx.as_ref(), 1.0, par);
                matmul(out.rb_mut(), Accum::Replace, Self::mat(lm, *p, self.m), t.as_ref(), 1.0, par);
            }
            None => matmul(out.rb_mut(), Accum::Replace, s, rx.as_ref(), 1.0, par),
        }
    }

    fn apply_t(&self, y: MatRef<'_, f32>, mut out: MatMut<'_, f32>, par: Par) {
        let l = y.ncols();
        let ly = self.left.as_ref().map(|(lm, p)| {
            let mut t = Mat::zeros(self.m, l);
            matmul(t.as_mut(), Accum::Replace, Self::mat(lm, *p, self.m).transpose(), y, 1.0, par);
            t
        });
        let ly = ly.as_ref().map_or(y, |t| t.as_ref());
        let s = Self::mat(&self.s, self.m, self.n).transpose();
        match &self.right {
            Some((r, q)) => {
                let mut t = Mat::zeros(self.n, l);
                matmul(t.as_mut(), Accum::Replace, s, ly, 1.0, par);
                matmul(out.rb_mut(), Accum::Replace, Self::mat(r, self.n, *q).transpose(), t.as_ref(), 1.0, par);
            }
            None => matmul(out.rb_mut(), Accum::Replace, s, ly, 1.0, par),
        }
        for j in 0..l {
            for (i, &d) in self.d.iter().enumerate() {
                out[(i, j)] *= d;
            }
        }
    }
}

/// `A − B` for a map `A` and a dense `B` of its shape.
pub struct Minus<'a, A> {
    pub a: &'a A,
    pub b: MatRef<'a, f32>,
    /// `B Ω` for the SVD's probes `Ω`, when made once for several maps that share `B` (an
    /// anchor's tensor and each donor's).
    pub b_probes: Option<MatRef<'a, f32>>,
}

impl<A: LinOp> LinOp for Minus<'_, A> {
    fn nrows(&self) -> usize {
        self.a.nrows()
    }
    fn ncols(&self) -> usize {
        self.a.ncols()
    }
    fn apply(&self, x: MatRef<'_, f32>, mut out: MatMut<'_, f32>, par: Par) {
        self.a.apply(x, out.rb_mut(), par);
        matmul(out, Accum::Add, self.b, x, -1.0, par);
    }
    fn apply_t(&self, y: MatRef<'_, f32>, mut out: MatMut<'_, f32>, par: Par) {
        self.a.apply_t(y, out.rb_mut(), par);
        matmul(out, Accum::Add, self.b.transpose(), y, -1.0, par);
    }
    fn apply_probes(&self, omega: MatRef<'_, f32>, mut out: MatMut<'_, f32>, par: Par) {
        let Some(bw) = self.b_probes else { return self.apply(omega, out, par) };
        self.a.apply(omega, out.rb_mut(), par);
        for j in 0..out.ncols() {
            for i in 0..out.nrows() {
                out[(i, j)] -= bw[(i, j)];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| crate::rng::normal(seed, i as u64) as f32).collect()
    }

    /// The dense `p × q` matrix of the map, formed with f64 products.
    fn dense(a: &AffineMap) -> Vec<f64> {
        let (m, n, p, q) = (a.m, a.n, a.p(), a.q());
        let mul = |x: &[f64], y: &[f64], r: usize, k: usize, c: usize| {
            let mut o = vec![0f64; r * c];
            for i in 0..r {
                for t in 0..k {
                    for j in 0..c {
                        o[i * c + j] += x[i * k + t] * y[t * c + j];
                    }
                }
            }
            o
        };
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let mut t = f(&a.s);
        if let Some((r, _)) = &a.right {
            t = mul(&t, &f(r), m, n, q);
        }
        if let Some((l, _)) = &a.left {
            t = mul(&f(l), &t, p, m, q);
        }
        for row in t.chunks_mut(q) {
            row.iter_mut().zip(&a.d).for_each(|(x, &d)| *x *= d as f64);
        }
        t
    }

    /// Both products of every factor combination, and of the difference with a dense matrix,
    /// against the formed matrix (f64).
    #[test]
    fn products_match_the_formed_matrix() {
        let (m, n, l) = (7usize, 5usize, 3usize);
        for (left, right) in [(false, false), (true, false), (false, true), (true, true)] {
            let (p, q) = (if left { 4 } else { m }, if right { 6 } else { n });
            let a = AffineMap {
                s: rand(m * n, 1),
                m,
                n,
                left: left.then(|| (rand(p * m, 2), p)),
                right: right.then(|| (rand(n * q, 3), q)),
                d: rand(q, 4),
            };
            let b = rand(p * q, 5);
            let want: Vec<f64> = dense(&a).iter().zip(&b).map(|(&x, &y)| x - y as f64).collect();
            let op = Minus { a: &a, b: MatRef::from_row_major_slice(&b, p, q), b_probes: None };
            assert_eq!((op.nrows(), op.ncols()), (p, q));
            // `got` against `want` (f64) entry by entry.
            let check = |got: &Mat<f32>, want: &dyn Fn(usize, usize) -> f64, what: &str| {
                for i in 0..got.nrows() {
                    for j in 0..got.ncols() {
                        let w = want(i, j);
                        assert!((got[(i, j)] as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what} ({left}, {right}) at {i},{j}");
                    }
                }
            };
            let x = rand(q * l, 6);
            let ax = |i: usize, j: usize| (0..q).map(|t| want[i * q + t] * x[t * l + j] as f64).sum::<f64>();
            let mut got = Mat::<f32>::zeros(p, l);
            op.apply(MatRef::from_row_major_slice(&x, q, l), got.as_mut(), Par::Seq);
            check(&got, &ax, "A x");
            // The first product with `B x` made beforehand.
            let mut bx = Mat::<f32>::zeros(p, l);
            matmul(bx.as_mut(), Accum::Replace, op.b, MatRef::from_row_major_slice(&x, q, l), 1.0, Par::Seq);
            let probed = Minus { b_probes: Some(bx.as_ref()), ..op };
            probed.apply_probes(MatRef::from_row_major_slice(&x, q, l), got.as_mut(), Par::Seq);
            check(&got, &ax, "A Ω");
            let y = rand(p * l, 7);
            let mut got = Mat::<f32>::zeros(q, l);
            probed.apply_t(MatRef::from_row_major_slice(&y, p, l), got.as_mut(), Par::Seq);
            check(&got, &|i, j| (0..p).map(|t| want[t * q + i] * y[t * l + j] as f64).sum(), "Aᵀ y");
        }
    }
}
