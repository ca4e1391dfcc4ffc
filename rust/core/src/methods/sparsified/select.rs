//! Exact selection by rank over `u32` keys without sorting: a radix (histogram) select.
//!
//! * [`HighHist`]: counts of the keys' high 16 bits. Built in the same parallel pass that
//!   computes the keys (any order of additions gives the same integer counts).
//! * [`select_ranks`]: for each wanted rank, the bucket holding it comes from the high
//!   histogram's prefix sums; one more parallel pass histograms the low 16 bits of only the
//!   keys in those buckets, which pins the exact key. O(1) work per element per pass, no
//!   element moved, and the result is the key a full sort would put at that rank — so
//!   callers that break ties by index stay exact.
//! * [`ranks_streamed`]: many ranks of keys computed from an input, in passes over the input
//!   that keep only histograms (fisher_dampened's 1024 quantiles).
//! * [`radix_sort_pairs`]: a stable LSD radix sort of `(key, index)` words by key, for the
//!   rankings that need every rank (DELLA's rows).
use crate::error::Result;
use crate::kernel::{with_work, TensorIo, CHUNK};
use rayon::prelude::*;

const BITS: u32 = 16;
pub const BUCKETS: usize = 1 << BITS;
const LOW: u32 = (1 << BITS) - 1;

/// A `u32` that orders like `f32::total_cmp`, and back.
#[inline]
pub fn total_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
pub fn from_total_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k })
}

/// [`ranks_streamed`]'s digits of a key, highest first: (shift, width). The first is a
/// bfloat16's whole value.
const DIGITS: [(u32, u32); 3] = [(16, 16), (8, 8), (0, 8)];
/// No histogram for this prefix.
const NONE: u16 = u16::MAX;

/// The keys at `ranks` (0-based, in ascending order of the keys; each below the element count)
/// among `key_of` of input `slot`'s elements, exactly `sorted(keys)[r]`, without storing the
/// keys; and the OR of every key's low 16 bits (zero for non-negative bfloat16 values under
/// [`total_key`]). Up to three passes over the input, one per digit (16, 8, 8 bits): each counts
/// the digit of the keys whose higher digits are a wanted rank's, one histogram per distinct
/// such prefix; a pass after which those keys have no bits left set ends it (one pass for
/// bfloat16 values).
pub fn ranks_streamed<K: Fn(f32) -> u32 + Sync>(io: &dyn TensorIo, slot: usize, key_of: K, ranks: &[u64]) -> Result<(Vec<u32>, u32)> {
    // Per rank, the key's digits found so far and its rank among the keys that share them.
    let mut want: Vec<(u32, u64)> = ranks.iter().map(|&r| (0, r)).collect();
    let mut low16 = 0;
    for (level, &(shift, width)) in DIGITS.iter().enumerate() {
        let mut prefixes: Vec<u32> = want.iter().map(|w| w.0).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        let pass: Pass<K> = (io, slot, &key_of, prefixes.len(), (shift, width));
        let (mut hist, low): (counts::Counts, u32) = match level {
            0 => count_digits(pass, |_| 0)?,
            1 => {
                let mut by_high = vec![NONE; 1 << 16];
                prefixes.iter().enumerate().for_each(|(i, &p)| by_high[p as usize] = i as u16);
                count_digits(pass, |k| by_high[(k >> 16) as usize])?
            }
            _ => {
                // 24-bit prefixes: their high 16 bits' group, then the group's table of 256.
                let mut groups: Vec<u32> = prefixes.iter().map(|p| p >> 8).collect();
                groups.dedup();
                let mut by_high = vec![NONE; 1 << 16];
                groups.iter().enumerate().for_each(|(g, &h)| by_high[h as usize] = g as u16);
                let mut by_mid = vec![NONE; groups.len() << 8];
                for (i, &p) in prefixes.iter().enumerate() {
                    by_mid[((by_high[(p >> 8) as usize] as usize) << 8) | (p & 255) as usize] = i as u16;
                }
                count_digits(pass, |k| match by_high[(k >> 16) as usize] {
                    NONE => NONE,
                    g => by_mid[((g as usize) << 8) | ((k >> 8) & 255) as usize],
                })?
            }
        };
        if level == 0 {
            low16 = low;
        }
        // Each slot's running counts, then each rank's digit by a binary search (a scan of the
        // 65536 buckets per rank cost more than the pass).
        let cum = &mut hist[..prefixes.len() << width];
        for h in cum.chunks_mut(1 << width) {
            h.iter_mut().fold(0, |s, c| {
                *c += s;
                *c
            });
        }
        for w in &mut want {
            let s = prefixes.binary_search(&w.0).expect("prefix listed");
            let run = &cum[s << width..(s + 1) << width];
            let d = run.partition_point(|&c| c <= w.1);
            *w = ((w.0 << width) | d as u32, w.1 - d.checked_sub(1).map_or(0, |i| run[i]));
        }
        if low == 0 {
            return Ok((want.iter().map(|w| w.0 << shift).collect(), low16));
        }
    }
    Ok((want.iter().map(|w| w.0).collect(), low16))
}

