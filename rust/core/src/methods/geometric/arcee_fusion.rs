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
//! Memory: `prepare` reads blocks of whole rows (about a chunk, two slots) in parallel; from
//! each block it takes its rows' KL values and the importances of its elements (or of the
//! sampled ones among them, grouped by block beforehand), written as ordered keys into their
//! places in one buffer of at most 1,000,000, whose quantiles are radix-selected (exact, as a
//! sort would give them); `apply` runs elementwise on chunks.
use super::common::{for_each_run, Layout};
use crate::divisor::Divisor;
use crate::error::Result;
use crate::exp_ln;
use crate::kernel::CHUNK;
use crate::kernel::{with_work, Ctx, Method, TensorIo};
use crate::methods::sparsified::select::{counts, from_total_key, select_ranks, total_key, HighHist};
use crate::params::{BaseRule, MethodSpec, Params};
use crate::simd::{avx2, avx512};

pub fn spec() -> MethodSpec {
    MethodSpec::new("arcee_fusion", BaseRule::Required, |p, n, b| Ok(Box::new(ArceeFusion::build(p, n, b)?))).models(1, Some(1)).mergekit()
}
use crate::rng::{stream_key, uniform};
use rayon::prelude::*;
use std::sync::Mutex;

pub const SAMPLE: usize = 1_000_000;
/// Samples per piece of the parallel sampling passes.
const PIECE: usize = 1 << 17;

avx512! {
/// Sampled indices `first..` (of `numel` elements) into `out` (the conversions to and from
/// floats vectorize with AVX-512DQ).
fn sample_indices(key: u64, numel: usize, first: u64, out: &mut [usize]) {
    for (o, i) in out.iter_mut().zip(first..) {
        *o = ((uniform(key, i) * numel as f64) as usize).min(numel - 1);
    }
}
}

/// `j / d` by a multiply where `j` and `d` are below 2^32 (a sampled index's block, twice per
/// sample, and its row): with `m = ⌈2^64 / d⌉`, `j·m / 2^64` exceeds `j / d` by less than `2^-32 < 1/d`,
/// never reaching the next integer. A division otherwise.
#[derive(Clone, Copy)]
struct DivBy {
    d: usize,
    /// 0: divide.
    m: u64,
}

impl DivBy {
    fn new(d: usize) -> DivBy {
        let m = if (2..1 << 32).contains(&d) { u64::MAX / d as u64 + 1 } else { 0 };
        DivBy { d, m }
    }

    #[inline]
    fn of(self, j: usize) -> usize {
        if self.m != 0 && j < 1 << 32 {
            ((j as u128 * self.m as u128) >> 64) as usize
        } else {
            j / self.d
        }
    }
}

pub struct ArceeFusion {
    /// Sampling buffers (several MB) reused from tensor to tensor: fresh ones cost a page
    /// fault per 4 KiB each time (the allocator hands such blocks back to the system), which
    /// quadrupled the merge's page faults.
    scratch: Mutex<Vec<Scratch>>,
}

#[derive(Default)]
struct Scratch {
    idx: Vec<usize>,
    grouped: Vec<usize>,
    keys: Vec<u32>,
}

impl Drop for ArceeFusion {
    fn drop(&mut self) {
        counts::release(); // the histograms' buffers live as long as the merge's kernel
    }
}

impl ArceeFusion {
    pub fn build(_p: &Params, _n: usize, _has_base: bool) -> Result<Self> {
        Ok(ArceeFusion { scratch: Mutex::new(Vec::new()) })
    }
}

fn row_len(shape: &[usize]) -> usize {
    match Layout::last_dim(shape) {
        Layout::Rows { len } => len,
        Layout::Cols { .. } => unreachable!(),
    }
}

/// KL(softmax(x) + 1e-8 ‖ softmax(b) + 1e-8) of one row.
pub fn row_kl(x: &[f32], b: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    let mut kl = [0f32];
    rows_kl(x, b, x.len(), &mut Buffers::default(), &mut kl);
    kl[0]
}

/// The exponentials of four rows, interleaved (entry `j` of row `k` at `4j + k`), reused from
/// group to group.
#[derive(Default)]
struct Buffers {
    ex: Vec<f64>,
    eb: Vec<f64>,
}

/// The least `min − max` of a row (in f64) whose quotients `e / Σe` are taken by
/// [`Divisor`]: every exponential is then above e^-500 (7e-218) and every quotient above
/// 7e-218 / 2^32, both above [`crate::divisor::MIN_DIVIDEND`].
const RECIPROCAL_RANGE: f64 = -500.0;

