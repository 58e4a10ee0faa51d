//! The TOML schema as plain data: every table of `product.md` with its defaults (`impl
//! Default`), and the small facts derived from one table alone (expert widths, the FFN layer
//! mask). Parsing lives in `config`, the checks in `config::validate`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub name: String,
    pub out_dir: PathBuf,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        // `name` has no default: validation reports it missing.
        Self {
            name: String::new(),
            out_dir: "runs".into(),
            seed: 0,
            device: "auto".into(),
            dtype: "f32".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The one train glob, or empty when `sources` names several.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub train: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    /// `[[data.sources]]`: several corpora mixed by weight, instead of `train`/`val`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<SourceConfig>>,
    pub format: String,
    pub seq_len: usize,
    /// How training draws its windows.
    pub sampler: Sampler,
    /// Extension to the spec: the tokenizer that made the shards (`gpt2` or a tokenizer.json),
    /// so that `generate` and `export` can turn ids back into text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        // `train` has no default: validation reports it missing.
        Self {
            train: String::new(),
            val: None,
            sources: None,
            format: "llmc".into(),
            seq_len: 128,
            sampler: Sampler::Random,
            tokenizer: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; unset = `n_heads` (multi-head attention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    pub d_ff: usize,
    pub norm: Norm,
    pub position: Position,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    /// Longer contexts from RoPE: Hugging Face's `rope_scaling` (linear or Llama 3's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub norm_eps: f64,
    pub activation: Activation,
    pub bias: Bias,
    pub tie_embeddings: bool,
    pub final_norm: bool,
    pub init_scale: f64,
    pub ffn: FfnKind,
    pub ffn_layers: FfnLayers,
    pub mot: MotConfig,
    pub moe: MoeConfig,
    pub pesc: PescConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        // `vocab_size` has no default: validation reports it missing.
        Self {
            vocab_size: 0,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: None,
            d_ff: 512,
            norm: Norm::Rmsnorm,
            position: Position::Rope,
            max_seq_len: 0,
            rope_theta: 10000.0,
            rope_scaling: None,
            norm_eps: 1e-5,
            activation: Activation::Swiglu,
            bias: Bias::None,
            tie_embeddings: false,
            final_norm: true,
            init_scale: 0.1,
            ffn: FfnKind::Dense,
            ffn_layers: FfnLayers::Named("all".into()),
            mot: MotConfig::default(),
            moe: MoeConfig::default(),
            pesc: PescConfig::default(),
        }
    }
}

/// One corpus of a mixture: its shards and its share of the rows of every batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// What logs call it; derived from the train glob when not given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub train: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    /// Relative: the weights of all sources are normalised to sum to 1.
    pub weight: f64,
}

impl DataConfig {
    /// Whether the config mixes `[[data.sources]]` (then logs and evals name each source).
    pub fn is_mixture(&self) -> bool {
        self.sources.is_some()
    }

    /// The train sources: the `[[data.sources]]`, or `train`/`val` as one source of weight 1.
    pub fn source_list(&self) -> Vec<SourceConfig> {
        match &self.sources {
            Some(s) => s.clone(),
            None => vec![SourceConfig {
                name: "data".into(),
                train: self.train.clone(),
                val: self.val.clone(),
                weight: 1.0,
            }],
        }
    }

    /// Names the sources that have none: the shard prefix of the train glob (`web` for
    /// `data/web_train_*.bin`), else its directory, else `source{i}`; `-{i}` is appended to a
    /// name already taken. Names given in the file are kept as they are.
    pub fn name_sources(&mut self) {
        let Some(sources) = &mut self.sources else { return };
        let mut taken: Vec<String> =
            sources.iter().filter(|s| !s.name.is_empty()).map(|s| s.name.clone()).collect();
        for (i, s) in sources.iter_mut().enumerate().filter(|(_, s)| s.name.is_empty()) {
            let mut name = derived_name(&s.train).unwrap_or_else(|| format!("source{i}"));
            if taken.contains(&name) {
                name = format!("{name}-{i}");
            }
            taken.push(name.clone());
            s.name = name;
        }
    }
}

/// `web` for `…/web_train_*.bin`, `quickstart` for `…/quickstart/*_train_*.bin`.
fn derived_name(glob: &str) -> Option<String> {
    let plain = |s: &str| !s.is_empty() && !s.contains(['*', '?', '[', ']']);
    let path = std::path::Path::new(glob);
    let file = path.file_name()?.to_string_lossy();
    let prefix = file.split("_train").next().unwrap_or_default();
    if plain(prefix) {
        return Some(prefix.to_string());
    }
    let dir = path.parent()?.file_name()?.to_string_lossy().into_owned();
    plain(&dir).then_some(dir)
}

/// How training draws its windows of `seq_len + 1` tokens from the train shards.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// At seeded random offsets, with replacement (the default).
    Random,
    /// Each window once per epoch, in a seeded shuffled order.
    Epoch,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    Rmsnorm,
    Layernorm,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Rope,
    Learned,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Swiglu,
    Gelu,
    Relu,
}

/// `model.rope_scaling`, with the keys and meaning of `rope_scaling` in a Hugging Face
/// `config.json`: `linear` divides every frequency by `factor`; `llama3` (Llama 3.1) divides
/// the low frequencies by `factor`, keeps the high ones and blends those between.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// `type` is the spec's (and older HF configs') name for it.
    #[serde(alias = "type")]
    pub rope_type: RopeScalingKind,
    pub factor: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RopeScalingKind {
    Linear,
    Llama3,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    None,
    Ffn,
    /// On the q, k and v projections only (Qwen2).
    Qkv,
    All,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    Dense,
    Moe,
    Mot,
    Pesc,
}

