//! Registry of the geometric and other mergekit methods: model_stock, nuslerp, multislerp,
//! karcher, nearswap, ram, ramplus_tl, arcee_fusion, passthrough. One module per method
//! under `geometric/`; shared helpers (vector layouts, streamed per-vector statistics,
//! Gram matrices) in `geometric/common.rs`.
use super::Method;
use crate::error::Result;
use crate::params::Params;

pub mod arcee_fusion;
pub mod common;
pub mod karcher;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;

/// Method names this family builds.
pub const NAMES: &[&str] =
    &["model_stock", "nuslerp", "multislerp", "karcher", "nearswap", "ram", "ramplus_tl", "arcee_fusion", "passthrough"];

fn boxed<M: Method + 'static>(m: Result<M>) -> Result<Box<dyn Method>> {
    m.map(|m| Box::new(m) as Box<dyn Method>)
}

/// Builds `name` if this family has it.
pub fn build(name: &str, p: &Params, n: usize, has_base: bool) -> Option<Result<Box<dyn Method>>> {
    Some(match name {
        "model_stock" => boxed(model_stock::ModelStock::build(p, n, has_base)),
        "nuslerp" => boxed(nuslerp::NuSlerp::build(p, n, has_base)),
        "multislerp" => boxed(multislerp::MultiSlerp::build(p, n, has_base)),
        "karcher" => boxed(karcher::Karcher::build(p, n, has_base)),
        "nearswap" => boxed(nearswap::NearSwap::build(p, n, has_base)),
        "ram" | "ramplus_tl" => boxed(ram::Ram::build(name, p, n, has_base)),
        "arcee_fusion" => boxed(arcee_fusion::ArceeFusion::build(p, n, has_base)),
        "passthrough" => boxed(passthrough::Passthrough::build(p, n, has_base)),
        _ => return None,
    })
}
