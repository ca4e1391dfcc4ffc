//! Helpers shared by the geometric family: cutting a tensor into vectors (whole tensor,
//! rows along the last dimension, or vectors along dimension 0), streaming per-vector
//! statistics in `prepare` with bounded memory and a fixed reduction order, and Gram
//! matrices (all pairwise dot products) of the inputs.
use crate::error::Result;
use crate::kernel::TensorIo;
use crate::kernel::{with_scratch, CHUNK};
use rayon::prelude::*;

/// How a tensor is cut into the vectors that per-vector math works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Contiguous vectors of `len` elements (`len` = numel: the whole flattened tensor).
    Rows { len: usize },
    /// Vectors along dimension 0: flat element j belongs to vector `j % inner`.
    Cols { inner: usize },
}

impl Layout {
    /// The whole flattened tensor as one vector.
    pub fn whole(shape: &[usize]) -> Layout {
        Layout::Rows { len: shape.iter().product::<usize>().max(1) }
    }

    /// Vectors along the last dimension (torch's `dim=-1`); a 1-D tensor is one vector.
    pub fn last_dim(shape: &[usize]) -> Layout {
        match shape.last() {
            Some(&d) if shape.len() >= 2 => Layout::Rows { len: d.max(1) },
            _ => Layout::whole(shape),
        }
    }

    /// Vectors along the first dimension (torch's `dim=0` moved last); a 1-D tensor is
    /// one vector.
    pub fn first_dim(shape: &[usize]) -> Layout {
        if shape.len() <= 1 {
            return Layout::whole(shape);
        }
        Layout::Cols { inner: shape[1..].iter().product::<usize>().max(1) }
    }

    /// Number of vectors in a tensor of `numel` elements.
    pub fn count(&self, numel: usize) -> usize {
        match *self {
            Layout::Rows { len } => numel.div_ceil(len).max(1),
            Layout::Cols { inner } => inner,
        }
    }

    /// Vector index of each element from flat index `start` on.
    #[inline]
    pub fn segments(&self, start: usize) -> Segments {
        match *self {
            Layout::Rows { len } => Segments { seg: start / len, pos: start % len, period: len, rows: true },
            Layout::Cols { inner } => Segments { seg: start % inner, pos: 0, period: inner, rows: false },
        }
    }
}

/// Iterator over the vector index of consecutive flat elements (no division per element).
pub struct Segments {
    seg: usize,
    pos: usize,
    period: usize,
    rows: bool,
}

impl Iterator for Segments {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        let s = self.seg;
        if self.rows {
            self.pos += 1;
            if self.pos == self.period {
                self.pos = 0;
                self.seg += 1;
            }
        } else {
            self.seg += 1;
            if self.seg == self.period {
                self.seg = 0;
            }
        }
        Some(s)
    }
}

/// Most groups a statistics pass is split into (each with its own accumulator). Fixed, so
/// results never depend on the thread count.
const GROUPS: usize = 16;

