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
//! `prepare` decides row by row, every model in one pass that reads the base once (bounded
//! buffers; an element's exact rank only where its draw and its key's bucket leave the
//! decision open, see `keep_bits`), and stores the keep masks as bits (1/32 of an f32 tensor
//! per model), so `apply` stays elementwise. The same pass measures the rescale norms (in the
//! order of gta's own pass, which it then spares) where its blocks of rows can be whole
//! engine chunks.
use super::dare::{coin_words, draws};
use super::gta::{Mode, Prepared, Sparsifier};
use super::norms::{l1_any_order, l1_sums, sums_of_four, Keys};
use super::select::radix_sort_pairs;
use super::sparsify::{bits, mag_key, Rescale};
use crate::error::{Error, Result};
use crate::kernel::CHUNK;
use crate::kernel::{Ctx, TensorIo};
use crate::params::Params;
use crate::rng::{below, stream_key};
use crate::simd::{avx2, avx512};
use rayon::prelude::*;
use std::cell::Cell;

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

/// One model's share of a block of rows.
struct BlockModel<'a> {
    slot: usize,
    key: u64,
    thresholds: &'a [u64],
    /// The block's mask words (zeroed on entry).
    out: &'a mut [u32],
}

/// The keep decisions of every model for the rows in `[start, end)` (whole rows of `m`), as
/// bits of each model's `out` (element `start + j` is bit `j`), read in engine-chunk pieces, the
/// base once for all models. With `norm`, also each model's rescale sums (before, after
/// masking) per engine chunk, in element order, as a pass over the chunk would take them:
/// `sums[c * n + k]` for chunk `c` of the block and model `k`.
///
/// The block is cut into strands of `strand` elements (whole engine chunks when measuring),
/// whose rows are taken in step: the additions of the sums are a chain per model and chunk,
/// and two strands' chains overlap where one strand's would wait on each addition.
fn block_kept(
    io: &dyn TensorIo,
    models: &mut [BlockModel],
    rows: (usize, usize),
    strand: usize,
    m: usize,
    norm: Option<Rescale>,
) -> Result<Vec<(f64, f64)>> {
    let (start, end) = rows;
    let (n, words) = (models.len(), m.div_ceil(32));
    let strands: Vec<(usize, usize)> = (start..end).step_by(strand).map(|s| (s, s.saturating_add(strand).min(end))).collect();
    // One lane per strand and model: lane `s * n + k`.
    let lanes = strands.len() * n;
    let (mut b, mut x) = (Vec::new(), Vec::new());
    // The thread's row buffers, kept from block to block: fresh ones (a few hundred KiB per
    // block) were page-faulted and zeroed each time. Lost on an error, which ends the merge.
    let mut all = SCRATCH.with(Cell::take);
    all.resize_with(all.len().max(lanes), RowScratch::default);
    let sc = &mut all[..lanes];
    let mut row_bits = vec![0u32; lanes * words];
    let mut sums = vec![Vec::new(); strands.len()];
    let mut acc = vec![[0f64; 2]; lanes];
    // L1 sums in any order where that gives their bits (see `l1_sums`): each lane on its own,
    // from the keys and the row's bits, without a masked copy of the keys.
    let any_order = norm == Some(Rescale::L1) && l1_any_order();
    let (first, longest) = strands[0];
    for r in (0..longest - first).step_by(m) {
        // Only the last strand can be shorter.
        let live = strands.iter().take_while(|&&(s, e)| s + r < e).count();
        for ((&(s, _), sc), bits) in strands[..live].iter().zip(sc.chunks_mut(n)).zip(row_bits.chunks_mut(n * words)) {
            let row = s + r;
            sc.iter_mut().for_each(|s| s.keys.clear());
            for s in (row..row + m).step_by(CHUNK) {
                let t = (s + CHUNK).min(row + m);
                b.resize(t - s, 0f32);
                x.resize(t - s, 0f32);
                io.read(0, s..t, &mut b)?;
                for (md, sc) in models.iter().zip(sc.iter_mut()) {
                    io.read(md.slot, s..t, &mut x)?;
                    sc.keys.extend(x.iter().zip(&b).map(|(&x, &b)| mag_key(x - b)));
                }
            }
            for ((md, sc), bits) in models.iter_mut().zip(sc.iter_mut()).zip(bits.chunks_mut(words)) {
                keep_bits(md.key, row as u64, md.thresholds, SCANS, sc, bits);
                bits::or_at(md.out, row - start, bits);
                if norm.is_some() && !any_order {
                    sc.kept.resize(m, 0);
                    kept_keys(&sc.keys, bits, &mut sc.kept);
                }
            }
        }
        let Some(norm) = norm else { continue };
        // The row's pieces by engine chunk (at the same offsets in every strand, which start on
        // chunks); a chunk's sums go out when its last element is in.
        let (row, lanes) = (first + r, live * n);
        let mut j = 0;
        while j < m {
            let k = (((row + j) / CHUNK + 1) * CHUNK - row).min(m);
            if any_order {
                for (l, acc) in acc[..lanes].iter_mut().enumerate() {
                    *acc = l1_sums(&sc[l].keys[j..k], &row_bits[l * words..(l + 1) * words], j, *acc);
                }
            } else {
                // Four lanes at a time (the last one repeated to fill four, its copies dropped).
                for g in (0..lanes).step_by(4) {
                    let q = [g, g + 1, g + 2, g + 3].map(|q| q.min(lanes - 1));
                    let mut s = [0f64; 8];
                    for (p, &l) in q.iter().enumerate() {
                        s[2 * p..2 * p + 2].copy_from_slice(&acc[l]);
                    }
                    sums_of_four(norm, &Keys { keys: q.map(|l| &sc[l].keys[j..k]), kept: q.map(|l| &sc[l].kept[j..k]) }, &mut s);
                    for (p, &l) in q.iter().enumerate() {
                        acc[l] = [s[2 * p], s[2 * p + 1]];
                    }
                }
            }
            for ((&(s, e), sums), acc) in strands[..live].iter().zip(&mut sums).zip(acc.chunks_mut(n)) {
                let at = s + r + k;
                if at.is_multiple_of(CHUNK) || at == e {
                    sums.extend(acc.iter().map(|a| (a[0], a[1])));
                    acc.fill([0.0; 2]);
                }
            }
            j = k;
        }
    }
    SCRATCH.with(|c| c.set(all));
    Ok(sums.concat())
}

