//! The plan: every output tensor, where its inputs come from, and how to merge them.
//! Python builds it (configs, parameter gradients, filters) and hands it over as JSON;
//! `resolve` checks all of it against the opened checkpoints before any data is read.
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernel::Method;
use crate::methods;
use crate::reader::{Checkpoint, TensorInfo};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod affine;
pub use affine::{AffineReader, AffineSpec};

pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Checkpoints (files or folders); sources refer to them by position.
    pub inputs: Vec<PathBuf>,
    pub tensors: Vec<TensorSpec>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_shard")]
    pub max_shard_size: u64,
    /// Written into every shard's `__metadata__` (with `format: pt`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Run only the tensors of these output shards (indices into the full layout) and write
    /// only their files, laid out exactly as in the full run; no index. A distributed
    /// executor runs disjoint subsets in separate processes and writes the index itself.
    #[serde(default)]
    pub only_shards: Option<Vec<usize>>,
    /// Write the output around the page cache (`O_DIRECT`): for an output the caller
    /// fsyncs before use, whose bytes must reach the disk anyway.
    #[serde(default)]
    pub direct_io: bool,
    /// Parameter sets shared by many tensors (`TensorSpec::params_id`): one JSON map per
    /// tensor costs hundreds of bytes, and most merges have a handful of distinct sets.
    #[serde(default)]
    pub param_sets: Vec<Map<String, Value>>,
    /// Defaults for the tensors (most plans merge every tensor the same way): one method
    /// string, parameter set and source list per plan instead of one per tensor.
    /// The method of every tensor that names none.
    #[serde(default)]
    pub default_method: Option<String>,
    /// The parameter set of every tensor that gives neither `params` nor `params_id`.
    #[serde(default)]
    pub default_params_id: Option<u32>,
    /// The sources of every tensor that gives neither `base` nor `inputs`.
    #[serde(default)]
    pub default_base: Option<Source>,
    #[serde(default)]
    pub default_inputs: Vec<Source>,
}

fn default_shard() -> u64 {
    DEFAULT_MAX_SHARD_SIZE
}

/// One output tensor. A plan holds one per tensor for the whole merge, so it is kept lean
/// (no `String`/`Vec` headroom, the name shared with the output layout, the method and
/// parameters usually given once for the whole plan): see `plan_structs_stay_small`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    #[serde(deserialize_with = "shared_str")]
    pub name: Arc<str>,
    /// Default: the plan's `default_method`.
    #[serde(default)]
    pub method: Option<Box<str>>,
    /// Inline parameters (absent: the set `params_id` names, else the plan's
    /// `default_params_id`, else none).
    #[serde(default)]
    pub params: Option<Box<Map<String, Value>>>,
    /// Index into `PlanSpec::param_sets`, instead of `params`.
    #[serde(default)]
    pub params_id: Option<u32>,
    /// `base` and `inputs` both absent: the plan's `default_base` and `default_inputs`
    /// (an empty `inputs` list is no inputs, not the default).
    #[serde(default)]
    pub base: Option<Source>,
    #[serde(default)]
    pub inputs: Option<Box<[Source]>>,
    /// Output dtype; default: the base's (or first input's) dtype.
    #[serde(default)]
    pub dtype: Option<Box<str>>,
}

fn shared_str<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Arc<str>, D::Error> {
    String::deserialize(d).map(Arc::from)
}

impl PlanSpec {
    /// The tensor's method: its own, else the plan's.
    pub fn method_of<'a>(&'a self, t: &'a TensorSpec) -> Option<&'a str> {
        t.method.as_deref().or(self.default_method.as_deref())
    }

    /// The tensor's parameter set (index into `param_sets`), if it uses one.
    pub fn params_id_of(&self, t: &TensorSpec) -> Option<u32> {
        t.params_id.or(self.default_params_id.filter(|_| t.params.is_none()))
    }

    /// The tensor's base and inputs: its own, else the plan's.
    pub fn sources_of<'a>(&'a self, t: &'a TensorSpec) -> (Option<&'a Source>, &'a [Source]) {
        match (&t.base, &t.inputs) {
            (None, None) => (self.default_base.as_ref(), &self.default_inputs),
            (base, inputs) => (base.as_ref(), inputs.as_deref().unwrap_or_default()),
        }
    }
}

/// Where one input tensor of a merge comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A stored tensor, read as it is; `tensor` defaults to the output tensor's name.
    Tensor {
        /// u32 and a boxed name keep this variant (a plan holds one per input per tensor)
        /// at 24 bytes.
        input: u32,
        #[serde(default)]
        tensor: Option<Box<str>>,
    },
    /// A LoRA-adapted weight, materialized on the fly (boxed, like `Rows`: a plan holds a
    /// source per input per tensor, and the common `Tensor` variant is a third their size).
    Lora(Box<LoraSpec>),
    /// Rows gathered from other sources along axis 0 (vocabulary permutations).
    Rows(Box<RowsSpec>),
    /// `scale · L · S · diag(g) · R · diag(h)` of another source (cross-architecture
    /// alignment; see `affine.rs`).
    Affine(Box<AffineSpec>),
}

