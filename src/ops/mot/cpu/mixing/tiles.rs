//! Merge's backward through the softmax and the controller ([`mix_backward`]) on AMX tiles,
//! for bf16 runs on the tiles engine: the `[16, d]` rows a position reads are rounded to bf16
//! as they are packed (the layouts and rounding of `ops::bf16`), and the products accumulate
//! in f32, as every other matmul of such a run. Its four products are small (K is d, the 2·16
//! terms of `dx`, or the 16 members), so each position packs straight from the rows it reads,
//! and a tile of C is one `tdpbf16ps` per 32 of K.
//!
//! Only this kernel moved: in f32 it was the one bound by its multiply-adds (as fast warm as in
//! a step). Merge, emit and emit's backward do one or two products for as many bytes and were
//! as fast or faster in f32 (README, "MoT and MoE top-1 against dense").
//!
//! Groups and experts are at most 16 here ([`fits`]), d a multiple of 32: a tile's 16 rows
//! hold a group's members or the experts, padded with zeros.

use super::{run_mix_tasks, softmax_backward, stream_copy, Task};
use crate::ops::bf16::kit::{self, load, neighbours, pairs, transpose};
use std::arch::asm;
use std::arch::x86_64::*;

/// Rows of a tile, and its columns of f32 (or of bf16 pairs).
pub(super) const T: usize = 16;

/// One tile of bf16: 16 rows of 64 bytes, on a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Tile([u16; 2 * T * T]);

impl Tile {
    pub(super) const ZERO: Tile = Tile([0; 2 * T * T]);

    #[inline(always)]
    fn row(&mut self, r: usize) -> *mut u16 {
        self.0[r * 2 * T..][..2 * T].as_mut_ptr()
    }
}

/// Whether groups of `g` over `e` experts, rows of `d`, run on the tiles.
pub(super) fn fits(d: usize, e: usize, g: usize) -> bool {
    d > 0 && d.is_multiple_of(32) && (1..=T).contains(&e) && (1..=T).contains(&g)
}

/// The group's members (at most 16 rows of `d` floats) in both layouts their products read,
/// from one load of each: as the A operand of a product along `d` (`along[t]` holds
/// `rows[i][32t..32t + 32]` in row `i`), and as rows 0..8 of the B operands of a weighted sum
/// over the members ([`terms_along_k`]'s layout, in `pairs`). Rows past `rows.len()` are
/// zeros.
///
/// # Safety
/// The CPU must have AVX-512 F/BW and AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn members(rows: &[&[f32]], along: &mut [Tile], pairs_of: &mut [Tile]) {
    let half = |r: usize, at: usize| match rows.get(r) {
        Some(row) => load(&row[at..]),
        None => _mm512_setzero_ps(),
    };
    for j in 0..rows.len().div_ceil(2) {
        for t in 0..along.len() {
            let (a0, a1) = (half(2 * j, 32 * t), half(2 * j, 32 * t + 16));
            let (b0, b1) = (half(2 * j + 1, 32 * t), half(2 * j + 1, 32 * t + 16));
            // SAFETY: a tile row is 64 bytes on a 64-byte boundary.
            unsafe {
                _mm512_store_si512(along[t].row(2 * j).cast(), neighbours(a0, a1));
                _mm512_store_si512(along[t].row(2 * j + 1).cast(), neighbours(b0, b1));
                _mm512_store_si512(pairs_of[2 * t].row(j).cast(), pairs(a0, b0));
                _mm512_store_si512(pairs_of[2 * t + 1].row(j).cast(), pairs(a1, b1));
            }
        }
    }
}

/// The merged tokens' rows (at most 16 of `d` floats) in both layouts their products read,
/// from one load of each: as the B operand of a product along `d` (`across[t]` holds, in row
/// `j`, the pairs `(rows[n][32t + 2j], rows[n][32t + 2j + 1])` of every row `n`), and as rows
/// 0..8 of the B operands of a weighted sum over them ([`terms_along_k`]'s layout, in
/// `pairs`). Rows past `rows.len()` are zeros.
///
/// # Safety
/// As [`members`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn merged(rows: &[&[f32]], across: &mut [Tile], pairs_of: &mut [Tile]) {
    for t in 0..across.len() {
        let (mut lo, mut hi) = ([_mm512_setzero_ps(); T], [_mm512_setzero_ps(); T]);
        let mut v = [_mm512_setzero_si512(); T];
        for (n, row) in rows.iter().enumerate() {
            (lo[n], hi[n]) = (load(&row[32 * t..]), load(&row[32 * t + 16..]));
            v[n] = neighbours(lo[n], hi[n]);
        }
        for (j, row) in transpose(v).into_iter().enumerate() {
            // SAFETY: a tile row is 64 bytes on a 64-byte boundary.
            unsafe { _mm512_store_si512(across[t].row(j).cast(), row) };
        }
        for j in 0..rows.len().div_ceil(2) {
            // SAFETY: as above.
            unsafe {
                _mm512_store_si512(pairs_of[2 * t].row(j).cast(), pairs(lo[2 * j], lo[2 * j + 1]));
                _mm512_store_si512(
                    pairs_of[2 * t + 1].row(j).cast(),
                    pairs(hi[2 * j], hi[2 * j + 1]),
                );
            }
        }
    }
}