/// KL of each of the (one to four) rows of `x` and `b` into `out`. The rows are interleaved,
/// so that one vector holds the four rows' values at an entry: every row's sums still run in
/// element order from the same start, as a row alone would (the bits do not depend on the
/// grouping), but the four chains of additions advance in one instruction. Missing rows repeat
/// the last one (their lanes are computed and dropped). `exp` and `ln` four at a time
/// (`exp_ln`, the C library's bits), the divisions too in the AVX2 build, and the quotients
/// `e / Σe` by multiplications ([`Divisor`]) where the rows' ranges allow.
fn rows_kl(x: &[f32], b: &[f32], len: usize, buf: &mut Buffers, out: &mut [f32]) {
    rows_kl_by(x, b, len, buf, out, true)
}

avx2! {
/// [`rows_kl`], its quotients `e / Σe` by [`Divisor`] when `reciprocals` allows it and every
/// row's range does (the same bits either way: tested).
fn rows_kl_by(x: &[f32], b: &[f32], len: usize, buf: &mut Buffers, out: &mut [f32], reciprocals: bool) {
    let rows = out.len();
    let mut narrow = true;
    // A loop, not a closure: a closure would not inherit the AVX2 build's target features.
    for (v, e) in [(x, &mut buf.ex), (b, &mut buf.eb)] {
        let r: [&[f32]; 4] = std::array::from_fn(|k| &v[k.min(rows - 1) * len..][..len]);
        let (m, lo) = (r.map(|r| r.iter().fold(f32::NEG_INFINITY, |m, &t| m.max(t)) as f64), r.map(|r| r.iter().fold(f32::INFINITY, |m, &t| m.min(t)) as f64));
        narrow &= (0..4).all(|k| lo[k] - m[k] >= RECIPROCAL_RANGE);
        e.resize(4 * len, 0.0);
        for (j, e4) in e.chunks_exact_mut(4).enumerate() {
            for k in 0..4 {
                e4[k] = r[k][j] as f64 - m[k];
            }
        }
        exp_ln::exp_all(e);
    }
    let (mut sx, mut sb) = ([-0.0f64; 4], [-0.0f64; 4]);
    for (x4, b4) in buf.ex.chunks_exact(4).zip(buf.eb.chunks_exact(4)) {
        for k in 0..4 {
            sx[k] += x4[k];
            sb[k] += b4[k];
        }
    }
    // p into `ex`, then ln(p/q) into `eb`.
    if reciprocals && narrow {
        let (dx, db) = (sx.map(Divisor::new), sb.map(Divisor::new));
        for (x4, b4) in buf.ex.chunks_exact_mut(4).zip(buf.eb.chunks_exact_mut(4)) {
            for k in 0..4 {
                let p = dx[k].divide(x4[k]) + 1e-8;
                let q = db[k].divide(b4[k]) + 1e-8;
                (x4[k], b4[k]) = (p, p / q);
            }
        }
    } else {
        for (x4, b4) in buf.ex.chunks_exact_mut(4).zip(buf.eb.chunks_exact_mut(4)) {
            for k in 0..4 {
                let p = x4[k] / sx[k] + 1e-8;
                let q = b4[k] / sb[k] + 1e-8;
                (x4[k], b4[k]) = (p, p / q);
            }
        }
    }
    exp_ln::ln_all(&mut buf.eb);
    let mut kl = [0f64; 4];
    for (p4, l4) in buf.ex.chunks_exact(4).zip(buf.eb.chunks_exact(4)) {
        for k in 0..4 {
            kl[k] += p4[k] * l4[k];
        }
    }
    out.iter_mut().zip(kl).for_each(|(o, kl)| *o = kl as f32);
}
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
        let nb = rows.div_ceil(per);
        // Importances: every element, or a deterministic sample with replacement, its indices
        // grouped by block (a counting sort: the quantiles do not depend on their order), so
        // that a block's importances come from the same read as its rows' KL.
        let mut sc = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let sample = (numel > SAMPLE).then(|| {
            let key = stream_key(ctx.seed, ctx.tensor, 0xA7CE_F051);
            let block = DivBy::new(per * len);
            // The indices in pieces, in parallel; each piece's count per block; then the pieces
            // scattered in parallel into disjoint slices laid out block by block (a counting sort
            // on one thread waited the other core out for a tenth of the merge).
            sc.idx.resize(SAMPLE, 0);
            sc.idx.par_chunks_mut(PIECE).enumerate().for_each(|(p, c)| sample_indices(key, numel, (p * PIECE) as u64, c));
            let counts: Vec<Vec<usize>> = sc
                .idx
                .par_chunks(PIECE)
                .map(|c| {
                    let mut h = vec![0usize; nb];
                    c.iter().for_each(|&j| h[block.of(j)] += 1);
                    h
                })
                .collect();
            sc.grouped.resize(SAMPLE, 0);
            let mut starts = Vec::with_capacity(nb + 1);
            let mut slices: Vec<Vec<&mut [usize]>> = counts.iter().map(|_| Vec::with_capacity(nb)).collect();
            let mut rest: &mut [usize] = &mut sc.grouped;
            for b in 0..nb {
                starts.push(SAMPLE - rest.len());
                for (h, s) in counts.iter().zip(&mut slices) {
                    let (mine, after) = std::mem::take(&mut rest).split_at_mut(h[b]);
                    s.push(mine);
                    rest = after;
                }
            }
            starts.push(SAMPLE);
            slices.into_par_iter().zip(sc.idx.par_chunks(PIECE)).for_each(|(mut s, c)| {
                let mut at = vec![0usize; nb];
                for &j in c {
                    let b = block.of(j);
                    s[b][at[b]] = j;
                    at[b] += 1;
                }
            });
            (starts, &sc.grouped)
        });
        // Each block's rows' KL and its share of the importances' keys, written in place.
        let n = if sample.is_some() { SAMPLE } else { numel };
        sc.keys.clear();
        sc.keys.resize(n, 0);
        let mut shares = Vec::with_capacity(nb);
        let mut rest: &mut [u32] = &mut sc.keys;
        for bi in 0..nb {
            let k = match &sample {
                None => ((bi + 1) * per * len).min(numel) - bi * per * len,
                Some((starts, _)) => starts[bi + 1] - starts[bi],
            };
            let (mine, after) = std::mem::take(&mut rest).split_at_mut(k);
            shares.push(mine);
            rest = after;
        }
        let mut kl = vec![0f32; rows];
        let row = DivBy::new(len);
        kl.par_chunks_mut(per).zip(shares).enumerate().try_for_each(|(bi, (kl, keys))| {
            let (r0, r1) = (bi * per, ((bi + 1) * per).min(rows));
            let span = r0 * len..(r1 * len).min(numel);
            // The thread's work buffer: fresh ones were zeroed and page-faulted per block.
            with_work(2 * span.len(), |w| {
                let (b, x) = w.split_at_mut(span.len());
                io.read(0, span.clone(), b)?;
                io.read(1, span.clone(), x)?;
                let (b, x) = (&*b, &*x);
                let mut buf = Buffers::default();
                for ((x, b), kl) in x.chunks(4 * len).zip(b.chunks(4 * len)).zip(kl.chunks_mut(4)) {
                    rows_kl(x, b, len, &mut buf, kl);
                }
                match &sample {
                    None => {
                        for (((xr, br), &k), kr) in x.chunks(len).zip(b.chunks(len)).zip(&*kl).zip(keys.chunks_mut(len)) {
                            kr.iter_mut().zip(xr.iter().zip(br)).for_each(|(o, (&x, &b))| *o = total_key(importance(x, b, k)));
                        }
                    }
                    Some((starts, grouped)) => {
                        for (o, &j) in keys.iter_mut().zip(&grouped[starts[bi]..starts[bi + 1]]) {
                            let i = j - span.start;
                            *o = total_key(importance(x[i], b[i], kl[row.of(i)]));
                        }
                    }
                }
                Ok(())
            })
        })?;
        let rank = |f: f32| ((f * (n - 1) as f32) as usize).min(n - 1);
        let keys = &sc.keys;
        let q = select_ranks(keys, &HighHist::of(keys), &[rank(0.25), rank(0.5), rank(0.75)]);
        self.scratch.lock().unwrap_or_else(|e| e.into_inner()).push(sc);
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
        // Reference in f64 from the formulas, with the standard library's exp and ln.
        let kl_ref = |x: &[f32], b: &[f32]| {
            let soft = |v: &[f32]| {
                let m = v.iter().fold(f32::NEG_INFINITY, |m, &t| m.max(t)) as f64;
                let e: Vec<f64> = v.iter().map(|&t| (t as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |e| e / s + 1e-8)
            };
            soft(x).zip(soft(b)).map(|(p, q)| p * (p / q).ln()).sum::<f64>() as f32
        };
        let kl: Vec<f64> = (0..r)
            .map(|i| {
                let (xr, br) = (&x[i * c..(i + 1) * c], &base[i * c..(i + 1) * c]);
                let (got, want) = (row_kl(xr, br), kl_ref(xr, br));
                assert!((got - want).abs() <= 1e-6 * want.abs(), "row {i}: {got} vs {want}");
                got as f64
            })
            .collect();
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

    /// The AVX2 pass gives the baseline's bits: groups of one to four rows, rows whose length
    /// is not a multiple of four, lanes off exp's common path (entries far below the row's
    /// maximum) and ratios p/q far from 1.
    #[test]
    fn both_builds_give_the_same_kl() {
        for (rows, len) in [(1, 1), (3, 3), (4, 701), (7, 2048), (2, 5)] {
            let n = rows * len;
            let b = rand(n, 5);
            let mut x: Vec<f32> = b.iter().zip(rand(n, 6)).map(|(&b, d)| b + 0.05 * d).collect();
            if n > 4 {
                (x[1], x[n - 2]) = (-900.0, 40.0);
            }
            let kl = |wide: bool| {
                crate::simd::baseline_only(!wide);
                let mut out = vec![0f32; rows];
                let mut buf = Buffers::default();
                for ((x, b), o) in x.chunks(4 * len).zip(b.chunks(4 * len)).zip(out.chunks_mut(4)) {
                    rows_kl(x, b, len, &mut buf, o);
                }
                crate::simd::baseline_only(false);
                out
            };
            let (wide, plain) = (kl(true), kl(false));
            assert!(wide.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{len}: {wide:?} vs {plain:?}");
        }
    }

    /// Both ways of taking the quotients give the same KL bits: row lengths that are and are
    /// not multiples of four, one to four rows, both builds.
    #[test]
    fn reciprocals_give_the_division_kl() {
        for (rows, len) in [(1, 1), (3, 3), (4, 701), (7, 2048), (2, 5), (5, 5632)] {
            let n = rows * len;
            let b: Vec<f32> = rand(n, 11).iter().map(|v| half::bf16::from_f32(v * 0.02).to_f32()).collect();
            let x: Vec<f32> = b.iter().zip(rand(n, 12)).map(|(&b, d)| half::bf16::from_f32(b + 0.002 * d).to_f32()).collect();
            for wide in [true, false] {
                crate::simd::baseline_only(!wide);
                let kl = |reciprocals: bool| {
                    let mut out = vec![0f32; rows];
                    let mut buf = Buffers::default();
                    for ((x, b), o) in x.chunks(4 * len).zip(b.chunks(4 * len)).zip(out.chunks_mut(4)) {
                        rows_kl_by(x, b, len, &mut buf, o, reciprocals);
                    }
                    out
                };
                let (fast, plain) = (kl(true), kl(false));
                crate::simd::baseline_only(false);
                assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{len}, wide {wide}: {fast:?} vs {plain:?}");
            }
        }
    }

    /// `cargo test --profile quick -p merge_fast_core arcee_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn arcee_timing() {
        let r = |x: f64| half::bf16::from_f64(x).to_f32();
        for m in [2048usize, 5632] {
            let n = (1 << 22) / m * m;
            let b: Vec<f32> = (0..n).map(|j| r(crate::rng::normal(3, j as u64) * 0.02)).collect();
            let x: Vec<f32> = b.iter().enumerate().map(|(j, &b)| r(b as f64 + crate::rng::normal(4, j as u64) * 0.002)).collect();
            let mut kl = vec![0f32; n / m];
            let mut buf = Buffers::default();
            let mut best = f64::MAX;
            for _ in 0..15 {
                let now = std::time::Instant::now();
                for ((x, b), kl) in x.chunks(4 * m).zip(b.chunks(4 * m)).zip(kl.chunks_mut(4)) {
                    rows_kl(x, b, m, &mut buf, kl);
                }
                best = best.min(now.elapsed().as_secs_f64() * 1e9 / n as f64);
            }
            println!("m {m}: rows_kl {best:.2} ns/element (minimum of 15 runs)");
        }
    }

    #[test]
    fn div_by_divides() {
        let js = [0usize, 1, 2, 3, 65535, 65536, 720895, 720896, (1 << 31) - 1, 1 << 31, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, 1 << 40];
        for d in [1usize, 2, 3, 7, 2048, 65536, 720896, (1 << 31) + 1, (1 << 32) - 1, 1 << 32, (1 << 32) + 3] {
            let by = DivBy::new(d);
            let more = (0..10_000u64).map(|i| (crate::rng::mix64(i ^ d as u64) >> 32) as usize);
            for j in js.into_iter().chain(js.map(|j| j.saturating_sub(d) + d / 2)).chain(more) {
                assert_eq!(by.of(j), j / d, "{j} / {d}");
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
