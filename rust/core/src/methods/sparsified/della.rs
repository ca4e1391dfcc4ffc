//! DELLA (Deep et al. 2024) "MagPrune" as mergekit 0.1.5 does it: within each row of `Δ_i`
//! (the last axis of a 2-D tensor; the whole tensor when it has fewer than 2 axes), rank the
//! entries by `|Δ|` ascending (`r = 0 … m−1`, ties by index) and keep each one with probability
//! `p = (density − ε) + 2ε · r/(m−1)`: large entries are more likely kept. density ≥ 1 keeps
//! everything, density ≤ 0 nothing; otherwise `density ± ε` must lie in (0, 1) (mergekit's
//! check). Survivors are then rescaled like DARE (mergekit: L1 norm match by default;
//! `rescale_mode: density` multiplies by `1/density`, the mean keep probability — the DELLA
//! paper's per-entry `1/p` is not offered).
//!
//! Departures (both where mergekit cannot run or is ill-defined): a row of one entry is kept
//! with probability `density` (mergekit divides 0 by 0); tensors with more than 2 axes are
//! ranked along their flattened trailing axes (mergekit ranks along axis 1).
//!
//! The draw for element `g` of model `i` is `uniform(stream_key(seed, tensor, i), g) < p`.
//! `prepare` decides row by row (bounded buffers; an element's exact rank only where its draw
//! and its key's bucket leave the decision open, see `keep_bits`) and stores the keep mask as
//! bits (1/32 of an f32 tensor per model), so `apply` stays elementwise.
use super::dare::{coin_words, draws};
use super::gta::{Mode, Sparsifier};
use super::select::radix_sort_pairs;
use super::sparsify::{bits, mag_key};
use crate::error::{Error, Result};
use crate::kernel::CHUNK;
use crate::kernel::{Ctx, TensorIo};
use crate::params::Params;
use crate::rng::{below, stream_key};
use crate::simd::{avx2, avx512};
use rayon::prelude::*;

pub struct MagPrune {
    density: Vec<f64>,
    epsilon: Vec<f64>,
}

impl MagPrune {
    pub fn build(name: &str, p: &Params, n: usize) -> Result<Self> {
        let density = super::ties::densities(name, p, n)?;
        let epsilon = p.per_model("epsilon", n)?;
        for (&d, &e) in density.iter().zip(&epsilon) {
            if d > 0.0 && d < 1.0 && (d + e >= 1.0 || d - e <= 0.0) {
                return Err(Error::config(format!(
                    "{name}: epsilon must be chosen such that density ± epsilon is in (0, 1); got density {d}, epsilon {e}"
                )));
            }
        }
        Ok(MagPrune { density, epsilon })
    }

    /// Row length used for ranking.
    pub fn row_len(shape: &[usize], numel: usize) -> usize {
        if shape.len() < 2 {
            numel.max(1)
        } else {
            shape[1..].iter().product::<usize>().max(1)
        }
    }
}

/// Keep probability of rank `r` (0-based, ascending |Δ|) in a row of `m`.
#[inline]
pub fn keep_prob(r: usize, m: usize, density: f64, eps: f64) -> f64 {
    if m <= 1 {
        return density;
    }
    (density - eps) + (r as f64 / (m - 1) as f64) * 2.0 * eps
}

/// Keep decisions for the rows in `[start, end)` (whole rows of `m`), as bits of `out` (element
/// `start + j` is bit `j`; `out` starts zeroed), read in engine-chunk pieces.
fn rows_kept(io: &dyn TensorIo, i: usize, rows: (usize, usize), m: usize, key: u64, thresholds: &[u64], out: &mut [u32]) -> Result<()> {
    let (start, end) = rows;
    let (mut b, mut x) = (Vec::new(), Vec::new());
    let mut sc = RowScratch::default();
    let mut row_bits = vec![0u32; m.div_ceil(32)];
    for row in (start..end).step_by(m) {
        sc.keys.clear();
        for s in (row..row + m).step_by(CHUNK) {
            let t = (s + CHUNK).min(row + m);
            b.resize(t - s, 0f32);
            x.resize(t - s, 0f32);
            io.read(0, s..t, &mut b)?;
            io.read(i + 1, s..t, &mut x)?;
            sc.keys.extend(x.iter().zip(&b).map(|(&x, &b)| mag_key(x - b)));
        }
        keep_bits(key, row as u64, thresholds, SCANS, &mut sc, &mut row_bits);
        bits::or_at(out, row - start, &row_bits);
    }
    Ok(())
}

const BUCKETS: usize = 1 << 12;

