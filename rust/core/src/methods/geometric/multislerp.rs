//! Multi-SLERP (mergekit `multislerp`): barycentric interpolation of N models on the
//! hypersphere. With a base, the task vectors `x_i = θ_i − θ_base` are used and the base is
//! added back; without one, the models themselves. Weights (`weight`, required) are
//! normalized to sum to 1 unless `normalize_weights: false`. On the flattened tensors:
//! `u_i = x_i / (|x_i| + eps)`, `m = Σ w_i u_i`, and the result is
//! `(Σ w_i |x_i|) · m / |m|`.
//!
//! mergekit writes this as a projection of the `u_i` onto the tangent space at `m/|m|`,
//! a weighted sum there and an exponential map back. The weighted sum of those tangent
//! vectors is `m − ⟨m, m/|m|⟩·m/|m| = 0` identically, so the exponential map returns
//! `m/|m|` (mergekit's result differs from it only by float rounding of that zero); we
//! compute the closed form from the streamed Gram matrix of the `x_i`, elementwise.
//!
//! One model: that model, unchanged (as mergekit). When `|m| < eps` (antipodal models
//! whose weights cancel, or every task vector zero): two models are lerped, as mergekit
//! does. Deliberate departure: for three or more mergekit raises an error; we return
//! the weighted linear combination `Σ w_i x_i` (+ base) instead, which also makes the
//! degenerate "all models equal the base" case give the base.
use super::common::{tri, whole_gram, MAX_MODELS};
use crate::error::{Error, Result};
use crate::kernel::{weighted_sum, Ctx, Method, TensorIo};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

/// At most `MAX_MODELS` models: a limit of this kernel, checked by it, not a config fact.
pub fn spec() -> MethodSpec {
    MethodSpec::new("multislerp", BaseRule::Optional, |p, n, b| Ok(Box::new(MultiSlerp::build(p, n, b)?)))
        .params(&[
            ParamSpec::bool("normalize_weights", true),
            ParamSpec::float("eps", 1e-8, Range::NON_NEG),
            ParamSpec::required_float("weight", Range::FINITE).per_model(),
        ])
        .mergekit()
}

pub struct MultiSlerp {
    w: Vec<f64>,
    eps: f64,
}

impl MultiSlerp {
    pub fn build(p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        crate::params::check_count("multislerp", n, 1, Some(MAX_MODELS))?;
        let mut w = p.per_model("weight", n)?;
        if p.bool("normalize_weights")? {
            w = crate::params::normalized(&w)
                .ok_or_else(|| Error::config("multislerp: parameter 'weight' sums to zero, cannot normalize (set normalize_weights: false)"))?;
        }
        let eps = p.f64("eps")?;
        Ok(MultiSlerp { w, eps })
    }

    /// Coefficient of each `x_i` from the packed Gram matrix of the `x_i`.
    pub fn coefficients(&self, g: &[f64]) -> Vec<f64> {
        let n = self.w.len();
        let norms: Vec<f64> = (0..n).map(|i| g[tri(n, i, i)].max(0.0).sqrt()).collect();
        // a_i: coefficient of x_i in m.
        let a: Vec<f64> = (0..n).map(|i| self.w[i] / (norms[i] + self.eps)).collect();
        let mut mm = 0.0;
        for i in 0..n {
            for j in 0..n {
                mm += a[i] * a[j] * g[tri(n, i, j)];
            }
        }
        let m = mm.max(0.0).sqrt();
        if m < self.eps {
            return self.w.clone();
        }
        let avg_norm: f64 = self.w.iter().zip(&norms).map(|(w, n)| w * n).sum();
        a.iter().map(|ai| avg_norm * ai / m).collect()
    }
}

impl Method for MultiSlerp {
    fn prepare(&self, _: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let n = self.w.len();
        if n == 1 {
            return Ok(vec![]);
        }
        let off = usize::from(io.has_base());
        let idx: Vec<usize> = (off..off + n).collect();
        let g = whole_gram(io, &idx, io.has_base().then_some(0))?;
        Ok(self.coefficients(&g))
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        if self.w.len() == 1 {
            out.copy_from_slice(inputs[0]);
            return Ok(());
        }
        let c: Vec<f32> = stats.iter().map(|&x| x as f32).collect();
        match base {
            None => weighted_sum(inputs, &c, out),
            Some(b) => {
                out.iter_mut().for_each(|o| *o = 0.0);
                for (x, &ci) in inputs.iter().zip(&c) {
                    out.iter_mut().zip(x.iter().zip(b)).for_each(|(o, (&v, &bb))| *o += ci * (v - bb));
                }
                out.iter_mut().zip(b).for_each(|(o, &bb)| *o += bb);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{close, rand, run};
    use serde_json::json;

    fn reference(base: Option<&[f32]>, xs: &[&[f32]], w: &[f64]) -> Vec<f64> {
        let n = xs[0].len();
        let bv = |j: usize| base.map_or(0.0, |b| b[j] as f64);
        let d: Vec<Vec<f64>> = xs.iter().map(|x| (0..n).map(|j| x[j] as f64 - bv(j)).collect()).collect();
        let s: f64 = w.iter().sum();
        let w: Vec<f64> = w.iter().map(|x| x / s).collect();
        let norms: Vec<f64> = d.iter().map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
        let m: Vec<f64> = (0..n).map(|j| (0..xs.len()).map(|i| w[i] * d[i][j] / (norms[i] + 1e-8)).sum()).collect();
        let mn = m.iter().map(|x| x * x).sum::<f64>().sqrt();
        let avg: f64 = w.iter().zip(&norms).map(|(a, b)| a * b).sum();
        (0..n).map(|j| bv(j) + avg * m[j] / mn).collect()
    }

    #[test]
    fn closed_form() {
        let n = 100_000;
        let (base, a, b, c) = (rand(n, 1), rand(n, 2), rand(n, 3), rand(n, 4));
        let w = [0.2, 0.5, 0.3];
        let y = run("multislerp", json!({"weight": w}), &[n], Some(&base), &[&a, &b, &c]).unwrap();
        close(&y, &reference(Some(&base), &[&a, &b, &c], &w), 1e-5);
        let y = run("multislerp", json!({"weight": [1.0, 2.0]}), &[n], None, &[&a, &b]).unwrap();
        close(&y, &reference(None, &[&a, &b], &[1.0, 2.0]), 1e-5);
        assert_eq!(run("multislerp", json!({"weight": 1.0}), &[n], Some(&base), &[&a]).unwrap(), a);
        // Every task vector zero: the base.
        let y = run("multislerp", json!({"weight": 1.0}), &[n], Some(&base), &[&base, &base, &base]).unwrap();
        assert_eq!(y, base);
    }
}