/// `base + scale · B·A` (PEFT layout: A is `[r, in]`, B is `[out, r]`, base `[out, in]`).
/// With `transpose` (PEFT embedding adapters: A `[r, num_embeddings]`, B `[dim, r]`) the
/// delta is `(B·A)ᵀ`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub base: Source,
    pub a: TensorRef,
    pub b: TensorRef,
    pub scale: f64,
    #[serde(default)]
    pub transpose: bool,
}

/// Output row `i` is the mean of the listed `[source, row]` pairs of `rows[i]`, zeros when
/// empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowsSpec {
    pub sources: Vec<Source>,
    pub shape: Vec<usize>,
    pub rows: Vec<Vec<(usize, usize)>>,
}

/// One stored tensor of one input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRef {
    pub input: usize,
    pub tensor: String,
}

/// A source bound to its checkpoint, ready to read.
pub enum Reader<'a> {
    Tensor { ckpt: &'a Checkpoint, info: &'a TensorInfo },
    Lora(Box<LoraReader<'a>>),
    Rows(Box<RowsReader<'a>>),
    Affine(Box<AffineReader<'a>>),
}

/// `base + scale · B·A`, computed for any element range; the (small) factors are read on
/// first use and dropped on `release`, B·A itself is never materialized.
/// (A as `[r, n]`, B transposed to `[r, m]`): delta[i, j] = Σ_k A'[k, ·] B'[k, ·].
type LoraFactors = Arc<(Vec<f32>, Vec<f32>)>;

pub struct LoraReader<'a> {
    base: Reader<'a>,
    a: (&'a Checkpoint, &'a TensorInfo),
    b: (&'a Checkpoint, &'a TensorInfo),
    scale: f32,
    transpose: bool,
    rank: usize,
    cols: usize,
    factors: Mutex<Option<LoraFactors>>,
}

pub struct RowsReader<'a> {
    sources: Vec<Reader<'a>>,
    shape: &'a [usize],
    row_len: usize,
    rows: &'a [Vec<(usize, usize)>],
    dtype: Dtype,
}

fn bind_ref<'a>(r: &TensorRef, ckpts: &'a [Checkpoint], out_name: &str) -> Result<(&'a Checkpoint, &'a TensorInfo)> {
    lookup(r.input, &r.tensor, ckpts, out_name)
}

fn lookup<'a>(input: usize, tensor: &str, ckpts: &'a [Checkpoint], out_name: &str) -> Result<(&'a Checkpoint, &'a TensorInfo)> {
    let (ckpt, info) = find(input, tensor, ckpts, out_name)?;
    if info.dtype.is_none() {
        return Err(Error::invalid(ckpt.shard_path(info), Some(tensor), format!("dtype {:?} cannot be merged (only float tensors)", info.raw_dtype)));
    }
    Ok((ckpt, info))
}

/// A stored tensor of any dtype.
fn find<'a>(input: usize, tensor: &str, ckpts: &'a [Checkpoint], out_name: &str) -> Result<(&'a Checkpoint, &'a TensorInfo)> {
    let ckpt = ckpts
        .get(input)
        .ok_or_else(|| Error::config(format!("output '{out_name}': source names input #{input}, but only {} inputs are given", ckpts.len())))?;
    let info = ckpt
        .info(tensor)
        .ok_or_else(|| Error::mismatch(tensor, format!("missing from {} (needed for output '{out_name}')", ckpt.root().display())))?;
    Ok((ckpt, info))
}

