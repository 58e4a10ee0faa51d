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
//! A training forward in bf16 packs each expert's weight for the input gradient's product
//! as well, from the same read of its f32 values, and keeps it until the backward takes it: a
//! MoT or MoE layer has many times a dense layer's weights for the same tokens, so packing them
//! once more from memory costs more there than anywhere else (+2 bytes a weight held between).
//!
//! `grouped_up` (in `recompute`) is the experts' up projection and activation in one op that
//! recomputes its pre-activation in backward (`train.recompute_experts`).

mod recompute;

pub use recompute::grouped_up;

use super::bf16::{self, PackedB};
use super::squares::Slot;
use super::{fresh, fused, gemm_into, gemm_packed_into, slice, Kernel, Store};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// `x [R, in]`, `w [E, out, in]`, `offsets` (E + 1 row bounds, non-decreasing, ending at R)
/// → `[R, out]`; `training`: a backward pass will follow.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &[usize], training: bool) -> Result<Tensor> {
    check(x, &[w], offsets)?;
    if fused(&[x, w]) {
        let op = Grouped::new(Kernel::current(), offsets, &[w], training)?;
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    } else {
        grouped_matmul_reference(x, w, offsets)
    }
}

/// `x [R, in]`, `a [E, p, in]`, `b [E, q, in]` → `[R, p + q]`: both products, side by side.
pub fn grouped_matmul_cat(
    x: &Tensor, a: &Tensor, b: &Tensor, offsets: &[usize], training: bool,
) -> Result<Tensor> {
    grouped_matmul_cat_on(Kernel::current(), x, a, b, offsets, training)
}

