//! Shared pieces of the sparsify-and-merge family.
//!
//! * [`Window`]: keep the elements whose *stable* rank by a `u32` sort key lies in
//!   `[lo, hi)`, with bounded memory. `find` brackets the two boundary keys from a sample
//!   and pins them in one counting pass (`bracket.rs`); where the sample misled it, it
//!   computes the keys into ONE scratch buffer in a parallel pass that also histograms
//!   their high bits and radix-selects the boundary keys (`select.rs`: no sort, O(1) work
//!   per element). Either way it counts, per engine chunk, how many keys fall below / on
//!   each boundary. `apply` then
//!   decides any chunk elementwise: keys strictly inside the boundaries are kept, keys on a
//!   boundary are ranked by index (lowest index first), so exactly `hi − lo` elements survive
//!   whatever the ties and whatever the thread count.
//! * Sort keys: the bit pattern of `|x|` orders like `|x|` (ascending); its complement orders
//!   descending.
//! * Norm accumulators for mergekit's "rescale to the norm before masking" step; torch.sign.
//! * Chunk streaming over a `TensorIo` in fixed engine chunks, folded in chunk order.
//! * Packing of per-model state into the engine's `Vec<f64>` statistics (integers < 2^53 are
//!   exact in f64).
use super::select::{counts, locate, min_chunks_per_hist, HighHist, BUCKETS};
use crate::error::{Error, Result};
use crate::kernel::{with_scratch, Ctx, TensorIo, CHUNK};
use rayon::prelude::*;
use std::borrow::Cow;

/// Per-phase seconds of the family's kernels (wall time of each whole-tensor pass; `apply`
/// summed over the chunks, i.e. thread-seconds), cumulative, printed to stderr after each
/// tensor's `prepare` when `MERGE_FAST_PHASE_TIMES` is set (a profiling aid; off by default).
pub mod phase {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Instant;

