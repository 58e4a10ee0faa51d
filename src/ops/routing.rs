//! Moving tokens to their experts and back, for the sparse layers: `gather` takes each routed
//! slot's token row, and `combine` adds each slot's gated expert output into its token's row.
//!
//! candle's `index_select` and `index_add` run on one thread, and their backward passes
//! allocate a zero tensor to scatter into; with the gate's `broadcast_mul` that was most of what
//! a MoE layer cost beyond its experts (these ops made bench-dense with 8 top-1 experts in bf16
//! ~7 % faster a step). Here each direction is one pass over the rows, split across threads:
//! by slot where slots are written, by token where tokens are, which each token's list of
//! slots (ascending) makes possible without two threads adding into one row. Summing a
//! token's slots in slot order keeps the result independent of the thread count.

use super::{fresh, fused, rows_per_task, simd, slice, vec};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// The token of every slot, and each token's slots.
#[derive(Debug)]
pub struct Slots {
    /// The token (row of the layer's input) of every slot.
    token: Vec<u32>,
    /// Token t's slots are `by_token[start[t]..start[t + 1]]`, in ascending order.
    start: Vec<usize>,
    by_token: Vec<u32>,
}

impl Slots {
    /// Slots for `token` (each below `n`) over `n` tokens.
    pub fn new(token: Vec<u32>, n: usize) -> Slots {
        let mut start = vec![0usize; n + 1];
        for &t in &token {
            start[t as usize + 1] += 1;
        }
        for t in 0..n {
            start[t + 1] += start[t];
        }
        let mut next = start.clone();
        let mut by_token = vec![0u32; token.len()];
        for (r, &t) in token.iter().enumerate() {
            by_token[next[t as usize]] = r as u32;
            next[t as usize] += 1;
        }
        Slots { token, start, by_token }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token.is_empty()
    }

    fn tokens(&self) -> usize {
        self.start.len() - 1
    }

    fn of(&self, t: usize) -> &[u32] {
        &self.by_token[self.start[t]..self.start[t + 1]]
    }

    /// The slots' tokens as a `[R]` u32 tensor, for the plain formulation.
    fn tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_slice(&self.token, self.len(), device)
    }
}

/// `x [N, d]` → `[R, d]`: row r is `x[token(r)]`.
pub fn gather(x: &Tensor, slots: &Arc<Slots>) -> Result<Tensor> {
    check(x, slots)?;
    if fused(&[x]) {
        x.contiguous()?.apply_op1(Gather(slots.clone()))
    } else {
        x.index_select(&slots.tensor(x.device())?, 0)
    }
}

/// `y [R, d]`, `gates [R, 1]` → `[N, d]`: token t's row is `Σ gate_r · y_r` over its slots r,
/// zeros for a token without one.
pub fn combine(y: &Tensor, gates: &Tensor, slots: &Arc<Slots>) -> Result<Tensor> {
    let (r, _) = y.dims2()?;
    if r != slots.len() || gates.dims() != [r, 1] {
        candle_core::bail!(
            "combine: {} slots, expert outputs {:?} and gates {:?}",
            slots.len(),
            y.dims(),
            gates.dims()
        );
    }
    if fused(&[y, gates]) {
        y.contiguous()?.apply_op2(&gates.contiguous()?, Combine(slots.clone()))
    } else {
        combine_reference(y, gates, slots)
    }
}

/// [`combine`] in candle's ops: the formulation the fused op is held to.
pub fn combine_reference(y: &Tensor, gates: &Tensor, slots: &Slots) -> Result<Tensor> {
    let d = y.dim(1)?;
    let out = Tensor::zeros((slots.tokens(), d), y.dtype(), y.device())?;
    out.index_add(&slots.tensor(y.device())?, &y.broadcast_mul(gates)?, 0)
}

/// Softmax over the last axis of `z [N, E]`: the router's probabilities.
pub fn softmax(z: &Tensor) -> Result<Tensor> {
    if fused(&[z]) && z.rank() == 2 {
        z.contiguous()?.apply_op1(Softmax)
    } else {
        softmax_reference(z)
    }
}

