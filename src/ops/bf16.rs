//! bf16 matmuls for `run.dtype = "bf16"` on the CPU: operands are f32 tensors (the master
//! weights and activations), rounded to bf16 as they are packed; products accumulate in f32 and
//! come out in f32. Two engines read the same packed operands, chosen at run time ([`engine`]):
//! - Intel's AMX tiles (Sapphire Rapids and newer), 16×32 by 32×16 bf16 products an instruction;
//! - AVX512_BF16's `vdpbf16ps` (AMD Zen 4 and newer; Intel Cooper Lake), a pair of bf16
//!   products a lane. On Zen 4 it issues as often as an f32 FMA, so it does twice the work;
//!   on Intel cores it issues half as often and is no faster than f32 (see README).
//!
//! Results of 1 MiB or more, and weight gradients, are written by streaming stores
//! ([`super::Store`]).
//!
//! This module owns the packing (`pack`) and the loop over blocks of C that both engines share;
//! `tiles` and `dot` are the engines' inner kernels, `engine` the choice between them.
//! `Linear` reaches this module through [`super::linear`], whose product dispatches here.

// Off x86-64 nothing reaches the packing and the kernels ([`engine`] is None).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
mod dot;
mod engine;
#[cfg(target_arch = "x86_64")]
mod pack;
#[cfg(target_arch = "x86_64")]
mod tiles;

/// For other kernels that run small products on the tiles (`ops::mot`'s mixing in bf16 runs):
/// the tile configuration and the packing's conversions to the tiles' layouts.
#[cfg(target_arch = "x86_64")]
pub(crate) mod kit {
    pub(crate) use super::pack::x86::{load, neighbours, pairs, transpose};
    pub(crate) use super::tiles::{configure, release};
}

pub use engine::{
    dot_available, enabled, engine, engines, select, set_enabled, tiles_available, usable,
    with_engine, Engine, ENV,
};

#[cfg(target_arch = "x86_64")]
use super::fresh;
#[cfg(test)]
use super::written;
use super::Store;
#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;
use std::mem::MaybeUninit;
#[cfg(target_arch = "x86_64")]
use std::sync::Mutex;

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
/// 32-row blocks of C a task takes at most.
const TASK_BLOCKS: usize = 8;
/// Elements of C (1 MiB) from which [`Store::Set`] streams: a result this large has left the
/// core's cache before the next op reads it, so a plain store only adds a read of each line
/// (measured on AMX: bench-dense bf16 +7 % tokens/s, bench-mot +8 %).
const STREAM_FROM: usize = 1 << 18;