/// A pass's input: the input and its slot, the key function, the number of slots, the digit.
type Pass<'a, K> = (&'a dyn TensorIo, usize, &'a K, usize, (u32, u32));

/// One pass of [`ranks_streamed`]: per slot (`slot_of` of a key, [`NONE`] for none), the
/// histogram of the keys' digit `(shift, width)` (the first `slots << width` counts), and the OR
/// of the counted keys' bits below it.
fn count_digits<K, S>((io, slot, key_of, slots, (shift, width)): Pass<K>, slot_of: S) -> Result<(counts::Counts, u32)>
where
    K: Fn(f32) -> u32 + Sync,
    S: Fn(u32) -> u16 + Sync,
{
    let n = io.slot_numel(slot);
    let nc = n.div_ceil(CHUNK);
    let size = slots << width;
    let (digit, rest) = ((1u32 << width) - 1, (1u32 << shift) - 1);
    // A few accumulators in all, from the pool of count buffers (fresh ones were page-faulted
    // and zeroed per pass). Below the first digit, two copies of the histograms in each, for
    // even and odd elements: runs of a bucket (a Fisher's values crowd a few prefixes) made each
    // increment wait for the previous one's store; the first digit's 2^16 buckets spread them.
    let copies = if width == 16 { 1 } else { 2 };
    let per = nc.div_ceil(2 * rayon::current_num_threads()).max(1);
    let (hist, low) = (0..nc)
        .into_par_iter()
        .with_min_len(per)
        .try_fold(
            || (counts::take(copies * size), 0u32),
            |(mut h, low), c| {
                let r = c * CHUNK..((c + 1) * CHUNK).min(n);
                let low = with_work(r.len(), |v| {
                    io.read(slot, r, v)?;
                    let (h0, h1) = h.split_at_mut(size);
                    // In a local, not the captured accumulator: that kept it in memory.
                    let mut low = low;
                    let mut count = |h: &mut [u64], x: f32| {
                        let k = key_of(x);
                        let s = slot_of(k);
                        if s != NONE {
                            h[((s as usize) << width) | ((k >> shift) & digit) as usize] += 1;
                            low |= k & rest;
                        }
                    };
                    if h1.is_empty() {
                        v.iter().for_each(|&x| count(h0, x));
                    } else {
                        let mut pairs = v.chunks_exact(2);
                        for p in &mut pairs {
                            count(h0, p[0]);
                            count(h1, p[1]);
                        }
                        pairs.remainder().iter().for_each(|&x| count(h0, x));
                    }
                    Ok(low)
                })?;
                Ok((h, low))
            },
        )
        .try_reduce(
            || (counts::take(copies * size), 0u32),
            |(mut a, la), (b, lb)| {
                a.iter_mut().zip(b.iter()).for_each(|(x, y)| *x += y);
                Ok((a, la | lb))
            },
        )?;
    // The copies summed into the first (the caller reads `size` counts; no copy out of the pool).
    let mut hist = hist;
    let (h0, h1) = hist.split_at_mut(size);
    h0.iter_mut().zip(h1.iter()).for_each(|(a, b)| *a += b);
    Ok((hist, low))
}