    pub const KEYS: usize = 0;
    pub const SELECT: usize = 1;
    pub const SCALE: usize = 2;
    pub const APPLY: usize = 3;
    const NAMES: [&str; 4] = ["keys+hist", "select", "scale", "apply"];
    static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("MERGE_FAST_PHASE_TIMES").is_some())
    }

    /// Runs `f`, adding its wall time to phase `i` when enabled.
    #[inline]
    pub fn time<T>(i: usize, f: impl FnOnce() -> T) -> T {
        if !enabled() {
            return f();
        }
        let t = Instant::now();
        let r = f();
        NANOS[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    pub fn report(tensor: &str) {
        if enabled() {
            let v: Vec<String> = NAMES.iter().zip(&NANOS).map(|(n, a)| format!("{n} {:.2}", a.load(Ordering::Relaxed) as f64 * 1e-9)).collect();
            eprintln!("phases after {tensor}: {}", v.join(", "));
        }
    }
}

/// Elements per tile of an `apply`'s elementwise passes: a tile's inputs, deltas and
/// scratch rows (a few models) stay in L1 from one pass to the next.
pub const TILE: usize = 1024;

/// Ascending magnitude key: non-negative floats order like their bit patterns.
#[inline]
pub fn mag_key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// Descending magnitude key.
#[inline]
pub fn mag_key_desc(x: f32) -> u32 {
    !mag_key(x)
}

/// XORed into an ascending magnitude key, the descending key (`desc`) or the key itself:
/// one loop for both orders, without a branch.
#[inline]
fn key_flip(desc: bool) -> u32 {
    if desc {
        u32::MAX
    } else {
        0
    }
}

pub fn n_chunks(numel: usize) -> usize {
    numel.div_ceil(CHUNK)
}

/// The engine chunk an `apply` call starts at (apply must start on a chunk boundary).
pub fn chunk_of(ctx: &Ctx) -> Result<usize> {
    if !ctx.offset.is_multiple_of(CHUNK) {
        return Err(Error::numerical(ctx.tensor, format!("sparsified kernels need chunk-aligned pieces, got offset {}", ctx.offset)));
    }
    Ok(ctx.offset / CHUNK)
}

/// `x − base` into `out`, exactly as every kernel of the family computes a delta (f32).
#[inline]
pub fn delta_into(x: &[f32], base: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(x.iter().zip(base)).for_each(|(o, (&v, &b))| *o = v - b);
}

crate::simd::avx2! {
/// Magnitude keys of `model − base` for one chunk (`v = [base, model]`), descending or
/// ascending (TIES's top-k, breadcrumbs' window). An AVX2 build: the baseline's were
/// SSE2 loops, 6% of a 125M TIES merge.
pub fn delta_keys(v: &[&[f32]], out: &mut [u32], desc: bool) {
    let flip = key_flip(desc);
    out.iter_mut().zip(v[1].iter().zip(v[0])).for_each(|(o, (&x, &b))| *o = mag_key(x - b) ^ flip);
}
}

/// Keys of one chunk, computed from the slot slices `par_chunks` read.
pub type KeyFn<'a> = dyn Fn(&[&[f32]], &mut [u32]) + Sync + 'a;

/// The whole-tensor key buffer, kept between tensors and models: a fresh one costs a page
/// fault and a zeroed page per 4 KiB (a third of a ties merge's system time). A [`Keys`]
/// goes back to the pool when dropped; kernels free the pool with [`scratch::release`]
/// when they are dropped.
pub mod scratch {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<u32>> = Mutex::new(Vec::new());

    /// `n` keys with unspecified contents (callers overwrite every key).
    pub struct Keys {
        buf: Vec<u32>,
        n: usize,
    }

    pub fn take(n: usize) -> Keys {
        let buf = std::mem::take(&mut *POOL.lock().unwrap_or_else(|e| e.into_inner()));
        let buf = if buf.len() >= n { buf } else { vec![0; n] };
        Keys { buf, n }
    }

    impl std::ops::Deref for Keys {
        type Target = [u32];
        fn deref(&self) -> &[u32] {
            &self.buf[..self.n]
        }
    }

    impl std::ops::DerefMut for Keys {
        fn deref_mut(&mut self) -> &mut [u32] {
            &mut self.buf[..self.n]
        }
    }

    impl Drop for Keys {
        fn drop(&mut self) {
            let mut kept = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if self.buf.len() > kept.len() {
                *kept = std::mem::take(&mut self.buf);
            }
        }
    }

    /// Frees the pooled buffers (this key buffer and the histograms).
    pub fn release() {
        *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Vec::new();
        super::super::select::counts::release();
    }
}

/// Every key of a tensor (index order, from the chunks of `slots`) and their high-bit
/// histogram, in one parallel pass. Memory: one `u32` per element.
pub fn keys_and_hist(io: &dyn TensorIo, slots: &[usize], key_fn: &KeyFn) -> Result<(scratch::Keys, HighHist)> {
    let mut keys = scratch::take(io.numel());
    let hist = keys
        .par_chunks_mut(CHUNK)
        .enumerate()
        .with_min_len(min_chunks_per_hist(n_chunks(io.numel())))
        .try_fold(HighHist::new, |mut hist, (c, out)| -> Result<_> {
            let r = c * CHUNK..c * CHUNK + out.len();
            with_scratch(|sc| {
                let (bufs, _, _) = sc.parts(slots.len(), r.len());
                for (buf, &s) in bufs.iter_mut().zip(slots) {
                    io.read(s, r.clone(), &mut buf[..r.len()])?;
                }
                let views: Vec<&[f32]> = bufs.iter().map(|b| &b[..r.len()]).collect();
                key_fn(&views, out);
                Ok(())
            })?;
            hist.add(out);
            Ok(hist)
        })
        .try_reduce(HighHist::new, |a, b| Ok(a.merge(b)))?;
    Ok((keys, hist))
}

crate::simd::avx2! {
/// The low 16 bits of the keys of `c` in bucket `ha`, and of those in `hb` when it differs.
fn bucket_lows(c: &[u32], ha: u32, hb: u32) -> (Vec<u16>, Vec<u16>) {
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    // Which of 32 keys fall in either bucket, as bits built in registers (vectorizes); the
    // few set bits are then visited one by one.
    for ks in c.chunks(32) {
        let (ma, mb) = ks.iter().zip(0..32).fold((0u32, 0u32), |(ma, mb), (&k, bit)| {
            let h = k >> 16;
            (ma | (u32::from(h == ha) << bit), mb | (u32::from(h == hb) << bit))
        });
        let push = |mut m: u32, list: &mut Vec<u16>| {
            while m != 0 {
                list.push(ks[m.trailing_zeros() as usize] as u16);
                m &= m - 1;
            }
        };
        push(ma, &mut la);
        push(mb & !ma, &mut lb);
    }
    (la, lb)
}
}

/// A rank window, ready for `apply` (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub lo: u64,
    pub hi: u64,
    pub a: u32,
    pub b: u32,
    pub less_a: u64,
    pub less_b: u64,
    /// Per chunk: how many keys equal `a` (resp. `b`) in the chunks before it; one more
    /// entry, all of them (so a chunk's own count is a difference, not a pass over it).
    pub eq_a: Vec<u64>,
    pub eq_b: Vec<u64>,
}

impl Window {
    /// Finds the window `[lo, hi)` (0 ≤ lo < hi ≤ numel) of the keys `key_fn` gives for the
    /// chunks of `slots`. Memory: a sample and the keys near the boundaries; one `u32` per
    /// element where the sample misses (freed before returning). (The kernels find every
    /// model's window at once, [`Window::find_all`].)
    #[cfg(test)]
    pub fn find(io: &dyn TensorIo, slots: &[usize], lo: usize, hi: usize, key_fn: &KeyFn) -> Result<Window> {
        Ok(Self::find_all(io, &[(slots, lo, hi)], key_fn)?.remove(0))
    }

    /// [`Window::find`] for several sets of keys (group `g`'s from `key_fn` on its slots),
    /// whose sampled path reads each input once for all of them.
    pub fn find_all(io: &dyn TensorIo, groups: &[(&[usize], usize, usize)], key_fn: &KeyFn) -> Result<Vec<Window>> {
        let numel = io.numel();
        for &(_, lo, hi) in groups {
            assert!(lo < hi && hi <= numel, "window [{lo}, {hi}) of {numel}");
        }
        let found = super::bracket::windows(io, groups, key_fn)?;
        found
            .into_iter()
            .zip(groups)
            .map(|(w, &(slots, lo, hi))| match w {
                Some(w) => Ok(w),
                None => {
                    let (keys, hist) = phase::time(phase::KEYS, || keys_and_hist(io, slots, key_fn))?;
                    Ok(Window::from_keys(&keys, &hist, lo, hi))
                }
            })
            .collect()
    }

