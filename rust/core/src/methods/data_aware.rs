//! Registry of the data-aware merges: Fisher-weighted averaging, Fisher-dampened deltas, RegMean.
use super::Method;
use crate::error::Result;
use crate::params::Params;

pub mod fisher_dampened;
pub mod fisher_weighted;
pub mod regmean;

/// Method names this family builds.
pub const NAMES: &[&str] = &["fisher_weighted", "fisher_dampened", "regmean"];

/// Builds `name` if this family has it.
pub fn build(name: &str, p: &Params, n_inputs: usize, has_base: bool) -> Option<Result<Box<dyn Method>>> {
    Some(match name {
        "fisher_weighted" => fisher_weighted::FisherWeighted::build(p, n_inputs, has_base).map(|m| Box::new(m) as _),
        "fisher_dampened" => fisher_dampened::FisherDampened::build(p, n_inputs, has_base).map(|m| Box::new(m) as _),
        "regmean" => regmean::RegMean::build(p, n_inputs, has_base).map(|m| Box::new(m) as _),
        _ => return None,
    })
}
