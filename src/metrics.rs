//! What a run tells its user: the progress bar (or plain lines when stdout is not a terminal)
//! and `metrics.jsonl`, one JSON object per log or eval line.

use crate::model::stats::LayerStats;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`: a training line (no `split`) or an eval line (`split` =
/// "val"). Written by `train`, read by `plot`. Non-finite numbers are written as `null` (JSON
/// has no NaN), which reads back as None.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Updates skipped so far for a non-finite loss (`train.on_nan = "skip"`); absent while 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    /// A mixture of `[[data.sources]]`: each source's loss by name (train lines: over the
    /// step's rows of that source; val lines: its val shards), beside the overall `loss`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, Option<f64>>,
    /// Per-layer routing or mixing statistics of MoE, PESC and MoT layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routing: Vec<LayerStats>,
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log of a run. Lines past `keep_through_step` (from an interrupted run that is
    /// being resumed) are dropped, so the log reads as if the run had never stopped.
    pub fn open(run_dir: &Path, keep_through_step: Option<usize>) -> std::io::Result<MetricsLog> {
        let path = crate::run_dir::metrics_path(run_dir);
        if let (Some(step), true) = (keep_through_step, path.exists()) {
            let text = std::fs::read_to_string(&path)?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Record>(l)
                        .ok()
                        .and_then(|r| r.step)
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::run_dir::write_atomic(&path, kept.as_bytes()).map_err(std::io::Error::other)?;
        } else if keep_through_step.is_none() {
            std::fs::write(&path, "")?;
        }
        Ok(MetricsLog { path })
    }

    pub fn write(&self, record: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        writeln!(f, "{line}")
    }
}

/// Where a run's progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A bar when stdout is a terminal, else plain lines.
    Auto,
    /// Plain lines only (rank 0 of a data-parallel run, whose stdout the launcher forwards).
    Lines,
    /// Nothing (the other ranks).
    Quiet,
}

/// Progress on the terminal: a bar when interactive, otherwise one plain line per log step.
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Print nothing: a rank other than 0 of a data-parallel run.
    quiet: bool,
}

impl Progress {
    /// Progress from step `start` of `total`.
    pub fn new(total: usize, start: usize, output: Output) -> Progress {
        let bar = (output == Output::Auto && std::io::stdout().is_terminal()).then(|| {
            // Drawn to stdout, where the lines go: indicatif's default (stderr) hides the
            // bar and every line printed through it when only stdout is a terminal.
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_position(start as u64);
            bar
        });
        Progress { bar, quiet: output == Output::Quiet }
    }

    pub fn step(&self, step: usize, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(msg.to_string());
        }
    }

    /// A line that stays: printed above the bar, or plainly.
    pub fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if !self.quiet => println!("{line}"),
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub fn format_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Peak resident set size of this process in bytes (Linux), or 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Compact per-layer tables. MoE: load per expert (% of routed slots), dropped share, router
/// entropy, aux and z losses, token cosine similarity. MoT: temperature, each expert's mean
/// largest mixing weight (%), and the entropy of its group softmax (min / mean / max over
/// experts).
pub fn routing_table(stats: &[LayerStats]) -> String {
    let mut moe = String::new();
    let mut mot = String::new();
    for s in stats {
        match s {
            LayerStats::Moe(s) => {
                let load: Vec<String> =
                    s.load.iter().map(|l| format!("{:.0}", l * 100.0)).collect();
                moe += &format!(
                    "{:>5} | {:<40} | {:>6.2}% | {:>7.3} | {:.4} | {:.4} | {:.3}\n",
                    s.layer,
                    load.join(" "),
                    s.dropped * 100.0,
                    s.entropy,
                    s.aux_loss,
                    s.z_loss,
                    s.token_cosine
                );
            }
            LayerStats::Mot(s) => {
                let peak: Vec<String> =
                    s.max_weight.iter().map(|w| format!("{:.0}", w * 100.0)).collect();
                let (lo, hi) =
                    s.entropy.iter().fold((f64::MAX, f64::MIN), |(a, b), &h| (a.min(h), b.max(h)));
                let mean = s.entropy.iter().sum::<f64>() / s.entropy.len().max(1) as f64;
                mot += &format!(
                    "{:>5} | {:>6.3} | {:<40} | {:.3} / {:.3} / {:.3}\n",
                    s.layer,
                    s.temperature,
                    peak.join(" "),
                    lo,
                    mean,
                    hi
                );
            }
        }
    }
    let mut out = String::new();
    if !moe.is_empty() {
        out += "layer | load per expert (%)                      | dropped | entropy | aux    | z      | cos\n";
        out += &moe;
    }
    if !mot.is_empty() {
        out += "layer | temp   | top mixing weight per expert (%)         | group entropy min / mean / max\n";
        out += &mot;
    }
    out
}
