//! SCE (Wan et al. 2024, FuseChat: "select, calculate, erase") as mergekit 0.1.5 does it.
//! With task vectors `τ_i = θ_i − θ_base`:
//!
//! 1. select (only when `select_topk` < 1): per element the population variance of the `τ_i`
//!    across models; keep the `k = ⌊nnz(var) · select_topk⌋` elements with the largest variance
//!    (mergekit computes k in float32; so do we), zero the rest in every `τ_i`
//!    (`select_topk` ≤ 0 or k = 0: all zeroed). Ties at the k-th variance: lowest index first.
//! 2. calculate: `w_i = mean(τ_i²) / Σ_j mean(τ_j²)` over the whole (selected) tensor, or
//!    `1/n` when that sum is below 1e-6;
//! 3. erase: elect the sign of `Σ_i τ_i` (≥ 0 is +) per element; keep agreeing entries;
//!    `θ = θ_base + Σ_agree w_i τ_i / max(Σ_agree w_i, 1e-6)`.
//!
//! mergekit takes no per-model weight for SCE and neither do we. `int8_mask` is accepted and
//! changes nothing. Memory: one `u32` per element while finding the variance threshold in
//! tensors of up to 2^26 elements (larger ones compute their variances again instead), and the
//! selection as bits (1/32 of the f32 tensor) for `apply`, which is elementwise. Each variance
//! is computed once in the key pass (and again for the few sampled before it).
use super::bracket;
use super::gta::Mode;
use super::select::HighHist;
use super::sparsify::{bits, chunk_of, delta_into, scratch, Window, TILE};
use crate::divisor::Divisor;
use crate::error::{Error, Result};
use crate::kernel::CHUNK;
use crate::kernel::{par_chunk_groups, with_work, Ctx, Method, TensorIo};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use crate::simd::avx2;

pub fn spec() -> MethodSpec {
    MethodSpec::new("sce", BaseRule::Required, |p, n, b| Ok(Box::new(Sce::build(p, n, b)?)))
        .params(&[ParamSpec::bool("int8_mask", false), ParamSpec::float("select_topk", 1.0, Range::FRACTION)])
        .mergekit()
}

pub struct Sce {
    topk: f64,
    /// Tensors of up to this many elements keep their variance keys between passes.
    stored_keys: usize,
}

impl Sce {
    pub fn build(p: &Params, _n: usize, _has_base: bool) -> Result<Self> {
        p.bool("int8_mask")?;
        let topk = p.f64("select_topk")?;
        Ok(Sce { topk, stored_keys: STORED_KEYS })
    }
}

/// The selected task vectors of the elements `first..first + base.len()` into `tv` (model
/// after model, `tv.len()` = models · `base.len()`): `θ_i − θ_base` with the unselected entries
/// zeroed, in one pass (`words`: the keep bits of a `Partial` selection, bit 0 for element 0
/// of `words`' range; `first` a multiple of 32).
fn selected_task_vectors(mode: u8, words: &[f64], first: usize, base: &[f32], inputs: &[&[f32]], tv: &mut [f32]) {
    for (x, t) in inputs.iter().zip(tv.chunks_mut(base.len().max(1))) {
        if mode == Mode::Drop as u8 {
            t.fill(0.0);
        } else if mode == Mode::Partial as u8 {
            bits::masked_delta(words, first, x, base, t);
        } else {
            delta_into(x, base, t);
        }
    }
}

/// The descending key of a zero variance.
const ZERO_VAR: u32 = !0u32;

/// Descending keys of the population variance across models of `τ_i[j]` (in f64, rounded
/// to f32): `v` is the base then the models, `out` one key per element.
fn var_keys_desc(v: &[&[f32]], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_allowed() {
        // SAFETY: AVX-512F/DQ, AVX2 and FMA were just detected.
        let done = unsafe { x86_512::var_keys_desc(v, out) };
        let rest: Vec<&[f32]> = v.iter().map(|x| &x[done..]).collect();
        return var_keys_by_block(&rest, &mut out[done..]);
    }
    var_keys_by_block(v, out)
}

