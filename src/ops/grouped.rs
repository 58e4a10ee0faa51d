//! Grouped matmul for stacked experts: rows `[offsets[e], offsets[e+1])` of `x` go through
//! expert `e`'s matrices, `y_r = W_e · x_r`. One op for all experts: the backward writes each
//! expert's `dW_e` straight into one `[E, out, in]` gradient, where per-expert `narrow`s of the
//! stacked weight would each cost a zero-padded copy of the whole stack (O(E²) traffic).
//!
//! Several weight stacks can share one op (`grouped_matmul_cat`): their outputs sit side by
//! side in one `[R, Σ out]` result, as SwiGLU's gate and up want, without concatenating the
//! weights — a copy of every expert's matrices, and of their gradients, on each step.

use super::{fused, gemm_into, slice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x [R, in]`, `w [E, out, in]`, `offsets` (E + 1 row bounds, non-decreasing, ending at R)
/// → `[R, out]`.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    check(x, &[w], offsets)?;
    if fused(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Grouped::new(offsets, &[w])?)
    } else {
        grouped_matmul_reference(x, w, offsets)
    }
}

/// `x [R, in]`, `a [E, p, in]`, `b [E, q, in]` → `[R, p + q]`: both products, side by side.
pub fn grouped_matmul_cat(x: &Tensor, a: &Tensor, b: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    check(x, &[a, b], offsets)?;
    if fused(&[x, a, b]) {
        x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, Grouped::new(offsets, &[a, b])?)
    } else {
        Tensor::cat(&[grouped_matmul_reference(x, a, offsets)?, grouped_matmul_reference(x, b, offsets)?], 1)
    }
}

fn check(x: &Tensor, ws: &[&Tensor], offsets: &[usize]) -> Result<()> {
    let (r, din) = x.dims2()?;
    let (e, _, _) = ws[0].dims3()?;
    if offsets.len() != e + 1 || offsets[e] != r || offsets.windows(2).any(|p| p[0] > p[1]) {
        candle_core::bail!("grouped matmul: bad offsets {offsets:?} for {e} experts and {r} rows");
    }
    for w in ws {
        let (we, _, wi) = w.dims3()?;
        if we != e || wi != din {
            candle_core::bail!("grouped matmul: weights {:?} do not fit {e} experts and inputs {:?}", w.dims(), x.dims());
        }
    }
    Ok(())
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

/// The product of `x` with one or two weight stacks of output widths `outs`.
#[derive(Clone)]
struct Grouped {
    offsets: Arc<Vec<usize>>,
    outs: Vec<usize>,
}

impl Grouped {
    fn new(offsets: &[usize], ws: &[&Tensor]) -> Result<Grouped> {
        Ok(Grouped { offsets: Arc::new(offsets.to_vec()), outs: ws.iter().map(|w| w.dim(1)).collect::<Result<_>>()? })
    }

    fn width(&self) -> usize {
        self.outs.iter().sum()
    }

    /// Column offset of stack `j` in the output.
    fn column(&self, j: usize) -> usize {
        self.outs[..j].iter().sum()
    }

    /// `y[rows of e, cols of j] = x_e · W_jeᵀ` for every expert and stack.
    fn forward(&self, x: &[f32], ws: &[&[f32]], din: usize) -> Vec<f32> {
        let (r, width) = (x.len() / din.max(1), self.width());
        let mut y = vec![0f32; r * width];
        for (j, w) in ws.iter().enumerate() {
            let (dout, col) = (self.outs[j], self.column(j));
            for (e, b) in self.offsets.windows(2).enumerate() {
                if b[1] > b[0] {
                    let we = &w[e * dout * din..(e + 1) * dout * din];
                    gemm_into((b[1] - b[0], dout, din), &mut y[b[0] * width + col..], width, false, &x[b[0] * din..b[1] * din], (din, 1), we, (1, din));
                }
            }
        }
        y
    }

    /// `dx_r = Σ_j dy_r[cols of j] · W_je`.
    fn dx(&self, g: &[f32], ws: &[&[f32]], din: usize) -> Vec<f32> {
        let width = self.width();
        let r = g.len() / width.max(1);
        let mut dx = vec![0f32; r * din];
        for (j, w) in ws.iter().enumerate() {
            let (dout, col) = (self.outs[j], self.column(j));
            for (e, b) in self.offsets.windows(2).enumerate() {
                if b[1] > b[0] {
                    let we = &w[e * dout * din..(e + 1) * dout * din];
                    gemm_into((b[1] - b[0], din, dout), &mut dx[b[0] * din..b[1] * din], din, j > 0, &g[b[0] * width + col..], (width, 1), we, (din, 1));
                }
            }
        }
        dx
    }

    /// `dW_je = Σ_{r in e} dy_r[cols of j]ᵀ · x_r`; experts without rows get zeros.
    fn dw(&self, g: &[f32], x: &[f32], j: usize, din: usize) -> Vec<f32> {
        let (width, dout, col) = (self.width(), self.outs[j], self.column(j));
        let e_count = self.offsets.len() - 1;
        let mut dw = vec![0f32; e_count * dout * din];
        for (e, b) in self.offsets.windows(2).enumerate() {
            if b[1] > b[0] {
                let dst = &mut dw[e * dout * din..(e + 1) * dout * din];
                gemm_into((dout, din, b[1] - b[0]), dst, din, false, &g[b[0] * width + col..], (1, width), &x[b[0] * din..b[1] * din], (din, 1));
            }
        }
        dw
    }

    fn output_shape(&self, xl: &Layout) -> Result<Shape> {
        Ok(Shape::from((xl.shape().dims2()?.0, self.width())))
    }

    fn backward(&self, x: &Tensor, ws: &[&Tensor], g: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match ws {
            [w] => g.apply_op2_no_bwd(w, &GroupedDx(self.clone()))?,
            [a, b] => g.apply_op3_no_bwd(a, b, &GroupedDx(self.clone()))?,
            _ => candle_core::bail!("grouped matmul: one or two weight stacks"),
        };
        let dws = (0..ws.len()).map(|j| g.apply_op2_no_bwd(x, &GroupedDw { op: self.clone(), j })).collect::<Result<_>>()?;
        Ok((dx, dws))
    }
}

impl CustomOp2 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        Ok((CpuStorage::F32(self.forward(slice(xs, xl)?, &[slice(ws, wl)?], din)), self.output_shape(xl)?))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, mut dws) = self.backward(x, &[w], g)?;
        Ok((Some(dx), dws.pop()))
    }
}

impl CustomOp3 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul-cat"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        Ok((CpuStorage::F32(self.forward(slice(xs, xl)?, &[slice(a, al)?, slice(b, bl)?], din)), self.output_shape(xl)?))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dws) = self.backward(x, &[a, b], g)?;
        let mut dws = dws.into_iter();
        Ok((Some(dx), dws.next(), dws.next()))
    }
}

/// `dx` from `dy` and the weight stacks.
struct GroupedDx(Grouped);

impl GroupedDx {
    fn run(&self, g: &[f32], ws: &[&[f32]], wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let din = wl.shape().dims3()?.2;
        let dx = self.0.dx(g, ws, din);
        let r = dx.len() / din.max(1);
        Ok((CpuStorage::F32(dx), Shape::from((r, din))))
    }
}

impl CustomOp2 for GroupedDx {
    fn name(&self) -> &'static str {
        "grouped-matmul-dx"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(slice(gs, gl)?, &[slice(ws, wl)?], wl)
    }
}

impl CustomOp3 for GroupedDx {
    fn name(&self) -> &'static str {
        "grouped-matmul-cat-dx"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(slice(gs, gl)?, &[slice(a, al)?, slice(b, bl)?], al)
    }
}

/// `dW` of stack `j` from `dy` and `x`.
struct GroupedDw {
    op: Grouped,
    j: usize,
}

impl CustomOp2 for GroupedDw {
    fn name(&self) -> &'static str {
        "grouped-matmul-dw"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        let dw = self.op.dw(slice(gs, gl)?, slice(xs, xl)?, self.j, din);
        Ok((CpuStorage::F32(dw), Shape::from((self.op.offsets.len() - 1, self.op.outs[self.j], din))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    // Expert 1 gets no rows: its gradient must be zero, not missing.
    const OFFSETS: [usize; 5] = [0, 2, 2, 7, 9];

    #[test]
    fn grouped_matmul_matches_reference_and_gradients() {
        let x = randn(&[9, 4], 1);
        let w = randn(&[4, 3, 4], 2);
        assert_close(&grouped_matmul(&x, &w, &OFFSETS).unwrap(), &grouped_matmul_reference(&x, &w, &OFFSETS).unwrap(), 1e-5);
        check_grads(&[x, w], |v| grouped_matmul(&v[0], &v[1], &OFFSETS), |v| grouped_matmul_reference(&v[0], &v[1], &OFFSETS));
    }

    #[test]
    fn two_stacks_side_by_side_match_the_concatenated_weights() {
        let x = randn(&[9, 4], 1);
        let (a, b) = (randn(&[4, 3, 4], 2), randn(&[4, 5, 4], 3));
        let reference = |v: &[Tensor]| grouped_matmul_reference(&v[0], &Tensor::cat(&[&v[1], &v[2]], 1)?, &OFFSETS);
        assert_close(&grouped_matmul_cat(&x, &a, &b, &OFFSETS).unwrap(), &reference(&[x.clone(), a.clone(), b.clone()]).unwrap(), 1e-5);
        check_grads(&[x, a, b], |v| grouped_matmul_cat(&v[0], &v[1], &v[2], &OFFSETS), reference);
    }

    #[test]
    fn bad_offsets_are_an_error() {
        assert!(grouped_matmul(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &[0, 2, 2]).is_err());
        assert!(grouped_matmul_cat(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &randn(&[2, 2, 3], 2), &[0, 2, 3]).is_err());
    }
}
