//! The `train` command's loop: the run directory, resume or init, logs, evals, checkpoints, and
//! stopping cleanly on a signal. Rank 0 owns the run directory and everything the user sees;
//! every rank computes every step.

use super::{StepStats, Trainer};
use crate::checkpoint;
use crate::config::Config;
use crate::dist::Dist;
use crate::eval::EvalResult;
use crate::metrics::{format_duration, MetricsLog, Output, Progress, Record};
use crate::{run_dir, signals};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// How a `train` command begins.
pub enum Start {
    Fresh,
    Resume,
    InitFrom(PathBuf),
}

pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The last step's training loss, when this invocation trained at all.
    pub final_loss: Option<f64>,
    pub final_eval: Option<EvalResult>,
    /// The signal that stopped the run early (after saving a checkpoint).
    pub stopped_by: Option<i32>,
    /// This process is rank 0, which reports the run.
    pub root: bool,
}

/// The `train` command: a run directory, the loop, logs, evals and checkpoints, on every rank
/// of `dist`.
pub fn run(cfg: Config, start: Start, dist: Rc<Dist>) -> Result<RunSummary> {
    cfg.require_data().map_err(|message| crate::config::ConfigError::Invalid {
        origin: cfg.run_dir().join("config.toml").display().to_string(),
        message,
    })?;
    if !dist.same_on_all_ranks(cfg.to_toml()?.as_bytes()) {
        return Err(crate::config::ConfigError::Invalid {
            origin: "the resolved config".into(),
            message: format!(
                "the {} ranks were not all given the same config (this is rank {}): every rank \
                 must run the same config file with the same --set overrides",
                dist.size(),
                dist.rank()
            ),
        }
        .into());
    }
    signals::install(&signals::DEFAULT_STOP_SIGNALS).context("installing signal handlers")?;
    let run_dir = cfg.run_dir();
    let mut trainer = Trainer::new(cfg, dist.clone())?;
    let cfg = trainer.cfg.clone();
    let root = dist.is_root();
    // Rank 0 sets up the run directory; every rank learns whether that worked.
    let setup = if root { open_run_dir(&run_dir, &start, &cfg).map(Some) } else { Ok(None) };
    if dist.all_agree(setup.is_err()) {
        return match setup {
            Err(e) => Err(e),
            Ok(_) => {
                anyhow::bail!("rank 0 could not set up {} (its error says why)", run_dir.display())
            }
        };
    }
    let (_lock, metrics) = setup?.unzip();
    let say = |line: &str| {
        if root {
            println!("{line}")
        }
    };
    match &start {
        Start::Resume => {
            let ckpt = checkpoint::load(&run_dir, trainer.params.device()).map_err(|e| {
                anyhow::Error::new(e)
                    .context(format!("--resume: no usable checkpoint in {}", run_dir.display()))
            })?;
            trainer.resume_from(&ckpt)?;
            say(&format!(
                "resumed {} at step {} ({} tokens)",
                ckpt.dir.display(),
                trainer.step,
                trainer.tokens
            ));
        }
        Start::InitFrom(p) => {
            let ckpt = checkpoint::load(p, trainer.params.device())?;
            ckpt.restore(&trainer.params)?;
            say(&format!("initialised from {} (step {})", ckpt.dir.display(), ckpt.state.step));
        }
        Start::Fresh => {}
    }
    let metrics = match metrics {
        Some(m) => Some(m.open(&run_dir, &start, trainer.step).map_err(|error| {
            run_dir::RunDirError::Io { path: run_dir::metrics_path(&run_dir), error }
        })?),
        None => None,
    };
    if root {
        run_dir::write_atomic(&run_dir::config_path(&run_dir), cfg.to_toml()?.as_bytes())?;
    }
    let t = &cfg.train;
    let (total, trained) = (trainer.params.count(), trainer.params.trainable_count());
    let trained = if trained < total { format!(" ({trained} trained)") } else { String::new() };
    let world = if dist.size() > 1 {
        let zero = if t.zero == 1 { ", ZeRO-1" } else { "" };
        let nccl = if dist.gpu_collectives(trainer.params.device()) { ", NCCL" } else { "" };
        format!(" | {} ranks{zero}{nccl}", dist.size())
    } else {
        String::new()
    };
    say(&format!(
        "run {} | {total} parameters{trained} | {} train tokens | {} steps of {} tokens{world} | {}",
        run_dir.display(),
        trainer.data.total_tokens(),
        t.steps,
        trainer.tokens_per_step(),
        crate::ops::describe(trainer.params.device())
    ));
    if cfg.data.is_mixture() {
        let parts: Vec<String> = trainer
            .data
            .sources
            .iter()
            .map(|s| format!("{} {:.3} ({} tokens)", s.name, s.weight, s.loader.total_tokens()))
            .collect();
        say(&format!("mixture of {} sources by weight: {}", parts.len(), parts.join(", ")));
    }
    let output = match (root, dist.size()) {
        (false, _) => Output::Quiet,
        (true, 1) => Output::Auto,
        (true, _) => Output::Lines,
    };
    let progress = Progress::new(t.steps, trainer.step, output);
    let started = Instant::now();
    if trainer.step >= t.steps {
        say(&format!(
            "the run is already at step {} of {}: nothing to train (raise train.steps to go on)",
            trainer.step, t.steps
        ));
    }
    let (mut window_start, mut window_tokens) = (Instant::now(), 0u64);
    let mut last_loss = None;
    let mut last_eval = None;
    let mut last_saved = None;
    let mut stopped_by = None;
    while trainer.step < t.steps {
        if let Some(sig) = agreed_stop(&dist) {
            stopped_by = Some(sig);
            break;
        }
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
        if t.logs_step(step) {
            if let Some(m) = &metrics {
                m.write(&train_record(&trainer, &stats, tps, elapsed))?;
            }
            // The step's own loss, as nanoGPT logs it: a resumed run then logs the same numbers.
            let eta = (t.steps - step) as f64 * trainer.tokens_per_step() as f64 / tps;
            progress.line(&format!(
                "step {step:>6}/{} | loss {:.4}{} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | eta {}",
                t.steps,
                stats.loss,
                by_source(&stats.sources),
                stats.lr,
                stats.grad_norm,
                tps,
                format_duration(eta)
            ));
            (window_start, window_tokens) = (Instant::now(), 0);
        }
        progress.step(step, &format!("loss {:.4} | {tps:.0} tok/s", stats.loss));
        if (t.eval_every > 0 && step % t.eval_every == 0) || done {
            if let Some(all) = trainer.eval()? {
                let sources: Vec<(String, f64)> = if cfg.data.is_mixture() {
                    all.sources.iter().map(|(n, r)| (n.clone(), r.loss)).collect()
                } else {
                    Vec::new()
                };
                let e = all.overall;
                if let Some(m) = &metrics {
                    m.write(&Record {
                        step: Some(step as u64),
                        split: Some("val".into()),
                        loss: Some(e.loss),
                        ppl: Some(e.ppl),
                        tokens: Some(trainer.tokens),
                        sources: source_map(&sources),
                        routing: e.routing.clone(),
                        ..Record::default()
                    })?;
                }
                progress.line(&format!(
                    "eval step {step:>6} | val loss {:.4} | ppl {:.2}{}",
                    e.loss,
                    e.ppl,
                    by_source(&sources)
                ));
                if !e.routing.is_empty() {
                    progress.line(crate::metrics::routing_table(&e.routing).trim_end());
                }
                last_eval = Some(e);
            }
            window_start = Instant::now();
        }
        if (t.ckpt_every > 0 && step % t.ckpt_every == 0) || done {
            save(&trainer, &run_dir, started, &progress)?;
            last_saved = Some(step);
            window_start = Instant::now();
        }
    }
    if let Some(sig) = stopped_by {
        if last_saved != Some(trainer.step) && trainer.step > 0 {
            save(&trainer, &run_dir, started, &progress)?;
        }
        progress.line(&format!(
            "stopped by {} at step {}: continue with --resume",
            signal_name(sig),
            trainer.step
        ));
    }
    progress.finish();
    Ok(RunSummary { run_dir, final_loss: last_loss, final_eval: last_eval, stopped_by, root })
}