/// SCE's per-element steps with AVX-512, in registers: the same operations per element as
/// the plain builds, which made a pass over buffers per model and step (loads and stores
/// were most of their time).
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::bits;
    use crate::divisor::Divisors8;
    use std::arch::x86_64::*;

    /// [`super::var_keys_desc`] eight elements at a time, each element's deltas, mean and
    /// squared deviations in registers (as [`super::var_keys_by_block`] per lane). Returns how
    /// many keys it wrote (a multiple of eight).
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub unsafe fn var_keys_desc(v: &[&[f32]], out: &mut [u32]) -> usize {
        let n = v.len() - 1;
        let len = out.len() / 8 * 8;
        assert!(n >= 1 && v.iter().all(|x| x.len() >= len));
        let inv = n.is_power_of_two().then(|| _mm512_set1_pd(1.0 / n as f64));
        let by = Divisors8::new(_mm512_set1_pd(n as f64));
        let zero = _mm512_setzero_pd();
        for j in (0..len).step_by(8) {
            let b = _mm256_loadu_ps(v[0].as_ptr().add(j));
            let delta = |x: &[f32]| _mm512_cvtps_pd(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(j)), b));
            let per_model = |x: __m512d| match inv {
                Some(inv) => _mm512_mul_pd(x, inv),
                None => by.divide(x),
            };
            let mean = per_model(v[2..].iter().fold(_mm512_add_pd(zero, delta(v[1])), |m, x| _mm512_add_pd(m, delta(x))));
            let sq = |x: &[f32]| {
                let d = _mm512_sub_pd(delta(x), mean);
                _mm512_mul_pd(d, d)
            };
            let ss = per_model(v[2..].iter().fold(_mm512_add_pd(zero, sq(v[1])), |s, x| _mm512_add_pd(s, sq(x))));
            let key = _mm256_xor_si256(_mm256_castps_si256(_mm512_cvtpd_ps(ss)), _mm256_set1_epi32(-1));
            _mm256_storeu_si256(out.as_mut_ptr().add(j).cast(), key);
        }
        len
    }

    /// Every chunk's and model's `Σ τ²` over its selected task vector (as
    /// [`super::selected_task_vectors`] then [`super::sums_of_squares`]: each sum in element
    /// order from +0.0, each square exact in f64), lane (chunk, model) by lane, in pieces of
    /// [`PIECE`] entries: where the piece's squares and the sum so far are multiples of a `q`
    /// whose bound ([`any_order_bound`]) the new sum stays below, no addition in order
    /// rounds, and the piece's squares are added sixteen a step in any order; otherwise (a
    /// square with bits below the sum's last place: the delta of a weight near zero, or a
    /// sum that rounded before and grows past a power of two) one by one in order. `words`:
    /// each chunk's packed keep bits (`Partial`).
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn masked_sums_of_squares(mode: u8, chunks: &[crate::kernel::ChunkView], words: &[Vec<f64>]) -> Vec<f64> {
        use super::Mode;
        let n = chunks[0].2.len() - 1;
        let lanes = (0..chunks.len()).flat_map(|c| (0..n).map(move |i| (c, i)));
        if mode == Mode::Drop as u8 {
            return lanes.map(|_| 0.0).collect();
        }
        let partial = mode == Mode::Partial as u8;
        lanes
            .map(|(c, i)| {
                let (r, v) = (&chunks[c].1, &chunks[c].2);
                let (x, b) = (&v[1 + i][..r.len()], &v[0][..r.len()]);
                // Keep bits `j..j + 16` (`j` a multiple of sixteen).
                let keep = |j: usize| if partial { (bits::word(&words[c], j / 32) >> (j % 32)) as u16 } else { !0 };
                (0..x.len()).step_by(PIECE).fold(0f64, |s, p| {
                    let e = (p + PIECE).min(x.len());
                    squares_any_order(x, b, p..e, keep, s).unwrap_or_else(|| {
                        (p..e).fold(s, |s, j| {
                            let d = if (keep(j / 16 * 16) >> (j % 16)) & 1 == 1 { x[j] - b[j] } else { 0.0 };
                            s + (d as f64) * (d as f64)
                        })
                    })
                })
            })
            .collect()
    }

    /// Entries of a piece per sum of squares: a piece that rounds is added again in order.
    const PIECE: usize = 512;

    /// `s` plus the squares of the kept `x − b` over `r` (`r.start` a multiple of sixteen),
    /// added in any order, where that is the sum in order.
    #[inline(always)]
    pub unsafe fn squares_any_order(x: &[f32], b: &[f32], r: std::ops::Range<usize>, keep: impl Fn(usize) -> u16, s: f64) -> Option<f64> {
        use crate::methods::sparsified::norms::{any_order_bound, lowest_bit, x86_512::least_lowest_bits};
        let (mut acc, mut low) = ([_mm512_setzero_pd(); 2], _mm512_set1_epi32(-1));
        for j in r.clone().step_by(16) {
            let live = if r.end - j >= 16 { u16::MAX } else { (1u16 << (r.end - j)) - 1 };
            let kept = keep(j) & live;
            let d = _mm512_maskz_sub_ps(kept, _mm512_maskz_loadu_ps(live, x.as_ptr().add(j)), _mm512_maskz_loadu_ps(live, b.as_ptr().add(j)));
            low = least_lowest_bits(low, _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFF_FFFF)));
            for (h, d) in [_mm512_castps512_ps256(d), _mm512_extractf32x8_ps::<1>(d)].into_iter().enumerate() {
                let d = _mm512_cvtps_pd(d);
                acc[h] = _mm512_add_pd(acc[h], _mm512_mul_pd(d, d));
            }
        }
        let low = _mm512_reduce_min_epu32(low);
        if low == u32::MAX {
            // Only zeros: adding them leaves `s` (at least +0) as it is.
            return Some(s);
        }
        // Each square's lowest set bit is that of its delta squared. An infinite delta makes
        // the sum infinite, which no bound passes.
        let lowest = f32::from_bits(low) as f64;
        let q = (lowest * lowest).min(lowest_bit(s));
        let sum = s + _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]));
        (sum < any_order_bound(q)).then_some(sum)
    }

    /// [`super::erase`] sixteen elements at a time, every step in registers (the selected task
    /// vectors taken again from the inputs for each sum instead of stored: loads from L1 are
    /// cheaper than the stores and loads of a buffer); the same operations per element.
    /// Returns how many elements it wrote (whole words of 32).
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub unsafe fn erase(stats: &[f64], first: usize, base: &[f32], inputs: &[&[f32]], out: &mut [f32]) -> usize {
        use super::{Mode, HEAD};
        let n = inputs.len();
        let len = out.len() / 32 * 32;
        assert!(base.len() >= len && inputs.iter().all(|x| x.len() >= len) && first.is_multiple_of(32));
        let (mode, weights, words) = (stats[0] as u8, &stats[HEAD..HEAD + n], &stats[HEAD + n..]);
        if mode == Mode::Drop as u8 {
            // No task vector survives: every sum is +0.0, as in the tile loop.
            return 0;
        }
        let partial = mode == Mode::Partial as u8;
        let (zero, one, floor) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0), _mm512_set1_ps(1e-6));
        let w: Vec<__m512> = weights.iter().map(|&w| _mm512_set1_ps(w as f32)).collect();
        for j in (0..len).step_by(16) {
            let b = _mm512_loadu_ps(base.as_ptr().add(j));
            // This half word's keep bits (the same for every model: one selection).
            let keep = if partial { (bits::word(words, (first + j) / 32) >> (j % 32)) as u16 } else { !0 };
            let tv = |x: &[f32]| _mm512_maskz_sub_ps(keep, _mm512_loadu_ps(x.as_ptr().add(j)), b);
            let sum = inputs.iter().fold(zero, |s, x| _mm512_add_ps(s, tv(x)));
            let maj = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(sum, zero), _mm512_set1_ps(-1.0), one);
            let (mut num, mut den) = (zero, zero);
            for (x, &w) in inputs.iter().zip(&w) {
                let x = tv(x);
                let agree = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_mul_ps(x, maj), zero);
                num = _mm512_add_ps(num, _mm512_maskz_mul_ps(agree, x, w));
                den = _mm512_add_ps(den, _mm512_maskz_mov_ps(agree, w));
            }
            _mm512_storeu_ps(out.as_mut_ptr().add(j), _mm512_add_ps(b, _mm512_div_ps(num, _mm512_max_ps(den, floor))));
        }
        len
    }
}

