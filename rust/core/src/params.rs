//! What a method accepts (`MethodSpec`: base rule, arity, parameters with kind, scope,
//! default and range, declared next to the kernel) and typed access to the parameters of
//! one tensor (`Params`: a JSON object resolved by the planner). A kernel reads a parameter
//! by key only: its default and range are the spec's, written once. Unknown keys are refused
//! so that a typo never silently does nothing; a kernel reading a parameter its spec does not
//! declare (or as another kind, scope or optionality) is a bug, and panics in every test
//! that builds it.
use crate::error::{Error, Result};
use crate::kernel::Method;
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

    /// `(lo, lo_open, hi, hi_open)`; ±`f64::MAX` stand for ±∞.
    pub fn bounds(&self) -> (f64, bool, f64, bool) {
        (self.lo, self.lo_open, self.hi, self.hi_open)
    }

    pub fn contains(&self, v: f64) -> bool {
        v.is_finite() && (if self.lo_open { v > self.lo } else { v >= self.lo }) && (if self.hi_open { v < self.hi } else { v <= self.hi })
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

/// How a method treats a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRule {
    /// The kernel needs a base (the models' deltas are taken against it).
    Required,
    /// The kernel uses a base when one is given.
    Optional,
    /// A base, when given, is one more input with no special role (mergekit's "ignored").
    Ignored,
    /// The kernel takes no base.
    Forbidden,
}

impl BaseRule {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseRule::Required => "required",
            BaseRule::Optional => "optional",
            BaseRule::Ignored => "ignored",
            BaseRule::Forbidden => "forbidden",
        }
    }
}

/// The type of a parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Int,
    Bool,
    Str,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Float => "float",
            Kind::Int => "int",
            Kind::Bool => "bool",
            Kind::Str => "str",
        }
    }
}

/// A parameter's value when it is not given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    /// Must be given.
    Required,
    /// No value: the kernel decides from the other parameters (e.g. `rescale_mode`).
    Absent,
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(&'static str),
}

/// What the kernel does with a declared parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read by the kernel; a key of the method's configs.
    Read,
    /// Read by the kernel, another name of a parameter (e.g. `lam` for `lambda`); not a
    /// config key of its own.
    Alias,
    /// A key mergekit's configs accept for this method that the kernel does not implement:
    /// the config parser knows it, the kernel refuses it when given.
    ConfigOnly,
}

/// One parameter of a method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: Kind,
    /// One value per model (a scalar is broadcast), or one for the whole tensor.
    pub per_model: bool,
    pub default: Default,
    /// The values a number may take (None for bools and strings).
    pub range: Option<Range>,
    pub role: Role,
}

impl ParamSpec {
    const fn new(name: &'static str, kind: Kind, default: Default, range: Option<Range>) -> Self {
        ParamSpec { name, kind, per_model: false, default, range, role: Role::Read }
    }
    /// A number in `range`, `default` when not given.
    pub const fn float(name: &'static str, default: f64, range: Range) -> Self {
        Self::new(name, Kind::Float, Default::Float(default), Some(range))
    }
    /// A number in `range` that must be given.
    pub const fn required_float(name: &'static str, range: Range) -> Self {
        Self::new(name, Kind::Float, Default::Required, Some(range))
    }
    /// A number in `range` with no default (the kernel tells "not given" apart).
    pub const fn opt_float(name: &'static str, range: Range) -> Self {
        Self::new(name, Kind::Float, Default::Absent, Some(range))
    }
    /// A whole number in `[0, max]`.
    pub const fn count(name: &'static str, default: i64, max: i64) -> Self {
        Self::new(name, Kind::Int, Default::Int(default), Some(Range::closed(0.0, max as f64)))
    }
    pub const fn bool(name: &'static str, default: bool) -> Self {
        Self::new(name, Kind::Bool, Default::Bool(default), None)
    }
    pub const fn str(name: &'static str, default: &'static str) -> Self {
        Self::new(name, Kind::Str, Default::Str(default), None)
    }
    /// A string with no default.
    pub const fn opt_str(name: &'static str) -> Self {
        Self::new(name, Kind::Str, Default::Absent, None)
    }
    /// One value per model (a scalar broadcasts to all).
    pub const fn per_model(self) -> Self {
        ParamSpec { per_model: true, ..self }
    }
    pub const fn alias(self) -> Self {
        ParamSpec { role: Role::Alias, ..self }
    }
    pub const fn config_only(self) -> Self {
        ParamSpec { role: Role::ConfigOnly, ..self }
    }
}

