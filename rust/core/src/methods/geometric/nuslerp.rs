//! NuSLERP (mergekit `nuslerp`): spherical interpolation of exactly two models with
//! `t = w_1 / (w_0 + w_1)` from their `weight`s (0.5 when the weights sum to ~0). With a
//! base, the two task vectors `θ_i − θ_base` are interpolated and the base added back.
//!
//! Vectors: the whole flattened tensor (`nuslerp_flatten`, the default), else rows along
//! the last dimension, or with `nuslerp_row_wise` vectors along dimension 0 (mergekit's
//! `dim=0`; a 1-D tensor is one vector either way). Per vector: both are normalized
//! (norms clamped at 1e-7), `cos` clamped to [−1, 1]; colinear pairs
//! (`1 − cos² ≤ 1e-16`) are lerped; otherwise
//! `(sin((1−t)θ)·v0 + sin(tθ)·v1) / sin θ` on the raw vectors.
//!
//! Deliberate departure: when either vector is (numerically) zero (norm ≤ 1e-7, e.g. a
//! model identical to the base) the angle is undefined; mergekit then takes `cos = 0` and
//! returns `sin(tπ/2)·v1`, shrinking the other vector. We lerp instead.
//!
//! Memory: per-vector dot products and norms are streamed in `prepare` (one coefficient
//! pair per vector); `apply` runs elementwise on chunks.
use super::common::{for_each_run, gram_run, vector_stats, Layout};
use crate::error::Result;
use crate::kernel::{Ctx, Method, TensorIo};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("nuslerp", BaseRule::Optional, |p, n, b| Ok(Box::new(NuSlerp::build(p, n, b)?)))
        .models(2, Some(2))
        .params(&[
            ParamSpec::bool("nuslerp_row_wise", false),
            ParamSpec::bool("nuslerp_flatten", true),
            ParamSpec::required_float("weight", Range::FINITE).per_model(),
        ])
        .mergekit()
}

pub const NORM_EPS: f64 = 1e-7;
pub const COLINEAR_EPS: f64 = 1e-8;

pub struct NuSlerp {
    t: f64,
    row_wise: bool,
    flatten: bool,
}

impl NuSlerp {
    pub fn build(p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        let w = p.per_model("weight", n)?;
        let total = w[0] + w[1];
        let t = if total.abs() < 1e-6 { 0.5 } else { crate::params::normalized(&w).map_or(0.5, |v| v[1]) };
        let row_wise = p.bool("nuslerp_row_wise")?;
        let flatten = p.bool("nuslerp_flatten")?;
        Ok(NuSlerp { t, row_wise, flatten })
    }

    fn layout(&self, shape: &[usize]) -> Layout {
        if self.flatten {
            Layout::whole(shape)
        } else if self.row_wise {
            Layout::first_dim(shape)
        } else {
            Layout::last_dim(shape)
        }
    }

    /// The coefficients of `v0` and `v1` from `⟨v0,v1⟩`, `|v0|²`, `|v1|²`.
    pub fn coefficients(t: f64, dot: f64, aa: f64, bb: f64) -> (f64, f64) {
        let (na, nb) = (aa.max(0.0).sqrt(), bb.max(0.0).sqrt());
        if na <= NORM_EPS || nb <= NORM_EPS {
            return (1.0 - t, t);
        }
        let cos = (dot / (na * nb)).clamp(-1.0, 1.0);
        if 1.0 - cos * cos <= COLINEAR_EPS * COLINEAR_EPS {
            return (1.0 - t, t);
        }
        let theta = cos.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    }
}

