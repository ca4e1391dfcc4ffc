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
//! `prepare` ranks row by row (bounded buffers) and stores the keep mask as bits (1/32 of an
//! f32 tensor per model), so `apply` stays elementwise.
use super::dare::coin_words;
use super::gta::{Mode, Sparsifier};
use super::select::radix_sort_pairs;
use super::sparsify::{bits, mag_key};
use crate::error::{Error, Result};
use crate::kernel::CHUNK;
use crate::kernel::{Ctx, TensorIo};
use crate::params::Params;
use crate::rng::{below, stream_key};
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
/// `start + j` is bit `j`; `out` starts zeroed). Each row is ranked by radix-sorting
/// `(|Δ| key << 32 | index)` words (unique, so the order is fully determined), read in
/// engine-chunk pieces: a row costs 24 bytes per entry while it is ranked (two word buffers and
/// the thresholds by index).
fn rows_kept(io: &dyn TensorIo, i: usize, rows: (usize, usize), m: usize, key: u64, thresholds: &[u64], out: &mut [u32]) -> Result<()> {
    let (start, end) = rows;
    let (mut b, mut x) = (Vec::new(), Vec::new());
    let mut words: Vec<u64> = Vec::with_capacity(m);
    let mut tmp: Vec<u64> = Vec::with_capacity(m);
    let (mut by_index, mut row_bits) = (vec![0u64; m], vec![0u32; m.div_ceil(32)]);
    for row in (start..end).step_by(m) {
        words.clear();
        for s in (row..row + m).step_by(CHUNK) {
            let t = (s + CHUNK).min(row + m);
            b.resize(t - s, 0f32);
            x.resize(t - s, 0f32);
            io.read(0, s..t, &mut b)?;
            io.read(i + 1, s..t, &mut x)?;
            words.extend(x.iter().zip(&b).enumerate().map(|(j, (&x, &b))| (u64::from(mag_key(x - b)) << 32) | (s - row + j) as u64));
        }
        radix_sort_pairs(&mut words, &mut tmp);
        // Each entry's threshold by its rank, then the row's coins in index order (vectorized).
        for (&w, &t) in words.iter().zip(thresholds) {
            by_index[(w & 0xFFFF_FFFF) as usize] = t;
        }
        coin_words(key, row as u64, &by_index, &mut row_bits);
        bits::or_at(out, row - start, &row_bits);
    }
    Ok(())
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
        // Per rank, the integer threshold of its coin (rng::below): no division or float draw per entry.
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
}
