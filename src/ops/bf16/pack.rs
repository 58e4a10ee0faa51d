//! Packing: f32 operands copied into the tiles' bf16 layouts, rounded to nearest even on the
//! way by AVX512_BF16's `vcvtne2ps2bf16`, in AVX-512 (every CPU with AMX tiles has both;
//! [`super::dot_available`] checks). Both engines read these layouts. The conversion is one instruction for 32 values, where
//! rounding in integer arithmetic took seven for 16.
//!
//! Both layouts are made of 32-bit pairs of bf16 neighbours along K: a row of an A tile is 16
//! pairs `(A[r][2p], A[r][2p+1])`, a row of a B tile (VNNI) is 16 pairs `(B[2p][n], B[2p+1][n])`.
//! So an operand whose K runs along memory (a row-major A, a column-major B) packs straight
//! through, and one whose K runs across memory (the transposed operands of a weight gradient,
//! `dYᵀ`, and of a forward product, `Wᵀ`) packs through a 16 × 16 transpose of those pairs in
//! registers. A scalar copy, element by element, ran ~3 ns an element on those, which made a
//! weight gradient's product slower in bf16 than in f32.

use super::{bf16, for_chunks, Operand, KT, T};
use crate::ops::{threads, written};
use std::mem::MaybeUninit;

/// Rows a task packs at least (A).
const BLOCK: usize = 32;

/// Where element (r, j) of a 16-row block of packed A goes: the block is stored tile by tile
/// (16 rows × 32 bf16 = 1 KiB each, along K), so a tile load reads contiguous memory however
/// long K is.
#[inline(always)]
fn a_index(r: usize, j: usize, kp: usize) -> usize {
    (r / T) * T * kp + (j / KT) * T * KT + (r % T) * KT + j % KT
}

/// `A [M, K]` as bf16, `mp` rows (M rounded up to 32) by `kp` (K rounded up to 32), tile-major
/// (see [`a_index`]); across the current pool when `parallel`.
pub(super) fn pack_a(a: Operand, mp: usize, kp: usize, parallel: bool) -> Vec<u16> {
    // A column-major A (`dYᵀ`) is read 16 rows at a time from each of 32 source rows: a task
    // takes many of A's rows, so the segments it reads from one source row join up.
    let rows_per_task = if a.rs == 1 && a.cs != 1 {
        (mp / (4 * threads(parallel))).clamp(BLOCK, 8 * BLOCK) / BLOCK * BLOCK
    } else {
        BLOCK
    };
    // Only the element-by-element fallback leaves K's padding unwritten.
    let general = a.cs != 1 && a.rs != 1;
    let stream = mp * kp >= STREAM_PACK_FROM;
    // SAFETY: each task writes its whole chunk: zeros first wherever it holds padding.
    let write = |out: &mut [MaybeUninit<u16>]| {
        for_chunks(out, rows_per_task * kp, parallel, |task, rows| {
            let i0 = task * rows_per_task;
            let ni = a.rows.saturating_sub(i0).min(rows_per_task);
            if ni * kp != rows.len() || (general && a.cols != kp) {
                rows.fill(MaybeUninit::new(0));
            }
            if ni == 0 {
                return; // padding rows only
            }
            // SAFETY (all three): the CPU has AVX-512 and AVX512_BF16 (`dot_available`).
            if a.cs == 1 {
                unsafe { x86::a_along_k(a, i0, ni, kp, rows, stream) }
            } else if a.rs == 1 {
                unsafe { x86::a_across_k(a, i0, ni, kp, rows, stream) }
            } else {
                for r in 0..ni {
                    for j in 0..a.cols {
                        rows[a_index(r, j, kp)] = MaybeUninit::new(bf16(a.at(i0 + r, j)));
                    }
                }
            }
            if stream {
                crate::ops::stream_fence();
            }
        });
    };
    unsafe { written(mp * kp, write) }
}

/// Packed elements of A (4 MiB) from which the packing streams its stores: a pack this large
/// does not stay in a core's L2 (2 MiB on Intel, 1 MiB on AMD Zen 4) until the tiles read it,
/// so a plain store only adds a read of each line. Smaller ones, such as an expert's 512 rows,
/// are read from L2 by the same task and stay plain: streaming every pack made bench-mot's
/// bf16 step 10 ms slower, streaming these 13 ms faster and bench-dense's 16 ms (Intel Xeon
/// with AMX, steps alternated in one process, 2026-12-06).
const STREAM_PACK_FROM: usize = 2 << 20;

