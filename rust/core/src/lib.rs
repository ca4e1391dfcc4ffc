//! merge_fast_core: stream safetensors checkpoints tensor by tensor, merge in f32, write
//! sharded safetensors. No Python here; `cargo test` covers it.
pub mod divisor;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod exp_ln;
pub mod kernel;
pub mod linalg;
pub mod methods;
pub mod params;
pub mod plan;
pub mod reader;
pub mod rng;
pub mod simd;
pub mod subspace;
pub mod writer;

pub use error::{Error, Result};
