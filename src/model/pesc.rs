//! PESC, Parameter-Efficient Sparsity Crafting (arXiv 2401.02731): a dense FFN upcycled into a
//! Mixture of Experts whose experts share the FFN and differ by small adapters on its output,
//!
//! `out = y + Σ_j w_j · s · Up_j(GELU(Down_j(dropout(y))))`,  `y = FFN(x)` computed once,
//!
//! with the top-k experts j chosen by a linear router on x and `w` the softmax over the chosen
//! logits. Up starts at zero, so an upcycled model computes exactly its dense model at step 0.
//! The adapters act on the FFN's output, so every activation (SwiGLU, GELU, ReLU) and FFN bias
//! works. Routing is `router::route` by `RoutingRules::pesc`: dropless top-k token choice.

use super::context::FfnContext;
use super::ffn::DenseFfn;
use super::params::Params;
use super::router::{route, Router, RoutingRules};
use crate::config::{Activation, PescConfig};
use crate::ops::grouped::grouped_matmul;
use crate::rng;
use candle_core::{Result, Tensor};
use rand::Rng;

/// Whether `name` is a PESC adapter or router tensor: what `train_only_adapters` trains.
pub fn is_adapter_or_router(name: &str) -> bool {
    name.contains(".mlp.adapters.") || name.contains(".mlp.router.")
}

/// E bottleneck adapters, stacked: Down `[E, a, d]`, Up `[E, d, a]` (zero at init).
pub struct Adapters {
    down: Tensor,
    up: Tensor,
}

impl Adapters {
    pub fn new(p: &mut Params, prefix: &str, e: usize, d: usize, a: usize) -> Result<Adapters> {
        Ok(Adapters {
            down: p.matrix(&format!("{prefix}.down"), &[e, a, d])?,
            up: p.constant(&format!("{prefix}.up"), &[e, d, a], 0.0)?,
        })
    }

    /// `Up_e(GELU(Down_e(h)))` for every adapter on its rows: `h [R, d]` holds adapter e's rows
    /// at `[offsets[e], offsets[e+1])`; → `[R, d]`.
    pub fn forward(&self, h: &Tensor, offsets: &[usize], train: bool) -> Result<Tensor> {
        let mid = grouped_matmul(h, &self.down, offsets, train)?.gelu_erf()?; // [R, a]
        grouped_matmul(&mid, &self.up, offsets, train)
    }
}

pub struct PescLayer {
    index: usize,
    ffn: DenseFfn,
    router: Router,
    adapters: Adapters,
    rules: RoutingRules,
    scale: f64,
    dropout: f64,
}

impl PescLayer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Params, prefix: &str, index: usize, cfg: &PescConfig, d: usize, f: usize,
        activation: Activation, bias: bool,
    ) -> Result<PescLayer> {
        let rules = RoutingRules::pesc(cfg);
        Ok(PescLayer {
            index,
            // The dense FFN keeps its names (`mlp.{gate,up,down}_proj`): upcycling adds tensors
            // and renames none.
            ffn: DenseFfn::new(p, prefix, d, f, activation, bias)?,
            router: Router::linear(p, &format!("{prefix}.router"), cfg.n_experts, d)?,
            adapters: Adapters::new(
                p,
                &format!("{prefix}.adapters"),
                cfg.n_experts,
                d,
                cfg.adapter_dim,
            )?,
            rules,
            scale: cfg.adapter_scale,
            dropout: cfg.adapter_dropout,
        })
    }

    /// `x [N, d]` → `[N, d]`.
    pub fn forward(&self, x: &Tensor, ctx: &mut FfnContext) -> Result<Tensor> {
        let y = self.ffn.forward(x)?;
        let routed = route(&self.router, &self.rules, self.index, x, ctx)?;
        let h = dropout(&y, self.dropout, ctx, self.index)?;
        let adapted =
            routed.combine(&h, |rows, offsets| self.adapters.forward(rows, offsets, ctx.train))?;
        y + (adapted * self.scale)?
    }
}