/// `B [K, N]` in the tiles' VNNI layout: for each block of 16 columns, K/2 rows of 16 pairs
/// `(B[2p][n], B[2p+1][n])`, so one B tile is 1 KiB of contiguous memory; across the current
/// pool when `parallel`.
pub(super) fn pack_b(b: Operand, np: usize, kp: usize, parallel: bool) -> Vec<u16> {
    pack_b_and(b, np, kp, parallel, None)
}

/// A column-major `B = Wᵀ [K, N]` (`W [N, K]` row-major, the weight of a forward product)
/// packed as [`pack_b`] packs it, and `W [N, K]` itself packed as the B operand of the input
/// gradient's `dY · W` (`kp` columns rounded up from K, `np` rows from N): the pairs of
/// neighbouring rows of `W` that the second layout wants sit in the registers the first one
/// loads, so both cost one read of the f32 weights.
pub(super) fn pack_b_both(
    b: Operand, np: usize, kp: usize, parallel: bool,
) -> (Vec<u16>, Vec<u16>) {
    assert!(b.rs == 1, "pack_b_both: B must be column-major (a row-major W, transposed)");
    // The second layout as B' [N, K]: K-blocks of 16 columns, each np/2 rows of 16 pairs.
    let block_w = np / 2 * T * 2;
    let mut forward = Vec::new();
    // SAFETY: the tasks write the rows of the second layout that their columns of B (rows of
    // W) make; the rows past N's last 16-row block are zeroed here.
    let write = |backward: &mut [MaybeUninit<u16>]| {
        let second = Second { to: backward.as_mut_ptr(), block_w };
        forward = pack_b_and(b, np, kp, parallel, Some(&second));
        for kb in 0..kp / T {
            let rows = kb * block_w + b.cols.next_multiple_of(T) * T..(kb + 1) * block_w;
            backward[rows].fill(MaybeUninit::new(0));
        }
    };
    let backward = unsafe { written(kp / T * block_w, write) };
    (forward, backward)
}

/// The second layout of [`pack_b_both`]: K-blocks of `block_w` elements from `to`, which
/// several tasks write at disjoint rows.
struct Second {
    to: *mut MaybeUninit<u16>,
    block_w: usize,
}

// SAFETY: the tasks that share it write disjoint elements (see `pack_b_both`).
unsafe impl Sync for Second {}

/// [`pack_b`], which with `second` (a column-major B only) also writes `Bᵀ`'s layout there.
fn pack_b_and(
    b: Operand, np: usize, kp: usize, parallel: bool, second: Option<&Second>,
) -> Vec<u16> {
    let block = kp / 2 * T * 2;
    // A row-major B is read a row at a time: a task takes several column blocks, so the row
    // segment it reads is long.
    // (A B with both strides 1, one row or column, is row-major here unless it owes `second`.)
    let row_major = b.cs == 1 && second.is_none();
    let blocks = np / T;
    let per_task = if row_major { (blocks / (4 * threads(parallel))).clamp(1, 16) } else { 1 };
    // Only the element-by-element fallback leaves K's padding unwritten.
    let general = b.cs != 1 && b.rs != 1;
    // SAFETY: each task writes its whole chunk: zeros first wherever it holds padding.
    let write = |out: &mut [MaybeUninit<u16>]| {
        for_chunks(out, per_task * block, parallel, |task, blks| {
            let n0 = task * per_task * T;
            let cols = b.cols.saturating_sub(n0).min(per_task * T);
            if cols * block != blks.len() * T || (general && b.rows != kp) {
                blks.fill(MaybeUninit::new(0));
            }
            if cols == 0 {
                return; // padding columns only
            }
            // SAFETY (all): the CPU has AVX-512 and AVX512_BF16 (`dot_available`); a column-major
            // B's task is one block of 16 columns, so its rows of `second` are its own.
            if row_major {
                unsafe { x86::b_across_k(b, n0, cols, kp, blks) }
            } else if b.rs == 1 {
                unsafe { x86::b_along_k(b, n0, cols, kp, blks, second) }
            } else {
                for c in 0..cols {
                    for k in 0..b.rows {
                        blks[(c / T) * block + (k / 2 * T + c % T) * 2 + k % 2] =
                            MaybeUninit::new(bf16(b.at(k, n0 + c)));
                    }
                }
            }
        });
    };
    unsafe { written(np / T * block, write) }
}

