//! The small single-threaded GEMMs inside the attention kernel: register-tiled products whose
//! right-hand operand the caller has packed once (rows of contiguous, padded columns).
//!
//! A general GEMM packs both operands on every call; attention multiplies each head's K and V
//! by every block of queries, so it packs them once per head and streams them from here. Each
//! SIMD path has its own micro-kernel, an `MR×NR` block of accumulators in registers; its width
//! `NR` is what the packed operands are padded to.

use super::simd::Level;

/// The left operand: element `(i, p)` at `ptr[i·rs + p·cs]`, any strides.
#[derive(Clone, Copy)]
pub struct Lhs {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// The right operand, packed in panels of [`width`] columns: element `(p, j)` at
/// `ptr[(j / w)·ps + p·rs + j % w]`, every panel padded (readable, zero or not) to `w` columns.
/// Row-major storage with padded rows is the case `ps = w`; panel after panel (`rs = w`,
/// `ps = k·w`) keeps each panel contiguous, which matters when the rows are long: a row
/// stride of a power of two maps every row of a panel to the same cache set.
#[derive(Clone, Copy)]
pub struct Rhs {
    pub ptr: *const f32,
    pub rs: usize,
    pub ps: usize,
    pub w: usize,
}

impl Rhs {
    /// A `[k, n]` operand stored panel after panel (`[k][w]` each), as [`pack_panels`] packs it.
    pub fn panels(buf: &[f32], k: usize, w: usize) -> Rhs {
        Rhs { ptr: buf.as_ptr(), rs: w, ps: k * w, w }
    }

    /// The operand from column `j` on; `j` a multiple of the width.
    pub fn col(self, j: usize) -> Rhs {
        debug_assert_eq!(j % self.w, 0);
        Rhs { ptr: self.ptr.wrapping_add(j / self.w * self.ps), ..self }
    }

    /// The operand from row `p` on.
    pub fn row(self, p: usize) -> Rhs {
        Rhs { ptr: self.ptr.wrapping_add(p * self.rs), ..self }
    }
}

/// `b [k, n]` (element `(p, j)` at `b[p·rs + j·cs]`) packed panel after panel for a kernel of
/// width `w` ([`Rhs::panels`]): each panel `[k][w]`, zeros past column `n`.
pub fn pack_panels(
    b: &[f32], (k, n): (usize, usize), (rs, cs): (usize, usize), w: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; n.div_ceil(w) * k * w];
    for p in 0..k {
        for j in 0..n {
            out[j / w * k * w + p * w + j % w] = b[p * rs + j * cs];
        }
    }
    out
}

/// The destination: row-major with row stride `rs`; only its `m×n` elements are written.
#[derive(Clone, Copy)]
pub struct Dst {
    pub ptr: *mut f32,
    pub rs: usize,
}

/// Columns per micro-tile on a path: what packed right operands are padded to.
pub fn width(level: Level) -> usize {
    kernel(level, false).1
}

/// The width to pack a right operand of `n` columns at: [`width`], but 16 on AVX-512 when
/// `n ≤ 16` (a router's or controller's few experts), whose 32-column tiles would be half
/// padding.
pub fn width_for(level: Level, n: usize) -> usize {
    kernel(level, n <= 16).1
}

/// A path's micro-kernel, or its narrow one (only AVX-512 has one): its rows, its columns and
/// the function.
fn kernel(level: Level, narrow: bool) -> (usize, usize, Tile) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = narrow;
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if narrow => (x86::AVX512_NARROW_ROWS, 16, x86::tile_avx512_narrow),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => (x86::AVX512_ROWS, 32, x86::tile_avx512),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => (x86::AVX2_ROWS, 16, x86::tile_avx2),
        _ => (PORTABLE_ROWS, 8, tile_portable),
    }
}

/// `dst (+)= lhs·rhs` for an `m×k` lhs and a `k×n` rhs, with the micro-kernel of `level` for
/// the width `rhs` is packed at, in a fixed order of additions: the same result on every call
/// for the same path and width.
///
/// # Safety
/// `lhs` must be readable at rows `0..m`, columns `0..k`; `rhs` (of width `width(level)`, or
/// `width_for(level, n)`) at rows `0..k` and columns `0..n` rounded up to its width; `dst`
/// writable at rows `0..m`, columns `0..n`, by no one else; `level` must be supported by this
/// CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    level: Level, m: usize, n: usize, k: usize, dst: Dst, accumulate: bool, lhs: Lhs, rhs: Rhs,
) {
    // A right operand packed narrower than the path's width runs on its narrow kernel.
    let (mr, nr, tile) = kernel(level, rhs.w < width(level));
    debug_assert_eq!(nr, rhs.w);
    // Column panels of `nr`, each swept by blocks of `mr` rows: the panel of `rhs` (`k×nr`)
    // stays in L1 while the rows stream past it.
    for j0 in (0..n).step_by(nr) {
        for i0 in (0..m).step_by(mr) {
            let a = Lhs { ptr: lhs.ptr.wrapping_add(i0 * lhs.rs), ..lhs };
            let c = Dst { ptr: dst.ptr.wrapping_add(i0 * dst.rs + j0), ..dst };
            let shape = Shape { rows: (m - i0).min(mr), cols: (n - j0).min(nr), k };
            // SAFETY: rows i0.., columns j0.. are inside the caller's ranges; the caller
            // guarantees the CPU has `level`.
            unsafe { tile(shape, c, accumulate, a, rhs.col(j0)) };
        }
    }
}

