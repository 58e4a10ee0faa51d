//! The output head and the loss in one op: `mean CE(x·Wᵀ, targets)`. Because the loss is the
//! last node of the graph, its gradient is computed in the same pass — the logits buffer is
//! turned in place into `softmax − onehot`, then `dx = dL·W` and `dW = dLᵀ·x` — and the
//! backward only scales it by the incoming scalar. The `[N, V]` logits (the largest tensor of
//! a step) are thus written once and read twice, never copied, zero-filled or accumulated by
//! the autograd.

use super::{fused, product, simd, slice, squares, vec, weight_gradient};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// `x [N, d]`, `w [V, d]`, `targets [N]` → scalar mean cross-entropy of `x·Wᵀ`.
/// With `with_grad = false` (eval) only the loss is computed; a gradient nothing will use (its
/// input is outside the autograd graph: a frozen head) is not computed either.
pub fn linear_cross_entropy(
    x: &Tensor, w: &Tensor, targets: &Tensor, with_grad: bool,
) -> Result<Tensor> {
    if fused(&[x, w]) {
        fused_linear_ce(x, w, targets, with_grad, None)
    } else {
        cross_entropy(&x.matmul(&w.t()?)?, targets)
    }
}

/// [`linear_cross_entropy`], and each row's loss `logsumexp − logit[target]` from the same
/// pass: what a mixture of data sources needs to report a loss per source.
pub fn linear_cross_entropy_rows(
    x: &Tensor, w: &Tensor, targets: &Tensor, with_grad: bool,
) -> Result<(Tensor, Vec<f32>)> {
    if fused(&[x, w]) {
        let rows = Arc::new(Mutex::new(Vec::new()));
        let loss = fused_linear_ce(x, w, targets, with_grad, Some(rows.clone()))?;
        let rows = std::mem::take(&mut *rows.lock().unwrap());
        Ok((loss, rows))
    } else {
        let rows = row_cross_entropy(&x.matmul(&w.t()?)?, targets)?;
        Ok((rows.mean_all()?, rows.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?))
    }
}

fn fused_linear_ce(
    x: &Tensor, w: &Tensor, targets: &Tensor, with_grad: bool, rows: Option<RowLosses>,
) -> Result<Tensor> {
    let op = LinearCrossEntropy {
        with_grad,
        dx: x.track_op(),
        dw: w.track_op(),
        grads: Mutex::new(None),
        rows,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &targets.to_dtype(DType::U32)?.contiguous()?, op)
}

/// The plain formulation: mean of `logsumexp(row) − row[target]`, in f32 at least (bf16 logits
/// are widened; f64 stays f64 for the gradient checks).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    row_cross_entropy(logits, targets)?.mean_all()
}

/// `logsumexp(row) − row[target]` of each row, `[N, 1]`.
fn row_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits =
        if logits.dtype() == DType::F64 { logits.clone() } else { logits.to_dtype(DType::F32)? };
    let max = logits.max_keepdim(1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    lse - picked
}

/// Where the fused op leaves each row's loss when asked to.
type RowLosses = Arc<Mutex<Vec<f32>>>;

struct LinearCrossEntropy {
    with_grad: bool,
    /// Which of the two gradients to compute.
    dx: bool,
    dw: bool,
    grads: Mutex<Option<Grads>>,
    rows: Option<RowLosses>,
}

