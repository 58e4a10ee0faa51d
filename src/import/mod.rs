//! `motrain import --hf DIR --out RUN_DIR`: a Hugging Face Llama-family model folder as a
//! motrain run directory: the resolved config, a step-0 checkpoint in f32 and the model's
//! `tokenizer.json`, which `eval`, `generate`, `upcycle`, `transition-tune`, `export` and
//! `train --init-from` accept.
//!
//! Everything is checked before anything is written: `config.json` (`hf_config`), every weight
//! file's header, and every tensor's name, dtype and shape against the model the config
//! describes (`plan`). The tensors then stream one at a time from the mapped files into the
//! checkpoint (`weights`), so memory holds a chunk, not the model; the run directory is built
//! under a temporary name and renamed into place when complete.

mod hf_config;
mod weights;

use crate::checkpoint::{self, TrainState};
use crate::config::{Config, DataConfig, FfnKind, ModelConfig, RunConfig};
use crate::export::Architecture;
use serde_json::json;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use weights::Weights;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The model folder is not one motrain can import: the message says why.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// Writing the run directory failed (disk full): not the input's fault.
    #[error("writing the run directory failed: {0}")]
    Write(String),
}

impl ImportError {
    fn invalid(path: &Path, message: impl Into<String>) -> ImportError {
        ImportError::Invalid { path: path.to_path_buf(), message: message.into() }
    }
    fn io(path: &Path, error: std::io::Error) -> ImportError {
        ImportError::Io { path: path.to_path_buf(), error }
    }
}

pub struct ImportReport {
    pub out: PathBuf,
    pub architecture: Architecture,
    pub params: usize,
    pub tensors: usize,
    pub files: usize,
    /// The dtypes the weights were stored in (all are written as f32).
    pub dtypes: Vec<String>,
    pub tokenizer: Option<PathBuf>,
    /// What the user should know: a capped context, an unusable tokenizer.
    pub notes: Vec<String>,
    pub config: Config,
}

/// One tensor of ours and the Hugging Face tensors it is made of: one, or a stack of one per
/// expert along a new first axis.
struct Planned {
    ours: String,
    shape: Vec<usize>,
    parts: Vec<String>,
}

impl Planned {
    fn one(ours: String, shape: &[usize]) -> Planned {
        Planned { parts: vec![ours.clone()], ours, shape: shape.to_vec() }
    }
}

/// The context an imported run's config trains with, unless the model's is shorter: a
/// starting point for `train --init-from`, which the user's config sets anyway.
const DEFAULT_SEQ_LEN: usize = 1024;

pub fn import_hf(src: &Path, out: &Path) -> Result<ImportReport, ImportError> {
    let config_path = src.join("config.json");
    if !src.is_dir() {
        let why = if src.exists() {
            "is a file: --hf takes the model's folder (config.json and *.safetensors)"
        } else {
            "no such directory"
        };
        return Err(ImportError::invalid(src, why));
    }
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| ImportError::io(&config_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ImportError::invalid(&config_path, format!("not valid JSON: {e}")))?;
    let hf = hf_config::model_config(&json).map_err(|m| ImportError::invalid(&config_path, m))?;
    let weights = Weights::open(src)?;
    let plan = plan(hf.architecture, &hf.model);
    check(&plan, &weights, &hf.model, &config_path)?;
    let mut notes = hf.notes;
    let tokenizer = usable_tokenizer(src, hf.model.vocab_size, &mut notes);
    let config = run_config(out, hf.model, tokenizer.is_some())
        .map_err(|m| ImportError::invalid(&config_path, m))?;
    let out_dir = PathBuf::from(crate::config::absolute(out));
    let staging = staging_dir(&out_dir)?;
    let written = write_run(&staging, &config, &plan, &weights, tokenizer.as_deref(), src, &notes)
        .and_then(|()| place(&staging, &out_dir));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let (files, dtypes) = weights.summary();
    Ok(ImportReport {
        out: out_dir.clone(),
        architecture: hf.architecture,
        params: plan.iter().map(|p| p.shape.iter().product::<usize>()).sum(),
        tensors: plan.len(),
        files,
        dtypes,
        tokenizer: tokenizer.map(|_| out_dir.join("tokenizer.json")),
        notes,
        config,
    })
}