/// One micro-tile: `rows` (at most the kernel's rows) by `cols` (at most its width), over `k`.
#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    cols: usize,
    k: usize,
}

/// A micro-kernel: `dst (+)= lhs·rhs` on one tile. Rows past `rows` read the last real row
/// again (always in bounds) and are not stored, so no caller needs padded rows.
type Tile = unsafe fn(Shape, Dst, bool, Lhs, Rhs);

/// The left operand's row pointers for a tile, the missing rows repeating the last real one.
#[inline(always)]
fn row_ptrs<const MR: usize>(lhs: Lhs, rows: usize) -> [*const f32; MR] {
    std::array::from_fn(|i| lhs.ptr.wrapping_add(i.min(rows - 1) * lhs.rs))
}

const PORTABLE_ROWS: usize = 4;

/// The portable micro-kernel, 4×8, plain multiply-adds (no FMA on baseline x86-64).
unsafe fn tile_portable(s: Shape, dst: Dst, accumulate: bool, lhs: Lhs, rhs: Rhs) {
    const MR: usize = PORTABLE_ROWS;
    let row = row_ptrs::<MR>(lhs, s.rows);
    let mut acc = [[0f32; 8]; MR];
    for p in 0..s.k {
        // SAFETY: row p of rhs has 8 readable columns from here (padded); row[i] + p·cs is
        // inside lhs.
        let b: [f32; 8] = unsafe { rhs.ptr.add(p * rhs.rs).cast::<[f32; 8]>().read_unaligned() };
        for (acc, row) in acc.iter_mut().zip(row) {
            let a = unsafe { *row.add(p * lhs.cs) };
            for (c, b) in acc.iter_mut().zip(b) {
                *c += a * b;
            }
        }
    }
    for (i, acc) in acc.iter().enumerate().take(s.rows) {
        // SAFETY: row i < rows and columns < cols are inside dst.
        unsafe { store(dst.ptr.add(i * dst.rs), &acc[..s.cols], accumulate) };
    }
}

/// Writes (or adds) one row of a tile's results.
///
/// # Safety
/// `out` must be writable for `acc.len()` floats.
#[inline(always)]
unsafe fn store(out: *mut f32, acc: &[f32], accumulate: bool) {
    // SAFETY: as the caller guarantees.
    let out = unsafe { std::slice::from_raw_parts_mut(out, acc.len()) };
    if accumulate {
        out.iter_mut().zip(acc).for_each(|(o, a)| *o += a);
    } else {
        out.copy_from_slice(acc);
    }
}

