//! RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
//! Models"): the linear map that best reproduces every model's outputs on its own inputs,
//!
//!   `W* = (Σ_i w_i W_i G̃_i) (Σ_i w_i G̃_i)⁻¹`,  `G̃_i = α G_i + (1 − α) diag(G_i)`,
//!
//! for a weight `W_i` of shape `[out, in]` and the Gram matrix `G_i = X_iᵀX_i` (`[in, in]`)
//! of the layer's inputs on task i's data. `α` (`reduce_non_diagonal_ratio`, as FusionBench
//! names it; default 0.9) shrinks the off-diagonals toward the diagonal; `w_i` (`weight`,
//! default 1) weighs the tasks. With `fan_in_fan_out` the weight is stored `[in, out]`
//! (Hugging Face `Conv1D`) and the same formula is applied to its transpose.
//!
//! Solved in f64 as `(A + λI) W*ᵀ = Σ_i w_i G̃_i W_iᵀ + λ W̄ᵀ` with `A = Σ w_i G̃_i`, `W̄` the
//! weighted mean of the `W_i` and `λ = ridge · mean(diag A)` (`ridge` default 1e-6):
//! a Cholesky factorization (faer), sequential, then triangular solves over fixed blocks of
//! output columns in parallel, so the result does not depend on the thread count. The ridge
//! makes a singular `A` (an input direction no task's data ever excites) solvable and sends
//! such directions to the plain average instead of to zero.
//!
//! Inputs: the n weights, then their n Gram matrices (auxiliary inputs of their own shape).
//! Tensors without a Gram (biases, norms, embeddings) are not this kernel's: the planner
//! averages them.
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::matmul;
use faer::{Accum, Conj, Mat, MatRef, Par};
use rayon::prelude::*;

/// The inputs are the models then their Gram matrices, in the same order.
pub fn spec() -> MethodSpec {
    MethodSpec::new("regmean", BaseRule::Forbidden, |p, n, b| Ok(Box::new(RegMean::build(p, n, b)?))).models(2, None).params(&[
        ParamSpec::float("weight", 1.0, Range::NON_NEG).per_model(),
        ParamSpec::float("reduce_non_diagonal_ratio", 0.9, Range::UNIT),
        ParamSpec::float("ridge", 1e-6, Range::NON_NEG),
        ParamSpec::bool("fan_in_fan_out", false),
    ])
}

pub struct RegMean {
    weights: Vec<f64>,
    alpha: f64,
    ridge: f64,
    fan_in_fan_out: bool,
}

/// Output columns solved per parallel task (fixed: results independent of the pool size).
const BLOCK: usize = 64;

impl RegMean {
    pub fn build(p: &Params, n_inputs: usize, _has_base: bool) -> Result<Self> {
        if !n_inputs.is_multiple_of(2) {
            return Err(Error::config(format!("regmean: needs one Gram matrix per model, got {n_inputs} inputs")));
        }
        let n = n_inputs / 2;
        let w = p.per_model("weight", n)?;
        let m = w.iter().fold(0f64, |a, x| a.max(*x));
        if m <= 0.0 {
            return Err(Error::config("regmean: parameter 'weight' must have a positive entry"));
        }
        Ok(RegMean {
            // Scale-free in w: divide by the largest so that huge weights cannot overflow.
            weights: w.iter().map(|x| x / m).collect(),
            alpha: p.f64("reduce_non_diagonal_ratio")?,
            ridge: p.f64("ridge")?,
            fan_in_fan_out: p.bool("fan_in_fan_out")?,
        })
    }

    fn n(&self) -> usize {
        self.weights.len()
    }

    /// (out, in) of a weight of this shape.
    fn dims(&self, shape: &[usize]) -> Option<(usize, usize)> {
        match shape {
            [a, b] if self.fan_in_fan_out => Some((*b, *a)),
            [a, b] => Some((*a, *b)),
            _ => None,
        }
    }
}

impl Method for RegMean {
    fn elementwise(&self) -> bool {
        false
    }

    fn aux_inputs(&self) -> usize {
        self.n()
    }