impl Method for NuSlerp {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let off = usize::from(io.has_base());
        let base = io.has_base().then_some(0);
        // Per vector the packed Gram matrix of the two models: |x|², ⟨x,y⟩, |y|².
        let g = vector_stats(io, self.layout(ctx.shape), 3, |run, acc| gram_run(run, &[off, off + 1], base, acc))?;
        let mut out = Vec::with_capacity(g.len() / 3 * 2);
        for s in g.chunks(3) {
            let (c0, c1) = Self::coefficients(self.t, s[1], s[0], s[2]);
            out.push(c0);
            out.push(c1);
        }
        Ok(out)
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let (x, y) = (inputs[0], inputs[1]);
        for_each_run(self.layout(ctx.shape), ctx.offset, out.len(), |r, s| {
            let (c0, c1) = (stats[2 * s] as f32, stats[2 * s + 1] as f32);
            let (o, x, y) = (&mut out[r.clone()], &x[r.clone()], &y[r.clone()]);
            match base {
                Some(b) => {
                    let b = &b[r];
                    for (j, o) in o.iter_mut().enumerate() {
                        *o = b[j] + (c0 * (x[j] - b[j]) + c1 * (y[j] - b[j]));
                    }
                }
                None => o.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (&x, &y))| *o = c0 * x + c1 * y),
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{close, rand, run};
    use super::*;
    use serde_json::json;

    /// Reference on vectors given as lists of flat indices.
    fn reference(vecs: &[Vec<usize>], t: f64, base: Option<&[f32]>, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; a.len()];
        for idx in vecs {
            let bv = |j: usize| base.map_or(0.0, |b| b[j] as f64);
            let x: Vec<f64> = idx.iter().map(|&j| a[j] as f64 - bv(j)).collect();
            let y: Vec<f64> = idx.iter().map(|&j| b[j] as f64 - bv(j)).collect();
            let d = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f64>();
            let (c0, c1) = NuSlerp::coefficients(t, d(&x, &y), d(&x, &x), d(&y, &y));
            for (k, &j) in idx.iter().enumerate() {
                out[j] = bv(j) + c0 * x[k] + c1 * y[k];
            }
        }
        out
    }

    #[test]
    fn layouts_and_base() {
        let (r, c) = (300, 301);
        let n = r * c;
        let (base, a, b) = (rand(n, 1), rand(n, 2), rand(n, 3));
        let whole = vec![(0..n).collect::<Vec<_>>()];
        let rows: Vec<Vec<usize>> = (0..r).map(|i| (i * c..(i + 1) * c).collect()).collect();
        let cols: Vec<Vec<usize>> = (0..c).map(|k| (0..r).map(|i| i * c + k).collect()).collect();
        let w = json!([1.0, 3.0]);
        let y = run("nuslerp", json!({"weight": w}), &[r, c], None, &[&a, &b]).unwrap();
        close(&y, &reference(&whole, 0.75, None, &a, &b), 1e-5);
        let y = run("nuslerp", json!({"weight": w}), &[r, c], Some(&base), &[&a, &b]).unwrap();
        close(&y, &reference(&whole, 0.75, Some(&base), &a, &b), 1e-5);
        let y = run("nuslerp", json!({"weight": w, "nuslerp_flatten": false}), &[r, c], Some(&base), &[&a, &b]).unwrap();
        close(&y, &reference(&rows, 0.75, Some(&base), &a, &b), 1e-5);
        let p = json!({"weight": w, "nuslerp_flatten": false, "nuslerp_row_wise": true});
        let y = run("nuslerp", p, &[r, c], None, &[&a, &b]).unwrap();
        close(&y, &reference(&cols, 0.75, None, &a, &b), 1e-5);
        // Zero task vector: lerp, not shrink.
        let y = run("nuslerp", json!({"weight": w}), &[r, c], Some(&base), &[&base, &b]).unwrap();
        let lerp: Vec<f64> = (0..n).map(|j| base[j] as f64 + 0.75 * (b[j] as f64 - base[j] as f64)).collect();
        close(&y, &lerp, 1e-6);
        assert!(run("nuslerp", json!({}), &[r, c], None, &[&a, &b]).is_err());
    }

    #[test]
    fn coefficient_corners() {
        assert_eq!(NuSlerp::coefficients(0.3, 2.0, 1.0, 4.0), (0.7, 0.3));
        assert_eq!(NuSlerp::coefficients(0.3, 0.0, 0.0, 4.0), (0.7, 0.3));
        let (c0, c1) = NuSlerp::coefficients(0.5, 0.0, 1.0, 1.0);
        let h = std::f64::consts::FRAC_PI_4.sin();
        assert!((c0 - h).abs() < 1e-12 && (c1 - h).abs() < 1e-12);
    }
}