/// The x86 micro-kernels, in intrinsics: a plain loop over an array of accumulators is not
/// kept in registers by LLVM (it stored all of them on every step, which halved the speed).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{row_ptrs, store, Dst, Lhs, Rhs, Shape};
    use std::arch::x86_64::*;

    pub const AVX512_ROWS: usize = 8;
    pub const AVX512_NARROW_ROWS: usize = 8;
    pub const AVX2_ROWS: usize = 6;

    /// 8 rows × 32 columns, two 16-lane registers a row: 16 of the 32 vector registers hold
    /// accumulators, the rest the rhs row and the broadcast lhs element.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(s: Shape, dst: Dst, accumulate: bool, lhs: Lhs, rhs: Rhs) {
        const MR: usize = AVX512_ROWS;
        let row = row_ptrs::<MR>(lhs, s.rows);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..s.k {
            // SAFETY: row p of rhs has 32 readable columns from here (padded); row[i] + p·cs
            // is inside lhs.
            unsafe {
                let b = rhs.ptr.add(p * rhs.rs);
                let (b0, b1) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)));
                for i in 0..MR {
                    let a = _mm512_set1_ps(*row[i].add(p * lhs.cs));
                    acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(s.rows) {
            // SAFETY: row i < rows and columns < cols are inside dst; `lanes` holds 32 floats.
            unsafe {
                let out = dst.ptr.add(i * dst.rs);
                if s.cols == 32 {
                    for (v, &x) in acc.iter().enumerate() {
                        let o = out.add(16 * v);
                        let x = if accumulate { _mm512_add_ps(_mm512_loadu_ps(o), x) } else { x };
                        _mm512_storeu_ps(o, x);
                    }
                } else {
                    let mut lanes = [0f32; 32];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                    _mm512_storeu_ps(lanes.as_mut_ptr().add(16), acc[1]);
                    store(out, &lanes[..s.cols], accumulate);
                }
            }
        }
    }

    /// 8 rows × 16 columns, one 16-lane register a row. More rows would leave registers for
    /// more accumulators, but each row needs its own pointer and x86-64 has 16 general
    /// registers: 12 and 24 rows measured slower.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512_narrow(s: Shape, dst: Dst, accumulate: bool, lhs: Lhs, rhs: Rhs) {
        const MR: usize = AVX512_NARROW_ROWS;
        let row = row_ptrs::<MR>(lhs, s.rows);
        let mut acc = [_mm512_setzero_ps(); MR];
        for p in 0..s.k {
            // SAFETY: row p of rhs has 16 readable columns from here (padded); row[i] + p·cs
            // is inside lhs.
            unsafe {
                let b = _mm512_loadu_ps(rhs.ptr.add(p * rhs.rs));
                for i in 0..MR {
                    let a = _mm512_set1_ps(*row[i].add(p * lhs.cs));
                    acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
                }
            }
        }
        let mask: __mmask16 = if s.cols >= 16 { !0 } else { (1 << s.cols) - 1 };
        for (i, &x) in acc.iter().enumerate().take(s.rows) {
            // SAFETY: row i < rows and the first `cols` columns are inside dst.
            unsafe {
                let out = dst.ptr.add(i * dst.rs);
                let x = match accumulate {
                    true => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), x),
                    false => x,
                };
                _mm512_mask_storeu_ps(out, mask, x);
            }
        }
    }

    /// 6 rows × 16 columns, two 8-lane registers a row: 12 of the 16 vector registers hold
    /// accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(s: Shape, dst: Dst, accumulate: bool, lhs: Lhs, rhs: Rhs) {
        const MR: usize = AVX2_ROWS;
        let row = row_ptrs::<MR>(lhs, s.rows);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..s.k {
            // SAFETY: as for AVX-512, with 16 padded columns.
            unsafe {
                let b = rhs.ptr.add(p * rhs.rs);
                let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
                for i in 0..MR {
                    let a = _mm256_set1_ps(*row[i].add(p * lhs.cs));
                    acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(s.rows) {
            let mut lanes = [0f32; 16];
            // SAFETY: as for AVX-512.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
                store(dst.ptr.add(i * dst.rs), &lanes[..s.cols], accumulate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::simd;

    /// Every path, at its width and at the width it packs few columns at, against a naive
    /// triple loop, over shapes with ragged rows and columns, a transposed lhs and accumulation.
    #[test]
    fn matches_a_naive_product_on_every_path() {
        let val = |s: usize| ((s * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        for level in simd::available() {
            simd::with_level(level, || {
                for (m, n, k) in [
                    (1usize, 1usize, 1usize),
                    (7, 5, 3),
                    (8, 32, 64),
                    (13, 40, 17),
                    (130, 70, 9),
                    (50, 16, 33),
                ] {
                    let mut widths = vec![width(level), width_for(level, n)];
                    widths.dedup();
                    for w in widths {
                        let np = n.div_ceil(w) * w;
                        let a: Vec<f32> = (0..m * k).map(val).collect(); // stored k×m: transposed
                        let b: Vec<f32> = (0..k * np).map(|s| val(s + 7)).collect();
                        let before: Vec<f32> = (0..m * (n + 3)).map(|s| val(s + 11)).collect();
                        for accumulate in [false, true] {
                            let mut c = before.clone();
                            // SAFETY: the buffers cover the ranges gemm reads and writes.
                            unsafe {
                                gemm(
                                    level,
                                    m,
                                    n,
                                    k,
                                    Dst { ptr: c.as_mut_ptr(), rs: n + 3 },
                                    accumulate,
                                    Lhs { ptr: a.as_ptr(), rs: 1, cs: m },
                                    Rhs { ptr: b.as_ptr(), rs: np, ps: w, w },
                                )
                            };
                            for i in 0..m {
                                for j in 0..n + 3 {
                                    let old = before[i * (n + 3) + j];
                                    let want = if j >= n {
                                        old
                                    } else {
                                        let s: f64 = (0..k)
                                            .map(|p| a[p * m + i] as f64 * b[p * np + j] as f64)
                                            .sum();
                                        s as f32 + if accumulate { old } else { 0.0 }
                                    };
                                    let got = c[i * (n + 3) + j];
                                    assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "{level} {m}x{n}x{k} acc {accumulate} ({i},{j}): {got} vs {want}"
                                );
                                }
                            }
                        }
                    }
                }
            })
        }
    }
}