avx2! {
/// [`var_keys_desc`] over blocks of the chunk so the loops vectorize: each model's deltas once
/// per block, then the mean and the squared deviations model by model, each sum started from
/// +0.0 as before (`0.0 + x`, not a zeroed buffer: no fill per block).
fn var_keys_by_block(v: &[&[f32]], out: &mut [u32]) {
    const B: usize = 1024;
    let n = (v.len() - 1) as f64;
    // Dividing by a power of two is multiplying by its exact reciprocal (the same real
    // number, rounded once); by another count, `Divisor`'s multiplications: the same bits, and
    // much cheaper than a division. The sums are +0 or far above its least dividend (squares
    // and sums of f32 values).
    let inv = (v.len() - 1).is_power_of_two().then(|| 1.0 / n);
    let by = Divisor::new(n);
    let per_model = |x: &mut [f64]| match inv {
        Some(inv) => x.iter_mut().for_each(|m| *m *= inv),
        None => x.iter_mut().for_each(|m| *m = by.divide(*m)),
    };
    let (mut mean, mut ss) = ([0f64; B], [0f64; B]);
    // Sized to this call (the streamed pass calls it per tile of keys).
    let mut deltas = vec![0f32; (v.len() - 1) * out.len().min(B)];
    for (k, o) in out.chunks_mut(B).enumerate() {
        let r = k * B..k * B + o.len();
        let (mean, ss) = (&mut mean[..o.len()], &mut ss[..o.len()]);
        let t = &mut deltas[..(v.len() - 1) * o.len()];
        for (x, t) in v[1..].iter().zip(t.chunks_mut(o.len())) {
            delta_into(&x[r.clone()], &v[0][r.clone()], t);
        }
        let mut models = t.chunks(o.len());
        let first = models.next().expect("at least one model");
        mean.iter_mut().zip(first).for_each(|(m, &x)| *m = 0.0 + x as f64);
        for t in models {
            mean.iter_mut().zip(t).for_each(|(m, &x)| *m += x as f64);
        }
        per_model(mean);
        let mut models = t.chunks(o.len());
        let first = models.next().expect("at least one model");
        ss.iter_mut().zip(first.iter().zip(mean.iter())).for_each(|(s, (&x, &m))| *s = 0.0 + (x as f64 - m) * (x as f64 - m));
        for t in models {
            ss.iter_mut().zip(t.iter().zip(mean.iter())).for_each(|(s, (&x, &m))| *s += (x as f64 - m) * (x as f64 - m));
        }
        per_model(ss);
        o.iter_mut().zip(ss.iter()).for_each(|(o, &s)| *o = !(s as f32).to_bits());
    }
}
}

