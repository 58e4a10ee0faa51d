//! The mixing and unmixing steps of Mixture of Tokens (`kernels.md`), as fused ops that read
//! the `[B, S, d]` activations in place and produce the `[E, N, d]` layout the expert matmuls
//! want, without materialising the batch transposed into groups.
//!
//! Shapes: B batch rows, S positions, E experts, group size G (B % G == 0), K = B/G groups per
//! position and N = K·S groups in all. Group n = k·S + s holds rows `[kG, kG+G)` at position s.
//!
//! Four kernels cover forward and backward, because each step's backward is another step:
//! - `group_softmax`: `w = softmax over the G rows of a group`, per expert;
//! - `merge`:  `m[e, n] = Σ_{i∈n} w[i, e] · x_i`            (the mixing step);
//! - `emit`:   `out_i  = Σ_e w[i, e] · y[e, n(i)]`           (the unmixing step);
//! - `group_dot`: `r[i, e] = ⟨a_i, c[e, n(i)]⟩`              (the weights' gradient of both).
//!
//! `d merge/dx = emit(dm, w)`, `d emit/dy = merge(dout, w)`, and the weights' gradients are
//! `group_dot(x, dm)` and `group_dot(dout, y)`. On the CPU each backward runs its two kernels
//! as one pass over the group (`FusedBackward`: both read the same rows), bit for bit the same.
//! The softmax is `B·S·E` elements (d times fewer than merge), so it stays a separate pass
//! whose backward is a few candle ops.
//!
//! A layer calls [`mixing::mix`], which on the CPU also folds the softmax's and the
//! controller's backward into merge's one pass.

use super::{fresh, fused, simd, slice, stream_copy, stream_fence, Store};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Softmax of `z [B, S, E]` over the G rows of each group, separately per expert.
pub fn group_softmax(z: &Tensor, g: usize) -> Result<Tensor> {
    let (b, _, _) = z.dims3()?;
    check_group(b, g)?;
    if use_kernel(&[z]) {
        z.contiguous()?.apply_op1(GroupSoftmax { g })
    } else {
        group_softmax_reference(z, g)
    }
}

/// Mixing: `x [B, S, d]`, `w [B, S, E]` → `m [E, N, d]`.
pub fn merge(x: &Tensor, w: &Tensor, g: usize) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    check_group(b, g)?;
    if w.dims3()?.0 != b || w.dim(1)? != s {
        candle_core::bail!(
            "mot merge: weights {:?} do not match activations {:?}",
            w.dims(),
            x.dims()
        );
    }
    if use_kernel(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Merge { g })
    } else {
        merge_reference(x, w, g)
    }
}

/// Unmixing: `y [E, N, d]`, `w [B, S, E]` → `out [B, S, d]`.
pub fn emit(y: &Tensor, w: &Tensor, g: usize) -> Result<Tensor> {
    check_emit(y, w, g)?;
    if use_kernel(&[y, w]) {
        y.contiguous()?.apply_op2(&w.contiguous()?, Emit { g, hand_over: None })
    } else {
        emit_reference(y, w, g)
    }
}

fn check_emit(y: &Tensor, w: &Tensor, g: usize) -> Result<()> {
    let (b, s, e) = w.dims3()?;
    check_group(b, g)?;
    if y.dims3()?.0 != e || y.dim(1)? != b / g * s {
        candle_core::bail!(
            "mot emit: expert outputs {:?} do not match weights {:?}",
            y.dims(),
            w.dims()
        );
    }
    Ok(())
}

/// The weights' gradient of merge and emit: `a [B, S, d]`, `c [E, N, d]` → `r [B, S, E]`,
/// `r[i, e] = ⟨a_i, c[e, n(i)]⟩` (no gradient of its own: it runs inside backward passes).
pub fn group_dot(a: &Tensor, c: &Tensor, g: usize) -> Result<Tensor> {
    let (b, s, d) = a.dims3()?;
    check_group(b, g)?;
    if c.dim(1)? != b / g * s || c.dim(2)? != d {
        candle_core::bail!("mot group_dot: {:?} does not match {:?}", c.dims(), a.dims());
    }
    if use_kernel(&[a, c]) {
        a.contiguous()?.apply_op2_no_bwd(&c.contiguous()?, &GroupDot { g })
    } else {
        group_dot_reference(a, c, g)
    }
}

