//! The CUDA side of the Mixture of Tokens ops: launches of the kernels in `kernels/mot.cu`,
//! which `build.rs` compiles to PTX and this module embeds. `super::mot` owns the semantics, the
//! CPU kernels and the backward passes, and calls these from its ops' `cuda_fwd`.
//!
//! This module owns what sits at the device boundary: the dtype dispatch (f32 and bf16; the
//! kernels accumulate in f32), the shape and contiguity checks, and the launch geometry. Each
//! function takes candle's storage and layout of its inputs and returns the output's storage and
//! shape, as `CustomOp{1,2}::cuda_fwd` wants.
//!
//! Shapes: B batch rows, S positions, E experts, group size G (B % G == 0), N = (B/G)·S groups.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/mot.ptx"));
/// The key under which candle keeps the loaded module, once per device.
const MODULE: &str = "motrain_mot";

/// Members per block in `group_dot`; MOT_REG in kernels/mot.cu. The kernels loop over their work
/// with grid-stride loops, so the launch geometry below only decides how well the GPU is filled:
/// a mismatch here would cost speed, never correctness.
const MEMBERS_PER_BLOCK: usize = 8;
/// Enough blocks to fill any GPU; bigger problems loop inside the kernels.
const MAX_BLOCKS: usize = 1 << 20;
/// The kernels take their sizes as 32-bit ints and step past them by up to 256.
const MAX_DIM: usize = 1 << 30;

/// `w [B, S, E]`: softmax of `z [B, S, E]` over the G members of each group, per expert.
pub fn group_softmax(z: &CudaStorage, zl: &Layout, g: usize) -> Result<(CudaStorage, Shape)> {
    let (b, s, e) = dims3(zl, "group_softmax", "logits")?;
    let n = groups(b, s, g, "group_softmax")?;
    let launch = Launch {
        kernel: "mot_group_softmax",
        threads: 256,
        blocks: (n * e).div_ceil(256),
        sizes: ints(&[b, s, e, g])?,
    };
    let dev = z.device();
    let out = match &z.slice {
        CudaStorageSlice::F32(z) => launch.run(dev, &[view(z, zl, "logits")?], b * s * e)?,
        CudaStorageSlice::BF16(z) => launch.run(dev, &[view(z, zl, "logits")?], b * s * e)?,
        _ => bail!("mot group_softmax on CUDA takes f32 or bf16, got {:?}", z.dtype()),
    };
    Ok((out, Shape::from((b, s, e))))
}

/// `m [E, N, d]`: `m[e, n] = Σ_{b∈n} w[b, s, e] · x[b, s]`, from `x [B, S, d]`, `w [B, S, E]`.
pub fn merge(
    x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, g: usize,
) -> Result<(CudaStorage, Shape)> {
    let (b, s, d) = dims3(xl, "merge", "activations")?;
    let (wb, ws, e) = dims3(wl, "merge", "weights")?;
    if (wb, ws) != (b, s) {
        bail!("mot merge: weights {:?} do not match activations {:?}", wl.dims(), xl.dims());
    }
    let n = groups(b, s, g, "merge")?;
    let launch = Launch::over_columns("mot_merge", n, d, ints(&[b, s, d, e, g])?);
    let dev = x.device();
    let out = match (&x.slice, &w.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(w)) => {
            launch.run(dev, &[view(x, xl, "activations")?, view(w, wl, "weights")?], e * n * d)?
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w)) => {
            launch.run(dev, &[view(x, xl, "activations")?, view(w, wl, "weights")?], e * n * d)?
        }
        _ => bail!(
            "mot merge on CUDA takes f32 or bf16 of one dtype, got {:?} and {:?}",
            x.dtype(),
            w.dtype()
        ),
    };
    Ok((out, Shape::from((e, n, d))))
}

/// `out [B, S, d]`: `out[b, s] = Σ_e w[b, s, e] · y[e, n(b, s)]`, from `y [E, N, d]`, `w [B, S, E]`.
pub fn emit(
    y: &CudaStorage, yl: &Layout, w: &CudaStorage, wl: &Layout, g: usize,
) -> Result<(CudaStorage, Shape)> {
    let (b, s, e) = dims3(wl, "emit", "weights")?;
    let (ye, yn, d) = dims3(yl, "emit", "expert outputs")?;
    let n = groups(b, s, g, "emit")?;
    if (ye, yn) != (e, n) {
        bail!(
            "mot emit: expert outputs {:?} do not match weights {:?} with groups of {g}",
            yl.dims(),
            wl.dims()
        );
    }
    let launch = Launch::over_columns("mot_emit", n, d, ints(&[b, s, d, e, g])?);
    let dev = y.device();
    let out = match (&y.slice, &w.slice) {
        (CudaStorageSlice::F32(y), CudaStorageSlice::F32(w)) => launch.run(
            dev,
            &[view(y, yl, "expert outputs")?, view(w, wl, "weights")?],
            b * s * d,
        )?,
        (CudaStorageSlice::BF16(y), CudaStorageSlice::BF16(w)) => launch.run(
            dev,
            &[view(y, yl, "expert outputs")?, view(w, wl, "weights")?],
            b * s * d,
        )?,
        _ => bail!(
            "mot emit on CUDA takes f32 or bf16 of one dtype, got {:?} and {:?}",
            y.dtype(),
            w.dtype()
        ),
    };
    Ok((out, Shape::from((b, s, d))))
}