impl LoraReader<'_> {
    fn factors(&self) -> Result<Arc<(Vec<f32>, Vec<f32>)>> {
        let mut slot = self.factors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = slot.as_ref() {
            return Ok(Arc::clone(f));
        }
        let read = |(c, i): (&Checkpoint, &TensorInfo)| -> Result<Vec<f32>> {
            let mut v = vec![0f32; i.numel()];
            c.read_f32(i, 0..i.numel(), &mut v)?;
            Ok(v)
        };
        let (a, b) = (read(self.a)?, read(self.b)?);
        let r = self.rank;
        // B is [m, r]; store it as [r, m] so both factors are read along rows.
        let m = b.len() / r;
        let mut bt = vec![0f32; b.len()];
        for i in 0..m {
            for k in 0..r {
                bt[k * m + i] = b[i * r + k];
            }
        }
        let f = Arc::new((a, bt));
        *slot = Some(Arc::clone(&f));
        Ok(f)
    }

    fn release(&self) {
        *self.factors.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.base.release();
        self.a.0.release(self.a.1);
        self.b.0.release(self.b.1);
    }

    fn read(&self, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        self.base.read(range.clone(), dst)?;
        let f = self.factors()?;
        let (a, bt) = (&f.0, &f.1);
        let (r, cols) = (self.rank, self.cols);
        let (na, nb) = (a.len() / r, bt.len() / r);
        let mut pos = range.start;
        while pos < range.end {
            let row = pos / cols;
            let c0 = pos % cols;
            let c1 = cols.min(c0 + (range.end - pos));
            let out = &mut dst[pos - range.start..pos - range.start + (c1 - c0)];
            for k in 0..r {
                // Normal: delta[row, c] = Σ_k B[row,k] A[k,c]; transposed: Σ_k B[c,k] A[k,row].
                let (coef, vec) =
                    if self.transpose { (a[k * na + row], &bt[k * nb + c0..k * nb + c1]) } else { (bt[k * nb + row], &a[k * na + c0..k * na + c1]) };
                let coef = coef * self.scale;
                out.iter_mut().zip(vec).for_each(|(o, &v)| *o += coef * v);
            }
            pos += c1 - c0;
        }
        Ok(())
    }
}

impl RowsReader<'_> {
    fn read(&self, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        let n = self.row_len.max(1);
        let mut tmp = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let row = pos / n;
            let c0 = pos % n;
            let c1 = n.min(c0 + (range.end - pos));
            let out = &mut dst[pos - range.start..pos - range.start + (c1 - c0)];
            out.iter_mut().for_each(|o| *o = 0.0);
            let list = &self.rows[row];
            tmp.resize(c1 - c0, 0.0);
            for &(s, r) in list {
                self.sources[s].read(r * n + c0..r * n + c1, &mut tmp)?;
                out.iter_mut().zip(&tmp).for_each(|(o, &v)| *o += v);
            }
            if list.len() > 1 {
                let inv = 1.0 / list.len() as f32;
                out.iter_mut().for_each(|o| *o *= inv);
            }
            pos += c1 - c0;
        }
        Ok(())
    }
}

