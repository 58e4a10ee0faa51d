//! Where tensors live: the candle device that `run.device` names.
//!
//! `"cuda"` (and `"auto"` when a GPU is present) is GPU 0 in a process of its own, and the
//! local rank's GPU under a launcher (`mpirun`, `srun`; see [`crate::dist::local_rank`]): rank r
//! of a node takes GPU r, one GPU per rank, as NCCL wants. When the launcher leaves each rank a
//! single visible GPU (`srun --gpus-per-task=1`, or `CUDA_VISIBLE_DEVICES` set per rank), that
//! GPU is the one. `"cuda:N"` is GPU N whatever the launcher says.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// The device `run.device` asks for.
pub fn device(spec: &str) -> Result<Device> {
    let gpus = || -> Result<usize> {
        if !candle_core::utils::cuda_is_available() {
            bail!("run.device = {spec:?}, but this motrain was built without the `cuda` feature or no CUDA device is present");
        }
        gpu_count()
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if !candle_core::utils::cuda_is_available() => Ok(Device::Cpu),
        "auto" | "cuda" => {
            let n = pick_gpu(crate::dist::local_rank()?, gpus()?)?;
            Ok(Device::new_cuda(n).with_context(|| format!("run.device = {spec:?}: GPU {n}"))?)
        }
        s => {
            let n: usize =
                s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).with_context(|| {
                    format!("run.device = {s:?}: expected auto, cpu, cuda or cuda:N")
                })?;
            gpus()?;
            Ok(Device::new_cuda(n)?)
        }
    }
}

/// The GPU a process takes among `count` visible ones, given its rank on the node when a
/// launcher started it (see the module docs).
fn pick_gpu(local_rank: Option<usize>, count: usize) -> Result<usize> {
    match local_rank {
        None => Ok(0),
        Some(_) if count <= 1 => Ok(0),
        Some(r) if r < count => Ok(r),
        Some(r) => bail!(
            "this is local rank {r} on its node, but only {count} GPUs are visible: start at most \
             one rank per GPU (mpirun -n / srun --ntasks-per-node), or name the GPU with \
             run.device = \"cuda:N\""
        ),
    }
}

/// How many CUDA devices this process sees.
#[cfg(feature = "cuda")]
fn gpu_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    Ok(CudaContext::device_count().context("counting the CUDA devices")?.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
fn gpu_count() -> Result<usize> {
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_takes_its_own_gpu() {
        assert_eq!(pick_gpu(None, 4).unwrap(), 0);
        assert_eq!(pick_gpu(Some(0), 4).unwrap(), 0);
        assert_eq!(pick_gpu(Some(3), 4).unwrap(), 3);
        assert_eq!(pick_gpu(Some(3), 1).unwrap(), 0, "one GPU bound to the rank by the launcher");
        let e = pick_gpu(Some(4), 4).unwrap_err().to_string();
        assert!(e.contains("local rank 4") && e.contains("4 GPUs"), "{e}");
    }

    #[test]
    fn the_cpu_needs_no_gpu() {
        assert!(device("cpu").unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            assert!(device("auto").unwrap().is_cpu());
            for spec in ["cuda", "cuda:1"] {
                let e = device(spec).unwrap_err().to_string();
                assert!(e.contains("without the `cuda` feature"), "{e}");
            }
        }
    }
}
