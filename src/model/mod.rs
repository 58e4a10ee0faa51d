//! The decoder-only, pre-norm transformer of `models.md`:
//! `h = h + Attn(Norm1(h)); h = h + FFN(Norm2(h))`, then the optional final norm and the head.
//! Activations travel as `[B·S, d]`; attention alone sees the `[B, H, S, dh]` view.

pub mod attention;
pub mod context;
pub mod estimate;
pub mod experts;
pub mod ffn;
pub mod layers;
pub mod moe;
pub mod mot;
pub mod params;
pub mod pesc;
pub mod router;
pub mod stats;

use crate::config::{Bias, FfnKind, ModelConfig, Position};
use crate::data::Batch;
use crate::ops::linear_ce::{linear_cross_entropy, linear_cross_entropy_rows};
use crate::ops::rope::RopeTables;
use attention::Attention;
pub use attention::KvCache;
use candle_core::{Device, Result, Tensor};
use context::FfnContext;
pub use estimate::{flops_per_token, step_memory_floor};
use ffn::DenseFfn;
use layers::{Linear, Norm};
use moe::MoeLayer;
use mot::MotLayer;
pub use params::Params;
use pesc::PescLayer;
use stats::LayerStats;

/// The FFN of one block.
pub enum Ffn {
    Dense(DenseFfn),
    Moe(MoeLayer),
    Mot(MotLayer),
    Pesc(PescLayer),
}

impl Ffn {
    fn forward(&self, x: &Tensor, ctx: &mut FfnContext) -> Result<Tensor> {
        match self {
            Ffn::Dense(f) => f.forward(x),
            Ffn::Moe(m) => m.forward(x, ctx),
            Ffn::Mot(m) => m.forward(x, ctx),
            Ffn::Pesc(p) => p.forward(x, ctx),
        }
    }
}

pub struct Block {
    norm1: Norm,
    attn: Attention,
    norm2: Norm,
    ffn: Ffn,
}

impl Block {
    fn forward(
        &self, h: &Tensor, cache: Option<&mut KvCache>, ctx: &mut FfnContext,
    ) -> Result<Tensor> {
        let h = (h + self.attn.forward(&self.norm1.forward(h)?, ctx.rows, ctx.seq, cache)?)?;
        &h + self.ffn.forward(&self.norm2.forward(&h)?, ctx)?
    }
}

/// What a loss pass records besides the loss.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    /// Each token's cross-entropy ([`LossParts::token_losses`]).
    pub per_token: bool,
    /// The sparse layers' routing and mixing statistics ([`LossParts::stats`]): training
    /// computes them only on the steps it logs.
    pub stats: bool,
}

/// The pieces of a batch's loss.
pub struct LossParts {
    /// Mean token cross-entropy: the number eval reports.
    pub ce: Tensor,
    /// Weighted aux and z losses of the MoE layers, if any: added to `ce` for training.
    pub aux: Option<Tensor>,
    /// One per sparse layer, or none where they were not wanted.
    pub stats: Vec<LayerStats>,
    /// Each target token's cross-entropy, row by row, from [`Transformer::loss_per_token`]
    /// (empty from [`Transformer::loss`]).
    pub token_losses: Vec<f32>,
}

impl LossParts {
    /// What training minimises.
    pub fn total(&self) -> Result<Tensor> {
        match &self.aux {
            Some(a) => &self.ce + a,
            None => Ok(self.ce.clone()),
        }
    }
}

pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Tensor,
    positions: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Option<Norm>,
    head: Linear,
    /// MoT layers group this many sequences instead of `mot.group_size` (eval `--group-size`).
    group_size: Option<usize>,
    /// The run's seed, from which training-time noise (dropout) derives.
    seed: u64,
    /// Experts recompute their hidden activations in backward (`train.recompute_experts`).
    recompute_experts: bool,
}

