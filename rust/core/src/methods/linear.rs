//! Linear (weighted average): `Σ w_i θ_i / Σ w_i`, or the plain weighted sum without
//! normalization.
use crate::error::Result;
use crate::kernel::{weighted_sum, Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("linear", BaseRule::Forbidden, |p, n, b| Ok(Box::new(Linear::build(p, n, b)?)))
        .params(&[ParamSpec::bool("normalize", true), ParamSpec::float("weight", 1.0, Range::FINITE).per_model()])
        .mergekit()
}

pub struct Linear {
    weights: Vec<f32>,
}

impl Linear {
    pub fn build(p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        let w = p.per_model("weight", n, Some(1.0), Range::FINITE)?;
        let normalize = p.bool("normalize", true)?;
        Ok(Linear { weights: p.weights_f32("weight", &w, normalize)? })
    }
}

impl Method for Linear {
    fn apply(&self, _: &Ctx, _: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        weighted_sum(inputs, &self.weights, out);
        Ok(())
    }
}
