//! A rank window's boundary keys from a sample and one counting pass: the fast path of
//! [`Window::find`] (TIES, breadcrumbs) and of SCE's top-k ([`keys_and_top`]).
//!
//! A sample of the keys (short blocks spread over every chunk, a fixed set of positions)
//! brackets each boundary rank between two sample keys, a few standard errors of a
//! sample quantile either side. One pass over the tensor then computes each chunk's keys in
//! L1-sized tiles, counts the keys below each bracket and collects the few inside it. The
//! collected keys give the boundary keys and the per-chunk tie counts exactly, as the
//! keys-and-histogram path does, without storing every key or histogramming it. Where a
//! boundary rank falls outside its bracket (an unlucky sample) the caller falls back to that
//! exact path, so the window is the same either way.
use super::sparsify::{n_chunks, KeyFn, Window};
use crate::error::Result;
use crate::kernel::{with_scratch, TensorIo, CHUNK};
use rayon::prelude::*;

/// Elements of one sample block: a few cache lines of each input.
const BLOCK: usize = 128;
/// About this many sampled keys per tensor (fewer in small ones: 1 in 32 elements), so that
/// sorting out the sample stays small next to the pass over the tensor.
const SAMPLE: usize = 1 << 16;
/// Below this many elements no sample: every key is collected and the boundaries selected
/// among them (the histograms of the exact path would cost more to zero than to fill).
const SMALL: usize = 1 << 14;
/// Bracket half-width in standard errors of the sample quantile, plus a floor in sample ranks.
const SPREAD: f64 = 6.0;
const FLOOR: usize = 16;
/// Keys per tile of the counting pass (16 KiB: stays in L1 with its inputs' tiles).
const TILE: usize = 4096;

/// The windows `[lo, hi)` of several sets of keys, group `g`'s from `key_fn` on the chunks
/// of its `slots`, or `None` for those whose boundary ranks missed their brackets (the caller
/// then takes the exact path). One counting pass reads each input once for every group
/// (TIES's models share the base). Memory: the samples and the keys inside the brackets.
pub fn windows(io: &dyn TensorIo, groups: &[(&[usize], usize, usize)], key_fn: &KeyFn) -> Result<Vec<Option<Window>>> {
    let numel = io.numel();
    let gs = groups
        .iter()
        .map(|&(slots, lo, hi)| {
            let br = if numel < SMALL {
                FULL // every key inside: a selection among all of them
            } else {
                brackets(&sample(io, slots, key_fn)?, numel, [lo, hi - 1])
            };
            Ok(Group { slots, br })
        })
        .collect::<Result<Vec<_>>>()?;
    let tallies = count(io, &gs, key_fn, None, None)?;
    Ok(tallies.iter().zip(groups).zip(&gs).map(|((t, &(_, lo, hi)), g)| window_of(t, lo, hi, g.br)).collect())
}

/// `k = k_of(z)` where `z` counts the keys `key_fn` gives that equal `zero`, and the window
/// `[0, k)` of the keys when `k > 0` and the boundary ranks fell in their brackets (else the
/// caller selects among all the keys). The brackets come from a sample's estimate of `k`. For
/// a top-k whose size depends on the keys themselves (SCE's counts the non-zero variances), by
/// a pass that also stores every key into `keys` (index order) when given, for later use.
pub fn keys_and_top(
    io: &dyn TensorIo,
    slots: &[usize],
    key_fn: &KeyFn,
    keys: Option<&mut [u32]>,
    zero: u32,
    k_of: &dyn Fn(usize) -> usize,
) -> Result<(usize, Option<Window>)> {
    let numel = io.numel();
    let br = if numel < SMALL {
        FULL
    } else {
        let s = sample(io, slots, key_fn)?;
        let zeros = s.keys.iter().filter(|&&k| k == zero).count() * numel / s.keys.len();
        brackets(&s, numel, [0, k_of(zeros).clamp(1, numel) - 1])
    };
    let tallies = count(io, &[Group { slots, br }], key_fn, keys, Some(zero))?.remove(0);
    let zeros: u64 = tallies.iter().map(|t| t.zeros).sum();
    let k = k_of(zeros as usize).min(numel);
    Ok((k, if k == 0 { None } else { window_of(&tallies, 0, k, br) }))
}

