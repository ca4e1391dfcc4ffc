//! Element types we read and write, and their conversion to and from f32.
//! Merges always compute in f32; inputs are widened once and outputs rounded once.
use crate::simd::avx2;
use half::{bf16, f16, slice::HalfBitsSliceExt, slice::HalfFloatSliceExt};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
        }
    }

    /// The name used in safetensors headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses both safetensors names ("BF16") and torch/numpy names ("bfloat16").
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Dtype::F32,
            "f16" | "float16" | "half" => Dtype::F16,
            "bf16" | "bfloat16" => Dtype::BF16,
            "f64" | "float64" | "double" => Dtype::F64,
            "f8_e4m3" | "float8_e4m3fn" | "f8e4m3" => Dtype::F8E4M3,
            "f8_e5m2" | "float8_e5m2" | "f8e5m2" => Dtype::F8E5M2,
            _ => return None,
        })
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Dtype> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F32 => Dtype::F32,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::F64 => Dtype::F64,
            S::F8_E4M3 => Dtype::F8E4M3,
            S::F8_E5M2 => Dtype::F8E5M2,
            _ => return None,
        })
    }

    /// Whether the writer can produce this dtype (f64 and f8 are read-only).
    pub fn writable(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Widens little-endian `src` bytes of `dtype` into `dst` (len = src.len() / size).
pub fn decode_f32(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    match dtype {
        Dtype::F32 => match aligned::<f32>(src) {
            Some(s) => dst.copy_from_slice(s),
            None => src.chunks_exact(4).zip(dst).for_each(|(b, d)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        },
        Dtype::F16 => match aligned::<u16>(src) {
            // The merge path's widening (its finiteness test unused).
            Some(s) => {
                widen_f16_finite(s, dst);
            }
            None => src.chunks_exact(2).zip(dst).for_each(|(b, d)| *d = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        },
        Dtype::BF16 => match aligned::<u16>(src) {
            // The merge path's widening (its finiteness test unused): `half`'s values, NaNs
            // included, faster than `half`'s loop (AVX2 where present).
            Some(s) => {
                widen_bf16_finite(s, dst);
            }
            None => src.chunks_exact(2).zip(dst).for_each(|(b, d)| *d = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        },
        Dtype::F64 => src.chunks_exact(8).zip(dst).for_each(|(b, d)| *d = f64::from_le_bytes(b.try_into().unwrap()) as f32),
        Dtype::F8E4M3 => {
            let lut = f8_e4m3_table();
            src.iter().zip(dst).for_each(|(b, d)| *d = lut[*b as usize]);
        }
        Dtype::F8E5M2 => {
            let lut = f8_e5m2_table();
            src.iter().zip(dst).for_each(|(b, d)| *d = lut[*b as usize]);
        }
    }
}

/// `decode_f32`, and the index of the first ±inf/NaN among the values (the merge path refuses
/// them). For BF16, F16 and F32 the test rides on the widening or copy itself instead of a
/// second pass over the floats; the values are `decode_f32`'s, NaNs included.
pub fn decode_f32_finite(dtype: Dtype, src: &[u8], dst: &mut [f32]) -> Option<usize> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => {
            if let Some(s) = aligned::<u16>(src) {
                return if dtype == Dtype::BF16 { widen_bf16_finite(s, dst) } else { widen_f16_finite(s, dst) };
            }
        }
        Dtype::F32 => {
            if let Some(s) = aligned::<f32>(src) {
                return copy_f32_finite(s, dst);
            }
        }
        _ => {}
    }
    decode_f32(dtype, src, dst);
    first_non_finite(dst)
}

avx2! {
/// Copies f32 values with the finiteness test in the same loop (a running minimum of the
/// inverted exponent bits, as in [`widen_bf16_finite`]), instead of a copy and then a scan;
/// every bit copied, NaNs' too. Also the writing of f32 outputs (`encode_f32_finite`).
fn copy_f32_finite(src: &[f32], dst: &mut [f32]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    const BLOCK: usize = 1024;
    const EXP: u32 = 0x7f80_0000;
    let mut first = None;
    for (b, (s, d)) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)).enumerate() {
        let mut finite = u32::MAX;
        d.iter_mut().zip(s).for_each(|(o, &x)| {
            finite = finite.min(!x.to_bits() & EXP);
            *o = x;
        });
        if first.is_none() && finite == 0 {
            first = first_non_finite(d).map(|i| b * BLOCK + i);
        }
    }
    first
}
}

