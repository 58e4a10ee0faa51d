//! Rotary position embedding as Hugging Face Llama applies it (halves, not interleaved), on
//! `[B, S, H, dh]` activations in place of layout.

use super::{fresh, fused, simd, slice};
use crate::config::{RopeScaling, RopeScalingKind};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `cos`/`sin` of `pos · inv_freq_i`, `inv_freq_i = 1/θ^(2i/dh)` in f32 (then scaled, if
/// asked, as Hugging Face scales it), for `i < dh/2`.
#[derive(Clone)]
pub struct RopeTables {
    pub half: usize,
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
}

impl RopeTables {
    pub fn new(
        head_dim: usize, max_len: usize, theta: f64, scaling: Option<&RopeScaling>,
    ) -> Result<RopeTables> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / head_dim as f32))
            .map(|f| scaling.map_or(f, |s| scaled(f, s)))
            .collect();
        let n = max_len
            .checked_mul(half)
            .filter(|&n| crate::alloc::fits_in_memory((n as u64).saturating_mul(8)));
        let (Some(mut cos), Some(mut sin)) =
            (n.and_then(crate::alloc::reserve_exact), n.and_then(crate::alloc::reserve_exact))
        else {
            return Err(candle_core::Error::Msg(format!("cannot allocate RoPE tables for max_seq_len {max_len}: more than this machine's memory")));
        };
        for p in 0..max_len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(RopeTables { half, cos: Arc::new(cos), sin: Arc::new(sin) })
    }

    pub fn max_len(&self) -> usize {
        self.cos.len() / self.half
    }

    /// `[len, 1, dh]` tables starting at `offset`, `cat(freqs, freqs)` as in HF.
    fn full(
        &self, offset: usize, len: usize, device: &Device, dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.half;
        let take = |t: &[f32]| -> Result<Tensor> {
            let mut v = Vec::with_capacity(len * 2 * h);
            for p in offset..offset + len {
                v.extend_from_slice(&t[p * h..(p + 1) * h]);
                v.extend_from_slice(&t[p * h..(p + 1) * h]);
            }
            Tensor::from_vec(v, (len, 1, 2 * h), device)?.to_dtype(dtype)
        };
        Ok((take(&self.cos)?, take(&self.sin)?))
    }
}

/// One inverse frequency under `rope_scaling`, computed in f32 as transformers does.
fn scaled(freq: f32, s: &RopeScaling) -> f32 {
    let factor = s.factor as f32;
    match s.rope_type {
        RopeScalingKind::Linear => freq / factor,
        RopeScalingKind::Llama3 => {
            // Validation guarantees these for llama3.
            let (low, high) =
                (s.low_freq_factor.unwrap_or(1.0) as f32, s.high_freq_factor.unwrap_or(4.0) as f32);
            let old_len = s.original_max_position_embeddings.unwrap_or(8192) as f32;
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < old_len / high {
                freq
            } else if wavelen > old_len / low {
                freq / factor
            } else {
                let smooth = (old_len / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        }
    }
}

/// `x [B, S, H, dh]` rotated at positions `offset..offset + S`.
pub fn rope(x: &Tensor, tables: &RopeTables, offset: usize) -> Result<Tensor> {
    let s = x.dim(1)?;
    if offset + s > tables.max_len() {
        candle_core::bail!(
            "position {} is beyond max_seq_len {}",
            offset + s - 1,
            tables.max_len()
        );
    }
    if fused(&[x]) {
        x.contiguous()?.apply_op1(Rope { tables: tables.clone(), offset, sign: 1.0 })
    } else {
        rope_reference(x, tables, offset)
    }
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = cat(−x₂, x₁)`.
pub fn rope_reference(x: &Tensor, tables: &RopeTables, offset: usize) -> Result<Tensor> {
    let (_, s, _, dh) = x.dims4()?;
    let (cos, sin) = tables.full(offset, s, x.device(), x.dtype())?;
    let x1 = x.narrow(3, 0, dh / 2)?;
    let x2 = x.narrow(3, dh / 2, dh / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Rotation by `sign·θ`; the backward rotates by `−θ`, the transpose of the rotation.
struct Rope {
    tables: RopeTables,
    offset: usize,
    sign: f32,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(st, l)?;
        let (_, s, h, dh) = l.shape().dims4()?;
        if dh % 2 != 0 {
            candle_core::bail!("rope: the head width must be even, got {dh}");
        }
        let half = dh / 2;
        // SAFETY: every (batch, position) row is written whole: both halves of each head.
        let y = unsafe {
            fresh(x.len(), |y| {
                // One task per (batch, position): all heads share that position's angles.
                y.par_chunks_mut(h * dh)
                    .zip(x.par_chunks(h * dh))
                    .enumerate()
                    .with_min_len(16)
                    .for_each(|(bs, (yr, xr))| {
                        simd::run(
                            #[inline(always)]
                            || {
                                let p = (self.offset + bs % s) * self.tables.half;
                                let (c, sn) =
                                    (&self.tables.cos[p..p + half], &self.tables.sin[p..p + half]);
                                for (dst, src) in yr.chunks_mut(dh).zip(xr.chunks(dh)) {
                                    for i in 0..half {
                                        let (x1, x2, sv) =
                                            (src[i], src[i + half], self.sign * sn[i]);
                                        dst[i] = x1 * c[i] - x2 * sv;
                                        dst[i + half] = x2 * c[i] + x1 * sv;
                                    }
                                }
                            },
                        )
                    })
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope { tables: self.tables.clone(), offset: self.offset, sign: -self.sign };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn rope_matches_reference_and_gradients() {
        let t = RopeTables::new(8, 16, 10000.0, None).unwrap();
        let x = randn(&[2, 5, 3, 8], 1);
        assert_close(&rope(&x, &t, 3).unwrap(), &rope_reference(&x, &t, 3).unwrap(), 1e-6);
        let t2 = t.clone();
        check_grads(&[x], |v| rope(&v[0], &t, 3), move |v| rope_reference(&v[0], &t2, 3));
    }

    /// Linear scaling by 2 halves every frequency exactly, so position 2p of the scaled tables
    /// is position p of the plain ones.
    #[test]
    fn an_odd_head_width_is_an_error() {
        let t = RopeTables::new(8, 16, 10000.0, None).unwrap();
        assert!(rope(&randn(&[1, 2, 1, 7], 1), &t, 0).is_err());
    }

    #[test]
    fn linear_scaling_stretches_positions() {
        use crate::config::{RopeScaling, RopeScalingKind};
        let s = RopeScaling {
            rope_type: RopeScalingKind::Linear,
            factor: 2.0,
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        };
        let (plain, scaled) = (
            RopeTables::new(8, 32, 500.0, None).unwrap(),
            RopeTables::new(8, 32, 500.0, Some(&s)).unwrap(),
        );
        for p in 0..16 {
            assert_eq!(scaled.cos[2 * p * 4..(2 * p + 1) * 4], plain.cos[p * 4..(p + 1) * 4]);
            assert_eq!(scaled.sin[2 * p * 4..(2 * p + 1) * 4], plain.sin[p * 4..(p + 1) * 4]);
        }
    }
}
