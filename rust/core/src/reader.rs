//! Memory-mapped safetensors checkpoints: one file, or a folder sharded with
//! `model.safetensors.index.json`. Every header is validated when the checkpoint is
//! opened, before any merge work, and every message names the file and the tensor.
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::TensorInfo as StInfo;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// A tensor shape: up to 3 dimensions (every LLM weight but convolutions) inline, more on
/// the heap. Checkpoints, plans and outputs hold one per tensor: a `Vec` costs a 32-byte
/// heap block on top of its 24 bytes, 200k times over.
#[derive(Clone, PartialEq, Eq)]
pub enum Shape {
    Inline(u8, [usize; 3]),
    Heap(Box<[usize]>),
}

impl std::ops::Deref for Shape {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        match self {
            Shape::Inline(n, d) => &d[..*n as usize],
            Shape::Heap(d) => d,
        }
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        if d.len() <= 3 {
            let mut a = [0; 3];
            a[..d.len()].copy_from_slice(d);
            Shape::Inline(d.len() as u8, a)
        } else {
            Shape::Heap(d.into())
        }
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        d.as_slice().into()
    }
}

impl std::fmt::Debug for Shape {
    // as a list, like the `Vec` it replaces: messages print shapes as `[4096, 11008]`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: Box<str>,
    /// None when the dtype exists in safetensors but is not a float we merge (I64, BOOL...).
    pub dtype: Option<Dtype>,
    pub raw_dtype: safetensors::Dtype,
    pub shape: Shape,
    /// Index of the shard file (u32: a checkpoint holds one `TensorInfo` per tensor).
    pub shard: u32,
    /// Absolute byte range inside the shard file.
    pub span: Range<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    metadata: BTreeMap<String, String>,
}

pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    /// In file order (shard, then offset): a stable, natural iteration order.
    tensors: Vec<TensorInfo>,
    /// Positions in `tensors` sorted by name, for lookups. Names are stored once (in
    /// `TensorInfo`): checkpoints with 100k+ tensors are common, keep per-tensor cost low.
    by_name: Vec<u32>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("root", &self.root).field("tensors", &self.tensors.len()).finish()
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` file, or a folder holding an index + shards, `model.safetensors`,
    /// or any `*.safetensors` files.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        if path.is_file() {
            return Self::from_files(path.to_path_buf(), vec![path.to_path_buf()], None);
        }
        if !path.is_dir() {
            return Err(Error::invalid(path, None, "no such file or folder"));
        }
        let index = path.join(INDEX_NAME);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Self::from_files(path.to_path_buf(), vec![single], None);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::invalid(
                path,
                None,
                "folder holds no .safetensors file (pickled .bin checkpoints are not read; convert them to safetensors first)",
            ));
        }
        Self::from_files(path.to_path_buf(), files, None)
    }

    fn open_index(root: &Path, index: &Path) -> Result<Checkpoint> {
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| Error::invalid(index, None, format!("index is not valid JSON: {e}")))?;
        let map =
            json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::invalid(index, None, "index has no \"weight_map\" object"))?;
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| Error::invalid(index, Some(name), "weight_map entry is not a file name"))?;
            let p = Path::new(shard);
            if p.is_absolute() || p.components().count() != 1 {
                return Err(Error::invalid(index, Some(name), format!("shard '{shard}' is not a plain file name inside the folder")));
            }
            wanted.insert(name.clone(), shard.to_owned());
        }
        let mut shard_names: Vec<&String> = wanted.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::with_capacity(shard_names.len());
        for s in shard_names {
            let p = root.join(s);
            if !p.is_file() {
                let who = wanted.iter().find(|(_, v)| *v == s).map(|(k, _)| k.as_str());
                return Err(Error::invalid(index, who, format!("index names shard '{s}', which does not exist")));
            }
            files.push(p);
        }
        Self::from_files(root.to_path_buf(), files, Some((index, wanted)))
    }

    fn from_files(root: PathBuf, files: Vec<PathBuf>, index: Option<(&Path, BTreeMap<String, String>)>) -> Result<Checkpoint> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: Vec<TensorInfo> = Vec::new();
        for (si, file) in files.into_iter().enumerate() {
            let (shard, infos) = open_shard(&file, si as u32)?;
            let shard_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for info in infos {
                if let Some((_, wanted)) = &index {
                    // Tensors a shard holds but the index does not list are ignored, as loaders do.
                    if wanted.get(&*info.name) != Some(&shard_name) {
                        continue;
                    }
                }
                tensors.push(info);
            }
            shards.push(shard);
        }
        // pushed one by one: up to twice the space otherwise, held for the whole merge
        tensors.shrink_to_fit();
        let mut by_name: Vec<u32> = (0..tensors.len() as u32).collect();
        // stable: of two equal names, the one stored first comes first
        by_name.sort_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
        for w in by_name.windows(2) {
            let (first, again) = (&tensors[w[0] as usize], &tensors[w[1] as usize]);
            if first.name == again.name {
                let (file, other) = (&shards[again.shard as usize].path, &shards[first.shard as usize].path);
                return Err(Error::invalid(file, Some(&again.name), format!("tensor also stored in {}", other.display())));
            }
        }
        let ck = |name: &str| by_name.binary_search_by(|&i| (*tensors[i as usize].name).cmp(name)).is_ok();
        if let Some((index, wanted)) = &index {
            for (name, shard) in wanted {
                if !ck(name) {
                    return Err(Error::invalid(
                        *index,
                        Some(name),
                        format!("index says the tensor is in '{shard}', but that shard does not hold it"),
                    ));
                }
            }
        }
        if tensors.is_empty() {
            // Merging it would "succeed" with an empty model.
            let file = if shards.len() == 1 { shards[0].path.clone() } else { root.clone() };
            return Err(Error::invalid(file, None, "holds no tensors"));
        }
        Ok(Checkpoint { root, shards, tensors, by_name })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.tensors.iter().map(|t| &*t.name)
    }

    /// Every tensor, in file order.
    pub fn infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        let i = self.by_name.binary_search_by(|&i| (*self.tensors[i as usize].name).cmp(name)).ok()?;
        Some(&self.tensors[self.by_name[i] as usize])
    }

    pub fn get(&self, name: &str) -> Result<&TensorInfo> {
        self.info(name).ok_or_else(|| Error::mismatch(name, format!("not found in checkpoint {}", self.root.display())))
    }

    pub fn shard_path(&self, info: &TensorInfo) -> &Path {
        &self.shards[info.shard as usize].path
    }

    /// The `__metadata__` of the first shard.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.shards.first().map(|s| s.metadata.clone()).unwrap_or_default()
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.shards[info.shard as usize].mmap[info.span.clone()]
    }

    /// Widens elements `range` of the tensor to f32 into `dst`.
    pub fn read_f32(&self, info: &TensorInfo, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        let (dtype, src) = self.float_bytes(info, range)?;
        crate::dtype::decode_f32(dtype, src, dst);
        Ok(())
    }

    /// `read_f32`, and the index (in `dst`) of the first ±inf/NaN.
    pub fn read_f32_finite(&self, info: &TensorInfo, range: Range<usize>, dst: &mut [f32]) -> Result<Option<usize>> {
        let (dtype, src) = self.float_bytes(info, range)?;
        Ok(crate::dtype::decode_f32_finite(dtype, src, dst))
    }

    /// The stored bytes of elements `range` of a float tensor, and their dtype.
    fn float_bytes(&self, info: &TensorInfo, range: Range<usize>) -> Result<(Dtype, &[u8])> {
        let dtype = info.dtype.ok_or_else(|| {
            Error::invalid(self.shard_path(info), Some(&info.name), format!("dtype {:?} cannot be merged (only float tensors)", info.raw_dtype))
        })?;
        let sz = dtype.size();
        Ok((dtype, &self.bytes(info)[range.start * sz..range.end * sz]))
    }

    /// Drops the tensor's pages from this process's memory: merges read each tensor once,
    /// so keeping them mapped would only grow the resident set up to the model's size.
    pub fn release(&self, info: &TensorInfo) {
        let mmap = &self.shards[info.shard as usize].mmap;
        let page = 4096;
        let start = info.span.start / page * page;
        let end = info.span.end.min(mmap.len());
        if end > start {
            // SAFETY: the mapping is read-only and file-backed: dropped pages are read again
            // from the file if touched later, so no data can be lost or changed.
            unsafe {
                let _ = mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
            }
        }
    }
}

/// Maps one file and validates its header completely.
fn open_shard(file: &Path, shard_idx: u32) -> Result<(Shard, Vec<TensorInfo>)> {
    let f = File::open(file).map_err(|e| Error::io(file, e))?;
    let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
    if len < 8 {
        return Err(Error::invalid(file, None, format!("file is {len} bytes, shorter than the 8-byte header length")));
    }
    // SAFETY: inputs are only ever opened read-only; merge_fast never writes to or truncates
    // a file it maps (outputs go to a fresh folder).
    let mmap = unsafe { memmap2::MmapOptions::new().map(&f) }.map_err(|e| Error::io(file, e))?;
    let n = u64::from_le_bytes(mmap[..8].try_into().unwrap());
    if n > MAX_HEADER || n > len - 8 {
        return Err(Error::invalid(file, None, format!("header length {n} runs past the end of the file ({len} bytes)")));
    }
    let header_end = 8 + n as usize;
    let header = std::str::from_utf8(&mmap[8..header_end]).map_err(|e| Error::invalid(file, None, format!("header is not UTF-8: {e}")))?;
    // Entries stay raw text until parsed one by one straight into `StInfo`: no JSON tree
    // of the whole header (which costs several hundred bytes per tensor).
    let raw: BTreeMap<String, &serde_json::value::RawValue> =
        serde_json::from_str(header).map_err(|e| Error::invalid(file, None, format!("header is not valid JSON: {e}")))?;
    let data_len = mmap.len() - header_end;
    let mut metadata = BTreeMap::new();
    let mut infos = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata =
                serde_json::from_str(value.get()).map_err(|e| Error::invalid(file, None, format!("__metadata__ is not a map of strings: {e}")))?;
            continue;
        }
        let st: StInfo = serde_json::from_str(value.get()).map_err(|e| {
            let v: serde_json::Value = serde_json::from_str(value.get()).unwrap_or_default();
            let dt = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            let msg = if e.to_string().contains("unknown variant") { format!("unknown dtype '{dt}'") } else { format!("bad entry {v}: {e}") };
            Error::invalid(file, Some(&name), msg)
        })?;
        let (s, e) = st.data_offsets;
        let nbytes =
            st.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(st.dtype.bitsize())).map(|bits| bits.div_ceil(8));
        if e < s {
            return Err(Error::invalid(file, Some(&name), format!("data_offsets [{s}, {e}) end before they start")));
        }
        if nbytes != Some(e - s) {
            return Err(Error::invalid(
                file,
                Some(&name),
                format!(
                    "shape {:?} of dtype {:?} needs {} bytes but data_offsets [{s}, {e}) span {}",
                    st.shape,
                    st.dtype,
                    nbytes.map_or("too many".into(), |b| b.to_string()),
                    e - s
                ),
            ));
        }
        if e > data_len {
            return Err(Error::invalid(
                file,
                Some(&name),
                format!("data_offsets [{s}, {e}) run past the end of the data section ({data_len} bytes): truncated file?"),
            ));
        }
        infos.push(TensorInfo {
            dtype: Dtype::from_safetensors(st.dtype),
            raw_dtype: st.dtype,
            shape: st.shape.into(),
            shard: shard_idx,
            span: header_end + s..header_end + e,
            name: name.into_boxed_str(),
        });
    }
    infos.sort_by_key(|a| (a.span.start, a.span.end));
    for w in infos.windows(2) {
        if w[1].span.start < w[0].span.end {
            return Err(Error::invalid(file, Some(&w[1].name), format!("data overlaps tensor '{}'", w[0].name)));
        }
    }
    // What every loader demands on top (the safetensors crate's checks, done here without
    // parsing the header a second time): data packed from the start, no holes, nothing after.
    if !header.starts_with('{') {
        return Err(Error::invalid(file, None, "header does not start with '{'"));
    }
    let mut pos = header_end;
    for i in &infos {
        if i.span.start != pos {
            return Err(Error::invalid(
                file,
                Some(&i.name),
                format!(
                    "data starts at offset {} but the previous tensor ends at {}: a hole in the data section",
                    i.span.start - header_end,
                    pos - header_end
                ),
            ));
        }
        pos = i.span.end;
    }
    if pos != mmap.len() {
        return Err(Error::invalid(file, None, format!("{} bytes after the last tensor's data", mmap.len() - pos)));
    }
    Ok((Shard { path: file.to_path_buf(), mmap, metadata }, infos))
}