impl Transformer {
    /// Creates every parameter (initialised per `models.md`) in `params` and the model over them.
    pub fn new(cfg: &ModelConfig, params: &mut Params) -> Result<Transformer> {
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let embed = params.normal("model.embed_tokens.weight", &[v, d], 1)?;
        let positions = match cfg.position {
            Position::Learned => {
                Some(params.normal("model.embed_positions.weight", &[cfg.max_seq_len, d], 1)?)
            }
            Position::Rope => None,
        };
        let rope = match cfg.position {
            Position::Rope => {
                let scaling = cfg.rope_scaling.as_ref();
                Some(RopeTables::new(d / cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, scaling)?)
            }
            Position::Learned => None,
        };
        let mask = cfg.ffn_layer_mask().map_err(candle_core::Error::msg)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for (i, &sparse) in mask.iter().enumerate() {
            let prefix = format!("model.layers.{i}");
            let norm1 =
                Norm::new(params, &format!("{prefix}.input_layernorm"), cfg.norm, d, cfg.norm_eps)?;
            let attn = Attention::new(
                params,
                &format!("{prefix}.self_attn"),
                d,
                (cfg.n_heads, cfg.kv_heads()),
                cfg.bias,
                rope.clone(),
            )?;
            let norm2 = Norm::new(
                params,
                &format!("{prefix}.post_attention_layernorm"),
                cfg.norm,
                d,
                cfg.norm_eps,
            )?;
            let ffn_bias = matches!(cfg.bias, Bias::Ffn | Bias::All);
            let mlp = format!("{prefix}.mlp");
            let ffn = match (sparse, cfg.ffn) {
                (true, FfnKind::Moe) => {
                    let f = cfg.moe.expert_width(cfg.d_ff);
                    Ffn::Moe(MoeLayer::new(params, &mlp, i, &cfg.moe, d, f, cfg.activation)?)
                }
                (true, FfnKind::Mot) => {
                    let f = cfg.mot.expert_width(cfg.d_ff);
                    Ffn::Mot(MotLayer::new(params, &mlp, i, &cfg.mot, d, f, cfg.activation)?)
                }
                (true, FfnKind::Pesc) => Ffn::Pesc(PescLayer::new(
                    params,
                    &mlp,
                    i,
                    &cfg.pesc,
                    d,
                    cfg.d_ff,
                    cfg.activation,
                    ffn_bias,
                )?),
                _ => {
                    Ffn::Dense(DenseFfn::new(params, &mlp, d, cfg.d_ff, cfg.activation, ffn_bias)?)
                }
            };
            blocks.push(Block { norm1, attn, norm2, ffn });
        }
        let norm = if cfg.final_norm {
            Some(Norm::new(params, "model.norm", cfg.norm, d, cfg.norm_eps)?)
        } else {
            None
        };
        let head = if cfg.tie_embeddings {
            Linear { w: embed.clone(), b: None }
        } else {
            Linear::new(params, "lm_head", v, d, false)?
        };
        Ok(Transformer {
            cfg: cfg.clone(),
            embed,
            positions,
            blocks,
            norm,
            head,
            group_size: None,
            seed: params.seed(),
            recompute_experts: false,
        })
    }

    /// The same model with its MoT layers mixing groups of `g` sequences: to study the effect
    /// of the group size, or to run with fewer sequences than it was trained with.
    pub fn with_group_size(mut self, g: usize) -> Transformer {
        self.group_size = Some(g);
        self
    }

    /// The same model with its experts recomputing their hidden activations in backward.
    pub fn with_recompute_experts(mut self, on: bool) -> Transformer {
        self.recompute_experts = on;
        self
    }

    /// Sequences a batch must be a multiple of: the MoT group size, or 1.
    pub fn batch_multiple(&self) -> usize {
        if self.mot_layers().next().is_some() {
            self.group_size.unwrap_or(self.cfg.mot.group_size)
        } else {
            1
        }
    }

