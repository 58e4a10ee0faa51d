//! The AVX512_BF16 engine: `vdpbf16ps` on AVX-512 registers, from the same packed panels as
//! the tiles read.

use super::{Block, KT, T};

/// The block on AVX512_BF16's dot product: `c (+)= A·B` (`add`: onto what an earlier K block
/// left in `c`), `c` row-major, 32 wide. Eight rows at a time: 16 accumulators, two B rows and
/// a broadcast A pair in registers; each `vdpbf16ps` adds one pair of products to 16 sums.
///
/// # Safety
/// The CPU must have AVX-512 F and AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn dot_block(block: &Block, add: bool, c: &mut [f32; 4 * T * T]) {
    use std::arch::x86_64::*;
    block.check();
    const ROWS: usize = 8;
    // SAFETY: loads and stores stay in `c` and, for the panels, inside the tiles `check`ed.
    unsafe {
        for g in 0..2 * T / ROWS {
            let (a, r0) = (block.a[g * ROWS / T].as_ptr(), g * ROWS % T);
            let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
            if add {
                for (r, s) in sums.iter_mut().enumerate() {
                    let row = &c[(g * ROWS + r) * 2 * T..][..2 * T];
                    *s = [_mm512_loadu_ps(row.as_ptr()), _mm512_loadu_ps(row[T..].as_ptr())];
                }
            }
            for kc in block.steps.clone() {
                // SAFETY: the step's tiles lie inside the panels (`check`): an A tile is 16 rows of
                // 32 bf16, a B tile 16 rows of 16 pairs.
                let at = a.add(kc * T * KT + r0 * KT);
                let bt = block.b.map(|p| p.as_ptr().add(kc * T * T * 2));
                for p in 0..T {
                    let b0: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(bt[0].add(p * 2 * T).cast()));
                    let b1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(bt[1].add(p * 2 * T).cast()));
                    for (r, s) in sums.iter_mut().enumerate() {
                        let pair = at.add(r * KT + 2 * p).cast::<i32>().read_unaligned();
                        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        s[0] = _mm512_dpbf16_ps(s[0], a, b0);
                        s[1] = _mm512_dpbf16_ps(s[1], a, b1);
                    }
                }
            }
            for (r, s) in sums.iter().enumerate() {
                let row = &mut c[(g * ROWS + r) * 2 * T..][..2 * T];
                _mm512_storeu_ps(row.as_mut_ptr(), s[0]);
                _mm512_storeu_ps(row[T..].as_mut_ptr(), s[1]);
            }
        }
    }
}