/// Widens f16, with the index of the first ±inf/NaN. With F16C, eight at a time (`half`'s own
/// conversion on such a CPU, and exact: every f16 is an f32) and the test in the same loop, a
/// running minimum of the inverted exponent bits, zero where a value's are all ones (`half`'s
/// slice conversion called a function per eight values, and the test took a second pass).
fn widen_f16_finite(src: &[u16], dst: &mut [f32]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if x86::f16c() {
        // SAFETY: AVX2 and F16C were just detected.
        return unsafe { x86::widen_f16(src, dst) };
    }
    src.reinterpret_cast::<f16>().convert_to_f32_slice(dst);
    first_non_finite(dst)
}

/// Rounds to f16 (to nearest even), with the index of the first value that is ±inf or NaN in
/// f16; with F16C as in [`widen_f16_finite`].
fn narrow_f16_finite(src: &[f32], dst: &mut [u16]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if x86::f16c() {
        // SAFETY: AVX2 and F16C were just detected.
        return unsafe { x86::narrow_f16(src, dst) };
    }
    dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(src);
    dst.iter().position(|&x| x & 0x7c00 == 0x7c00)
}

/// The f16 loops with F16C (which every AVX2 CPU has).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Entries per block of the finiteness test (a block holding ±inf or NaN is then searched
    /// for it).
    const BLOCK: usize = 1024;

    /// Whether the loops may run: the CPU has AVX2 and F16C, and the wide builds are allowed
    /// (`simd::baseline_only`).
    pub fn f16c() -> bool {
        crate::simd::wide_allowed() && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }

    /// The index of the first of `v` whose exponent bits are all ones, from block `b` on.
    fn first_in(v: &[u16], b: Option<usize>) -> Option<usize> {
        let b = b?;
        v[b * BLOCK..].iter().position(|&x| x & 0x7c00 == 0x7c00).map(|i| b * BLOCK + i)
    }

    /// The least of the eight lanes (`phminposuw`).
    #[target_feature(enable = "avx2")]
    unsafe fn least(v: __m128i) -> u16 {
        _mm_extract_epi16::<0>(_mm_minpos_epu16(v)) as u16
    }

    /// [`super::widen_f16_finite`] with F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) -> Option<usize> {
        let exp = _mm_set1_epi16(0x7c00);
        let mut bad = None;
        for (b, (s, d)) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)).enumerate() {
            let mut finite = _mm_set1_epi16(-1);
            let whole = s.len() / 8 * 8;
            for i in (0..whole).step_by(8) {
                let v = _mm_loadu_si128(s.as_ptr().add(i).cast());
                finite = _mm_min_epu16(finite, _mm_andnot_si128(v, exp));
                _mm256_storeu_ps(d.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
            }
            let mut rest = u16::MAX;
            for (o, &x) in d[whole..].iter_mut().zip(&s[whole..]) {
                rest = rest.min(!x & 0x7c00);
                *o = f16::from_bits(x).to_f32();
            }
            if bad.is_none() && least(finite).min(rest) == 0 {
                bad = Some(b);
            }
        }
        first_in(src, bad)
    }

    /// [`super::narrow_f16_finite`] with F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn narrow_f16(src: &[f32], dst: &mut [u16]) -> Option<usize> {
        let exp = _mm_set1_epi16(0x7c00);
        let mut bad = None;
        for (b, (s, d)) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)).enumerate() {
            let mut finite = _mm_set1_epi16(-1);
            let whole = s.len() / 8 * 8;
            for i in (0..whole).step_by(8) {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr().add(i)));
                finite = _mm_min_epu16(finite, _mm_andnot_si128(h, exp));
                _mm_storeu_si128(d.as_mut_ptr().add(i).cast(), h);
            }
            let mut rest = u16::MAX;
            for (o, &x) in d[whole..].iter_mut().zip(&s[whole..]) {
                *o = f16::from_f32(x).to_bits();
                rest = rest.min(!*o & 0x7c00);
            }
            if bad.is_none() && least(finite).min(rest) == 0 {
                bad = Some(b);
            }
        }
        first_in(dst, bad)
    }
}

