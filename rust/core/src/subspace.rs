//! Subspace masks (the Gemma-4-E4B-Luchador recipe): for each 2-D tensor, the top-r left
//! and right singular vectors of `W_IT − W_PT`, the directions instruction tuning moved.
//! A trainer then projects gradients out of them (merge_fast.torch.SubspaceProjector).
use crate::error::{Error, Result};
use crate::linalg::{svd_topk, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS};
use crate::reader::Checkpoint;
use rayon::prelude::*;

/// One tensor's mask: `u` is `out x r`, `v` is `in x r` (both row-major), and the share of
/// `|W_IT − W_PT|_F²` the r components capture.
pub struct Mask {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
    pub energy: f64,
    /// Whether the exact SVD was used (r close to full rank) rather than the randomized one.
    pub exact: bool,
}

/// Computes masks for `names` (2-D tensors present in both checkpoints with equal shapes),
/// in parallel across tensors, one tensor's delta in memory per worker.
pub fn subspace_masks(it: &Checkpoint, pt: &Checkpoint, names: &[String], rank: usize, seed: u64) -> Result<Vec<Mask>> {
    if rank == 0 {
        return Err(Error::config("subspace masks: rank must be at least 1"));
    }
    for n in names {
        let a = it.get(n)?;
        let b = pt.info(n).ok_or_else(|| Error::mismatch(n.as_str(), format!("missing from {}", pt.root().display())))?;
        if a.shape.len() != 2 {
            return Err(Error::mismatch(n.as_str(), format!("subspace masks need 2-D tensors, shape is {:?}", a.shape)));
        }
        if a.shape != b.shape {
            return Err(Error::mismatch(
                n.as_str(),
                format!("shape {:?} in {} but {:?} in {}", a.shape, it.root().display(), b.shape, pt.root().display()),
            ));
        }
    }
    names
        .par_iter()
        .map(|n| {
            let a = it.get(n)?;
            let b = pt.get(n)?;
            let (m, k) = (a.shape[0], a.shape[1]);
            let mut delta = vec![0f32; m * k];
            let mut other = vec![0f32; m * k];
            it.read_f32(a, 0..m * k, &mut delta)?;
            pt.read_f32(b, 0..m * k, &mut other)?;
            delta.iter_mut().zip(&other).for_each(|(d, o)| *d -= o);
            drop(other);
            let r = rank.min(m).min(k);
            let t = svd_topk(&delta, m, k, r, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, seed).map_err(|e| match e {
                Error::Numerical { msg, .. } => Error::numerical(n.as_str(), msg),
                Error::TensorMismatch { msg, .. } => Error::mismatch(n.as_str(), msg),
                e => e,
            })?;
            let s = &t.svd;
            let got = s.rank();
            // vt is got x k; store V as k x got so both factors are "rows of the weight".
            let mut v = vec![0f32; k * got];
            for i in 0..got {
                for j in 0..k {
                    v[j * got + i] = s.vt[i * k + j];
                }
            }
            it.release(a);
            pt.release(b);
            Ok(Mask { name: n.clone(), rows: m, cols: k, rank: got, u: s.u.clone(), v, energy: t.energy, exact: t.exact })
        })
        .collect()
}