    /// Every MoT layer with its tensor-name prefix (`model.layers.{i}`).
    pub fn mot_layers(&self) -> impl Iterator<Item = (String, &MotLayer)> {
        self.blocks.iter().enumerate().filter_map(|(i, b)| match &b.ffn {
            Ffn::Mot(m) => Some((format!("model.layers.{i}"), m)),
            _ => None,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// `ids [B, S]` (u32) → logits `[B·S, V]`. With caches (one per block), the S positions
    /// follow those already cached.
    pub fn forward(&self, ids: &Tensor, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let mut ctx = self.context(false, b, s, 0);
        self.head.forward(&self.hidden(ids, caches, &mut ctx)?)
    }

    /// The final hidden states `[B·S, d]`, before the head.
    fn hidden(
        &self, ids: &Tensor, mut caches: Option<&mut [KvCache]>, ctx: &mut FfnContext,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let offset = caches.as_ref().map_or(0, |c| c[0].len());
        let mut h = self.embed.index_select(&ids.flatten_all()?, 0)?; // [B·S, d]
        if let Some(pos) = &self.positions {
            if offset + s > self.cfg.max_seq_len {
                candle_core::bail!(
                    "position {} is beyond max_seq_len {}",
                    offset + s - 1,
                    self.cfg.max_seq_len
                );
            }
            let d = self.cfg.d_model;
            h = h
                .reshape((b, s, d))?
                .broadcast_add(&pos.narrow(0, offset, s)?)?
                .reshape((b * s, d))?;
        }
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, caches.as_mut().map(|c| &mut c[i]), ctx)?;
        }
        match &self.norm {
            Some(norm) => norm.forward(&h),
            None => Ok(h),
        }
    }

    /// Mean token cross-entropy of a batch, the auxiliary routing losses to add to it, and the
    /// routing statistics; `train` prepares the backward pass and applies training-only rules
    /// (expert capacity).
    pub fn loss(&self, batch: &Batch, train: bool) -> Result<LossParts> {
        self.loss_with(batch, train, Want { per_token: false, stats: true })
    }

    /// [`Transformer::loss`] with each token's cross-entropy too, from the same pass.
    pub fn loss_per_token(&self, batch: &Batch, train: bool) -> Result<LossParts> {
        self.loss_with(batch, train, Want { per_token: true, stats: true })
    }

    /// [`Transformer::loss`] with what else the pass records chosen.
    pub fn loss_with(&self, batch: &Batch, train: bool, want: Want) -> Result<LossParts> {
        let dev = self.device();
        let ids = Tensor::from_slice(&batch.inputs, (batch.rows, batch.seq_len), dev)?;
        let targets = Tensor::from_slice(&batch.targets, batch.rows * batch.seq_len, dev)?;
        let mut ctx = self.context(train, batch.rows, batch.seq_len, batch.index);
        ctx.record_stats = want.stats;
        let hidden = self.hidden(&ids, None, &mut ctx)?;
        let (ce, token_losses) = if want.per_token {
            linear_cross_entropy_rows(&hidden, &self.head.w, &targets, train)?
        } else {
            (linear_cross_entropy(&hidden, &self.head.w, &targets, train)?, Vec::new())
        };
        let (aux_weight, z_weight) = match self.cfg.ffn {
            FfnKind::Pesc => (self.cfg.pesc.aux_loss_weight, self.cfg.pesc.z_loss_weight),
            _ => (self.cfg.moe.aux_loss_weight, self.cfg.moe.z_loss_weight),
        };
        let aux = ctx.auxiliary_loss(aux_weight, z_weight)?;
        Ok(LossParts { ce, aux, stats: ctx.stats, token_losses })
    }

    fn context(&self, train: bool, rows: usize, seq: usize, batch_index: u64) -> FfnContext {
        let noise_seed = crate::rng::derive(self.seed, batch_index);
        FfnContext {
            group_size: self.group_size,
            noise_seed,
            recompute: self.recompute_experts,
            ..FfnContext::new(train, rows, seq)
        }
    }

    pub fn new_caches(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }
}

/// Whether training updates the parameter `name`: every parameter does, except in a PESC model
/// with `train_only_adapters`, where only the adapters and routers do.
pub fn trains(cfg: &ModelConfig, name: &str) -> bool {
    !(cfg.ffn == FfnKind::Pesc && cfg.pesc.train_only_adapters) || pesc::is_adapter_or_router(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Activation, Norm};
    use crate::ops::testing::{assert_matches_fd, grad_of};
    use candle_core::DType;

    fn tiny(modify: impl Fn(&mut ModelConfig)) -> ModelConfig {
        let text = "[run]\nname='t'\n[data]\ntrain='x'\nseq_len=5\n[model]\nvocab_size=11\nd_model=8\nn_layers=2\nn_heads=2\nd_ff=12\n";
        let mut cfg = crate::config::Config::from_toml_str(text, "test").unwrap().model;
        modify(&mut cfg);
        cfg
    }

    /// A small MoT model's settings: 2 experts, groups of 3 (the batch's rows).
    fn small_mot(c: &mut ModelConfig) {
        c.ffn = FfnKind::Mot;
        c.mot.n_experts = 2;
        c.mot.group_size = 3;
    }

    /// A small MoE model's settings: 3 experts, top 2.
    fn small_moe(c: &mut ModelConfig) {
        c.ffn = FfnKind::Moe;
        c.moe.n_experts = 3;
        c.moe.top_k = 2;
    }

    fn batch() -> Batch {
        let inputs: Vec<u32> = (0..15).map(|i| (i * 7 + 3) % 11).collect();
        let targets: Vec<u32> = (0..15).map(|i| (i * 5 + 1) % 11).collect();
        Batch { rows: 3, seq_len: 5, inputs, targets, index: 0 }
    }

    /// Every parameter's gradient from the f32 model (fused kernels) against central finite
    /// differences of the same model in f64 (plain formulation), and none of them zero.
    fn check_model(cfg: ModelConfig) {
        check_model_from(cfg, |_| {})
    }

    /// `check_model` after `prepare` has changed the initial parameters of both copies.
    fn check_model_from(cfg: ModelConfig, prepare: impl Fn(&Params)) {
        let mut p32 = Params::new(&Device::Cpu, 3, 0.5);
        let m32 = Transformer::new(&cfg, &mut p32).unwrap();
        let mut p64 = Params::new(&Device::Cpu, 3, 0.5).with_dtype(DType::F64);
        let m64 = Transformer::new(&cfg, &mut p64).unwrap();
        prepare(&p32);
        prepare(&p64);
        let b = batch();
        let grads = m32.loss(&b, true).unwrap().total().unwrap().backward().unwrap();
        let loss64 = &|| m64.loss(&b, false).unwrap().total().unwrap().to_scalar::<f64>().unwrap();
        for ((name, v32), (_, v64)) in p32.iter().zip(p64.iter()) {
            // The f32 model's (fused kernels) gradient against the f64 model's differences.
            let g = grad_of(&grads, v32, name);
            assert!(g.iter().any(|&x| x != 0.0), "{name}: gradient is zero at step 0");
            assert_matches_fd(name, v64, &g, 4, (1e-3, 1e-2), loss64);
        }
    }

    #[test]
    fn modern_preset_gradients() {
        check_model(tiny(|_| {}));
    }

    #[test]
    fn paper_preset_gradients() {
        check_model(tiny(|c| {
            c.norm = Norm::Layernorm;
            c.position = Position::Learned;
            c.activation = Activation::Relu;
            c.bias = Bias::Ffn;
            c.final_norm = false;
        }));
    }

    #[test]
    fn qkv_biases_and_grouped_query_gradients() {
        check_model(tiny(|c| {
            (c.bias, c.n_heads, c.n_kv_heads) = (Bias::Qkv, 4, Some(2));
        }));
    }

    #[test]
    fn gelu_all_biases_tied_gradients() {
        check_model(tiny(|c| {
            c.activation = Activation::Gelu;
            c.bias = Bias::All;
            c.tie_embeddings = true;
        }));
    }

    #[test]
    fn moe_model_gradients() {
        check_model(tiny(|c| {
            small_moe(c);
            c.moe.capacity_factor = 0.0;
        }));
    }

    fn pesc(c: &mut ModelConfig) {
        c.ffn = FfnKind::Pesc;
        c.pesc.n_experts = 3;
        c.pesc.adapter_dim = 4;
        c.pesc.adapter_scale = 0.5;
    }

    /// With Up at its zero init, Down and the router's gate get no gradient; give Up values.
    fn perturb_adapters(p: &Params) {
        for (name, v) in p.iter().filter(|(n, _)| n.ends_with("adapters.up")) {
            let r = crate::ops::testing::randn(v.dims(), 5).to_dtype(v.dtype()).unwrap();
            v.set(&(r * 0.3).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn pesc_model_gradients() {
        check_model_from(tiny(pesc), perturb_adapters);
        check_model_from(
            tiny(|c| {
                pesc(c);
                c.activation = Activation::Gelu;
                c.bias = Bias::Ffn;
                c.ffn_layers = crate::config::FfnLayers::List(vec![1]);
            }),
            perturb_adapters,
        );
    }

    /// The upcycling invariant: a PESC model holding a dense model's tensors (and fresh, zero-Up
    /// adapters) computes that model's logits, at every position, for every activation.
    #[test]
    fn fresh_pesc_model_computes_its_dense_model() {
        for act in [Activation::Swiglu, Activation::Gelu, Activation::Relu] {
            let dense_cfg = tiny(|c| c.activation = act);
            let mut pd = Params::new(&Device::Cpu, 1, 0.5);
            let dense = Transformer::new(&dense_cfg, &mut pd).unwrap();
            let pesc_cfg = ModelConfig { ffn: FfnKind::Pesc, ..dense_cfg.clone() };
            let mut pp = Params::new(&Device::Cpu, 2, 0.5);
            let upcycled = Transformer::new(&pesc_cfg, &mut pp).unwrap();
            pp.overwrite(&pd.tensors()).unwrap();
            let ids = Tensor::from_vec(
                (0..15u32).map(|i| (i * 7 + 2) % 11).collect(),
                (3, 5),
                &Device::Cpu,
            )
            .unwrap();
            let diff = (dense.forward(&ids, None).unwrap() - upcycled.forward(&ids, None).unwrap())
                .unwrap();
            let max = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max <= 1e-6, "{act:?}: max |Δlogit| {max}");
            let loss =
                |m: &Transformer| m.loss(&batch(), true).unwrap().ce.to_scalar::<f32>().unwrap();
            assert_eq!(loss(&dense), loss(&upcycled), "{act:?}: training loss differs");
        }
    }

    /// A pass without statistics (training's steps that it does not log) records none and
    /// changes nothing else: the same loss and gradients, bit for bit, MoT and MoE.
    #[test]
    fn statistics_are_recorded_only_where_wanted() {
        for cfg in [tiny(small_mot), tiny(small_moe)] {
            let mut p = Params::new(&Device::Cpu, 4, 0.5);
            let model = Transformer::new(&cfg, &mut p).unwrap();
            let run = |stats: bool| {
                let parts =
                    model.loss_with(&batch(), true, Want { per_token: false, stats }).unwrap();
                let l = parts.total().unwrap();
                let grads = l.backward().unwrap();
                let grads: Vec<Vec<f32>> = p
                    .iter()
                    .map(|(_, v)| grads.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                    .collect();
                (parts.stats.len(), l.to_scalar::<f32>().unwrap(), grads)
            };
            let (with, without) = (run(true), run(false));
            assert_eq!(with.0, cfg.n_layers, "{:?}: one entry per sparse layer", cfg.ffn);
            assert_eq!(without.0, 0, "{:?}: statistics recorded unasked", cfg.ffn);
            assert_eq!(with.1.to_bits(), without.1.to_bits(), "{:?}: the loss differs", cfg.ffn);
            assert!(with.2 == without.2, "{:?}: the gradients differ", cfg.ffn);
        }
    }

    /// `train.recompute_experts` trades memory for compute and changes nothing else: the same
    /// loss and gradients, MoT and MoE, gated and not.
    #[test]
    fn recomputed_experts_give_the_same_loss_and_gradients() {
        for cfg in [
            tiny(small_mot),
            tiny(small_moe),
            tiny(|c| {
                small_moe(c);
                c.activation = Activation::Gelu;
            }),
        ] {
            let mut p = Params::new(&Device::Cpu, 3, 0.5);
            let model = Transformer::new(&cfg, &mut p).unwrap();
            let run = |m: &Transformer| {
                let l = m.loss(&batch(), true).unwrap().total().unwrap();
                (l.to_scalar::<f32>().unwrap(), l.backward().unwrap())
            };
            let (l0, g0) = run(&model);
            let (l1, g1) = run(&model.with_recompute_experts(true));
            assert!((l0 - l1).abs() < 1e-6, "{:?}: loss {l0} vs {l1}", cfg.ffn);
            for (name, v) in p.iter() {
                let (a, b) = (
                    g0.get(v).unwrap(),
                    g1.get(v).unwrap_or_else(|| panic!("{name}: no gradient when recomputing")),
                );
                let d =
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "{:?} {name}: gradients differ by {d}", cfg.ffn);
            }
        }
    }

    #[test]
    fn mot_model_gradients() {
        check_model(tiny(|c| {
            c.ffn = FfnKind::Mot;
            c.ffn_layers = crate::config::FfnLayers::Named("second_half".into());
            c.mot.n_experts = 2;
            c.mot.group_size = 3;
            c.mot.learn_temperature = true;
        }));
    }
}
