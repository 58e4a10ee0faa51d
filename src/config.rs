//! The TOML schema: typed tables with the defaults of `product.md`, `--set` overrides,
//! validation with errors that name the key, and the resolved config written into a run.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything that can be wrong with a config file or an override.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{origin}: malformed TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

type Result<T> = std::result::Result<T, ConfigError>;

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
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub name: String,
    #[serde(default = "d_out_dir")]
    pub out_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_device")]
    pub device: String,
    #[serde(default = "d_dtype")]
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub train: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    #[serde(default = "d_format")]
    pub format: String,
    #[serde(default = "d_seq_len")]
    pub seq_len: usize,
    /// `random` (windows at seeded random offsets) or `epoch` (each window once per epoch, in a
    /// seeded order); see `data::loader::Sampler`.
    #[serde(default = "d_sampler")]
    pub sampler: String,
    /// Extension to the spec: the tokenizer that made the shards (`gpt2` or a tokenizer.json),
    /// so that `generate` and `export` can turn ids back into text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    #[serde(default = "d_128")]
    pub d_model: usize,
    #[serde(default = "d_4")]
    pub n_layers: usize,
    #[serde(default = "d_4")]
    pub n_heads: usize,
    #[serde(default = "d_512")]
    pub d_ff: usize,
    #[serde(default = "d_norm")]
    pub norm: Norm,
    #[serde(default = "d_position")]
    pub position: Position,
    #[serde(default)]
    pub max_seq_len: usize,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_activation")]
    pub activation: Activation,
    #[serde(default = "d_bias")]
    pub bias: Bias,
    #[serde(default)]
    pub tie_embeddings: bool,
    #[serde(default = "d_true")]
    pub final_norm: bool,
    #[serde(default = "d_init_scale")]
    pub init_scale: f64,
    #[serde(default = "d_ffn")]
    pub ffn: FfnKind,
    #[serde(default = "d_ffn_layers")]
    pub ffn_layers: FfnLayers,
    #[serde(default)]
    pub mot: MotConfig,
    #[serde(default)]
    pub moe: MoeConfig,
    #[serde(default)]
    pub pesc: PescConfig,
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    None,
    Ffn,
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

impl Default for MotConfig {
    fn default() -> Self {
        Self { n_experts: 32, group_size: 32, expert_size: 0, temperature: 1.0, learn_temperature: false }
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
    pub gate: Gate,
    pub capacity_factor: f64,
    pub group_size: usize,
    pub aux_loss_weight: f64,
    pub z_loss_weight: f64,
    pub xmoe_dim: usize,
    pub xmoe_temperature: f64,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            routing: Routing::TokenChoice,
            router: RouterKind::Linear,
            n_experts: 8,
            top_k: 1,
            expert_size: 0,
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
    /// Switch: the chosen expert's softmax probability over all experts.
    Softmax,
    /// Mixtral: the chosen probabilities renormalised over the top k.
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
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    Stop,
    Skip,
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
        }
    }
}

