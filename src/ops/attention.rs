//! Causal attention `softmax(scale·QKᵀ + mask)·V` as one op with its own backward. Heads are
//! independent, so each (batch, head) pair is one rayon task running serial GEMMs on strided
//! views of the `[B, S, H, dh]` activations: no transposes, no `[B, H, S, S]` gradients
//! accumulated by the autograd, and no thread hand-off per small matmul.

use super::{fused, simd, slice, vec};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// `q [B, Sq, H, dh]`, `k, v [B, Sk, H, dh]` → `[B, Sq, H, dh]`. Query `i` sees keys
/// `j ≤ i + Sk − Sq` (a cached prefix when `Sk > Sq`).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(&[q, k, v]) {
        let op = Attention { scale: scale as f32, probs: Mutex::new(None) };
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        causal_attention_reference(q, k, v, scale)
    }
}

pub fn causal_attention_reference(
    q: &Tensor, k: &Tensor, v: &Tensor, scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = (
        q.transpose(1, 2)?.contiguous()?,
        k.transpose(1, 2)?.contiguous()?,
        v.transpose(1, 2)?.contiguous()?,
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

/// A strided matrix view for [`gemm_raw`]: base pointer, row stride, column stride.
#[derive(Clone, Copy)]
struct View(*const f32, isize, isize);

/// `dst (+)= lhs·rhs` with arbitrary strides, single-threaded.
///
/// # Safety
/// Every view must be valid for the `m×k`, `k×n` and `m×n` index ranges its strides reach, and
/// `dst` must not alias the inputs or be written by another thread at the same time.
unsafe fn gemm_raw(
    m: usize, n: usize, k: usize, dst: View, accumulate: bool, lhs: View, rhs: View,
) {
    // SAFETY: the caller guarantees that every view covers the index ranges gemm reaches and
    // that `dst` is written by no one else (see `# Safety`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0 as *mut f32,
            dst.2,
            dst.1,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

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
    h: usize,
    dh: usize,
}

impl Dims {
    fn of(ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Dims> {
        let (b, sq, h, dh) = ql.shape().dims4()?;
        let (b2, sk, h2, dh2) = kl.shape().dims4()?;
        if (b2, h2, dh2) != (b, h, dh) || vl.shape() != kl.shape() || sk < sq {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        Ok(Dims { b, sq, sk, h, dh })
    }

    /// Offset of row 0 of head `h` in batch `b` of a `[B, S, H, dh]` tensor with S rows.
    fn head(&self, s: usize, bi: usize, hi: usize) -> usize {
        (bi * s * self.h + hi) * self.dh
    }

    /// Row stride of one head's `[S, dh]` view.
    fn rs(&self) -> isize {
        (self.h * self.dh) as isize
    }
}

struct Attention {
    scale: f32,
    /// Softmax probabilities `[B, H, Sq, Sk]` kept for the backward pass.
    probs: Mutex<Option<Vec<f32>>>,
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
        let (sq, sk, dh, rs) = (d.sq, d.sk, d.dh, d.rs());
        let mut out = vec![0f32; q.len()];
        let mut probs = vec![0f32; d.b * d.h * sq * sk];
        let out_ptr = SharedMut(out.as_mut_ptr());
        probs.par_chunks_mut(sq * sk).enumerate().for_each(|(bh, p)| {
            simd::run(
                #[inline(always)]
                || {
                    let (bi, hi) = (bh / d.h, bh % d.h);
                    let (qo, ko) = (d.head(sq, bi, hi), d.head(sk, bi, hi));
                    // SAFETY: views stay inside q/k/v/out by construction of the offsets and strides;
                    // each task writes only its own head's rows of `out` and its own `p`.
                    unsafe {
                        let (qv, kv, vv) = (
                            View(q[qo..].as_ptr(), rs, 1),
                            View(k[ko..].as_ptr(), rs, 1),
                            View(v[ko..].as_ptr(), rs, 1),
                        );
                        let kt = View(kv.0, 1, rs); // Kᵀ: [dh, Sk]
                        gemm_raw(sq, sk, dh, View(p.as_ptr(), sk as isize, 1), false, qv, kt);
                        softmax_rows(p, sq, sk, self.scale);
                        let o = View(out_ptr.at(qo), rs, 1);
                        gemm_raw(sq, dh, sk, o, false, View(p.as_ptr(), sk as isize, 1), vv);
                    }
                },
            )
        });
        *self.probs.lock().unwrap() = Some(probs);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self, q: &Tensor, k: &Tensor, v: &Tensor, _out: &Tensor, grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.lock().unwrap().take() else {
            candle_core::bail!("causal-attention: backward called twice")
        };
        let (q, k, v, g) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, grad.contiguous()?);
        let all = attention_bwd(&q, &k, &v, &g, &probs, self.scale)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// In place: row `i` of `p` becomes softmax over `j ≤ i + Sk − Sq` of `scale·p`, zero beyond.
#[inline(always)]
fn softmax_rows(p: &mut [f32], sq: usize, sk: usize, scale: f32) {
    for (i, row) in p.chunks_mut(sk).enumerate() {
        let n = i + sk - sq + 1;
        let (live, masked) = row.split_at_mut(n);
        for x in live.iter_mut() {
            *x *= scale;
        }
        let m = vec::max(live);
        let mut total = 0f32;
        for x in live.iter_mut() {
            *x = vec::exp(*x - m);
            total += *x;
        }
        let inv = 1.0 / total;
        for x in live.iter_mut() {
            *x *= inv;
        }
        masked.fill(0.0);
    }
}

/// Returns dq, dk, dv concatenated (flat), each in its input's layout.
fn attention_bwd(
    q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, probs: &[f32], scale: f32,
) -> Result<Tensor> {
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let cpu = |s: &candle_core::Storage| match s {
        candle_core::Storage::Cpu(c) => Ok(c.as_slice::<f32>()?.as_ptr()),
        _ => candle_core::bail!("causal-attention backward: expected CPU tensors"),
    };
    let d = Dims::of(ql, kl, vl)?;
    let (sq, sk, dh, rs) = (d.sq, d.sk, d.dh, d.rs());
    let (nq, nk) = (ql.shape().elem_count(), kl.shape().elem_count());
    // SAFETY: the four tensors are contiguous (made so by the caller); their offsets are applied.
    let (qp, kp, vp, gp) = unsafe {
        (
            cpu(&qs)?.add(ql.start_offset()),
            cpu(&ks)?.add(kl.start_offset()),
            cpu(&vs)?.add(vl.start_offset()),
            cpu(&gs)?.add(gl.start_offset()),
        )
    };
    let (qp, kp, vp, gp) = (qp as usize, kp as usize, vp as usize, gp as usize);
    let mut out = vec![0f32; nq + 2 * nk];
    let base = SharedMut(out.as_mut_ptr());
    (0..d.b * d.h).into_par_iter().for_each_init(
        || vec![0f32; sq * sk],
        |ds, bh| {
            simd::run(
                #[inline(always)]
                || {
                    let (bi, hi) = (bh / d.h, bh % d.h);
                    let (qo, ko) = (d.head(sq, bi, hi), d.head(sk, bi, hi));
                    let p = &probs[bh * sq * sk..(bh + 1) * sq * sk];
                    let pv = View(p.as_ptr(), sk as isize, 1);
                    // SAFETY: as in the forward; each task writes only its own head's rows of dq/dk/dv.
                    unsafe {
                        let at = |ptr: usize, off: usize| View((ptr as *const f32).add(off), rs, 1);
                        let (qv, kv, vv, gv) = (at(qp, qo), at(kp, ko), at(vp, ko), at(gp, qo));
                        let dsv = View(ds.as_ptr(), sk as isize, 1);
                        // dP = dO·Vᵀ
                        gemm_raw(sq, sk, dh, dsv, false, gv, View(vv.0, 1, rs));
                        // dS = scale · P ∘ (dP − ⟨dP, P⟩_row)
                        for i in 0..sq {
                            let n = i + sk - sq + 1;
                            let (dr, pr) = (&mut ds[i * sk..i * sk + n], &p[i * sk..i * sk + n]);
                            let c = vec::dot(dr, pr);
                            for j in 0..n {
                                dr[j] = scale * pr[j] * (dr[j] - c);
                            }
                            ds[i * sk + n..(i + 1) * sk].fill(0.0);
                        }
                        let dq = View(base.at(qo), rs, 1);
                        let dk = View(base.at(nq + ko), rs, 1);
                        let dv = View(base.at(nq + nk + ko), rs, 1);
                        gemm_raw(sq, dh, sk, dq, false, dsv, kv); // dQ = dS·K
                        gemm_raw(sk, dh, sq, dk, false, View(ds.as_ptr(), 1, sk as isize), qv); // dK = dSᵀ·Q
                        gemm_raw(sk, dh, sq, dv, false, View(pv.0, 1, sk as isize), gv);
                        // dV = Pᵀ·dO
                    }
                },
            )
        },
    );
    Tensor::from_vec(out, nq + 2 * nk, q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn attention_matches_reference_and_gradients() {
        let (q, k, v) = (randn(&[2, 5, 3, 4], 1), randn(&[2, 5, 3, 4], 2), randn(&[2, 5, 3, 4], 3));
        assert_close(
            &causal_attention(&q, &k, &v, 0.5).unwrap(),
            &causal_attention_reference(&q, &k, &v, 0.5).unwrap(),
            1e-5,
        );
        check_grads(
            &[q, k, v],
            |t| causal_attention(&t[0], &t[1], &t[2], 0.5),
            |t| causal_attention_reference(&t[0], &t[1], &t[2], 0.5),
        );
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
