//! Registry of the data-aware merges: Fisher-weighted averaging and Fisher-dampened deltas.
use crate::params::MethodSpec;

pub mod fisher_dampened;
pub mod fisher_weighted;

/// Method names this family builds.
pub const NAMES: &[&str] = &["fisher_weighted", "fisher_dampened"];

/// The specs of this family.
pub fn specs() -> Vec<MethodSpec> {
    vec![fisher_weighted::spec(), fisher_dampened::spec()]
}