/// Index of the first NaN/±inf, scanning blocks branch-free (vectorizes) before locating it.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    const EXP: u32 = 0x7f80_0000;
    for (b, block) in x.chunks(1024).enumerate() {
        if block.iter().fold(false, |acc, v| acc | (v.to_bits() & EXP == EXP)) {
            return block.iter().position(|v| !v.is_finite()).map(|i| b * 1024 + i);
        }
    }
    None
}

avx2! {
/// Widens with the finiteness test in the same loop (the AVX2 build: twice the elements per
/// instruction of the baseline's SSE2). The test is a running minimum of the inverted exponent
/// bits, zero where a value's are all ones: one vector instruction more per load (from L2,
/// 0.16 → 0.11 ns per element against a scan of each block before widening it; in merges the
/// loads from the page cache dominate).
fn widen_bf16_finite(src: &[u16], dst: &mut [f32]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    const BLOCK: usize = 1024;
    for (b, (s, d)) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)).enumerate() {
        let mut finite = u16::MAX;
        // A finite bf16 is the high half of its f32.
        d.iter_mut().zip(s).for_each(|(o, &x)| {
            finite = finite.min(!x & 0x7f80);
            *o = f32::from_bits(u32::from(x) << 16);
        });
        if finite == 0 {
            // The rest as `decode_f32` widens it (`half` quiets NaNs), and where it starts.
            let (s, d) = (&src[b * BLOCK..], &mut dst[b * BLOCK..]);
            d.iter_mut().zip(s).for_each(|(o, &x)| *o = bf16::from_bits(x).to_f32());
            return first_non_finite(d).map(|i| b * BLOCK + i);
        }
    }
    None
}
}

/// Index of the first ±inf/NaN among little-endian `bytes` of `dtype` (its exponent bits all
/// ones), scanning blocks branch-free (vectorizes) before locating it. `None` as well for
/// dtypes other than BF16, F16 and F32.
pub fn first_non_finite_bytes(dtype: Dtype, bytes: &[u8]) -> Option<usize> {
    fn scan<const SZ: usize>(bytes: &[u8], exp: u32) -> Option<usize> {
        let bad = |b: &[u8]| {
            let v = if SZ == 2 { u32::from(u16::from_le_bytes([b[0], b[1]])) } else { u32::from_le_bytes([b[0], b[1], b[2], b[3]]) };
            v & exp == exp
        };
        bytes.chunks(1024 * SZ).enumerate().find_map(|(i, blk)| {
            blk.chunks_exact(SZ).fold(false, |acc, b| acc | bad(b)).then(|| blk.chunks_exact(SZ).position(bad).map(|j| i * 1024 + j))?
        })
    }
    match dtype {
        Dtype::BF16 => scan::<2>(bytes, 0x7f80),
        Dtype::F16 => scan::<2>(bytes, 0x7c00),
        Dtype::F32 => scan::<4>(bytes, 0x7f80_0000),
        _ => None,
    }
}

/// Rounds `src` to `dtype` (round to nearest even) into little-endian `dst` bytes.
/// Only writable dtypes; the plan rejects others before any work starts.
pub fn encode_f32(dtype: Dtype, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * dtype.size());
    match dtype {
        Dtype::F32 => src.iter().zip(dst.chunks_exact_mut(4)).for_each(|(s, d)| d.copy_from_slice(&s.to_le_bytes())),
        Dtype::F16 => match aligned_mut::<f16>(dst) {
            Some(d) => d.convert_from_f32_slice(src),
            None => src.iter().zip(dst.chunks_exact_mut(2)).for_each(|(s, d)| d.copy_from_slice(&f16::from_f32(*s).to_le_bytes())),
        },
        Dtype::BF16 => match aligned_mut::<bf16>(dst) {
            Some(d) => d.convert_from_f32_slice(src),
            None => src.iter().zip(dst.chunks_exact_mut(2)).for_each(|(s, d)| d.copy_from_slice(&bf16::from_f32(*s).to_le_bytes())),
        },
        other => unreachable!("{other} is not writable; the plan rejects it"),
    }
}

