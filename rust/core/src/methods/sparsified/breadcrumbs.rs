//! Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit 0.1.5 does it
//! ("magnitude_outliers"): rank each `Δ_i` by `|Δ|` ascending; with `target = ⌊density·n⌋`,
//! `n_top = ⌊gamma·n⌋` and `n_bot = max(0, n − target − n_top)`, keep the ranks
//! `[n_bot, n_bot + target)`: the largest `n_top` (outliers) and the smallest `n_bot` go.
//! When `target + n_top > n` fewer outliers are removed so that `target` entries remain.
//! density ≥ 1 keeps everything (gamma is then ignored, as in mergekit).
//!
//! The defect of older mergekit releases (`indices[n_bot:-n_top]`, which keeps nothing when
//! `n_top` rounds to 0, i.e. `gamma·n < 1`) does not occur here: with `n_top = 0` the top
//! `target` entries are kept (mergekit 0.1.5 does the same). Ties on a boundary magnitude are
//! broken by index (the lower index ranks lower), so exactly `target` entries survive.
use super::gta::Mode;
use super::ties::RankWindow;
use crate::error::Result;
use crate::params::Params;

pub struct Outliers {
    density: Vec<f64>,
    gamma: Vec<f64>,
}

impl Outliers {
    pub fn build(name: &str, p: &Params, n: usize) -> Result<Self> {
        let density = super::ties::densities(name, p, n)?;
        let gamma = p.per_model("gamma", n)?;
        Ok(Outliers { density, gamma })
    }

    /// The kept rank window `[lo, hi)` in ascending |Δ| order (empty when lo == hi).
    pub fn window(n: usize, density: f64, gamma: f64) -> (usize, usize) {
        let target = if density > 0.0 { ((density * n as f64) as usize).min(n) } else { 0 };
        let n_top = (gamma * n as f64) as usize;
        let n_bot = n.saturating_sub(target).saturating_sub(n_top);
        (n_bot, n_bot + target)
    }
}

impl RankWindow for Outliers {
    const DESC: bool = false;

    fn span(&self, n: usize, i: usize) -> (Mode, usize, usize) {
        if self.density[i] >= 1.0 {
            return (Mode::Keep, 0, 0);
        }
        let (lo, hi) = Self::window(n, self.density[i], self.gamma[i]);
        (if lo == hi { Mode::Drop } else { Mode::Partial }, lo, hi)
    }

    fn density(&self, i: usize) -> f64 {
        self.density[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(Outliers::window(1000, 0.9, 0.01), (90, 990));
        // gamma·n < 1: nothing is removed from the top, the top `target` survive.
        assert_eq!(Outliers::window(50, 0.5, 0.01), (25, 50));
        // target + n_top > n: outlier removal shrinks.
        assert_eq!(Outliers::window(100, 0.95, 0.1), (0, 95));
        assert_eq!(Outliers::window(100, 0.0, 0.1), (90, 90));
        assert_eq!(Outliers::window(100, 0.001, 0.0), (100, 100));
    }
}
