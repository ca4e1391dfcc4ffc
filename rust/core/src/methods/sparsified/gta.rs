//! The kernel shared by ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della
//! and della_linear (mergekit's "generalized task arithmetic"), with mergekit 0.1.5's order of
//! operations:
//!
//! 1. `Δ_i = θ_i − θ_base`, sparsified by the method's [`Sparsifier`] (magnitude top-k,
//!    random drop, magnitude window, magnitude-ranked random drop);
//! 2. optional rescale of each sparsified `Δ_i` so that its norm (L1 by default, the only
//!    norm mergekit uses) equals the norm before sparsification; no rescale when either norm
//!    is < 1e-7, nor when nothing was removed (density ≥ 1). `rescale_mode: density` gives the
//!    DARE paper's `1/density` instead;
//! 3. `Δ_i ← w_i Δ_i`;
//! 4. with sign consensus (the `*ties` methods and `della`): elect the sign of `Σ_i w_i Δ_i`
//!    per element (≥ 0 counts as +), keep the entries whose sign equals it (zeros never
//!    agree), sum them; `normalize` divides by the agreeing weights `Σ w_i` (0 → 1): the
//!    weighted disjoint mean. `disjoint_mean: count` divides by the number of agreeing models
//!    instead (the TIES paper's disjoint mean, which has no per-model weights);
//!    `consensus: count` elects by the count of signs (mergekit's unused "count" variant);
//!    without consensus: `Σ_i w_i Δ_i`, `normalize` divides by `Σ w_i` (|Σ| < 1e-8 → 1);
//! 5. `θ = θ_base + λ · mixed`.
//!
//! Memory: `prepare` handles one model at a time with at most one whole-tensor `u32` scratch
//! buffer (dropped before the next model), or all models row by row (della); `apply` is
//! elementwise on engine chunks.
use super::norms::{l1_any_order, l1_delta_sums, sums_of_four, Deltas};
use super::sparsify::{chunk_of, delta_into, phase, scratch, sign, Rescale, RESCALE_EPS, TILE};
use crate::error::{Error, Result};
use crate::kernel::{par_chunk_groups, with_work, Ctx, Method, TensorIo, CHUNK};
use crate::params::Params;
use crate::simd::avx2;
use rayon::prelude::*;

/// What sparsification leaves of one model's delta on one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Untouched (density ≥ 1): no mask, no rescale.
    Keep = 0,
    /// Nothing survives.
    Drop = 1,
    /// A mask given by the sparsifier's state; rescaled when asked.
    Partial = 2,
}

impl Mode {
    /// What a density leaves: ≥ 1 everything, ≤ 0 nothing, else a mask.
    pub fn of_density(d: f64) -> Mode {
        if d >= 1.0 {
            Mode::Keep
        } else if d <= 0.0 {
            Mode::Drop
        } else {
            Mode::Partial
        }
    }
}

/// One model's preparation for a tensor.
pub struct Prepared {
    pub mode: Mode,
    /// The sparsifier's state, given back to [`Sparsifier::mask`].
    pub state: Vec<f64>,
    /// The rescale norm's sums of the delta before and after masking (per engine chunk in
    /// element order, folded in chunk order, not finished), where the sparsifier measured
    /// them on a pass of its own; else [`Gta`] measures them.
    pub sums: Option<(f64, f64)>,
}

pub trait Sparsifier: Send + Sync {
    /// Whole-tensor preparation of model `i` (slot `i + 1`; slot 0 is the base).
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo, i: usize) -> Result<(Mode, Vec<f64>)>;
    /// Every model's preparation (a non-empty tensor); `norm` is the rescale's, for a
    /// sparsifier that reads the deltas anyway and can measure their norms on the way.
    fn prepare_all(&self, ctx: &Ctx, io: &dyn TensorIo, _norm: Rescale) -> Result<Vec<Prepared>> {
        (0..io.slots() - 1).map(|i| self.prepare(ctx, io, i).map(|(mode, state)| Prepared { mode, state, sums: None })).collect()
    }
    /// Model `i`'s delta `x − base` on the chunk at `ctx.offset` (engine chunk `chunk`) with
    /// its dropped entries zeroed (+0.0), into `out`, in one pass.
    #[allow(clippy::too_many_arguments)]
    fn masked_delta(&self, ctx: &Ctx, chunk: usize, i: usize, state: &[f64], x: &[f32], base: &[f32], out: &mut [f32]);
    /// Model `i`'s density (for `rescale_mode: density`).
    fn density(&self, i: usize) -> f64;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    Sum,
    Count,
}

