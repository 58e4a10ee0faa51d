//! Training: the `Trainer` (model, optimizer, data) and its step — micro-batches with gradient
//! accumulation, data parallelism over ranks, global-norm clipping, the schedule and AdamW
//! (sharded under ZeRO-1) — and, in `run`, the loop of the `train` command.
//!
//! Data parallelism keeps the single-process semantics exactly: a step is `batch_size /
//! micro_batch_size` micro-batches drawn from the data stream in order; with N ranks, rank r
//! computes the r-th contiguous N-th of them, and the gradients are summed over ranks. So an
//! N-rank run computes the micro-batches of a one-rank run with the same settings, and its
//! losses, aux losses and MoT groups are the same.

pub mod optim;
mod run;
pub mod schedule;
pub mod zero;

pub use run::{run, RunSummary, Start};

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::{Config, ConfigError, NanPolicy};
use crate::data::mixture::{self, Mixture, Row, ValSource};
use crate::dist::Dist;
use crate::eval::{evaluate_sources, SourcesEval};
use crate::model::stats::LayerStats;
use crate::model::{Params, Transformer};
use crate::ops;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use optim::AdamW;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};
use zero::ShardedAdamW;

/// Wall time spent in each phase of the steps taken so far, for `bench`. On a GPU, which runs
/// asynchronously, forward and backward only count the time to queue their work; the step
/// waits for it before the gradient sum, outside every phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    /// Reading the batch, the forward pass and the loss.
    pub forward: Duration,
    /// The backward pass and adding up micro-batches' gradients.
    pub backward: Duration,
    /// Summing gradients over ranks (data parallelism). With `train.zero = 1` the norm's and
    /// the update's own collectives count in those.
    pub comm: Duration,
    /// The global gradient norm.
    pub norm: Duration,
    /// The optimizer's update.
    pub update: Duration,
}

impl Phases {
    /// The time spent since `earlier`, a reading of the same trainer's phases.
    pub fn since(&self, earlier: &Phases) -> Phases {
        Phases {
            forward: self.forward - earlier.forward,
            backward: self.backward - earlier.backward,
            comm: self.comm - earlier.comm,
            norm: self.norm - earlier.norm,
            update: self.update - earlier.update,
        }
    }
}

pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// The update was skipped: the loss or the gradient norm was not finite.
    pub skipped: bool,
    /// Per MoE layer, averaged over the micro-batches (of every rank).
    pub routing: Vec<LayerStats>,
    /// A mixture's train loss per source (name, mean token loss) over the step's rows of it;
    /// empty for a single-source config and for sources that gave no row this step.
    pub sources: Vec<(String, f64)>,
}

/// AdamW with every moment on every rank, or sharded over the ranks (`train.zero = 1`).
pub enum Optimizer {
    Full(AdamW),
    Sharded(ShardedAdamW),
}

impl Optimizer {
    /// Adam's update count.
    pub fn t(&self) -> u64 {
        match self {
            Optimizer::Full(o) => o.t,
            Optimizer::Sharded(o) => o.t,
        }
    }

    fn vars(&self) -> Vec<Var> {
        match self {
            Optimizer::Full(o) => o.slots.iter().map(|s| s.var.clone()).collect(),
            Optimizer::Sharded(o) => o.vars().cloned().collect(),
        }
    }
}

pub struct Trainer {
    pub cfg: Config,
    pub params: Params,
    pub model: Transformer,
    pub opt: Optimizer,
    /// The train sources (one, or a weighted mixture) and where each one's windows stand.
    pub data: Mixture,
    /// The val shards of each source that has them.
    pub val: Vec<ValSource>,
    pub dist: Rc<Dist>,
    pub step: usize,
    pub tokens: u64,
    pub skipped_steps: u64,
    /// Where the steps' time went, since the start.
    pub phases: Phases,
    elapsed_before: f64,
    /// Test hook (`MOTRAIN_FAULT_NAN_STEP=N`): step N's loss becomes NaN, as a diverging run's would.
    nan_fault_step: Option<usize>,
    /// Whether this model's matmuls run in bf16 (`run.dtype = "bf16"` on the CPU).
    bf16_matmuls: bool,
}

