//! One layer's mixing, steps 2–4 and 6 of `model::mot`, as the layer runs it: on the CPU in
//! f32, merge's backward also does the softmax's and the controller's
//! ([`cpu::mixing::mix_backward`]), elsewhere the ops of `ops::mot` chained by autograd.

use super::cpu;
use super::{
    check_backward, check_emit, emit, group_softmax, merge, plain, split_pair, Emit, Merge,
};
use crate::ops::logits::logits;
use crate::ops::{fused, slice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// Steps 2–4 of one layer's mixing, and the handle that unmixes: the logits `z = x·cᵀ` (`c
/// [E, d]` the controller, already divided by the temperature), the weights `w =
/// group_softmax(z)` and the merged tokens `m = merge(x, w)`.
pub struct Mixed {
    /// `[B, S, E]`.
    pub z: Tensor,
    /// `[B, S, E]`.
    pub w: Tensor,
    /// `[E, N, d]`.
    pub m: Tensor,
    g: usize,
    /// Set where merge's backward takes emit's weight gradient from it.
    hand_over: Option<HandOver>,
}

/// Emit's weight gradient, from emit's backward to merge's. candle runs emit's backward first,
/// as emit reads the experts' outputs of merge's result; if emit's output had no gradient, the
/// cell stays empty and merge's backward adds nothing.
pub(super) type HandOver = Arc<Mutex<Option<Tensor>>>;

/// `x [B, S, d]`, `c [E, d]` → [`Mixed`], in groups of `g`.
///
/// On the CPU in f32, merge's backward also does the softmax's and the controller's
/// ([`cpu::mixing::mix_backward`]): `z` and `w` are computed outside the graph, and merge's op
/// takes `c` as a third input, so that its backward returns `x`'s whole gradient and `c`'s.
/// Emit hands its weight gradient over instead of returning it. One pass over each group then
/// replaces the softmax's backward, the controller's (which read `x` from memory again and
/// wrote a second `dx`), and candle's sums of the two weight and input gradients.
pub fn mix(x: &Tensor, c: &Tensor, g: usize) -> Result<Mixed> {
    let (b, s, d) = x.dims3()?;
    let e = c.dim(0)?;
    if plain() || !fused(&[x, c]) {
        let z = logits(&x.reshape((b * s, d))?, c)?.reshape((b, s, e))?;
        let w = group_softmax(&z, g)?;
        let m = merge(x, &w, g)?;
        return Ok(Mixed { z, w, m, g, hand_over: None });
    }
    let x = x.contiguous()?;
    let z = logits(&x.detach().reshape((b * s, d))?, &c.detach())?.reshape((b, s, e))?;
    let w = group_softmax(&z, g)?;
    let hand_over = HandOver::default();
    let op = MergeThroughSoftmax { g, from_emit: hand_over.clone() };
    let m = x.apply_op3(&w, &c.contiguous()?, op)?;
    Ok(Mixed { z, w, m, g, hand_over: Some(hand_over) })
}

impl Mixed {
    /// Step 6: `y [E, N, d]`, the experts' outputs → `[B, S, d]`.
    pub fn emit(&self, y: &Tensor) -> Result<Tensor> {
        match &self.hand_over {
            None => emit(y, &self.w, self.g),
            Some(cell) => {
                check_emit(y, &self.w, self.g)?;
                let op = Emit { g: self.g, hand_over: Some(cell.clone()) };
                y.contiguous()?.apply_op2(&self.w, op)
            }
        }
    }
}

/// Merge, `(x, w, c)` → `m`, whose backward is [`cpu::mixing::mix_backward`]: `w` must be the
/// group softmax of `x·cᵀ`, and it gets no gradient of its own (see [`mix`]).
struct MergeThroughSoftmax {
    g: usize,
    from_emit: HandOver,
}

/// Forward-only: [`cpu::mixing::mix_backward`], `(dm, x, w)` → `[dx | dc]`, with the controller
/// and emit's weight gradient (if any) as fields: an op has three inputs at most.
struct MixBackward {
    g: usize,
    c: Tensor,
    from_emit: Option<Tensor>,
}

impl CustomOp3 for MergeThroughSoftmax {
    fn name(&self) -> &'static str {
        "mot-merge"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Merge { g: self.g }.cpu_fwd(xs, xl, ws, wl)
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, c: &Tensor, _m: &Tensor, dm: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        check_backward("merge", dm, x, w, self.g)?;
        let from_emit = self.from_emit.lock().unwrap_or_else(|e| e.into_inner()).take();
        let op = MixBackward { g: self.g, c: c.clone(), from_emit };
        let both = dm.contiguous()?.apply_op3_no_bwd(x, w, &op)?;
        let (dx, dc) = split_pair(&both, x.dims3()?, (1, c.dim(0)?, c.dim(1)?))?;
        Ok((Some(dx), None, Some(dc.squeeze(0)?)))
    }
}

