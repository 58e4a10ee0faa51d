//! RMSNorm and LayerNorm over the last axis, one pass forward and one pass backward.
//! (candle's own fast paths cut the graph: issues #2168, #3011, #3752.)

use super::{column_sums, fresh, fused, rows_per_task, simd, slice, vec};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `w · x · rsqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_reference(x, w, eps)
    }
}

pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

/// `w · (x − mean) / sqrt(var + eps) + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w, b]) {
        x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })
    } else {
        layer_norm_reference(x, w, b, eps)
    }
}

pub fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&r)?.broadcast_mul(w)?.broadcast_add(b)
}

#[inline(always)]
fn rstd(row: &[f32], eps: f32) -> f32 {
    1.0 / (vec::dot(row, row) / row.len() as f32 + eps).sqrt()
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let d = w.len();
        // SAFETY: every row of y is written whole from x alone.
        let y = unsafe {
            fresh(x.len(), |y| {
                y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(rows_per_task(d)).for_each(
                    |(yr, xr)| {
                        simd::run(
                            #[inline(always)]
                            || {
                                let r = rstd(xr, self.eps);
                                for i in 0..d {
                                    yr[i] = w[i] * xr[i] * r;
                                }
                            },
                        )
                    },
                )
            })
        };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = x.elem_count() / w.elem_count();
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Returns `[rows + 1, d]`: dx, then dw in the last row.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?);
        let d = w.len();
        let rows = x.len() / d;
        // SAFETY: every row of dx is written whole from x, w and g, and the last
        // row(s) are copied from the column sums.
        let out = unsafe {
            fresh(x.len() + d, |out| {
                let (dx, dw) = out.split_at_mut(x.len());
                dx.par_chunks_mut(d)
                    .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                    .with_min_len(rows_per_task(d))
                    .for_each(|(dxr, (xr, gr))| {
                        simd::run(
                            #[inline(always)]
                            || {
                                let r = rstd(xr, self.eps);
                                // dx = r·(g∘w) − r³·x·mean(g∘w∘x)
                                let mut gwx = 0f32;
                                for i in 0..d {
                                    gwx += gr[i] * w[i] * xr[i];
                                }
                                let c = r * r * r * gwx / d as f32;
                                for i in 0..d {
                                    dxr[i] = r * gr[i] * w[i] - c * xr[i];
                                }
                            },
                        )
                    });
                let sums = column_sums(
                    rows,
                    d,
                    1,
                    #[inline(always)]
                    |row, acc| {
                        let (xr, gr) = (&x[row * d..(row + 1) * d], &g[row * d..(row + 1) * d]);
                        let r = rstd(xr, self.eps);
                        for i in 0..d {
                            acc[i] += gr[i] * xr[i] * r;
                        }
                    },
                );
                dw.copy_from_slice(&sums);
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, d))))
    }
}

struct LayerNorm {
    eps: f32,
}

#[inline(always)]
fn mean_rstd(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mu = vec::sum(row) / n;
    let mut var = 0f32;
    for &v in row {
        var += (v - mu) * (v - mu);
    }
    (mu, 1.0 / (var / n + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let d = w.len();
        // SAFETY: every row of y is written whole from x alone.
        let y = unsafe {
            fresh(x.len(), |y| {
                y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(rows_per_task(d)).for_each(
                    |(yr, xr)| {
                        simd::run(
                            #[inline(always)]
                            || {
                                let (mu, r) = mean_rstd(xr, self.eps);
                                for i in 0..d {
                                    yr[i] = w[i] * (xr[i] - mu) * r + b[i];
                                }
                            },
                        )
                    },
                )
            })
        };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.elem_count() / w.elem_count();
        let all = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows, 1)?.reshape(w.shape())?;
        let db = all.narrow(0, rows + 1, 1)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Returns `[rows + 2, d]`: dx, then dw, then db.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?);
        let d = w.len();
        let rows = x.len() / d;
        // SAFETY: every row of dx is written whole from x, w and g, and the last
        // row(s) are copied from the column sums.
        let out = unsafe {
            fresh(x.len() + 2 * d, |out| {
                let (dx, dwb) = out.split_at_mut(x.len());
                dx.par_chunks_mut(d)
                    .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                    .with_min_len(rows_per_task(d))
                    .for_each(|(dxr, (xr, gr))| {
                        simd::run(
                            #[inline(always)]
                            || {
                                let (mu, r) = mean_rstd(xr, self.eps);
                                // dx = r·(gw − mean(gw) − x̂·mean(gw·x̂)), gw = g∘w
                                let (mut m1, mut m2) = (0f32, 0f32);
                                for i in 0..d {
                                    let gw = gr[i] * w[i];
                                    m1 += gw;
                                    m2 += gw * (xr[i] - mu) * r;
                                }
                                m1 /= d as f32;
                                m2 /= d as f32;
                                for i in 0..d {
                                    let xh = (xr[i] - mu) * r;
                                    dxr[i] = r * (gr[i] * w[i] - m1 - xh * m2);
                                }
                            },
                        )
                    });
                let sums = column_sums(
                    rows,
                    d,
                    2,
                    #[inline(always)]
                    |row, acc| {
                        let (xr, gr) = (&x[row * d..(row + 1) * d], &g[row * d..(row + 1) * d]);
                        let (mu, r) = mean_rstd(xr, self.eps);
                        let (aw, ab) = acc.split_at_mut(d);
                        for i in 0..d {
                            aw[i] += gr[i] * (xr[i] - mu) * r;
                            ab[i] += gr[i];
                        }
                    },
                );
                dwb.copy_from_slice(&sums);
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};

    #[test]
    fn rms_norm_matches_reference_and_gradients() {
        let x = randn(&[6, 5, 16], 1);
        let w = (randn(&[16], 2) + 1.0).unwrap();
        assert_close(
            &rms_norm(&x, &w, 1e-5).unwrap(),
            &rms_norm_reference(&x, &w, 1e-5).unwrap(),
            1e-5,
        );
        check_grads(
            &[x, w],
            |v| rms_norm(&v[0], &v[1], 1e-5),
            |v| rms_norm_reference(&v[0], &v[1], 1e-5),
        );
    }

    #[test]
    fn layer_norm_matches_reference_and_gradients() {
        let x = randn(&[7, 12], 3);
        let w = (randn(&[12], 4) + 1.0).unwrap();
        let b = randn(&[12], 5);
        assert_close(
            &layer_norm(&x, &w, &b, 1e-5).unwrap(),
            &layer_norm_reference(&x, &w, &b, 1e-5).unwrap(),
            1e-5,
        );
        check_grads(
            &[x, w, b],
            |v| layer_norm(&v[0], &v[1], &v[2], 1e-5),
            |v| layer_norm_reference(&v[0], &v[1], &v[2], 1e-5),
        );
    }
}
