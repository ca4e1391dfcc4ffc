//! `exp` and `ln` of f64, bit for bit as glibc computes them on x86-64 CPUs with AVX2 and FMA
//! (its `__exp_fma` / `__log_fma`, glibc ≥ 2.28: the algorithms of ARM's optimized-routines,
//! MIT / Apache-2.0, whose constants are below), four at a time with AVX2 and eight with
//! AVX-512 (the same operations per lane; on the Xeon measured, AVX-512 took exp from 1.4 to
//! 0.9 ns and ln from 1.9 to 1.3 ns per element).
//!
//! Why not `f64::exp`: Arcee Fusion takes two `exp` and one `ln` per element and the
//! log-normalized Fisher one `ln`; as libm calls they were ~40% of those merges' time. Outputs
//! must stay byte-identical to the libm-based ones, so this is the same computation (every
//! fused multiply-add where GCC fused one in glibc's build, read off its machine code), not an
//! approximation. The scalar functions use `f64::mul_add`, so they give these bits on every
//! CPU, where glibc's own result depends on the CPU (its non-FMA build rounds differently).
//! Tests compare every path with the C library's `exp` and `log` where that library is glibc on
//! an AVX2+FMA CPU, and with each other everywhere.

use crate::simd::avx2;

// exp: x = k·ln2/128 + r; the polynomial approximates exp(r) − 1.
const INVLN2N: f64 = 184.6649652337873;
const NEGLN2HIN: f64 = -0.005415212348111709;
const NEGLN2LON: f64 = -1.2864023111638346e-14;
const C2: f64 = 0.49999999999996786;
const C3: f64 = 0.16666666666665886;
const C4: f64 = 0.0416666808410674;
const C5: f64 = 0.008333335853059549;
const SHIFT: f64 = 6755399441055744.0;
// ln: the polynomial A for log1p(r) − r around the table's centres, B for inputs near 1.
const LN2HI: f64 = 0.6931471805598903;
const LN2LO: f64 = 5.497923018708371e-14;
const A: [f64; 5] = [-0.5000000000000001, 0.33333333331825593, -0.2499999999622955, 0.20000304511814496, -0.16667054827627667];
const B: [f64; 11] = [
    -0.5,
    0.3333333333333352,
    -0.24999999999998432,
    0.19999999999320328,
    -0.16666666669929706,
    0.14285715076560868,
    -0.12499997863982555,
    0.11110712032936046,
    -0.10000486757818193,
    0.09181994006195467,
    -0.08328363062289341,
];

#[repr(align(32))]
struct Table([u64; 256]);

avx2! {
/// e^x.
pub fn exp(x: f64) -> f64 {
    let ix = x.to_bits();
    let abstop = (ix >> 52) as u32 & 0x7ff;
    // |x| < 2^-54 or ≥ 512 (or not finite) leaves the common path.
    if abstop.wrapping_sub(0x3c9) >= 0x3f {
        if (abstop.wrapping_sub(0x3c9) as i32) < 0 {
            return x + 1.0;
        }
        if abstop >= 0x409 {
            return if ix == f64::NEG_INFINITY.to_bits() {
                0.0
            } else if abstop == 0x7ff {
                x + 1.0
            } else if ix >> 63 == 1 {
                0.0
            } else {
                f64::INFINITY
            };
        }
        let (tmp, sbits, ki) = exp_core(x);
        return exp_scaled(tmp, sbits, ki);
    }
    let (tmp, sbits, _) = exp_core(x);
    let scale = f64::from_bits(sbits);
    scale.mul_add(tmp, scale)
}
}

/// e^x = scale·(1 + tmp), scale = 2^(k/128) as bits (valid while −1023·128 < k < 1024·128).
#[inline(always)]
fn exp_core(x: f64) -> (f64, u64, u64) {
    let kd = x.mul_add(INVLN2N, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = kd.mul_add(NEGLN2LON, kd.mul_add(NEGLN2HIN, x));
    let i = (ki % 128) as usize;
    let tail = f64::from_bits(EXP_TAB.0[2 * i]);
    let sbits = EXP_TAB.0[2 * i + 1].wrapping_add(ki << 45);
    let r2 = r * r;
    let tmp = r.mul_add(C5, C4).mul_add(r2 * r2, r2.mul_add(r.mul_add(C3, C2), r + tail));
    (tmp, sbits, ki)
}

/// 512 ≤ |x| < 1024: the scale's exponent is out of range, so it is applied in two steps
/// (below 1, rounded once at the subnormal precision).
#[cold]
fn exp_scaled(tmp: f64, sbits: u64, ki: u64) -> f64 {
    if ki & 0x8000_0000 == 0 {
        let scale = f64::from_bits(sbits.wrapping_sub(1009 << 52));
        return scale.mul_add(tmp, scale) * f64::from_bits(0x7f00_0000_0000_0000);
        // 2^1009
    }
    let scale = f64::from_bits(sbits.wrapping_add(1022 << 52));
    let st = scale * tmp;
    let mut y = scale + st;
    if y < 1.0 {
        let lo = scale - y + st;
        let hi = y + 1.0;
        let lo = 1.0 - hi + y + lo;
        y = (hi + lo) - 1.0;
        if y == 0.0 {
            y = 0.0;
        }
    }
    y * f64::from_bits(0x0010_0000_0000_0000) // 2^-1022
}

const LN_NEAR1_LO: u64 = 0x3fee_0000_0000_0000; // 1 − 2^-4
const LN_NEAR1_HI: u64 = 0x3ff1_0900_0000_0000; // 1 + 0x1.09p-4
const LN_OFF: u64 = 0x3fe6_0000_0000_0000;

avx2! {
/// ln x.
pub fn ln(x: f64) -> f64 {
    let mut ix = x.to_bits();
    if ix.wrapping_sub(LN_NEAR1_LO) < LN_NEAR1_HI - LN_NEAR1_LO {
        return if ix == 1f64.to_bits() { 0.0 } else { ln_near1(x) };
    }
    let top = (ix >> 48) as u32;
    if top.wrapping_sub(0x10) >= 0x7ff0 - 0x10 {
        // Zero, subnormal, negative, infinite or NaN.
        if ix << 1 == 0 {
            return f64::NEG_INFINITY;
        }
        if ix == f64::INFINITY.to_bits() {
            return x;
        }
        if top & 0x8000 != 0 || top & 0x7ff0 == 0x7ff0 {
            // The C library's NaN for an invalid operation, with its bits (x86: negative).
            #[allow(clippy::eq_op)]
            return (x - x) / (x - x);
        }
        ix = (x * f64::from_bits(0x4330_0000_0000_0000)).to_bits().wrapping_sub(52 << 52); // ·2^52
    }
    let tmp = ix.wrapping_sub(LN_OFF);
    let i = ((tmp >> 45) % 128) as usize;
    let kd = ((tmp as i64 >> 52) as i32) as f64;
    let z = f64::from_bits(ix.wrapping_sub(tmp & (0xfff << 52)));
    ln_core(z, kd, f64::from_bits(LN_TAB.0[2 * i]), f64::from_bits(LN_TAB.0[2 * i + 1]))
}
}

/// ln(2^k·z) = log1p(z/c − 1) + ln c + k·ln 2.
#[inline(always)]
fn ln_core(z: f64, kd: f64, invc: f64, logc: f64) -> f64 {
    let r = z.mul_add(invc, -1.0);
    let w = kd.mul_add(LN2HI, logc);
    let hi = r + w;
    let lo = kd.mul_add(LN2LO, w - hi + r);
    let r2 = r * r;
    let r3 = r * r2;
    let p = r.mul_add(A[4], A[3]).mul_add(r2, r.mul_add(A[2], A[1]));
    r3.mul_add(p, r2.mul_add(A[0], lo)) + hi
}

/// ln x for x within [1 − 2^-4, 1 + 0x1.09p-4): a longer polynomial in r = x − 1, its first
/// term split so that r·r is exact.
#[inline(always)]
fn ln_near1(x: f64) -> f64 {
    let r = x - 1.0;
    let r2 = r * r;
    let r3 = r * r2;
    let q0 = r2.mul_add(B[3], r.mul_add(B[2], B[1]));
    let q1 = r2.mul_add(B[6], r.mul_add(B[5], B[4]));
    let q2 = r3.mul_add(B[10], r2.mul_add(B[9], r.mul_add(B[8], B[7])));
    let q = q2.mul_add(r3, q1).mul_add(r3, q0);
    const SPLIT: f64 = 134217728.0; // 2^27
    let rhi = (-SPLIT).mul_add(r, r.mul_add(SPLIT, r));
    let rlo = r - rhi;
    let rhi2 = rhi * rhi;
    let hi = rhi2.mul_add(B[0], r);
    let lo = (B[0] * rlo).mul_add(r + rhi, rhi2.mul_add(B[0], r - hi));
    hi + q.mul_add(r3, lo)
}

/// `exp` of every element, in place.
pub fn exp_all(v: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        // SAFETY: the features each build needs were just detected.
        return unsafe {
            if crate::simd::avx512_allowed() {
                x86_512::exp_all(v)
            } else {
                x86::exp_all(v)
            }
        };
    }
    v.iter_mut().for_each(|x| *x = exp(*x));
}