/// Reinterprets bytes as `T` when the buffer happens to be aligned (it is for files we
/// write and for nearly every safetensors file, whose data section is 8-aligned).
fn aligned<T: Copy>(b: &[u8]) -> Option<&[T]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: f32/f16/bf16 accept every bit pattern; prefix/suffix checked empty.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

fn aligned_mut<T: Copy>(b: &mut [u8]) -> Option<&mut [T]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: as above; every bit pattern is a valid T.
    let (pre, mid, post) = unsafe { b.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// `encode_f32`, and the index of the first encoded value that is ±inf/NaN in `dtype` (a
/// finite f32 too large for a 16-bit dtype). For BF16 the rounding is the integer form of
/// round-to-nearest-even, which `half` gives for every non-NaN value, and the test rides on
/// it block by block, instead of `half`'s NaN-aware loop and a second pass over the bytes; F16
/// and F32 likewise (F16C's rounding, `half`'s own on such a CPU; a copy).
pub fn encode_f32_finite(dtype: Dtype, src: &[f32], dst: &mut [u8]) -> Option<usize> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => {
            if let Some(d) = aligned_mut::<u16>(dst) {
                return if dtype == Dtype::BF16 { narrow_bf16_finite(src, d) } else { narrow_f16_finite(src, d) };
            }
        }
        Dtype::F32 => {
            if let Some(d) = aligned_mut::<f32>(dst) {
                return copy_f32_finite(src, d);
            }
        }
        _ => {}
    }
    encode_f32(dtype, src, dst);
    first_non_finite_bytes(dtype, dst)
}

avx2! {
/// Rounds with the tests in the same loop: inputs that are not finite (whose rounding the
/// block then takes again from `half`), outputs that are not (finite values rounded past the
/// largest bf16), each a running minimum as in [`widen_bf16_finite`].
fn narrow_bf16_finite(src: &[f32], dst: &mut [u16]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    const BLOCK: usize = 1024;
    const EXP: u32 = 0x7f80_0000;
    let mut first = None;
    for (b, (s, d)) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)).enumerate() {
        let (mut finite_in, mut finite_out) = (u32::MAX, u16::MAX);
        // Round to nearest even: add just under half an ulp, plus the kept lowest bit (wrapping
        // only for NaNs, whose block is rounded again below).
        d.iter_mut().zip(s).for_each(|(o, &x)| {
            let v = x.to_bits();
            finite_in = finite_in.min(!v & EXP);
            *o = (v.wrapping_add(0x7fff + ((v >> 16) & 1)) >> 16) as u16;
            finite_out = finite_out.min(!*o & 0x7f80);
        });
        if finite_in == 0 {
            // NaNs need `half`'s handling (a quiet NaN, never rounded into ±inf).
            d.iter_mut().zip(s).for_each(|(o, &x)| *o = bf16::from_f32(x).to_bits());
            finite_out = d.iter().fold(u16::MAX, |m, &v| m.min(!v & 0x7f80));
        }
        if first.is_none() && finite_out == 0 {
            first = d.iter().position(|&v| v & 0x7f80 == 0x7f80).map(|i| b * BLOCK + i);
        }
    }
    first
}
}

/// OCP FP8 E4M3 (the "fn" variant torch and safetensors use): bias 7, no infinities,
/// S.1111.111 is NaN.
fn f8_e4m3_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|i| f8_value(i as u8, 4, 3, 7, false)))
}

/// FP8 E5M2: bias 15, IEEE-style infinities and NaNs.
fn f8_e5m2_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|i| f8_value(i as u8, 5, 2, 15, true)))
}

