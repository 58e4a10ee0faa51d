//! Transition tuning (`models.md`): a MoT checkpoint becomes a sparse token-choice MoE that
//! serves one sequence at a time. Every tensor is kept — the experts stay the experts and the
//! controller becomes the router — then the MoE trains on with the schedule continuing.

use crate::checkpoint::{self, TrainState};
use crate::config::{Config, ConfigError, FfnKind, Gate, MoeConfig, RouterKind, Routing};
use crate::data;
use crate::eval::{evaluate_sources, EvalResult};
use crate::model::{Params, Transformer};
use crate::run_dir;
use crate::train::{self, Start};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct TransitionReport {
    /// The run directory of the converted model.
    pub out: PathBuf,
    /// The MoT checkpoint's step, where tuning starts.
    pub from_step: usize,
    pub steps: usize,
    pub before: EvalResult,
    pub converted: EvalResult,
    pub tuned: Option<EvalResult>,
}

/// Converts the MoT checkpoint at `source` into a MoE run in `out`, writes the converted
/// checkpoint there, evaluates before and after, and tunes for `steps` steps.
pub fn transition_tune(
    source: &Path, out: &Path, steps: usize, overrides: &[String],
) -> Result<TransitionReport> {
    let src = checkpoint::resolve(source)?;
    let state = checkpoint::load_state(&src)?;
    let origin = src.join("state.json").display().to_string();
    if state.config.model.ffn != FfnKind::Mot {
        return Err(ConfigError::Invalid {
            origin,
            message: format!("transition-tune needs a Mixture of Tokens checkpoint, but this model has `model.ffn` = {}", crate::config::toml_value(&state.config.model.ffn)),
        }
        .into());
    }
    // Steps are written to config.toml, whose integers are i64.
    let total =
        state.step.checked_add(steps).filter(|&t| t <= i64::MAX as usize).ok_or_else(|| {
            ConfigError::Invalid {
                origin: "motrain transition-tune".into(),
                message: format!("--steps {steps} is too large"),
            }
        })?;
    let cfg = moe_config(&state.config, out, total, overrides).map_err(|e| match e {
        ConfigError::Invalid { message, .. } => {
            ConfigError::Invalid { origin: format!("the converted config ({origin})"), message }
        }
        e => e,
    })?;
    let hint = "choose a new --out directory";
    run_dir::ensure_empty(out, hint)?; // before the work; again under the lock below
    let val = data::mixture::open_val(&cfg.data, cfg.model.vocab_size)?;
    if val.is_empty() {
        anyhow::bail!("transition-tune reports eval losses, so the run needs data.val (or a val glob in a [[data.sources]] table)");
    }
    let (batch, batches) = (cfg.train.eval_batch_size, cfg.train.eval_batches);
    let evaluate = |model: &Transformer| -> Result<EvalResult> {
        let all = evaluate_sources(model, &val, batch, batches, &crate::dist::Dist::single())?;
        all.map(|a| a.overall).context("no val shards to evaluate")
    };

    let (ckpt, mot_model) = checkpoint::load_model(&src)?;
    let dev = mot_model.device().clone();
    let before = evaluate(&mot_model)?;

    let weights = convert(&ckpt.model, &mot_model)?;
    let moments = convert(&ckpt.optimizer(&dev)?, &mot_model)?;
    let mut params = Params::new(&dev, cfg.run.seed, cfg.model.init_scale);
    let model = Transformer::new(&cfg.model, &mut params)?;
    // The weights fit unless an override changed the model's shape: the user's mistake.
    params.load(&weights).map_err(|m| ConfigError::Invalid {
        origin: format!("the converted config ({origin})"),
        message: format!("{m}: --set may change training, not the model's shape"),
    })?;
    let converted = evaluate(&model)?;

    // The converted checkpoint is the tuning run's starting point: step, tokens, data cursor
    // and Adam's moments all carry on.
    let start = TrainState {
        config: cfg.clone(),
        motrain_version: env!("CARGO_PKG_VERSION").to_string(),
        ..state.clone()
    };
    {
        // Tuning below takes the lock again.
        let _lock = run_dir::claim_empty(out, hint)?;
        checkpoint::save(out, &start, &weights, &moments, cfg.train.keep_checkpoints)?;
        run_dir::write_atomic(&run_dir::config_path(out), cfg.to_toml()?.as_bytes())?;
    }
    let tuned = if steps > 0 {
        train::run(cfg, Start::Resume, std::rc::Rc::new(crate::dist::Dist::single()))?.final_eval
    } else {
        None
    };
    Ok(TransitionReport {
        out: out.to_path_buf(),
        from_step: state.step,
        steps,
        before,
        converted,
        tuned,
    })
}

/// The MoT run's config with every MoT layer turned into a top-1 Switch MoE of the same
/// experts: capacity 1.25 in training, aux loss 0.01, the same learning-rate schedule.
fn moe_config(
    mot: &Config, out: &Path, total_steps: usize, overrides: &[String],
) -> std::result::Result<Config, ConfigError> {
    let mut cfg = mot.clone();
    let m = &mot.model.mot;
    cfg.model.ffn = FfnKind::Moe;
    cfg.model.moe = MoeConfig {
        routing: Routing::TokenChoice,
        router: RouterKind::Linear,
        n_experts: m.n_experts,
        top_k: 1,
        expert_size: m.expert_width(mot.model.d_ff),
        gate: Gate::Softmax,
        capacity_factor: 1.25,
        aux_loss_weight: 0.01,
        z_loss_weight: 0.0,
        ..MoeConfig::default()
    };
    cfg.place_run(out);
    if cfg.train.schedule_steps == 0 {
        cfg.train.schedule_steps = mot.train.steps;
    }
    cfg.train.steps = total_steps;
    cfg.with_overrides(overrides, "the converted config")
}

/// Renames each MoT layer's tensors (weights, or their Adam moments) to the MoE layout. The temperature folds into the router, `R = C / T`, so the logits are unchanged;
/// a moment of C scales as its gradient does (×T for exp_avg, ×T² for exp_avg_sq).
fn convert(
    tensors: &HashMap<String, Tensor>, model: &Transformer,
) -> Result<HashMap<String, Tensor>> {
    let temperatures: HashMap<String, f64> = model
        .mot_layers()
        .map(|(prefix, l)| Ok((prefix, l.temperature_value()?)))
        .collect::<Result<_>>()?;
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let Some((prefix, rest)) = name.split_once(".mlp.") else {
            out.insert(name.clone(), t.clone());
            continue;
        };
        let Some(&temp) = temperatures.get(prefix) else {
            out.insert(name.clone(), t.clone());
            continue;
        };
        match rest.strip_prefix("controller.weight") {
            Some(moment) => {
                let power = match moment {
                    "" => -1,
                    ".exp_avg" => 1,
                    ".exp_avg_sq" => 2,
                    other => anyhow::bail!("unexpected tensor {name} ({other})"),
                };
                out.insert(format!("{prefix}.mlp.router.weight{moment}"), (t * temp.powi(power))?);
            }
            None if rest.starts_with("log_temperature") => {}
            None => {
                out.insert(name.clone(), t.clone());
            }
        }
    }
    Ok(out)
}
