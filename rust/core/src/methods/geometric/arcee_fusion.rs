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
//! each block it takes its rows' KL values and the importances of its elements as ordered
//! keys, whose quantiles are radix-selected (exact, as a sort would give them); `apply` runs
//! elementwise on chunks. A sampled tensor of at most [`EVERY_KEY`] elements keeps every
//! element's key and picks the sample's from them; a larger one keeps only the sample's
//! (1,000,000), its indices grouped by block beforehand.
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
use crate::rng::{counter, draw_at, stream_key, WEYL};
use rayon::prelude::*;
use std::sync::Mutex;

pub const SAMPLE: usize = 1_000_000;
/// Samples per piece of the parallel sampling passes.
const PIECE: usize = 1 << 17;

/// Tensors of at most this many elements keep every element's key (4 bytes each), and the
/// sample's keys are picked from them in the sample's own order; larger ones group the sampled
/// indices by block first, so that only the sample's keys are held. Picking is the faster
/// where the keys are few enough to stay near the cores (125M, 2.4M-element tensors: 0.94 →
/// 0.89 s a merge) and the slower where they are not (1.1B, 11.5M: 8.6–9.1 → 9.1–9.5 CPU s).
const EVERY_KEY: usize = 1 << 22;

/// Sample `i`'s element, from `draw(key, i)`: `⌊uniform(key, i)·numel⌋` (in f64).
#[inline(always)]
fn sample_index(draw: u64, numel: usize) -> usize {
    let at = draw as f64 * (1.0 / (1u64 << 53) as f64) * numel as f64;
    // SAFETY: `at` lies in [0, numel], within u64 (the saturating `as` would be scalar code).
    let at: u64 = unsafe { at.to_int_unchecked() };
    (at as usize).min(numel - 1)
}

avx512! {
/// Sampled indices `first..` (of `numel` elements) into `out` (the conversions to and from
/// floats vectorize with AVX-512DQ).
fn sample_indices(key: u64, numel: usize, first: u64, out: &mut [usize]) {
    let mut c = counter(key, first);
    for o in out {
        *o = sample_index(draw_at(c), numel);
        c = c.wrapping_add(WEYL);
    }
}
}