pub struct Gta {
    sparsifier: Box<dyn Sparsifier>,
    weights: Vec<f32>,
    consensus: Option<Consensus>,
    /// Disjoint mean by the number of agreeing models (paper) instead of their weights.
    count_mean: bool,
    normalize: bool,
    lambda: f32,
    rescale: Rescale,
    /// `Σ w_i` (or 1 when |Σ| < 1e-8), for normalize without consensus.
    linear_divisor: f32,
}

impl Drop for Gta {
    fn drop(&mut self) {
        scratch::release(); // the key buffer lives as long as the merge's kernel
    }
}

/// Per-method defaults (mergekit's registry).
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub consensus: bool,
    pub normalize: bool,
    pub rescale: bool,
}

/// Reads the parameters every method of the family shares and builds the kernel.
pub fn build(name: &str, p: &Params, n: usize, _has_base: bool, spec: Spec, sparsifier: Box<dyn Sparsifier>) -> Result<Box<dyn Method>> {
    let w = p.per_model("weight", n)?;
    // float32 factors (normalization happens per element, over the agreeing models)
    let wf = p.weights_f32("weight", &w, false)?;
    let lambda = crate::methods::task_arithmetic::lambda(p)?;
    let normalize = p.bool("normalize")?;
    // mergekit's int8_mask only changes the dtype of its consensus mask, not the result.
    p.bool("int8_mask")?;
    let rescale_flag = p.bool("rescale")?;
    let rescale = match p.opt_str("rescale_mode")? {
        None => {
            if rescale_flag {
                Rescale::L1
            } else {
                Rescale::None
            }
        }
        Some(s) => {
            let r = Rescale::parse(s)
                .ok_or_else(|| Error::config(format!("{name}: rescale_mode must be one of l1, l2, linf, density, none; got '{s}'")))?;
            // rescale given as false explicitly (its default may be either)
            if r != Rescale::None && p.given("rescale") && !rescale_flag {
                return Err(Error::config(format!("{name}: rescale is false but rescale_mode is '{s}'")));
            }
            r
        }
    };
    let (consensus, count_mean) = if spec.consensus {
        let c = match p.opt_str("consensus")?.unwrap_or("sum") {
            "sum" => Consensus::Sum,
            "count" => Consensus::Count,
            other => return Err(Error::config(format!("{name}: consensus must be 'sum' or 'count', got '{other}'"))),
        };
        let m = match p.opt_str("disjoint_mean")?.unwrap_or("weights") {
            "weights" => false,
            "count" => true,
            other => return Err(Error::config(format!("{name}: disjoint_mean must be 'weights' or 'count', got '{other}'"))),
        };
        (Some(c), m)
    } else {
        (None, false)
    };
    let total: f32 = wf.iter().sum();
    Ok(Box::new(Gta {
        sparsifier,
        weights: wf,
        consensus,
        count_mean,
        normalize,
        lambda: lambda as f32,
        rescale,
        linear_divisor: if total.abs() < 1e-8 { 1.0 } else { total },
    }))
}

const HEAD: usize = 4; // per model: mode, scale, start, len

