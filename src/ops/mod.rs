//! Fused operations with their own backward pass. Each public function runs the fused CPU
//! kernel on CPU f32 tensors and the plain candle formulation elsewhere; the plain formulation
//! is also the reference the tests hold the kernels to.

pub mod attention;
pub mod bf16;
pub mod grouped;
pub mod linear;
pub mod linear_ce;
pub mod logits;
pub mod mot;
#[cfg(feature = "cuda")]
mod mot_cuda;
pub mod norm;
#[cfg(test)]
mod paths;
pub mod rope;
pub mod routing;
pub mod simd;
mod small_gemm;
pub mod squares;
pub mod swiglu;
pub mod vec;

#[cfg(test)]
pub mod testing;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use std::mem::MaybeUninit;

/// The f32 elements of a contiguous CPU tensor.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!(
            "fused op: expected a contiguous tensor, got strides {:?}",
            l.stride()
        ),
    }
}

/// What computes on `device`, for the first line of `train` and for `bench`: the SIMD path (or
/// the GPU), and what runs matmuls in bf16 if they do.
pub fn describe(device: &candle_core::Device) -> String {
    let path = simd::describe(device);
    match bf16::engine().filter(|_| device.is_cpu() && bf16::enabled()) {
        Some(engine) => format!("{path} | bf16 matmuls on {}", engine.label()),
        None => path,
    }
}

/// Whether the fused CPU kernels apply to these tensors.
pub(crate) fn fused(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// `Σ x²` over a tensor's elements, in f64: as the product that wrote it counted it, where one
/// did ([`squares`]: a weight gradient in bf16); else on the CPU in f32 one pass over the
/// tensor (`sum_of_squares_host`), and elsewhere through candle's ops.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    if let Some(sum) = squares::take(t) {
        return Ok(sum);
    }
    if fused(&[t]) && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let Storage::Cpu(c) = &*storage {
            return Ok(sum_of_squares_host(slice(c, layout)?));
        }
    }
    let t = t.to_dtype(candle_core::DType::F32)?;
    Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// `Σ x²` in f64 over fixed chunks summed in parallel and then in order, so the result does not
/// depend on the number of threads.
pub fn sum_of_squares_host(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    let parts: Vec<f64> = x
        .par_chunks(1 << 16)
        .map(|c| {
            simd::run(
                #[inline(always)]
                || vec::sum_of_squares(c),
            )
        })
        .collect();
    parts.iter().sum()
}

/// Rows per rayon task: enough work to amortise scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Deterministic column sums over rows: fixed chunks summed in parallel, then combined in order,
/// so the result does not depend on thread timing.
pub(crate) fn column_sums<F>(rows: usize, width: usize, n_out: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    const CHUNK: usize = 64;
    ordered_sum(rows.div_ceil(CHUNK), n_out * width, |c, acc| {
        simd::run(
            #[inline(always)]
            || {
                for r in c * CHUNK..((c + 1) * CHUNK).min(rows) {
                    f(r, acc);
                }
            },
        )
    })
}

/// `Σ` of `parts` partial sums of `len` values, partial `i` from `part(i, acc)` on a zeroed
/// `acc`: the partials in parallel, then added in order, so that the result has the same bits
/// on any number of threads.
pub(crate) fn ordered_sum<F>(parts: usize, len: usize, part: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    use rayon::prelude::*;
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|i| {
            let mut acc = vec![0f32; len];
            part(i, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f32; len];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// A vector of `n` elements that `write` initialises, without zeroing them first: zeroing
/// products and packed operands took a tenth of a bf16 training step.
///
/// # Safety
/// `write` must initialise every one of the `n` elements it is given.
pub(crate) unsafe fn written<T>(n: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // Under test, garbage in every element first, so that a kernel leaving one unwritten fails
    // its test rather than passing on memory that happened to be zero.
    #[cfg(test)]
    // SAFETY: the capacity holds `n` elements; bytes only, nothing is read as a `T`.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0xa5, n)
    };
    write(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's `write` initialised the first `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// A vector of `n` f32 that `fill` computes, without zeroing it first: for the fused kernels,
/// which write their outputs row by row.
///
/// # Safety
/// `fill` must write every element, and read none before writing it (the slice starts
/// uninitialised).
pub(crate) unsafe fn fresh(n: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    // SAFETY: f32 has no invalid bit patterns and, by the caller's contract, nothing is read
    // before `fill` writes it, and everything is written.
    unsafe { written(n, |y| fill(&mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]))) }
}

/// Which kernel a product runs on: f32 gemm, or bf16 on the CPU's bf16 dot product
/// (`run.dtype = "bf16"`; [`bf16::engine`] says which).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    F32,
    Bf16,
}

