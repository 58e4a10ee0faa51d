//! The output head and the loss in one op: `mean CE(x·Wᵀ, targets)` computed chunk by chunk,
//! so the `[N, V]` logits never exist in memory. Because the loss is the last node of the
//! graph, its gradient is computed in the same pass (softmax − onehot, then `dx = dL·W` and
//! `dW = dLᵀ·x` per chunk) and the backward only scales it by the incoming scalar.

use super::{fused, slice, vec};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// `x [N, d]`, `w [V, d]`, `targets [N]` → scalar mean cross-entropy of `x·Wᵀ`.
/// With `with_grad = false` (eval) only the loss is computed.
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor, with_grad: bool) -> Result<Tensor> {
    if fused(&[x, w]) {
        let op = LinearCrossEntropy { with_grad, grads: Mutex::new(None) };
        x.contiguous()?.apply_op3(&w.contiguous()?, &targets.to_dtype(DType::U32)?.contiguous()?, op)
    } else {
        super::cross_entropy::cross_entropy_reference(&x.matmul(&w.t()?)?, targets)
    }
}

/// Rows per chunk: a `[ROWS, V]` block of logits stays in cache.
const ROWS: usize = 128;
fn rows() -> usize { std::env::var("LCE_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(ROWS) }
/// Row groups, each with its own dW accumulator; fixed so results do not depend on threads.
const GROUPS: usize = 4;

struct LinearCrossEntropy {
    with_grad: bool,
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, each given by (row stride, column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n, "sgemm: destination too small");
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "sgemm: lhs too small");
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "sgemm: rhs too small");
    // SAFETY: the asserts above bound every index gemm touches.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let Some((a, b)) = tl.contiguous_offsets() else { candle_core::bail!("linear-cross-entropy: targets must be contiguous") };
        let targets = &ts.as_slice::<u32>()?[a..b];
        let (n, d) = xl.shape().dims2()?;
        let (v, d2) = wl.shape().dims2()?;
        if d != d2 || targets.len() != n {
            candle_core::bail!("linear-cross-entropy: x {:?}, w {:?}, {} targets", xl.shape(), wl.shape(), targets.len());
        }
        if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target {t} is not below the vocabulary size {v}");
        }
        let per_group = n.div_ceil(GROUPS).max(1);
        let inv_n = 1.0 / n as f32;
        let mut dx = if self.with_grad { vec![0f32; n * d] } else { Vec::new() };
        let dx_parts: Vec<&mut [f32]> = if self.with_grad { dx.chunks_mut(per_group * d).collect() } else { Vec::new() };
        let mut dx_iter = dx_parts.into_iter();
        let groups: Vec<(usize, Option<&mut [f32]>)> = (0..n).step_by(per_group).map(|start| (start, dx_iter.next())).collect();
        // Each group: (losses of its rows, its dW).
        let results: Vec<(Vec<f32>, Vec<f32>)> = groups
            .into_par_iter()
            .map(|(start, mut dx_g)| {
                let end = (start + per_group).min(n);
                let mut losses = Vec::with_capacity(end - start);
                let mut dw = if self.with_grad { vec![0f32; v * d] } else { Vec::new() };
                let rows_n = rows(); let mut logits = vec![0f32; rows_n * v];
                for c in (start..end).step_by(rows_n) {
                    let r = rows_n.min(end - c);
                    let xc = &x[c * d..(c + r) * d];
                    let lg = &mut logits[..r * v];
                    sgemm((r, v, d), lg, false, xc, (d, 1), w, (1, d)); // x·Wᵀ
                    for (i, row) in lg.chunks_mut(v).enumerate() {
                        let t = targets[c + i] as usize;
                        let m = vec::max(row);
                        let lse = m + vec::sum_exp_shifted(row, m).ln();
                        losses.push(lse - row[t]);
                        if self.with_grad {
                            for z in row.iter_mut() {
                                *z = vec::exp(*z - lse) * inv_n;
                            }
                            row[t] -= inv_n;
                        }
                    }
                    if let Some(dxg) = dx_g.as_deref_mut() {
                        let off = (c - start) * d;
                        sgemm((r, d, v), &mut dxg[off..off + r * d], false, lg, (v, 1), w, (d, 1)); // dL·W
                        sgemm((v, d, r), &mut dw, true, lg, (1, v), xc, (d, 1)); // dLᵀ·x
                    }
                }
                (losses, dw)
            })
            .collect();
        let mut total = 0f64;
        let mut dw_sum = if self.with_grad { vec![0f32; v * d] } else { Vec::new() };
        for (losses, dw) in &results {
            total += losses.iter().map(|&l| l as f64).sum::<f64>();
            for (s, g) in dw_sum.iter_mut().zip(dw) {
                *s += g;
            }
        }
        if self.with_grad {
            *self.grads.lock().unwrap() = Some((dx, dw_sum));
        }
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _t: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((dx, dw)) = self.grads.lock().unwrap().take() else {
            candle_core::bail!("linear-cross-entropy: backward of a forward run without gradients")
        };
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let scale = |t: Tensor| if g == 1.0 { Ok(t) } else { t * g };
        let dx = scale(Tensor::from_vec(dx, x.shape(), x.device())?)?;
        let dw = scale(Tensor::from_vec(dw, w.shape(), w.device())?)?;
        Ok((Some(dx), Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cross_entropy::cross_entropy_reference;
    use crate::ops::testing::{assert_close, check_grads, randn};
    use candle_core::Device;

    #[test]
    fn matches_matmul_then_cross_entropy() {
        // 70 rows: several chunks and groups, the last ones partial.
        let x = randn(&[70, 8], 1);
        let w = randn(&[13, 8], 2);
        let t: Vec<u32> = (0..70).map(|i| (i * 7 % 13) as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let reference = cross_entropy_reference(&x.matmul(&w.t().unwrap()).unwrap(), &t).unwrap();
        assert_close(&linear_cross_entropy(&x, &w, &t, false).unwrap(), &reference, 1e-5);
        let t2 = t.clone();
        check_grads(
            &[x, w],
            |v| linear_cross_entropy(&v[0], &v[1], &t, true),
            move |v| cross_entropy_reference(&v[0].matmul(&v[1].t()?)?, &t2),
        );
    }
}
