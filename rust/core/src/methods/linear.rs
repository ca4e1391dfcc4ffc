//! Linear (weighted average): `Σ w_i θ_i / Σ w_i`, or the plain weighted sum without
//! normalization.
//!
//! Summed in f64 and rounded once to f32: the result is the correctly rounded weighted
//! mean, so a merge finished from partial states (`merge_state`, sums kept in f64) writes
//! the same bytes as this one-shot merge, whatever the grouping.
use crate::error::Result;
use crate::kernel::{Ctx, Method};
use crate::params::{normalized, BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("linear", BaseRule::Forbidden, |p, n, b| Ok(Box::new(Linear::build(p, n, b)?)))
        .params(&[ParamSpec::bool("normalize", true), ParamSpec::float("weight", 1.0, Range::FINITE).per_model()])
        .mergekit()
}

pub struct Linear {
    weights: Vec<f64>,
}

impl Linear {
    pub fn build(p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        let w = p.per_model("weight", n)?;
        let normalize = p.bool("normalize")?;
        // Validates (a zero sum, factors beyond f32) with the messages every method shares.
        p.weights_f32("weight", &w, normalize)?;
        let weights = if normalize { normalized(&w).expect("checked by weights_f32") } else { w };
        Ok(Linear { weights })
    }
}

impl Method for Linear {
    fn apply(&self, _: &Ctx, _: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        // Blocks of a stack buffer: no allocation per chunk, and the f64 sums stay in L1.
        const B: usize = 512;
        let mut acc = [0f64; B];
        for start in (0..out.len()).step_by(B) {
            let end = (start + B).min(out.len());
            let acc = &mut acc[..end - start];
            let w0 = self.weights[0];
            acc.iter_mut().zip(&inputs[0][start..end]).for_each(|(a, &x)| *a = w0 * x as f64);
            for (x, &w) in inputs.iter().zip(&self.weights).skip(1) {
                acc.iter_mut().zip(&x[start..end]).for_each(|(a, &v)| *a += w * v as f64);
            }
            out[start..end].iter_mut().zip(acc.iter()).for_each(|(o, &a)| *o = a as f32);
        }
        Ok(())
    }
}
