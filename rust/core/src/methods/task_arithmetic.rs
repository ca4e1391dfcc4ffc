//! Task arithmetic (Ilharco et al. 2023): `θ_base + λ Σ w_i (θ_i − θ_base)`; with
//! `normalize` the sum is divided by `Σ w_i` (mergekit's option, off by default).
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

/// mergekit's config keys of the task-arithmetic family; the ones marked `config_only` are
/// accepted by configs but not implemented by this kernel (giving one is refused).
pub fn spec() -> MethodSpec {
    MethodSpec::new("task_arithmetic", BaseRule::Required, |p, n, b| Ok(Box::new(TaskArithmetic::build(p, n, b)?)))
        .params(&[
            ParamSpec::bool("int8_mask", false).config_only(),
            ParamSpec::bool("normalize", false),
            ParamSpec::bool("rescale", false).config_only(),
            ParamSpec::float("lambda", 1.0, Range::FINITE),
            ParamSpec::float("weight", 1.0, Range::FINITE).per_model(),
            ParamSpec::float("density", 1.0, Range::FRACTION).per_model().config_only(),
            ParamSpec::opt_str("rescale_mode").config_only(),
            ParamSpec::opt_str("disjoint_mean").config_only(),
            ParamSpec::opt_str("consensus").config_only(),
            ParamSpec::float("lam", 1.0, Range::FINITE).alias(),
        ])
        .mergekit()
}

/// `lambda`, or its alias `lam` (not both).
pub fn lambda(p: &Params) -> Result<f64> {
    let (lambda, lam) = (p.f64("lambda")?, p.f64("lam")?);
    match (p.given("lambda"), p.given("lam")) {
        (true, true) => Err(Error::config(format!("{}: give 'lambda' or 'lam', not both", p.method()))),
        (_, true) => Ok(lam),
        _ => Ok(lambda),
    }
}

pub struct TaskArithmetic {
    weights: Vec<f32>,
    lambda: f32,
}

impl TaskArithmetic {
    pub fn build(p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        let w = p.per_model("weight", n)?;
        let lambda = lambda(p)?;
        let normalize = p.bool("normalize")?;
        Ok(TaskArithmetic { weights: p.weights_f32("weight", &w, normalize)?, lambda: lambda as f32 })
    }
}

impl Method for TaskArithmetic {
    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked at build");
        out.iter_mut().for_each(|o| *o = 0.0);
        for (x, &w) in inputs.iter().zip(&self.weights) {
            out.iter_mut().zip(x.iter().zip(base)).for_each(|(o, (&v, &b))| *o += w * (v - b));
        }
        out.iter_mut().zip(base).for_each(|(o, &b)| *o = b + self.lambda * *o);
        Ok(())
    }
}
