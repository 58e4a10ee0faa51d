//! Grouped matmul for stacked experts: rows `[offsets[e], offsets[e+1])` of `x` go through
//! expert `e`'s matrices, `y_r = W_e · x_r`. One op for all experts: the backward writes each
//! expert's `dW_e` straight into one `[E, out, in]` gradient, where per-expert `narrow`s of the
//! stacked weight would each cost a zero-padded copy of the whole stack (O(E²) traffic).
//!
//! With at least as many experts holding rows as threads, the experts run side by side, one
//! rayon task each, each product on its task's thread; with fewer, one after the other, each
//! product across the pool.
//!
//! Several weight stacks can share one op (`grouped_matmul_cat`): their outputs sit side by
//! side in one `[R, Σ out]` result, as SwiGLU's gate and up want, without concatenating the
//! weights — a copy of every expert's matrices, and of their gradients, on each step.
//!
//! `grouped_up` is the experts' up projection and activation in one op that keeps nothing of
//! its own for the backward pass (`train.recompute_experts`): the `[R, 2f]` pre-activation is
//! most of what a MoT or MoE layer holds until backward, so the backward recomputes it one
//! expert at a time, into a buffer of one expert's rows, at the price of the up projection's
//! matmuls once more.

use super::swiglu::{swiglu_row, swiglu_row_backward};
use super::{fresh, fused, gemm_into, simd, slice, Kernel};
use crate::config::Activation;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// `x [R, in]`, `w [E, out, in]`, `offsets` (E + 1 row bounds, non-decreasing, ending at R)
/// → `[R, out]`.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    check(x, &[w], offsets)?;
    if fused(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Grouped::new(Kernel::current(), offsets, &[w])?)
    } else {
        grouped_matmul_reference(x, w, offsets)
    }
}

/// `x [R, in]`, `a [E, p, in]`, `b [E, q, in]` → `[R, p + q]`: both products, side by side.
pub fn grouped_matmul_cat(x: &Tensor, a: &Tensor, b: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    grouped_matmul_cat_on(Kernel::current(), x, a, b, offsets)
}

/// [`grouped_matmul_cat`] on a given kernel (CPU f32 tensors).
pub fn grouped_matmul_cat_on(
    kernel: Kernel, x: &Tensor, a: &Tensor, b: &Tensor, offsets: &[usize],
) -> Result<Tensor> {
    check(x, &[a, b], offsets)?;
    if fused(&[x, a, b]) {
        x.contiguous()?.apply_op3(
            &a.contiguous()?,
            &b.contiguous()?,
            Grouped::new(kernel, offsets, &[a, b])?,
        )
    } else {
        Tensor::cat(
            &[grouped_matmul_reference(x, a, offsets)?, grouped_matmul_reference(x, b, offsets)?],
            1,
        )
    }
}

