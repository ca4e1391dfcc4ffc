//! Registry of the geometric and other mergekit methods: model_stock, nuslerp, multislerp,
//! karcher, nearswap, ram, ramplus_tl, arcee_fusion, passthrough. One module per method
//! under `geometric/`; shared helpers (vector layouts, streamed per-vector statistics,
//! Gram matrices) in `geometric/common.rs`.
use crate::params::MethodSpec;

pub mod arcee_fusion;
pub mod common;
pub mod karcher;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;

/// The specs of this family.
pub fn specs() -> Vec<MethodSpec> {
    vec![
        model_stock::spec(),
        nuslerp::spec(),
        multislerp::spec(),
        karcher::spec(),
        nearswap::spec(),
        ram::spec(),
        ram::plus_spec(),
        arcee_fusion::spec(),
        passthrough::spec(),
    ]
}
