//! `motrain bench`: the speed of training steps on a config, as one JSON object.

use crate::config::Config;
use crate::metrics::peak_rss_bytes;
use crate::model::flops_per_token;
use crate::train::{Phases, Trainer};
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
    /// The CPU and the SIMD path of the fused kernels (`simd avx512`), or the GPU.
    pub cpu: String,
    pub simd: String,
    /// Data-parallel ranks, and the seconds per step spent summing gradients over them.
    pub ranks: usize,
    #[serde(skip)]
    pub rank: usize,
    pub comm_s_per_step: f64,
    /// comm_s_per_step / step_time_s.
    pub comm_share: f64,
    pub final_loss: f64,
    /// Milliseconds per step in each phase of it.
    pub phases_ms: PhasesMs,
    /// MoT models: the mixing ops alone, fused against the plain formulation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mot_ops: Option<MixingOps>,
    /// MoT models: one layer's experts, forward and backward, keeping their hidden activations
    /// against recomputing them (`train.recompute_experts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertTimes>,
}

/// Milliseconds per timed step: the phases of `train::Phases`, and the rest of the step (the
/// batch plan, the step's logs, and on a GPU the wait for the work it queued).
#[derive(Debug, Serialize)]
pub struct PhasesMs {
    pub forward: f64,
    pub backward: f64,
    pub comm: f64,
    pub norm: f64,
    pub update: f64,
    pub other: f64,
}

impl PhasesMs {
    fn per_step(p: &Phases, steps: usize, step_ms: f64) -> PhasesMs {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / steps.max(1) as f64;
        let (forward, backward, comm) = (ms(p.forward), ms(p.backward), ms(p.comm));
        let (norm, update) = (ms(p.norm), ms(p.update));
        let other = step_ms - (forward + backward + comm + norm + update);
        PhasesMs { forward, backward, comm, norm, update, other }
    }
}

/// Milliseconds for one MoT layer's experts on their merged tokens, forward and backward: the
/// best of several alternating runs each way.
#[derive(Debug, Serialize)]
pub struct ExpertTimes {
    pub kept_ms: f64,
    pub recomputed_ms: f64,
    /// recomputed / kept.
    pub cost: f64,
}

/// Milliseconds for one layer's mixing (the controller's logits, group softmax, merge and emit),
/// forward and backward, at the config's shapes: the best of several alternating runs of the
/// kernels (`ops::mot::mixing::mix`) and of the plain formulation.
#[derive(Debug, Serialize)]
pub struct MixingOps {
    pub fused_ms: f64,
    pub plain_ms: f64,
    pub speedup: f64,
}

/// Times `steps` optimizer steps of each config after `warmup` untimed ones. Several configs
/// (`bench --vs`) are timed step by step in turn, A, B, A, B …: a machine whose speed drifts
/// over seconds, as shared cloud machines do, slows them alike, so their ratio holds where
/// separate runs would not. All models live in one process; peak RSS is the process's.
pub fn bench(runs: Vec<(Config, String)>, steps: usize, warmup: usize) -> Result<Vec<BenchResult>> {
    let dist = std::rc::Rc::new(crate::dist::Dist::from_env()?);
    let mut timed = Vec::with_capacity(runs.len());
    for (cfg, name) in runs {
        timed.push((Timed::new(cfg, &dist)?, name));
    }
    for _ in 0..warmup {
        for (t, _) in &mut timed {
            t.trainer.train_step()?;
        }
    }
    for (t, _) in &mut timed {
        t.phases_before = t.trainer.phases;
    }
    for _ in 0..steps {
        for (t, _) in &mut timed {
            t.step()?;
        }
    }
    timed.into_iter().map(|(t, name)| t.result(&name, steps, &dist)).collect()
}

/// A trainer and the time its timed steps took; its phases as they stood before them.
struct Timed {
    trainer: Trainer,
    secs: f64,
    phases_before: Phases,
    loss: f64,
}

impl Timed {
    fn new(cfg: Config, dist: &std::rc::Rc<crate::dist::Dist>) -> Result<Timed> {
        Ok(Timed {
            trainer: Trainer::new(cfg, dist.clone())?,
            secs: 0.0,
            phases_before: Phases::default(),
            loss: f64::NAN,
        })
    }

