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

/// [`exp`] for code compiled for a path with fused multiply-add ([`Level::fma`]): each step
/// rounds once, and the polynomial is evaluated by Estrin's scheme, whose chain of dependent
/// operations is half as long as Horner's. In a vectorised loop on AVX-512 it takes 0.58× the
/// time of `exp` (0.48 against 0.83 ns per value). Within 2 ulp of `f32::exp`, as `exp`.
///
/// [`Level::fma`]: super::simd::Level::fma
#[inline(always)]
pub fn exp_fma(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.7);
    let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-1.428_606_8e-6, n.mul_add(-0.693_145_75, x));
    let r2 = r * r;
    let r4 = r2 * r2;
    let low = r2.mul_add(r.mul_add(0.166_666_67, 0.5), 1.0 + r);
    let high = r2.mul_add(
        r.mul_add(0.000_198_412_7, 0.001_388_889),
        r.mul_add(0.008_333_334, 0.041_666_668),
    );
    let p = r4.mul_add(high, low);
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

/// Floats in a 64-byte cache line.
pub const LINE: usize = 16;

/// How far ahead (in floats) the streaming kernels ask for the lines they will read: a core
/// keeps only so many misses in flight, and the hardware prefetcher starts over at each task's
/// chunk. 2 KiB ahead measured best in C on Intel (model 167) with 4 to 8 streams a core; a
/// gradient norm read at 27 → 40 GB/s and AdamW ran at 47 → 51 GB/s on 2 threads.
pub const AHEAD: usize = 512;

/// Asks for the cache line holding `p` ahead of its use: a hint, which never faults, whatever
/// `p` points at (so `p` may lie past the end of its slice).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE, part of x86-64; a prefetch reads nothing architecturally and never faults.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint that never faults and touches no register but its operand.
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags))
    };
}

/// `Σ aᵢ²` accumulated in f64 (four times 8 lanes: one AVX-512 register each), for norms over
/// millions of values where an f32 sum would lose the small ones.
#[inline(always)]
pub fn sum_of_squares(a: &[f32]) -> f64 {
    // Four quarters of `a` in lockstep: one core streams about 14 GB/s from one sequence of
    // addresses and more from four (a gradient norm over 55M weights, 2 threads: 9.2 → 7.1 ms);
    // more again with each quarter's lines asked for AHEAD (bench-mot's norm phase, 55.6M
    // weights: 8.7–9.4 → 7.6–8.5 ms a step).
    const L: usize = 8;
    let q = a.len() / (4 * L) * L;
    let (quarters, tail) = a.split_at(4 * q);
    let (h0, h1) = quarters.split_at(2 * q);
    let ((p0, p1), (p2, p3)) = (h0.split_at(q), h1.split_at(q));
    let mut acc = [[0f64; L]; 4];
    let lanes =
        p0.chunks_exact(L).zip(p1.chunks_exact(L)).zip(p2.chunks_exact(L).zip(p3.chunks_exact(L)));
    for ((x0, x1), (x2, x3)) in lanes {
        // Twice a line: cheaper than a branch, and a request for a line in flight costs little.
        for x in [x0, x1, x2, x3] {
            prefetch(x.as_ptr().wrapping_add(AHEAD));
        }
        for l in 0..L {
            acc[0][l] += x0[l] as f64 * x0[l] as f64;
            acc[1][l] += x1[l] as f64 * x1[l] as f64;
            acc[2][l] += x2[l] as f64 * x2[l] as f64;
            acc[3][l] += x3[l] as f64 * x3[l] as f64;
        }
    }
    acc.iter().flatten().sum::<f64>() + tail.iter().map(|&x| x as f64 * x as f64).sum::<f64>()
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

/// Sum of `exp(a[i] - shift)` without storing the terms; with [`exp_fma`] if `fma` (the path's
/// [`Level::fma`](super::simd::Level::fma)).
#[inline(always)]
pub fn sum_exp_shifted(a: &[f32], shift: f32, fma: bool) -> f32 {
    if fma {
        sum_of(a, |x| exp_fma(x - shift))
    } else {
        sum_of(a, |x| exp(x - shift))
    }
}

#[inline(always)]
fn sum_of(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (c, r) = a.split_at(a.len() / LANES * LANES);
    for x in c.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += f(x[l]);
        }
    }
    acc.iter().sum::<f32>() + r.iter().map(|&x| f(x)).sum::<f32>()
}

