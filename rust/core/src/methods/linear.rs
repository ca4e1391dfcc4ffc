//! Linear (weighted average): `Σ w_i θ_i / Σ w_i`, or the plain weighted sum without
//! normalization.
use super::{check_arity, weighted_sum, BaseRule, Ctx, Method};
use crate::error::Result;
use crate::params::{Params, Range};

pub struct Linear {
    weights: Vec<f32>,
}

impl Linear {
    pub fn build(p: &Params, n: usize, has_base: bool) -> Result<Self> {
        check_arity("linear", has_base, BaseRule::Forbidden, n, 1, None)?;
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