/// A row's buffers, reused from row to row.
struct RowScratch {
    keys: Vec<u32>,
    /// Per bucket of keys, its count (two sets).
    counts: Box<[[u32; BUCKETS]; 2]>,
    /// Per bucket of keys, its first rank (prefix sums of the bucket counts).
    start: Vec<u32>,
    /// Elements whose decision needs their exact rank.
    exact: Vec<u32>,
    /// The row's draws, and per word of 32 the bits of those its rank decides.
    draws: Vec<u64>,
    band: Vec<u32>,
    words: Vec<u64>,
    tmp: Vec<u64>,
}

impl Default for RowScratch {
    fn default() -> Self {
        let (counts, start, exact, draws, band) = (Box::new([[0; BUCKETS]; 2]), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        RowScratch { keys: Vec::new(), counts, start, exact, draws, band, words: Vec::new(), tmp: Vec::new() }
    }
}

avx2! {
/// The rank of element `j` of `keys` by key and index: a pass over the row (u32 counts: eight
/// lanes in the AVX2 build).
fn rank(keys: &[u32], j: usize) -> usize {
    let kj = keys[j];
    let below = keys[..j].iter().map(|&k| u32::from(k <= kj)).sum::<u32>();
    (below + keys[j + 1..].iter().map(|&k| u32::from(k < kj)).sum::<u32>()) as usize
}
}

avx512! {
/// Per word of 32 draws, the bits of those below `lo` into `keep` and of those in `lo..hi` into
/// `band` (branch-free: the comparisons vectorize).
fn split_draws(us: &[u64], lo: u64, hi: u64, keep: &mut [u32], band: &mut [u32]) {
    for ((k, d), us) in keep.iter_mut().zip(band.iter_mut()).zip(us.chunks(32)) {
        *k = us.iter().zip(0..32).fold(0, |w, (&u, b)| w | (u32::from(u < lo) << b));
        *d = us.iter().zip(0..32).fold(0, |w, (&u, b)| w | (u32::from(u >= lo && u < hi) << b));
    }
}
}

/// `keep_bits`' limit on the elements ranked one by one in a row.
const SCANS: usize = 32;

/// The keep bits of one row (`sc.keys`, the `|Δ|` keys of elements `first..first + m`) into
/// `out`: element `j` is kept when `draw(key, first + j) < thresholds[r]`, `r` its rank in the
/// row ordered by key and, among equal keys, by index.
///
/// Most decisions need no rank: the thresholds grow with the rank, so an element whose key
/// lies in a bucket of ranks `lo..=hi` (a histogram of the keys' high bits) is kept when its
/// draw is below the threshold of `lo` and dropped when it is not below that of `hi`. Only
/// draws between the two (a bucket's share of the `2ε` band) need the exact rank: counted
/// over the row for a few, from a sort of the row when there are many. The decisions are
/// those of ranking every element. `t` must not decrease (ε ≥ 0). At most `scans` elements
/// are ranked one by one (a pass over the row each); past that the row is sorted.
fn keep_bits(key: u64, first: u64, t: &[u64], scans: usize, sc: &mut RowScratch, out: &mut [u32]) {
    let keys = &sc.keys;
    let m = keys.len();
    debug_assert!(t.len() == m && t.windows(2).all(|w| w[0] <= w[1]));
    let k0 = keys[0];
    let differ = keys.iter().fold(0u32, |d, &k| d | (k ^ k0));
    if differ == 0 {
        // One key: the ranks are the indices.
        return coin_words(key, first, &t[..m], out);
    }
    // Buckets on the highest differing bits: one per one or two elements, at most 4096 (more
    // buckets, fewer exact ranks; fewer, less work per row).
    let hi = 32 - differ.leading_zeros();
    let nbits = hi.min(usize::BITS - 1 - m.leading_zeros()).clamp(1, BUCKETS.trailing_zeros());
    let (shift, mask) = (hi - nbits, (1u32 << nbits) - 1);
    let bucket = |k: u32| ((k >> shift) & mask) as usize & (BUCKETS - 1);
    let nb = 1usize << nbits;
    // Counted in two sets (even and odd entries): runs of one key would otherwise make each
    // increment wait for the previous one's store.
    let counts = &mut *sc.counts;
    counts.iter_mut().for_each(|c| c[..nb].fill(0));
    let mut pairs = keys.chunks_exact(2);
    for p in &mut pairs {
        counts[0][bucket(p[0])] += 1;
        counts[1][bucket(p[1])] += 1;
    }
    for &k in pairs.remainder() {
        counts[0][bucket(k)] += 1;
    }
    // Prefix sums: bucket `b` holds ranks `start[b]..start[b + 1]`.
    sc.start.clear();
    sc.start.push(0);
    let mut lo = 0u32;
    sc.start.extend(counts[0][..nb].iter().zip(&counts[1][..nb]).map(|(a, b)| {
        lo += a + b;
        lo
    }));
    let start = &sc.start;
    sc.exact.resize(m.max(sc.exact.len()), 0);
    sc.draws.resize(m, 0);
    sc.band.resize(out.len(), 0);
    draws(key, first, &mut sc.draws);
    // Draws below the lowest threshold keep their entry and those not below the highest drop
    // it, whatever the rank (four in five, at ε = 0.1); the rest are decided by their bucket.
    split_draws(&sc.draws, t[0], t[m - 1], out, &mut sc.band);
    let (exact, us, mut n) = (&mut sc.exact[..m], &sc.draws, 0);
    for ((w, &band), j0) in out.iter_mut().zip(&sc.band).zip((0usize..).step_by(32)) {
        let mut rest = band;
        while rest != 0 {
            let b = rest.trailing_zeros();
            rest &= rest - 1;
            let j = j0 + b as usize;
            let u = us[j];
            // The thresholds of the bucket's first and last rank.
            let bk = bucket(keys[j]);
            let (tl, th) = (t[start[bk] as usize], t[start[bk + 1] as usize - 1]);
            *w |= u32::from(u < tl) << b;
            exact[n] = j as u32;
            n += usize::from(u >= tl && u < th);
        }
    }
    let exact = &sc.exact[..n];
    let us = &sc.draws;
    let mut decide = |j: u32, r: usize| bits::set(out, j as usize, us[j as usize] < t[r]);
    if n <= scans {
        for &j in exact {
            decide(j, rank(keys, j as usize));
        }
    } else {
        sc.words.clear();
        sc.words.extend(keys.iter().zip(0u64..).map(|(&k, j)| (u64::from(k) << 32) | j));
        radix_sort_pairs(&mut sc.words, &mut sc.tmp);
        // The row's ranks by index, in `tmp` (free after the sort).
        for (r, &w) in sc.words.iter().enumerate() {
            sc.tmp[(w & 0xFFFF_FFFF) as usize] = r as u64;
        }
        for &j in exact {
            decide(j, sc.tmp[j as usize] as usize);
        }
    }
}

impl Sparsifier for MagPrune {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)> {
        let (d, e) = (self.density[i], self.epsilon[i]);
        if d >= 1.0 {
            return Ok((Mode::Keep, vec![]));
        }
        if d <= 0.0 {
            return Ok((Mode::Drop, vec![]));
        }
        let numel = io.numel();
        let m = Self::row_len(ctx.shape, numel);
        if m > u32::MAX as usize {
            return Err(Error::config(format!("{}: rows of {m} entries are too long to rank", ctx.tensor)));
        }
        // Blocks of whole rows, a multiple of 32 rows so that each starts on a word of the mask
        // and fills its own words (in parallel, no merge step).
        let block = (CHUNK / m).max(1).next_multiple_of(32) * m;
        let key = stream_key(ctx.seed, ctx.tensor, i as u64);
        // Per rank, the integer threshold of its coin (rng::below): no division or float draw per
        // entry. They grow with the rank (ε ≥ 0 by the parameter's range), as keep_bits needs.
        let thresholds: Vec<u64> = (0..m).map(|r| below(keep_prob(r, m, d, e))).collect();
        let mut words = vec![0u32; numel.div_ceil(32)];
        words.par_chunks_mut(block / 32).enumerate().try_for_each(|(n, out)| {
            let s = n * block;
            rows_kept(io, i, (s, (s + block).min(numel)), m, key, &thresholds, out)
        })?;
        Ok((Mode::Partial, words.into_iter().map(|w| w as f64).collect()))
    }