impl Gta {
    /// Each model's rescale factor. The measured norms (l1, l2, linf) of every partially kept
    /// model whose sparsifier did not measure them come from one pass over the chunks that
    /// reads the base once for all of them; per model, the sums are those of a pass of its
    /// own (element order, chunks folded in order).
    fn scales(&self, ctx: &Ctx, io: &dyn TensorIo, prepared: &[Prepared]) -> Result<Vec<f64>> {
        let norm = self.rescale;
        let mut scales: Vec<f64> = prepared
            .iter()
            .enumerate()
            .map(|(i, p)| match (p.mode, norm) {
                (Mode::Partial, Rescale::Density) => 1.0 / self.sparsifier.density(i),
                _ => 1.0,
            })
            .collect();
        if matches!(norm, Rescale::None | Rescale::Density) {
            return Ok(scales);
        }
        let scale = |(b, a): (f64, f64)| {
            let (b, a) = (norm.finish(b), norm.finish(a));
            if b < RESCALE_EPS || a < RESCALE_EPS {
                1.0
            } else {
                b / a
            }
        };
        for (s, p) in scales.iter_mut().zip(prepared) {
            if let (Mode::Partial, Some(sums)) = (p.mode, p.sums) {
                *s = scale(sums);
            }
        }
        let measured: Vec<usize> = (0..prepared.len()).filter(|&i| prepared[i].mode == Mode::Partial && prepared[i].sums.is_none()).collect();
        if measured.is_empty() {
            return Ok(scales);
        }
        let slots: Vec<usize> = std::iter::once(0).chain(measured.iter().map(|&i| i + 1)).collect();
        // Two chunks at a time, each a lane per measured model: each lane's masked delta over
        // its chunk, then four lanes' sums side by side, the deltas taken again from the
        // inputs. Per lane, each sum's chain of additions is that of a pass of its own; a
        // model's chains alone left the adder waiting on each addition.
        let nm = measured.len();
        let parts: Vec<Vec<(f64, f64)>> = par_chunk_groups(io, &slots, 2, |chunks| {
            let lanes: Vec<(usize, usize)> = (0..chunks.len()).flat_map(|c| (0..nm).map(move |k| (c, k))).collect();
            let mut sums = vec![[0f64; 2]; lanes.len()];
            with_work(lanes.len() * CHUNK, |masked| {
                for (&(c, k), masked) in lanes.iter().zip(masked.chunks_mut(CHUNK)) {
                    let (chunk, r, v) = &chunks[c];
                    let i = measured[k];
                    let cx = Ctx { offset: r.start, ..*ctx };
                    self.sparsifier.masked_delta(&cx, *chunk, i, &prepared[i].state, v[1 + k], v[0], &mut masked[..r.len()]);
                }
                let masked = &*masked;
                // Each lane's inputs and masked delta.
                let lane = |l: usize| {
                    let (c, k) = lanes[l];
                    let (v, n) = (&chunks[c].2, chunks[c].1.len());
                    (&v[1 + k][..n], &v[0][..n], &masked[l * CHUNK..][..n])
                };
                // L1 sums lane by lane in any order where that gives their bits (`l1_sums`).
                if norm == Rescale::L1 && l1_any_order() {
                    for (l, sums) in sums.iter_mut().enumerate() {
                        let (x, b, m) = lane(l);
                        *sums = l1_delta_sums(x, b, m, [0.0; 2]);
                    }
                    return;
                }
                // Four lanes at a time (the last one repeated to fill four, its copies dropped);
                // lanes of unequal lengths (a tensor's last chunk among them) one by one.
                for g in (0..lanes.len()).step_by(4) {
                    let q = [g, g + 1, g + 2, g + 3].map(|q| q.min(lanes.len() - 1));
                    let same = q.iter().all(|&l| lane(l).0.len() == lane(q[0]).0.len());
                    let groups: Vec<[usize; 4]> = if same { vec![q] } else { (g..=q[3]).map(|l| [l; 4]).collect() };
                    for q in groups {
                        let mut s = [0f64; 8];
                        let ls = q.map(lane);
                        sums_of_four(norm, &Deltas { x: ls.map(|l| l.0), base: ls.map(|l| l.1), masked: ls.map(|l| l.2) }, &mut s);
                        for (p, &l) in q.iter().enumerate() {
                            sums[l] = [s[2 * p], s[2 * p + 1]];
                        }
                    }
                }
            });
            Ok(sums.chunks(nm).map(|c| c.iter().map(|&[b, a]| (b, a)).collect()).collect())
        })?;
        for (k, &i) in measured.iter().enumerate() {
            scales[i] = scale(norm.fold_parts(parts.iter().map(|p| p[k])));
        }
        Ok(scales)
    }
}