/// `terms` (at most 16 rows of `d` floats) as rows `first..first + 8` of the B operands of a
/// weighted sum of them: tile `c` holds, in row `first + j`, the pairs `(terms[2j][16c + n],
/// terms[2j + 1][16c + n])` of the 16 columns `n` (zeros past `terms.len()`).
///
/// # Safety
/// As [`members`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn terms_along_k(terms: &[&[f32]], first: usize, out: &mut [Tile]) {
    let term = |k: usize, c: usize| match terms.get(k) {
        Some(row) => load(&row[16 * c..]),
        None => _mm512_setzero_ps(),
    };
    for j in 0..terms.len().div_ceil(2) {
        for (c, tile) in out.iter_mut().enumerate() {
            let v = pairs(term(2 * j, c), term(2 * j + 1, c));
            // SAFETY: a tile row is 64 bytes on a 64-byte boundary.
            unsafe { _mm512_store_si512(tile.row(first + j).cast(), v) };
        }
    }
}

/// A tile of coefficients: row `r` holds `lo(r)` then `hi(r)` (16 floats each, as bf16), for
/// the rows `r < rows`; later rows keep what they hold.
///
/// # Safety
/// As [`members`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn coefficients(
    rows: usize, lo: impl Fn(usize) -> __m512, hi: impl Fn(usize) -> __m512, out: &mut Tile,
) {
    for r in 0..rows {
        // SAFETY: a tile row is 64 bytes on a 64-byte boundary.
        unsafe { _mm512_store_si512(out.row(r).cast(), neighbours(lo(r), hi(r))) };
    }
}

/// Columns of a `[16, 16]` row-major f32 block (`m[i·16 + j]`), each as 16 floats: lane `i` of
/// column `j` is `m[i·16 + j]`. For a coefficient tile along the other dimension.
///
/// # Safety
/// As [`members`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn columns(m: &[f32; T * T]) -> [__m512; T] {
    let mut rows = [_mm512_setzero_si512(); T];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = _mm512_castps_si512(load(&m[i * T..]));
    }
    let mut out = [_mm512_setzero_ps(); T];
    for (o, c) in out.iter_mut().zip(transpose(rows)) {
        *o = _mm512_castsi512_ps(c);
    }
    out
}

