//! Runs a plan: tensors one after another, each streamed in fixed-size chunks across the
//! rayon pool (elementwise methods) or handed whole to its kernel, widened to f32 on the
//! way in, rounded once on the way out, written in place. Fixed chunk boundaries and a
//! fixed reduction order make the output independent of the thread count.
use crate::dtype::encode_f32;
use crate::error::{Error, Result};
use crate::methods::{Ctx, Method, TensorIo};
use crate::plan::{resolve, Job, PlanSpec};
use crate::reader::Checkpoint;
use crate::writer::{self, OutSpec, ShardInfo, ShardedWriter};
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Elements per chunk: 256 KiB of f32 per input, small enough to stay in cache.
pub const CHUNK: usize = 1 << 16;

#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub tensors_written: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub files: Vec<PathBuf>,
    /// Kernel notes, one per tensor that has one ("tensor: note").
    pub warnings: Vec<String>,
}

impl TensorIo for Job<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn slots(&self) -> usize {
        self.inputs.len() + usize::from(self.base.is_some())
    }
    fn has_base(&self) -> bool {
        self.base.is_some()
    }
    fn read(&self, slot: usize, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        self.sources().nth(slot).expect("slot in range").read(range, dst)
    }
}

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

fn fill(io: &dyn TensorIo, range: Range<usize>, bufs: &mut [Vec<f32>]) -> Result<()> {
    let len = range.len();
    for (slot, b) in bufs.iter_mut().enumerate() {
        if b.len() < len {
            b.resize(len, 0.0);
        }
        io.read(slot, range.clone(), &mut b[..len])?;
    }
    Ok(())
}

fn check_finite(tensor: &str, out: &[f32], offset: usize) -> Result<()> {
    match out.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::numerical(tensor, format!(
            "the merge produced {} at element {} (are the inputs finite? is a weight or parameter extreme?)", out[i], offset + i))),
    }
}

fn chunk_starts(numel: usize) -> Vec<usize> {
    (0..numel).step_by(CHUNK).collect()
}

fn scratch(slots: usize) -> (Vec<Vec<f32>>, Vec<f32>, Vec<u8>) {
    (vec![Vec::new(); slots], Vec::new(), Vec::new())
}

/// The default `Method::prepare`: streams fixed chunks through `accumulate` in parallel and
/// folds the parts with `combine` in chunk order.
pub fn stream_stats<M: Method + ?Sized>(method: &M, io: &dyn TensorIo) -> Result<Vec<f64>> {
    if method.n_stats() == 0 {
        return Ok(vec![]);
    }
    let numel = io.numel();
    let parts: Vec<Vec<f64>> = chunk_starts(numel)
        .par_iter()
        .map_init(
            || scratch(io.slots()),
            |(bufs, _, _), &s| {
                let r = s..(s + CHUNK).min(numel);
                fill(io, r.clone(), bufs)?;
                let (base, inputs) = split(bufs, r.len(), io.has_base());
                let mut part = method.init_stats();
                method.accumulate(base, &inputs, &mut part);
                Ok(part)
            },
        )
        .collect::<Result<_>>()?;
    Ok(parts.iter().fold(method.init_stats(), |mut acc, p| {
        method.combine(&mut acc, p);
        acc
    }))
}

