//! The kernel contract, shared by the executor (`engine.rs`) and the methods: what a kernel
//! sees (`Ctx`, `TensorIo`), what it implements (`Method`), and how one tensor is streamed
//! through it in fixed chunks (`CHUNK`, `stream_stats`, `merge_tensor`), from files or from
//! memory (`Slices`, `merge_arrays`). Depends on neither `engine` nor `methods`.
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per chunk: 256 KiB of f32 per input, small enough to stay in cache.
pub const CHUNK: usize = 1 << 16;

/// What a kernel knows about the piece of tensor it is given.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// Output tensor name (also keys the random streams).
    pub tensor: &'a str,
    pub shape: &'a [usize],
    /// Element offset of this piece in the flattened tensor (0 for whole tensors).
    pub offset: usize,
    pub seed: u64,
}

pub trait Method: Send + Sync {
    /// True when each output element depends only on the inputs at that element (plus the
    /// whole-tensor statistics from `accumulate`): the engine then streams the tensor in
    /// fixed-size chunks in parallel. False: `apply` always receives whole tensors.
    fn elementwise(&self) -> bool {
        true
    }

    /// How many trailing inputs are auxiliary statistics with shapes of their own (RegMean's
    /// `[in, in]` Gram matrices beside `[out, in]` weights): they are exempt from the
    /// same-shape check, checked by `check_aux` instead, and read whole (whole-tensor
    /// methods only; `apply` then gets slices of their own lengths).
    fn aux_inputs(&self) -> usize {
        0
    }

    /// Checks the shapes of the auxiliary inputs against the output shape before any data is
    /// read: `Err((k, why))` names the offending auxiliary input `k` (0-based among them).
    fn check_aux(&self, _shape: &[usize], _aux: &[&[usize]]) -> std::result::Result<(), (usize, String)> {
        Ok(())
    }

    /// Number of whole-tensor f64 statistics (dot products, norms...) `apply` needs.
    fn n_stats(&self) -> usize {
        0
    }

    /// The statistics' starting values (zeros; a min/max statistic starts at ±inf).
    fn init_stats(&self) -> Vec<f64> {
        vec![0.0; self.n_stats()]
    }

    /// Adds one chunk's contribution to `stats` (which starts from `init_stats`).
    fn accumulate(&self, _base: Option<&[f32]>, _inputs: &[&[f32]], _stats: &mut [f64]) {}

    /// `accumulate` over two chunks (`a`, then `b` no longer than `a`), each into its own
    /// statistics. Kernels whose sums are chains of dependent additions override it to run
    /// both chunks' chains in one loop, which the CPU overlaps; each chain still adds in
    /// element order, so the statistics are the same.
    fn accumulate_two(&self, a: (Option<&[f32]>, &[&[f32]]), b: (Option<&[f32]>, &[&[f32]]), sa: &mut [f64], sb: &mut [f64]) {
        self.accumulate(a.0, a.1, sa);
        self.accumulate(b.0, b.1, sb);
    }

    /// Folds one chunk's statistics into the total (sum by default). The engine folds
    /// chunks in a fixed order, so results never depend on the thread count.
    fn combine(&self, total: &mut [f64], part: &[f64]) {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }

    /// Whole-tensor preparation before any `apply`, with random access to every input
    /// (e.g. a top-k threshold per model, found with one scratch buffer). Its result is the
    /// `stats` given to `apply`. The default streams chunks through `accumulate`/`combine`.
    fn prepare(&self, _ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        stream_stats(self, io)
    }

    /// A warning about this tensor's statistics for the user (e.g. a degenerate case the
    /// kernel resolved by a fallback); the engine reports it with the tensor name.
    fn note(&self, _stats: &[f64]) -> Option<String> {
        None
    }

    /// `Some(k)` when the output is input slot `k` unchanged (passthrough without a scale):
    /// the engine then copies the stored bytes where the input's dtype is the output's, the
    /// same bytes as widening and rounding back, without either.
    fn copies_input(&self) -> Option<usize> {
        None
    }

    /// Computes `out` (same length as every input slice).
    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()>;

