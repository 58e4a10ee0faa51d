//! Routing for sparse layers (`models.md`): the router's scores (linear or X-MoE), the rules
//! (token or expert choice, top-k, gate, capacity) and the assignment of tokens to experts,
//! and `Routed`, which runs the experts on their tokens and combines the results. MoE and PESC
//! layers both route through `route`; they differ only in what their experts are.
//! Routing decisions are made on the host from the probabilities; everything that carries a
//! gradient (router scores, gates) stays in the graph.

use super::context::FfnContext;
use super::params::Params;
use super::stats::{LayerStats, RoutingStats};
use crate::config::{Gate, MoeConfig, PescConfig, RouterKind, Routing};
use crate::ops::logits::logits;
use crate::ops::routing::{combine, gather, logsumexp, softmax, Slots};
use candle_core::{DType, Result, Tensor, D};
use std::sync::Arc;

/// Scores of every token for every expert, `[N, E]`, in f32.
pub enum Router {
    /// `z = x·Rᵀ`.
    Linear { w: Tensor },
    /// `s_e = ⟨P·x/‖P·x‖, e_e/‖e_e‖⟩ / τ`, τ = max(exp(log τ), 1e-4) (arXiv 2204.09179).
    Xmoe { proj: Tensor, embeddings: Tensor, log_temperature: Tensor },
}

impl Router {
    /// The router a MoE config asks for, over `d`-wide tokens.
    pub fn new(p: &mut Params, prefix: &str, cfg: &MoeConfig, d: usize) -> Result<Router> {
        match cfg.router {
            RouterKind::Linear => Router::linear(p, prefix, cfg.n_experts, d),
            RouterKind::Xmoe => Ok(Router::Xmoe {
                proj: p.matrix(&format!("{prefix}.proj.weight"), &[cfg.xmoe_dim, d])?,
                embeddings: p.orthogonal(
                    &format!("{prefix}.expert_embeddings"),
                    cfg.n_experts,
                    cfg.xmoe_dim,
                )?,
                log_temperature: p.constant(
                    &format!("{prefix}.log_temperature"),
                    &[],
                    cfg.xmoe_temperature.ln() as f32,
                )?,
            }),
        }
    }

    /// A linear router `[E, d]`.
    pub fn linear(p: &mut Params, prefix: &str, e: usize, d: usize) -> Result<Router> {
        Ok(Router::Linear { w: p.matrix(&format!("{prefix}.weight"), &[e, d])? })
    }

    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let x = if matches!(x.dtype(), DType::BF16 | DType::F16) {
            x.to_dtype(DType::F32)?
        } else {
            x.clone()
        };
        match self {
            Router::Linear { w } => logits(&x, &w.to_dtype(x.dtype())?),
            Router::Xmoe { proj, embeddings, log_temperature } => {
                let h = l2_normalize(&logits(&x, proj)?)?; // [N, r]
                let e = l2_normalize(embeddings)?; // [E, r]
                let tau = log_temperature.exp()?.maximum(1e-4)?;
                logits(&h, &e)?.broadcast_div(&tau)
            }
        }
    }
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?)
}

/// How tokens are routed, whatever the layer's experts are: the one value that MoE layers
/// (from `[model.moe]`) and PESC layers (from `[model.pesc]`) route by.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingRules {
    pub routing: Routing,
    pub n_experts: usize,
    /// Experts per token (token choice).
    pub top_k: usize,
    pub gate: Gate,
    /// Slots per expert relative to an even share; 0 = dropless (token choice, training only).
    pub capacity_factor: f64,
    /// Expert choice: experts choose among this many sequences at one position.
    pub group_size: usize,
}

impl RoutingRules {
    pub fn moe(cfg: &MoeConfig) -> RoutingRules {
        RoutingRules {
            routing: cfg.routing,
            n_experts: cfg.n_experts,
            top_k: cfg.top_k,
            gate: cfg.gate,
            capacity_factor: cfg.capacity_factor,
            group_size: cfg.group_size,
        }
    }

    /// PESC routes as a dropless top-k token-choice MoE with the Mixtral gate (softmax over
    /// the chosen logits).
    pub fn pesc(cfg: &PescConfig) -> RoutingRules {
        RoutingRules {
            routing: Routing::TokenChoice,
            n_experts: cfg.n_experts,
            top_k: cfg.top_k,
            gate: Gate::SoftmaxTopk,
            capacity_factor: 0.0,
            group_size: 1,
        }
    }
}

/// Which tokens each expert processes, decided on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// For each expert, its tokens in slot order.
    pub per_expert: Vec<Vec<u32>>,
    /// For each token, the experts it chose (before dropping), best first; empty for expert choice.
    pub chosen: Vec<Vec<usize>>,
    /// Choices that found no slot (token choice), or tokens no expert took (expert choice).
    pub dropped: usize,
}

