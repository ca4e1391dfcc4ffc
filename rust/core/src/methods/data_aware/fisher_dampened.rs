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
use crate::exp_ln;
use crate::kernel::{par_chunks, with_work, Ctx, Method, TensorIo, CHUNK};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use crate::reader::{Checkpoint, TensorInfo};
use rayon::prelude::*;

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
            Norm::Log => exp_ln::ln(log_arg(f)),
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
        min_max(self.transform(f), stats)
    }
}

/// The argument of the log normalization's logarithm.
#[inline]
fn log_arg(f: f32) -> f64 {
    f.max(0.0) as f64 + LOG_EPS
}

/// A transformed Fisher value scaled by the tensor's extremes (`stats[0..2]`) into [0, 1].
#[inline]
fn min_max(t: f64, stats: &[f64]) -> f64 {
    let (lo, hi) = (stats[0], stats[1]);
    if hi > lo {
        ((t - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        0.0 // a constant Fisher carries no ranking: no dampening
    }
}

/// The sum of a tensor's entries in f64, for F̂_layer's layer means (the planner normalizes
/// them across layers): engine chunks in parallel, each summed in eight lanes, the chunk sums
/// added in chunk order, so the value is the same for any number of threads.
pub fn entry_sum(ck: &Checkpoint, info: &TensorInfo) -> Result<f64> {
    let n = info.numel();
    let parts: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let r = c * CHUNK..((c + 1) * CHUNK).min(n);
            with_work(r.len(), |v| {
                ck.read_f32(info, r, v)?;
                let mut lanes = [0f64; 8];
                let blocks = v.chunks_exact(8);
                let tail: f64 = blocks.remainder().iter().map(|&x| f64::from(x)).sum();
                for b in blocks {
                    for (l, &x) in lanes.iter_mut().zip(b) {
                        *l += f64::from(x);
                    }
                }
                Ok(((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail)
            })
        })
        .collect::<Result<_>>()?;
    Ok(parts.iter().sum())
}

impl Method for FisherDampened {
    fn prepare(&self, _ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let (n, fisher) = (io.numel(), io.slots() - 1);
        if self.norm != Norm::Rank {
            // The extremes of the Fisher alone (the models are not read), transformed once:
            // F ↦ ln(max(F, 0) + ε) never decreases, so they give those of the transform.
            let none = (f32::INFINITY, f32::NEG_INFINITY);
            let parts = par_chunks(io, &[fisher], |_, _, v| Ok(v[0].iter().fold(none, |(lo, hi), &x| (lo.min(x), hi.max(x)))))?;
            let (lo, hi) = parts.into_iter().fold(none, |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
            return Ok(if n == 0 { vec![f64::INFINITY, f64::NEG_INFINITY] } else { vec![self.transform(lo), self.transform(hi)] });
        }
        if n == 0 {
            return Ok(vec![0.0]);
        }
        let mut f = vec![0f32; n];
        io.read(fisher, 0..n, &mut f)?;
        f.sort_unstable_by(f32::total_cmp);
        let last = f.len().saturating_sub(1);
        Ok((0..QUANTILES).map(|i| f[i * last / (QUANTILES - 1)] as f64).collect())
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        const BLOCK: usize = 256;
        let base = base.expect("arity checked");
        let (models, fisher) = inputs.split_at(inputs.len() - 1);
        let layer_keep = 1.0 - self.layer;
        // Block by block: the keep factors first (a logarithm each), then Σ w_i (m_i − b) model
        // after model, which vectorizes — per element the same operations in the same order as
        // the sum from −0.0 over the models.
        let (mut keep, mut delta, mut logs) = ([0f32; BLOCK], [0f32; BLOCK], [0f64; BLOCK]);
        for (s, o) in (0..).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
            let r = s..s + o.len();
            let (b, d) = (&base[r.clone()], &mut delta[..o.len()]);
            let (keep, f) = (&mut keep[..o.len()], &fisher[0][r.clone()]);
            if self.norm == Norm::Log {
                // The block's logarithms four at a time (`exp_ln`, the C library's bits).
                let logs = &mut logs[..o.len()];
                logs.iter_mut().zip(f).for_each(|(l, &f)| *l = log_arg(f));
                exp_ln::ln_all(logs);
                keep.iter_mut().zip(logs.iter()).for_each(|(k, &t)| *k = (1.0 - min_max(t, stats)) as f32);
            } else {
                keep.iter_mut().zip(f).for_each(|(k, &f)| *k = (1.0 - self.normalized(f, stats)) as f32);
            }
            d.fill(-0.0);
            for (m, &w) in models.iter().zip(&self.weights) {
                for ((d, &x), &bv) in d.iter_mut().zip(&m[r.clone()]).zip(b) {
                    *d += w * (x - bv);
                }
            }
            for (((o, &bv), &d), &k) in o.iter_mut().zip(b).zip(d.iter()).zip(keep.iter()) {
                *o = bv + self.scale * k * layer_keep * d;
            }
        }
        Ok(())
    }
}
