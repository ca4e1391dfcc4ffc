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
use crate::methods::sparsified::select::{counts, from_total_key, ranks_streamed, total_key};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use crate::reader::{Checkpoint, TensorInfo};
use crate::simd::avx2;
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
/// A Fisher whose values are all bfloat16 (as read from a bf16 file: the low 16 bits of every
/// f32 zero) has at most 2^16 distinct values: past this many elements its keep factors (log or
/// rank normalization) are looked up in a table of all 2^16, built once per tensor, instead of
/// one `ln` or quantile search per element (the `ln`s were a quarter of a 125M merge's CPU time).
const TABLE_MIN: usize = 1 << 18;
const TABLE: usize = 1 << 16;

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

    /// How [`Factors::keep_factors`] finds a chunk's factors from the prepared statistics: the
    /// extremes (log, minmax) or the quantiles (rank), or for a bf16 Fisher the table of factors.
    fn factors<'s>(&self, stats: &'s [f64]) -> Factors<'s> {
        let at = if self.norm == Norm::Rank { QUANTILES } else { 2 };
        match stats.get(at..).and_then(|t| <&[f64; TABLE]>::try_from(t).ok()) {
            Some(table) if self.norm != Norm::MinMax => Factors::Table(table),
            _ => match self.norm {
                Norm::Rank => Factors::Rank(Quantiles::new(stats)),
                Norm::Log => Factors::Log(stats),
                Norm::MinMax => Factors::MinMax(stats),
            },
        }
    }

    /// `stats` followed by the keep factor of every bfloat16 value (by its bits' high half),
    /// as `keep_factors` computes it from `stats` (non-finite patterns included: the inputs were
    /// checked finite, so their entries are never read).
    fn with_table(&self, mut stats: Vec<f64>) -> Vec<f64> {
        let f: Vec<f32> = (0..TABLE as u32).map(|h| f32::from_bits(h << 16)).collect();
        let mut keep = vec![0f32; TABLE];
        self.factors(&stats).keep_factors(&f, &mut keep, &mut vec![0f64; TABLE]);
        stats.extend(keep.iter().map(|&k| f64::from(k)));
        stats
    }
}

impl Drop for FisherDampened {
    fn drop(&mut self) {
        counts::release(); // the rank mode's histograms live as long as the merge's kernel
    }
}