fn check(x: &Tensor, ws: &[&Tensor], offsets: &[usize]) -> Result<()> {
    let (r, din) = x.dims2()?;
    let (e, _, _) = ws[0].dims3()?;
    // The experts' rows partition the rows: every output row is some expert's.
    if offsets.len() != e + 1
        || offsets[0] != 0
        || offsets[e] != r
        || offsets.windows(2).any(|p| p[0] > p[1])
    {
        candle_core::bail!("grouped matmul: bad offsets {offsets:?} for {e} experts and {r} rows");
    }
    for w in ws {
        let (we, _, wi) = w.dims3()?;
        if we != e || wi != din {
            candle_core::bail!(
                "grouped matmul: weights {:?} do not fit {e} experts and inputs {:?}",
                w.dims(),
                x.dims()
            );
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

/// `act(x_e · W_eᵀ)` for every expert on its rows, recomputed in backward: `x [R, in]`, `up`
/// `[E, f, in]` and, for SwiGLU, `gate [E, f, in]` (→ `silu(x·Gᵀ) ⊙ (x·Uᵀ)`) → `[R, f]`.
/// CPU f32 only (`fused`); elsewhere the experts use the plain ops.
pub fn grouped_up(
    x: &Tensor, gate: Option<&Tensor>, up: &Tensor, activation: Activation, offsets: &[usize],
) -> Result<Tensor> {
    let ws: Vec<&Tensor> = gate.into_iter().chain([up]).collect();
    check(x, &ws, offsets)?;
    if !fused(&[x, up]) || (activation == Activation::Swiglu) != gate.is_some() {
        candle_core::bail!("grouped_up: CPU f32 tensors, with a gate exactly for swiglu");
    }
    let op = GroupedUp { grouped: Grouped::new(Kernel::current(), offsets, &ws)?, activation };
    let x = x.contiguous()?;
    match gate {
        Some(g) => x.apply_op3(&g.contiguous()?, &up.contiguous()?, op),
        None => x.apply_op2(&up.contiguous()?, op),
    }
}

struct GroupedUp {
    grouped: Grouped,
    activation: Activation,
}

impl GroupedUp {
    /// Expert `e`'s rows alone, as a one-expert grouped matmul over its slice of each stack.
    fn expert<'a>(
        &self, e: usize, ws: &[&'a [f32]], din: usize,
    ) -> (Grouped, usize, Vec<&'a [f32]>) {
        let (b0, b1) = (self.grouped.offsets[e], self.grouped.offsets[e + 1]);
        let f = self.grouped.outs[0];
        let one = Grouped { offsets: Arc::new(vec![0, b1 - b0]), ..self.grouped.clone() };
        (one, b0, ws.iter().map(|w| &w[e * f * din..(e + 1) * f * din]).collect())
    }

    fn forward(&self, x: &[f32], ws: &[&[f32]], din: usize) -> Vec<f32> {
        let (f, width) = (self.grouped.outs[0], self.grouped.width());
        let mut a = vec![0f32; x.len() / din.max(1) * f];
        for e in 0..self.grouped.offsets.len() - 1 {
            let (one, b0, we) = self.expert(e, ws, din);
            let n = one.offsets[1];
            if n == 0 {
                continue;
            }
            let h = one.forward(&x[b0 * din..(b0 + n) * din], &we, din); // [n, width]
            let act = self.activation;
            a[b0 * f..(b0 + n) * f]
                .par_chunks_mut(f)
                .zip(h.par_chunks(width))
                .with_min_len(super::rows_per_task(width))
                .for_each(|(a, h)| {
                    simd::run(
                        #[inline(always)]
                        || activate(act, h, a),
                    )
                });
        }
        a
    }

    /// `dx` and each stack's `dW` from `da [R, f]`, one expert at a time.
    fn backward(
        &self, x: &[f32], ws: &[&[f32]], da: &[f32], din: usize,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let (f, width) = (self.grouped.outs[0], self.grouped.width());
        let mut dx = vec![0f32; x.len()];
        let mut dws = vec![vec![0f32; ws[0].len()]; ws.len()];
        for e in 0..self.grouped.offsets.len() - 1 {
            let (one, b0, we) = self.expert(e, ws, din);
            let n = one.offsets[1];
            if n == 0 {
                continue;
            }
            let xe = &x[b0 * din..(b0 + n) * din];
            let h = one.forward(xe, &we, din); // recomputed [n, width]
            let mut dh = vec![0f32; n * width];
            let act = self.activation;
            dh.par_chunks_mut(width)
                .zip(h.par_chunks(width).zip(da[b0 * f..(b0 + n) * f].par_chunks(f)))
                .with_min_len(super::rows_per_task(width))
                .for_each(|(dh, (h, da))| {
                    simd::run(
                        #[inline(always)]
                        || activate_backward(act, h, da, dh),
                    )
                });
            dx[b0 * din..(b0 + n) * din].copy_from_slice(&one.dx(&dh, &we, din));
            for (j, dw) in dws.iter_mut().enumerate() {
                dw[e * f * din..(e + 1) * f * din].copy_from_slice(&one.dw(&dh, xe, j, din));
            }
        }
        (dx, dws)
    }

    fn run_forward(
        &self, xs: &CpuStorage, xl: &Layout, ws: &[&[f32]],
    ) -> Result<(CpuStorage, Shape)> {
        let (r, din) = xl.shape().dims2()?;
        Ok((
            CpuStorage::F32(self.forward(slice(xs, xl)?, ws, din)),
            Shape::from((r, self.grouped.outs[0])),
        ))
    }

    /// Gradients for `x` and the stacks, computed on the host from the tensors' storage.
    fn run_backward(
        &self, x: &Tensor, ws: &[&Tensor], da: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let da = da.contiguous()?;
        let guards: Vec<_> = [x, &da]
            .into_iter()
            .chain(ws.iter().copied())
            .map(|t| t.storage_and_layout())
            .collect();
        let host = |i: usize| -> Result<&[f32]> {
            match &*guards[i].0 {
                Storage::Cpu(c) => slice(c, guards[i].1),
                _ => candle_core::bail!("grouped_up: CPU tensors only"),
            }
        };
        let w_slices: Vec<&[f32]> = (2..guards.len()).map(host).collect::<Result<_>>()?;
        let din = x.dim(1)?;
        let (dx, dws) = self.backward(host(0)?, &w_slices, host(1)?, din);
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dws = dws
            .into_iter()
            .zip(ws)
            .map(|(d, w)| Tensor::from_vec(d, w.shape(), w.device()))
            .collect::<Result<_>>()?;
        Ok((dx, dws))
    }
}

/// One row: `h` (gate then up columns for SwiGLU) → `a`, exactly as the plain ops compute it.
#[inline(always)]
fn activate(act: Activation, h: &[f32], a: &mut [f32]) {
    match act {
        Activation::Swiglu => swiglu_row(h, a),
        Activation::Gelu => a.iter_mut().zip(h).for_each(|(a, &v)| {
            *a = (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                * 0.5
                * v
        }),
        Activation::Relu => a.iter_mut().zip(h).for_each(|(a, &v)| *a = v.max(0.0)),
    }
}

/// One row: `dh = da · ∂a/∂h`.
#[inline(always)]
fn activate_backward(act: Activation, h: &[f32], da: &[f32], dh: &mut [f32]) {
    match act {
        Activation::Swiglu => swiglu_row_backward(h, da, dh),
        Activation::Gelu => {
            for i in 0..da.len() {
                let v = h[i];
                let cdf = 0.5
                    * (1.0 + candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * v * v).exp() * 0.398_942_3; // 1/√(2π)
                dh[i] = da[i] * (cdf + v * pdf);
            }
        }
        Activation::Relu => {
            for i in 0..da.len() {
                dh[i] = if h[i] > 0.0 { da[i] } else { 0.0 };
            }
        }
    }
}

impl CustomOp2 for GroupedUp {
    fn name(&self) -> &'static str {
        "grouped-up"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run_forward(xs, xl, &[slice(ws, wl)?])
    }

    fn bwd(
        &self, x: &Tensor, up: &Tensor, _a: &Tensor, da: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, mut dws) = self.run_backward(x, &[up], da)?;
        Ok((Some(dx), dws.pop()))
    }
}

impl CustomOp3 for GroupedUp {
    fn name(&self) -> &'static str {
        "grouped-up-swiglu"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, g: &CpuStorage, gl: &Layout, u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run_forward(xs, xl, &[slice(g, gl)?, slice(u, ul)?])
    }

    fn bwd(
        &self, x: &Tensor, gate: &Tensor, up: &Tensor, _a: &Tensor, da: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dws) = self.run_backward(x, &[gate, up], da)?;
        let mut dws = dws.into_iter();
        Ok((Some(dx), dws.next(), dws.next()))
    }
}

