//! `motrain export --format hf`: a checkpoint as a Hugging Face model folder. Which
//! architecture a model becomes follows from its config:
//! - dense, modern preset → `LlamaForCausalLM` (our tensor names are already Llama's);
//! - token-choice MoE with MoE in every block and `softmax_topk` gates → `MixtralForCausalLM`;
//! - PESC → `MotrainPescForCausalLM`, a Llama whose FFNs carry the adapters, defined by the
//!   modeling file written beside it (loads with `trust_remote_code=True`, like Camelidae);
//! - any other token-choice MoE with a linear router (either gate, MoE in some blocks, as
//!   transition tuning produces, or a shared expert) → `Qwen2MoeForCausalLM`, whose shared
//!   expert is ours or, for a model without one, of width zero.
//!
//! Eval and generation are dropless, so the exported model computes exactly what ours does.

use crate::checkpoint;
use crate::config::{
    Activation, Bias, Config, ConfigError, FfnKind, Gate, ModelConfig, Norm, Position, RouterKind,
    Routing,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    /// Read by `import` (Llama's tensors and math); export writes such a model as Llama.
    Mistral,
    Qwen2,
    Mixtral,
    Qwen2Moe,
    /// A PESC model: Llama with motrain's PESC FFN, loaded with the modeling file export writes
    /// beside it (`trust_remote_code`), as the PESC authors publish theirs.
    Pesc,
}

impl Architecture {
    pub fn class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Pesc => "MotrainPescForCausalLM",
        }
    }

    pub fn from_class(class: &str) -> Option<Architecture> {
        [
            Architecture::Llama,
            Architecture::Mistral,
            Architecture::Qwen2,
            Architecture::Mixtral,
            Architecture::Qwen2Moe,
        ]
        .into_iter()
        .find(|a| a.class() == class)
    }
}

pub struct Exported {
    pub dir: PathBuf,
    pub architecture: Architecture,
    pub tensors: usize,
    /// Where tokenizer.json came from, if one was written.
    pub tokenizer: Option<String>,
}

/// Which HF architecture computes this model, or the setting that prevents every one.
pub fn architecture(m: &ModelConfig) -> std::result::Result<Architecture, String> {
    let modern = [
        (m.norm == Norm::Rmsnorm, "model.norm = \"rmsnorm\""),
        (m.position == Position::Rope, "model.position = \"rope\""),
        (m.activation == Activation::Swiglu, "model.activation = \"swiglu\""),
        (matches!(m.bias, Bias::None | Bias::Qkv), "model.bias = \"none\" (or \"qkv\")"),
        (m.final_norm, "model.final_norm = true"),
    ];
    if let Some((_, need)) = modern.iter().find(|(ok, _)| !ok) {
        return Err(format!(
            "Hugging Face export covers the modern preset (Llama layout); this model lacks {need}"
        ));
    }
    // Of the layouts we write, only the Qwen2 family has q/k/v biases.
    let qkv_bias = m.bias == Bias::Qkv;
    match m.ffn {
        FfnKind::Dense if qkv_bias => Ok(Architecture::Qwen2),
        FfnKind::Dense => Ok(Architecture::Llama),
        FfnKind::Moe => {
            if m.moe.routing != Routing::TokenChoice || m.moe.router != RouterKind::Linear {
                return Err(format!(
                    "Hugging Face MoE models route by token choice with a linear router; this model has `model.moe.routing` = {} and `model.moe.router` = {}",
                    crate::config::toml_value(&m.moe.routing),
                    crate::config::toml_value(&m.moe.router)
                ));
            }
            let every_block = m.ffn_layer_mask()?.iter().all(|&b| b);
            let mixtral = every_block
                && m.moe.gate == Gate::SoftmaxTopk
                && !qkv_bias
                && m.moe.shared_expert_size == 0;
            Ok(if mixtral { Architecture::Mixtral } else { Architecture::Qwen2Moe })
        }
        FfnKind::Mot => Err("a Mixture of Tokens model has no Hugging Face counterpart: convert it with `motrain transition-tune` first".into()),
        FfnKind::Pesc => Ok(Architecture::Pesc),
    }
}

