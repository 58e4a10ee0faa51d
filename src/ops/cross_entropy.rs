//! Mean token cross-entropy from logits, in f32 with log-sum-exp, fused with its backward
//! (`softmax − onehot`). The forward keeps each row's log-sum-exp for the backward.

use super::{fused, rows_per_task, slice, vec};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// `logits [N, V]`, `targets [N]` (u32) → scalar mean of `lse(row) − row[target]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(&[logits]) {
        logits.contiguous()?.apply_op2(&targets.to_dtype(DType::U32)?.contiguous()?, CrossEntropy { lse: Mutex::new(Vec::new()) })
    } else {
        cross_entropy_reference(logits, targets)
    }
}

pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    // f32 at least (bf16 logits are widened); f64 stays f64 for the gradient checks.
    let logits = if logits.dtype() == DType::F64 { logits.clone() } else { logits.to_dtype(DType::F32)? };
    let max = logits.max_keepdim(1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    (lse - picked)?.mean_all()
}

struct CrossEntropy {
    lse: Mutex<Vec<f32>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let t = s.as_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&t[a..b]),
        None => candle_core::bail!("cross-entropy: targets must be contiguous"),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, targets) = (slice(ls, ll)?, targets_of(ts, tl)?);
        let (n, v) = ll.shape().dims2()?;
        if targets.len() != n {
            candle_core::bail!("cross-entropy: {n} rows of logits but {} targets", targets.len());
        }
        if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} is not below the vocabulary size {v}");
        }
        let lse: Vec<f32> = logits
            .par_chunks(v)
            .with_min_len(rows_per_task(v))
            .map(|row| {
                let m = vec::max(row);
                m + vec::sum_exp_shifted(row, m).ln()
            })
            .collect();
        // Summed in f64 and in row order, so the loss does not depend on threads.
        let total: f64 = lse.iter().zip(targets).enumerate().map(|(r, (l, &t))| (l - logits[r * v + t as usize]) as f64).sum();
        *self.lse.lock().unwrap() = lse;
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let lse = std::mem::take(&mut *self.lse.lock().unwrap());
        let d = logits.apply_op2_no_bwd(targets, &CrossEntropyBwd { lse, scale })?;
        Ok((Some(d), None))
    }
}

struct CrossEntropyBwd {
    lse: Vec<f32>,
    scale: f32,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, targets) = (slice(ls, ll)?, targets_of(ts, tl)?);
        let (n, v) = ll.shape().dims2()?;
        let c = self.scale / n as f32;
        let mut d = vec![0f32; logits.len()];
        d.par_chunks_mut(v).zip(logits.par_chunks(v)).enumerate().with_min_len(rows_per_task(v)).for_each(|(r, (dr, lr))| {
            let lse = self.lse[r];
            for i in 0..v {
                dr[i] = c * vec::exp(lr[i] - lse);
            }
            dr[targets[r] as usize] -= c;
        });
        Ok((CpuStorage::F32(d), ll.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_reference_and_gradients() {
        let logits = (randn(&[6, 11], 1) * 3.0).unwrap();
        let t = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu).unwrap();
        assert_close(&cross_entropy(&logits, &t).unwrap(), &cross_entropy_reference(&logits, &t).unwrap(), 1e-6);
        let t2 = t.clone();
        check_grads(&[logits], |v| cross_entropy(&v[0], &t), move |v| cross_entropy_reference(&v[0], &t2));
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let t = Tensor::new(&[5u32], &Device::Cpu).unwrap();
        assert!(cross_entropy(&randn(&[1, 4], 1), &t).is_err());
    }
}
