//! NearSwap (mergekit `nearswap`): per element, `w = clamp(t / max(|base − x|, 1e-6), 0, 1)`
//! and `out = w·x + (1 − w)·base`: elements where the model is within `t` of the base take
//! the model's value; farther ones move toward it by `t / |base − x|`.
use crate::error::Result;
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("nearswap", BaseRule::Required, |p, n, b| Ok(Box::new(NearSwap::build(p, n, b)?)))
        .models(1, Some(1))
        .params(&[ParamSpec::required_float("t", Range::NON_NEG)])
        .mergekit()
}

pub struct NearSwap {
    t: f32,
}

impl NearSwap {
    pub fn build(p: &Params, _n: usize, _has_base: bool) -> Result<Self> {
        let t = p.f64("t")?;
        Ok(NearSwap { t: t as f32 })
    }
}

impl Method for NearSwap {
    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let a = base.expect("arity checked at build");
        let t = self.t;
        for ((o, &x), &b) in out.iter_mut().zip(inputs[0]).zip(a) {
            let w = (t / (b - x).abs().max(1e-6)).clamp(0.0, 1.0);
            *o = w * x + (1.0 - w) * b;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{close, rand, run};
    use serde_json::json;

    #[test]
    fn formula() {
        let a = rand(1000, 1);
        let b = rand(1000, 2);
        let y = run("nearswap", json!({"t": 0.3}), &[1000], Some(&a), &[&b]).unwrap();
        let r: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&a, &b)| {
                let (a, b) = (a as f64, b as f64);
                let w = (0.3 / (a - b).abs().max(1e-6)).clamp(0.0, 1.0);
                w * b + (1.0 - w) * a
            })
            .collect();
        close(&y, &r, 1e-6);
        assert_eq!(run("nearswap", json!({"t": 0.3}), &[1000], Some(&a), &[&a]).unwrap(), a);
        assert!(run("nearswap", json!({}), &[1000], Some(&a), &[&b]).is_err());
    }
}