/// [`grouped_matmul_cat`] on a given kernel (CPU f32 tensors).
pub fn grouped_matmul_cat_on(
    kernel: Kernel, x: &Tensor, a: &Tensor, b: &Tensor, offsets: &[usize], training: bool,
) -> Result<Tensor> {
    check(x, &[a, b], offsets)?;
    if fused(&[x, a, b]) {
        x.contiguous()?.apply_op3(
            &a.contiguous()?,
            &b.contiguous()?,
            Grouped::new(kernel, offsets, &[a, b], training)?,
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

/// An expert's index, its rows, and a buffer's slice of those rows.
type ExpertRows<'a> = (usize, Range<usize>, &'a mut [f32]);

/// Weights packed for the input gradient by a training forward in bf16, by (stack,
/// expert), until the backward takes them.
type Kept = Mutex<HashMap<(usize, usize), PackedB>>;

/// The product of `x` with one or two weight stacks of output widths `outs`, on `kernel`, its
/// backward products too (the kernel of the forward, whatever [`Kernel::current`] says then).
#[derive(Clone)]
struct Grouped {
    offsets: Arc<Vec<usize>>,
    outs: Vec<usize>,
    kernel: Kernel,
    /// Some for a training forward in bf16 (see the module doc).
    kept: Option<Arc<Kept>>,
}

impl Grouped {
    fn new(kernel: Kernel, offsets: &[usize], ws: &[&Tensor], training: bool) -> Result<Grouped> {
        Ok(Grouped {
            offsets: Arc::new(offsets.to_vec()),
            outs: ws.iter().map(|w| w.dim(1)).collect::<Result<_>>()?,
            kernel,
            kept: (training && kernel == Kernel::Bf16).then(Arc::default),
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
                    let x = &x[rows.start * din..rows.end * din];
                    for (j, &dout) in self.outs.iter().enumerate() {
                        let (w, y) = (
                            &ws[j][e * dout * din..(e + 1) * dout * din],
                            &mut y[self.column(j)..],
                        );
                        let m = rows.len();
                        if let Some(kept) = &self.kept {
                            let (w_t, w) = bf16::pack_weight(w, dout, din, parallel);
                            gemm_packed_into(m, y, width, Store::Set, x, (din, 1), &w_t, parallel);
                            kept.lock().unwrap().insert((j, e), w);
                            continue;
                        }
                        let mnk = (m, dout, din);
                        gemm_into(
                            self.kernel,
                            mnk,
                            y,
                            width,
                            Store::Set,
                            x,
                            (din, 1),
                            w,
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
                        let (g, m) = (&g[rows.start * width + self.column(j)..], rows.len());
                        let store = if j > 0 { Store::Add } else { Store::Set };
                        // A second backward through the same graph finds it taken, and packs.
                        let kept =
                            self.kept.as_ref().and_then(|k| k.lock().unwrap().remove(&(j, e)));
                        if let Some(w) = kept {
                            gemm_packed_into(m, dx, din, store, g, (width, 1), &w, parallel);
                            continue;
                        }
                        gemm_into(
                            self.kernel,
                            (m, din, dout),
                            dx,
                            din,
                            store,
                            g,
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

    /// `dW_je = Σ_{r in e} dy_r[cols of j]ᵀ · x_r`; experts without rows get zeros. A weight
    /// gradient: streamed ([`Store::Stream`]), with its `Σ x²` where the kernel counts it
    /// (summed over the experts in order, so the same whatever the threads).
    fn dw(&self, g: &[f32], x: &[f32], j: usize, din: usize) -> (Vec<f32>, Option<f64>) {
        let (width, dout, col) = (self.width(), self.outs[j], self.column(j));
        let e_count = self.offsets.len() - 1;
        let parallel = !self.side_by_side();
        let mut sums = Vec::new();
        // SAFETY: every expert's block is written: by its product, or with zeros. Not zeroing
        // the whole stack first saves a pass over every expert's weights (MoT's experts all
        // have rows).
        let dw = unsafe {
            fresh(e_count * dout * din, |dw| {
                sums = dw
                    .par_chunks_mut((dout * din).max(1))
                    .zip(self.offsets.par_windows(2))
                    .map(|(dst, b)| match b[1] > b[0] {
                        true => gemm_into(
                            self.kernel,
                            (dout, din, b[1] - b[0]),
                            dst,
                            din,
                            Store::Stream,
                            &g[b[0] * width + col..],
                            (1, width),
                            &x[b[0] * din..b[1] * din],
                            (din, 1),
                            parallel,
                        ),
                        false => {
                            dst.fill(0.0);
                            Some(0.0)
                        }
                    })
                    .collect::<Vec<Option<f64>>>()
            })
        };
        (dw, sums.into_iter().sum())
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
            .map(|j| {
                let op = GroupedDw { op: self.clone(), j, squares: Slot::default() };
                let dw = g.apply_op2_no_bwd(x, &op)?;
                op.squares.note_on(&dw);
                Ok(dw)
            })
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

/// `dW` of stack `j` from `dy` and `x`, and its `Σ x²` where the kernel counted it.
struct GroupedDw {
    op: Grouped,
    j: usize,
    squares: Slot,
}

impl CustomOp2 for GroupedDw {
    fn name(&self) -> &'static str {
        "grouped-matmul-dw"
    }

    fn cpu_fwd(
        &self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let din = xl.shape().dims2()?.1;
        let (dw, sum) = self.op.dw(slice(gs, gl)?, slice(xs, xl)?, self.j, din);
        self.squares.put(sum);
        Ok((
            CpuStorage::F32(dw),
            Shape::from((self.op.offsets.len() - 1, self.op.outs[self.j], din)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Activation;
    use crate::ops::testing::{assert_close, check_grads, randn};

    // Expert 1 gets no rows: its gradient must be zero, not missing.
    const OFFSETS: [usize; 5] = [0, 2, 2, 7, 9];

    #[test]
    fn grouped_matmul_matches_reference_and_gradients() {
        let x = randn(&[9, 4], 1);
        let w = randn(&[4, 3, 4], 2);
        assert_close(
            &grouped_matmul(&x, &w, &OFFSETS, true).unwrap(),
            &grouped_matmul_reference(&x, &w, &OFFSETS).unwrap(),
            1e-5,
        );
        check_grads(
            &[x, w],
            |v| grouped_matmul(&v[0], &v[1], &OFFSETS, true),
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
            &grouped_matmul_cat(&x, &a, &b, &OFFSETS, true).unwrap(),
            &reference(&[x.clone(), a.clone(), b.clone()]).unwrap(),
            1e-5,
        );
        check_grads(
            &[x, a, b],
            |v| grouped_matmul_cat(&v[0], &v[1], &v[2], &OFFSETS, true),
            reference,
        );
    }

    /// On each bf16 engine, forward and both gradients against the f32 kernel within bf16 rounding:
    /// experts side by side (each product on one thread) and one expert across the pool. A
    /// training forward, which keeps the weights packed for the backward, gives the same bits
    /// as one that does not, and so does a second backward through its graph, which packs.
    /// Each weight gradient comes with its sum of squares (`squares`), the same bits on one
    /// thread, where the experts always run side by side.
    #[test]
    fn bf16_products_match_the_f32_kernel_within_bf16_rounding() {
        use crate::ops::bf16::{engines, with_engine};
        use candle_core::Var;
        let side_by_side: Vec<usize> = (0..=8).map(|e| e * 40 - e % 3).collect();
        for offsets in [side_by_side, vec![0, 0, 300, 300]] {
            let (e, r) = (offsets.len() - 1, offsets[offsets.len() - 1]);
            let vars = [randn(&[r, 70], 1), randn(&[e, 50, 70], 2), randn(&[e, 40, 70], 3)]
                .map(|t| Var::from_tensor(&t).unwrap());
            let p = randn(&[r, 90], 4);
            let run = |kernel, training, backwards| {
                let [x, a, b] = vars.each_ref().map(|v| v.as_tensor());
                let y = grouped_matmul_cat_on(kernel, x, a, b, &offsets, training).unwrap();
                let loss = (&y * &p).unwrap().sum_all().unwrap();
                let mut g = loss.backward().unwrap();
                for _ in 1..backwards {
                    g = loss.backward().unwrap();
                }
                let grad = |t: &Tensor| g.get(t).unwrap().clone();
                let noted = [grad(a), grad(b)].map(|g| {
                    let sum = crate::ops::squares::take(&g)?;
                    let read = crate::ops::sum_of_squares(&g).unwrap();
                    assert!((sum - read).abs() <= 1e-6 * read, "{offsets:?}: {sum} vs {read}");
                    Some(sum.to_bits())
                });
                let ts = [y.clone(), grad(x), grad(a), grad(b)].map(|t| t.flatten_all().unwrap());
                (ts, noted)
            };
            let bits =
                |(ts, noted): ([Tensor; 4], _)| (ts.map(|t| t.to_vec1::<f32>().unwrap()), noted);
            let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            for engine in engines() {
                let (bf16, unkept, twice) = with_engine(engine, || {
                    let bf16 = run(Kernel::Bf16, true, 1);
                    (
                        bf16.clone(),
                        bits(run(Kernel::Bf16, false, 1)),
                        bits(run(Kernel::Bf16, true, 2)),
                    )
                });
                let alone =
                    one_thread.install(|| with_engine(engine, || run(Kernel::Bf16, true, 1)));
                assert_eq!(bits(bf16.clone()), unkept, "{engine:?} {offsets:?}");
                assert_eq!(bits(bf16.clone()), twice, "{engine:?} {offsets:?}");
                assert!(bf16.1.iter().all(Option::is_some), "{engine:?} {offsets:?}: not noted");
                assert_eq!(alone.1, bf16.1, "{engine:?} {offsets:?}: squares on one thread");
                let (f32_grads, f32_noted) = run(Kernel::F32, true, 1);
                assert_eq!(f32_noted, [None, None], "f32 gemm counts nothing");
                for (got, want) in bf16.0.iter().zip(f32_grads) {
                    let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    let err = err.to_scalar::<f32>().unwrap();
                    assert!(
                        err <= 2e-2 * scale,
                        "{engine:?} {offsets:?}: max |Δ| {err}, scale {scale}"
                    );
                }
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
                &v[0], &v[1], &v[2], &OFFSETS, true,
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
        assert!(
            grouped_matmul(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &[0, 2, 2], true).is_err()
        );
        // Rows before the first expert's would belong to no expert.
        assert!(
            grouped_matmul(&randn(&[3, 2], 1), &randn(&[2, 2, 2], 2), &[1, 2, 3], true).is_err()
        );
        assert!(grouped_matmul_cat(
            &randn(&[3, 2], 1),
            &randn(&[2, 2, 2], 2),
            &randn(&[2, 2, 3], 2),
            &[0, 2, 3],
            true
        )
        .is_err());
    }
}