/// The test hook `MOTRAIN_FAULT_NAN_STEP`, if set; a value that is not a step is refused.
fn nan_fault_step() -> std::result::Result<Option<usize>, ConfigError> {
    let name = "MOTRAIN_FAULT_NAN_STEP";
    let bad = |value: String| ConfigError::Invalid {
        origin: name.into(),
        message: format!("{value}: expected a step number"),
    };
    match std::env::var(name) {
        Ok(s) => s.parse().map(Some).map_err(|_| bad(format!("{s:?}"))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(bad("not UTF-8".into())),
    }
}

impl Trainer {
    /// A freshly initialised model with its optimizer and data, as rank `dist.rank()` of
    /// `dist.size()`.
    pub fn new(cfg: Config, dist: Rc<Dist>) -> Result<Trainer> {
        check_world(&cfg, &dist)?;
        let dev = crate::device::device(&cfg.run.device)?;
        let bf16_matmuls = cfg.run.dtype == "bf16" && dev.is_cpu();
        if bf16_matmuls {
            bf16_on_cpu()?;
        }
        crate::ops::bf16::set_enabled(bf16_matmuls);
        let model_cfg = cfg.model.clone();
        let mut params = Params::new(&dev, cfg.run.seed, cfg.model.init_scale)
            .freezing(move |name| !crate::model::trains(&model_cfg, name));
        let model = Transformer::new(&cfg.model, &mut params)?
            .with_recompute_experts(cfg.train.recompute_experts);
        if dev.is_cpu() {
            check_step_memory(&cfg, &params)?;
        }
        // Moments only for what trains.
        let trainable = |name: &str| !params.is_frozen(name);
        let opt = match cfg.train.zero {
            0 => Optimizer::Full(AdamW::new(&params, trainable, &cfg.train)?),
            _ => Optimizer::Sharded(ShardedAdamW::new(&params, trainable, &cfg.train, &dist)?),
        };
        // NCCL for the gradient sums when the ranks train on GPUs (feature `nccl`).
        dist.attach_device(&dev)?;
        let data = Mixture::open(&cfg.data, cfg.model.vocab_size, cfg.run.seed)?;
        let val = mixture::open_val(&cfg.data, cfg.model.vocab_size)?;
        let nan_fault_step = nan_fault_step()?;
        Ok(Trainer {
            cfg,
            params,
            model,
            opt,
            data,
            val,
            dist,
            step: 0,
            tokens: 0,
            skipped_steps: 0,
            phases: Phases::default(),
            elapsed_before: 0.0,
            nan_fault_step,
            bf16_matmuls,
        })
    }

    /// Sets the process's matmul kernel to this model's dtype: `bench --vs` steps an f32 and
    /// a bf16 model of one process in turn.
    pub fn use_kernel(&self) {
        crate::ops::bf16::set_enabled(self.bf16_matmuls);
    }

    /// Continues exactly where `ckpt` stopped: weights, moments, step, data cursor.
    pub fn resume_from(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.restore(&self.params)?;
        let moments = ckpt.optimizer(self.params.device())?;
        let t = ckpt.state.optimizer_t;
        let loaded = match &mut self.opt {
            Optimizer::Full(o) => o.load_state(&moments, t),
            Optimizer::Sharded(o) => o.load_state(&moments, t),
        };
        loaded.map_err(|m| checkpoint::CheckpointError::Invalid {
            path: ckpt.dir.join("optimizer.safetensors"),
            message: m,
        })?;
        self.step = ckpt.state.step;
        self.tokens = ckpt.state.tokens;
        let cursors = ckpt.state.source_cursors(self.data.sources.len());
        cursors.and_then(|c| self.data.set_cursors(&c)).map_err(|m| {
            checkpoint::CheckpointError::Invalid { path: ckpt.dir.join("state.json"), message: m }
        })?;
        self.elapsed_before = ckpt.state.elapsed_s;
        self.skipped_steps = ckpt.state.skipped_steps;
        Ok(())
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.cfg.train.batch_size * self.cfg.data.seq_len) as u64
    }

    /// One optimizer step over `batch_size` sequences in micro-batches, this rank's share of
    /// them computed here.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.use_kernel();
        let accum = self.cfg.accumulation();
        let micro = self.cfg.train.micro_batch_size;
        let mine = accum / self.dist.size();
        let first = self.dist.rank() * mine;
        let vars = self.opt.vars();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        let mut stats = Vec::with_capacity(mine);
        // The whole step's rows, planned alike on every rank; micro-batch j reads the rows a
        // one-rank run would read for it.
        let plan = self.data.plan(accum * micro);
        let drawn = self.data.drawn();
        let mut by_source = SourceSums::new(self.cfg.data.is_mixture(), &plan, &self.data);
        for j in first..first + mine {
            let forward_start = Instant::now();
            let rows = &plan[j * micro..(j + 1) * micro];
            let batch = self.data.read(rows, drawn + (j * micro) as u64);
            let parts = if by_source.wanted {
                self.model.loss_per_token(&batch, true)?
            } else {
                self.model.loss(&batch, true)?
            };
            by_source.add(rows, &parts.token_losses);
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
            let backward_start = Instant::now();
            self.phases.forward += backward_start - forward_start;
            let grads = scaled.backward()?;
            for (a, var) in acc.iter_mut().zip(&vars) {
                let g = match grads.get(var) {
                    Some(g) => g.clone(),
                    None => var.zeros_like()?,
                };
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
            self.phases.backward += backward_start.elapsed();
        }
        self.data.advance(&plan);
        let local: Vec<Tensor> =
            acc.into_iter().map(|g| g.expect("one micro-batch at least")).collect();
        let (loss, routing) = self.reduce_logs(loss_sum, &stats, accum, &mut by_source.sums);
        let sources = by_source.means(&self.data);
        let lr = schedule::learning_rate(&self.cfg.train, self.step);
        let clip = self.cfg.train.grad_clip;
        // A GPU runs the backward pass asynchronously: let it finish, so that the communication
        // time is the collective's alone (a no-op on the CPU).
        self.params.device().synchronize()?;
        let comm_start = Instant::now();
        let grad_norm;
        let skipped;
        match &mut self.opt {
            Optimizer::Full(opt) => {
                let grads = self.dist.all_reduce_sum_tensors(&local)?;
                let norm_start = Instant::now();
                self.phases.comm += norm_start - comm_start;
                grad_norm = global_norm(&grads)?;
                let update_start = Instant::now();
                self.phases.norm += update_start - norm_start;
                skipped = check_finite(&self.cfg, self.step, loss, grad_norm)?;
                if !skipped {
                    opt.step(&grads, lr, clip_scale(clip, grad_norm))?;
                }
                self.phases.update += update_start.elapsed();
            }
            Optimizer::Sharded(opt) => {
                let grads = opt.reduce(&self.dist, &local)?;
                let norm_start = Instant::now();
                self.phases.comm += norm_start - comm_start;
                grad_norm = opt.norm(&self.dist, &grads);
                let update_start = Instant::now();
                self.phases.norm += update_start - norm_start;
                skipped = check_finite(&self.cfg, self.step, loss, grad_norm)?;
                if !skipped {
                    opt.step(&self.dist, &grads, lr, clip_scale(clip, grad_norm))?;
                }
                self.phases.update += update_start.elapsed();
            }
        }
        if skipped {
            self.skipped_steps += 1;
        }
        self.step += 1;
        self.tokens += self.tokens_per_step();
        Ok(StepStats { loss, grad_norm, lr, skipped, routing, sources })
    }

    /// The step's mean loss and routing statistics over every rank's micro-batches; the
    /// per-source loss sums are summed over the ranks in place.
    fn reduce_logs(
        &self, loss_sum: f64, stats: &[Vec<LayerStats>], accum: usize, source_sums: &mut [f64],
    ) -> (f64, Vec<LayerStats>) {
        let mut routing = LayerStats::average(stats);
        if self.dist.size() == 1 {
            return (loss_sum / accum as f64, routing);
        }
        // Each rank's statistics are a mean over as many micro-batches as every other's.
        let mut numbers = LayerStats::to_numbers(&routing);
        numbers.iter_mut().for_each(|x| *x /= self.dist.size() as f64);
        numbers.extend_from_slice(source_sums);
        numbers.push(loss_sum);
        self.dist.all_reduce_sum_in_place_f64(&mut numbers);
        let loss = numbers.pop().expect("the loss") / accum as f64;
        let sums = numbers.split_off(numbers.len() - source_sums.len());
        source_sums.copy_from_slice(&sums);
        LayerStats::set_numbers(&mut routing, &numbers);
        (loss, routing)
    }

    /// The validation loss of each source with val shards and their weighted mean, the
    /// batches split over the ranks; None without val shards.
    pub fn eval(&self) -> Result<Option<SourcesEval>> {
        self.use_kernel();
        evaluate_sources(
            &self.model,
            &self.val,
            self.cfg.train.eval_batch_size,
            self.cfg.train.eval_batches,
            &self.dist,
        )
    }

    pub fn state(&self, elapsed: f64) -> TrainState {
        TrainState {
            step: self.step,
            tokens: self.tokens,
            data_cursor: self.data.drawn(),
            source_cursors: if self.cfg.data.is_mixture() {
                self.data.cursors()
            } else {
                Vec::new()
            },
            optimizer_t: self.opt.t(),
            skipped_steps: self.skipped_steps,
            seed: self.cfg.run.seed,
            elapsed_s: self.elapsed_before + elapsed,
            motrain_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.cfg.clone(),
        }
    }

    /// Writes a checkpoint from rank 0 (every rank takes part in gathering sharded moments)
    /// and returns its directory there; the other ranks wait for it and get None.
    pub fn save(&self, run_dir: &Path, elapsed: f64) -> Result<Option<PathBuf>> {
        let moments = match &self.opt {
            Optimizer::Full(o) => o.state_tensors()?,
            Optimizer::Sharded(o) => o.state_tensors(&self.dist)?,
        };
        let dir = if self.dist.is_root() {
            Some(checkpoint::save(
                run_dir,
                &self.state(elapsed),
                &self.params.tensors(),
                &moments,
                self.cfg.train.keep_checkpoints,
            )?)
        } else {
            None
        };
        // Writing may take longer than a collective may: the others wait for it with patience.
        let timeout = self.dist.collective_timeout();
        self.dist.set_collective_timeout(timeout.map(|t| t.max(Duration::from_secs(600))));
        self.dist.barrier();
        self.dist.set_collective_timeout(timeout);
        Ok(dir)
    }
}