    /// The window `[lo, hi)` of `keys` (all of a tensor's keys in index order, `hist` their
    /// high-bit histogram). One pass over the keys collects, per engine chunk, the low 16
    /// bits of the keys in the two boundary buckets (the high histogram's prefix sums name
    /// them); those few keys then give the boundary keys exactly (their low histogram) and
    /// each chunk's count of keys equal to them, without another pass over every key.
    pub fn from_keys(keys: &[u32], hist: &HighHist, lo: usize, hi: usize) -> Window {
        let (ba, ra) = locate(&hist.0, lo as u64);
        let (bb, rb) = locate(&hist.0, (hi - 1) as u64);
        let (ha, hb) = (ba as u32, bb as u32);
        // Per chunk: low bits of its keys in bucket `ba`, and in `bb` when it differs.
        let lows: Vec<(Vec<u16>, Vec<u16>)> = phase::time(phase::SELECT, || keys.par_chunks(CHUNK).map(|c| bucket_lows(c, ha, hb)).collect());
        let side = |b: bool| -> Vec<&[u16]> { lows.iter().map(|(la, lb)| if b && hb != ha { lb.as_slice() } else { la.as_slice() }).collect() };
        let (sa, sb) = (side(false), side(true));
        // Boundary key, keys below it, and per-chunk counts of keys equal to it before each chunk.
        let exact = |bucket: usize, r: u64, lists: &[&[u16]]| -> (u32, u64, Vec<u64>) {
            let mut low = counts::take(BUCKETS);
            lists.iter().for_each(|l| l.iter().for_each(|&x| low[x as usize] += 1));
            let (l, _) = locate(&low, r);
            let below = hist.0[..bucket].iter().sum::<u64>() + low[..l].iter().sum::<u64>();
            let mut seen = 0u64;
            let mut eq: Vec<u64> = lists
                .iter()
                .map(|c| {
                    let before = seen;
                    seen += c.iter().filter(|&&x| x as usize == l).count() as u64;
                    before
                })
                .collect();
            eq.push(seen);
            (((bucket as u32) << 16) | l as u32, below, eq)
        };
        let (a, less_a, eq_a) = exact(ba, ra, &sa);
        let (b, less_b, eq_b) = exact(bb, rb, &sb);
        Window { lo: lo as u64, hi: hi as u64, a, b, less_a, less_b, eq_a, eq_b }
    }

    pub fn pack(&self, out: &mut Vec<f64>) {
        out.extend([self.lo, self.hi, self.a as u64, self.b as u64, self.less_a, self.less_b, self.eq_a.len() as u64].map(|v| v as f64));
        out.extend(self.eq_a.iter().map(|&v| v as f64));
        out.extend(self.eq_b.iter().map(|&v| v as f64));
    }

    /// The keep decisions for the keys of the chunk `chunk` (in index order) as bits of
    /// `out` (bit `j % 32` of word `j / 32`; `keys.len().div_ceil(32)` words, overwritten).
    pub fn decide_words(packed: &[f64], chunk: usize, keys: &[u32], out: &mut [u32]) {
        let mut words = Vec::new();
        for (r, rule) in ChunkRule::runs_of(packed, chunk, keys.len(), || keys.into()) {
            let (w0, w1) = (r.start / 32, r.end.div_ceil(32));
            if r.start % 32 == 0 && (r.end % 32 == 0 || r.end == keys.len()) {
                rule_words(rule, &keys[r], &mut out[w0..w1]);
                continue;
            }
            // A run cut inside a word: the words it touches, then only its own bits of them.
            words.resize(w1 - w0, 0);
            rule_words(rule, &keys[w0 * 32..(w1 * 32).min(keys.len())], &mut words);
            for (k, (o, &w)) in out[w0..w1].iter_mut().zip(&words).enumerate() {
                let at = (w0 + k) * 32;
                // The last run takes the word's bits past the chunk too (zero in `w`).
                let (s, e) = (r.start.max(at) - at, if r.end == keys.len() { 32 } else { r.end.min(at + 32) - at });
                let mask = (u32::MAX >> (32 - (e - s))) << s;
                *o = (*o & !mask) | (w & mask);
            }
        }
    }
}

/// The bits of `rule`'s decisions on `keys` (bit `j % 32` of word `j / 32`).
fn rule_words(rule: ChunkRule, keys: &[u32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F was just detected.
        let done = unsafe { x86_512::rule_words(rule, keys, out) };
        return rule_words_by_key(rule, &keys[done * 32..], &mut out[done..]);
    }
    rule_words_by_key(rule, keys, out)
}

crate::simd::avx2! {
/// [`rule_words`] key by key, each word built in a register (setting bits one by one in
/// memory made every decision wait for the previous one's store).
fn rule_words_by_key(rule: ChunkRule, keys: &[u32], out: &mut [u32]) {
    for (w, ks) in out.iter_mut().zip(keys.chunks(32)) {
        *w = ks.iter().zip(0..32).fold(0u32, |w, (&k, b)| w | (u32::from(rule.kept(k)) << b));
    }
}
}

/// A chunk's decision as a pure function of the key, valid when each boundary tie group
/// in the chunk is kept or dropped as a whole (every chunk but at most two): then ranking
/// the ties by index changes nothing, and the test vectorizes.
#[derive(Debug, Clone, Copy)]
struct ChunkRule {
    a: u32,
    b: u32,
    keep_a: bool,
    keep_b: bool,
}