/// Without x86-64 there is no bf16 engine: [`engine`] is None and nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
fn gemm(
    _: Operand, _: Operand, _: &mut [MaybeUninit<f32>], _: usize, _: Store, _: bool,
) -> Option<f64> {
    unreachable!("the bf16 engines are x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
fn gemm_packed(
    _: Operand, _: &PackedB, _: &mut [MaybeUninit<f32>], _: usize, _: Store, _: bool,
) -> Option<f64> {
    unreachable!("the bf16 engines are x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn pack_weight(_: &[f32], _: usize, _: usize, _: bool) -> (PackedB, PackedB) {
    unreachable!("the bf16 engines are x86-64 only")
}

/// A B operand `[K, N]` already in the tiles' layout (see `pack`), K and N rounded up to 32.
pub(crate) struct PackedB {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

/// `dst (+)= A · B` in f32 from bf16-rounded operands, the rows of `dst` `dst_rs` apart: every
/// element of the M×N product is written (so `dst` may start uninitialised short of
/// [`Store::Add`], which reads it). `parallel` splits the packing and the tiles across the
/// current pool; without it all runs on the calling thread. Needs an [`engine`].
///
/// With [`Store::Stream`] (a weight gradient) it returns `Σ C²`, counted on the way out (see
/// [`super::squares`]): in f32 within each 32×32 block of C, then in f64 in the order of the
/// blocks, so the same whatever the tasks; None with other stores.
#[cfg(target_arch = "x86_64")]
fn gemm(
    a: Operand, b: Operand, dst: &mut [MaybeUninit<f32>], dst_rs: usize, store: Store,
    parallel: bool,
) -> Option<f64> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (kp, np) = (k.next_multiple_of(KT), n.next_multiple_of(2 * T));
    if m == 0 || n == 0 {
        return (store == Store::Stream).then_some(0.0);
    }
    let packed = PackedB { data: pack::pack_b(b, np, kp, parallel), k, n };
    gemm_packed(a, &packed, dst, dst_rs, store, parallel)
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
    a: Operand, b: &PackedB, dst: &mut [MaybeUninit<f32>], dst_rs: usize, store: Store,
    parallel: bool,
) -> Option<f64> {
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(k, b.k, "packed B: K does not match A's columns");
    let (mp, kp, np) =
        (m.next_multiple_of(2 * T), k.next_multiple_of(KT), n.next_multiple_of(2 * T));
    let count = store == Store::Stream;
    if m == 0 || n == 0 {
        return count.then_some(0.0);
    }
    let engine = engine().expect("bf16 products run only where an engine is (`usable`)");
    let store = match store {
        Store::Set if m * n >= STREAM_FROM => Store::Stream,
        store => store,
    };
    let threads = super::threads(parallel);
    let (ap, bp) = (pack::pack_a(a, mp, kp, parallel), &b.data);
    let b_block = kp / 2 * T * 2;
    // One task per 32 rows of C: two A tiles against two B tiles at a time, four C tiles.
    // A task takes several 32-row blocks, so each pair of B tiles it loads serves all of them
    // from cache; enough tasks remain to keep every thread busy.
    let blocks = m.div_ceil(2 * T);
    let per_task = (blocks / (4 * threads)).clamp(1, TASK_BLOCKS);
    // K in blocks of KC, so that the A and B panels of one block stay in L1 and L2 however
    // long K is (a weight gradient's K is every token of the batch); each 32×32 block of C
    // waits in `partial`, in f32, between K blocks.
    let (k_steps, nb_all) = (kp / KT, np / (2 * T));
    let k_blocks = k_steps.div_ceil(KC / KT).max(1);
    let nb_chunk = if k_blocks > 1 { NB.min(nb_all) } else { nb_all };
    // With `count`: Σ C² of each 32-row block, along N in order.
    let squares = Mutex::new(vec![0f64; if count { blocks } else { 0 }]);
    for_chunks(dst, per_task * 2 * T * dst_rs, parallel, |task, c_rows| {
        let mut acc = [0f32; 4 * T * T];
        // With `count`: this task's 32-row blocks' Σ C².
        let mut my_squares = [0f64; TASK_BLOCKS];
        // SAFETY: every slot is stored (zeroed at the first K block) before any is read.
        let mut partial = unsafe {
            fresh(if k_blocks > 1 { nb_chunk * per_task * 4 * T * T } else { 0 }, |_| {})
        };
        if engine == Engine::Tiles {
            // SAFETY: `tiles_available()` granted the tile state.
            unsafe { tiles::configure() };
        }
        for nb0 in (0..nb_all).step_by(nb_chunk) {
            let nbs = nb0..(nb0 + nb_chunk).min(nb_all);
            for kb in 0..k_blocks {
                let steps = kb * KC / KT..((kb + 1) * KC / KT).min(k_steps);
                for nb in nbs.clone() {
                    let b_tiles = [&bp[2 * nb * b_block..], &bp[(2 * nb + 1) * b_block..]];
                    for (local, squares) in my_squares.iter_mut().enumerate().take(per_task) {
                        let mb = task * per_task + local;
                        if mb >= blocks {
                            break;
                        }
                        let a_tiles =
                            [&ap[mb * 2 * T * kp..], &ap[(mb * 2 * T + T) * kp..][..T * kp]];
                        let slot = ((nb - nb0) * per_task + local) * 4 * T * T;
                        let block = Block { a: a_tiles, b: b_tiles, steps: steps.clone() };
                        let (first, last) = (kb == 0, kb + 1 == k_blocks);
                        let (rows, col) = ((m - mb * 2 * T).min(2 * T), nb * 2 * T);
                        let cols = (n - col).min(2 * T);
                        let at = local * 2 * T * dst_rs + col;
                        // The C block after the last K block, where it is (None: written).
                        let done: Option<&[f32]> = match engine {
                            Engine::Tiles => {
                                let held =
                                    (k_blocks > 1).then(|| &mut partial[slot..][..4 * T * T]);
                                let whole = rows == 2 * T
                                    && cols == 2 * T
                                    && at + (2 * T - 1) * dst_rs + 2 * T <= c_rows.len();
                                // Tiles store plainly: a streamed C goes by `acc`. They add
                                // to a whole block of C by starting from it, where `acc` and
                                // a pass of adds cost a second trip through the cache (MoT's
                                // experts' input gradient, the second stack's product:
                                // bench-mot bf16 ~2 ms a step).
                                let add = whole && store == Store::Add;
                                let direct = (whole && (store == Store::Set || add))
                                    .then(|| &mut c_rows[at..]);
                                // SAFETY: the tiles are configured on this thread (above);
                                // with `Store::Add` the caller passed C initialised.
                                let stored = unsafe {
                                    tiles::tiles_block(
                                        &block,
                                        (first, last),
                                        held,
                                        direct,
                                        (dst_rs, add),
                                        &mut acc,
                                    )
                                };
                                (last && !stored).then_some(&acc[..])
                            }
                            Engine::Dot => {
                                let c = if k_blocks > 1 {
                                    &mut partial[slot..][..4 * T * T]
                                } else {
                                    &mut acc[..]
                                };
                                let c: &mut [f32; 4 * T * T] = c.try_into().expect("a C block");
                                // SAFETY: `dot_available()`, which `engine()` checked.
                                unsafe { dot::dot_block(&block, !first, c) };
                                last.then_some(&c[..])
                            }
                        };
                        if let Some(c) = done {
                            write_block(c, rows, cols, &mut c_rows[at..], dst_rs, store);
                            if count {
                                // SAFETY: the CPU has AVX-512 (every bf16 engine needs it).
                                *squares += unsafe { block_squares(c, rows, cols) };
                            }
                        }
                    }
                }
            }
        }
        if engine == Engine::Tiles {
            // SAFETY: the tiles were configured above.
            unsafe { tiles::release() };
        }
        if store == Store::Stream {
            super::stream_fence();
        }
        if count {
            let first = task * per_task;
            let mine = first..(first + per_task).min(blocks);
            let mut squares = squares.lock().unwrap_or_else(|e| e.into_inner());
            squares[mine.clone()].copy_from_slice(&my_squares[..mine.len()]);
        }
    });
    count.then(|| squares.into_inner().unwrap_or_else(|e| e.into_inner()).iter().sum())
}

/// `Σ c²` over the top-left `rows × cols` of a 32×32 block (`acc`, row-major): in f32 lanes, one
/// per column, each over at most 32 rows; their sum in f64.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_squares(acc: &[f32], rows: usize, cols: usize) -> f64 {
    use std::arch::x86_64::*;
    let acc = &acc[..rows * 2 * T];
    let mask = |from: usize| ((1u32 << cols.saturating_sub(from).min(T)) - 1) as u16;
    let (m0, m1) = (mask(0), mask(T));
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for row in acc.chunks_exact(2 * T) {
        // SAFETY: each masked load reads within the row's 32 floats.
        let (a, b) = unsafe {
            (_mm512_maskz_loadu_ps(m0, row.as_ptr()), _mm512_maskz_loadu_ps(m1, row[T..].as_ptr()))
        };
        s0 = _mm512_fmadd_ps(a, a, s0);
        s1 = _mm512_fmadd_ps(b, b, s1);
    }
    let wide = |s: __m512| {
        _mm512_add_pd(
            _mm512_cvtps_pd(_mm512_castps512_ps256(s)),
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)))),
        )
    };
    _mm512_reduce_add_pd(_mm512_add_pd(wide(s0), wide(s1)))
}

