//! The training loop: micro-batches with gradient accumulation, global-norm clipping, the
//! schedule, AdamW, periodic logs, evals and checkpoints, and exact resume.

pub mod optim;
pub mod schedule;

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::{Config, NanPolicy};
use crate::data::{self, EvalStream, TrainLoader};
use crate::eval::{evaluate, EvalResult};
use crate::metrics::{format_duration, MetricsLog, Progress};
use crate::model::routing::LayerStats;
use crate::model::{Params, Transformer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use optim::AdamW;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a `train` command begins.
pub enum Start {
    Fresh,
    Resume,
    InitFrom(PathBuf),
}

pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// The update was skipped: the loss or the gradient norm was not finite.
    pub skipped: bool,
    /// Per MoE layer, averaged over the micro-batches.
    pub routing: Vec<LayerStats>,
}

pub struct Trainer {
    pub cfg: Config,
    pub params: Params,
    pub model: Transformer,
    pub opt: AdamW,
    pub loader: TrainLoader,
    pub val: Option<EvalStream>,
    pub step: usize,
    pub tokens: u64,
    pub skipped_steps: u64,
    elapsed_before: f64,
    /// Test hook (`MOTRAIN_FAULT_NAN_STEP=N`): step N's loss becomes NaN, as a diverging run's would.
    nan_fault_step: Option<usize>,
}

/// The device `run.device` asks for.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() { Device::new_cuda(0)? } else { Device::Cpu }),
        s => {
            let n = s.strip_prefix("cuda:").map_or(Ok(0), str::parse::<usize>).context("run.device")?;
            if !candle_core::utils::cuda_is_available() {
                bail!("run.device = {s:?}, but this motrain was built without the `cuda` feature or no CUDA device is present");
            }
            Ok(Device::new_cuda(n)?)
        }
    }
}

/// A checkpoint's model, built from its state.json on the device it names and filled with its
/// weights; the checkpoint comes back too (its state, weights and directory).
pub fn load_model(path: &Path) -> Result<(Checkpoint, Transformer)> {
    let dir = checkpoint::resolve(path)?;
    let cfg = checkpoint::load_state(&dir)?.config;
    let dev = device(&cfg.run.device)?;
    let ckpt = checkpoint::load(&dir, &dev)?;
    ckpt.check_config(&cfg.model)?;
    let mut params = Params::new(&dev, cfg.run.seed, cfg.model.init_scale);
    let model = Transformer::new(&cfg.model, &mut params)?;
    ckpt.restore(&params)?;
    Ok((ckpt, model))
}

impl Trainer {
    /// A freshly initialised model with its optimizer and data.
    pub fn new(cfg: Config) -> Result<Trainer> {
        let dev = device(&cfg.run.device)?;
        let model_cfg = cfg.model.clone();
        let mut params = Params::new(&dev, cfg.run.seed, cfg.model.init_scale).freezing(move |name| !crate::model::trains(&model_cfg, name));
        let model = Transformer::new(&cfg.model, &mut params)?.with_recompute_experts(cfg.train.recompute_experts);
        // Moments only for what trains.
        let opt = AdamW::new(&params, |name| !params.is_frozen(name), &cfg.train)?;
        let shards = data::shards::open_all(&cfg.data.train, &cfg.data.format, cfg.model.vocab_size)?;
        let sampler = data::loader::Sampler::parse(&cfg.data.sampler).unwrap_or(data::loader::Sampler::Random);
        let loader = TrainLoader::new(shards, cfg.data.seq_len, cfg.run.seed)?.with_sampler(sampler);
        let val = match &cfg.data.val {
            Some(glob) => Some(EvalStream::new(data::shards::open_all(glob, &cfg.data.format, cfg.model.vocab_size)?, cfg.data.seq_len)),
            None => None,
        };
        let nan_fault_step = std::env::var("MOTRAIN_FAULT_NAN_STEP").ok().and_then(|s| s.parse().ok());
        Ok(Trainer { cfg, params, model, opt, loader, val, step: 0, tokens: 0, skipped_steps: 0, elapsed_before: 0.0, nan_fault_step })
    }