/// Locks the run directory and checks that this start may write into it.
fn open_run_dir(
    dir: &Path, start: &Start, cfg: &Config,
) -> Result<(run_dir::RunLock, PendingMetrics)> {
    let lock = run_dir::RunLock::acquire(dir)?;
    if !matches!(start, Start::Resume) {
        // `upcycle` writes a run directory whose one checkpoint is where its training starts.
        let own_start = match start {
            Start::InitFrom(p) => checkpoint::resolve(p).is_ok_and(|c| {
                matches!(run_dir::checkpoints(dir).as_slice(), [(_, only)] if same_file(only, &c))
            }),
            _ => false,
        };
        if !own_start {
            run_dir::ensure_no_checkpoints(
                dir,
                "pass --resume to continue that run, or set another run.name",
            )?;
            // An earlier run's log, or someone else's files, which a fresh start would replace.
            run_dir::ensure_fresh_run(
                dir,
                &cfg.to_toml()?,
                "there is no checkpoint to resume; delete the directory or set another run.name",
            )?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok((lock, PendingMetrics))
}

fn same_file(a: &Path, b: &Path) -> bool {
    a.canonicalize().ok().is_some_and(|a| b.canonicalize().is_ok_and(|b| a == b))
}

/// The metrics log, opened once the starting step is known.
struct PendingMetrics;

impl PendingMetrics {
    fn open(self, dir: &Path, start: &Start, step: usize) -> std::io::Result<MetricsLog> {
        match start {
            // A resumed run drops the lines an interrupted run wrote past its checkpoint.
            Start::Resume => MetricsLog::open(dir, Some(step)),
            _ => MetricsLog::open(dir, None),
        }
    }
}

fn train_record(trainer: &Trainer, stats: &StepStats, tps: f64, elapsed: f64) -> Record {
    Record {
        step: Some(trainer.step as u64),
        loss: Some(stats.loss),
        lr: Some(stats.lr),
        grad_norm: Some(stats.grad_norm),
        tokens: Some(trainer.tokens),
        tokens_per_s: Some(tps),
        elapsed_s: Some(trainer.elapsed_before + elapsed),
        skipped_steps: (trainer.skipped_steps > 0).then_some(trainer.skipped_steps),
        sources: source_map(&stats.sources),
        routing: stats.routing.clone(),
        ..Record::default()
    }
}

fn source_map(losses: &[(String, f64)]) -> std::collections::BTreeMap<String, Option<f64>> {
    losses.iter().map(|(name, l)| (name.clone(), Some(*l))).collect()
}

/// ` (web 3.2104, code 2.0150)`: each source's loss on a printed line; empty without a mixture.
fn by_source(losses: &[(String, f64)]) -> String {
    if losses.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = losses.iter().map(|(name, l)| format!("{name} {l:.4}")).collect();
    format!(" ({})", parts.join(", "))
}

fn save(trainer: &Trainer, dir: &Path, started: Instant, progress: &Progress) -> Result<()> {
    if let Some(saved) = trainer.save(dir, started.elapsed().as_secs_f64())? {
        progress.line(&format!("saved {}", saved.display()));
    }
    Ok(())
}

/// The stop signal any rank received, agreed on by all of them at this step boundary.
fn agreed_stop(dist: &Dist) -> Option<i32> {
    let mut seen = vec![0f64; dist.size()];
    seen[dist.rank()] = signals::stop_requested().unwrap_or(0) as f64;
    dist.all_reduce_sum_in_place_f64(&mut seen);
    seen.into_iter().find(|&s| s > 0.0).map(|s| s as i32)
}

fn signal_name(sig: i32) -> String {
    match sig {
        signals::SIGTERM => "SIGTERM".into(),
        signals::SIGINT => "SIGINT".into(),
        signals::SIGUSR1 => "SIGUSR1".into(),
        s => format!("signal {s}"),
    }
}
