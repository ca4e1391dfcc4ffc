//! Passthrough (mergekit `passthrough`): the single input, copied exactly, or multiplied by
//! the optional `scale`. Frankenmerge slice plans use it for every copied tensor.
use crate::error::Result;
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("passthrough", BaseRule::Forbidden, |p, n, b| Ok(Box::new(Passthrough::build(p, n, b)?)))
        .models(1, Some(1))
        .params(&[ParamSpec::opt_float("scale", Range::FINITE).per_model()])
        .mergekit()
}

pub struct Passthrough {
    scale: Option<f32>,
}

impl Passthrough {
    pub fn build(p: &Params, _n: usize, _has_base: bool) -> Result<Self> {
        let scale = match p.opt_per_model("scale", 1)? {
            None => None,
            Some(s) => Some(p.weights_f32("scale", &s, false)?[0]),
        };
        Ok(Passthrough { scale })
    }
}

impl Method for Passthrough {
    fn copies_input(&self) -> Option<usize> {
        matches!(self.scale, None | Some(1.0)).then_some(0)
    }

    fn apply(&self, _: &Ctx, _: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(inputs[0]);
        if let Some(s) = self.scale {
            out.iter_mut().for_each(|o| *o *= s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{rand, run};
    use serde_json::json;

    #[test]
    fn copies_and_scales() {
        let x = rand(70_000, 1);
        assert_eq!(run("passthrough", json!({}), &[70_000], None, &[&x]).unwrap(), x);
        let y = run("passthrough", json!({"scale": 0.5}), &[70_000], None, &[&x]).unwrap();
        assert!(y.iter().zip(&x).all(|(a, b)| *a == 0.5 * b));
        let y = run("passthrough", json!({"scale": [2.0]}), &[70_000], None, &[&x]).unwrap();
        assert!(y.iter().zip(&x).all(|(a, b)| *a == 2.0 * b));
        assert!(run("passthrough", json!({}), &[70_000], None, &[&x, &x]).is_err());
        assert!(run("passthrough", json!({}), &[70_000], Some(&x), &[&x]).is_err());
    }
}