/// Smallest run of chunks one histogram accumulator covers: about 4 per thread in all, and at
/// least 4 chunks (four keys per bucket), so that zeroing and merging the 512 KiB histograms
/// stays small next to the counting.
pub fn min_chunks_per_hist(n_chunks: usize) -> usize {
    (n_chunks / (4 * rayon::current_num_threads())).max(4)
}

/// Most keys [`select_ranks`] gathers and sorts instead of counting their low bits.
const GATHER: u64 = 1 << 14;

/// Zeroed count buffers, reused. A histogram (512 KiB) is above glibc's mmap threshold,
/// so a fresh one cost 128 page faults and zeroed pages: a ties merge at 1.1B built ~2500
/// of them (58% of its page faults, 1.2 GB of fresh pages).
pub mod counts {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());
    /// Enough for the accumulators of a pass (about 4 per thread) and the reductions.
    const KEEP: usize = 32;

    /// Counts that go back to the pool when dropped.
    #[derive(Debug, PartialEq)]
    pub struct Counts(Vec<u64>);

    /// `n` zeros.
    pub fn take(n: usize) -> Counts {
        let mut v = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        v.clear();
        v.resize(n, 0);
        Counts(v)
    }

    impl std::ops::Deref for Counts {
        type Target = [u64];
        fn deref(&self) -> &[u64] {
            &self.0
        }
    }

    impl std::ops::DerefMut for Counts {
        fn deref_mut(&mut self) -> &mut [u64] {
            &mut self.0
        }
    }

    impl Drop for Counts {
        fn drop(&mut self) {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < KEEP {
                pool.push(std::mem::take(&mut self.0));
            }
        }
    }

    /// Frees the pooled buffers.
    pub fn release() {
        *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Vec::new();
    }
}

/// Counts of the high 16 bits of a set of keys.
#[derive(Debug, PartialEq)]
pub struct HighHist(pub counts::Counts);

impl HighHist {
    pub fn new() -> Self {
        HighHist(counts::take(BUCKETS))
    }

    #[inline]
    pub fn add(&mut self, keys: &[u32]) {
        count_slots(&mut self.0, keys, |k| (k >> BITS) as usize);
    }

    pub fn merge(mut self, other: HighHist) -> HighHist {
        self.0.iter_mut().zip(other.0.iter()).for_each(|(a, b)| *a += b);
        self
    }

    /// Histogram of `keys` in parallel over engine chunks.
    pub fn of(keys: &[u32]) -> HighHist {
        keys.par_chunks(CHUNK)
            .with_min_len(min_chunks_per_hist(keys.len().div_ceil(CHUNK)))
            .fold(HighHist::new, |mut h, c| {
                h.add(c);
                h
            })
            .reduce(HighHist::new, HighHist::merge)
    }

    fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Default for HighHist {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds one to `counts[slot(k)]` for each of `keys` (every slot within `counts`). The keys of
/// a slot that a quarter or more of them share (judged from 64 keys spread over them: the zero
/// importances or deltas of weights a fine-tune left unchanged) count on eight counters in
/// turn: on one, each increment waited on the previous one's store.
#[inline(always)]
fn count_slots(counts: &mut [u64], keys: &[u32], slot: impl Fn(u32) -> usize) {
    let hot = (keys.len() >= 1024).then(|| {
        let sample: [usize; 64] = std::array::from_fn(|i| slot(keys[i * (keys.len() / 64)]));
        sample[..8].iter().map(|&c| (sample.iter().filter(|&&b| b == c).count(), c)).max().expect("eight candidates")
    });
    let Some((_, hot)) = hot.filter(|&(n, _)| n >= 16) else {
        for &k in keys {
            counts[slot(k)] += 1;
        }
        return;
    };
    let mut spill = [0u64; 8];
    let (h, s) = (counts.as_mut_ptr(), spill.as_mut_ptr());
    for (i, &k) in keys.iter().enumerate() {
        let b = slot(k);
        assert!(b < counts.len());
        // SAFETY: `b` was just checked, and `i & 7 < 8`, the spill's length.
        unsafe { *(if b == hot { s.add(i & 7) } else { h.add(b) }) += 1 };
    }
    counts[hot] += spill.iter().sum::<u64>();
}

/// The bucket of `counts` holding rank `r` and `r`'s rank within that bucket.
pub(crate) fn locate(counts: &[u64], r: u64) -> (usize, u64) {
    let mut below = 0u64;
    for (b, &c) in counts.iter().enumerate() {
        if r < below + c {
            return (b, r - below);
        }
        below += c;
    }
    unreachable!("rank {r} out of {below} keys")
}

/// The keys at the given ranks (0-based, ascending) of `keys`, whose high-bit histogram is
/// `hist`: exactly `sorted(keys)[r]` for each `r` (every `r < keys.len()`).
pub fn select_ranks(keys: &[u32], hist: &HighHist, ranks: &[usize]) -> Vec<u32> {
    if ranks.len() > 3 {
        // One pass handles up to 3 buckets.
        return ranks.chunks(3).flat_map(|r| select_ranks(keys, hist, r)).collect();
    }
    debug_assert_eq!(hist.total(), keys.len() as u64);
    let located: Vec<(usize, u64)> = ranks.iter().map(|&r| locate(&hist.0, r as u64)).collect();
    let mut buckets: Vec<u32> = located.iter().map(|&(b, _)| b as u32).collect();
    buckets.sort_unstable();
    buckets.dedup();
    let nb = buckets.len();
    // Low-bit histograms of the wanted buckets only (bucket `i` at `i * BUCKETS`); unused
    // slots hold a value no 16-bit high part equals.
    let mut want = [u32::MAX; 3];
    want[..nb].copy_from_slice(&buckets);
    let sizes: Vec<u64> = buckets.iter().map(|&b| hist.0[b as usize]).collect();
    if sizes.iter().sum::<u64>() <= GATHER {
        // Few keys in those buckets: gathered and sorted (a bucket is a range of keys, so the
        // sorted keys run bucket after bucket), without the low histograms (512 KiB each to
        // zero and merge: most of the time for a million keys).
        let parts: Vec<Vec<u32>> = keys.par_chunks(CHUNK).map(|c| in_buckets(c, want)).collect();
        let mut found = parts.concat();
        found.sort_unstable();
        return located
            .iter()
            .map(|&(b, r)| {
                let before: u64 = buckets.iter().zip(&sizes).filter(|&(&x, _)| x < b as u32).map(|(_, &n)| n).sum();
                found[(before + r) as usize]
            })
            .collect();
    }
    // Where those buckets hold many of the keys, their keys are picked out first (vectorized)
    // and counted without a branch per key, which mispredicted as often as they came.
    let dense = sizes.iter().sum::<u64>() * 8 > keys.len() as u64;
    let tally = |mut h: counts::Counts, c: &[u32]| {
        if dense {
            let at = |hi: u32| usize::from(hi == want[1]) + 2 * usize::from(hi == want[2]);
            count_slots(&mut h, &in_buckets(c, want), |k| at(k >> BITS) * BUCKETS + (k & LOW) as usize);
            return h;
        }
        for &k in c {
            let (hi, lo) = (k >> BITS, (k & LOW) as usize);
            if hi == want[0] {
                h[lo] += 1;
            } else if hi == want[1] {
                h[BUCKETS + lo] += 1;
            } else if hi == want[2] {
                h[2 * BUCKETS + lo] += 1;
            }
        }
        h
    };
    let low = keys.par_chunks(CHUNK).with_min_len(min_chunks_per_hist(keys.len().div_ceil(CHUNK))).fold(|| counts::take(nb * BUCKETS), tally).reduce(
        || counts::take(nb * BUCKETS),
        |mut a, b| {
            a.iter_mut().zip(b.iter()).for_each(|(x, y)| *x += y);
            a
        },
    );
    located
        .iter()
        .map(|&(b, r)| {
            let i = buckets.iter().position(|&x| x == b as u32).expect("bucket listed");
            let (l, _) = locate(&low[i * BUCKETS..(i + 1) * BUCKETS], r);
            ((b as u32) << BITS) | l as u32
        })
        .collect()
}

/// The keys of `c` whose high bits are one of `want`'s, in order.
fn in_buckets(c: &[u32], want: [u32; 3]) -> Vec<u32> {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F was just detected.
        return unsafe { x86::in_buckets(c, want) };
    }
    let mut out = Vec::new();
    in_buckets_into(c, want, &mut out);
    out
}

/// [`in_buckets`] key by key, appended to `out`.
fn in_buckets_into(c: &[u32], want: [u32; 3], out: &mut Vec<u32>) {
    out.extend(c.iter().copied().filter(|&k| want.contains(&(k >> BITS))));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BITS;
    use std::arch::x86_64::*;

    /// [`super::in_buckets`] sixteen keys at a time: the matches as a mask, the keys stored
    /// compressed (a branch per key before).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn in_buckets(c: &[u32], want: [u32; 3]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::with_capacity(c.len());
        let w = want.map(|w| _mm512_set1_epi32(w as i32));
        let mut n = 0;
        let mut sixteens = c.chunks_exact(16);
        for k in &mut sixteens {
            let k = _mm512_loadu_si512(k.as_ptr().cast());
            let hi = _mm512_srli_epi32::<BITS>(k);
            let m = _mm512_cmpeq_epi32_mask(hi, w[0]) | _mm512_cmpeq_epi32_mask(hi, w[1]) | _mm512_cmpeq_epi32_mask(hi, w[2]);
            _mm512_mask_compressstoreu_epi32(out.as_mut_ptr().add(n).cast(), m, k);
            n += m.count_ones() as usize;
        }
        // SAFETY: the first `n` entries were written, and n ≤ c.len() = the capacity.
        out.set_len(n);
        super::in_buckets_into(sixteens.remainder(), want, &mut out);
        out
    }
}

