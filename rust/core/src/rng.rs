//! Counter-based randomness: every random draw is a pure function of (seed, tensor name,
//! element index), so results never depend on thread count, chunking or visiting order.

/// SplitMix64's finalizer: a strong 64-bit mixing function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(WEYL);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream key for one tensor (and an optional sub-stream, e.g. the model index).
pub fn stream_key(seed: u64, tensor: &str, sub: u64) -> u64 {
    // FNV-1a over the name, then mixed with the seed and sub-stream.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tensor.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(mix64(seed ^ mix64(h)) ^ sub.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Uniform in [0, 1) for element `i` of a stream: the i-th output of SplitMix64 seeded
/// with `key` (one mixing step per draw; DARE's masks are bound by this cost).
#[inline]
pub fn uniform(key: u64, i: u64) -> f64 {
    draw(key, i) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The integer form of a coin with probability `p`: `draw(key, i) < below(p)` holds exactly
/// when `uniform(key, i) < p` does (`uniform` is `draw · 2⁻⁵³`, exact; `draw` is an integer,
/// so `draw < p·2⁵³ ⇔ draw < ⌈p·2⁵³⌉`), without an integer-to-float conversion per element.
#[inline]
pub fn below(p: f64) -> u64 {
    if p.is_nan() || p <= 0.0 {
        0
    } else if p >= 1.0 {
        1 << 53
    } else {
        (p * (1u64 << 53) as f64).ceil() as u64
    }
}

/// The step between consecutive elements' counters (the golden ratio's Weyl sequence, also
/// SplitMix64's own increment in [`mix64`]).
pub const WEYL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The 53 random bits behind `uniform(key, i)`.
#[inline]
pub fn draw(key: u64, i: u64) -> u64 {
    draw_at(counter(key, i))
}

/// The counter behind `draw(key, i)`: element `i + 1`'s is one [`WEYL`] step on, so a loop
/// over consecutive elements adds instead of multiplying (a 64-bit multiply is three µops in
/// AVX-512; the same values).
#[inline(always)]
pub fn counter(key: u64, i: u64) -> u64 {
    key.wrapping_add(i.wrapping_mul(WEYL))
}

/// `draw` from its [`counter`].
#[inline(always)]
pub fn draw_at(counter: u64) -> u64 {
    mix64(counter) >> 11
}

/// Standard normal for element `i` of a stream (Box-Muller on two counter draws).
#[inline]
pub fn normal(key: u64, i: u64) -> f64 {
    let u1 = uniform(key, 2 * i).max(f64::MIN_POSITIVE);
    let u2 = uniform(key, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments() {
        let k = stream_key(42, "w", 0);
        let n = 200_000;
        let mean: f64 = (0..n).map(|i| uniform(k, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        let z: Vec<f64> = (0..n).map(|i| normal(k, i)).collect();
        let m = z.iter().sum::<f64>() / n as f64;
        let v = z.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.01 && (v - 1.0).abs() < 0.02, "{m} {v}");
    }

    #[test]
    fn integer_coin_is_the_float_coin() {
        let k = stream_key(3, "w", 1);
        let mut ps = vec![0.0, -0.5, 1.0, 1.5, f64::NAN, 1e-300, f64::MIN_POSITIVE, 0.5, 0.3, 0.1 + 0.2, 1.0 - f64::EPSILON / 2.0];
        ps.extend((1..200).map(|j| uniform(k, 10_000 + j))); // thresholds that land on draws
        for &p in &ps {
            let t = below(p);
            for i in 0..2_000u64 {
                assert_eq!(draw(k, i) < t, uniform(k, i) < p, "p {p} i {i}");
            }
            // Right at the threshold: a draw equal to p·2⁵³ (when p is a draw) is not below it.
            let u = (p * (1u64 << 53) as f64) as u64;
            if p > 0.0 && p < 1.0 {
                assert_eq!(u < t, (u as f64 * (1.0 / (1u64 << 53) as f64)) < p, "edge {p}");
                assert_eq!(u + 1 < t, ((u + 1) as f64 * (1.0 / (1u64 << 53) as f64)) < p, "edge+1 {p}");
            }
        }
    }

    #[test]
    fn streams_differ() {
        assert_ne!(stream_key(0, "a", 0), stream_key(0, "b", 0));
        assert_ne!(stream_key(0, "a", 0), stream_key(1, "a", 0));
        assert_ne!(stream_key(0, "a", 0), stream_key(0, "a", 1));
    }
}