/// Writes `out/{config.json, generation_config.json, model.safetensors, tokenizer.json}`.
pub fn export_hf(ckpt: &Path, out: &Path) -> Result<Exported> {
    let dir = checkpoint::resolve(ckpt)?;
    let state = checkpoint::load_state(&dir)?;
    let cfg = &state.config;
    let arch = architecture(&cfg.model).map_err(|message| ConfigError::Invalid {
        origin: format!("cannot export {}", dir.display()),
        message,
    })?;
    let ckpt = checkpoint::load(&dir, &candle_core::Device::Cpu)?;
    ckpt.check_config(&cfg.model)?;
    let tok = tokenizer_ids(cfg)?;
    let tensors = hf_tensors(&cfg.model, arch, &ckpt.model)?;
    // A folder of another model's files (shards, an index) beside ours would load as neither.
    crate::run_dir::ensure_empty(out, "choose a new --out directory")?;
    std::fs::create_dir_all(out)
        .map_err(|error| crate::run_dir::RunDirError::Io { path: out.to_path_buf(), error })?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let p = out.join(name);
        crate::run_dir::write_atomic(&p, serde_json::to_string_pretty(v)?.as_bytes())
            .with_context(|| format!("writing {}", p.display()))
    };
    write_json("config.json", &hf_config(&cfg.model, arch, tok.as_ref().map(|t| t.1)))?;
    let mut generation = json!({"do_sample": true, "temperature": 0.8, "max_new_tokens": 200});
    if let Some((_, eot)) = &tok {
        generation["bos_token_id"] = json!(eot);
        generation["eos_token_id"] = json!(eot);
    }
    write_json("generation_config.json", &generation)?;
    if arch == Architecture::Pesc {
        let p = out.join(format!("{PESC_MODULE}.py"));
        crate::run_dir::write_atomic(&p, PESC_MODELING.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let model_path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &model_path)
        .with_context(|| format!("writing {}", model_path.display()))?;
    crate::run_dir::share_like_created(&model_path)?;
    let tokenizer = match tok {
        Some((Some(path), _)) => {
            std::fs::copy(&path, out.join("tokenizer.json"))
                .with_context(|| format!("copying {path}"))?;
            Some(path)
        }
        Some((None, _)) => {
            crate::data::tokenizer::gpt2_tokenizer(&out.join("tokenizer.json"))?;
            Some("gpt2 (rebuilt from tiktoken's ranks)".to_string())
        }
        None => None,
    };
    Ok(Exported { dir: out.to_path_buf(), architecture: arch, tensors: tensors.len(), tokenizer })
}

/// The run's tokenizer file (None for the built-in GPT-2 BPE, whose tokenizer.json export
/// rebuilds) and its end-of-text id; None without a recorded tokenizer.
fn tokenizer_ids(cfg: &Config) -> Result<Option<(Option<String>, u32)>> {
    let Some(spec) = &cfg.data.tokenizer else {
        return Ok(None);
    };
    let tok = crate::data::Tokenizer::load(spec)?;
    Ok(Some(((spec != "gpt2").then(|| spec.clone()), tok.eot())))
}

