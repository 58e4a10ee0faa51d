//! The AVX-512 inner loops of the mixing kernels, written with intrinsics so that their
//! accumulators stay in registers (see `four_sums`). `four_sums` and `dots_four` do the
//! multiply-adds of the loops they stand for (`sum_in_blocks`, `dots`) in the same order, so
//! the bits do not depend on which runs; `lane_sums` is this path's order of summing a dot's
//! 16 lanes.

use super::{sum_in_blocks, Coefs, Store};
use std::arch::x86_64::*;

/// `sum_in_blocks::<4, 64, true>`, the same multiply-adds in the same order, with its 16
/// accumulators in registers. Written as arrays of floats, they were stored to the stack
/// after every term (their address escapes into the store), and the loop ran at half the
/// speed of the dot products beside it (`mot_bench`, twenty-seventh session). A streamed
/// block is streamed from the registers where it is 64-byte aligned (rows of a multiple of 16
/// floats in a fresh vector), stored plainly elsewhere: through a block on the stack and
/// `store_block`, as the generic tiles store, the backward kernels measured 8–10 % slower.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn four_sums<'a, X: Fn(usize) -> &'a [f32]>(
    (outs, (at, len), store): (&mut [&mut [f32]], (usize, usize), Store), n: usize, c: Coefs,
    row: &X,
) {
    let whole = len / 64 * 64;
    for b in (0..whole).step_by(64) {
        let z = _mm512_setzero_ps();
        let mut acc = [[z; 4]; 4];
        for i in 0..n {
            let x = &row(i)[b..b + 64];
            // SAFETY: `x` holds 64 floats.
            let x = unsafe { [0, 16, 32, 48].map(|q| _mm512_loadu_ps(x.as_ptr().add(q))) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(c.at(i, r));
                for q in 0..4 {
                    acc[q] = _mm512_fmadd_ps(a, x[q], acc[q]);
                }
            }
        }
        for (out, acc) in outs.iter_mut().zip(acc) {
            let out = &mut out[at + b..at + b + 64];
            let p = out.as_mut_ptr();
            let aligned = (p as usize).is_multiple_of(64);
            for (q, v) in acc.into_iter().enumerate() {
                // SAFETY: `out` holds 64 floats; a streaming store needs 64-byte alignment.
                unsafe {
                    match store {
                        Store::Stream if aligned => _mm512_stream_ps(p.add(16 * q), v),
                        _ => _mm512_storeu_ps(p.add(16 * q), v),
                    }
                }
            }
        }
    }
    // The tail, fewer than 64 floats, as the generic tiles do it.
    let rest = |i: usize| &row(i)[whole..];
    sum_in_blocks::<4, 64, true, _>((outs, (at + whole, len - whole), store), n, c, &rest);
}

/// `out[i][at + j] = ⟨a[i], c_j⟩` for four rows `a[i]` and the `n` rows `c_j` of `c`, in
/// tiles of 4 × 4 dots: each block of 16 floats of the eight rows is loaded once for 16
/// multiply-adds, where one row against four loaded five. Each dot sums as `dots` does.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn dots_four(
    a: [&[f32]; 4], c: &[f32], (d, n): (usize, usize), out: &mut [&mut [f32]], at: usize,
) {
    assert!(a.iter().all(|r| r.len() >= d) && c.len() >= n * d && out.len() >= 4);
    let whole = d / 16 * 16;
    for j0 in (0..n).step_by(4) {
        // The last rows in a four padded with copies of the last, as `dots` pads them.
        let rows = [0, 1, 2, 3].map(|j| &c[(j0 + j).min(n - 1) * d..][..d]);
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        for b in (0..whole).step_by(16) {
            // SAFETY: b + 16 ≤ d, and every row holds d floats (asserted above).
            let y = rows.map(|r| unsafe { _mm512_loadu_ps(r.as_ptr().add(b)) });
            for (acc, r) in acc.iter_mut().zip(a) {
                // SAFETY: as above.
                let x = unsafe { _mm512_loadu_ps(r.as_ptr().add(b)) };
                for (s, y) in acc.iter_mut().zip(y) {
                    *s = _mm512_fmadd_ps(x, y, *s);
                }
            }
        }
        for ((acc, r), out) in acc.into_iter().zip(a).zip(out.iter_mut()) {
            let sums = lane_sums_of(acc);
            for (j, o) in out[at + j0..at + n].iter_mut().take(4).enumerate() {
                let mut t = sums[j];
                for (&x, &y) in r[whole..d].iter().zip(&rows[j][whole..]) {
                    t = x.mul_add(y, t);
                }
                *o = t;
            }
        }
    }
}

/// Lane `l` of each accumulator goes into its sum as `((l0 + l2) + (l1 + l3))` within each
/// block of four lanes, then `(b0 + b2) + (b1 + b3)` over the four blocks.
#[target_feature(enable = "avx512f")]
pub unsafe fn lane_sums(acc: &[[f32; 16]; 4]) -> [f32; 4] {
    // SAFETY: each accumulator holds 16 floats.
    let v = unsafe { [0, 1, 2, 3].map(|j| _mm512_loadu_ps(acc[j].as_ptr())) };
    lane_sums_of(v)
}

/// [`lane_sums`] of accumulators in registers.
#[target_feature(enable = "avx512f")]
fn lane_sums_of([a, b, c, d]: [__m512; 4]) -> [f32; 4] {
    // Each 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3], and the same of c and d.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Each block: one partial sum of a, b, c and d, in that order.
    let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
    let abcd = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
    );
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd)));
    let half = _mm256_add_ps(_mm512_castps512_ps256(abcd), high);
    let sums = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps::<1>(half));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    out
}
