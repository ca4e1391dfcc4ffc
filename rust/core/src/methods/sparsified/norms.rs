//! The rescale norms' sums of several lanes side by side (DELLA's strands and models, gta's
//! chunks and models): each lane's sums, before and after masking, run in entry order as a
//! pass of its own would take them (the additions of [`Rescale::acc`]); their chains of
//! additions overlap instead of each waiting on its own latency. L1 sums, whose additions
//! seldom round (`|Δ|` of bf16 weights: few bits, a narrow range), are taken in any order
//! where that is proven to give the same bits ([`l1_sums`]).
use super::sparsify::Rescale;

/// Four lanes of entries, each entry's `|Δ|` before and after masking.
pub trait Lanes {
    /// The entries of each lane.
    fn entries(&self) -> usize;
    /// Lane `p`'s entry `i`, before and after masking.
    fn at(&self, p: usize, i: usize) -> (f32, f32);
    /// Lane `p`'s entries `i..i + 4`, before and after masking (SSE, in every x86-64 build).
    #[cfg(target_arch = "x86_64")]
    fn four(&self, p: usize, i: usize) -> (std::arch::x86_64::__m128, std::arch::x86_64::__m128);
}

/// Keys (`|Δ|` bits) and kept keys (0 where dropped): DELLA's rows.
pub struct Keys<'a> {
    pub keys: [&'a [u32]; 4],
    pub kept: [&'a [u32]; 4],
}

impl Lanes for Keys<'_> {
    fn entries(&self) -> usize {
        self.keys[0].len()
    }

    #[inline(always)]
    fn at(&self, p: usize, i: usize) -> (f32, f32) {
        (f32::from_bits(self.keys[p][i]), f32::from_bits(self.kept[p][i]))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn four(&self, p: usize, i: usize) -> (std::arch::x86_64::__m128, std::arch::x86_64::__m128) {
        use std::arch::x86_64::*;
        let (k, o) = (&self.keys[p][i..i + 4], &self.kept[p][i..i + 4]);
        // SAFETY: four entries each, just checked.
        unsafe { (_mm_loadu_ps(k.as_ptr().cast()), _mm_loadu_ps(o.as_ptr().cast())) }
    }
}

/// The deltas `x − base` and their masked copies (+0.0 where dropped), as the masking pass
/// wrote them: gta's chunks.
pub struct Deltas<'a> {
    pub x: [&'a [f32]; 4],
    pub base: [&'a [f32]; 4],
    pub masked: [&'a [f32]; 4],
}

impl Lanes for Deltas<'_> {
    fn entries(&self) -> usize {
        self.x[0].len()
    }

    #[inline(always)]
    fn at(&self, p: usize, i: usize) -> (f32, f32) {
        ((self.x[p][i] - self.base[p][i]).abs(), self.masked[p][i].abs())
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn four(&self, p: usize, i: usize) -> (std::arch::x86_64::__m128, std::arch::x86_64::__m128) {
        use std::arch::x86_64::*;
        let (x, b, m) = (&self.x[p][i..i + 4], &self.base[p][i..i + 4], &self.masked[p][i..i + 4]);
        // SAFETY: four entries each, just checked.
        unsafe {
            let abs = _mm_castsi128_ps(_mm_set1_epi32(0x7FFF_FFFF));
            let d = _mm_sub_ps(_mm_loadu_ps(x.as_ptr()), _mm_loadu_ps(b.as_ptr()));
            (_mm_and_ps(d, abs), _mm_and_ps(_mm_loadu_ps(m.as_ptr()), abs))
        }
    }
}

/// Continues four lanes' sums `s` (lane `p`: `s[2p]` before masking, `s[2p + 1]` after) over
/// their entries: the additions of a pass over each lane's masked deltas, in the same order.
/// The lanes hold the same number of entries.
pub fn sums_of_four(norm: Rescale, lanes: &impl Lanes, s: &mut [f64; 8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::wide_allowed() && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { x86::sums_of_four(norm, lanes, s) };
    }
    sums_from(norm, lanes, 0, s);
}

/// [`sums_of_four`] from entry `from` on, one entry of every lane at a time.
fn sums_from(norm: Rescale, lanes: &impl Lanes, from: usize, s: &mut [f64; 8]) {
    #[inline(always)]
    fn run(lanes: &impl Lanes, from: usize, s: &mut [f64; 8], add: impl Fn(f64, f64) -> f64) {
        // In locals: sums kept in memory would put a store and a load on each addition's chain.
        let mut t = *s;
        for i in from..lanes.entries() {
            for p in 0..4 {
                let (b, a) = lanes.at(p, i);
                t[2 * p] = add(t[2 * p], b as f64);
                t[2 * p + 1] = add(t[2 * p + 1], a as f64);
            }
        }
        *s = t;
    }
    // One loop per norm (`Rescale::acc`'s operations), not a match per addition.
    match norm {
        Rescale::L2 => run(lanes, from, s, |a, x| a + x * x),
        Rescale::Linf => run(lanes, from, s, f64::max),
        _ => run(lanes, from, s, |a, x| a + x),
    }
}

/// Whether [`l1_sums`] can take its sums in any order (AVX-512): the caller then needs no
/// masked copy of the keys nor lanes side by side.
pub fn l1_any_order() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::simd::avx512_allowed();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `acc` (before, after masking) continued over `keys` (`|Δ|` bits) and over those whose bit
/// `from + i` of `bits` is set: the additions of [`Rescale::L1`] in entry order, the same bits.
///
/// Where no partial sum of that order rounds, the result is the exact sum, which any order
/// gives under the same condition: every term and `acc` is a multiple of the least of their
/// lowest set bits `q`, so every partial sum below `2^53·q` is a double. With AVX-512 the
/// keys are added sixteen a step in any order and the sums are kept where they come out below
/// [`any_order_bound`]; otherwise (a key with bits far below the sum's last place, such as the
/// delta of a weight near zero) the entries are added in order.
pub fn l1_sums(keys: &[u32], bits: &[u32], from: usize, acc: [f64; 2]) -> [f64; 2] {
    #[cfg(target_arch = "x86_64")]
    if l1_any_order() {
        // SAFETY: AVX-512F/DQ were just detected.
        if let Some(s) = unsafe { x86_512::l1_exact(keys, bits, from, acc) } {
            return s;
        }
    }
    l1_in_order(keys, bits, from, acc)
}

/// `acc` (before, after masking) continued over `|x − base|` and `|masked|`: the additions of
/// [`Rescale::L1`] in entry order (as [`sums_of_four`] over [`Deltas`]), in any order where
/// that gives the same bits (see [`l1_sums`]).
pub fn l1_delta_sums(x: &[f32], base: &[f32], masked: &[f32], acc: [f64; 2]) -> [f64; 2] {
    #[cfg(target_arch = "x86_64")]
    if l1_any_order() {
        // SAFETY: AVX-512F/DQ were just detected.
        if let Some(s) = unsafe { x86_512::l1_delta_exact(x, base, masked, acc) } {
            return s;
        }
    }
    let [mut before, mut after] = acc;
    for ((&x, &b), &m) in x.iter().zip(base).zip(masked) {
        before += (x - b).abs() as f64;
        after += m.abs() as f64;
    }
    [before, after]
}

/// [`l1_sums`] entry by entry.
fn l1_in_order(keys: &[u32], bits: &[u32], from: usize, acc: [f64; 2]) -> [f64; 2] {
    let [mut before, mut after] = acc;
    for (p, &k) in (from..).zip(keys) {
        let x = f32::from_bits(k) as f64;
        before += x;
        after += if (bits[p / 32] >> (p % 32)) & 1 == 1 { x } else { 0.0 };
    }
    [before, after]
}

/// The least sum of nonnegative multiples of `q` (and of at most 2^17 additions) that may
/// have rounded in entry order: below it, where every partial sum lies, each is a double (a
/// multiple of `q` below `2^53·q`), so every order of the additions gives the exact sum;
/// a sum taken in another order that rounded is at least `2^53·q·(1 − 2^-36)`, above this
/// bound. `q` a power of two (or ∞: no bound).
pub fn any_order_bound(q: f64) -> f64 {
    q * (1u64 << 53) as f64 * (1.0 - 2f64.powi(-35))
}

/// The value of the lowest set bit of a positive finite double (+∞ for zero).
pub fn lowest_bit(x: f64) -> f64 {
    let b = x.to_bits();
    match (b, b & ((1 << 52) - 1)) {
        (0, _) => f64::INFINITY,
        // A power of two (or ∞, which no bound passes).
        (_, 0) => x,
        // Without its lowest bit the value keeps its exponent: the difference is exact.
        _ => x - f64::from_bits(b & (b - 1)),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_512 {
    use std::arch::x86_64::*;

    /// Sums of entries (before, after masking) in any order, and the least lowest set bit of
    /// the nonzero ones: whether the sums in order are these.
    struct AnyOrder {
        before: [__m512d; 2],
        after: [__m512d; 2],
        /// As float bits (positive floats order as their bits), all ones for none.
        low: __m512i,
    }

    impl AnyOrder {
        #[inline(always)]
        unsafe fn new() -> AnyOrder {
            let zero = _mm512_setzero_pd();
            AnyOrder { before: [zero; 2], after: [zero; 2], low: _mm512_set1_epi32(-1) }
        }

        #[inline(always)]
        unsafe fn lowest(&mut self, v: __m512i) {
            self.low = least_lowest_bits(self.low, v);
        }

        /// Sixteen entries before masking (`|x|` bits) and after: those of `kept` among them
        /// (`after` None) or `after` (their own lowest bits taken too).
        #[inline(always)]
        unsafe fn add(&mut self, v: __m512i, kept: u16, after: Option<__m512i>) {
            let wide = |v: __m512i| {
                let v = _mm512_castsi512_ps(v);
                [_mm512_cvtps_pd(_mm512_castps512_ps256(v)), _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v))]
            };
            let b = wide(v);
            self.lowest(v);
            let a = match after {
                Some(a) => {
                    self.lowest(a);
                    wide(a)
                }
                None => b,
            };
            let mask = [kept as u8, (kept >> 8) as u8];
            for h in 0..2 {
                self.before[h] = _mm512_add_pd(self.before[h], b[h]);
                self.after[h] = _mm512_mask_add_pd(self.after[h], mask[h], self.after[h], a[h]);
            }
        }

        /// `acc` plus the sums, where the sums in order give the same bits.
        #[inline(always)]
        unsafe fn finish(self, acc: [f64; 2]) -> Option<[f64; 2]> {
            let low = _mm512_reduce_min_epu32(self.low);
            if low == u32::MAX {
                // Only zeros: adding them leaves `acc` (at least +0) as it is.
                return Some(acc);
            }
            // An infinite entry makes the sum infinite, which no bound passes.
            let q = (f32::from_bits(low) as f64).min(super::lowest_bit(acc[0])).min(super::lowest_bit(acc[1]));
            let sum = |v: [__m512d; 2]| _mm512_reduce_add_pd(_mm512_add_pd(v[0], v[1]));
            let sums = [acc[0] + sum(self.before), acc[1] + sum(self.after)];
            let bound = super::any_order_bound(q);
            (sums[0] < bound && sums[1] < bound).then_some(sums)
        }
    }

    /// `low` with the lowest set bit of each nonzero lane of `v` (positive f32 bits) taken in
    /// where it is less (as float bits: positive floats order as their bits): a value with
    /// mantissa bits less the same value without its lowest one (exact: the same exponent); a
    /// power of two is its own lowest bit.
    #[inline(always)]
    pub unsafe fn least_lowest_bits(low: __m512i, v: __m512i) -> __m512i {
        let cleared = _mm512_and_si512(v, _mm512_sub_epi32(v, _mm512_set1_epi32(1)));
        let diff = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(v), _mm512_castsi512_ps(cleared)));
        let lowest = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(v, _mm512_set1_epi32(0x7F_FFFF)), v, diff);
        _mm512_mask_min_epu32(low, _mm512_test_epi32_mask(v, v), low, lowest)
    }

    /// The live lanes of the step at `i` of `n` entries.
    #[inline(always)]
    fn live(i: usize, n: usize) -> u16 {
        if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        }
    }

    /// [`super::l1_sums`]' sums in any order, or `None` where they may differ from the sums in
    /// order.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn l1_exact(keys: &[u32], bits: &[u32], from: usize, acc: [f64; 2]) -> Option<[f64; 2]> {
        let n = keys.len();
        debug_assert!(bits.len() * 32 >= from + n);
        // The keys' bits `p..p + 32` (a word past the end reads as 0).
        let bits32 = |p: usize| {
            let w = p / 32;
            let two = u64::from(bits[w]) | bits.get(w + 1).map_or(0, |&h| u64::from(h) << 32);
            (two >> (p % 32)) as u32
        };
        let mut sums = AnyOrder::new();
        let whole = n / 32 * 32;
        let at = |i: usize| keys.as_ptr().add(i).cast::<i32>();
        for i in (0..whole).step_by(32) {
            let kept = bits32(from + i);
            sums.add(_mm512_loadu_si512(at(i).cast()), kept as u16, None);
            sums.add(_mm512_loadu_si512(at(i + 16).cast()), (kept >> 16) as u16, None);
        }
        for i in (whole..n).step_by(16) {
            let live = live(i, n);
            sums.add(_mm512_maskz_loadu_epi32(live, at(i)), bits32(from + i) as u16 & live, None);
        }
        sums.finish(acc)
    }

    /// [`super::l1_delta_sums`]' sums in any order, or `None` where they may differ from the
    /// sums in order.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn l1_delta_exact(x: &[f32], base: &[f32], masked: &[f32], acc: [f64; 2]) -> Option<[f64; 2]> {
        let n = x.len();
        assert!(base.len() == n && masked.len() == n);
        let abs = _mm512_set1_epi32(0x7FFF_FFFF);
        let mut sums = AnyOrder::new();
        for i in (0..n).step_by(16) {
            let live = live(i, n);
            let load = |v: &[f32]| _mm512_maskz_loadu_ps(live, v.as_ptr().add(i));
            let d = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(load(x), load(base))), abs);
            sums.add(d, u16::MAX, Some(_mm512_and_si512(_mm512_castps_si512(load(masked)), abs)));
        }
        sums.finish(acc)
    }
}

