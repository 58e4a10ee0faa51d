//! `grouped_up`: the experts' up projection and activation in one op that keeps nothing of
//! its own for the backward pass (`train.recompute_experts`). The `[R, 2f]` pre-activation is
//! most of what a MoT or MoE layer holds until backward, so the backward recomputes it one
//! expert at a time, into a buffer of one expert's rows, at the price of the up projection's
//! matmuls once more.

use super::super::swiglu::{swiglu_row, swiglu_row_backward};
use super::super::{fused, rows_per_task, simd, slice, Kernel};
use super::{check, Grouped};
use crate::config::Activation;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

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
    // It packs the weights again as it recomputes, so it keeps nothing.
    let op =
        GroupedUp { grouped: Grouped::new(Kernel::current(), offsets, &ws, false)?, activation };
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
                .with_min_len(rows_per_task(width))
                .for_each(|(a, h)| {
                    simd::run(
                        #[inline(always)]
                        || activate(act, h, a),
                    )
                });
        }
        a
    }

    /// `dx` and each stack's `dW` from `da [R, f]`, one expert at a time; with each `dW`, its
    /// `Σ x²` where the kernel counts it ([`crate::ops::squares`]), summed over the experts in
    /// order as the grouped op sums them.
    fn backward(
        &self, x: &[f32], ws: &[&[f32]], da: &[f32], din: usize,
    ) -> (Vec<f32>, Vec<Vec<f32>>, Vec<Option<f64>>) {
        let (f, width) = (self.grouped.outs[0], self.grouped.width());
        let mut dx = vec![0f32; x.len()];
        let mut dws = vec![vec![0f32; ws[0].len()]; ws.len()];
        let mut sums = vec![Some(0f64); ws.len()];
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
                .with_min_len(rows_per_task(width))
                .for_each(|(dh, (h, da))| {
                    simd::run(
                        #[inline(always)]
                        || activate_backward(act, h, da, dh),
                    )
                });
            dx[b0 * din..(b0 + n) * din].copy_from_slice(&one.dx(&dh, &we, din));
            for (j, (dw, sum)) in dws.iter_mut().zip(&mut sums).enumerate() {
                let (expert_dw, squares) = one.dw(&dh, xe, j, din);
                dw[e * f * din..(e + 1) * f * din].copy_from_slice(&expert_dw);
                *sum = sum.zip(squares).map(|(a, b)| a + b);
            }
        }
        (dx, dws, sums)
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
        let (dx, dws, sums) = self.backward(host(0)?, &w_slices, host(1)?, din);
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dws = dws
            .into_iter()
            .zip(ws)
            .zip(sums)
            .map(|((d, w), sum)| {
                let dw = Tensor::from_vec(d, w.shape(), w.device())?;
                if let Some(sum) = sum {
                    crate::ops::squares::note(&dw, sum);
                }
                Ok(dw)
            })
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