/// Builds the kernel of one tensor from its parameters, the number of models besides the
/// base, and whether a base is given (arity and base rule already checked).
pub type Build = fn(&Params, usize, bool) -> Result<Box<dyn Method>>;

/// Everything a method accepts, declared next to its kernel: the config schema, the
/// parameter checks and the Python functions' signatures all come from (or are checked
/// against) it.
#[derive(Debug, Clone)]
pub struct MethodSpec {
    pub name: &'static str,
    pub base: BaseRule,
    /// Models besides the base: at least `min`, at most `max`.
    pub min_models: usize,
    pub max_models: Option<usize>,
    pub params: Vec<ParamSpec>,
    /// One of mergekit's methods (its config facts apply), or merge_fast's own.
    pub mergekit: bool,
    pub build: Build,
}

impl MethodSpec {
    /// A method that needs `base` and at least one model, with no parameters yet.
    pub fn new(name: &'static str, base: BaseRule, build: Build) -> Self {
        MethodSpec { name, base, min_models: 1, max_models: None, params: Vec::new(), mergekit: false, build }
    }
    /// Models besides the base: `min` to `max` (None: no limit).
    pub fn models(mut self, min: usize, max: Option<usize>) -> Self {
        (self.min_models, self.max_models) = (min, max);
        self
    }
    pub fn params(mut self, params: &[ParamSpec]) -> Self {
        self.params.extend_from_slice(params);
        self
    }
    pub fn mergekit(mut self) -> Self {
        self.mergekit = true;
        self
    }
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Checks the base rule and the number of models (`n`, besides the base).
    pub fn check_arity(&self, has_base: bool, n: usize) -> Result<()> {
        let (method, min, max) = (self.name, self.min_models, self.max_models);
        match (self.base, has_base) {
            (BaseRule::Required, false) => return Err(Error::config(format!("{method} needs a base model"))),
            (BaseRule::Forbidden, true) => return Err(Error::config(format!("{method} takes no base model"))),
            _ => {}
        }
        check_count(method, n, min, max)
    }
}

/// "`method` needs `min` to `max` model(s) besides any base".
pub fn check_count(method: &str, n: usize, min: usize, max: Option<usize>) -> Result<()> {
    if n < min || max.is_some_and(|m| n > m) {
        let want = match max {
            Some(m) if m == min => format!("exactly {min}"),
            Some(m) => format!("{min} to {m}"),
            None => format!("at least {min}"),
        };
        return Err(Error::config(format!("{method} needs {want} model(s) besides any base, got {n}")));
    }
    Ok(())
}

pub struct Params<'a> {
    spec: &'a MethodSpec,
    map: &'a Map<String, Value>,
    used: RefCell<BTreeSet<&'a str>>,
}

impl<'a> Params<'a> {
    pub fn new(spec: &'a MethodSpec, map: &'a Map<String, Value>) -> Self {
        Params { spec, map, used: RefCell::new(BTreeSet::new()) }
    }