/// Which blocks get the `ffn` kind; the others keep a dense FFN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FfnLayers {
    Named(String),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MotConfig {
    pub n_experts: usize,
    pub group_size: usize,
    pub expert_size: usize,
    pub temperature: f64,
    pub learn_temperature: bool,
}

impl MotConfig {
    /// The expert width: `expert_size`, or FLOP-matched `d_ff · G / E` so that the expert compute
    /// per token equals a dense FFN of width `d_ff`.
    pub fn expert_width(&self, d_ff: usize) -> usize {
        if self.expert_size > 0 {
            self.expert_size
        } else {
            d_ff * self.group_size / self.n_experts.max(1)
        }
    }
}

impl Default for MotConfig {
    fn default() -> Self {
        Self {
            n_experts: 32,
            group_size: 32,
            expert_size: 0,
            temperature: 1.0,
            learn_temperature: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    pub routing: Routing,
    pub router: RouterKind,
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_size: usize,
    /// Width of a shared expert that every token passes through beside its routed ones, its
    /// output scaled by a learned sigmoid gate (Qwen2-MoE); 0 = none.
    pub shared_expert_size: usize,
    pub gate: Gate,
    pub capacity_factor: f64,
    pub group_size: usize,
    pub aux_loss_weight: f64,
    pub z_loss_weight: f64,
    pub xmoe_dim: usize,
    pub xmoe_temperature: f64,
}

impl MoeConfig {
    /// The expert width: `expert_size`, or `d_ff`.
    pub fn expert_width(&self, d_ff: usize) -> usize {
        if self.expert_size > 0 {
            self.expert_size
        } else {
            d_ff
        }
    }
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            routing: Routing::TokenChoice,
            router: RouterKind::Linear,
            n_experts: 8,
            top_k: 1,
            expert_size: 0,
            shared_expert_size: 0,
            gate: Gate::Softmax,
            capacity_factor: 1.25,
            group_size: 32,
            aux_loss_weight: 0.01,
            z_loss_weight: 0.001,
            xmoe_dim: 16,
            xmoe_temperature: 0.07,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    TokenChoice,
    ExpertChoice,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    Linear,
    Xmoe,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Switch: the chosen expert's softmax probability over all experts (Qwen2-MoE's
    /// `norm_topk_prob = false`).
    Softmax,
    /// Mixtral: the chosen probabilities renormalised over the top k (`norm_topk_prob = true`).
    SoftmaxTopk,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PescConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub adapter_dim: usize,
    pub adapter_scale: f64,
    pub adapter_dropout: f64,
    pub aux_loss_weight: f64,
    pub z_loss_weight: f64,
    pub train_only_adapters: bool,
}

impl Default for PescConfig {
    fn default() -> Self {
        Self {
            n_experts: 8,
            top_k: 2,
            adapter_dim: 64,
            adapter_scale: 1.0,
            adapter_dropout: 0.0,
            aux_loss_weight: 0.01,
            z_loss_weight: 0.0,
            train_only_adapters: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
    Wsd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub steps: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub grad_clip: f64,
    pub log_every: usize,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub eval_batch_size: usize,
    pub ckpt_every: usize,
    pub keep_checkpoints: usize,
    /// The step count the learning-rate schedule spans; 0 = `steps`. Transition tuning sets it
    /// to the MoT run's, so the schedule continues instead of starting over.
    pub schedule_steps: usize,
    /// What a non-finite loss or gradient norm does: stop the run, or skip that update.
    pub on_nan: NanPolicy,
    /// MoE and MoT experts keep no hidden activations for backward and recompute them there,
    /// one expert at a time: less memory, for the up projection's matmuls once more (measured:
    /// 8–13 % more expert time on bench-mot).
    pub recompute_experts: bool,
    /// 1: AdamW's moments sharded over the data-parallel ranks (ZeRO stage 1); 0: every
    /// rank holds them all.
    pub zero: u8,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    Stop,
    Skip,
}

impl TrainConfig {
    /// Whether training logs step `step` (counted from 1): every `log_every`-th and the last.
    pub fn logs_step(&self, step: usize) -> bool {
        step.is_multiple_of(self.log_every) || step == self.steps
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            micro_batch_size: 0,
            steps: 1000,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            betas: [0.9, 0.95],
            eps: 1e-8,
            grad_clip: 1.0,
            log_every: 10,
            eval_every: 200,
            eval_batches: 20,
            eval_batch_size: 0,
            ckpt_every: 500,
            keep_checkpoints: 3,
            schedule_steps: 0,
            on_nan: NanPolicy::Stop,
            recompute_experts: false,
            zero: 0,
        }
    }
}

impl ModelConfig {
    /// Key/value heads: `n_kv_heads`, or one per query head.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// For each block, whether it gets `model.ffn` (true) or keeps a dense FFN.
    pub fn ffn_layer_mask(&self) -> Result<Vec<bool>, String> {
        let n = self.n_layers;
        match &self.ffn_layers {
            FfnLayers::Named(s) if s == "all" => Ok(vec![true; n]),
            FfnLayers::Named(s) if s == "second_half" => Ok((0..n).map(|i| i >= n / 2).collect()),
            FfnLayers::Named(s) => Err(format!("`model.ffn_layers` = {s:?}: expected \"all\", \"second_half\" or a list of block indices")),
            FfnLayers::List(list) => {
                let mut mask = vec![false; n];
                for &i in list {
                    if i >= n {
                        return Err(format!("`model.ffn_layers` names block {i}, but the model has {n} blocks (0..{})", n - 1));
                    }
                    mask[i] = true;
                }
                Ok(mask)
            }
        }
    }
}