/// The window `[lo, hi)` from the chunks' tallies, `None` where a boundary rank missed.
fn window_of(tallies: &[Tally], lo: usize, hi: usize, br: [(u32, u32); 2]) -> Option<Window> {
    let (a, less_a, eq_a) = boundary(tallies, 0, lo, br[0])?;
    let (b, less_b, eq_b) = boundary(tallies, 1, hi - 1, br[1])?;
    Some(Window { lo: lo as u64, hi: hi as u64, a, b, less_a, less_b, eq_a, eq_b })
}

/// The sample blocks of chunk `c` (`len` elements): `per` blocks, one in each of `per`
/// equal segments, at a pseudo-random offset within it (a fixed offset would sample the
/// same columns of every row where a row's length divides the segment).
fn blocks(c: usize, len: usize, per: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let seg = len / per;
    (0..per).filter(move |_| seg > 0).map(move |j| {
        let room = seg.saturating_sub(BLOCK);
        let at = j * seg + (crate::rng::mix64(((c as u64) << 32) | j as u64) as usize) % (room + 1);
        at..at + BLOCK.min(seg)
    })
}

/// Sampled keys in chunk and block order, and each block's length.
struct Sample {
    keys: Vec<u32>,
    lens: Vec<usize>,
}

fn sample(io: &dyn TensorIo, slots: &[usize], key_fn: &KeyFn) -> Result<Sample> {
    let numel = io.numel();
    let nc = n_chunks(numel);
    let per = (SAMPLE.min(numel / 32) / (nc * BLOCK)).clamp(1, CHUNK / BLOCK / 4);
    let parts: Vec<(Vec<u32>, Vec<usize>)> = (0..nc)
        .into_par_iter()
        .map(|c| {
            let start = c * CHUNK;
            let len = CHUNK.min(numel - start);
            let mut keys = vec![0u32; per * BLOCK];
            let mut lens = Vec::with_capacity(per);
            let mut n = 0;
            with_scratch(|sc| -> Result<()> {
                let (bufs, _, _) = sc.parts(slots.len(), BLOCK);
                for r in blocks(c, len, per) {
                    for (buf, &s) in bufs.iter_mut().zip(slots) {
                        io.read(s, start + r.start..start + r.end, &mut buf[..r.len()])?;
                    }
                    let views: Vec<&[f32]> = bufs.iter().map(|b| &b[..r.len()]).collect();
                    key_fn(&views, &mut keys[n..n + r.len()]);
                    n += r.len();
                    lens.push(r.len());
                }
                Ok(())
            })?;
            keys.truncate(n);
            Ok((keys, lens))
        })
        .collect::<Result<_>>()?;
    let (keys, lens): (Vec<Vec<u32>>, Vec<Vec<usize>>) = parts.into_iter().unzip();
    Ok(Sample { keys: keys.concat(), lens: lens.concat() })
}

impl Sample {
    /// Standard error of the sample's fraction of keys below `q`, from the spread of that
    /// fraction between blocks (a cluster sample: where a tensor's rows differ, neighbouring
    /// keys do too, and the blocks' spread says by how much), and at least a simple random
    /// sample's.
    fn error_below(&self, q: u32) -> f64 {
        let (m, nb) = (self.keys.len() as f64, self.lens.len() as f64);
        let mut at = 0;
        let counts: Vec<(f64, f64)> = self
            .lens
            .iter()
            .map(|&l| {
                let c = self.keys[at..at + l].iter().filter(|&&k| k < q).count();
                at += l;
                (c as f64, l as f64)
            })
            .collect();
        let p = counts.iter().map(|c| c.0).sum::<f64>() / m;
        let between = counts.iter().map(|&(c, l)| (c - p * l).powi(2)).sum::<f64>() * nb / (nb - 1.0).max(1.0) / (m * m);
        between.max(p * (1.0 - p) / m).sqrt()
    }
}

