//! Runs a plan: tensors in order (small ones side by side), each streamed in fixed-size
//! chunks across the rayon pool (elementwise methods) or handed whole to its kernel, widened
//! to f32 on the way in, rounded once on the way out, written in place. Fixed chunk
//! boundaries and a fixed reduction order make the output independent of the thread count
//! and of which tensors run together.
use crate::dtype::{encode_f32, encode_f32_finite, first_non_finite_bytes, Dtype};
use crate::error::{Error, Result};
pub use crate::kernel::{first_non_finite, merge_arrays, pool, Slices, CHUNK};
use crate::kernel::{merge_tensor, Ctx, TensorIo};
use crate::plan::{resolve_each, resolve_job, Job, Methods, PlanSpec};
use crate::reader::Checkpoint;
use crate::writer::{self, OutSpec, ShardInfo, ShardedWriter, WriteMode};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Things the user should know about an accepted merge: inputs of mixed dtypes (also
    /// recorded in the output metadata) and kernel notes, one per tensor ("tensor: note").
    pub notes: Vec<String>,
}

/// Metadata key listing each input's float dtypes when the inputs of a tensor differ.
pub const INPUT_DTYPES_KEY: &str = "merge_fast_input_dtypes";

/// A note (and metadata entry) when some tensor merges inputs of different float dtypes
/// (e.g. a BF16 model with an F32 one): accepted, computed in f32, written in one dtype.
/// Data-aware merges are skipped: their statistics (Fisher, Gram) are F32 by design.
/// Fed one job at a time (`add`), so no job outlives the check.
#[derive(Default)]
struct MixedDtypes {
    per_input: std::collections::BTreeMap<String, std::collections::BTreeSet<&'static str>>,
    mixed: usize,
    example: Option<(String, crate::dtype::Dtype)>,
}

impl MixedDtypes {
    fn add(&mut self, method: &str, j: &Job) {
        if j.raw.is_some() || crate::methods::data_aware::NAMES.contains(&method) {
            return;
        }
        let first = j.sources().next().map(|s| s.dtype());
        if j.sources().any(|s| Some(s.dtype()) != first) {
            self.mixed += 1;
            self.example.get_or_insert_with(|| (j.name.to_owned(), j.dtype));
        }
        for s in j.sources() {
            self.per_input.entry(s.root().display().to_string()).or_default().insert(s.dtype().as_str());
        }
    }

    fn finish(self) -> Option<(String, String)> {
        use std::collections::{BTreeMap, BTreeSet};
        let (name, out) = self.example?;
        let list = self.per_input.iter().map(|(k, v)| format!("{k}: {}", v.iter().copied().collect::<Vec<_>>().join("/"))).collect::<Vec<_>>();
        let note = format!(
            "inputs of different dtypes ({}) in {} tensor(s), e.g. '{name}': merged in float32 and written as {out}",
            list.join("; "),
            self.mixed
        );
        // The metadata names each input by its folder's name, not its absolute path, so that the
        // same inputs give the same bytes wherever they sit (hub cache, temporary stage folders).
        let mut by_name: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
        for (k, v) in self.per_input {
            let name = Path::new(&k).file_name().map_or(k.clone(), |n| n.to_string_lossy().into_owned());
            by_name.entry(name).or_default().extend(v);
        }
        Some((note, serde_json::to_string(&by_name).expect("strings serialize")))
    }
}

/// Checks every tensor of the plan (`resolve`) and returns the output specs, without keeping
/// the jobs: `run` binds each again when it runs it.
fn check_plan<'a>(plan: &'a PlanSpec, ckpts: &'a [Checkpoint], methods: &mut Methods<'a>) -> Result<(Vec<OutSpec>, MixedDtypes)> {
    let mut specs = Vec::with_capacity(plan.tensors.len());
    let mut mixed = MixedDtypes::default();
    resolve_each(plan, ckpts, methods, |t, j| {
        mixed.add(plan.method_of(t).unwrap_or_default(), &j);
        specs.push(OutSpec { raw: j.raw, ..OutSpec::new(Arc::clone(&t.name), j.dtype, j.shape) });
        Ok(())
    })?;
    Ok((specs, mixed))
}

