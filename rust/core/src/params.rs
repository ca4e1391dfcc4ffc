//! What a method accepts (`MethodSpec`: base rule, arity, parameters with kind, scope,
//! default and range, declared next to the kernel) and typed access to the parameters of
//! one tensor (`Params`: a JSON object resolved by the planner). Unknown keys are refused so
//! that a typo never silently does nothing; a kernel reading a parameter its spec does not
//! declare (or declares differently) is a bug, and panics in every test that builds it.
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

    /// The read of `key` must match its declaration: a kernel and its spec that disagree
    /// are a bug, caught by any test that builds the kernel.
    fn declared(&self, key: &str, kind: Kind, per_model: bool, default: Option<Default>, range: Option<Range>) {
        let m = self.spec.name;
        let d = self.spec.param(key).unwrap_or_else(|| panic!("{m} reads parameter '{key}', which its spec does not declare"));
        assert!(d.role != Role::ConfigOnly, "{m} reads parameter '{key}', declared as not read by the kernel");
        assert!(d.kind == kind && d.per_model == per_model, "{m}: parameter '{key}' is read as {kind:?} (per model: {per_model}), declared {d:?}");
        let same = |a: Default, b: Default| match (a, b) {
            (Default::Float(x), Default::Float(y)) => x.to_bits() == y.to_bits(),
            _ => a == b,
        };
        if let Some(def) = default {
            assert!(same(def, d.default), "{m}: parameter '{key}' is read with default {def:?}, declared {:?}", d.default);
        }
        if range.is_some() {
            assert!(range == d.range, "{m}: parameter '{key}' is read with range {range:?}, declared {:?}", d.range);
        }
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

    /// A number in `range`, if given.
    pub fn opt_f64(&self, key: &'a str, range: Range) -> Result<Option<f64>> {
        self.declared(key, Kind::Float, false, None, Some(range));
        self.number(key, range)
    }

    /// A number in `range`, `default` when absent.
    pub fn f64(&self, key: &'a str, default: f64, range: Range) -> Result<f64> {
        self.declared(key, Kind::Float, false, Some(Default::Float(default)), Some(range));
        Ok(self.number(key, range)?.unwrap_or(default))
    }

    pub fn require_f64(&self, key: &'a str, range: Range) -> Result<f64> {
        self.declared(key, Kind::Float, false, Some(Default::Required), Some(range));
        self.number(key, range)?.ok_or_else(|| self.err(key, "is required"))
    }

    /// A non-negative integer no larger than `max`.
    pub fn count(&self, key: &'a str, default: usize, max: usize) -> Result<usize> {
        let range = Range::closed(0.0, max as f64);
        self.declared(key, Kind::Int, false, Some(Default::Int(default as i64)), Some(range));
        let v = self.number(key, range)?.unwrap_or(default as f64);
        if v.fract() != 0.0 {
            return Err(self.err(key, &format!("must be a whole number, got {v}")));
        }
        Ok(v as usize)
    }

    pub fn bool(&self, key: &'a str, default: bool) -> Result<bool> {
        self.declared(key, Kind::Bool, false, Some(Default::Bool(default)), None);
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

    /// A string, if given.
    pub fn opt_str(&self, key: &'a str) -> Result<Option<&'a str>> {
        self.declared(key, Kind::Str, false, Some(Default::Absent), None);
        self.string(key)
    }

    /// A string, `default` when absent.
    pub fn str(&self, key: &'a str, default: &'static str) -> Result<&'a str> {
        self.declared(key, Kind::Str, false, Some(Default::Str(default)), None);
        Ok(self.string(key)?.unwrap_or(default))
    }

    /// A per-model value in `range`: a scalar broadcast to all `n` models, or a list of
    /// exactly `n`. `default`: None when required; NaN when the kernel tells "not given"
    /// apart (declared without a default).
    pub fn per_model(&self, key: &'a str, n: usize, default: Option<f64>, range: Range) -> Result<Vec<f64>> {
        let declared = match default {
            None => Default::Required,
            Some(d) if d.is_nan() => Default::Absent,
            Some(d) => Default::Float(d),
        };
        self.declared(key, Kind::Float, true, Some(declared), Some(range));
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
            ParamSpec::bool("skip", false).config_only(),
        ])
    }

    #[test]
    fn ranges_name_the_parameter() {
        let m = json!({"density": -0.5, "t": 2.0, "w": [1.0, -1.0]}).as_object().unwrap().clone();
        let s = spec();
        let p = Params::new(&s, &m);
        let e = p.per_model("density", 2, Some(1.0), Range::FRACTION).unwrap_err().to_string();
        assert!(e.contains("parameter 'density' must be in (0, 1], got -0.5"), "{e}");
        let e = p.f64("t", 0.5, Range::UNIT).unwrap_err().to_string();
        assert!(e.contains("'t' must be in [0, 1], got 2"), "{e}");
        assert_eq!(p.f64("absent", 0.5, Range::UNIT).unwrap(), 0.5);
        assert!(p.per_model("w", 2, None, Range::NON_NEG).unwrap_err().to_string().contains("model #1"));
    }

    #[test]
    fn reads_must_match_the_spec() {
        let m = json!({"skip": true}).as_object().unwrap().clone();
        let s = spec();
        let p = Params::new(&s, &m);
        let read = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| crate::error::panic_text(&*e));
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let undeclared = read(&|| drop(p.f64("gamma", 0.01, Range::UNIT)));
        let wrong_default = read(&|| drop(p.f64("t", 0.7, Range::UNIT)));
        let wrong_range = read(&|| drop(p.f64("t", 0.5, Range::FINITE)));
        let wrong_kind = read(&|| drop(p.bool("t", false)));
        let wrong_scope = read(&|| drop(p.f64("density", 1.0, Range::FRACTION)));
        let not_read = read(&|| drop(p.bool("skip", false)));
        std::panic::set_hook(hook);
        assert!(undeclared.unwrap_err().contains("reads parameter 'gamma', which its spec does not declare"));
        assert!(wrong_default.unwrap_err().contains("read with default Float(0.7), declared Float(0.5)"));
        assert!(wrong_range.unwrap_err().contains("read with range"));
        assert!(wrong_kind.unwrap_err().contains("is read as Bool"));
        assert!(wrong_scope.unwrap_err().contains("per model: false"));
        assert!(not_read.unwrap_err().contains("declared as not read by the kernel"));
        // a config-only key given is refused as unknown, exactly as an undeclared one
        assert!(p.finish().unwrap_err().to_string().contains("ties: unknown parameter(s) skip"));
        assert!(p.f64("t", 0.5, Range::UNIT).is_ok());
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
