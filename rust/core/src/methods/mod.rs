//! The registry of merge methods. Each method declares its `MethodSpec` (base rule, arity,
//! parameters, builder) next to its kernel; this module only lists them. Kernels see f32
//! slices only (the contract is in `kernel.rs`); reading, chunking, threading and writing
//! belong to the engine.
use crate::error::{Error, Result};
use crate::kernel::Method;
use crate::params::{MethodSpec, Params};
use serde_json::{Map, Value};
use std::sync::OnceLock;

pub mod absorb;
pub mod linear;
pub mod slerp;
pub mod task_arithmetic;
pub mod trimmed_mean;

// Families of methods, each listing its own specs.
pub mod data_aware;
pub mod geometric;
pub mod sparsified;
pub mod spectral;

/// Every method's spec, in a fixed order. Adding a method: its file, and one line here.
fn registry() -> Vec<MethodSpec> {
    let mut all = vec![linear::spec(), task_arithmetic::spec(), slerp::spec()];
    all.extend(sparsified::specs());
    all.extend(geometric::specs());
    all.extend(data_aware::specs());
    all.extend(spectral::specs());
    all.push(trimmed_mean::spec());
    all.push(absorb::spec());
    all
}

/// The specs of every method `build` knows.
pub fn specs() -> &'static [MethodSpec] {
    static SPECS: OnceLock<Vec<MethodSpec>> = OnceLock::new();
    SPECS.get_or_init(registry)
}

pub fn spec(name: &str) -> Option<&'static MethodSpec> {
    specs().iter().find(|s| s.name == name)
}

/// Every method name `build` knows.
pub fn names() -> Vec<&'static str> {
    specs().iter().map(|s| s.name).collect()
}

/// Builds the kernel for one tensor. `n_inputs` counts the models other than the base.
pub fn build(name: &str, params: &Map<String, Value>, n_inputs: usize, has_base: bool) -> Result<Box<dyn Method>> {
    let spec = spec(name).ok_or_else(|| Error::config(format!("unknown merge method '{name}' (known: {})", names().join(", "))))?;
    spec.check_arity(has_base, n_inputs)?;
    let p = Params::new(spec, params);
    let m = (spec.build)(&p, n_inputs, has_base)?;
    p.finish()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{BaseRule, Default, Kind, Role};
    use serde_json::json;

    /// A valid value for a declared parameter: its default, or a number inside its range.
    fn value(p: &crate::params::ParamSpec) -> Option<Value> {
        Some(match (p.default, p.kind) {
            (Default::Float(x), _) => json!(x),
            (Default::Int(x), _) => json!(x),
            (Default::Bool(x), _) => json!(!x),
            (Default::Str(x), _) => json!(x),
            (_, Kind::Float) => json!(0.5),
            _ => return None, // a string with no default: its values are the kernel's own
        })
    }

    /// Builds every method at its smallest arity, first with only its required parameters,
    /// then with every parameter it reads given: a kernel reading a parameter its spec does
    /// not declare, or declares differently, panics here; a config-only key is refused.
    #[test]
    fn every_method_builds_from_its_spec() {
        for s in specs() {
            let has_base = matches!(s.base, BaseRule::Required | BaseRule::Optional);
            let n = s.min_models;
            let required: Map<String, Value> =
                s.params.iter().filter(|p| p.default == Default::Required).map(|p| (p.name.to_owned(), json!(0.5))).collect();
            build(s.name, &required, n, has_base).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            let all: Map<String, Value> =
                s.params.iter().filter(|p| p.role == Role::Read).filter_map(|p| value(p).map(|v| (p.name.to_owned(), v))).collect();
            build(s.name, &all, n, has_base).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            for p in s.params.iter().filter(|p| p.role == Role::ConfigOnly) {
                let mut one = required.clone();
                one.insert(p.name.to_owned(), value(p).unwrap_or(json!("x")));
                let e = build(s.name, &one, n, has_base).err().unwrap_or_else(|| panic!("{}: {} accepted", s.name, p.name));
                assert!(e.to_string().contains(&format!("unknown parameter(s) {}", p.name)), "{e}");
            }
            if s.base == BaseRule::Required {
                assert!(build(s.name, &required, n, false).err().unwrap().to_string().contains("needs a base model"));
            }
            assert!(build(s.name, &required, n - 1, has_base).err().unwrap().to_string().contains("model(s) besides any base"));
        }
        let names = names();
        assert_eq!(names.len(), names.iter().collect::<std::collections::BTreeSet<_>>().len(), "a name registered twice");
    }
}