/// A tensor's way to its keep factors: the bf16 table, the quantiles, or the extremes of the
/// transformed Fisher (log) or of the Fisher itself (minmax).
enum Factors<'s> {
    Table(&'s [f64; TABLE]),
    Rank(Quantiles<'s>),
    Log(&'s [f64]),
    MinMax(&'s [f64]),
}

impl Factors<'_> {
    /// The keep factor `1 − F̂` of each Fisher value in `f` into `keep`.
    fn keep_factors(&self, f: &[f32], keep: &mut [f32], logs: &mut [f64]) {
        match self {
            Factors::Table(table) => look_up(table, f, keep),
            Factors::Rank(q) => keep.iter_mut().zip(f).for_each(|(k, &f)| *k = (1.0 - q.normalized(f)) as f32),
            Factors::Log(stats) => {
                // Four logarithms at a time (`exp_ln`, the C library's bits).
                logs.iter_mut().zip(f).for_each(|(l, &f)| *l = log_arg(f));
                exp_ln::ln_all(logs);
                keep.iter_mut().zip(logs.iter()).for_each(|(k, &t)| *k = (1.0 - min_max(t, stats)) as f32);
            }
            Factors::MinMax(stats) => keep.iter_mut().zip(f).for_each(|(k, &f)| *k = (1.0 - min_max(f as f64, stats)) as f32),
        }
    }
}

/// A tensor's quantiles of the Fisher (ascending) and, to place a value among them in a few
/// steps, a directory by the high 12 bits of an order-preserving key: `dir[b]` counts the
/// quantiles whose key is below bucket `b`'s keys.
struct Quantiles<'s> {
    q: &'s [f64],
    keys: Vec<u32>,
    dir: Vec<usize>,
}

impl<'s> Quantiles<'s> {
    const SHIFT: u32 = 20;

    fn new(q: &'s [f64]) -> Self {
        let q = &q[..q.len().min(QUANTILES)];
        let keys: Vec<u32> = q.iter().map(|&v| Self::key(v as f32)).collect();
        // One merge of the sorted keys with the buckets' starts (built per chunk: cheap).
        let mut j = 0;
        let dir = (0..=1u64 << (32 - Self::SHIFT))
            .map(|b| {
                while j < keys.len() && u64::from(keys[j]) < b << Self::SHIFT {
                    j += 1;
                }
                j
            })
            .collect();
        Quantiles { q, keys, dir }
    }

    /// Orders finite values as `<` does: [`total_key`] with −0 taken as +0 (equal under `<`).
    fn key(x: f32) -> u32 {
        total_key(if x == 0.0 { 0.0 } else { x })
    }

    /// F̂ in [0, 1] for `f`: its position among the quantiles, interpolated (the quantiles are
    /// f32 values, so `q < f` as f64 is `key(q) < key(f)` for finite values).
    fn normalized(&self, f: f32) -> f64 {
        let (q, k) = (self.q, Self::key(f));
        let b = (k >> Self::SHIFT) as usize;
        let (lo, hi) = (self.dir[b], self.dir[b + 1]);
        let k = lo + self.keys[lo..hi].partition_point(|&x| x < k);
        if k == 0 {
            return 0.0;
        }
        if k >= q.len() {
            return 1.0;
        }
        let (lo, hi) = (q[k - 1], q[k]);
        let frac = if hi > lo { (f as f64 - lo) / (hi - lo) } else { 0.0 };
        ((k - 1) as f64 + frac) / (q.len() - 1) as f64
    }
}

avx2! {
/// The least and greatest of `v` and the OR of their low 16 bits, in eight lanes (a fold
/// through one tuple does not vectorize).
fn extremes(v: &[f32]) -> (f32, f32, u32) {
    let (mut lo, mut hi, mut low) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8], [0u32; 8]);
    let blocks = v.chunks_exact(8);
    let tail = blocks.remainder();
    for b in blocks {
        // Comparisons, not `f32::min`: its NaN rule kept the loop scalar (the inputs are finite).
        for (((l, h), o), &x) in lo.iter_mut().zip(&mut hi).zip(&mut low).zip(b) {
            *l = if x < *l { x } else { *l };
            *h = if x > *h { x } else { *h };
            *o |= x.to_bits() & 0xFFFF;
        }
    }
    let lanes = (0..8).map(|k| (lo[k], hi[k], low[k])).chain(tail.iter().map(|&x| (x, x, x.to_bits() & 0xFFFF)));
    lanes.fold((f32::INFINITY, f32::NEG_INFINITY, 0), |(l, h, o), (a, b, c)| (l.min(a), h.max(b), o | c))
}
}