/// A mixture's token-loss sums per source over this rank's micro-batches, and (from the plan)
/// how many tokens each source has in the whole step.
struct SourceSums {
    wanted: bool,
    sums: Vec<f64>,
    tokens: Vec<f64>,
    seq_len: usize,
}

impl SourceSums {
    fn new(wanted: bool, plan: &[Row], data: &Mixture) -> SourceSums {
        let n = data.sources.len();
        let seq_len = data.seq_len();
        let mut tokens = vec![0f64; n];
        plan.iter().for_each(|r| tokens[r.source] += seq_len as f64);
        SourceSums { wanted, sums: vec![0.0; n], tokens, seq_len }
    }

    /// Adds a micro-batch's token losses (row by row) to the sums of the rows' sources.
    fn add(&mut self, rows: &[Row], token_losses: &[f32]) {
        for (r, losses) in rows.iter().zip(token_losses.chunks(self.seq_len)) {
            self.sums[r.source] += losses.iter().map(|&l| l as f64).sum::<f64>();
        }
    }

    /// Mean token loss of each source that had rows (sums already reduced over the ranks).
    fn means(&self, data: &Mixture) -> Vec<(String, f64)> {
        if !self.wanted {
            return Vec::new();
        }
        data.sources
            .iter()
            .zip(self.sums.iter().zip(&self.tokens))
            .filter(|(_, (_, &t))| t > 0.0)
            .map(|(s, (&sum, &t))| (s.name.clone(), sum / t))
            .collect()
    }
}