fn d_out_dir() -> PathBuf {
    "runs".into()
}
fn d_device() -> String {
    "auto".into()
}
fn d_dtype() -> String {
    "f32".into()
}
fn d_format() -> String {
    "llmc".into()
}
fn d_sampler() -> String {
    "random".into()
}
fn d_seq_len() -> usize {
    128
}
fn d_128() -> usize {
    128
}
fn d_4() -> usize {
    4
}
fn d_512() -> usize {
    512
}
fn d_norm() -> Norm {
    Norm::Rmsnorm
}
fn d_position() -> Position {
    Position::Rope
}
fn d_theta() -> f64 {
    10000.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_activation() -> Activation {
    Activation::Swiglu
}
fn d_bias() -> Bias {
    Bias::None
}
fn d_true() -> bool {
    true
}
fn d_init_scale() -> f64 {
    0.1
}
fn d_ffn() -> FfnKind {
    FfnKind::Dense
}
fn d_ffn_layers() -> FfnLayers {
    FfnLayers::Named("all".into())
}

impl Config {
    /// Reads a config file, applies `--set` overrides, resolves paths and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let origin = path.display().to_string();
        let mut value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { origin: origin.clone(), message: one_line(&e.to_string()) })?;
        // Paths in [data] are relative to the file, paths from `--set` to the current directory,
        // so anchor the file's own paths before the overrides land.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        anchor_data_paths(&mut value, &base);
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        let config = Self::from_table(value, &origin)?;
        Ok(config)
    }

    /// Parses an already resolved table (a run's config.toml or a checkpoint's state.json).
    pub fn from_table(value: toml::Table, origin: &str) -> Result<Config> {
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().message().to_string();
            let message = if path == "." || path.is_empty() {
                inner
            } else {
                format!("key `{path}`: {inner}")
            };
            ConfigError::Invalid { origin: origin.to_string(), message }
        })?;
        config.resolve();
        config.validate().map_err(|message| ConfigError::Invalid { origin: origin.to_string(), message })?;
        Ok(config)
    }

    /// Parses the text of a resolved config.toml.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { origin: origin.into(), message: one_line(&e.to_string()) })?;
        Self::from_table(value, origin)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Config always serialises")
    }

    /// Fills the zero-means-derived defaults so that every later reader sees one number.
    fn resolve(&mut self) {
        if self.model.max_seq_len == 0 {
            self.model.max_seq_len = self.data.seq_len;
        }
        if self.train.micro_batch_size == 0 {
            self.train.micro_batch_size = self.train.batch_size;
        }
        if self.train.eval_batch_size == 0 {
            self.train.eval_batch_size = self.train.micro_batch_size;
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }

    /// Points `run.out_dir` and `run.name` at `dir` (made absolute): for configs that commands
    /// derive and write into a run directory of the user's choosing.
    pub fn place_run(&mut self, dir: &Path) {
        let dir = PathBuf::from(absolute(dir));
        self.run.out_dir = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        self.run.name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    }

    /// Gradient accumulation steps per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.train.batch_size / self.train.micro_batch_size
    }

    /// Every check of `product.md`, with a message that names the key and the valid values.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        let t = &self.train;
        let positive = [
            ("data.seq_len", self.data.seq_len),
            ("model.vocab_size", m.vocab_size),
            ("model.d_model", m.d_model),
            ("model.n_layers", m.n_layers),
            ("model.n_heads", m.n_heads),
            ("model.d_ff", m.d_ff),
            ("train.batch_size", t.batch_size),
            ("train.steps", t.steps),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        if self.run.name.is_empty() || self.run.name.contains(['/', '\\']) || self.run.name == "." || self.run.name == ".." {
            return Err(format!("`run.name` must be a plain directory name, got {:?}", self.run.name));
        }
        match self.run.device.as_str() {
            "auto" | "cpu" | "cuda" => {}
            d if d.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()) => {}
            d => return Err(format!("`run.device` = {d:?}: expected auto, cpu, cuda or cuda:N")),
        }
        match self.run.dtype.as_str() {
            "f32" => {}
            "bf16" => {
                if !self.run.device.starts_with("cuda") {
                    return Err("`run.dtype` = \"bf16\" needs `run.device` = \"cuda\" (bf16 is mixed precision on GPUs only)".into());
                }
            }
            d => return Err(format!("`run.dtype` = {d:?}: expected f32 or bf16")),
        }
        if !matches!(self.data.format.as_str(), "llmc" | "nanogpt") {
            return Err(format!("`data.format` = {:?}: expected llmc or nanogpt", self.data.format));
        }
        if crate::data::loader::Sampler::parse(&self.data.sampler).is_none() {
            return Err(format!("`data.sampler` = {:?}: expected random or epoch", self.data.sampler));
        }
        if m.d_model % m.n_heads != 0 {
            return Err(format!("`model.d_model` ({}) must be divisible by `model.n_heads` ({})", m.d_model, m.n_heads));
        }
        if m.position == Position::Rope && (m.d_model / m.n_heads) % 2 != 0 {
            return Err(format!("rope needs an even head width, got d_model/n_heads = {}", m.d_model / m.n_heads));
        }
        if self.data.seq_len > m.max_seq_len {
            return Err(format!("`data.seq_len` ({}) exceeds `model.max_seq_len` ({})", self.data.seq_len, m.max_seq_len));
        }
        if !(m.norm_eps > 0.0) {
            return Err(format!("`model.norm_eps` must be > 0, got {}", m.norm_eps));
        }
        if !(m.rope_theta > 0.0) {
            return Err(format!("`model.rope_theta` must be > 0, got {}", m.rope_theta));
        }
        if !(m.init_scale > 0.0) {
            return Err(format!("`model.init_scale` must be > 0, got {}", m.init_scale));
        }
        // Absurd sizes (a corrupt or hostile file) must fail here, not abort in an allocation.
        if m.n_layers > 1 << 16 {
            return Err(format!("`model.n_layers` = {} is beyond any trainable model (at most 65536)", m.n_layers));
        }
        let elements = estimated_elements(m);
        if elements > (1u64 << 40) as f64 {
            return Err(format!(
                "the model would hold {elements:.3e} parameters and tables, beyond what motrain can allocate (2^40); check model.vocab_size, d_model, d_ff, n_layers, max_seq_len and the expert and adapter sizes"
            ));
        }
        self.ffn_layer_mask().map(|_| ())?;
        match m.ffn {
            FfnKind::Dense => {}
            FfnKind::Moe => self.validate_moe()?,
            FfnKind::Mot => self.validate_mot()?,
            FfnKind::Pesc => self.validate_pesc()?,
        }
        if t.micro_batch_size == 0 || t.batch_size % t.micro_batch_size != 0 {
            return Err(format!(
                "`train.batch_size` ({}) must be a multiple of `train.micro_batch_size` ({})",
                t.batch_size, t.micro_batch_size
            ));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(format!("`train.lr` must be a positive number, got {}", t.lr));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(format!("`train.min_lr_ratio` must be in [0, 1], got {}", t.min_lr_ratio));
        }
        if !(t.weight_decay >= 0.0) {
            return Err(format!("`train.weight_decay` must be >= 0, got {}", t.weight_decay));
        }
        for (i, b) in t.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(format!("`train.betas[{i}]` must be in [0, 1), got {b}"));
            }
        }
        if !(t.eps > 0.0) {
            return Err(format!("`train.eps` must be > 0, got {}", t.eps));
        }
        if !(t.grad_clip >= 0.0) {
            return Err(format!("`train.grad_clip` must be >= 0 (0 = off), got {}", t.grad_clip));
        }
        if t.log_every == 0 {
            return Err("`train.log_every` must be at least 1".into());
        }
        if t.eval_batch_size == 0 {
            return Err("`train.eval_batch_size` must be at least 1".into());
        }
        if t.keep_checkpoints == 0 {
            return Err("`train.keep_checkpoints` must be at least 1".into());
        }
        Ok(())
    }

    fn validate_moe(&self) -> std::result::Result<(), String> {
        let moe = &self.model.moe;
        if moe.n_experts == 0 {
            return Err("`model.moe.n_experts` must be at least 1".into());
        }
        if moe.top_k == 0 || moe.top_k > moe.n_experts {
            return Err(format!("`model.moe.top_k` ({}) must be between 1 and `model.moe.n_experts` ({})", moe.top_k, moe.n_experts));
        }
        if !(moe.capacity_factor >= 0.0 && moe.capacity_factor.is_finite()) {
            return Err(format!("`model.moe.capacity_factor` must be >= 0 (0 = dropless), got {}", moe.capacity_factor));
        }
        for (key, v) in [("aux_loss_weight", moe.aux_loss_weight), ("z_loss_weight", moe.z_loss_weight)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("`model.moe.{key}` must be >= 0, got {v}"));
            }
        }
        if moe.router == RouterKind::Xmoe && (moe.xmoe_dim == 0 || !(moe.xmoe_temperature > 0.0)) {
            return Err("`model.moe.xmoe_dim` must be >= 1 and `model.moe.xmoe_temperature` > 0".into());
        }
        if moe.routing == Routing::ExpertChoice {
            let g = moe.group_size;
            if g == 0 {
                return Err("`model.moe.group_size` must be at least 1".into());
            }
            if moe.capacity_factor == 0.0 {
                return Err("expert choice needs `model.moe.capacity_factor` > 0: it sets how many tokens each expert takes".into());
            }
            for (key, b) in [("train.micro_batch_size", self.train.micro_batch_size), ("train.eval_batch_size", self.train.eval_batch_size)] {
                if b % g != 0 {
                    return Err(format!(
                        "expert choice groups `model.moe.group_size` = {g} sequences at one position, so `{key}` ({b}) must be a multiple of it"
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_mot(&self) -> std::result::Result<(), String> {
        let mot = &self.model.mot;
        if mot.n_experts == 0 || mot.group_size == 0 {
            return Err("`model.mot.n_experts` and `model.mot.group_size` must be at least 1".into());
        }
        if !(mot.temperature > 0.0 && mot.temperature.is_finite()) {
            return Err(format!("`model.mot.temperature` must be > 0, got {}", mot.temperature));
        }
        if mot.expert_size == 0 && self.model.d_ff * mot.group_size < mot.n_experts {
            return Err(format!(
                "the FLOP-matched expert width d_ff·group_size/n_experts = {}·{}/{} rounds to 0: set `model.mot.expert_size`",
                self.model.d_ff, mot.group_size, mot.n_experts
            ));
        }
        let g = mot.group_size;
        for (key, b) in [("train.micro_batch_size", self.train.micro_batch_size), ("train.eval_batch_size", self.train.eval_batch_size)] {
            if b % g != 0 {
                return Err(format!(
                    "Mixture of Tokens mixes `model.mot.group_size` = {g} sequences at one position, so `{key}` ({b}) must be a multiple of it"
                ));
            }
        }
        Ok(())
    }

    fn validate_pesc(&self) -> std::result::Result<(), String> {
        let p = &self.model.pesc;
        if p.n_experts == 0 || p.adapter_dim == 0 {
            return Err("`model.pesc.n_experts` and `model.pesc.adapter_dim` must be at least 1".into());
        }
        if p.top_k == 0 || p.top_k > p.n_experts {
            return Err(format!("`model.pesc.top_k` ({}) must be between 1 and `model.pesc.n_experts` ({})", p.top_k, p.n_experts));
        }
        if !p.adapter_scale.is_finite() {
            return Err(format!("`model.pesc.adapter_scale` must be a finite number, got {}", p.adapter_scale));
        }
        if !(0.0..1.0).contains(&p.adapter_dropout) {
            return Err(format!("`model.pesc.adapter_dropout` must be in [0, 1), got {}", p.adapter_dropout));
        }
        for (key, v) in [("aux_loss_weight", p.aux_loss_weight), ("z_loss_weight", p.z_loss_weight)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("`model.pesc.{key}` must be >= 0, got {v}"));
            }
        }
        Ok(())
    }

    /// A config derived from this one (by `transition-tune` or `upcycle`) with the user's
    /// `--set` overrides applied on top, validated like a file.
    pub fn with_overrides(&self, overrides: &[String], origin: &str) -> Result<Config> {
        let mut table: toml::Table =
            toml::from_str(&self.to_toml()).map_err(|e| ConfigError::Invalid { origin: origin.into(), message: e.to_string() })?;
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        Config::from_table(table, origin)
    }

    /// Width of one expert.
    pub fn moe_expert_size(&self) -> usize {
        if self.model.moe.expert_size == 0 {
            self.model.d_ff
        } else {
            self.model.moe.expert_size
        }
    }

    /// For each block, whether it gets `model.ffn` (true) or keeps a dense FFN.
    pub fn ffn_layer_mask(&self) -> std::result::Result<Vec<bool>, String> {
        ffn_layer_mask(&self.model)
    }
}

/// For each block, whether it gets `model.ffn` (true) or keeps a dense FFN.
pub fn ffn_layer_mask(model: &ModelConfig) -> std::result::Result<Vec<bool>, String> {
    {
        let n = model.n_layers;
        match &model.ffn_layers {
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

/// Parameters plus position tables, as a float (no overflow), for the sanity bound.
fn estimated_elements(m: &ModelConfig) -> f64 {
    let (v, d, f, l, t) = (m.vocab_size as f64, m.d_model as f64, m.d_ff as f64, m.n_layers as f64, m.max_seq_len as f64);
    let experts = match m.ffn {
        FfnKind::Moe => m.moe.n_experts.max(1) as f64 * (m.moe.expert_size.max(m.d_ff)) as f64 / f.max(1.0),
        FfnKind::Mot => m.mot.n_experts.max(1) as f64 * crate::model::mot::expert_size(&m.mot, m.d_ff) as f64 / f.max(1.0),
        _ => 1.0,
    };
    let adapters = match m.ffn {
        FfnKind::Pesc => m.pesc.n_experts as f64 * (2.0 * m.pesc.adapter_dim as f64 + 1.0) * d,
        _ => 0.0,
    };
    2.0 * v * d + t * d + l * (4.0 * d * d + 3.0 * d * f * experts + adapters)
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Makes the relative `[data]` paths of a file absolute against its directory.
fn anchor_data_paths(value: &mut toml::Table, base: &Path) {
    let Some(toml::Value::Table(data)) = value.get_mut("data") else { return };
    for key in ["train", "val", "tokenizer"] {
        if let Some(toml::Value::String(s)) = data.get_mut(key) {
            if key == "tokenizer" && s == "gpt2" {
                continue;
            }
            *s = absolute(&base.join(&*s));
        }
    }
}

/// An absolute path with `.` and `..` folded away lexically (globs need not exist yet).
pub fn absolute(p: &Path) -> String {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out.display().to_string()
}

/// Applies one `KEY=VALUE` override: the value is TOML, or a bare string.
pub fn apply_override(value: &mut toml::Table, arg: &str) -> Result<()> {
    let err = |message: String| ConfigError::Override { arg: arg.to_string(), message };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected KEY=VALUE, e.g. model.d_model=256".into()))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("`{key}` is not a dotted key path")));
    }
    let raw = raw.trim();
    let mut parsed = parse_value(raw);
    // Paths given on the command line are relative to the current directory.
    if let (["data", "train" | "val" | "tokenizer"], toml::Value::String(s)) = (parts.as_slice(), &parsed) {
        if s != "gpt2" {
            parsed = toml::Value::String(absolute(Path::new(s)));
        }
    }
    let mut table = value;
    for part in &parts[..parts.len() - 1] {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(err(format!("`{part}` is a value, not a table"))),
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p, &[])
    }

    const MIN: &str = "[run]\nname='t'\n[data]\ntrain='x/*.bin'\n[model]\nvocab_size=100\n";

    #[test]
    fn defaults_fill_in() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.model.d_model, 128);
        assert_eq!(c.model.max_seq_len, 128);
        assert_eq!(c.train.micro_batch_size, 32);
        assert_eq!(c.train.eval_batch_size, 32);
        assert!(c.data.train.ends_with("x/*.bin") && Path::new(&c.data.train).is_absolute());
    }

    #[test]
    fn unknown_key_is_named_with_its_table() {
        let e = parse(&format!("{MIN}bogus=1\n")).unwrap_err().to_string();
        assert!(e.contains("model.bogus") || e.contains("bogus"), "{e}");
        assert!(e.contains("model"), "{e}");
    }

    #[test]
    fn overrides_parse_toml_and_bare_words() {
        let mut t: toml::Table = MIN.parse().unwrap();
        apply_override(&mut t, "model.d_model=64").unwrap();
        apply_override(&mut t, "model.norm=layernorm").unwrap();
        apply_override(&mut t, "train.betas=[0.8, 0.9]").unwrap();
        let c = Config::from_table(t, "test").unwrap();
        assert_eq!(c.model.d_model, 64);
        assert_eq!(c.model.norm, Norm::Layernorm);
        assert_eq!(c.train.betas, [0.8, 0.9]);
    }

    #[test]
    fn bad_values_are_rejected() {
        for (set, needle) in [
            ("model.n_heads=3", "divisible"),
            ("model.norm=\"batchnorm\"", "model.norm"),
            ("train.micro_batch_size=5", "multiple"),
            ("model.d_model=\"big\"", "model.d_model"),
            ("model.ffn_layers=[9]", "block 9"),
            ("run.dtype=\"bf16\"", "cuda"),
        ] {
            let mut t: toml::Table = MIN.parse().unwrap();
            apply_override(&mut t, set).unwrap();
            let e = Config::from_table(t, "test").unwrap_err().to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = parse(MIN).unwrap();
        let back = Config::from_toml_str(&c.to_toml(), "back").unwrap();
        assert_eq!(c, back);
    }
}
