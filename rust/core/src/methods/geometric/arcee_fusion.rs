//! Arcee Fusion (mergekit `arcee_fusion`): keeps only the model's most important changes.
//! Per element, `importance = |x − base| · KL_row`, where `KL_row = Σ p·ln(p/q)` with
//! `p = softmax(x) + 1e-8`, `q = softmax(base) + 1e-8` over each row (last dimension; a
//! 1-D tensor is one row). The threshold is `median + 1.5·(Q3 − Q1)` of the importances,
//! quantiles taken as `sorted[floor(q·(n−1))]`; elements with `importance ≥ threshold`
//! take `base + (x − base)`, the others keep the base.
//!
//! mergekit estimates the quantiles of tensors over 1,000,000 elements from 1,000,000
//! samples drawn with replacement by an unseeded generator (so its output is not
//! reproducible); we draw the same number of samples from the counter-based RNG keyed on
//! the seed and tensor name, so results are deterministic. Smaller tensors use every
//! element, as mergekit.
//!
//! Memory: `prepare` computes one KL value per row (rows are read whole, two slots), then
//! the importances (or the sample) in one f32 scratch buffer of at most 1,000,000 values,
//! whose quantiles are radix-selected (exact, as a sort would give them);
//! `apply` runs elementwise on chunks.
use super::common::{for_each_run, Layout};
use crate::error::Result;
use crate::kernel::CHUNK;
use crate::kernel::{Ctx, Method, TensorIo};
use crate::methods::sparsified::select::{counts, select_ranks, HighHist};
use crate::params::{BaseRule, MethodSpec, Params};

pub fn spec() -> MethodSpec {
    MethodSpec::new("arcee_fusion", BaseRule::Required, |p, n, b| Ok(Box::new(ArceeFusion::build(p, n, b)?))).models(1, Some(1)).mergekit()
}
use crate::rng::{stream_key, uniform};
use rayon::prelude::*;

pub const SAMPLE: usize = 1_000_000;

pub struct ArceeFusion;

impl Drop for ArceeFusion {
    fn drop(&mut self) {
        counts::release(); // the histograms' buffers live as long as the merge's kernel
    }
}

impl ArceeFusion {
    pub fn build(_p: &Params, _n: usize, _has_base: bool) -> Result<Self> {
        Ok(ArceeFusion)
    }
}

fn row_len(shape: &[usize]) -> usize {
    match Layout::last_dim(shape) {
        Layout::Rows { len } => len,
        Layout::Cols { .. } => unreachable!(),
    }
}

/// KL(softmax(x) + 1e-8 ‖ softmax(b) + 1e-8) of one row (each `exp` taken once: they are
/// most of the method's time).
pub fn row_kl(x: &[f32], b: &[f32]) -> f32 {
    row_kl_in(x, b, &mut Vec::new(), &mut Vec::new())
}

/// [`row_kl`] with the exponentials in caller-owned buffers (reused from row to row).
fn row_kl_in(x: &[f32], b: &[f32], ex: &mut Vec<f64>, eb: &mut Vec<f64>) -> f32 {
    let exps = |v: &[f32], e: &mut Vec<f64>| {
        let m = v.iter().fold(f32::NEG_INFINITY, |m, &t| m.max(t)) as f64;
        e.clear();
        e.extend(v.iter().map(|&t| (t as f64 - m).exp()));
    };
    exps(x, ex);
    exps(b, eb);
    // Both sums in one loop: two independent chains of additions (each in element order,
    // from −0.0 as `Iterator::sum`), which the CPU overlaps; one after the other, each
    // waited on its own additions.
    let (sx, sb) = ex.iter().zip(eb.iter()).fold((-0.0f64, -0.0f64), |(a, b), (&x, &y)| (a + x, b + y));
    let kl = ex.iter().zip(eb.iter()).fold(0f64, |kl, (&ex, &eb)| {
        let p = ex / sx + 1e-8;
        let q = eb / sb + 1e-8;
        kl + p * (p / q).ln()
    });
    kl as f32
}

/// A `u32` that orders like `f32::total_cmp`, and back.
#[inline]
fn total_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
fn from_total_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k })
}

#[inline]
fn importance(x: f32, b: f32, kl: f32) -> f32 {
    (x - b).abs() * kl
}

