//! A Hugging Face `config.json` read as a motrain `ModelConfig`: which architecture it is, and
//! every field that changes the model's math, each either mapped or refused by name. Fields
//! that do not change the math (token ids, `torch_dtype`, `use_cache`, ...) are ignored.

use crate::config::{
    Activation, Bias, FfnKind, FfnLayers, Gate, ModelConfig, MoeConfig, Norm, Position,
    RopeScaling, RouterKind, Routing,
};
use crate::export::Architecture;
use serde_json::Value;

/// What `config.json` says, as motrain's model, plus what a user should know about the mapping.
pub struct HfModel {
    pub architecture: Architecture,
    pub model: ModelConfig,
    /// Facts about the mapping worth a line of output (a context capped at a sliding window).
    pub notes: Vec<String>,
}

const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM";

/// Reads the architecture and the model's shape from a parsed `config.json`; an error names the
/// field and what motrain supports.
pub fn model_config(c: &Value) -> Result<HfModel, String> {
    let cfg = Fields(c);
    let architecture = architecture(c)?;
    let d = cfg.usize("hidden_size")?;
    let n_heads = cfg.usize("num_attention_heads")?;
    let n_kv = cfg.usize_or("num_key_value_heads", n_heads)?;
    if n_heads == 0 || d % n_heads != 0 {
        return Err(format!(
            "`hidden_size` ({d}) must be a multiple of `num_attention_heads` ({n_heads})"
        ));
    }
    if let Some(h) = cfg.opt_usize("head_dim")? {
        if h != d / n_heads {
            return Err(format!("`head_dim` = {h}: motrain's attention has head_dim = hidden_size / num_attention_heads = {}", d / n_heads));
        }
    }
    match c.get("hidden_act").and_then(Value::as_str) {
        None | Some("silu") => {}
        Some(other) => {
            return Err(format!(
                "`hidden_act` = {other:?}: motrain's Llama-family models use \"silu\" (SwiGLU)"
            ))
        }
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if c.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(format!("`{flag}` = true: motrain supports bias on the q, k, v projections only (Qwen2's layout)"));
        }
    }
    let mut notes = Vec::new();
    let mut max_seq_len = cfg.usize("max_position_embeddings")?;
    if max_seq_len == 0 {
        return Err("`max_position_embeddings` = 0: the model takes no tokens".into());
    }
    if let Some(window) = sliding_window(c, architecture)? {
        if window == 0 {
            return Err("`sliding_window` = 0: the model attends to no tokens".into());
        }
        // Within the window, sliding-window attention is full causal attention: capping the
        // context there keeps the model exact.
        if window < max_seq_len {
            notes.push(format!("context capped at the sliding window of {window} tokens (max_position_embeddings is {max_seq_len}): motrain attends to the whole context, which within the window is the same"));
            max_seq_len = window;
        }
    }
    let (rope_theta, rope_scaling) = rope(c)?;
    // Qwen2 always has q/k/v biases; Qwen2-MoE unless `qkv_bias` is false.
    let qkv_bias = c.get("qkv_bias").and_then(Value::as_bool) != Some(false);
    let bias = match architecture {
        Architecture::Qwen2 => Bias::Qkv,
        Architecture::Qwen2Moe if qkv_bias => Bias::Qkv,
        _ => Bias::None,
    };
    let n_layers = cfg.usize("num_hidden_layers")?;
    let mut model = ModelConfig {
        vocab_size: cfg.usize("vocab_size")?,
        d_model: d,
        n_layers,
        n_heads,
        n_kv_heads: (n_kv != n_heads).then_some(n_kv),
        d_ff: cfg.usize("intermediate_size")?,
        norm: Norm::Rmsnorm,
        position: Position::Rope,
        max_seq_len,
        rope_theta,
        rope_scaling,
        norm_eps: cfg.f64_or("rms_norm_eps", 1e-6)?,
        activation: Activation::Swiglu,
        bias,
        tie_embeddings: c.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        final_norm: true,
        ..ModelConfig::default()
    };
    // Dropless token choice with a linear router, as both HF MoE models compute.
    let moe = MoeConfig {
        routing: Routing::TokenChoice,
        router: RouterKind::Linear,
        capacity_factor: 0.0,
        aux_loss_weight: cfg.f64_or("router_aux_loss_coef", 0.001)?,
        z_loss_weight: 0.0,
        ..MoeConfig::default()
    };
    match architecture {
        Architecture::Mixtral => {
            model.ffn = FfnKind::Moe;
            model.moe = MoeConfig {
                n_experts: cfg.usize("num_local_experts")?,
                top_k: cfg.usize("num_experts_per_tok")?,
                expert_size: model.d_ff,
                gate: Gate::SoftmaxTopk,
                ..moe
            };
        }
        Architecture::Qwen2Moe => {
            let n_experts = cfg.usize("num_experts")?;
            let step = cfg.usize_or("decoder_sparse_step", 1)?.max(1);
            let dense: Vec<usize> = match c.get("mlp_only_layers") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|_| "`mlp_only_layers` must be a list of layer indices".to_string())?,
            };
            // Qwen2-MoE's rule for which layers are sparse.
            let sparse: Vec<usize> = (0..n_layers)
                .filter(|i| !dense.contains(i) && n_experts > 0 && (i + 1) % step == 0)
                .collect();
            let norm_topk = c.get("norm_topk_prob").and_then(Value::as_bool).unwrap_or(false);
            model.ffn = FfnKind::Moe;
            model.ffn_layers = if sparse.len() == n_layers {
                FfnLayers::Named("all".into())
            } else {
                FfnLayers::List(sparse)
            };
            model.moe = MoeConfig {
                n_experts,
                top_k: cfg.usize("num_experts_per_tok")?,
                expert_size: cfg.usize("moe_intermediate_size")?,
                shared_expert_size: cfg.usize_or("shared_expert_intermediate_size", 0)?,
                gate: if norm_topk { Gate::SoftmaxTopk } else { Gate::Softmax },
                ..moe
            };
        }
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Pesc => {}
    }
    if model.ffn == FfnKind::Moe && (model.moe.top_k == 0 || model.moe.top_k > model.moe.n_experts)
    {
        return Err(format!(
            "`num_experts_per_tok` ({}) must be between 1 and the number of experts ({})",
            model.moe.top_k, model.moe.n_experts
        ));
    }
    Ok(HfModel { architecture, model, notes })
}

