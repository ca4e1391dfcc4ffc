//! Karcher mean (mergekit `karcher`): the weighted Riemannian (Karcher) mean of the
//! normalized inputs on the unit hypersphere, scaled by their mean norm. Every input
//! counts equally (`alpha = 1/N`); mergekit ignores the base's role and treats a
//! configured base model as one more input, and so do we (it is taken last, where mergekit
//! appends it). Inputs with norm ≤ `tol` take no part in the direction but still count
//! (as 0) in the mean norm; if none is left the result is zero.
//!
//! Iteration (as mergekit, `max_iter` = 10, `tol` = 1e-5): start from the normalized
//! weighted mean of the unit vectors (the first valid one if that is shorter than `tol`);
//! each step forms the tangent `Σ α_j θ_j/sin θ_j · (u_j − cos θ_j · μ)` over inputs with
//! `θ_j ≥ tol`, stops when its norm is below `tol`, else moves `μ` along the geodesic and
//! renormalizes.
//!
//! Memory and speed: `μ` always lies in the span of the inputs, so the whole iteration runs
//! on N coefficients using the streamed N×N Gram matrix, in f64; the output is then a
//! fixed linear combination of the inputs, applied elementwise on chunks. mergekit runs
//! the same iteration on full f32 tensors; results agree to float rounding.
use super::common::{tri, whole_gram, MAX_MODELS};
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method, TensorIo};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("karcher", BaseRule::Ignored, |p, n, b| Ok(Box::new(Karcher::build(p, n, b)?)))
        .params(&[ParamSpec::count("max_iter", 10, 9_999_999), ParamSpec::float("tol", 1e-5, Range::NON_NEG)])
        .mergekit()
}

pub struct Karcher {
    n: usize,
    max_iter: usize,
    tol: f64,
}

impl Karcher {
    pub fn build(p: &Params, n: usize, has_base: bool) -> Result<Self> {
        let total = n + usize::from(has_base);
        if total > MAX_MODELS {
            return Err(Error::config(format!("karcher: at most {MAX_MODELS} inputs, got {total}")));
        }
        let max_iter = p.count("max_iter")?;
        let tol = p.f64("tol")?;
        Ok(Karcher { n: total, max_iter, tol })
    }

    /// The coefficient of each input (in input order) from their packed Gram matrix.
    pub fn coefficients(&self, g: &[f64]) -> Vec<f64> {
        let n = self.n;
        let tol = self.tol;
        let norms: Vec<f64> = (0..n).map(|i| g[tri(n, i, i)].max(0.0).sqrt()).collect();
        let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
        if valid.is_empty() {
            return vec![0.0; n];
        }
        let m = valid.len();
        // Gram matrix of the valid unit vectors.
        let u = |a: usize, b: usize| {
            let (i, j) = (valid[a], valid[b]);
            g[tri(n, i, j)] / (norms[i] * norms[j])
        };
        let uu: Vec<f64> = (0..m * m).map(|k| u(k / m, k % m)).collect();
        let quad = |c: &[f64]| {
            let mut s = 0.0;
            for a in 0..m {
                for b in 0..m {
                    s += c[a] * c[b] * uu[a * m + b];
                }
            }
            s.max(0.0).sqrt()
        };
        let alpha = 1.0 / m as f64; // equal weights, renormalized over the valid inputs
        let mut c = vec![alpha; m];
        let mn = quad(&c);
        if mn < tol {
            c = vec![0.0; m];
            c[0] = 1.0;
        } else {
            c.iter_mut().for_each(|x| *x /= mn);
        }
        for _ in 0..self.max_iter {
            let mut tan = vec![0.0; m];
            for j in 0..m {
                let dot: f64 = (0..m).map(|a| c[a] * uu[a * m + j]).sum::<f64>().clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < tol {
                    continue;
                }
                let f = alpha * theta / theta.sin();
                tan[j] += f;
                tan.iter_mut().zip(&c).for_each(|(t, ci)| *t -= f * dot * ci);
            }
            let tn = quad(&tan);
            if tn < tol {
                break;
            }
            let (co, si) = (tn.cos(), tn.sin() / tn);
            c.iter_mut().zip(&tan).for_each(|(ci, ti)| *ci = co * *ci + si * ti);
            let un = quad(&c);
            if un > tol {
                c.iter_mut().for_each(|x| *x /= un);
            }
        }
        let scale: f64 = norms.iter().sum::<f64>() / n as f64;
        let mut out = vec![0.0; n];
        for (a, &i) in valid.iter().enumerate() {
            out[i] = scale * c[a] / norms[i];
        }
        out
    }
}

