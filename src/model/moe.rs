//! The sparse Mixture of Experts layer (`models.md`): a router chooses experts for each token
//! (token choice) or tokens for each expert (expert choice), and each expert runs on the
//! tokens it was given; tokens no expert took contribute nothing (the residual carries them).

use super::context::FfnContext;
use super::experts::Experts;
use super::params::Params;
use super::router::{route, Router, RoutingRules};
use crate::config::{Activation, MoeConfig};
use candle_core::{Result, Tensor};

pub struct MoeLayer {
    pub index: usize,
    pub router: Router,
    pub experts: Experts,
    pub rules: RoutingRules,
}

impl MoeLayer {
    pub fn new(
        p: &mut Params, prefix: &str, index: usize, cfg: &MoeConfig, d: usize, f: usize,
        activation: Activation,
    ) -> Result<MoeLayer> {
        Ok(MoeLayer {
            index,
            router: Router::new(p, &format!("{prefix}.router"), cfg, d)?,
            experts: Experts::new(
                p,
                &format!("{prefix}.experts"),
                cfg.n_experts,
                d,
                f,
                activation,
            )?,
            rules: RoutingRules::moe(cfg),
        })
    }

    /// `x [N, d]` → `[N, d]`; tokens no expert processes contribute nothing (the residual
    /// carries them).
    pub fn forward(&self, x: &Tensor, ctx: &mut FfnContext) -> Result<Tensor> {
        let routed = route(&self.router, &self.rules, self.index, x, ctx)?;
        routed.combine(x, |rows, offsets| self.experts.forward(rows, offsets, ctx.recompute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Gate, RouterKind, Routing};
    use crate::model::context::FfnContext;
    use crate::model::experts::Experts;
    use crate::model::stats::{LayerStats, RoutingStats};
    use crate::ops::testing::{assert_matches_fd, grad_of, randn};
    use candle_core::DType;
    use candle_core::{Device, Var};

    fn moe_stats(ctx: &FfnContext) -> &RoutingStats {
        match &ctx.stats[0] {
            LayerStats::Moe(s) => s,
            LayerStats::Mot(_) => panic!("expected MoE statistics"),
        }
    }

    fn f64_var(shape: &[usize], seed: u64, scale: f64) -> Var {
        Var::from_tensor(&(randn(shape, seed).to_dtype(DType::F64).unwrap() * scale).unwrap())
            .unwrap()
    }

    /// A layer over f64 variables, so finite differences are exact enough to check every
    /// parameter's gradient, routing included.
    fn layer(cfg: &MoeConfig, d: usize, f: usize) -> (MoeLayer, Vec<Var>) {
        let e = cfg.n_experts;
        let (gate, up, down) =
            (f64_var(&[e, f, d], 1, 0.3), f64_var(&[e, f, d], 2, 0.3), f64_var(&[e, d, f], 3, 0.3));
        let mut vars = vec![gate.clone(), up.clone(), down.clone()];
        let router = match cfg.router {
            RouterKind::Linear => {
                let w = f64_var(&[e, d], 4, 0.5);
                vars.push(w.clone());
                Router::Linear { w: w.as_tensor().clone() }
            }
            RouterKind::Xmoe => {
                let (proj, emb) =
                    (f64_var(&[cfg.xmoe_dim, d], 5, 0.5), f64_var(&[e, cfg.xmoe_dim], 6, 1.0));
                let lt =
                    Var::from_tensor(&Tensor::new(0.5f64.ln(), &Device::Cpu).unwrap()).unwrap();
                vars.extend([proj.clone(), emb.clone(), lt.clone()]);
                Router::Xmoe {
                    proj: proj.as_tensor().clone(),
                    embeddings: emb.as_tensor().clone(),
                    log_temperature: lt.as_tensor().clone(),
                }
            }
        };
        let experts = Experts {
            gate: Some(gate.as_tensor().clone()),
            up: up.as_tensor().clone(),
            down: down.as_tensor().clone(),
            activation: Activation::Swiglu,
        };
        (MoeLayer { index: 0, router, experts, rules: RoutingRules::moe(cfg) }, vars)
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
            let what = format!("var {i}");
            let g = grad_of(&grads, v, &what);
            assert_matches_fd(&what, v, &g, 5, (1e-5, 1.0), || {
                loss(&layer, x.as_tensor()).to_scalar::<f64>().unwrap()
            });
        }
    }

    #[test]
    fn token_choice_gradients_match_finite_differences() {
        let cfg = MoeConfig {
            n_experts: 4,
            top_k: 2,
            gate: Gate::SoftmaxTopk,
            capacity_factor: 1.0,
            ..Default::default()
        };
        check_layer_gradients(cfg.clone(), true);
        check_layer_gradients(MoeConfig { gate: Gate::Softmax, top_k: 1, ..cfg }, false);
    }

    #[test]
    fn xmoe_gradients_match_finite_differences() {
        let cfg = MoeConfig {
            n_experts: 3,
            top_k: 1,
            router: RouterKind::Xmoe,
            xmoe_dim: 2,
            ..Default::default()
        };
        check_layer_gradients(cfg, true);
    }

    #[test]
    fn expert_choice_gradients_match_finite_differences() {
        let cfg = MoeConfig {
            n_experts: 3,
            routing: Routing::ExpertChoice,
            group_size: 2,
            capacity_factor: 2.0,
            ..Default::default()
        };
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
        assert!(
            (moe_stats(&ctx).aux_loss - aux).abs() < 1e-12,
            "{} vs {aux}",
            moe_stats(&ctx).aux_loss
        );
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
        let big = MoeLayer {
            rules: RoutingRules::moe(&MoeConfig { capacity_factor: 100.0, ..cfg.clone() }),
            ..layer
        };
        let (unlimited, d1) = run(&big, true);
        assert_eq!((d0, d1), (0.0, 0.0));
        assert_eq!(dropless.to_vec2::<f64>().unwrap(), unlimited.to_vec2::<f64>().unwrap());
        let tight = MoeLayer {
            rules: RoutingRules::moe(&MoeConfig { capacity_factor: 0.5, ..cfg }),
            ..big
        };
        let (_, dropped) = run(&tight, true);
        // capacity floor(0.5·12·2/3) = 4 per expert: 12 of 24 choices fit.
        assert_eq!(dropped, 0.5);
        let (_, eval_dropped) = run(&tight, false);
        assert_eq!(eval_dropped, 0.0, "eval is dropless");
    }
}