    /// Whole-tensor methods: computes `out` from the inputs in `io`. The default reads every
    /// input whole ([`apply_read_whole`]); a kernel that can work from an input's factors
    /// ([`TensorIo::factors`]) reads its inputs itself.
    fn apply_whole(&self, ctx: &Ctx, io: &dyn TensorIo, stats: &[f64], out: &mut [f32]) -> Result<()> {
        apply_read_whole(self, ctx, io, stats, out)
    }
}

/// Reads every input of `io` whole, side by side (a source made on the fly, a rotated donor
/// tensor, costs a matrix product each; each slot's value does not depend on the order),
/// and runs `method.apply` on them.
pub fn apply_read_whole<M: Method + ?Sized>(method: &M, ctx: &Ctx, io: &dyn TensorIo, stats: &[f64], out: &mut [f32]) -> Result<()> {
    let mut bufs = vec![Vec::new(); io.slots()];
    bufs.par_iter_mut().enumerate().with_max_len(1).try_for_each(|(slot, b)| {
        let len = io.slot_numel(slot);
        b.resize(len, 0.0);
        io.read(slot, 0..len, b)
    })?;
    let mut it = bufs.iter().map(|b| b.as_slice());
    let base = if io.has_base() { it.next() } else { None };
    let inputs: Vec<&[f32]> = it.collect();
    method.apply(ctx, base, &inputs, stats, out)
}

/// Random access to the inputs of the tensor being merged (slot 0 is the base if any).
pub trait TensorIo: Sync {
    fn numel(&self) -> usize;
    /// Elements of input `slot` (differs from `numel` only for a method's auxiliary inputs).
    fn slot_numel(&self, _slot: usize) -> usize {
        self.numel()
    }
    fn slots(&self) -> usize;
    fn has_base(&self) -> bool;
    /// Widens elements `range` of input `slot` into `dst`.
    fn read(&self, slot: usize, range: std::ops::Range<usize>, dst: &mut [f32]) -> Result<()>;
    /// `read`, and the index (in `dst`) of the first ±inf/NaN read. Sources that widen
    /// stored bytes test them while widening (one pass instead of two).
    fn read_finite(&self, slot: usize, range: std::ops::Range<usize>, dst: &mut [f32]) -> Result<Option<usize>> {
        self.read(slot, range, dst)?;
        Ok(first_non_finite(dst))
    }
    /// Input `slot` as the factors it is made of, when it is made on the fly as a product
    /// (a donor tensor rotated into an anchor's basis); `None` when it is stored values.
    fn factors(&self, _slot: usize) -> Result<Option<crate::linalg::AffineMap>> {
        Ok(None)
    }
    /// Names input `slot` in messages ("base", "model #1", or the file it comes from).
    fn describe(&self, slot: usize) -> String {
        match (self.has_base(), slot) {
            (true, 0) => "the base".into(),
            (true, s) => format!("model #{}", s - 1),
            (false, s) => format!("model #{s}"),
        }
    }
}

/// Every read of every method goes through this: a NaN or ±inf input is an error naming
/// the tensor, the model and the element, whatever the kernel would have done with it
/// (averaged it into NaN, dropped it as an outlier, or let it poison an iteration).
struct FiniteInputs<'a> {
    io: &'a dyn TensorIo,
    tensor: &'a str,
}

impl TensorIo for FiniteInputs<'_> {
    fn numel(&self) -> usize {
        self.io.numel()
    }
    fn slot_numel(&self, slot: usize) -> usize {
        self.io.slot_numel(slot)
    }
    fn slots(&self) -> usize {
        self.io.slots()
    }
    fn has_base(&self) -> bool {
        self.io.has_base()
    }
    fn describe(&self, slot: usize) -> String {
        self.io.describe(slot)
    }
    fn factors(&self, slot: usize) -> Result<Option<crate::linalg::AffineMap>> {
        match self.io.factors(slot)? {
            Some(f) if !f.is_finite() => {
                Err(Error::numerical(self.tensor, format!("input {} has a NaN or infinite factor: inputs must be finite", self.io.describe(slot))))
            }
            f => Ok(f),
        }
    }
    fn read(&self, slot: usize, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        match self.io.read_finite(slot, range.clone(), dst)? {
            None => Ok(()),
            Some(i) => Err(Error::numerical(
                self.tensor,
                format!("input {} is {} at element {}: inputs must be finite", self.io.describe(slot), dst[i], range.start + i),
            )),
        }
    }
}

