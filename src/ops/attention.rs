//! Causal, scaled softmax over attention scores, fused with its backward. The matmuls around it
//! stay with candle (gemm is as fast as PyTorch's); this removes the mask, the scale, the
//! softmax and their backward passes as separate sweeps over `[B, H, S, S]`.

use super::{fused, slice, vec};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `scores [.., S_q, S_k]` → softmax over `k ≤ q + offset` of `scale · scores`; zero beyond.
/// `offset = S_k − S_q` lets new queries attend to a cached prefix.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(&[scores]) {
        scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
    } else {
        causal_softmax_reference(scores, scale)
    }
}

pub fn causal_softmax_reference(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (sq, sk) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let offset = sk - sq;
    let mask: Vec<f32> = (0..sq).flat_map(|i| (0..sk).map(move |j| if j <= i + offset { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (sq, sk), scores.device())?.to_dtype(scores.dtype())?;
    let z = (scores * scale)?.broadcast_add(&mask)?;
    let m = z.max_keepdim(D::Minus1)?;
    let e = z.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct CausalSoftmax {
    scale: f32,
}

fn dims(l: &Layout) -> Result<(usize, usize)> {
    let d = l.shape().dims();
    if d.len() < 2 {
        candle_core::bail!("causal softmax needs at least 2 dims, got {d:?}");
    }
    Ok((d[d.len() - 2], d[d.len() - 1]))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (sq, sk) = dims(l)?;
        let offset = sk - sq;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(sk).zip(x.par_chunks(sk)).enumerate().with_min_len(32).for_each(|(r, (yr, xr))| {
            let n = (r % sq) + offset + 1;
            let (yv, xv) = (&mut yr[..n], &xr[..n]);
            for (o, &v) in yv.iter_mut().zip(xv) {
                *o = v * self.scale;
            }
            let m = vec::max(yv);
            let mut total = 0f32;
            for o in yv.iter_mut() {
                *o = vec::exp(*o - m);
                total += *o;
            }
            let inv = 1.0 / total;
            for o in yv.iter_mut() {
                *o *= inv;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxBwd { scale: self.scale })?))
    }
}

struct CausalSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, g) = (slice(ps, pl)?, slice(gs, gl)?);
        let (sq, sk) = dims(pl)?;
        let offset = sk - sq;
        let mut dx = vec![0f32; p.len()];
        dx.par_chunks_mut(sk).zip(p.par_chunks(sk).zip(g.par_chunks(sk))).enumerate().with_min_len(32).for_each(
            |(r, (dr, (pr, gr)))| {
                let n = (r % sq) + offset + 1;
                // dx = scale · p ∘ (g − ⟨g, p⟩)
                let c = vec::dot(&gr[..n], &pr[..n]);
                for j in 0..n {
                    dr[j] = self.scale * pr[j] * (gr[j] - c);
                }
            },
        );
        Ok((CpuStorage::F32(dx), pl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn causal_softmax_matches_reference_and_gradients() {
        let x = randn(&[2, 3, 5, 5], 1);
        assert_close(&causal_softmax(&x, 0.5).unwrap(), &causal_softmax_reference(&x, 0.5).unwrap(), 1e-6);
        check_grads(&[x], |v| causal_softmax(&v[0], 0.5), |v| causal_softmax_reference(&v[0], 0.5));
    }

    #[test]
    fn cached_prefix_offsets_the_mask() {
        let x = randn(&[1, 2, 7], 2);
        assert_close(&causal_softmax(&x, 1.0).unwrap(), &causal_softmax_reference(&x, 1.0).unwrap(), 1e-6);
    }
}
