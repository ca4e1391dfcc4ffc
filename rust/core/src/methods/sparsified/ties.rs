//! TIES (Yadav et al. 2023) trimming as mergekit 0.1.5 does it ("magnitude"): keep the
//! `k = max(1, ⌊density · n⌋)` entries of each `Δ_i` with the largest `|Δ|` (density ≥ 1
//! keeps all, density ≤ 0 none). Entries tied at the k-th magnitude are kept lowest index
//! first, so exactly k survive (mergekit's `argsort` leaves that order unspecified).
//! Memory: a sample of the keys and those near the threshold while finding it (see
//! [`Window::find`]), then elementwise.
use super::gta::{Mode, Sparsifier};
use super::sparsify::{delta_keys, mask_by_window, masked_delta_by_window, Window};
use crate::error::Result;
use crate::kernel::{Ctx, TensorIo};
use crate::params::Params;

pub struct Magnitude {
    density: Vec<f64>,
}

/// Per-model `density` (default 1: no trimming), in (0, 1]: 0 would silently give the base.
pub fn densities(_name: &str, p: &Params, n: usize) -> Result<Vec<f64>> {
    p.per_model("density", n)
}

impl Magnitude {
    pub fn build(name: &str, p: &Params, n: usize) -> Result<Self> {
        Ok(Magnitude { density: densities(name, p, n)? })
    }
}

impl Sparsifier for Magnitude {
    fn prepare(&self, _: &Ctx, io: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)> {
        let (n, d) = (io.numel(), self.density[i]);
        if d >= 1.0 {
            return Ok((Mode::Keep, vec![]));
        }
        if d <= 0.0 {
            return Ok((Mode::Drop, vec![]));
        }
        let k = ((d * n as f64) as usize).clamp(1, n);
        let w = Window::find(io, &[0, i + 1], 0, k, &|v, out| delta_keys(v, out, true))?;
        let mut st = vec![];
        w.pack(&mut st);
        Ok((Mode::Partial, st))
    }

    fn mask(&self, _: &Ctx, chunk: usize, _: usize, state: &[f64], delta: &mut [f32]) {
        mask_by_window(state, chunk, delta, true);
    }

    fn masked_delta(&self, _: &Ctx, chunk: usize, _: usize, state: &[f64], x: &[f32], base: &[f32], out: &mut [f32]) {
        masked_delta_by_window(state, chunk, x, base, out, true);
    }

    fn density(&self, i: usize) -> f64 {
        self.density[i]
    }
}
