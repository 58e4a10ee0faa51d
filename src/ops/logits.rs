//! A router's or a MoT controller's logits, `x·wᵀ` with `w [E, d]` a few experts wide, and
//! their backward.
//!
//! A general GEMM blocks for wide outputs: with 8 or 16 columns, candle's product costs 1.3 ms
//! a layer forward and backward (4,096 tokens, 8 experts) and 2.9 ms (8,192 tokens, 16) on two
//! cores, for work that is a few reads of `x` and one write of `dx`. Here every product is
//! attention's register-tiled micro-kernel ([`small_gemm`]) over blocks of rows, with `w`
//! packed once (it is a few KiB): `x·wᵀ` and `dz·w` row block by row block, and `dzᵀ·x` as
//! partial sums over fixed chunks of rows added in order, so that no result depends on the
//! number of threads. The experts are the columns of `x·wᵀ`: AVX-512 runs it on its 16-column
//! kernel (`small_gemm::width_for`).

use super::small_gemm::{self, pack_panels, Dst, Lhs, Rhs};
use super::vec::{prefetch, LINE};
use super::{fresh, fused, ordered_sum, simd, slice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x [N, d] · wᵀ` with `w [E, d]` → `[N, E]`.
pub fn logits(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused(&[x, w]) && x.rank() == 2 && w.rank() == 2 && kernel_fits(x.dim(1)?) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Logits { level: simd::level() })
    } else {
        logits_reference(x, w)
    }
}

/// [`logits`] in candle's ops.
pub fn logits_reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

/// The weight gradient reads `x` as the micro-kernel's right operand in place, whole panels of
/// its widest width (32) a row: so the rows' length `d` must be a multiple of it.
fn kernel_fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(32)
}

/// Rows of `x` per task of the forward and the input gradient.
const ROWS: usize = 64;
/// Rows per partial sum of the weight gradient.
const CHUNK: usize = 512;

struct Logits {
    level: simd::Level,
}

impl CustomOp2 for Logits {
    fn name(&self) -> &'static str {
        "logits"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((n, d), (e, dw)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        if d != dw || !kernel_fits(d) {
            candle_core::bail!("logits: x [{n}, {d}] against w [{e}, {dw}]");
        }
        let level = self.level;
        let width = small_gemm::width_for(level, e);
        let (x, wt) = (slice(xs, xl)?, pack_panels(slice(ws, wl)?, (d, e), (1, d), width));
        // SAFETY: each task writes its rows of z (all E columns) and reads its rows of x; wᵀ is
        // packed to whole panels; `level` is this thread's path, which the CPU has.
        let z = unsafe {
            fresh(n * e, |z| {
                z.par_chunks_mut(ROWS * e).zip(x.par_chunks(ROWS * d)).for_each(|(zr, xr)| {
                    let rows = xr.len() / d;
                    let (dst, lhs) = (
                        Dst { ptr: zr.as_mut_ptr(), rs: e },
                        Lhs { ptr: xr.as_ptr(), rs: d, cs: 1 },
                    );
                    small_gemm::gemm(level, rows, e, d, dst, false, lhs, Rhs::panels(&wt, d, width))
                })
            })
        };
        Ok((CpuStorage::F32(z), Shape::from((n, e))))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _z: &Tensor, dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, e) = (x.dim(0)?, w.dim(0)?);
        let op = LogitsBwd { level: self.level };
        let both = x.apply_op3_no_bwd(w, &dz.contiguous()?, &op)?; // [N + E, d]
        Ok((Some(both.narrow(0, 0, n)?), Some(both.narrow(0, n, e)?)))
    }
}

/// `dx = dz·w` (the first N rows) and `dw = dzᵀ·x` (the last E rows), from `x`, `w`, `dz`.
struct LogitsBwd {
    level: simd::Level,
}

impl CustomOp3 for LogitsBwd {
    fn name(&self) -> &'static str {
        "logits-backward"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((n, d), e) = (xl.shape().dims2()?, wl.shape().dims2()?.0);
        let level = self.level;
        let width = small_gemm::width(level);
        let (x, g) = (slice(xs, xl)?, slice(gs, gl)?);
        let w = pack_panels(slice(ws, wl)?, (e, d), (d, 1), width);
        // SAFETY: each task writes its own rows of dx, or its own partial; x is read as whole
        // panels of `width` columns, inside its rows (`kernel_fits`); `level` is this thread's
        // path. dw is the ordered sum of the partials.
        let out = unsafe {
            fresh((n + e) * d, |out| {
                let (dx, dw) = out.split_at_mut(n * d);
                dx.par_chunks_mut(ROWS * d).zip(g.par_chunks(ROWS * e)).for_each(|(dxr, gr)| {
                    let rows = gr.len() / e;
                    let (dst, lhs) = (
                        Dst { ptr: dxr.as_mut_ptr(), rs: d },
                        Lhs { ptr: gr.as_ptr(), rs: e, cs: 1 },
                    );
                    small_gemm::gemm(level, rows, d, e, dst, false, lhs, Rhs::panels(&w, e, width))
                });
                let sums = ordered_sum(n.div_ceil(CHUNK), e * d, |c, p| {
                    let rows = (n - c * CHUNK).min(CHUNK);
                    // The kernel walks the chunk a panel of columns at a time, each row's
                    // lines 1 KiB apart, which the hardware prefetcher does not follow: ask for
                    // the chunk's lines in order first (`x` is cold in a training step: the
                    // forward read it long before; `mot_bench` with cold operands, forward and
                    // backward of bench-mot's controller, 3.5–4.1 → 3.4–3.6 ms a layer).
                    let chunk = &x[c * CHUNK * d..][..rows * d];
                    for line in chunk.chunks(LINE) {
                        prefetch(line.as_ptr());
                    }
                    let dst = Dst { ptr: p.as_mut_ptr(), rs: d };
                    let (lhs, rhs) = (
                        Lhs { ptr: g[c * CHUNK * e..].as_ptr(), rs: 1, cs: e },
                        Rhs { ptr: x[c * CHUNK * d..].as_ptr(), rs: d, ps: width, w: width },
                    );
                    small_gemm::gemm(level, e, d, rows, dst, false, lhs, rhs)
                });
                dw.copy_from_slice(&sums);
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((n + e, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_rel_close, check_grads, randn, value_and_grads};

    /// Against candle's product and its autograd, and finite differences, on every path: rows
    /// off the blocks of rows and of the weight gradient's chunks, experts off the kernels'
    /// tiles.
    #[test]
    fn logits_match_the_product_and_its_gradients() {
        for (n, d, e) in
            [(600, 64, 5), (9, 32, 8), (70, 96, 16), (40, 64, 20), (3, 32, 1), (0, 32, 4)]
        {
            assert!(kernel_fits(d), "the test shape must reach the kernel");
            let (x, w) = (randn(&[n, d], 1), randn(&[e, d], 2));
            let (got, want) = (logits(&x, &w).unwrap(), logits_reference(&x, &w).unwrap());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_rel_close("logits", &flat(&got), &flat(&want), 1e-5);
            if n > 0 {
                check_grads(&[x, w], |v| logits(&v[0], &v[1]), |v| logits_reference(&v[0], &v[1]));
            }
        }
    }

    /// Rows whose length is not a multiple of the kernel's panels take candle's product.
    #[test]
    fn other_widths_take_the_reference() {
        let (x, w) = (randn(&[7, 40], 3), randn(&[3, 40], 4));
        assert!(!kernel_fits(40));
        let (got, want) = (logits(&x, &w).unwrap(), logits_reference(&x, &w).unwrap());
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }

    /// The same bits on one thread and on four (the weight gradient sums fixed chunks).
    #[test]
    fn logits_gradients_do_not_depend_on_the_thread_count() {
        let (x, w) = (randn(&[1100, 64], 3), randn(&[6, 64], 4));
        let proj = randn(&[1100, 6], 5);
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                value_and_grads(&[x.clone(), w.clone()], &|v| logits(&v[0], &v[1]), &proj)
            })
        };
        assert_eq!(on(1), on(4));
    }
}
