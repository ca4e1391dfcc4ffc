//! What each method accepts, as plain Python data: `METHODS` (the names) and
//! `method_specs()` (one dict per method), read by the config layer and the tests.
use merge_fast_core::methods;
use merge_fast_core::params::{Default, MethodSpec, ParamSpec, Role};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn default<'py>(py: Python<'py>, d: Default) -> PyResult<Bound<'py, PyAny>> {
    Ok(match d {
        Default::Required | Default::Absent => py.None().into_bound(py),
        Default::Float(x) => x.into_pyobject(py)?.into_any(),
        Default::Int(x) => x.into_pyobject(py)?.into_any(),
        Default::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        Default::Str(x) => x.into_pyobject(py)?.into_any(),
    })
}

fn param<'py>(py: Python<'py>, p: &ParamSpec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", p.name)?;
    d.set_item("kind", p.kind.as_str())?;
    d.set_item("per_model", p.per_model)?;
    d.set_item("required", p.default == Default::Required)?;
    d.set_item("default", default(py, p.default)?)?;
    // (lo, lo_open, hi, hi_open), infinite ends as ±inf
    let range = p.range.map(|r| {
        let (lo, lo_open, hi, hi_open) = r.bounds();
        let inf = |x: f64| {
            if x.abs() == f64::MAX {
                x.signum() * f64::INFINITY
            } else {
                x
            }
        };
        (inf(lo), lo_open, inf(hi), hi_open)
    });
    d.set_item("range", range)?;
    let role = match p.role {
        Role::Read => "read",
        Role::Alias => "alias",
        Role::ConfigOnly => "config_only",
    };
    d.set_item("role", role)?;
    Ok(d)
}

fn method<'py>(py: Python<'py>, s: &MethodSpec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", s.name)?;
    d.set_item("base", s.base.as_str())?;
    d.set_item("min_models", s.min_models)?;
    d.set_item("max_models", s.max_models)?;
    d.set_item("mergekit", s.mergekit)?;
    let params = PyList::empty(py);
    for p in &s.params {
        params.append(param(py, p)?)?;
    }
    d.set_item("params", params)?;
    Ok(d)
}

/// Every method's spec, in registry order: `{"name", "base" ("required", "optional",
/// "ignored", "forbidden"), "min_models", "max_models" (besides the base; None: no limit),
/// "mergekit", "params": [{"name", "kind" ("float", "int", "bool", "str"), "per_model",
/// "required", "default", "range" ((lo, lo_open, hi, hi_open) or None), "role" ("read",
/// "alias", "config_only")}]}`.
#[pyfunction]
fn method_specs(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for s in methods::specs() {
        out.append(method(py, s)?)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(method_specs, m)?)?;
    m.add("METHODS", methods::names())?;
    Ok(())
}