/// `Σ x²` of each lane (in f64, each sum in element order), four lanes per loop: their sums
/// are independent chains of additions, which the CPU overlaps (a lane alone waits on each
/// addition's latency).
fn sums_of_squares(lanes: &[&[f32]]) -> Vec<f64> {
    let sq = |x: f32| (x as f64) * (x as f64);
    let mut out = Vec::with_capacity(lanes.len());
    for group in lanes.chunks(4) {
        // Missing lanes repeat the last one (their sums are dropped).
        let l: [&[f32]; 4] = std::array::from_fn(|k| group[k.min(group.len() - 1)]);
        let common = l.iter().map(|l| l.len()).min().unwrap_or(0);
        let mut s = [0f64; 4];
        let c = |k: usize| &l[k][..common];
        for (((&a, &b), &c), &d) in c(0).iter().zip(c(1)).zip(c(2)).zip(c(3)) {
            s[0] += sq(a);
            s[1] += sq(b);
            s[2] += sq(c);
            s[3] += sq(d);
        }
        for (k, s) in s.iter_mut().enumerate().take(group.len()) {
            *s = l[k][common..].iter().fold(*s, |a, &x| a + sq(x));
        }
        out.extend(&s[..group.len()]);
    }
    out
}

/// Whether the selected task vectors' sums of squares are taken in pieces, in any order where
/// that gives their bits (AVX-512).
fn squares_in_pieces() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::simd::avx512_allowed();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

const HEAD: usize = 1; // mode, then n weights, then the keep bits of a partial selection