avx512! {
/// The keys of samples `first..`, picked from every element's keys `all`.
fn sampled_keys(key: u64, all: &[u32], first: u64, out: &mut [u32]) {
    // The indices of a batch first (vectorized), then their loads: a loop of loads alone keeps
    // many cache misses in flight.
    let mut idx = [0usize; 256];
    for (b, o) in out.chunks_mut(256).enumerate() {
        let idx = &mut idx[..o.len()];
        sample_indices(key, all.len(), first + (b * 256) as u64, idx);
        o.iter_mut().zip(&*idx).for_each(|(o, &i)| *o = all[i]);
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
    picked: Vec<u32>,
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

/// A row's largest and least values (of a row of at least one entry), as the largest and least
/// of integers ordered as the floats are (sign bit set for the positive, every bit flipped for
/// the negative): integer maxima vectorize in every build, where a fold by `f32::max` waited on
/// each comparison (12% of `rows_kl`'s time). Of zeros of either sign +0 comes back as the
/// largest; a NaN may come back, but then the row's KL is NaN whatever its range.
#[inline(always)]
fn max_min(r: &[f32]) -> (f32, f32) {
    let key = |t: f32| {
        let b = t.to_bits();
        b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
    };
    let value = |k: u32| f32::from_bits(k ^ ((!k as i32 >> 31) as u32 | 0x8000_0000));
    let (hi, lo) = r.iter().fold((0u32, u32::MAX), |(h, l), &t| (h.max(key(t)), l.min(key(t))));
    (value(hi), value(lo))
}

/// The exponentials of four rows, interleaved (entry `j` of row `k` at `4j + k`), reused from
/// group to group.
#[derive(Default)]
struct Buffers {
    ex: Vec<f64>,
    eb: Vec<f64>,
}

thread_local! {
    /// This thread's [`Buffers`], kept from block to block (fresh ones were zeroed for every
    /// block: 4% of a 1.1B merge's time).
    static BUFFERS: std::cell::Cell<Buffers> = const { std::cell::Cell::new(Buffers { ex: Vec::new(), eb: Vec::new() }) };
}

/// The least `min − max` of a row (in f64) whose quotients `e / Σe` are taken by
/// [`Divisor`]: every exponential is then above e^-500 (7e-218) and every quotient above
/// 7e-218 / 2^32, both above [`crate::divisor::MIN_DIVIDEND`].
const RECIPROCAL_RANGE: f64 = -500.0;

/// KL of each row of `x` and `b` (rows of `len`) into `out`. Rows go in groups of four (eight
/// with AVX-512), interleaved so that one vector holds the group's values at an entry: every
/// row's sums still run in element order from the same start, as a row alone would (the bits
/// do not depend on the grouping), but the group's chains of additions advance in one
/// instruction. Missing rows of a group repeat its last one (their lanes are computed and
/// dropped). `exp` and `ln` a vector at a time (`exp_ln`, the C library's bits), the divisions
/// too in the wide builds, and the quotients `e / Σe` by multiplications ([`Divisor`]) where
/// the rows' ranges allow.
fn rows_kl(x: &[f32], b: &[f32], len: usize, buf: &mut Buffers, out: &mut [f32]) {
    rows_kl_by(x, b, len, buf, out, true)
}

/// [`rows_kl`], its quotients `e / Σe` by [`Divisor`] when `reciprocals` allows it and every
/// row's range in a group does (the same bits either way: tested).
fn rows_kl_by(x: &[f32], b: &[f32], len: usize, buf: &mut Buffers, out: &mut [f32], reciprocals: bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        for ((x, b), o) in x.chunks(8 * len).zip(b.chunks(8 * len)).zip(out.chunks_mut(8)) {
            // SAFETY: the features `rows_kl8` is built with were just detected.
            unsafe { x86_512::rows_kl8(x, b, len, &mut buf.ex, o, reciprocals) };
        }
        return;
    }
    for ((x, b), o) in x.chunks(4 * len).zip(b.chunks(4 * len)).zip(out.chunks_mut(4)) {
        rows_kl4(x, b, len, buf, o, reciprocals);
    }
}

avx2! {
/// [`rows_kl_by`] for one to four rows.
fn rows_kl4(x: &[f32], b: &[f32], len: usize, buf: &mut Buffers, out: &mut [f32], reciprocals: bool) {
    let rows = out.len();
    let mut narrow = true;
    // A loop, not a closure: a closure would not inherit the AVX2 build's target features.
    for (v, e) in [(x, &mut buf.ex), (b, &mut buf.eb)] {
        let r: [&[f32]; 4] = std::array::from_fn(|k| &v[k.min(rows - 1) * len..][..len]);
        let (mut m, mut lo) = ([0f64; 4], [0f64; 4]);
        for k in 0..4 {
            let (hi, least) = max_min(r[k]);
            (m[k], lo[k]) = (hi as f64, least as f64);
        }
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

/// [`rows_kl_by`] for one to eight rows with AVX-512: a row per lane, each pass over the
/// entries fused (the inputs gathered across the rows, widened, less the row's maximum,
/// exponentiated and summed; then divided, `ln` taken and summed), so that only the
/// exponentials are stored between them.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::RECIPROCAL_RANGE;
    use crate::divisor::Divisors8;
    use crate::exp_ln::x86_512::{exp8, ln8};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub unsafe fn rows_kl8(x: &[f32], b: &[f32], len: usize, e: &mut Vec<f64>, out: &mut [f32], reciprocals: bool) {
        let rows = out.len();
        let at: [usize; 8] = std::array::from_fn(|k| k.min(rows - 1) * len);
        let starts = _mm512_loadu_si512(at.map(|a| a as i64).as_ptr().cast());
        e.resize(16 * len, 0.0);
        let (ex, eb) = e.split_at_mut(8 * len);
        let mut narrow = true;
        let mut sums = [_mm512_set1_pd(-0.0); 2];
        for ((v, e), s) in [(x, &mut *ex), (b, &mut *eb)].into_iter().zip(&mut sums) {
            let (mut m, mut lo) = ([0f64; 8], [0f64; 8]);
            for k in 0..rows {
                let r = &v[at[k]..][..len];
                let (hi, least) = super::max_min(r);
                (m[k], lo[k]) = (hi as f64, least as f64);
                narrow &= lo[k] - m[k] >= RECIPROCAL_RANGE;
            }
            let last = m[rows - 1];
            m[rows..].fill(last);
            let m = _mm512_loadu_pd(m.as_ptr());
            // The sum in a register (through `s` it went through memory, a store and a load
            // per addition on its chain).
            let (mut idx, mut sum) = (starts, *s);
            for e8 in e.chunks_exact_mut(8) {
                let t = _mm512_cvtps_pd(_mm512_i64gather_ps::<4>(idx, v.as_ptr()));
                let y = exp8(_mm512_sub_pd(t, m));
                _mm512_storeu_pd(e8.as_mut_ptr(), y);
                sum = _mm512_add_pd(sum, y);
                idx = _mm512_add_epi64(idx, _mm512_set1_epi64(1));
            }
            *s = sum;
        }
        let eps = _mm512_set1_pd(1e-8);
        let mut kl = _mm512_setzero_pd();
        let pairs = ex.chunks_exact(8).zip(eb.chunks_exact(8));
        if reciprocals && narrow {
            let (dx, db) = (Divisors8::new(sums[0]), Divisors8::new(sums[1]));
            for (x8, b8) in pairs {
                let p = _mm512_add_pd(dx.divide(_mm512_loadu_pd(x8.as_ptr())), eps);
                let q = _mm512_add_pd(db.divide(_mm512_loadu_pd(b8.as_ptr())), eps);
                kl = _mm512_add_pd(kl, _mm512_mul_pd(p, ln8(_mm512_div_pd(p, q))));
            }
        } else {
            for (x8, b8) in pairs {
                let p = _mm512_add_pd(_mm512_div_pd(_mm512_loadu_pd(x8.as_ptr()), sums[0]), eps);
                let q = _mm512_add_pd(_mm512_div_pd(_mm512_loadu_pd(b8.as_ptr()), sums[1]), eps);
                kl = _mm512_add_pd(kl, _mm512_mul_pd(p, ln8(_mm512_div_pd(p, q))));
            }
        }
        let mut v = [0f64; 8];
        _mm512_storeu_pd(v.as_mut_ptr(), kl);
        out.iter_mut().zip(v).for_each(|(o, kl)| *o = kl as f32);
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
        // Importances: every element, or a deterministic sample with replacement. Above
        // EVERY_KEY elements the sample's indices are grouped by block (a counting sort: the
        // quantiles do not depend on their order), so that a block's importances come from the
        // same read as its rows' KL.
        let mut sc = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let key = stream_key(ctx.seed, ctx.tensor, 0xA7CE_F051);
        let sample = (numel > EVERY_KEY).then(|| {
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
        // Every key is written below: the buffer only grows (zeroing it cost 3% of a 1.1B merge).
        if sc.keys.len() < n {
            sc.keys.resize(n, 0);
        }
        let mut shares = Vec::with_capacity(nb);
        let mut rest: &mut [u32] = &mut sc.keys[..n];
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
                let mut buf = BUFFERS.take();
                rows_kl(x, b, len, &mut buf, kl);
                BUFFERS.set(buf);
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
        let keys = if sample.is_none() && numel > SAMPLE {
            sc.picked.resize(SAMPLE, 0);
            let all = &sc.keys[..n];
            sc.picked.par_chunks_mut(PIECE).enumerate().for_each(|(p, c)| sampled_keys(key, all, (p * PIECE) as u64, c));
            &sc.picked
        } else {
            &sc.keys[..n]
        };
        let n = keys.len();
        let rank = |f: f32| ((f * (n - 1) as f32) as usize).min(n - 1);
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
        for (rows, len) in [(1, 1), (3, 3), (4, 701), (7, 2048), (2, 5), (9, 701), (17, 33)] {
            let n = rows * len;
            let b = rand(n, 5);
            let mut x: Vec<f32> = b.iter().zip(rand(n, 6)).map(|(&b, d)| b + 0.05 * d).collect();
            if n > 4 {
                (x[1], x[n - 2]) = (-900.0, 40.0);
            }
            let outs = crate::simd::each_build(|| {
                let mut out = vec![0f32; rows];
                rows_kl(&x, &b, len, &mut Buffers::default(), &mut out);
                out
            });
            for o in &outs[1..] {
                assert!(o.iter().zip(&outs[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{len}: {o:?} vs {:?}", outs[0]);
            }
        }
    }

    /// A row's range is that of a fold by `f32::max` and `f32::min`: rows of every length up to
    /// 70 (whole blocks of a vector and a remainder) and longer, of both signs, zeros of both
    /// signs, subnormals, infinities, the extremes at every place.
    #[test]
    fn max_min_is_the_rows_range() {
        let specials = [0.0f32, -0.0, 1e-45, -1e-45, f32::MIN_POSITIVE, -3.5, 7.25, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY];
        for len in (1..=70).chain([255, 256, 1000]) {
            for seed in 0..4u64 {
                let mut r: Vec<f32> = rand(len, 20 + seed).iter().map(|v| v * 1e3).collect();
                if seed > 0 {
                    for (i, v) in r.iter_mut().enumerate() {
                        if (i as u64 + seed).is_multiple_of(5) {
                            *v = specials[(i + seed as usize) % specials.len()];
                        }
                    }
                }
                let want = (r.iter().copied().fold(f32::NEG_INFINITY, f32::max), r.iter().copied().fold(f32::INFINITY, f32::min));
                assert_eq!(max_min(&r), want, "{len} entries, seed {seed}: {r:?}");
            }
        }
    }

    /// Both ways of taking the quotients give the same KL bits: row lengths that are and are
    /// not multiples of four, one to four rows, both builds.
    #[test]
    fn reciprocals_give_the_division_kl() {
        for (rows, len) in [(1, 1), (3, 3), (4, 701), (7, 2048), (2, 5), (5, 5632), (11, 97)] {
            let n = rows * len;
            let b: Vec<f32> = rand(n, 11).iter().map(|v| half::bf16::from_f32(v * 0.02).to_f32()).collect();
            let x: Vec<f32> = b.iter().zip(rand(n, 12)).map(|(&b, d)| half::bf16::from_f32(b + 0.002 * d).to_f32()).collect();
            let kl = |reciprocals: bool| {
                let mut out = vec![0f32; rows];
                rows_kl_by(&x, &b, len, &mut Buffers::default(), &mut out, reciprocals);
                out
            };
            for (fast, plain) in crate::simd::each_build(|| (kl(true), kl(false))) {
                assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{len}: {fast:?} vs {plain:?}");
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
                rows_kl(&x, &b, m, &mut buf, &mut kl);
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