/// Slot of input `i` when inputs are ordered models first, base last.
#[inline]
fn slot(i: usize, n: usize, has_base: bool) -> usize {
    if has_base {
        if i + 1 == n {
            0
        } else {
            i + 1
        }
    } else {
        i
    }
}

impl Method for Karcher {
    fn prepare(&self, _: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let n = self.n;
        if n == 1 {
            return Ok(vec![1.0]);
        }
        let hb = io.has_base();
        let idx: Vec<usize> = (0..n).map(|i| slot(i, n, hb)).collect();
        let g = whole_gram(io, &idx, None)?;
        Ok(self.coefficients(&g))
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let n = self.n;
        let hb = base.is_some();
        let get = |i: usize| -> &[f32] {
            let s = slot(i, n, hb);
            if hb {
                if s == 0 {
                    base.unwrap()
                } else {
                    inputs[s - 1]
                }
            } else {
                inputs[s]
            }
        };
        if n == 1 {
            out.copy_from_slice(get(0));
            return Ok(());
        }
        out.iter_mut().for_each(|o| *o = 0.0);
        for (i, &c) in stats.iter().enumerate() {
            let c = c as f32;
            if c != 0.0 {
                out.iter_mut().zip(get(i)).for_each(|(o, &x)| *o += c * x);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{close, rand, run};
    use serde_json::json;

    /// Direct iteration on full vectors (f64), as the formulas read.
    fn reference(xs: &[&[f32]], max_iter: usize, tol: f64) -> Vec<f64> {
        let n = xs[0].len();
        let k = xs.len();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let v: Vec<Vec<f64>> = xs.iter().map(|x| x.iter().map(|&e| e as f64).collect()).collect();
        let norms: Vec<f64> = v.iter().map(|x| dot(x, x).sqrt()).collect();
        let units: Vec<Vec<f64>> = v.iter().zip(&norms).filter(|(_, &nn)| nn > tol).map(|(x, nn)| x.iter().map(|e| e / nn).collect()).collect();
        let m = units.len();
        let al = 1.0 / m as f64;
        let mut mean: Vec<f64> = (0..n).map(|j| units.iter().map(|u| al * u[j]).sum()).collect();
        let mn = dot(&mean, &mean).sqrt();
        mean.iter_mut().for_each(|x| *x /= mn);
        for _ in 0..max_iter {
            let mut tan = vec![0.0; n];
            for u in &units {
                let d = dot(&mean, u).clamp(-1.0, 1.0);
                let th = d.acos();
                if th < tol {
                    continue;
                }
                for j in 0..n {
                    tan[j] += al * th / th.sin() * (u[j] - d * mean[j]);
                }
            }
            let tn = dot(&tan, &tan).sqrt();
            if tn < tol {
                break;
            }
            for j in 0..n {
                mean[j] = tn.cos() * mean[j] + tn.sin() * tan[j] / tn;
            }
            let un = dot(&mean, &mean).sqrt();
            mean.iter_mut().for_each(|x| *x /= un);
        }
        let scale = norms.iter().sum::<f64>() / k as f64;
        mean.iter().map(|x| x * scale).collect()
    }

    #[test]
    fn matches_direct_iteration() {
        let n = 80_000;
        let (a, b, c) = (rand(n, 1), rand(n, 2), rand(n, 3));
        let y = run("karcher", json!({}), &[n], None, &[&a, &b, &c]).unwrap();
        close(&y, &reference(&[&a, &b, &c], 10, 1e-5), 1e-5);
        // The base is one more input, taken last.
        let y = run("karcher", json!({"max_iter": 3}), &[n], Some(&c), &[&a, &b]).unwrap();
        close(&y, &reference(&[&a, &b, &c], 3, 1e-5), 1e-5);
        assert_eq!(run("karcher", json!({}), &[n], None, &[&a]).unwrap(), a);
        let z = vec![0f32; n];
        let y = run("karcher", json!({}), &[n], None, &[&a, &z]).unwrap();
        close(&y, &a.iter().map(|&x| 0.5 * x as f64).collect::<Vec<_>>(), 1e-6);
    }
}
