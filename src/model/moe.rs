//! Sparse Mixture of Experts (`models.md`): the shared pieces — stacked `Experts`, the `Router`
//! (linear or X-MoE) and the routing itself (`route` → `Routed`, which PESC uses too) — and the
//! MoE layer with token-choice or expert-choice routing.
//! Routing decisions (top-k, capacity, groups) are made on the host from the probabilities;
//! everything that carries a gradient (router scores, gates, experts) stays in the graph.
//! Compute scales with the routed tokens: each expert runs on the rows gathered for it.

use super::ffn::activate;
use super::params::Params;
use super::routing::{FfnContext, LayerStats, RoutingStats};
use crate::config::{Activation, Gate, MoeConfig, RouterKind, Routing};
use crate::ops::fused;
use crate::ops::grouped::{grouped_matmul, grouped_matmul_cat, grouped_up};
use crate::ops::swiglu::swiglu;
use candle_core::{DType, Result, Tensor, D};

/// E experts of width f with stacked weights `[E, f, d]` (gate, up) and `[E, d, f]` (down).
pub struct Experts {
    gate: Option<Tensor>,
    up: Tensor,
    down: Tensor,
    activation: Activation,
}

impl Experts {
    pub fn new(p: &mut Params, prefix: &str, e: usize, d: usize, f: usize, activation: Activation) -> Result<Experts> {
        let gate = match activation {
            Activation::Swiglu => Some(p.matrix(&format!("{prefix}.gate"), &[e, f, d])?),
            _ => None,
        };
        Ok(Experts { gate, up: p.matrix(&format!("{prefix}.up"), &[e, f, d])?, down: p.matrix(&format!("{prefix}.down"), &[e, d, f])?, activation })
    }

    pub fn count(&self) -> usize {
        self.up.dims()[0]
    }

    /// Every expert on its rows: `x [R, d]` holds expert `e`'s rows at
    /// `[offsets[e], offsets[e+1])`; → `[R, d]`. With `recompute` (on CPU) the hidden
    /// activations are not kept for backward but computed again there.
    pub fn forward(&self, x: &Tensor, offsets: &[usize], recompute: bool) -> Result<Tensor> {
        let hidden = match &self.gate {
            _ if recompute && fused(&[x, &self.up]) => grouped_up(x, self.gate.as_ref(), &self.up, self.activation, offsets)?,
            Some(gate) => swiglu(&grouped_matmul_cat(x, gate, &self.up, offsets)?)?, // [R, 2f] → [R, f]
            None => activate(self.activation, &grouped_matmul(x, &self.up, offsets)?)?,
        };
        grouped_matmul(&hidden, &self.down, offsets)
    }
}

/// Scores of every token for every expert, `[N, E]`, in f32.
pub enum Router {
    /// `z = x·Rᵀ`.
    Linear { w: Tensor },
    /// `s_e = ⟨P·x/‖P·x‖, e_e/‖e_e‖⟩ / τ`, τ = max(exp(log τ), 1e-4) (arXiv 2204.09179).
    Xmoe { proj: Tensor, embeddings: Tensor, log_temperature: Tensor },
}

impl Router {
    pub fn new(p: &mut Params, prefix: &str, cfg: &MoeConfig, d: usize) -> Result<Router> {
        let e = cfg.n_experts;
        Ok(match cfg.router {
            RouterKind::Linear => Router::Linear { w: p.matrix(&format!("{prefix}.weight"), &[e, d])? },
            RouterKind::Xmoe => Router::Xmoe {
                proj: p.matrix(&format!("{prefix}.proj.weight"), &[cfg.xmoe_dim, d])?,
                embeddings: p.orthogonal(&format!("{prefix}.expert_embeddings"), e, cfg.xmoe_dim)?,
                log_temperature: p.constant(&format!("{prefix}.log_temperature"), &[], cfg.xmoe_temperature.ln() as f32)?,
            },
        })
    }

    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let x = if matches!(x.dtype(), DType::BF16 | DType::F16) { x.to_dtype(DType::F32)? } else { x.clone() };
        match self {
            Router::Linear { w } => x.matmul(&w.to_dtype(x.dtype())?.t()?),
            Router::Xmoe { proj, embeddings, log_temperature } => {
                let h = l2_normalize(&x.matmul(&proj.t()?)?)?; // [N, r]
                let e = l2_normalize(embeddings)?; // [E, r]
                let tau = log_temperature.exp()?.maximum(1e-4)?;
                h.matmul(&e.t()?)?.broadcast_div(&tau)
            }
        }
    }
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?)
}

