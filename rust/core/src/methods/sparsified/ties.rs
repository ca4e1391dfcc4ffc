//! TIES (Yadav et al. 2023) trimming as mergekit 0.1.5 does it ("magnitude"): keep the
//! `k = max(1, ⌊density · n⌋)` entries of each `Δ_i` with the largest `|Δ|` (density ≥ 1
//! keeps all, density ≤ 0 none). Entries tied at the k-th magnitude are kept lowest index
//! first, so exactly k survive (mergekit's `argsort` leaves that order unspecified).
//! Memory: a sample of the keys and those near the threshold while finding it (see
//! [`Window::find`]), then elementwise.
use super::gta::{Mode, Prepared, Sparsifier};
use super::sparsify::{delta_keys, mask_by_window, masked_delta_by_window, Rescale, Window};
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

impl Magnitude {
    /// Model `i`'s mode and kept rank window (descending |Δ|) on a tensor of `n` elements.
    fn span(&self, n: usize, i: usize) -> (usize, Mode, usize, usize) {
        let d = self.density[i];
        let mode = Mode::of_density(d);
        (i, mode, 0, ((d * n as f64) as usize).clamp(1, n.max(1)))
    }
}

/// Every listed model's mode and, for the partial ones, its window over the magnitude keys
/// of its delta (descending or not): `spans` holds (model, mode, lo, hi). The windows come
/// from one pass over the inputs, which reads the base once for all models.
pub(super) fn prepare_windows(io: &dyn TensorIo, spans: &[(usize, Mode, usize, usize)], desc: bool) -> Result<Vec<Prepared>> {
    let slots: Vec<[usize; 2]> = spans.iter().map(|&(i, ..)| [0, i + 1]).collect();
    let groups: Vec<(&[usize], usize, usize)> =
        spans.iter().zip(&slots).filter(|((_, mode, ..), _)| *mode == Mode::Partial).map(|(&(_, _, lo, hi), s)| (&s[..], lo, hi)).collect();
    let mut windows = Window::find_all(io, &groups, &|v, out| delta_keys(v, out, desc))?.into_iter();
    Ok(spans
        .iter()
        .map(|&(_, mode, ..)| {
            let mut state = vec![];
            if mode == Mode::Partial {
                windows.next().expect("a window per partial model").pack(&mut state);
            }
            Prepared { mode, state, sums: None }
        })
        .collect())
}

impl Sparsifier for Magnitude {
    fn prepare(&self, _: &Ctx, io: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)> {
        let p = prepare_windows(io, &[self.span(io.numel(), i)], true)?.remove(0);
        Ok((p.mode, p.state))
    }

    fn prepare_all(&self, _: &Ctx, io: &dyn TensorIo, _: Rescale) -> Result<Vec<Prepared>> {
        let spans: Vec<_> = (0..io.slots() - 1).map(|i| self.span(io.numel(), i)).collect();
        prepare_windows(io, &spans, true)
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
