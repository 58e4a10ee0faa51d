//! bf16 matmuls on Intel AMX tiles (Sapphire Rapids and newer), for `run.dtype = "bf16"` on the
//! CPU: operands are f32 tensors (the master weights and activations), rounded to bf16 as they
//! are packed; products accumulate in f32 and come out in f32. AVX512_BF16's `vdpbf16ps` issues
//! at half the rate of an f32 FMA, so only the tiles make bf16 faster than f32 (see README).
//!
//! The AMX intrinsics are not stable Rust, so the five tile instructions are inline `asm!`, and
//! detection reads CPUID and XCR0 directly and asks Linux for the tile state (`arch_prctl`).
//! `Linear` reaches the tiles through [`super::linear`], whose product dispatches here.

// Off x86-64 nothing reaches the packing and the kernel ([`available`] is false).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::written;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Whether this CPU and kernel run AMX bf16 tiles (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    // XCR0 bits 17 and 18: the OS saves tile configuration and tile data.
    let xcr0: u64;
    // SAFETY: XGETBV with ECX = 0 is valid when OSXSAVE is set (checked above).
    unsafe {
        let (lo, hi): (u32, u32);
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
        xcr0 = (hi as u64) << 32 | lo as u64;
    }
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    // Linux hands out the tile data state on request: ARCH_REQ_XCOMP_PERM for XTILEDATA (18).
    // SAFETY: a plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) == 0 }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