avx2! {
/// The keep factors of bfloat16 Fisher values `f`, looked up by their high 16 bits.
fn look_up(table: &[f64; TABLE], f: &[f32], keep: &mut [f32]) {
    keep.iter_mut().zip(f).for_each(|(k, &f)| *k = table[(f.to_bits() >> 16) as usize] as f32);
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
            // With them, whether every value is a bfloat16 (the OR of their low 16 bits).
            let none = (f32::INFINITY, f32::NEG_INFINITY, 0u32);
            let parts = par_chunks(io, &[fisher], |_, _, v| Ok(extremes(v[0])))?;
            let (lo, hi, low) = parts.into_iter().fold(none, |(lo, hi, low), (a, b, c)| (lo.min(a), hi.max(b), low | c));
            if n == 0 {
                return Ok(vec![f64::INFINITY, f64::NEG_INFINITY]);
            }
            let stats = vec![self.transform(lo), self.transform(hi)];
            return Ok(if self.norm == Norm::Log && low == 0 && n >= TABLE_MIN { self.with_table(stats) } else { stats });
        }
        if n == 0 {
            return Ok(vec![0.0]);
        }
        // The values at ranks i·(n − 1)/(Q − 1) of the Fisher sorted by `total_cmp`, without
        // sorting or holding it (one pass for a bf16 Fisher, up to three otherwise).
        let ranks: Vec<u64> = (0..QUANTILES).map(|i| (i * (n - 1) / (QUANTILES - 1)) as u64).collect();
        let (keys, low) = ranks_streamed(io, fisher, total_key, &ranks)?;
        let stats: Vec<f64> = keys.into_iter().map(|k| from_total_key(k) as f64).collect();
        // Non-negative bf16 values have zero low halves under `total_key`.
        Ok(if low == 0 && n >= TABLE_MIN { self.with_table(stats) } else { stats })
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        const BLOCK: usize = 256;
        let base = base.expect("arity checked");
        let (models, fisher) = inputs.split_at(inputs.len() - 1);
        let layer_keep = 1.0 - self.layer;
        // Block by block: the keep factors first (a logarithm or a look-up each), then Σ w_i (m_i − b) model
        // after model, which vectorizes — per element the same operations in the same order as
        // the sum from −0.0 over the models.
        let how = self.factors(stats);
        let (mut keep, mut delta, mut logs) = ([0f32; BLOCK], [0f32; BLOCK], [0f64; BLOCK]);
        for (s, o) in (0..).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
            let r = s..s + o.len();
            let (b, d) = (&base[r.clone()], &mut delta[..o.len()]);
            let (keep, f) = (&mut keep[..o.len()], &fisher[0][r.clone()]);
            how.keep_factors(f, keep, &mut logs[..o.len()]);
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

#[cfg(test)]
mod tests {
    use crate::exp_ln;
    use crate::methods::geometric::common::testing::{rand, run};
    use serde_json::json;

    /// The log and rank normalizations' bytes, element by element from the formula (one `ln`
    /// each; the quantiles from a sort), for a bf16 Fisher large enough for the table, the same
    /// values with one low bit set (no table; every digit of the streamed quantile search), their
    /// magnitudes (the rank mode's table), and small ones; zeros, a negative zero and negatives
    /// (clamped to 0 by the log) among the values.
    #[test]
    fn table_gives_the_formula_bits() {
        let bf16 = |x: f32| f32::from_bits(x.to_bits() & 0xFFFF_0000);
        for n in [super::TABLE_MIN + 37, 1000] {
            let base = rand(n, 1);
            let (a, b) = (rand(n, 2), rand(n, 3));
            let mut fisher: Vec<f32> = rand(n, 4).iter().map(|&z| bf16((z * 6.0).exp() * 1e-4)).collect();
            (fisher[5], fisher[9], fisher[n - 1], fisher[n - 2]) = (0.0, -2.0, 7.5, -0.0);
            let mut odd = fisher.clone();
            odd[3] = f32::from_bits(odd[3].to_bits() | 1);
            // Under `total_key` a negative value's low half is not zero: the rank mode's table
            // needs a Fisher of non-negative values (as a Fisher is).
            let plus: Vec<f32> = fisher.iter().map(|&x| x.abs()).collect();
            for f in [&fisher, &odd, &plus] {
                let t = |f: f32| exp_ln::ln(f.max(0.0) as f64 + super::LOG_EPS);
                let (lo, hi) = f.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(t(x)), h.max(t(x))));
                let mut sorted = f.clone();
                sorted.sort_by(f32::total_cmp);
                let q: Vec<f64> = (0..super::QUANTILES).map(|i| sorted[i * (n - 1) / (super::QUANTILES - 1)] as f64).collect();
                let rank = |f: f32| {
                    let k = q.partition_point(|&x| x < f as f64);
                    if k == 0 || k >= q.len() {
                        return if k == 0 { 0.0 } else { 1.0 };
                    }
                    let frac = if q[k] > q[k - 1] { (f as f64 - q[k - 1]) / (q[k] - q[k - 1]) } else { 0.0 };
                    ((k - 1) as f64 + frac) / (q.len() - 1) as f64
                };
                for mode in ["log", "rank"] {
                    let params = json!({"scale": 0.7, "layer_importance": 0.2, "normalization": mode});
                    let got = run("fisher_dampened", params, &[n], Some(&base), &[&a, &b, f]).unwrap();
                    for j in 0..n {
                        let norm = if mode == "log" { ((t(f[j]) - lo) / (hi - lo)).clamp(0.0, 1.0) } else { rank(f[j]) };
                        let keep = (1.0 - norm) as f32;
                        let d = -0.0 + 0.5f32 * (a[j] - base[j]) + 0.5f32 * (b[j] - base[j]);
                        let want = base[j] + 0.7f32 * keep * (1.0 - 0.2f32) * d;
                        assert_eq!(got[j].to_bits(), want.to_bits(), "{mode}, n {n}, element {j}: {} vs {want}", got[j]);
                    }
                }
            }
        }
    }
}