thread_local! {
    static SCRATCH: Cell<Vec<RowScratch>> = const { Cell::new(Vec::new()) };
}

avx2! {
/// `keys` where the element is kept (its bit in `bits`), else 0.
fn kept_keys(keys: &[u32], bits: &[u32], out: &mut [u32]) {
    for ((o, k), &w) in out.chunks_mut(32).zip(keys.chunks(32)).zip(bits) {
        for ((o, &k), b) in o.iter_mut().zip(k).zip(0..32) {
            *o = k & 0u32.wrapping_sub((w >> b) & 1);
        }
    }
}
}

/// AVX-512 running totals of the bucket counts.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::running_totals`] thirty-two buckets at a time: each vector's totals by five
    /// shifted additions (the same integer sums; lanes shifted by a permutation, zeros in),
    /// plus the last vector's total.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn running_totals(start: &mut [u16], c0: &mut [u16], c1: &mut [u16]) {
        let (zero, mut carry) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let lanes =
            _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        // Lane `l` takes lane `l - s` (none below `s`).
        let shifts = [1u32, 2, 4, 8, 16].map(|s| (_mm512_sub_epi16(lanes, _mm512_set1_epi16(s as i16)), !((1u32 << s) - 1)));
        let last = _mm512_set1_epi16(31);
        let mut i = 0;
        while i + 32 <= start.len() {
            let (a, b) = (c0.as_mut_ptr().add(i).cast(), c1.as_mut_ptr().add(i).cast());
            let mut x = _mm512_add_epi16(_mm512_loadu_si512(a), _mm512_loadu_si512(b));
            _mm512_storeu_si512(a, zero);
            _mm512_storeu_si512(b, zero);
            for (from, keep) in shifts {
                x = _mm512_add_epi16(x, _mm512_maskz_permutexvar_epi16(keep, from, x));
            }
            x = _mm512_add_epi16(x, carry);
            _mm512_storeu_si512(start.as_mut_ptr().add(i).cast(), x);
            carry = _mm512_permutexvar_epi16(last, x);
            i += 32;
        }
        let mut lo = if i > 0 { start[i - 1] } else { 0 };
        for ((s, a), b) in start[i..].iter_mut().zip(&mut c0[i..]).zip(&mut c1[i..]) {
            lo += std::mem::take(a) + std::mem::take(b);
            *s = lo;
        }
    }
}

const BUCKETS: usize = 1 << 12;

/// A row's buffers, reused from row to row.
struct RowScratch {
    keys: Vec<u32>,
    /// The keys' buckets.
    buckets: Vec<u16>,
    /// The keys of the kept elements, 0 for the dropped (for the rescale sums).
    kept: Vec<u32>,
    /// Per bucket of keys, its count (two sets; all zero between rows).
    counts: Box<[[u16; BUCKETS]; 2]>,
    /// Per bucket of keys, its first rank (prefix sums of the bucket counts).
    start: Vec<u16>,
    /// Elements whose decision needs their exact rank.
    exact: Vec<u32>,
    /// The row's draws, and per word of 32 the bits of those its rank decides.
    draws: Vec<u64>,
    band: Vec<u32>,
    words: Vec<u64>,
    tmp: Vec<u64>,
    /// The elements to rank as `(key << 32) | index`, in that order.
    by_key: Vec<u64>,
    /// Bits of the elements of one key.
    eq: Vec<u32>,
}

