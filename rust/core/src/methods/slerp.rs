//! Spherical linear interpolation of two models, with mergekit's semantics: the angle comes
//! from the flattened tensors normalized (each only when its norm exceeds 1e-8), nearly
//! colinear pairs (|cos| > 0.9995) fall back to lerp, and the coefficients multiply the raw
//! tensors. t = 0 gives the base.
//!
//! One deliberate difference: when either tensor is (numerically) zero the angle is
//! undefined; mergekit then uses cos = 0 and scales the other tensor by sin(tπ/2), which
//! shrinks it. We lerp instead.
use crate::error::Result;
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("slerp", BaseRule::Required, |p, n, b| Ok(Box::new(Slerp::build(p, n, b)?)))
        .models(1, Some(1))
        .params(&[ParamSpec::required_float("t", Range::UNIT)])
        .mergekit()
}

pub const DOT_THRESHOLD: f64 = 0.9995;
pub const NORM_EPS: f64 = 1e-8;

pub struct Slerp {
    t: f64,
}

impl Slerp {
    pub fn build(p: &Params, _n: usize, _has_base: bool) -> Result<Self> {
        let t = p.f64("t")?;
        Ok(Slerp { t })
    }

    /// The two coefficients from ⟨a,b⟩, |a|², |b|².
    pub fn coefficients(t: f64, dot: f64, aa: f64, bb: f64) -> (f64, f64) {
        let (na, nb) = (aa.sqrt(), bb.sqrt());
        if na <= NORM_EPS || nb <= NORM_EPS {
            return (1.0 - t, t);
        }
        let d = dot / (na * nb);
        if d.abs() > DOT_THRESHOLD {
            return (1.0 - t, t);
        }
        let theta = d.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    }
}

/// One element's terms of ⟨a,b⟩, |a|², |b|² (f64, each sum in element order).
#[inline(always)]
fn dots(s: &mut [f64; 3], x: f32, y: f32) {
    let (x, y) = (x as f64, y as f64);
    s[0] += x * y;
    s[1] += x * x;
    s[2] += y * y;
}

impl Method for Slerp {
    fn n_stats(&self) -> usize {
        3
    }

    fn accumulate(&self, base: Option<&[f32]>, inputs: &[&[f32]], stats: &mut [f64]) {
        let mut s = [0f64; 3];
        base.unwrap().iter().zip(inputs[0]).for_each(|(&x, &y)| dots(&mut s, x, y));
        stats.iter_mut().zip(s).for_each(|(t, s)| *t += s);
    }

    fn accumulate_two(&self, a: (Option<&[f32]>, &[&[f32]]), b: (Option<&[f32]>, &[&[f32]]), sa: &mut [f64], sb: &mut [f64]) {
        let (xa, ya, xb, yb) = (a.0.unwrap(), a.1[0], b.0.unwrap(), b.1[0]);
        let n = xb.len();
        let (mut s, mut t) = ([0f64; 3], [0f64; 3]);
        for (((&x, &y), &u), &v) in xa[..n].iter().zip(&ya[..n]).zip(xb).zip(yb) {
            dots(&mut s, x, y);
            dots(&mut t, u, v);
        }
        xa[n..].iter().zip(&ya[n..]).for_each(|(&x, &y)| dots(&mut s, x, y));
        sa.iter_mut().zip(s).for_each(|(a, s)| *a += s);
        sb.iter_mut().zip(t).for_each(|(b, t)| *b += t);
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let (ca, cb) = Self::coefficients(self.t, stats[0], stats[1], stats[2]);
        let (ca, cb) = (ca as f32, cb as f32);
        let (a, b) = (base.unwrap(), inputs[0]);
        out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| *o = ca * x + cb * y);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficient_corners() {
        // Orthogonal unit vectors: cos = 0, θ = π/2.
        let (a, b) = Slerp::coefficients(0.5, 0.0, 1.0, 1.0);
        let h = (std::f64::consts::FRAC_PI_4).sin();
        assert!((a - h).abs() < 1e-12 && (b - h).abs() < 1e-12);
        assert_eq!(Slerp::coefficients(0.3, 1.0, 1.0, 1.0), (0.7, 0.3)); // colinear -> lerp
        assert_eq!(Slerp::coefficients(0.3, -4.0, 4.0, 4.0), (0.7, 0.3)); // opposite -> lerp
        assert_eq!(Slerp::coefficients(0.3, 0.0, 0.0, 4.0), (0.7, 0.3)); // zero tensor -> lerp
        let (a, b) = Slerp::coefficients(0.0, 0.2, 1.0, 1.0);
        assert!((a - 1.0).abs() < 1e-12 && b.abs() < 1e-12);
    }
}