impl Kernel {
    /// The kernel f32 matmuls run on now: bf16 while [`bf16::set_enabled`] has them on.
    pub fn current() -> Kernel {
        if bf16::enabled() {
            Kernel::Bf16
        } else {
            Kernel::F32
        }
    }
}

/// How a product lands in its destination.
///
/// Streaming stores write around the cache: they spare the read of each line that a plain
/// store makes first, and leave nothing cached. The bf16 kernels stream; f32 gemm has no such
/// store and sets; the MoT mixing kernels stream their backward results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    /// Overwrite it: every element is written, none read. The bf16 kernels stream a large
    /// result (see `bf16::STREAM_FROM`), which leaves the cache before anything reads it.
    Set,
    /// Add to what it holds.
    Add,
    /// Overwrite it by streaming stores whatever its size: a weight gradient, read next by the
    /// optimizer, a pass over every weight later (the bf16 kernels count its squares on the
    /// way, for the gradient norm: [`squares`]). A MoT layer's expert gradients are 1 MiB an
    /// expert and 16 experts a layer; streamed, bench-mot's bf16 backward on AMX took 430 ms a
    /// step instead of 496 (tiles stored plainly to lines not cached stall).
    Stream,
}

/// `dst = src` by streaming stores, which send a line to memory without reading it in first
/// (x86-64): 64 bytes a store on the AVX-512 path where `dst` is 64-byte aligned, 16 where it
/// is 16-byte aligned; plainly elsewhere, and for a tail of fewer floats than a store. Neither
/// reads `dst`. The wide stores write a bf16 step's streamed products (weight gradients,
/// large activations) in a quarter of the instructions: bench-mot and bench-dense in bf16 on
/// AMX, steps alternated in one process, 3–8 ms a step faster than with 16-byte stores.
#[inline]
pub(crate) fn stream_copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "stream_copy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        let at = dst.as_ptr() as usize;
        if at.is_multiple_of(64) && simd::level() == simd::Level::Avx512 {
            // SAFETY: the AVX-512 path is chosen only on a CPU that has it.
            return unsafe { vec::stream_copy_avx512(dst, src) };
        }
        if at.is_multiple_of(16) {
            use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
            for (o, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
                // SAFETY: SSE, part of x86-64; `o` is 4 floats on a 16-byte boundary (`dst`
                // starts on one and `o` advances 16 bytes at a time), `s` 4 floats.
                unsafe { _mm_stream_ps(o.as_mut_ptr(), _mm_loadu_ps(s.as_ptr())) };
            }
            let whole = dst.len() / 4 * 4;
            dst[whole..].copy_from_slice(&src[whole..]);
            return;
        }
    }
    dst.copy_from_slice(src);
}

