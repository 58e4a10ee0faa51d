//! What a model costs, from its config alone: training FLOPs per token (the figure `bench`
//! reports as GFLOP/s), and the least memory a training step can hold. Parameter counts come
//! from the built model (`Params::count`).

use crate::config::{Activation, FfnKind, ModelConfig};

/// Training FLOPs per token (PaLM's count): `6·N` for the non-embedding weights a token passes
/// through, plus `12·L·d·S` for attention scores and mixing. A MoE token passes through its
/// `top_k` experts and the router; a MoT token through `E/G` experts' worth of weights (one
/// mixed token per group and expert) and the controller, merge and emit (`3·d·E`).
pub fn flops_per_token(cfg: &ModelConfig, seq_len: usize) -> f64 {
    let (d, l, v) = (cfg.d_model as f64, cfg.n_layers as f64, cfg.vocab_size as f64);
    let ffn_mats = if cfg.activation == Activation::Swiglu { 3.0 } else { 2.0 };
    let dense_ffn = ffn_mats * d * cfg.d_ff as f64;
    let sparse_ffn = match cfg.ffn {
        FfnKind::Moe => {
            let f = cfg.moe.expert_width(cfg.d_ff) as f64;
            let shared = cfg.moe.shared_expert_size as f64;
            let shared = if shared > 0.0 { ffn_mats * d * shared + d } else { 0.0 };
            ffn_mats * d * f * cfg.moe.top_k as f64 + d * cfg.moe.n_experts as f64 + shared
        }
        FfnKind::Mot => {
            let (e, g) = (cfg.mot.n_experts as f64, cfg.mot.group_size as f64);
            ffn_mats * d * cfg.mot.expert_width(cfg.d_ff) as f64 * e / g + 3.0 * d * e
        }
        // The dense FFN, the router, and top_k adapters of two matrices each.
        FfnKind::Pesc => {
            dense_ffn
                + d * cfg.pesc.n_experts as f64
                + 2.0 * d * (cfg.pesc.adapter_dim * cfg.pesc.top_k) as f64
        }
        _ => dense_ffn,
    };
    let mask = cfg.ffn_layer_mask().unwrap_or_default();
    let ffn: f64 = mask.iter().map(|&sparse| if sparse { sparse_ffn } else { dense_ffn }).sum();
    // q and o are d×d; k and v d × (KVH · head width).
    let kv = (cfg.kv_heads() * (cfg.d_model / cfg.n_heads)) as f64;
    6.0 * (l * (2.0 * d * d + 2.0 * d * kv) + ffn + v * d) + 12.0 * l * d * seq_len as f64
}

/// Bytes a training step on the CPU holds at the very least, for `tokens` tokens a micro-batch
/// and `params` parameters of which `trainable` train: the `[tokens, V]` logits of the loss,
/// each layer's input, queries, keys and values that its backward reads, and the f32 weights
/// with the gradients and AdamW moments of the trainable ones. A floor, not an estimate (a
/// step holds ~3× it): a run above it cannot fit, one below it may still not.
pub fn step_memory_floor(cfg: &ModelConfig, tokens: usize, params: usize, trainable: usize) -> u64 {
    let kv = (cfg.kv_heads() * (cfg.d_model / cfg.n_heads)) as u64;
    let per_token = cfg.vocab_size as u64 + cfg.n_layers as u64 * (2 * cfg.d_model as u64 + 2 * kv);
    let f32s = (tokens as u64)
        .saturating_mul(per_token)
        .saturating_add(params as u64)
        .saturating_add(3 * trainable as u64);
    f32s.saturating_mul(4)
}