pub fn hf_config(m: &ModelConfig, arch: Architecture, eot: Option<u32>) -> Value {
    let mut c = json!({
        "architectures": [arch.class()],
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads(),
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": m.rope_scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": true,
    });
    if let Some(eot) = eot {
        c["bos_token_id"] = json!(eot);
        c["eos_token_id"] = json!(eot);
    }
    let f = m.moe.expert_width(m.d_ff);
    // Blocks with `model.ffn` (PESC's upcycled ones, a MoE's sparse ones) and the dense rest.
    let mask = m.ffn_layer_mask().unwrap_or_default();
    let (sparse, dense): (Vec<usize>, Vec<usize>) =
        (0..m.n_layers).partition(|&i| mask.get(i).copied().unwrap_or(false));
    let extra = match arch {
        Architecture::Llama | Architecture::Mistral => {
            json!({"model_type": "llama", "attention_bias": false, "mlp_bias": false})
        }
        // Llama's `attention_bias` adds an o_proj bias as well: written as zeros.
        Architecture::Pesc => json!({
            "model_type": "motrain_pesc", "attention_bias": m.bias == Bias::Qkv, "mlp_bias": false,
            "auto_map": {
                "AutoConfig": format!("{PESC_MODULE}.MotrainPescConfig"),
                "AutoModelForCausalLM": format!("{PESC_MODULE}.MotrainPescForCausalLM"),
            },
            "pesc_layers": sparse,
            "pesc_num_experts": m.pesc.n_experts, "pesc_top_k": m.pesc.top_k,
            "pesc_adapter_dim": m.pesc.adapter_dim, "pesc_adapter_scale": m.pesc.adapter_scale,
        }),
        Architecture::Qwen2 => json!({
            "model_type": "qwen2", "use_sliding_window": false, "sliding_window": m.max_seq_len,
            "max_window_layers": m.n_layers,
        }),
        Architecture::Mixtral => json!({
            "model_type": "mixtral", "intermediate_size": f, "num_local_experts": m.moe.n_experts,
            "num_experts_per_tok": m.moe.top_k, "router_aux_loss_coef": m.moe.aux_loss_weight,
            "sliding_window": null, "output_router_logits": false,
        }),
        Architecture::Qwen2Moe => {
            json!({
                "model_type": "qwen2_moe", "moe_intermediate_size": f, "shared_expert_intermediate_size": m.moe.shared_expert_size,
                "num_experts": m.moe.n_experts, "num_experts_per_tok": m.moe.top_k,
                "norm_topk_prob": m.moe.gate == Gate::SoftmaxTopk, "decoder_sparse_step": 1, "mlp_only_layers": dense,
                "use_sliding_window": false, "sliding_window": m.max_seq_len, "max_window_layers": m.n_layers,
                "router_aux_loss_coef": m.moe.aux_loss_weight, "output_router_logits": false, "qkv_bias": true,
            })
        }
    };
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    c
}

/// The modeling file a PESC export carries (its module name, and its text).
const PESC_MODULE: &str = "modeling_motrain_pesc";
const PESC_MODELING: &str = include_str!("../python/modeling_motrain_pesc.py");

