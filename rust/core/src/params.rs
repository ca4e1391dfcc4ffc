//! Typed access to a method's parameters (a JSON object resolved per tensor by the
//! planner), with unknown keys rejected so a typo never silently does nothing.
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;

/// The values a numeric parameter may take, declared next to the kernel that reads it so
/// that an out-of-range value is a `Config` error naming the parameter before any work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    lo: f64,
    lo_open: bool,
    hi: f64,
    hi_open: bool,
}

impl Range {
    /// Any finite number.
    pub const FINITE: Range = Range { lo: f64::MIN, lo_open: false, hi: f64::MAX, hi_open: false };
    /// `[0, ∞)`.
    pub const NON_NEG: Range = Range { lo: 0.0, lo_open: false, hi: f64::MAX, hi_open: false };
    /// `(0, ∞)`.
    pub const POSITIVE: Range = Range { lo: 0.0, lo_open: true, hi: f64::MAX, hi_open: false };
    /// `[0, 1]`.
    pub const UNIT: Range = Range { lo: 0.0, lo_open: false, hi: 1.0, hi_open: false };
    /// `(0, 1]`: a fraction of entries kept (0 would keep nothing: the base, silently).
    pub const FRACTION: Range = Range { lo: 0.0, lo_open: true, hi: 1.0, hi_open: false };

    pub const fn closed(lo: f64, hi: f64) -> Range {
        Range { lo, lo_open: false, hi, hi_open: false }
    }

    pub fn contains(&self, v: f64) -> bool {
        v.is_finite()
            && (if self.lo_open { v > self.lo } else { v >= self.lo })
            && (if self.hi_open { v < self.hi } else { v <= self.hi })
    }

    /// "(0, 1]", "[0, ∞)", "finite".
    pub fn describe(&self) -> String {
        if *self == Range::FINITE {
            return "a finite number".into();
        }
        let lo = if self.lo == f64::MIN { "-∞".to_owned() } else { self.lo.to_string() };
        let hi = if self.hi == f64::MAX { "∞".to_owned() } else { self.hi.to_string() };
        let open = if self.lo_open || self.lo == f64::MIN { '(' } else { '[' };
        let close = if self.hi_open || self.hi == f64::MAX { ')' } else { ']' };
        format!("in {open}{lo}, {hi}{close}")
    }
}

pub struct Params<'a> {
    method: &'a str,
    map: &'a Map<String, Value>,
    used: RefCell<BTreeSet<&'a str>>,
}

impl<'a> Params<'a> {
    pub fn new(method: &'a str, map: &'a Map<String, Value>) -> Self {
        Params { method, map, used: RefCell::new(BTreeSet::new()) }
    }