#[inline(always)]
fn bf16(x: f32) -> u16 {
    // Branch-free, so that packing loops vectorise.
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// A 2-D f32 operand: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Operand<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// Tiles are 16 rows of 64 bytes: 16 f32, or 32 bf16 (A), or 16 pairs of bf16 (B, VNNI).
const T: usize = 16;
/// K per tile step: 32 bf16.
const KT: usize = 32;

/// Packing reads its source in blocks of this many rows and columns, so that a transposed
/// operand (a gradient's `dCᵀ`) is read a cache line at a time, not an element.
const BLOCK: usize = 32;

/// Where element (r, j) of a 16-row block of packed A goes: the block is stored tile by tile
/// (16 rows × 32 bf16 = 1 KiB each, along K), so a tile load reads contiguous memory however
/// long K is.
#[inline(always)]
fn a_index(r: usize, j: usize, kp: usize) -> usize {
    (r / T) * T * kp + (j / KT) * T * KT + (r % T) * KT + j % KT
}

/// `A [M, K]` as bf16, `mp` rows (M rounded up to 32) by `kp` (K rounded up to 32), tile-major
/// (see [`a_index`]).
fn pack_a(a: Operand, mp: usize, kp: usize) -> Vec<u16> {
    // A column-major A (a transposed gradient, `dCᵀ`) is read a source row at a time: a task
    // takes many of A's rows, so each source row segment it reads is long (the pages it walks
    // are few), and the 32 source rows of one tile step land in tiles that stay in cache.
    let rows_per_task = if a.rs == 1 && a.cs != 1 {
        (mp / (4 * rayon::current_num_threads())).clamp(BLOCK, 8 * BLOCK) / BLOCK * BLOCK
    } else {
        BLOCK
    };
    // SAFETY: each task writes its whole chunk: zeros first wherever it holds padding.
    let write = |out: &mut [MaybeUninit<u16>]| {
        out.par_chunks_mut(rows_per_task * kp).enumerate().for_each(|(task, rows)| {
            let i0 = task * rows_per_task;
            let (ni, nj) = (a.rows.saturating_sub(i0).min(rows_per_task), a.cols);
            if ni * kp != rows.len() || nj != kp {
                rows.fill(MaybeUninit::new(0));
            }
            if ni == 0 {
                return; // padding rows only
            }
            super::simd::run(
                #[inline(always)]
                || {
                    if a.cs == 1 {
                        // Row-major: runs of 32 convert contiguously, vectorised.
                        for r in 0..ni {
                            let src = &a.data[(i0 + r) * a.rs..(i0 + r) * a.rs + nj];
                            for (c, seg) in src.chunks(KT).enumerate() {
                                let at = a_index(r, c * KT, kp);
                                let dst = &mut rows[at..at + seg.len()];
                                dst.iter_mut()
                                    .zip(seg)
                                    .for_each(|(d, &x)| *d = MaybeUninit::new(bf16(x)));
                            }
                        }
                    } else if a.rs == 1 {
                        // Convert each source segment in one vectorised run, then scatter it down
                        // the tiles' rows: for a fixed j, rows r are 32 bf16 apart in a tile.
                        let mut seg = vec![0u16; ni];
                        for j in 0..nj {
                            let src = &a.data[j * a.cs + i0..j * a.cs + i0 + ni];
                            seg.iter_mut().zip(src).for_each(|(d, &x)| *d = bf16(x));
                            let (tile, within) = ((j / KT) * T * KT, j % KT);
                            for (blk, vals) in seg.chunks(T).enumerate() {
                                let base = blk * T * kp + tile + within;
                                for (r, &v) in vals.iter().enumerate() {
                                    rows[base + r * KT] = MaybeUninit::new(v);
                                }
                            }
                        }
                    } else {
                        for r in 0..ni {
                            for j in 0..nj {
                                rows[a_index(r, j, kp)] = MaybeUninit::new(bf16(a.at(i0 + r, j)));
                            }
                        }
                    }
                },
            )
        });
    };
    unsafe { written(mp * kp, write) }
}

/// `B [K, N]` in the tiles' VNNI layout: for each block of 16 columns, K/2 rows of 16 pairs
/// `(B[2p][n], B[2p+1][n])`, so one B tile is 1 KiB of contiguous memory.
fn pack_b(b: Operand, np: usize, kp: usize) -> Vec<u16> {
    let block = kp / 2 * T * 2;
    // A row-major B is read a row at a time: a task takes several column blocks, so the row
    // segment it reads is long.
    let blocks = np / T;
    let per_task =
        if b.cs == 1 { (blocks / (4 * rayon::current_num_threads())).clamp(1, 16) } else { 1 };
    // SAFETY: each task writes its whole chunk: zeros first wherever it holds padding.
    let write = |out: &mut [MaybeUninit<u16>]| {
        out.par_chunks_mut(per_task * block).enumerate().for_each(|(task, blks)| {
            let n0 = task * per_task * T;
            let cols = b.cols.saturating_sub(n0).min(per_task * T);
            if cols * block != blks.len() * T || b.rows != kp {
                blks.fill(MaybeUninit::new(0));
            }
            if cols == 0 {
                return; // padding columns only
            }
            super::simd::run(
                #[inline(always)]
                || {
                    if b.cs == 1 {
                        // Rows 2p and 2p+1 interleave into the pairs of one VNNI row per block.
                        let zeros = [0f32; T];
                        for p in 0..b.rows.div_ceil(2) {
                            let row = |k: usize| &b.data[k * b.rs + n0..k * b.rs + n0 + cols];
                            let (r0, r1) = (
                                row(2 * p),
                                if 2 * p + 1 < b.rows { row(2 * p + 1) } else { &zeros[..0] },
                            );
                            for (bi, (s0, dst)) in
                                r0.chunks(T).zip(blks.chunks_mut(block)).enumerate()
                            {
                                let s1 = r1
                                    .get(bi * T..(bi * T + s0.len()).min(r1.len()))
                                    .unwrap_or(&[]);
                                let dst = &mut dst[p * T * 2..p * T * 2 + T * 2];
                                for (c, &x) in s0.iter().enumerate() {
                                    dst[2 * c] = MaybeUninit::new(bf16(x));
                                }
                                for (c, &y) in s1.iter().enumerate() {
                                    dst[2 * c + 1] = MaybeUninit::new(bf16(y));
                                }
                            }
                        }
                    } else if b.rs == 1 {
                        // Column-major B (a weight `[N, K]` read as `Bᵀ`): a column is contiguous.
                        for c in 0..cols {
                            let col = &b.data[(n0 + c) * b.cs..(n0 + c) * b.cs + b.rows];
                            let base = (c / T) * block + (c % T) * 2;
                            for (k, &x) in col.iter().enumerate() {
                                blks[base + k / 2 * T * 2 + k % 2] = MaybeUninit::new(bf16(x));
                            }
                        }
                    } else {
                        for c in 0..cols {
                            for k in 0..b.rows {
                                blks[(c / T) * block + (k / 2 * T + c % T) * 2 + k % 2] =
                                    MaybeUninit::new(bf16(b.at(k, n0 + c)));
                            }
                        }
                    }
                },
            )
        });
    };
    unsafe { written(np / T * block, write) }
}

/// The tile configuration: palette 1, tiles 0–7 each 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn tile_config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = T as u8;
    }
    TileConfig(c)
}

