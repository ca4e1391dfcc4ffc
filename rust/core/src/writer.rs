//! Sharded safetensors writer. Every tensor's name, shape and dtype is known up front, so
//! shards and headers are laid out before any data exists; workers then write each piece
//! in place with positioned writes, in any order. Nothing buffers a whole shard.
//!
//! Two ways to the disk: through the page cache (positioned writes), or, for an output
//! that will be fsynced anyway, around it ([`WriteMode::Direct`], see `direct.rs`).
mod direct;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::reader::{Shape, INDEX_NAME};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Clone)]
pub struct OutSpec {
    /// Shared with the plan (a clone is a reference count, not a copy of the name).
    pub name: Arc<str>,
    pub dtype: Dtype,
    pub shape: Shape,
    /// A non-float tensor (I64, U8, BOOL...) copied byte for byte: written with this dtype
    /// (`dtype` is then ignored).
    pub raw: Option<safetensors::Dtype>,
}

impl OutSpec {
    pub fn new(name: impl Into<Arc<str>>, dtype: Dtype, shape: impl Into<Shape>) -> Self {
        OutSpec { name: name.into(), dtype, shape: shape.into(), raw: None }
    }

    pub fn nbytes(&self) -> usize {
        let n = self.shape.iter().product::<usize>();
        match self.raw {
            Some(r) => (n * r.bitsize()).div_ceil(8),
            None => n * self.dtype.size(),
        }
    }

    /// Element size in bytes, for alignment.
    fn align(&self) -> usize {
        self.raw.map_or(self.dtype.size(), |r| r.bitsize().div_ceil(8))
    }

    fn dtype_name(&self) -> String {
        match self.raw {
            Some(r) => serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| format!("{r:?}")),
            None => self.dtype.as_str().to_owned(),
        }
    }
}

struct Slot {
    shard: u32,
    /// Absolute file offset of the tensor's first byte.
    offset: u64,
    len: usize,
    written: AtomicUsize,
}

/// Writes waiting for a shard's file while another thread writes to it. The file system
/// serializes writers of one file (ext4 holds the inode lock for the whole copy into the page
/// cache), and a thread waiting for it spins: 8–14% of a 2-core merge's CPU time, measured.
/// So a thread that finds the file busy leaves a copy of its bytes to the thread writing
/// and goes back to merging; the writing thread writes them before it returns.
#[derive(Default)]
struct Turn {
    busy: bool,
    queue: Vec<Pending>,
    /// Buffers of written entries, reused (no allocation per piece).
    spare: Vec<Vec<u8>>,
}

struct Pending {
    slot: usize,
    pos: u64,
    bytes: Vec<u8>,
}

/// At most this many pieces wait per shard; a thread finding the queue full waits for room.
const MAX_PENDING: usize = 8;
/// Larger pieces (a whole tensor from a kernel that is not elementwise) are never copied.
const MAX_PENDING_BYTES: usize = 1 << 20;

/// How a writer's bytes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Positioned writes into the page cache.
    #[default]
    Buffered,
    /// Staged into aligned blocks written with `O_DIRECT` by a writer thread, for output
    /// that is fsynced before use (files whose file system refuses it are buffered).
    Direct,
}

struct Shard {
    path: PathBuf,
    /// `None` for a shard another process writes.
    file: Option<File>,
    /// Set when the shard's bytes go around the page cache.
    direct: Option<direct::DirectFile>,
    turn: Mutex<Turn>,
    /// Signalled when the queue gets room or the file becomes free.
    room: Condvar,
}

pub struct ShardedWriter {
    dir: PathBuf,
    /// One per shard of the full layout.
    files: Vec<Shard>,
    /// False when writing a subset of the shards: the index is then the caller's.
    all: bool,
    /// The staging and writer thread of `WriteMode::Direct`.
    stager: Option<direct::Direct>,
    slots: Vec<Slot>,
    specs: Vec<OutSpec>,
}

#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub files: Vec<PathBuf>,
    /// Sum of tensor data bytes (the index's `total_size`).
    pub total_size: u64,
    /// Bytes on disk, headers included.
    pub bytes_written: u64,
}

/// Splits tensors (in plan order) into shards of at most `max_shard_size` data bytes;
/// a tensor larger than the limit gets a shard of its own.
fn assign_shards(specs: &[OutSpec], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let b = s.nbytes() as u64;
        if !shards.last().unwrap().is_empty() && size + b > max_shard_size {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += b;
    }
    shards
}

pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_owned()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// One output shard of the full layout.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    pub file: String,
    /// Tensor indices (into the specs), in plan order.
    pub tensors: Vec<usize>,
    pub data_bytes: u64,
}

/// The shards `ShardedWriter::create` would write for `specs`, without touching disk.
pub fn layout(specs: &[OutSpec], max_shard_size: u64) -> Vec<ShardInfo> {
    let groups = assign_shards(specs, max_shard_size.max(1));
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| ShardInfo { file: shard_file_name(i, n), data_bytes: g.iter().map(|&t| specs[t].nbytes() as u64).sum(), tensors: g })
        .collect()
}

/// The `model.safetensors.index.json` text for a layout (written when there are 2+ shards).
pub fn index_json(specs: &[OutSpec], shards: &[ShardInfo]) -> String {
    let mut weight_map = BTreeMap::new();
    for sh in shards {
        for &t in &sh.tensors {
            weight_map.insert(&*specs[t].name, sh.file.as_str());
        }
    }
    index_text(&weight_map, specs.iter().map(|s| s.nbytes() as u64).sum())
}

fn index_text(weight_map: &BTreeMap<&str, &str>, total_size: u64) -> String {
    let index = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    serde_json::to_string_pretty(&index).unwrap()
}

impl ShardedWriter {
    /// Lays out `model.safetensors` or `model-0000i-of-0000n.safetensors` shards in `dir`.
    pub fn create(dir: &Path, specs: Vec<OutSpec>, max_shard_size: u64, metadata: &BTreeMap<String, String>) -> Result<Self> {
        Self::create_named(dir, specs, max_shard_size, metadata, &shard_file_name, None, WriteMode::Buffered)
    }

    /// `create` writing in `mode`; with `only`, creates (or truncates and rewrites, so a retry
    /// is idempotent) only the files of shards `only` of the full layout, their bytes
    /// identical to `create`'s.
    pub fn create_with(
        dir: &Path,
        specs: Vec<OutSpec>,
        max_shard_size: u64,
        metadata: &BTreeMap<String, String>,
        only: Option<&[usize]>,
        mode: WriteMode,
    ) -> Result<Self> {
        Self::create_named(dir, specs, max_shard_size, metadata, &shard_file_name, only, mode)
    }

    /// Whether tensor `idx` is written by this writer.
    pub fn owns(&self, idx: usize) -> bool {
        self.files[self.slots[idx].shard as usize].file.is_some()
    }