/// Per-vector statistics: `k` f64 sums per vector of `layout`. `f(run, acc)` is called on
/// runs of consecutive elements that all belong to one vector, with each input slot's
/// values over the run (slot 0 is the base when there is one) and that vector's `k`
/// accumulators (rows: runs as long as the row's part in a chunk; vectors along dim 0:
/// runs of one element). Streams the inputs in fixed chunks over a fixed number of
/// groups, folded in order: deterministic, and memory bounded by one chunk per slot per
/// worker plus `GROUPS` accumulators.
pub fn vector_stats<F>(io: &dyn TensorIo, layout: Layout, k: usize, f: F) -> Result<Vec<f64>>
where
    F: Fn(&[&[f32]], &mut [f64]) + Sync,
{
    let numel = io.numel();
    let nseg = layout.count(numel);
    let mut total = vec![0f64; nseg * k];
    if numel == 0 || k == 0 {
        return Ok(total);
    }
    let slots = io.slots();
    let nchunks = numel.div_ceil(CHUNK);
    let groups = nchunks.min(GROUPS);
    let per = nchunks.div_ceil(groups);
    let parts: Vec<(usize, Vec<f64>)> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let start = (g * per * CHUNK).min(numel);
            let end = ((g + 1) * per * CHUNK).min(numel);
            if start >= end {
                return Ok((0, Vec::new()));
            }
            // Segments this group touches.
            let (seg0, nacc) = match layout {
                Layout::Rows { len } => (start / len, (end - 1) / len - start / len + 1),
                Layout::Cols { inner } => (0, inner),
            };
            let mut acc = vec![0f64; nacc * k];
            with_scratch(|sc| -> Result<()> {
                let (bufs, _, _) = sc.parts(slots, CHUNK);
                let mut s = start;
                while s < end {
                    let e = (s + CHUNK).min(end);
                    for (slot, b) in bufs.iter_mut().enumerate() {
                        io.read(slot, s..e, &mut b[..e - s])?;
                    }
                    let mut run: Vec<&[f32]> = Vec::with_capacity(slots);
                    match layout {
                        Layout::Rows { len } => {
                            let mut p = s;
                            while p < e {
                                let seg = p / len;
                                let q = ((seg + 1) * len).min(e);
                                run.clear();
                                run.extend(bufs.iter().map(|b| &b[p - s..q - s]));
                                let a = seg - seg0;
                                f(&run, &mut acc[a * k..(a + 1) * k]);
                                p = q;
                            }
                        }
                        Layout::Cols { .. } => {
                            let mut segs = layout.segments(s);
                            for i in 0..e - s {
                                let seg = segs.next().unwrap();
                                run.clear();
                                run.extend(bufs.iter().map(|b| &b[i..i + 1]));
                                f(&run, &mut acc[seg * k..(seg + 1) * k]);
                            }
                        }
                    }
                    s = e;
                }
                Ok(())
            })?;
            Ok((seg0, acc))
        })
        .collect::<Result<_>>()?;
    for (seg0, acc) in parts {
        total[seg0 * k..seg0 * k + acc.len()].iter_mut().zip(&acc).for_each(|(t, a)| *t += a);
    }
    Ok(total)
}

/// Index of pair (i, j), i <= j, in the packed upper triangle of an n×n symmetric matrix.
#[inline]
pub fn tri(n: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i <= j { (i, j) } else { (j, i) };
    i * n - i * (i + 1) / 2 + j
}