fn f8_value(byte: u8, ebits: u32, mbits: u32, bias: i32, ieee_special: bool) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((byte >> mbits) & ((1 << ebits) - 1) as u8) as i32;
    let m = (byte & ((1 << mbits) - 1) as u8) as i32;
    let emax = (1 << ebits) - 1;
    if ieee_special && e == emax {
        return if m == 0 { sign * f32::INFINITY } else { f32::NAN };
    }
    if !ieee_special && e == emax && m == (1 << mbits) - 1 {
        return f32::NAN;
    }
    let frac = m as f32 / (1 << mbits) as f32;
    if e == 0 {
        sign * frac * 2f32.powi(1 - bias)
    } else {
        sign * (1.0 + frac) * 2f32.powi(e - bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f8_known_values() {
        let e4 = f8_e4m3_table();
        assert_eq!(e4[0x38], 1.0); // 0.0111.000
        assert_eq!(e4[0x7e], 448.0); // largest finite
        assert!(e4[0x7f].is_nan());
        assert_eq!(e4[0x01], 2f32.powi(-9)); // smallest subnormal
        let e5 = f8_e5m2_table();
        assert_eq!(e5[0x3c], 1.0);
        assert_eq!(e5[0x7b], 57344.0);
        assert!(e5[0x7c].is_infinite());
        assert_eq!(e5[0xbc], -1.0);
    }

    #[test]
    fn roundtrip_halfs_aligned_and_not() {
        let vals = [0.0f32, 1.0, -2.5, 3.140625, 65504.0, 1e-3];
        for dt in [Dtype::F16, Dtype::BF16, Dtype::F32] {
            let mut bytes = vec![0u8; vals.len() * dt.size() + 1];
            for off in [0usize, 1] {
                let b = &mut bytes[off..off + vals.len() * dt.size()];
                encode_f32(dt, &vals, b);
                let mut back = vec![0f32; vals.len()];
                decode_f32(dt, b, &mut back);
                for (v, w) in vals.iter().zip(&back) {
                    let expect = match dt {
                        Dtype::F16 => f16::from_f32(*v).to_f32(),
                        Dtype::BF16 => bf16::from_f32(*v).to_f32(),
                        _ => *v,
                    };
                    assert_eq!(expect.to_bits(), w.to_bits(), "{dt} offset {off}");
                }
            }
        }
    }

    /// The fused BF16 rounding against `half`'s: ties to even both ways, carries into the
    /// exponent, overflow to ±inf, subnormals, ±0 and NaNs, aligned or not.
    #[test]
    fn encode_finite_is_encode_then_scan() {
        // Both builds of the AVX2-dispatched loops (simd.rs).
        for baseline in [false, true] {
            crate::simd::baseline_only(baseline);
            let mut vals: Vec<f32> = (0..5000u64).map(|i| f32::from_bits(crate::rng::mix64(i) as u32)).collect();
            for hi in [0x0000u32, 0x0001, 0x3f80, 0x3f81, 0x7f7f, 0x8001, 0xff7f, 0x0080] {
                for lo in [0x0000u32, 0x7fff, 0x8000, 0x8001, 0xffff] {
                    vals.push(f32::from_bits(hi << 16 | lo));
                }
            }
            vals.extend([f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 0.0, -0.0, f32::INFINITY, f32::NAN, f32::from_bits(0x7f80_0001)]);
            let finite: Vec<f32> = vals.iter().copied().filter(|v| v.is_finite() && v.abs() < 1e38).collect();
            // Finite inputs that round to ±inf, in a later block than the first.
            let mut overflow = finite.clone();
            (overflow[1500], overflow[2100]) = (-f32::MAX, f32::MAX);
            for v in [vals, finite, overflow] {
                for dt in [Dtype::BF16, Dtype::F16, Dtype::F32] {
                    for off in [0usize, 1] {
                        let n = v.len() * dt.size();
                        let (mut a, mut b) = (vec![0u8; n + 1], vec![1u8; n + 1]);
                        encode_f32(dt, &v, &mut a[off..off + n]);
                        let got = encode_f32_finite(dt, &v, &mut b[off..off + n]);
                        assert_eq!(got, first_non_finite_bytes(dt, &a[off..off + n]), "{dt} offset {off}");
                        assert_eq!(a[off..off + n], b[off..off + n], "{dt} offset {off}");
                    }
                }
            }
        }
        crate::simd::baseline_only(false);
    }

    /// Every 16-bit pattern widened by the fused loops (both builds) as `half` widens it one
    /// value at a time, and the first ±inf/NaN found: the patterns in order (the first
    /// non-finite one in the 32nd block), and with all non-finite ones moved past 40,000.
    #[test]
    fn every_half_pattern_widens_as_half_does() {
        for baseline in [false, true] {
            crate::simd::baseline_only(baseline);
            let all: Vec<u16> = (0..=u16::MAX).collect();
            for dt in [Dtype::BF16, Dtype::F16] {
                let exp = if dt == Dtype::BF16 { 0x7f80 } else { 0x7c00 };
                let (finite, bad): (Vec<u16>, Vec<u16>) = all.iter().partition(|&&x| x & exp != exp);
                for vals in [all.clone(), [&finite[..40_000], &bad[..], &finite[40_000..]].concat()] {
                    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let want: Vec<f32> =
                        vals.iter().map(|&v| if dt == Dtype::BF16 { bf16::from_bits(v).to_f32() } else { f16::from_bits(v).to_f32() }).collect();
                    let mut got = vec![0f32; vals.len()];
                    let first = decode_f32_finite(dt, &bytes, &mut got);
                    assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{dt}, baseline {baseline}");
                    assert_eq!(first, vals.iter().position(|&v| v & exp == exp), "{dt}, baseline {baseline}");
                }
            }
        }
        crate::simd::baseline_only(false);
    }

    /// f32 inputs copied with the finiteness test (both builds): every bit kept, NaN payloads
    /// included, and the first ±inf/NaN found, at block edges, aligned or not.
    #[test]
    fn f32_copies_keep_every_bit() {
        for baseline in [false, true] {
            crate::simd::baseline_only(baseline);
            let n = 3 * 1024 + 37;
            let finite: Vec<u32> = (0..n).map(|i| crate::rng::mix64(i as u64) as u32 & 0xbf7f_ffff).collect();
            let mut cases = vec![(None, finite.clone())];
            for (at, bad) in [(0, 0x7f80_0000u32), (1023, 0xff80_0000), (1024, 0x7fc0_0001), (2 * 1024 + 5, 0x7f80_0001), (n - 1, 0xffff_ffff)] {
                let mut v = finite.clone();
                v[at] = bad;
                v[n - 2] = 0x7f80_0000; // a later one must not be the one reported
                cases.push((Some(at.min(n - 2)), v));
            }
            for (want, vals) in cases {
                for off in [0usize, 1] {
                    let mut bytes = vec![0u8; 4 * n + 1];
                    bytes[off..off + 4 * n].iter_mut().zip(vals.iter().flat_map(|v| v.to_le_bytes())).for_each(|(b, v)| *b = v);
                    let mut got = vec![0f32; n];
                    assert_eq!(decode_f32_finite(Dtype::F32, &bytes[off..off + 4 * n], &mut got), want, "offset {off}");
                    assert!(got.iter().zip(&vals).all(|(g, &v)| g.to_bits() == v), "offset {off}");
                }
            }
        }
        crate::simd::baseline_only(false);
    }

    /// f32 values at and around each f16's rounding boundaries (the midpoints to the next f16,
    /// and one f32 step either side), subnormal to overflowing, rounded by the fused loops to
    /// the nearest f16 (ties to the even one), found by distance in f64 among the exact values
    /// of the f16 patterns.
    #[test]
    fn f16_rounding_at_its_boundaries() {
        let table: Vec<f64> = (0..0x7c00u16).map(|h| f16::from_bits(h).to_f32() as f64).collect();
        let nearest = |v: f32| -> u16 {
            let (sign, a) = (if v.is_sign_negative() { 0x8000 } else { 0 }, (v as f64).abs());
            // 65520 = the largest f16 plus half its unit in the last place: rounds to inf.
            if v.is_nan() {
                return 0x7e00;
            }
            if a >= 65520.0 {
                return sign | 0x7c00;
            }
            let h = table.partition_point(|&t| t <= a) - 1;
            let up = h + 1 < table.len() && (table[h + 1] - a < a - table[h] || (table[h + 1] - a == a - table[h] && h % 2 == 1));
            sign | (h + usize::from(up)) as u16
        };
        let mut vals = Vec::new();
        // Up to the largest f16 (its midpoint to infinity is not finite; 65520 below).
        for h in 0..0x7bffu16 {
            let (a, b) = (f16::from_bits(h).to_f32() as f64, f16::from_bits(h + 1).to_f32() as f64);
            let mid = ((a + b) / 2.0) as f32;
            for v in [mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1), a as f32] {
                vals.extend([v, -v]);
            }
        }
        vals.extend([65504.0, 65520.0, 65519.99, 1e6, f32::MAX, f32::INFINITY, -f32::INFINITY]);
        let want: Vec<u16> = vals.iter().map(|&v| nearest(v)).collect();
        for baseline in [false, true] {
            crate::simd::baseline_only(baseline);
            let mut b = vec![0u8; 2 * vals.len()];
            let first = encode_f32_finite(Dtype::F16, &vals, &mut b);
            let got: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            let bad = got.iter().zip(&want).position(|(g, w)| g != w);
            assert!(bad.is_none(), "baseline {baseline}: {:?} gave {:#x}, want {:#x}", bad.map(|i| vals[i]), got[bad.unwrap()], want[bad.unwrap()]);
            assert_eq!(first, want.iter().position(|&w| w & 0x7c00 == 0x7c00), "baseline {baseline}");
        }
        crate::simd::baseline_only(false);
    }

    /// The fused BF16 path against `half`'s widening and a separate scan: every bit pattern
    /// class (subnormals, ±0, ±inf, quiet and signalling NaNs) at block edges, aligned or not.
    #[test]
    fn decode_finite_is_decode_then_scan() {
        // Both builds of the AVX2-dispatched loops (simd.rs).
        for baseline in [false, true] {
            crate::simd::baseline_only(baseline);
            let n = 3 * 1024 + 37;
            let finite: Vec<u16> = (0..n).map(|i| (crate::rng::mix64(i as u64) as u16) & 0x7f7f | ((i as u16 & 1) << 15)).collect();
            let mut cases = vec![(None, finite.clone())];
            for (at, bad) in [(0, 0x7f80u16), (1023, 0xff80), (1024, 0x7fc1), (2 * 1024 + 5, 0x7f81), (n - 1, 0xffff)] {
                let mut v = finite.clone();
                v[at] = bad;
                v[n - 2] = 0x7f80; // a later one must not be the one reported
                cases.push((Some(at.min(n - 2)), v));
            }
            for (want, vals) in cases {
                for dt in [Dtype::BF16, Dtype::F16] {
                    for off in [0usize, 1] {
                        let mut bytes = vec![0u8; 2 * n + 1];
                        bytes[off..off + 2 * n].iter_mut().zip(vals.iter().flat_map(|v| v.to_le_bytes())).for_each(|(b, v)| *b = v);
                        let src = &bytes[off..off + 2 * n];
                        let (mut a, mut b, mut c) = (vec![0f32; n], vec![1f32; n], vec![2f32; n]);
                        // `half`'s widening, one value at a time: the reference for both paths.
                        a.iter_mut()
                            .zip(&vals)
                            .for_each(|(a, &v)| *a = if dt == Dtype::BF16 { bf16::from_bits(v).to_f32() } else { f16::from_bits(v).to_f32() });
                        decode_f32(dt, src, &mut c);
                        assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "{dt} offset {off}");
                        let got = decode_f32_finite(dt, src, &mut b);
                        assert_eq!(got, first_non_finite(&a), "{dt} offset {off}");
                        if dt == Dtype::BF16 {
                            assert_eq!(got, want, "offset {off}");
                        }
                        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{dt} offset {off}");
                    }
                }
            }
        }
        crate::simd::baseline_only(false);
    }
}