/// The `k` largest entries of a row, ties to the lower index. Insertion into the k kept so far:
/// a row is a few experts, and token choice by sorting every row's indices took ~0.45 ms a
/// layer of 4,096 tokens.
fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, v) in row.iter().enumerate() {
        // After every kept entry at least as large: an equal one keeps its lower index first.
        let at = best.iter().position(|&j| v.total_cmp(&row[j]).is_gt()).unwrap_or(best.len());
        if at < k {
            best.insert(at, i);
            best.truncate(k);
        }
    }
    best
}

/// Token choice: each token picks its top-k experts; with a capacity, slots are granted
/// rank-major (every token's first choice in token order, then every second choice, ...).
pub fn assign_token_choice(
    probs: &[f32], e: usize, k: usize, capacity: Option<usize>,
) -> Assignment {
    let n = probs.len() / e;
    let chosen: Vec<Vec<usize>> = probs.chunks(e).map(|row| top_k(row, k)).collect();
    let mut per_expert = vec![Vec::new(); e];
    let mut dropped = 0;
    for rank in 0..k {
        for (t, c) in chosen.iter().enumerate() {
            let ex = c[rank];
            if capacity.is_none_or(|cap| per_expert[ex].len() < cap) {
                per_expert[ex].push(t as u32);
            } else {
                dropped += 1;
            }
        }
    }
    debug_assert_eq!(per_expert.iter().map(Vec::len).sum::<usize>() + dropped, n * k);
    Assignment { per_expert, chosen, dropped }
}

/// Expert choice: in each group (the rows `[jG, (j+1)G)` at one position), every expert takes
/// the `capacity` tokens with the highest probability for it.
pub fn assign_expert_choice(
    probs: &[f32], e: usize, rows: usize, seq: usize, group: usize, capacity: usize,
) -> Assignment {
    let mut per_expert = vec![Vec::new(); e];
    let mut taken = vec![false; rows * seq];
    let cap = capacity.min(group);
    for g in 0..rows / group {
        for s in 0..seq {
            let tokens: Vec<usize> = (0..group).map(|j| (g * group + j) * seq + s).collect();
            for (ex, list) in per_expert.iter_mut().enumerate() {
                let col: Vec<f32> = tokens.iter().map(|&t| probs[t * e + ex]).collect();
                for j in top_k(&col, cap) {
                    list.push(tokens[j] as u32);
                    taken[tokens[j]] = true;
                }
            }
        }
    }
    let dropped = taken.iter().filter(|&&t| !t).count();
    Assignment { per_expert, chosen: Vec::new(), dropped }
}

/// One forward call's routing: the slots (token, expert) that run, expert by expert, and the
/// gate of each. The MoE and PESC layers both route this way and differ in what the experts are.
pub struct Routed {
    /// The token of every slot, with expert `e`'s slots at `[offsets[e], offsets[e+1])`; None
    /// when no slot runs.
    slots: Option<Arc<Slots>>,
    offsets: Vec<usize>,
    /// `[R, 1]`, in the graph: the router learns through it.
    gates: Option<Tensor>,
}