/// `Σ (x − b)(y − b)` over a run in f64 (differences rounded to f32 first, as a torch
/// implementation computing task vectors in f32 would), four partial sums so it
/// vectorizes; `b` absent: `Σ x·y`.
#[inline]
pub fn dot(x: &[f32], y: &[f32], b: Option<&[f32]>) -> f64 {
    let mut acc = [0f64; 4];
    let n4 = x.len() / 4 * 4;
    let mut tail = 0f64;
    match b {
        None => {
            for (xs, ys) in x[..n4].chunks_exact(4).zip(y[..n4].chunks_exact(4)) {
                for l in 0..4 {
                    acc[l] += xs[l] as f64 * ys[l] as f64;
                }
            }
            for j in n4..x.len() {
                tail += x[j] as f64 * y[j] as f64;
            }
        }
        Some(b) => {
            for ((xs, ys), bs) in x[..n4].chunks_exact(4).zip(y[..n4].chunks_exact(4)).zip(b[..n4].chunks_exact(4)) {
                for l in 0..4 {
                    acc[l] += (xs[l] - bs[l]) as f64 * (ys[l] - bs[l]) as f64;
                }
            }
            for j in n4..x.len() {
                tail += (x[j] - b[j]) as f64 * (y[j] - b[j]) as f64;
            }
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Adds the packed Gram matrix (upper triangle with diagonal) of the vectors
/// `run[idx[i]]` (minus `run[base]` when given) over one run to `acc`. Each entry is
/// exactly `dot` of its pair; up to four vectors are swept once for all pairs (each
/// difference taken once), more pair by pair.
#[inline]
pub fn gram_run(run: &[&[f32]], idx: &[usize], base: Option<usize>, acc: &mut [f64]) {
    let b = base.map(|s| run[s]);
    let v = |i: usize| run[idx[i]];
    match idx.len() {
        1 => gram_swept::<1, 1>(core::array::from_fn(v), b, acc),
        2 => gram_swept::<2, 3>(core::array::from_fn(v), b, acc),
        3 => gram_swept::<3, 6>(core::array::from_fn(v), b, acc),
        4 => gram_swept::<4, 10>(core::array::from_fn(v), b, acc),
        n => gram_pairwise(n, v, b, acc),
    }
}

fn gram_pairwise<'a>(n: usize, v: impl Fn(usize) -> &'a [f32], b: Option<&[f32]>, acc: &mut [f64]) {
    let mut t = 0;
    for i in 0..n {
        for j in i..n {
            acc[t] += dot(v(i), v(j), b);
            t += 1;
        }
    }
}

/// `gram_run` for `N` vectors (`P` = N(N+1)/2 pairs) in one sweep: the same four lane sums,
/// tail and final fold per pair as `dot`, so every entry is bit-identical to it. Also
/// compiled for AVX2 (four f64 lanes instead of two; chosen at run time): the same
/// additions and multiplications in the same order (Rust never fuses them), the same bits.
#[inline]
fn gram_swept<const N: usize, const P: usize>(v: [&[f32]; N], b: Option<&[f32]>, acc: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::wide_allowed() && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the target feature it is compiled with was just detected.
        return unsafe { gram_swept_avx2::<N, P>(v, b, acc) };
    }
    gram_swept_any::<N, P>(v, b, acc)
}

/// [`sweep`] with the four lane sums of a pair in one AVX2 vector: four entries of each
/// vector less the base's (in f32), widened, multiplied pair by pair and added to the pair's
/// lanes; the same operations per lane in the same order as the plain loop (which the
/// compiler left scalar, with shuffles: 1.8 ns per entry of a model_stock merge), then its
/// tail and fold ([`fold_lanes`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gram_swept_avx2<const N: usize, const P: usize>(v: [&[f32]; N], b: Option<&[f32]>, acc: &mut [f64]) {
    use std::arch::x86_64::*;
    let len = v[0].len();
    assert!(v.iter().all(|v| v.len() >= len) && b.is_none_or(|b| b.len() >= len));
    let n4 = len / 4 * 4;
    let mut lanes = [_mm256_setzero_pd(); P];
    for k in (0..n4).step_by(4) {
        let base = b.map(|b| _mm_loadu_ps(b.as_ptr().add(k)));
        let d: [__m256d; N] = core::array::from_fn(|i| {
            let x = _mm_loadu_ps(v[i].as_ptr().add(k));
            _mm256_cvtps_pd(base.map_or(x, |b| _mm_sub_ps(x, b)))
        });
        let mut t = 0;
        for i in 0..N {
            for j in i..N {
                lanes[t] = _mm256_add_pd(lanes[t], _mm256_mul_pd(d[i], d[j]));
                t += 1;
            }
        }
    }
    let lanes = lanes.map(|l| {
        let mut a = [0f64; 4];
        _mm256_storeu_pd(a.as_mut_ptr(), l);
        a
    });
    let diff = |i: usize, k: usize| match b {
        Some(b) => (v[i][k] - b[k]) as f64,
        None => v[i][k] as f64,
    };
    fold_lanes::<N, P>(lanes, n4..len, diff, acc);
}

#[inline(always)]
fn gram_swept_any<const N: usize, const P: usize>(v: [&[f32]; N], b: Option<&[f32]>, acc: &mut [f64]) {
    let len = v[0].len();
    let v: [&[f32]; N] = core::array::from_fn(|i| &v[i][..len]);
    match b {
        Some(b) => {
            let b = &b[..len];
            sweep::<N, P>(len, |i, j| (v[i][j] - b[j]) as f64, acc)
        }
        None => sweep::<N, P>(len, |i, j| v[i][j] as f64, acc),
    }
}

