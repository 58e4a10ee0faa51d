//! Rotary position embedding as Hugging Face Llama applies it (halves, not interleaved), fused
//! with the move of heads to the front: `[B, S, H, dh]` in, `[B, H, S, dh]` out.

use super::{fused, slice};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `cos`/`sin` of `pos · inv_freq_i`, `inv_freq_i = 1/θ^(2i/dh)` in f32, for `i < dh/2`.
#[derive(Clone)]
pub struct RopeTables {
    pub half: usize,
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
}

impl RopeTables {
    pub fn new(head_dim: usize, max_len: usize, theta: f64) -> RopeTables {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTables { half, cos: Arc::new(cos), sin: Arc::new(sin) }
    }

    pub fn max_len(&self) -> usize {
        self.cos.len() / self.half
    }

    /// `[len, dh]` tables starting at `offset`, `cat(freqs, freqs)` as in HF.
    fn full(&self, offset: usize, len: usize, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let h = self.half;
        let take = |t: &[f32]| -> Result<Tensor> {
            let mut v = Vec::with_capacity(len * 2 * h);
            for p in offset..offset + len {
                v.extend_from_slice(&t[p * h..(p + 1) * h]);
                v.extend_from_slice(&t[p * h..(p + 1) * h]);
            }
            Tensor::from_vec(v, (len, 2 * h), device)?.to_dtype(dtype)
        };
        Ok((take(&self.cos)?, take(&self.sin)?))
    }
}

/// `x [B, S, H, dh]` → rotated `[B, H, S, dh]`, positions `offset..offset + S`.
pub fn rope_heads(x: &Tensor, tables: &RopeTables, offset: usize) -> Result<Tensor> {
    let s = x.dim(1)?;
    if offset + s > tables.max_len() {
        candle_core::bail!("position {} is beyond max_seq_len {}", offset + s - 1, tables.max_len());
    }
    if fused(&[x]) {
        x.contiguous()?.apply_op1(Rope { tables: tables.clone(), offset, inverse: false })
    } else {
        rope_heads_reference(x, tables, offset)
    }
}

pub fn rope_heads_reference(x: &Tensor, tables: &RopeTables, offset: usize) -> Result<Tensor> {
    let (_, s, _, dh) = x.dims4()?;
    let x = x.transpose(1, 2)?.contiguous()?;
    let (cos, sin) = tables.full(offset, s, x.device(), x.dtype())?;
    let x1 = x.narrow(3, 0, dh / 2)?;
    let x2 = x.narrow(3, dh / 2, dh / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Forward: rotate by +θ and move heads forward. Inverse (the backward): move heads back and
/// rotate by −θ, the transpose of the rotation.
struct Rope {
    tables: RopeTables,
    offset: usize,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(st, l)?;
        // Forward input is [B, S, H, dh]; the inverse's input is [B, H, S, dh].
        let (b, d1, d2, dh) = l.shape().dims4()?;
        let (s, h) = if self.inverse { (d2, d1) } else { (d1, d2) };
        let half = dh / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        // One task per output row-block [b, h] (forward) or [b, s] (inverse): contiguous writes.
        y.par_chunks_mut(if self.inverse { h * dh } else { s * dh }).enumerate().for_each(|(blk, out)| {
            let bi = blk / if self.inverse { s } else { h };
            let k = blk % if self.inverse { s } else { h };
            let inner = if self.inverse { h } else { s };
            for m in 0..inner {
                let (si, hi) = if self.inverse { (k, m) } else { (m, k) };
                let src = &x[if self.inverse { ((bi * h + hi) * s + si) * dh } else { ((bi * s + si) * h + hi) * dh }..][..dh];
                let dst = &mut out[m * dh..(m + 1) * dh];
                let p = (self.offset + si) * self.tables.half;
                let (c, sn) = (&self.tables.cos[p..p + half], &self.tables.sin[p..p + half]);
                for i in 0..half {
                    let (x1, x2) = (src[i], src[i + half]);
                    let sv = sign * sn[i];
                    dst[i] = x1 * c[i] - x2 * sv;
                    dst[i + half] = x2 * c[i] + x1 * sv;
                }
            }
        });
        let shape = if self.inverse { (b, s, h, dh) } else { (b, h, s, dh) };
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope { tables: self.tables.clone(), offset: self.offset, inverse: true };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn rope_matches_reference_and_gradients() {
        let t = RopeTables::new(8, 16, 10000.0);
        let x = randn(&[2, 5, 3, 8], 1);
        assert_close(&rope_heads(&x, &t, 3).unwrap(), &rope_heads_reference(&x, &t, 3).unwrap(), 1e-6);
        let t2 = t.clone();
        check_grads(&[x], |v| rope_heads(&v[0], &t, 3), move |v| rope_heads_reference(&v[0], &t2, 3));
    }
}
