//! PESC upcycling (`models.md`): a dense checkpoint becomes a run directory whose one checkpoint
//! holds every dense tensor unchanged plus, in each chosen block, a router and E adapter pairs
//! (Up zero, so the model still computes the dense model), and whose config says
//! `ffn = "pesc"`. `motrain train --config DIR/config.toml --init-from DIR` fine-tunes it.

use crate::checkpoint::{self, TrainState};
use crate::config::{Config, ConfigError, FfnKind, FfnLayers};
use crate::model::{trains, Params, Transformer};
use crate::run_dir;
use crate::train::optim::AdamW;
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The command's flags; None keeps `[model.pesc]`'s default.
#[derive(Debug, Clone, Default)]
pub struct UpcycleOptions {
    pub experts: Option<usize>,
    pub top_k: Option<usize>,
    pub adapter_dim: Option<usize>,
    pub adapter_scale: Option<f64>,
    /// `all`, `second_half`, or comma-separated block indices.
    pub layers: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct UpcycleReport {
    /// The run directory of the upcycled model.
    pub out: PathBuf,
    /// The dense checkpoint's step.
    pub from_step: usize,
    /// The blocks whose FFN became a PESC layer.
    pub layers: Vec<usize>,
    pub params: usize,
    /// Parameters the fine-tune trains (all of them unless `train_only_adapters`).
    pub trained_params: usize,
    /// Parameters upcycling added (routers and adapters).
    pub added_params: usize,
    /// Largest |logit difference| between the dense and the upcycled model on a probe batch:
    /// 0 when the upcycled model computes the dense one, as it must.
    pub max_logit_diff: f64,
}

/// Upcycles the dense checkpoint at `source` into a PESC run directory `out`.
pub fn upcycle(
    source: &Path, out: &Path, opts: &UpcycleOptions, overrides: &[String],
) -> Result<UpcycleReport> {
    let src = checkpoint::resolve(source)?;
    let state = checkpoint::load_state(&src)?;
    let origin = src.join("state.json").display().to_string();
    if state.config.model.ffn != FfnKind::Dense {
        return Err(ConfigError::Invalid {
            origin,
            message: format!(
                "upcycle needs a dense checkpoint, but this model has `model.ffn` = {}; PESC upcycles dense FFNs only",
                crate::config::toml_value(&state.config.model.ffn)
            ),
        }
        .into());
    }
    let cfg = pesc_config(&state.config, out, opts, overrides)?;
    let hint = "choose a new --out directory";
    run_dir::ensure_empty(out, hint)?; // before the work; again under the lock below

    let (ckpt, dense) = checkpoint::load_model(&src)?;
    let dev = dense.device().clone();
    let model_cfg = cfg.model.clone();
    let mut params = Params::new(&dev, cfg.run.seed, cfg.model.init_scale)
        .freezing(move |name| !trains(&model_cfg, name));
    let model = Transformer::new(&cfg.model, &mut params)?;
    // Every dense tensor as it was; routers and adapters as initialised.
    params
        .overwrite(&ckpt.model)
        .map_err(|m| anyhow::anyhow!("upcycling {}: {m}", src.display()))?;
    let max_logit_diff = max_logit_diff(&dense, &model)?;

    // A fresh optimizer (zero moments for what trains): the checkpoint is a run at step 0.
    let opt = AdamW::new(&params, |name| !params.is_frozen(name), &cfg.train)?;
    let _lock = run_dir::claim_empty(out, hint)?;
    let start = TrainState::at_start(&cfg);
    checkpoint::save(
        out,
        &start,
        &params.tensors(),
        &opt.state_tensors()?,
        cfg.train.keep_checkpoints,
    )?;
    run_dir::write_atomic(&run_dir::config_path(out), cfg.to_toml()?.as_bytes())?;
    let layers = cfg
        .model
        .ffn_layer_mask()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, &on)| on.then_some(i))
        .collect();
    Ok(UpcycleReport {
        out: out.to_path_buf(),
        from_step: state.step,
        layers,
        params: params.count(),
        trained_params: params.trainable_count(),
        added_params: params.count() - dense_count(&ckpt.model),
        max_logit_diff,
    })
}

/// The dense run's config with `ffn = "pesc"` in the chosen blocks, the flags in `[model.pesc]`,
/// the run placed at `out`, and the user's `--set` overrides on top.
fn pesc_config(
    dense: &Config, out: &Path, o: &UpcycleOptions, overrides: &[String],
) -> Result<Config, ConfigError> {
    let bad = |message: String| ConfigError::Invalid { origin: "motrain upcycle".into(), message };
    let mut cfg = dense.clone();
    cfg.model.ffn = FfnKind::Pesc;
    cfg.model.ffn_layers = match o.layers.as_deref().unwrap_or("all") {
        named @ ("all" | "second_half") => FfnLayers::Named(named.into()),
        list => FfnLayers::List(
            list.split(',')
                .map(|i| i.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| bad(format!("--layers {list:?}: expected all, second_half or block indices such as 0,2,3")))?,
        ),
    };
    let p = &mut cfg.model.pesc;
    p.n_experts = o.experts.unwrap_or(p.n_experts);
    p.top_k = o.top_k.unwrap_or(p.top_k);
    p.adapter_dim = o.adapter_dim.unwrap_or(p.adapter_dim);
    p.adapter_scale = o.adapter_scale.unwrap_or(p.adapter_scale);
    // The flags' own words, before the config's checks speak of `model.pesc` keys.
    if [p.n_experts, p.top_k, p.adapter_dim].iter().any(|&v| v > 1 << 40) {
        return Err(bad(
            "--experts, --top-k and --adapter-dim must be below 2^40, beyond what motrain can allocate".into(),
        ));
    }
    if p.n_experts == 0 || p.adapter_dim == 0 {
        return Err(bad(format!(
            "--experts ({}) and --adapter-dim ({}) must be at least 1",
            p.n_experts, p.adapter_dim
        )));
    }
    if p.top_k == 0 || p.top_k > p.n_experts {
        return Err(bad(format!(
            "--top-k ({}) must be between 1 and --experts ({})",
            p.top_k, p.n_experts
        )));
    }
    if let Err(m) = cfg.model.ffn_layer_mask() {
        return Err(bad(format!("--layers: {m}")));
    }
    cfg.place_run(out);
    cfg.with_overrides(overrides, "the upcycled config")
}

fn dense_count(tensors: &std::collections::HashMap<String, Tensor>) -> usize {
    tensors.values().map(Tensor::elem_count).sum()
}

/// Both models on one probe batch of two sequences: the largest |Δlogit|.
fn max_logit_diff(a: &Transformer, b: &Transformer) -> Result<f64> {
    let (v, s) = (a.cfg.vocab_size as u32, a.cfg.max_seq_len.min(32));
    let ids: Vec<u32> = (0..2 * s as u32).map(|i| (i.wrapping_mul(7919) + 13) % v).collect();
    let ids = Tensor::from_vec(ids, (2, s), a.device())?;
    let diff = (a.forward(&ids, None)? - b.forward(&ids, None)?)?.abs()?.max_all()?;
    Ok(diff.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