fn architecture(c: &Value) -> Result<Architecture, String> {
    let class = c
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let by_type = |t: &str| match t {
        "llama" => Some(Architecture::Llama),
        "mistral" => Some(Architecture::Mistral),
        "qwen2" => Some(Architecture::Qwen2),
        "mixtral" => Some(Architecture::Mixtral),
        "qwen2_moe" => Some(Architecture::Qwen2Moe),
        _ => None,
    };
    match class {
        Some(class) => Architecture::from_class(class).ok_or_else(|| {
            format!("`architectures` = [{class:?}] is not supported (supported: {SUPPORTED})")
        }),
        None => match c.get("model_type").and_then(Value::as_str) {
            Some(t) => by_type(t).ok_or_else(|| {
                format!("`model_type` = {t:?} is not supported (supported: llama, mistral, qwen2, mixtral, qwen2_moe)")
            }),
            None => Err(format!("neither `architectures` nor `model_type` is given (supported: {SUPPORTED})")),
        },
    }
}

/// The sliding window, where the model uses one.
fn sliding_window(c: &Value, arch: Architecture) -> Result<Option<usize>, String> {
    let window = || Fields(c).opt_usize("sliding_window");
    match arch {
        Architecture::Mistral | Architecture::Mixtral => window(),
        Architecture::Qwen2 | Architecture::Qwen2Moe => {
            if c.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
                window()
            } else {
                Ok(None)
            }
        }
        Architecture::Llama | Architecture::Pesc => Ok(None),
    }
}

