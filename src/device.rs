//! Where tensors live: the candle device that `run.device` names.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// The device `run.device` asks for.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0)?
        } else {
            Device::Cpu
        }),
        s => {
            let n =
                s.strip_prefix("cuda:").map_or(Ok(0), str::parse::<usize>).context("run.device")?;
            if !candle_core::utils::cuda_is_available() {
                bail!("run.device = {s:?}, but this motrain was built without the `cuda` feature or no CUDA device is present");
            }
            Ok(Device::new_cuda(n)?)
        }
    }
}
