//! RAM, Reinforced Agent Merging (mergekit `ram` and `ramplus_tl`). With task vectors
//! `Δ_i = θ_i − θ_base`, an entry of `Δ_i` "contributes" when `|Δ_i| > epsilon`. Per
//! element, entries contributed by exactly one model are kept as they are, entries
//! contributed by several are averaged over the contributors, the rest are 0; the result is
//! added to the base.
//!
//! `ramplus_tl` (tensor-local RAM+) also rescales each model's unique entries by
//! `λ_i = 1 + r · clamp(ρ_i, 0, alpha)`, `ρ_i = shared_i / max(unique_i, epsilon)`, where
//! `shared_i`/`unique_i` count model i's contributing entries that are shared with other
//! models / unique to it over the whole tensor (two streamed counts per model).
use crate::error::Result;
use crate::kernel::{Ctx, Method};
use crate::params::{BaseRule, MethodSpec, ParamSpec, Params, Range};

pub fn spec() -> MethodSpec {
    MethodSpec::new("ram", BaseRule::Required, |p, n, b| Ok(Box::new(Ram::build(p.method(), p, n, b)?)))
        .params(&[ParamSpec::float("epsilon", 1e-5, Range::NON_NEG)])
        .mergekit()
}

pub fn plus_spec() -> MethodSpec {
    MethodSpec::new("ramplus_tl", BaseRule::Required, |p, n, b| Ok(Box::new(Ram::build(p.method(), p, n, b)?)))
        .params(&[
            ParamSpec::float("r", 0.1, Range::NON_NEG),
            ParamSpec::float("alpha", 0.2, Range::NON_NEG),
            ParamSpec::float("epsilon", 1e-5, Range::NON_NEG),
        ])
        .mergekit()
}

pub struct Ram {
    eps: f32,
    /// `Some((r, alpha))` for ramplus_tl.
    plus: Option<(f64, f64)>,
    n: usize,
}

impl Ram {
    pub fn build(name: &str, p: &Params, n: usize, _has_base: bool) -> Result<Self> {
        // alpha bounds a clamp from above (clamp(ρ, 0, alpha)): it cannot be negative
        let plus = if name == "ramplus_tl" { Some((p.f64("r")?, p.f64("alpha")?)) } else { None };
        let eps = p.f64("epsilon")?;
        Ok(Ram { eps: eps as f32, plus, n })
    }

    /// Visits each element: (base value, number of contributors, per-model mask bits via the
    /// closure's own recomputation). Returns the contributor count at one element.
    #[inline]
    fn count(&self, base: f32, inputs: &[&[f32]], j: usize) -> u32 {
        inputs.iter().map(|x| u32::from((x[j] - base).abs() > self.eps)).sum()
    }
}

impl Method for Ram {
    fn n_stats(&self) -> usize {
        if self.plus.is_some() {
            2 * self.n
        } else {
            0
        }
    }

    fn accumulate(&self, base: Option<&[f32]>, inputs: &[&[f32]], stats: &mut [f64]) {
        if self.plus.is_none() {
            return;
        }
        let base = base.unwrap();
        let n = self.n;
        let (mut shared, mut unique) = (vec![0u64; n], vec![0u64; n]);
        for (j, &b) in base.iter().enumerate() {
            let c = self.count(b, inputs, j);
            if c == 0 {
                continue;
            }
            for (i, x) in inputs.iter().enumerate() {
                if (x[j] - b).abs() > self.eps {
                    if c == 1 {
                        unique[i] += 1;
                    } else {
                        shared[i] += 1;
                    }
                }
            }
        }
        for i in 0..n {
            stats[i] += shared[i] as f64;
            stats[n + i] += unique[i] as f64;
        }
    }