impl<'a> Reader<'a> {
    fn bind(src: &'a Source, ckpts: &'a [Checkpoint], out_name: &str) -> Result<Reader<'a>> {
        match src {
            Source::Tensor { input, tensor } => {
                let (ckpt, info) = lookup(*input as usize, tensor.as_deref().unwrap_or(out_name), ckpts, out_name)?;
                Ok(Reader::Tensor { ckpt, info })
            }
            Source::Lora(l) => {
                let LoraSpec { base, a, b, scale, transpose } = &**l;
                let base = Reader::bind(base, ckpts, out_name)?;
                let (a, b) = (bind_ref(a, ckpts, out_name)?, bind_ref(b, ckpts, out_name)?);
                let what = || format!("LoRA factors {} {:?} and {} {:?}", a.1.name, a.1.shape, b.1.name, b.1.shape);
                let shape = base.shape().to_vec();
                if shape.len() != 2 || a.1.shape.len() != 2 || b.1.shape.len() != 2 {
                    return Err(Error::mismatch(out_name, format!("{} need a 2-D base weight, got {shape:?}", what())));
                }
                let (rows, cols) = (shape[0], shape[1]);
                let (ra, na) = (a.1.shape[0], a.1.shape[1]);
                let (mb, rb) = (b.1.shape[0], b.1.shape[1]);
                if ra != rb {
                    return Err(Error::mismatch(out_name, format!("rank mismatch: {} (A has rank {ra}, B has rank {rb})", what())));
                }
                let fits = if *transpose { na == rows && mb == cols } else { mb == rows && na == cols };
                if !fits {
                    return Err(Error::mismatch(out_name, format!("{} do not fit base weight {} of shape {shape:?}", what(), base.describe())));
                }
                if !scale.is_finite() {
                    return Err(Error::config(format!("output '{out_name}': LoRA scale must be finite, got {scale}")));
                }
                Ok(Reader::Lora(Box::new(LoraReader {
                    base,
                    a,
                    b,
                    scale: *scale as f32,
                    transpose: *transpose,
                    rank: ra.max(1),
                    cols,
                    factors: Mutex::new(None),
                })))
            }
            Source::Rows(r) => {
                let RowsSpec { sources, shape, rows } = &**r;
                let readers = sources.iter().map(|s| Reader::bind(s, ckpts, out_name)).collect::<Result<Vec<_>>>()?;
                if shape.is_empty() || rows.len() != shape[0] {
                    return Err(Error::config(format!("output '{out_name}': row gather lists {} rows for shape {shape:?}", rows.len())));
                }
                let row_len: usize = shape[1..].iter().product();
                for r in &readers {
                    if r.shape().len() != shape.len() || r.shape()[1..] != shape[1..] {
                        return Err(Error::mismatch(
                            out_name,
                            format!("row source {} has shape {:?}, rows of {:?} expected", r.describe(), r.shape(), &shape[1..]),
                        ));
                    }
                }
                for (i, list) in rows.iter().enumerate() {
                    for &(s, r) in list {
                        let src = readers
                            .get(s)
                            .ok_or_else(|| Error::config(format!("output '{out_name}': row {i} names source #{s} of {}", readers.len())))?;
                        if r >= src.shape()[0] {
                            return Err(Error::config(format!(
                                "output '{out_name}': row {i} takes row {r} of {}, which has {}",
                                src.describe(),
                                src.shape()[0]
                            )));
                        }
                    }
                }
                let dtype = readers.first().map(|r| r.dtype()).unwrap_or(Dtype::F32);
                Ok(Reader::Rows(Box::new(RowsReader { sources: readers, shape: shape.as_slice(), row_len, rows: rows.as_slice(), dtype })))
            }
            Source::Affine(a) => Ok(Reader::Affine(Box::new(AffineReader::bind(a, ckpts, out_name)?))),
        }
    }

    pub fn shape(&self) -> &'a [usize] {
        match self {
            Reader::Tensor { info, .. } => {
                let info: &'a TensorInfo = info;
                &info.shape
            }
            Reader::Lora(l) => l.base.shape(),
            Reader::Rows(r) => r.shape,
            Reader::Affine(a) => a.shape,
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Reader::Tensor { info, .. } => info.dtype.expect("checked at bind"),
            Reader::Lora(l) => l.base.dtype(),
            Reader::Rows(r) => r.dtype,
            Reader::Affine(a) => a.dtype(),
        }
    }

    /// The checkpoint folder (or file) the data comes from.
    pub fn root(&self) -> &Path {
        match self {
            Reader::Tensor { ckpt, .. } => ckpt.root(),
            Reader::Lora(l) => l.base.root(),
            Reader::Rows(r) => r.sources.first().map_or(Path::new(""), |s| s.root()),
            Reader::Affine(a) => a.root(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Reader::Tensor { ckpt, info } => {
                format!("'{}' in {}", info.name, ckpt.root().display())
            }
            Reader::Lora(l) => format!("{} + LoRA '{}'/'{}' in {}", l.base.describe(), l.a.1.name, l.b.1.name, l.a.0.root().display()),
            Reader::Rows(r) => format!("rows gathered from [{}]", r.sources.iter().map(|s| s.describe()).collect::<Vec<_>>().join(", ")),
            Reader::Affine(a) => a.describe(),
        }
    }

    /// Bytes this source reads from disk.
    pub fn nbytes(&self) -> u64 {
        match self {
            Reader::Tensor { info, .. } => info.span.len() as u64,
            Reader::Lora(l) => l.base.nbytes() + l.a.1.span.len() as u64 + l.b.1.span.len() as u64,
            Reader::Rows(r) => r.sources.iter().map(|s| s.nbytes()).sum(),
            Reader::Affine(a) => a.nbytes(),
        }
    }

    pub fn read(&self, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        match self {
            Reader::Tensor { ckpt, info } => ckpt.read_f32(info, range, dst),
            Reader::Lora(l) => l.read(range, dst),
            Reader::Rows(r) => r.read(range, dst),
            Reader::Affine(a) => a.read(range, dst),
        }
    }

    /// `read`, and the index of the first ±inf/NaN read (see `TensorIo::read_finite`).
    pub fn read_finite(&self, range: Range<usize>, dst: &mut [f32]) -> Result<Option<usize>> {
        match self {
            Reader::Tensor { ckpt, info } => ckpt.read_f32_finite(info, range, dst),
            _ => {
                self.read(range, dst)?;
                Ok(crate::dtype::first_non_finite(dst))
            }
        }
    }

    /// A source made as a product of factors (`affine`): those factors, for kernels that
    /// only need the product's products (see [`crate::linalg::LinOp`]); `None` for the others.
    pub fn factors(&self) -> Result<Option<crate::linalg::AffineMap>> {
        match self {
            Reader::Affine(a) => a.factors().map(Some),
            _ => Ok(None),
        }
    }

    pub fn release(&self) {
        match self {
            Reader::Tensor { ckpt, info } => ckpt.release(info),
            Reader::Lora(l) => l.release(),
            Reader::Rows(r) => r.sources.iter().for_each(|s| s.release()),
            Reader::Affine(a) => a.release(),
        }
    }
}