impl Routed {
    /// `out_i = Σ_{slots (i, e)} gate · expert_e(input_i)`, `[N, d]`: each expert runs once on
    /// the rows gathered for it (`experts(rows [R, d], offsets)`), the results scatter back, and
    /// tokens without a slot get zeros.
    pub fn combine(
        &self, input: &Tensor, experts: impl Fn(&Tensor, &[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (Some(slots), Some(gates)) = (&self.slots, &self.gates) else {
            return input.zeros_like();
        };
        let rows = gather(input, slots)?; // [R, d]
        combine(&experts(&rows, &self.offsets)?, gates, slots)
    }
}

/// Routes the tokens `x [N, d]` by `rules` (token or expert choice, top-k, gate, capacity):
/// the decisions are made on the host from the router's probabilities, the gates stay in the
/// graph. Records the layer's aux and z losses (token choice) and statistics in `ctx`.
pub fn route(
    router: &Router, rules: &RoutingRules, layer: usize, x: &Tensor, ctx: &mut FfnContext,
) -> Result<Routed> {
    let n = x.dim(0)?;
    let e = rules.n_experts;
    let z = router.scores(x)?; // [N, E]
    let p = softmax(&z)?;
    let p_host: Vec<f32> = p.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (assignment, slots) = match rules.routing {
        Routing::TokenChoice => {
            let k = rules.top_k;
            let cf = rules.capacity_factor;
            let cap = (ctx.train && cf > 0.0)
                .then(|| ((cf * (n * k) as f64 / e as f64).floor() as usize).max(1));
            (assign_token_choice(&p_host, e, k, cap), n * k)
        }
        Routing::ExpertChoice => {
            let g = rules.group_size;
            if !ctx.rows.is_multiple_of(g) {
                candle_core::bail!("expert choice needs a batch that is a multiple of group_size {g}, got {} sequences", ctx.rows);
            }
            let cap = ((rules.capacity_factor * g as f64 / e as f64).floor() as usize).max(1);
            (assign_expert_choice(&p_host, e, ctx.rows, ctx.seq, g, cap), n)
        }
    };
    // Gate of every routed (token, expert) slot: p, renormalised over the chosen k for
    // softmax_topk (which is the softmax over the chosen logits).
    let probs = match (rules.routing, rules.gate) {
        (Routing::TokenChoice, Gate::SoftmaxTopk) => {
            let mut mask = vec![0f32; n * e];
            for (t, c) in assignment.chosen.iter().enumerate() {
                for &ex in c {
                    mask[t * e + ex] = 1.0;
                }
            }
            let mask = Tensor::from_vec(mask, (n, e), x.device())?.to_dtype(p.dtype())?;
            p.broadcast_div(&(&p * &mask)?.sum_keepdim(1)?)?
        }
        _ => p.clone(),
    };
    let routed: Vec<u32> = assignment.per_expert.concat();
    let mut offsets = vec![0];
    let mut flat_gate = Vec::with_capacity(routed.len()); // index into probs [N·E]
    for (ex, tokens) in assignment.per_expert.iter().enumerate() {
        offsets.push(offsets[ex] + tokens.len());
        flat_gate.extend(tokens.iter().map(|&t| t * e as u32 + ex as u32));
    }
    let (routed, gates) = if routed.is_empty() {
        (None, None)
    } else {
        let r = routed.len();
        let gidx = Tensor::from_vec(flat_gate, r, x.device())?;
        let gates =
            probs.flatten_all()?.index_select(&gidx, 0)?.unsqueeze(1)?.to_dtype(x.dtype())?;
        (Some(Arc::new(Slots::new(routed, n))), Some(gates))
    };
    record(rules, layer, x, (&z, &p, &p_host), &assignment, slots, ctx)?;
    Ok(Routed { slots: routed, offsets, gates })
}

/// Aux and z losses into the context (token choice only), and the layer's statistics where
/// the context records them.
#[allow(clippy::too_many_arguments)]
fn record(
    rules: &RoutingRules, layer: usize, x: &Tensor, (z, p, p_host): (&Tensor, &Tensor, &[f32]),
    a: &Assignment, slots: usize, ctx: &mut FfnContext,
) -> Result<()> {
    let (n, e) = p.dims2()?;
    let (mut aux_value, mut z_value) = (0.0, 0.0);
    if rules.routing == Routing::TokenChoice {
        // Switch: E · Σ_e frac_e · mean_p_e, frac_e counted before dropping.
        let mut frac = vec![0f64; e];
        for c in &a.chosen {
            for &ex in c {
                frac[ex] += 1.0 / n as f64;
            }
        }
        let frac = Tensor::from_vec(frac, e, p.device())?.to_dtype(p.dtype())?;
        let aux = ((p.mean(0)? * frac)?.sum_all()? * e as f64)?;
        let zl = logsumexp(z)?.sqr()?.mean_all()?;
        if ctx.record_stats {
            aux_value = aux.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            z_value = zl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        ctx.aux_losses.push(aux);
        ctx.z_losses.push(zl);
    }
    if !ctx.record_stats {
        return Ok(());
    }
    let z_host: Vec<f32> = z.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let entropy = mean_entropy(p_host, &z_host, e);
    let load = a.per_expert.iter().map(|t| t.len() as f64 / slots.max(1) as f64).collect();
    let denom = if rules.routing == Routing::TokenChoice { slots } else { n };
    ctx.stats.push(LayerStats::Moe(RoutingStats {
        layer,
        load,
        dropped: a.dropped as f64 / denom.max(1) as f64,
        entropy,
        aux_loss: aux_value,
        z_loss: z_value,
        // A diagnostic for eval (representation collapse), not worth its cost every step.
        token_cosine: if ctx.train { 0.0 } else { mean_pairwise_cosine(x)? },
    }));
    Ok(())
}

/// Mean over rows of the entropy of `p = softmax(z)` (`[N, E]` each), in nats. With `m` a
/// row's largest logit, `p_max = exp(m − lse)`, so `−Σ p ln p = lse − Σ p z = m − ln p_max − Σ p
/// z`: one logarithm a row instead of one a probability (4,096 tokens × 8 experts: 0.11–0.13 →
/// 0.06–0.07 ms, the loops alone), and no second copy of the probabilities in f64.
fn mean_entropy(p: &[f32], z: &[f32], e: usize) -> f64 {
    let e = e.max(1);
    let rows = p.chunks(e).zip(z.chunks(e));
    let total: f64 = rows
        .map(|(p, z)| {
            let (m, p_max, pz) = p.iter().zip(z).fold(
                (f64::NEG_INFINITY, 0f64, 0f64),
                |(m, p_max, pz), (&p, &z)| {
                    (m.max(z as f64), p_max.max(p as f64), pz + p as f64 * z as f64)
                },
            );
            m - p_max.ln() - pz
        })
        .sum();
    total / (p.len() / e).max(1) as f64
}

/// Mean cosine similarity over all pairs of distinct rows: `(‖Σ x̂‖² − N) / (N(N − 1))`.
pub fn mean_pairwise_cosine(x: &Tensor) -> Result<f64> {
    let n = x.dim(0)?;
    if n < 2 {
        return Ok(0.0);
    }
    let xh = l2_normalize(&x.detach().to_dtype(DType::F64)?)?;
    let s = xh.sum(0)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((s - n as f64) / (n as f64 * (n as f64 - 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entropy from the logits against its definition, `−Σ p ln p`, row by row.
    #[test]
    fn entropy_matches_its_definition() {
        let (n, e) = (64, 8);
        for scale in [0.1f32, 3.0, 40.0] {
            let z: Vec<f32> =
                (0..n * e).map(|i| ((i * 7919) % 101) as f32 / 50.0 * scale).collect();
            let p: Vec<f32> = z
                .chunks(e)
                .flat_map(|r| {
                    let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let ex: Vec<f64> = r.iter().map(|&v| ((v - m) as f64).exp()).collect();
                    let s: f64 = ex.iter().sum();
                    ex.into_iter().map(move |v| (v / s) as f32)
                })
                .collect();
            let want = p
                .chunks(e)
                .map(|r| {
                    -r.iter()
                        .filter(|&&v| v > 0.0)
                        .map(|&v| v as f64 * (v as f64).ln())
                        .sum::<f64>()
                })
                .sum::<f64>()
                / n as f64;
            let got = mean_entropy(&p, &z, e);
            assert!(
                (got - want).abs() < 1e-5 * (1.0 + scale as f64),
                "scale {scale}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn top_k_breaks_ties_to_the_lower_index() {
        assert_eq!(top_k(&[0.2, 0.4, 0.4, 0.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.25; 4], 3), vec![0, 1, 2]);
    }

    /// Against sorting every index (largest first, ties to the lower index), for every k, on
    /// rows with repeated values.
    #[test]
    fn top_k_matches_a_full_sort() {
        let mut rng = crate::rng::seeded(3);
        for _ in 0..200 {
            let row: Vec<f32> =
                (0..9).map(|_| (crate::rng::normal_f32(&mut rng) * 2.0).round()).collect();
            let mut sorted: Vec<usize> = (0..row.len()).collect();
            sorted.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for k in 0..=row.len() {
                assert_eq!(top_k(&row, k), sorted[..k], "{row:?}, k {k}");
            }
        }
    }

    #[test]
    fn capacity_grants_slots_rank_major() {
        // 4 tokens, 3 experts, top-2, capacity 2.
        #[rustfmt::skip]
        let p = [
            0.6, 0.3, 0.1, // t0: 0, 1
            0.5, 0.4, 0.1, // t1: 0, 1
            0.7, 0.1, 0.2, // t2: 0 (dropped: full), 2
            0.1, 0.6, 0.3, // t3: 1, 2
        ];
        let a = assign_token_choice(&p, 3, 2, Some(2));
        assert_eq!(a.per_expert, vec![vec![0, 1], vec![3, 0], vec![2, 3]]);
        // Dropped: t2's first choice (expert 0 full) and t1's second (expert 1 full).
        assert_eq!(a.dropped, 2);
        let dropless = assign_token_choice(&p, 3, 2, None);
        assert_eq!(dropless.dropped, 0);
        assert_eq!(dropless, assign_token_choice(&p, 3, 2, Some(1000)));
    }

    #[test]
    fn expert_choice_takes_the_top_tokens_of_each_group() {
        // 2 rows × 1 position, group of 2, 2 experts, capacity 1.
        let p = [0.9, 0.1, 0.8, 0.2];
        let a = assign_expert_choice(&p, 2, 2, 1, 2, 1);
        assert_eq!(a.per_expert, vec![vec![0], vec![1]]);
        assert_eq!(a.dropped, 0);
    }
}