impl ChunkRule {
    fn of(packed: &[f64], chunk: usize) -> Option<ChunkRule> {
        let g = |i: usize| packed[i] as u64;
        let (lo, hi, a, b, less_a, less_b, nc) = (g(0), g(1), g(2) as u32, g(3) as u32, g(4), g(5), g(6) as usize); // nc: chunks + 1
                                                                                                                    // The chunk's counts of keys equal to `a` and `b`.
        let (na, nb) = (g(8 + chunk) - g(7 + chunk), g(8 + nc + chunk) - g(7 + nc + chunk));
        // Ranks of the chunk's ties: [first, first + n), all in or all out of [lo, hi)?
        let whole = |first: u64, n: u64| -> Option<bool> {
            if n == 0 || (first >= lo && first + n <= hi) {
                Some(true)
            } else if first + n <= lo || first >= hi {
                Some(false)
            } else {
                None
            }
        };
        let keep_a = whole(less_a + g(7 + chunk), na)?;
        // `a == b`: the ties rank by `a`'s counters (as `runs` does).
        let keep_b = if a == b { keep_a } else { whole(less_b + g(7 + nc + chunk), nb)? };
        Some(ChunkRule { a, b, keep_a, keep_b })
    }

    #[inline]
    fn kept(&self, k: u32) -> bool {
        ((k > self.a) & (k < self.b)) | ((k == self.a) & self.keep_a) | ((k == self.b) & self.keep_b)
    }

    /// A chunk's (`len` entries) decisions as runs of one rule each: the whole chunk where
    /// [`ChunkRule::of`] finds one rule, else [`ChunkRule::runs`] of its keys (`keys` only
    /// called then).
    fn runs_of<'k>(packed: &[f64], chunk: usize, len: usize, keys: impl FnOnce() -> Cow<'k, [u32]>) -> Vec<(std::ops::Range<usize>, ChunkRule)> {
        match ChunkRule::of(packed, chunk) {
            Some(rule) => vec![(0..len, rule)],
            None => Self::runs(packed, chunk, &keys()),
        }
    }

    /// A chunk's decisions as runs of one rule each (at most five), where
    /// [`ChunkRule::of`] finds none: a boundary key's ties rank by index, so the kept ones among
    /// them are the occurrences `s..e` of that key in the chunk, and the rule changes only
    /// where those start and stop.
    fn runs(packed: &[f64], chunk: usize, keys: &[u32]) -> Vec<(std::ops::Range<usize>, ChunkRule)> {
        let g = |i: usize| packed[i] as u64;
        // nc: chunks + 1
        let (lo, hi, a, b, less_a, less_b, nc) = (g(0), g(1), g(2) as u32, g(3) as u32, g(4), g(5), g(6) as usize);
        // Where the kept occurrences of `x` (ranks from `first`, `n` of them here) start and stop.
        let kept_span = |x: u32, first: u64, n: u64| -> (usize, usize) {
            let (s, e) = (lo.saturating_sub(first).min(n), hi.saturating_sub(first).min(n));
            let (mut at, mut seen) = ([keys.len(); 2], 0u64);
            for (j, _) in keys.iter().enumerate().filter(|&(_, &k)| k == x) {
                if seen == s {
                    at[0] = j;
                }
                if seen == e {
                    at[1] = j;
                    break;
                }
                seen += 1;
            }
            (at[0].min(at[1]), at[1])
        };
        let sa = kept_span(a, less_a + g(7 + chunk), g(8 + chunk) - g(7 + chunk));
        // `a == b`: the ties rank by `a`'s counters.
        let sb = if a == b { sa } else { kept_span(b, less_b + g(7 + nc + chunk), g(8 + nc + chunk) - g(7 + nc + chunk)) };
        let mut cuts = vec![0, sa.0, sa.1, sb.0, sb.1];
        cuts.sort_unstable();
        cuts.dedup();
        cuts.retain(|&p| p < keys.len());
        let inside = |p: usize, (s, e): (usize, usize)| p >= s && p < e;
        let ends = cuts.iter().skip(1).copied().chain([keys.len()]);
        cuts.iter().zip(ends).map(|(&p, e)| (p..e, ChunkRule { a, b, keep_a: inside(p, sa), keep_b: inside(p, sb) })).collect()
    }
}

/// `x − base` into `out`, zeroed where `rule` drops its key.
fn masked_delta_by_rule(rule: ChunkRule, desc: bool, x: &[f32], base: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F was just detected.
        let done = unsafe { x86_512::masked_delta_by_rule(rule, key_flip(desc), x, base, out) };
        return masked_delta_by_key(rule, desc, &x[done..], &base[done..], &mut out[done..]);
    }
    masked_delta_by_key(rule, desc, x, base, out)
}

crate::simd::avx2! {
/// [`masked_delta_by_rule`] entry by entry. Every entry is stored computed (masking in place,
/// the AVX2 build stored the zeros with masked stores, slow on AMD's CPUs).
fn masked_delta_by_key(rule: ChunkRule, desc: bool, x: &[f32], base: &[f32], out: &mut [f32]) {
    let flip = key_flip(desc);
    for (o, (&x, &b)) in out.iter_mut().zip(x.iter().zip(base)) {
        let d = x - b;
        *o = bits::keep_if(d, u32::from(rule.kept(mag_key(d) ^ flip)));
    }
}
}

/// `x − base` (one chunk) with the entries that the window packed in `packed` drops zeroed,
/// of the descending (`desc`) or ascending magnitude keys, in one pass per run of one rule.
pub fn masked_delta_by_window(packed: &[f64], chunk: usize, x: &[f32], base: &[f32], out: &mut [f32], desc: bool) {
    let flip = key_flip(desc);
    let keys = || x.iter().zip(base).map(|(&x, &b)| mag_key(x - b) ^ flip).collect();
    for (r, rule) in ChunkRule::runs_of(packed, chunk, x.len(), keys) {
        masked_delta_by_rule(rule, desc, &x[r.clone()], &base[r.clone()], &mut out[r]);
    }
}