/// The four packing kernels. Each writes whole 64-byte tile rows (zeros past the operand's
/// edge), reading through masked loads that never touch memory past a row's end.
pub(super) mod x86 {
    use super::{a_index, Operand, Second, KT, T};
    use crate::ops::vec::prefetch;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Up to 16 floats from the start of `src`, zeros after its end.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(crate) fn load(src: &[f32]) -> __m512 {
        let n = src.len().min(16);
        // SAFETY: the mask covers the first `n` floats, all inside `src`; masked-off lanes are
        // not read.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, src.as_ptr()) }
    }

    /// `s[from..from + 16]`, cut at the end of `s` (empty past it).
    #[inline(always)]
    fn sixteen(s: &[f32], from: usize) -> &[f32] {
        &s[from.min(s.len())..(from + 16).min(s.len())]
    }

    /// One 64-byte row of a tile.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    fn store(dst: &mut [MaybeUninit<u16>], v: __m512i, stream: bool) {
        let dst = &mut dst[..2 * T];
        if stream && (dst.as_ptr() as usize).is_multiple_of(64) {
            // SAFETY: `dst` holds 32 u16, 64 bytes on a 64-byte boundary.
            unsafe { _mm512_stream_si512(dst.as_mut_ptr().cast(), v) }
        } else {
            // SAFETY: `dst` holds 32 u16, 64 bytes.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) }
        }
    }

    /// 32 consecutive floats as 32 bf16 in order, `lo`'s then `hi`'s: the pairs of neighbours
    /// along K. Bit for bit [`super::bf16`] (`vcvtne2ps2bf16`).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(crate) fn neighbours(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: both types are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// Lane c = `(bf16(x[c]), bf16(y[c]))`: the pairs of two K rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(crate) fn pairs(x: __m512, y: __m512) -> __m512i {
        // 16-bit element 2c from x[c] (element c of `neighbours`), 2c + 1 from y[c] (16 + c).
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(order, neighbours(x, y))
    }

    /// The 16 × 16 transpose of 32-bit lanes: lane j of row i becomes lane i of row j.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(crate) fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = r;
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + q], 128-bit lane L: rows 4i..4i+4 of column 4L + q.
        let mut u = t;
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            u[4 * i] = _mm512_unpacklo_epi64(a, c);
            u[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
            u[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
            u[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
        }
        // Column 4L + q gathers lane L of u[q], u[4 + q], u[8 + q], u[12 + q].
        let mut out = u;
        for q in 0..4 {
            let lo01 = _mm512_shuffle_i32x4::<0x44>(u[q], u[4 + q]);
            let lo23 = _mm512_shuffle_i32x4::<0xee>(u[q], u[4 + q]);
            let hi01 = _mm512_shuffle_i32x4::<0x44>(u[8 + q], u[12 + q]);
            let hi23 = _mm512_shuffle_i32x4::<0xee>(u[8 + q], u[12 + q]);
            out[q] = _mm512_shuffle_i32x4::<0x88>(lo01, hi01);
            out[4 + q] = _mm512_shuffle_i32x4::<0xdd>(lo01, hi01);
            out[8 + q] = _mm512_shuffle_i32x4::<0x88>(lo23, hi23);
            out[12 + q] = _mm512_shuffle_i32x4::<0xdd>(lo23, hi23);
        }
        out
    }

    /// Rows `i0..i0 + ni` of a row-major A (`X`, `dY`) into `out`, tile-major.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn a_along_k(
        a: Operand, i0: usize, ni: usize, kp: usize, out: &mut [MaybeUninit<u16>], stream: bool,
    ) {
        for r in 0..ni {
            let row = &a.data[(i0 + r) * a.rs..][..a.cols];
            for c in 0..kp / KT {
                let v = neighbours(load(sixteen(row, c * KT)), load(sixteen(row, c * KT + 16)));
                store(&mut out[a_index(r, c * KT, kp)..], v, stream);
            }
        }
    }

    /// Rows `i0..i0 + ni` of a column-major A (`dYᵀ`): for each 16 rows and 32 K, the pairs
    /// of 32 source rows, transposed.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn a_across_k(
        a: Operand, i0: usize, ni: usize, kp: usize, out: &mut [MaybeUninit<u16>], stream: bool,
    ) {
        // Source row j (K index j) holds A's column j: rows i0 + r0 .. i0 + r0 + nr of it.
        let column = |j: usize, r0: usize, nr: usize| -> &[f32] {
            if j < a.cols {
                &a.data[j * a.cs + i0 + r0..][..nr]
            } else {
                &[]
            }
        };
        for c in 0..kp / KT {
            for r0 in (0..ni).step_by(T) {
                let nr = (ni - r0).min(T);
                let mut v = [_mm512_setzero_si512(); T];
                for (p, v) in v.iter_mut().enumerate() {
                    let j = c * KT + 2 * p;
                    *v = pairs(load(column(j, r0, nr)), load(column(j + 1, r0, nr)));
                }
                for (r, row) in transpose(v).into_iter().enumerate() {
                    store(&mut out[a_index(r0 + r, c * KT, kp)..], row, stream);
                }
            }
        }
    }

    /// Columns `n0..n0 + cols` of a row-major B (`W` in `dY·W`, `X` in `dYᵀ·X`): pairs of K
    /// rows straight into VNNI rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn b_across_k(
        b: Operand, n0: usize, cols: usize, kp: usize, out: &mut [MaybeUninit<u16>],
    ) {
        let block = kp / 2 * T * 2;
        let row = |k: usize| -> &[f32] {
            if k < b.rows {
                &b.data[k * b.rs + n0..][..cols]
            } else {
                &[]
            }
        };
        for p in 0..kp / 2 {
            let (x, y) = (row(2 * p), row(2 * p + 1));
            for blk in 0..cols.div_ceil(T) {
                let v = pairs(load(sixteen(x, blk * T)), load(sixteen(y, blk * T)));
                store(&mut out[blk * block + p * T * 2..], v, false);
            }
        }
    }

    /// How many blocks of 32 K ahead [`b_along_k`] prefetches (1 to 3 measured alike, 4 and
    /// more slower: `bf16_matmul_bench`'s expert packing, 4.4 → 3.4 ms a bench-mot layer).
    const AHEAD: usize = 2;

    /// Columns `n0..n0 + cols` (`cols` ≤ 16) of a column-major B (`Wᵀ` in `X·Wᵀ`): for each
    /// 32 K, the neighbour pairs of 16 source rows, transposed. With `second`, also rows
    /// `n0/2..n0/2 + 8` of `W = Bᵀ` packed as a B operand: the pairs of its neighbouring rows,
    /// from the same loads.
    ///
    /// # Safety
    /// `second` must hold `kp / 16` K-blocks of `block_w ≥ (n0 + 16) · 16` elements, which no
    /// other thread writes at those rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn b_along_k(
        b: Operand, n0: usize, cols: usize, kp: usize, out: &mut [MaybeUninit<u16>],
        second: Option<&Second>,
    ) {
        debug_assert!(cols <= T);
        for c in 0..kp / KT {
            let (mut lo, mut hi) = ([_mm512_setzero_ps(); T], [_mm512_setzero_ps(); T]);
            for i in 0..cols {
                let col = &b.data[(n0 + i) * b.cs..][..b.rows];
                // Sixteen rows of W a row's length apart are more streams than the hardware
                // prefetcher follows: ask for each row's lines AHEAD blocks of 32 early.
                let ahead = (c + AHEAD) * KT;
                if ahead < b.rows {
                    let p = col[ahead..].as_ptr();
                    prefetch(p);
                    prefetch(p.wrapping_add(16));
                }
                (lo[i], hi[i]) = (load(sixteen(col, c * KT)), load(sixteen(col, c * KT + 16)));
            }
            let v: [__m512i; T] = std::array::from_fn(|i| neighbours(lo[i], hi[i]));
            for (p, row) in transpose(v).into_iter().enumerate() {
                store(&mut out[(c * T + p) * T * 2..], row, false);
            }
            let Some(&Second { to, block_w }) = second else { continue };
            for q in 0..T / 2 {
                let at = (n0 / 2 + q) * T * 2;
                // SAFETY: inside `to` at rows of this task's (the caller's contract); 64-byte
                // stores of whole tile rows.
                unsafe {
                    let lo_row = to.add(2 * c * block_w + at);
                    let hi_row = to.add((2 * c + 1) * block_w + at);
                    _mm512_storeu_si512(lo_row.cast(), pairs(lo[2 * q], lo[2 * q + 1]));
                    _mm512_storeu_si512(hi_row.cast(), pairs(hi[2 * q], hi[2 * q + 1]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packing kernels against the element-by-element layouts, bit for bit, for all four
    /// memory orders at sizes off every tile edge (NaN, infinities, ties and denormals
    /// included).
    #[test]
    fn packs_match_the_element_by_element_layouts() {
        if !super::super::dot_available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let value = |i: usize| match i % 97 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::from_bits(0x3f80_8000), // a tie: rounds to even
            3 => -f32::from_bits(0x3f81_8000),
            4 => -f32::from_bits(0x000a_e398), // a denormal: a zero of its sign
            5 => f32::from_bits(0x007f_ffff),
            _ => ((i * 7919) % 1013) as f32 / 37.0 - 13.0,
        };
        for (rows, cols) in [(1, 1), (5, 40), (33, 70), (64, 96), (100, 33), (300, 17)] {
            let data: Vec<f32> = (0..rows * cols).map(value).collect();
            let (rp, cp) = (rows.next_multiple_of(2 * T), cols.next_multiple_of(KT));
            let at = |i: usize, j: usize| data[i * cols + j];
            for (rs, cs) in [(cols, 1), (1, rows), (2 * cols, 2)] {
                // Element (i, j) at i·rs + j·cs; whatever lies between stays NaN.
                let mut src = vec![f32::NAN; (rows - 1) * rs + (cols - 1) * cs + 1];
                for i in 0..rows {
                    for j in 0..cols {
                        src[i * rs + j * cs] = at(i, j);
                    }
                }
                let a = Operand { data: &src, rows, cols, rs, cs };
                let mut want = vec![0u16; rp * cp];
                for i in 0..rows {
                    for j in 0..cols {
                        want[a_index(i, j, cp)] = bf16(at(i, j));
                    }
                }
                for parallel in [true, false] {
                    let packed = pack_a(a, rp, cp, parallel);
                    assert_eq!(packed, want, "A {rows}x{cols} ({rs}, {cs}) parallel {parallel}");
                }
                // The same data as B [K = rows, N = cols].
                let (kp, np) = (rows.next_multiple_of(KT), cols.next_multiple_of(2 * T));
                let b = Operand { data: &src, rows, cols, rs, cs };
                let block = kp / 2 * T * 2;
                let mut want = vec![0u16; np / T * block];
                for c in 0..cols {
                    for k in 0..rows {
                        want[(c / T) * block + (k / 2 * T + c % T) * 2 + k % 2] = bf16(at(k, c));
                    }
                }
                for parallel in [true, false] {
                    let packed = pack_b(b, np, kp, parallel);
                    assert_eq!(packed, want, "B {rows}x{cols} ({rs}, {cs}) parallel {parallel}");
                }
                if rs != 1 {
                    continue;
                }
                // A column-major B is a forward product's `Wᵀ`: packed with `W [cols, rows]`
                // as the input gradient's B, which is the transposed view packed on its own.
                let w = Operand { data: &src, rows: cols, cols: rows, rs: cs, cs: 1 };
                let want_w =
                    pack_b(w, rows.next_multiple_of(2 * T), cols.next_multiple_of(KT), false);
                for parallel in [true, false] {
                    let (forward, backward) = pack_b_both(b, np, kp, parallel);
                    assert_eq!(forward, want, "B {rows}x{cols} both, parallel {parallel}");
                    assert_eq!(backward, want_w, "W {cols}x{rows} both, parallel {parallel}");
                }
            }
        }
    }
}