/// Merge's backward: `dm [E, N, d]`, `x [B, S, d]`, `w [B, S, E]` → `(dx, dw)`, the gradients
/// of `x` and `w`; on the CPU in one pass over each group.
pub fn merge_backward(dm: &Tensor, x: &Tensor, w: &Tensor, g: usize) -> Result<(Tensor, Tensor)> {
    check_backward("merge", dm, x, w, g)?;
    let dm = dm.contiguous()?;
    if fused(&[x, w, &dm]) {
        let (b, s, d) = x.dims3()?;
        let both = dm.apply_op3_no_bwd(x, w, &FusedBackward { g, of: Step::Merge })?;
        return split_pair(&both, (b, s, d), (b, s, w.dim(2)?));
    }
    let dx = dm.apply_op2_no_bwd(w, &Emit { g, hand_over: None })?;
    let dw = x.apply_op2_no_bwd(&dm, &GroupDot { g })?;
    Ok((dx, dw))
}

/// Emit's backward: `dout [B, S, d]`, `y [E, N, d]`, `w [B, S, E]` → `(dy, dw)`, the gradients
/// of `y` and `w`; on the CPU in one pass over each group.
pub fn emit_backward(dout: &Tensor, y: &Tensor, w: &Tensor, g: usize) -> Result<(Tensor, Tensor)> {
    check_backward("emit", y, dout, w, g)?;
    let dout = dout.contiguous()?;
    if fused(&[y, w, &dout]) {
        let both = dout.apply_op3_no_bwd(y, w, &FusedBackward { g, of: Step::Emit })?;
        return split_pair(&both, y.dims3()?, w.dims3()?);
    }
    let dy = dout.apply_op2_no_bwd(w, &Merge { g })?;
    let dw = dout.apply_op2_no_bwd(y, &GroupDot { g })?;
    Ok((dy, dw))
}

/// That `rows [B, S, d]`, `groups [E, N, d]` and `w [B, S, E]` are the shapes of one layer.
fn check_backward(op: &str, groups: &Tensor, rows: &Tensor, w: &Tensor, g: usize) -> Result<()> {
    let (b, s, e) = w.dims3()?;
    check_group(b, g)?;
    let d = rows.dim(2)?;
    if rows.dims3()? != (b, s, d) || groups.dims3()? != (e, b / g * s, d) {
        candle_core::bail!(
            "mot {op} backward: {:?} and {:?} do not match weights {:?}",
            groups.dims(),
            rows.dims(),
            w.dims()
        );
    }
    Ok(())
}

fn check_group(b: usize, g: usize) -> Result<()> {
    if g == 0 || !b.is_multiple_of(g) {
        candle_core::bail!("Mixture of Tokens groups {g} sequences at one position, so the batch ({b} sequences) must be a multiple of {g}");
    }
    Ok(())
}

/// `MOTRAIN_MOT_OPS=plain` runs the plain formulation instead of the kernels, to measure what
/// they buy (`scripts/bench_mot.sh`).
fn plain() -> bool {
    static PLAIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PLAIN.get_or_init(|| std::env::var("MOTRAIN_MOT_OPS").is_ok_and(|v| v == "plain"))
}

/// Our kernels exist for f32 on CPU, and for f32 and bf16 on CUDA.
fn use_kernel(ts: &[&Tensor]) -> bool {
    if plain() {
        return false;
    }
    fused(ts)
        || (cfg!(feature = "cuda")
            && ts.iter().all(|t| {
                t.device().is_cuda()
                    && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::BF16)
            }))
}

// ---------------------------------------------------------------------------------------------
// The plain formulation: transposes into groups and batched matmuls. The reference for tests,
// and what runs on dtypes the kernels do not cover.

/// `[B, S, F]` → `[K, G, S, F]`, the view in which the group is an axis.
fn grouped(t: &Tensor, g: usize) -> Result<Tensor> {
    let (b, s, f) = t.dims3()?;
    t.reshape((b / g, g, s, f))
}

