//! `motrain bench`: the speed of training steps on a config, as one JSON object.

use crate::config::Config;
use crate::metrics::peak_rss_bytes;
use crate::model::flops_per_token;
use crate::train::Trainer;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub config: String,
    pub ffn: String,
    pub params: usize,
    pub steps: usize,
    pub tokens_per_step: u64,
    pub tokens_per_s: f64,
    pub step_time_s: f64,
    pub flops_per_token: f64,
    pub gflops_per_s: f64,
    pub peak_rss_bytes: u64,
    pub threads: usize,
    pub final_loss: f64,
}

/// Times `steps` optimizer steps after `warmup` untimed ones.
pub fn bench(cfg: Config, name: &str, steps: usize, warmup: usize) -> Result<BenchResult> {
    let mut trainer = Trainer::new(cfg)?;
    for _ in 0..warmup {
        trainer.train_step()?;
    }
    let start = Instant::now();
    let mut loss = f64::NAN;
    for _ in 0..steps {
        loss = trainer.train_step()?.loss;
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens_per_step = trainer.tokens_per_step();
    let tokens_per_s = (tokens_per_step * steps as u64) as f64 / secs;
    let fpt = flops_per_token(&trainer.cfg.model, trainer.cfg.data.seq_len);
    Ok(BenchResult {
        config: name.to_string(),
        ffn: format!("{:?}", trainer.cfg.model.ffn).to_lowercase(),
        params: trainer.params.count(),
        steps,
        tokens_per_step,
        tokens_per_s,
        step_time_s: secs / steps as f64,
        flops_per_token: fpt,
        gflops_per_s: fpt * tokens_per_s / 1e9,
        peak_rss_bytes: peak_rss_bytes(),
        threads: rayon::current_num_threads(),
        final_loss: loss,
    })
}