/// `rope_theta` and `rope_scaling`, from the top level (transformers 4) or `rope_parameters`
/// (transformers 5).
fn rope(c: &Value) -> Result<(f64, Option<RopeScaling>), String> {
    let params = c.get("rope_parameters").filter(|v| v.is_object());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| c.get("rope_theta"))
        .map(|v| v.as_f64().ok_or("`rope_theta` must be a number"))
        .transpose()?
        .unwrap_or(10000.0);
    let scaling = match c.get("rope_scaling").filter(|v| !v.is_null()).or(params) {
        None => None,
        Some(s) => {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str);
            match kind {
                None | Some("default") => None,
                Some("linear" | "llama3") => {
                    let mut s = s.clone();
                    if let Some(obj) = s.as_object_mut() {
                        // Keep the keys `RopeScaling` has; HF adds others (`rope_theta` in
                        // rope_parameters, `type` beside `rope_type`).
                        let kind = kind.map(str::to_string);
                        obj.retain(|k, _| {
                            matches!(
                                k.as_str(),
                                "factor" | "low_freq_factor" | "high_freq_factor" | "original_max_position_embeddings"
                            )
                        });
                        obj.insert("rope_type".into(), Value::from(kind));
                    }
                    let s = serde_json::from_value::<RopeScaling>(s).map_err(|e| {
                        format!("`rope_scaling`: {e} (linear needs `factor`; llama3 needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)")
                    })?;
                    s.validate().map_err(|m| format!("`rope_scaling`: {m}"))?;
                    Some(s)
                }
                Some(other) => {
                    return Err(format!(
                        "`rope_scaling.rope_type` = {other:?} is not supported (supported: none, \"linear\", \"llama3\")"
                    ))
                }
            }
        }
    };
    Ok((theta, scaling))
}

/// Typed reads of `config.json` fields that name the field when it is missing or mistyped.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| format!("`{key}` must be a non-negative integer, got {v}")),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, String> {
        self.opt_usize(key)?.ok_or_else(|| format!("`{key}` is missing"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, String> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| format!("`{key}` must be a number, got {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 96, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": false})
    }

    #[test]
    fn a_llama_config_maps_to_the_model_it_describes() {
        let m = model_config(&llama()).unwrap();
        assert_eq!(m.architecture, Architecture::Llama);
        let c = m.model;
        assert_eq!((c.d_model, c.d_ff, c.n_layers, c.n_heads, c.kv_heads()), (32, 64, 2, 4, 2));
        assert_eq!((c.vocab_size, c.max_seq_len, c.rope_theta), (96, 64, 500000.0));
        assert_eq!((c.bias, c.ffn, c.norm_eps), (Bias::None, FfnKind::Dense, 1e-5));
    }

    #[test]
    fn unsupported_fields_are_named() {
        let with = |k: &str, v: Value| {
            let mut c = llama();
            c[k] = v;
            model_config(&c).err().unwrap_or_default()
        };
        for (key, value, needle) in [
            ("architectures", json!(["GPT2LMHeadModel"]), "`architectures`"),
            ("hidden_act", json!("gelu"), "`hidden_act`"),
            ("attention_bias", json!(true), "`attention_bias`"),
            ("head_dim", json!(16), "`head_dim`"),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "rope_type"),
            ("rope_scaling", json!({"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
            ("hidden_size", json!("big"), "`hidden_size`"),
            ("num_attention_heads", json!(5), "multiple"),
            ("max_position_embeddings", json!(0), "`max_position_embeddings` = 0"),
        ] {
            let e = with(key, value);
            assert!(e.contains(needle), "{key}: {e}");
        }
        let mut c = llama();
        c.as_object_mut().unwrap().remove("vocab_size");
        assert!(model_config(&c).err().unwrap().contains("`vocab_size` is missing"));
    }

    #[test]
    fn a_sliding_window_caps_the_context_and_rope_parameters_are_read() {
        let mut c = llama();
        c["architectures"] = json!(["MistralForCausalLM"]);
        c["sliding_window"] = json!(16);
        let m = model_config(&c).unwrap();
        assert_eq!(m.model.max_seq_len, 16);
        assert!(m.notes[0].contains("sliding window"));
        c["sliding_window"] = json!(0);
        assert!(model_config(&c).err().unwrap().contains("`sliding_window` = 0"));
        let mut c = llama();
        c.as_object_mut().unwrap().remove("rope_theta");
        c["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6});
        let m = model_config(&c).unwrap().model;
        assert_eq!(m.rope_theta, 1e6);
        assert_eq!(m.rope_scaling.unwrap().factor, 2.0);
    }
}
