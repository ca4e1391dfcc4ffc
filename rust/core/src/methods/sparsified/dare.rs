//! DARE (Yu et al. 2024, "Language Models are Super Mario") random drop: each entry of `Δ_i`
//! survives with probability `density` (density ≥ 1: all, untouched; ≤ 0: none).
//!
//! The draw for element `g` of model `i` is `uniform(stream_key(seed, tensor, i), g) < density`
//! (rng.rs, counter-based): the mask depends only on (seed, tensor name, model index, element
//! index), never on threads or chunking.
//!
//! Rescale: the DARE paper multiplies survivors by `1/density`. mergekit 0.1.5 does NOT: with
//! `rescale: true` (its default for dare_ties / dare_linear) it multiplies the survivors by
//! `‖Δ‖₁ / ‖mask·Δ‖₁` (the L1 norm of the whole tensor's delta before / after dropping), which
//! equals `1/density` only in expectation. That is our default too (`rescale_mode: l1`);
//! `rescale_mode: density` gives the paper's `1/density`.
use super::gta::{Mode, Sparsifier};
use super::sparsify::bits;
use crate::error::Result;
use crate::kernel::{Ctx, TensorIo};
use crate::params::Params;
use crate::rng::{below, counter, draw_at, stream_key, uniform, WEYL};
use crate::simd::avx512;

pub struct Random {
    density: Vec<f64>,
}

impl Random {
    pub fn build(name: &str, p: &Params, n: usize) -> Result<Self> {
        Ok(Random { density: super::ties::densities(name, p, n)? })
    }
}

/// The keep decision of element `g` of model `i` (exposed for tests).
#[inline]
pub fn kept(seed: u64, tensor: &str, i: usize, g: usize, density: f64) -> bool {
    uniform(stream_key(seed, tensor, i as u64), g as u64) < density
}

avx512! {
/// `out[j] = x[j] − base[j]` where `draw(key, first + j) < t` (`uniform < density` in
/// integers), else +0.0: the delta and its coins in one pass. The draws are 64-bit
/// multiplies: on a CPU with AVX-512DQ the same loop is compiled with its 64-bit lane
/// multiplies (chosen at run time), 2–3x faster. Integer arithmetic: the same decisions, so
/// the same bytes, on any CPU.
pub fn masked_delta(key: u64, first: u64, t: u64, x: &[f32], base: &[f32], out: &mut [f32]) {
    let mut c = counter(key, first);
    for (o, (&x, &b)) in out.iter_mut().zip(x.iter().zip(base)) {
        *o = bits::keep_if(x - b, u32::from(draw_at(c) < t));
        c = c.wrapping_add(WEYL);
    }
}
}

avx512! {
/// Bit `j` of `out` (bits of word `j / 32`) is set where `draw(key, first + j) < t[j]`: coins
/// with one threshold each (DELLA's, by rank). `out` holds `t.len().div_ceil(32)` words, which
/// it overwrites. Compiled for AVX-512DQ like [`masked_delta`], the same decisions on any CPU.
pub fn coin_words(key: u64, first: u64, t: &[u64], out: &mut [u32]) {
    let mut c = counter(key, first);
    for (w, ts) in out.iter_mut().zip(t.chunks(32)) {
        let mut word = 0u32;
        for (b, &t) in ts.iter().enumerate() {
            word |= u32::from(draw_at(c) < t) << b;
            c = c.wrapping_add(WEYL);
        }
        *w = word;
    }
}
}

avx512! {
/// `draw(key, first + j)` into `out[j]`, AVX-512DQ's 64-bit multiplies where the CPU has them.
pub fn draws(key: u64, first: u64, out: &mut [u64]) {
    let mut c = counter(key, first);
    for u in out.iter_mut() {
        *u = draw_at(c);
        c = c.wrapping_add(WEYL);
    }
}
}

impl Sparsifier for Random {
    fn prepare(&self, _: &Ctx, _: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)> {
        Ok((Mode::of_density(self.density[i]), vec![]))
    }

    fn masked_delta(&self, ctx: &Ctx, _: usize, i: usize, _: &[f64], x: &[f32], base: &[f32], out: &mut [f32]) {
        let key = stream_key(ctx.seed, ctx.tensor, i as u64);
        masked_delta(key, ctx.offset as u64, below(self.density[i]), x, base, out);
    }

    fn density(&self, i: usize) -> f64 {
        self.density[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::draw;

    #[test]
    fn drop_rate_and_independence() {
        let n = 100_000;
        let a: Vec<bool> = (0..n).map(|g| kept(7, "w", 0, g, 0.3)).collect();
        let b: Vec<bool> = (0..n).map(|g| kept(7, "w", 1, g, 0.3)).collect();
        let frac = a.iter().filter(|&&k| k).count() as f64 / n as f64;
        assert!((frac - 0.3).abs() < 0.01, "{frac}");
        let both = a.iter().zip(&b).filter(|(x, y)| **x && **y).count() as f64 / n as f64;
        assert!((both - 0.09).abs() < 0.01, "{both}");
        assert_ne!(a, (0..n).map(|g| kept(8, "w", 0, g, 0.3)).collect::<Vec<_>>());
    }

    #[test]
    fn coin_words_are_the_definition() {
        let key = stream_key(3, "t", 0);
        for (first, len) in [(0u64, 1000usize), (4096, 64), (77, 5)] {
            let t: Vec<u64> = (0..len).map(|j| below(j as f64 / len as f64)).collect();
            let mut out = vec![u32::MAX; len.div_ceil(32)];
            coin_words(key, first, &t, &mut out);
            for (j, &tj) in t.iter().enumerate() {
                assert_eq!((out[j / 32] >> (j % 32)) & 1 == 1, draw(key, first + j as u64) < tj, "element {j} of run at {first}");
            }
            if len % 32 != 0 {
                assert_eq!(out[len / 32] >> (len % 32), 0, "no bits past the end");
            }
        }
    }

    #[test]
    fn vectorized_coins_are_the_definition() {
        // Whatever loop the CPU runs (AVX-512 here when it has it), each decision is `kept`'s.
        for (first, len, d) in [(0usize, 1000usize, 0.3), (65_536, 777, 0.5), (123, 64, 0.999), (5, 3, 0.01)] {
            let key = stream_key(9, "t", 1);
            let x: Vec<f32> = (0..len).map(|j| j as f32 + 1.0).collect();
            let base: Vec<f32> = (0..len).map(|j| (j % 3) as f32 * 0.5).collect();
            for out in crate::simd::each_build(|| {
                let mut out = vec![f32::NAN; len];
                masked_delta(key, first as u64, below(d), &x, &base, &mut out);
                out
            }) {
                for (j, &v) in out.iter().enumerate() {
                    let want = if kept(9, "t", 1, first + j, d) { x[j] - base[j] } else { 0.0 };
                    assert_eq!(v.to_bits(), want.to_bits(), "element {} of run at {first}", j);
                }
            }
        }
    }
}
