//! What a forward pass carries besides the activations: its shape, the training flag, the
//! auxiliary losses of sparse layers and the statistics they record.

use super::stats::LayerStats;
use candle_core::{Result, Tensor};

/// What a forward pass carries besides the activations: its shape, the training flag, and
/// what the FFN layers record.
pub struct FfnContext {
    pub train: bool,
    /// Batch rows and sequence length of the `[B·S, d]` activations.
    pub rows: usize,
    pub seq: usize,
    /// MoT: group this many sequences instead of the trained group size (eval `--group-size`).
    pub group_size: Option<usize>,
    /// Seeds training-time noise (PESC adapter dropout): a function of the model's seed and
    /// the batch's place in the data stream, so resume redraws the same noise.
    pub noise_seed: u64,
    /// Experts recompute their hidden activations in backward (`train.recompute_experts`).
    pub recompute: bool,
    /// Whether sparse layers record their statistics in `stats`.
    pub record_stats: bool,
    pub aux_losses: Vec<Tensor>,
    pub z_losses: Vec<Tensor>,
    pub stats: Vec<LayerStats>,
}

impl FfnContext {
    pub fn new(train: bool, rows: usize, seq: usize) -> FfnContext {
        FfnContext {
            train,
            rows,
            seq,
            group_size: None,
            noise_seed: 0,
            recompute: false,
            record_stats: true,
            aux_losses: Vec::new(),
            z_losses: Vec::new(),
            stats: Vec::new(),
        }
    }

    /// `w_aux · mean(aux) + w_z · mean(z)` over the layers, or None without MoE layers.
    pub fn auxiliary_loss(&self, aux_weight: f64, z_weight: f64) -> Result<Option<Tensor>> {
        let mean = |ts: &[Tensor]| -> Result<Option<Tensor>> {
            if ts.is_empty() {
                return Ok(None);
            }
            Ok(Some((Tensor::stack(ts, 0)?.sum_all()? / ts.len() as f64)?))
        };
        let mut total: Option<Tensor> = None;
        for (t, w) in [(mean(&self.aux_losses)?, aux_weight), (mean(&self.z_losses)?, z_weight)] {
            if let (Some(t), true) = (t, w > 0.0) {
                let t = (t * w)?;
                total = Some(match total {
                    Some(acc) => (acc + t)?,
                    None => t,
                });
            }
        }
        Ok(total)
    }
}