    /// The method's name (several methods may share one builder).
    pub fn method(&self) -> &'static str {
        self.spec.name
    }

    /// The declaration of `key`, which its read must match (kind, scope, and whether the
    /// read is optional): a kernel and its spec that disagree are a bug, caught by any test
    /// that builds the kernel.
    fn declared(&self, key: &str, kind: Kind, per_model: bool, optional: bool) -> &'a ParamSpec {
        let m = self.spec.name;
        let d = self.spec.param(key).unwrap_or_else(|| panic!("{m} reads parameter '{key}', which its spec does not declare"));
        assert!(d.role != Role::ConfigOnly, "{m} reads parameter '{key}', declared as not read by the kernel");
        assert!(d.kind == kind && d.per_model == per_model, "{m}: parameter '{key}' is read as {kind:?} (per model: {per_model}), declared {d:?}");
        let read = if optional { "as optional (no default)" } else { "with a default or as required" };
        assert!((d.default == Default::Absent) == optional, "{m}: parameter '{key}' is read {read}, declared with default {:?}", d.default);
        d
    }

    /// The declared range of a number.
    fn range(&self, d: &ParamSpec) -> Range {
        d.range.unwrap_or_else(|| panic!("{}: number '{}' declares no range", self.spec.name, d.name))
    }

    fn get(&self, key: &'a str) -> Option<&'a Value> {
        self.used.borrow_mut().insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is given (not null).
    pub fn given(&self, key: &'a str) -> bool {
        assert!(self.spec.param(key).is_some(), "{} asks for parameter '{key}', which its spec does not declare", self.spec.name);
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    fn err(&self, key: &str, what: &str) -> Error {
        Error::config(format!("{}: parameter '{key}' {what}", self.spec.name))
    }

    fn check(&self, key: &str, v: f64, range: Range, model: Option<usize>) -> Result<f64> {
        if range.contains(v) {
            return Ok(v);
        }
        let who = model.map(|i| format!(" (model #{i})")).unwrap_or_default();
        Err(self.err(key, &format!("must be {}, got {v}{who}", range.describe())))
    }

    fn number(&self, key: &'a str, range: Range) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| self.err(key, &format!("must be a number, got {v}")))?;
                self.check(key, x, range, None).map(Some)
            }
        }
    }

    /// A number declared with no default, if given.
    pub fn opt_f64(&self, key: &'a str) -> Result<Option<f64>> {
        let d = self.declared(key, Kind::Float, false, true);
        self.number(key, self.range(d))
    }

    /// A number: its declared default when absent, an error when it is required.
    pub fn f64(&self, key: &'a str) -> Result<f64> {
        let d = self.declared(key, Kind::Float, false, false);
        let v = self.number(key, self.range(d))?;
        match d.default {
            Default::Float(x) => Ok(v.unwrap_or(x)),
            Default::Required => v.ok_or_else(|| self.err(key, "is required")),
            other => panic!("{}: number '{key}' declares default {other:?}", self.spec.name),
        }
    }

    /// A whole number in its declared range, its declared default when absent.
    pub fn count(&self, key: &'a str) -> Result<usize> {
        let d = self.declared(key, Kind::Int, false, false);
        let Default::Int(default) = d.default else { panic!("{}: count '{key}' declares default {:?}", self.spec.name, d.default) };
        let v = self.number(key, self.range(d))?.unwrap_or(default as f64);
        if v.fract() != 0.0 {
            return Err(self.err(key, &format!("must be a whole number, got {v}")));
        }
        Ok(v as usize)
    }

    /// A switch, its declared default when absent.
    pub fn bool(&self, key: &'a str) -> Result<bool> {
        let d = self.declared(key, Kind::Bool, false, false);
        let Default::Bool(default) = d.default else { panic!("{}: switch '{key}' declares default {:?}", self.spec.name, d.default) };
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => Ok(n.as_f64() == Some(1.0)),
            Some(v) => Err(self.err(key, &format!("must be true or false, got {v}"))),
        }
    }

    fn string(&self, key: &'a str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(key, &format!("must be a string, got {v}"))),
        }
    }

    /// A string declared with no default, if given.
    pub fn opt_str(&self, key: &'a str) -> Result<Option<&'a str>> {
        self.declared(key, Kind::Str, false, true);
        self.string(key)
    }

    /// A string, its declared default when absent.
    pub fn str(&self, key: &'a str) -> Result<&'a str> {
        let d = self.declared(key, Kind::Str, false, false);
        let Default::Str(default) = d.default else { panic!("{}: string '{key}' declares default {:?}", self.spec.name, d.default) };
        Ok(self.string(key)?.unwrap_or(default))
    }

    /// A per-model value in its declared range: a scalar broadcast to all `n` models, or a
    /// list of exactly `n`; the declared default for every model when absent, an error when
    /// it is required.
    pub fn per_model(&self, key: &'a str, n: usize) -> Result<Vec<f64>> {
        let d = self.declared(key, Kind::Float, true, false);
        let default = match d.default {
            Default::Float(x) => Some(x),
            Default::Required => None,
            other => panic!("{}: per-model '{key}' declares default {other:?}", self.spec.name),
        };
        self.per_model_in(key, n, default, self.range(d))
    }

    /// A per-model value declared with no default, if given.
    pub fn opt_per_model(&self, key: &'a str, n: usize) -> Result<Option<Vec<f64>>> {
        let d = self.declared(key, Kind::Float, true, true);
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.per_model_in(key, n, None, self.range(d)).map(Some)
    }

    fn per_model_in(&self, key: &'a str, n: usize, default: Option<f64>, range: Range) -> Result<Vec<f64>> {
        let v = self.per_model_raw(key, n, default)?;
        // only given values are checked (a default is in range by declaration)
        if let Some(g) = self.map.get(key).filter(|v| !v.is_null()) {
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
                a.iter().map(|v| v.as_f64().ok_or_else(|| self.err(key, &format!("must hold numbers, got {v}")))).collect()
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
            Err(Error::config(format!("{}: unknown parameter(s) {}", self.spec.name, unknown.join(", "))))
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

    fn spec() -> MethodSpec {
        MethodSpec::new("ties", BaseRule::Required, |_, _, _| unreachable!("not built")).params(&[
            ParamSpec::float("density", 1.0, Range::FRACTION).per_model(),
            ParamSpec::float("t", 0.5, Range::UNIT),
            ParamSpec::float("absent", 0.5, Range::UNIT),
            ParamSpec::required_float("w", Range::NON_NEG).per_model(),
            ParamSpec::required_float("r", Range::POSITIVE),
            ParamSpec::opt_float("scale", Range::FINITE).per_model(),
            ParamSpec::count("k", 3, 10),
            ParamSpec::str("mode", "log"),
            ParamSpec::opt_str("how"),
            ParamSpec::bool("skip", false).config_only(),
        ])
    }

    #[test]
    fn ranges_name_the_parameter() {
        let m = json!({"density": -0.5, "t": 2.0, "w": [1.0, -1.0], "k": 11, "scale": [0.0, 1.0]}).as_object().unwrap().clone();
        let s = spec();
        let p = Params::new(&s, &m);
        let e = p.per_model("density", 2).unwrap_err().to_string();
        assert!(e.contains("parameter 'density' must be in (0, 1], got -0.5"), "{e}");
        let e = p.f64("t").unwrap_err().to_string();
        assert!(e.contains("'t' must be in [0, 1], got 2"), "{e}");
        assert!(p.per_model("w", 2).unwrap_err().to_string().contains("model #1"));
        assert_eq!(p.count("k").unwrap_err().to_string(), "config error: ties: parameter 'k' must be in [0, 10], got 11");
        assert_eq!(p.opt_per_model("scale", 1).unwrap_err().to_string(), "config error: ties: parameter 'scale' has 2 values for 1 models");
    }

    #[test]
    fn defaults_come_from_the_spec() {
        let none = Map::new();
        let s = spec();
        let p = Params::new(&s, &none);
        assert_eq!(p.f64("absent").unwrap(), 0.5);
        assert_eq!(p.per_model("density", 3).unwrap(), vec![1.0; 3]);
        assert_eq!(p.count("k").unwrap(), 3);
        assert_eq!(p.str("mode").unwrap(), "log");
        assert_eq!(p.opt_str("how").unwrap(), None);
        assert_eq!(p.opt_per_model("scale", 1).unwrap(), None);
        assert_eq!(p.f64("r").unwrap_err().to_string(), "config error: ties: parameter 'r' is required");
        assert_eq!(p.per_model("w", 2).unwrap_err().to_string(), "config error: ties: parameter 'w' is required");
        let given = json!({"absent": 0.25, "density": [0.5, 1.0], "k": 4, "mode": "none", "how": "x", "scale": 2.0, "r": 3.0, "w": 1.0});
        let m = given.as_object().unwrap().clone();
        let p = Params::new(&s, &m);
        assert_eq!(p.f64("absent").unwrap(), 0.25);
        assert_eq!(p.per_model("density", 2).unwrap(), vec![0.5, 1.0]);
        assert_eq!(p.count("k").unwrap(), 4);
        assert_eq!(p.str("mode").unwrap(), "none");
        assert_eq!(p.opt_str("how").unwrap(), Some("x"));
        assert_eq!(p.opt_per_model("scale", 1).unwrap(), Some(vec![2.0]));
        assert_eq!(p.f64("r").unwrap(), 3.0);
        assert_eq!(p.per_model("w", 2).unwrap(), vec![1.0, 1.0]);
        p.finish().unwrap();
    }

    #[test]
    fn reads_must_match_the_spec() {
        let m = json!({"skip": true}).as_object().unwrap().clone();
        let s = spec();
        let p = Params::new(&s, &m);
        let read = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| crate::error::panic_text(&*e));
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let undeclared = read(&|| drop(p.f64("gamma")));
        let wrong_kind = read(&|| drop(p.bool("t")));
        let wrong_number = read(&|| drop(p.count("t")));
        let wrong_scope = read(&|| drop(p.f64("density")));
        let optional_read = read(&|| drop(p.opt_f64("t")));
        let optional_declared = read(&|| drop(p.opt_str("mode")));
        let default_read = read(&|| drop(p.per_model("scale", 1)));
        let not_read = read(&|| drop(p.bool("skip")));
        std::panic::set_hook(hook);
        assert!(undeclared.unwrap_err().contains("reads parameter 'gamma', which its spec does not declare"));
        assert!(wrong_kind.unwrap_err().contains("is read as Bool"));
        assert!(wrong_number.unwrap_err().contains("is read as Int"));
        assert!(wrong_scope.unwrap_err().contains("per model: false"));
        assert!(optional_read.unwrap_err().contains("'t' is read as optional (no default), declared with default Float(0.5)"));
        assert!(optional_declared.unwrap_err().contains("'mode' is read as optional (no default), declared with default Str(\"log\")"));
        assert!(default_read.unwrap_err().contains("'scale' is read with a default or as required, declared with default Absent"));
        assert!(not_read.unwrap_err().contains("declared as not read by the kernel"));
        // a config-only key given is refused as unknown, exactly as an undeclared one
        assert!(p.finish().unwrap_err().to_string().contains("ties: unknown parameter(s) skip"));
        assert!(p.f64("t").is_ok());
    }

    #[test]
    fn normalization_does_not_overflow() {
        assert_eq!(normalized(&[1e308, 1e308]).unwrap(), vec![0.5, 0.5]);
        assert_eq!(normalized(&[1.0, 3.0]).unwrap(), vec![0.25, 0.75]);
        assert!(normalized(&[1.0, -1.0]).is_none());
        assert!(normalized(&[0.0, 0.0]).is_none());
        let m = serde_json::Map::new();
        let s = spec();
        let p = Params::new(&s, &m);
        assert!(p.weights_f32("weight", &[1e308, 1.0], false).unwrap_err().to_string().contains("float32"));
    }
}
