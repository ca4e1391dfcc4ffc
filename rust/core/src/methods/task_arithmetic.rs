//! Task arithmetic (Ilharco et al. 2023): `θ_base + λ Σ w_i (θ_i − θ_base)`; with
//! `normalize` the sum is divided by `Σ w_i` (mergekit's option, off by default).
use super::{check_arity, BaseRule, Ctx, Method};
use crate::error::{Error, Result};
use crate::params::{Params, Range};

pub struct TaskArithmetic {
    weights: Vec<f32>,
    lambda: f32,
}

impl TaskArithmetic {
    pub fn build(p: &Params, n: usize, has_base: bool) -> Result<Self> {
        check_arity("task_arithmetic", has_base, BaseRule::Required, n, 1, None)?;
        let w = p.per_model("weight", n, Some(1.0), Range::FINITE)?;
        let lambda = match (p.opt_f64("lambda", Range::FINITE)?, p.opt_f64("lam", Range::FINITE)?) {
            (Some(_), Some(_)) => return Err(Error::config("task_arithmetic: give 'lambda' or 'lam', not both")),
            (a, b) => a.or(b).unwrap_or(1.0),
        };
        let normalize = p.bool("normalize", false)?;
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
