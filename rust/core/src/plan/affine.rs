//! The `affine` source: `scale · L · S · diag(g) · R · diag(h)` of a stored 2-D tensor `S`,
//! each factor optional. Cross-architecture alignment carries a donor's weights into an
//! anchor's residual stream this way (`R` a hidden × hidden rotation, `g` the donor's norm
//! gain folded in, `h` the inverse of the anchor's), so the aligned tensor is made on the
//! fly from the donor's file and a few small matrices, like a LoRA source.
use super::{bind_ref, Reader, Source, TensorRef};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::linalg::AffineMap;
use crate::reader::{Checkpoint, TensorInfo};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use serde::Deserialize;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// `scale · L · S · diag(g) · R · diag(h)`; `S` is `[m, n]`, `L` `[p, m]`, `g` `[n]`,
/// `R` `[n, q]`, `h` `[q]` (or `[n]` without `R`). `shape` is the result's, checked at bind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffineSpec {
    pub src: Source,
    pub shape: Vec<usize>,
    #[serde(default)]
    pub left: Option<TensorRef>,
    #[serde(default)]
    pub right: Option<TensorRef>,
    /// `g`: scales the columns of `S` (the rows of `R`).
    #[serde(default)]
    pub right_in: Option<TensorRef>,
    /// `h`: scales the columns of the result.
    #[serde(default)]
    pub right_out: Option<TensorRef>,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

type Stored<'a> = (&'a Checkpoint, &'a TensorInfo);

pub struct AffineReader<'a> {
    pub(super) src: Reader<'a>,
    pub(super) shape: &'a [usize],
    left: Option<Stored<'a>>,
    right: Option<Stored<'a>>,
    right_in: Option<Stored<'a>>,
    right_out: Option<Stored<'a>>,
    scale: f32,
    /// The whole result, made on first read and dropped on `release` (one tensor at a time
    /// per worker: the matrix products need all of `S`).
    value: Mutex<Option<Arc<Vec<f32>>>>,
}

fn read_all((c, i): Stored<'_>) -> Result<Vec<f32>> {
    let mut v = vec![0f32; i.numel()];
    c.read_f32(i, 0..i.numel(), &mut v)?;
    Ok(v)
}

impl<'a> AffineReader<'a> {
    pub(super) fn bind(spec: &'a AffineSpec, ckpts: &'a [Checkpoint], out_name: &str) -> Result<Self> {
        let src = Reader::bind(&spec.src, ckpts, out_name)?;
        let opt = |r: &Option<TensorRef>| r.as_ref().map(|r| bind_ref(r, ckpts, out_name)).transpose();
        let (left, right, right_in, right_out) = (opt(&spec.left)?, opt(&spec.right)?, opt(&spec.right_in)?, opt(&spec.right_out)?);
        let s = src.shape();
        let bad = |why: String| Err(Error::mismatch(out_name, format!("affine source over {}: {why}", src.describe())));
        if s.len() != 2 {
            return bad(format!("needs a 2-D tensor, got shape {s:?}"));
        }
        let (m, n) = (s[0], s[1]);
        let dims = |x: Option<Stored<'_>>| x.map(|(_, i)| i.shape.clone());
        let mut rows = m;
        if let Some(l) = dims(left) {
            if l.len() != 2 || l[1] != m {
                return bad(format!("left factor of shape {l:?} does not multiply {m} rows"));
            }
            rows = l[0];
        }
        if let Some(g) = dims(right_in) {
            if *g != [n] {
                return bad(format!("column scales of shape {g:?}, expected [{n}]"));
            }
        }
        let mut cols = n;
        if let Some(r) = dims(right) {
            if r.len() != 2 || r[0] != n {
                return bad(format!("right factor of shape {r:?} does not multiply {n} columns"));
            }
            cols = r[1];
        }
        if let Some(h) = dims(right_out) {
            if *h != [cols] {
                return bad(format!("output column scales of shape {h:?}, expected [{cols}]"));
            }
        }
        if spec.shape != [rows, cols] {
            return bad(format!("the result has shape [{rows}, {cols}], the plan says {:?}", spec.shape));
        }
        if !spec.scale.is_finite() {
            return Err(Error::config(format!("output '{out_name}': affine scale must be finite, got {}", spec.scale)));
        }
        Ok(AffineReader { src, shape: &spec.shape, left, right, right_in, right_out, scale: spec.scale as f32, value: Mutex::new(None) })
    }

