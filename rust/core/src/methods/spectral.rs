//! SVD-based data-free merges of task matrices `Δ_i = θ_i − θ_base`, each on whole 2-D
//! tensors (exact thin SVDs in f32, faer). Each SVD runs sequentially (faer's own
//! parallelism changes rounding with the thread count); the independent ones (one per task,
//! the two polar factors) run in parallel, so results never depend on the thread count. Tensors that are not 2-D get the mean task vector,
//! `θ_base + α · mean_i Δ_i`, as FusionBench's implementations do.
//!
//! - `tsv_merge` (Gargiulo et al. 2025, TSV-M): `k = ⌊r/T⌋` (`r = min(m, n)`, `T` models)
//!   leading singular triplets of each `Δ_i`, stacked into `U` (m × Tk), `s`, `V` (n × Tk);
//!   each stack replaced by its polar factor (`P Qᵀ` from its thin SVD `P S Qᵀ`, the nearest
//!   matrix with orthonormal columns); `θ = θ_base + α · U⊥ diag(s) V⊥ᵀ`. Parameter `alpha`
//!   (default 1), a number or one per model (each `Δ_i` scaled by `α_i` first, as FusionBench). With more models than `r` (k = 0) the tensor keeps the base, as FusionBench.
//! - `iso_c` (Marczak et al. 2025): `U S Vᵀ = svd(Σ Δ_i)`,
//!   `θ = θ_base + α · mean(S) · U Vᵀ` over all `r` components. Parameter `scaling_factor`.
//! - `iso_cts`: `c` common directions from `svd(Σ Δ_i)` and `k` per task from
//!   `svd(Δ_i − U_c U_cᵀ Δ_i)`, with `c = r − T·k`,
//!   `k = round_half_even((r − ⌊r·common_space_fraction⌋) / T)` (lowered by one if that
//!   would leave `c < 0`); the `r` left vectors and the `r` right vectors are each
//!   orthogonalised by their polar factor and the spectrum flattened to the mean of the
//!   `r` gathered singular values: `θ = θ_base + α · s̄ · U⊥ V⊥ᵀ`. Parameters
//!   `scaling_factor` (default 1), `common_space_fraction` (default 0.8).
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method};
use crate::linalg::{par_map, svd_faer_mat};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

pub const NAMES: &[&str] = &["tsv_merge", "iso_c", "iso_cts"];

/// A thin SVD as faer gives it: `(U, s, V)`.
type Factors = (Mat<f32>, Vec<f32>, Mat<f32>);

#[derive(Clone, Copy)]
enum Kind {
    Tsv,
    IsoC,
    IsoCts { common: f64 },
}

pub struct Spectral {
    kind: Kind,
    /// Scale of each task vector before merging (TSV-M's per-model `alpha`; 1 otherwise).
    pre: Vec<f32>,
    /// Scale of the merged task matrix.
    alpha: f32,
}

/// The specs of this family.
pub fn specs() -> Vec<MethodSpec> {
    let spec = |name| MethodSpec::new(name, BaseRule::Required, |p, n, _| Ok(Box::new(Spectral::build(p.method(), p, n)?)));
    let scaling = ParamSpec::float("scaling_factor", 1.0, Range::FINITE);
    vec![
        spec("tsv_merge").params(&[ParamSpec::float("alpha", 1.0, Range::FINITE).per_model()]),
        spec("iso_c").params(&[scaling]),
        spec("iso_cts").params(&[ParamSpec::float("common_space_fraction", 0.8, Range::UNIT), scaling]),
    ]
}

impl Spectral {
    fn build(name: &str, p: &Params, n: usize) -> Result<Self> {
        let (key, kind) = match name {
            "tsv_merge" => ("alpha", Kind::Tsv),
            "iso_c" => ("scaling_factor", Kind::IsoC),
            _ => {
                let f = p.f64("common_space_fraction")?;
                ("scaling_factor", Kind::IsoCts { common: f })
            }
        };
        // TSV-M is positively homogeneous in each task vector, so a scalar alpha scaling the
        // result equals the same alpha scaling every task vector: one per-model list serves
        // both of FusionBench's forms.
        let (pre, alpha) = match kind {
            Kind::Tsv => (p.per_model(key, n)?, 1.0),
            _ => (vec![1.0; n], p.f64(key)?),
        };
        Ok(Spectral { kind, pre: pre.iter().map(|&a| a as f32).collect(), alpha: alpha as f32 })
    }
}