/// `r [B, S, E]`: `r[b, s, e] = ⟨a[b, s], c[e, n(b, s)]⟩`, from `a [B, S, d]`, `c [E, N, d]`.
pub fn group_dot(
    a: &CudaStorage, al: &Layout, c: &CudaStorage, cl: &Layout, g: usize,
) -> Result<(CudaStorage, Shape)> {
    let (b, s, d) = dims3(al, "group_dot", "rows")?;
    let (e, cn, cd) = dims3(cl, "group_dot", "group rows")?;
    let n = groups(b, s, g, "group_dot")?;
    if (cn, cd) != (n, d) {
        bail!(
            "mot group_dot: group rows {:?} do not match rows {:?} with groups of {g}",
            cl.dims(),
            al.dims()
        );
    }
    // A block takes MEMBERS_PER_BLOCK members of a group; its warps share out the experts, and
    // more than 8 warps would mostly wait on the same rows.
    let warps = e.min(8);
    let launch = Launch {
        kernel: "mot_group_dot",
        threads: 32 * warps,
        blocks: n * g.div_ceil(MEMBERS_PER_BLOCK),
        sizes: ints(&[b, s, d, e, g])?,
    };
    let dev = a.device();
    let out = match (&a.slice, &c.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(c)) => {
            launch.run(dev, &[view(a, al, "rows")?, view(c, cl, "group rows")?], b * s * e)?
        }
        (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(c)) => {
            launch.run(dev, &[view(a, al, "rows")?, view(c, cl, "group rows")?], b * s * e)?
        }
        _ => bail!(
            "mot group_dot on CUDA takes f32 or bf16 of one dtype, got {:?} and {:?}",
            a.dtype(),
            c.dtype()
        ),
    };
    Ok((out, Shape::from((b, s, e))))
}

/// One kernel launch: the kernel's name without its dtype suffix, the geometry, and the sizes
/// passed after the pointers (B, S, [d,] E, G).
struct Launch {
    kernel: &'static str,
    threads: usize,
    blocks: usize,
    sizes: Vec<i32>,
}

impl Launch {
    /// merge and emit: a block per (group, chunk of d), a thread per column of the chunk. 128
    /// threads give full coalesced rows; narrower models get one warp-multiple covering d.
    fn over_columns(kernel: &'static str, groups: usize, d: usize, sizes: Vec<i32>) -> Self {
        let threads = d.next_multiple_of(32).min(128);
        Launch { kernel, threads, blocks: groups * d.div_ceil(threads), sizes }
    }

    /// Runs the kernel for dtype `T` on `inputs` and returns its freshly allocated output of
    /// `out_len` elements.
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self, dev: &CudaDevice, inputs: &[CudaView<'_, T>], out_len: usize,
    ) -> Result<CudaStorage> {
        if out_len == 0 {
            // A zero-byte CUDA allocation is an error, and there is nothing to compute.
            bail!("mot {}: empty tensors are not supported on CUDA", self.kernel);
        }
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(self.kernel), MODULE, PTX)?;
        // SAFETY: every kernel writes every element of its output before anything reads it.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(out_len)? };
        let cfg = LaunchConfig {
            grid_dim: (self.blocks.clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block_dim: (self.threads as u32, 1, 1),
            shared_mem_bytes: 0, // the kernels' shared memory is static
        };
        {
            let mut args = func.builder();
            for input in inputs {
                args.arg(input);
            }
            args.arg(&mut out);
            for size in &self.sizes {
                args.arg(size);
            }
            // SAFETY: the argument list matches the kernel's signature (pointers to T, then
            // ints). The callers checked the sizes against each other and `view` against the
            // buffers, which bounds every index the kernel computes.
            unsafe { args.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// The contiguous elements of a tensor, from its layout's start offset.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) if end <= s.len() => Ok(s.slice(start..end)),
        Some((start, end)) => {
            bail!("mot: {what} span elements {start}..{end} of a buffer of {}", s.len())
        }
        None => bail!(
            "mot: {what} must be contiguous, got shape {:?} with strides {:?}",
            l.dims(),
            l.stride()
        ),
    }
}

fn dims3(l: &Layout, op: &str, what: &str) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [a, b, c] => Ok((a, b, c)),
        ref dims => bail!("mot {op}: {what} must have 3 dimensions, got shape {dims:?}"),
    }
}

/// N, the number of groups, after checking that groups of `g` rows tile the batch.
fn groups(b: usize, s: usize, g: usize, op: &str) -> Result<usize> {
    if g == 0 || !b.is_multiple_of(g) {
        bail!("mot {op}: groups of {g} rows do not tile a batch of {b}");
    }
    Ok(b / g * s)
}

fn ints(sizes: &[usize]) -> Result<Vec<i32>> {
    sizes
        .iter()
        .map(|&v| match i32::try_from(v) {
            Ok(i) if v <= MAX_DIM => Ok(i),
            _ => bail!("mot: size {v} is beyond what the CUDA kernels index ({MAX_DIM})"),
        })
        .collect()
}
