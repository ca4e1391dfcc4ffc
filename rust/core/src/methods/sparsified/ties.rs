//! TIES (Yadav et al. 2023) trimming as mergekit 0.1.5 does it ("magnitude"): keep the
//! `k = max(1, ⌊density · n⌋)` entries of each `Δ_i` with the largest `|Δ|` (density ≥ 1
//! keeps all, density ≤ 0 none). Entries tied at the k-th magnitude are kept lowest index
//! first, so exactly k survive (mergekit's `argsort` leaves that order unspecified).
//! Memory: a sample of the keys and those near the threshold while finding it (see
//! [`Window::find`]), then elementwise.
use super::gta::{Mode, Prepared, Sparsifier};
use super::sparsify::{delta_keys, masked_delta_by_window, Rescale, Window};
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

impl RankWindow for Magnitude {
    const DESC: bool = true;

    fn span(&self, n: usize, i: usize) -> (Mode, usize, usize) {
        let d = self.density[i];
        (Mode::of_density(d), 0, ((d * n as f64) as usize).clamp(1, n.max(1)))
    }

    fn density(&self, i: usize) -> f64 {
        self.density[i]
    }
}

/// A sparsifier that keeps a window of ranks of each model's `|Δ|` (TIES: the top k;
/// breadcrumbs: a band below the outliers), in one order or the other.
pub(super) trait RankWindow: Send + Sync {
    /// Ranks by descending `|Δ|` (else ascending).
    const DESC: bool;
    /// Model `i`'s mode and kept rank window `[lo, hi)` on a tensor of `n` elements.
    fn span(&self, n: usize, i: usize) -> (Mode, usize, usize);
    fn density(&self, i: usize) -> f64;
}

/// The windows of the listed models (`models`) in one pass over the inputs, which reads the
/// base once for all of them; a model's state is its packed window where it is partial.
fn prepare_windows<W: RankWindow>(w: &W, io: &dyn TensorIo, models: impl Iterator<Item = usize>) -> Result<Vec<Prepared>> {
    let models: Vec<usize> = models.collect();
    let spans: Vec<(Mode, usize, usize)> = models.iter().map(|&i| w.span(io.numel(), i)).collect();
    let slots: Vec<[usize; 2]> = models.iter().map(|&i| [0, i + 1]).collect();
    let groups: Vec<(&[usize], usize, usize)> =
        spans.iter().zip(&slots).filter(|((mode, ..), _)| *mode == Mode::Partial).map(|(&(_, lo, hi), s)| (&s[..], lo, hi)).collect();
    let mut windows = Window::find_all(io, &groups, &|v, out| delta_keys(v, out, W::DESC))?.into_iter();
    Ok(spans
        .iter()
        .map(|&(mode, ..)| {
            let mut state = vec![];
            if mode == Mode::Partial {
                windows.next().expect("a window per partial model").pack(&mut state);
            }
            Prepared { mode, state, sums: None }
        })
        .collect())
}

impl<W: RankWindow> Sparsifier for W {
    fn prepare(&self, _: &Ctx, io: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)> {
        let p = prepare_windows(self, io, std::iter::once(i))?.remove(0);
        Ok((p.mode, p.state))
    }

    fn prepare_all(&self, _: &Ctx, io: &dyn TensorIo, _: Rescale) -> Result<Vec<Prepared>> {
        prepare_windows(self, io, 0..io.slots() - 1)
    }

    fn masked_delta(&self, _: &Ctx, chunk: usize, _: usize, state: &[f64], x: &[f32], base: &[f32], out: &mut [f32]) {
        masked_delta_by_window(state, chunk, x, base, out, W::DESC);
    }

    fn density(&self, i: usize) -> f64 {
        RankWindow::density(self, i)
    }
}