/// `ln` of every element, in place.
pub fn ln_all(v: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        // SAFETY: the features each build needs were just detected.
        return unsafe {
            if crate::simd::avx512_allowed() {
                x86_512::ln_all(v)
            } else {
                x86::ln_all(v)
            }
        };
    }
    v.iter_mut().for_each(|x| *x = ln(*x));
}

#[cfg(target_arch = "x86_64")]
fn wide() -> bool {
    crate::simd::wide_allowed() && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The same operations on four lanes; a vector holding any lane off the common path (rare)
/// goes through the scalar functions.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_all(v: &mut [f64]) {
        let mut quads = v.chunks_exact_mut(4);
        for q in &mut quads {
            let x = _mm256_loadu_pd(q.as_ptr());
            let ix = _mm256_castpd_si256(x);
            let abstop = _mm256_and_si256(_mm256_srli_epi64::<52>(ix), _mm256_set1_epi64x(0x7ff));
            let off = _mm256_sub_epi64(abstop, _mm256_set1_epi64x(0x3c9));
            let odd = _mm256_or_si256(_mm256_cmpgt_epi64(_mm256_setzero_si256(), off), _mm256_cmpgt_epi64(off, _mm256_set1_epi64x(0x3e)));
            if _mm256_movemask_pd(_mm256_castsi256_pd(odd)) != 0 {
                q.iter_mut().for_each(|x| *x = exp(*x));
                continue;
            }
            let kd = _mm256_fmadd_pd(x, _mm256_set1_pd(INVLN2N), _mm256_set1_pd(SHIFT));
            let ki = _mm256_castpd_si256(kd);
            let kd = _mm256_sub_pd(kd, _mm256_set1_pd(SHIFT));
            let r = _mm256_fmadd_pd(kd, _mm256_set1_pd(NEGLN2LON), _mm256_fmadd_pd(kd, _mm256_set1_pd(NEGLN2HIN), x));
            let (tail, scale) = pairs(&EXP_TAB, _mm256_and_si256(ki, _mm256_set1_epi64x(127)));
            let sbits = _mm256_add_epi64(_mm256_castpd_si256(scale), _mm256_slli_epi64::<45>(ki));
            let r2 = _mm256_mul_pd(r, r);
            let p23 = _mm256_fmadd_pd(r, _mm256_set1_pd(C3), _mm256_set1_pd(C2));
            let p45 = _mm256_fmadd_pd(r, _mm256_set1_pd(C5), _mm256_set1_pd(C4));
            let tmp = _mm256_fmadd_pd(p45, _mm256_mul_pd(r2, r2), _mm256_fmadd_pd(r2, p23, _mm256_add_pd(r, tail)));
            let scale = _mm256_castsi256_pd(sbits);
            _mm256_storeu_pd(q.as_mut_ptr(), _mm256_fmadd_pd(scale, tmp, scale));
        }
        quads.into_remainder().iter_mut().for_each(|x| *x = exp(*x));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ln_all(v: &mut [f64]) {
        let mut quads = v.chunks_exact_mut(4);
        for q in &mut quads {
            let x = _mm256_loadu_pd(q.as_ptr());
            let ix = _mm256_castpd_si256(x);
            let top = _mm256_srli_epi64::<48>(ix);
            let odd = _mm256_or_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x(0x10), top), _mm256_cmpgt_epi64(top, _mm256_set1_epi64x(0x7fef)));
            if _mm256_movemask_pd(_mm256_castsi256_pd(odd)) != 0 {
                q.iter_mut().for_each(|x| *x = ln(*x));
                continue;
            }
            // Positive normal numbers from here: their bits compare as signed integers.
            let near = _mm256_and_si256(
                _mm256_cmpgt_epi64(ix, _mm256_set1_epi64x(LN_NEAR1_LO as i64 - 1)),
                _mm256_cmpgt_epi64(_mm256_set1_epi64x(LN_NEAR1_HI as i64), ix),
            );
            let mask = _mm256_movemask_pd(_mm256_castsi256_pd(near));
            let y = match mask {
                0 => far(ix),
                0b1111 => near1(x),
                _ => _mm256_blendv_pd(far(ix), near1(x), _mm256_castsi256_pd(near)),
            };
            // ln 1 is +0 whatever the rounding (the polynomial gives +0 too; kept explicit).
            let one = _mm256_castsi256_pd(_mm256_cmpeq_epi64(ix, _mm256_set1_epi64x(1f64.to_bits() as i64)));
            _mm256_storeu_pd(q.as_mut_ptr(), _mm256_andnot_pd(one, y));
        }
        quads.into_remainder().iter_mut().for_each(|x| *x = ln(*x));
    }

    /// Entries `2i` and `2i + 1` of `t` for the four lanes' `i` (< 128): one 16-byte load per
    /// lane, which beats two gathers on the CPUs measured.
    #[inline(always)]
    unsafe fn pairs(t: &Table, i: __m256i) -> (__m256d, __m256d) {
        let mut idx = [0u64; 4];
        _mm256_storeu_si256(idx.as_mut_ptr().cast(), i);
        let at = |k: usize| _mm_loadu_pd(t.0.as_ptr().add(2 * (idx[k] as usize & 127)).cast());
        let (a, b) = (_mm256_set_m128d(at(2), at(0)), _mm256_set_m128d(at(3), at(1)));
        (_mm256_unpacklo_pd(a, b), _mm256_unpackhi_pd(a, b))
    }

    #[inline(always)]
    unsafe fn far(ix: __m256i) -> __m256d {
        let tmp = _mm256_sub_epi64(ix, _mm256_set1_epi64x(LN_OFF as i64));
        let (invc, logc) = pairs(&LN_TAB, _mm256_and_si256(_mm256_srli_epi64::<45>(tmp), _mm256_set1_epi64x(127)));
        // k = tmp >> 52 (arithmetic, 12 bits) as a double: 2^52 + (k + 2048), less 2^52 + 2048.
        let kbias = _mm256_xor_si256(_mm256_srli_epi64::<52>(tmp), _mm256_set1_epi64x(0x800));
        let magic = _mm256_set1_epi64x(0x4330_0000_0000_0000);
        let kd = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(kbias, magic)), _mm256_set1_pd((1u64 << 52) as f64 + 2048.0));
        let z = _mm256_castsi256_pd(_mm256_sub_epi64(ix, _mm256_and_si256(tmp, _mm256_set1_epi64x((0xfffu64 << 52) as i64))));
        let r = _mm256_fmadd_pd(z, invc, _mm256_set1_pd(-1.0));
        let w = _mm256_fmadd_pd(kd, _mm256_set1_pd(LN2HI), logc);
        let hi = _mm256_add_pd(r, w);
        let lo = _mm256_fmadd_pd(kd, _mm256_set1_pd(LN2LO), _mm256_add_pd(_mm256_sub_pd(w, hi), r));
        let r2 = _mm256_mul_pd(r, r);
        let r3 = _mm256_mul_pd(r, r2);
        let c = |k: usize| _mm256_set1_pd(A[k]);
        let p = _mm256_fmadd_pd(_mm256_fmadd_pd(r, c(4), c(3)), r2, _mm256_fmadd_pd(r, c(2), c(1)));
        _mm256_add_pd(_mm256_fmadd_pd(r3, p, _mm256_fmadd_pd(r2, c(0), lo)), hi)
    }

    #[inline(always)]
    unsafe fn near1(x: __m256d) -> __m256d {
        let c = |k: usize| _mm256_set1_pd(B[k]);
        let r = _mm256_sub_pd(x, _mm256_set1_pd(1.0));
        let r2 = _mm256_mul_pd(r, r);
        let r3 = _mm256_mul_pd(r, r2);
        let q0 = _mm256_fmadd_pd(r2, c(3), _mm256_fmadd_pd(r, c(2), c(1)));
        let q1 = _mm256_fmadd_pd(r2, c(6), _mm256_fmadd_pd(r, c(5), c(4)));
        let q2 = _mm256_fmadd_pd(r3, c(10), _mm256_fmadd_pd(r2, c(9), _mm256_fmadd_pd(r, c(8), c(7))));
        let q = _mm256_fmadd_pd(_mm256_fmadd_pd(q2, r3, q1), r3, q0);
        let split = _mm256_set1_pd(134217728.0);
        let rhi = _mm256_fnmadd_pd(split, r, _mm256_fmadd_pd(r, split, r));
        let rlo = _mm256_sub_pd(r, rhi);
        let rhi2 = _mm256_mul_pd(rhi, rhi);
        let hi = _mm256_fmadd_pd(rhi2, c(0), r);
        let lo = _mm256_fmadd_pd(_mm256_mul_pd(c(0), rlo), _mm256_add_pd(r, rhi), _mm256_fmadd_pd(rhi2, c(0), _mm256_sub_pd(r, hi)));
        _mm256_add_pd(hi, _mm256_fmadd_pd(q, r3, lo))
    }
}

