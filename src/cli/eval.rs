//! `motrain eval`: the checks of its flags, the val sources, and the report.

use super::UsageError;
use crate::checkpoint;
use crate::data::{self, EvalStream};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::PathBuf;

pub fn eval(
    path: PathBuf, data: Option<String>, batches: Option<usize>, batch_size: Option<usize>,
    group_size: Option<usize>, seq_len: Option<usize>,
) -> Result<()> {
    let (ckpt, mut model) = checkpoint::load_model(&path)?;
    let (dir, state) = (ckpt.dir, ckpt.state);
    let mut cfg = state.config.clone();
    // A run without data (an imported model) has no val shards and no context of its own.
    if cfg.require_data().is_err() && (data.is_none() || seq_len.is_none()) {
        return Err(UsageError(
            "this run has no data yet (an imported model): pass --data GLOB (shards made with its tokenizer) and --seq-len N".into(),
        )
        .into());
    }
    if let Some(s) = seq_len {
        if s == 0 || s > cfg.model.max_seq_len {
            return Err(UsageError(format!(
                "--seq-len {s}: must be between 1 and the model's context, max_seq_len = {}",
                cfg.model.max_seq_len
            ))
            .into());
        }
        cfg.data.seq_len = s;
    }
    if let Some(g) = group_size {
        if g == 0 {
            return Err(UsageError("--group-size must be at least 1".into()).into());
        }
        if cfg.model.ffn != crate::config::FfnKind::Mot {
            let m = "--group-size sets how many sequences a Mixture of Tokens model mixes; this model has no MoT layers";
            return Err(UsageError(m.into()).into());
        }
        model = model.with_group_size(g);
    }
    let batch_size = batch_size.unwrap_or(cfg.train.eval_batch_size);
    let batches = batches.unwrap_or(cfg.train.eval_batches);
    if batch_size == 0 || batches == 0 {
        return Err(UsageError("--batch-size and --batches must be at least 1".into()).into());
    }
    let multiple = model.batch_multiple();
    if !batch_size.is_multiple_of(multiple) {
        return Err(UsageError(format!(
            "this Mixture of Tokens model mixes groups of {multiple} sequences, so the eval batch ({batch_size}) must be a multiple of {multiple}; \
             pass --batch-size, or --group-size to mix smaller groups"
        ))
        .into());
    }
    // --data, or the run's val: one glob, or each source's of a mixture.
    let (val, what) = match data {
        Some(g) => {
            let glob = crate::config::absolute(std::path::Path::new(&g));
            let stream = EvalStream::new(
                data::shards::open_all(&glob, &cfg.data.format, cfg.model.vocab_size)?,
                cfg.data.seq_len,
            );
            (vec![data::ValSource { name: glob.clone(), weight: 1.0, stream }], Some(glob))
        }
        None => {
            let val = data::mixture::open_val(&cfg.data, cfg.model.vocab_size)?;
            if val.is_empty() {
                return Err(UsageError("the run has no data.val: pass --data GLOB".into()).into());
            }
            (val, cfg.data.val.clone())
        }
    };
    let all = crate::eval::evaluate_sources(
        &model,
        &val,
        batch_size,
        batches,
        &crate::dist::Dist::single(),
    )
    .map_err(|e| UsageError(format!("{e:#}")))
    .context(match &what {
        Some(glob) => format!("evaluating on {glob}"),
        None => "evaluating the val shards of each source".to_string(),
    })?
    .context("no val shards")?;
    let r = all.overall;
    let grouping = if model.mot_layers().next().is_some() {
        format!(" | MoT groups of {multiple}")
    } else {
        String::new()
    };
    eprintln!(
        "step {} | loss {:.4} | ppl {:.2} | {} batches of {} x {} tokens{grouping}",
        state.step, r.loss, r.ppl, r.batches, r.batch_size, cfg.data.seq_len
    );
    if !r.routing.is_empty() {
        eprint!("{}", crate::metrics::routing_table(&r.routing));
    }
    let mut out = json!({"checkpoint": dir.display().to_string(), "step": state.step, "loss": r.loss, "ppl": r.ppl,
                         "batches": r.batches, "batch_size": r.batch_size, "tokens": r.tokens});
    match what {
        Some(glob) => out["data"] = json!(glob),
        // A mixture: each source's val alone; `loss` is their mean weighted as in training.
        None => {
            let mut sources = serde_json::Map::new();
            for ((name, e), v) in all.sources.iter().zip(&val) {
                eprintln!(
                    "  source {name} | loss {:.4} | ppl {:.2} | {} batches",
                    e.loss, e.ppl, e.batches
                );
                sources.insert(
                    name.clone(),
                    json!({"loss": e.loss, "ppl": e.ppl, "batches": e.batches, "tokens": e.tokens, "weight": v.weight}),
                );
            }
            out["sources"] = json!(sources);
        }
    }
    if model.mot_layers().next().is_some() {
        out["group_size"] = json!(multiple);
    }
    if !r.routing.is_empty() {
        out["routing"] = json!(r.routing);
    }
    println!("{out}");
    Ok(())
}