/// Copies a non-float tensor from its first source after checking that every source holds
/// exactly the same bytes (a merge of position ids or quantization tables has no meaning).
fn copy_raw(job: &Job, writer: &ShardedWriter, idx: usize) -> Result<()> {
    fn bytes<'r>(r: &'r crate::plan::Reader<'_>, name: &str) -> Result<&'r [u8]> {
        match r {
            crate::plan::Reader::Tensor { ckpt, info } => Ok(ckpt.bytes(info)),
            _ => Err(Error::config(format!("internal: non-float tensor '{name}' from a computed source"))),
        }
    }
    let bytes = |r| bytes(r, job.name);
    let srcs: Vec<&crate::plan::Reader> = job.sources().collect();
    let first = bytes(srcs[0])?;
    for (k, s) in srcs.iter().enumerate().skip(1) {
        let b = bytes(s)?;
        if b != first {
            let size = job.raw.map_or(1, |d| d.bitsize().div_ceil(8)).max(1);
            let at = first.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) / size;
            return Err(Error::mismatch(job.name, format!(
                "non-float tensor ({:?}) differs between {} and {} (first at element {at}): such tensors are copied unchanged, so every model must hold the same values",
                job.raw.unwrap(), job.describe(0), job.describe(k))));
        }
    }
    writer.write(idx, 0, first)
}

/// Writes a tensor whose kernel copies one input unchanged (`Method::copies_input`) as the
/// stored bytes, when the input is a stored tensor of the output's dtype and that dtype
/// widens to f32 exactly (BF16, F16, F32): the bytes widening and rounding back would give.
/// Non-finite values are refused as on the merge path. False: not such a tensor (merge it).
fn copy_unchanged(job: &Job, writer: &ShardedWriter, idx: usize) -> Result<bool> {
    use crate::dtype::Dtype;
    let Some(slot) = job.method.copies_input() else { return Ok(false) };
    let Some(crate::plan::Reader::Tensor { ckpt, info }) = job.sources().nth(slot) else { return Ok(false) };
    if !matches!(job.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) || info.dtype != Some(job.dtype) {
        return Ok(false);
    }
    let sz = job.dtype.size();
    // One thread: this is only writing, and the file system serializes writers of one file
    // anyway (concurrent writes spun on its lock: 3x the system time, measured).
    ckpt.bytes(info).chunks(CHUNK * sz).enumerate().try_for_each(|(c, piece)| {
        if let Some(i) = first_non_finite_bytes(job.dtype, piece) {
            let mut v = [0f32];
            crate::dtype::decode_f32(job.dtype, &piece[i * sz..(i + 1) * sz], &mut v);
            return Err(Error::numerical(
                job.name,
                format!("input {} is {} at element {}: inputs must be finite", job.describe(slot), v[0], c * CHUNK + i),
            ));
        }
        writer.write(idx, c * CHUNK * sz, piece)
    })?;
    Ok(true)
}

impl TensorIo for Job<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn slot_numel(&self, slot: usize) -> usize {
        self.sources().nth(slot).expect("slot in range").shape().iter().product()
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
    fn read_finite(&self, slot: usize, range: Range<usize>, dst: &mut [f32]) -> Result<Option<usize>> {
        self.sources().nth(slot).expect("slot in range").read_finite(range, dst)
    }
    fn factors(&self, slot: usize) -> Result<Option<crate::linalg::AffineMap>> {
        self.sources().nth(slot).expect("slot in range").factors()
    }
    fn describe(&self, slot: usize) -> String {
        let s = self.sources().nth(slot).expect("slot in range").describe();
        match (self.base.is_some(), slot) {
            (true, 0) => format!("the base ({s})"),
            (true, i) => format!("model #{} ({s})", i - 1),
            (false, i) => format!("model #{i} ({s})"),
        }
    }
}