impl CustomOp3 for MixBackward {
    fn name(&self) -> &'static str {
        "mot-mix-backward"
    }

    fn cpu_fwd(
        &self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, e) = wl.shape().dims3()?;
        let dims = (b, s, xl.shape().dims3()?.2, e, self.g);
        let (dm, x, w) = (slice(gs, gl)?, slice(xs, xl)?, slice(ws, wl)?);
        let both = on_host(&self.c, |c| match &self.from_emit {
            Some(t) => on_host(t, |de| Ok(cpu::mixing::mix_backward(dm, x, w, Some(de), c, dims))),
            None => Ok(cpu::mixing::mix_backward(dm, x, w, None, c, dims)),
        })?;
        let n = both.len();
        Ok((CpuStorage::F32(both), Shape::from(n)))
    }
}

/// `f` on the f32 elements of a contiguous CPU tensor.
fn on_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(data) = &*storage else {
        candle_core::bail!("mot: expected a CPU tensor, got one on {:?}", t.device())
    };
    f(slice(data, layout)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_rel_close, randn};
    use candle_core::DType;

    const SHAPES: [(usize, usize, usize, usize, usize); 6] = super::super::tests::SHAPES;

    /// The gradients of `x` and `c` through `mix` and its emit: in f32 on the CPU, merge's one
    /// backward through the softmax and the controller; in f64, the plain ops' autograd. Once
    /// with emit's weight gradient handed over, once with a loss of the merged tokens alone
    /// (emit's backward never runs); and the same bits on one thread and on three.
    #[test]
    fn mix_matches_the_plain_formulation_on_any_number_of_threads() {
        use candle_core::Var;
        for (i, &(b, s, d, e, g)) in SHAPES.iter().enumerate() {
            let seed = 40 + 10 * i as u64;
            let (x, c) = (randn(&[b, s, d], seed), (randn(&[e, d], seed + 1) * 0.7).unwrap());
            let n = b / g * s;
            let (y_of_m, m_proj) = (randn(&[e, n, d], seed + 2), randn(&[e, n, d], seed + 3));
            let out_proj = randn(&[b, s, d], seed + 4);
            for through_emit in [true, false] {
                let grads = |dtype: DType| {
                    let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
                    let (xv, cv) = (
                        Var::from_tensor(&cast(&x)).unwrap(),
                        Var::from_tensor(&cast(&c)).unwrap(),
                    );
                    let mixed = mix(&xv, &cv, g).unwrap();
                    let mut loss = (&mixed.m * cast(&m_proj)).unwrap().sum_all().unwrap();
                    if through_emit {
                        // A stand-in expert that depends on its input: y = m ⊙ y_of_m.
                        let y = (&mixed.m * cast(&y_of_m)).unwrap();
                        let out = mixed.emit(&y).unwrap();
                        loss =
                            (loss + (out * cast(&out_proj)).unwrap().sum_all().unwrap()).unwrap();
                    }
                    let all = loss.backward().unwrap();
                    let f32s = |v: &Var| {
                        all.get(v)
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    };
                    (f32s(&xv), f32s(&cv))
                };
                let (dx, dc) = grads(DType::F32);
                let (dx64, dc64) = grads(DType::F64);
                let what = format!("{:?} through emit: {through_emit}", (b, s, d, e, g));
                assert_rel_close(&format!("dx {what}"), &dx, &dx64, 1e-5);
                assert_rel_close(&format!("dc {what}"), &dc, &dc64, 1e-5);
                let on = |threads| {
                    let pool =
                        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    pool.install(|| grads(DType::F32))
                };
                assert!(on(1) == (dx.clone(), dc.clone()) && on(3) == (dx, dc), "{what}");
            }
        }
    }

    /// An empty batch mixes to empty results, forward and backward, without dividing by its
    /// zero groups.
    #[test]
    fn an_empty_batch_gives_empty_results() {
        let x = candle_core::Var::from_tensor(&randn(&[0, 3, 32], 1)).unwrap();
        let c = candle_core::Var::from_tensor(&randn(&[4, 32], 2)).unwrap();
        let mixed = mix(&x, &c, 2).unwrap();
        assert_eq!(mixed.m.dims(), &[4, 0, 32]);
        let out = mixed.emit(&mixed.m).unwrap();
        assert_eq!(out.dims(), &[0, 3, 32]);
        let grads = (out.sum_all().unwrap() + mixed.m.sum_all().unwrap()).unwrap().backward();
        let grads = grads.unwrap();
        assert_eq!(grads.get(&x).unwrap().dims(), &[0, 3, 32]);
        let dc = grads.get(&c).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(dc.iter().all(|&v| v == 0.0), "{dc:?}");
    }
}
