//! Fisher-dampened delta (the Gemma-4-E4B-Luchador recipe):
//! `θ = θ_IT + s · (1 − F̂_param) · (1 − F̂_layer) · Δ_avg`.
//!
//! The base is θ_IT; the inputs are the models whose deltas are averaged
//! (`Δ_avg = Σ w_i (θ_i − θ_IT) / Σ w_i`), then the Fisher of θ_IT as the last input.
//! F̂_layer (the layer's normalized importance, in [0, 1]) is computed across the whole
//! model by the planner and passed as `layer_importance`.
//!
//! F̂_param normalizes the Fisher within the tensor to [0, 1]:
//! - `log` (default): min-max of ln(F + ε). Raw Fisher values span many orders of magnitude;
//!   plain min-max maps nearly every entry to ~0 (one outlier sets the scale), which would
//!   leave the delta undampened almost everywhere.
//! - `minmax`: min-max of F itself.
//! - `rank`: the entry's quantile in the tensor (interpolated between 1024 quantiles).
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method, TensorIo};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

/// The inputs are the models then one Fisher (of the base).
pub fn spec() -> MethodSpec {
    MethodSpec::new("fisher_dampened", BaseRule::Required, |p, n, b| Ok(Box::new(FisherDampened::build(p, n, b)?))).models(2, None).params(&[
        ParamSpec::float("weight", 1.0, Range::FINITE).per_model(),
        ParamSpec::float("scale", 1.0, Range::FINITE),
        ParamSpec::float("layer_importance", 0.0, Range::UNIT),
        ParamSpec::str("normalization", "log"),
    ])
}

const QUANTILES: usize = 1024;
const LOG_EPS: f64 = 1e-30;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Norm {
    Log,
    MinMax,
    Rank,
}

pub struct FisherDampened {
    weights: Vec<f32>,
    scale: f32,
    layer: f32,
    norm: Norm,
}

impl FisherDampened {
    pub fn build(p: &Params, n_inputs: usize, _has_base: bool) -> Result<Self> {
        let n = n_inputs - 1;
        let w = p.per_model("weight", n)?;
        let weights = p.weights_f32("weight", &w, true)?;
        let scale = p.weights_f32("scale", &[p.f64("scale")?], false)?[0];
        let layer = p.f64("layer_importance")?;
        let norm = match p.str("normalization")? {
            "log" => Norm::Log,
            "minmax" => Norm::MinMax,
            "rank" => Norm::Rank,
            other => return Err(Error::config(format!("fisher_dampened: normalization must be log, minmax or rank, got '{other}'"))),
        };
        Ok(FisherDampened { weights, scale, layer: layer as f32, norm })
    }

    fn transform(&self, f: f32) -> f64 {
        match self.norm {
            Norm::Log => (f.max(0.0) as f64 + LOG_EPS).ln(),
            _ => f as f64,
        }
    }

    /// F̂ in [0, 1] for one Fisher value, from the prepared statistics.
    fn normalized(&self, f: f32, stats: &[f64]) -> f64 {
        if self.norm == Norm::Rank {
            // stats are sorted quantiles q_0..q_{Q-1}; interpolate the position of f.
            let q = stats;
            let k = q.partition_point(|&x| x < f as f64);
            if k == 0 {
                return 0.0;
            }
            if k >= q.len() {
                return 1.0;
            }
            let (lo, hi) = (q[k - 1], q[k]);
            let frac = if hi > lo { (f as f64 - lo) / (hi - lo) } else { 0.0 };
            return ((k - 1) as f64 + frac) / (q.len() - 1) as f64;
        }
        let (lo, hi) = (stats[0], stats[1]);
        if hi > lo {
            ((self.transform(f) - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.0 // a constant Fisher carries no ranking: no dampening
        }
    }
}

impl Method for FisherDampened {
    fn n_stats(&self) -> usize {
        2
    }

    fn init_stats(&self) -> Vec<f64> {
        vec![f64::INFINITY, f64::NEG_INFINITY]
    }

    fn accumulate(&self, _: Option<&[f32]>, inputs: &[&[f32]], stats: &mut [f64]) {
        for &f in *inputs.last().unwrap() {
            let v = self.transform(f);
            stats[0] = stats[0].min(v);
            stats[1] = stats[1].max(v);
        }
    }

    fn combine(&self, total: &mut [f64], part: &[f64]) {
        total[0] = total[0].min(part[0]);
        total[1] = total[1].max(part[1]);
    }

    fn prepare(&self, _ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        if self.norm != Norm::Rank {
            return crate::kernel::stream_stats(self, io);
        }
        if io.numel() == 0 {
            return Ok(vec![0.0]);
        }
        let mut f = vec![0f32; io.numel()];
        io.read(io.slots() - 1, 0..io.numel(), &mut f)?;
        f.sort_unstable_by(f32::total_cmp);
        let last = f.len().saturating_sub(1);
        Ok((0..QUANTILES).map(|i| f[i * last / (QUANTILES - 1)] as f64).collect())
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked");
        let (models, fisher) = inputs.split_at(inputs.len() - 1);
        let fisher = fisher[0];
        let layer_keep = 1.0 - self.layer;
        for (j, o) in out.iter_mut().enumerate() {
            let b = base[j];
            let delta: f32 = models.iter().zip(&self.weights).map(|(m, w)| w * (m[j] - b)).sum();
            let keep = (1.0 - self.normalized(fisher[j], stats)) as f32;
            *o = b + self.scale * keep * layer_keep * delta;
        }
        Ok(())
    }
}
