//! The command line: clap definitions and one thin function per command (`eval` and
//! `generate`, the longer ones, in their own files).

mod eval;
mod generate;

use crate::checkpoint::CheckpointError;
use crate::config::{Config, ConfigError};
use crate::data::{self, prepare, DataError, Tokenizer};
use crate::run_dir::RunDirError;
use crate::train::{self, Start};
use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "motrain",
    version,
    about = "Pretrain dense, MoE and Mixture-of-Tokens transformers on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config; writes a run directory.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Override any config key: --set model.d_model=256 (value parsed as TOML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue the run from its latest checkpoint.
        #[arg(long, conflicts_with = "init_from")]
        resume: bool,
        /// Start a new run from a checkpoint's weights (checkpoint or run directory).
        #[arg(long, value_name = "CKPT")]
        init_from: Option<PathBuf>,
    },
    /// Loss and perplexity on held-out shards; the last stdout line is JSON.
    Eval {
        #[arg(long, value_name = "CKPT")]
        checkpoint: PathBuf,
        /// Glob of shards (default: the run's data.val).
        #[arg(long, value_name = "GLOB")]
        data: Option<String>,
        #[arg(long)]
        batches: Option<usize>,
        #[arg(long)]
        batch_size: Option<usize>,
        /// MoT: mix groups of this many sequences instead of the trained group size.
        #[arg(long)]
        group_size: Option<usize>,
        /// Tokens per sequence (default: the run's data.seq_len; required for an imported run).
        #[arg(long)]
        seq_len: Option<usize>,
    },
    /// Sample text from a checkpoint with a KV cache; one sample streams as it is generated.
    Generate {
        #[arg(long, value_name = "CKPT")]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 1)]
        num_samples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The tokenizer (default: the run's data.tokenizer).
        #[arg(long, value_name = "TOK")]
        tokenizer: Option<String>,
    },
    /// Write a Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    Export {
        #[arg(long, value_name = "CKPT")]
        checkpoint: PathBuf,
        /// Only `hf`.
        #[arg(long, default_value = "hf")]
        format: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// A Hugging Face model folder (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE; safetensors in
    /// f32, f16 or bf16) as a run directory with a step-0 checkpoint and its tokenizer.json.
    Import {
        /// The folder: config.json, model.safetensors or model.safetensors.index.json and shards.
        #[arg(long, value_name = "DIR")]
        hf: PathBuf,
        /// The run directory to create (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss curves (train and eval, against steps and tokens) of one or more runs.
    Plot {
        /// Run directories (or their metrics.jsonl files).
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        /// FILE.svg or FILE.png.
        #[arg(long)]
        out: PathBuf,
    },
    /// Turn a Mixture of Tokens checkpoint into a sparse top-1 MoE and fine-tune it.
    TransitionTune {
        #[arg(long, value_name = "MOT_CKPT")]
        checkpoint: PathBuf,
        /// Run directory of the converted model.
        #[arg(long)]
        out: PathBuf,
        /// Tuning steps after the conversion (0: convert only).
        #[arg(long, default_value_t = 0)]
        steps: usize,
        /// Override keys of the converted config: --set train.lr=3e-4.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// PESC: turn a dense checkpoint into a Mixture of Experts whose experts share the dense FFN
    /// and differ by adapters (defaults: those of [model.pesc]).
    Upcycle {
        #[arg(long, value_name = "DENSE_CKPT")]
        checkpoint: PathBuf,
        /// Run directory of the upcycled model.
        #[arg(long)]
        out: PathBuf,
        /// Experts (adapter pairs) per layer [default: 8].
        #[arg(long)]
        experts: Option<usize>,
        /// Experts each token uses [default: 2].
        #[arg(long)]
        top_k: Option<usize>,
        /// Adapter bottleneck width [default: 64].
        #[arg(long)]
        adapter_dim: Option<usize>,
        /// Scale of the adapters' output [default: 1.0].
        #[arg(long)]
        adapter_scale: Option<f64>,
        /// Blocks to upcycle: all, second_half, or block indices such as 0,2,3 [default: all].
        #[arg(long)]
        layers: Option<String>,
        /// Override keys of the upcycled config: --set model.pesc.train_only_adapters=false.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Tokenize raw text into llm.c shards, streaming: files, directories (searched recursively)
    /// and globs of .txt, .jsonl and .parquet, each optionally .gz or .zst. Writes prepare.json.
    Prepare {
        /// `gpt2` or a tokenizer.json.
        #[arg(long, value_name = "TOK")]
        tokenizer: String,
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "data")]
        name: String,
        /// Share of documents held out for val, chosen by a hash of each document's index and
        /// --seed [default: 0.05].
        #[arg(long)]
        val_fraction: Option<f64>,
        /// Hold out N documents for val instead: those whose hash falls under 1/16, in input
        /// order, until there are N.
        #[arg(long, value_name = "N", conflicts_with = "val_fraction")]
        val_docs: Option<u64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tokens per shard file.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// The JSON field or Parquet column holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// skip | fail [default: skip bad records, fail on a truncated or corrupt file].
        #[arg(long, value_name = "skip|fail")]
        on_bad_record: Option<String>,
        /// Tokenizing threads [default: one per core].
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Replace the shards of an earlier prepare into --out made from other inputs or options.
        #[arg(long)]
        overwrite: bool,
    },
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Time training steps; the last stdout line is JSON.
    Bench {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Also time this config (with --set and --vs-set applied), step by step in turn with
        /// --config; the last line then compares the two.
        #[arg(long, value_name = "FILE")]
        vs: Option<PathBuf>,
        /// An override for the --vs config alone (--config's file when --vs is not given).
        #[arg(long = "vs-set", value_name = "KEY=VALUE")]
        vs_overrides: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer offline and write a HF tokenizer.json; reads the same
    /// inputs as prepare, streamed.
    Train {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        /// The JSON field or Parquet column holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// skip | fail [default: skip bad records, fail on a truncated or corrupt file].
        #[arg(long, value_name = "skip|fail")]
        on_bad_record: Option<String>,
        /// Train on the first B bytes of text only (documents in input order) [default: all].
        #[arg(long, value_name = "B")]
        max_bytes: Option<u64>,
        /// Replace an existing --out file.
        #[arg(long)]
        overwrite: bool,
    },
}

/// A bad flag value: exit code 2 like any other bad input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// 2 for bad usage, config or input files; 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    let bad_input = e.chain().any(|c| {
        let bad_checkpoint = c
            .downcast_ref::<CheckpointError>()
            .is_some_and(|e| !matches!(e, CheckpointError::Write(_)));
        c.is::<ConfigError>()
            || c.is::<DataError>()
            || c.is::<RunDirError>()
            || c.is::<crate::dist::DistError>()
            || c.downcast_ref::<crate::import::ImportError>()
                .is_some_and(|e| !matches!(e, crate::import::ImportError::Write(_)))
            || bad_checkpoint
            || c.is::<UsageError>()
    });
    if bad_input {
        2
    } else {
        1
    }
}