impl Default for RowScratch {
    fn default() -> Self {
        let (counts, start, exact, draws, band) = (Box::new([[0; BUCKETS]; 2]), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        RowScratch {
            keys: Vec::new(),
            buckets: Vec::new(),
            kept: Vec::new(),
            counts,
            start,
            exact,
            draws,
            band,
            words: Vec::new(),
            tmp: Vec::new(),
            by_key: Vec::new(),
            eq: Vec::new(),
        }
    }
}

/// The ranks of elements of one key, `group` their `(key << 32) | index` words in ascending
/// index order, each given to `decide`: the first one's by a pass over the row, each other's
/// as the first one's plus the elements of that key from the first up to it, counted from
/// bits of equality (`eq`, scratch) where the group is large (the zero deltas of a row), else
/// span by span.
#[inline(always)]
fn group_ranks(keys: &[u32], group: &[u64], eq: &mut Vec<u32>, decide: &mut impl FnMut(u32, usize)) {
    let index = |w: u64| (w & 0xFFFF_FFFF) as usize;
    let (v, first) = ((group[0] >> 32) as u32, index(group[0]));
    let r0 = rank(keys, first);
    decide(first as u32, r0);
    let rest = &group[1..];
    let Some(&last) = rest.last() else { return };
    if rest.len() < 8 {
        let (mut r, mut prev) = (r0, first);
        for &w in rest {
            let j = index(w);
            r += keys[prev..j].iter().map(|&k| u32::from(k == v)).sum::<u32>() as usize;
            decide(j as u32, r);
            prev = j;
        }
        return;
    }
    // Bit `b` of word `i`: whether element `first + 32i + b` has key `v`.
    let span = &keys[first..=index(last)];
    eq.clear();
    eq.extend(span.chunks(32).map(|c| c.iter().zip(0..32).fold(0u32, |w, (&k, b)| w | (u32::from(k == v) << b))));
    let (mut r, mut at) = (r0, 0);
    for &w in rest {
        let j = index(w) - first;
        while at < j / 32 {
            r += eq[at].count_ones() as usize;
            at += 1;
        }
        decide((first + j) as u32, r + (eq[j / 32] & ((1u32 << (j % 32)) - 1)).count_ones() as usize);
    }
}

/// The rank of element `j` of `keys` by key and index: a pass over the row.
fn rank(keys: &[u32], j: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F was just detected.
        return unsafe { x86_512::rank(keys, j) };
    }
    rank_by_lanes(keys, j)
}

avx2! {
/// [`rank`] in u32 counts (eight lanes in the AVX2 build).
fn rank_by_lanes(keys: &[u32], j: usize) -> usize {
    let kj = keys[j];
    let below = keys[..j].iter().map(|&k| u32::from(k <= kj)).sum::<u32>();
    (below + keys[j + 1..].iter().map(|&k| u32::from(k < kj)).sum::<u32>()) as usize
}
}

/// The row's draws (`draw(key, first + j)`) into `us`, and per word of 32 the bits of those
/// below `lo` into `keep` and of those in `lo..hi` into `band`.
fn draws_split(key: u64, first: u64, (lo, hi): (u64, u64), us: &mut [u64], keep: &mut [u32], band: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F/DQ were just detected.
        let words = unsafe { x86_512::draws_split(key, first, (lo, hi), us, keep, band) };
        let done = 32 * words;
        draws(key, first + done as u64, &mut us[done..]);
        return split_draws(&us[done..], lo, hi, &mut keep[words..], &mut band[words..]);
    }
    draws(key, first, us);
    split_draws(us, lo, hi, keep, band);
}

/// AVX-512 loops: ranks, and draws split by mask registers.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use crate::rng::WEYL;
    use std::arch::x86_64::*;

    /// [`super::rank`] sixteen keys a step: a compare into a mask and a masked increment (the
    /// AVX2 build, without unsigned compares, took four instructions per eight keys). A key
    /// before `j` counts when below `keys[j] + 1` (keys are `|x|` bits: no overflow), the
    /// others (`j` itself never) when below `keys[j]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rank(keys: &[u32], j: usize) -> usize {
        debug_assert!(keys[j] < u32::MAX);
        let m = keys.len();
        let (lt, le) = (_mm512_set1_epi32(keys[j] as i32), _mm512_set1_epi32(keys[j].wrapping_add(1) as i32));
        let (one, mut acc) = (_mm512_set1_epi32(1), _mm512_setzero_si512());
        let p = keys.as_ptr().cast::<i32>();
        let mut count = |v: __m512i, bound: __m512i, live: u16| {
            acc = _mm512_mask_add_epi32(acc, _mm512_mask_cmplt_epu32_mask(live, v, bound), acc, one);
        };
        let mut i = 0;
        while i + 16 <= j {
            count(_mm512_loadu_si512(p.add(i).cast()), le, u16::MAX);
            i += 16;
        }
        // The step holding `j`: its lanes before `j` take `le`.
        let mut bound = _mm512_mask_blend_epi32(((1u32 << (j - i)) - 1) as u16, lt, le);
        while i + 16 <= m {
            count(_mm512_loadu_si512(p.add(i).cast()), bound, u16::MAX);
            bound = lt;
            i += 16;
        }
        if i < m {
            let live = ((1u32 << (m - i)) - 1) as u16;
            count(_mm512_maskz_loadu_epi32(live, p.add(i)), bound, live);
        }
        _mm512_reduce_add_epi32(acc) as usize
    }

    /// [`super::draws_split`] for the whole words of `us`, eight draws at a time, the
    /// comparisons as mask registers and the words built from them (the draws were stored, then
    /// loaded and compared in a loop of their own, each bit shifted into place); returns how
    /// many words it wrote.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn draws_split(key: u64, first: u64, (lo, hi): (u64, u64), us: &mut [u64], keep: &mut [u32], band: &mut [u32]) -> usize {
        let words = (us.len() / 32).min(keep.len()).min(band.len());
        let set = |x: u64| _mm512_set1_epi64(x as i64);
        // `crate::rng::draw_at` lane by lane: the same integer operations.
        let mix = |c: __m512i| {
            let mut z = _mm512_add_epi64(c, set(WEYL));
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<30>(z)), set(0xBF58_476D_1CE4_E5B9));
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<27>(z)), set(0x94D0_49BB_1331_11EB));
            _mm512_srli_epi64::<11>(_mm512_xor_si512(z, _mm512_srli_epi64::<31>(z)))
        };
        let c0 = crate::rng::counter(key, first);
        let mut c = _mm512_add_epi64(set(c0), _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), set(WEYL)));
        let (step, lo, hi) = (set(WEYL.wrapping_mul(8)), set(lo), set(hi));
        for w in 0..words {
            let (mut k, mut b) = (0u32, 0u32);
            for q in 0..4 {
                let u = mix(c);
                c = _mm512_add_epi64(c, step);
                _mm512_storeu_si512(us.as_mut_ptr().add(32 * w + 8 * q).cast(), u);
                let below = _mm512_cmplt_epu64_mask(u, lo);
                k |= u32::from(below) << (8 * q);
                b |= u32::from(_mm512_mask_cmplt_epu64_mask(!below, u, hi)) << (8 * q);
            }
            keep[w] = k;
            band[w] = b;
        }
        words
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

