//! The rescale norms' sums of several lanes side by side (DELLA's strands and models, gta's
//! chunks and models): each lane's sums, before and after masking, run in entry order as a
//! pass of its own would take them (the additions of [`Rescale::acc`]); their chains of
//! additions overlap instead of each waiting on its own latency.
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
