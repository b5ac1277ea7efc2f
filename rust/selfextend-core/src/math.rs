//! Scalar maths written so that loops over it vectorise.

#[inline(always)]
pub(crate) fn fma(a: f32, b: f32, c: f32) -> f32 {
    // `mul_add` is a libm call without the FMA instruction; plain `a * b + c` then.
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// An element of a KV cache as attention reads it: f32 as stored, f16 widened eight
/// lanes at a time (one `vcvtph2ps` where the build has F16C, as x86-64-v3 does).
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    fn widen8(x: &[Self; 8]) -> [f32; 8];
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen8(x: &[f32; 8]) -> [f32; 8] {
        *x
    }

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen8(x: &[half::f16; 8]) -> [f32; 8] {
        #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
        // SAFETY: the build enables F16C; the load reads the 16 bytes of `x`.
        unsafe {
            use std::arch::x86_64::{__m256, _mm256_cvtph_ps, _mm_loadu_si128};
            std::mem::transmute::<__m256, [f32; 8]>(_mm256_cvtph_ps(_mm_loadu_si128(
                x.as_ptr().cast(),
            )))
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
        x.map(half::f16::to_f32)
    }

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// The transpose of an 8 × 8 block: on x86-64 with AVX (the wheels' x86-64-v3 baseline)
/// 24 register shuffles, where the compiler makes 64 scalar moves of the plain loop.
#[inline(always)]
pub(crate) fn transpose8(m: &[[f32; 8]; 8]) -> [[f32; 8]; 8] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    // SAFETY: the build enables AVX; the loads read the rows of `m`, and `__m256` and
    // `[f32; 8]` have the same size.
    unsafe {
        use std::arch::x86_64::*;
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(m[i].as_ptr()));
        // Pairs of rows interleaved, then quadruples, then the 128-bit halves swapped.
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xee>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xee>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xee>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xee>(t[5], t[7]),
        ];
        let out: [__m256; 8] = std::array::from_fn(|i| {
            let (lo, hi) = (u[i % 4], u[i % 4 + 4]);
            if i < 4 {
                _mm256_permute2f128_ps::<0x20>(lo, hi)
            } else {
                _mm256_permute2f128_ps::<0x31>(lo, hi)
            }
        });
        out.map(|v| std::mem::transmute::<__m256, [f32; 8]>(v))
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    transpose8_portable(m)
}

/// [`transpose8`] without SIMD, for builds without AVX (and tested in every build).
#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "avx"))))]
fn transpose8_portable(m: &[[f32; 8]; 8]) -> [[f32; 8]; 8] {
    std::array::from_fn(|c| std::array::from_fn(|r| m[r][c]))
}

/// `exp(x)` for `x <= 0`, branch-free so loops over it vectorise. Relative error
/// below 2e-7; inputs under -87 give about 1e-38 instead of smaller values or 0.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = fma(x, LOG2E, 0.5).floor();
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, x));
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = fma(p, r, c);
    }
    f32::from_bits(pow2_bits(n)) * p
}

/// `2^x` for `x <= 0`, branch-free so loops over it vectorise: no range reduction by
/// ln 2 as [`exp_nonpositive`] needs, so two FMAs fewer and a shorter polynomial.
/// Relative error below 1e-7; inputs under -126 give about 1e-38.
#[inline(always)]
pub(crate) fn exp2_nonpositive(x: f32) -> f32 {
    let x = x.max(-126.0);
    let n = x.round_ties_even();
    // Exact, |r| <= 1/2: a near-minimax fit of 2^r there, highest power first.
    let r = x - n;
    let mut p = 1.534_581e-4;
    for c in [
        1.339_993_1e-3,
        9.618_489e-3,
        5.550_328_6e-2,
        0.240_226_46,
        std::f32::consts::LN_2,
        1.0,
    ] {
        p = fma(p, r, c);
    }
    f32::from_bits(pow2_bits(n)) * p
}

/// The bits of `2^n` for an integer-valued `n` in -126 ..= 0, from the bits of
/// n + 127 + 2^23, whose low mantissa bits hold the integer n + 127: integer ops only,
/// so loops over it stay vectorised.
#[inline(always)]
fn pow2_bits(n: f32) -> u32 {
    ((n + (127.0 + 8_388_608.0)).to_bits() & 0xff) << 23
}

/// `silu(x) = x · sigmoid(x)`, from `e = exp(-|x|) <= 1` on both sides of zero, so no
/// branch and no overflow.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let sigmoid = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    x * sigmoid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widens_exactly() {
        let x: [half::f16; 8] = std::array::from_fn(|i| {
            half::f16::from_f32([0.0, -1.5, 65504.0, 6e-8, 2.5, -0.0, 1e-3, -7.25][i])
        });
        assert_eq!(half::f16::widen8(&x), x.map(half::f16::to_f32));
    }

    #[test]
    fn transpose8_transposes() {
        let m: [[f32; 8]; 8] = std::array::from_fn(|r| std::array::from_fn(|c| (r * 8 + c) as f32));
        for t in [transpose8(&m), transpose8_portable(&m)] {
            for r in 0..8 {
                for c in 0..8 {
                    assert_eq!(t[c][r], m[r][c], "({r}, {c})");
                }
            }
        }
    }

    /// The largest relative error of `f` against `want` over `x = 0, -1e-4, ..., low`.
    fn worst_on_nonpositive(f: fn(f32) -> f32, want: fn(f64) -> f64, low: f32) -> f64 {
        (0..=(-low * 1e4) as u32)
            .map(|k| -(k as f32) * 1e-4)
            .map(|x| ((f(x) as f64 - want(x as f64)) / want(x as f64)).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn exp_matches_std_over_its_range() {
        let worst = worst_on_nonpositive(exp_nonpositive, f64::exp, -87.0);
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn exp2_matches_std_over_its_range() {
        let worst = worst_on_nonpositive(exp2_nonpositive, f64::exp2, -126.0);
        assert!(worst < 1e-7, "worst relative error {worst:e}");
        assert!(exp2_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp2_nonpositive(0.0), 1.0);
        assert_eq!(exp2_nonpositive(-3.0), 0.125);
    }

    #[test]
    fn silu_matches_its_definition() {
        let mut worst = 0f64;
        // Past -87 the exponential saturates (see `exp_nonpositive`).
        for k in -160_000..=160_000 {
            let x = (k as f64 * 5e-4) as f32 as f64;
            let want = x / (1.0 + (-x).exp());
            let got = silu(x as f32) as f64;
            worst = worst.max((got - want).abs() / want.abs().max(1e-30));
        }
        assert!(worst < 1e-6, "worst relative error {worst:e}");
        assert_eq!(silu(0.0), 0.0);
        assert!(silu(-1000.0).abs() < 1e-30);
        assert_eq!(silu(1000.0), 1000.0);
    }
}
