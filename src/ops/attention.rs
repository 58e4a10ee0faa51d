//! Causal attention `softmax(scale·QKᵀ + mask)·V` as one op with its own backward, computed
//! flash-style: blocks of queries against blocks of keys with a running (online) softmax, so
//! nothing of size `Sq × Sk` is ever held; the backward pass recomputes each block's
//! probabilities from one log-sum-exp per query row. Blocks wholly above the causal diagonal
//! are never computed. Each head's keys and values are packed once (`small_gemm`'s layout) and
//! multiplied by every block of queries with serial register-tiled products inside each rayon
//! task: no thread hand-off per small matmul and no repacking per block.

use super::small_gemm::{self, Dst, Lhs, Rhs};
use super::{fused, simd, slice, vec};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// `q [B, Sq, H, dh]`, `k, v [B, Sk, KVH, dh]` → `[B, Sq, H, dh]`. Query `i` sees keys
/// `j ≤ i + Sk − Sq` (a cached prefix when `Sk > Sq`). With `KVH < H` (grouped-query
/// attention; `KVH` divides `H`), query head `h` reads key/value head `h / (H / KVH)`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // The fused kernel shifts each row by the scaled maximum, which needs a positive scale.
    if !(scale > 0.0 && scale.is_finite()) {
        candle_core::bail!("attention: the scale must be positive and finite, got {scale}")
    }
    if fused(&[q, k, v]) {
        let op = Attention { scale: scale as f32, lse: Mutex::new(None) };
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        causal_attention_reference(q, k, v, scale)
    }
}