/// Keep decisions stored as bits (`u32` words, bit `g % 32` of word `g / 32` for element `g`,
/// carried as `f64` statistics two words per value: [`pack`]): 1/32 of the tensor's f32 size,
/// and `apply` needs no second look at keys or ranks.
pub mod bits {
    use rayon::prelude::*;

    /// Words `2k` and `2k + 1` as the low and high halves of value `k`'s bits (a word per `f64`
    /// took twice the memory: 200 MB per model for a 3B model's embedding). The values are
    /// only moved and copied, never computed with, so their bits (NaN patterns included) stay.
    pub fn pack(words: &[u32]) -> Vec<f64> {
        // In parallel for a whole tensor's masks (della: on one thread, both cores waited on it);
        // a chunk's (SCE) stays on its thread.
        let pair = |p: &[u32]| f64::from_bits(u64::from(p[0]) | u64::from(p.get(1).copied().unwrap_or(0)) << 32);
        words.par_chunks(2).with_min_len(1 << 14).map(pair).collect()
    }

    /// Element `g`'s decision in packed words.
    #[cfg(test)]
    pub fn kept(packed: &[f64], g: usize) -> bool {
        words_from(packed, g / 32).next().is_some_and(|w| (w >> (g % 32)) & 1 == 1)
    }

    /// Packed word `k`.
    #[inline]
    pub fn word(packed: &[f64], k: usize) -> u32 {
        (packed[k / 2].to_bits() >> (32 * (k % 2))) as u32
    }

    /// The packed words from word `k` on.
    #[inline]
    fn words_from(packed: &[f64], k: usize) -> impl Iterator<Item = u32> + '_ {
        (k..packed.len() * 2).map(move |k| word(packed, k))
    }

    /// Records element `g`'s decision (words start zeroed); no branch on a coin flip.
    #[inline]
    pub fn set(words: &mut [u32], g: usize, kept: bool) {
        words[g / 32] |= u32::from(kept) << (g % 32);
    }

    /// ORs the bits of `src` into `words` starting at bit `at` (`src`'s unused high bits clear).
    #[inline]
    pub fn or_at(words: &mut [u32], at: usize, src: &[u32]) {
        let (w0, s) = (at / 32, (at % 32) as u32);
        for (k, &v) in src.iter().enumerate() {
            words[w0 + k] |= v << s;
            if s > 0 && v >> (32 - s) != 0 {
                words[w0 + k + 1] |= v >> (32 - s);
            }
        }
    }

    /// `x` when `keep` is 1, `+0.0` when it is 0, without a branch (the decisions are coin
    /// flips: a branch mispredicts half of them).
    #[inline]
    pub fn keep_if(x: f32, keep: u32) -> f32 {
        f32::from_bits(x.to_bits() & 0u32.wrapping_sub(keep))
    }

    /// Zeroes the entries of `delta` (elements `first..`, `first` a multiple of 32) whose bit
    /// is clear (the reference of [`masked_delta`]'s tests).
    #[cfg(test)]
    pub fn mask(words: &[f64], first: usize, delta: &mut [f32]) {
        debug_assert!(first.is_multiple_of(32));
        for (xs, w) in delta.chunks_mut(32).zip(words_from(words, first / 32)) {
            for (b, x) in xs.iter_mut().enumerate() {
                *x = keep_if(*x, (w >> b) & 1);
            }
        }
    }

    /// `x − base` into `out` with the entries whose bit is clear zeroed (elements `first..`,
    /// `first` a multiple of 32): [`super::delta_into`] then [`mask`] in one pass.
    pub fn masked_delta(words: &[f64], first: usize, x: &[f32], base: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx512_allowed() {
            let n = out.len() / 32 * 32;
            // SAFETY: AVX-512F was just detected.
            unsafe { super::x86_512::masked_delta(words_from(words, first / 32), &x[..n], &base[..n], &mut out[..n]) };
            return masked_delta_by_word(words, first + n, &x[n..], &base[n..], &mut out[n..]);
        }
        masked_delta_by_word(words, first, x, base, out)
    }

    crate::simd::avx2! {
    /// [`masked_delta`] entry by entry. (Masking in place, the AVX2 build stores the zeros with
    /// masked stores, slow on AMD's CPUs.)
    fn masked_delta_by_word(words: &[f64], first: usize, x: &[f32], base: &[f32], out: &mut [f32]) {
        debug_assert!(first.is_multiple_of(32));
        // Bit `j` of the word moved to the sign and spread over the lane: a shift per lane by
        // its own count, eight lanes at a time in the AVX2 build.
        let spread = |w: u32, j: usize| ((w << (31 - j)) as i32 >> 31) as u32;
        let word = |o: &mut [f32], x: &[f32], b: &[f32], w: u32| {
            for (j, (o, (&x, &b))) in o.iter_mut().zip(x.iter().zip(b)).enumerate() {
                *o = f32::from_bits((x - b).to_bits() & spread(w, j));
            }
        };
        for ((o, (x, b)), w) in out.chunks_mut(32).zip(x.chunks(32).zip(base.chunks(32))).zip(words_from(words, first / 32)) {
            match (<&mut [f32; 32]>::try_from(&mut *o), <&[f32; 32]>::try_from(x), <&[f32; 32]>::try_from(b)) {
                // A whole word: a fixed count, so that the loop is unrolled and vectorized.
                (Ok(o), Ok(x), Ok(b)) => word(o, x, b, w),
                _ => word(o, x, b, w),
            }
        }
    }
    }
}