    fn get(&self, key: &'a str) -> Option<&'a Value> {
        self.used.borrow_mut().insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, what: &str) -> Error {
        Error::config(format!("{}: parameter '{key}' {what}", self.method))
    }

    fn check(&self, key: &str, v: f64, range: Range, model: Option<usize>) -> Result<f64> {
        if range.contains(v) {
            return Ok(v);
        }
        let who = model.map(|i| format!(" (model #{i})")).unwrap_or_default();
        Err(self.err(key, &format!("must be {}, got {v}{who}", range.describe())))
    }

    /// A number in `range`, if given.
    pub fn opt_f64(&self, key: &'a str, range: Range) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| self.err(key, &format!("must be a number, got {v}")))?;
                self.check(key, x, range, None).map(Some)
            }
        }
    }

    /// A number in `range`, `default` when absent.
    pub fn f64(&self, key: &'a str, default: f64, range: Range) -> Result<f64> {
        Ok(self.opt_f64(key, range)?.unwrap_or(default))
    }

    pub fn require_f64(&self, key: &'a str, range: Range) -> Result<f64> {
        self.opt_f64(key, range)?.ok_or_else(|| self.err(key, "is required"))
    }

    /// A non-negative integer no larger than `max`.
    pub fn count(&self, key: &'a str, default: usize, max: usize) -> Result<usize> {
        let v = self.f64(key, default as f64, Range::closed(0.0, max as f64))?;
        if v.fract() != 0.0 {
            return Err(self.err(key, &format!("must be a whole number, got {v}")));
        }
        Ok(v as usize)
    }

    pub fn bool(&self, key: &'a str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => Ok(n.as_f64() == Some(1.0)),
            Some(v) => Err(self.err(key, &format!("must be true or false, got {v}"))),
        }
    }

    pub fn opt_str(&self, key: &'a str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(key, &format!("must be a string, got {v}"))),
        }
    }

    /// A per-model value in `range`: a scalar broadcast to all `n` models, or a list of
    /// exactly `n`.
    pub fn per_model(&self, key: &'a str, n: usize, default: Option<f64>, range: Range) -> Result<Vec<f64>> {
        let v = self.per_model_raw(key, n, default)?;
        // a default may be a sentinel outside the range (e.g. NaN for "not given")
        let given = self.map.get(key).filter(|v| !v.is_null());
        if let Some(g) = given {
            for (i, &x) in v.iter().enumerate() {
                self.check(key, x, range, g.is_array().then_some(i))?;
            }
        }
        Ok(v)
    }

    fn per_model_raw(&self, key: &'a str, n: usize, default: Option<f64>) -> Result<Vec<f64>> {
        match self.get(key) {
            None => default.map(|d| vec![d; n]).ok_or_else(|| self.err(key, "is required")),
            Some(Value::Array(a)) => {
                if a.len() != n {
                    return Err(self.err(key, &format!("has {} values for {n} models", a.len())));
                }
                a.iter()
                    .map(|v| v.as_f64().ok_or_else(|| self.err(key, &format!("must hold numbers, got {v}"))))
                    .collect()
            }
            Some(v) => v.as_f64().map(|x| vec![x; n]).ok_or_else(|| self.err(key, &format!("must be a number or a list, got {v}"))),
        }
    }

    /// Per-model weights as f32 factors: normalized to sum to 1 when `normalize` (the sum is
    /// taken in f64 after scaling by the largest magnitude, so `1e308, 1e308` gives
    /// `0.5, 0.5` rather than overflowing), and refused when a factor is not a finite f32.
    pub fn weights_f32(&self, key: &str, w: &[f64], normalize: bool) -> Result<Vec<f32>> {
        let w = if normalize { normalized(w).ok_or_else(|| self.err(key, &format!("sums to zero ({w:?}), cannot normalize")))? } else { w.to_vec() };
        let out: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            return Err(self.err(key, &format!("value {} of model #{i} does not fit in float32", w[i])));
        }
        Ok(out)
    }

    /// Fails on any key no getter asked for.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let unknown: Vec<&str> = self.map.keys().map(String::as_str).filter(|k| !used.contains(k)).collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Error::config(format!("{}: unknown parameter(s) {}", self.method, unknown.join(", "))))
        }
    }
}

/// `w / Σ w` computed without overflow; None when the sum is (numerically) zero.
pub fn normalized(w: &[f64]) -> Option<Vec<f64>> {
    let m = w.iter().fold(0f64, |a, x| a.max(x.abs()));
    if !(m > 0.0 && m.is_finite()) {
        return None;
    }
    let scaled: Vec<f64> = w.iter().map(|x| x / m).collect();
    let total: f64 = scaled.iter().sum();
    if total.abs() < 1e-12 {
        return None;
    }
    Some(scaled.iter().map(|x| x / total).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ranges_name_the_parameter() {
        let m = json!({"density": -0.5, "t": 2.0, "w": [1.0, -1.0]}).as_object().unwrap().clone();
        let p = Params::new("ties", &m);
        let e = p.per_model("density", 2, Some(1.0), Range::FRACTION).unwrap_err().to_string();
        assert!(e.contains("parameter 'density' must be in (0, 1], got -0.5"), "{e}");
        let e = p.f64("t", 0.5, Range::UNIT).unwrap_err().to_string();
        assert!(e.contains("'t' must be in [0, 1], got 2"), "{e}");
        assert_eq!(p.f64("absent", 0.5, Range::UNIT).unwrap(), 0.5);
        assert!(p.per_model("w", 2, None, Range::NON_NEG).unwrap_err().to_string().contains("model #1"));
    }

    #[test]
    fn normalization_does_not_overflow() {
        assert_eq!(normalized(&[1e308, 1e308]).unwrap(), vec![0.5, 0.5]);
        assert_eq!(normalized(&[1.0, 3.0]).unwrap(), vec![0.25, 0.75]);
        assert!(normalized(&[1.0, -1.0]).is_none());
        assert!(normalized(&[0.0, 0.0]).is_none());
        let m = serde_json::Map::new();
        let p = Params::new("linear", &m);
        assert!(p.weights_f32("weight", &[1e308, 1.0], false).unwrap_err().to_string().contains("float32"));
    }
}