/// `log Σ exp(z)` over the last axis of `z [N, E]`, `[N]`: the router's z-loss before squaring.
pub fn logsumexp(z: &Tensor) -> Result<Tensor> {
    if fused(&[z]) && z.rank() == 2 {
        z.contiguous()?.apply_op1(LogSumExp)
    } else {
        logsumexp_reference(z)
    }
}

/// [`softmax`] in candle's ops.
pub fn softmax_reference(z: &Tensor) -> Result<Tensor> {
    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// [`logsumexp`] in candle's ops.
pub fn logsumexp_reference(z: &Tensor) -> Result<Tensor> {
    let m = z.max_keepdim(D::Minus1)?;
    (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(D::Minus1)
}

/// A router's rows are a few experts wide: candle's softmax and log-sum-exp, five ops each
/// with as many in backward, cost more in op overhead than in arithmetic (with the aux loss,
/// ~0.8 ms a layer of 4,096 tokens and 8 experts, forward and backward). Each is one op here,
/// rayon over rows.
struct Softmax;

/// A row's largest value: the shift that keeps `exp` in range.
#[inline(always)]
fn row_max(z: &[f32]) -> f32 {
    z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `out` rows of width `w` (1 for one value a row), each from the matching `E`-wide row of `z`
/// and `ow`-wide row of `other` (empty when `ow` is 0) by `f`.
fn rows(
    z: &[f32], e: usize, other: &[f32], ow: usize, w: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let n = z.len() / e.max(1);
    // SAFETY: `f` writes every element of its row of `out`.
    unsafe {
        fresh(n * w, |out| {
            out.par_chunks_mut(w.max(1)).enumerate().with_min_len(rows_per_task(e)).for_each(
                |(i, o)| {
                    let (z, other) = (&z[i * e..(i + 1) * e], &other[i * ow..(i + 1) * ow]);
                    simd::run(
                        #[inline(always)]
                        || f(z, other, o),
                    )
                },
            )
        })
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "routing-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (z, e) = (slice(s, l)?, l.shape().dims2()?.1);
        let p = rows(z, e, &[], 0, e, |z, _, p| {
            let m = row_max(z);
            for (p, &v) in p.iter_mut().zip(z) {
                *p = vec::exp(v - m);
            }
            let sum: f32 = p.iter().sum();
            p.iter_mut().for_each(|p| *p /= sum);
        });
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    /// `dz = p ∘ (dp − ⟨p, dp⟩)`.
    fn bwd(&self, _z: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxBwd)?))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "routing-softmax-bwd"
    }

    fn cpu_fwd(
        &self, ps: &CpuStorage, pl: &Layout, ds: &CpuStorage, dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, dp, e) = (slice(ps, pl)?, slice(ds, dl)?, pl.shape().dims2()?.1);
        let dz = rows(p, e, dp, e, e, |p, dp, dz| {
            let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
            for ((o, &p), &d) in dz.iter_mut().zip(p).zip(dp) {
                *o = p * (d - dot);
            }
        });
        Ok((CpuStorage::F32(dz), pl.shape().clone()))
    }
}

struct LogSumExp;

impl CustomOp1 for LogSumExp {
    fn name(&self) -> &'static str {
        "routing-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (z, (n, e)) = (slice(s, l)?, l.shape().dims2()?);
        let lse = rows(z, e, &[], 0, 1, |z, _, out| {
            let m = row_max(z);
            let sum: f32 = z.iter().map(|&v| vec::exp(v - m)).sum();
            out[0] = m + sum.ln();
        });
        Ok((CpuStorage::F32(lse), Shape::from(n)))
    }

    /// `dz = dl · exp(z − lse)`, the softmax scaled by the row's gradient.
    fn bwd(&self, z: &Tensor, lse: &Tensor, dl: &Tensor) -> Result<Option<Tensor>> {
        let (lse, dl) = (lse.unsqueeze(1)?, dl.contiguous()?.unsqueeze(1)?);
        Ok(Some(z.apply_op2_no_bwd(&Tensor::cat(&[&lse, &dl], 1)?, &LogSumExpBwd)?))
    }
}

/// `(z [N, E], [lse | dl] [N, 2])` → `dz`.
struct LogSumExpBwd;