    fn check_aux(&self, shape: &[usize], aux: &[&[usize]]) -> std::result::Result<(), (usize, String)> {
        let Some((_, d)) = self.dims(shape) else {
            return Err((
                0,
                format!("regmean merges 2-D weights with a Gram matrix; this tensor has shape {shape:?} (tensors without a Gram are averaged)"),
            ));
        };
        for (k, s) in aux.iter().enumerate() {
            if *s != [d, d] {
                let how = if self.fan_in_fan_out { "weight stored [in, out]" } else { "weight [out, in]" };
                return Err((k, format!("a Gram matrix must be [{d}, {d}] for a {how} of shape {shape:?}")));
            }
        }
        Ok(())
    }

    fn apply(&self, ctx: &Ctx, _: Option<&[f32]>, inputs: &[&[f32]], _: &[f64], out: &mut [f32]) -> Result<()> {
        let n = self.n();
        let (o, d) =
            self.dims(ctx.shape).ok_or_else(|| Error::mismatch(ctx.tensor, format!("regmean needs a 2-D weight, got shape {:?}", ctx.shape)))?;
        let (ws, gs) = inputs.split_at(n);
        for (i, g) in gs.iter().enumerate() {
            if g.len() != d * d {
                return Err(Error::mismatch(ctx.tensor, format!("Gram matrix of model #{i} has {} values, [{d}, {d}] expected", g.len())));
            }
            if let Some(j) = (0..d).find(|&j| g[j * d + j] < 0.0) {
                return Err(Error::numerical(
                    ctx.tensor,
                    format!("Gram matrix of model #{i} has a negative diagonal entry {} at {j}: not a Gram matrix XᵀX", g[j * d + j]),
                ));
            }
        }
        let wsum: f64 = self.weights.iter().sum();
        // Wᵢᵀ as d × o, f64, for every model (the stored layout is [o, d], or [d, o] already).
        let wt = |i: usize| -> Mat<f64> {
            let x = ws[i];
            if self.fan_in_fan_out {
                Mat::from_fn(d, o, |r, c| x[r * o + c] as f64)
            } else {
                Mat::from_fn(d, o, |r, c| x[c * d + r] as f64)
            }
        };
        let gt = |i: usize| -> Mat<f64> {
            let (g, a) = (gs[i], self.alpha);
            Mat::from_fn(d, d, |r, c| if r == c { g[r * d + c] as f64 } else { a * g[r * d + c] as f64 })
        };
        let mut a = Mat::<f64>::zeros(d, d);
        let mut b = Mat::<f64>::zeros(d, o);
        let mut mean = Mat::<f64>::zeros(d, o);
        for i in 0..n {
            let wi = self.weights[i];
            if wi == 0.0 {
                continue;
            }
            let (g, w) = (gt(i), wt(i));
            a += &g * faer::Scale(wi);
            mean += &w * faer::Scale(wi / wsum);
            // Column blocks in parallel, each block's product sequential: deterministic.
            par_blocks(b.as_mut(), |c0, blk| {
                let k = blk.ncols();
                matmul(blk, Accum::Add, g.as_ref(), w.as_ref().subcols(c0, k), wi, Par::Seq);
            });
        }
        let tr = (0..d).map(|j| a[(j, j)]).sum::<f64>() / d.max(1) as f64;
        let lambda = if tr > 0.0 { self.ridge * tr } else { 1.0 };
        if lambda > 0.0 {
            for j in 0..d {
                a[(j, j)] += lambda;
            }
            b += &mean * faer::Scale(lambda);
        }
        let mut mem = faer::dyn_stack::MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(d, Par::Seq, Default::default()));
        llt::factor::cholesky_in_place(a.as_mut(), Default::default(), Par::Seq, faer::dyn_stack::MemStack::new(&mut mem), Default::default())
            .map_err(|e| {
                Error::numerical(
                    ctx.tensor,
                    format!("Σ w_i G̃_i + λI is not positive definite ({e:?}; λ = {lambda:e}): a Gram matrix is not XᵀX, or raise 'ridge'"),
                )
            })?;
        for r in 0..d {
            for c in r + 1..d {
                a[(r, c)] = 0.0;
            }
        }
        let l: MatRef<'_, f64> = a.as_ref();
        par_blocks(b.as_mut(), |_, blk| {
            llt::solve::solve_in_place_with_conj(l, Conj::No, blk, Par::Seq, faer::dyn_stack::MemStack::new(&mut []));
        });
        // b is W*ᵀ (d × o); write W* in the stored layout.
        if self.fan_in_fan_out {
            for r in 0..d {
                for c in 0..o {
                    out[r * o + c] = b[(r, c)] as f32;
                }
            }
        } else {
            for r in 0..o {
                for c in 0..d {
                    out[r * d + c] = b[(c, r)] as f32;
                }
            }
        }
        Ok(())
    }
}

