//! Typed access to a method's parameters (a JSON object resolved per tensor by the
//! planner), with unknown keys rejected so a typo never silently does nothing.
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;

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

    pub fn opt_f64(&self, key: &'a str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, &format!("must be a number, got {v}"))),
        }
    }

    pub fn f64(&self, key: &'a str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn require_f64(&self, key: &'a str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.err(key, "is required"))
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

    /// A per-model value: a scalar broadcast to all `n` models, or a list of exactly `n`.
    pub fn per_model(&self, key: &'a str, n: usize, default: Option<f64>) -> Result<Vec<f64>> {
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