/// A finite f32 that rounds to ±inf in a 16-bit output dtype (|x| ≥ 65520 in F16) would be
/// a silently wrong number in the file: an error naming the tensor, element and value.
/// `first`: the first encoded value that is not finite.
fn check_fits(tensor: &str, dt: crate::dtype::Dtype, vals: &[f32], first: Option<usize>, offset: usize) -> Result<()> {
    match first {
        None => Ok(()),
        Some(i) => {
            Err(Error::numerical(tensor, format!("the merged value {} at element {} does not fit in {dt} (the output dtype)", vals[i], offset + i)))
        }
    }
}

/// Elements of the tensors merged at once (a larger tensor goes alone), at most two per
/// thread: each tensor's work ends in a tail where some of the pool's threads wait (a tensor
/// of fewer chunks or blocks than threads never fills the pool), and a small model is mostly
/// such tensors. Beside other tensors, those threads take up another's work. 4M elements
/// bound what is held at once (inputs' pages, prepared state) to what one 1.1B attention
/// projection holds alone.
const WINDOW: usize = 1 << 22;

/// Merges one job into output tensor `idx`: copied (raw or unchanged) or merged; the
/// method's note, if any.
fn merge_job(job: &Job, writer: &ShardedWriter, idx: usize, seed: u64) -> Result<Option<String>> {
    if job.raw.is_some() {
        copy_raw(job, writer, idx)?;
        return Ok(None);
    }
    if copy_unchanged(job, writer, idx)? {
        return Ok(None);
    }
    let dt = job.dtype;
    let sz = dt.size();
    let sink = |off: usize, vals: &[f32], bytes: &mut Vec<u8>| {
        let n = vals.len() * sz;
        if bytes.len() < n {
            bytes.resize(n, 0);
        }
        let bytes = &mut bytes[..n];
        let first = match dt {
            // the values themselves, already checked finite
            Dtype::F32 => {
                encode_f32(dt, vals, bytes);
                None
            }
            _ => encode_f32_finite(dt, vals, bytes),
        };
        check_fits(job.name, dt, vals, first, off)?;
        writer.write(idx, off * sz, bytes)
    };
    merge_tensor(job.method.as_ref(), Ctx { tensor: job.name, shape: job.shape, offset: 0, seed }, job, &sink)
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
    let mut methods = Methods::new();
    let (specs, mixed) = check_plan(plan, ckpts, &mut methods)?;
    let mut metadata = plan.metadata.clone();
    metadata.insert("format".into(), "pt".into());
    let mut notes = Vec::new();
    if let Some((note, per_input)) = mixed.finish() {
        metadata.insert(INPUT_DTYPES_KEY.into(), per_input);
        notes.push(note);
    }
    let mode = if plan.direct_io { WriteMode::Direct } else { WriteMode::Buffered };
    let writer = ShardedWriter::create_with(out_dir, specs, plan.max_shard_size, &metadata, plan.only_shards.as_deref(), mode)?;
    let mine: Vec<usize> = (0..plan.tensors.len()).filter(|&i| writer.owns(i)).collect();
    let mut p =
        Progress { tensors_total: mine.len(), bytes_total: mine.iter().map(|&i| writer.specs()[i].nbytes() as u64).sum(), ..Progress::default() };
    let mut bytes_read = 0u64;
    let mut notes_at: Vec<(usize, String)> = Vec::new();
    // The first tensor (in plan order) that failed, and an error from `progress`.
    let (mut failed, mut stopped): (Option<(usize, Error)>, Option<Error>) = (None, None);
    std::thread::scope(|scope| {
        // A finished tensor's input pages are dropped (`release`: a madvise per source, 0.15 s
        // of system time over a 1.1B merge) on a thread of its own while others merge: on the
        // calling thread, the pool's workers waited on it.
        let (done, finished) = std::sync::mpsc::channel::<Job>();
        scope.spawn(move || finished.into_iter().for_each(|job| job.sources().for_each(|s| s.release())));
        let (sent, results) = std::sync::mpsc::channel::<(usize, usize, Job, Result<Option<String>>)>();
        // This thread starts tensors in plan order while the window has room and takes their
        // results as they come; the pool's threads merge them.
        pool.in_place_scope(|s| {
            let (mut next, mut held, mut running) = (0, 0, 0);
            let most = 2 * pool.current_num_threads();
            // The next tensor, bound, waiting for room.
            let mut waiting = None;
            loop {
                while failed.is_none() && stopped.is_none() {
                    if waiting.is_none() && next < mine.len() {
                        let (k, idx) = (next, mine[next]);
                        next += 1;
                        // checked above: binding it again cannot fail
                        match resolve_job(plan, &plan.tensors[idx], ckpts, &mut methods) {
                            Ok(job) => waiting = Some((k, idx, job)),
                            Err(e) => failed = Some((k, e)),
                        }
                    }
                    let Some((k, idx, job)) = waiting.take() else { break };
                    // A copy goes alone, as the plan orders it: it only writes, and beside
                    // other tensors its pieces reach the output out of order.
                    let weight = if job.raw.is_some() || job.method.copies_input().is_some() { WINDOW + 1 } else { job.numel() };
                    if running > 0 && (running == most || held + weight > WINDOW) {
                        waiting = Some((k, idx, job));
                        break;
                    }
                    (held, running) = (held + weight, running + 1);
                    let (sent, writer) = (sent.clone(), &writer);
                    // A panic comes back as an error (a result this thread waits for); the
                    // receiver outlives the scope: the send cannot fail.
                    s.spawn(move |_| {
                        let result = crate::error::no_panic(|| merge_job(&job, writer, idx, plan.seed));
                        let _ = sent.send((k, weight, job, result));
                    });
                }
                if running == 0 {
                    break;
                }
                let (k, weight, job, result) = results.recv().expect("a running tensor sends its result");
                (held, running) = (held - weight, running - 1);
                match result {
                    // Tensors started before it may still fail: the first in plan order is reported.
                    Err(e) => {
                        if failed.as_ref().is_none_or(|&(f, _)| k < f) {
                            failed = Some((k, e));
                        }
                    }
                    Ok(note) => {
                        notes_at.extend(note.map(|n| (k, format!("{}: {n}", job.name))));
                        bytes_read += job.sources().map(|s| s.nbytes()).sum::<u64>();
                        p.tensors_done += 1;
                        p.bytes_done += writer.specs()[mine[k]].nbytes() as u64;
                        // The thread lives until `done` is dropped: the send cannot fail.
                        let _ = done.send(job);
                        if stopped.is_none() && failed.is_none() {
                            stopped = progress(&p).err();
                        }
                    }
                }
            }
        });
    });
    if let Some(e) = failed.map(|(_, e)| e).or(stopped) {
        return Err(e);
    }
    notes_at.sort_by_key(|&(k, _)| k);
    notes.extend(notes_at.into_iter().map(|(_, n)| n));
    let w = writer.finish()?;
    Ok(Summary { tensors_written: p.tensors_total, bytes_read, bytes_written: w.bytes_written, files: w.files, notes })
}

/// The output layout of a plan (every check of `run` before any write, nothing written):
/// the specs, the shards, and the index text (`None` for a single file).
pub fn layout(plan: &PlanSpec, ckpts: &[Checkpoint]) -> Result<(Vec<OutSpec>, Vec<ShardInfo>, Option<String>)> {
    let (specs, _) = check_plan(plan, ckpts, &mut Methods::new())?;
    let shards = writer::layout(&specs, plan.max_shard_size);
    let index = (shards.len() > 1).then(|| writer::index_json(&specs, &shards));
    Ok((specs, shards, index))
}
