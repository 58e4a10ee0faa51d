//! The deterministic eval of `product.md`: the first full batches of the val stream, mean token
//! cross-entropy over all of them.

use crate::data::{EvalStream, ValSource};
use crate::dist::Dist;
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
    evaluate_on(model, stream, batch_size, max_batches, &Dist::single())
}

/// [`evaluate`] with the batches shared by the ranks of `dist` (rank r takes batches r, r + N,
/// …) and the sums reduced, so every rank gets the one-process result.
pub fn evaluate_on(
    model: &Transformer, stream: &EvalStream, batch_size: usize, max_batches: usize, dist: &Dist,
) -> Result<EvalResult> {
    let batches = stream.batches(batch_size, max_batches);
    if batches == 0 {
        anyhow::bail!(
            "the val shards hold {} windows of {} tokens, fewer than one batch of {batch_size}: lower the eval batch size or add val data",
            stream.windows(),
            stream.seq_len()
        );
    }
    // Sums of the loss and of each statistic / batches, which add up over ranks.
    let mut total = 0f64;
    let mut routing: Option<(Vec<LayerStats>, Vec<f64>)> = None;
    for b in (dist.rank()..batches).step_by(dist.size()) {
        let batch = stream.batch(b, batch_size);
        let parts = model.loss(&batch, false)?;
        total += parts.ce.to_scalar::<f32>()? as f64;
        let numbers = LayerStats::to_numbers(&parts.stats);
        let (_, sum) = routing.get_or_insert_with(|| (parts.stats, vec![0.0; numbers.len()]));
        sum.iter_mut().zip(numbers).for_each(|(a, x)| *a += x / batches as f64);
    }
    let (mut stats, mut numbers) = match routing {
        Some(r) => r,
        // A rank with no batch (more ranks than batches) still takes part in the sum.
        None => {
            let b = stream.batch(0, batch_size);
            let stats = model.loss(&b, false)?.stats;
            let n = LayerStats::to_numbers(&stats).len();
            (stats, vec![0.0; n])
        }
    };
    numbers.push(total);
    dist.all_reduce_sum_in_place_f64(&mut numbers);
    let loss = numbers.pop().expect("the loss") / batches as f64;
    LayerStats::set_numbers(&mut stats, &numbers);
    Ok(EvalResult {
        loss,
        ppl: loss.exp(),
        batches,
        batch_size,
        tokens: batches * batch_size * stream.seq_len(),
        routing: stats,
    })
}

/// The eval of several val sources: each alone, and overall.
#[derive(Debug, Clone)]
pub struct SourcesEval {
    /// Loss: the sources' losses weighted by their normalised weights (renormalised over the
    /// sources that have val shards); batches and tokens: summed; routing: the mean over sources.
    pub overall: EvalResult,
    pub sources: Vec<(String, EvalResult)>,
}

/// [`evaluate_on`] for each source in `val`, and their weighted mean; None when `val` is empty.
pub fn evaluate_sources(
    model: &Transformer, val: &[ValSource], batch_size: usize, max_batches: usize, dist: &Dist,
) -> Result<Option<SourcesEval>> {
    let mut sources = Vec::with_capacity(val.len());
    for v in val {
        let r = evaluate_on(model, &v.stream, batch_size, max_batches, dist);
        let r = if val.len() > 1 {
            r.map_err(|e| e.context(format!("val of {}", v.name)))?
        } else {
            r?
        };
        sources.push((v.name.clone(), r));
    }
    let overall = match sources.as_slice() {
        [] => return Ok(None),
        [(_, only)] => only.clone(),
        all => {
            let total: f64 = val.iter().map(|v| v.weight).sum();
            let loss =
                val.iter().zip(all).map(|(v, (_, r))| v.weight * r.loss).sum::<f64>() / total;
            let routing: Vec<Vec<LayerStats>> =
                all.iter().map(|(_, r)| r.routing.clone()).collect();
            EvalResult {
                loss,
                ppl: loss.exp(),
                batches: all.iter().map(|(_, r)| r.batches).sum(),
                batch_size,
                tokens: all.iter().map(|(_, r)| r.tokens).sum(),
                routing: LayerStats::average(&routing),
            }
        }
    };
    Ok(Some(SourcesEval { overall, sources }))
}
