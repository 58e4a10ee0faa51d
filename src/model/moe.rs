//! The sparse Mixture of Experts layer (`models.md`): a router chooses experts for each token
//! (token choice) or tokens for each expert (expert choice), and each expert runs on the
//! tokens it was given; tokens no expert took contribute nothing (the residual carries them).
//! An optional shared expert (Qwen2-MoE) sees every token: `out += σ(x·g) · FFN_shared(x)`.

use super::context::FfnContext;
use super::experts::Experts;
use super::ffn::DenseFfn;
use super::layers::Linear;
use super::params::Params;
use super::router::{route, Router, RoutingRules};
use crate::config::{Activation, MoeConfig};
use candle_core::{Result, Tensor};

pub struct MoeLayer {
    pub index: usize,
    pub router: Router,
    pub experts: Experts,
    pub rules: RoutingRules,
    pub shared: Option<SharedExpert>,
}

/// A dense FFN every token passes through, scaled per token by `σ(x·g)`, `g [1, d]`: Qwen2-MoE's
/// `shared_expert` and `shared_expert_gate`, under those names.
pub struct SharedExpert {
    ffn: DenseFfn,
    gate: Linear,
}

impl SharedExpert {
    pub fn new(
        p: &mut Params, prefix: &str, d: usize, f: usize, activation: Activation,
    ) -> Result<SharedExpert> {
        Ok(SharedExpert {
            ffn: DenseFfn::new(p, &format!("{prefix}.shared_expert"), d, f, activation, false)?,
            gate: Linear::new(p, &format!("{prefix}.shared_expert_gate"), 1, d, false)?,
        })
    }

    /// `x [N, d]` → `[N, d]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // σ(z) = 1 / (1 + e^(-z)), from ops that all have a backward.
        let gate = self.gate.forward(x)?.neg()?.exp()?.affine(1.0, 1.0)?.recip()?; // [N, 1]
        self.ffn.forward(x)?.broadcast_mul(&gate)
    }
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
            shared: match cfg.shared_expert_size {
                0 => None,
                w => Some(SharedExpert::new(p, prefix, d, w, activation)?),
            },
        })
    }

    /// `x [N, d]` → `[N, d]`; tokens no expert processes contribute nothing (the residual
    /// carries them).
    pub fn forward(&self, x: &Tensor, ctx: &mut FfnContext) -> Result<Tensor> {
        let routed = route(&self.router, &self.rules, self.index, x, ctx)?;
        let out = routed.combine(x, |rows, offsets| self.experts.forward(rows, offsets, ctx))?;
        match &self.shared {
            Some(shared) => out + shared.forward(x)?,
            None => Ok(out),
        }
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
        (MoeLayer { index: 0, router, experts, rules: RoutingRules::moe(cfg), shared: None }, vars)
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
    fn shared_expert_adds_its_gated_ffn_and_its_gradients_match_finite_differences() {
        let cfg = MoeConfig {
            n_experts: 3,
            top_k: 2,
            shared_expert_size: 4,
            capacity_factor: 0.0,
            ..Default::default()
        };
        let (d, n) = (6, 10);
        let mut p = Params::new(&Device::Cpu, 3, 0.5).with_dtype(DType::F64);
        let layer = MoeLayer::new(&mut p, "mlp", 0, &cfg, d, 5, Activation::Swiglu).unwrap();
        let names: Vec<&str> = p.iter().map(|(n, _)| n).collect();
        for want in ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert_gate.weight"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let x = Var::from_tensor(&randn(&[n, d], 7).to_dtype(DType::F64).unwrap()).unwrap();
        let forward = |layer: &MoeLayer| {
            let mut ctx = FfnContext::new(false, n, 1);
            layer.forward(x.as_tensor(), &mut ctx).unwrap()
        };
        let proj = randn(&[n, d], 8).to_dtype(DType::F64).unwrap();
        let loss = || (forward(&layer) * &proj).unwrap().sum_all().unwrap();
        let grads = loss().backward().unwrap();
        let mut vars: Vec<(String, Var)> =
            p.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        vars.push(("x".into(), x.clone()));
        for (name, v) in &vars {
            let g = grad_of(&grads, v, name);
            assert_matches_fd(name, v, &g, 5, (1e-5, 1.0), || loss().to_scalar::<f64>().unwrap());
        }

        // Against a naive computation: routed part + σ(x·g) · SwiGLU_shared(x), row by row.
        let out = forward(&layer).to_vec2::<f64>().unwrap();
        let routed = forward(&MoeLayer { shared: None, ..layer }).to_vec2::<f64>().unwrap();
        let get = |name: &str| p.get(name).unwrap().as_tensor().to_vec2::<f64>().unwrap();
        let (g, up, down, gw) = (
            get("mlp.shared_expert.gate_proj.weight"),
            get("mlp.shared_expert.up_proj.weight"),
            get("mlp.shared_expert.down_proj.weight"),
            get("mlp.shared_expert_gate.weight"),
        );
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        for (r, xr) in x.as_tensor().to_vec2::<f64>().unwrap().iter().enumerate() {
            let h: Vec<f64> = (0..4)
                .map(|j| {
                    let a = dot(&g[j], xr);
                    a / (1.0 + (-a).exp()) * dot(&up[j], xr)
                })
                .collect();
            let s = 1.0 / (1.0 + (-dot(&gw[0], xr)).exp());
            for c in 0..d {
                let want = routed[r][c] + s * dot(&down[c], &h);
                assert!(
                    (out[r][c] - want).abs() < 1e-12,
                    "row {r} col {c}: {} vs {want}",
                    out[r][c]
                );
            }
        }
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