/// Selects the sorted positions `at` (ascending, within `s`) of `s`: afterwards `s[i]` is the
/// key a sort would put at each `i` in `at`. Halving the positions at each step costs about
/// `len · log(at.len())` instead of a pass over the rest per position.
fn select_at(s: &mut [u32], at: &[usize]) {
    if at.is_empty() {
        return;
    }
    let mid = at.len() / 2;
    let (left, _, right) = s.select_nth_unstable(at[mid]);
    select_at(left, &at[..mid]);
    let off = at[mid] + 1;
    let rest: Vec<usize> = at[mid + 1..].iter().map(|&i| i - off).collect();
    select_at(right, &rest);
}

/// Each rank's bracket `[low, high]` of keys: the sample keys a few standard errors of the
/// sample quantile below and above the one matching it (the extremes where that runs past
/// the sample).
fn brackets(s: &Sample, numel: usize, ranks: [usize; 2]) -> [(u32, u32); 2] {
    let m = s.keys.len();
    if let Some(&v) = s.keys.first().filter(|&&v| s.keys.iter().all(|&k| k == v)) {
        // Every sampled key the same (a tensor the fine-tune left unchanged): brackets of that
        // one key, counted, not collected. Should the tensor hold other keys after all, a rank
        // outside that key's run misses its bracket, and the caller takes the exact path.
        return [(v, v); 2];
    }
    let mut t = s.keys.clone();
    let mid = ranks.map(|r| ((r as f64 / numel as f64 * m as f64) as usize).min(m - 1));
    let mut want = mid.to_vec();
    want.dedup();
    select_at(&mut t, &want);
    let ends = mid.map(|i| {
        let half = (SPREAD * s.error_below(t[i]) * m as f64) as usize + FLOOR;
        (i.checked_sub(half), Some(i + half).filter(|&j| j < m))
    });
    let mut want: Vec<usize> = ends.iter().flat_map(|&(l, h)| [l, h]).flatten().collect();
    want.sort_unstable();
    want.dedup();
    select_at(&mut t, &want);
    ends.map(|(l, h)| (l.map_or(0, |i| t[i]), h.map_or(u32::MAX, |i| t[i])))
}

/// A chunk's counts against the two brackets: keys below each bracket, and the keys inside it;
/// in a pass given a `zero` key, also the keys equal to it.
#[derive(Default)]
struct Tally {
    below: [u64; 2],
    inside: [Vec<u32>; 2],
    /// The count of keys inside a bracket of one key (whose list stays empty: a boundary
    /// inside a run of ties, as zero deltas where a fine-tune left most weights unchanged,
    /// counted, not collected).
    equal: [u64; 2],
    zeros: u64,
}

/// Brackets that hold every key.
const FULL: [(u32, u32); 2] = [(0, u32::MAX); 2];

/// One set of keys in a counting pass: the input slots its keys come from, its brackets.
struct Group<'s> {
    slots: &'s [usize],
    br: [(u32, u32); 2],
}