    fn apply(&self, _: &Ctx, base: Option<&[f32]>, inputs: &[&[f32]], stats: &[f64], out: &mut [f32]) -> Result<()> {
        let base = base.expect("arity checked at build");
        let lambda: Vec<f32> = match self.plus {
            None => vec![1.0; self.n],
            Some((r, alpha)) => (0..self.n)
                .map(|i| {
                    let rho = stats[i] / stats[self.n + i].max(self.eps as f64);
                    (1.0 + r * rho.clamp(0.0, alpha)) as f32
                })
                .collect(),
        };
        // Block by block, model after model, without a branch per entry (half the entries of a
        // sparse fine-tune contribute, at random): the same sums in the same order, a skipped
        // entry adding +0.0 to a sum that is never -0.0.
        const B: usize = 1024;
        let eps = self.eps;
        let (mut cnt, mut acc) = ([0f32; B], [0f32; B]);
        for (k, (o, b)) in out.chunks_mut(B).zip(base.chunks(B)).enumerate() {
            let r = k * B..k * B + o.len();
            let (cnt, acc) = (&mut cnt[..o.len()], &mut acc[..o.len()]);
            cnt.fill(0.0);
            for x in inputs {
                cnt.iter_mut().zip(&x[r.clone()]).zip(b).for_each(|((c, &x), &b)| *c += if (x - b).abs() > eps { 1.0 } else { 0.0 });
            }
            acc.fill(0.0);
            for (x, &l) in inputs.iter().zip(&lambda) {
                for (((a, &x), &b), &c) in acc.iter_mut().zip(&x[r.clone()]).zip(b).zip(cnt.iter()) {
                    let d = x - b;
                    let t = if c == 1.0 { d * l } else { d / c };
                    *a += if d.abs() > eps { t } else { 0.0 };
                }
            }
            o.iter_mut().zip(b).zip(acc.iter()).for_each(|((o, &b), &a)| *o = b + a);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::testing::{close, rand, run};
    use serde_json::json;

    fn reference(base: &[f32], xs: &[&[f32]], eps: f64, plus: Option<(f64, f64)>) -> Vec<f64> {
        let n = xs.len();
        let d: Vec<Vec<f64>> = xs.iter().map(|x| x.iter().zip(base).map(|(&a, &b)| a as f64 - b as f64).collect()).collect();
        let m: Vec<Vec<bool>> = d.iter().map(|v| v.iter().map(|x| x.abs() > eps).collect()).collect();
        let cnt: Vec<usize> = (0..base.len()).map(|j| (0..n).filter(|&i| m[i][j]).count()).collect();
        let lam: Vec<f64> = (0..n)
            .map(|i| match plus {
                None => 1.0,
                Some((r, a)) => {
                    let sh = (0..base.len()).filter(|&j| m[i][j] && cnt[j] > 1).count() as f64;
                    let un = (0..base.len()).filter(|&j| m[i][j] && cnt[j] == 1).count() as f64;
                    1.0 + r * (sh / un.max(eps)).clamp(0.0, a)
                }
            })
            .collect();
        (0..base.len())
            .map(|j| {
                let mut s = base[j] as f64;
                for i in 0..n {
                    if m[i][j] {
                        s += if cnt[j] == 1 { d[i][j] * lam[i] } else { d[i][j] / cnt[j] as f64 };
                    }
                }
                s
            })
            .collect()
    }

    #[test]
    fn ram_and_plus() {
        let n = 150_000;
        let base = rand(n, 1);
        // Sparse deltas so that unique and shared entries both occur.
        let mk = |k: u64| -> Vec<f32> {
            let r = rand(n, k);
            base.iter().zip(&r).map(|(&b, &x)| if x > 0.5 { b + 0.1 * x } else { b }).collect()
        };
        let (a, b, c) = (mk(2), mk(3), mk(4));
        let y = run("ram", json!({}), &[n], Some(&base), &[&a, &b, &c]).unwrap();
        close(&y, &reference(&base, &[&a, &b, &c], 1e-5, None), 1e-6);
        let y = run("ramplus_tl", json!({"r": 0.5, "alpha": 0.9}), &[n], Some(&base), &[&a, &b, &c]).unwrap();
        close(&y, &reference(&base, &[&a, &b, &c], 1e-5, Some((0.5, 0.9))), 1e-6);
        let y = run("ramplus_tl", json!({}), &[n], Some(&base), &[&a]).unwrap();
        close(&y, &reference(&base, &[&a], 1e-5, Some((0.1, 0.2))), 1e-6);
    }
}
