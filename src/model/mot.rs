//! Mixture of Tokens (`models.md`, arXiv 2310.15961): a continuous MoE whose experts see
//! weighted mixtures of tokens from G different sequences at one position.
//!
//! 1. group: rows `[kG, kG+G)` at position s form group n = k·S + s;
//! 2. logits `z = x·Cᵀ / T`, one per token and expert (computed as `x·(C/T)ᵀ`);
//! 3. weights `w = softmax(z)` over the G tokens of the group, per expert;
//! 4. merge `m_e = Σ_i w[i,e] · x_i`; 5. experts `y_e = FFN_e(m_e)`;
//! 6. emit: token i gets `Σ_e w[i,e] · y_e`.
//!
//! Steps 2–4 and 6 are `ops::mot::mixing::mix`; the experts are the shared `Experts`.

use super::context::FfnContext;
use super::experts::Experts;
use super::params::Params;
use super::stats::{LayerStats, MixingStats};
use crate::config::{Activation, MotConfig};
use crate::ops::mot::mixing::mix;
use candle_core::{DType, Result, Tensor};

pub enum Temperature {
    Fixed(f64),
    /// `T = exp(log_temperature)`, a trained scalar.
    Learned(Tensor),
}

pub struct MotLayer {
    pub index: usize,
    /// `C [E, d]`: the same layout as a MoE router, which it becomes in transition tuning.
    pub controller: Tensor,
    pub experts: Experts,
    pub temperature: Temperature,
    group_size: usize,
}

impl MotLayer {
    pub fn new(
        p: &mut Params, prefix: &str, index: usize, cfg: &MotConfig, d: usize, f: usize,
        activation: Activation,
    ) -> Result<MotLayer> {
        let e = cfg.n_experts;
        let temperature = match cfg.learn_temperature {
            true => Temperature::Learned(p.constant(
                &format!("{prefix}.log_temperature"),
                &[],
                cfg.temperature.ln() as f32,
            )?),
            false => Temperature::Fixed(cfg.temperature),
        };
        Ok(MotLayer {
            index,
            controller: p.matrix(&format!("{prefix}.controller.weight"), &[e, d])?,
            experts: Experts::new(p, &format!("{prefix}.experts"), e, d, f, activation)?,
            temperature,
            group_size: cfg.group_size,
        })
    }

    /// `x [B·S, d]` → `[B·S, d]`.
    pub fn forward(&self, x: &Tensor, ctx: &mut FfnContext) -> Result<Tensor> {
        let g = ctx.group_size.unwrap_or(self.group_size);
        let (b, s) = (ctx.rows, ctx.seq);
        let (d, e) = (x.dim(1)?, self.experts.count());
        let mixed = mix(&x.reshape((b, s, d))?, &self.scaled_controller()?, g)?;
        let n = mixed.m.dim(1)?; // m [E, N, d]
        let offsets: Vec<usize> = (0..=e).map(|i| i * n).collect();
        let m = mixed.m.reshape((e * n, d))?;
        let y = self.experts.forward(&m, &offsets, ctx)?.reshape((e, n, d))?;
        if ctx.record_stats {
            ctx.stats.push(LayerStats::Mot(self.statistics(&mixed.w, &mixed.z, g)?));
        }
        mixed.emit(&y)?.reshape((b * s, d))
    }

    /// `C / T`: the logits' scaling, on the E×d controller rather than the B·S×E logits.
    fn scaled_controller(&self) -> Result<Tensor> {
        let c = &self.controller;
        match &self.temperature {
            Temperature::Fixed(t) if *t == 1.0 => Ok(c.clone()),
            Temperature::Fixed(t) => c / *t,
            Temperature::Learned(log_t) => c.broadcast_div(&log_t.exp()?.to_dtype(c.dtype())?),
        }
    }

    pub fn temperature_value(&self) -> Result<f64> {
        match &self.temperature {
            Temperature::Fixed(t) => Ok(*t),
            Temperature::Learned(log_t) => {
                Ok(log_t.to_dtype(DType::F64)?.to_scalar::<f64>()?.exp())
            }
        }
    }