/// Streaming stores are weakly ordered: a task that streamed calls this before it ends, so
/// that they reach memory before anyone who joins the task reads them.
#[inline(always)]
pub(crate) fn stream_fence() {
    // SAFETY: SSE2, part of x86-64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// `lhs[m×k] · rhs[k×n]` as a new row-major `m×n` vector, each operand given by (row stride,
/// column stride), on all threads of the current pool.
pub(crate) fn product(
    kernel: Kernel, mnk: (usize, usize, usize), lhs: &[f32], lhs_strides: (usize, usize),
    rhs: &[f32], rhs_strides: (usize, usize),
) -> Vec<f32> {
    new_product(kernel, mnk, lhs, lhs_strides, rhs, rhs_strides, Store::Set).0
}

/// [`product`] for a weight gradient: streamed ([`Store::Stream`]), with its `Σ x²` where the
/// kernel counts it on the way out (see [`squares`]).
pub(crate) fn weight_gradient(
    kernel: Kernel, mnk: (usize, usize, usize), lhs: &[f32], lhs_strides: (usize, usize),
    rhs: &[f32], rhs_strides: (usize, usize),
) -> (Vec<f32>, Option<f64>) {
    new_product(kernel, mnk, lhs, lhs_strides, rhs, rhs_strides, Store::Stream)
}

/// The product as a new vector, stored as `store` says (not [`Store::Add`]), and what
/// [`gemm`] returns.
fn new_product(
    kernel: Kernel, mnk: (usize, usize, usize), lhs: &[f32], lhs_strides: (usize, usize),
    rhs: &[f32], rhs_strides: (usize, usize), store: Store,
) -> (Vec<f32>, Option<f64>) {
    debug_assert_ne!(store, Store::Add, "a new vector holds nothing to add to");
    let (m, n, _) = mnk;
    let mut sum = None;
    // SAFETY: short of `Store::Add`, `gemm` writes every element of the m×n product.
    let c = unsafe {
        written(m * n, |dst| {
            sum = gemm(kernel, mnk, dst, n, store, lhs, lhs_strides, rhs, rhs_strides, true)
        })
    };
    (c, sum)
}

/// `dst (+)= lhs · rhs` where the rows of `dst` are `dst_rs` apart (a column block of a wider
/// matrix), stored as `store` says; `parallel` splits the product across the current pool,
/// which products that rayon tasks already run side by side do not want (it only adds
/// hand-offs).
///
/// With [`Store::Stream`] it returns the product's `Σ x²` where the kernel counts it (see
/// [`gemm`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    kernel: Kernel, mnk: (usize, usize, usize), dst: &mut [f32], dst_rs: usize, store: Store,
    lhs: &[f32], lhs_strides: (usize, usize), rhs: &[f32], rhs_strides: (usize, usize),
    parallel: bool,
) -> Option<f64> {
    gemm(kernel, mnk, uninit(dst), dst_rs, store, lhs, lhs_strides, rhs, rhs_strides, parallel)
}

/// [`gemm_into`] in bf16 ([`bf16::engine`]) with the right operand already packed ([`bf16::pack_weight`]):
/// `dst (+)= lhs · B`, `lhs` `[m, B's K]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_packed_into(
    m: usize, dst: &mut [f32], dst_rs: usize, store: Store, lhs: &[f32],
    lhs_strides: (usize, usize), b: &bf16::PackedB, parallel: bool,
) -> Option<f64> {
    let (k, n) = b.dims();
    check_dst_and_lhs((m, n, k), dst.len(), dst_rs, lhs.len(), lhs_strides);
    bf16::gemm_packed_into(m, uninit(dst), dst_rs, store, lhs, lhs_strides, b, parallel)
}