/// The same operations on eight lanes (AVX-512F/DQ: twice the lanes per instruction, and
/// registers enough that the constants stay in them).
#[cfg(target_arch = "x86_64")]
pub mod x86_512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn c64(v: u64) -> __m512i {
        _mm512_set1_epi64(v as i64)
    }

    #[inline(always)]
    unsafe fn cf(v: f64) -> __m512d {
        _mm512_set1_pd(v)
    }

    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub(super) unsafe fn exp_all(v: &mut [f64]) {
        let mut octs = v.chunks_exact_mut(8);
        for q in &mut octs {
            _mm512_storeu_pd(q.as_mut_ptr(), exp8(_mm512_loadu_pd(q.as_ptr())));
        }
        super::x86::exp_all(octs.into_remainder());
    }

    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub(super) unsafe fn ln_all(v: &mut [f64]) {
        let mut octs = v.chunks_exact_mut(8);
        for q in &mut octs {
            _mm512_storeu_pd(q.as_mut_ptr(), ln8(_mm512_loadu_pd(q.as_ptr())));
        }
        super::x86::ln_all(octs.into_remainder());
    }

    /// `f` of each lane, one at a time: for vectors holding a lane off the common path (rare).
    #[cold]
    #[inline(never)]
    unsafe fn lanes(x: __m512d, f: fn(f64) -> f64) -> __m512d {
        let mut v = [0f64; 8];
        _mm512_storeu_pd(v.as_mut_ptr(), x);
        v.iter_mut().for_each(|x| *x = f(*x));
        _mm512_loadu_pd(v.as_ptr())
    }

    /// e^x of each lane.
    ///
    /// # Safety
    /// The CPU has AVX-512F/DQ and FMA (the caller's target features enable them).
    #[inline(always)]
    pub unsafe fn exp8(x: __m512d) -> __m512d {
        let ix = _mm512_castpd_si512(x);
        let abstop = _mm512_and_si512(_mm512_srli_epi64::<52>(ix), c64(0x7ff));
        // abstop − 0x3c9 ≥ 0x3f as unsigned: off the common path.
        if _mm512_cmpge_epu64_mask(_mm512_sub_epi64(abstop, c64(0x3c9)), c64(0x3f)) != 0 {
            return lanes(x, exp);
        }
        let kd = _mm512_fmadd_pd(x, cf(INVLN2N), cf(SHIFT));
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, cf(SHIFT));
        let r = _mm512_fmadd_pd(kd, cf(NEGLN2LON), _mm512_fmadd_pd(kd, cf(NEGLN2HIN), x));
        let (tail, scale) = pairs(&EXP_TAB, _mm512_and_si512(ki, c64(127)));
        let sbits = _mm512_add_epi64(_mm512_castpd_si512(scale), _mm512_slli_epi64::<45>(ki));
        let r2 = _mm512_mul_pd(r, r);
        let p23 = _mm512_fmadd_pd(r, cf(C3), cf(C2));
        let p45 = _mm512_fmadd_pd(r, cf(C5), cf(C4));
        let tmp = _mm512_fmadd_pd(p45, _mm512_mul_pd(r2, r2), _mm512_fmadd_pd(r2, p23, _mm512_add_pd(r, tail)));
        let scale = _mm512_castsi512_pd(sbits);
        _mm512_fmadd_pd(scale, tmp, scale)
    }

    /// ln x of each lane.
    ///
    /// # Safety
    /// The CPU has AVX-512F/DQ and FMA (the caller's target features enable them).
    #[inline(always)]
    pub unsafe fn ln8(x: __m512d) -> __m512d {
        let ix = _mm512_castpd_si512(x);
        let top = _mm512_srli_epi64::<48>(ix);
        if _mm512_cmplt_epi64_mask(top, c64(0x10)) | _mm512_cmpgt_epi64_mask(top, c64(0x7fef)) != 0 {
            return lanes(x, ln);
        }
        // Positive normal numbers from here: their bits compare as signed integers.
        let near = _mm512_cmpge_epi64_mask(ix, c64(LN_NEAR1_LO)) & _mm512_cmplt_epi64_mask(ix, c64(LN_NEAR1_HI));
        let y = match near {
            0 => far(ix),
            0xff => near1(x),
            _ => _mm512_mask_blend_pd(near, far(ix), near1(x)),
        };
        // ln 1 is +0 whatever the rounding (the polynomial gives +0 too; kept explicit).
        let one = _mm512_cmpeq_epi64_mask(ix, c64(1f64.to_bits()));
        _mm512_mask_blend_pd(one, y, _mm512_setzero_pd())
    }

    /// Entries `2i` and `2i + 1` of `t` for the eight lanes' `i` (< 128).
    #[inline(always)]
    unsafe fn pairs(t: &Table, i: __m512i) -> (__m512d, __m512d) {
        let at = _mm512_slli_epi64::<1>(i);
        let base = t.0.as_ptr().cast::<f64>();
        (_mm512_i64gather_pd::<8>(at, base), _mm512_i64gather_pd::<8>(_mm512_add_epi64(at, c64(1)), base))
    }

    #[inline(always)]
    unsafe fn far(ix: __m512i) -> __m512d {
        let tmp = _mm512_sub_epi64(ix, c64(LN_OFF));
        let (invc, logc) = pairs(&LN_TAB, _mm512_and_si512(_mm512_srli_epi64::<45>(tmp), c64(127)));
        // k = tmp >> 52 (arithmetic): the exact conversion of a small integer.
        let kd = _mm512_cvtepi64_pd(_mm512_srai_epi64::<52>(tmp));
        let z = _mm512_castsi512_pd(_mm512_sub_epi64(ix, _mm512_and_si512(tmp, c64(0xfff << 52))));
        let r = _mm512_fmadd_pd(z, invc, cf(-1.0));
        let w = _mm512_fmadd_pd(kd, cf(LN2HI), logc);
        let hi = _mm512_add_pd(r, w);
        let lo = _mm512_fmadd_pd(kd, cf(LN2LO), _mm512_add_pd(_mm512_sub_pd(w, hi), r));
        let r2 = _mm512_mul_pd(r, r);
        let r3 = _mm512_mul_pd(r, r2);
        let c = |k: usize| cf(A[k]);
        let p = _mm512_fmadd_pd(_mm512_fmadd_pd(r, c(4), c(3)), r2, _mm512_fmadd_pd(r, c(2), c(1)));
        _mm512_add_pd(_mm512_fmadd_pd(r3, p, _mm512_fmadd_pd(r2, c(0), lo)), hi)
    }

    #[inline(always)]
    unsafe fn near1(x: __m512d) -> __m512d {
        let c = |k: usize| cf(B[k]);
        let r = _mm512_sub_pd(x, cf(1.0));
        let r2 = _mm512_mul_pd(r, r);
        let r3 = _mm512_mul_pd(r, r2);
        let q0 = _mm512_fmadd_pd(r2, c(3), _mm512_fmadd_pd(r, c(2), c(1)));
        let q1 = _mm512_fmadd_pd(r2, c(6), _mm512_fmadd_pd(r, c(5), c(4)));
        let q2 = _mm512_fmadd_pd(r3, c(10), _mm512_fmadd_pd(r2, c(9), _mm512_fmadd_pd(r, c(8), c(7))));
        let q = _mm512_fmadd_pd(_mm512_fmadd_pd(q2, r3, q1), r3, q0);
        let split = cf(134217728.0);
        let rhi = _mm512_fnmadd_pd(split, r, _mm512_fmadd_pd(r, split, r));
        let rlo = _mm512_sub_pd(r, rhi);
        let rhi2 = _mm512_mul_pd(rhi, rhi);
        let hi = _mm512_fmadd_pd(rhi2, c(0), r);
        let lo = _mm512_fmadd_pd(_mm512_mul_pd(c(0), rlo), _mm512_add_pd(r, rhi), _mm512_fmadd_pd(rhi2, c(0), _mm512_sub_pd(r, hi)));
        _mm512_add_pd(hi, _mm512_fmadd_pd(q, r3, lo))
    }
}