impl Method for Spectral {
    fn elementwise(&self) -> bool {
        false
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked at build");
        let (m, n) = match ctx.shape {
            [m, n] if *m > 0 && *n > 0 => (*m, *n),
            _ => {
                // Not a matrix: the mean task vector.
                let inv = 1.0 / inputs.len() as f32;
                for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
                    let s: f32 = inputs.iter().zip(&self.pre).map(|(x, w)| w * (x[j] - b)).sum();
                    *o = b + self.alpha * (s * inv);
                }
                return Ok(());
            }
        };
        let deltas: Vec<Mat<f32>> =
            inputs.iter().zip(&self.pre).map(|(x, &w)| Mat::from_fn(m, n, |i, j| w * (x[i * n + j] - base[i * n + j]))).collect();
        if deltas.iter().any(|d| !d.as_ref().is_all_finite()) {
            return Err(Error::numerical(ctx.tensor, "a task vector contains NaN or infinite values"));
        }
        let svd = |a: MatRef<'_, f32>| svd_faer_mat(a, Par::Seq).map_err(|e| Error::numerical(ctx.tensor, e.to_string()));
        let t = deltas.len();
        let r = m.min(n);
        let delta = match self.kind {
            Kind::Tsv => {
                let k = r / t;
                let mut u = Mat::<f32>::zeros(m, t * k);
                let mut v = Mat::<f32>::zeros(n, t * k);
                let mut s = vec![0f32; t * k];
                let parts = par_map(&deltas, |d| svd(d.as_ref()))?;
                for (i, (ui, si, vi)) in parts.iter().enumerate() {
                    u.subcols_mut(i * k, k).copy_from(ui.subcols(0, k));
                    v.subcols_mut(i * k, k).copy_from(vi.subcols(0, k));
                    s[i * k..(i + 1) * k].copy_from_slice(&si[..k]);
                }
                let (pu, pv) = rayon::join(|| polar(u.as_ref(), &svd), || polar(v.as_ref(), &svd));
                usv(&pu?, &s, &pv?)
            }
            Kind::IsoC => {
                let mut sum = deltas[0].clone();
                deltas[1..].iter().for_each(|d| sum += d);
                let (u, s, v) = svd(sum.as_ref())?;
                let mean = s.iter().map(|&x| x as f64).sum::<f64>() / r as f64;
                usv(&u, &vec![mean as f32; r], &v)
            }
            Kind::IsoCts { common } => {
                let (c, k) = cts_split(r, t, common);
                let mut sum = deltas[0].clone();
                deltas[1..].iter().for_each(|d| sum += d);
                let (us, ss, vs) = svd(sum.as_ref())?;
                let uc = us.subcols(0, c);
                // Task-specific blocks first, then the common block (as FusionBench lays
                // them out; the order does not change the result).
                let mut u = Mat::<f32>::zeros(m, r);
                let mut v = Mat::<f32>::zeros(n, r);
                let mut s = vec![0f32; r];
                if k > 0 {
                    let parts = par_map(&deltas, |d| {
                        // Δ_i − U_c (U_cᵀ Δ_i)
                        let mut proj = Mat::<f32>::zeros(c, n);
                        matmul(proj.as_mut(), Accum::Replace, uc.transpose(), d.as_ref(), 1.0, Par::Seq);
                        let mut w = d.clone();
                        matmul(w.as_mut(), Accum::Add, uc, proj.as_ref(), -1.0, Par::Seq);
                        svd(w.as_ref())
                    })?;
                    for (i, (ui, si, vi)) in parts.iter().enumerate() {
                        u.subcols_mut(i * k, k).copy_from(ui.subcols(0, k));
                        v.subcols_mut(i * k, k).copy_from(vi.subcols(0, k));
                        s[i * k..(i + 1) * k].copy_from_slice(&si[..k]);
                    }
                }
                u.subcols_mut(t * k, c).copy_from(uc);
                v.subcols_mut(t * k, c).copy_from(vs.subcols(0, c));
                s[t * k..].copy_from_slice(&ss[..c]);
                let mean = s.iter().map(|&x| x as f64).sum::<f64>() / r as f64;
                let (pu, pv) = rayon::join(|| polar(u.as_ref(), &svd), || polar(v.as_ref(), &svd));
                usv(&pu?, &vec![mean as f32; r], &pv?)
            }
        };
        for i in 0..m {
            for j in 0..n {
                let at = i * n + j;
                out[at] = base[at] + self.alpha * delta[(i, j)];
            }
        }
        Ok(())
    }
}