impl Method for Gta {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let n = io.slots() - 1;
        let prepared = if io.numel() == 0 {
            (0..n).map(|_| Prepared { mode: Mode::Keep, state: vec![], sums: None }).collect()
        } else {
            self.sparsifier.prepare_all(ctx, io, self.rescale)?
        };
        let scales = phase::time(phase::SCALE, || self.scales(ctx, io, &prepared))?;
        // The heads, then the states in one allocation, copied in parallel (a della mask is a
        // thirty-second of the tensor's elements per model: copied on one thread, both cores
        // waited on it).
        let mut stats = Vec::with_capacity(HEAD * n + prepared.iter().map(|p| p.state.len()).sum::<usize>());
        let mut at = HEAD * n;
        for (i, (p, &scale)) in prepared.iter().zip(&scales).enumerate() {
            if !scale.is_finite() {
                return Err(Error::numerical(ctx.tensor, format!("model #{i}: rescale factor {scale}")));
            }
            stats.extend([p.mode as u8 as f64, scale, at as f64, p.state.len() as f64]);
            at += p.state.len();
        }
        for p in &prepared {
            stats.par_extend(p.state.par_iter().copied());
        }
        phase::report(ctx.tensor);
        Ok(stats)
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        phase::time(phase::APPLY, || self.apply_chunk(ctx, base, inputs, stats, out))
    }
}

impl Gta {
    fn apply_chunk(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked at build");
        let chunk = chunk_of(ctx)?;
        // The deltas in one per-thread buffer.
        with_work(inputs.len() * out.len(), |d| merge_chunk(self, ctx, chunk, base, inputs, stats, out, d));
        Ok(())
    }

    /// Each model's delta `d_i` for one chunk, masked and rescaled by its sparsifier (a mask
    /// is decided per engine chunk).
    #[inline(always)]
    fn sparsified_deltas(&self, ctx: &Ctx, chunk: usize, base: &[f32], inputs: &[&[f32]], stats: &[f64], d: &mut [f32]) {
        let len = base.len();
        for (i, (x, di)) in inputs.iter().zip(d.chunks_mut(len.max(1))).enumerate() {
            let h = &stats[HEAD * i..HEAD * (i + 1)];
            let (mode, scale, start, slen) = (h[0] as u8, h[1] as f32, h[2] as usize, h[3] as usize);
            if mode == Mode::Drop as u8 {
                di.fill(0.0);
                continue;
            }
            if mode == Mode::Partial as u8 {
                self.sparsifier.masked_delta(ctx, chunk, i, &stats[start..start + slen], x, base, di);
                if scale != 1.0 {
                    di.iter_mut().for_each(|x| *x *= scale);
                }
            } else {
                delta_into(x, base, di);
            }
        }
    }

    /// `out = base + λ · combined` for the tile `r` of the chunk's sparsified deltas `ds`
    /// (one slice per model; weighted in place); `base` and `out` are the tile's.
    #[inline(always)]
    fn combine_tile(&self, stats: &[f64], ds: &mut [&mut [f32]], r: std::ops::Range<usize>, base: &[f32], out: &mut [f32]) {
        // The elected signs and the divisors (scratch).
        let (mut maj, mut div) = ([0f32; TILE], [0f32; TILE]);
        let (maj, div) = (&mut maj[..r.len()], &mut div[..r.len()]);
        for (i, di) in ds.iter_mut().enumerate() {
            if stats[HEAD * i] as u8 != Mode::Drop as u8 {
                let w = self.weights[i];
                di[r.clone()].iter_mut().for_each(|x| *x *= w);
            }
        }
        let d = || ds.iter().map(|di| &di[r.clone()]);
        match self.consensus {
            Some(c) => {
                // Branch-free per model (vectorizes): s = Σ_i d_i (or Σ sign), then the agreeing sums.
                for di in d() {
                    if c == Consensus::Count {
                        maj.iter_mut().zip(di.iter()).for_each(|(s, &v)| *s += sign(v));
                    } else {
                        maj.iter_mut().zip(di.iter()).for_each(|(s, &v)| *s += v);
                    }
                }
                maj.iter_mut().for_each(|s| *s = if *s >= 0.0 { 1.0 } else { -1.0 });
                out.fill(0.0);
                for (i, di) in d().enumerate() {
                    let wi = if self.count_mean { 1.0 } else { self.weights[i] };
                    for ((o, q), (&x, &m)) in out.iter_mut().zip(div.iter_mut()).zip(di.iter().zip(maj.iter())) {
                        let agree = x * m > 0.0; // sign(d) == elected sign; zeros never agree
                        *o += if agree { x } else { 0.0 };
                        *q += if agree { wi } else { 0.0 };
                    }
                }
                if self.normalize {
                    out.iter_mut().zip(div.iter()).for_each(|(o, &v)| *o /= if v == 0.0 { 1.0 } else { v });
                }
            }
            None => {
                let mut d = d();
                out.copy_from_slice(d.next().expect("at least one model"));
                for di in d {
                    out.iter_mut().zip(di.iter()).for_each(|(o, &v)| *o += v);
                }
                if self.normalize {
                    out.iter_mut().for_each(|o| *o /= self.linear_divisor);
                }
            }
        }
        if self.lambda != 1.0 {
            out.iter_mut().for_each(|o| *o *= self.lambda);
        }
        out.iter_mut().zip(base).for_each(|(o, &b)| *o += b);
    }
}