/// `start[b]` = the running total of `c0[..=b] + c1[..=b]`, clearing both (the buckets' last
/// ranks, plus one; rows of at most `u16::MAX` entries). Without AVX-512 the counts are added
/// first (vectorized), then summed four buckets per step of the running total, whose chain of
/// additions otherwise takes most of the loop's time; with it, thirty-two buckets per step
/// (u16: half the bytes stored of u32 counts; the loop was bound by its stores).
fn running_totals(start: &mut [u16], c0: &mut [u16], c1: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512F/BW were just detected.
        return unsafe { x86::running_totals(start, c0, c1) };
    }
    for ((s, a), b) in start.iter_mut().zip(c0).zip(c1) {
        *s = std::mem::take(a) + std::mem::take(b);
    }
    let mut lo = 0u16;
    let mut quads = start.chunks_exact_mut(4);
    for q in &mut quads {
        let (a, ab) = (q[0], q[0] + q[1]);
        let abc = ab + q[2];
        let abcd = abc + q[3];
        (q[0], q[1], q[2], q[3]) = (lo + a, lo + ab, lo + abc, lo + abcd);
        lo = q[3];
    }
    for s in quads.into_remainder() {
        lo += *s;
        *s = lo;
    }
}

/// `keep_bits`' limit on the passes over a row that rank its elements one key at a time.
const SCANS: usize = 32;