pub use crate::dtype::first_non_finite;

/// In-memory inputs (the array API, and tests of kernels that use `TensorIo`).
pub struct Slices<'s> {
    numel: usize,
    has_base: bool,
    data: Vec<&'s [f32]>,
}

impl<'s> Slices<'s> {
    /// Slot 0 is `base` when given, then `inputs`; all must have the same length.
    pub fn new(base: Option<&'s [f32]>, inputs: &[&'s [f32]]) -> Self {
        let data: Vec<&[f32]> = base.into_iter().chain(inputs.iter().copied()).collect();
        Slices { numel: data.first().map_or(0, |d| d.len()), has_base: base.is_some(), data }
    }
}

impl TensorIo for Slices<'_> {
    fn numel(&self) -> usize {
        self.numel
    }
    fn slot_numel(&self, slot: usize) -> usize {
        self.data[slot].len()
    }
    fn slots(&self) -> usize {
        self.data.len()
    }
    fn has_base(&self) -> bool {
        self.has_base
    }
    fn read(&self, slot: usize, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(&self.data[slot][range]);
        Ok(())
    }
}

fn split(bufs: &[Vec<f32>], len: usize, has_base: bool) -> (Option<&[f32]>, Vec<&[f32]>) {
    let mut it = bufs.iter().map(|b| &b[..len]);
    let base = if has_base { it.next() } else { None };
    (base, it.collect())
}

/// Reads elements `range` of every slot into `bufs` (one per slot, long enough).
fn fill(io: &dyn TensorIo, range: Range<usize>, bufs: &mut [Vec<f32>]) -> Result<()> {
    let len = range.len();
    for (slot, b) in bufs.iter_mut().enumerate() {
        io.read(slot, range.clone(), &mut b[..len])?;
    }
    Ok(())
}

/// A worker's chunk buffers: one per input slot, the output, its bytes. They only grow.
#[derive(Default)]
pub struct Scratch {
    bufs: Vec<Vec<f32>>,
    out: Vec<f32>,
    bytes: Vec<u8>,
}

impl Scratch {
    /// `slots` input buffers of at least `len` elements each, and an output buffer of
    /// exactly `len` elements (contents unspecified), and the bytes buffer.
    pub fn parts(&mut self, slots: usize, len: usize) -> (&mut [Vec<f32>], &mut [f32], &mut Vec<u8>) {
        if self.bufs.len() < slots {
            self.bufs.resize_with(slots, Vec::new);
        }
        for b in &mut self.bufs[..slots] {
            if b.len() < len {
                b.resize(len, 0.0);
            }
        }
        if self.out.len() < len {
            self.out.resize(len, 0.0);
        }
        (&mut self.bufs[..slots], &mut self.out[..len], &mut self.bytes)
    }
}

thread_local! {
    static SPARE: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
    static WORK: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's f32 work buffer of `len` elements (contents unspecified),
/// kept between calls: a kernel's per-chunk temporaries without an allocation per chunk.
pub fn with_work<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut w = WORK.with(|c| c.take());
    if w.len() < len {
        w.resize(len, 0.0);
    }
    let r = f(&mut w[..len]);
    WORK.with(|c| c.set(w));
    r
}

/// Runs `f` with this thread's scratch buffers, kept from chunk to chunk and tensor to tensor:
/// fresh buffers per rayon split were zeroed and faulted in each time (~8% of the CPU time of
/// a 1.1B model_stock merge). The buffers are taken out while in use, so a job the thread
/// picks up while waiting inside `f` gets buffers of its own.
pub fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut s = SPARE.with(|c| c.take()).unwrap_or_default();
    let r = f(&mut s);
    SPARE.with(|c| c.set(Some(s)));
    r
}

fn check_finite(tensor: &str, out: &[f32], offset: usize) -> Result<()> {
    match first_non_finite(out) {
        None => Ok(()),
        Some(i) => Err(Error::numerical(
            tensor,
            format!("the merge produced {} at element {} (are the inputs finite? is a weight or parameter extreme?)", out[i], offset + i),
        )),
    }
}

fn chunk_starts(numel: usize) -> Vec<usize> {
    (0..numel).step_by(CHUNK).collect()
}

