//! Model Stock (Jang et al. 2024; mergekit `model_stock`). With `w_0` the base and
//! `Δ_i = w_i − w_0` for the N ≥ 2 fine-tunes, `cos` is the mean over all pairs of
//! `⟨Δ_a, Δ_b⟩ / max(|Δ_a||Δ_b|, 1e-6)` (each clamped to [−1, 1]),
//! `t = N·cos / (1 + (N − 1)·cos)` and the result is `t · mean(w_i) + (1 − t) · w_0`.
//! Flattened over the whole tensor by default; `filter_wise: true` computes one `t` per
//! row along the last dimension (a 1-D tensor is one row).
//!
//! By default this is mergekit 0.1.5's formula exactly: a negative mean cosine gives
//! `t < 0` (extrapolation away from the models' average), and only at the pole
//! (`|1 + (N−1)·cos| < 1e-6`, mergekit's test) is the base kept, with a note to the user.
//! `clamp_cosine: true` (merge_fast's option) clamps the mean cosine to [0, 1] first:
//! Model Stock's geometry assumes updates spread around a centre at `cos ≥ 0`, so with no
//! positive agreement the estimate collapses to the base.
//!
//! Memory: the pairwise dot products and norms are streamed (whole-tensor mode) or
//! gathered per row in `prepare` (filter-wise: one f64 per row and statistic); `apply`
//! runs elementwise on chunks.
use super::common::{for_each_run, gram_run, tri, vector_stats, Layout, MAX_MODELS};
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method, TensorIo};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params};

pub fn spec() -> MethodSpec {
    MethodSpec::new("model_stock", BaseRule::Required, |p, n, b| Ok(Box::new(ModelStock::build(p, n, b)?)))
        .models(2, None)
        .params(&[ParamSpec::bool("filter_wise", false), ParamSpec::bool("clamp_cosine", false)])
        .mergekit()
}

pub struct ModelStock {
    n: usize,
    filter_wise: bool,
    clamp_cosine: bool,
}

impl ModelStock {
    pub fn build(p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        if n > MAX_MODELS {
            return Err(Error::config(format!("model_stock: at most {MAX_MODELS} models, got {n}")));
        }
        Ok(ModelStock { n, filter_wise: p.bool("filter_wise")?, clamp_cosine: p.bool("clamp_cosine")? })
    }

    fn layout(&self, shape: &[usize]) -> Layout {
        if self.filter_wise {
            Layout::last_dim(shape)
        } else {
            Layout::whole(shape)
        }
    }

    /// The interpolation factor from the packed Gram matrix of the deltas; NaN marks the
    /// singularity (the base is kept there).
    pub fn t_from_gram(n: usize, g: &[f64], clamp: bool) -> f64 {
        let norm = |i: usize| g[tri(n, i, i)].max(0.0).sqrt();
        let mut sum = 0.0;
        let mut pairs = 0usize;
        for a in 0..n {
            for b in a + 1..n {
                sum += (g[tri(n, a, b)] / (norm(a) * norm(b)).max(1e-6)).clamp(-1.0, 1.0);
                pairs += 1;
            }
        }
        let mut cos = sum / pairs as f64;
        if clamp {
            cos = cos.clamp(0.0, 1.0);
        }
        let nf = n as f64;
        let den = 1.0 + (nf - 1.0) * cos;
        if den.abs() < 1e-6 {
            return f64::NAN;
        }
        nf * cos / den
    }
}