/// 2^(i/128) as (tail, scale bits − i·2^45) pairs: `scale·(1 + tail)` is 2^(i/128) to ~106 bits.
static EXP_TAB: Table = Table([
    0x0000000000000000,
    0x3ff0000000000000,
    0x3c9b3b4f1a88bf6e,
    0x3feff63da9fb3335,
    0xbc7160139cd8dc5d,
    0x3fefec9a3e778061,
    0xbc905e7a108766d1,
    0x3fefe315e86e7f85,
    0x3c8cd2523567f613,
    0x3fefd9b0d3158574,
    0xbc8bce8023f98efa,
    0x3fefd06b29ddf6de,
    0x3c60f74e61e6c861,
    0x3fefc74518759bc8,
    0x3c90a3e45b33d399,
    0x3fefbe3ecac6f383,
    0x3c979aa65d837b6d,
    0x3fefb5586cf9890f,
    0x3c8eb51a92fdeffc,
    0x3fefac922b7247f7,
    0x3c3ebe3d702f9cd1,
    0x3fefa3ec32d3d1a2,
    0xbc6a033489906e0b,
    0x3fef9b66affed31b,
    0xbc9556522a2fbd0e,
    0x3fef9301d0125b51,
    0xbc5080ef8c4eea55,
    0x3fef8abdc06c31cc,
    0xbc91c923b9d5f416,
    0x3fef829aaea92de0,
    0x3c80d3e3e95c55af,
    0x3fef7a98c8a58e51,
    0xbc801b15eaa59348,
    0x3fef72b83c7d517b,
    0xbc8f1ff055de323d,
    0x3fef6af9388c8dea,
    0x3c8b898c3f1353bf,
    0x3fef635beb6fcb75,
    0xbc96d99c7611eb26,
    0x3fef5be084045cd4,
    0x3c9aecf73e3a2f60,
    0x3fef54873168b9aa,
    0xbc8fe782cb86389d,
    0x3fef4d5022fcd91d,
    0x3c8a6f4144a6c38d,
    0x3fef463b88628cd6,
    0x3c807a05b0e4047d,
    0x3fef3f49917ddc96,
    0x3c968efde3a8a894,
    0x3fef387a6e756238,
    0x3c875e18f274487d,
    0x3fef31ce4fb2a63f,
    0x3c80472b981fe7f2,
    0x3fef2b4565e27cdd,
    0xbc96b87b3f71085e,
    0x3fef24dfe1f56381,
    0x3c82f7e16d09ab31,
    0x3fef1e9df51fdee1,
    0xbc3d219b1a6fbffa,
    0x3fef187fd0dad990,
    0x3c8b3782720c0ab4,
    0x3fef1285a6e4030b,
    0x3c6e149289cecb8f,
    0x3fef0cafa93e2f56,
    0x3c834d754db0abb6,
    0x3fef06fe0a31b715,
    0x3c864201e2ac744c,
    0x3fef0170fc4cd831,
    0x3c8fdd395dd3f84a,
    0x3feefc08b26416ff,
    0xbc86a3803b8e5b04,
    0x3feef6c55f929ff1,
    0xbc924aedcc4b5068,
    0x3feef1a7373aa9cb,
    0xbc9907f81b512d8e,
    0x3feeecae6d05d866,
    0xbc71d1e83e9436d2,
    0x3feee7db34e59ff7,
    0xbc991919b3ce1b15,
    0x3feee32dc313a8e5,
    0x3c859f48a72a4c6d,
    0x3feedea64c123422,
    0xbc9312607a28698a,
    0x3feeda4504ac801c,
    0xbc58a78f4817895b,
    0x3feed60a21f72e2a,
    0xbc7c2c9b67499a1b,
    0x3feed1f5d950a897,
    0x3c4363ed60c2ac11,
    0x3feece086061892d,
    0x3c9666093b0664ef,
    0x3feeca41ed1d0057,
    0x3c6ecce1daa10379,
    0x3feec6a2b5c13cd0,
    0x3c93ff8e3f0f1230,
    0x3feec32af0d7d3de,
    0x3c7690cebb7aafb0,
    0x3feebfdad5362a27,
    0x3c931dbdeb54e077,
    0x3feebcb299fddd0d,
    0xbc8f94340071a38e,
    0x3feeb9b2769d2ca7,
    0xbc87deccdc93a349,
    0x3feeb6daa2cf6642,
    0xbc78dec6bd0f385f,
    0x3feeb42b569d4f82,
    0xbc861246ec7b5cf6,
    0x3feeb1a4ca5d920f,
    0x3c93350518fdd78e,
    0x3feeaf4736b527da,
    0x3c7b98b72f8a9b05,
    0x3feead12d497c7fd,
    0x3c9063e1e21c5409,
    0x3feeab07dd485429,
    0x3c34c7855019c6ea,
    0x3feea9268a5946b7,
    0x3c9432e62b64c035,
    0x3feea76f15ad2148,
    0xbc8ce44a6199769f,
    0x3feea5e1b976dc09,
    0xbc8c33c53bef4da8,
    0x3feea47eb03a5585,
    0xbc845378892be9ae,
    0x3feea34634ccc320,
    0xbc93cedd78565858,
    0x3feea23882552225,
    0x3c5710aa807e1964,
    0x3feea155d44ca973,
    0xbc93b3efbf5e2228,
    0x3feea09e667f3bcd,
    0xbc6a12ad8734b982,
    0x3feea012750bdabf,
    0xbc6367efb86da9ee,
    0x3fee9fb23c651a2f,
    0xbc80dc3d54e08851,
    0x3fee9f7df9519484,
    0xbc781f647e5a3ecf,
    0x3fee9f75e8ec5f74,
    0xbc86ee4ac08b7db0,
    0x3fee9f9a48a58174,
    0xbc8619321e55e68a,
    0x3fee9feb564267c9,
    0x3c909ccb5e09d4d3,
    0x3feea0694fde5d3f,
    0xbc7b32dcb94da51d,
    0x3feea11473eb0187,
    0x3c94ecfd5467c06b,
    0x3feea1ed0130c132,
    0x3c65ebe1abd66c55,
    0x3feea2f336cf4e62,
    0xbc88a1c52fb3cf42,
    0x3feea427543e1a12,
    0xbc9369b6f13b3734,
    0x3feea589994cce13,
    0xbc805e843a19ff1e,
    0x3feea71a4623c7ad,
    0xbc94d450d872576e,
    0x3feea8d99b4492ed,
    0x3c90ad675b0e8a00,
    0x3feeaac7d98a6699,
    0x3c8db72fc1f0eab4,
    0x3feeace5422aa0db,
    0xbc65b6609cc5e7ff,
    0x3feeaf3216b5448c,
    0x3c7bf68359f35f44,
    0x3feeb1ae99157736,
    0xbc93091fa71e3d83,
    0x3feeb45b0b91ffc6,
    0xbc5da9b88b6c1e29,
    0x3feeb737b0cdc5e5,
    0xbc6c23f97c90b959,
    0x3feeba44cbc8520f,
    0xbc92434322f4f9aa,
    0x3feebd829fde4e50,
    0xbc85ca6cd7668e4b,
    0x3feec0f170ca07ba,
    0x3c71affc2b91ce27,
    0x3feec49182a3f090,
    0x3c6dd235e10a73bb,
    0x3feec86319e32323,
    0xbc87c50422622263,
    0x3feecc667b5de565,
    0x3c8b1c86e3e231d5,
    0x3feed09bec4a2d33,
    0xbc91bbd1d3bcbb15,
    0x3feed503b23e255d,
    0x3c90cc319cee31d2,
    0x3feed99e1330b358,
    0x3c8469846e735ab3,
    0x3feede6b5579fdbf,
    0xbc82dfcd978e9db4,
    0x3feee36bbfd3f37a,
    0x3c8c1a7792cb3387,
    0x3feee89f995ad3ad,
    0xbc907b8f4ad1d9fa,
    0x3feeee07298db666,
    0xbc55c3d956dcaeba,
    0x3feef3a2b84f15fb,
    0xbc90a40e3da6f640,
    0x3feef9728de5593a,
    0xbc68d6f438ad9334,
    0x3feeff76f2fb5e47,
    0xbc91eee26b588a35,
    0x3fef05b030a1064a,
    0x3c74ffd70a5fddcd,
    0x3fef0c1e904bc1d2,
    0xbc91bdfbfa9298ac,
    0x3fef12c25bd71e09,
    0x3c736eae30af0cb3,
    0x3fef199bdd85529c,
    0x3c8ee3325c9ffd94,
    0x3fef20ab5fffd07a,
    0x3c84e08fd10959ac,
    0x3fef27f12e57d14b,
    0x3c63cdaf384e1a67,
    0x3fef2f6d9406e7b5,
    0x3c676b2c6c921968,
    0x3fef3720dcef9069,
    0xbc808a1883ccb5d2,
    0x3fef3f0b555dc3fa,
    0xbc8fad5d3ffffa6f,
    0x3fef472d4a07897c,
    0xbc900dae3875a949,
    0x3fef4f87080d89f2,
    0x3c74a385a63d07a7,
    0x3fef5818dcfba487,
    0xbc82919e2040220f,
    0x3fef60e316c98398,
    0x3c8e5a50d5c192ac,
    0x3fef69e603db3285,
    0x3c843a59ac016b4b,
    0x3fef7321f301b460,
    0xbc82d52107b43e1f,
    0x3fef7c97337b9b5f,
    0xbc892ab93b470dc9,
    0x3fef864614f5a129,
    0x3c74b604603a88d3,
    0x3fef902ee78b3ff6,
    0x3c83c5ec519d7271,
    0x3fef9a51fbc74c83,
    0xbc8ff7128fd391f0,
    0x3fefa4afa2a490da,
    0xbc8dae98e223747d,
    0x3fefaf482d8e67f1,
    0x3c8ec3bc41aa2008,
    0x3fefba1bee615a27,
    0x3c842b94c3a9eb32,
    0x3fefc52b376bba97,
    0x3c8a64a931d185ee,
    0x3fefd0765b6e4540,
    0xbc8e37bae43be3ed,
    0x3fefdbfdad9cbe14,
    0x3c77893b4d91cd9d,
    0x3fefe7c1819e90d8,
    0x3c5305c14160cc89,
    0x3feff3c22b8f71f1,
]);
/// Per subinterval i of [0x1.6p-1, 0x1.6p0): (1/c, ln c) with c near its centre, 1/c short enough that z/c − 1 is exact in a fused multiply-add.
static LN_TAB: Table = Table([
    0x3ff734f0c3e0de9f,
    0xbfd7cc7f79e69000,
    0x3ff713786a2ce91f,
    0xbfd76feec20d0000,
    0x3ff6f26008fab5a0,
    0xbfd713e31351e000,
    0x3ff6d1a61f138c7d,
    0xbfd6b85b38287800,
    0x3ff6b1490bc5b4d1,
    0xbfd65d5590807800,
    0x3ff69147332f0cba,
    0xbfd602d076180000,
    0x3ff6719f18224223,
    0xbfd5a8ca86909000,
    0x3ff6524f99a51ed9,
    0xbfd54f4356035000,
    0x3ff63356aa8f24c4,
    0xbfd4f637c36b4000,
    0x3ff614b36b9ddc14,
    0xbfd49da7fda85000,
    0x3ff5f66452c65c4c,
    0xbfd445923989a800,
    0x3ff5d867b5912c4f,
    0xbfd3edf439b0b800,
    0x3ff5babccb5b90de,
    0xbfd396ce448f7000,
    0x3ff59d61f2d91a78,
    0xbfd3401e17bda000,
    0x3ff5805612465687,
    0xbfd2e9e2ef468000,
    0x3ff56397cee76bd3,
    0xbfd2941b3830e000,
    0x3ff54725e2a77f93,
    0xbfd23ec58cda8800,
    0x3ff52aff42064583,
    0xbfd1e9e129279000,
    0x3ff50f22dbb2bddf,
    0xbfd1956d2b48f800,
    0x3ff4f38f4734ded7,
    0xbfd141679ab9f800,
    0x3ff4d843cfde2840,
    0xbfd0edd094ef9800,
    0x3ff4bd3ec078a3c8,
    0xbfd09aa518db1000,
    0x3ff4a27fc3e0258a,
    0xbfd047e65263b800,
    0x3ff4880524d48434,
    0xbfcfeb224586f000,
    0x3ff46dce1b192d0b,
    0xbfcf474a7517b000,
    0x3ff453d9d3391854,
    0xbfcea4443d103000,
    0x3ff43a2744b4845a,
    0xbfce020d44e9b000,
    0x3ff420b54115f8fb,
    0xbfcd60a22977f000,
    0x3ff40782da3ef4b1,
    0xbfccc00104959000,
    0x3ff3ee8f5d57fe8f,
    0xbfcc202956891000,
    0x3ff3d5d9a00b4ce9,
    0xbfcb81178d811000,
    0x3ff3bd60c010c12b,
    0xbfcae2c9ccd3d000,
    0x3ff3a5242b75dab8,
    0xbfca45402e129000,
    0x3ff38d22cd9fd002,
    0xbfc9a877681df000,
    0x3ff3755bc5847a1c,
    0xbfc90c6d69483000,
    0x3ff35dce49ad36e2,
    0xbfc87120a645c000,
    0x3ff34679984dd440,
    0xbfc7d68fb4143000,
    0x3ff32f5cceffcb24,
    0xbfc73cb83c627000,
    0x3ff3187775a10d49,
    0xbfc6a39a9b376000,
    0x3ff301c8373e3990,
    0xbfc60b3154b7a000,
    0x3ff2eb4ebb95f841,
    0xbfc5737d76243000,
    0x3ff2d50a0219a9d1,
    0xbfc4dc7b8fc23000,
    0x3ff2bef9a8b7fd2a,
    0xbfc4462c51d20000,
    0x3ff2a91c7a0c1bab,
    0xbfc3b08abc830000,
    0x3ff293726014b530,
    0xbfc31b996b490000,
    0x3ff27dfa5757a1f5,
    0xbfc2875490a44000,
    0x3ff268b39b1d3bbf,
    0xbfc1f3b9f879a000,
    0x3ff2539d838ff5bd,
    0xbfc160c8252ca000,
    0x3ff23eb7aac9083b,
    0xbfc0ce7f57f72000,
    0x3ff22a012ba940b6,
    0xbfc03cdc49fea000,
    0x3ff2157996cc4132,
    0xbfbf57bdbc4b8000,
    0x3ff201201dd2fc9b,
    0xbfbe370896404000,
    0x3ff1ecf4494d480b,
    0xbfbd17983ef94000,
    0x3ff1d8f5528f6569,
    0xbfbbf9674ed8a000,
    0x3ff1c52311577e7c,
    0xbfbadc79202f6000,
    0x3ff1b17c74cb26e9,
    0xbfb9c0c3e7288000,
    0x3ff19e010c2c1ab6,
    0xbfb8a646b372c000,
    0x3ff18ab07bb670bd,
    0xbfb78d01b3ac0000,
    0x3ff1778a25efbcb6,
    0xbfb674f145380000,
    0x3ff1648d354c31da,
    0xbfb55e0e6d878000,
    0x3ff151b990275fdd,
    0xbfb4485cdea1e000,
    0x3ff13f0ea432d24c,
    0xbfb333d94d6aa000,
    0x3ff12c8b7210f9da,
    0xbfb22079f8c56000,
    0x3ff11a3028ecb531,
    0xbfb10e4698622000,
    0x3ff107fbda8434af,
    0xbfaffa6c6ad20000,
    0x3ff0f5ee0f4e6bb3,
    0xbfadda8d4a774000,
    0x3ff0e4065d2a9fce,
    0xbfabbcece4850000,
    0x3ff0d244632ca521,
    0xbfa9a1894012c000,
    0x3ff0c0a77ce2981a,
    0xbfa788583302c000,
    0x3ff0af2f83c636d1,
    0xbfa5715e67d68000,
    0x3ff09ddb98a01339,
    0xbfa35c8a49658000,
    0x3ff08cabaf52e7df,
    0xbfa149e364154000,
    0x3ff07b9f2f4e28fb,
    0xbf9e72c082eb8000,
    0x3ff06ab58c358f19,
    0xbf9a55f152528000,
    0x3ff059eea5ecf92c,
    0xbf963d62cf818000,
    0x3ff04949cdd12c90,
    0xbf9228fb8caa0000,
    0x3ff038c6c6f0ada9,
    0xbf8c317b20f90000,
    0x3ff02865137932a9,
    0xbf8419355daa0000,
    0x3ff0182427ea7348,
    0xbf781203c2ec0000,
    0x3ff008040614b195,
    0xbf60040979240000,
    0x3fefe01ff726fa1a,
    0x3f6feff384900000,
    0x3fefa11cc261ea74,
    0x3f87dc41353d0000,
    0x3fef6310b081992e,
    0x3f93cea3c4c28000,
    0x3fef25f63ceeadcd,
    0x3f9b9fc114890000,
    0x3feee9c8039113e7,
    0x3fa1b0d8ce110000,
    0x3feeae8078cbb1ab,
    0x3fa58a5bd001c000,
    0x3fee741aa29d0c9b,
    0x3fa95c8340d88000,
    0x3fee3a91830a99b5,
    0x3fad276aef578000,
    0x3fee01e009609a56,
    0x3fb07598e598c000,
    0x3fedca01e577bb98,
    0x3fb253f5e30d2000,
    0x3fed92f20b7c9103,
    0x3fb42edd8b380000,
    0x3fed5cac66fb5cce,
    0x3fb606598757c000,
    0x3fed272caa5ede9d,
    0x3fb7da76356a0000,
    0x3fecf26e3e6b2ccd,
    0x3fb9ab434e1c6000,
    0x3fecbe6da2a77902,
    0x3fbb78c7bb0d6000,
    0x3fec8b266d37086d,
    0x3fbd431332e72000,
    0x3fec5894bd5d5804,
    0x3fbf0a3171de6000,
    0x3fec26b533bb9f8c,
    0x3fc067152b914000,
    0x3febf583eeece73f,
    0x3fc147858292b000,
    0x3febc4fd75db96c1,
    0x3fc2266ecdca3000,
    0x3feb951e0c864a28,
    0x3fc303d7a6c55000,
    0x3feb65e2c5ef3e2c,
    0x3fc3dfc33c331000,
    0x3feb374867c9888b,
    0x3fc4ba366b7a8000,
    0x3feb094b211d304a,
    0x3fc5933928d1f000,
    0x3feadbe885f2ef7e,
    0x3fc66acd2418f000,
    0x3feaaf1d31603da2,
    0x3fc740f8ec669000,
    0x3fea82e63fd358a7,
    0x3fc815c0f51af000,
    0x3fea5740ef09738b,
    0x3fc8e92954f68000,
    0x3fea2c2a90ab4b27,
    0x3fc9bb3602f84000,
    0x3fea01a01393f2d1,
    0x3fca8bed1c2c0000,
    0x3fe9d79f24db3c1b,
    0x3fcb5b515c01d000,
    0x3fe9ae2505c7b190,
    0x3fcc2967ccbcc000,
    0x3fe9852ef297ce2f,
    0x3fccf635d5486000,
    0x3fe95cbaeea44b75,
    0x3fcdc1bd3446c000,
    0x3fe934c69de74838,
    0x3fce8c01b8cfe000,
    0x3fe90d4f2f6752e6,
    0x3fcf5509c0179000,
    0x3fe8e6528effd79d,
    0x3fd00e6c121fb800,
    0x3fe8bfce9fcc007c,
    0x3fd071b80e93d000,
    0x3fe899c0dabec30e,
    0x3fd0d46b9e867000,
    0x3fe87427aa2317fb,
    0x3fd13687334bd000,
    0x3fe84f00acb39a08,
    0x3fd1980d67234800,
    0x3fe82a49e8653e55,
    0x3fd1f8ffe0cc8000,
    0x3fe8060195f40260,
    0x3fd2595fd7636800,
    0x3fe7e22563e0a329,
    0x3fd2b9300914a800,
    0x3fe7beb377dcb5ad,
    0x3fd3187210436000,
    0x3fe79baa679725c2,
    0x3fd377266dec1800,
    0x3fe77907f2170657,
    0x3fd3d54ffbaf3000,
    0x3fe756cadbd6130c,
    0x3fd432eee32fe000,
]);

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `f64::exp`/`f64::ln` are glibc ≥ 2.28's FMA builds here (the C library picks them
    /// on AVX2+FMA CPUs), which this module reproduces bit for bit.
    fn libm_is_glibc_fma() -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: glibc returns a static NUL-terminated string.
            let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) }.to_string_lossy().into_owned();
            let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            (major, minor) >= (2, 28) && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
        false
    }

    /// splitmix64: inputs spread over every bit pattern of the ranges below.
    fn bits(n: usize, seed: u64) -> impl Iterator<Item = u64> {
        (0..n as u64).map(move |i| {
            let mut z = (seed ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(0x6a09_e667_f3bc_c909);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    fn specials() -> Vec<f64> {
        let mut v =
            vec![0.0, -0.0, 1.0, -1.0, 2.0, 0.5, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, -f64::NAN, f64::MIN_POSITIVE, f64::MAX, f64::MIN];
        v.extend([
            5e-324,
            1e-310,
            -1e-310,
            709.782712893384,
            709.7827128933841,
            -708.3964185322641,
            -745.1332191019411,
            -745.1332191019412,
            512.0,
            -512.0,
            1024.0,
            -1024.0,
        ]);
        v.extend([1.0 - 2f64.powi(-4), 1.0 + 0.064697265625, 1.0 + 0.064697265625 - f64::EPSILON, 1.0 - f64::EPSILON, 1.0 + f64::EPSILON]);
        v
    }

    /// Every way of computing `f` over `xs`: scalar and a slice at a time, each in every build.
    fn all_paths(xs: &[f64], scalar: fn(f64) -> f64, slice: fn(&mut [f64])) -> Vec<Vec<u64>> {
        crate::simd::each_build(|| {
            let mut v = xs.to_vec();
            slice(&mut v);
            [xs.iter().map(|&x| scalar(x).to_bits()).collect(), v.iter().map(|y| y.to_bits()).collect()]
        })
        .concat()
    }

    fn check(name: &str, xs: &[f64], scalar: fn(f64) -> f64, slice: fn(&mut [f64]), libm: fn(f64) -> f64) {
        let paths = all_paths(xs, scalar, slice);
        let glibc = libm_is_glibc_fma();
        for (j, &x) in xs.iter().enumerate() {
            let want = libm(x);
            for p in &paths {
                let got = f64::from_bits(p[j]);
                assert_eq!(p[j], paths[0][j], "{name}({x:e}): the paths differ");
                if glibc {
                    assert_eq!(p[j], want.to_bits(), "{name}({x:e}) = {got:e}, the C library says {want:e}");
                } else {
                    // Another libm: within an ulp of it.
                    let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                    assert!(got.to_bits() == want.to_bits() || ulp <= 1 || (got.is_nan() && want.is_nan()), "{name}({x:e}) = {got:e} vs {want:e}");
                }
            }
        }
    }

    #[test]
    fn exp_is_the_c_librarys() {
        let mut xs = specials();
        // Uniform over the finite results, then all bit patterns (tiny, huge, subnormal results).
        xs.extend(bits(400_000, 1).map(|b| -746.0 + 1456.0 * (b >> 11) as f64 / (1u64 << 53) as f64));
        xs.extend(bits(200_000, 2).map(|b| -2.0 + 4.0 * (b >> 11) as f64 / (1u64 << 53) as f64));
        xs.extend(bits(200_000, 3).map(f64::from_bits));
        xs.extend(bits(100_000, 4).map(|b| -(512.0 + 500.0 * (b >> 11) as f64 / (1u64 << 53) as f64)));
        check("exp", &xs, exp, exp_all, f64::exp);
        assert_eq!(exp(1.0), std::f64::consts::E);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn ln_is_the_c_librarys() {
        let mut xs = specials();
        xs.extend(bits(400_000, 5).map(|b| f64::from_bits(b >> 1)));
        // Near 1 (its own polynomial), and vectors mixing both paths.
        xs.extend(bits(300_000, 6).map(|b| 0.9 + 0.2 * (b >> 11) as f64 / (1u64 << 53) as f64));
        xs.extend(bits(100_000, 7).map(|b| 1e-9 + 1e9 * (b >> 11) as f64 / (1u64 << 53) as f64));
        xs.extend(bits(100_000, 8).map(f64::from_bits));
        check("ln", &xs, ln, ln_all, f64::ln);
        assert_eq!(ln(2.0), std::f64::consts::LN_2);
        assert_eq!(ln(std::f64::consts::E), 1.0);
    }

    /// The exponential table is 2^(i/128) split as `scale·(1 + tail)`.
    #[test]
    fn exp_table_holds_the_powers_of_two() {
        for i in 0..128u64 {
            let scale = f64::from_bits(EXP_TAB.0[2 * i as usize + 1].wrapping_add(i << 45));
            let tail = f64::from_bits(EXP_TAB.0[2 * i as usize]);
            let want = (i as f64 / 128.0).exp2();
            assert!((scale - want).abs() <= want * f64::EPSILON && tail.abs() < f64::EPSILON, "{i}");
        }
    }
}