/// Runs `f(chunk index, element range, slot slices)` on every engine chunk in parallel
/// (reading only `slots`, in that order) and returns the results in chunk order.
pub fn par_chunks<T, F>(io: &dyn TensorIo, slots: &[usize], f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize, Range<usize>, &[&[f32]]) -> Result<T> + Sync,
{
    par_chunk_groups(io, slots, 1, |v| Ok(vec![f(v[0].0, v[0].1.clone(), &v[0].2)?]))
}

/// A chunk as [`par_chunk_groups`] hands it over: its index, element range and slot slices.
pub type ChunkView<'a> = (usize, Range<usize>, Vec<&'a [f32]>);

/// As [`par_chunks`], `per` consecutive chunks per call (fewer for the last group): `f` gets
/// each chunk's index, element range and slot slices, and returns one result per chunk; the
/// results come back in chunk order. For passes whose sums run in element order per chunk:
/// several chunks' chains of additions can advance in one loop.
pub fn par_chunk_groups<T, F>(io: &dyn TensorIo, slots: &[usize], per: usize, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&[ChunkView]) -> Result<Vec<T>> + Sync,
{
    let numel = io.numel();
    let n = numel.div_ceil(CHUNK);
    let groups: Vec<Vec<T>> = (0..n.div_ceil(per))
        .into_par_iter()
        .map(|g| {
            with_scratch(|sc| {
                let chunks: Vec<(usize, Range<usize>)> =
                    (g * per..((g + 1) * per).min(n)).map(|c| (c, c * CHUNK..((c + 1) * CHUNK).min(numel))).collect();
                let len = chunks.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
                let (bufs, _, _) = sc.parts(chunks.len() * slots.len(), len);
                for ((_, r), bufs) in chunks.iter().zip(bufs.chunks_mut(slots.len())) {
                    for (b, &s) in bufs.iter_mut().zip(slots) {
                        io.read(s, r.clone(), &mut b[..r.len()])?;
                    }
                }
                let views: Vec<ChunkView> = chunks
                    .into_iter()
                    .zip(bufs.chunks(slots.len()))
                    .map(|((c, r), bufs)| {
                        let v = bufs.iter().map(|b| &b[..r.len()]).collect();
                        (c, r, v)
                    })
                    .collect();
                f(&views)
            })
        })
        .collect::<Result<_>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// The default `Method::prepare`: streams fixed chunks through `accumulate` in parallel and
/// folds the parts with `combine` in chunk order.
pub fn stream_stats<M: Method + ?Sized>(method: &M, io: &dyn TensorIo) -> Result<Vec<f64>> {
    if method.n_stats() == 0 {
        return Ok(vec![]);
    }
    let numel = io.numel();
    let (slots, has_base) = (io.slots(), io.has_base());
    // Chunks two by two (`accumulate_two`), each with statistics of its own.
    let pairs: Vec<Vec<Vec<f64>>> = chunk_starts(numel)
        .par_chunks(2)
        .map(|pair| {
            with_scratch(|sc| {
                let (bufs, _, _) = sc.parts(2 * slots, CHUNK);
                let (ba, bb) = bufs.split_at_mut(slots);
                let ra = pair[0]..(pair[0] + CHUNK).min(numel);
                fill(io, ra.clone(), ba)?;
                let (base_a, in_a) = split(ba, ra.len(), has_base);
                let mut pa = method.init_stats();
                let Some(&sb) = pair.get(1) else {
                    method.accumulate(base_a, &in_a, &mut pa);
                    return Ok(vec![pa]);
                };
                let rb = sb..(sb + CHUNK).min(numel);
                fill(io, rb.clone(), bb)?;
                let (base_b, in_b) = split(bb, rb.len(), has_base);
                let mut pb = method.init_stats();
                method.accumulate_two((base_a, &in_a), (base_b, &in_b), &mut pa, &mut pb);
                Ok(vec![pa, pb])
            })
        })
        .collect::<Result<_>>()?;
    Ok(pairs.iter().flatten().fold(method.init_stats(), |mut acc, p| {
        method.combine(&mut acc, p);
        acc
    }))
}

/// Merges one tensor, handing each finished piece (element offset, values, a scratch byte
/// buffer) to `sink`. Pieces are disjoint and cover the tensor. Returns the kernel's note.
pub(crate) fn merge_tensor<S>(method: &dyn Method, ctx: Ctx, io: &dyn TensorIo, sink: &S) -> Result<Option<String>>
where
    S: Fn(usize, &[f32], &mut Vec<u8>) -> Result<()> + Sync,
{
    let checked = FiniteInputs { io, tensor: ctx.tensor };
    let io: &dyn TensorIo = &checked;
    let numel = io.numel();
    let stats = method.prepare(&ctx, io)?;
    let note = method.note(&stats);
    let has_base = io.has_base();
    if !method.elementwise() {
        let mut out = vec![0.0; numel];
        method.apply_whole(&ctx, io, &stats, &mut out)?;
        // Checked and handed on in chunks across the pool (the whole tensor on one thread
        // left the other core idle for a tenth of a cross-architecture merge); the first
        // non-finite element is the one reported, whatever the thread count.
        if let Some(c) = out.par_chunks(CHUNK).position_first(|c| first_non_finite(c).is_some()) {
            check_finite(ctx.tensor, &out[c * CHUNK..], c * CHUNK)?;
        }
        out.par_chunks(CHUNK).enumerate().try_for_each(|(c, piece)| with_scratch(|sc| sink(c * CHUNK, piece, &mut sc.bytes)))?;
        return Ok(note);
    }
    chunk_starts(numel).par_iter().try_for_each(|&s| {
        with_scratch(|sc| {
            let r = s..(s + CHUNK).min(numel);
            let (bufs, out, bytes) = sc.parts(io.slots(), r.len());
            fill(io, r.clone(), bufs)?;
            let (base, inputs) = split(bufs, r.len(), has_base);
            method.apply(&Ctx { offset: s, ..ctx }, base, &inputs, &stats, out)?;
            check_finite(ctx.tensor, out, s)?;
            sink(s, out, bytes)
        })
    })?;
    Ok(note)
}

/// Merges in-memory f32 tensors (the array API) with exactly the kernel and chunking the
/// file path uses, so an array merge and a folder merge give the same numbers.
pub fn merge_arrays(
    method: &dyn Method,
    tensor: &str,
    shape: &[usize],
    seed: u64,
    base: Option<&[f32]>,
    inputs: &[&[f32]],
    pool: &rayon::ThreadPool,
) -> Result<Vec<f32>> {
    let numel: usize = shape.iter().product();
    let main = inputs.len() - method.aux_inputs().min(inputs.len());
    for x in base.iter().chain(&inputs[..main]) {
        if x.len() != numel {
            return Err(Error::mismatch(tensor, format!("an input has {} elements, expected {numel} for shape {shape:?}", x.len())));
        }
    }
    let io = Slices::new(base, inputs);
    let mut out = vec![0f32; numel];
    let dst = SharedOut(out.as_mut_ptr());
    let sink = |off: usize, vals: &[f32], _: &mut Vec<u8>| {
        // SAFETY: merge_tensor hands out disjoint in-bounds ranges of `out`, which
        // outlives this call; each range is written by exactly one thread.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), dst.get().add(off), vals.len()) };
        Ok(())
    };
    let ctx = Ctx { tensor, shape, offset: 0, seed };
    pool.install(|| merge_tensor(method, ctx, &io, &sink))?;
    Ok(out)
}

struct SharedOut(*mut f32);
// SAFETY: only used for disjoint writes, see merge_arrays.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// A pool with `threads` workers (None: one per core).
pub fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        if n == 0 {
            return Err(Error::config("threads must be at least 1"));
        }
        b = b.num_threads(n);
    }
    b.build().map_err(|e| Error::config(format!("cannot start worker threads: {e}")))
}

/// Σ w_i x_i[j] for every j, summing models in order (fixed order: deterministic).
#[inline]
pub fn weighted_sum(inputs: &[&[f32]], w: &[f32], out: &mut [f32]) {
    out.copy_from_slice(inputs[0]);
    out.iter_mut().for_each(|o| *o *= w[0]);
    for (x, &wi) in inputs.iter().zip(w).skip(1) {
        out.iter_mut().zip(x.iter()).for_each(|(o, &v)| *o += wi * v);
    }
}