    /// Per expert: the mean over groups of its largest weight and of its softmax's entropy,
    /// from the weights `w` and the logits `z` they are the softmax of. With `w_i = exp(z_i −
    /// m)/T` (m the largest logit), `−Σ w_i ln w_i = m + ln T − Σ w_i z_i` and the largest
    /// weight is `1/T`: one logarithm per group and expert instead of one per member, which
    /// took ~0.8 ms a layer of bench-mot's forward.
    fn statistics(&self, w: &Tensor, z: &Tensor, g: usize) -> Result<MixingStats> {
        let (b, s, e) = w.dims3()?;
        let host = |t: &Tensor| t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (w, z) = (host(w)?, host(z)?);
        let (mut max_weight, mut entropy) = (vec![0f64; e], vec![0f64; e]);
        let (mut top, mut m, mut wz) = (vec![0f64; e], vec![0f64; e], vec![0f64; e]);
        let groups = (b / g * s) as f64;
        for k in 0..b / g {
            for p in 0..s {
                top.fill(0.0);
                m.fill(f64::NEG_INFINITY);
                wz.fill(0.0);
                for i in 0..g {
                    let at = ((k * g + i) * s + p) * e;
                    for ex in 0..e {
                        let (wi, zi) = (w[at + ex] as f64, z[at + ex] as f64);
                        (top[ex], m[ex]) = (top[ex].max(wi), m[ex].max(zi));
                        wz[ex] += wi * zi;
                    }
                }
                for ex in 0..e {
                    max_weight[ex] += top[ex] / groups;
                    entropy[ex] += (m[ex] - top[ex].ln() - wz[ex]) / groups;
                }
            }
        }
        Ok(MixingStats {
            layer: self.index,
            temperature: self.temperature_value()?,
            max_weight,
            entropy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::mot::group_softmax;
    use crate::ops::testing::{assert_matches_fd, grad_of, randn};
    use candle_core::{Device, Var};

    fn f64_var(shape: &[usize], seed: u64, scale: f64) -> Var {
        Var::from_tensor(&(randn(shape, seed).to_dtype(DType::F64).unwrap() * scale).unwrap())
            .unwrap()
    }

    /// A layer over f64 variables (plain formulation), with a learned temperature.
    fn layer(
        e: usize, d: usize, f: usize, g: usize, activation: Activation,
    ) -> (MotLayer, Vec<Var>) {
        let mut p = Params::new(&Device::Cpu, 5, 0.5).with_dtype(DType::F64);
        let cfg = MotConfig {
            n_experts: e,
            group_size: g,
            expert_size: f,
            temperature: 0.7,
            learn_temperature: true,
        };
        let layer = MotLayer::new(&mut p, "mlp", 0, &cfg, d, f, activation).unwrap();
        let vars = p.iter().map(|(_, v)| v.clone()).collect();
        (layer, vars)
    }

    /// Every parameter (controller, learned temperature, experts) and the input, against
    /// central finite differences.
    #[test]
    fn gradients_match_finite_differences() {
        for (activation, g) in
            [(Activation::Swiglu, 2), (Activation::Gelu, 4), (Activation::Relu, 1)]
        {
            let (b, s, d, e, f) = (4, 3, 5, 3, 4);
            let (layer, mut vars) = layer(e, d, f, g, activation);
            let x = f64_var(&[b * s, d], 7, 1.0);
            vars.push(x.clone());
            let proj = randn(&[b * s, d], 8).to_dtype(DType::F64).unwrap();
            let loss = || -> Tensor {
                let mut ctx = FfnContext::new(true, b, s);
                (layer.forward(x.as_tensor(), &mut ctx).unwrap() * &proj)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss().backward().unwrap();
            for (i, v) in vars.iter().enumerate() {
                let what = format!("{activation:?} var {i}");
                let grad = grad_of(&grads, v, &what);
                assert_matches_fd(&what, v, &grad, 6, (1e-6, 1.0), || {
                    loss().to_scalar::<f64>().unwrap()
                });
            }
        }
    }

    /// The layer against a per-group loop: for each group, the G tokens, a softmax per expert,
    /// each expert run on its one merged token, and the emit — no fused op involved.
    #[test]
    fn layer_matches_a_naive_per_group_loop() {
        let (b, s, d, e, f, g) = (6, 4, 8, 5, 6, 3);
        let mut p = Params::new(&Device::Cpu, 9, 0.5);
        let cfg = MotConfig {
            n_experts: e,
            group_size: g,
            expert_size: f,
            temperature: 1.3,
            learn_temperature: false,
        };
        let layer = MotLayer::new(&mut p, "mlp", 0, &cfg, d, f, Activation::Swiglu).unwrap();
        let x = randn(&[b * s, d], 3);
        let out = layer.forward(&x, &mut FfnContext::new(false, b, s)).unwrap();

        let get = |name: &str| p.get(name).unwrap().as_tensor().clone();
        let (c, gate, up, down) = (
            get("mlp.controller.weight"),
            get("mlp.experts.gate"),
            get("mlp.experts.up"),
            get("mlp.experts.down"),
        );
        let mut expected = vec![Tensor::zeros((1, d), DType::F32, &Device::Cpu).unwrap(); b * s];
        for k in 0..b / g {
            for pos in 0..s {
                let rows: Vec<usize> = (0..g).map(|i| (k * g + i) * s + pos).collect();
                let xs: Vec<Tensor> = rows.iter().map(|&r| x.narrow(0, r, 1).unwrap()).collect();
                for ex in 0..e {
                    let logits: Vec<f32> = xs
                        .iter()
                        .map(|xi| {
                            (xi.matmul(&c.get(ex).unwrap().unsqueeze(1).unwrap())
                                .unwrap()
                                .to_vec2::<f32>()
                                .unwrap()[0][0])
                                / 1.3
                        })
                        .collect();
                    let mx = logits.iter().cloned().fold(f32::MIN, f32::max);
                    let total: f32 = logits.iter().map(|l| (l - mx).exp()).sum();
                    let w: Vec<f32> = logits.iter().map(|l| (l - mx).exp() / total).collect();
                    let mut merged = Tensor::zeros((1, d), DType::F32, &Device::Cpu).unwrap();
                    for (xi, wi) in xs.iter().zip(&w) {
                        merged = (merged + (xi * *wi as f64).unwrap()).unwrap();
                    }
                    let hg = merged.matmul(&gate.get(ex).unwrap().t().unwrap()).unwrap();
                    let hu = merged.matmul(&up.get(ex).unwrap().t().unwrap()).unwrap();
                    let y = (candle_nn::ops::silu(&hg).unwrap() * hu)
                        .unwrap()
                        .matmul(&down.get(ex).unwrap().t().unwrap())
                        .unwrap();
                    for (&r, wi) in rows.iter().zip(&w) {
                        expected[r] = (&expected[r] + (&y * *wi as f64).unwrap()).unwrap();
                    }
                }
            }
        }
        let expected = Tensor::cat(&expected, 0).unwrap();
        crate::ops::testing::assert_close(&out, &expected, 1e-5);
    }

    #[test]
    fn statistics_are_uniform_for_a_zero_controller_and_peaked_for_a_large_one() {
        let (b, s, d, e, g) = (4, 2, 3, 2, 4);
        let mut p = Params::new(&Device::Cpu, 1, 0.5);
        let cfg = MotConfig {
            n_experts: e,
            group_size: g,
            expert_size: 4,
            temperature: 1.0,
            learn_temperature: false,
        };
        let mut layer = MotLayer::new(&mut p, "mlp", 3, &cfg, d, 4, Activation::Relu).unwrap();
        let x = randn(&[b * s, d], 2);
        let stats = |layer: &MotLayer| {
            let mut ctx = FfnContext::new(false, b, s);
            layer.forward(&x, &mut ctx).unwrap();
            match ctx.stats.pop().unwrap() {
                LayerStats::Mot(m) => m,
                LayerStats::Moe(_) => panic!("expected MoT statistics"),
            }
        };
        layer.controller = Tensor::zeros((e, d), DType::F32, &Device::Cpu).unwrap();
        let uniform = stats(&layer);
        assert_eq!(uniform.layer, 3);
        for ex in 0..e {
            assert!((uniform.max_weight[ex] - 0.25).abs() < 1e-6);
            assert!((uniform.entropy[ex] - 4f64.ln()).abs() < 1e-5);
        }
        layer.controller = (randn(&[e, d], 4) * 1000.0).unwrap();
        let peaked = stats(&layer);
        assert!(peaked.max_weight.iter().all(|&m| m > 0.99), "{:?}", peaked.max_weight);
        assert!(peaked.entropy.iter().all(|&h| h < 0.05), "{:?}", peaked.entropy);
    }

    /// The entropy from the logits against its definition, `−Σ w ln w`, group by group.
    #[test]
    fn entropy_matches_its_definition() {
        let (b, s, d, e, g) = (6, 5, 4, 3, 3);
        let mut p = Params::new(&Device::Cpu, 2, 0.5);
        let cfg = MotConfig { n_experts: e, group_size: g, expert_size: 4, ..Default::default() };
        let mut layer = MotLayer::new(&mut p, "mlp", 0, &cfg, d, 4, Activation::Relu).unwrap();
        layer.controller = (randn(&[e, d], 6) * 3.0).unwrap();
        let x = randn(&[b * s, d], 5);
        let mut ctx = FfnContext::new(false, b, s);
        layer.forward(&x, &mut ctx).unwrap();
        let LayerStats::Mot(got) = ctx.stats.pop().unwrap() else { panic!("MoT statistics") };
        let z = x.matmul(&layer.controller.t().unwrap()).unwrap().reshape((b, s, e)).unwrap();
        let w: Vec<f32> = group_softmax(&z, g).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for ex in 0..e {
            let mut h = 0f64;
            for k in 0..b / g {
                for pos in 0..s {
                    for i in 0..g {
                        let v = w[((k * g + i) * s + pos) * e + ex] as f64;
                        h -= v * v.ln() / (b / g * s) as f64;
                    }
                }
            }
            assert!((got.entropy[ex] - h).abs() < 1e-5, "expert {ex}: {} vs {h}", got.entropy[ex]);
        }
    }

    #[test]
    fn flop_matched_expert_size() {
        let cfg = MotConfig { n_experts: 16, group_size: 32, ..Default::default() };
        assert_eq!(cfg.expert_width(1024), 2048);
        assert_eq!(MotConfig { expert_size: 100, ..cfg }.expert_width(1024), 100);
    }
}