/// `out [16, 16] = a · b`, summed over the tiles of `a` and `b` (a product along d): the even
/// tiles into one C tile and the odd ones into another, added at the end, since each
/// `tdpbf16ps` into a C tile waits for the one before it.
///
/// # Safety
/// The tiles must be configured on this thread (`bf16::kit::configure`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dots(a: &[Tile], b: &[Tile], out: &mut [f32; T * T]) {
    let mut odd = [0f32; T * T];
    // SAFETY: each load reads one tile (16 rows of 64 bytes), the stores write `out`'s and
    // `odd`'s 1 KiB.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm3", options(nostack, nomem));
        for (a, b) in a.chunks(2).zip(b.chunks(2)) {
            asm!(
                "tileloadd tmm1, [{a} + {s}*1]",
                "tileloadd tmm2, [{b} + {s}*1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                a = in(reg) a[0].0.as_ptr(),
                b = in(reg) b[0].0.as_ptr(),
                s = in(reg) 64usize,
                options(nostack, readonly),
            );
            if let (Some(a), Some(b)) = (a.get(1), b.get(1)) {
                asm!(
                    "tileloadd tmm4, [{a} + {s}*1]",
                    "tileloadd tmm5, [{b} + {s}*1]",
                    "tdpbf16ps tmm3, tmm4, tmm5",
                    a = in(reg) a.0.as_ptr(),
                    b = in(reg) b.0.as_ptr(),
                    s = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
        asm!(
            "tilestored [{o} + {s}*1], tmm0",
            "tilestored [{p} + {s}*1], tmm3",
            o = in(reg) out.as_mut_ptr(),
            p = in(reg) odd.as_mut_ptr(),
            s = in(reg) 64usize,
            options(nostack),
        );
    }
    out.iter_mut().zip(odd).for_each(|(o, v)| *o += v);
}

/// `out[r][16c..16c + 16] (+)= a · b[c]` for every tile `b[c]` (a weighted sum: K is the 32
/// coefficients of `a`'s rows), `out`'s 16 rows `stride` floats apart; `ADD` adds to what
/// `out` holds, else overwrites it.
///
/// # Safety
/// The tiles must be configured on this thread, `b` must hold an even number of tiles, and
/// `out` 15 · `stride` + 16 · `b.len()` floats.
pub(super) unsafe fn weighted<const ADD: bool>(
    a: &Tile, b: &[Tile], out: &mut [f32], stride: usize,
) {
    assert!(b.len().is_multiple_of(2) && out.len() >= (T - 1) * stride + T * b.len());
    let s = stride * 4;
    // SAFETY: as the caller guarantees, and checked above: each C tile is 16 rows of 64 bytes
    // inside `out`.
    unsafe {
        asm!("tileloadd tmm1, [{a} + {s}*1]", a = in(reg) a.0.as_ptr(), s = in(reg) 64usize,
             options(nostack, readonly));
        for (c, pair) in b.chunks_exact(2).enumerate() {
            let o0 = out.as_mut_ptr().add(2 * c * T);
            let o1 = o0.add(T);
            if ADD {
                asm!(
                    "tileloadd tmm0, [{o0} + {s}*1]",
                    "tileloadd tmm3, [{o1} + {s}*1]",
                    o0 = in(reg) o0, o1 = in(reg) o1, s = in(reg) s,
                    options(nostack, readonly),
                );
            } else {
                asm!("tilezero tmm0", "tilezero tmm3", options(nostack, nomem));
            }
            asm!(
                "tileloadd tmm2, [{b0} + {k}*1]",
                "tileloadd tmm4, [{b1} + {k}*1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                "tdpbf16ps tmm3, tmm1, tmm4",
                "tilestored [{o0} + {s}*1], tmm0",
                "tilestored [{o1} + {s}*1], tmm3",
                b0 = in(reg) pair[0].0.as_ptr(), b1 = in(reg) pair[1].0.as_ptr(),
                k = in(reg) 64usize, o0 = in(reg) o0, o1 = in(reg) o1, s = in(reg) s,
                options(nostack),
            );
        }
    }
}

/// [`super::mix_backward`] on the tiles: the same tasks and partial sums (so the bits
/// do not depend on the number of threads either), the products in bf16 from rows rounded as
/// they are packed, the softmax's backward in f32.
///
/// # Safety
/// The CPU must have AMX tiles this process may use (`bf16::tiles_available`), and the shapes
/// must [`fits`].
pub(super) unsafe fn mix_backward(
    dm: &[f32], x: &[f32], w: &[f32], from_emit: Option<&[f32]>, c: &[f32],
    (b, s, d, e, g): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    assert!(fits(d, e, g));
    let (k, kc, nc) = (b / g, d / 32, d / 16);
    // SAFETY: every member's row of dx is copied from the tiles' result at each position, and
    // each task writes its whole partial at its end; the tiles are configured on the task's
    // thread before use and released after (the caller guarantees the CPU has them).
    unsafe {
        run_mix_tasks(
            (b, s, d, e, g),
            #[inline(always)]
            |t: Task, dxs: &mut [&mut [f32]], partial: &mut [&mut [f32]]| {
                kit::configure();
                // dw: the members along d (A) against the merged tokens' gradients (B).
                let (mut xa, mut dmb) = (vec![Tile::ZERO; kc], vec![Tile::ZERO; kc]);
                // dx's 32 terms: dm's rows in tile rows 0..8, the controller's in 8..16.
                let mut terms = vec![Tile::ZERO; nc];
                let c_rows: Vec<&[f32]> = c.chunks_exact(d).collect();
                terms_along_k(&c_rows, T / 2, &mut terms);
                // dc's terms: the members, in tile rows 0..8 (K is the 16 members).
                let mut member_terms = vec![Tile::ZERO; nc];
                let (mut coef_dx, mut coef_dc) = (Tile::ZERO, Tile::ZERO);
                let mut dz = [0f32; T * T];
                let (mut staged, mut dc) = (vec![0f32; T * d], vec![0f32; T * d]);
                let mut total = vec![0f32; e];
                let (mut xs, mut dms): ([&[f32]; T], [&[f32]; T]) = ([&[]; T], [&[]; T]);
                for ds in 0..t.positions {
                    let n = t.kk * s + t.s0 + ds;
                    let row = |i: usize| (t.kk * g + i) * s + t.s0 + ds;
                    for (i, r) in xs.iter_mut().take(g).enumerate() {
                        *r = &x[row(i) * d..][..d];
                    }
                    for (ex, r) in dms.iter_mut().take(e).enumerate() {
                        *r = &dm[(ex * k * s + n) * d..][..d];
                    }
                    // dw: the members along d (A) against the merged tokens' gradients (B).
                    members(&xs[..g], &mut xa, &mut member_terms);
                    merged(&dms[..e], &mut dmb, &mut terms);
                    dots(&xa, &dmb, &mut dz);
                    let w_of = |i: usize| &w[row(i) * e..][..e];
                    let emit_of = |i: usize| from_emit.map(|de| &de[row(i) * e..][..e]);
                    softmax_backward(&mut dz, T, (g, e), w_of, emit_of, &mut total);
                    // dx_i = Σ_e w[i, e]·dm_e + Σ_e dz[i, e]·c_e.
                    coefficients(g, |i| load(w_of(i)), |i| load(&dz[i * T..][..e]), &mut coef_dx);
                    weighted::<false>(&coef_dx, &terms, &mut staged, d);
                    for (i, out) in dxs.iter_mut().enumerate() {
                        stream_copy(&mut out[ds * d..(ds + 1) * d], &staged[i * d..][..d]);
                    }
                    // dc_e += Σ_i dz[i, e]·x_i.
                    let dz_of = columns(&dz);
                    coefficients(e, |ex| dz_of[ex], |_| _mm512_setzero_ps(), &mut coef_dc);
                    weighted::<true>(&coef_dc, &member_terms, &mut dc, d);
                }
                partial[0].copy_from_slice(&dc[..e * d]);
                kit::release();
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{group_softmax, mix_backward as mix_backward_f32, simd};
    use super::*;

    fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let t = crate::ops::testing::randn(&[n], seed);
        t.to_vec1::<f32>().unwrap().into_iter().map(|v| v * scale).collect()
    }

    /// ‖a − b‖ / ‖b‖, which bf16's rounding of the operands (8 bits) keeps near 3e-3.
    fn rel(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let (mut num, mut den) = (0f64, 0f64);
        for (&a, &b) in a.iter().zip(b) {
            num += ((a - b) as f64).powi(2);
            den += (b as f64).powi(2);
        }
        (num / den).sqrt()
    }

    /// Merge's backward on the tiles against the f32 kernel (this test never turns a run's
    /// bf16 on, so that one stays f32), with and without emit's weight gradient, on shapes with
    /// fewer members and experts than a tile's 16 rows, odd ones included; and the same bits on
    /// one thread and on three.
    #[test]
    fn mix_backward_on_tiles_matches_f32_within_bf16_rounding() {
        if !crate::ops::bf16::tiles_available() || simd::level() != simd::Level::Avx512 {
            eprintln!("skipped: this CPU has no AMX tiles");
            return;
        }
        let shapes =
            [(32, 8, 256, 16, 16), (6, 5, 64, 7, 3), (16, 3, 32, 16, 16), (4, 9, 96, 5, 4)];
        for (i, &(b, s, d, e, g)) in shapes.iter().enumerate() {
            let dims = (b, s, d, e, g);
            let seed = 100 + 10 * i as u64;
            let x = randn(b * s * d, seed, 1.0);
            let c = randn(e * d, seed + 1, 0.1);
            let z: Vec<f32> = (0..b * s)
                .flat_map(|r| {
                    let xr = &x[r * d..][..d];
                    (0..e).map(|ex| xr.iter().zip(&c[ex * d..][..d]).map(|(a, b)| a * b).sum())
                })
                .collect();
            let w = group_softmax(&z, b, s, e, g);
            let dm = randn(e * (b / g) * s * d, seed + 2, 1.0);
            let from_emit = randn(b * s * e, seed + 3, 1.0);
            for de in [Some(&from_emit[..]), None] {
                let want = mix_backward_f32(&dm, &x, &w, de, &c, dims);
                // SAFETY: this CPU has the tiles (checked above) and the shapes fit.
                let got = || unsafe { mix_backward(&dm, &x, &w, de, &c, dims) };
                let first = got();
                let (dx, what) = (b * s * d, format!("{dims:?} from emit: {}", de.is_some()));
                let (rx, rc) = (rel(&first[..dx], &want[..dx]), rel(&first[dx..], &want[dx..]));
                assert!(rx < 5e-3 && rc < 5e-3, "{what}: dx {rx}, dc {rc}");
                for threads in [1, 3] {
                    let pool =
                        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    assert!(pool.install(got) == first, "{what}: other bits on {threads} threads");
                }
            }
        }
    }
}