pub fn run(cli: Cli) -> Result<()> {
    // A bad MOTRAIN_SIMD or MOTRAIN_BF16 is refused before any work is done.
    crate::ops::simd::select().map_err(UsageError)?;
    crate::ops::bf16::select().map_err(UsageError)?;
    match cli.command {
        Command::Train { config, overrides, resume, init_from } => {
            let cfg = Config::load(&config, &overrides)?;
            let start = match (resume, init_from) {
                (true, _) => Start::Resume,
                (false, Some(p)) => Start::InitFrom(p),
                (false, None) => Start::Fresh,
            };
            let dist = std::rc::Rc::new(crate::dist::Dist::from_env()?);
            let summary = train::run(cfg, start, dist)?;
            if let Some(sig) = summary.stopped_by {
                // The run stopped early but cleanly: the shell's convention for a death by signal,
                // which schedulers (SLURM requeue) and `timeout` understand.
                std::process::exit(crate::signals::exit_code(sig));
            }
            if !summary.root {
                return Ok(());
            }
            println!(
                "done: {}{}{}",
                summary.run_dir.display(),
                summary
                    .final_loss
                    .map(|l| format!(" | final train loss {l:.4}"))
                    .unwrap_or_default(),
                summary
                    .final_eval
                    .map(|e| format!(" | val loss {:.4} | ppl {:.2}", e.loss, e.ppl))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Eval { checkpoint, data, batches, batch_size, group_size, seq_len } => {
            eval::eval(checkpoint, data, batches, batch_size, group_size, seq_len)
        }
        Command::Import { hf, out } => {
            let r = crate::import::import_hf(&hf, &out)?;
            eprintln!(
                "imported {} from {} ({} file(s), {}): {} parameters in {} tensors, written as f32",
                r.architecture.class(),
                hf.display(),
                r.files,
                r.dtypes.join(", "),
                r.params,
                r.tensors
            );
            for note in &r.notes {
                eprintln!("note: {note}");
            }
            eprintln!(
                "continue pretraining with: motrain train --config {} --init-from {} --set data.train='…' --set data.val='…'",
                out.join("config.toml").display(),
                out.display()
            );
            println!(
                "{}",
                json!({"out": r.out.display().to_string(), "architecture": r.architecture.class(), "params": r.params,
                       "tensors": r.tensors, "files": r.files, "dtypes": r.dtypes,
                       "tokenizer": r.tokenizer.map(|t| t.display().to_string()), "max_seq_len": r.config.model.max_seq_len})
            );
            Ok(())
        }
        Command::Generate {
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            num_samples,
            seed,
            tokenizer,
        } => {
            let opts = crate::generate::GenerateOptions {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                num_samples,
                seed,
                no_cache: false,
            };
            generate::generate(checkpoint, &prompt, tokenizer, &opts)
        }
        Command::Export { checkpoint, format, out } => {
            if format != "hf" {
                return Err(UsageError(format!(
                    "--format {format:?}: the one export format is \"hf\""
                ))
                .into());
            }
            let e = crate::export::export_hf(&checkpoint, &out)?;
            let tok = e
                .tokenizer
                .map_or("no tokenizer.json: the run records no data.tokenizer".to_string(), |t| {
                    format!("tokenizer.json from {t}")
                });
            println!(
                "wrote {} as {} ({} tensors; {tok})",
                e.dir.display(),
                e.architecture.class(),
                e.tensors
            );
            Ok(())
        }
        Command::Plot { runs, out } => {
            let summary =
                crate::plot::plot(&runs, &out).map_err(|e| UsageError(format!("{e:#}")))?;
            println!("{summary}");
            Ok(())
        }
        Command::TransitionTune { checkpoint, out, steps, overrides } => {
            let r = crate::transition::transition_tune(&checkpoint, &out, steps, &overrides)?;
            let line = |what: &str, e: &crate::eval::EvalResult| {
                eprintln!("{what:<34} val loss {:.4} | ppl {:.2}", e.loss, e.ppl)
            };
            line(&format!("before conversion (MoT, step {})", r.from_step), &r.before);
            line("after conversion (top-1 MoE)", &r.converted);
            if let Some(t) = &r.tuned {
                line(&format!("after {} tuning steps", r.steps), t);
            }
            let loss = |e: &Option<crate::eval::EvalResult>| e.as_ref().map(|e| e.loss);
            println!(
                "{}",
                json!({"out": r.out.display().to_string(), "from_step": r.from_step, "steps": r.steps,
                       "loss_before": r.before.loss, "loss_converted": r.converted.loss, "loss_tuned": loss(&r.tuned)})
            );
            Ok(())
        }
        Command::Upcycle {
            checkpoint,
            out,
            experts,
            top_k,
            adapter_dim,
            adapter_scale,
            layers,
            overrides,
        } => {
            let opts = crate::upcycle::UpcycleOptions {
                experts,
                top_k,
                adapter_dim,
                adapter_scale,
                layers,
            };
            let r = crate::upcycle::upcycle(&checkpoint, &out, &opts, &overrides)?;
            eprintln!(
                "upcycled blocks {:?} of the step-{} dense model: {} parameters ({} added, {} trained); logits vs the dense model: {}",
                r.layers,
                r.from_step,
                r.params,
                r.added_params,
                r.trained_params,
                if r.max_logit_diff == 0.0 { "identical".to_string() } else { format!("max |difference| {:.2e}", r.max_logit_diff) }
            );
            eprintln!(
                "fine-tune it with: motrain train --config {} --init-from {}",
                out.join("config.toml").display(),
                out.display()
            );
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Prepare {
            tokenizer,
            input,
            out,
            name,
            val_fraction,
            val_docs,
            seed,
            shard_tokens,
            text_field,
            on_bad_record,
            threads,
            overwrite,
        } => {
            let tok = Tokenizer::load(&tokenizer)?;
            let read = data::inputs::ReadOptions {
                text_field,
                on_bad: data::inputs::OnBad::parse(on_bad_record.as_deref())?,
            };
            // The memory bound is an environment knob, not a flag: the default suits any corpus, and
            // tests shrink it to show memory does not follow the corpus.
            let in_flight_bytes = match std::env::var("MOTRAIN_PREPARE_IN_FLIGHT_MB") {
                Err(_) => prepare::IN_FLIGHT_BYTES,
                Ok(v) => match v.parse::<usize>() {
                    Ok(mb) if (1..1 << 30).contains(&mb) => mb << 20,
                    _ => {
                        let m = format!(
                            "MOTRAIN_PREPARE_IN_FLIGHT_MB={v:?}: expected megabytes, 1 or more"
                        );
                        return Err(UsageError(m).into());
                    }
                },
            };
            let val = match val_docs {
                Some(n) => prepare::ValSplit::Docs(n),
                None => prepare::ValSplit::Fraction(val_fraction.unwrap_or(0.05)),
            };
            let opts = prepare::PrepareOptions {
                name,
                val,
                seed,
                shard_tokens,
                threads,
                read,
                overwrite,
                progress: true,
                in_flight_bytes,
            };
            let r = prepare::prepare(&tok, &tokenizer, &input, &out, &opts)?;
            let m = &r.manifest;
            if r.up_to_date {
                println!(
                    "up to date: {} matches the inputs and options; its {} shards check out",
                    out.join(prepare::MANIFEST).display(),
                    r.files.len()
                );
            }
            println!(
                "{} documents ({} train, {} val) -> {} train + {} val tokens in {} shards under {} (vocab {}, end-of-text {}){}",
                m.documents.train + m.documents.val,
                m.documents.train,
                m.documents.val,
                m.tokens.train,
                m.tokens.val,
                r.files.len(),
                out.display(),
                tok.vocab_size(),
                tok.eot(),
                if r.up_to_date { String::new() } else { format!(" in {:.1} s", r.seconds) }
            );
            for (kind, s) in &m.skipped {
                // Damage to a file can lose records that nobody can count.
                let what = match s.records {
                    0 => "damaged data".to_string(),
                    n => format!("{n} records"),
                };
                println!("skipped {what}: {kind} (first at {})", s.first.join(", "));
            }
            match opts.val {
                prepare::ValSplit::Docs(n) if m.documents.val < n => eprintln!(
                    "warning: --val-docs {n}: the corpus gave {} val documents (documents are held out at a rate of 1/16 of {} documents until there are {n}); pass a smaller --val-docs or --val-fraction",
                    m.documents.val,
                    m.documents.train + m.documents.val
                ),
                prepare::ValSplit::Fraction(f) if m.documents.val == 0 && f > 0.0 => eprintln!(
                    "note: no document fell in val (--val-fraction {f} of {} documents)",
                    m.documents.train
                ),
                _ => {}
            }
            Ok(())
        }
        Command::Tokenizer(TokenizerCommand::Train {
            input,
            vocab_size,
            out,
            text_field,
            on_bad_record,
            max_bytes,
            overwrite,
        }) => {
            let read = data::inputs::ReadOptions {
                text_field,
                on_bad: data::inputs::OnBad::parse(on_bad_record.as_deref())?,
            };
            let r =
                data::tokenizer::train_bpe(&input, vocab_size, &out, &read, max_bytes, overwrite)?;
            let tok = Tokenizer::load(&out.display().to_string())?;
            let skipped = if r.skipped > 0 {
                format!(", {} bad records skipped", r.skipped)
            } else {
                String::new()
            };
            println!(
                "wrote {} ({} tokens; trained on {} documents, {} bytes{skipped})",
                out.display(),
                tok.vocab_size(),
                r.documents,
                r.bytes
            );
            Ok(())
        }
        Command::Bench { config, overrides, steps, warmup, vs, vs_overrides } => {
            if steps == 0 {
                return Err(UsageError("--steps must be at least 1".into()).into());
            }
            let cfg = Config::load(&config, &overrides)?;
            let mut runs = vec![(cfg, config.display().to_string())];
            if vs.is_some() || !vs_overrides.is_empty() {
                let vs_path = vs.unwrap_or_else(|| config.clone());
                let vs_cfg = Config::load(&vs_path, &[overrides, vs_overrides.clone()].concat())
                    .map_err(|e| match e {
                        // Name the flag the user gave.
                        ConfigError::Override { arg, message } if vs_overrides.contains(&arg) => {
                            UsageError(format!("--vs-set {arg}: {message}")).into()
                        }
                        e => anyhow::Error::from(e),
                    })?;
                let vs_name = match vs_overrides.is_empty() {
                    true => vs_path.display().to_string(),
                    false => format!("{} {}", vs_path.display(), vs_overrides.join(" ")),
                };
                runs.push((vs_cfg, vs_name));
            }
            let results = crate::bench::bench(runs, steps, warmup)?;
            // Rank 0 of a data-parallel bench reports for all.
            if results[0].rank != 0 {
                return Ok(());
            }
            for r in &results {
                report_bench(r)?;
            }
            let [a, b] = &results[..] else { return Ok(()) };
            let (name, vs_name) = (&a.config, &b.config);
            let ratio = b.tokens_per_s / a.tokens_per_s;
            eprintln!("{vs_name} / {name}: {ratio:.3}x tokens/s (alternated step by step)");
            let pair = json!({
                "config": name,
                "vs": vs_name,
                "tokens_per_s": [a.tokens_per_s, b.tokens_per_s],
                "ratio": ratio,
            });
            println!("{pair}");
            Ok(())
        }
    }
}

/// One bench result: a line for people on stderr, its JSON on stdout.
fn report_bench(r: &crate::bench::BenchResult) -> Result<()> {
    eprintln!(
        "{}: {:.0} tokens/s, {:.3} s/step, {:.1} GFLOP/s, peak RSS {:.0} MiB | {} | {}",
        r.config,
        r.tokens_per_s,
        r.step_time_s,
        r.gflops_per_s,
        r.peak_rss_bytes as f64 / 1048576.0,
        r.simd,
        r.cpu
    );
    let p = &r.phases_ms;
    eprintln!(
        "  ms per step: forward {:.1}, backward {:.1}, gradient sum over ranks {:.1}, norm {:.1}, update {:.1}, other {:.1}",
        p.forward, p.backward, p.comm, p.norm, p.update, p.other
    );
    if let Some(m) = &r.mot_ops {
        eprintln!("MoT mixing ops per layer (forward + backward): fused {:.2} ms, plain {:.2} ms ({:.2}x)", m.fused_ms, m.plain_ms, m.speedup);
    }
    if let Some(x) = &r.experts {
        eprintln!("MoT experts per layer (forward + backward): kept {:.2} ms, recomputed {:.2} ms ({:.2}x)", x.kept_ms, x.recomputed_ms, x.cost);
    }
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}