/// Without x86-64 there are no tiles: [`available`] is false and nothing calls this.
#[cfg(not(target_arch = "x86_64"))]
fn gemm(_: Operand, _: Operand, _: &mut [MaybeUninit<f32>], _: usize, _: bool) {
    unreachable!("AMX tiles are x86-64 only")
}

/// `dst (+)= A · B` in f32 from bf16-rounded operands, the rows of `dst` `dst_rs` apart: every
/// element of the M×N product is written (so `dst` may start uninitialised unless
/// `accumulate`, which reads it). Needs [`available`].
#[cfg(target_arch = "x86_64")]
fn gemm(a: Operand, b: Operand, dst: &mut [MaybeUninit<f32>], dst_rs: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (mp, kp, np) =
        (m.next_multiple_of(2 * T), k.next_multiple_of(KT), n.next_multiple_of(2 * T));
    if m == 0 || n == 0 {
        return;
    }
    let (ap, bp) = (pack_a(a, mp, kp), pack_b(b, np, kp));
    let b_block = kp / 2 * T * 2;
    // One task per 32 rows of C: two A tiles against two B tiles at a time, four C tiles.
    // A task takes several 32-row blocks, so each pair of B tiles it loads serves all of them
    // from cache; enough tasks remain to keep every thread busy.
    let blocks = m.div_ceil(2 * T);
    let per_task = (blocks / (4 * rayon::current_num_threads())).clamp(1, 8);
    dst.par_chunks_mut(per_task * 2 * T * dst_rs).enumerate().for_each(|(task, c_rows)| {
        let cfg = tile_config();
        let mut acc = [0f32; 2 * T * 2 * T];
        // SAFETY: `available()` granted the tile state; every tile load reads 16 rows of 64
        // bytes inside the packed buffers (padded to whole tiles), and every store writes
        // inside `acc`.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack));
            for nb in 0..np / (2 * T) {
                let b0 = bp[2 * nb * b_block..].as_ptr();
                let b1 = bp[(2 * nb + 1) * b_block..].as_ptr();
                for local in 0..per_task {
                    let mb = task * per_task + local;
                    if mb >= blocks {
                        break;
                    }
                    let a0 = ap[mb * 2 * T * kp..].as_ptr();
                    let a1 = ap[(mb * 2 * T + T) * kp..].as_ptr();
                    std::arch::asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack)
                    );
                    for kc in 0..kp / KT {
                        std::arch::asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            "tileloadd tmm6, [{b0} + {sb}*1]",
                            "tileloadd tmm7, [{b1} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0.add(kc * T * KT),
                            a1 = in(reg) a1.add(kc * T * KT),
                            b0 = in(reg) b0.add(kc * T * T * 2),
                            b1 = in(reg) b1.add(kc * T * T * 2),
                            sa = in(reg) KT * 2,
                            sb = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                    let p = acc.as_mut_ptr();
                    std::arch::asm!(
                        "tilestored [{c00} + {s}*1], tmm0",
                        "tilestored [{c01} + {s}*1], tmm1",
                        "tilestored [{c10} + {s}*1], tmm2",
                        "tilestored [{c11} + {s}*1], tmm3",
                        c00 = in(reg) p,
                        c01 = in(reg) p.add(T),
                        c10 = in(reg) p.add(T * 2 * T),
                        c11 = in(reg) p.add(T * 2 * T + T),
                        s = in(reg) 2 * T * 4,
                        options(nostack),
                    );
                    let rows = (m - mb * 2 * T).min(2 * T);
                    let (col, cols) = (nb * 2 * T, (n - nb * 2 * T).min(2 * T));
                    for r in 0..rows {
                        let at = (local * 2 * T + r) * dst_rs + col;
                        let out = &mut c_rows[at..at + cols];
                        let tile = &acc[r * 2 * T..r * 2 * T + cols];
                        if accumulate {
                            // SAFETY: with `accumulate` the caller passed initialised memory.
                            out.iter_mut()
                                .zip(tile)
                                .for_each(|(o, t)| *o = MaybeUninit::new(o.assume_init() + t));
                        } else {
                            out.iter_mut().zip(tile).for_each(|(o, &t)| *o = MaybeUninit::new(t));
                        }
                    }
                }
            }
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    });
}