/// Our tensors, in checkpoint order, with the Hugging Face names they come from.
fn plan(arch: Architecture, m: &ModelConfig) -> Vec<Planned> {
    let (d, v, f) = (m.d_model, m.vocab_size, m.d_ff);
    let kv = m.kv_heads() * (d / m.n_heads);
    let mut plan = vec![Planned::one("model.embed_tokens.weight".into(), &[v, d])];
    let mask = m.ffn_layer_mask().unwrap_or_default();
    for (i, &sparse) in mask.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            plan.push(Planned::one(format!("{p}.{norm}.weight"), &[d]));
        }
        for (proj, rows) in [("q", d), ("k", kv), ("v", kv), ("o", d)] {
            plan.push(Planned::one(format!("{p}.self_attn.{proj}_proj.weight"), &[rows, d]));
            if m.bias == crate::config::Bias::Qkv && proj != "o" {
                plan.push(Planned::one(format!("{p}.self_attn.{proj}_proj.bias"), &[rows]));
            }
        }
        let ffn = |plan: &mut Vec<Planned>, prefix: &str, f: usize| {
            for (proj, shape) in [("gate", [f, d]), ("up", [f, d]), ("down", [d, f])] {
                plan.push(Planned::one(format!("{prefix}.{proj}_proj.weight"), &shape));
            }
        };
        if !(sparse && m.ffn == FfnKind::Moe) {
            ffn(&mut plan, &format!("{p}.mlp"), f);
            continue;
        }
        let (e, fe) = (m.moe.n_experts, m.moe.expert_width(f));
        let (hf, names) = match arch {
            Architecture::Mixtral => (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"]),
            _ => (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"]),
        };
        plan.push(Planned {
            ours: format!("{p}.mlp.router.weight"),
            shape: vec![e, d],
            parts: vec![format!("{hf}.gate.weight")],
        });
        for ((ours, name), shape) in
            ["gate", "up", "down"].into_iter().zip(names).zip([[e, fe, d], [e, fe, d], [e, d, fe]])
        {
            plan.push(Planned {
                ours: format!("{p}.mlp.experts.{ours}"),
                shape: shape.to_vec(),
                parts: (0..e).map(|j| format!("{hf}.experts.{j}.{name}.weight")).collect(),
            });
        }
        if m.moe.shared_expert_size > 0 {
            ffn(&mut plan, &format!("{p}.mlp.shared_expert"), m.moe.shared_expert_size);
            plan.push(Planned::one(format!("{p}.mlp.shared_expert_gate.weight"), &[1, d]));
        }
    }
    plan.push(Planned::one("model.norm.weight".into(), &[d]));
    if !m.tie_embeddings {
        plan.push(Planned::one("lm_head.weight".into(), &[v, d]));
    }
    plan
}

/// Every part present, readable and of the shape config.json implies; no tensor left over.
fn check(
    plan: &[Planned], w: &Weights, m: &ModelConfig, config_path: &Path,
) -> Result<(), ImportError> {
    let mut used = HashSet::new();
    for t in plan {
        let want =
            if t.parts.len() > 1 || t.shape.len() == 3 { &t.shape[1..] } else { &t.shape[..] };
        for part in &t.parts {
            let Some(s) = w.get(part) else {
                return Err(ImportError::invalid(
                    config_path.parent().unwrap_or(config_path),
                    format!("the weights lack tensor `{part}`, which the model config.json describes needs"),
                ));
            };
            if !weights::readable(s.dtype) {
                return Err(ImportError::invalid(
                    w.path(s),
                    format!(
                        "tensor `{part}` is stored as {:?}; motrain imports {}",
                        s.dtype,
                        weights::READABLE
                    ),
                ));
            }
            if s.shape != want {
                return Err(ImportError::invalid(
                    w.path(s),
                    format!(
                        "tensor `{part}` has shape {:?}, but {} implies {want:?}",
                        s.shape,
                        config_path.display()
                    ),
                ));
            }
            used.insert(part.as_str());
        }
    }
    let mut extra: Vec<&str> = w
        .names()
        .filter(|n| !used.contains(n))
        // Derived buffers some checkpoints carry, and the head of a tied model (the embedding).
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(m.tie_embeddings && *n == "lm_head.weight"))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(ImportError::invalid(
            config_path,
            format!(
                "the weights hold {} tensor(s) this model has no place for, e.g. `{name}`: config.json does not describe these weights",
                extra.len()
            ),
        ));
    }
    Ok(())
}

