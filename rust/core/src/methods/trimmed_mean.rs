//! Coordinate-wise trimmed mean (Yin et al. 2018, robust aggregation): per element, the
//! mean of the models' values without the `k = ⌊trim·N⌋` smallest and `k` largest
//! (`trim = 0`: the mean; `trim = 0.5`: the median). No base.
use crate::error::Result;
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

const TRIM: Range = Range::closed(0.0, 0.5);

pub fn spec() -> MethodSpec {
    MethodSpec::new("trimmed_mean", BaseRule::Forbidden, |p, n, _| Ok(Box::new(TrimmedMean::build(p, n)?)))
        .params(&[ParamSpec::float("trim", 0.2, TRIM)])
}

pub struct TrimmedMean {
    k: usize,
}

impl TrimmedMean {
    fn build(p: &Params, n: usize) -> Result<Self> {
        let trim = p.f64("trim")?;
        Ok(TrimmedMean { k: ((trim * n as f64).floor() as usize).min((n - 1) / 2) })
    }
}

impl Method for TrimmedMean {
    fn apply(&self, _: &Ctx, _: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let (n, k) = (inputs.len(), self.k);
        let mut v = vec![0f32; n];
        for (j, o) in out.iter_mut().enumerate() {
            v.iter_mut().zip(inputs).for_each(|(x, m)| *x = m[j]);
            v.sort_unstable_by(f32::total_cmp);
            let kept = &v[k..n - k];
            *o = (kept.iter().map(|&x| x as f64).sum::<f64>() / kept.len() as f64) as f32;
        }
        Ok(())
    }
}