/// Tensors of up to this many elements keep their variance keys (4 bytes each: 256 MiB at
/// most) from the pass that finds the top-k to the pass that decides the selection; larger
/// ones compute each chunk's again there (one more variance per element), so that memory does
/// not grow with the largest tensor (a 3B model's 128k-vocabulary embedding: 1.6 GB of keys).
const STORED_KEYS: usize = 1 << 26;

thread_local! {
    /// A chunk's variance keys computed again, the buffer kept from chunk to chunk.
    static CHUNK_KEYS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for Sce {
    fn drop(&mut self) {
        scratch::release(); // the key buffer lives as long as the merge's kernel
    }
}

impl Method for Sce {
    fn prepare(&self, ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        let n = io.slots() - 1;
        let numel = io.numel();
        let slots: Vec<usize> = (0..=n).collect();
        let (mode, window, keys) = if self.topk >= 1.0 || numel == 0 {
            (Mode::Keep, vec![], None)
        } else if self.topk <= 0.0 {
            (Mode::Drop, vec![], None)
        } else {
            // One pass: every variance key (stored, up to `stored_keys` of them) and the top-k's
            // boundaries bracketed from a sample; nnz counts the keys of a zero variance
            // (`!0.0.to_bits()`, the largest descending key) out.
            let mut keys = (numel <= self.stored_keys).then(|| scratch::take(numel));
            let k_of = |zeros: usize| (((numel - zeros) as f32) * (self.topk as f32)) as usize;
            let (k, w) = bracket::keys_and_top(io, &slots, &var_keys_desc, keys.as_deref_mut(), ZERO_VAR, &k_of)?;
            if k == 0 {
                (Mode::Drop, vec![], None)
            } else {
                let w = match w {
                    Some(w) => w,
                    // A missed bracket: the exact selection among all the keys, stored now if
                    // they were not.
                    None => {
                        let keys = match &mut keys {
                            Some(keys) => keys,
                            None => {
                                let mut all = scratch::take(numel);
                                bracket::keys_and_top(io, &slots, &var_keys_desc, Some(&mut all), ZERO_VAR, &k_of)?;
                                keys.insert(all)
                            }
                        };
                        Window::from_keys(keys, &HighHist::of(keys), 0, k)
                    }
                };
                let mut st = vec![];
                w.pack(&mut st);
                (Mode::Partial, st, keys)
            }
        };
        // Mean squares of the selected task vectors, folded in chunk order; the selection is
        // decided once here, from the stored keys or the chunk's computed again, and kept as
        // bits for `apply`.
        // Two chunks at a time: each model's sum per chunk is a chain of additions in element
        // order; the two chunks' chains advance in one loop. With AVX-512, each chain in pieces
        // added in any order where no addition in order rounds.
        let wide = squares_in_pieces();
        let parts = par_chunk_groups(io, &slots, 2, |chunks| {
            let words: Vec<Vec<f64>> = chunks
                .iter()
                .map(|(c, r, v)| {
                    let decide = |keys: &[u32]| {
                        let mut kept = vec![0u32; r.len().div_ceil(32)];
                        Window::decide_words(&window, *c, keys, &mut kept);
                        bits::pack(&kept)
                    };
                    match (&keys, mode) {
                        (Some(keys), _) => decide(&keys[r.clone()]),
                        (None, Mode::Partial) => {
                            let mut ck = CHUNK_KEYS.take();
                            ck.resize(r.len(), 0);
                            var_keys_desc(v, &mut ck);
                            let kept = decide(&ck);
                            CHUNK_KEYS.set(ck);
                            kept
                        }
                        _ => vec![],
                    }
                })
                .collect();
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX-512F/DQ were detected (`squares_in_pieces`).
                let ms = unsafe { x86_512::masked_sums_of_squares(mode as u8, chunks, &words) };
                return Ok(ms.chunks(n).zip(words).map(|(ms, w)| (ms.to_vec(), w)).collect());
            }
            let ms = with_work(n * 2 * CHUNK, |w| {
                let mut lanes = Vec::with_capacity(2 * n);
                for (((_, r, v), words), tv) in chunks.iter().zip(&words).zip(w.chunks_mut(n * CHUNK)) {
                    let tv = &mut tv[..n * r.len()];
                    selected_task_vectors(mode as u8, words, 0, v[0], &v[1..], tv);
                    lanes.extend(tv.chunks(r.len().max(1)).take(n));
                }
                sums_of_squares(&lanes)
            });
            Ok(ms.chunks(n).zip(words).map(|(ms, w)| (ms.to_vec(), w)).collect())
        })?;
        drop(keys);
        let mut ms = vec![0f64; n];
        for (p, _) in &parts {
            ms.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        ms.iter_mut().for_each(|m| *m /= numel.max(1) as f64);
        let total: f64 = ms.iter().sum();
        let weights: Vec<f64> = if total.abs() < 1e-6 { vec![1.0 / n as f64; n] } else { ms.iter().map(|m| m / total).collect() };
        if weights.iter().any(|w| !w.is_finite()) {
            return Err(Error::numerical(ctx.tensor, "sce: non-finite model weights (are the inputs finite?)"));
        }
        let mut stats = vec![mode as u8 as f64];
        stats.extend(weights);
        parts.into_iter().for_each(|(_, w)| stats.extend(w));
        Ok(stats)
    }

    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked at build");
        let first = chunk_of(ctx)? * CHUNK;
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx512_allowed() {
            // SAFETY: AVX-512F/DQ, AVX2 and FMA were just detected.
            let done = unsafe { x86_512::erase(stats, first, base, inputs, out) };
            let rest: Vec<&[f32]> = inputs.iter().map(|x| &x[done..]).collect();
            with_work((inputs.len() + 3) * TILE, |w| erase(stats, first + done, &base[done..], &rest, &mut out[done..], w));
            return Ok(());
        }
        with_work((inputs.len() + 3) * TILE, |w| erase(stats, first, base, inputs, out, w));
        Ok(())
    }
}

