//! Gradient sums on the GPUs with NCCL (cargo feature `nccl`), for a multi-rank MPI world whose
//! ranks train on CUDA devices, one GPU per rank.
//!
//! Set-up ([`Nccl::init`], through [`Dist::attach_device`]), as llm.c does it: rank 0 asks NCCL
//! for a unique id, MPI broadcasts its 128 bytes ([`Dist::broadcast_bytes`]), and every rank
//! joins the communicator with `ncclCommInitRank` on its device's stream, candle's own, so that
//! NCCL's kernels queue behind the backward pass that produced the gradients and ahead of the
//! optimizer that reads the sums, with no extra synchronisation between them.
//!
//! A sum ([`Dist::all_reduce_sum_tensors`] on tensors of that device) keeps the host path's
//! buckets ([`super::bucket_ranges`], about [`super::BUCKET_BYTES`] each): a bucket's gradients
//! are converted to f32 and concatenated on the GPU, summed in place of MPI by one
//! `ncclAllReduce`, scaled, and cut back into tensors of the original shapes and dtypes. Nothing
//! is copied to the host.
//!
//! The watchdog covers NCCL as it covers MPI: the MPI arrival check runs before the buckets are
//! queued, and the device is synchronised before the guard is dropped, so a peer that died or
//! hangs inside NCCL ends the job after the collective timeout instead of blocking it forever.
//! The synchronisation before the arrival check keeps the backward pass out of that timeout (and
//! out of the trainer's communication time).

use super::{bucket_ranges, Backend, Dist};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::ffi::c_char;
use std::time::Duration;

/// The size of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
const ID_BYTES: usize = 128;

/// How long `ncclCommInitRank` may take at least before the watchdog ends the job: it connects
/// every pair of ranks, which takes longer than a collective on large or busy clusters.
const INIT_TIMEOUT: Duration = Duration::from_secs(120);

/// This rank's NCCL communicator, on the CUDA device whose tensors it sums.
pub struct Nccl {
    comm: Comm,
    device: Device,
}

impl Nccl {
    /// Joins every rank of `dist` (an MPI world) into one NCCL communicator, each on its `dev`
    /// (see the module docs). Every rank must call it; it returns once all have joined.
    pub(super) fn init(
        dist: &Dist, world: &super::mpi::MpiWorld, dev: &CudaDevice,
    ) -> candle_core::Result<Nccl> {
        // Rank 0's id, or nothing when it could not make one: the others then fail too rather
        // than wait for a communicator that will never form.
        let mut failure = None;
        let mut bytes = Vec::new();
        if dist.is_root() {
            match Id::new() {
                Ok(id) => bytes = id.internal().iter().map(|&c| c as u8).collect(),
                Err(e) => failure = Some(e),
            }
        }
        dist.broadcast_bytes(0, &mut bytes);
        if let Some(e) = failure {
            bail!("NCCL could not create a unique id on rank 0: {}", describe(&e));
        }
        if bytes.len() != ID_BYTES {
            bail!("rank 0 could not create the NCCL unique id (its error says why)");
        }
        let mut internal = [0 as c_char; ID_BYTES];
        for (dst, src) in internal.iter_mut().zip(&bytes) {
            *dst = *src as c_char;
        }
        let id = Id::uninit(internal);
        let stream = dev.cuda_stream();
        // ncclCommInitRank takes the calling thread's current device.
        stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let timeout = dist.collective_timeout();
        dist.set_collective_timeout(timeout.map(|t| t.max(INIT_TIMEOUT)));
        let comm = {
            let _g = dist.enter(world, "nccl_comm_init_rank", 0);
            Comm::from_rank(stream, dist.rank(), dist.size(), id)
        };
        dist.set_collective_timeout(timeout);
        let comm = comm.map_err(|e| {
            candle_core::Error::Msg(format!(
                "rank {} of {}: NCCL could not join the communicator on GPU {}: {} (set \
                 NCCL_DEBUG=WARN for NCCL's own account; one rank per GPU)",
                dist.rank(),
                dist.size(),
                dev.cuda_stream().context().ordinal(),
                describe(&e)
            ))
        })?;
        Ok(Nccl { comm, device: Device::Cuda(dev.clone()) })
    }

    /// Whether tensors on `dev` can be summed by this communicator (the same device and stream).
    pub fn serves(&self, dev: &Device) -> bool {
        dev.same_device(&self.device)
    }
}