/// The selection's masking sixteen entries at a time: the decisions as a mask register, the
/// dropped entries zeroed by the masked operation itself (the same bits: a kept entry is the
/// same subtraction, a dropped one +0.0).
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::ChunkRule;
    use std::arch::x86_64::*;

    /// `rule`'s decisions on sixteen keys.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kept(rule: &ChunkRule, k: __m512i) -> __mmask16 {
        let (a, b) = (_mm512_set1_epi32(rule.a as i32), _mm512_set1_epi32(rule.b as i32));
        let all = |keep: bool| if keep { 0xffff } else { 0 };
        _mm512_mask_cmplt_epu32_mask(_mm512_cmpgt_epu32_mask(k, a), k, b)
            | (_mm512_cmpeq_epi32_mask(k, a) & all(rule.keep_a))
            | (_mm512_cmpeq_epi32_mask(k, b) & all(rule.keep_b))
    }

    /// [`super::rule_words`] for the whole words of `keys`; returns how many it wrote.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rule_words(rule: ChunkRule, keys: &[u32], out: &mut [u32]) -> usize {
        let whole = (keys.len() / 32).min(out.len());
        for (w, ks) in out[..whole].iter_mut().zip(keys.chunks_exact(32)) {
            let lo = kept(&rule, _mm512_loadu_si512(ks.as_ptr().cast()));
            let hi = kept(&rule, _mm512_loadu_si512(ks.as_ptr().add(16).cast()));
            *w = u32::from(lo) | u32::from(hi) << 16;
        }
        whole
    }

    /// [`super::masked_delta_by_rule`] sixteen entries at a time (`flip` XORed into each
    /// magnitude key); returns how many entries it wrote.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn masked_delta_by_rule(rule: ChunkRule, flip: u32, x: &[f32], base: &[f32], out: &mut [f32]) -> usize {
        let n = out.len().min(x.len()).min(base.len()) / 16 * 16;
        let (abs, flip) = (_mm512_set1_epi32(i32::MAX), _mm512_set1_epi32(flip as i32));
        for i in (0..n).step_by(16) {
            let d = _mm512_sub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(base.as_ptr().add(i)));
            let key = _mm512_xor_si512(_mm512_and_si512(_mm512_castps_si512(d), abs), flip);
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_maskz_mov_ps(kept(&rule, key), d));
        }
        n
    }

    /// [`super::bits::masked_delta`] for the whole words of `out` (32 entries each; `words` from
    /// its first).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn masked_delta(words: impl Iterator<Item = u32>, x: &[f32], base: &[f32], out: &mut [f32]) {
        let whole = out.len() / 32;
        assert!(x.len() >= whole * 32 && base.len() >= whole * 32);
        for (k, w) in words.take(whole).enumerate() {
            for h in [0, 16] {
                let i = 32 * k + h;
                let d = _mm512_maskz_sub_ps((w >> h) as u16, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(base.as_ptr().add(i)));
                _mm512_storeu_ps(out.as_mut_ptr().add(i), d);
            }
        }
    }
}

/// Which norm mergekit's rescale matches (its `RescaleNorm`), or the paper's `1/density`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    None,
    L1,
    L2,
    Linf,
    /// Survivors multiplied by `1/density` (the DARE paper's rescale).
    Density,
}

impl Rescale {
    pub fn parse(s: &str) -> Option<Rescale> {
        Some(match s {
            "none" => Rescale::None,
            "l1" => Rescale::L1,
            "l2" => Rescale::L2,
            "linf" => Rescale::Linf,
            "density" => Rescale::Density,
            _ => return None,
        })
    }

    /// Adds `x` to a sum of this norm (the kernels' lanes of sums take the same operations
    /// side by side: `norms.rs`): the reference of their tests.
    #[cfg(test)]
    pub fn acc(self, acc: &mut f64, x: f32) {
        let x = x as f64;
        match self {
            Rescale::L2 => *acc += x * x,
            Rescale::Linf => *acc = acc.max(x.abs()),
            _ => *acc += x.abs(),
        }
    }

    pub fn fold(self, a: f64, b: f64) -> f64 {
        if self == Rescale::Linf {
            a.max(b)
        } else {
            a + b
        }
    }

    /// The sums of a tensor from those of its chunks `(before, after)`, folded in chunk order.
    pub fn fold_parts(self, parts: impl IntoIterator<Item = (f64, f64)>) -> (f64, f64) {
        parts.into_iter().fold((0.0, 0.0), |(b, a), (pb, pa)| (self.fold(b, pb), self.fold(a, pa)))
    }

    pub fn finish(self, v: f64) -> f64 {
        if self == Rescale::L2 {
            v.sqrt()
        } else {
            v
        }
    }
}

/// mergekit's guard: no rescale when either norm is below this.
pub const RESCALE_EPS: f64 = 1e-7;