#[inline(always)]
fn sweep<const N: usize, const P: usize>(len: usize, diff: impl Fn(usize, usize) -> f64, acc: &mut [f64]) {
    let n4 = len / 4 * 4;
    let mut lanes = [[0f64; 4]; P];
    for k in (0..n4).step_by(4) {
        let mut d = [[0f64; 4]; N];
        for (i, di) in d.iter_mut().enumerate() {
            for (l, x) in di.iter_mut().enumerate() {
                *x = diff(i, k + l);
            }
        }
        let mut t = 0;
        for i in 0..N {
            for j in i..N {
                for l in 0..4 {
                    lanes[t][l] += d[i][l] * d[j][l];
                }
                t += 1;
            }
        }
    }
    fold_lanes::<N, P>(lanes, n4..len, diff, acc);
}

/// `dot`'s last steps for every pair: the entries `rest` past the last whole four, each
/// pair's products added in order, then the pair's four lane sums folded with that tail into
/// `acc`.
#[inline(always)]
fn fold_lanes<const N: usize, const P: usize>(
    lanes: [[f64; 4]; P],
    rest: std::ops::Range<usize>,
    diff: impl Fn(usize, usize) -> f64,
    acc: &mut [f64],
) {
    let mut tail = [0f64; P];
    for k in rest {
        let mut d = [0f64; N];
        for (i, x) in d.iter_mut().enumerate() {
            *x = diff(i, k);
        }
        let mut t = 0;
        for i in 0..N {
            for j in i..N {
                tail[t] += d[i] * d[j];
                t += 1;
            }
        }
    }
    for t in 0..P {
        let a = &lanes[t];
        acc[t] += (a[0] + a[1]) + (a[2] + a[3]) + tail[t];
    }
}

/// Calls `f(range, vector)` for each maximal run of elements `offset..offset + len` (as
/// positions within the piece) that belong to one vector of `layout`: kernels then apply
/// a per-vector coefficient run by run, in loops that vectorize.
#[inline]
pub fn for_each_run(layout: Layout, offset: usize, len: usize, mut f: impl FnMut(std::ops::Range<usize>, usize)) {
    match layout {
        Layout::Rows { len: row } => {
            let mut p = offset;
            while p < offset + len {
                let seg = p / row;
                let q = ((seg + 1) * row).min(offset + len);
                f(p - offset..q - offset, seg);
                p = q;
            }
        }
        Layout::Cols { .. } => {
            let mut segs = layout.segments(offset);
            for i in 0..len {
                f(i..i + 1, segs.next().unwrap());
            }
        }
    }
}

/// Whole-tensor packed Gram matrix of the slots `idx` (minus slot `base` when given).
pub fn whole_gram(io: &dyn TensorIo, idx: &[usize], base: Option<usize>) -> Result<Vec<f64>> {
    let n = idx.len();
    let shape = [io.numel()];
    vector_stats(io, Layout::whole(&shape), n * (n + 1) / 2, |run, acc| gram_run(run, idx, base, acc))
}

/// Most models the Gram-matrix methods take (their statistics grow as n², and the
/// iteration on coefficients as n² per step).
pub const MAX_MODELS: usize = 64;

#[cfg(test)]
pub mod testing {
    //! Runs a method through the real engine on in-memory arrays.
    use crate::kernel::{merge_arrays, pool};
    use crate::methods::build;
    use serde_json::Value;

    pub fn run(name: &str, params: Value, shape: &[usize], base: Option<&[f32]>, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        run_threads(2, name, params, shape, base, inputs)
    }

    pub fn run_threads(
        threads: usize,
        name: &str,
        params: Value,
        shape: &[usize],
        base: Option<&[f32]>,
        inputs: &[&[f32]],
    ) -> crate::Result<Vec<f32>> {
        let map = params.as_object().cloned().unwrap_or_default();
        let m = build(name, &map, inputs.len(), base.is_some())?;
        let p = pool(Some(threads)).unwrap();
        merge_arrays(m.as_ref(), "t", shape, 7, base, inputs, &p)
    }

