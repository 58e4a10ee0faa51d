//! SwiGLU's gate on a fused projection: `[g | u]` rows of width `2f` → `silu(g) · u`, width `f`,
//! fused with its backward. One `[N, 2f]` matmul feeds it instead of two `[N, f]` ones.

use super::{fresh, fused, simd, slice, vec};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `gu [.., 2f]` (gate then up) → `[.., f]`.
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    if gu.dim(D::Minus1)? % 2 != 0 {
        candle_core::bail!("swiglu needs an even last dim, got {:?}", gu.dims());
    }
    if fused(&[gu]) {
        gu.contiguous()?.apply_op1(SwiGlu)
    } else {
        swiglu_reference(gu)
    }
}

pub fn swiglu_reference(gu: &Tensor) -> Result<Tensor> {
    let f = gu.dim(D::Minus1)? / 2;
    gu.narrow(D::Minus1, 0, f)?.silu()? * gu.narrow(D::Minus1, f, f)?
}

struct SwiGlu;

fn width(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(0)
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let gu = slice(s, l)?;
        let w2 = width(l);
        let f = w2 / 2;
        // SAFETY: every row of y is written whole by swiglu_row, which reads only gu.
        let y = unsafe {
            fresh(gu.len() / 2, |y| {
                y.par_chunks_mut(f)
                    .zip(gu.par_chunks(w2))
                    .with_min_len(super::rows_per_task(w2))
                    .for_each(|(y, row)| {
                        simd::run(
                            #[inline(always)]
                            || swiglu_row(row, y),
                        )
                    })
            })
        };
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().unwrap() = f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, gu: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gu.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluBwd)?))
    }
}

/// One row: `[g | u]` (width 2f) → `silu(g) · u` (width f).
#[inline(always)]
pub(crate) fn swiglu_row(gu: &[f32], y: &mut [f32]) {
    let (g, u) = gu.split_at(y.len());
    for i in 0..y.len() {
        y[i] = g[i] * vec::sigmoid(g[i]) * u[i];
    }
}

/// One row: `[g | u]` and `dy` → `[dg | du]`.
#[inline(always)]
pub(crate) fn swiglu_row_backward(gu: &[f32], dy: &[f32], out: &mut [f32]) {
    let f = dy.len();
    let (g, u) = gu.split_at(f);
    let (dg, du) = out.split_at_mut(f);
    for i in 0..f {
        let s = vec::sigmoid(g[i]);
        // d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        du[i] = dy[i] * g[i] * s;
    }
}

/// `(gu, dy)` → `d(gu)`: `[dg | du]` rows.
struct SwiGluBwd;

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self, s: &CpuStorage, l: &Layout, ds: &CpuStorage, dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gu, dy) = (slice(s, l)?, slice(ds, dl)?);
        let w2 = width(l);
        let f = w2 / 2;
        // SAFETY: every row of out is written whole by swiglu_row_backward (dg and du).
        let out = unsafe {
            fresh(gu.len(), |out| {
                out.par_chunks_mut(w2)
                    .zip(gu.par_chunks(w2).zip(dy.par_chunks(f)))
                    .with_min_len(super::rows_per_task(w2))
                    .for_each(|(o, (row, d))| {
                        simd::run(
                            #[inline(always)]
                            || swiglu_row_backward(row, d, o),
                        )
                    })
            })
        };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn swiglu_matches_reference_and_gradients() {
        let gu = randn(&[5, 3, 18], 1);
        assert_close(&swiglu(&gu).unwrap(), &swiglu_reference(&gu).unwrap(), 1e-6);
        check_grads(&[gu], |v| swiglu(&v[0]), |v| swiglu_reference(&v[0]));
    }
}