pub fn group_softmax_reference(z: &Tensor, g: usize) -> Result<Tensor> {
    let zg = grouped(z, g)?;
    let e = zg.broadcast_sub(&zg.max_keepdim(1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)?.reshape(z.shape())
}

pub fn merge_reference(x: &Tensor, w: &Tensor, g: usize) -> Result<Tensor> {
    let (_, _, d) = x.dims3()?;
    let e = w.dim(2)?;
    let xg = grouped(x, g)?.permute((0, 2, 1, 3))?.contiguous()?; // [K, S, G, d]
    let wg = grouped(w, g)?.permute((0, 2, 3, 1))?.contiguous()?; // [K, S, E, G]
    let m = wg.matmul(&xg)?; // [K, S, E, d]
    m.permute((2, 0, 1, 3))?.contiguous()?.reshape((e, (), d))
}

pub fn emit_reference(y: &Tensor, w: &Tensor, g: usize) -> Result<Tensor> {
    let (b, s, e) = w.dims3()?;
    let d = y.dim(2)?;
    let yk = y.reshape((e, b / g, s, d))?.permute((1, 2, 0, 3))?.contiguous()?; // [K, S, E, d]
    let wg = grouped(w, g)?.permute((0, 2, 1, 3))?.contiguous()?; // [K, S, G, E]
    let out = wg.matmul(&yk)?; // [K, S, G, d]
    out.permute((0, 2, 1, 3))?.contiguous()?.reshape((b, s, d))
}

pub fn group_dot_reference(a: &Tensor, c: &Tensor, g: usize) -> Result<Tensor> {
    let (b, s, d) = a.dims3()?;
    let e = c.dim(0)?;
    let ag = grouped(a, g)?.permute((0, 2, 1, 3))?.contiguous()?; // [K, S, G, d]
    let ck = c.reshape((e, b / g, s, d))?.permute((1, 2, 3, 0))?.contiguous()?; // [K, S, d, E]
    ag.matmul(&ck)?.permute((0, 2, 1, 3))?.contiguous()?.reshape((b, s, e))
}

// ---------------------------------------------------------------------------------------------
// The ops.

struct GroupSoftmax {
    g: usize,
}

struct Merge {
    g: usize,
}

struct Emit {
    g: usize,
    /// Where the backward leaves the weights' gradient for merge's ([`mixing::mix`]), in place
    /// of returning it.
    hand_over: Option<mixing::HandOver>,
}

/// Forward-only: the softmax's backward on the CPU, from `(w, dw)`.
struct GroupSoftmaxBackward {
    g: usize,
}

/// Forward-only: used inside the backward passes.
struct GroupDot {
    g: usize,
}

/// Forward-only, on the CPU: the backward of merge (`[dx | dw]` from `(dm, x, w)`) or of emit
/// (`[dy | dw]` from `(dout, y, w)`), in one pass.
struct FusedBackward {
    g: usize,
    of: Step,
}

enum Step {
    Merge,
    Emit,
}

/// The two gradients that a fused backward returns one after the other in `both`, as
/// tensors of shapes `first` and `second` (views of it, no copy).
fn split_pair(
    both: &Tensor, first: (usize, usize, usize), second: (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    let n = first.0 * first.1 * first.2;
    let part = |at, shape: (usize, usize, usize)| {
        both.narrow(0, at, shape.0 * shape.1 * shape.2)?.reshape(shape)
    };
    Ok((part(0, first)?, part(n, second)?))
}

impl CustomOp1 for GroupSoftmax {
    fn name(&self) -> &'static str {
        "mot-group-softmax"
    }

    fn cpu_fwd(&self, zs: &CpuStorage, zl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, e) = zl.shape().dims3()?;
        Ok((
            CpuStorage::F32(cpu::group_softmax(slice(zs, zl)?, b, s, e, self.g)),
            zl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, zs: &candle_core::CudaStorage, zl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::mot_cuda::group_softmax(zs, zl, self.g)
    }

    /// `dz = w ⊙ (dw − Σ_group w ⊙ dw)`.
    fn bwd(&self, _z: &Tensor, w: &Tensor, dw: &Tensor) -> Result<Option<Tensor>> {
        if fused(&[w, dw]) {
            let dw = dw.contiguous()?;
            return Ok(Some(w.apply_op2_no_bwd(&dw, &GroupSoftmaxBackward { g: self.g })?));
        }
        let wdw = (w * dw)?;
        let sum = grouped(&wdw, self.g)?.sum_keepdim(1)?; // [K, 1, S, E]
        let dz = (grouped(&wdw, self.g)? - grouped(w, self.g)?.broadcast_mul(&sum)?)?;
        Ok(Some(dz.reshape(w.shape())?))
    }
}

impl CustomOp2 for GroupSoftmaxBackward {
    fn name(&self) -> &'static str {
        "mot-group-softmax-backward"
    }

    fn cpu_fwd(
        &self, ws: &CpuStorage, wl: &Layout, ds: &CpuStorage, dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, e) = wl.shape().dims3()?;
        let dz = cpu::group_softmax_backward(slice(ws, wl)?, slice(ds, dl)?, b, s, e, self.g);
        Ok((CpuStorage::F32(dz), wl.shape().clone()))
    }
}