    /// Continues exactly where `ckpt` stopped: weights, moments, step, data cursor.
    pub fn resume_from(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.restore(&self.params)?;
        let moments = ckpt.optimizer(self.params.device())?;
        self.opt
            .load_state(&moments, ckpt.state.optimizer_t)
            .map_err(|m| checkpoint::CheckpointError::Invalid { path: ckpt.dir.join("optimizer.safetensors"), message: m })?;
        self.step = ckpt.state.step;
        self.tokens = ckpt.state.tokens;
        self.loader.cursor = ckpt.state.data_cursor;
        self.elapsed_before = ckpt.state.elapsed_s;
        self.skipped_steps = ckpt.state.skipped_steps;
        Ok(())
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.cfg.train.batch_size * self.cfg.data.seq_len) as u64
    }

    /// One optimizer step over `batch_size` sequences in micro-batches.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let accum = self.cfg.accumulation();
        let micro = self.cfg.train.micro_batch_size;
        let mut acc: Vec<Option<Tensor>> = vec![None; self.opt.slots.len()];
        let mut loss_sum = 0f64;
        let mut stats = Vec::with_capacity(accum);
        for _ in 0..accum {
            let batch = self.loader.next_batch(micro);
            let parts = self.model.loss(&batch, true)?;
            let mut loss = parts.total()?;
            if self.nan_fault_step == Some(self.step + 1) {
                loss = (loss * f64::NAN)?;
            }
            loss_sum += parts.ce.to_scalar::<f32>()? as f64;
            if self.nan_fault_step == Some(self.step + 1) {
                loss_sum = f64::NAN;
            }
            stats.push(parts.stats);
            let scaled = if accum > 1 { (loss / accum as f64)? } else { loss };
            let grads = scaled.backward()?;
            for (a, slot) in acc.iter_mut().zip(&self.opt.slots) {
                let g = match grads.get(&slot.var) {
                    Some(g) => g.clone(),
                    None => slot.var.zeros_like()?,
                };
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        let grads: Vec<Tensor> = acc.into_iter().map(|g| g.expect("one micro-batch at least")).collect();
        let grad_norm = global_norm(&grads)?;
        let loss = loss_sum / accum as f64;
        let lr = schedule::learning_rate(&self.cfg.train, self.step);
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            match self.cfg.train.on_nan {
                NanPolicy::Stop => bail!(
                    "step {}: the loss is {loss} and the gradient norm {grad_norm}; stopped before updating anything \
                     (the last checkpoint is intact; lower train.lr, or set train.on_nan = \"skip\")",
                    self.step + 1
                ),
                NanPolicy::Skip => self.skipped_steps += 1,
            }
        } else {
            let clip = self.cfg.train.grad_clip;
            let scale = if clip > 0.0 && grad_norm > clip { clip / (grad_norm + 1e-6) } else { 1.0 };
            self.opt.step(&grads, lr, scale)?;
        }
        self.step += 1;
        self.tokens += self.tokens_per_step();
        Ok(StepStats { loss, grad_norm, lr, skipped, routing: LayerStats::average(&stats) })
    }

    pub fn eval(&self) -> Result<Option<EvalResult>> {
        match &self.val {
            Some(stream) => Ok(Some(evaluate(&self.model, stream, self.cfg.train.eval_batch_size, self.cfg.train.eval_batches)?)),
            None => Ok(None),
        }
    }

    pub fn state(&self, elapsed: f64) -> TrainState {
        TrainState {
            step: self.step,
            tokens: self.tokens,
            data_cursor: self.loader.cursor,
            optimizer_t: self.opt.t,
            skipped_steps: self.skipped_steps,
            seed: self.cfg.run.seed,
            elapsed_s: self.elapsed_before + elapsed,
            motrain_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.cfg.clone(),
        }
    }

    pub fn save(&self, run_dir: &Path, elapsed: f64) -> Result<PathBuf> {
        let dir = checkpoint::save(run_dir, &self.state(elapsed), &self.params.tensors(), &self.opt.state_tensors()?, self.cfg.train.keep_checkpoints)?;
        Ok(dir)
    }
}

/// `sqrt(Σ‖g‖²)` over all gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The last step's training loss, when this invocation trained at all.
    pub final_loss: Option<f64>,
    pub final_eval: Option<EvalResult>,
}

