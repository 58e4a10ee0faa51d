//! Scalar kernels written so that LLVM vectorises them at the width of the SIMD path they are
//! inlined into (`simd::run`; hence `inline(always)`): several independent accumulators for
//! reductions (f32 addition is not associative, so a single accumulator stays scalar) and a
//! branch-free `exp`.

/// `exp(x)` by range reduction to `r ∈ [-ln2/2, ln2/2]` and a degree-7 polynomial: within 2 ulp
/// of `f32::exp` on the range that matters, and vectorisable, unlike the libm call. Only float
/// and integer arithmetic on the bits: no float-to-int conversion, which would not vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer n, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // Not `clamp`: max/min send NaN to the bound instead of panicking or propagating, and
    // compile to one vmaxps/vminps pair.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.7);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668
                        + r * (0.008_333_334 + r * (0.001_388_889 + r * 0.000_198_412_7))))));
    let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

// 16 lanes: one AVX-512 register, two AVX2 ones (independent chains hide the add latency).
const LANES: usize = 16;

#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, ra) = a.split_at(a.len() / LANES * LANES);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(LANES).zip(cb.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (c, r) = a.split_at(a.len() / LANES * LANES);
    for x in c.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + r.iter().sum::<f32>()
}

/// `Σ aᵢ²` accumulated in f64 (8 lanes: one AVX-512 register), for norms over millions of
/// values where an f32 sum would lose the small ones.
#[inline(always)]
pub fn sum_of_squares(a: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (c, r) = a.split_at(a.len() / 8 * 8);
    for x in c.chunks_exact(8) {
        for l in 0..8 {
            acc[l] += x[l] as f64 * x[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + r.iter().map(|&x| x as f64 * x as f64).sum::<f64>()
}

#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (c, r) = a.split_at(a.len() / LANES * LANES);
    for x in c.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = acc[l].max(x[l]);
        }
    }
    r.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)), |m, &v| m.max(v))
}

/// Sum of `exp(a[i] - shift)` without storing the terms.
#[inline(always)]
pub fn sum_exp_shifted(a: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (c, r) = a.split_at(a.len() / LANES * LANES);
    for x in c.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += exp(x[l] - shift);
        }
    }
    acc.iter().sum::<f32>() + r.iter().map(|&x| exp(x - shift)).sum::<f32>()
}

/// Replaces each `a[i]` by `exp(scale·a[i] − shift)` and returns their sum: one pass, with the
/// sum in lanes so that the loop vectorises (a single running total would chain every add).
#[inline(always)]
pub fn exp_scaled_in_place(a: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let split = a.len() / LANES * LANES;
    let (c, r) = a.split_at_mut(split);
    for x in c.chunks_exact_mut(LANES) {
        for l in 0..LANES {
            x[l] = exp(x[l] * scale - shift);
            acc[l] += x[l];
        }
    }
    let mut total: f32 = acc.iter().sum();
    for x in r {
        *x = exp(*x * scale - shift);
        total += *x;
    }
    total
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let rel = ((super::exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn reductions_match_naive() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((super::dot(&a, &b) - naive).abs() < 1e-5);
        assert!((super::sum(&a) - a.iter().sum::<f32>()).abs() < 1e-5);
        assert_eq!(super::max(&a), a.iter().cloned().fold(f32::MIN, f32::max));
        let mut e = a.clone();
        let total = super::exp_scaled_in_place(&mut e, 0.5, 0.25);
        for (x, y) in a.iter().zip(&e) {
            assert!((super::exp(0.5 * x - 0.25) - y).abs() < 1e-7);
        }
        assert!((total - e.iter().sum::<f32>()).abs() < 1e-5);
    }
}