impl CustomOp2 for Merge {
    fn name(&self) -> &'static str {
        "mot-merge"
    }

    fn cpu_fwd(
        &self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, d) = xl.shape().dims3()?;
        let e = wl.shape().dims3()?.2;
        let m = cpu::merge(slice(xs, xl)?, slice(ws, wl)?, b, s, d, e, self.g);
        Ok((CpuStorage::F32(m), Shape::from((e, b / self.g * s, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, xs: &candle_core::CudaStorage, xl: &Layout, ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::mot_cuda::merge(xs, xl, ws, wl, self.g)
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _m: &Tensor, dm: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = merge_backward(dm, x, w, self.g)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp2 for Emit {
    fn name(&self) -> &'static str {
        "mot-emit"
    }

    fn cpu_fwd(
        &self, ys: &CpuStorage, yl: &Layout, ws: &CpuStorage, wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, e) = wl.shape().dims3()?;
        let d = yl.shape().dims3()?.2;
        let out = cpu::emit(slice(ys, yl)?, slice(ws, wl)?, b, s, d, e, self.g);
        Ok((CpuStorage::F32(out), Shape::from((b, s, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, ys: &candle_core::CudaStorage, yl: &Layout, ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::mot_cuda::emit(ys, yl, ws, wl, self.g)
    }

    fn bwd(
        &self, y: &Tensor, w: &Tensor, _out: &Tensor, dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dy, dw) = emit_backward(dout, y, w, self.g)?;
        match &self.hand_over {
            None => Ok((Some(dy), Some(dw))),
            Some(cell) => {
                *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(dw);
                Ok((Some(dy), None))
            }
        }
    }
}

impl CustomOp2 for GroupDot {
    fn name(&self) -> &'static str {
        "mot-group-dot"
    }

    fn cpu_fwd(
        &self, as_: &CpuStorage, al: &Layout, cs: &CpuStorage, cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, d) = al.shape().dims3()?;
        let e = cl.shape().dims3()?.0;
        let r = cpu::group_dot(slice(as_, al)?, slice(cs, cl)?, b, s, d, e, self.g);
        Ok((CpuStorage::F32(r), Shape::from((b, s, e))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, as_: &candle_core::CudaStorage, al: &Layout, cs: &candle_core::CudaStorage,
        cl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::mot_cuda::group_dot(as_, al, cs, cl, self.g)
    }
}

impl CustomOp3 for FusedBackward {
    fn name(&self) -> &'static str {
        match self.of {
            Step::Merge => "mot-merge-backward",
            Step::Emit => "mot-emit-backward",
        }
    }

    /// `(grad, c, w)`: `(dm, x, w)` for merge, `(dout, y, w)` for emit; `c` is `[·, ·, d]`
    /// either way.
    fn cpu_fwd(
        &self, gs: &CpuStorage, gl: &Layout, cs: &CpuStorage, cl: &Layout, ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, e) = wl.shape().dims3()?;
        let dims = (b, s, cl.shape().dims3()?.2, e, self.g);
        let (grad, c, w) = (slice(gs, gl)?, slice(cs, cl)?, slice(ws, wl)?);
        let both = match self.of {
            Step::Merge => cpu::merge_backward(grad, c, w, dims),
            Step::Emit => cpu::emit_backward(grad, c, w, dims),
        };
        let n = both.len();
        Ok((CpuStorage::F32(both), Shape::from(n)))
    }
}

// ---------------------------------------------------------------------------------------------
/// The CPU kernels.
mod cpu;

/// A layer's mixing, whose merge backward runs through the softmax and the controller.
pub mod mixing;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_grads, randn};
    use candle_core::{DType, Device};

    /// (B, S, d, E, G): G = 1, G = B, uneven widths, more experts than rows, and a width of
    /// whole blocks of the CPU kernels' register sums and a tail.
    pub(super) const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
        (4, 3, 5, 3, 2),
        (6, 7, 9, 4, 1),
        (4, 5, 3, 2, 4),
        (8, 2, 17, 11, 4),
        (3, 1, 4, 5, 3),
        (4, 3, 140, 3, 2),
    ];

    /// A naive loop over groups, experts and members, written from `models.md` alone.
    fn naive(
        x: &[f32], z: &[f32], (b, s, d, e, g): (usize, usize, usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut w, mut m, mut out) =
            (vec![0f32; b * s * e], vec![0f32; e * b / g * s * d], vec![0f32; b * s * d]);
        for kk in 0..b / g {
            for p in 0..s {
                let n = kk * s + p;
                let row = |i: usize| (kk * g + i) * s + p;
                for ex in 0..e {
                    let mx = (0..g).map(|i| z[row(i) * e + ex]).fold(f32::MIN, f32::max);
                    let total: f32 = (0..g).map(|i| (z[row(i) * e + ex] - mx).exp()).sum();
                    for i in 0..g {
                        w[row(i) * e + ex] = (z[row(i) * e + ex] - mx).exp() / total;
                        for j in 0..d {
                            m[(ex * (b / g) * s + n) * d + j] +=
                                w[row(i) * e + ex] * x[row(i) * d + j];
                        }
                    }
                }
                // Emit with y = m (the identity expert), so the test needs no expert.
                for i in 0..g {
                    for ex in 0..e {
                        for j in 0..d {
                            out[row(i) * d + j] +=
                                w[row(i) * e + ex] * m[(ex * (b / g) * s + n) * d + j];
                        }
                    }
                }
            }
        }
        (w, m, out)
    }

    #[test]
    fn cpu_kernels_match_a_naive_loop() {
        kernels_match_a_naive_loop(&Device::Cpu);
    }

    /// The same test on the GPU. Without the `cuda` feature cargo lists it as ignored; built
    /// with it on a machine without a device, it fails rather than pass without running.
    #[test]
    #[cfg_attr(not(feature = "cuda"), ignore = "CUDA skipped: built without the `cuda` feature")]
    fn cuda_kernels_match_a_naive_loop() {
        let dev = Device::new_cuda(0)
            .expect("built with the `cuda` feature but no CUDA device is present");
        kernels_match_a_naive_loop(&dev);
    }

    /// Forward against the naive loop, and the gradients of softmax → merge → emit against
    /// the plain formulation's autograd on the CPU.
    fn kernels_match_a_naive_loop(dev: &Device) {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        for (i, &(b, s, d, e, g)) in SHAPES.iter().enumerate() {
            let x = randn(&[b, s, d], 10 + i as u64);
            let z = randn(&[b, s, e], 20 + i as u64);
            let (w0, m0, out0) = naive(
                &x.flatten_all().unwrap().to_vec1().unwrap(),
                &z.flatten_all().unwrap().to_vec1().unwrap(),
                (b, s, d, e, g),
            );
            let expected =
                |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            let (xv, zv) = (
                candle_core::Var::from_tensor(&x.to_device(dev).unwrap()).unwrap(),
                candle_core::Var::from_tensor(&z.to_device(dev).unwrap()).unwrap(),
            );
            let w = group_softmax(&zv, g).unwrap();
            let m = merge(&xv, &w, g).unwrap();
            let out = emit(&m, &w, g).unwrap();
            assert_close(&cpu(&w), &expected(w0, &[b, s, e]), 1e-6);
            assert_close(&cpu(&m), &expected(m0, &[e, b / g * s, d]), 1e-5);
            assert_close(&cpu(&out), &expected(out0, &[b, s, d]), 1e-5);

            let proj = randn(&[b, s, d], 30 + i as u64);
            let grads = (&out * proj.to_device(dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (xr, zr) = (
                candle_core::Var::from_tensor(&x).unwrap(),
                candle_core::Var::from_tensor(&z).unwrap(),
            );
            let wr = group_softmax_reference(&zr, g).unwrap();
            let out_r = emit_reference(&merge_reference(&xr, &wr, g).unwrap(), &wr, g).unwrap();
            let ref_grads = (out_r * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close(&cpu(grads.get(&xv).unwrap()), ref_grads.get(&xr).unwrap(), 1e-4);
            assert_close(&cpu(grads.get(&zv).unwrap()), ref_grads.get(&zr).unwrap(), 1e-4);
            if !dev.is_cpu() {
                // bf16 on CUDA: f32 accumulation keeps the error at bf16 rounding.
                let wb = group_softmax(&zv.to_dtype(DType::BF16).unwrap(), g).unwrap();
                let mb = merge(&xv.to_dtype(DType::BF16).unwrap(), &wb, g).unwrap();
                assert_close(&cpu(&mb), &cpu(&m), 0.05 * g as f32);
                let ob = emit(&mb, &wb, g).unwrap();
                assert_close(&cpu(&ob), &cpu(&out), 0.1 * g as f32);
            }
        }
    }

    #[test]
    fn kernels_match_the_plain_formulation_and_finite_differences() {
        for &(b, s, d, e, g) in &SHAPES {
            let x = randn(&[b, s, d], 1);
            let z = randn(&[b, s, e], 2);
            let y = randn(&[e, b / g * s, d], 3);
            let w = group_softmax_reference(&z, g).unwrap();
            assert_close(&group_softmax(&z, g).unwrap(), &w, 1e-6);
            assert_close(&merge(&x, &w, g).unwrap(), &merge_reference(&x, &w, g).unwrap(), 1e-5);
            assert_close(&emit(&y, &w, g).unwrap(), &emit_reference(&y, &w, g).unwrap(), 1e-5);
            let dot = group_dot(&x, &y, g).unwrap();
            assert_close(&dot, &group_dot_reference(&x, &y, g).unwrap(), 1e-5);
            check_grads(
                std::slice::from_ref(&z),
                |v| group_softmax(&v[0], g),
                |v| group_softmax_reference(&v[0], g),
            );
            check_grads(
                &[x.clone(), w.clone()],
                |v| merge(&v[0], &v[1], g),
                |v| merge_reference(&v[0], &v[1], g),
            );
            check_grads(
                &[y.clone(), w.clone()],
                |v| emit(&v[0], &v[1], g),
                |v| emit_reference(&v[0], &v[1], g),
            );
        }
    }

    /// The one-pass backward kernels give, bit for bit, the two kernels each stands for, on
    /// every SIMD path this CPU has.
    #[test]
    fn fused_backward_passes_are_their_two_kernels() {
        let host = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for &(b, s, d, e, g) in &SHAPES {
            let (x, dout) = (host(randn(&[b, s, d], 1)), host(randn(&[b, s, d], 4)));
            let (y, dm) = (host(randn(&[e, b / g * s, d], 3)), host(randn(&[e, b / g * s, d], 5)));
            let w = host(group_softmax_reference(&randn(&[b, s, e], 2), g).unwrap());
            for level in crate::ops::simd::available() {
                let run =
                    |f: &(dyn Fn() -> Vec<f32> + Sync)| crate::ops::simd::with_level(level, f);
                let dims = (b, s, d, e, g);
                let merge_bwd = run(&|| cpu::merge_backward(&dm, &x, &w, dims));
                let mut want = run(&|| cpu::emit(&dm, &w, b, s, d, e, g));
                want.extend(run(&|| cpu::group_dot(&x, &dm, b, s, d, e, g)));
                assert!(merge_bwd == want, "merge backward {dims:?} on {level}");
                let emit_bwd = run(&|| cpu::emit_backward(&dout, &y, &w, dims));
                let mut want = run(&|| cpu::merge(&dout, &w, b, s, d, e, g));
                want.extend(run(&|| cpu::group_dot(&dout, &y, b, s, d, e, g)));
                assert!(emit_bwd == want, "emit backward {dims:?} on {level}");
            }
        }
    }

    #[test]
    fn a_batch_that_is_not_a_multiple_of_the_group_is_an_error() {
        let err = group_softmax(&randn(&[3, 2, 4], 1), 2).unwrap_err().to_string();
        assert!(err.contains("multiple of 2"), "{err}");
        assert!(merge(&randn(&[4, 2, 3], 1), &randn(&[4, 2, 5], 2), 3).is_err());
        // The backward passes check their shapes too: here dm has 3 experts where w has 5.
        let (x, w, dm) = (randn(&[4, 2, 3], 1), randn(&[4, 2, 5], 2), randn(&[3, 4, 3], 3));
        let err = merge_backward(&dm, &x, &w, 2).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
        assert!(emit_backward(&x, &dm, &w, 2).is_err());
        assert!(emit_backward(&x, &randn(&[5, 4, 3], 3), &w, 2).is_ok());
    }
}