/// The `train` command: a run directory, the loop, logs, evals and checkpoints.
pub fn run(cfg: Config, start: Start) -> Result<RunSummary> {
    let run_dir = cfg.run_dir();
    let _lock = checkpoint::RunLock::acquire(&run_dir)?;
    let mut trainer = Trainer::new(cfg)?;
    let cfg = trainer.cfg.clone();
    let metrics = match &start {
        Start::Resume => {
            let ckpt = checkpoint::load(&run_dir, trainer.params.device()).map_err(|e| {
                anyhow::Error::new(e).context(format!("--resume: no usable checkpoint in {}", run_dir.display()))
            })?;
            trainer.resume_from(&ckpt)?;
            println!("resumed {} at step {} ({} tokens)", ckpt.dir.display(), trainer.step, trainer.tokens);
            MetricsLog::open(&run_dir, Some(trainer.step))?
        }
        Start::Fresh | Start::InitFrom(_) => {
            // `upcycle` writes a run directory whose one checkpoint is where its training starts.
            let own_start = match &start {
                Start::InitFrom(p) => {
                    let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().is_ok_and(|b| a == b));
                    checkpoint::resolve(p).is_ok_and(|c| matches!(checkpoint::list(&run_dir).as_slice(), [(_, only)] if same(only, &c)))
                }
                _ => false,
            };
            if !own_start && !checkpoint::list(&run_dir).is_empty() {
                return Err(checkpoint::CheckpointError::Invalid {
                    path: run_dir.clone(),
                    message: "already holds checkpoints: pass --resume to continue that run, or set another run.name".into(),
                }
                .into());
            }
            if let Start::InitFrom(p) = &start {
                let ckpt = checkpoint::load(p, trainer.params.device())?;
                ckpt.restore(&trainer.params)?;
                println!("initialised from {} (step {})", ckpt.dir.display(), ckpt.state.step);
            }
            std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
            MetricsLog::open(&run_dir, None)?
        }
    };
    checkpoint::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    let t = &cfg.train;
    let (total, trained) = (trainer.params.count(), trainer.params.trainable_count());
    let trained = if trained < total { format!(" ({trained} trained)") } else { String::new() };
    println!(
        "run {} | {total} parameters{trained} | {} train tokens | {} steps of {} tokens",
        run_dir.display(),
        trainer.loader.total_tokens(),
        t.steps,
        trainer.tokens_per_step()
    );
    let progress = Progress::new(t.steps, trainer.step);
    let started = Instant::now();
    if trainer.step >= t.steps {
        println!("the run is already at step {} of {}: nothing to train (raise train.steps to go on)", trainer.step, t.steps);
    }
    let (mut window_start, mut window_tokens) = (Instant::now(), 0u64);
    let mut last_loss = None;
    let mut last_eval = None;
    while trainer.step < t.steps {
        let stats = trainer.train_step()?;
        if stats.skipped {
            progress.line(&format!(
                "step {:>6} | loss {} | grad norm {}: update skipped ({} so far, train.on_nan = \"skip\")",
                trainer.step, stats.loss, stats.grad_norm, trainer.skipped_steps
            ));
        }
        last_loss = Some(stats.loss);
        window_tokens += trainer.tokens_per_step();
        let step = trainer.step;
        let elapsed = started.elapsed().as_secs_f64();
        let tps = window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
        let done = step == t.steps;
        if step % t.log_every == 0 || done {
            // The step's own loss, as nanoGPT logs it: a resumed run then logs the same numbers.
            let loss = stats.loss;
            let eta = (t.steps - step) as f64 * trainer.tokens_per_step() as f64 / tps;
            let mut record = json!({
                "step": step, "loss": loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                "tokens": trainer.tokens, "tokens_per_s": tps, "elapsed_s": trainer.elapsed_before + elapsed,
            });
            if trainer.skipped_steps > 0 {
                record["skipped_steps"] = json!(trainer.skipped_steps);
            }
            if !stats.routing.is_empty() {
                record["routing"] = json!(stats.routing);
            }
            metrics.write(&record)?;
            let line = format!(
                "step {step:>6}/{} | loss {loss:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | eta {}",
                t.steps,
                stats.lr,
                stats.grad_norm,
                tps,
                format_duration(eta)
            );
            progress.line(&line);
            progress.step(step, &format!("loss {loss:.4} | {tps:.0} tok/s"));
            (window_start, window_tokens) = (Instant::now(), 0);
        } else {
            progress.step(step, &format!("loss {:.4} | {tps:.0} tok/s", stats.loss));
        }
        if (t.eval_every > 0 && step % t.eval_every == 0) || done {
            if let Some(e) = trainer.eval()? {
                let mut record = json!({"step": step, "split": "val", "loss": e.loss, "ppl": e.ppl, "tokens": trainer.tokens});
                if !e.routing.is_empty() {
                    record["routing"] = json!(e.routing);
                }
                metrics.write(&record)?;
                progress.line(&format!("eval step {step:>6} | val loss {:.4} | ppl {:.2}", e.loss, e.ppl));
                if !e.routing.is_empty() {
                    progress.line(crate::metrics::routing_table(&e.routing).trim_end());
                }
                last_eval = Some(e);
            }
            window_start = Instant::now();
        }
        if (t.ckpt_every > 0 && step % t.ckpt_every == 0) || done {
            let dir = trainer.save(&run_dir, started.elapsed().as_secs_f64())?;
            progress.line(&format!("saved {}", dir.display()));
            window_start = Instant::now();
        }
    }
    progress.finish();
    Ok(RunSummary { run_dir, final_loss: last_loss, final_eval: last_eval })
}