/// Widest digit of [`radix_sort_pairs`]: two sets of a pass's counts stay in L1 (16 KiB).
const MAX_DIGIT: u32 = 11;
const MAX_SLOTS: usize = 1 << MAX_DIGIT;

/// Sorts `words` (`key << 32 | index`, indices distinct) ascending, i.e. by key and, among
/// equal keys, by index — the order `sort_unstable` gives them — given that `words` is in
/// ascending index order on entry (LSD passes are stable). `tmp` is scratch.
///
/// Only the key bits that differ between words are sorted on, in as few digits of at most 11
/// bits as cover them: the keys of bf16 deltas leave the low mantissa bits zero and share the
/// exponent's high bits, so a row usually takes two passes instead of four bytes' worth.
pub fn radix_sort_pairs(words: &mut Vec<u64>, tmp: &mut Vec<u64>) {
    debug_assert!(words.windows(2).all(|w| (w[0] as u32) < (w[1] as u32)), "indices ascending");
    let n = words.len();
    assert!(n <= u32::MAX as usize, "positions are u32");
    let Some(&first) = words.first() else { return };
    let k0 = first >> 32;
    let differ = words.iter().fold(0u64, |d, &w| d | ((w >> 32) ^ k0));
    if differ == 0 {
        return; // one key: index order is the order
    }
    let (lo, hi) = (differ.trailing_zeros(), 64 - differ.leading_zeros());
    let passes = (hi - lo).div_ceil(MAX_DIGIT);
    let bits = (hi - lo).div_ceil(passes);
    let shifts: Vec<u32> = (0..passes).map(|p| 32 + lo + p * bits).collect();
    let mask = (1usize << bits) - 1;
    let digit = |w: u64, shift: u32| (w >> shift) as usize & mask & (MAX_SLOTS - 1);
    let counts = match passes {
        1 => histogram::<1>(words, &shifts, digit),
        2 => histogram::<2>(words, &shifts, digit),
        _ => histogram::<3>(words, &shifts, digit), // 32 bits take at most three
    };
    tmp.clear();
    tmp.resize(n, 0);
    let (even, odd) = counts.split_at(passes as usize);
    for ((ce, co), &sh) in even.iter().zip(odd).zip(&shifts) {
        let mut pos = [0u32; MAX_SLOTS];
        let (mut s, mut same) = (0u32, false);
        for (slot, (&a, &b)) in pos.iter_mut().zip(ce.iter().zip(co)).take(mask + 1) {
            same |= (a + b) as usize == n; // this digit is the same everywhere: the pass would not move anything
            *slot = s;
            s += a + b;
        }
        if same {
            continue;
        }
        // SAFETY: `pos` holds the prefix sums of this digit's counts over `words`, and `tmp`
        // has `words`' length.
        unsafe { scatter(words, tmp, &mut pos, |w| digit(w, sh)) };
        std::mem::swap(words, tmp);
    }
}