avx2! {
/// `apply` of the chunk at element `first`: the selected task vectors' sign election and
/// weighted disjoint mean. Task vectors, elected signs, numerators and denominators of one
/// tile in `w` (`(models + 3) · TILE` floats); tile by tile so every pass stays in L1 (the
/// same operations per element as whole-chunk passes).
fn erase(stats: &[f64], first: usize, base: &[f32], inputs: &[&[f32]], out: &mut [f32], w: &mut [f32]) {
    let n = inputs.len();
    let mut xs: Vec<&[f32]> = Vec::with_capacity(n);
    for t0 in (0..out.len()).step_by(TILE) {
        let r = t0..(t0 + TILE).min(out.len());
        let len = r.len();
        let (tv, rest) = w.split_at_mut(n * len);
        let (maj, rest) = rest.split_at_mut(len);
        let (num, den) = rest[..2 * len].split_at_mut(len);
        xs.clear();
        xs.extend(inputs.iter().map(|x| &x[r.clone()]));
        let (base, out) = (&base[r.clone()], &mut out[r]);
        selected_task_vectors(stats[0] as u8, &stats[HEAD + n..], first + t0, base, &xs, tv);
        maj.fill(0.0);
        for t in tv.chunks(len) {
            maj.iter_mut().zip(t).for_each(|(s, &v)| *s += v);
        }
        maj.iter_mut().for_each(|s| *s = if *s >= 0.0 { 1.0 } else { -1.0 });
        num.fill(0.0);
        den.fill(0.0);
        for (t, &w) in tv.chunks(len).zip(&stats[HEAD..HEAD + n]) {
            let w = w as f32;
            for ((nu, de), (&x, &m)) in num.iter_mut().zip(den.iter_mut()).zip(t.iter().zip(maj.iter())) {
                let agree = x * m > 0.0; // sign(τ) == elected sign; zeros never agree
                *nu += if agree { x * w } else { 0.0 };
                *de += if agree { w } else { 0.0 };
            }
        }
        for ((o, &b), (&nu, &de)) in out.iter_mut().zip(base).zip(num.iter().zip(den.iter())) {
            *o = b + nu / de.max(1e-6);
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_sums_of_squares_are_the_plain_sums() {
        // One to nine lanes (groups of four and a partial one), lanes of different lengths
        // (a last chunk is shorter), an empty one.
        for n in 1..=9 {
            let lanes: Vec<Vec<f32>> = (0..n)
                .map(|i| (0..if i == 5 { 0 } else { 1001 - 97 * (i % 3) }).map(|j| (((j + i) * 7919 % 1013) as f32 - 500.0) * 1e-3).collect())
                .collect();
            let want: Vec<u64> = lanes.iter().map(|t| t.iter().fold(0f64, |a, &x| a + (x as f64) * (x as f64)).to_bits()).collect();
            let views: Vec<&[f32]> = lanes.iter().map(|l| l.as_slice()).collect();
            let got: Vec<u64> = sums_of_squares(&views).iter().map(|m| m.to_bits()).collect();
            assert_eq!(got, want, "{n} lanes");
        }
    }

    /// The AVX-512 sums of squares of the selected task vectors are the plain ones (select,
    /// then sum each lane in element order), bit for bit: one to ten models, every mode,
    /// groups of chunks with a short last one, zero deltas; on full-precision values (whose
    /// squares round: pieces added in order) and on bf16 weights and fine-tunes (pieces in any
    /// order: checked), with weights near zero among them (a piece in order, and the sums
    /// after it).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_sums_of_squares_are_the_plain_sums() {
        use crate::methods::geometric::common::testing::rand;
        if !crate::simd::avx512_allowed() {
            return; // the plain sums are the only ones this CPU runs
        }
        let (len, bf16) = (3000, |x: f64| half::bf16::from_f64(x).to_f32());
        let mut base_bf16: Vec<f32> = (0..3 * len).map(|j| bf16(crate::rng::normal(5, j as u64) * 0.02)).collect();
        for j in (700..3 * len).step_by(1300) {
            base_bf16[j] = bf16(3e-9 * (j % 7) as f64);
        }
        let mut taken = [0usize; 2];
        for (family, taken) in taken.iter_mut().enumerate() {
            let base = if family == 0 { rand(3 * len, 1) } else { base_bf16.clone() };
            for models in 1..=10 {
                let xs: Vec<Vec<f32>> = (0..models)
                    .map(|k| {
                        let d = rand(base.len(), k as u64 + 2);
                        let tune = |j: usize, b: f32| if family == 0 { b + d[j] } else { bf16(b as f64 + 0.1 * d[j] as f64 * 0.002) };
                        base.iter().enumerate().map(|(j, &b)| if j % 7 == k { b } else { tune(j, b) }).collect()
                    })
                    .collect();
                for (mode, lens) in
                    [(Mode::Partial, [len, len, len]), (Mode::Partial, [len, len, 333]), (Mode::Keep, [len, len, 5]), (Mode::Drop, [len, len, len])]
                {
                    let per = (8 / models).max(1);
                    let chunks: Vec<crate::kernel::ChunkView> = (0..per.min(3))
                        .map(|c| {
                            let r = c * len..c * len + lens[c];
                            let mut v: Vec<&[f32]> = vec![&base[r.clone()]];
                            v.extend(xs.iter().map(|x| &x[r.clone()]));
                            (c, r, v)
                        })
                        .collect();
                    let words: Vec<Vec<f64>> = chunks
                        .iter()
                        .map(|(c, r, _)| {
                            if mode == Mode::Partial {
                                bits::pack(&(0..r.len().div_ceil(32)).map(|k| crate::rng::mix64((c * 100 + k) as u64) as u32).collect::<Vec<_>>())
                            } else {
                                vec![]
                            }
                        })
                        .collect();
                    let mut want = vec![];
                    for ((_, r, v), w) in chunks.iter().zip(&words) {
                        let mut tv = vec![0f32; models * r.len()];
                        selected_task_vectors(mode as u8, w, 0, v[0], &v[1..], &mut tv);
                        let lanes: Vec<&[f32]> = tv.chunks(r.len()).collect();
                        want.extend(sums_of_squares(&lanes).iter().map(|s| s.to_bits()));
                        if mode == Mode::Keep {
                            // How many pieces of the first model are summed in any order.
                            for p in (0..r.len()).step_by(512) {
                                let piece = p..(p + 512).min(r.len());
                                // SAFETY: AVX-512F/DQ were detected above.
                                let fast = unsafe { x86_512::squares_any_order(v[1], v[0], piece, |_| !0, 0.0) };
                                *taken += usize::from(fast.is_some());
                            }
                        }
                    }
                    // SAFETY: AVX-512F/DQ were detected above.
                    let got: Vec<u64> = unsafe { x86_512::masked_sums_of_squares(mode as u8, &chunks, &words) }.iter().map(|s| s.to_bits()).collect();
                    assert_eq!(got, want, "family {family}, {models} models, {mode:?}, {lens:?}");
                }
            }
        }
        // Full-precision squares round (pieces in order); bf16 deltas' do not, but in some of
        // the pieces holding a weight near zero (86 pieces of the first model in all).
        assert!(taken[0] < 8 && (70..86).contains(&taken[1]), "{taken:?}");
        // A sum under way with a bit below the squares' (from a piece added in order) rounds
        // differently in order (three times) than in one addition.
        let d = [0.0859375f32, 1.25, 0.0068359375, 0.2734375, 2.0, 1.5625, 0.59375];
        let s = f64::from_bits(0x3FF0_0000_0000_006B);
        let in_order = d.iter().fold(s, |s, &d| s + (d as f64) * (d as f64));
        // SAFETY: AVX-512F/DQ were detected above.
        let got = unsafe { x86_512::squares_any_order(&d, &[0.0; 7], 0..7, |_| !0, s) }.unwrap_or(in_order);
        assert_eq!(got.to_bits(), in_order.to_bits());
    }

    /// The variance keys of one to five models (three and five divided by multiplications) are
    /// the formula's with divisions, for tied, zero and tiny deltas, in every build (a ragged
    /// last block of eight).
    #[test]
    fn variance_keys_are_the_divisions() {
        use crate::methods::geometric::common::testing::rand;
        let n = 5003;
        let base = rand(n, 1);
        let scale = |j: usize| [0.01f32, 1e-20, 0.0, 3.0][j % 4];
        for models in 1..=5 {
            let xs: Vec<Vec<f32>> =
                (0..models).map(|k| base.iter().zip(rand(n, k as u64 + 2)).enumerate().map(|(j, (&b, d))| b + d * scale(j + k)).collect()).collect();
            let mut v: Vec<&[f32]> = vec![&base];
            v.extend(xs.iter().map(|m| m.as_slice()));
            let want: Vec<u32> = (0..n)
                .map(|j| {
                    let d: Vec<f64> = xs.iter().map(|m| (m[j] - base[j]) as f64).collect();
                    let mean = d.iter().fold(0.0, |a, &x| a + x) / models as f64;
                    let ss = d.iter().fold(0.0, |a, &x| a + (x - mean) * (x - mean)) / models as f64;
                    !(ss as f32).to_bits()
                })
                .collect();
            for (b, got) in crate::simd::each_build(|| {
                let mut got = vec![0u32; n];
                var_keys_desc(&v, &mut got);
                got
            })
            .iter()
            .enumerate()
            {
                for j in 0..n {
                    assert_eq!(got[j], want[j], "{models} models, build {b}, element {j}");
                }
            }
        }
    }

    /// A tensor over the stored-keys limit (set low here) computes its variances again in the
    /// selection pass: the same bytes as with its keys stored, for tied and zero variances
    /// (models equal to the base in places) across chunks and a ragged last chunk.
    #[test]
    fn variances_computed_again_give_the_stored_bytes() {
        use crate::methods::geometric::common::testing::rand;
        let n = 3 * CHUNK + 1234;
        let base = rand(n, 1);
        let q = |x: f32| (x * 64.0).round() / 64.0;
        let models: Vec<Vec<f32>> = (2..5)
            .map(|k| base.iter().zip(rand(n, k)).enumerate().map(|(j, (&b, d))| if j % 5 == 0 { b } else { b + q(d) * 0.01 }).collect())
            .collect();
        let inputs: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
        let pool = crate::kernel::pool(Some(2)).unwrap();
        for topk in [0.3, 0.9] {
            let run = |stored_keys| crate::kernel::merge_arrays(&Sce { topk, stored_keys }, "t", &[n], 7, Some(&base), &inputs, &pool).unwrap();
            let (stored, again) = (run(usize::MAX), run(0));
            assert!(stored.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "topk {topk}");
            assert!(stored.iter().zip(&base).any(|(a, b)| a != b));
        }
    }
}
