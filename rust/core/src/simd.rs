//! Run-time CPU dispatch for hot loops. The crate is built for the baseline x86-64 (SSE2), so
//! that one wheel runs everywhere; [`avx2!`] compiles a function's body a second time with
//! AVX2 and FMA enabled and runs that build where the CPU has them ([`avx512!`]: AVX-512 too).
//! Rust never contracts `a * b + c` into a fused multiply-add on its own, so both builds
//! compute the same bits.

use std::sync::atomic::{AtomicBool, Ordering};

static BASELINE_ONLY: AtomicBool = AtomicBool::new(false);
static NO_AVX512: AtomicBool = AtomicBool::new(false);

/// Runs every [`avx2!`] and [`avx512!`] function in its baseline build from now on (`true`)
/// or lets it pick again: for tests that both builds give the same bits.
pub fn baseline_only(on: bool) {
    BASELINE_ONLY.store(on, Ordering::Relaxed);
}

/// Leaves AVX-512 unused from now on (`true`): [`avx512!`] functions run their baseline build
/// and hand-written AVX-512 loops their AVX2 ones; for tests that every build gives the same
/// bits on a CPU that has AVX-512.
pub fn no_avx512(on: bool) {
    NO_AVX512.store(on, Ordering::Relaxed);
}

#[doc(hidden)]
#[inline(always)]
pub fn wide_allowed() -> bool {
    !BASELINE_ONLY.load(Ordering::Relaxed)
}

/// Whether AVX-512 (F, DQ) code may run: the CPU has it (with AVX2 and FMA) and neither
/// [`baseline_only`] nor [`no_avx512`] is set.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx512_allowed() -> bool {
    wide_allowed()
        && !NO_AVX512.load(Ordering::Relaxed)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Defines a function whose body also gets a build with the given target features, chosen at
/// run time where the CPU has them (the shared body of [`avx2!`] and [`avx512!`]).
macro_rules! wide_build {
    ($features:literal, $allowed:expr, [$($detect:tt),+], $(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = $features)]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $allowed $(&& std::arch::is_x86_feature_detected!($detect))+ {
                    // SAFETY: the target features `wide` is compiled with were just detected.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide_build;

/// Defines a function whose body also gets an AVX2+FMA build (with POPCNT, which every AVX2
/// CPU has: `count_ones` was a dozen instructions without it), chosen at run time:
/// `avx2! { pub fn name(a: &[f32], b: &mut [f32]) -> T { ... } }`. Plain (non-generic)
/// signatures only.
macro_rules! avx2 {
    ($($item:tt)*) => {
        $crate::simd::wide_build!("avx2,fma,popcnt", $crate::simd::wide_allowed(), ["avx2", "fma", "popcnt"], $($item)*);
    };
}
pub(crate) use avx2;

/// As [`avx2!`], with AVX-512 (F, DQ, VL) as well: for loops of 64-bit integer multiplies
/// (the counter-based coins), which only AVX-512DQ vectorizes.
macro_rules! avx512 {
    ($($item:tt)*) => {
        $crate::simd::wide_build!("avx2,fma,popcnt,avx512f,avx512dq,avx512vl", $crate::simd::avx512_allowed(), ["avx512vl", "popcnt"], $($item)*);
    };
}
pub(crate) use avx512;

/// `f`'s results under each build this CPU can run: the widest, then without AVX-512, then the
/// baseline (for tests that every build gives the same bits).
#[cfg(test)]
pub fn each_build<T>(mut f: impl FnMut() -> T) -> Vec<T> {
    let mut out = Vec::new();
    for (no512, base) in [(false, false), (true, false), (true, true)] {
        no_avx512(no512);
        baseline_only(base);
        out.push(f());
    }
    no_avx512(false);
    baseline_only(false);
    out
}

#[cfg(test)]
mod tests {
    use crate::methods::geometric::common::testing::{rand, run};
    use serde_json::json;

    /// The kernels with wide builds give the same bits from every build (on a CPU without
    /// AVX2 every run takes the baseline one).
    #[test]
    fn both_builds_give_the_same_bits() {
        let (r, c) = (300, 700);
        let base = rand(r * c, 1);
        // Each model equal to the base in places (zero deltas, which never agree in a sign
        // election), at places of its own.
        let xs: Vec<Vec<f32>> = (2..5)
            .map(|k| {
                base.iter().zip(rand(r * c, k)).enumerate().map(|(j, (&b, d))| if j % (k as usize + 1) == 0 { b } else { b + 0.01 * d }).collect()
            })
            .collect();
        let xs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let cases = [
            ("sce", json!({"select_topk": 0.3})),
            ("sce", json!({"select_topk": 1.0})),
            ("sce", json!({"select_topk": 1e-9})),
            ("ties", json!({"density": 0.4, "weight": [0.5, 0.3, 0.2]})),
            ("dare_ties", json!({"density": 0.6, "weight": [0.5, 0.3, 0.2]})),
            ("ties", json!({"density": 0.5, "weight": [0.5, -0.3, 0.2], "consensus": "count", "disjoint_mean": "count", "lambda": 1.5})),
            ("dare_linear", json!({"density": 0.7, "weight": [0.5, 0.3, 0.4], "normalize": true})),
            ("dare_ties", json!({"density": 0.5, "weight": [0.5, 0.3, 0.4], "rescale_mode": "l2"})),
            ("dare_linear", json!({"density": 0.4, "weight": [0.5, 0.3, 0.4], "rescale_mode": "linf"})),
            ("breadcrumbs", json!({"density": 0.9, "gamma": 0.01, "weight": [1.0, 0.5, 1.0]})),
            ("breadcrumbs_ties", json!({"density": 0.8, "gamma": 0.05, "weight": [1.0, 1.0, 1.0], "normalize": true})),
            ("della", json!({"density": 0.5, "epsilon": 0.1, "weight": [0.4, 0.4, 0.2], "lambda": 0.9})),
        ];
        for (name, params) in cases {
            let outs = super::each_build(|| run(name, params.clone(), &[r, c], Some(&base), &xs).unwrap());
            for o in &outs[1..] {
                assert!(o.iter().zip(&outs[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}");
            }
        }
    }
}
