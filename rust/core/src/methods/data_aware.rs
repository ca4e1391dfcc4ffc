//! Registry of the Data-aware merges: Fisher-weighted averaging and Fisher-dampened deltas.
use super::Method;
use crate::error::Result;
use crate::params::Params;

/// Method names this family builds.
pub const NAMES: &[&str] = &[];

/// Builds `name` if this family has it.
pub fn build(name: &str, _p: &Params, _n_inputs: usize, _has_base: bool) -> Option<Result<Box<dyn Method>>> {
    match name {
        _ => None,
    }
}
