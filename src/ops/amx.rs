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

#[cfg(target_arch = "x86_64")]
mod pack;

#[cfg(target_arch = "x86_64")]
use super::fresh;
#[cfg(test)]
use super::written;
#[cfg(target_arch = "x86_64")]
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
    // The packing is AVX-512 with AVX512_BF16's conversion (every CPU with the tiles has
    // both, unless a hypervisor hides them).
    let packing = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    if !(amx_bf16 && amx_tile && osxsave && packing) {
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

/// f32 → bf16 as the CPU's `vcvtne2ps2bf16` converts, which the packing kernels use: rounded
/// to nearest even, a NaN made quiet, a denormal input taken as a zero of its sign.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    // Branch-free, so that packing loops vectorise.
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let denormal = b & 0x7f80_0000 == 0;
    (if nan {
        (b >> 16) | 0x40
    } else if denormal {
        (b >> 16) & 0x8000
    } else {
        rounded
    }) as u16
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
/// K per block of the tile loop: an A or B panel of two tiles' width is then 16 KiB.
const KC: usize = 256;
/// Pairs of B tiles (32 columns each) per column chunk when K has several blocks, which bounds
/// the partial sums a task keeps to `NB · per_task · 4 KiB`.
const NB: usize = 16;

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

/// Without x86-64 there are no tiles: [`available`] is false and nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
fn gemm(_: Operand, _: Operand, _: &mut [MaybeUninit<f32>], _: usize, _: bool, _: bool) {
    unreachable!("AMX tiles are x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
fn gemm_packed(_: Operand, _: &PackedB, _: &mut [MaybeUninit<f32>], _: usize, _: bool, _: bool) {
    unreachable!("AMX tiles are x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn pack_weight(_: &[f32], _: usize, _: usize, _: bool) -> (PackedB, PackedB) {
    unreachable!("AMX tiles are x86-64 only")
}

/// A B operand `[K, N]` already in the tiles' layout (see `pack`), K and N rounded up to 32.
pub(crate) struct PackedB {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

/// `dst (+)= A · B` in f32 from bf16-rounded operands, the rows of `dst` `dst_rs` apart: every
/// element of the M×N product is written (so `dst` may start uninitialised unless
/// `accumulate`, which reads it). `parallel` splits the packing and the tiles across the
/// current pool; without it all runs on the calling thread. Needs [`available`].
#[cfg(target_arch = "x86_64")]
fn gemm(
    a: Operand, b: Operand, dst: &mut [MaybeUninit<f32>], dst_rs: usize, accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (kp, np) = (k.next_multiple_of(KT), n.next_multiple_of(2 * T));
    if m == 0 || n == 0 {
        return;
    }
    let packed = PackedB { data: pack::pack_b(b, np, kp, parallel), k, n };
    gemm_packed(a, &packed, dst, dst_rs, accumulate, parallel)
}

/// A weight `W [n, k]` (row-major) packed as the B operands of both of its products: `Wᵀ`
/// for the forward `X · Wᵀ`, and `W` for the input gradient `dY · W`. Both come from one read
/// of the f32 weights, where packing each from memory on its own is most of what the bf16
/// products of a small expert cost beyond their tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) fn pack_weight(w: &[f32], n: usize, k: usize, parallel: bool) -> (PackedB, PackedB) {
    assert!(w.len() >= n * k, "pack_weight: {} values for a {n}×{k} weight", w.len());
    let wt = Operand { data: w, rows: k, cols: n, rs: 1, cs: k };
    let (kp, np) = (k.next_multiple_of(KT), n.next_multiple_of(2 * T));
    let (forward, backward) = pack::pack_b_both(wt, np, kp, parallel);
    (PackedB { data: forward, k, n }, PackedB { data: backward, k: n, n: k })
}

/// [`gemm`] with B already packed.
#[cfg(target_arch = "x86_64")]
fn gemm_packed(
    a: Operand, b: &PackedB, dst: &mut [MaybeUninit<f32>], dst_rs: usize, accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(k, b.k, "packed B: K does not match A's columns");
    let (mp, kp, np) =
        (m.next_multiple_of(2 * T), k.next_multiple_of(KT), n.next_multiple_of(2 * T));
    if m == 0 || n == 0 {
        return;
    }
    let threads = super::threads(parallel);
    let (ap, bp) = (pack::pack_a(a, mp, kp, parallel), &b.data);
    let b_block = kp / 2 * T * 2;
    // One task per 32 rows of C: two A tiles against two B tiles at a time, four C tiles.
    // A task takes several 32-row blocks, so each pair of B tiles it loads serves all of them
    // from cache; enough tasks remain to keep every thread busy.
    let blocks = m.div_ceil(2 * T);
    let per_task = (blocks / (4 * threads)).clamp(1, 8);
    // K in blocks of KC, so that the A and B panels of one block stay in L1 and L2 however
    // long K is (a weight gradient's K is every token of the batch); the four C tiles of each
    // pair of blocks wait in `partial`, in f32 exactly as the tiles hold them, between K blocks.
    let (k_steps, nb_all) = (kp / KT, np / (2 * T));
    let k_blocks = k_steps.div_ceil(KC / KT).max(1);
    let nb_chunk = if k_blocks > 1 { NB.min(nb_all) } else { nb_all };
    for_chunks(dst, per_task * 2 * T * dst_rs, parallel, |task, c_rows| {
        let cfg = tile_config();
        let mut acc = [0f32; 2 * T * 2 * T];
        // SAFETY: every slot is stored (its tiles zeroed at the first K block) before any is
        // loaded back.
        let mut partial = unsafe {
            fresh(if k_blocks > 1 { nb_chunk * per_task * 4 * T * T } else { 0 }, |_| {})
        };
        // SAFETY: `available()` granted the tile state; every tile load reads 16 rows of 64
        // bytes inside the packed buffers (padded to whole tiles) or `partial`, and every store
        // writes inside `acc`, `partial`, or a 32×32 block of `c_rows` checked to lie inside it.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack));
            for nb0 in (0..nb_all).step_by(nb_chunk) {
                let nbs = nb0..(nb0 + nb_chunk).min(nb_all);
                for kb in 0..k_blocks {
                    let steps = kb * KC / KT..((kb + 1) * KC / KT).min(k_steps);
                    for nb in nbs.clone() {
                        let b0 = bp[2 * nb * b_block..].as_ptr();
                        let b1 = bp[(2 * nb + 1) * b_block..].as_ptr();
                        for local in 0..per_task {
                            let mb = task * per_task + local;
                            if mb >= blocks {
                                break;
                            }
                            let a0 = ap[mb * 2 * T * kp..].as_ptr();
                            let a1 = ap[(mb * 2 * T + T) * kp..].as_ptr();
                            let slot = ((nb - nb0) * per_task + local) * 4 * T * T;
                            if kb == 0 {
                                std::arch::asm!(
                                    "tilezero tmm0",
                                    "tilezero tmm1",
                                    "tilezero tmm2",
                                    "tilezero tmm3",
                                    options(nostack)
                                );
                            } else {
                                let p = partial[slot..slot + 4 * T * T].as_mut_ptr();
                                c_tiles::<true>(quarters(p), T * 4);
                            }
                            for kc in steps.clone() {
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
                            if kb + 1 < k_blocks {
                                let p = partial[slot..slot + 4 * T * T].as_mut_ptr();
                                c_tiles::<false>(quarters(p), T * 4);
                                continue;
                            }
                            let rows = (m - mb * 2 * T).min(2 * T);
                            let (col, cols) = (nb * 2 * T, (n - nb * 2 * T).min(2 * T));
                            // A whole 32×32 block of C that is only written goes straight from
                            // the tiles to `dst`.
                            let first = (local * 2 * T) * dst_rs + col;
                            let last = first + (2 * T - 1) * dst_rs + 2 * T;
                            if !accumulate && rows == 2 * T && cols == 2 * T && last <= c_rows.len()
                            {
                                let p = c_rows[first..last].as_mut_ptr().cast::<f32>();
                                let quads = [p, p.add(T), p.add(T * dst_rs), p.add(T * dst_rs + T)];
                                c_tiles::<false>(quads, dst_rs * 4);
                                continue;
                            }
                            // Otherwise the four tiles side by side: `acc` is the 32×32 block.
                            let p = acc.as_mut_ptr();
                            let quads = [p, p.add(T), p.add(T * 2 * T), p.add(T * 2 * T + T)];
                            c_tiles::<false>(quads, 2 * T * 4);
                            for r in 0..rows {
                                let at = (local * 2 * T + r) * dst_rs + col;
                                let out = &mut c_rows[at..at + cols];
                                let tile = &acc[r * 2 * T..r * 2 * T + cols];
                                if accumulate {
                                    // SAFETY: with `accumulate` the caller passed initialised
                                    // memory.
                                    out.iter_mut().zip(tile).for_each(|(o, t)| {
                                        *o = MaybeUninit::new(o.assume_init() + t)
                                    });
                                } else {
                                    out.iter_mut()
                                        .zip(tile)
                                        .for_each(|(o, &t)| *o = MaybeUninit::new(t));
                                }
                            }
                        }
                    }
                }
            }
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    });
}

/// `f(index, chunk)` for each `size`-long chunk of `buf`: as rayon tasks when `parallel`, else
/// in order on this thread.
#[cfg(target_arch = "x86_64")]
fn for_chunks<E: Send>(
    buf: &mut [E], size: usize, parallel: bool, f: impl Fn(usize, &mut [E]) + Send + Sync,
) {
    if parallel {
        buf.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c))
    } else {
        buf.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c))
    }
}

/// The four C tiles' 16×16 f32 blocks laid one after another from `p`.
#[cfg(target_arch = "x86_64")]
fn quarters(p: *mut f32) -> [*mut f32; 4] {
    [p, p.wrapping_add(T * T), p.wrapping_add(2 * T * T), p.wrapping_add(3 * T * T)]
}

/// Loads (`LOAD`) or stores the C tiles tmm0–3 from or to the 16-row f32 blocks at `c`, their
/// rows `stride` bytes apart.
///
/// # Safety
/// The tiles must be configured, and each block's 16 rows of 64 bytes readable (load) or
/// writable (store).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn c_tiles<const LOAD: bool>(c: [*mut f32; 4], stride: usize) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if LOAD {
            std::arch::asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
                s = in(reg) stride,
                options(nostack, readonly),
            );
        } else {
            std::arch::asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
                s = in(reg) stride,
                options(nostack),
            );
        }
    }
}