/// One output tensor, validated and ready to run.
pub struct Job<'a> {
    pub name: &'a str,
    /// Borrowed from the checkpoint (or the plan): not one more allocation per tensor.
    pub shape: &'a [usize],
    /// Output dtype (float tensors).
    pub dtype: Dtype,
    /// Set for a non-float tensor (I64 position ids, U8 quantization metadata...): copied
    /// unchanged from the first source, after checking every source holds the same bytes.
    pub raw: Option<safetensors::Dtype>,
    /// Shared by every tensor with the same method, parameter set and inputs.
    pub method: Arc<dyn Method>,
    pub base: Option<Reader<'a>>,
    pub inputs: Vec<Reader<'a>>,
}

impl Job<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn sources(&self) -> impl Iterator<Item = &Reader<'_>> {
        self.base.iter().chain(self.inputs.iter())
    }
}

/// Method instances by (method, parameter set, inputs, base): a method depends only on
/// these, so tensors sharing them share one instance.
pub type Methods<'a> = HashMap<(&'a str, usize, usize, bool), Arc<dyn Method>>;

/// Checks the whole plan against the checkpoints: every source exists, shapes agree,
/// dtypes are readable and writable, methods and parameters are valid. No data is read.
pub fn resolve<'a>(plan: &'a PlanSpec, ckpts: &'a [Checkpoint]) -> Result<Vec<Job<'a>>> {
    let mut jobs = Vec::with_capacity(plan.tensors.len());
    resolve_each(plan, ckpts, &mut Methods::new(), |_, j| {
        jobs.push(j);
        Ok(())
    })?;
    Ok(jobs)
}

/// `resolve`, handing each job to `f` in plan order instead of keeping them all: a job per
/// tensor costs ~200 B, and the engine re-binds each one (`resolve_job`) when it runs it.
pub fn resolve_each<'a>(
    plan: &'a PlanSpec,
    ckpts: &'a [Checkpoint],
    methods: &mut Methods<'a>,
    mut f: impl FnMut(&'a TensorSpec, Job<'a>) -> Result<()>,
) -> Result<()> {
    let mut seen = HashSet::new();
    for t in &plan.tensors {
        if !seen.insert(&*t.name) {
            return Err(Error::config(format!("output tensor '{}' is planned twice", t.name)));
        }
        f(t, resolve_job(plan, t, ckpts, methods)?)?;
    }
    Ok(())
}

/// Binds and checks one output tensor of `plan` (see `resolve`; duplicates are its check).
pub fn resolve_job<'a>(plan: &'a PlanSpec, t: &'a TensorSpec, ckpts: &'a [Checkpoint], methods: &mut Methods<'a>) -> Result<Job<'a>> {
    let name: &'a str = &t.name;
    let (base, inputs) = plan.sources_of(t);
    let raw = raw_dtype(name, base, inputs, ckpts)?;
    let bind = |s: &'a Source| match (raw, s) {
        (Some(_), Source::Tensor { input, tensor }) => {
            find(*input as usize, tensor.as_deref().unwrap_or(name), ckpts, name).map(|(ckpt, info)| Reader::Tensor { ckpt, info })
        }
        _ => Reader::bind(s, ckpts, name),
    };
    let base = base.map(bind).transpose()?;
    let inputs = inputs.iter().map(bind).collect::<Result<Vec<_>>>()?;
    let first = base.as_ref().or(inputs.first()).ok_or_else(|| Error::config(format!("output '{name}' has no inputs")))?;
    let shape = first.shape();
    let dtype = match &t.dtype {
        _ if raw.is_some() => Dtype::F32, // unused: raw tensors keep their dtype
        Some(d) => Dtype::parse(d)
            .filter(|d| d.writable())
            .ok_or_else(|| Error::config(format!("output '{name}': cannot write dtype '{d}' (float32, float16 or bfloat16)")))?,
        None if first.dtype().writable() => first.dtype(),
        None => Dtype::F32,
    };
    let method_name = plan.method_of(t).ok_or_else(|| Error::config(format!("output '{name}' names no method (and the plan has no default)")))?;
    let inline = t.params.as_deref().filter(|p| !p.is_empty());
    let no_params = Map::new();
    let params_id = plan.params_id_of(t);
    let params = match (params_id, inline) {
        (None, p) => p.unwrap_or(&no_params),
        (Some(k), p) => plan.param_sets.get(k as usize).filter(|_| p.is_none()).ok_or_else(|| {
            Error::config(format!("output '{name}': params_id {k} with {} parameter sets (and no inline params)", plan.param_sets.len()))
        })?,
    };
    let key = params_id.filter(|_| inline.is_none()).map(|k| (method_name, k as usize, inputs.len(), base.is_some()));
    let method = match key.and_then(|k| methods.get(&k)) {
        Some(m) => Arc::clone(m),
        None => {
            let m: Arc<dyn Method> = methods::build(method_name, params, inputs.len(), base.is_some())
                .map_err(|e| match e {
                    Error::Config(m) => Error::config(format!("output '{name}': {m}")),
                    e => e,
                })?
                .into();
            if let Some(k) = key {
                methods.insert(k, Arc::clone(&m));
            }
            m
        }
    };
    // A method's auxiliary inputs (Gram matrices) have shapes of their own, checked by it.
    let main = inputs.len() - method.aux_inputs().min(inputs.len());
    for r in base.iter().chain(&inputs[..main]) {
        if r.shape() != shape {
            return Err(Error::mismatch(
                name,
                format!("shape {:?} of {} differs from shape {:?} of {}", r.shape(), r.describe(), shape, first.describe()),
            ));
        }
    }
    let aux: Vec<&[usize]> = inputs[main..].iter().map(|r| r.shape()).collect();
    if let Err((k, why)) = method.check_aux(shape, &aux) {
        return Err(Error::mismatch(name, format!("{} (shape {:?}): {why}", inputs[main + k].describe(), aux[k])));
    }
    Ok(Job { name, shape, dtype, raw, method, base, inputs })
}