/// Initialised memory seen as possibly uninitialised, as the product kernels take it.
fn uninit(dst: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: the same memory and layout; the kernels store only f32 values to it.
    unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// That an m×n product fits `dst` (rows `dst_rs` apart) and an m×k `lhs` fits its slice.
fn check_dst_and_lhs(
    (m, n, k): (usize, usize, usize), dst_len: usize, dst_rs: usize, lhs_len: usize,
    (lhs_rs, lhs_cs): (usize, usize),
) {
    assert!(
        dst_rs >= n && (m == 0 || n == 0 || dst_len >= (m - 1) * dst_rs + n),
        "gemm: destination too small"
    );
    assert!(
        m == 0 || k == 0 || lhs_len > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
        "gemm: lhs too small"
    );
}

/// [`gemm_into`] on a destination that may be uninitialised short of [`Store::Add`]: every
/// element of the m×n product is written, none read unless added to. With `parallel` the
/// product is split across the current pool. With [`Store::Stream`] the bf16 kernels return
/// the product's `Σ x²`, counted as they stream it out; f32 gemm has no such store and counts
/// nothing (None).
#[allow(clippy::too_many_arguments)]
fn gemm(
    kernel: Kernel, (m, n, k): (usize, usize, usize), dst: &mut [MaybeUninit<f32>], dst_rs: usize,
    store: Store, lhs: &[f32], (lhs_rs, lhs_cs): (usize, usize), rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize), parallel: bool,
) -> Option<f64> {
    check_dst_and_lhs((m, n, k), dst.len(), dst_rs, lhs.len(), (lhs_rs, lhs_cs));
    assert!(
        k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "gemm: rhs too small"
    );
    if kernel == Kernel::Bf16 {
        return bf16::gemm_into(
            (m, n, k),
            dst,
            dst_rs,
            store,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            parallel,
        );
    }
    let threads = threads(parallel);
    let accumulate = store == Store::Add;
    let gemm_f32 =
        |(m, n): (usize, usize), dst: *mut f32, lhs: *const f32, rhs: *const f32, parallelism| {
            // SAFETY: the caller passes a block of rows of the product checked above; unless
            // `accumulate`, gemm only stores to `dst` (zeros when k = 0).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst,
                    1,
                    dst_rs as isize,
                    accumulate,
                    lhs,
                    lhs_cs as isize,
                    lhs_rs as isize,
                    rhs,
                    rhs_cs as isize,
                    rhs_rs as isize,
                    if accumulate { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        };
    let (dst_p, lhs_p, rhs_p) = (dst.as_mut_ptr().cast::<f32>(), lhs.as_ptr(), rhs.as_ptr());
    let Some(rows) = row_blocks(m, threads) else {
        let parallelism =
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        gemm_f32((m, n), dst_p, lhs_p, rhs_p, parallelism);
        return None;
    };
    use rayon::prelude::*;
    // Raw pointers are not Send; the blocks below are disjoint, so the addresses are shared.
    let (dst_a, lhs_a, rhs_a) = (dst_p as usize, lhs_p as usize, rhs_p as usize);
    (0..m.div_ceil(rows)).into_par_iter().for_each(|b| {
        let i0 = b * rows;
        // SAFETY: rows i0.. lie inside the product the asserts above bound; each task stores
        // its own rows of `dst`.
        let (dst, lhs) = unsafe {
            ((dst_a as *mut f32).add(i0 * dst_rs), (lhs_a as *const f32).add(i0 * lhs_rs))
        };
        gemm_f32((rows.min(m - i0), n), dst, lhs, rhs_a as *const f32, gemm::Parallelism::None)
    });
    None
}

/// The threads a product split across the current pool (`parallel`) or kept on the calling
/// thread uses.
pub(crate) fn threads(parallel: bool) -> usize {
    if parallel {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// How many rows of an m-row f32 product each rayon task takes, as a one-thread gemm, or
/// `None` when the product is too short for a block per thread (then gemm's own threads take
/// it). gemm's `Parallelism::Rayon(t)` cuts each of its passes into exactly t static pieces and
/// joins them, so one thread the machine pauses (a vCPU the host descheduled) stalls the whole
/// product; blocks that idle threads steal do not. Up to four blocks per thread, and always a
/// whole number per thread (three blocks on two threads would leave one idle a third of the
/// time); at least 256 rows each keep the packing of the other operand small beside the
/// product. Blocks of whole rows only: splitting columns as well re-reads the long operands of
/// the weight gradients (k = tokens) and measured slower (0.73–0.93× on three of their shapes).
fn row_blocks(m: usize, threads: usize) -> Option<usize> {
    let blocks = (m / 256).min(4 * threads) / threads * threads;
    (threads > 1 && blocks >= 2).then(|| m.div_ceil(blocks).next_multiple_of(16))
}