impl Method for ArceeFusion {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let numel = io.numel();
        if numel == 0 {
            return Ok(vec![0.0]);
        }
        let len = row_len(ctx.shape);
        let rows = numel.div_ceil(len);
        // Blocks of whole rows (about one chunk each, at least one row).
        let per = (CHUNK / len).max(1);
        let blocks: Vec<usize> = (0..rows).step_by(per).collect();
        let kl: Vec<f32> = blocks
            .par_iter()
            .map(|&r0| {
                let r1 = (r0 + per).min(rows);
                let span = r0 * len..(r1 * len).min(numel);
                let (mut b, mut x) = (vec![0f32; span.len()], vec![0f32; span.len()]);
                io.read(0, span.clone(), &mut b)?;
                io.read(1, span, &mut x)?;
                let (mut ex, mut eb) = (Vec::new(), Vec::new());
                Ok(x.chunks(len).zip(b.chunks(len)).map(|(xr, br)| row_kl_in(xr, br, &mut ex, &mut eb)).collect::<Vec<f32>>())
            })
            .collect::<Result<Vec<_>>>()?
            .concat();
        // Importances: every element, or a deterministic sample with replacement.
        let vals: Vec<f32> = if numel <= SAMPLE {
            let mut v = vec![0f32; numel];
            let (mut b, mut x) = (vec![0f32; CHUNK], vec![0f32; CHUNK]);
            for s in (0..numel).step_by(CHUNK) {
                let e = (s + CHUNK).min(numel);
                io.read(0, s..e, &mut b[..e - s])?;
                io.read(1, s..e, &mut x[..e - s])?;
                for j in s..e {
                    v[j] = importance(x[j - s], b[j - s], kl[j / len]);
                }
            }
            v
        } else {
            let key = stream_key(ctx.seed, ctx.tensor, 0xA7CE_F051);
            // The sample's indices grouped by engine chunk (a counting sort: the quantiles
            // do not depend on the order), then each chunk read once, in parallel.
            let nc = numel.div_ceil(CHUNK);
            let mut starts = vec![0usize; nc + 1];
            let idx: Vec<usize> = (0..SAMPLE).map(|i| ((uniform(key, i as u64) * numel as f64) as usize).min(numel - 1)).collect();
            idx.iter().for_each(|&j| starts[j / CHUNK + 1] += 1);
            (0..nc).for_each(|c| starts[c + 1] += starts[c]);
            let mut grouped = vec![0usize; SAMPLE];
            let mut next = starts.clone();
            for &j in &idx {
                grouped[next[j / CHUNK]] = j;
                next[j / CHUNK] += 1;
            }
            drop(idx);
            let parts: Vec<Vec<f32>> = (0..nc)
                .into_par_iter()
                .map(|c| {
                    let ids = &grouped[starts[c]..starts[c + 1]];
                    if ids.is_empty() {
                        return Ok(vec![]);
                    }
                    let (s, e) = (c * CHUNK, ((c + 1) * CHUNK).min(numel));
                    let (mut b, mut x) = (vec![0f32; e - s], vec![0f32; e - s]);
                    io.read(0, s..e, &mut b)?;
                    io.read(1, s..e, &mut x)?;
                    Ok(ids.iter().map(|&j| importance(x[j - s], b[j - s], kl[j / len])).collect())
                })
                .collect::<Result<_>>()?;
            parts.concat()
        };
        let n = vals.len();
        let rank = |f: f32| ((f * (n - 1) as f32) as usize).min(n - 1);
        let keys: Vec<u32> = vals.par_iter().map(|&v| total_key(v)).collect();
        drop(vals);
        let q = select_ranks(&keys, &HighHist::of(&keys), &[rank(0.25), rank(0.5), rank(0.75)]);
        let (q1, med, q3) = (from_total_key(q[0]), from_total_key(q[1]), from_total_key(q[2]));
        let thr = med + 1.5f32 * (q3 - q1);
        let mut out = Vec::with_capacity(1 + rows);
        out.push(thr as f64);
        out.extend(kl.iter().map(|&k| k as f64));
        Ok(out)
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let b = base.expect("arity checked at build");
        let thr = stats[0] as f32;
        let len = row_len(ctx.shape);
        // Row by row: one KL per run, a loop without a lookup per element (vectorizes).
        for_each_run(Layout::Rows { len }, ctx.offset, out.len(), |r, row| {
            let kl = stats[1 + row] as f32;
            for ((o, &x), &bv) in out[r.clone()].iter_mut().zip(&inputs[0][r.clone()]).zip(&b[r]) {
                *o = if importance(x, bv, kl) >= thr { bv + (x - bv) } else { bv };
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{rand, run};
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_outliers() {
        let (r, c) = (40, 50);
        let n = r * c;
        let base = rand(n, 1);
        let noise = rand(n, 2);
        let x: Vec<f32> = (0..n).map(|j| base[j] + 0.01 * noise[j] + if j % 97 == 0 { 1.0 } else { 0.0 }).collect();
        let y = run("arcee_fusion", json!({}), &[r, c], Some(&base), &[&x]).unwrap();
        // Reference in f64 from the formulas.
        let kl: Vec<f64> = (0..r).map(|i| row_kl(&x[i * c..(i + 1) * c], &base[i * c..(i + 1) * c]) as f64).collect();
        let imp: Vec<f64> = (0..n).map(|j| (x[j] - base[j]).abs() as f64 * kl[j / c]).collect();
        let mut s = imp.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let qi = |f: f64| s[(f * (n - 1) as f64) as usize];
        let thr = qi(0.5) + 1.5 * (qi(0.75) - qi(0.25));
        let mut kept = 0;
        for j in 0..n {
            let want = if imp[j] >= thr { x[j] } else { base[j] };
            if (imp[j] - thr).abs() > 1e-6 * thr.abs() {
                assert!((y[j] - want).abs() <= 1e-6 * want.abs().max(1.0), "{j}");
            }
            kept += usize::from(imp[j] >= thr);
        }
        assert!(kept > 0 && kept < n);
        assert!(run("arcee_fusion", json!({}), &[r, c], Some(&base), &[&x, &x]).is_err());
    }

    #[test]
    fn total_keys_order_like_total_cmp() {
        let xs = [f32::NEG_INFINITY, -1.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, f32::INFINITY, f32::NAN, -f32::NAN];
        for &x in &xs {
            assert_eq!(from_total_key(total_key(x)).to_bits(), x.to_bits());
            for &y in &xs {
                assert_eq!(total_key(x).cmp(&total_key(y)), x.total_cmp(&y), "{x} {y}");
            }
        }
    }

    #[test]
    fn sampled_is_deterministic() {
        let n = 1_100_000;
        let base = rand(n, 1);
        let x = rand(n, 2);
        let y1 = run("arcee_fusion", json!({}), &[1100, 1000], Some(&base), &[&x]).unwrap();
        let y2 = run("arcee_fusion", json!({}), &[1100, 1000], Some(&base), &[&x]).unwrap();
        assert_eq!(y1, y2);
    }
}