/// `dx` and `dW` of a forward pass, each if it was asked for; with `dW`, its `Σ x²` where the
/// kernel counted it ([`squares`]).
type Grads = (Option<Vec<f32>>, Option<(Vec<f32>, Option<f64>)>);

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let Some((a, b)) = tl.contiguous_offsets() else {
            candle_core::bail!("linear-cross-entropy: targets must be contiguous")
        };
        let targets = &ts.as_slice::<u32>()?[a..b];
        let (n, d) = xl.shape().dims2()?;
        let (v, d2) = wl.shape().dims2()?;
        if d != d2 || targets.len() != n {
            candle_core::bail!(
                "linear-cross-entropy: x {:?}, w {:?}, {} targets",
                xl.shape(),
                wl.shape(),
                targets.len()
            );
        }
        if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target {t} is not below the vocabulary size {v}");
        }
        let kernel = super::Kernel::current();
        // logits = x·Wᵀ, then one pass per row: log-sum-exp, the loss, and (training) the
        // logits turned in place into dL/dlogits = (softmax − onehot)/N.
        let mut logits = product(kernel, (n, v, d), x, (d, 1), w, (1, d));
        let (inv_n, fma) = (1.0 / n as f32, simd::level().fma());
        let losses: Vec<f32> = logits
            .par_chunks_mut(v)
            .zip(targets.par_iter())
            .with_min_len(super::rows_per_task(v))
            .map(|(row, &t)| {
                simd::run(
                    #[inline(always)]
                    || {
                        let t = t as usize;
                        let m = vec::max(row);
                        let lse = m + vec::sum_exp_shifted(row, m, fma).ln();
                        let loss = lse - row[t];
                        if self.with_grad {
                            vec::exp_shifted_times(row, lse, inv_n, fma);
                            row[t] -= inv_n;
                        }
                        loss
                    },
                )
            })
            .collect();
        if self.with_grad {
            let dl = &logits;
            // dL·W.
            let dx = self.dx.then(|| product(kernel, (n, d, v), dl, (v, 1), w, (d, 1)));
            // dLᵀ·x: a weight gradient.
            let dw = self.dw.then(|| weight_gradient(kernel, (v, d, n), dl, (1, v), x, (d, 1)));
            *self.grads.lock().unwrap() = Some((dx, dw));
        }
        // Summed in f64 and in row order, so the loss does not depend on threads.
        let total: f64 = losses.iter().map(|&l| l as f64).sum();
        if let Some(rows) = &self.rows {
            *rows.lock().unwrap() = losses;
        }
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _t: &Tensor, _loss: &Tensor, grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((dx, dw)) = self.grads.lock().unwrap().take() else {
            candle_core::bail!("linear-cross-entropy: backward of a forward run without gradients")
        };
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let scale = |t: Tensor| if g == 1.0 { Ok(t) } else { t * g };
        let dx = dx.map(|dx| scale(Tensor::from_vec(dx, x.shape(), x.device())?)).transpose()?;
        let dw = match dw {
            Some((dw, sum)) => {
                let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
                // Scaled, it is another tensor with other squares: that one is read.
                if let (Some(sum), 1.0) = (sum, g) {
                    squares::note(&dw, sum);
                }
                Some(scale(dw)?)
            }
            None => None,
        };
        Ok((dx, dw, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};
    use candle_core::Device;

    #[test]
    fn out_of_range_target_is_an_error() {
        let t = Tensor::new(&[5u32], &Device::Cpu).unwrap();
        assert!(linear_cross_entropy(&randn(&[1, 2], 1), &randn(&[4, 2], 2), &t, true).is_err());
    }

    #[test]
    fn matches_matmul_then_cross_entropy() {
        // 70 rows: several chunks and groups, the last ones partial.
        let x = randn(&[70, 8], 1);
        let w = randn(&[13, 8], 2);
        let t: Vec<u32> = (0..70).map(|i| (i * 7 % 13) as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let reference = cross_entropy(&x.matmul(&w.t().unwrap()).unwrap(), &t).unwrap();
        assert_close(&linear_cross_entropy(&x, &w, &t, false).unwrap(), &reference, 1e-5);
        let t2 = t.clone();
        check_grads(
            &[x, w],
            |v| linear_cross_entropy(&v[0], &v[1], &t, true),
            move |v| cross_entropy(&v[0].matmul(&v[1].t()?)?, &t2),
        );
    }

    #[test]
    fn row_losses_are_each_rows_cross_entropy_and_average_to_the_loss() {
        let (n, d, v) = (37, 6, 11);
        let (x, w) = (randn(&[n, d], 3), randn(&[v, d], 4));
        let targets: Vec<u32> = (0..n).map(|i| (i * 5 % v) as u32).collect();
        let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        // Independently, in f64 on the host: logsumexp of x·wᵀ minus the target logit.
        let (xs, ws) = (x.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let expect: Vec<f64> = (0..n)
            .map(|r| {
                let logits: Vec<f64> = (0..v)
                    .map(|c| (0..d).map(|k| xs[r][k] as f64 * ws[c][k] as f64).sum())
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln()
                    - logits[targets[r] as usize]
            })
            .collect();
        for with_grad in [false, true] {
            let (loss, rows) = linear_cross_entropy_rows(&x, &w, &t, with_grad).unwrap();
            assert_eq!(rows.len(), n);
            for (r, (&got, want)) in rows.iter().zip(&expect).enumerate() {
                assert!((got as f64 - want).abs() < 1e-4, "row {r}: {got} vs {want}");
            }
            let mean = rows.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
            let loss = loss.to_scalar::<f32>().unwrap();
            assert_eq!(loss, mean as f32, "the loss is the mean of the rows");
            let plain = linear_cross_entropy(&x, &w, &t, with_grad).unwrap();
            assert_eq!(plain.to_scalar::<f32>().unwrap(), loss);
        }
        // The plain formulation (other devices) gives the rows too.
        let logits = x.matmul(&w.t().unwrap()).unwrap();
        let rows = row_cross_entropy(&logits, &t).unwrap().flatten_all().unwrap();
        let rows = rows.to_vec1::<f32>().unwrap();
        for (got, want) in rows.iter().zip(&expect) {
            assert!((*got as f64 - want).abs() < 1e-4);
        }
    }
}