avx2! {
/// [`Gta::apply`] of one chunk, with the models' deltas in `d` (`models · chunk` floats).
#[allow(clippy::too_many_arguments)]
fn merge_chunk(g: &Gta, ctx: &Ctx, chunk: usize, base: &[f32], inputs: &[&[f32]], stats: &[f64], out: &mut [f32], d: &mut [f32]) {
    let (n, len) = (inputs.len(), out.len());
    g.sparsified_deltas(ctx, chunk, base, inputs, stats, d);
    let mut ds: Vec<&mut [f32]> = d.chunks_mut(len.max(1)).take(n).collect();
    #[cfg(target_arch = "x86_64")]
    let done = if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F was just detected.
        unsafe { x86_512::combine(g, stats, &ds, base, out) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    // The rest is elementwise: tile by tile, so its passes stay in L1 (the same operations
    // per element as whole-chunk passes).
    for t in (done..len).step_by(TILE) {
        let r = t..(t + TILE).min(len);
        g.combine_tile(stats, &mut ds, r.clone(), &base[r.clone()], &mut out[r]);
    }
}
}

/// [`Gta::combine_tile`] sixteen elements at a time, every step in registers (a pass over the
/// tile's buffers per model and step before); the same operations per element.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::{Consensus, Gta, Mode, HEAD};
    use std::arch::x86_64::*;

    /// The combined deltas `ds` (sparsified, rescaled; one slice per model) plus `base` into
    /// `out`, for the whole sixteens of `out`; returns how many elements it wrote.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn combine(g: &Gta, stats: &[f64], ds: &[&mut [f32]], base: &[f32], out: &mut [f32]) -> usize {
        let len = out.len() / 16 * 16;
        assert!(base.len() >= len && ds.iter().all(|d| d.len() >= len));
        let zero = _mm512_setzero_ps();
        // Each model's weight, None for a dropped model (its zeros are not weighted: 0·w could
        // be −0).
        let w: Vec<Option<__m512>> =
            (0..ds.len()).map(|i| (stats[HEAD * i] as u8 != Mode::Drop as u8).then(|| _mm512_set1_ps(g.weights[i]))).collect();
        let mean_w: Vec<__m512> = (0..ds.len()).map(|i| _mm512_set1_ps(if g.count_mean { 1.0 } else { g.weights[i] })).collect();
        let (one, minus) = (_mm512_set1_ps(1.0), _mm512_set1_ps(-1.0));
        let (lambda, divisor) = (_mm512_set1_ps(g.lambda), _mm512_set1_ps(g.linear_divisor));
        for j in (0..len).step_by(16) {
            let d = |i: usize| {
                let x = _mm512_loadu_ps(ds[i].as_ptr().add(j));
                match w[i] {
                    Some(w) => _mm512_mul_ps(x, w),
                    None => x,
                }
            };
            let mut o = match g.consensus {
                Some(c) => {
                    let sign = |v: __m512| {
                        let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, zero);
                        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero);
                        _mm512_mask_mov_ps(_mm512_maskz_mov_ps(pos, one), neg, minus)
                    };
                    let maj = (0..ds.len()).fold(zero, |s, i| _mm512_add_ps(s, if c == Consensus::Count { sign(d(i)) } else { d(i) }));
                    let maj = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(maj, zero), minus, one);
                    let (mut o, mut q) = (zero, zero);
                    for (i, &wi) in mean_w.iter().enumerate() {
                        let x = d(i);
                        let agree = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_mul_ps(x, maj), zero);
                        o = _mm512_add_ps(o, _mm512_maskz_mov_ps(agree, x));
                        q = _mm512_add_ps(q, _mm512_maskz_mov_ps(agree, wi));
                    }
                    if g.normalize {
                        let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(q, zero);
                        o = _mm512_div_ps(o, _mm512_mask_mov_ps(q, none, one));
                    }
                    o
                }
                None => {
                    let o = (1..ds.len()).fold(d(0), |s, i| _mm512_add_ps(s, d(i)));
                    if g.normalize {
                        _mm512_div_ps(o, divisor)
                    } else {
                        o
                    }
                }
            };
            if g.lambda != 1.0 {
                o = _mm512_mul_ps(o, lambda);
            }
            _mm512_storeu_ps(out.as_mut_ptr().add(j), _mm512_add_ps(o, _mm512_loadu_ps(base.as_ptr().add(j))));
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::CHUNK;
    use crate::methods::sparsified::dare::{kept, Random};

    /// The rescale factors of the pass over chunk pairs are those of a pass per model and chunk
    /// (in element order, folded in chunk order): one and several chunks, a partial last chunk
    /// beside a whole one (lanes of unequal lengths), two and three models (a group of four
    /// lanes filled by repeating its last), every measured norm.
    #[test]
    fn rescale_factors_are_a_pass_per_model_and_chunk() {
        for (numel, n) in [(777usize, 2usize), (3 * CHUNK + 777, 3), (4 * CHUNK, 2)] {
            let r = |s: u64| -> Vec<f32> { (0..numel).map(|j| half::bf16::from_f64(crate::rng::normal(s, j as u64) * 0.02).to_f32()).collect() };
            let base = r(1);
            let xs: Vec<Vec<f32>> = (2..2 + n as u64).map(|s| base.iter().zip(r(s)).map(|(&b, d)| b + 0.1 * d).collect()).collect();
            let views: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let io = crate::kernel::Slices::new(Some(&base), &views);
            let shape = [numel];
            let ctx = Ctx { tensor: "w", shape: &shape, offset: 0, seed: 5 };
            let density: Vec<f64> = (0..n).map(|i| 0.3 + 0.2 * i as f64).collect();
            let map = serde_json::json!({ "density": density }).as_object().cloned().unwrap();
            let params = Params::new(crate::methods::spec("dare_ties").unwrap(), &map);
            for rescale in [Rescale::L1, Rescale::L2, Rescale::Linf] {
                let gta = Gta {
                    sparsifier: Box::new(Random::build("dare_ties", &params, n).unwrap()),
                    weights: vec![1.0; n],
                    consensus: None,
                    count_mean: false,
                    normalize: false,
                    lambda: 1.0,
                    rescale,
                    linear_divisor: 1.0,
                };
                let prepared = gta.sparsifier.prepare_all(&ctx, &io, rescale).unwrap();
                let got = gta.scales(&ctx, &io, &prepared).unwrap();
                for (i, &got) in got.iter().enumerate() {
                    let parts = (0..numel).step_by(CHUNK).map(|c| {
                        let mut s = (0f64, 0f64);
                        for g in c..(c + CHUNK).min(numel) {
                            let d = xs[i][g] - base[g];
                            rescale.acc(&mut s.0, d);
                            rescale.acc(&mut s.1, if kept(5, "w", i, g, density[i]) { d } else { 0.0 });
                        }
                        s
                    });
                    let (b, a) = rescale.fold_parts(parts);
                    let want = rescale.finish(b) / rescale.finish(a);
                    assert_eq!(got.to_bits(), want.to_bits(), "{numel} elements, model {i} of {n}, {rescale:?}");
                }
            }
        }
    }
}