impl Method for ModelStock {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let n = self.n;
        let k = n * (n + 1) / 2;
        let idx: Vec<usize> = (1..=n).collect();
        let g = vector_stats(io, self.layout(ctx.shape), k, |run, acc| gram_run(run, &idx, Some(0), acc))?;
        Ok(g.chunks(k).map(|gs| Self::t_from_gram(n, gs, self.clamp_cosine)).collect())
    }

    fn note(&self, stats: &[f64]) -> Option<String> {
        let k = stats.iter().filter(|t| t.is_nan()).count();
        (k > 0).then(|| {
            let what = if self.filter_wise { format!("{k} of {} rows", stats.len()) } else { "the tensor".into() };
            format!("model_stock: mean cosine at the singularity -1/(N-1) for {what}; kept the base there")
        })
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked at build");
        let n = self.n as f32;
        for_each_run(self.layout(ctx.shape), ctx.offset, out.len(), |r, seg| {
            let (o, b) = (&mut out[r.clone()], &base[r.clone()]);
            let t = stats[seg];
            if t.is_nan() {
                o.copy_from_slice(b);
                return;
            }
            let t = t as f32;
            // The sum starts from +0.0 and adds the models in order (as the reference does).
            o.fill(0.0);
            for x in inputs {
                o.iter_mut().zip(&x[r.clone()]).for_each(|(o, &v)| *o += v);
            }
            o.iter_mut().zip(b).for_each(|(o, &b)| *o = t * (*o / n) + (1.0 - t) * b);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{close, rand, run};
    use super::*;
    use serde_json::json;

    fn reference(rows: usize, len: usize, base: &[f32], xs: &[&[f32]], clamp: bool) -> Vec<f64> {
        let n = xs.len();
        let mut out = vec![0f64; base.len()];
        for r in 0..rows {
            let span = r * len..(r + 1) * len;
            let d: Vec<Vec<f64>> = xs.iter().map(|x| span.clone().map(|j| x[j] as f64 - base[j] as f64).collect()).collect();
            let dot = |a: &Vec<f64>, b: &Vec<f64>| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            let mut cs = vec![];
            for a in 0..n {
                for b in a + 1..n {
                    cs.push((dot(&d[a], &d[b]) / (dot(&d[a], &d[a]).sqrt() * dot(&d[b], &d[b]).sqrt()).max(1e-6)).clamp(-1.0, 1.0));
                }
            }
            let mut c = cs.iter().sum::<f64>() / cs.len() as f64;
            if clamp {
                c = c.max(0.0);
            }
            let den = 1.0 + (n as f64 - 1.0) * c;
            let t = if den.abs() < 1e-6 { 0.0 } else { n as f64 * c / den };
            for j in span {
                let avg = xs.iter().map(|x| x[j] as f64).sum::<f64>() / n as f64;
                out[j] = t * avg + (1.0 - t) * base[j] as f64;
            }
        }
        out
    }

    #[test]
    fn whole_and_filter_wise() {
        let (rows, len) = (300, 257);
        let n = rows * len;
        let base = rand(n, 1);
        let common = rand(n, 9);
        let mk = |k: u64| -> Vec<f32> {
            let r = rand(n, k);
            (0..n).map(|j| base[j] + 0.1 * common[j] + 0.1 * r[j]).collect()
        };
        let (a, b, c) = (mk(2), mk(3), mk(4));
        let y = run("model_stock", json!({}), &[rows, len], Some(&base), &[&a, &b, &c]).unwrap();
        close(&y, &reference(1, n, &base, &[&a, &b, &c], false), 1e-5);
        let y = run("model_stock", json!({"filter_wise": true}), &[rows, len], Some(&base), &[&a, &b]).unwrap();
        close(&y, &reference(rows, len, &base, &[&a, &b], false), 1e-5);
        // Anti-correlated updates: the pole for N = 2 (cos = -1) keeps the base, clamped or not.
        let neg: Vec<f32> = (0..n).map(|j| 2.0 * base[j] - a[j]).collect();
        let y = run("model_stock", json!({}), &[rows, len], Some(&base), &[&a, &neg]).unwrap();
        assert_eq!(y, base);
        // Slightly negative agreement: mergekit extrapolates (t < 0); clamping keeps the base.
        let r5 = rand(n, 5);
        let neg3: Vec<f32> = (0..n).map(|j| base[j] - 0.1 * common[j] + 0.1 * r5[j]).collect();
        let y = run("model_stock", json!({}), &[rows, len], Some(&base), &[&a, &b, &neg3]).unwrap();
        close(&y, &reference(1, n, &base, &[&a, &b, &neg3], false), 1e-5);
        let y = run("model_stock", json!({"clamp_cosine": true}), &[rows, len], Some(&base), &[&a, &b, &neg3]).unwrap();
        close(&y, &reference(1, n, &base, &[&a, &b, &neg3], true), 1e-5);
        assert!(run("model_stock", json!({}), &[n], Some(&base), &[&a]).is_err());
    }

    #[test]
    fn t_values() {
        // Two orthogonal unit deltas: cos 0 -> t 0; identical deltas: cos 1 -> t 1.
        assert_eq!(ModelStock::t_from_gram(2, &[1.0, 0.0, 1.0], false), 0.0);
        assert!((ModelStock::t_from_gram(2, &[1.0, 1.0, 1.0], false) - 1.0).abs() < 1e-12);
        assert!((ModelStock::t_from_gram(2, &[1.0, 0.5, 1.0], false) - 2.0 / 3.0).abs() < 1e-12);
        // cos = -0.2, N = 2: t = 2(-0.2)/(1-0.2) = -0.5 (mergekit); clamped: 0.
        assert!((ModelStock::t_from_gram(2, &[1.0, -0.2, 1.0], false) + 0.5).abs() < 1e-12);
        assert_eq!(ModelStock::t_from_gram(2, &[1.0, -0.2, 1.0], true), 0.0);
        // The pole (cos = -1 for N = 2) is marked.
        assert!(ModelStock::t_from_gram(2, &[1.0, -1.0, 1.0], false).is_nan());
    }
}
