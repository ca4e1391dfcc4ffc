//! `absorb_filtered`: the delta filter and blend of `procrustes_absorb` (cross-architecture
//! merges; the donors arrive already aligned onto the base, see
//! `python/merge_fast/crossarch/absorb.py`). Per donor `Δ_d = θ_d − θ_base`, then
//!
//! - 2-D: the top-`rank` singular components of `Δ_d` (randomized SVD seeded by the plan's
//!   seed, exact when `rank ≥ min(m, n)`), components with `σ_i < tol · σ_1` zeroed;
//!   unchanged when `rank ≥ min(m, n)` and `tol = 0`;
//! - 1-D: entries with `|Δ_i| < tol · max|Δ|` zeroed; other shapes unchanged;
//!
//! and `θ = θ_base + (1 − β) Σ_d w_d Δ̃_d`. `rank = 0` keeps the base.
use crate::error::{Error, Result};
use crate::kernel::{apply_read_whole, Ctx, Method, TensorIo};
use crate::linalg::{gaussian_matrix, svd, svd_topk, svd_topk_op, topk_probes, AffineMap, Minus, Svd, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use faer::linalg::matmul::matmul;
use faer::{Accum, Par};
use rayon::prelude::*;

/// `rank` meaning "every component".
const ALL: i64 = 1 << 40;

pub fn spec() -> MethodSpec {
    MethodSpec::new("absorb_filtered", BaseRule::Required, |p, n, _| Ok(Box::new(Absorb::build(p, n)?))).params(&[
        ParamSpec::float("beta", 0.5, Range::UNIT),
        ParamSpec::count("rank", ALL, ALL),
        ParamSpec::float("tol", 0.0, Range::NON_NEG),
        ParamSpec::float("weight", 1.0, Range::FINITE).per_model(),
        ParamSpec::count("oversample", DEFAULT_OVERSAMPLE as i64, 1 << 20),
        ParamSpec::count("power_iters", DEFAULT_POWER_ITERS as i64, 64),
    ])
}

pub struct Absorb {
    keep: f32,
    rank: usize,
    tol: f32,
    weights: Vec<f32>,
    oversample: usize,
    power_iters: usize,
}

impl Absorb {
    fn build(p: &Params, n: usize) -> Result<Self> {
        Ok(Absorb {
            keep: (1.0 - p.f64("beta")?) as f32,
            rank: p.count("rank")?,
            tol: p.f64("tol")? as f32,
            weights: p.per_model("weight", n)?.iter().map(|&w| w as f32).collect(),
            oversample: p.count("oversample")?,
            power_iters: p.count("power_iters")?,
        })
    }

    /// `Δ` filtered in place.
    fn filter(&self, ctx: &Ctx, delta: &mut [f32]) -> Result<()> {
        match *ctx.shape {
            [_] if self.tol > 0.0 => {
                let m = delta.iter().fold(0f32, |a, &x| a.max(x.abs()));
                delta.iter_mut().filter(|x| x.abs() < self.tol * m).for_each(|x| *x = 0.0);
            }
            [m, n] if m > 0 && n > 0 => {
                let full = m.min(n);
                if self.rank >= full && self.tol <= 0.0 {
                    return Ok(());
                }
                let f = if self.rank >= full {
                    svd(delta, m, n).map_err(|e| svd_error(ctx, e))?
                } else {
                    svd_topk(delta, m, n, self.rank, self.oversample, self.power_iters, ctx.seed).map_err(|e| svd_error(ctx, e))?.svd
                };
                delta.copy_from_slice(&self.truncated(f));
            }
            _ => {}
        }
        Ok(())
    }

    /// The kept components: those with `σ_i < tol · σ_1` zeroed.
    fn kept(&self, mut f: Svd) -> Svd {
        if self.tol > 0.0 {
            let cut = self.tol * f.s.first().copied().unwrap_or(0.0);
            f.s.iter_mut().filter(|s| **s < cut).for_each(|s| *s = 0.0);
        }
        f
    }

    /// The kept components multiplied out.
    fn truncated(&self, f: Svd) -> Vec<f32> {
        self.kept(f).reconstruct()
    }

    /// The randomized SVD's probe count for a 2-D tensor of `shape`, where `filter` takes
    /// that path.
    fn probes(&self, shape: &[usize]) -> Option<usize> {
        match *shape {
            [m, n] if self.rank < m.min(n) => topk_probes(m, n, self.rank, self.oversample),
            _ => None,
        }
    }

    /// `out = base + (1 − β) Σ_d w_d Δ̃_d`. The donors given as kept components are summed by
    /// one product into `out`, `[w_1 U_1 S_1 | w_2 U_2 S_2 …] [V_1ᵀ; V_2ᵀ …]` (no delta formed
    /// per donor; its rows in two fixed halves side by side); the formed deltas are added to
    /// that (or to zeros) element by element in donor order. Neither depends on the number
    /// of threads.
    fn blend(&self, ctx: &Ctx, base: &[f32], deltas: &[Filtered], out: &mut [f32]) -> Result<()> {
        let parts: Vec<(&Svd, f32)> = deltas.iter().zip(&self.weights).filter_map(|(d, &w)| d.low_rank().map(|f| (f, w))).collect();
        let k: usize = parts.iter().map(|(f, _)| f.rank()).sum();
        if k == 0 {
            out.fill(0.0);
        } else {
            let (m, n) = (ctx.shape[0], ctx.shape[1]);
            let (mut us, mut vt) = (vec![0f32; m * k], Vec::with_capacity(k * n));
            let mut at = 0;
            for (f, w) in &parts {
                let r = f.rank();
                for (row, u) in us.chunks_exact_mut(k).zip(f.u.chunks_exact(r)) {
                    row[at..at + r].iter_mut().zip(u).zip(&f.s).for_each(|((o, &u), &s)| *o = w * (u * s));
                }
                vt.extend_from_slice(&f.vt);
                at += r;
            }
            let (vt, h) = (faer::MatRef::from_row_major_slice(&vt, k, n), m / 2);
            let (top, bottom) = out.split_at_mut(h * n);
            let product = |rows: std::ops::Range<usize>, o: &mut [f32]| {
                let u = faer::MatRef::from_row_major_slice(&us[rows.start * k..rows.end * k], rows.len(), k);
                matmul(faer::MatMut::from_row_major_slice_mut(o, rows.len(), n), Accum::Replace, u, vt, 1.0, Par::Seq);
            };
            rayon::join(|| product(0..h, top), || product(h..m, bottom));
        }
        const PIECE: usize = 1 << 16;
        let finite = out.par_chunks_mut(PIECE).enumerate().all(|(c, out)| {
            let at = c * PIECE..c * PIECE + out.len();
            for (d, &w) in deltas.iter().zip(&self.weights) {
                if let Filtered::Dense(d) = d {
                    out.iter_mut().zip(&d[at.clone()]).for_each(|(t, &d)| *t += w * d);
                }
            }
            out.iter_mut().zip(&base[at]).for_each(|(o, &b)| *o = b + self.keep * *o);
            out.iter().all(|x| x.is_finite())
        });
        if !finite {
            return Err(Error::numerical(ctx.tensor, "absorb_filtered produced NaN/inf"));
        }
        Ok(())
    }
}

/// A donor as the kernel takes it: its factors, or formed.
enum Input {
    Factors(AffineMap),
    Formed(Vec<f32>),
}

/// A donor's filtered delta: formed, or as its kept components.
enum Filtered {
    Dense(Vec<f32>),
    LowRank(Svd),
}

impl Filtered {
    fn low_rank(&self) -> Option<&Svd> {
        match self {
            Filtered::LowRank(f) => Some(f),
            Filtered::Dense(_) => None,
        }
    }
}

fn svd_error(ctx: &Ctx, e: Error) -> Error {
    Error::numerical(ctx.tensor, format!("SVD of a donor's delta: {e}"))
}

impl Method for Absorb {
    fn elementwise(&self) -> bool {
        false
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("base checked at build");
        if self.rank == 0 {
            out.copy_from_slice(base);
            return Ok(());
        }
        // Each donor's delta filtered on its own thread (one SVD each).
        let deltas: Vec<Filtered> = inputs
            .par_iter()
            .with_max_len(1)
            .map(|x| {
                let mut delta: Vec<f32> = x.iter().zip(base).map(|(&x, &b)| x - b).collect();
                self.filter(ctx, &mut delta).map(|_| Filtered::Dense(delta))
            })
            .collect::<Result<_>>()?;
        self.blend(ctx, base, &deltas, out)
    }

    /// A donor made on the fly as a product (rotated into the anchor's basis, `L·S·R·diag(d)`)
    /// goes into the randomized SVD as its factors where their products cost less than
    /// forming it: `Δ X = L(S(R(d∘X))) − W X`. Forming a rotated MLP tensor of TinyLlama's
    /// shape costs 47 GFLOP, more than its SVD's six products with 138 probes (19 GFLOP);
    /// through the factors those products cost 45 GFLOP and nothing is formed.
    fn apply_whole(&self, ctx: &Ctx, io: &dyn TensorIo, stats: &[f64], out: &mut [f32]) -> Result<()> {
        let Some(l) = self.probes(ctx.shape).filter(|_| self.rank > 0 && io.has_base()) else {
            return apply_read_whole(self, ctx, io, stats, out);
        };
        let (m, n) = (ctx.shape[0], ctx.shape[1]);
        let mut base = vec![0f32; m * n];
        io.read(0, 0..m * n, &mut base)?;
        let products = 2.0 + 2.0 * self.power_iters as f64;
        // Each donor as its factors, or formed when that is cheaper (side by side).
        let inputs: Vec<Input> = (1..io.slots())
            .into_par_iter()
            .with_max_len(1)
            .map(|slot| match io.factors(slot)? {
                Some(f) if products * f.product_flops(l) < f.form_flops() => Ok(Input::Factors(f)),
                _ => {
                    let mut x = vec![0f32; m * n];
                    io.read(slot, 0..m * n, &mut x)?;
                    Ok(Input::Formed(x))
                }
            })
            .collect::<Result<_>>()?;
        // The probes (the seed's, as `svd_topk` makes them) and the anchor's share of the first
        // product, `W Ω`, made once for every factored donor, its rows in two fixed halves side
        // by side.
        let w = faer::MatRef::from_row_major_slice(&base, m, n);
        let factored = inputs.iter().filter(|x| matches!(x, Input::Factors(_))).count();
        let omega = (factored > 0).then(|| gaussian_matrix(n, l, ctx.seed));
        let shared = omega.as_ref().filter(|_| factored > 1).map(|omega| {
            let mut wo = faer::Mat::<f32>::zeros(m, l);
            let (top, bottom) = wo.as_mut().split_at_row_mut(m / 2);
            let (wt, wb) = w.split_at_row(m / 2);
            rayon::join(
                || matmul(top, Accum::Replace, wt, omega.as_ref(), 1.0, Par::Seq),
                || matmul(bottom, Accum::Replace, wb, omega.as_ref(), 1.0, Par::Seq),
            );
            wo
        });
        let deltas: Vec<Filtered> = inputs
            .into_par_iter()
            .with_max_len(1)
            .map(|x| match x {
                Input::Factors(f) => {
                    let op = Minus { a: &f, b: w, b_probes: shared.as_ref().map(|s| s.as_ref()) };
                    let omega = omega.as_ref().expect("made for factored donors").as_ref();
                    let svd = svd_topk_op(&op, self.rank, omega, self.power_iters).map_err(|e| svd_error(ctx, e))?;
                    Ok(Filtered::LowRank(self.kept(svd)))
                }
                Input::Formed(mut delta) => {
                    delta.iter_mut().zip(&base).for_each(|(x, &b)| *x -= b);
                    self.filter(ctx, &mut delta).map(|_| Filtered::Dense(delta))
                }
            })
            .collect::<Result<_>>()?;
        self.blend(ctx, &base, &deltas, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(params: serde_json::Value, shape: &[usize], base: &[f32], inputs: &[&[f32]], seed: u64) -> Vec<f32> {
        let m = crate::methods::build("absorb_filtered", params.as_object().unwrap(), inputs.len(), true).unwrap();
        let mut out = vec![0f32; base.len()];
        m.apply(&Ctx { tensor: "t", shape, offset: 0, seed }, Some(base), inputs, &[], &mut out).unwrap();
        out
    }

    /// Donors given as their factors (`S·R·diag(d)`, as rotated donor tensors reach the
    /// kernel) are filtered through the products of their deltas, and give what the formed
    /// tensors give, within rounding: one such donor, two (the anchor's share of the first
    /// product made once for both), one beside a stored one. The factors' values are checked
    /// like stored values.
    #[test]
    fn factored_donors_match_the_formed_ones() {
        use crate::kernel::Slices;
        struct Factored<'a> {
            dense: Slices<'a>,
            /// Per donor, its factors or none (stored values).
            fs: Vec<Option<AffineMap>>,
        }
        impl TensorIo for Factored<'_> {
            fn numel(&self) -> usize {
                self.dense.numel()
            }
            fn slots(&self) -> usize {
                self.dense.slots()
            }
            fn has_base(&self) -> bool {
                true
            }
            fn read(&self, slot: usize, range: std::ops::Range<usize>, dst: &mut [f32]) -> Result<()> {
                self.dense.read(slot, range, dst)
            }
            fn factors(&self, slot: usize) -> Result<Option<AffineMap>> {
                Ok(self.fs[slot - 1].clone())
            }
        }
        let (m, n, h) = (300usize, 256usize, 256usize);
        let v = |s, len: usize| (0..len).map(|i| crate::rng::normal(s, i as u64) as f32).collect::<Vec<_>>();
        let (a, b, noise) = (v(4, m * 5), v(5, 5 * n), v(6, m * n));
        let base: Vec<f32> = v(9, m * n);
        // Each donor: factors whose product differs from the base by a rank-5 matrix well above
        // a small noise (σ_6 is below `tol · σ_1`, so the kept part is well defined); `S` solved
        // from the product it must make: `S = (base + low + noise) Rᵀ / d` with `R` orthogonal.
        let donor = |seed: u64| {
            let r = crate::linalg::orthonormalize(crate::linalg::gaussian_matrix(h, n, seed).as_ref(), faer::Par::Seq);
            let d: Vec<f32> = v(seed + 1, n).iter().map(|x| 1.0 + 0.1 * x).collect();
            let want: Vec<f64> = (0..m * n)
                .map(|g| {
                    let (i, j) = (g / n, g % n);
                    let low: f32 = (0..5).map(|k| a[i * 5 + k] * b[k * n + j] * (1.0 + k as f32 + seed as f32)).sum();
                    (base[g] + low + 1e-3 * noise[(g + seed as usize) % (m * n)]) as f64 / d[j] as f64
                })
                .collect();
            let s: Vec<f32> = (0..m * h).map(|g| (0..n).map(|j| want[(g / h) * n + j] * r[(g % h, j)] as f64).sum::<f64>() as f32).collect();
            let rm: Vec<f32> = (0..h * n).map(|g| r[(g / n, g % n)]).collect();
            let f = AffineMap { s, m, n: h, left: None, right: Some((rm, n)), d };
            // The formed donor (f64 products).
            let formed: Vec<f32> = (0..m * n)
                .map(|g| {
                    let (i, j) = (g / n, g % n);
                    let x: f64 = (0..h).map(|t| f.s[i * h + t] as f64 * f.right.as_ref().unwrap().0[t * n + j] as f64).sum();
                    (x * f.d[j] as f64) as f32
                })
                .collect();
            (f, formed)
        };
        let (d1, d2) = (donor(11), donor(21));
        // The factors' products are the cheaper way here.
        assert!(6.0 * d1.0.product_flops(14) < d1.0.form_flops());
        let params = json!({"beta": 0.4, "rank": 8, "tol": 0.1, "oversample": 6, "weight": [1.0, 0.5]});
        let ctx = Ctx { tensor: "t", shape: &[m, n], offset: 0, seed: 3 };
        let cases: [Vec<Option<AffineMap>>; 3] =
            [vec![Some(d1.0.clone())], vec![Some(d1.0.clone()), Some(d2.0.clone())], vec![Some(d1.0.clone()), None]];
        for fs in cases {
            let formed: Vec<&[f32]> = [&d1.1, &d2.1][..fs.len()].iter().map(|x| x.as_slice()).collect();
            let p = if fs.len() == 1 { json!({"beta": 0.4, "rank": 8, "tol": 0.1, "oversample": 6}) } else { params.clone() };
            let kernel = crate::methods::build("absorb_filtered", p.as_object().unwrap(), fs.len(), true).unwrap();
            let io = Factored { dense: Slices::new(Some(&base), &formed), fs };
            let mut got = vec![0f32; m * n];
            kernel.apply_whole(&ctx, &io, &[], &mut got).unwrap();
            let want = run(p, &[m, n], &base, &formed, 3);
            let scale = want.iter().zip(&base).fold(0f32, |a, (w, b)| a.max((w - b).abs()));
            let worst = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(scale > 1.0 && worst < 1e-4 * scale, "{} donors: worst {worst} of {scale}", formed.len());
        }
        // A NaN factor is an error naming the tensor, as a NaN stored value is.
        let mut bad = d1.0.clone();
        bad.s[7] = f32::NAN;
        let formed: [&[f32]; 1] = [&d1.1];
        let io = Factored { dense: Slices::new(Some(&base), &formed), fs: vec![Some(bad)] };
        let kernel = crate::methods::build("absorb_filtered", json!({"rank": 8}).as_object().unwrap(), 1, true).unwrap();
        let sink = |_: usize, _: &[f32], _: &mut Vec<u8>| Ok(());
        let e = crate::kernel::merge_tensor(kernel.as_ref(), ctx, &io, &sink).unwrap_err().to_string();
        assert!(e.contains("'t'") && e.contains("factor"), "{e}");
    }

    #[test]
    fn blends_filtered_deltas() {
        let (m, n) = (6usize, 5usize);
        let v = |s| (0..m * n).map(|i| crate::rng::normal(s, i as u64) as f32).collect::<Vec<_>>();
        let (b, x, y) = (v(1), v(2), v(3));
        // full rank, no tolerance: θ = b + (1-β)(w1 (x-b) + w2 (y-b))
        let got = run(json!({"beta": 0.25, "weight": [1.0, 0.5]}), &[m, n], &b, &[&x, &y], 0);
        for i in 0..m * n {
            let want = b[i] + 0.75 * ((x[i] - b[i]) + 0.5 * (y[i] - b[i]));
            assert!((got[i] - want).abs() < 1e-5);
        }
        // rank 1 (exact path, 2·(1+10) ≥ 5): the leading component of the delta
        let got = run(json!({"beta": 0.0, "rank": 1}), &[m, n], &b, &[&x], 0);
        let d: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x - b).collect();
        let mut f = svd(&d, m, n).unwrap();
        f.truncate(1);
        let r = f.reconstruct();
        for i in 0..m * n {
            assert!((got[i] - (b[i] + r[i])).abs() < 1e-5);
        }
        // rank 0: the base; 1-D tolerance: small entries dropped
        assert_eq!(run(json!({"rank": 0}), &[m, n], &b, &[&x], 0), b);
        let got = run(json!({"beta": 0.0, "tol": 0.5}), &[4], &[0.0; 4], &[&[1.0, -0.4, -0.6, 0.1]], 0);
        assert_eq!(got, vec![1.0, 0.0, -0.6, 0.0]);
    }
}