/// [`crate::ops::gemm_into`] on AMX tiles: `dst (+)= lhs · rhs`, operands by (row stride,
/// column stride), split across the current pool when `parallel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    (m, n, k): (usize, usize, usize), dst: &mut [MaybeUninit<f32>], dst_rs: usize,
    accumulate: bool, lhs: &[f32], (lhs_rs, lhs_cs): (usize, usize), rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize), parallel: bool,
) {
    let a = Operand { data: lhs, rows: m, cols: k, rs: lhs_rs, cs: lhs_cs };
    let b = Operand { data: rhs, rows: k, cols: n, rs: rhs_rs, cs: rhs_cs };
    gemm(a, b, dst, dst_rs, accumulate, parallel)
}

/// [`gemm_into`] with the right operand packed ([`pack_weight`]): `dst (+)= lhs · B`, where
/// `lhs` is `[m, B's K]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_packed_into(
    m: usize, dst: &mut [MaybeUninit<f32>], dst_rs: usize, accumulate: bool, lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize), b: &PackedB, parallel: bool,
) {
    let a = Operand { data: lhs, rows: m, cols: b.k, rs: lhs_rs, cs: lhs_cs };
    gemm_packed(a, b, dst, dst_rs, accumulate, parallel)
}

impl PackedB {
    /// `(K, N)` of the operand, before rounding.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
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
        for (m, k, n) in [
            (1, 1, 1),
            (5, 40, 3),
            (33, 70, 47),
            (64, 256, 96),
            (100, 33, 130),
            (700, 40, 50),
            (64, 600, 40),
            (40, 300, 600),
        ] {
            let (a, b) = (randn(&[m, k], 1), randn(&[n, k], 2));
            let (av, bv) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let (ra, rb) = (round(&a), round(&b));
            let product = |parallel| {
                // SAFETY: without `accumulate`, gemm_into writes every element of the product.
                unsafe {
                    written(m * n, |c| {
                        gemm_into((m, n, k), c, n, false, &av, (k, 1), &bv, (1, k), parallel)
                    })
                }
            };
            let c = product(true);
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
            // On one thread: the same sums in the same order.
            assert_eq!(product(false), c, "{m}x{k}x{n} on one thread");
        }
    }
}
