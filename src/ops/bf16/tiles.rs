//! The AMX tile engine: a 32×32 block of C as four 16×16 f32 tiles, each step two A tiles
//! (16 rows × 32 bf16) against two B tiles (16 pairs × 16 columns), `tdpbf16ps` four times.
//! The AMX intrinsics are not stable Rust, so the tile instructions are inline `asm!`.

use super::{Block, KT, T};
use std::mem::MaybeUninit;

/// The tile configuration LDTILECFG reads.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Configures this thread's tiles: palette 1, tiles 0–7 each 16 rows × 64 bytes.
///
/// # Safety
/// The process must hold the tile state ([`super::tiles_available`] asked Linux for it).
pub(crate) unsafe fn configure() {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = T as u8;
    }
    let config = TileConfig(c);
    // SAFETY: as the caller guarantees; LDTILECFG reads the 64 bytes of `config`.
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
}

/// Releases this thread's tiles.
///
/// # Safety
/// [`configure`] must have run on this thread.
pub(crate) unsafe fn release() {
    // SAFETY: as the caller guarantees.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// The block on the tiles: C starts at the `first` K block from zero, or with `add` from what
/// `direct` holds (rows `dst_rs` apart), else from `held` (where the one before left it); it
/// is left in `held` unless `last`, else stored to `direct` (returns true) when given, else to
/// `acc` (row-major, 32 wide).
///
/// # Safety
/// The tiles must be configured on this thread; with `add`, `direct` must be given and its
/// 32×32 block initialised.
pub(super) unsafe fn tiles_block(
    block: &Block, (first, last): (bool, bool), mut held: Option<&mut [f32]>,
    mut direct: Option<&mut [MaybeUninit<f32>]>, (dst_rs, add): (usize, bool),
    acc: &mut [f32; 4 * T * T],
) -> bool {
    block.check();
    let direct_quads = |d: &mut [MaybeUninit<f32>]| {
        let p = d.as_mut_ptr().cast::<f32>();
        [p, p.wrapping_add(T), p.wrapping_add(T * dst_rs), p.wrapping_add(T * dst_rs + T)]
    };
    // SAFETY: every tile load reads 16 rows of 64 bytes inside the panels (checked above),
    // `held`, or an initialised 32×32 block of `direct` (the caller's contract), and every
    // store writes inside `held`, `acc`, or a 32×32 block of `direct` (checked by the caller).
    unsafe {
        if first && add {
            let d = direct.as_deref_mut().expect("adding to C reads it from `direct`");
            c_tiles::<true>(direct_quads(d), dst_rs * 4);
        } else if first {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
        } else {
            let p = held.as_deref_mut().expect("a later K block reads what the earlier held");
            c_tiles::<true>(quarters(p.as_mut_ptr()), T * 4);
        }
        let ([a0, a1], [b0, b1]) = (block.a.map(|p| p.as_ptr()), block.b.map(|p| p.as_ptr()));
        for kc in block.steps.clone() {
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
        if !last {
            let p = held.expect("a K block before the last leaves C for the next");
            c_tiles::<false>(quarters(p.as_mut_ptr()), T * 4);
            return false;
        }
        if let Some(d) = direct {
            c_tiles::<false>(direct_quads(d), dst_rs * 4);
            return true;
        }
        // The four tiles side by side: `acc` is the 32×32 block.
        let p = acc.as_mut_ptr();
        c_tiles::<false>([p, p.add(T), p.add(T * 2 * T), p.add(T * 2 * T + T)], 2 * T * 4);
        false
    }
}

/// The four C tiles' 16×16 f32 blocks laid one after another from `p`.
fn quarters(p: *mut f32) -> [*mut f32; 4] {
    [p, p.wrapping_add(T * T), p.wrapping_add(2 * T * T), p.wrapping_add(3 * T * T)]
}

/// Loads (`LOAD`) or stores the C tiles tmm0–3 from or to the 16-row f32 blocks at `c`, their
/// rows `stride` bytes apart.
///
/// # Safety
/// The tiles must be configured, and each block's 16 rows of 64 bytes readable (load) or
/// writable (store).
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