    fn mask(&self, ctx: &Ctx, _: usize, _: usize, state: &[f64], delta: &mut [f32]) {
        bits::mask(state, ctx.offset, delta);
    }

    fn density(&self, i: usize) -> f64 {
        self.density[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::draw;
    use proptest::prelude::*;

    #[test]
    fn probabilities() {
        assert_eq!(keep_prob(0, 5, 0.5, 0.1), 0.4);
        assert!((keep_prob(4, 5, 0.5, 0.1) - 0.6).abs() < 1e-12);
        assert!((keep_prob(2, 5, 0.5, 0.1) - 0.5).abs() < 1e-12);
        assert_eq!(keep_prob(0, 1, 0.5, 0.1), 0.5);
        assert_eq!(MagPrune::row_len(&[4, 8], 32), 8);
        assert_eq!(MagPrune::row_len(&[32], 32), 32);
        assert_eq!(MagPrune::row_len(&[2, 3, 4], 24), 12);
    }

    /// The decisions of ranking every element: the row sorted by (key, index).
    fn keep_by_sort(keys: &[u32], key: u64, first: u64, t: &[u64]) -> Vec<bool> {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by_key(|&j| (keys[j], j));
        let mut kept = vec![false; keys.len()];
        for (r, &j) in order.iter().enumerate() {
            kept[j] = draw(key, first + j as u64) < t[r];
        }
        kept
    }

    fn row_keys() -> impl Strategy<Value = Vec<u32>> {
        let gauss = (1usize..3000, any::<u64>()).prop_map(|(m, s)| (0..m).map(|j| mag_key(crate::rng::normal(s, j as u64) as f32 * 0.002)).collect());
        // bf16 values' differences: keys with zero low mantissa bits and many ties.
        let bf16 = (1usize..3000, any::<u64>()).prop_map(|(m, s)| {
            let r = |x: f64| half::bf16::from_f64(x).to_f32();
            (0..m).map(|j| mag_key(r(crate::rng::normal(s, 2 * j as u64) * 0.02) - r(crate::rng::normal(s, 2 * j as u64 + 1) * 0.02))).collect()
        });
        let few = prop::collection::vec(0u32..4, 1..600);
        let one = (1usize..300, any::<u32>()).prop_map(|(m, k)| vec![k; m]);
        prop_oneof![gauss, bf16, few, one, prop::collection::vec(any::<u32>(), 1..300)]
    }

    proptest! {
        #[test]
        fn keep_bits_match_ranking_every_element(keys in row_keys(), key in any::<u64>(), first in 0u64..1 << 40,
                                                 d in 0.05f64..0.95, e in 0.0f64..1.0) {
            let m = keys.len();
            let e = e * d.min(1.0 - d);
            let t: Vec<u64> = (0..m).map(|r| below(keep_prob(r, m, d, e))).collect();
            let want = keep_by_sort(&keys, key, first, &t);
            for scans in [0, SCANS, usize::MAX] {
                let mut sc = RowScratch { keys: keys.clone(), ..Default::default() };
                let mut out = vec![u32::MAX; m.div_ceil(32)];
                keep_bits(key, first, &t, scans, &mut sc, &mut out);
                for (j, &w) in want.iter().enumerate() {
                    prop_assert_eq!((out[j / 32] >> (j % 32)) & 1 == 1, w, "element {} of {}, scans {}", j, m, scans);
                }
                prop_assert_eq!(out[m / 32..].iter().map(|w| w.count_ones()).sum::<u32>(), want[m / 32 * 32..].iter().filter(|&&k| k).count() as u32);
            }
        }
    }

    /// `cargo test --profile quick -p merge_fast_core della_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn della_timing() {
        let r = |x: f64| half::bf16::from_f64(x).to_f32();
        for m in [2048usize, 5632] {
            let rows = (1 << 24) / m;
            let keys: Vec<u32> = (0..rows * m)
                .map(|j| {
                    let b = r(crate::rng::normal(3, j as u64) * 0.02);
                    mag_key(r(b as f64 + crate::rng::normal(4, j as u64) * 0.002) - b)
                })
                .collect();
            let t: Vec<u64> = (0..m).map(|r| below(keep_prob(r, m, 0.5, 0.1))).collect();
            let mut out = vec![0u32; m / 32];
            for _ in 0..3 {
                let mut sc = RowScratch::default();
                let now = std::time::Instant::now();
                for (row, ks) in keys.chunks(m).enumerate() {
                    sc.keys.clear();
                    sc.keys.extend_from_slice(ks);
                    keep_bits(7, (row * m) as u64, &t, SCANS, &mut sc, &mut out);
                }
                let new = now.elapsed().as_secs_f64() * 1e9 / keys.len() as f64;
                let (mut words, mut tmp, mut by_index) = (Vec::new(), Vec::new(), vec![0u64; m]);
                let now = std::time::Instant::now();
                for (row, ks) in keys.chunks(m).enumerate() {
                    words.clear();
                    words.extend(ks.iter().zip(0u64..).map(|(&k, j)| (u64::from(k) << 32) | j));
                    radix_sort_pairs(&mut words, &mut tmp);
                    for (&w, &t) in words.iter().zip(&t) {
                        by_index[(w & 0xFFFF_FFFF) as usize] = t;
                    }
                    coin_words(7, (row * m) as u64, &by_index, &mut out);
                }
                let old = now.elapsed().as_secs_f64() * 1e9 / keys.len() as f64;
                println!("m {m}: keep_bits {new:.2} ns/element, sort {old:.2}");
            }
        }
    }
}