    /// Deterministic pseudo-random values.
    pub fn rand(n: usize, key: u64) -> Vec<f32> {
        let k = crate::rng::stream_key(key, "test", 0);
        (0..n).map(|i| crate::rng::normal(k, i as u64) as f32).collect()
    }

    pub fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!((x as f64 - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_count_does_not_change_results() {
        use super::testing::{rand, run_threads};
        use serde_json::json;
        let (r, c) = (700, 1003); // many chunks, rows straddling chunk boundaries
        let n = r * c;
        let (base, a, b) = (rand(n, 1), rand(n, 2), rand(n, 3));
        let cases = [
            ("model_stock", json!({"filter_wise": true})),
            ("model_stock", json!({})),
            ("nuslerp", json!({"weight": [1.0, 2.0], "nuslerp_flatten": false, "nuslerp_row_wise": true})),
            ("multislerp", json!({"weight": [1.0, 2.0]})),
            ("karcher", json!({})),
            ("ramplus_tl", json!({})),
            ("arcee_fusion", json!({})),
        ];
        for (name, p) in cases {
            let xs: Vec<&[f32]> = if name == "arcee_fusion" { vec![&a] } else { vec![&a, &b] };
            let one = run_threads(1, name, p.clone(), &[r, c], Some(&base), &xs).unwrap();
            let three = run_threads(3, name, p, &[r, c], Some(&base), &xs).unwrap();
            assert_eq!(one, three, "{name}");
        }
    }

    #[test]
    fn swept_gram_is_pairwise_dot_bit_for_bit() {
        for n in 1..=5 {
            for len in [1usize, 3, 4, 7, 1001] {
                let xs: Vec<Vec<f32>> = (0..=n).map(|k| testing::rand(len, 40 + k as u64)).collect();
                let run: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                let idx: Vec<usize> = (1..=n).collect();
                for base in [None, Some(0)] {
                    let mut want = vec![0.5f64; n * (n + 1) / 2];
                    gram_pairwise(n, |i| run[idx[i]], base.map(|s| run[s]), &mut want);
                    // Every build: the AVX2 sweep and the plain one.
                    for got in crate::simd::each_build(|| {
                        let mut got = vec![0.5f64; n * (n + 1) / 2];
                        gram_run(&run, &idx, base, &mut got);
                        got
                    }) {
                        assert_eq!(
                            got.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                            "{n} vectors of {len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn runs_cover_each_vector_once() {
        let mut seen = vec![];
        for_each_run(Layout::Rows { len: 3 }, 2, 5, |r, s| seen.push((r, s)));
        assert_eq!(seen, vec![(0..1, 0), (1..4, 1), (4..5, 2)]);
        seen.clear();
        for_each_run(Layout::Cols { inner: 3 }, 2, 3, |r, s| seen.push((r, s)));
        assert_eq!(seen, vec![(0..1, 2), (1..2, 0), (2..3, 1)]);
    }

    #[test]
    fn layouts() {
        assert_eq!(Layout::last_dim(&[3, 4]), Layout::Rows { len: 4 });
        assert_eq!(Layout::last_dim(&[5]), Layout::Rows { len: 5 });
        assert_eq!(Layout::last_dim(&[]), Layout::Rows { len: 1 });
        assert_eq!(Layout::first_dim(&[3, 4, 2]), Layout::Cols { inner: 8 });
        let s: Vec<usize> = Layout::Rows { len: 3 }.segments(2).take(5).collect();
        assert_eq!(s, vec![0, 1, 1, 1, 2]);
        let s: Vec<usize> = Layout::Cols { inner: 3 }.segments(2).take(5).collect();
        assert_eq!(s, vec![2, 0, 1, 2, 0]);
        assert_eq!(tri(3, 0, 0), 0);
        assert_eq!(tri(3, 1, 2), 4);
        assert_eq!(tri(3, 2, 2), 5);
    }
}