/// `Some(dtype)` when the output's sources are stored non-float tensors (all of one dtype);
/// a mix of float and non-float sources is a mismatch naming the tensor.
fn raw_dtype(name: &str, base: Option<&Source>, inputs: &[Source], ckpts: &[Checkpoint]) -> Result<Option<safetensors::Dtype>> {
    let kind = |s: &Source| match s {
        Source::Tensor { input, tensor } => {
            let c = ckpts.get(*input as usize)?;
            c.info(tensor.as_deref().unwrap_or(name)).and_then(|i| i.dtype.is_none().then_some((i.raw_dtype, c.root())))
        }
        _ => None,
    };
    let kinds: Vec<_> = base.into_iter().chain(inputs).map(kind).collect();
    let Some((first, root)) = kinds.iter().flatten().next().copied() else {
        return Ok(None);
    };
    if let Some(i) = kinds.iter().position(|k| k.map(|k| k.0) != Some(first)) {
        let other = match kinds[i] {
            Some((d, r)) => format!("{d:?} in {}", r.display()),
            None => "a float tensor (or an adapter/row source)".into(),
        };
        return Err(Error::mismatch(
            name,
            format!(
                "{first:?} in {} but {other}: non-float tensors are copied unchanged, so every model must hold the same dtype and values",
                root.display()
            ),
        ));
    }
    Ok(Some(first))
}

#[cfg(test)]
mod source_tests {
    use super::*;

    #[test]
    fn plan_sources_stay_small() {
        // one per input per tensor of a plan: 200k-tensor checkpoints need it lean
        assert!(std::mem::size_of::<Source>() <= 24, "{}", std::mem::size_of::<Source>());
        assert!(std::mem::size_of::<Option<Source>>() <= 24);
    }

    #[test]
    fn plan_structs_stay_small() {
        // One of each per tensor for the whole merge (issue 8: <= 1 KB per tensor on
        // 200k-tensor models). A `String` or `Vec` field adds 24 bytes plus a heap block:
        // share names (`Arc<str>`), inline shapes (`Shape`), put defaults on the plan.
        use std::mem::size_of;
        assert!(size_of::<TensorSpec>() <= 104, "TensorSpec: {}", size_of::<TensorSpec>());
        assert!(size_of::<TensorInfo>() <= 72, "TensorInfo: {}", size_of::<TensorInfo>());
        assert!(size_of::<crate::reader::Shape>() <= 32, "Shape: {}", size_of::<crate::reader::Shape>());
        assert!(size_of::<OutSpec>() <= 56, "OutSpec: {}", size_of::<OutSpec>());
    }