/// An expert's index, its rows, and a buffer's slice of those rows.
type ExpertRows<'a> = (usize, Range<usize>, &'a mut [f32]);

/// The product of `x` with one or two weight stacks of output widths `outs`, on `kernel`, its
/// backward products too (the kernel of the forward, whatever [`Kernel::current`] says then).
#[derive(Clone)]
struct Grouped {
    offsets: Arc<Vec<usize>>,
    outs: Vec<usize>,
    kernel: Kernel,
}

impl Grouped {
    fn new(kernel: Kernel, offsets: &[usize], ws: &[&Tensor]) -> Result<Grouped> {
        Ok(Grouped {
            offsets: Arc::new(offsets.to_vec()),
            outs: ws.iter().map(|w| w.dim(1)).collect::<Result<_>>()?,
            kernel,
        })
    }

    fn width(&self) -> usize {
        self.outs.iter().sum()
    }

    /// Column offset of stack `j` in the output.
    fn column(&self, j: usize) -> usize {
        self.outs[..j].iter().sum()
    }

    /// Whether the experts run side by side (see the module doc): then each product runs on
    /// one thread.
    fn side_by_side(&self) -> bool {
        let active = self.offsets.windows(2).filter(|b| b[1] > b[0]).count();
        active >= rayon::current_num_threads()
    }