/// Softmax over the last axis, in differentiable candle ops.
pub fn softmax(z: &Tensor) -> Result<Tensor> {
    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log Σ exp(z)` over the last axis.
pub fn logsumexp(z: &Tensor) -> Result<Tensor> {
    let m = z.max_keepdim(D::Minus1)?;
    (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(D::Minus1)
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

/// The `k` largest entries of a row, ties to the lower index.
fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Token choice: each token picks its top-k experts; with a capacity, slots are granted
/// rank-major (every token's first choice in token order, then every second choice, ...).
pub fn assign_token_choice(probs: &[f32], e: usize, k: usize, capacity: Option<usize>) -> Assignment {
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
pub fn assign_expert_choice(probs: &[f32], e: usize, rows: usize, seq: usize, group: usize, capacity: usize) -> Assignment {
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
    /// The token of every slot, `[R]`, with expert `e`'s slots at `[offsets[e], offsets[e+1])`;
    /// None when no slot runs.
    tokens: Option<Tensor>,
    offsets: Vec<usize>,
    /// `[R, 1]`, in the graph: the router learns through it.
    gates: Option<Tensor>,
}

impl Routed {
    /// `out_i = Σ_{slots (i, e)} gate · expert_e(input_i)`, `[N, d]`: each expert runs once on
    /// the rows gathered for it (`experts(rows [R, d], offsets)`), the results scatter back, and
    /// tokens without a slot get zeros.
    pub fn combine(&self, input: &Tensor, experts: impl Fn(&Tensor, &[usize]) -> Result<Tensor>) -> Result<Tensor> {
        let out = input.zeros_like()?;
        let (Some(tokens), Some(gates)) = (&self.tokens, &self.gates) else { return Ok(out) };
        let rows = input.index_select(tokens, 0)?; // [R, d]
        let y = experts(&rows, &self.offsets)?.broadcast_mul(gates)?;
        out.index_add(tokens, &y, 0)
    }
}

/// Routes the tokens `x [N, d]` by `rules` (token or expert choice, top-k, gate, capacity):
/// the decisions are made on the host from the router's probabilities, the gates stay in the
/// graph. Records the layer's aux and z losses (token choice) and statistics in `ctx`.
pub fn route(router: &Router, rules: &MoeConfig, layer: usize, x: &Tensor, ctx: &mut FfnContext) -> Result<Routed> {
    let n = x.dim(0)?;
    let e = rules.n_experts;
    let z = router.scores(x)?; // [N, E]
    let p = softmax(&z)?;
    let p_host: Vec<f32> = p.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (assignment, slots) = match rules.routing {
        Routing::TokenChoice => {
            let k = rules.top_k;
            let cf = rules.capacity_factor;
            let cap = (ctx.train && cf > 0.0).then(|| ((cf * (n * k) as f64 / e as f64).floor() as usize).max(1));
            (assign_token_choice(&p_host, e, k, cap), n * k)
        }
        Routing::ExpertChoice => {
            let g = rules.group_size;
            if ctx.rows % g != 0 {
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
    let (tokens, gates) = if routed.is_empty() {
        (None, None)
    } else {
        let r = routed.len();
        let gidx = Tensor::from_vec(flat_gate, r, x.device())?;
        let gates = probs.flatten_all()?.index_select(&gidx, 0)?.unsqueeze(1)?.to_dtype(x.dtype())?;
        (Some(Tensor::from_vec(routed, r, x.device())?), Some(gates))
    };
    record(rules, layer, x, &z, &p, &assignment, slots, ctx)?;
    Ok(Routed { tokens, offsets, gates })
}

/// Aux and z losses into the context (token choice only), and the layer's statistics.
#[allow(clippy::too_many_arguments)]
fn record(rules: &MoeConfig, layer: usize, x: &Tensor, z: &Tensor, p: &Tensor, a: &Assignment, slots: usize, ctx: &mut FfnContext) -> Result<()> {
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
        aux_value = aux.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        z_value = zl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        ctx.aux_losses.push(aux);
        ctx.z_losses.push(zl);
    }
    let p_host: Vec<f64> = p.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let entropy = p_host.chunks(e).map(|r| -r.iter().filter(|&&v| v > 0.0).map(|v| v * v.ln()).sum::<f64>()).sum::<f64>() / n as f64;
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

pub struct MoeLayer {
    pub index: usize,
    pub router: Router,
    pub experts: Experts,
    cfg: MoeConfig,
}

impl MoeLayer {
    pub fn new(p: &mut Params, prefix: &str, index: usize, cfg: &MoeConfig, d: usize, f: usize, activation: Activation) -> Result<MoeLayer> {
        Ok(MoeLayer {
            index,
            router: Router::new(p, &format!("{prefix}.router"), cfg, d)?,
            experts: Experts::new(p, &format!("{prefix}.experts"), cfg.n_experts, d, f, activation)?,
            cfg: cfg.clone(),
        })
    }

    /// `x [N, d]` → `[N, d]`; tokens no expert processes contribute nothing (the residual
    /// carries them).
    pub fn forward(&self, x: &Tensor, ctx: &mut FfnContext) -> Result<Tensor> {
        let routed = route(&self.router, &self.cfg, self.index, x, ctx)?;
        routed.combine(x, |rows, offsets| self.experts.forward(rows, offsets, ctx.recompute))
    }
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
    use crate::ops::testing::{central_difference, randn};
    use candle_core::{Device, Var};

    fn moe_stats(ctx: &FfnContext) -> &RoutingStats {
        match &ctx.stats[0] {
            LayerStats::Moe(s) => s,
            LayerStats::Mot(_) => panic!("expected MoE statistics"),
        }
    }

    fn f64_var(shape: &[usize], seed: u64, scale: f64) -> Var {
        Var::from_tensor(&(randn(shape, seed).to_dtype(DType::F64).unwrap() * scale).unwrap()).unwrap()
    }

    /// A layer over f64 variables, so finite differences are exact enough to check every
    /// parameter's gradient, routing included.
    fn layer(cfg: &MoeConfig, d: usize, f: usize) -> (MoeLayer, Vec<Var>) {
        let e = cfg.n_experts;
        let (gate, up, down) = (f64_var(&[e, f, d], 1, 0.3), f64_var(&[e, f, d], 2, 0.3), f64_var(&[e, d, f], 3, 0.3));
        let mut vars = vec![gate.clone(), up.clone(), down.clone()];
        let router = match cfg.router {
            RouterKind::Linear => {
                let w = f64_var(&[e, d], 4, 0.5);
                vars.push(w.clone());
                Router::Linear { w: w.as_tensor().clone() }
            }
            RouterKind::Xmoe => {
                let (proj, emb) = (f64_var(&[cfg.xmoe_dim, d], 5, 0.5), f64_var(&[e, cfg.xmoe_dim], 6, 1.0));
                let lt = Var::from_tensor(&Tensor::new(0.5f64.ln(), &Device::Cpu).unwrap()).unwrap();
                vars.extend([proj.clone(), emb.clone(), lt.clone()]);
                Router::Xmoe { proj: proj.as_tensor().clone(), embeddings: emb.as_tensor().clone(), log_temperature: lt.as_tensor().clone() }
            }
        };
        let experts = Experts { gate: Some(gate.as_tensor().clone()), up: up.as_tensor().clone(), down: down.as_tensor().clone(), activation: Activation::Swiglu };
        (MoeLayer { index: 0, router, experts, cfg: cfg.clone() }, vars)
    }

    /// Loss = Σ out·R + aux + z; its autograd gradient against central differences.
    fn check_layer_gradients(cfg: MoeConfig, train: bool) {
        let (d, f, rows, seq) = (6, 5, 4, 3);
        let (layer, mut vars) = layer(&cfg, d, f);
        let x = f64_var(&[rows * seq, d], 7, 1.0);
        vars.push(x.clone());
        let proj = randn(&[rows * seq, d], 8).to_dtype(DType::F64).unwrap();
        let loss = |layer: &MoeLayer, x: &Tensor| -> Tensor {
            let mut ctx = FfnContext::new(train, rows, seq);
            let out = layer.forward(x, &mut ctx).unwrap();
            let main = (out * &proj).unwrap().sum_all().unwrap();
            match ctx.auxiliary_loss(0.3, 0.2).unwrap() {
                Some(a) => (main + a).unwrap(),
                None => main,
            }
        };
        let grads = loss(&layer, x.as_tensor()).backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let g: Vec<f64> = grads.get(v).unwrap_or_else(|| panic!("var {i} got no gradient")).flatten_all().unwrap().to_vec1().unwrap();
            let n = v.elem_count();
            for k in (0..n).step_by((n / 5).max(1)) {
                let numeric = central_difference(v, k, || loss(&layer, x.as_tensor()).to_scalar::<f64>().unwrap());
                assert!((numeric - g[k]).abs() <= 1e-5 * (1.0 + numeric.abs()), "var {i} elem {k}: autograd {} vs finite difference {numeric}", g[k]);
            }
        }
    }

    #[test]
    fn token_choice_gradients_match_finite_differences() {
        let cfg = MoeConfig { n_experts: 4, top_k: 2, gate: Gate::SoftmaxTopk, capacity_factor: 1.0, ..Default::default() };
        check_layer_gradients(cfg.clone(), true);
        check_layer_gradients(MoeConfig { gate: Gate::Softmax, top_k: 1, ..cfg }, false);
    }

    #[test]
    fn xmoe_gradients_match_finite_differences() {
        let cfg = MoeConfig { n_experts: 3, top_k: 1, router: RouterKind::Xmoe, xmoe_dim: 2, ..Default::default() };
        check_layer_gradients(cfg, true);
    }

    #[test]
    fn expert_choice_gradients_match_finite_differences() {
        let cfg = MoeConfig { n_experts: 3, routing: Routing::ExpertChoice, group_size: 2, capacity_factor: 2.0, ..Default::default() };
        check_layer_gradients(cfg, true);
    }

    #[test]
    fn aux_and_z_losses_match_hand_computation() {
        let cfg = MoeConfig { n_experts: 2, top_k: 1, capacity_factor: 0.0, ..Default::default() };
        let w = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let (layer, _) = layer(&cfg, 2, 3);
        let layer = MoeLayer { router: Router::Linear { w }, ..layer };
        let x = Tensor::new(&[[2.0f64, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let mut ctx = FfnContext::new(true, 3, 1);
        layer.forward(&x, &mut ctx).unwrap();
        // z = x; p rows: softmax([2,0]), softmax([0,1]), [0.5, 0.5]; choices 0, 1, 0 (tie → 0).
        let sm = |a: f64, b: f64| (a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp()));
        let (p0, p1, p2) = (sm(2.0, 0.0), sm(0.0, 1.0), (0.5, 0.5));
        let mean_p = ((p0.0 + p1.0 + p2.0) / 3.0, (p0.1 + p1.1 + p2.1) / 3.0);
        let aux = 2.0 * (2.0 / 3.0 * mean_p.0 + 1.0 / 3.0 * mean_p.1);
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        let z = (lse(2.0, 0.0).powi(2) + lse(0.0, 1.0).powi(2) + lse(1.0, 1.0).powi(2)) / 3.0;
        assert!((moe_stats(&ctx).aux_loss - aux).abs() < 1e-12, "{} vs {aux}", moe_stats(&ctx).aux_loss);
        assert!((moe_stats(&ctx).z_loss - z).abs() < 1e-12);
        assert_eq!(moe_stats(&ctx).load, vec![2.0 / 3.0, 1.0 / 3.0]);
    }

    #[test]
    fn dropless_equals_unlimited_capacity_and_capacity_drops_tokens() {
        let cfg = MoeConfig { n_experts: 3, top_k: 2, capacity_factor: 0.0, ..Default::default() };
        let (layer, _) = layer(&cfg, 6, 5);
        let x = randn(&[12, 6], 9).to_dtype(DType::F64).unwrap();
        let run = |l: &MoeLayer, train: bool| {
            let mut ctx = FfnContext::new(train, 4, 3);
            (l.forward(&x, &mut ctx).unwrap(), moe_stats(&ctx).dropped)
        };
        let (dropless, d0) = run(&layer, true);
        let big = MoeLayer { cfg: MoeConfig { capacity_factor: 100.0, ..cfg.clone() }, ..layer };
        let (unlimited, d1) = run(&big, true);
        assert_eq!((d0, d1), (0.0, 0.0));
        assert_eq!(dropless.to_vec2::<f64>().unwrap(), unlimited.to_vec2::<f64>().unwrap());
        let tight = MoeLayer { cfg: MoeConfig { capacity_factor: 0.5, ..cfg }, ..big };
        let (_, dropped) = run(&tight, true);
        // capacity floor(0.5·12·2/3) = 4 per expert: 12 of 24 choices fit.
        assert_eq!(dropped, 0.5);
        let (_, eval_dropped) = run(&tight, false);
        assert_eq!(eval_dropped, 0.0, "eval is dropless");
    }

    #[test]
    fn top_k_breaks_ties_to_the_lower_index() {
        assert_eq!(top_k(&[0.2, 0.4, 0.4, 0.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.25; 4], 3), vec![0, 1, 2]);
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