/// The pass over the tensor: per group, every chunk's [`Tally`] in chunk order. Each input
/// is read once per chunk for all groups. The keys go to `store` (all of them, index order;
/// one group only) when given, else through an L1-sized tile; with `zero` (one group only),
/// each chunk counts that key's occurrences while its keys are in cache.
fn count(io: &dyn TensorIo, groups: &[Group], key_fn: &KeyFn, store: Option<&mut [u32]>, zero: Option<u32>) -> Result<Vec<Vec<Tally>>> {
    let numel = io.numel();
    let nc = n_chunks(numel);
    assert!((store.is_none() && zero.is_none()) || groups.len() == 1, "stored or zero-counted keys are one group's");
    let zeros = |keys: &[u32]| zero.map_or(0, |z| keys.iter().map(|&k| u64::from(k == z)).sum());
    let mut read: Vec<usize> = groups.iter().flat_map(|g| g.slots.iter().copied()).collect();
    read.sort_unstable();
    read.dedup();
    // Per group, where each of its slots is among the buffers read.
    let at: Vec<Vec<usize>> = groups.iter().map(|g| g.slots.iter().map(|s| read.binary_search(s).expect("slot read")).collect()).collect();
    let outs: Vec<Option<&mut [u32]>> = match store {
        Some(keys) => keys.chunks_mut(CHUNK).map(Some).collect(),
        None => (0..nc).map(|_| None).collect(),
    };
    let per_chunk: Vec<Vec<Tally>> = outs
        .into_par_iter()
        .enumerate()
        .map(|(c, mut out)| {
            let r = c * CHUNK..(c * CHUNK + CHUNK).min(numel);
            with_scratch(|sc| {
                let (bufs, _, _) = sc.parts(read.len(), r.len());
                for (buf, &s) in bufs.iter_mut().zip(&read) {
                    io.read(s, r.clone(), &mut buf[..r.len()])?;
                }
                let mut views: Vec<&[f32]> = Vec::with_capacity(read.len());
                let mut tile = [0u32; TILE];
                let mut ts = Vec::with_capacity(groups.len());
                for (g, at) in groups.iter().zip(&at) {
                    let mut t = Tally::default();
                    let br = [g.br[0].0, g.br[0].1, g.br[1].0, g.br[1].1];
                    if let Some(keys) = out.take() {
                        // The whole chunk's keys at once (a key function may set up per call).
                        key_fn(slices(&mut views, bufs, at, 0..r.len()), keys);
                        keys.chunks(TILE).for_each(|k| tally(k, br, &mut t));
                        t.zeros = zeros(keys);
                    } else {
                        for s in (0..r.len()).step_by(TILE) {
                            let n = TILE.min(r.len() - s);
                            key_fn(slices(&mut views, bufs, at, s..s + n), &mut tile[..n]);
                            tally(&tile[..n], br, &mut t);
                            t.zeros += zeros(&tile[..n]);
                        }
                    }
                    // The lists grew a tile's room at a time: give back what they did not use.
                    t.inside.iter_mut().for_each(Vec::shrink_to_fit);
                    ts.push(t);
                }
                Ok(ts)
            })
        })
        .collect::<Result<_>>()?;
    let mut by_group: Vec<Vec<Tally>> = groups.iter().map(|_| Vec::with_capacity(nc)).collect();
    for ts in per_chunk {
        by_group.iter_mut().zip(ts).for_each(|(g, t)| g.push(t));
    }
    Ok(by_group)
}

/// `span` of the buffers `at` of `bufs`, in `views` (reused from call to call).
fn slices<'v, 'b>(views: &'v mut Vec<&'b [f32]>, bufs: &'b [Vec<f32>], at: &[usize], span: std::ops::Range<usize>) -> &'v [&'b [f32]] {
    views.clear();
    views.extend(at.iter().map(|&b| &bufs[b][span.clone()]));
    views
}

/// Adds to `t.below[i]` the keys under bracket `i` (`[br[2i], br[2i + 1]]`) and pushes those
/// inside it to `t.inside[i]`, or counts them in `t.equal[i]` where the bracket is of one key;
/// at most [`TILE`] keys. Inside is one unsigned comparison, `k − low ≤ high − low`.
fn tally(keys: &[u32], br: [u32; 4], t: &mut Tally) {
    assert!(keys.len() <= TILE);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::wide_allowed() && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: AVX2 and POPCNT were just detected.
        return unsafe { x86::tally(keys, br, t) };
    }
    tally_scalar(keys, br, t);
}

fn tally_scalar(keys: &[u32], br: [u32; 4], t: &mut Tally) {
    for &k in keys {
        for i in 0..2 {
            let (low, high) = (br[2 * i], br[2 * i + 1]);
            t.below[i] += u64::from(k < low);
            if k.wrapping_sub(low) <= high.wrapping_sub(low) {
                if low == high {
                    t.equal[i] += 1;
                } else {
                    t.inside[i].push(k);
                }
            }
        }
    }
}