    fn compute(&self) -> Result<Vec<f32>> {
        let (m, n) = (self.src.shape()[0], self.src.shape()[1]);
        let mut s = vec![0f32; m * n];
        self.src.read(0..m * n, &mut s)?;
        // Row-major buffers written in place by faer: at most two tensor-sized ones alive.
        let g = self.right_in.map(read_all).transpose()?;
        let (mut t, q) = match self.right_factor(g.as_deref(), n)? {
            Some((rv, q)) => {
                let mut t = vec![0f32; m * q];
                let (sm, rm) = (MatRef::from_row_major_slice(&s, m, n), MatRef::from_row_major_slice(&rv, n, q));
                matmul(MatMut::from_row_major_slice_mut(&mut t, m, q), Accum::Replace, sm, rm, 1.0f32, Par::Seq);
                (t, q)
            }
            None => {
                if let Some(g) = &g {
                    for row in s.chunks_exact_mut(n.max(1)) {
                        row.iter_mut().zip(g).for_each(|(x, &gi)| *x *= gi);
                    }
                }
                (std::mem::take(&mut s), n)
            }
        };
        drop(s);
        if let Some(l) = self.left {
            let lv = read_all(l)?;
            let p = lv.len() / m.max(1);
            let mut u = vec![0f32; p * q];
            let (lm, tm) = (MatRef::from_row_major_slice(&lv, p, m), MatRef::from_row_major_slice(&t, m, q));
            matmul(MatMut::from_row_major_slice_mut(&mut u, p, q), Accum::Replace, lm, tm, 1.0f32, Par::Seq);
            t = u;
        }
        let h = self.right_out.map(read_all).transpose()?;
        for row in t.chunks_exact_mut(q.max(1)) {
            match &h {
                Some(h) => row.iter_mut().zip(h).for_each(|(x, &hj)| *x = *x * self.scale * hj),
                None => row.iter_mut().for_each(|x| *x *= self.scale),
            }
        }
        Ok(t)
    }

    /// The map's factors, not multiplied out (`S` widened; `g` folded into `R`'s rows, or
    /// into the column scales `d = g·scale·h` without `R`).
    pub(super) fn factors(&self) -> Result<AffineMap> {
        let (m, n) = (self.src.shape()[0], self.src.shape()[1]);
        let mut s = vec![0f32; m * n];
        self.src.read(0..m * n, &mut s)?;
        let g = self.right_in.map(read_all).transpose()?;
        let right = self.right_factor(g.as_deref(), n)?;
        let q = right.as_ref().map_or(n, |r| r.1);
        let mut d = match self.right_out.map(read_all).transpose()? {
            Some(h) => h.iter().map(|&h| self.scale * h).collect(),
            None => vec![self.scale; q],
        };
        if let (None, Some(g)) = (&right, &g) {
            d.iter_mut().zip(g).for_each(|(x, &gi)| *x *= gi);
        }
        let left = self.left.map(read_all).transpose()?.map(|v| {
            let p = v.len() / m.max(1);
            (v, p)
        });
        Ok(AffineMap { s, m, n, left, right, d })
    }

    /// `diag(g) · R` (`R` `[n, q]`: `g` scales its rows, not `S`'s columns) and `q`.
    fn right_factor(&self, g: Option<&[f32]>, n: usize) -> Result<Option<(Vec<f32>, usize)>> {
        let Some(r) = self.right else { return Ok(None) };
        let mut rv = read_all(r)?;
        let q = rv.len() / n.max(1);
        if let Some(g) = g {
            for (row, &gi) in rv.chunks_exact_mut(q.max(1)).zip(g) {
                row.iter_mut().for_each(|x| *x *= gi);
            }
        }
        Ok(Some((rv, q)))
    }

    pub(super) fn read(&self, range: Range<usize>, dst: &mut [f32]) -> Result<()> {
        let value = {
            let mut slot = self.value.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(v) => Arc::clone(v),
                None => {
                    let v = Arc::new(self.compute()?);
                    *slot = Some(Arc::clone(&v));
                    v
                }
            }
        };
        dst.copy_from_slice(&value[range]);
        Ok(())
    }

    pub(super) fn release(&self) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.src.release();
        for (c, i) in [self.left, self.right, self.right_in, self.right_out].into_iter().flatten() {
            c.release(i);
        }
    }

    pub(super) fn dtype(&self) -> Dtype {
        self.src.dtype()
    }

    pub(super) fn root(&self) -> &Path {
        self.src.root()
    }

    pub(super) fn nbytes(&self) -> u64 {
        let side: usize = [self.left, self.right, self.right_in, self.right_out].into_iter().flatten().map(|(_, i)| i.span.len()).sum();
        self.src.nbytes() + side as u64
    }

    pub(super) fn describe(&self) -> String {
        format!("{} carried through an affine map", self.src.describe())
    }
}
