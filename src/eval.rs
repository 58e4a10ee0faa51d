//! The deterministic eval of `product.md`: the first full batches of the val stream, mean token
//! cross-entropy over all of them.

use crate::data::EvalStream;
use crate::model::stats::LayerStats;
use crate::model::Transformer;
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub ppl: f64,
    pub batches: usize,
    pub batch_size: usize,
    pub tokens: usize,
    /// Per MoE or MoT layer, averaged over the batches.
    pub routing: Vec<LayerStats>,
}

pub fn evaluate(
    model: &Transformer, stream: &EvalStream, batch_size: usize, max_batches: usize,
) -> Result<EvalResult> {
    let batches = stream.batches(batch_size, max_batches);
    if batches == 0 {
        anyhow::bail!(
            "the val shards hold {} windows of {} tokens, fewer than one batch of {batch_size}: lower the eval batch size or add val data",
            stream.windows(),
            stream.seq_len()
        );
    }
    let mut total = 0f64;
    let mut stats = Vec::with_capacity(batches);
    for b in 0..batches {
        let batch = stream.batch(b, batch_size);
        let parts = model.loss(&batch, false)?;
        total += parts.ce.to_scalar::<f32>()? as f64;
        stats.push(parts.stats);
    }
    let loss = total / batches as f64;
    Ok(EvalResult {
        loss,
        ppl: loss.exp(),
        batches,
        batch_size,
        tokens: batches * batch_size * stream.seq_len(),
        routing: LayerStats::average(&stats),
    })
}