/// Replaces each `a[i]` by `exp(a[i] − shift)·times`; with [`exp_fma`] if `fma`.
#[inline(always)]
pub fn exp_shifted_times(a: &mut [f32], shift: f32, times: f32, fma: bool) {
    if fma {
        a.iter_mut().for_each(|x| *x = exp_fma(*x - shift) * times);
    } else {
        a.iter_mut().for_each(|x| *x = exp(*x - shift) * times);
    }
}

/// Replaces each `a[i]` by `exp(scale·a[i] − shift)` and returns their sum: one pass, with the
/// sum in lanes so that the loop vectorises (a single running total would chain every add).
/// With [`exp_fma`] if `fma`.
#[inline(always)]
pub fn exp_scaled_in_place(a: &mut [f32], scale: f32, shift: f32, fma: bool) -> f32 {
    if fma {
        map_and_sum(a, |x| exp_fma(x * scale - shift))
    } else {
        map_and_sum(a, |x| exp(x * scale - shift))
    }
}

#[inline(always)]
fn map_and_sum(a: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let split = a.len() / LANES * LANES;
    let (c, r) = a.split_at_mut(split);
    for x in c.chunks_exact_mut(LANES) {
        for l in 0..LANES {
            x[l] = f(x[l]);
            acc[l] += x[l];
        }
    }
    let mut total: f32 = acc.iter().sum();
    for x in r {
        *x = f(*x);
        total += *x;
    }
    total
}

/// [`super::stream_copy`] 64 bytes a store: `dst` must be 64-byte aligned and as long as `src`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn stream_copy_avx512(dst: &mut [f32], src: &[f32]) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_stream_ps};
    assert!(dst.len() == src.len() && (dst.as_ptr() as usize).is_multiple_of(64));
    let whole = dst.len() / 16 * 16;
    for (o, s) in dst[..whole].chunks_exact_mut(16).zip(src.chunks_exact(16)) {
        // SAFETY: `o` is 16 floats on a 64-byte boundary (`dst` starts on one and `o` advances
        // 64 bytes at a time), `s` 16 floats.
        unsafe { _mm512_stream_ps(o.as_mut_ptr(), _mm512_loadu_ps(s.as_ptr())) };
    }
    if whole < dst.len() {
        dst[whole..].copy_from_slice(&src[whole..]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        for exp in [super::exp, super::exp_fma] {
            let mut worst = 0f32;
            for i in -8000..8000 {
                let x = i as f32 * 0.01;
                let rel = ((exp(x) - x.exp()) / x.exp()).abs();
                worst = worst.max(rel);
            }
            assert!(worst < 3e-7, "worst relative error {worst}");
        }
    }

    #[test]
    fn reductions_match_naive() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((super::dot(&a, &b) - naive).abs() < 1e-5);
        assert!((super::sum(&a) - a.iter().sum::<f32>()).abs() < 1e-5);
        assert_eq!(super::max(&a), a.iter().cloned().fold(f32::MIN, f32::max));
        for fma in [false, true] {
            let mut e = a.clone();
            let total = super::exp_scaled_in_place(&mut e, 0.5, 0.25, fma);
            for (x, y) in a.iter().zip(&e) {
                let want = super::exp(0.5 * x - 0.25);
                assert!((want - y).abs() < 5e-7 * want, "{want} vs {y}");
            }
            assert!((total - e.iter().sum::<f32>()).abs() < 1e-5);
            let shifted: f32 = a.iter().map(|x| super::exp(x - 0.25)).sum();
            assert!((super::sum_exp_shifted(&a, 0.25, fma) - shifted).abs() < 1e-5);
            let mut t = a.clone();
            super::exp_shifted_times(&mut t, 0.25, 3.0, fma);
            for (x, y) in a.iter().zip(&t) {
                let want = super::exp(x - 0.25) * 3.0;
                assert!((want - y).abs() < 5e-7 * want, "{want} vs {y}");
            }
        }
    }
}