/// Inverted dropout in training. The mask depends only on the batch's noise seed and the layer,
/// so a resumed run draws the masks the uninterrupted run would have drawn.
fn dropout(x: &Tensor, p: f64, ctx: &FfnContext, layer: usize) -> Result<Tensor> {
    if !ctx.train || p == 0.0 {
        return Ok(x.clone());
    }
    let mut rng = rng::seeded(rng::derive(ctx.noise_seed, layer as u64 + 1));
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> =
        (0..x.elem_count()).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_matches_fd, randn};
    use candle_core::{DType, Device, Var};

    fn cfg() -> PescConfig {
        PescConfig {
            n_experts: 3,
            top_k: 2,
            adapter_dim: 4,
            adapter_scale: 0.7,
            ..PescConfig::default()
        }
    }

    /// A layer in f64 whose Up is not zero (at init it is, and then Down and the router would
    /// get no gradient through the adapters to check).
    fn layer(cfg: &PescConfig, activation: Activation) -> (PescLayer, Params) {
        let mut p = Params::new(&Device::Cpu, 4, 0.5).with_dtype(DType::F64);
        let l =
            PescLayer::new(&mut p, "mlp", 0, cfg, 6, 5, activation, activation == Activation::Relu)
                .unwrap();
        let up = p.get("mlp.adapters.up").unwrap();
        up.set(&(randn(up.dims(), 11).to_dtype(DType::F64).unwrap() * 0.5).unwrap()).unwrap();
        (l, p)
    }

    /// Every parameter's and the input's gradient against central differences.
    #[test]
    fn gradients_match_finite_differences() {
        for act in [Activation::Swiglu, Activation::Gelu, Activation::Relu] {
            let (l, p) = layer(&cfg(), act);
            let x = Var::from_tensor(&randn(&[12, 6], 7).to_dtype(DType::F64).unwrap()).unwrap();
            let proj = randn(&[12, 6], 8).to_dtype(DType::F64).unwrap();
            let loss = |x: &Tensor| {
                let mut ctx = FfnContext::new(true, 4, 3);
                let out = l.forward(x, &mut ctx).unwrap();
                let aux = ctx.auxiliary_loss(0.1, 0.01).unwrap().unwrap();
                ((out * &proj).unwrap().sum_all().unwrap() + aux).unwrap()
            };
            let grads = loss(x.as_tensor()).backward().unwrap();
            let mut vars: Vec<(String, Var)> =
                p.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
            vars.push(("x".into(), x.clone()));
            for (name, v) in &vars {
                let g: Vec<f64> = grads
                    .get(v)
                    .unwrap_or_else(|| panic!("{act:?} {name}: no gradient"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(g.iter().any(|&a| a != 0.0), "{act:?} {name}: zero gradient");
                let what = format!("{act:?} {name}");
                assert_matches_fd(&what, v, &g, 6, (1e-6, 1.0), || {
                    loss(x.as_tensor()).to_scalar::<f64>().unwrap()
                });
            }
        }
    }

    /// The layer against a per-token loop: y + Σ over the top-k experts of the renormalised
    /// weight times the scaled adapter, written with plain matrix-vector products.
    #[test]
    fn matches_a_per_token_loop() {
        let c = cfg();
        let (l, p) = layer(&c, Activation::Swiglu);
        let x = randn(&[10, 6], 3).to_dtype(DType::F64).unwrap();
        let mut ctx = FfnContext::new(false, 10, 1);
        let got: Vec<Vec<f64>> = l.forward(&x, &mut ctx).unwrap().to_vec2().unwrap();
        let y: Vec<Vec<f64>> = l.ffn.forward(&x).unwrap().to_vec2().unwrap();
        let m2 = |n: &str| p.get(n).unwrap().to_vec2::<f64>().unwrap();
        let m3 = |n: &str| p.get(n).unwrap().to_vec3::<f64>().unwrap();
        let (r, down, up) =
            (m2("mlp.router.weight"), m3("mlp.adapters.down"), m3("mlp.adapters.up"));
        let mv = |m: &[Vec<f64>], v: &[f64]| {
            m.iter()
                .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>())
                .collect::<Vec<f64>>()
        };
        let gelu = |v: f64| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2));
        let xs: Vec<Vec<f64>> = x.to_vec2().unwrap();
        for (i, xi) in xs.iter().enumerate() {
            let z = mv(&r, xi);
            let mut order: Vec<usize> = (0..c.n_experts).collect();
            order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
            let chosen = &order[..c.top_k];
            let denom: f64 = chosen.iter().map(|&e| z[e].exp()).sum();
            let mut want = y[i].clone();
            for &e in chosen {
                let w = z[e].exp() / denom;
                let h: Vec<f64> = mv(&down[e], &y[i]).into_iter().map(gelu).collect();
                for (o, u) in want.iter_mut().zip(mv(&up[e], &h)) {
                    *o += w * c.adapter_scale * u;
                }
            }
            for (a, b) in got[i].iter().zip(&want) {
                assert!((a - b).abs() < 1e-9, "token {i}: {a} vs {b}");
            }
        }
    }

    /// erf by Simpson's rule on its integral: a reference independent of candle's GELU.
    fn erf(x: f64) -> f64 {
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let s: f64 = (0..=n)
            .map(|k| {
                f(k as f64 * h)
                    * if k == 0 || k == n {
                        1.0
                    } else if k % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    }
            })
            .sum();
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn fresh_adapters_leave_the_ffn_output_unchanged() {
        let mut p = Params::new(&Device::Cpu, 2, 0.5);
        let l = PescLayer::new(&mut p, "mlp", 0, &cfg(), 6, 5, Activation::Swiglu, false).unwrap();
        let x = randn(&[8, 6], 1);
        let mut ctx = FfnContext::new(true, 8, 1);
        let out = l.forward(&x, &mut ctx).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, l.ffn.forward(&x).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn dropout_is_seeded_by_the_batch_and_off_in_eval() {
        let x = Tensor::ones((50, 8), DType::F32, &Device::Cpu).unwrap();
        let ctx = |train, seed| FfnContext { noise_seed: seed, ..FfnContext::new(train, 50, 1) };
        let a = dropout(&x, 0.5, &ctx(true, 1), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = dropout(&x, 0.5, &ctx(true, 1), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = dropout(&x, 0.5, &ctx(true, 2), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "same batch, same mask");
        assert_ne!(a, c, "another batch, another mask");
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
        let kept = a.iter().filter(|&&v| v > 0.0).count();
        assert!((150..250).contains(&kept), "{kept} of 400 kept at p = 0.5");
        let e = dropout(&x, 0.5, &ctx(false, 1), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(e.iter().all(|&v| v == 1.0), "no dropout in eval");
    }
}
