//! Grouped matmul for stacked experts: rows `[offsets[e], offsets[e+1])` of `x` go through
//! expert `e`'s matrix, `y_r = W_e · x_r`. One op for all experts: the backward writes each
//! expert's `dW_e` straight into one `[E, out, in]` gradient, where per-expert `narrow`s of the
//! stacked weight would each cost a zero-padded copy of the whole stack (O(E²) traffic).

use super::{fused, sgemm, slice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x [R, in]`, `w [E, out, in]`, `offsets` (E + 1 row bounds, non-decreasing, ending at R)
/// → `[R, out]`.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let (r, _) = x.dims2()?;
    let (e, _, _) = w.dims3()?;
    if offsets.len() != e + 1 || offsets[e] != r || offsets.windows(2).any(|p| p[0] > p[1]) {
        candle_core::bail!("grouped matmul: bad offsets {offsets:?} for {e} experts and {r} rows");
    }
    if fused(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Grouped { offsets: Arc::new(offsets.to_vec()) })
    } else {
        grouped_matmul_reference(x, w, offsets)
    }
}

pub fn grouped_matmul_reference(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let mut parts = Vec::new();
    for e in 0..offsets.len() - 1 {
        let n = offsets[e + 1] - offsets[e];
        if n > 0 {
            parts.push(x.narrow(0, offsets[e], n)?.matmul(&w.get(e)?.t()?)?);
        }
    }
    if parts.is_empty() {
        return Tensor::zeros((0, w.dim(1)?), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}

struct Grouped {
    offsets: Arc<Vec<usize>>,
}

impl CustomOp2 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let (r, din) = xl.shape().dims2()?;
        let (_, dout, _) = wl.shape().dims3()?;
        let mut y = vec![0f32; r * dout];
        for (e, b) in self.offsets.windows(2).enumerate() {
            let n = b[1] - b[0];
            if n > 0 {
                let we = &w[e * dout * din..(e + 1) * dout * din];
                sgemm((n, dout, din), &mut y[b[0] * dout..b[1] * dout], &x[b[0] * din..b[1] * din], (din, 1), we, (1, din)); // x·Wᵀ
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((r, dout))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = g.apply_op2_no_bwd(w, &GroupedDx { offsets: self.offsets.clone() })?;
        let dw = g.apply_op3_no_bwd(x, w, &GroupedDw { offsets: self.offsets.clone() })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx_r = dy_r · W_e`.
struct GroupedDx {
    offsets: Arc<Vec<usize>>,
}

impl CustomOp2 for GroupedDx {
    fn name(&self) -> &'static str {
        "grouped-matmul-dx"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, w) = (slice(gs, gl)?, slice(ws, wl)?);
        let (r, dout) = gl.shape().dims2()?;
        let (_, _, din) = wl.shape().dims3()?;
        let mut dx = vec![0f32; r * din];
        for (e, b) in self.offsets.windows(2).enumerate() {
            let n = b[1] - b[0];
            if n > 0 {
                let we = &w[e * dout * din..(e + 1) * dout * din];
                sgemm((n, din, dout), &mut dx[b[0] * din..b[1] * din], &g[b[0] * dout..b[1] * dout], (dout, 1), we, (din, 1));
            }
        }
        Ok((CpuStorage::F32(dx), Shape::from((r, din))))
    }
}

/// `dW_e = Σ_{r in e} dy_rᵀ · x_r`; experts without rows get zeros.
struct GroupedDw {
    offsets: Arc<Vec<usize>>,
}

impl CustomOp3 for GroupedDw {
    fn name(&self) -> &'static str {
        "grouped-matmul-dw"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout, _ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, x) = (slice(gs, gl)?, slice(xs, xl)?);
        let (_, dout) = gl.shape().dims2()?;
        let (_, din) = xl.shape().dims2()?;
        let e_count = wl.shape().dims3()?.0;
        let mut dw = vec![0f32; e_count * dout * din];
        for (e, b) in self.offsets.windows(2).enumerate() {
            let n = b[1] - b[0];
            if n > 0 {
                let dst = &mut dw[e * dout * din..(e + 1) * dout * din];
                sgemm((dout, din, n), dst, &g[b[0] * dout..b[1] * dout], (1, dout), &x[b[0] * din..b[1] * din], (din, 1));
            }
        }
        Ok((CpuStorage::F32(dw), wl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn grouped_matmul_matches_reference_and_gradients() {
        let x = randn(&[9, 4], 1);
        let w = randn(&[4, 3, 4], 2);
        // Expert 1 gets no rows: its gradient must be zero, not missing.
        let offsets = [0, 2, 2, 7, 9];
        assert_close(&grouped_matmul(&x, &w, &offsets).unwrap(), &grouped_matmul_reference(&x, &w, &offsets).unwrap(), 1e-5);
        check_grads(&[x, w], |v| grouped_matmul(&v[0], &v[1], &offsets), |v| grouped_matmul_reference(&v[0], &v[1], &offsets));
    }

    #[test]
    fn bad_offsets_are_an_error() {
        assert!(grouped_matmul(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &[0, 2, 2]).is_err());
    }
}