/// The four lanes' sums side by side in a vector per kind (before, after masking): four
/// consecutive entries of each lane widened where they lie, then transposed (4×4), so that each
/// vector addition takes one entry of every lane, in entry order. Gathering one entry from each
/// lane per step, as the compiler did, took three shuffles per vector on the one shuffle port.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Lanes, Rescale};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn sums_of_four(norm: Rescale, lanes: &impl Lanes, s: &mut [f64; 8]) {
        match norm {
            Rescale::L2 => run::<2>(norm, lanes, s),
            Rescale::Linf => run::<1>(norm, lanes, s),
            _ => run::<0>(norm, lanes, s),
        }
    }

    /// `NORM`, `norm`'s operation: 0 sums, 1 maxima, 2 sums of squares (the product rounded,
    /// then added: no fused multiply-add, as the scalar loop, which takes the last entries).
    #[target_feature(enable = "avx2")]
    unsafe fn run<const NORM: u8>(norm: Rescale, lanes: &impl Lanes, s: &mut [f64; 8]) {
        let len = lanes.entries();
        let (mut before, mut after) = (_mm256_setr_pd(s[0], s[2], s[4], s[6]), _mm256_setr_pd(s[1], s[3], s[5], s[7]));
        let add = |a: __m256d, x: __m256d| match NORM {
            2 => _mm256_add_pd(a, _mm256_mul_pd(x, x)),
            1 => _mm256_max_pd(a, x),
            _ => _mm256_add_pd(a, x),
        };
        // Rows (lane) of four entries to four vectors of one entry of every lane.
        let transpose = |c: [__m256d; 4]| {
            let (t0, t1) = (_mm256_unpacklo_pd(c[0], c[1]), _mm256_unpackhi_pd(c[0], c[1]));
            let (t2, t3) = (_mm256_unpacklo_pd(c[2], c[3]), _mm256_unpackhi_pd(c[2], c[3]));
            [
                _mm256_permute2f128_pd::<0x20>(t0, t2),
                _mm256_permute2f128_pd::<0x20>(t1, t3),
                _mm256_permute2f128_pd::<0x31>(t0, t2),
                _mm256_permute2f128_pd::<0x31>(t1, t3),
            ]
        };
        let quads = len / 4 * 4;
        for i in (0..quads).step_by(4) {
            let four: [(__m128, __m128); 4] = std::array::from_fn(|p| lanes.four(p, i));
            let b = transpose(four.map(|(b, _)| _mm256_cvtps_pd(b)));
            before = add(add(add(add(before, b[0]), b[1]), b[2]), b[3]);
            let a = transpose(four.map(|(_, a)| _mm256_cvtps_pd(a)));
            after = add(add(add(add(after, a[0]), a[1]), a[2]), a[3]);
        }
        let (mut b, mut a) = ([0f64; 4], [0f64; 4]);
        _mm256_storeu_pd(b.as_mut_ptr(), before);
        _mm256_storeu_pd(a.as_mut_ptr(), after);
        for p in 0..4 {
            (s[2 * p], s[2 * p + 1]) = (b[p], a[p]);
        }
        super::sums_from(norm, lanes, quads, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::sparsified::sparsify::mag_key;

    /// The L1 sums in entry order: [`sums_from`] over four copies of the lane.
    fn in_order(keys: &[u32], bits: &[u32], from: usize, acc: [f64; 2]) -> [f64; 2] {
        let kept: Vec<u32> = (from..).zip(keys).map(|(p, &k)| if (bits[p / 32] >> (p % 32)) & 1 == 1 { k } else { 0 }).collect();
        let mut s = [acc[0], acc[1], acc[0], acc[1], acc[0], acc[1], acc[0], acc[1]];
        sums_from(Rescale::L1, &Keys { keys: [keys; 4], kept: [&kept; 4] }, 0, &mut s);
        [s[0], s[1]]
    }

    /// The L1 sums in any order are the sums in order, bit for bit: keys of bf16 deltas (where
    /// the sums are taken in any order: checked), and keys whose sums in order round (a key
    /// far below the others, below the sum's last place, subnormal or infinite keys, sums
    /// under way), every offset of the bits within a word, pieces of 0 to 40 entries and long;
    /// the same as deltas.
    #[test]
    fn l1_sums_in_any_order_are_the_sums_in_order() {
        let bf16 = |x: f64| half::bf16::from_f64(x).to_f32();
        let delta = |s: u64, j: usize| {
            let b = bf16(crate::rng::normal(s, j as u64) * 0.02);
            mag_key(bf16(b as f64 + crate::rng::normal(s + 1, j as u64) * 0.002) - b)
        };
        let bits: Vec<u32> = (0..3000).map(|j| crate::rng::draw(9, j) as u32).collect();
        let mut taken = 0;
        for len in (0..41).chain([1000, 65536]) {
            let typical: Vec<u32> = (0..len).map(|j| delta(3, j)).collect();
            let mut tiny = typical.clone();
            let mut odd = typical.clone();
            if len > 0 {
                // 2^-60 (and its neighbours): below the last place of any sum of the others.
                tiny[len / 2] = (2f32.powi(-60)).to_bits() | (len as u32 & 3);
                odd[len - 1] = if len % 2 == 0 { 1 } else { f32::INFINITY.to_bits() };
                odd[0] = 0x0000_0F00; // subnormal
            }
            let accs = [[0.0, 0.0], [1.0, 0.5], [3.0 + 2f64.powi(-40), 1.0 + 2f64.powi(-52)], [0.1, 0.0]];
            for keys in [&typical, &tiny, &odd] {
                for (from, acc) in [0usize, 1, 7, 31, 32, 45].into_iter().zip(accs.into_iter().cycle()) {
                    let want = in_order(keys, &bits, from, acc);
                    let got = l1_sums(keys, &bits, from, acc);
                    assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "{len} keys from {from}, acc {acc:?}: {got:?} vs {want:?}");
                    // The same as deltas: `x` the key, the base 0, the masked copy 0 where dropped.
                    let x: Vec<f32> = keys.iter().map(|&k| f32::from_bits(k)).collect();
                    let masked: Vec<f32> = (from..).zip(&x).map(|(p, &x)| if (bits[p / 32] >> (p % 32)) & 1 == 1 { -x } else { 0.0 }).collect();
                    let zeros = vec![0f32; len];
                    let got = l1_delta_sums(&x, &zeros, &masked, acc);
                    assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "deltas: {len} keys from {from}, acc {acc:?}");
                    #[cfg(target_arch = "x86_64")]
                    if l1_any_order() && std::ptr::eq(keys, &typical) && len > 0 {
                        // SAFETY: AVX-512F/DQ were just detected.
                        taken += usize::from(unsafe { x86_512::l1_exact(keys, &bits, from, acc) }.is_some());
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if l1_any_order() {
            // At least every typical piece whose `acc` is 0 or a few bits (four per length;
            // the others have bits below 2^-52).
            assert!(taken >= 42 * 4, "any order taken {taken} times");
        }
        // A sum that rounds in order: 1 + 2^-54 is 1, each time.
        let small = vec![2f32.powi(-54).to_bits(); 64];
        let all = vec![!0u32; 2];
        assert_eq!(l1_sums(&small, &all, 0, [1.0, 1.0]), [1.0, 1.0]);
        // A sum under way with a bit below the keys' rounds at each of several powers of two
        // in order, once in one addition: the orders differ.
        let coarse = [
            1105199104u32,
            1062993920,
            1087897600,
            1079508992,
            1066663936,
            1099694080,
            1096286208,
            1055916032,
            1026555904,
            1062993920,
            1109131264,
            1043595264,
        ];
        let acc = [f64::from_bits(0x3FF0_0000_0000_03DD); 2];
        assert_eq!(l1_sums(&coarse, &all, 0, acc).map(f64::to_bits), in_order(&coarse, &all, 0, acc).map(f64::to_bits));
        // Keys whose lowest bit (2^-23) lies far below their value: 2^30 + 1 + 2^-23 rounds.
        let fine = vec![(1.0f32 + f32::EPSILON).to_bits(); 16];
        let acc = [2f64.powi(30); 2];
        assert_eq!(l1_sums(&fine, &all, 0, acc).map(f64::to_bits), in_order(&fine, &all, 0, acc).map(f64::to_bits));
    }

    /// The four lanes' sums taken side by side (the AVX2 build, where the CPU has it) are the
    /// entry-by-entry loop's, for every norm, pieces of 0 to 13 entries and a long one, zeros
    /// among the kept keys, sums already under way.
    #[test]
    fn side_by_side_sums_are_the_plain_loop() {
        for len in (0..14).chain([2051]) {
            let lane = |s: u64| -> Vec<u32> { (0..len).map(|j| mag_key((crate::rng::normal(s, j as u64) * 0.002) as f32)).collect() };
            let keys: Vec<Vec<u32>> = (0..4).map(lane).collect();
            let kept: Vec<Vec<u32>> =
                keys.iter().enumerate().map(|(p, k)| k.iter().enumerate().map(|(j, &k)| if (j + p) % 3 == 0 { 0 } else { k }).collect()).collect();
            let (keys, kept) = (std::array::from_fn(|p| keys[p].as_slice()), std::array::from_fn(|p| kept[p].as_slice()));
            for norm in [Rescale::L1, Rescale::L2, Rescale::Linf] {
                let start: [f64; 8] = std::array::from_fn(|i| 1e-3 * i as f64);
                let (mut got, mut want) = (start, start);
                sums_of_four(norm, &Keys { keys, kept }, &mut got);
                sums_from(norm, &Keys { keys, kept }, 0, &mut want);
                assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "{norm:?}, {len} entries");
            }
        }
    }
}