/// `run.dtype = "bf16"` on the CPU: f32 weights, activations and optimizer state, with every
/// matmul's operands rounded to bf16 and its products summed in f32, on whichever bf16 dot
/// product the CPU has (`ops::bf16`). A CPU with none is refused, naming f32.
fn bf16_on_cpu() -> Result<()> {
    use crate::ops::{bf16, simd};
    if !bf16::usable() {
        let why = if bf16::engines().is_empty() {
            format!(
                "this CPU ({}, {}) has neither",
                simd::cpu_model(),
                simd::describe(&candle_core::Device::Cpu)
            )
        } else {
            format!("{}={} stands for a CPU without them", simd::ENV, simd::level())
        };
        return Err(crate::config::ConfigError::Invalid {
            origin: "`run.dtype` = \"bf16\"".into(),
            message: format!(
                "bf16 on the CPU needs a bf16 dot product — AMX tiles (Intel Xeon Sapphire Rapids or newer) or AVX512_BF16 (AMD Zen 4 or newer, Intel Cooper Lake) — and {why}; f32 is the fastest dtype here"
            ),
        }
        .into());
    }
    Ok(())
}

/// What the world size demands of the config, checked before anything is computed or written.
fn check_world(cfg: &Config, dist: &Dist) -> Result<(), ConfigError> {
    let (n, accum) = (dist.size(), cfg.accumulation());
    let invalid = |message: String| ConfigError::Invalid { origin: "train".into(), message };
    if cfg.train.zero == 1 && n == 1 {
        return Err(invalid(
            "`train.zero` = 1 shards the optimizer over data-parallel ranks, but this is one \
             process: launch it with `mpirun -n N` (or srun), or set train.zero = 0"
                .into(),
        ));
    }
    if !accum.is_multiple_of(n) {
        return Err(invalid(format!(
            "`train.batch_size` ({}) / `train.micro_batch_size` ({}) = {accum} micro-batches per \
             step cannot be shared evenly by {n} ranks: make the count a multiple of {n} (e.g. \
             micro_batch_size = {})",
            cfg.train.batch_size,
            cfg.train.micro_batch_size,
            cfg.train.batch_size / n
        )));
    }
    Ok(())
}