/// Counts of each pass's digits, as two sets (even and odd words) per pass: a digit that is
/// the same in most keys (the exponent's) would otherwise make each increment wait for the
/// previous one's store. `P` passes, so that the loop over them unrolls.
fn histogram<const P: usize>(words: &[u64], shifts: &[u32], digit: impl Fn(u64, u32) -> usize) -> Vec<[u32; MAX_SLOTS]> {
    let sh: [u32; P] = std::array::from_fn(|p| shifts[p]);
    let mut counts = vec![[0u32; MAX_SLOTS]; 2 * P];
    let (even, odd) = counts.split_at_mut(P);
    let mut pairs = words.chunks_exact(2);
    for pair in &mut pairs {
        for p in 0..P {
            even[p][digit(pair[0], sh[p])] += 1;
            odd[p][digit(pair[1], sh[p])] += 1;
        }
    }
    for &w in pairs.remainder() {
        for p in 0..P {
            even[p][digit(w, sh[p])] += 1;
        }
    }
    counts
}

/// One stable counting-sort pass of `src` into `dst` by `digit`; `pos` holds each digit's
/// first free slot (prefix sums of the digits' counts in `src`). Four words at a time, each
/// one's slot offset by the earlier ones of the four with the same digit, so that runs of one
/// digit wait on one store of `pos` per four words instead of one per word.
///
/// # Safety
/// `pos[d]` must be the number of words of `src` whose digit is below `d`, and `dst` as long
/// as `src`: then every slot written is distinct and in bounds (unchecked writes).
#[inline(always)]
unsafe fn scatter(src: &[u64], dst: &mut [u64], pos: &mut [u32; MAX_SLOTS], digit: impl Fn(u64) -> usize) {
    debug_assert_eq!(src.len(), dst.len());
    let quads = src.chunks_exact(4);
    let rest = quads.remainder();
    let mut put = |q: u32, w: u64| {
        // SAFETY: by the caller's contract each `q` is the sequential counting sort's
        // position of `w`, below `src.len() == dst.len()`.
        unsafe { *dst.get_unchecked_mut(q as usize) = w };
    };
    for q in quads {
        let (a, b, c, d) = (q[0], q[1], q[2], q[3]);
        let (da, db, dc, dd) = (digit(a), digit(b), digit(c), digit(d));
        let qa = pos[da];
        let qb = pos[db] + u32::from(da == db);
        let qc = pos[dc] + u32::from(da == dc) + u32::from(db == dc);
        let qd = pos[dd] + u32::from(da == dd) + u32::from(db == dd) + u32::from(dc == dd);
        put(qa, a);
        put(qb, b);
        put(qc, c);
        put(qd, d);
        // Later stores win: a digit's slot ends one past its last word of the four.
        pos[da] = qa + 1;
        pos[db] = qb + 1;
        pos[dc] = qc + 1;
        pos[dd] = qd + 1;
    }
    for &w in rest {
        let d = digit(w);
        put(pos[d], w);
        pos[d] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Slices;
    use proptest::prelude::*;

    /// `select_ranks`, the same in every build.
    fn select(keys: &[u32], ranks: &[usize]) -> Vec<u32> {
        let mut h = HighHist::new();
        h.add(keys);
        assert_eq!(h, HighHist::of(keys));
        let got = crate::simd::each_build(|| select_ranks(keys, &h, ranks));
        assert!(got.iter().all(|g| *g == got[0]));
        got.into_iter().next().expect("a build")
    }

    fn reference(keys: &[u32], ranks: &[usize]) -> Vec<u32> {
        let mut s = keys.to_vec();
        s.sort();
        ranks.iter().map(|&r| s[r]).collect()
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

    /// The streamed selection gives the sorted keys' values at every wanted rank (the first,
    /// the last, repeated ones): float32 values over many binades with ties, negatives and
    /// both zeros (all three digits), bfloat16 values (one pass), one value, across chunks.
    #[test]
    fn streamed_ranks_are_the_sorted_keys() {
        let n = 3 * CHUNK + 777;
        let normal = |k: u64| (0..n).map(move |i| crate::rng::normal(k, i as u64) as f32);
        let wide: Vec<f32> = normal(1).zip(normal(2)).map(|(a, b)| (a * 6.0).exp() * b).map(|x| if x.abs() < 1e-3 { 0.0 } else { x }).collect();
        let mut tied = wide.clone();
        tied.iter_mut().step_by(3).for_each(|x| *x = 0.25);
        tied[5] = -0.0;
        let bf16: Vec<f32> = wide.iter().map(|x| f32::from_bits(x.to_bits() & 0xFFFF_0000)).collect();
        let one = vec![3.5f32; n];
        let last = n - 1;
        let ranks: Vec<usize> = (0..1024).map(|i| i * last / 1023).chain([0, last, 17, 17]).collect();
        for (name, vals) in [("wide", &wide), ("tied", &tied), ("bf16", &bf16), ("one", &one)] {
            let io = Slices::new(None, &[vals]);
            let keys: Vec<u32> = vals.iter().map(|&x| total_key(x)).collect();
            let want = reference(&keys, &ranks);
            let (got, low) = ranks_streamed(&io, 0, total_key, &ranks.iter().map(|&r| r as u64).collect::<Vec<_>>()).unwrap();
            assert_eq!(got, want, "{name}");
            assert_eq!(low, keys.iter().fold(0, |o, &k| o | (k & 0xFFFF)), "{name}");
        }
    }

    /// Keys of |x| for awkward floats: zeros, subnormals, ties, huge values.
    fn float_keys() -> impl Strategy<Value = Vec<u32>> {
        let x = prop_oneof![
            Just(0.0f32),
            Just(-0.0f32),
            Just(f32::from_bits(1)),
            (1u32..0x0080_0000).prop_map(f32::from_bits), // subnormals
            Just(1.0f32),
            Just(-1.0f32),
            any::<f32>().prop_filter("finite", |v| v.is_finite()),
            (-4i32..4).prop_map(|v| v as f32 * 0.25),
        ];
        prop::collection::vec(x.prop_map(super::super::sparsify::mag_key), 1..3000)
    }

    fn bf16_delta_keys() -> impl Strategy<Value = Vec<u32>> {
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        prop::collection::vec((-1.0f32..1.0, -0.05f32..0.05), 1..3000)
            .prop_map(move |v| v.into_iter().map(|(b, d)| super::super::sparsify::mag_key(bf(bf(b) + d * b) - bf(b))).collect())
    }

    proptest! {
        #[test]
        fn matches_sort(keys in float_keys(), picks in prop::collection::vec(any::<prop::sample::Index>(), 1..4)) {
            let n = keys.len();
            let mut ranks: Vec<usize> = picks.iter().map(|p| p.index(n)).collect();
            ranks.extend([0, n - 1]);
            prop_assert_eq!(select(&keys, &ranks), reference(&keys, &ranks));
            let desc: Vec<u32> = keys.iter().map(|k| !k).collect();
            prop_assert_eq!(select(&desc, &ranks), reference(&desc, &ranks));
        }

        #[test]
        fn raw_keys_match_sort(keys in prop::collection::vec(any::<u32>(), 1..2000), p in any::<prop::sample::Index>()) {
            let r = [p.index(keys.len())];
            prop_assert_eq!(select(&keys, &r), reference(&keys, &r));
        }

        /// Keys of every kind of float, and of bf16 deltas (few varying bits, low ones zero).
        #[test]
        fn radix_sort_matches(keys in prop_oneof![float_keys(), bf16_delta_keys()]) {
            let mut w: Vec<u64> = keys.iter().enumerate().map(|(i, &k)| (u64::from(k) << 32) | i as u64).collect();
            let mut want = w.clone();
            want.sort_unstable();
            radix_sort_pairs(&mut w, &mut vec![]);
            prop_assert_eq!(w, want);
        }
    }

    #[test]
    fn multi_chunk_and_one_value() {
        // Several chunks (parallel fold), everything tied, and one bucket holding both ranks.
        let n = 5 * CHUNK + 17;
        let same = vec![0x3A00_1234u32; n];
        assert_eq!(select(&same, &[0, n / 2, n - 1]), vec![0x3A00_1234; 3]);
        // Crowded buckets (low histograms), then spread ones (their keys gathered and sorted).
        let ranks = [0, 1, n / 3, n / 3 + 1, n - 2, n - 1];
        for mask in [0x0003_FFFF, u32::MAX] {
            let keys: Vec<u32> = (0..n).map(|i| (crate::rng::mix64(i as u64) as u32) & mask).collect();
            assert_eq!(select(&keys, &ranks), reference(&keys, &ranks), "{mask:x}");
        }
        assert_eq!(select(&[7], &[0]), vec![7]);
        // Mostly one key (zero deltas), the rest spread: its bucket's keys counted on the spill
        // counters, and picked out before the low histograms.
        let keys: Vec<u32> = (0..n).map(|i| crate::rng::mix64(i as u64)).map(|h| if h % 5 < 3 { 0 } else { h as u32 }).collect();
        let ranks = [0, n / 4, n / 2, n / 2 + 1, 3 * n / 4, n - 1];
        assert_eq!(select(&keys, &ranks), reference(&keys, &ranks));
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --profile quick -p merge_fast_core select_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn select_timing() {
        let n = 32000 * 2048;
        let keys: Vec<u32> = (0..n).map(|i| ((crate::rng::normal(7, i as u64) * 0.002) as f32).abs().to_bits()).collect();
        let ranks = [n / 2, n - n / 100];
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let mut k = keys.clone();
            let a = *k.select_nth_unstable(ranks[0]).1;
            let b = *k[ranks[0] + 1..].select_nth_unstable(ranks[1] - ranks[0] - 1).1;
            let t_sel = t.elapsed();
            let t = std::time::Instant::now();
            let k2 = keys.clone();
            let t_clone = t.elapsed();
            let t = std::time::Instant::now();
            let h = HighHist::of(&k2);
            let t_hist = t.elapsed();
            let t = std::time::Instant::now();
            let s: u64 = k2.par_iter().map(|&x| x as u64).sum();
            println!("plain sum pass {:?} ({s})", t.elapsed());
            let t = std::time::Instant::now();
            let got = select_ranks(&k2, &h, &ranks);
            let t_low = t.elapsed();
            assert_eq!(got, vec![a, b]);
            println!("select_nth x2 {:?} (incl. clone {t_clone:?}); radix: high hist {t_hist:?} + low pass {t_low:?}", t_sel);
        }
    }
}