/// Our tensors under the architecture's names. The head is always written (a copy of the
/// embedding when tied), which every loader accepts.
pub fn hf_tensors(
    m: &ModelConfig, arch: Architecture, ours: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let get = |name: &str| {
        ours.get(name).cloned().with_context(|| format!("the checkpoint lacks tensor `{name}`"))
    };
    let mut out = HashMap::new();
    for (name, t) in ours {
        if !name.contains(".mlp.router.") && !name.contains(".mlp.experts.") {
            out.insert(name.clone(), t.clone());
        }
    }
    if m.tie_embeddings {
        out.insert("lm_head.weight".into(), get("model.embed_tokens.weight")?);
    }
    if arch == Architecture::Pesc {
        // Our names are the modeling file's; Llama's attention bias includes o_proj's.
        out.extend(ours.iter().map(|(k, t)| (k.clone(), t.clone())));
        if m.bias == Bias::Qkv {
            for i in 0..m.n_layers {
                let zeros = Tensor::zeros(m.d_model, DType::F32, &candle_core::Device::Cpu)?;
                out.insert(format!("model.layers.{i}.self_attn.o_proj.bias"), zeros);
            }
        }
        return Ok(out);
    }
    let mask = m.ffn_layer_mask().map_err(anyhow::Error::msg)?;
    for (i, &sparse) in mask.iter().enumerate() {
        let p = format!("model.layers.{i}");
        if matches!(arch, Architecture::Qwen2 | Architecture::Qwen2Moe) {
            // The Qwen2 layout always has q/k/v biases: zeros where our model has none.
            let kv = m.kv_heads() * (m.d_model / m.n_heads);
            for (proj, width) in [("q", m.d_model), ("k", kv), ("v", kv)] {
                let name = format!("{p}.self_attn.{proj}_proj.bias");
                if let std::collections::hash_map::Entry::Vacant(e) = out.entry(name) {
                    e.insert(Tensor::zeros(width, DType::F32, &candle_core::Device::Cpu)?);
                }
            }
        }
        if !sparse
            || matches!(arch, Architecture::Llama | Architecture::Mistral | Architecture::Qwen2)
        {
            continue;
        }
        let (gate, up, down) = (
            get(&format!("{p}.mlp.experts.gate"))?,
            get(&format!("{p}.mlp.experts.up"))?,
            get(&format!("{p}.mlp.experts.down"))?,
        );
        let router = get(&format!("{p}.mlp.router.weight"))?;
        let (moe, names) = match arch {
            Architecture::Mixtral => (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"]),
            _ => (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"]),
        };
        out.insert(format!("{moe}.gate.weight"), router);
        for j in 0..m.moe.n_experts {
            for (stack, name) in [&gate, &up, &down].into_iter().zip(names) {
                out.insert(format!("{moe}.experts.{j}.{name}.weight"), stack.get(j)?.contiguous()?);
            }
        }
        if arch == Architecture::Qwen2Moe && m.moe.shared_expert_size == 0 {
            let (d, dev) = (m.d_model, &candle_core::Device::Cpu);
            // A shared expert of width 0 (and a gate whose output it multiplies): Qwen2-MoE's
            // layout holds one, our model has none.
            out.insert(
                format!("{moe}.shared_expert.gate_proj.weight"),
                Tensor::zeros((0, d), DType::F32, dev)?,
            );
            out.insert(
                format!("{moe}.shared_expert.up_proj.weight"),
                Tensor::zeros((0, d), DType::F32, dev)?,
            );
            out.insert(
                format!("{moe}.shared_expert.down_proj.weight"),
                Tensor::zeros((d, 0), DType::F32, dev)?,
            );
            out.insert(
                format!("{moe}.shared_expert_gate.weight"),
                Tensor::zeros((1, d), DType::F32, dev)?,
            );
        }
    }
    if out.keys().any(|k| {
        k.contains(".mlp.router.")
            || k.contains(".mlp.experts.gate")
                && matches!(arch, Architecture::Llama | Architecture::Mistral | Architecture::Qwen2)
    }) {
        bail!("internal: unconverted tensors left");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Params, Transformer};
    use candle_core::Device;
    use candle_nn::VarBuilder;

    fn tiny(
        modify: impl Fn(&mut ModelConfig),
    ) -> (ModelConfig, Transformer, HashMap<String, Tensor>) {
        let (cfg, model, p) = tiny_params(modify);
        (cfg, model, p.tensors())
    }

    fn tiny_params(modify: impl Fn(&mut ModelConfig)) -> (ModelConfig, Transformer, Params) {
        let text = "[run]\nname='t'\n[data]\ntrain='x'\nseq_len=12\n[model]\nvocab_size=40\nd_model=16\nn_layers=2\nn_heads=2\nd_ff=24\n";
        let mut cfg = Config::from_toml_str(text, "test").unwrap().model;
        modify(&mut cfg);
        let mut p = Params::new(&Device::Cpu, 7, 1.0);
        let model = Transformer::new(&cfg, &mut p).unwrap();
        (cfg, model, p)
    }

    const IDS: [u32; 9] = [3, 17, 5, 39, 0, 22, 8, 8, 31];

    /// Our logits for every position of IDS, `[T, V]`.
    fn ours(model: &Transformer) -> Tensor {
        model
            .forward(&Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None)
            .unwrap()
    }

    /// Feeds IDS one token at a time (each loader returns the last position's logits) → `[T, V]`.
    fn stepwise(mut step: impl FnMut(&Tensor, usize) -> Tensor) -> Tensor {
        let rows: Vec<Tensor> = IDS
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                step(&Tensor::new(&[[t]], &Device::Cpu).unwrap(), i).flatten_all().unwrap()
            })
            .collect();
        Tensor::stack(&rows, 0).unwrap()
    }

    fn config_json(cfg: &ModelConfig, arch: Architecture) -> Value {
        let mut c = hf_config(cfg, arch, Some(0));
        c["use_flash_attn"] = json!(false);
        if c["sliding_window"].is_null() {
            c["sliding_window"] = json!(cfg.max_seq_len);
        }
        c
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn llama_export_matches_candle_transformers() {
        // The last case is Llama 3's: 4 query heads on 2 key/value heads and its RoPE scaling,
        // set so that one frequency is blended and one divided.
        for (tied, kv) in [(false, None), (true, None), (false, Some(2))] {
            let (cfg, model, tensors) = tiny(|c| {
                c.tie_embeddings = tied;
                if kv.is_some() {
                    (c.n_heads, c.n_kv_heads) = (4, kv);
                    c.rope_scaling = Some(crate::config::RopeScaling {
                        rope_type: crate::config::RopeScalingKind::Llama3,
                        factor: 8.0,
                        low_freq_factor: Some(1.0),
                        high_freq_factor: Some(4.0),
                        original_max_position_embeddings: Some(16),
                    });
                }
            });
            assert_eq!(architecture(&cfg), Ok(Architecture::Llama));
            let hf = hf_tensors(&cfg, Architecture::Llama, &tensors).unwrap();
            let vb = VarBuilder::from_tensors(hf, DType::F32, &Device::Cpu);
            let lc: candle_transformers::models::llama::LlamaConfig =
                serde_json::from_value(config_json(&cfg, Architecture::Llama)).unwrap();
            let lc = lc.into_config(false);
            let llama = candle_transformers::models::llama::Llama::load(vb, &lc).unwrap();
            let mut cache =
                candle_transformers::models::llama::Cache::new(true, DType::F32, &lc, &Device::Cpu)
                    .unwrap();
            let theirs = stepwise(|x, i| llama.forward(x, i, &mut cache).unwrap());
            let d = max_diff(&ours(&model), &theirs);
            eprintln!("llama (tied {tied}, kv heads {kv:?}): max |Δlogit| = {d:.2e}");
            assert!(d < 1e-4, "llama (tied {tied}, kv heads {kv:?}): max |Δlogit| = {d}");
        }
    }

    /// Qwen2: biases on q, k and v only (random here, so that they count), untied with grouped
    /// heads and tied with one key/value head per query head.
    #[test]
    fn qwen2_export_matches_candle_transformers() {
        for (tied, kv) in [(false, Some(2)), (true, None)] {
            let (cfg, model, p) = tiny_params(|c| {
                (c.bias, c.tie_embeddings, c.n_heads, c.n_kv_heads) = (Bias::Qkv, tied, 4, kv);
            });
            assert_eq!(architecture(&cfg), Ok(Architecture::Qwen2));
            let biases: Vec<_> = p.iter().filter(|(n, _)| n.ends_with("_proj.bias")).collect();
            assert_eq!(biases.len(), 2 * 3, "q, k and v of 2 blocks");
            for (i, (_, v)) in biases.into_iter().enumerate() {
                v.set(&crate::ops::testing::randn(v.dims(), 50 + i as u64)).unwrap();
            }
            let tensors = p.tensors();
            let hf = hf_tensors(&cfg, Architecture::Qwen2, &tensors).unwrap();
            let vb = VarBuilder::from_tensors(hf, DType::F32, &Device::Cpu);
            let qc: candle_transformers::models::qwen2::Config =
                serde_json::from_value(config_json(&cfg, Architecture::Qwen2)).unwrap();
            let mut qwen =
                candle_transformers::models::qwen2::ModelForCausalLM::new(&qc, vb).unwrap();
            let theirs = stepwise(|x, i| qwen.forward(x, i).unwrap());
            let d = max_diff(&ours(&model), &theirs);
            eprintln!("qwen2 (tied {tied}, kv heads {kv:?}): max |Δlogit| = {d:.2e}");
            assert!(d < 1e-4, "qwen2 (tied {tied}, kv heads {kv:?}): max |Δlogit| = {d}");
        }
    }

    #[test]
    fn mixtral_export_matches_candle_transformers() {
        let (cfg, model, tensors) = tiny(|c| {
            c.ffn = FfnKind::Moe;
            c.moe.n_experts = 4;
            c.moe.top_k = 2;
            c.moe.gate = Gate::SoftmaxTopk;
        });
        assert_eq!(architecture(&cfg), Ok(Architecture::Mixtral));
        let hf = hf_tensors(&cfg, Architecture::Mixtral, &tensors).unwrap();
        let vb = VarBuilder::from_tensors(hf, DType::F32, &Device::Cpu);
        let mc: candle_transformers::models::mixtral::Config =
            serde_json::from_value(config_json(&cfg, Architecture::Mixtral)).unwrap();
        let mut mixtral = candle_transformers::models::mixtral::Model::new(&mc, vb).unwrap();
        let theirs = stepwise(|x, i| mixtral.forward(x, i).unwrap());
        let d = max_diff(&ours(&model), &theirs);
        eprintln!("mixtral: max |Δlogit| = {d:.2e}");
        assert!(d < 1e-4, "mixtral: max |Δlogit| = {d}");
    }

    #[test]
    fn qwen2_moe_export_matches_candle_transformers() {
        // candle's qwen2_moe has no mlp_only_layers, so this checks MoE in every block; both gates.
        for gate in [Gate::Softmax, Gate::SoftmaxTopk] {
            let (cfg, model, tensors) = tiny(|c| {
                c.ffn = FfnKind::Moe;
                c.moe.n_experts = 3;
                c.moe.top_k = if gate == Gate::Softmax { 1 } else { 2 };
                c.moe.gate = gate;
                c.moe.expert_size = 20;
            });
            let arch =
                if gate == Gate::Softmax { Architecture::Qwen2Moe } else { Architecture::Mixtral };
            assert_eq!(architecture(&cfg), Ok(arch));
            let hf = hf_tensors(&cfg, Architecture::Qwen2Moe, &tensors).unwrap();
            let vb = VarBuilder::from_tensors(hf, DType::F32, &Device::Cpu);
            let qc: candle_transformers::models::qwen2_moe::Config =
                serde_json::from_value(config_json(&cfg, Architecture::Qwen2Moe)).unwrap();
            let mut qwen = candle_transformers::models::qwen2_moe::Model::new(&qc, vb).unwrap();
            let theirs = stepwise(|x, i| qwen.forward(x, i).unwrap());
            let d = max_diff(&ours(&model), &theirs);
            eprintln!("qwen2_moe ({gate:?}): max |Δlogit| = {d:.2e}");
            assert!(d < 1e-4, "qwen2_moe ({gate:?}): max |Δlogit| = {d}");
        }
    }

    #[test]
    fn settings_without_a_counterpart_are_named() {
        let (cfg, _, _) = tiny(|c| c.norm = Norm::Layernorm);
        assert!(architecture(&cfg).unwrap_err().contains("model.norm"));
        let (cfg, _, _) = tiny(|c| {
            c.ffn = FfnKind::Mot;
            c.mot.n_experts = 2;
            c.mot.group_size = 1;
        });
        assert!(architecture(&cfg).unwrap_err().contains("transition-tune"));
        let (cfg, _, _) = tiny(|c| {
            c.ffn = FfnKind::Moe;
            c.moe.routing = Routing::ExpertChoice;
            c.moe.group_size = 1;
        });
        assert!(architecture(&cfg).unwrap_err().contains("token choice"));
        let (cfg, _, _) = tiny(|c| {
            c.ffn = FfnKind::Moe;
            c.ffn_layers = crate::config::FfnLayers::Named("second_half".into());
            c.moe.gate = Gate::SoftmaxTopk;
        });
        assert_eq!(architecture(&cfg), Ok(Architecture::Qwen2Moe), "MoE in some blocks only");
    }
}