/// One 32×32 block of C over some of K's steps: the two A tiles' panels (32 rows), the two B
/// tiles' panels (32 columns), as packed.
#[cfg(target_arch = "x86_64")]
struct Block<'a> {
    a: [&'a [u16]; 2],
    b: [&'a [u16]; 2],
    steps: std::ops::Range<usize>,
}

#[cfg(target_arch = "x86_64")]
impl Block<'_> {
    /// Every tile the steps read lies inside the panels.
    fn check(&self) {
        let end = self.steps.end;
        assert!(self.a.iter().all(|p| p.len() >= end * T * KT), "A panel too short");
        assert!(self.b.iter().all(|p| p.len() >= end * T * T * 2), "B panel too short");
    }
}

/// The top-left `rows × cols` of a 32×32 block (`acc`, row-major) into `c` (rows `dst_rs`
/// apart), as `store` says ([`Store::Add`] needs `c` initialised).
#[cfg(target_arch = "x86_64")]
fn write_block(
    acc: &[f32], rows: usize, cols: usize, c: &mut [MaybeUninit<f32>], dst_rs: usize, store: Store,
) {
    for r in 0..rows {
        let out = &mut c[r * dst_rs..][..cols];
        let tile = &acc[r * 2 * T..][..cols];
        match store {
            // SAFETY: with `Store::Add` the caller passed initialised memory.
            Store::Add => out
                .iter_mut()
                .zip(tile)
                .for_each(|(o, t)| *o = MaybeUninit::new(unsafe { o.assume_init() } + t)),
            Store::Stream => {
                // SAFETY: as in `fresh`: f32 has no invalid bit patterns, and `stream_copy`
                // writes every element and reads none.
                let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
                super::stream_copy(out, tile)
            }
            Store::Set => out.iter_mut().zip(tile).for_each(|(o, &t)| *o = MaybeUninit::new(t)),
        }
    }
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

/// [`crate::ops::gemm_into`] in bf16: `dst (+)= lhs · rhs`, operands by (row stride,
/// column stride), split across the current pool when `parallel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    (m, n, k): (usize, usize, usize), dst: &mut [MaybeUninit<f32>], dst_rs: usize, store: Store,
    lhs: &[f32], (lhs_rs, lhs_cs): (usize, usize), rhs: &[f32], (rhs_rs, rhs_cs): (usize, usize),
    parallel: bool,
) -> Option<f64> {
    let a = Operand { data: lhs, rows: m, cols: k, rs: lhs_rs, cs: lhs_cs };
    let b = Operand { data: rhs, rows: k, cols: n, rs: rhs_rs, cs: rhs_cs };
    gemm(a, b, dst, dst_rs, store, parallel)
}