avx2! {
/// The keep bits of one row (`sc.keys`, the `|Δ|` keys of elements `first..first + m`, sign
/// bits clear) into `out`: element `j` is kept when `draw(key, first + j) < thresholds[r]`,
/// `r` its rank in the row ordered by key and, among equal keys, by index.
///
/// Most decisions need no rank: the thresholds grow with the rank, so an element whose key
/// lies in a bucket of ranks `lo..=hi` (a histogram of the keys' values) is kept when its
/// draw is below the threshold of `lo` and dropped when it is not below that of `hi`. Only
/// draws between the two (a bucket's share of the `2ε` band) need the exact rank: counted
/// over the row for a few keys, from a sort of the row when there are many. The decisions
/// are those of ranking every element. `t` must not decrease (ε ≥ 0). At most `scans` passes
/// over the row rank elements one key at a time; past that the row is sorted. A row of
/// more than `u16::MAX` entries (whose counts the buckets do not hold) ranks every draw in
/// the band.
fn keep_bits(key: u64, first: u64, t: &[u64], scans: usize, sc: &mut RowScratch, out: &mut [u32]) {
    let keys: &[u32] = &sc.keys;
    let m = keys.len();
    debug_assert!(t.len() == m && t.windows(2).all(|w| w[0] <= w[1]));
    let k0 = keys[0];
    let differ = keys.iter().fold(0u32, |d, &k| d | (k ^ k0));
    if differ == 0 {
        // One key: the ranks are the indices.
        return coin_words(key, first, &t[..m], out);
    }
    sc.exact.resize(m.max(sc.exact.len()), 0);
    sc.draws.resize(m, 0);
    sc.band.resize(out.len(), 0);
    // Draws below the lowest threshold keep their entry and those not below the highest drop
    // it, whatever the rank (four in five, at ε = 0.1); the rest are decided by their bucket.
    draws_split(key, first, (t[0], t[m - 1]), &mut sc.draws, out, &mut sc.band);
    let n = if m <= u16::MAX as usize {
        by_bucket(t, sc, out)
    } else {
        // Counts of this row may not fit the buckets' u16 (a 1-D tensor or a trailing axis of
        // more than 65535 entries: rare): every draw in the band takes its exact rank.
        let mut n = 0;
        for (&band, j0) in sc.band.iter().zip((0u32..).step_by(32)) {
            let mut rest = band;
            while rest != 0 {
                sc.exact[n] = j0 + rest.trailing_zeros();
                rest &= rest - 1;
                n += 1;
            }
        }
        n
    };
    let keys: &[u32] = &sc.keys;
    let exact = &sc.exact[..n];
    let us = &sc.draws;
    let mut decide = |j: u32, r: usize| bits::set(out, j as usize, us[j as usize] < t[r]);
    // The elements to rank by key, then index: those of one key take one pass over the row
    // and a count of that key between them (bf16 deltas tie often: the zero deltas of weights
    // a fine-tune left unchanged, deltas of one unit in the last place). The zero keys, most
    // of such a row's, need no sort: they come first, and `exact` holds them in index order.
    // Each element is written at both ends, and the end its key belongs to moves on (zero keys
    // come as often as not: a branch on them mispredicted).
    sc.by_key.clear();
    sc.by_key.resize(n, 0);
    let (mut zeros, mut rest) = (0, n);
    for &j in exact {
        let (k, w) = (keys[j as usize], u64::from(j));
        sc.by_key[zeros] = w;
        sc.by_key[rest - 1] = (u64::from(k) << 32) | w;
        zeros += usize::from(k == 0);
        rest -= usize::from(k != 0);
    }
    sc.by_key[zeros..].sort_unstable();
    let key_of = |w: &u64| w >> 32;
    // Passes over the row: one per key, plus the spans counted between a key's elements.
    let (mut passes, mut spans) = (0, 0);
    for g in sc.by_key.chunk_by(|a, b| key_of(a) == key_of(b)) {
        passes += 1;
        spans += (g[g.len() - 1] - g[0]) as u32 as usize;
    }
    if passes + spans / m <= scans {
        for g in sc.by_key.chunk_by(|a, b| key_of(a) == key_of(b)) {
            group_ranks(keys, g, &mut sc.eq, &mut decide);
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
}

/// [`keep_bits`]' decisions by bucket (rows of at most `u16::MAX` entries, not all of one key;
/// the draws and their split already in `sc` and `out`): the entries in the band whose bucket
/// decides them get their bit in `out`, the others go to `sc.exact` (returns how many).
#[inline(always)]
fn by_bucket(t: &[u64], sc: &mut RowScratch, out: &mut [u32]) -> usize {
    let RowScratch { keys, buckets, counts, start, exact, draws, band, .. } = sc;
    let m = keys.len();
    // Buckets linear in |Δ| up to four times the row's mean (the rest in the last), one per
    // one or two elements, at most 4096 (more buckets, fewer exact ranks; fewer, less work per
    // row). On the keys' high bits (a log scale), a row of bf16 deltas, dense near zero, fell
    // in a few dozen buckets: 9 exact ranks a row of 768 against 2.8, which are ties of equal
    // keys (that no bucketing parts).
    let nb = 1usize << (usize::BITS - 1 - m.leading_zeros()).clamp(1, BUCKETS.trailing_zeros());
    // Four vectors of partial sums, in registers (over `chunks(16)` they went through memory).
    let (mut sums, mut quads) = ([0f32; 32], keys.chunks_exact(32));
    for c in &mut quads {
        for (s, &k) in sums.iter_mut().zip(c) {
            *s += f32::from_bits(k);
        }
    }
    let total = sums.iter().sum::<f32>() + quads.remainder().iter().map(|&k| f32::from_bits(k)).sum::<f32>();
    let scale = nb as f32 * m as f32 / (4.0 * total);
    // A row of only subnormal keys, or an infinite one: one bucket, still exact.
    let scale = if scale.is_finite() { scale } else { 0.0 };
    let last = (nb - 1) as f32;
    buckets.resize(m, 0);
    for (b, &k) in buckets.iter_mut().zip(keys.iter()) {
        // SAFETY: not NaN (`min` takes `last` over a NaN product), in `0..=last`.
        *b = unsafe { (f32::from_bits(k) * scale).min(last).to_int_unchecked::<i32>() } as u16;
    }
    let bucket = |b: u16| b as usize & (BUCKETS - 1);
    // Counted in two sets (even and odd entries): runs of one key would otherwise make each
    // increment wait for the previous one's store.
    // They are zero between rows: the prefix sums below clear the counts they read.
    // The counts' address in a local: through `sc`, each increment reloaded it.
    let counts: &mut [[u16; BUCKETS]; 2] = counts;
    let mut pairs = buckets.chunks_exact(2);
    for p in &mut pairs {
        counts[0][bucket(p[0])] += 1;
        counts[1][bucket(p[1])] += 1;
    }
    for &b in pairs.remainder() {
        counts[0][bucket(b)] += 1;
    }
    // Prefix sums: bucket `b` holds ranks `start[b]..start[b + 1]`.
    start.resize(nb + 1, 0);
    start[0] = 0;
    let [c0, c1] = counts;
    running_totals(&mut start[1..], &mut c0[..nb], &mut c1[..nb]);
    // Slices and the word in locals: through `sc` and `out`, each entry reloaded them.
    let (exact, us, t, start, mut n) = (&mut exact[..m], &draws[..m], &t[..m], &start[..nb + 1], 0);
    assert!(band.len() <= m.div_ceil(32) && buckets.len() == m);
    // Two words of the band at a time: the loop's exit, mispredicted about once per pass,
    // comes half as often.
    for ((w, band), j0) in out.chunks_mut(2).zip(band.chunks(2)).zip((0usize..).step_by(64)) {
        let two = |v: &[u32]| u64::from(v[0]) | v.get(1).map_or(0, |&h| u64::from(h) << 32);
        let (mut rest, mut word) = (two(band), two(w));
        while rest != 0 {
            let b = rest.trailing_zeros();
            rest &= rest - 1;
            let j = j0 + b as usize;
            debug_assert!(j < m && n < m);
            // SAFETY: the draws' split sets band bits of the row's elements only (`j < m`), and
            // at most one entry of `exact` is written per element (`n ≤ j`). `j`'s bucket holds
            // it, so its first and last ranks are ranks of the row (`< m`); `bk < nb`. The
            // bounds checks took 7% of `keep_bits`' time.
            let (u, tl, th) = unsafe {
                let bk = bucket(*buckets.get_unchecked(j));
                let (lo, hi) = (*start.get_unchecked(bk) as usize, *start.get_unchecked(bk + 1) as usize - 1);
                debug_assert!(bk < nb && lo <= hi && hi < m);
                (*us.get_unchecked(j), *t.get_unchecked(lo), *t.get_unchecked(hi))
            };
            word |= u64::from(u < tl) << b;
            // SAFETY: as above, `n ≤ j < m`.
            unsafe { *exact.get_unchecked_mut(n) = j as u32 };
            n += usize::from(u >= tl && u < th);
        }
        w[0] = word as u32;
        if let Some(h) = w.get_mut(1) {
            *h = (word >> 32) as u32;
        }
    }
    n
}

/// Greatest common divisor (Euclid).
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The longest strand of rows that may be made of whole engine chunks for the rescale sums
/// (elements; a block is two strands).
const MAX_ALIGNED_STRAND: usize = 16 * CHUNK;

/// The shortest run of whole rows of `m` that is a multiple of 32 rows (a word of the mask
/// per element) and of whole engine chunks, when it is not longer than `MAX_ALIGNED_STRAND`.
fn aligned_strand(m: usize) -> Option<usize> {
    let rows32 = 32 * m;
    let aligned = rows32 / gcd(rows32, CHUNK) * CHUNK;
    (aligned <= MAX_ALIGNED_STRAND).then_some(aligned)
}

impl MagPrune {
    /// Each of `models`' preparation, the partially kept ones decided together.
    fn prepare_models(&self, ctx: &Ctx, io: &dyn TensorIo, models: &[usize], norm: Rescale) -> Result<Vec<Prepared>> {
        let partial: Vec<usize> = models.iter().copied().filter(|&i| Mode::of_density(self.density[i]) == Mode::Partial).collect();
        let mut decided = if partial.is_empty() { vec![] } else { self.decide(ctx, io, &partial, norm)? }.into_iter();
        Ok(models
            .iter()
            .map(|&i| match Mode::of_density(self.density[i]) {
                Mode::Partial => decided.next().expect("one per partial model"),
                mode => Prepared { mode, state: vec![], sums: None },
            })
            .collect())
    }

    /// The keep masks of `models` (all partially kept) as bit words, in one parallel pass over
    /// blocks of rows; with `norm` (l1, l2, linf), also each model's rescale sums where the
    /// blocks can be made of whole engine chunks.
    fn decide(&self, ctx: &Ctx, io: &dyn TensorIo, models: &[usize], norm: Rescale) -> Result<Vec<Prepared>> {
        let numel = io.numel();
        let m = Self::row_len(ctx.shape, numel);
        if m > u32::MAX as usize {
            return Err(Error::config(format!("{}: rows of {m} entries are too long to rank", ctx.tensor)));
        }
        // Blocks of whole rows, a multiple of 32 rows so that each starts on a word of the mask
        // and fills its own words (in parallel, no merge step), and of whole engine chunks
        // where that is not too long, so that the block can measure the rescale norms.
        let aligned = aligned_strand(m).filter(|_| matches!(norm, Rescale::L1 | Rescale::L2 | Rescale::Linf));
        let measure = aligned.is_some();
        let (block, strand) = match aligned {
            Some(a) => (2 * a, a),
            None => ((CHUNK / m).max(1).next_multiple_of(32) * m, usize::MAX),
        };
        // Per rank, the integer threshold of its coin (rng::below): no division or float draw per
        // entry. They grow with the rank (ε ≥ 0 by the parameter's range), as keep_bits needs.
        let thresholds: Vec<Vec<u64>> =
            models.iter().map(|&i| (0..m).map(|r| below(keep_prob(r, m, self.density[i], self.epsilon[i]))).collect()).collect();
        let mut words: Vec<Vec<u32>> = models.iter().map(|_| vec![0u32; numel.div_ceil(32)]).collect();
        let mut blocks: Vec<Vec<BlockModel>> = (0..numel.div_ceil(block)).map(|_| Vec::with_capacity(models.len())).collect();
        for ((w, &i), t) in words.iter_mut().zip(models).zip(&thresholds) {
            let key = stream_key(ctx.seed, ctx.tensor, i as u64);
            for (bm, out) in blocks.iter_mut().zip(w.chunks_mut(block / 32)) {
                bm.push(BlockModel { slot: i + 1, key, thresholds: t, out });
            }
        }
        let parts: Vec<Vec<(f64, f64)>> = blocks
            .into_par_iter()
            .enumerate()
            .map(|(n, mut bm)| {
                let s = n * block;
                block_kept(io, &mut bm, (s, (s + block).min(numel)), strand, m, measure.then_some(norm))
            })
            .collect::<Result<_>>()?;
        let n = models.len();
        Ok(words
            .into_iter()
            .enumerate()
            .map(|(k, w)| Prepared {
                mode: Mode::Partial,
                state: bits::pack(&w),
                sums: measure.then(|| norm.fold_parts(parts.iter().flat_map(|p| p.iter().skip(k).step_by(n).copied()))),
            })
            .collect())
    }
}

impl Sparsifier for MagPrune {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)> {
        let p = self.prepare_models(ctx, io, &[i], Rescale::None)?.pop().expect("one model");
        Ok((p.mode, p.state))
    }

    fn prepare_all(&self, ctx: &Ctx, io: &dyn TensorIo, norm: Rescale) -> Result<Vec<Prepared>> {
        self.prepare_models(ctx, io, &(0..io.slots() - 1).collect::<Vec<_>>(), norm)
    }

    fn masked_delta(&self, ctx: &Ctx, _: usize, _: usize, state: &[f64], x: &[f32], base: &[f32], out: &mut [f32]) {
        bits::masked_delta(state, ctx.offset, x, base, out);
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

    /// Both ways of taking the buckets' running totals give them, and clear the counts.
    #[test]
    fn running_totals_sum_and_clear() {
        // Totals up to 57344 of the u16's 65535 at 4096 buckets.
        for n in (0..70).chain([511, 512, 4096]) {
            let c: Vec<u16> = (0..2 * n as u64).map(|i| (crate::rng::mix64(i ^ n as u64) % 8) as u16).collect();
            let want: Vec<u16> = (0..n).scan(0, |t, b| Some(std::mem::replace(t, *t + c[b] + c[n + b]) + c[b] + c[n + b])).collect();
            for (got, c0, c1) in crate::simd::each_build(|| {
                let (mut c0, mut c1) = (c[..n].to_vec(), c[n..].to_vec());
                let mut got = vec![0u16; n];
                running_totals(&mut got, &mut c0, &mut c1);
                (got, c0, c1)
            }) {
                assert!(got == want && c0.iter().chain(&c1).all(|&x| x == 0), "{n}");
            }
        }
    }

    /// An element's rank, in every build, is its place in the row sorted by (key, index).
    #[test]
    fn rank_is_the_place_in_the_sorted_row() {
        for m in (1..70).chain([255, 256, 257, 1000]) {
            // Few distinct keys (ties on both sides of each element), the largest `|x|` key among them.
            let keys: Vec<u32> = (0..m as u64).map(|i| [0, 7, 0x7F80_0000, 0x7FFF_FFFF][(crate::rng::mix64(i ^ m as u64) % 4) as usize]).collect();
            let mut order: Vec<usize> = (0..m).collect();
            order.sort_unstable_by_key(|&j| (keys[j], j));
            for (r, &j) in order.iter().enumerate() {
                assert!(crate::simd::each_build(|| rank(&keys, j)).iter().all(|&got| got == r), "{m} entries, element {j}");
            }
        }
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
        // A fine-tune's bf16 weights less the base's where the updates are mostly below their
        // unit in the last place: zero deltas in most places, a few distinct keys elsewhere.
        let tuned = (1usize..3000, any::<u64>(), 0.00001f64..0.0002).prop_map(|(m, s, d)| {
            let r = |x: f64| half::bf16::from_f64(x).to_f32();
            (0..m)
                .map(|j| {
                    let b = r(crate::rng::normal(s, 2 * j as u64) * 0.02);
                    mag_key(r(b as f64 + crate::rng::normal(s, 2 * j as u64 + 1) * d) - b)
                })
                .collect()
        });
        let few = prop::collection::vec(0u32..4, 1..600);
        let one = (1usize..300, any::<u32>()).prop_map(|(m, k)| vec![k; m]);
        // Any key of `|x|` (its sign bit clear), NaN patterns included.
        prop_oneof![gauss, bf16, tuned, few, one, prop::collection::vec(0u32..=0x7FFF_FFFF, 1..300)]
    }

    proptest! {
        #[test]
        fn keep_bits_match_ranking_every_element(keys in row_keys(), key in any::<u64>(), first in 0u64..1 << 40,
                                                 d in 0.05f64..0.95, e in 0.0f64..1.0) {
            let m = keys.len();
            let e = e * d.min(1.0 - d);
            let t: Vec<u64> = (0..m).map(|r| below(keep_prob(r, m, d, e))).collect();
            let want = keep_by_sort(&keys, key, first, &t);
            // One scratch for the three calls, as for the rows of a block.
            let mut sc = RowScratch::default();
            for scans in [0, SCANS, usize::MAX] {
                sc.keys.clone_from(&keys);
                let mut out = vec![u32::MAX; m.div_ceil(32)];
                keep_bits(key, first, &t, scans, &mut sc, &mut out);
                for (j, &w) in want.iter().enumerate() {
                    prop_assert_eq!((out[j / 32] >> (j % 32)) & 1 == 1, w, "element {} of {}, scans {}", j, m, scans);
                }
                prop_assert_eq!(out[m / 32..].iter().map(|w| w.count_ones()).sum::<u32>(), want[m / 32 * 32..].iter().filter(|&&k| k).count() as u32);
            }
        }
    }

    /// Rows longer than the buckets' u16 counts hold (every draw in the band ranked) decide as
    /// ranking every element does, by the row's sort and one by one.
    #[test]
    fn keep_bits_of_rows_past_u16_counts() {
        let r = |x: f64| half::bf16::from_f64(x).to_f32();
        for (m, seed) in [(65_536usize, 1u64), (70_001, 2)] {
            let keys: Vec<u32> = (0..m)
                .map(|j| mag_key(r(crate::rng::normal(seed, 2 * j as u64) * 0.02) - r(crate::rng::normal(seed, 2 * j as u64 + 1) * 0.02)))
                .collect();
            let t: Vec<u64> = (0..m).map(|r| below(keep_prob(r, m, 0.5, 0.1))).collect();
            let want = keep_by_sort(&keys, 9, 5, &t);
            let mut sc = RowScratch::default();
            for scans in [0, SCANS, usize::MAX] {
                sc.keys.clone_from(&keys);
                let mut out = vec![u32::MAX; m.div_ceil(32)];
                keep_bits(9, 5, &t, scans, &mut sc, &mut out);
                let got: Vec<bool> = (0..m).map(|j| (out[j / 32] >> (j % 32)) & 1 == 1).collect();
                assert!(got == want, "{m} entries, scans {scans}");
            }
        }
    }

    /// The rescale sums measured while deciding are those of a pass over each engine chunk's
    /// masked deltas in element order, folded in chunk order (what gta's own pass computes),
    /// for rows that divide a chunk, rows that straddle chunks, blocks too long to align
    /// (no sums), and tensors that end inside a chunk.
    #[test]
    fn measured_sums_match_a_pass_per_chunk() {
        let map = serde_json::json!({"density": [0.4, 0.6, 0.5], "epsilon": 0.1}).as_object().cloned().unwrap();
        let prune = MagPrune::build("della", &Params::new(crate::methods::spec("della").unwrap(), &map), 3).unwrap();
        for shape in [vec![70, 2048], vec![40, 2048], vec![50, 5632], vec![300, 5632], vec![9, 70000], vec![20, 700], vec![150_000], vec![3, 4, 5]] {
            let numel: usize = shape.iter().product();
            let r = |s: u64| -> Vec<f32> { (0..numel).map(|j| half::bf16::from_f64(crate::rng::normal(s, j as u64) * 0.02).to_f32()).collect() };
            let base = r(1);
            let xs: Vec<Vec<f32>> = (2..5).map(|s| base.iter().zip(r(s)).map(|(&b, d)| b + 0.1 * d).collect()).collect();
            let views: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let io = crate::kernel::Slices::new(Some(&base), &views);
            let ctx = Ctx { tensor: "w", shape: &shape, offset: 0, seed: 5 };
            for norm in [Rescale::L1, Rescale::L2, Rescale::Linf] {
                let prepared = prune.prepare_all(&ctx, &io, norm).unwrap();
                let rows = MagPrune::row_len(&shape, numel);
                let aligned = aligned_strand(rows).is_some();
                for (k, p) in prepared.iter().enumerate() {
                    let Some(got) = p.sums else {
                        assert!(!aligned, "{shape:?}: no sums");
                        continue;
                    };
                    let parts = (0..numel).step_by(CHUNK).map(|c| {
                        let mut s = (0f64, 0f64);
                        for g in c..(c + CHUNK).min(numel) {
                            let d = xs[k][g] - base[g];
                            let kept = if bits::kept(&p.state, g) { d } else { 0.0 };
                            norm.acc(&mut s.0, d);
                            norm.acc(&mut s.1, kept);
                        }
                        s
                    });
                    let want = norm.fold_parts(parts);
                    assert_eq!((got.0.to_bits(), got.1.to_bits()), (want.0.to_bits(), want.1.to_bits()), "{shape:?} {norm:?} model {k}");
                }
            }
        }
    }

    /// The one-pass decisions and measured norms (blocks of two chunk-aligned strands, the
    /// second one partial) give the same bytes for any thread count.
    #[test]
    fn thread_count_does_not_change_results() {
        use crate::methods::geometric::common::testing::{rand, run_threads};
        for shape in [[300usize, 2048], [130, 5632]] {
            let n = shape[0] * shape[1];
            let base = rand(n, 1);
            let xs: Vec<Vec<f32>> = (2..4).map(|k| base.iter().zip(rand(n, k)).map(|(&b, d)| b + 0.01 * d).collect()).collect();
            let xs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let p = serde_json::json!({"density": 0.5, "epsilon": 0.1, "weight": [0.6, 0.4]});
            let one = run_threads(1, "della", p.clone(), &shape, Some(&base), &xs).unwrap();
            let three = run_threads(3, "della", p, &shape, Some(&base), &xs).unwrap();
            assert!(one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()), "{shape:?}");
        }
    }

    /// `cargo test --profile quick -p merge_fast_core della_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn della_timing() {
        let r = |x: f64| half::bf16::from_f64(x).to_f32();
        // Deltas of std 0.002 (few zero in bf16) and 0.00003 (60% zero, as fine-tunes whose
        // updates are mostly below the weights' unit in the last place).
        for (m, d) in [(2048usize, 0.002), (5632, 0.002), (2048, 0.00003)] {
            let rows = (1 << 24) / m;
            let keys: Vec<u32> = (0..rows * m)
                .map(|j| {
                    let b = r(crate::rng::normal(3, j as u64) * 0.02);
                    mag_key(r(b as f64 + crate::rng::normal(4, j as u64) * d) - b)
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
                println!("m {m}, delta std {d}: keep_bits {new:.2} ns/element, sort {old:.2}");
            }
        }
    }
}