/// `tokenizer.json` if motrain can use it; else why not, as a note.
fn usable_tokenizer(src: &Path, vocab: usize, notes: &mut Vec<String>) -> Option<PathBuf> {
    let path = src.join("tokenizer.json");
    if !path.is_file() {
        notes.push("no tokenizer.json: pass --tokenizer to generate, and tokenize data with the model's own tokenizer".into());
        return None;
    }
    match crate::data::Tokenizer::load(&path.display().to_string()) {
        Ok(t) if t.vocab_size() <= vocab => Some(path),
        Ok(t) => {
            notes.push(format!(
                "tokenizer.json has {} tokens, more than the model's vocab_size {vocab}: not used",
                t.vocab_size()
            ));
            None
        }
        Err(e) => {
            notes.push(format!("tokenizer.json is not usable by motrain ({e}): not used"));
            None
        }
    }
}

/// The run's config: the model, no data yet, and motrain's defaults for training.
fn run_config(out: &Path, model: ModelConfig, tokenizer: bool) -> Result<Config, String> {
    let out_abs = PathBuf::from(crate::config::absolute(out));
    let mut cfg = Config {
        run: RunConfig { name: "imported".into(), ..RunConfig::default() },
        data: DataConfig {
            seq_len: model.max_seq_len.min(DEFAULT_SEQ_LEN),
            tokenizer: tokenizer.then(|| out_abs.join("tokenizer.json").display().to_string()),
            ..DataConfig::default()
        },
        model,
        train: Default::default(),
    };
    cfg.place_run(out);
    // Through the same checks as a config file.
    Config::from_toml_str(&cfg.to_toml().map_err(|e| e.to_string())?, "the imported config")
        .map_err(|e| e.to_string())
}

/// A fresh directory beside `out` to build the run in; `out` itself must not hold anything.
fn staging_dir(out: &Path) -> Result<PathBuf, ImportError> {
    crate::run_dir::ensure_empty(out, "choose a new --out directory").map_err(|e| match e {
        crate::run_dir::RunDirError::Io { path, error } => ImportError::io(&path, error),
        crate::run_dir::RunDirError::Unusable { message, .. } => ImportError::invalid(out, message),
    })?;
    let parent = out.parent().unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = parent.join(format!(".{name}.import-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| ImportError::io(&staging, e))?;
    Ok(staging)
}

fn place(staging: &Path, out: &Path) -> Result<(), ImportError> {
    if out.exists() {
        // Empty (checked before): rename cannot replace it on every platform.
        std::fs::remove_dir(out).map_err(|e| ImportError::io(out, e))?;
    }
    std::fs::rename(staging, out).map_err(|e| ImportError::io(out, e))
}

fn write_run(
    dir: &Path, cfg: &Config, plan: &[Planned], weights: &Weights, tokenizer: Option<&Path>,
    src: &Path, notes: &[String],
) -> Result<(), ImportError> {
    let fail = |e: &dyn std::fmt::Display| ImportError::Write(e.to_string());
    let state = TrainState::at_start(cfg);
    checkpoint::save_streamed(dir, &state, |path| write_model(path, plan, weights))
        .map_err(|e| fail(&e))?;
    let text = cfg.to_toml().map_err(|e| fail(&e))?;
    crate::run_dir::write_atomic(&crate::run_dir::config_path(dir), text.as_bytes())
        .map_err(|e| fail(&e))?;
    if let Some(t) = tokenizer {
        std::fs::copy(t, dir.join("tokenizer.json")).map_err(|e| fail(&e))?;
    }
    let (files, dtypes) = weights.summary();
    let record = json!({"source": crate::config::absolute(src), "files": files, "dtypes": dtypes, "notes": notes});
    let record = serde_json::to_string_pretty(&record).map_err(|e| fail(&e))?;
    crate::run_dir::write_atomic(&dir.join("import.json"), record.as_bytes()).map_err(|e| fail(&e))
}

/// `model.safetensors` in f32, written as a stream: the header (every shape is known from the
/// plan), then each tensor's parts converted in chunks.
fn write_model(path: &Path, plan: &[Planned], weights: &Weights) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in plan {
        let bytes = 4 * t.shape.iter().product::<usize>();
        header.insert(
            t.ours.clone(),
            json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header)?;
    // Data starts 8-byte aligned, as safetensors' own writer pads it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for t in plan {
        for part in &t.parts {
            weights.write_f32(part, &mut out)?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    let want = (8 + header.len() + offset) as u64;
    let got = file.metadata()?.len();
    if got != want {
        return Err(std::io::Error::other(format!("wrote {got} bytes, expected {want}")));
    }
    Ok(())
}