/// [`gemm_into`] with the right operand packed ([`pack_weight`]): `dst (+)= lhs · B`, where
/// `lhs` is `[m, B's K]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_packed_into(
    m: usize, dst: &mut [MaybeUninit<f32>], dst_rs: usize, store: Store, lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize), b: &PackedB, parallel: bool,
) -> Option<f64> {
    let a = Operand { data: lhs, rows: m, cols: b.k, rs: lhs_rs, cs: lhs_cs };
    gemm_packed(a, b, dst, dst_rs, store, parallel)
}

impl PackedB {
    /// `(K, N)` of the operand, before rounding.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
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
        if engines().is_empty() {
            eprintln!("skipped: this CPU has no bf16 dot product");
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
            (520, 40, 520), // past STREAM_FROM: set by streaming stores
        ] {
            let (a, b) = (randn(&[m, k], 1), randn(&[n, k], 2));
            let (av, bv) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let (ra, rb) = (round(&a), round(&b));
            let product = |parallel, store| {
                let mut sum = None;
                // SAFETY: short of `Store::Add`, gemm_into writes every element of the product.
                let c = unsafe {
                    written(m * n, |c| {
                        sum = gemm_into((m, n, k), c, n, store, &av, (k, 1), &bv, (1, k), parallel)
                    })
                };
                (c, sum)
            };
            let onto_ones = || {
                let mut c = vec![MaybeUninit::new(1f32); m * n];
                gemm_into((m, n, k), &mut c, n, Store::Add, &av, (k, 1), &bv, (1, k), true);
                // SAFETY: initialised above, and only added to.
                c.into_iter().map(|x| unsafe { x.assume_init() }).collect::<Vec<f32>>()
            };
            for engine in engines() {
                let ((c, set_sum), one_thread, streamed, streamed_alone, added) =
                    with_engine(engine, || {
                        (
                            product(true, Store::Set),
                            product(false, Store::Set).0,
                            product(true, Store::Stream),
                            product(false, Store::Stream),
                            onto_ones(),
                        )
                    });
                let e = engine.name();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|t| ra[i][t] * rb[j][t]).sum();
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{e} {m}x{k}x{n} ({i},{j}): {got} vs {want}"
                        );
                        let got = added[i * n + j] as f64;
                        assert!(
                            (got - want - 1.0).abs() <= 1e-5 * (2.0 + want.abs()),
                            "{e} {m}x{k}x{n} ({i},{j}) onto 1: {got} vs {want} + 1"
                        );
                    }
                }
                // On one thread: the same sums in the same order; streamed, the same values.
                assert_eq!(one_thread, c, "{e} {m}x{k}x{n} on one thread");
                assert_eq!(streamed.0, c, "{e} {m}x{k}x{n} streamed");
                // A streamed product's squares, counted on the way out: those of its values,
                // to f32 sums of 32; the same bits however its rows were split into tasks.
                assert_eq!(set_sum, None, "{e} {m}x{k}x{n}: a set product counts nothing");
                let squares: f64 = c.iter().map(|&x| x as f64 * x as f64).sum();
                let sum = streamed.1.expect("a streamed product counts its squares");
                assert!(
                    (sum - squares).abs() <= 1e-6 * squares,
                    "{e} {m}x{k}x{n}: Σ c² {sum} vs {squares}"
                );
                assert_eq!(
                    streamed_alone.1.map(f64::to_bits),
                    Some(sum.to_bits()),
                    "{e} {m}x{k}x{n}: squares on one thread"
                );
            }
        }
    }
}