fn describe(e: &candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> String {
    format!("{:?}", e.0)
}

impl Dist {
    /// The NCCL counterpart of the host path of `Dist::all_reduce_tensors`: the sum over ranks
    /// of `grads` (all on `n`'s device), times `scale`, in buckets of `bucket_elems` values.
    pub(super) fn all_reduce_tensors_nccl(
        &self, n: &Nccl, grads: &[Tensor], bucket_elems: usize, scale: f32,
    ) -> candle_core::Result<Vec<Tensor>> {
        let Backend::Mpi(world) = &self.backend else {
            unreachable!("NCCL is set up in multi-rank MPI worlds only")
        };
        // The gradients are computed before the collective's timeout starts.
        n.device.synchronize()?;
        let elems = grads.iter().map(Tensor::elem_count).sum();
        let _g = self.enter(world, "all_reduce_sum(nccl)", elems);
        let out = sum_buckets(&n.comm, grads, bucket_elems, scale)?;
        // NCCL runs asynchronously on the stream: wait for it under the watchdog.
        n.device.synchronize()?;
        Ok(out)
    }
}

/// The buckets of [`Dist::all_reduce_tensors_nccl`], queued on `comm`'s stream (not waited for).
fn sum_buckets(
    comm: &Comm, grads: &[Tensor], bucket_elems: usize, scale: f32,
) -> candle_core::Result<Vec<Tensor>> {
    let counts: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
    let mut out = Vec::with_capacity(grads.len());
    for bucket in bucket_ranges(&counts, bucket_elems) {
        if counts[bucket.clone()].iter().all(|&c| c == 0) {
            out.extend_from_slice(&grads[bucket]);
            continue;
        }
        let flat: Vec<Tensor> = grads[bucket.clone()]
            .iter()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        let mut sum = flat.apply_op1_no_bwd(&AllReduceSum(comm))?;
        if scale != 1.0 {
            sum = sum.affine(scale as f64, 0.0)?;
        }
        let mut offset = 0;
        for g in &grads[bucket] {
            let len = g.elem_count();
            out.push(sum.narrow(0, offset, len)?.reshape(g.shape())?.to_dtype(g.dtype())?);
            offset += len;
        }
    }
    Ok(out)
}

/// The element-wise sum over the communicator's ranks of an f32 CUDA tensor, into a new one.
struct AllReduceSum<'a>(&'a Comm);

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("the NCCL sum takes CUDA tensors only")
    }

    fn cuda_fwd(
        &self, storage: &CudaStorage, layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("the NCCL sum takes contiguous tensors only")
        };
        if storage.dtype() != DType::F32 {
            bail!("the NCCL sum takes f32 tensors only, not {:?}", storage.dtype());
        }
        let dev = storage.device().clone();
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = dev.alloc_zeros::<f32>(end - start)?;
        self.0.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| {
            candle_core::Error::Msg(format!("ncclAllReduce failed: {}", describe(&e)))
        })?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A communicator of one rank on GPU 0: the sum is the identity, bucket by bucket, for
    /// every shape, dtype and layout the trainer hands over. Needs a GPU and libnccl; without
    /// the `nccl` feature this module is not compiled, so cargo does not list it.
    #[test]
    fn a_one_rank_nccl_sum_is_the_identity_on_gpu() {
        let dev = Device::new_cuda(0)
            .expect("built with the `nccl` feature but no CUDA device is present");
        let Device::Cuda(cuda) = &dev else { unreachable!() };
        let id = Id::new().expect("ncclGetUniqueId");
        let comm = Comm::from_rank(cuda.cuda_stream(), 0, 1, id).expect("ncclCommInitRank");
        let n = Nccl { comm, device: dev.clone() };
        assert!(n.serves(&dev) && !n.serves(&Device::Cpu));
        let grads = vec![
            Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap(),
            Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap().t().unwrap(),
            Tensor::new(&[[1.5f32, -2.0]], &dev).unwrap().to_dtype(DType::BF16).unwrap(),
            Tensor::zeros(0, DType::F32, &dev).unwrap(),
            Tensor::new(&[7f32; 40], &dev).unwrap(),
        ];
        for bucket_elems in [1, 5, 1000] {
            for scale in [1.0f32, 0.5] {
                let out = sum_buckets(&n.comm, &grads, bucket_elems, scale).unwrap();
                assert_eq!(out.len(), grads.len());
                for (g, o) in grads.iter().zip(&out) {
                    assert_eq!((g.dims(), g.dtype()), (o.dims(), o.dtype()));
                    assert!(o.device().same_device(&dev));
                    let want = (g.to_dtype(DType::F32).unwrap() * scale as f64).unwrap();
                    let (want, got) = (
                        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        o.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
                    );
                    assert_eq!(want, got.to_vec1::<f32>().unwrap());
                }
            }
        }
        let e =
            Tensor::new(&[1f32], &Device::Cpu).unwrap().apply_op1_no_bwd(&AllReduceSum(&n.comm));
        assert!(e.unwrap_err().to_string().contains("CUDA tensors only"));
    }
}