impl CustomOp2 for LogSumExpBwd {
    fn name(&self) -> &'static str {
        "routing-logsumexp-bwd"
    }

    fn cpu_fwd(
        &self, zs: &CpuStorage, zl: &Layout, ls: &CpuStorage, ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, ld, e) = (slice(zs, zl)?, slice(ls, ll)?, zl.shape().dims2()?.1);
        let dz = rows(z, e, ld, 2, e, |z, ld, dz| {
            for (o, &v) in dz.iter_mut().zip(z) {
                *o = ld[1] * vec::exp(v - ld[0]);
            }
        });
        Ok((CpuStorage::F32(dz), zl.shape().clone()))
    }
}

fn check(x: &Tensor, slots: &Slots) -> Result<()> {
    let (n, _) = x.dims2()?;
    if n != slots.tokens() {
        candle_core::bail!("gather: {n} rows, slots over {} tokens", slots.tokens());
    }
    Ok(())
}

struct Gather(Arc<Slots>);

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "routing-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, d) = (slice(s, l)?, l.shape().dims2()?.1);
        let token = &self.0.token;
        // SAFETY: every row of the output is copied whole from x.
        let out = unsafe {
            fresh(token.len() * d, |out| {
                out.par_chunks_mut(d.max(1))
                    .zip(token.par_iter())
                    .with_min_len(rows_per_task(d))
                    .for_each(|(row, &t)| {
                        row.copy_from_slice(&x[t as usize * d..(t as usize + 1) * d])
                    })
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((token.len(), d))))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Scatter(self.0.clone()))?))
    }
}

/// `drows [R, d]` → `dx [N, d]`: each token's row is the sum of its slots' rows.
struct Scatter(Arc<Slots>);

impl CustomOp1 for Scatter {
    fn name(&self) -> &'static str {
        "routing-gather-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, d) = (slice(s, l)?, l.shape().dims2()?.1);
        let n = self.0.tokens();
        Ok((CpuStorage::F32(sum_slots(&self.0, g, d, None)), Shape::from((n, d))))
    }
}

/// `[N, d]`: token t's row is `Σ gate_r · rows_r` over its slots r in order (gate 1 without
/// `gates`: the gather's backward), zeros for a token without one.
fn sum_slots(slots: &Slots, rows: &[f32], d: usize, gates: Option<&[f32]>) -> Vec<f32> {
    // SAFETY: every row is zeroed before its slots are added.
    unsafe {
        fresh(slots.tokens() * d, |out| {
            out.par_chunks_mut(d.max(1)).enumerate().with_min_len(rows_per_task(d)).for_each(
                |(t, row)| {
                    row.fill(0.0);
                    simd::run(
                        #[inline(always)]
                        || {
                            for &r in slots.of(t) {
                                let r = r as usize;
                                let (g, src) = (gates.map_or(1.0, |g| g[r]), &rows[r * d..][..d]);
                                for (a, b) in row.iter_mut().zip(src) {
                                    *a += g * b;
                                }
                            }
                        },
                    )
                },
            )
        })
    }
}

struct Combine(Arc<Slots>);

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "routing-combine"
    }

    fn cpu_fwd(
        &self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, gates, d) = (slice(ys, yl)?, slice(gs, gl)?, yl.shape().dims2()?.1);
        let n = self.0.tokens();
        Ok((CpuStorage::F32(sum_slots(&self.0, y, d, Some(gates))), Shape::from((n, d))))
    }

    fn bwd(
        &self, y: &Tensor, gates: &Tensor, _out: &Tensor, dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (r, d) = y.dims2()?;
        let both = dout.contiguous()?.apply_op3_no_bwd(y, gates, &CombineBwd(self.0.clone()))?;
        let dy = both.narrow(0, 0, r * d)?.reshape((r, d))?;
        let dgates = both.narrow(0, r * d, r)?.reshape((r, 1))?;
        Ok((Some(dy), Some(dgates)))
    }
}

/// `(dout [N, d], y [R, d], gates [R, 1])` → `[dy | dgates]`, flat: `dy_r = gate_r ·
/// dout[token(r)]` (`R·d` values), then `dgate_r = ⟨dout[token(r)], y_r⟩` (`R` values). One
/// read of each slot's `dout` row serves both.
struct CombineBwd(Arc<Slots>);