/// torch.sign: −1, 0 or +1 (0 for ±0).
#[inline]
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn kept_by_window(vals: &[f32], lo: usize, hi: usize, desc: bool) -> Vec<bool> {
        let io = crate::kernel::Slices::new(None, &[vals]);
        let key: fn(f32) -> u32 = if desc { mag_key_desc } else { mag_key };
        let kf = move |v: &[&[f32]], out: &mut [u32]| v[0].iter().zip(out).for_each(|(&x, o)| *o = key(x));
        let w = Window::find(&io, &[0], lo, hi, &kf).unwrap();
        let mut packed = vec![];
        w.pack(&mut packed);
        // Every build decides the same.
        let builds = crate::simd::each_build(|| {
            let mut kept = vec![];
            for (c, ch) in vals.chunks(CHUNK).enumerate() {
                let keys: Vec<u32> = ch.iter().map(|&x| key(x)).collect();
                let mut words = vec![u32::MAX; keys.len().div_ceil(32)];
                Window::decide_words(&packed, c, &keys, &mut words);
                kept.extend((0..keys.len()).map(|j| (words[j / 32] >> (j % 32)) & 1 == 1));
            }
            kept
        });
        assert!(builds.iter().all(|b| *b == builds[0]));
        builds.into_iter().next().expect("a build")
    }

    /// Reference: stable sort by key, keep ranks [lo, hi).
    fn reference(vals: &[f32], lo: usize, hi: usize, desc: bool) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..vals.len()).collect();
        let key = |i: usize| {
            if desc {
                mag_key_desc(vals[i])
            } else {
                mag_key(vals[i])
            }
        };
        idx.sort_by_key(|&i| key(i)); // stable
        let mut kept = vec![false; vals.len()];
        for &i in &idx[lo..hi] {
            kept[i] = true;
        }
        kept
    }

    #[test]
    fn or_at_places_bits_at_any_offset() {
        // Against setting the bits one by one, at aligned and unaligned offsets.
        let src: Vec<u32> = vec![0xDEAD_BEEF, 0x8000_0001, 0x0000_0FF0];
        let len = 3 * 32 - 4; // the last word's top bits unused (clear)
        for at in [0usize, 1, 31, 32, 45, 64] {
            let mut got = vec![0u32; (at + len).div_ceil(32)];
            bits::or_at(&mut got, at, &src);
            let mut want = vec![0u32; got.len()];
            (0..len).for_each(|j| bits::set(&mut want, at + j, (src[j / 32] >> (j % 32)) & 1 == 1));
            assert_eq!(got, want, "at {at}");
        }
    }

    #[test]
    fn window_matches_stable_sort_with_ties_across_chunks() {
        // Few distinct magnitudes so the boundaries fall on big tie groups that straddle chunks.
        let n = 3 * CHUNK + 123;
        let vals: Vec<f32> = (0..n).map(|i| ((crate::rng::mix64(i as u64) % 7) as f32 - 3.0) * 0.5).collect();
        for &(lo, hi) in &[(0, 1), (0, n), (10, 20), (n / 3, 2 * n / 3), (n - 1, n), (5, n - 5), (0, n / 7)] {
            for desc in [false, true] {
                let got = kept_by_window(&vals, lo, hi, desc);
                assert_eq!(got, reference(&vals, lo, hi, desc), "lo {lo} hi {hi} desc {desc}");
                assert_eq!(got.iter().filter(|&&k| k).count(), hi - lo);
            }
        }
    }

    #[test]
    fn bit_masks_zero_exactly_the_dropped_entries() {
        // Not multiples of 32; an even and an odd number of words (two per packed value).
        for n in [1000usize, 970] {
            let keep = |g: usize| !(g * 7919).is_multiple_of(3);
            let mut packed = vec![0u32; n.div_ceil(32)];
            (0..n).for_each(|g| bits::set(&mut packed, g, keep(g)));
            let words = bits::pack(&packed);
            let vals: Vec<f32> = (0..n).map(|g| g as f32 - 500.5).collect();
            // Every fifth delta zero.
            let base: Vec<f32> = (0..n).map(|g| if g % 5 == 0 { g as f32 - 500.5 } else { 0.25 * g as f32 }).collect();
            for first in [0, 32, 320] {
                let mut d = vals[first..].to_vec();
                bits::mask(&words, first, &mut d);
                for (j, x) in d.iter().enumerate() {
                    let want = if keep(first + j) { vals[first + j] } else { 0.0 };
                    assert_eq!(x.to_bits(), want.to_bits(), "element {}", first + j);
                }
                // The fused delta and mask, from every build, for whole words and a partial last one.
                for len in [n - first, 64, 37, 16, 5] {
                    let r = first..first + len;
                    let mut want = vec![0f32; len];
                    delta_into(&vals[r.clone()], &base[r.clone()], &mut want);
                    bits::mask(&words, first, &mut want);
                    let builds = crate::simd::each_build(|| {
                        let mut got = vec![f32::NAN; len];
                        bits::masked_delta(&words, first, &vals[r.clone()], &base[r.clone()], &mut got);
                        got
                    });
                    for (b, got) in builds.iter().enumerate() {
                        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "n {n}, from {first}, {len} elements, build {b}");
                    }
                }
            }
        }
    }

    /// Packed words whose halves make NaN and infinite `f64` patterns (a high word with its
    /// bits 20–30 set) come back as they went in, through the copies a merge makes.
    #[test]
    fn packed_words_keep_their_bits() {
        let words = [!0u32, 0x7FF0_0001, 0xFFF8_0000, 0x7FF0_0000, 1 << 31, 0, 0x0000_0001];
        for k in 0..words.len() {
            let w: Vec<u32> = words.iter().cycle().skip(k).take(words.len()).copied().collect();
            let packed: Vec<f64> = bits::pack(&w).to_vec();
            let ones = vec![1f32; 32 * w.len()];
            let mut got = ones.clone();
            bits::mask(&packed, 0, &mut got);
            let want: Vec<f32> = (0..ones.len()).map(|g| if (w[g / 32] >> (g % 32)) & 1 == 1 { 1.0 } else { 0.0 }).collect();
            assert_eq!(got, want, "rotation {k}");
        }
    }

    #[test]
    fn masked_delta_by_window_of_a_zero_base_keeps_what_the_window_keeps() {
        // Tie groups on both boundaries straddling chunks: whole-chunk rules and ranked chunks.
        let n = 4 * CHUNK + 77;
        let vals: Vec<f32> = (0..n).map(|i| ((crate::rng::mix64(i as u64 + 9) % 5) as f32 - 2.0) * 0.25).collect();
        for &(lo, hi) in &[(0, n / 5), (n / 5, n - n / 5), (1, n)] {
            let kf = |v: &[&[f32]], out: &mut [u32]| v[0].iter().zip(out).for_each(|(&x, o)| *o = mag_key(x));
            let w = Window::find(&crate::kernel::Slices::new(None, &[&vals]), &[0], lo, hi, &kf).unwrap();
            let mut packed = vec![];
            w.pack(&mut packed);
            let want = reference(&vals, lo, hi, false);
            for (c, ch) in vals.chunks(CHUNK).enumerate() {
                let mut d = vec![f32::NAN; ch.len()];
                masked_delta_by_window(&packed, c, ch, &vec![0.0; ch.len()], &mut d, false);
                for (j, (&got, &x)) in d.iter().zip(ch).enumerate() {
                    assert_eq!(got.to_bits(), if want[c * CHUNK + j] { x } else { 0.0 }.to_bits(), "lo {lo} hi {hi} at {}", c * CHUNK + j);
                }
            }
        }
    }

    /// The fused delta and mask, runs of one rule where a boundary tie group is cut inside a
    /// chunk (both boundaries in one chunk, one key on both, cuts at a chunk's first and last
    /// entries), against a stable sort of the deltas, both key orders.
    #[test]
    fn masked_delta_by_window_keeps_what_the_window_keeps() {
        let n = 3 * CHUNK + 77;
        let base: Vec<f32> = (0..n).map(|i| (crate::rng::mix64(i as u64) % 7) as f32 * 0.5).collect();
        // Five magnitudes of delta (three keys), exact in f32.
        let d: Vec<f32> = (0..n).map(|i| ((crate::rng::mix64(i as u64 + 9) % 5) as f32 - 2.0) * 0.25).collect();
        let x: Vec<f32> = base.iter().zip(&d).map(|(&b, &d)| b + d).collect();
        let d: Vec<f32> = x.iter().zip(&base).map(|(&x, &b)| x - b).collect();
        let third = n / 3;
        let (mut ranked, mut whole) = (0, 0);
        for desc in [false, true] {
            for &(lo, hi) in
                &[(0, n / 5), (n / 5, n - n / 5), (1, n), (third, third + 10), (third - 500, third + CHUNK), (0, n - 1), (CHUNK, 2 * CHUNK)]
            {
                let key = if desc { mag_key_desc } else { mag_key };
                let kf = move |v: &[&[f32]], out: &mut [u32]| v[0].iter().zip(out).for_each(|(&x, o)| *o = key(x));
                let w = Window::find(&crate::kernel::Slices::new(None, &[&d]), &[0], lo, hi, &kf).unwrap();
                let mut packed = vec![];
                w.pack(&mut packed);
                let want = reference(&d, lo, hi, desc);
                for (c, ((xc, bc), dc)) in x.chunks(CHUNK).zip(base.chunks(CHUNK)).zip(d.chunks(CHUNK)).enumerate() {
                    match ChunkRule::of(&packed, c) {
                        Some(_) => whole += 1,
                        None => ranked += 1,
                    }
                    let builds = crate::simd::each_build(|| {
                        let mut got = vec![f32::NAN; xc.len()];
                        masked_delta_by_window(&packed, c, xc, bc, &mut got, desc);
                        got
                    });
                    for (b, got) in builds.iter().enumerate() {
                        for (j, (&got, &dv)) in got.iter().zip(dc).enumerate() {
                            let g = c * CHUNK + j;
                            assert_eq!(got.to_bits(), if want[g] { dv } else { 0.0 }.to_bits(), "build {b} desc {desc} lo {lo} hi {hi} at {g}");
                        }
                    }
                }
            }
        }
        assert!(ranked >= 8 && whole >= 8, "ranked {ranked}, whole {whole}");
    }

    #[test]
    fn window_distinct_values() {
        let vals: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
        for (lo, hi) in [(0, 100), (900, 1000), (3, 997)] {
            assert_eq!(kept_by_window(&vals, lo, hi, true), reference(&vals, lo, hi, true));
            assert_eq!(kept_by_window(&vals, lo, hi, false), reference(&vals, lo, hi, false));
        }
    }

    #[test]
    fn keys_order_like_magnitudes() {
        let xs = [0.0f32, -0.0, 1e-30, -2.0, 3.5, f32::INFINITY];
        for &x in &xs {
            for &y in &xs {
                assert_eq!(mag_key(x).cmp(&mag_key(y)), x.abs().partial_cmp(&y.abs()).unwrap());
                assert_eq!(mag_key_desc(x).cmp(&mag_key_desc(y)), y.abs().partial_cmp(&x.abs()).unwrap());
            }
        }
    }

    #[test]
    fn torch_sign() {
        assert_eq!([sign(-0.0), sign(0.0), sign(-3.0), sign(1e-30)], [0.0, 0.0, -1.0, 1.0]);
    }
}