/// Refuses a micro-batch that cannot fit in this machine's memory, before the step that the
/// kernel would otherwise kill (with overcommit, allocations succeed until the pages are used).
fn check_step_memory(cfg: &Config, params: &Params) -> Result<(), ConfigError> {
    let (micro, seq) = (cfg.train.micro_batch_size, cfg.data.seq_len);
    let floor = crate::model::step_memory_floor(
        &cfg.model,
        micro.saturating_mul(seq),
        params.count(),
        params.trainable_count(),
    );
    if crate::alloc::fits_in_memory(floor) {
        return Ok(());
    }
    let memory = crate::alloc::memory_bytes().unwrap_or_default();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(ConfigError::Invalid {
        origin: "train".into(),
        message: format!(
            "a micro-batch of `train.micro_batch_size` × `data.seq_len` = {micro} × {seq} \
             tokens needs at least {:.1} GiB (the logits, the activations the backward reads, \
             the weights and AdamW's moments), more than this machine's {:.1} GiB: lower \
             train.micro_batch_size (batch_size stays, by gradient accumulation) or data.seq_len",
            gib(floor),
            gib(memory)
        ),
    })
}

/// Whether to skip the update: a non-finite loss or gradient norm skips it under
/// `train.on_nan = "skip"` and stops the run under "stop" (every rank sees the same numbers).
fn check_finite(cfg: &Config, step: usize, loss: f64, grad_norm: f64) -> Result<bool> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(false);
    }
    match cfg.train.on_nan {
        NanPolicy::Stop => bail!(
            "step {}: the loss is {loss} and the gradient norm {grad_norm}; stopped before updating anything \
             (the last checkpoint is intact; lower train.lr, or set train.on_nan = \"skip\")",
            step + 1
        ),
        NanPolicy::Skip => Ok(true),
    }
}

/// The factor that clips the gradient to global norm `clip` (0 = off).
fn clip_scale(clip: f64, grad_norm: f64) -> f64 {
    if clip > 0.0 && grad_norm > clip {
        clip / (grad_norm + 1e-6)
    } else {
        1.0
    }
}

/// `sqrt(Σ‖g‖²)` over all gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += ops::sum_of_squares(g)?;
    }
    Ok(total.sqrt())
}
