//! The plan: every output tensor, where its inputs come from, and how to merge them.
//! Python builds it (configs, parameter gradients, filters) and hands it over as JSON;
//! `resolve` checks all of it against the opened checkpoints before any data is read.
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::methods::{self, Method};
use crate::reader::{Checkpoint, TensorInfo};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;

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
}

fn default_shard() -> u64 {
    DEFAULT_MAX_SHARD_SIZE
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub method: String,
    #[serde(default)]
    pub params: Map<String, Value>,
    #[serde(default)]
    pub base: Option<Source>,
    #[serde(default)]
    pub inputs: Vec<Source>,
    /// Output dtype; default: the base's (or first input's) dtype.
    #[serde(default)]
    pub dtype: Option<String>,
}

/// Where one input tensor of a merge comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A stored tensor, read as it is.
    Tensor { input: usize, tensor: String },
}

/// A source bound to its checkpoint, ready to read.
pub enum Reader<'a> {
    Tensor { ckpt: &'a Checkpoint, info: &'a TensorInfo },
}

impl<'a> Reader<'a> {
    fn bind(src: &Source, ckpts: &'a [Checkpoint], out_name: &str) -> Result<Reader<'a>> {
        match src {
            Source::Tensor { input, tensor } => {
                let ckpt = ckpts
                    .get(*input)
                    .ok_or_else(|| Error::config(format!("output '{out_name}': source names input #{input}, but only {} inputs are given", ckpts.len())))?;
                let info = ckpt.info(tensor).ok_or_else(|| {
                    Error::mismatch(tensor.as_str(), format!("missing from {} (needed for output '{out_name}')", ckpt.root().display()))
                })?;
                if info.dtype.is_none() {
                    return Err(Error::invalid(ckpt.shard_path(info), Some(tensor), format!("dtype {:?} cannot be merged (only float tensors)", info.raw_dtype)));
                }
                Ok(Reader::Tensor { ckpt, info })
            }
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Reader::Tensor { info, .. } => &info.shape,
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Reader::Tensor { info, .. } => info.dtype.expect("checked at bind"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Reader::Tensor { ckpt, info } => format!("'{}' in {}", info.name, ckpt.root().display()),
        }
    }

    /// Bytes this source reads from disk.
    pub fn nbytes(&self) -> u64 {
        match self {
            Reader::Tensor { info, .. } => info.span.len() as u64,
        }
    }

    pub fn read(&self, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        match self {
            Reader::Tensor { ckpt, info } => ckpt.read_f32(info, range, dst),
        }
    }

    pub fn release(&self) {
        match self {
            Reader::Tensor { ckpt, info } => ckpt.release(info),
        }
    }
}

/// One output tensor, validated and ready to run.
pub struct Job<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub method: Box<dyn Method>,
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

/// Checks the whole plan against the checkpoints: every source exists, shapes agree,
/// dtypes are readable and writable, methods and parameters are valid. No data is read.
pub fn resolve<'a>(plan: &'a PlanSpec, ckpts: &'a [Checkpoint]) -> Result<Vec<Job<'a>>> {
    let mut seen = HashSet::new();
    let mut jobs = Vec::with_capacity(plan.tensors.len());
    for t in &plan.tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::config(format!("output tensor '{}' is planned twice", t.name)));
        }
        let base = t.base.as_ref().map(|s| Reader::bind(s, ckpts, &t.name)).transpose()?;
        let inputs = t.inputs.iter().map(|s| Reader::bind(s, ckpts, &t.name)).collect::<Result<Vec<_>>>()?;
        let first = base.as_ref().or(inputs.first()).ok_or_else(|| Error::config(format!("output '{}' has no inputs", t.name)))?;
        let shape = first.shape().to_vec();
        for r in base.iter().chain(&inputs) {
            if r.shape() != shape.as_slice() {
                return Err(Error::mismatch(t.name.as_str(), format!(
                    "shape {:?} of {} differs from shape {:?} of {}", r.shape(), r.describe(), shape, first.describe())));
            }
        }
        let dtype = match &t.dtype {
            Some(d) => Dtype::parse(d).filter(|d| d.writable()).ok_or_else(|| {
                Error::config(format!("output '{}': cannot write dtype '{d}' (float32, float16 or bfloat16)", t.name))
            })?,
            None if first.dtype().writable() => first.dtype(),
            None => Dtype::F32,
        };
        let method = methods::build(&t.method, &t.params, inputs.len(), base.is_some())
            .map_err(|e| match e {
                Error::Config(m) => Error::config(format!("output '{}': {m}", t.name)),
                e => e,
            })?;
        jobs.push(Job { name: &t.name, shape, dtype, method, base, inputs });
    }
    Ok(jobs)
}