/// Iso-CTS sizes `(c, k)`: common directions and directions per task, `c + T·k = r`.
/// FusionBench: `c0 = ⌊r·f⌋`, `k = round((r − c0)/T)` with Python's round (half to even).
fn cts_split(r: usize, t: usize, frac: f64) -> (usize, usize) {
    let c0 = ((r as f64) * frac).floor() as usize;
    let x = (r - c0) as f64 / t as f64;
    let mut k = x.round() as usize;
    if (x - x.floor() - 0.5).abs() < 1e-12 && k % 2 == 1 {
        k -= 1; // a tie rounds to the even neighbour
    }
    if t * k > r {
        k -= 1; // rounding up would leave no room: keep c ≥ 0
    }
    (r - t * k, k)
}

/// The polar factor `P Qᵀ` of `a = P S Qᵀ`: the matrix with orthonormal columns nearest to
/// `a` (Procrustes). Columns of `a` must not outnumber its rows.
fn polar(a: MatRef<'_, f32>, svd: &(dyn Fn(MatRef<'_, f32>) -> Result<Factors> + Sync)) -> Result<Mat<f32>> {
    let mut out = Mat::<f32>::zeros(a.nrows(), a.ncols());
    if a.ncols() == 0 {
        return Ok(out);
    }
    let (p, _, q) = svd(a)?;
    matmul(out.as_mut(), Accum::Replace, p.as_ref(), q.transpose(), 1.0, Par::Seq);
    Ok(out)
}

/// `U diag(s) Vᵀ` for `U` (m × p), `V` (n × p).
fn usv(u: &Mat<f32>, s: &[f32], v: &Mat<f32>) -> Mat<f32> {
    let mut us = u.clone();
    for (j, &sj) in s.iter().enumerate() {
        us.col_mut(j).iter_mut().for_each(|x| *x *= sj);
    }
    let mut out = Mat::<f32>::zeros(u.nrows(), v.nrows());
    if !s.is_empty() {
        matmul(out.as_mut(), Accum::Replace, us.as_ref(), v.transpose(), 1.0, Par::Seq);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::geometric::common::testing::{rand, run, run_threads};
    use super::*;
    use serde_json::json;

    #[test]
    fn cts_sizes_follow_fusionbench() {
        assert_eq!(cts_split(64, 4, 0.8), (52, 3)); // c0 = 51, round(13/4) = 3
        assert_eq!(cts_split(10, 4, 0.0), (2, 2)); // round(2.5) = 2 (half to even)
        assert_eq!(cts_split(3, 2, 0.0), (1, 1)); // round(1.5) = 2 would overfill: 1
        assert_eq!(cts_split(8, 2, 1.0), (8, 0));
    }

    #[test]
    fn tsv_of_one_model_is_the_model_and_results_ignore_threads() {
        // One task: k = r, both stacks are already orthonormal, so TSV-M returns Δ·α.
        let (m, n) = (24, 17);
        let (b, a) = (rand(m * n, 1), rand(m * n, 2));
        let y = run("tsv_merge", json!({"alpha": 0.5}), &[m, n], Some(&b), &[&a]).unwrap();
        for j in 0..m * n {
            let want = b[j] + 0.5 * (a[j] - b[j]);
            assert!((y[j] - want).abs() < 1e-4, "{j}: {} vs {want}", y[j]);
        }
        let c = rand(m * n, 3);
        for name in NAMES {
            let one = run_threads(1, name, json!({}), &[m, n], Some(&b), &[&a, &c]).unwrap();
            let two = run_threads(2, name, json!({}), &[m, n], Some(&b), &[&a, &c]).unwrap();
            assert_eq!(one, two);
        }
        // Per-model alpha: a list equal to the scalar when all equal (homogeneity).
        let c2 = rand(m * n, 4);
        let scalar = run("tsv_merge", json!({"alpha": 0.5}), &[m, n], Some(&b), &[&a, &c2]).unwrap();
        let list = run("tsv_merge", json!({"alpha": [0.5, 0.5]}), &[m, n], Some(&b), &[&a, &c2]).unwrap();
        for (x, y) in scalar.iter().zip(&list) {
            assert!((x - y).abs() < 1e-5);
        }
        assert!(run("iso_cts", json!({"common_space_fraction": 1.5}), &[m, n], Some(&b), &[&a]).is_err());
        assert!(run("iso_c", json!({"alpha": 1.0}), &[m, n], Some(&b), &[&a]).is_err());
        assert!(run("iso_c", json!({}), &[m, n], None, &[&a]).is_err());
    }
}