impl CustomOp3 for CombineBwd {
    fn name(&self) -> &'static str {
        "routing-combine-bwd"
    }

    fn cpu_fwd(
        &self, ds: &CpuStorage, dl: &Layout, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dout, y, gates) = (slice(ds, dl)?, slice(ys, yl)?, slice(gs, gl)?);
        let (r, d) = yl.shape().dims2()?;
        let token = &self.0.token;
        // SAFETY: the first R·d values are dy, every row written whole; the last R are dgates,
        // each written once.
        let both = unsafe {
            fresh(r * d + r, |both| {
                let (dy, dgates) = both.split_at_mut(r * d);
                dy.par_chunks_mut(d.max(1))
                    .zip(dgates.par_iter_mut())
                    .enumerate()
                    .with_min_len(rows_per_task(d))
                    .for_each(|(s, (dy, dg))| {
                        let t = token[s] as usize;
                        let (src, ys, g) =
                            (&dout[t * d..(t + 1) * d], &y[s * d..(s + 1) * d], gates[s]);
                        *dg = simd::run(
                            #[inline(always)]
                            || {
                                for (a, b) in dy.iter_mut().zip(src) {
                                    *a = g * b;
                                }
                                super::vec::dot(src, ys)
                            },
                        );
                    })
            })
        };
        Ok((CpuStorage::F32(both), Shape::from(r * d + r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grads;
    use crate::ops::testing::randn;

    /// 7 tokens, 9 slots: token 2 has three slots, tokens 0 and 5 none.
    fn slots() -> Arc<Slots> {
        Arc::new(Slots::new(vec![3, 2, 6, 1, 2, 4, 2, 1, 3], 7))
    }

    #[test]
    fn gather_and_combine_match_the_plain_ops_and_their_gradients() {
        let s = slots();
        let s2 = s.clone();
        check_grads(
            &[randn(&[7, 37], 1)],
            |t| gather(&t[0], &s),
            |t| t[0].index_select(&s2.tensor(t[0].device()).unwrap(), 0),
        );
        let (s, s2) = (slots(), slots());
        check_grads(
            &[randn(&[9, 37], 2), randn(&[9, 1], 3)],
            |t| combine(&t[0], &t[1], &s),
            |t| combine_reference(&t[0], &t[1], &s2),
        );
    }

    /// The combine and the gather's backward (both sum over a token's slots) give the same bits
    /// on one thread and on three.
    #[test]
    fn sums_do_not_depend_on_the_thread_count() {
        let token: Vec<u32> = (0..3000u32).map(|r| r * 7 % 1000).collect();
        let s = Arc::new(Slots::new(token, 1000));
        let (y, gates) = (randn(&[3000, 40], 4), randn(&[3000, 1], 5));
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let out = combine(&y, &gates, &s).unwrap();
                let dx = y.apply_op1_no_bwd(&Scatter(s.clone())).unwrap();
                [out, dx].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
        };
        assert!(on(1) == on(3));
    }

    #[test]
    fn softmax_and_logsumexp_match_the_plain_ops_and_their_gradients() {
        // Rows of 8 and of 37 experts, one with a large logit (the shift by the maximum).
        for (n, e) in [(11, 8), (5, 37)] {
            let z = (randn(&[n, e], 6) * 3.0).unwrap();
            check_grads(std::slice::from_ref(&z), |t| softmax(&t[0]), |t| softmax_reference(&t[0]));
            check_grads(&[z], |t| logsumexp(&t[0]), |t| logsumexp_reference(&t[0]));
        }
    }

    #[test]
    fn each_token_lists_its_slots_in_order() {
        let s = slots();
        assert_eq!(s.of(2), [1, 4, 6]);
        assert_eq!(s.of(1), [3, 7]);
        assert!(s.of(0).is_empty() && s.of(5).is_empty());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let s = slots();
        assert!(gather(&randn(&[6, 4], 1), &s).is_err());
        assert!(combine(&randn(&[8, 4], 1), &randn(&[8, 1], 2), &s).is_err());
        assert!(combine(&randn(&[9, 4], 1), &randn(&[9, 2], 2), &s).is_err());
    }
}