    /// One single file at `path`, whatever its size (no index).
    pub fn create_file(path: &Path, specs: Vec<OutSpec>, metadata: &BTreeMap<String, String>) -> Result<Self> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| Error::config(format!("{} is not a file path", path.display())))?;
        let name = name.to_string_lossy().into_owned();
        Self::create_named(dir, specs, u64::MAX, metadata, &|_, _| name.clone(), None, WriteMode::Buffered)
    }

    fn create_named(
        dir: &Path,
        specs: Vec<OutSpec>,
        max_shard_size: u64,
        metadata: &BTreeMap<String, String>,
        file_name: &dyn Fn(usize, usize) -> String,
        only: Option<&[usize]>,
        mode: WriteMode,
    ) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for s in &specs {
            if !seen.insert(&*s.name) {
                return Err(Error::config(format!("output tensor '{}' is planned twice", s.name)));
            }
            if s.raw.is_none() && !s.dtype.writable() {
                return Err(Error::config(format!("output tensor '{}': cannot write dtype {}", s.name, s.dtype)));
            }
        }
        drop(seen);
        let groups = assign_shards(&specs, max_shard_size.max(1));
        let n = groups.len();
        if let Some(bad) = only.and_then(|o| o.iter().find(|&&i| i >= n)) {
            return Err(Error::config(format!("output shard {bad} requested, but the layout has {n} shard(s)")));
        }
        // every tensor is in one group, so every slot is set below
        let mut slots: Vec<Slot> = (0..specs.len()).map(|_| Slot { shard: 0, offset: 0, len: 0, written: AtomicUsize::new(0) }).collect();
        let mut files = Vec::with_capacity(n);
        let stager = match (mode, only.is_none_or(|o| !o.is_empty())) {
            (WriteMode::Direct, true) => Some(direct::Direct::start()?),
            _ => None,
        };
        for (si, mut group) in groups.into_iter().enumerate() {
            // Wider dtypes first keeps every tensor naturally aligned (as safetensors does).
            group.sort_by_key(|&i| std::cmp::Reverse(specs[i].align()));
            // Offsets relative to the data section until the header's length is known.
            let mut off = 0usize;
            for &i in &group {
                let len = specs[i].nbytes();
                slots[i] = Slot { shard: si as u32, offset: off as u64, len, written: AtomicUsize::new(0) };
                off += len;
            }
            let mut order = group;
            order.sort_unstable_by(|&x, &y| specs[x].name.cmp(&specs[y].name));
            let meta = serde_json::to_string(metadata).unwrap();
            // The header as text, keys sorted (as a JSON map would write them), made twice by
            // `emit`: once to learn its length, then written out in pieces. A JSON tree, a map
            // of per-tensor entries, or even the whole text in memory costs 100+ bytes per
            // tensor on 200k-tensor models.
            let emit = |sink: &mut dyn FnMut(&[u8]) -> Result<()>| -> Result<()> {
                sink(b"{")?;
                let mut meta_done = false;
                let mut entry = Vec::new();
                for (k, &i) in order.iter().enumerate() {
                    let (o, len, s) = (slots[i].offset as usize, slots[i].len, &specs[i]);
                    entry.clear();
                    if !meta_done && "__metadata__" < &*s.name {
                        entry.extend_from_slice(br#""__metadata__":"#);
                        entry.extend_from_slice(meta.as_bytes());
                        entry.push(b',');
                        meta_done = true;
                    }
                    serde_json::to_writer(&mut entry, &*s.name).unwrap();
                    let shape = s.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
                    entry.extend_from_slice(
                        format!(r#":{{"dtype":"{}","shape":[{shape}],"data_offsets":[{o},{}]}}"#, s.dtype_name(), o + len).as_bytes(),
                    );
                    if !(meta_done && k + 1 == order.len()) {
                        entry.push(b',');
                    }
                    sink(&entry)?;
                }
                if !meta_done {
                    sink(br#""__metadata__":"#)?;
                    sink(meta.as_bytes())?;
                }
                sink(b"}")
            };
            let mut hlen = 0usize;
            emit(&mut |b| {
                hlen += b.len();
                Ok(())
            })?;
            // Padded with spaces so the data section starts 8-aligned.
            let padded = hlen.next_multiple_of(8);
            let data_start = 8 + padded as u64;
            let path = dir.join(file_name(si, n));
            let mine = only.is_none_or(|o| o.contains(&si));
            let (f, df) = if mine {
                let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                let file_len = data_start + off as u64;
                f.set_len(file_len).map_err(|e| Error::io(&path, e))?;
                let df = stager.as_ref().and_then(|s| s.open(&path, &f, file_len));
                // The header takes the same way as the data (a direct block holding its first
                // bytes must hold them all).
                let put = |pos: u64, bytes: &[u8]| -> Result<()> {
                    match (&stager, &df) {
                        (Some(s), Some(d)) => s.put(d, pos, bytes),
                        _ => f.write_all_at(bytes, pos).map_err(|e| Error::io(&path, e)),
                    }
                };
                put(0, &(padded as u64).to_le_bytes())?;
                let (mut buf, mut pos) = (Vec::with_capacity(1 << 16), 8u64);
                let mut flush = |buf: &mut Vec<u8>| -> Result<()> {
                    put(pos, buf)?;
                    pos += buf.len() as u64;
                    buf.clear();
                    Ok(())
                };
                emit(&mut |b| {
                    buf.extend_from_slice(b);
                    if buf.len() >= 1 << 16 {
                        flush(&mut buf)?;
                    }
                    Ok(())
                })?;
                buf.resize(buf.len() + padded - hlen, b' ');
                flush(&mut buf)?;
                (Some(f), df)
            } else {
                (None, None)
            };
            for &i in &order {
                slots[i].offset += data_start;
            }
            files.push(Shard { path, file: f, direct: df, turn: Mutex::default(), room: Condvar::new() });
        }
        Ok(ShardedWriter { dir: dir.to_path_buf(), files, all: only.is_none(), stager, slots, specs })
    }

    pub fn specs(&self) -> &[OutSpec] {
        &self.specs
    }

    /// Writes `data` at byte `offset` within tensor `idx`. Safe to call from many threads;
    /// when it returns, the bytes are written or handed to a thread that writes them before
    /// its own call returns (see `Turn`).
    pub fn write(&self, idx: usize, offset: usize, data: &[u8]) -> Result<()> {
        let slot = &self.slots[idx];
        if offset + data.len() > slot.len {
            return Err(Error::config(format!("internal: write past the end of tensor '{}'", self.specs[idx].name)));
        }
        let shard = &self.files[slot.shard as usize];
        if shard.file.is_none() {
            return Err(Error::config(format!("internal: tensor '{}' belongs to a shard this writer does not write", self.specs[idx].name)));
        }
        let pos = slot.offset + offset as u64;
        if let (Some(s), Some(d)) = (&self.stager, &shard.direct) {
            s.put(d, pos, data)?;
            slot.written.fetch_add(data.len(), Ordering::Relaxed);
            return Ok(());
        }
        let mut turn = shard.turn.lock().unwrap_or_else(|e| e.into_inner());
        while turn.busy {
            if data.len() > MAX_PENDING_BYTES {
                drop(turn);
                return self.write_at(shard, idx, pos, data);
            }
            if turn.queue.len() < MAX_PENDING {
                let mut bytes = turn.spare.pop().unwrap_or_default();
                bytes.clear();
                bytes.extend_from_slice(data);
                turn.queue.push(Pending { slot: idx, pos, bytes });
                return Ok(());
            }
            // Writing is the slower side: sleep (not spin) until the writing thread takes one.
            turn = shard.room.wait(turn).unwrap_or_else(|e| e.into_inner());
        }
        turn.busy = true;
        drop(turn);
        let mut result = self.write_at(shard, idx, pos, data);
        let mut done: Option<Vec<u8>> = None;
        loop {
            let mut turn = shard.turn.lock().unwrap_or_else(|e| e.into_inner());
            turn.spare.extend(done.take());
            let next = turn.queue.pop();
            turn.busy = next.is_some();
            drop(turn);
            shard.room.notify_all();
            let Some(p) = next else { return result };
            // After an error the merge stops: what is queued is dropped, and `finish` (not
            // reached) would report the missing bytes.
            if result.is_ok() {
                result = self.write_at(shard, p.slot, p.pos, &p.bytes);
            }
            done = Some(p.bytes);
        }
    }

    fn write_at(&self, shard: &Shard, idx: usize, pos: u64, data: &[u8]) -> Result<()> {
        let f = shard.file.as_ref().expect("checked by write");
        f.write_all_at(data, pos).map_err(|e| Error::io(&shard.path, e))?;
        self.slots[idx].written.fetch_add(data.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Checks every byte was written, closes the shards and writes the index when sharded.
    pub fn finish(mut self) -> Result<WriteSummary> {
        for (slot, spec) in self.slots.iter().zip(&self.specs) {
            let w = slot.written.load(Ordering::Relaxed);
            if self.files[slot.shard as usize].file.is_some() && w != slot.len {
                return Err(Error::config(format!("internal: tensor '{}' got {w} of {} bytes", spec.name, slot.len)));
            }
        }
        if let Some(s) = self.stager.take() {
            s.finish(self.files.iter().filter_map(|f| f.direct.as_ref()))?;
        }
        let total_size: u64 = self.slots.iter().map(|s| s.len as u64).sum();
        let mut bytes_written = 0;
        let mut paths = Vec::new();
        let n_shards = self.files.len();
        for Shard { path, file, .. } in self.files {
            if let Some(f) = file {
                bytes_written += f.metadata().map_err(|e| Error::io(&path, e))?.len();
                paths.push(path);
            }
        }
        if self.all && n_shards > 1 {
            let files: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
            let mut weight_map = BTreeMap::new();
            for (slot, spec) in self.slots.iter().zip(&self.specs) {
                weight_map.insert(&*spec.name, files[slot.shard as usize].as_str());
            }
            let p = self.dir.join(INDEX_NAME);
            let text = index_text(&weight_map, total_size);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            bytes_written += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            paths.push(p);
        }
        Ok(WriteSummary { files: paths, total_size, bytes_written })
    }
}
