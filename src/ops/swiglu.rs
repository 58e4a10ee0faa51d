//! SwiGLU's gate, `silu(g) · u`, fused with its backward.

use super::{fused, slice, vec};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused(&[g, u]) {
        g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
    } else {
        swiglu_reference(g, u)
    }
}

pub fn swiglu_reference(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

const CHUNK: usize = 4096;

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(gs, gl)?, slice(us, ul)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
            for i in 0..y.len() {
                y[i] = g[i] * vec::sigmoid(g[i]) * u[i];
            }
        });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluBwd)?;
        let dg = both.narrow(0, 0, 1)?.reshape(g.shape())?;
        let du = both.narrow(0, 1, 1)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// Returns `[2, n]`: dg then du.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout, ds: &CpuStorage, dl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u, d) = (slice(gs, gl)?, slice(us, ul)?, slice(ds, dl)?);
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
            let o = c * CHUNK;
            for i in 0..dg.len() {
                let (gi, ui, di) = (g[o + i], u[o + i], d[o + i]);
                let s = vec::sigmoid(gi);
                // d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))
                dg[i] = di * ui * s * (1.0 + gi * (1.0 - s));
                du[i] = di * gi * s;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn swiglu_matches_reference_and_gradients() {
        let g = randn(&[5, 9], 1);
        let u = randn(&[5, 9], 2);
        assert_close(&swiglu(&g, &u).unwrap(), &swiglu_reference(&g, &u).unwrap(), 1e-6);
        check_grads(&[g, u], |v| swiglu(&v[0], &v[1]), |v| swiglu_reference(&v[0], &v[1]));
    }
}