    /// Each expert that has rows: its index, its rows, and those rows of `buf` (`width` floats
    /// a row) as a slice of their own, so that the experts can be computed side by side.
    fn per_expert<'a>(&self, buf: &'a mut [f32], width: usize) -> Vec<ExpertRows<'a>> {
        let mut rest = buf;
        let mut out = Vec::new();
        for (e, b) in self.offsets.windows(2).enumerate() {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut((b[1] - b[0]) * width);
            rest = tail;
            if b[1] > b[0] {
                out.push((e, b[0]..b[1], mine));
            }
        }
        out
    }

    /// `y[rows of e, cols of j] = x_e · W_jeᵀ` for every expert and stack.
    fn forward(&self, x: &[f32], ws: &[&[f32]], din: usize) -> Vec<f32> {
        let (r, width) = (x.len() / din.max(1), self.width());
        // SAFETY: the experts' rows partition the rows (`check`), and each stack writes its
        // columns of every row without reading them.
        unsafe {
            fresh(r * width, |y| {
                let parallel = !self.side_by_side();
                self.per_expert(y, width).into_par_iter().for_each(|(e, rows, y)| {
                    for (j, &dout) in self.outs.iter().enumerate() {
                        gemm_into(
                            self.kernel,
                            (rows.len(), dout, din),
                            &mut y[self.column(j)..],
                            width,
                            false,
                            &x[rows.start * din..rows.end * din],
                            (din, 1),
                            &ws[j][e * dout * din..(e + 1) * dout * din],
                            (1, din),
                            parallel,
                        );
                    }
                })
            })
        }
    }

    /// `dx_r = Σ_j dy_r[cols of j] · W_je`.
    fn dx(&self, g: &[f32], ws: &[&[f32]], din: usize) -> Vec<f32> {
        let width = self.width();
        let r = g.len() / width.max(1);
        // SAFETY: the experts' rows partition the rows (`check`); the first stack writes every
        // row without reading it, the others add to what it wrote.
        unsafe {
            fresh(r * din, |dx| {
                let parallel = !self.side_by_side();
                self.per_expert(dx, din).into_par_iter().for_each(|(e, rows, dx)| {
                    for (j, &dout) in self.outs.iter().enumerate() {
                        gemm_into(
                            self.kernel,
                            (rows.len(), din, dout),
                            dx,
                            din,
                            j > 0,
                            &g[rows.start * width + self.column(j)..],
                            (width, 1),
                            &ws[j][e * dout * din..(e + 1) * dout * din],
                            (din, 1),
                            parallel,
                        );
                    }
                })
            })
        }
    }

    /// `dW_je = Σ_{r in e} dy_r[cols of j]ᵀ · x_r`; experts without rows get zeros.
    fn dw(&self, g: &[f32], x: &[f32], j: usize, din: usize) -> Vec<f32> {
        let (width, dout, col) = (self.width(), self.outs[j], self.column(j));
        let e_count = self.offsets.len() - 1;
        let parallel = !self.side_by_side();
        // SAFETY: every expert's block is written: by its product, or with zeros. Not zeroing
        // the whole stack first saves a pass over every expert's weights (MoT's experts all
        // have rows).
        unsafe {
            fresh(e_count * dout * din, |dw| {
                dw.par_chunks_mut((dout * din).max(1)).zip(self.offsets.par_windows(2)).for_each(
                    |(dst, b)| match b[1] > b[0] {
                        true => gemm_into(
                            self.kernel,
                            (dout, din, b[1] - b[0]),
                            dst,
                            din,
                            false,
                            &g[b[0] * width + col..],
                            (1, width),
                            &x[b[0] * din..b[1] * din],
                            (din, 1),
                            parallel,
                        ),
                        false => dst.fill(0.0),
                    },
                )
            })
        }
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
        let dws = (0..ws.len())
            .map(|j| g.apply_op2_no_bwd(x, &GroupedDw { op: self.clone(), j }))
            .collect::<Result<_>>()?;
        Ok((dx, dws))
    }
}