/// Merges one tensor, handing each finished piece (element offset, values, a scratch byte
/// buffer) to `sink`. Pieces are disjoint and cover the tensor. Returns the kernel's note.
fn merge_tensor<S>(method: &dyn Method, ctx: Ctx, io: &dyn TensorIo, sink: &S) -> Result<Option<String>>
where
    S: Fn(usize, &[f32], &mut Vec<u8>) -> Result<()> + Sync,
{
    let numel = io.numel();
    let stats = method.prepare(&ctx, io)?;
    let note = method.note(&stats);
    let has_base = io.has_base();
    if !method.elementwise() {
        let (mut bufs, mut out, mut bytes) = scratch(io.slots());
        fill(io, 0..numel, &mut bufs)?;
        let (base, inputs) = split(&bufs, numel, has_base);
        out.resize(numel, 0.0);
        method.apply(&ctx, base, &inputs, &stats, &mut out)?;
        check_finite(ctx.tensor, &out, 0)?;
        return sink(0, &out, &mut bytes).map(|_| note);
    }
    chunk_starts(numel).par_iter().try_for_each_init(
        || scratch(io.slots()),
        |(bufs, out, bytes), &s| {
            let r = s..(s + CHUNK).min(numel);
            fill(io, r.clone(), bufs)?;
            let (base, inputs) = split(bufs, r.len(), has_base);
            out.resize(r.len(), 0.0);
            method.apply(&Ctx { offset: s, ..ctx }, base, &inputs, &stats, out)?;
            check_finite(ctx.tensor, out, s)?;
            sink(s, out, bytes)
        },
    )?;
    Ok(note)
}

/// Executes a plan into `out_dir` (an existing, empty folder; the caller stages and renames
/// it). `progress` runs on the calling thread after each tensor; an error from it stops
/// the merge.
pub fn run(
    plan: &PlanSpec,
    ckpts: &[Checkpoint],
    out_dir: &Path,
    pool: &rayon::ThreadPool,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Summary> {
    let jobs = resolve(plan, ckpts)?;
    let specs = out_specs(&jobs);
    let mut metadata = plan.metadata.clone();
    metadata.insert("format".into(), "pt".into());
    let writer = match &plan.only_shards {
        None => ShardedWriter::create(out_dir, specs, plan.max_shard_size, &metadata)?,
        Some(only) => ShardedWriter::create_subset(out_dir, specs, plan.max_shard_size, &metadata, only)?,
    };
    let mine: Vec<usize> = (0..jobs.len()).filter(|&i| writer.owns(i)).collect();
    let mut p = Progress {
        tensors_total: mine.len(),
        bytes_total: mine.iter().map(|&i| writer.specs()[i].nbytes() as u64).sum(),
        ..Progress::default()
    };
    let mut bytes_read = 0u64;
    let mut warnings = Vec::new();
    for idx in mine {
        let job = &jobs[idx];
        let dt = job.dtype;
        let sz = dt.size();
        let sink = |off: usize, vals: &[f32], bytes: &mut Vec<u8>| {
            bytes.resize(vals.len() * sz, 0);
            encode_f32(dt, vals, bytes);
            writer.write(idx, off * sz, bytes)
        };
        let ctx = Ctx { tensor: job.name, shape: &job.shape, offset: 0, seed: plan.seed };
        if let Some(n) = pool.install(|| merge_tensor(job.method.as_ref(), ctx, job, &sink))? {
            warnings.push(format!("{}: {n}", job.name));
        }
        for s in job.sources() {
            bytes_read += s.nbytes();
            s.release();
        }
        p.tensors_done += 1;
        p.bytes_done += (job.numel() * sz) as u64;
        progress(&p)?;
    }
    let w = writer.finish()?;
    Ok(Summary { tensors_written: p.tensors_total, bytes_read, bytes_written: w.bytes_written, files: w.files, warnings })
}

fn out_specs(jobs: &[Job]) -> Vec<OutSpec> {
    jobs.iter().map(|j| OutSpec { name: j.name.to_owned(), dtype: j.dtype, shape: j.shape.clone() }).collect()
}

/// The output layout of a plan (every check of `run` before any write, nothing written):
/// the specs, the shards, and the index text (`None` for a single file).
pub fn layout(plan: &PlanSpec, ckpts: &[Checkpoint]) -> Result<(Vec<OutSpec>, Vec<ShardInfo>, Option<String>)> {
    let specs = out_specs(&resolve(plan, ckpts)?);
    let shards = writer::layout(&specs, plan.max_shard_size);
    let index = (shards.len() > 1).then(|| writer::index_json(&specs, &shards));
    Ok((specs, shards, index))
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
    for x in base.iter().chain(inputs) {
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
