//! A `Linear`'s product `x·Wᵀ` as one op with its backward, so that on the CPU its forward,
//! its input gradient and its weight gradient all run on motrain's kernels
//! ([`super::product`]): f32 gemm in blocks that idle threads steal, or bf16 ([`super::bf16`]) under
//! `run.dtype = "bf16"`. The weight gradient `dYᵀ·X` comes out `[out, in]` as the weight is
//! stored, where candle's matmul backward computes `Xᵀ·dY` and then copies its transpose.

use super::squares::Slot;
use super::{product, weight_gradient, Kernel};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// A 2-D operand as gemm reads it: its elements from the layout's start, `[rows, cols]` and
/// (row stride, column stride).
type Operand<'a> = (&'a [f32], (usize, usize), (usize, usize));

/// A tensor's storage as an [`Operand`]; `transpose` reads it as its transpose, without a copy.
fn operand<'a>(s: &'a CpuStorage, l: &Layout, transpose: bool) -> Result<Operand<'a>> {
    let data = &s.as_slice::<f32>()?[l.start_offset()..];
    let (dims, strides) = (l.dims(), l.stride());
    if dims.len() != 2 {
        candle_core::bail!("linear product takes 2-D tensors, got {dims:?}");
    }
    let (rows, cols, rs, cs) = (dims[0], dims[1], strides[0], strides[1]);
    Ok(if transpose { (data, (cols, rows), (cs, rs)) } else { (data, (rows, cols), (rs, cs)) })
}

/// `a [M, K] · bᵀ` with `b [N, K]` (`transpose_b`), or `a · b` with `b [K, N]`.
struct MatMul {
    transpose_b: bool,
    kernel: Kernel,
    /// Some for a weight gradient: streamed, and its `Σ x²` left here where the kernel counts
    /// it ([`super::squares`]).
    gradient: Option<Slot>,
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "linear-product"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.kernel == Kernel::Bf16 && super::bf16::engine().is_none() {
            candle_core::bail!(
                "bf16 matmuls on the CPU need a bf16 dot product, which this CPU lacks"
            );
        }
        let (a, (m, k), a_strides) = operand(s1, l1, false)?;
        let (b, (k2, n), b_strides) = operand(s2, l2, self.transpose_b)?;
        if k != k2 {
            candle_core::bail!("linear product: [{m}, {k}] · [{k2}, {n}]");
        }
        let c = match &self.gradient {
            Some(slot) => {
                let (c, sum) = weight_gradient(self.kernel, (m, n, k), a, a_strides, b, b_strides);
                slot.put(sum);
                c
            }
            None => product(self.kernel, (m, n, k), a, a_strides, b, b_strides),
        };
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self, a: &Tensor, b: &Tensor, _c: &Tensor, dc: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let kernel = self.kernel;
        // Only `matmul_t` records this op for a backward pass (the backward's own products, in
        // either form, run without a graph), so the product here is always C = A·Bᵀ.
        if !self.transpose_b {
            candle_core::bail!("linear product: only A·Bᵀ (matmul_t) has a backward");
        }
        // dA = dC·B, dB = dCᵀ·A.
        let da = dc.apply_op2_no_bwd(b, &MatMul { transpose_b: false, kernel, gradient: None })?;
        let op = MatMul { transpose_b: false, kernel, gradient: Some(Slot::default()) };
        let db = dc.t()?.apply_op2_no_bwd(a, &op)?;
        if let Some(slot) = &op.gradient {
            slot.note_on(&db);
        }
        Ok((Some(da), Some(db)))
    }
}

/// `x [N, in] · wᵀ` with `w [out, in]`: a `Linear`'s product, on the kernel f32 matmuls run on
/// now ([`Kernel::current`]). CPU f32 tensors only (see [`super::fused`]).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_t_on(Kernel::current(), x, w)
}

/// [`matmul_t`] on a given kernel.
pub fn matmul_t_on(kernel: Kernel, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(w, MatMul { transpose_b: true, kernel, gradient: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::randn;
    use candle_core::{DType, Var};

    /// Forward and both gradients against candle's matmul, at shapes that run as one gemm and
    /// as blocks of rows (m ≥ 512 on two threads or more), with both gradients' blocks too.
    #[test]
    fn f32_product_and_gradients_match_candle() {
        for (m, k, n) in [(3, 5, 2), (37, 50, 29), (600, 64, 96), (80, 300, 700), (1100, 40, 200)] {
            let (x, w) = (
                Var::from_tensor(&randn(&[m, k], 1)).unwrap(),
                Var::from_tensor(&randn(&[n, k], 2)).unwrap(),
            );
            let p = randn(&[m, n], 3);
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                let y = f(x.as_tensor(), w.as_tensor());
                let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = g.get(x.as_tensor()).unwrap().clone();
                [y, dx, g.get(w.as_tensor()).unwrap().clone()]
            };
            let ours = run(&|x, w| matmul_t_on(Kernel::F32, x, w).unwrap());
            let want = run(&|x, w| x.matmul(&w.t().unwrap()).unwrap());
            for (name, (got, want)) in ["y", "dx", "dw"].iter().zip(ours.iter().zip(&want)) {
                assert_eq!(got.dims(), want.dims(), "{name} {m}x{k}x{n}");
                let (got, want) = (got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
                for (i, (g, w)) in got.iter().flatten().zip(want.iter().flatten()).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{name} {m}x{k}x{n} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// In blocks of rows across threads or in one gemm, every element is the same dot product
    /// bit for bit, so a run's losses do not depend on the thread count.
    #[test]
    fn f32_product_does_not_depend_on_the_thread_count() {
        let (x, w) = (randn(&[1100, 300], 4), randn(&[700, 300], 5));
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| matmul_t_on(Kernel::F32, &x, &w).unwrap().to_vec2::<f32>().unwrap())
        };
        let one = on(1);
        for threads in [2, 3, 4] {
            assert!(on(threads) == one, "{threads} threads");
        }
    }

    /// On each bf16 engine: gradients of Σ (a·bᵀ)∘P equal f32 autograd's within bf16 rounding.
    #[test]
    fn bf16_gradients_match_the_f32_product_within_bf16_rounding() {
        use crate::ops::bf16::{engines, with_engine};
        // Off the tile edges (padding), and on them (packing writes every element itself).
        for (engine, (m, k, n)) in
            engines().into_iter().flat_map(|e| [(37, 50, 29), (256, 64, 96)].map(|s| (e, s)))
        {
            let (a, b) = (
                Var::from_tensor(&randn(&[m, k], 3)).unwrap(),
                Var::from_tensor(&randn(&[n, k], 4)).unwrap(),
            );
            let p = randn(&[m, n], 5);
            let grads = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                let g = (f(a.as_tensor(), b.as_tensor()) * &p)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (g.get(a.as_tensor()).unwrap().clone(), g.get(b.as_tensor()).unwrap().clone())
            };
            let (da, db) =
                with_engine(engine, || grads(&|a, b| matmul_t_on(Kernel::Bf16, a, b).unwrap()));
            let (ra, rb) = grads(&|a, b| a.matmul(&b.t().unwrap()).unwrap());
            for (got, want) in [(da, ra), (db, rb)] {
                let err = (&got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    err <= 2e-2 * scale,
                    "{engine:?}: max |Δ| {err} against a scale of {scale}"
                );
                assert_eq!(got.dtype(), DType::F32);
            }
        }
    }
}