impl CustomOp2 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        Ok((
            CpuStorage::F32(self.forward(slice(xs, xl)?, &[slice(ws, wl)?], din)),
            self.output_shape(xl)?,
        ))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, mut dws) = self.backward(x, &[w], g)?;
        Ok((Some(dx), dws.pop()))
    }
}

impl CustomOp3 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul-cat"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, a: &CpuStorage, al: &Layout, b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        Ok((
            CpuStorage::F32(self.forward(slice(xs, xl)?, &[slice(a, al)?, slice(b, bl)?], din)),
            self.output_shape(xl)?,
        ))
    }

    fn bwd(
        &self, x: &Tensor, a: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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

    fn cpu_fwd(
        &self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(slice(gs, gl)?, &[slice(ws, wl)?], wl)
    }
}

impl CustomOp3 for GroupedDx {
    fn name(&self) -> &'static str {
        "grouped-matmul-cat-dx"
    }

    fn cpu_fwd(
        &self, gs: &CpuStorage, gl: &Layout, a: &CpuStorage, al: &Layout, b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
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

    fn cpu_fwd(
        &self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        let dw = self.op.dw(slice(gs, gl)?, slice(xs, xl)?, self.j, din);
        Ok((
            CpuStorage::F32(dw),
            Shape::from((self.op.offsets.len() - 1, self.op.outs[self.j], din)),
        ))
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
        assert_close(
            &grouped_matmul(&x, &w, &OFFSETS).unwrap(),
            &grouped_matmul_reference(&x, &w, &OFFSETS).unwrap(),
            1e-5,
        );
        check_grads(
            &[x, w],
            |v| grouped_matmul(&v[0], &v[1], &OFFSETS),
            |v| grouped_matmul_reference(&v[0], &v[1], &OFFSETS),
        );
    }

    #[test]
    fn two_stacks_side_by_side_match_the_concatenated_weights() {
        let x = randn(&[9, 4], 1);
        let (a, b) = (randn(&[4, 3, 4], 2), randn(&[4, 5, 4], 3));
        let reference = |v: &[Tensor]| {
            grouped_matmul_reference(&v[0], &Tensor::cat(&[&v[1], &v[2]], 1)?, &OFFSETS)
        };
        assert_close(
            &grouped_matmul_cat(&x, &a, &b, &OFFSETS).unwrap(),
            &reference(&[x.clone(), a.clone(), b.clone()]).unwrap(),
            1e-5,
        );
        check_grads(&[x, a, b], |v| grouped_matmul_cat(&v[0], &v[1], &v[2], &OFFSETS), reference);
    }

    /// On AMX tiles, forward and both gradients against the f32 kernel within bf16 rounding:
    /// experts side by side (each product on one thread) and one expert across the pool.
    #[test]
    fn amx_products_match_the_f32_kernel_within_bf16_rounding() {
        if !crate::ops::amx::available() {
            eprintln!("skipped: this CPU has no AMX bf16 tiles");
            return;
        }
        use candle_core::Var;
        let side_by_side: Vec<usize> = (0..=8).map(|e| e * 40 - e % 3).collect();
        for offsets in [side_by_side, vec![0, 0, 300, 300]] {
            let (e, r) = (offsets.len() - 1, offsets[offsets.len() - 1]);
            let vars = [randn(&[r, 70], 1), randn(&[e, 50, 70], 2), randn(&[e, 40, 70], 3)]
                .map(|t| Var::from_tensor(&t).unwrap());
            let p = randn(&[r, 90], 4);
            let run = |kernel| {
                let [x, a, b] = vars.each_ref().map(|v| v.as_tensor());
                let y = grouped_matmul_cat_on(kernel, x, a, b, &offsets).unwrap();
                let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                [y, g.get(x).unwrap().clone(), g.get(a).unwrap().clone(), g.get(b).unwrap().clone()]
            };
            for (got, want) in run(Kernel::Amx).iter().zip(run(Kernel::F32)) {
                let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let err = err.to_scalar::<f32>().unwrap();
                assert!(err <= 2e-2 * scale, "{offsets:?}: max |Δ| {err}, scale {scale}");
            }
        }
    }

    /// The recomputing op against the plain ops it replaces, forward and gradients, for each
    /// activation.
    #[test]
    fn grouped_up_matches_the_plain_ops() {
        let x = randn(&[9, 4], 1);
        let (g, u) = (randn(&[4, 3, 4], 2), randn(&[4, 3, 4], 3));
        let swiglu_ref = |v: &[Tensor]| {
            crate::ops::swiglu::swiglu_reference(&grouped_matmul_cat(
                &v[0], &v[1], &v[2], &OFFSETS,
            )?)
        };
        let fused =
            |v: &[Tensor]| grouped_up(&v[0], Some(&v[1]), &v[2], Activation::Swiglu, &OFFSETS);
        assert_close(
            &fused(&[x.clone(), g.clone(), u.clone()]).unwrap(),
            &swiglu_ref(&[x.clone(), g.clone(), u.clone()]).unwrap(),
            1e-5,
        );
        check_grads(&[x.clone(), g, u.clone()], fused, swiglu_ref);
        for (act, plain) in [
            (Activation::Gelu, Tensor::gelu_erf as fn(&Tensor) -> Result<Tensor>),
            (Activation::Relu, Tensor::relu),
        ] {
            let reference =
                |v: &[Tensor]| plain(&grouped_matmul_reference(&v[0], &v[1], &OFFSETS)?);
            let fused = |v: &[Tensor]| grouped_up(&v[0], None, &v[1], act, &OFFSETS);
            assert_close(
                &fused(&[x.clone(), u.clone()]).unwrap(),
                &reference(&[x.clone(), u.clone()]).unwrap(),
                1e-5,
            );
            check_grads(&[x.clone(), u.clone()], fused, reference);
        }
    }

    #[test]
    fn bad_offsets_are_an_error() {
        assert!(grouped_matmul(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &[0, 2, 2]).is_err());
        // Rows before the first expert's would belong to no expert.
        assert!(grouped_matmul(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &[1, 2, 3]).is_err());
        assert!(grouped_matmul_cat(
            &randn(&[3, 2], 1),
            &randn(&[2, 2, 2], 2),
            &randn(&[2, 2, 3], 2),
            &[0, 2, 3]
        )
        .is_err());
    }
}
