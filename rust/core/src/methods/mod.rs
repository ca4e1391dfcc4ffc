//! Merge methods. Each module holds one method; `build` turns a name and its per-tensor
//! parameters into a ready kernel. Kernels see f32 slices only; reading, chunking,
//! threading and writing belong to the engine.
use crate::error::{Error, Result};
use crate::params::Params;
use serde_json::{Map, Value};

pub mod linear;
pub mod slerp;
pub mod task_arithmetic;

// Families of methods, each with its own registry (`NAMES` + `build`).
pub mod data_aware;
pub mod geometric;
pub mod sparsified;
pub mod spectral;

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

    /// Folds one chunk's statistics into the total (sum by default). The engine folds
    /// chunks in a fixed order, so results never depend on the thread count.
    fn combine(&self, total: &mut [f64], part: &[f64]) {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }

    /// Whole-tensor preparation before any `apply`, with random access to every input
    /// (e.g. a top-k threshold per model, found with one scratch buffer). Its result is the
    /// `stats` given to `apply`. The default streams chunks through `accumulate`/`combine`.
    fn prepare(&self, _ctx: &Ctx, io: &dyn TensorIo) -> Result<Vec<f64>> {
        crate::engine::stream_stats(self, io)
    }

    /// A warning about this tensor's statistics for the user (e.g. a degenerate case the
    /// kernel resolved by a fallback); the engine reports it with the tensor name.
    fn note(&self, _stats: &[f64]) -> Option<String> {
        None
    }

    /// Computes `out` (same length as every input slice).
    fn apply(&self, ctx: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()>;
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
    /// Names input `slot` in messages ("base", "model #1", or the file it comes from).
    fn describe(&self, slot: usize) -> String {
        match (self.has_base(), slot) {
            (true, 0) => "the base".into(),
            (true, s) => format!("model #{}", s - 1),
            (false, s) => format!("model #{s}"),
        }
    }
}

/// How a method uses a base model.
pub(crate) fn check_arity(method: &str, has_base: bool, base: BaseRule, n: usize, min: usize, max: Option<usize>) -> Result<()> {
    match (base, has_base) {
        (BaseRule::Required, false) => return Err(Error::config(format!("{method} needs a base model"))),
        (BaseRule::Forbidden, true) => return Err(Error::config(format!("{method} takes no base model"))),
        _ => {}
    }
    if n < min || max.is_some_and(|m| n > m) {
        let want = match max {
            Some(m) if m == min => format!("exactly {min}"),
            Some(m) => format!("{min} to {m}"),
            None => format!("at least {min}"),
        };
        return Err(Error::config(format!("{method} needs {want} model(s) besides any base, got {n}")));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // Optional is for methods that may take a base (e.g. model_stock)
pub(crate) enum BaseRule {
    Required,
    Optional,
    Forbidden,
}

const BASIC: &[&str] = &["linear", "task_arithmetic", "slerp"];

/// Every method name `build` knows.
pub fn names() -> Vec<&'static str> {
    [BASIC, sparsified::NAMES, geometric::NAMES, data_aware::NAMES, spectral::NAMES].concat()
}

/// Builds the kernel for one tensor. `n_inputs` counts the models other than the base.
pub fn build(name: &str, params: &Map<String, Value>, n_inputs: usize, has_base: bool) -> Result<Box<dyn Method>> {
    let p = Params::new(name, params);
    let m: Box<dyn Method> = match name {
        "linear" => Box::new(linear::Linear::build(&p, n_inputs, has_base)?),
        "task_arithmetic" => Box::new(task_arithmetic::TaskArithmetic::build(&p, n_inputs, has_base)?),
        "slerp" => Box::new(slerp::Slerp::build(&p, n_inputs, has_base)?),
        other => sparsified::build(other, &p, n_inputs, has_base)
            .or_else(|| geometric::build(other, &p, n_inputs, has_base))
            .or_else(|| data_aware::build(other, &p, n_inputs, has_base))
            .or_else(|| spectral::build(other, &p, n_inputs, has_base))
            .unwrap_or_else(|| Err(Error::config(format!("unknown merge method '{other}' (known: {})", names().join(", ")))))?,
    };
    p.finish()?;
    Ok(m)
}

/// Σ w_i x_i[j] for every j, summing models in order (fixed order: deterministic).
#[inline]
pub(crate) fn weighted_sum(inputs: &[&[f32]], w: &[f32], out: &mut [f32]) {
    out.copy_from_slice(inputs[0]);
    out.iter_mut().for_each(|o| *o *= w[0]);
    for (x, &wi) in inputs.iter().zip(w).skip(1) {
        out.iter_mut().zip(x.iter()).for_each(|(o, &v)| *o += wi * v);
    }
}