pub fn causal_attention_reference(
    q: &Tensor, k: &Tensor, v: &Tensor, scale: f64,
) -> Result<Tensor> {
    // Each key/value head repeated for the query heads that read it: [B, Sk, H, dh].
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let (b, s, kvh, dh) = t.dims4()?;
        let g = q.dim(2)? / kvh;
        t.unsqueeze(3)?.broadcast_as((b, s, kvh, g, dh))?.contiguous()?.reshape((b, s, kvh * g, dh))
    };
    let (q, k, v) = (
        q.transpose(1, 2)?.contiguous()?,
        repeat(k)?.transpose(1, 2)?.contiguous()?,
        repeat(v)?.transpose(1, 2)?.contiguous()?,
    );
    let scores = (q.matmul(&k.t()?)? * scale)?; // [B, H, Sq, Sk]
    let (sq, sk) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..sq)
        .flat_map(|i| (0..sk).map(move |j| if j <= i + sk - sq { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (sq, sk), scores.device())?.to_dtype(scores.dtype())?;
    let z = scores.broadcast_add(&mask)?;
    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// A row-major matrix view into one head of a `[B, S, H, dh]` tensor: base pointer and row
/// stride (the columns, one head's `dh` features, are contiguous).
#[derive(Clone, Copy)]
struct View(*const f32, usize);

/// A pointer that rayon tasks may share because each writes disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: the pointer is only offset and written through by tasks that each own a disjoint
// range of the allocation (one attention head's rows), which outlives the parallel loop.
unsafe impl Send for SharedMut {}
// SAFETY: as for Send: no two tasks touch the same element.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method, not a field access, so closures capture the whole (Sync) wrapper.
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

struct Dims {
    b: usize,
    sq: usize,
    sk: usize,
    /// Query heads, and key/value heads (fewer with grouped-query attention: query head `i`
    /// reads key/value head `i / (h / kvh)`).
    h: usize,
    kvh: usize,
    dh: usize,
    /// The SIMD path the products run on, which fixes the packed operands' tile width.
    level: simd::Level,
}

impl Dims {
    fn of(ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Dims> {
        let (b, sq, h, dh) = ql.shape().dims4()?;
        let (b2, sk, kvh, dh2) = kl.shape().dims4()?;
        let grouped = kvh > 0 && h.is_multiple_of(kvh);
        if (b2, dh2) != (b, dh) || !grouped || vl.shape() != kl.shape() || sk < sq {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        Ok(Dims { b, sq, sk, h, kvh, dh, level: simd::level() })
    }

    /// A view of query head `hi` of batch `bi` in a `[B, Sq, H, dh]` tensor at `base`.
    fn q_head(&self, base: usize, bi: usize, hi: usize) -> View {
        let off = (bi * self.sq * self.h + hi) * self.dh;
        View((base as *const f32).wrapping_add(off), self.h * self.dh)
    }

    /// A view of the key/value head that query head `hi` reads, in a `[B, Sk, KVH, dh]` tensor.
    fn kv_head(&self, base: usize, bi: usize, hi: usize) -> View {
        let off = (bi * self.sk * self.kvh + hi / (self.h / self.kvh)) * self.dh;
        View((base as *const f32).wrapping_add(off), self.kvh * self.dh)
    }
}

/// Query rows and key columns per block (128×128 measured best of 64–256 at seq 256 and 2048).
/// The score tile of one block pair, `BQ×BK` floats per task, is all the memory attention needs
/// beyond its inputs, outputs and one log-sum-exp per query row: linear in the context, where
/// keeping `[B, H, Sq, Sk]` probabilities is not.
const BQ: usize = 128;
const BK: usize = 128;

struct Attention {
    scale: f32,
    /// Per query row, `log Σ_j exp(scale·q·k_j)` over the keys it sees, `[B, H, Sq]`: with the
    /// inputs, all the backward pass needs to recompute the probabilities block by block.
    lse: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?);
        let d = Dims::of(ql, kl, vl)?;
        let addr = |t: &[f32]| t.as_ptr() as usize;
        // Kᵀ and V of each key/value head, packed once for all the query blocks that read them.
        let packed: Vec<(Vec<f32>, Vec<f32>)> = (0..d.b * d.kvh)
            .into_par_iter()
            .map(|t| {
                let (bi, hi) = (t / d.kvh, (t % d.kvh) * (d.h / d.kvh));
                let (mut kt, mut vp) = (Vec::new(), Vec::new());
                // SAFETY: the views cover this head's rows of k and v.
                unsafe {
                    d.pack_transposed(&mut kt, d.kv_head(addr(k), bi, hi), d.sk);
                    d.pack_rows(&mut vp, d.kv_head(addr(v), bi, hi), d.sk);
                }
                (kt, vp)
            })
            .collect();
        let blocks = d.sq.div_ceil(BQ);
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; d.b * d.h * d.sq];
        let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        // One task per block of query rows of one head: the rows are independent.
        (0..d.b * d.h * blocks).into_par_iter().for_each_init(
            || vec![0f32; BQ * BK],
            |tile, t| {
                let (bh, i0) = (t / blocks, (t % blocks) * BQ);
                let (bi, hi) = (bh / d.h, bh % d.h);
                let rows = BQ.min(d.sq - i0);
                let (kt, vp) = &packed[bi * d.kvh + hi / (d.h / d.kvh)];
                let kv = (d.packed_transposed(kt), d.packed_rows(vp));
                // SAFETY: the views stay inside q/out by construction of the offsets and
                // strides; each task writes only its own rows of `out` and of `lse`.
                unsafe {
                    let lse = std::slice::from_raw_parts_mut(lse_ptr.at(bh * d.sq + i0), rows);
                    let q = d.q_head(addr(q), bi, hi).row(i0);
                    let o = d.q_head(out_ptr.at(0) as usize, bi, hi).row(i0);
                    let rows = Rows { i0, n: rows, q };
                    simd::run(
                        #[inline(always)]
                        || forward_rows(&d, self.scale, &rows, kv, o, lse, tile),
                    );
                }
            },
        );
        *self.lse.lock().unwrap() = Some(lse);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.lock().unwrap().take() else {
            candle_core::bail!("causal-attention: backward called twice")
        };
        let c = |t: &Tensor| t.contiguous();
        let (q, k, v, o, g) = (c(q)?, c(k)?, c(v)?, c(out)?, c(grad)?);
        let all = attention_bwd([&q, &k, &v, &o, &g], &lse, self.scale)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// A block of query rows of one head: the first row's index, the count, and a view of them.
struct Rows {
    i0: usize,
    n: usize,
    q: View,
}

impl Dims {
    /// Keys `0..keys_for(i)` are the ones query rows before `i` may see (at most all of them).
    fn keys_for(&self, i: usize) -> usize {
        (i + self.sk - self.sq).min(self.sk)
    }

    /// How many of the keys `j0..j0 + bk` query row `i` sees.
    fn live(&self, i: usize, j0: usize, bk: usize) -> usize {
        (i + 1 + self.sk - self.sq).saturating_sub(j0).min(bk)
    }

    /// `dh` and a sequence length rounded up to the products' tile width, the row lengths of
    /// packed operands.
    fn padded(&self, n: usize) -> usize {
        n.next_multiple_of(small_gemm::width(self.level))
    }

    /// Rows `0..n` of `src` packed as a right operand, `[n][dh padded]`, zeros in the padding.
    ///
    /// # Safety
    /// `src` must cover `n` rows of `dh` features.
    unsafe fn pack_rows(&self, buf: &mut Vec<f32>, src: View, n: usize) {
        let dh = self.dh;
        buf.clear();
        buf.resize(n * self.padded(dh), 0.0);
        for (r, out) in buf.chunks_exact_mut(self.padded(dh)).enumerate() {
            // SAFETY: row r < n is inside src.
            out[..dh].copy_from_slice(unsafe { std::slice::from_raw_parts(src.row(r).0, dh) });
        }
    }

    /// The transpose of rows `0..n` of `src` packed as a right operand: `[dh][n]` in panels
    /// of the tile width, each panel `[dh][width]` contiguous.
    ///
    /// # Safety
    /// As for [`Dims::pack_rows`].
    unsafe fn pack_transposed(&self, buf: &mut Vec<f32>, src: View, n: usize) {
        let (w, dh) = (small_gemm::width(self.level), self.dh);
        buf.clear();
        buf.resize(dh * self.padded(n), 0.0);
        for r in 0..n {
            // SAFETY: row r < n is inside src.
            let row = unsafe { std::slice::from_raw_parts(src.row(r).0, dh) };
            let panel = &mut buf[r / w * dh * w..];
            for (c, &x) in row.iter().enumerate() {
                panel[c * w + r % w] = x;
            }
        }
    }

    /// A buffer filled by [`Dims::pack_rows`], as the right operand it is.
    fn packed_rows(&self, buf: &[f32]) -> Rhs {
        let w = small_gemm::width(self.level);
        Rhs { ptr: buf.as_ptr(), rs: self.padded(self.dh), ps: w, w }
    }

    /// A buffer filled by [`Dims::pack_transposed`], as a right operand.
    fn packed_transposed(&self, buf: &[f32]) -> Rhs {
        Rhs::panels(buf, self.dh, small_gemm::width(self.level))
    }
}

/// One block of query rows: softmax over the keys block by block with a running maximum and
/// sum (the online softmax), the output accumulated in place and normalised at the end, and
/// each row's log-sum-exp stored for the backward pass.
///
/// # Safety
/// `rows.q` and `o` must cover the block's rows, `kt` and `v` the packed head (see
/// [`Dims::pack_rows`]), and `o` must be written by no one else.
#[inline(always)]
unsafe fn forward_rows(
    d: &Dims, scale: f32, rows: &Rows, (kt, v): (Rhs, Rhs), o: View, lse: &mut [f32],
    tile: &mut [f32],
) {
    let dh = d.dh;
    let (mut max, mut sum) = ([f32::NEG_INFINITY; BQ], [0f32; BQ]);
    let keys = d.keys_for(rows.i0 + rows.n);
    for j0 in (0..keys).step_by(BK) {
        let bk = BK.min(keys - j0);
        let s = Dst { ptr: tile.as_mut_ptr(), rs: bk };
        // SAFETY (both products): as the caller guarantees; `tile` holds BQ×BK ≥ n×bk floats.
        // S = Q·Kᵀ over this block of keys: [n, bk].
        unsafe { small_gemm::gemm(d.level, rows.n, bk, dh, s, false, rows.q.lhs(), kt.col(j0)) };
        for r in 0..rows.n {
            let row = &mut tile[r * bk..(r + 1) * bk];
            let (live, masked) = row.split_at_mut(d.live(rows.i0 + r, j0, bk));
            // The scale is positive, so the scaled row's maximum is the scaled maximum.
            let m = max[r].max(scale * vec::max(live));
            let total = vec::exp_scaled_in_place(live, scale, m, d.level.fma());
            masked.fill(0.0);
            let rescale = vec::exp(max[r] - m);
            (max[r], sum[r]) = (m, sum[r] * rescale + total);
            if rescale != 1.0 {
                // SAFETY: row r of `o` is inside the caller's block.
                let out = unsafe { std::slice::from_raw_parts_mut(o.at_row(r), dh) };
                out.iter_mut().for_each(|x| *x *= rescale);
            }
        }
        // O += P·V over this block of keys.
        let p = Lhs { ptr: tile.as_ptr(), rs: bk, cs: 1 };
        unsafe { small_gemm::gemm(d.level, rows.n, dh, bk, o.dst(), true, p, v.row(j0)) };
    }
    for r in 0..rows.n {
        // SAFETY: as above.
        let out = unsafe { std::slice::from_raw_parts_mut(o.at_row(r), dh) };
        let inv = 1.0 / sum[r];
        out.iter_mut().for_each(|x| *x *= inv);
        lse[r] = max[r] + sum[r].ln();
    }
}

impl View {
    /// Row `r`, as a mutable pointer.
    fn at_row(&self, r: usize) -> *mut f32 {
        self.0.wrapping_add(r * self.1) as *mut f32
    }

    /// The view from row `r` on.
    fn row(self, r: usize) -> View {
        View(self.at_row(r), self.1)
    }

    /// As the left operand of a product.
    fn lhs(self) -> Lhs {
        Lhs { ptr: self.0, rs: self.1, cs: 1 }
    }

    /// As the destination of a product.
    fn dst(self) -> Dst {
        Dst { ptr: self.0 as *mut f32, rs: self.1 }
    }
}

/// A backward task's buffers: the probability and score-gradient tiles, each query row's
/// `dO·O`, and the packed right operands (Kᵀ, Vᵀ and K of the key/value head; Q and dO of
/// the query head).
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    dot: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    k: Vec<f32>,
    q: Vec<f32>,
    g: Vec<f32>,
}

/// Returns dq, dk, dv concatenated (flat), each in its input's layout. `[q, k, v, o, dO]`
/// contiguous; the probabilities are recomputed block by block from `lse`.
fn attention_bwd(t: [&Tensor; 5], lse: &[f32], scale: f32) -> Result<Tensor> {
    let guards: Vec<_> = t.iter().map(|t| t.storage_and_layout()).collect();
    let mut ptrs = [0usize; 5];
    for (p, (s, l)) in ptrs.iter_mut().zip(&guards) {
        let candle_core::Storage::Cpu(c) = &**s else {
            candle_core::bail!("causal-attention backward: expected CPU tensors")
        };
        *p = slice(c, l)?.as_ptr() as usize;
    }
    let d = Dims::of(guards[0].1, guards[1].1, guards[2].1)?;
    let (nq, nk) = (t[0].elem_count(), t[1].elem_count());
    let mut out = vec![0f32; nq + 2 * nk];
    // An address, not a pointer, so that the tasks may share it: each writes its own head's rows.
    let base = out.as_mut_ptr() as usize;
    let at = |n: usize| (base as *const f32).wrapping_add(n) as usize;
    let (dk, dv) = (at(nq), at(nq + nk));
    let group = d.h / d.kvh;
    // One task per key/value head: its key blocks collect gradients from every query block of
    // every query head that reads it.
    (0..d.b * d.kvh).into_par_iter().for_each_init(
        || Scratch {
            p: vec![0f32; BQ * BK],
            ds: vec![0f32; BQ * BK],
            dot: vec![0f32; d.sq],
            kt: Vec::new(),
            vt: Vec::new(),
            k: Vec::new(),
            q: Vec::new(),
            g: Vec::new(),
        },
        |s, t| {
            let bi = t / d.kvh;
            let heads = (t % d.kvh) * group..(t % d.kvh + 1) * group;
            let kvh = |ptr: usize| d.kv_head(ptr, bi, heads.start);
            // SAFETY: the views cover this key/value head's rows.
            unsafe {
                d.pack_transposed(&mut s.kt, kvh(ptrs[1]), d.sk);
                d.pack_transposed(&mut s.vt, kvh(ptrs[2]), d.sk);
                d.pack_rows(&mut s.k, kvh(ptrs[1]), d.sk);
            }
            for hi in heads.clone() {
                let qh = |ptr: usize| d.q_head(ptr, bi, hi);
                // SAFETY: as above, for the query head.
                unsafe {
                    d.pack_rows(&mut s.q, qh(ptrs[0]), d.sq);
                    d.pack_rows(&mut s.g, qh(ptrs[4]), d.sq);
                }
                let inputs = [qh(ptrs[0]), qh(ptrs[3]), qh(ptrs[4])];
                let (rows, cols) =
                    (|b: &[f32]| d.packed_rows(b), |b: &[f32]| d.packed_transposed(b));
                let packed = [cols(&s.kt), cols(&s.vt), rows(&s.k), rows(&s.q), rows(&s.g)];
                let grads = [qh(base), kvh(dk), kvh(dv)];
                let bh = bi * d.h + hi;
                let lse = &lse[bh * d.sq..(bh + 1) * d.sq];
                let tiles = (&mut s.p[..], &mut s.ds[..], &mut s.dot[..]);
                // SAFETY: the views stay inside their tensors by construction of the offsets and
                // strides; each task writes only the rows of its own key/value head and of the
                // query heads that read it.
                simd::run(
                    #[inline(always)]
                    || unsafe { backward_head(&d, scale, inputs, packed, grads, lse, tiles) },
                );
            }
        },
    );
    Tensor::from_vec(out, nq + 2 * nk, t[0].device())
}

/// One head's gradients, block pair by block pair:
/// `P = exp(scale·QKᵀ − lse)`, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = scale·P∘(dP − rowsum(dO∘O))`,
/// `dQ += dS·K`, `dK += dSᵀ·Q`.
///
/// # Safety
/// Every view must cover its head's rows and the packed operands their head (see
/// [`Dims::pack_rows`]); `grads` (dq, dk, dv) must be written by no one else.
#[inline(always)]
unsafe fn backward_head(
    d: &Dims, scale: f32, [q, o, g]: [View; 3], [kt, vt, k, qp, gp]: [Rhs; 5],
    [dq, dk, dv]: [View; 3], lse: &[f32], (p, ds, dot): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (dh, level) = (d.dh, d.level);
    for (i, x) in dot.iter_mut().enumerate() {
        // SAFETY: row i of dO and O is inside the head.
        let (gi, oi) = unsafe {
            (std::slice::from_raw_parts(g.row(i).0, dh), std::slice::from_raw_parts(o.row(i).0, dh))
        };
        *x = vec::dot(gi, oi);
    }
    for i0 in (0..d.sq).step_by(BQ) {
        let n = BQ.min(d.sq - i0);
        let keys = d.keys_for(i0 + n);
        for j0 in (0..keys).step_by(BK) {
            let bk = BK.min(keys - j0);
            let (pd, dsd) =
                (Dst { ptr: p.as_mut_ptr(), rs: bk }, Dst { ptr: ds.as_mut_ptr(), rs: bk });
            // SAFETY (all products): the views cover the rows of this block pair; p and ds
            // hold BQ×BK ≥ n×bk floats.
            unsafe { small_gemm::gemm(level, n, bk, dh, pd, false, q.row(i0).lhs(), kt.col(j0)) };
            for r in 0..n {
                let pr = &mut p[r * bk..(r + 1) * bk];
                let (live, masked) = pr.split_at_mut(d.live(i0 + r, j0, bk));
                let shift = lse[i0 + r];
                vec::exp_scaled_in_place(live, scale, shift, level.fma());
                masked.fill(0.0);
            }
            let pt = Lhs { ptr: p.as_ptr(), rs: 1, cs: bk };
            unsafe { small_gemm::gemm(level, bk, dh, n, dv.row(j0).dst(), true, pt, gp.row(i0)) };
            unsafe { small_gemm::gemm(level, n, bk, dh, dsd, false, g.row(i0).lhs(), vt.col(j0)) };
            for r in 0..n {
                let c = dot[i0 + r];
                let (pr, dr) = (&p[r * bk..(r + 1) * bk], &mut ds[r * bk..(r + 1) * bk]);
                for (x, &pj) in dr.iter_mut().zip(pr) {
                    *x = scale * pj * (*x - c);
                }
            }
            let (dsl, dst) =
                (Lhs { ptr: ds.as_ptr(), rs: bk, cs: 1 }, Lhs { ptr: ds.as_ptr(), rs: 1, cs: bk });
            unsafe { small_gemm::gemm(level, n, dh, bk, dq.row(i0).dst(), true, dsl, k.row(j0)) };
            unsafe { small_gemm::gemm(level, bk, dh, n, dk.row(j0).dst(), true, dst, qp.row(i0)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    /// The fused op's gradients against its reference (see `check_grads`).
    fn check_attention_grads(qkv: &[Tensor], scale: f64) {
        check_grads(
            qkv,
            |t| causal_attention(&t[0], &t[1], &t[2], scale),
            |t| causal_attention_reference(&t[0], &t[1], &t[2], scale),
        );
    }

    #[test]
    fn attention_matches_reference_and_gradients() {
        let (q, k, v) = (randn(&[2, 5, 3, 4], 1), randn(&[2, 5, 3, 4], 2), randn(&[2, 5, 3, 4], 3));
        assert_close(
            &causal_attention(&q, &k, &v, 0.5).unwrap(),
            &causal_attention_reference(&q, &k, &v, 0.5).unwrap(),
            1e-5,
        );
        check_attention_grads(&[q, k, v], 0.5);
    }

    /// Several ragged blocks of queries and keys, so the online softmax carries across blocks
    /// and blocks past a row's last key are skipped or masked.
    #[test]
    fn long_sequences_span_several_blocks() {
        let qkv: Vec<Tensor> = (0..3).map(|i| randn(&[1, 2 * BQ + 22, 2, 8], 20 + i)).collect();
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
        assert_close(
            &causal_attention(q, k, v, 0.4).unwrap(),
            &causal_attention_reference(q, k, v, 0.4).unwrap(),
            1e-5,
        );
        check_attention_grads(&qkv, 0.4);
        // A cached prefix longer than a block: query i sees keys j <= i + 2·BK + 5.
        let (q, k, v) = (
            randn(&[1, BQ + 3, 2, 8], 30),
            randn(&[1, 3 * BK + 8, 2, 8], 31),
            randn(&[1, 3 * BK + 8, 2, 8], 32),
        );
        check_attention_grads(&[q, k, v], 0.4);
    }

    /// Grouped-query attention: two and four query heads per key/value head, over more than
    /// one block, with a cached prefix.
    #[test]
    fn grouped_query_heads_share_key_value_heads() {
        for kvh in [2, 1] {
            let q = randn(&[2, BQ + 9, 4, 8], 40);
            let (k, v) = (randn(&[2, BQ + 20, kvh, 8], 41), randn(&[2, BQ + 20, kvh, 8], 42));
            check_attention_grads(&[q, k, v], 0.35);
        }
        // One key/value head per query head is plain multi-head attention.
        let q = randn(&[1, 6, 2, 4], 43);
        let (k, v) = (randn(&[1, 6, 1, 4], 44), randn(&[1, 6, 1, 4], 45));
        let expanded = |t: &Tensor| Tensor::cat(&[t, t], 2).unwrap();
        assert_close(
            &causal_attention(&q, &k, &v, 0.5).unwrap(),
            &causal_attention(&q, &expanded(&k), &expanded(&v), 0.5).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn a_scale_that_is_not_positive_is_an_error() {
        let q = randn(&[1, 2, 1, 4], 7);
        for scale in [0.0, -0.5, f64::NAN] {
            assert!(causal_attention(&q, &q, &q, scale).is_err());
        }
    }

    #[test]
    fn cached_prefix_offsets_the_mask() {
        let (q, k, v) = (randn(&[1, 2, 2, 4], 4), randn(&[1, 6, 2, 4], 5), randn(&[1, 6, 2, 4], 6));
        assert_close(
            &causal_attention(&q, &k, &v, 0.3).unwrap(),
            &causal_attention_reference(&q, &k, &v, 0.3).unwrap(),
            1e-5,
        );
    }
}