    #[test]
    fn plan_defaults_apply_only_where_a_tensor_gives_none() {
        let tmp = tempfile::tempdir().unwrap();
        let shape = vec![2usize, 3];
        write(&tmp.path().join("a"), &[("w", shape.clone(), vals(6, 1)), ("v", shape.clone(), vals(6, 2))]);
        write(&tmp.path().join("b"), &[("w", shape.clone(), vals(6, 3)), ("v", shape.clone(), vals(6, 4))]);
        let dir = tmp.path().display();
        let json = format!(
            r#"{{"inputs":["{dir}/a","{dir}/b"],"param_sets":[{{}},{{"weight":2.0}}],"default_method":"linear",
               "default_params_id":1,"default_inputs":[{{"kind":"tensor","input":0}},{{"kind":"tensor","input":1}}],
               "tensors":[{{"name":"w"}},{{"name":"v","method":"passthrough","params_id":0,"inputs":[{{"kind":"tensor","input":1}}]}},
                          {{"name":"x","inputs":[]}}]}}"#
        );
        let mut plan: PlanSpec = serde_json::from_str(&json).unwrap();
        let ckpts = vec![Checkpoint::open(tmp.path().join("a")).unwrap(), Checkpoint::open(tmp.path().join("b")).unwrap()];
        let (w, v, x) = (&plan.tensors[0], &plan.tensors[1], &plan.tensors[2]);
        assert_eq!((plan.method_of(w), plan.params_id_of(w), plan.sources_of(w).1.len()), (Some("linear"), Some(1), 2));
        assert_eq!((plan.method_of(v), plan.params_id_of(v), plan.sources_of(v).1.len()), (Some("passthrough"), Some(0), 1));
        // an explicit empty list is no inputs, not the default
        assert!(plan.sources_of(x).1.is_empty());
        let err = resolve(&plan, &ckpts).err().unwrap().to_string();
        assert!(err.contains("output 'x' has no inputs"), "{err}");
        plan.tensors.pop();
        let jobs = resolve(&plan, &ckpts).unwrap();
        assert_eq!((jobs[0].inputs.len(), jobs[1].inputs.len()), (2, 1));
        // without a default method, a tensor naming none is refused, naming it
        plan.default_method = None;
        let err = resolve(&plan, &ckpts).err().unwrap().to_string();
        assert!(err.contains("output 'w' names no method"), "{err}");
    }
    use crate::writer::{OutSpec, ShardedWriter};

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| crate::rng::normal(seed, i as u64) as f32).collect()
    }

    fn write(dir: &std::path::Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        std::fs::create_dir_all(dir).unwrap();
        let specs = tensors.iter().map(|(n, s, _)| OutSpec::new(n.to_string(), Dtype::F32, s.clone())).collect();
        let w = ShardedWriter::create(dir, specs, u64::MAX, &BTreeMap::new()).unwrap();
        for (i, (_, _, v)) in tensors.iter().enumerate() {
            let mut b = vec![0u8; v.len() * 4];
            crate::dtype::encode_f32(Dtype::F32, v, &mut b);
            w.write(i, 0, &b).unwrap();
        }
        w.finish().unwrap();
    }

    fn read_ranges(r: &Reader, n: usize) -> Vec<f32> {
        // odd-sized pieces that start and stop mid-row
        let mut out = vec![0f32; n];
        let mut s = 0;
        let mut step = 7;
        while s < n {
            let e = (s + step).min(n);
            r.read(s..e, &mut out[s..e]).unwrap();
            s = e;
            step = step * 3 % 101 + 5;
        }
        out
    }

    #[test]
    fn lora_and_rows_sources_match_naive_formulas() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, n, r) = (13usize, 11usize, 3usize);
        let (w, a, b, at, bt) = (vals(m * n, 1), vals(r * n, 2), vals(m * r, 3), vals(r * m, 4), vals(n * r, 5));
        write(&tmp.path().join("base"), &[("w", vec![m, n], w.clone())]);
        write(
            &tmp.path().join("ad"),
            &[("A", vec![r, n], a.clone()), ("B", vec![m, r], b.clone()), ("At", vec![r, m], at.clone()), ("Bt", vec![n, r], bt.clone())],
        );
        let ckpts = vec![Checkpoint::open(tmp.path().join("base")).unwrap(), Checkpoint::open(tmp.path().join("ad")).unwrap()];
        let base = || Source::Tensor { input: 0, tensor: Some("w".into()) };
        let tr = |t: &str| TensorRef { input: 1, tensor: t.into() };
        let lora = Source::Lora(Box::new(LoraSpec { base: base(), a: tr("A"), b: tr("B"), scale: 0.5, transpose: false }));
        let got = read_ranges(&Reader::bind(&lora, &ckpts, "w").unwrap(), m * n);
        for i in 0..m {
            for j in 0..n {
                let d: f32 = (0..r).map(|k| b[i * r + k] * a[k * n + j]).sum();
                assert!((got[i * n + j] - (w[i * n + j] + 0.5 * d)).abs() < 1e-5);
            }
        }
        // transposed (embedding / fan_in_fan_out): A [r, m], B [n, r], delta = (B·A)ᵀ
        let lt = Source::Lora(Box::new(LoraSpec { base: base(), a: tr("At"), b: tr("Bt"), scale: 2.0, transpose: true }));
        let got = read_ranges(&Reader::bind(&lt, &ckpts, "w").unwrap(), m * n);
        for i in 0..m {
            for j in 0..n {
                let d: f32 = (0..r).map(|k| bt[j * r + k] * at[k * m + i]).sum();
                assert!((got[i * n + j] - (w[i * n + j] + 2.0 * d)).abs() < 1e-5);
            }
        }
        // factors that do not fit, and a rank mismatch, are refused at bind
        let bad = Source::Lora(Box::new(LoraSpec { base: base(), a: tr("At"), b: tr("B"), scale: 1.0, transpose: false }));
        assert!(matches!(Reader::bind(&bad, &ckpts, "w"), Err(Error::TensorMismatch { .. })));
        let bad = Source::Lora(Box::new(LoraSpec { base: base(), a: tr("A"), b: tr("Bt"), scale: 1.0, transpose: false }));
        assert!(Reader::bind(&bad, &ckpts, "w").is_err());
        // rows: reversed rows of w, row 2 the mean of w[0] and w[1], row 3 zeros
        let mut rows: Vec<Vec<(usize, usize)>> = (0..m).map(|i| vec![(0, m - 1 - i)]).collect();
        rows[2] = vec![(0, 0), (0, 1)];
        rows[3] = vec![];
        let rs = Source::Rows(Box::new(RowsSpec { sources: vec![base()], shape: vec![m, n], rows }));
        let got = read_ranges(&Reader::bind(&rs, &ckpts, "w").unwrap(), m * n);
        for i in 0..m {
            for j in 0..n {
                let want = match i {
                    2 => (w[j] + w[n + j]) / 2.0,
                    3 => 0.0,
                    _ => w[(m - 1 - i) * n + j],
                };
                assert!((got[i * n + j] - want).abs() < 1e-6);
            }
        }
        let oob = Source::Rows(Box::new(RowsSpec { sources: vec![base()], shape: vec![m, n], rows: vec![vec![(0, m)]; m] }));
        assert!(Reader::bind(&oob, &ckpts, "w").is_err());
    }

    #[test]
    fn affine_source_matches_naive_formula() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, n, p, q) = (9usize, 7usize, 5usize, 6usize);
        let (w, l, r, g, h) = (vals(m * n, 11), vals(p * m, 12), vals(n * q, 13), vals(n, 14), vals(q, 15));
        write(&tmp.path().join("d"), &[("w", vec![m, n], w.clone())]);
        write(
            &tmp.path().join("side"),
            &[("L", vec![p, m], l.clone()), ("R", vec![n, q], r.clone()), ("g", vec![n], g.clone()), ("h", vec![q], h.clone())],
        );
        let ckpts = vec![Checkpoint::open(tmp.path().join("d")).unwrap(), Checkpoint::open(tmp.path().join("side")).unwrap()];
        let tr = |t: &str| Some(TensorRef { input: 1, tensor: t.into() });
        let spec = |left, right, right_in, right_out, shape: Vec<usize>| {
            Source::Affine(Box::new(AffineSpec {
                src: Source::Tensor { input: 0, tensor: Some("w".into()) },
                shape,
                left,
                right,
                right_in,
                right_out,
                scale: 0.5,
            }))
        };
        // scale · L · W · diag(g) · R · diag(h), summed in f64
        let full = spec(tr("L"), tr("R"), tr("g"), tr("h"), vec![p, q]);
        let got = read_ranges(&Reader::bind(&full, &ckpts, "w").unwrap(), p * q);
        for i in 0..p {
            for j in 0..q {
                let mut want = 0f64;
                for a in 0..m {
                    for b in 0..n {
                        want += l[i * m + a] as f64 * w[a * n + b] as f64 * g[b] as f64 * r[b * q + j] as f64;
                    }
                }
                want *= 0.5 * h[j] as f64;
                assert!((got[i * q + j] as f64 - want).abs() < 1e-4, "{i} {j}: {} vs {want}", got[i * q + j]);
            }
        }
        // no R: diag(g) scales W's columns
        let cols = spec(None, None, tr("g"), None, vec![m, n]);
        let got = read_ranges(&Reader::bind(&cols, &ckpts, "w").unwrap(), m * n);
        for i in 0..m {
            for j in 0..n {
                assert!((got[i * n + j] - 0.5 * w[i * n + j] * g[j]).abs() < 1e-6);
            }
        }
        // factors that do not fit, or a wrong planned shape, are refused at bind
        assert!(matches!(Reader::bind(&spec(tr("R"), None, None, None, vec![n, n]), &ckpts, "w"), Err(Error::TensorMismatch { .. })));
        assert!(Reader::bind(&spec(None, tr("R"), None, None, vec![m, n]), &ckpts, "w").is_err());
        assert!(Reader::bind(&spec(None, tr("R"), None, tr("g"), vec![m, q]), &ckpts, "w").is_err());
    }
}