/// [`tally`] eight keys at a time, without a branch per key: the keys inside a bracket are
/// moved to the front of a vector by a permutation looked up from their comparison mask and
/// stored whole, the next store starting just past them (a branch on each key, inside one
/// time in twenty or so, mispredicted often; the auto-vectorized masks cost more than this).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// For each 8-bit mask, the positions of its set bits, lowest first (then zeros).
    static FRONT: [[u32; 8]; 256] = {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut j, mut n) = (0, 0);
            while j < 8 {
                if m >> j & 1 == 1 {
                    t[m][n] = j as u32;
                    n += 1;
                }
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// # Safety
    /// AVX2 and POPCNT must be available.
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn tally(keys: &[u32], br: [u32; 4], t: &mut super::Tally) {
        // Unsigned order as signed order with the top bit flipped.
        let flip = _mm256_set1_epi32(i32::MIN);
        let (l0, l1) = (_mm256_set1_epi32(br[0] as i32), _mm256_set1_epi32(br[2] as i32));
        let (lx0, lx1) = (_mm256_xor_si256(l0, flip), _mm256_xor_si256(l1, flip));
        let wx = |lo: u32, hi: u32| _mm256_set1_epi32((hi.wrapping_sub(lo) ^ 0x8000_0000) as i32);
        let (wx0, wx1) = (wx(br[0], br[1]), wx(br[2], br[3]));
        // Minus the counts below, per lane (at most `TILE / 8` each).
        let (mut u0, mut u1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        // The keys inside go straight to the lists' spare room: whole vectors stored, each
        // next one from just past the kept lanes; those of a bracket of one key are only counted.
        let single = [br[0] == br[1], br[2] == br[3]];
        let [v0, v1] = &mut t.inside;
        for (v, s) in [(&mut *v0, single[0]), (&mut *v1, single[1])] {
            if !s {
                v.reserve(keys.len() + 8);
            }
        }
        let (p0, p1) = (v0.as_mut_ptr().add(v0.len()), v1.as_mut_ptr().add(v1.len()));
        let (mut n0, mut n1) = (0usize, 0usize);
        let kept = |k: __m256i, l: __m256i, wx: __m256i| {
            let d = _mm256_xor_si256(_mm256_sub_epi32(k, l), flip);
            (!_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(d, wx))) & 0xFF) as usize
        };
        let front = |k: __m256i, m: usize| _mm256_permutevar8x32_epi32(k, _mm256_loadu_si256(FRONT[m].as_ptr().cast()));
        let mut octets = keys.chunks_exact(8);
        for o in &mut octets {
            let k = _mm256_loadu_si256(o.as_ptr().cast());
            let kx = _mm256_xor_si256(k, flip);
            u0 = _mm256_add_epi32(u0, _mm256_cmpgt_epi32(lx0, kx));
            u1 = _mm256_add_epi32(u1, _mm256_cmpgt_epi32(lx1, kx));
            let (m0, m1) = (kept(k, l0, wx0), kept(k, l1, wx1));
            // SAFETY: `n0`, `n1` count keys of earlier octets, so the 8 lanes stored end within
            // the `keys.len() + 8` reserved.
            if !single[0] {
                _mm256_storeu_si256(p0.add(n0).cast(), front(k, m0));
            }
            if !single[1] {
                _mm256_storeu_si256(p1.add(n1).cast(), front(k, m1));
            }
            n0 += m0.count_ones() as usize;
            n1 += m1.count_ones() as usize;
        }
        for (i, (v, n)) in [(v0, n0), (v1, n1)].into_iter().enumerate() {
            if single[i] {
                t.equal[i] += n as u64;
            } else {
                // SAFETY: the first `n` slots past the list's length were written above.
                v.set_len(v.len() + n);
            }
        }
        for (b, u) in t.below.iter_mut().zip([u0, u1]) {
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), u);
            *b += lanes.iter().map(|&c| u64::from(c.unsigned_abs())).sum::<u64>();
        }
        super::tally_scalar(octets.remainder(), br, t);
    }
}

