//! Fisher-weighted averaging (Matena & Raffel 2022):
//! `θ = Σ λ_i (F_i + ε) θ_i / Σ λ_i (F_i + ε)`, elementwise with diagonal Fishers.
//!
//! Inputs are the n models followed by their n Fishers (same tensor name in each Fisher
//! file). With `fisher_normalize: "mean"` each F_i is first divided by its mean over the
//! tensor, so models whose Fishers differ in overall scale (more data, other losses) weigh
//! in by where they are confident rather than by how large their Fisher is.
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

/// The inputs are the models then their Fishers, in the same order.
pub fn spec() -> MethodSpec {
    MethodSpec::new("fisher_weighted", BaseRule::Forbidden, |p, n, b| Ok(Box::new(FisherWeighted::build(p, n, b)?))).models(2, None).params(&[
        ParamSpec::float("weight", 1.0, Range::FINITE).per_model(),
        ParamSpec::float("epsilon", 1e-8, Range::NON_NEG),
        ParamSpec::str("fisher_normalize", "none"),
    ])
}

pub struct FisherWeighted {
    weights: Vec<f64>,
    epsilon: f64,
    normalize: bool,
}

impl FisherWeighted {
    pub fn build(p: &Params, n_inputs: usize, _has_base: bool) -> Result<Self> {
        if !n_inputs.is_multiple_of(2) {
            return Err(Error::config(format!("fisher_weighted: needs one Fisher per model, got {n_inputs} inputs")));
        }
        let n = n_inputs / 2;
        let w = p.per_model("weight", n)?;
        // Σ λF θ / Σ λF does not change when every λ is scaled: scale by the largest so
        // that huge weights cannot overflow the sums.
        let m = w.iter().fold(0f64, |a, x| a.max(x.abs()));
        let weights = w.iter().map(|x| if m > 0.0 { x / m } else { *x }).collect();
        let epsilon = p.f64("epsilon")?;
        let normalize = match p.str("fisher_normalize")? {
            "none" => false,
            "mean" => true,
            other => return Err(Error::config(format!("fisher_weighted: fisher_normalize must be 'none' or 'mean', got '{other}'"))),
        };
        Ok(FisherWeighted { weights, epsilon, normalize })
    }

    fn n(&self) -> usize {
        self.weights.len()
    }
}

impl Method for FisherWeighted {
    fn n_stats(&self) -> usize {
        // Per-model Fisher sums (for the mean) and the element count.
        if self.normalize {
            self.n() + 1
        } else {
            0
        }
    }

    fn accumulate(&self, _: Option<&[f32]>, inputs: &[&[f32]], stats: &mut [f64]) {
        let n = self.n();
        for (i, f) in inputs[n..].iter().enumerate() {
            stats[i] += f.iter().map(|&x| x as f64).sum::<f64>();
        }
        stats[n] += inputs[0].len() as f64;
    }

    fn apply(&self, ctx: &Ctx, _: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let n = self.n();
        let (models, fishers) = inputs.split_at(n);
        let mut scale = vec![1f64; n];
        if self.normalize {
            for (i, s) in scale.iter_mut().enumerate() {
                let mean = stats[i] / stats[n].max(1.0);
                // An all-zero Fisher stays zero: only ε weighs that model in.
                *s = if mean > 0.0 { 1.0 / mean } else { 1.0 };
            }
        }
        // A branch-free test first (vectorizes); the first offender only where there is one.
        if fishers.iter().any(|f| f.iter().fold(false, |a, &x| a | (x < 0.0))) {
            let j = (0..out.len()).find(|&j| fishers.iter().any(|f| f[j] < 0.0)).expect("a negative Fisher");
            let i = fishers.iter().position(|f| f[j] < 0.0).expect("a negative Fisher at j");
            return Err(Error::numerical(
                ctx.tensor,
                format!("Fisher of model #{i} is negative ({}) at element {}", fishers[i][j] as f64, ctx.offset + j),
            ));
        }
        combine(&self.weights, &scale, self.epsilon, models, fishers, out);
        Ok(())
    }
}

crate::simd::avx2! {
/// `out = Σ_i w_i θ_i / Σ_i w_i` with `w_i = λ_i (F_i · scale_i + ε)` in f64 (Fishers
/// non-negative), tile by tile and model by model so that the loops vectorize; each sum
/// still adds the models in order. Where every `w_i` is zero, the `λ`-weighted average.
fn combine(weights: &[f64], scale: &[f64], epsilon: f64, models: &[&[f32]], fishers: &[&[f32]], out: &mut [f32]) {
    const T: usize = 512;
    let (mut num, mut den) = ([0f64; T], [0f64; T]);
    for t in (0..out.len()).step_by(T) {
        let r = t..(t + T).min(out.len());
        let (num, den) = (&mut num[..r.len()], &mut den[..r.len()]);
        num.fill(0.0);
        den.fill(0.0);
        for ((&wi, &si), (m, f)) in weights.iter().zip(scale).zip(models.iter().zip(fishers)) {
            for ((nu, de), (&x, &f)) in num.iter_mut().zip(den.iter_mut()).zip(m[r.clone()].iter().zip(&f[r.clone()])) {
                let w = wi * (f as f64 * si + epsilon);
                *nu += w * x as f64;
                *de += w;
            }
        }
        for (j, (o, (&nu, &de))) in out[r.clone()].iter_mut().zip(num.iter().zip(den.iter())).enumerate() {
            *o = if de > 0.0 {
                (nu / de) as f32
            } else {
                // Every Fisher zero and ε = 0: the weighted average.
                let wsum: f64 = weights.iter().sum();
                (weights.iter().zip(models).map(|(&w, m)| w * m[t + j] as f64).sum::<f64>() / wsum) as f32
            };
        }
    }
}
}