/// Runs `f(first column, block)` over fixed blocks of `BLOCK` columns of `m`, in parallel.
fn par_blocks(m: faer::MatMut<'_, f64>, f: impl Fn(usize, faer::MatMut<'_, f64>) + Sync) {
    let cols = m.ncols();
    let mut blocks = Vec::new();
    let mut rest = m;
    let mut c0 = 0;
    while c0 < cols {
        let w = BLOCK.min(cols - c0);
        let (head, tail) = rest.split_at_col_mut(w);
        blocks.push((c0, head));
        rest = tail;
        c0 += w;
    }
    blocks.into_par_iter().for_each(|(c0, blk)| f(c0, blk));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{merge_arrays, pool};
    use serde_json::json;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| crate::rng::normal(seed, i as u64) as f32).collect()
    }

    /// XᵀX of a random [t, d] X.
    fn gram(t: usize, d: usize, seed: u64) -> Vec<f32> {
        let x = vals(t * d, seed);
        let mut g = vec![0f32; d * d];
        for r in 0..d {
            for c in 0..d {
                g[r * d + c] = (0..t).map(|k| x[k * d + r] * x[k * d + c]).sum();
            }
        }
        g
    }

    fn build(p: serde_json::Value, n: usize) -> Result<Box<dyn Method>> {
        crate::methods::build("regmean", p.as_object().unwrap(), n, false)
    }

    #[test]
    fn identical_models_give_the_model_and_one_model_is_itself() {
        let (o, d) = (5, 4);
        let w = vals(o * d, 1);
        let (g1, g2) = (gram(9, d, 2), gram(3, d, 3)); // g2 singular (rank 3 < 4)
        let m = build(json!({}), 4).unwrap();
        let got = merge_arrays(m.as_ref(), "t", &[o, d], 0, None, &[&w, &w, &g1, &g2], &pool(Some(2)).unwrap()).unwrap();
        got.iter().zip(&w).for_each(|(a, b)| assert!((a - b).abs() < 1e-4, "{a} {b}"));
    }

    #[test]
    fn alpha_zero_is_a_per_column_diagonal_weighted_average() {
        let (o, d) = (3, 4);
        let (w1, w2) = (vals(o * d, 4), vals(o * d, 5));
        let (g1, g2) = (gram(10, d, 6), gram(10, d, 7));
        let m = build(json!({"reduce_non_diagonal_ratio": 0.0, "ridge": 0.0}), 4).unwrap();
        let got = merge_arrays(m.as_ref(), "t", &[o, d], 0, None, &[&w1, &w2, &g1, &g2], &pool(Some(1)).unwrap()).unwrap();
        for r in 0..o {
            for c in 0..d {
                let (a, b) = (g1[c * d + c], g2[c * d + c]);
                let want = (a * w1[r * d + c] + b * w2[r * d + c]) / (a + b);
                assert!((got[r * d + c] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn bad_shapes_and_arity_are_refused() {
        let m = build(json!({}), 4).unwrap();
        assert!(m.check_aux(&[3, 4], &[&[4, 4], &[3, 3]]).unwrap_err().0 == 1);
        assert!(m.check_aux(&[4], &[&[4, 4], &[4, 4]]).is_err());
        assert!(build(json!({}), 3).is_err());
        assert!(build(json!({"reduce_non_diagonal_ratio": 1.5}), 4).is_err());
        assert!(build(json!({"weight": [0, 0]}), 4).is_err());
        let f = build(json!({"fan_in_fan_out": true}), 2).unwrap();
        assert!(f.check_aux(&[4, 3], &[&[4, 4]]).is_ok() && f.check_aux(&[4, 3], &[&[3, 3]]).is_err());
    }
}