/// Boundary `i`'s key (the one at `rank`), the count of keys below it, and per chunk the
/// count of keys equal to it in the chunks before (one more entry: all of them); `None`
/// where `rank` is not among the keys inside the bracket `br`.
fn boundary(tallies: &[Tally], i: usize, rank: usize, br: (u32, u32)) -> Option<(u32, u64, Vec<u64>)> {
    let below: u64 = tallies.iter().map(|t| t.below[i]).sum();
    let r = (rank as u64).checked_sub(below)? as usize;
    // A bracket of one key: the keys inside were counted, not kept.
    let single = br.0 == br.1;
    let (key, less) = if single {
        if r as u64 >= tallies.iter().map(|t| t.equal[i]).sum::<u64>() {
            return None;
        }
        (br.0, below)
    } else {
        let mut inside: Vec<u32> = tallies.iter().flat_map(|t| t.inside[i].iter().copied()).collect();
        if r >= inside.len() {
            return None;
        }
        let key = *inside.select_nth_unstable(r).1;
        (key, below + inside.iter().filter(|&&k| k < key).count() as u64)
    };
    let mut seen = 0u64;
    let mut eq: Vec<u64> = tallies
        .iter()
        .map(|t| {
            let before = seen;
            seen += if single { t.equal[i] } else { t.inside[i].iter().filter(|&&k| k == key).count() as u64 };
            before
        })
        .collect();
    eq.push(seen);
    Some((key, less, eq))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::Slices;
    use crate::methods::sparsified::sparsify::{keys_and_hist, mag_key, mag_key_desc};

    fn window(io: &dyn TensorIo, slots: &[usize], lo: usize, hi: usize, key_fn: &KeyFn) -> Result<Option<Window>> {
        Ok(windows(io, &[(slots, lo, hi)], key_fn)?.remove(0))
    }

    fn keys_of(desc: bool) -> impl Fn(&[&[f32]], &mut [u32]) + Sync {
        let key = if desc { mag_key_desc } else { mag_key };
        move |v: &[&[f32]], out: &mut [u32]| v[0].iter().zip(out).for_each(|(&x, o)| *o = key(x))
    }

    /// The exact path's window: every key stored and histogrammed.
    fn exact(vals: &[f32], lo: usize, hi: usize, desc: bool) -> Window {
        let (keys, hist) = keys_and_hist(&Slices::new(None, &[vals]), &[0], &keys_of(desc)).unwrap();
        Window::from_keys(&keys, &hist, lo, hi)
    }

    fn spans(n: usize) -> Vec<(usize, usize)> {
        vec![(0, n / 2), (0, 1), (n / 10, n - n / 100), (n - 1, n), (0, n), (n / 3, n / 3 + 5)]
    }

    /// The sampled path finds the exact path's window: ties on the boundaries (bf16-like
    /// deltas, few magnitudes), tensors below `SMALL`, in one chunk and over ragged chunks,
    /// and a tensor whose rows differ in scale, where neighbouring keys are alike and the
    /// brackets must widen by the blocks' spread (an error taken as a simple random sample's
    /// misses there).
    #[test]
    fn sampled_window_is_the_exact_one() {
        let noise = |n: usize, seed: u64| -> Vec<f32> { (0..n).map(|i| crate::rng::normal(seed, i as u64) as f32).collect() };
        let rows = |n: usize| -> Vec<f32> {
            // Rows of 700, every other band of 4 rows 30x larger: about as long as the spacing of
            // the sample blocks, so that each block sees one scale or the other.
            noise(n, 5).iter().enumerate().map(|(i, &x)| if (i / 700 / 4) % 2 == 0 { 30.0 * x } else { x }).collect()
        };
        let cases: Vec<(&str, Vec<f32>)> = vec![
            ("ties", noise(3 * CHUNK + 999, 1).iter().map(|&x| (x * 8.0).round() / 64.0).collect()),
            ("small", noise(SMALL - 3, 2)),
            ("one chunk", noise(CHUNK - 100, 3)),
            ("ragged", noise(9 * CHUNK + 12345, 4)),
            ("rows", rows(40 * CHUNK)),
            // Mostly zeros (a fine-tune that left most weights unchanged): boundaries inside the
            // run of zero keys, whose brackets hold that one key.
            ("zeros", noise(5 * CHUNK + 77, 6).iter().enumerate().map(|(i, &x)| if crate::rng::mix64(i as u64) % 5 < 3 { 0.0 } else { x }).collect()),
            // Nothing but zeros (a tensor the fine-tune left unchanged).
            ("frozen", vec![0.0; 3 * CHUNK + 5]),
        ];
        for (name, vals) in &cases {
            let n = vals.len();
            for (lo, hi) in spans(n) {
                for desc in [false, true] {
                    let got = window(&Slices::new(None, &[vals]), &[0], lo, hi, &keys_of(desc)).unwrap();
                    assert_eq!(got, Some(exact(vals, lo, hi, desc)), "{name}: [{lo}, {hi}) desc {desc}");
                }
            }
        }
    }

    /// Several groups in one pass (three models' deltas from one base, each its own window,
    /// one of them twice): each group's window is the one found for it alone, exactly.
    #[test]
    fn groups_in_one_pass_are_windows_of_their_own() {
        let n = 4 * CHUNK + 77;
        let base: Vec<f32> = (0..n).map(|i| crate::rng::normal(11, i as u64) as f32).collect();
        let models: Vec<Vec<f32>> = (0..3)
            .map(|m| {
                base.iter()
                    .enumerate()
                    .map(|(i, &b)| b + (crate::rng::normal(12 + m, i as u64) as f32 * (m + 1) as f32 * 8.0).round() / 64.0)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
        let io = Slices::new(Some(&base), &refs);
        let kf = |v: &[&[f32]], out: &mut [u32]| v[1].iter().zip(v[0]).zip(out).for_each(|((&x, &b), o)| *o = mag_key_desc(x - b));
        let slots = [[0, 1], [0, 2], [0, 3], [0, 2]];
        let spans = [(0, n / 3), (0, 5), (n / 2, n - 9), (7, n)];
        let groups: Vec<(&[usize], usize, usize)> = slots.iter().zip(spans).map(|(s, (lo, hi))| (&s[..], lo, hi)).collect();
        let got = windows(&io, &groups, &kf).unwrap();
        for ((s, (lo, hi)), w) in slots.iter().zip(spans).zip(got) {
            let d: Vec<f32> = models[s[1] - 1].iter().zip(&base).map(|(&x, &b)| x - b).collect();
            assert_eq!(w, Some(exact(&d, lo, hi, true)), "model {} [{lo}, {hi})", s[1] - 1);
        }
    }

    /// SCE's top-k, storing the keys or not: the stored keys are the key function's, and either
    /// way the same `k` (the keys equal to `zero`, here those of a zero value, counted out) and
    /// the exact window, with zeros both scattered and filling whole chunks; and no window when
    /// `k` is 0.
    #[test]
    fn top_k_counts_zeros_out_and_stores_the_keys() {
        let n = 5 * CHUNK + 321;
        let vals: Vec<f32> = (0..n)
            .map(|i| if i % 7 == 0 || (CHUNK..2 * CHUNK).contains(&i) { 0.0 } else { (crate::rng::normal(8, i as u64) as f32 * 16.0).round() })
            .collect();
        let io = Slices::new(None, &[&vals]);
        let (want_keys, hist) = keys_and_hist(&io, &[0], &keys_of(true)).unwrap();
        let zeros = want_keys.iter().filter(|&&k| k == u32::MAX).count();
        for topk in [0.3f32, 1.0, 1e-9] {
            let k_of = |z: usize| ((n - z) as f32 * topk) as usize;
            let mut keys = vec![0u32; n];
            let stored = keys_and_top(&io, &[0], &keys_of(true), Some(&mut keys), u32::MAX, &k_of).unwrap();
            assert_eq!(keys, *want_keys);
            for (k, w) in [stored, keys_and_top(&io, &[0], &keys_of(true), None, u32::MAX, &k_of).unwrap()] {
                assert_eq!(k, k_of(zeros));
                if k == 0 {
                    assert_eq!(w, None);
                } else {
                    assert_eq!(w, Some(Window::from_keys(&want_keys, &hist, 0, k)), "topk {topk}");
                }
            }
        }
    }

    /// A tensor of one key but for a few the sample misses: the brackets of that one key miss
    /// the ranks outside its run, and `Window::find` then takes the exact path.
    #[test]
    fn a_sample_of_one_key_misses_the_keys_it_did_not_see() {
        let n = 4 * CHUNK;
        let mut vals = vec![0.0f32; n];
        for (i, v) in [(17, 3.0f32), (CHUNK + 5, -2.0), (3 * CHUNK + 9, 1.0)] {
            vals[i] = v;
        }
        let io = Slices::new(None, &[&vals]);
        for desc in [false, true] {
            // The top three (or bottom three) magnitudes are the keys the sample did not see.
            let (lo, hi) = if desc { (0, n / 2) } else { (n / 2, n) };
            assert_eq!(window(&io, &[0], lo, hi, &keys_of(desc)).unwrap(), None, "desc {desc}");
            assert_eq!(Window::find(&io, &[0], lo, hi, &keys_of(desc)).unwrap(), exact(&vals, lo, hi, desc), "desc {desc}");
            // A window inside the run of zeros is found from the sample.
            let (lo, hi) = if desc { (10, n / 2) } else { (n / 2, n - 10) };
            assert_eq!(window(&io, &[0], lo, hi, &keys_of(desc)).unwrap(), Some(exact(&vals, lo, hi, desc)), "desc {desc}");
        }
    }

    /// A sample that misrepresents the tensor (the sampled positions hold the only large
    /// values) misses its bracket; `Window::find` then takes the exact path.
    #[test]
    fn a_missed_bracket_falls_back_to_the_exact_path() {
        let n = 6 * CHUNK;
        let per = (SAMPLE.min(n / 32) / (6 * BLOCK)).clamp(1, CHUNK / BLOCK / 4);
        let mut vals: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
        for c in 0..6 {
            for r in blocks(c, CHUNK, per) {
                vals[c * CHUNK + r.start..c * CHUNK + r.end].iter_mut().for_each(|v| *v += 100.0);
            }
        }
        let (lo, hi) = (0, n / 2);
        let io = Slices::new(None, &[&vals]);
        assert_eq!(window(&io, &[0], lo, hi, &keys_of(true)).unwrap(), None);
        assert_eq!(Window::find(&io, &[0], lo, hi, &keys_of(true)).unwrap(), exact(&vals, lo, hi, true));
    }

    /// Both builds of `tally` against a plain count, for brackets at the extremes, empty
    /// and full ones, of one key (counted, not collected), and lengths that leave a remainder.
    #[test]
    fn tally_counts_and_collects() {
        let keys: Vec<u32> = (0..TILE as u64).map(|i| (crate::rng::mix64(i) as u32) >> (i % 3 * 8)).collect();
        let brackets = [[0, u32::MAX, 5, 5], [0, 0, u32::MAX, u32::MAX], [1 << 20, 1 << 28, 1 << 10, 1 << 30], [7, 3 << 29, 0, 1]];
        for br in brackets {
            for len in [0, 5, 8, 1001, TILE] {
                let ks = &keys[..len];
                let want: Vec<(u64, Vec<u32>)> = (0..2)
                    .map(|i| {
                        let (l, h) = (br[2 * i], br[2 * i + 1]);
                        (ks.iter().filter(|&&k| k < l).count() as u64, ks.iter().copied().filter(|&k| k >= l && k <= h).collect())
                    })
                    .collect();
                for wide in [true, false] {
                    crate::simd::baseline_only(!wide);
                    let mut t = Tally { below: [3, 4], inside: [vec![9], vec![]], equal: [5, 6], zeros: 0 };
                    tally(ks, br, &mut t);
                    crate::simd::baseline_only(false);
                    assert_eq!(t.below, [3 + want[0].0, 4 + want[1].0], "{br:?} {len} wide {wide}");
                    // A bracket of one key counts its keys and leaves its list as it was.
                    for (i, start) in [(0, vec![9]), (1, vec![])] {
                        let (list, count) =
                            if br[2 * i] == br[2 * i + 1] { (start, want[i].1.len() as u64) } else { ([start, want[i].1.clone()].concat(), 0) };
                        assert_eq!(t.inside[i], list, "{br:?} {len} wide {wide} bracket {i}");
                        assert_eq!(t.equal[i], [5, 6][i] + count, "{br:?} {len} wide {wide} bracket {i}");
                    }
                }
            }
        }
    }
}
