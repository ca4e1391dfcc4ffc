//! Registry of the data-aware merges: Fisher-weighted averaging, Fisher-dampened deltas, RegMean.
use crate::params::MethodSpec;

pub mod fisher_dampened;
pub mod fisher_weighted;
pub mod regmean;

/// Method names this family builds.
pub const NAMES: &[&str] = &["fisher_weighted", "fisher_dampened", "regmean"];

/// The specs of this family.
pub fn specs() -> Vec<MethodSpec> {
    vec![fisher_weighted::spec(), fisher_dampened::spec(), regmean::spec()]
}