/// [`crate::ops::gemm_into`] on AMX tiles: `dst (+)= lhs · rhs`, operands by (row stride,
/// column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    (m, n, k): (usize, usize, usize), dst: &mut [MaybeUninit<f32>], dst_rs: usize,
    accumulate: bool, lhs: &[f32], (lhs_rs, lhs_cs): (usize, usize), rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let a = Operand { data: lhs, rows: m, cols: k, rs: lhs_rs, cs: lhs_cs };
    let b = Operand { data: rhs, rows: k, cols: n, rs: rhs_rs, cs: rhs_cs };
    gemm(a, b, dst, dst_rs, accumulate)
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether bf16 matmuls may run: the tiles are [`available`] and the SIMD path in use is
/// AVX-512 (`MOTRAIN_SIMD=avx2` or `portable` stands for a CPU without them, so it has no
/// tiles either).
pub fn usable() -> bool {
    available() && super::simd::level() == super::simd::Level::Avx512
}

/// Whether matmuls of f32 tensors run in bf16 on AMX tiles from now on (`run.dtype = "bf16"`
/// on the CPU), as PyTorch's `set_float32_matmul_precision("medium")` lets them; on needs
/// [`usable`].
pub fn set_enabled(on: bool) {
    ENABLED.store(on && usable(), std::sync::atomic::Ordering::Relaxed)
}

/// Whether f32 matmuls run in bf16 on AMX tiles.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::randn;
    use candle_core::Tensor;

    fn round(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| f32::from_bits((bf16(x) as u32) << 16) as f64).collect())
            .collect()
    }

    /// `a · bᵀ` on the tiles against an f64 product of the bf16-rounded operands, at sizes off
    /// every tile edge.
    #[test]
    fn products_equal_the_bf16_rounded_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX bf16 tiles");
            return;
        }
        for (m, k, n) in
            [(1, 1, 1), (5, 40, 3), (33, 70, 47), (64, 256, 96), (100, 33, 130), (700, 40, 50)]
        {
            let (a, b) = (randn(&[m, k], 1), randn(&[n, k], 2));
            let (av, bv) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            // SAFETY: without `accumulate`, gemm_into writes every element of the m×n product.
            let c = unsafe {
                written(m * n, |c| gemm_into((m, n, k), c, n, false, &av, (k, 1), &bv, (1, k)))
            };
            let (ra, rb) = (round(&a), round(&b));
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| ra[i][t] * rb[j][t]).sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m}x{k}x{n} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
