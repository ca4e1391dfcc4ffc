//! Registry of the sparsify-and-merge family: TIES, DARE (with or without TIES), Model
//! Breadcrumbs (with or without TIES), DELLA (with or without TIES) and SCE, with mergekit
//! 0.1.5's parameters, defaults and order of operations (see `sparsified/gta.rs`).
//!
//! | method | sparsification | consensus | normalize | rescale |
//! |---|---|---|---|---|
//! | ties | magnitude top-k | sum | true | false |
//! | dare_ties | random (DARE) | sum | false | true (L1) |
//! | dare_linear | random (DARE) | none | false | true (L1) |
//! | breadcrumbs | magnitude window (gamma) | none | false | false |
//! | breadcrumbs_ties | magnitude window (gamma) | sum | false | false |
//! | della | magnitude-ranked random | sum | true | true (L1) |
//! | della_linear | magnitude-ranked random | none | false | true (L1) |
//! | sce | variance top-k (select_topk) | sum | — | — |
use super::Method;
use crate::error::Result;
use crate::params::Params;

pub mod breadcrumbs;
pub mod dare;
pub mod della;
pub mod gta;
pub mod sce;
pub mod sparsify;
pub mod ties;

use gta::Spec;

/// Method names this family builds.
pub const NAMES: &[&str] = &["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"];

/// Builds `name` if this family has it.
pub fn build(name: &str, p: &Params, n: usize, has_base: bool) -> Option<Result<Box<dyn Method>>> {
    let spec = |consensus, normalize, rescale| Spec { consensus, normalize, rescale };
    Some(match name {
        "ties" => ties::Magnitude::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(true, true, false), Box::new(s))),
        "dare_ties" => dare::Random::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(true, false, true), Box::new(s))),
        "dare_linear" => dare::Random::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(false, false, true), Box::new(s))),
        "breadcrumbs" => breadcrumbs::Outliers::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(false, false, false), Box::new(s))),
        "breadcrumbs_ties" => breadcrumbs::Outliers::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(true, false, false), Box::new(s))),
        "della" => della::MagPrune::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(true, true, true), Box::new(s))),
        "della_linear" => della::MagPrune::build(name, p, n).and_then(|s| gta::build(name, p, n, has_base, spec(false, false, true), Box::new(s))),
        "sce" => sce::Sce::build(p, n, has_base).map(|m| Box::new(m) as Box<dyn Method>),
        _ => return None,
    })
}