    fn step(&mut self) -> Result<()> {
        let start = Instant::now();
        self.loss = self.trainer.train_step()?.loss;
        self.secs += start.elapsed().as_secs_f64();
        Ok(())
    }

    fn result(self, name: &str, steps: usize, dist: &crate::dist::Dist) -> Result<BenchResult> {
        let (trainer, secs) = (self.trainer, self.secs);
        trainer.use_kernel();
        let phases = trainer.phases.since(&self.phases_before);
        let comm_s_per_step = phases.comm.as_secs_f64() / steps.max(1) as f64;
        let phases_ms = PhasesMs::per_step(&phases, steps, secs * 1e3 / steps.max(1) as f64);
        let (mot_ops, experts) = match trainer.cfg.model.ffn {
            crate::config::FfnKind::Mot => {
                (Some(time_mixing_ops(&trainer.cfg, 10)?), Some(time_experts(&trainer.cfg, 6)?))
            }
            _ => (None, None),
        };
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
            cpu: crate::ops::simd::cpu_model(),
            simd: crate::ops::describe(trainer.params.device()),
            ranks: dist.size(),
            rank: dist.rank(),
            comm_s_per_step,
            comm_share: comm_s_per_step / (secs / steps.max(1) as f64),
            final_loss: self.loss,
            phases_ms,
            mot_ops,
            experts,
        })
    }
}

fn time_mixing_ops(cfg: &Config, reps: usize) -> Result<MixingOps> {
    use crate::ops::logits::logits_reference;
    use crate::ops::mot::mixing::mix;
    use crate::ops::mot::{emit_reference, group_softmax_reference, merge_reference};
    use candle_core::{Device, Tensor, Var};
    let (b, s, d) = (cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.d_model);
    let (e, g) = (cfg.model.mot.n_experts, cfg.model.mot.group_size);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, d), &Device::Cpu)?)?;
    let c = Var::from_tensor(&Tensor::randn(0f32, 0.1, (e, d), &Device::Cpu)?)?;
    // The layer's mixing from the controller on: the expert is the identity here, so emit takes
    // the merged tokens, of the shape it takes in the layer.
    let (fused_ms, plain_ms) = best_alternating(reps, |fused| {
        let out = if fused {
            let mixed = mix(&x, &c, g)?;
            mixed.emit(&mixed.m)?
        } else {
            let z = logits_reference(&x.reshape((b * s, d))?, &c)?.reshape((b, s, e))?;
            let w = group_softmax_reference(&z, g)?;
            emit_reference(&merge_reference(&x, &w, g)?, &w, g)?
        };
        out.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok(MixingOps { fused_ms, plain_ms, speedup: plain_ms / fused_ms })
}

fn time_experts(cfg: &Config, reps: usize) -> Result<ExpertTimes> {
    use crate::model::{context::FfnContext, experts::Experts, Params};
    use candle_core::{Device, Tensor};
    let m = &cfg.model;
    let (e, d, f) = (m.mot.n_experts, m.d_model, m.mot.expert_width(m.d_ff));
    // Each expert gets one merged token per group: N = S·B/G rows.
    let n = cfg.data.seq_len * cfg.train.micro_batch_size / m.mot.group_size;
    let mut p = Params::new(&Device::Cpu, 0, m.init_scale);
    let experts = Experts::new(&mut p, "experts", e, d, f, m.activation)?;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (e * n, d), &Device::Cpu)?)?;
    let offsets: Vec<usize> = (0..=e).map(|i| i * n).collect();
    let (recomputed_ms, kept_ms) = best_alternating(reps, |recompute| {
        let ctx = FfnContext { recompute, ..FfnContext::new(true, e * n, 1) };
        experts.forward(&x, &offsets, &ctx)?.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok(ExpertTimes { kept_ms, recomputed_ms, cost: recomputed_ms / kept_ms })
}

/// Milliseconds of `run(true)` and `run(false)`: the best of `reps` alternating runs of each,
/// so that a machine whose speed drifts hurts both alike.
fn best_alternating(reps: usize, run: impl Fn(bool) -> Result<()>) -> Result<(f64, f64)> {
    let time = |on: bool| -> Result<f64> {
        let t = Instant::now();
        run(on)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut on_ms, mut off_ms) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        off_ms = off_ms.min(time(false)?);
        on_ms = on_ms.min(time(true)?);
    }
    Ok((on_ms, off_ms))
}
