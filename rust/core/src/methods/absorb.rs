//! `absorb_filtered`: the delta filter and blend of `procrustes_absorb` (cross-architecture
//! merges; the donors arrive already aligned onto the base, see
//! `python/merge_fast/crossarch/absorb.py`). Per donor `Δ_d = θ_d − θ_base`, then
//!
//! - 2-D: the top-`rank` singular components of `Δ_d` (randomized SVD seeded by the plan's
//!   seed, exact when `rank ≥ min(m, n)`), components with `σ_i < tol · σ_1` zeroed;
//!   unchanged when `rank ≥ min(m, n)` and `tol = 0`;
//! - 1-D: entries with `|Δ_i| < tol · max|Δ|` zeroed; other shapes unchanged;
//!
//! and `θ = θ_base + (1 − β) Σ_d w_d Δ̃_d`. `rank = 0` keeps the base.
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method};
use crate::linalg::{svd, svd_topk, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use rayon::prelude::*;

/// `rank` meaning "every component".
const ALL: i64 = 1 << 40;

pub fn spec() -> MethodSpec {
    MethodSpec::new("absorb_filtered", BaseRule::Required, |p, n, _| Ok(Box::new(Absorb::build(p, n)?))).params(&[
        ParamSpec::float("beta", 0.5, Range::UNIT),
        ParamSpec::count("rank", ALL, ALL),
        ParamSpec::float("tol", 0.0, Range::NON_NEG),
        ParamSpec::float("weight", 1.0, Range::FINITE).per_model(),
        ParamSpec::count("oversample", DEFAULT_OVERSAMPLE as i64, 1 << 20),
        ParamSpec::count("power_iters", DEFAULT_POWER_ITERS as i64, 64),
    ])
}

pub struct Absorb {
    keep: f32,
    rank: usize,
    tol: f32,
    weights: Vec<f32>,
    oversample: usize,
    power_iters: usize,
}

impl Absorb {
    fn build(p: &Params, n: usize) -> Result<Self> {
        Ok(Absorb {
            keep: (1.0 - p.f64("beta")?) as f32,
            rank: p.count("rank")?,
            tol: p.f64("tol")? as f32,
            weights: p.per_model("weight", n)?.iter().map(|&w| w as f32).collect(),
            oversample: p.count("oversample")?,
            power_iters: p.count("power_iters")?,
        })
    }

    /// `Δ` filtered in place.
    fn filter(&self, ctx: &Ctx, delta: &mut [f32]) -> Result<()> {
        match *ctx.shape {
            [_] if self.tol > 0.0 => {
                let m = delta.iter().fold(0f32, |a, &x| a.max(x.abs()));
                delta.iter_mut().filter(|x| x.abs() < self.tol * m).for_each(|x| *x = 0.0);
            }
            [m, n] if m > 0 && n > 0 => {
                let full = m.min(n);
                if self.rank >= full && self.tol <= 0.0 {
                    return Ok(());
                }
                let num = |e: Error| Error::numerical(ctx.tensor, format!("SVD of a donor's delta: {e}"));
                let mut f = if self.rank >= full {
                    svd(delta, m, n).map_err(num)?
                } else {
                    svd_topk(delta, m, n, self.rank, self.oversample, self.power_iters, ctx.seed).map_err(num)?.svd
                };
                if self.tol > 0.0 {
                    let cut = self.tol * f.s.first().copied().unwrap_or(0.0);
                    f.s.iter_mut().filter(|s| **s < cut).for_each(|s| *s = 0.0);
                }
                delta.copy_from_slice(&f.reconstruct());
            }
            _ => {}
        }
        Ok(())
    }
}

impl Method for Absorb {
    fn elementwise(&self) -> bool {
        false
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("base checked at build");
        out.copy_from_slice(base);
        if self.rank == 0 {
            return Ok(());
        }
        // Each donor's delta filtered on its own thread (one SVD each); summed in donor order,
        // so the result does not depend on the number of threads.
        let deltas: Vec<Vec<f32>> = inputs
            .par_iter()
            .with_max_len(1)
            .map(|x| {
                let mut delta: Vec<f32> = x.iter().zip(base).map(|(&x, &b)| x - b).collect();
                self.filter(ctx, &mut delta).map(|_| delta)
            })
            .collect::<Result<_>>()?;
        let mut total = vec![0f32; base.len()];
        for (delta, &w) in deltas.iter().zip(&self.weights) {
            total.iter_mut().zip(delta).for_each(|(t, &d)| *t += w * d);
        }
        for (o, &t) in out.iter_mut().zip(&total) {
            *o += self.keep * t;
        }
        if out.iter().any(|x| !x.is_finite()) {
            return Err(Error::numerical(ctx.tensor, "absorb_filtered produced NaN/inf"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(params: serde_json::Value, shape: &[usize], base: &[f32], inputs: &[&[f32]], seed: u64) -> Vec<f32> {
        let m = crate::methods::build("absorb_filtered", params.as_object().unwrap(), inputs.len(), true).unwrap();
        let mut out = vec![0f32; base.len()];
        m.apply(&Ctx { tensor: "t", shape, offset: 0, seed }, Some(base), inputs, &[], &mut out).unwrap();
        out
    }

    #[test]
    fn blends_filtered_deltas() {
        let (m, n) = (6usize, 5usize);
        let v = |s| (0..m * n).map(|i| crate::rng::normal(s, i as u64) as f32).collect::<Vec<_>>();
        let (b, x, y) = (v(1), v(2), v(3));
        // full rank, no tolerance: θ = b + (1-β)(w1 (x-b) + w2 (y-b))
        let got = run(json!({"beta": 0.25, "weight": [1.0, 0.5]}), &[m, n], &b, &[&x, &y], 0);
        for i in 0..m * n {
            let want = b[i] + 0.75 * ((x[i] - b[i]) + 0.5 * (y[i] - b[i]));
            assert!((got[i] - want).abs() < 1e-5);
        }
        // rank 1 (exact path, 2·(1+10) ≥ 5): the leading component of the delta
        let got = run(json!({"beta": 0.0, "rank": 1}), &[m, n], &b, &[&x], 0);
        let d: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x - b).collect();
        let mut f = svd(&d, m, n).unwrap();
        f.truncate(1);
        let r = f.reconstruct();
        for i in 0..m * n {
            assert!((got[i] - (b[i] + r[i])).abs() < 1e-5);
        }
        // rank 0: the base; 1-D tolerance: small entries dropped
        assert_eq!(run(json!({"rank": 0}), &[m, n], &b, &[&x], 0), b);
        let got = run(json!({"beta": 0.0, "tol": 0.5}), &[4], &[0.0; 4], &[&[1.0, -0.4, -0.6, 0.1]], 0);
        assert_eq!(got, vec![1.0, 0.0, -0.6, 0.0]);
    }
}
