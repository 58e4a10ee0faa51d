//! Every check of `product.md` on a parsed config, with a message that names the key and the
//! valid values. Runs once, when a config is loaded; everything after may rely on it.

// `!(x > 0.0)` is meant: unlike `x <= 0.0` it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use super::*;

impl Config {
    /// Every check of `product.md`, with a message that names the key and the valid values.
    pub fn validate(&self) -> std::result::Result<(), String> {
        // Every number, used by this model or not, goes into state.json, where JSON has no NaN
        // or infinity: one there would make every checkpoint of the run unreadable.
        if let Ok(value) = toml::Value::try_from(self) {
            if let Some(key) = non_finite(&value, "") {
                return Err(format!("`{key}` must be a finite number"));
            }
        }
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
        if self.run.name.is_empty() {
            return Err("`run.name` is required".into());
        }
        self.validate_sources()?;
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        if self.run.name.is_empty()
            || self.run.name.contains(['/', '\\'])
            || self.run.name == "."
            || self.run.name == ".."
        {
            return Err(format!(
                "`run.name` must be a plain directory name, got {:?}",
                self.run.name
            ));
        }
        match self.run.device.as_str() {
            "auto" | "cpu" | "cuda" => {}
            d if d.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()) => {}
            d => return Err(format!("`run.device` = {d:?}: expected auto, cpu, cuda or cuda:N")),
        }
        match self.run.dtype.as_str() {
            "f32" => {}
            // Whether this machine's CPU can is checked when the run starts (`train`).
            "bf16" => {}
            d => return Err(format!("`run.dtype` = {d:?}: expected f32 or bf16")),
        }
        if !matches!(self.data.format.as_str(), "llmc" | "nanogpt") {
            return Err(format!(
                "`data.format` = {:?}: expected llmc or nanogpt",
                self.data.format
            ));
        }
        if !m.d_model.is_multiple_of(m.n_heads) {
            return Err(format!(
                "`model.d_model` ({}) must be divisible by `model.n_heads` ({})",
                m.d_model, m.n_heads
            ));
        }
        if let Some(kv) = m.n_kv_heads {
            if kv == 0 || !m.n_heads.is_multiple_of(kv) {
                return Err(format!(
                    "`model.n_kv_heads` ({kv}) must divide `model.n_heads` ({}): each key/value head serves a whole group of query heads",
                    m.n_heads
                ));
            }
        }
        if m.position == Position::Rope && !(m.d_model / m.n_heads).is_multiple_of(2) {
            return Err(format!(
                "rope needs an even head width, got d_model/n_heads = {}",
                m.d_model / m.n_heads
            ));
        }
        if self.data.seq_len > m.max_seq_len {
            return Err(format!(
                "`data.seq_len` ({}) exceeds `model.max_seq_len` ({})",
                self.data.seq_len, m.max_seq_len
            ));
        }
        if !(m.norm_eps > 0.0) {
            return Err(format!("`model.norm_eps` must be > 0, got {}", m.norm_eps));
        }
        if let Some(s) = &m.rope_scaling {
            s.validate()?;
        }
        if !(m.rope_theta > 0.0) {
            return Err(format!("`model.rope_theta` must be > 0, got {}", m.rope_theta));
        }
        if !(m.init_scale > 0.0) {
            return Err(format!("`model.init_scale` must be > 0, got {}", m.init_scale));
        }
        // Absurd sizes (a corrupt or hostile file) must fail here, not abort in an allocation.
        if m.n_layers > 1 << 16 {
            return Err(format!(
                "`model.n_layers` = {} is beyond any trainable model (at most 65536)",
                m.n_layers
            ));
        }
        let elements = estimated_elements(m);
        if elements > (1u64 << 40) as f64 {
            return Err(format!(
                "the model would hold {elements:.3e} parameters and tables, beyond what motrain can allocate (2^40); check model.vocab_size, d_model, d_ff, n_layers, max_seq_len and the expert and adapter sizes"
            ));
        }
        m.ffn_layer_mask().map(|_| ())?;
        match m.ffn {
            FfnKind::Dense => {}
            FfnKind::Moe => self.validate_moe()?,
            FfnKind::Mot => self.validate_mot()?,
            FfnKind::Pesc => self.validate_pesc()?,
        }
        if t.micro_batch_size == 0 || !t.batch_size.is_multiple_of(t.micro_batch_size) {
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
        if t.eval_batch_size == 0 || t.eval_batches == 0 {
            return Err(
                "`train.eval_batch_size` and `train.eval_batches` must be at least 1".into()
            );
        }
        if t.zero > 1 {
            return Err(format!("`train.zero` = {}: expected 0 (off) or 1 (ZeRO-1: shard AdamW's moments over the ranks)", t.zero));
        }
        if t.keep_checkpoints == 0 {
            return Err("`train.keep_checkpoints` must be at least 1".into());
        }
        Ok(())
    }

    /// What `train` needs beyond a valid config: data to train on. A config without any is
    /// valid (an imported model's run has none yet) but cannot train.
    pub fn require_data(&self) -> std::result::Result<(), String> {
        if self.data.train.is_empty() && self.data.sources.is_none() {
            return Err(
                "`data.train` is required to train (or several weighted `[[data.sources]]`)".into(),
            );
        }
        Ok(())
    }

    /// One train glob, or `[[data.sources]]` with a train glob and a positive weight each; or
    /// neither (no data yet: see [`Config::require_data`]).
    fn validate_sources(&self) -> std::result::Result<(), String> {
        let d = &self.data;
        let Some(sources) = &d.sources else {
            if d.train.is_empty() && d.val.is_some() {
                return Err("`data.val` needs a `data.train` beside it".into());
            }
            return Ok(());
        };
        if !d.train.is_empty() || d.val.is_some() {
            return Err("`data.sources` and `data.train`/`data.val` exclude each other: give either `data.train` (and `data.val`) or `[[data.sources]]` tables, each with its own train and val".into());
        }
        if sources.is_empty() {
            return Err("`data.sources` lists no source: give each `[[data.sources]]` table a `train` glob and a `weight`, or use `data.train`".into());
        }
        let total: f64 = sources.iter().map(|s| s.weight).sum();
        if !total.is_finite() && sources.iter().all(|s| s.weight.is_finite()) {
            return Err(format!("`data.sources` weights sum to {total}: use smaller numbers (they are normalised to sum to 1)"));
        }
        for (i, s) in sources.iter().enumerate() {
            if s.train.is_empty() {
                return Err(format!("`data.sources[{i}].train` must be a glob of train shards"));
            }
            if !(s.weight > 0.0 && s.weight.is_finite()) {
                return Err(format!(
                    "`data.sources[{i}].weight` must be a number > 0 (weights are normalised to sum to 1), got {}",
                    s.weight
                ));
            }
            if sources[..i].iter().any(|o| o.name == s.name) {
                return Err(format!(
                    "`data.sources[{i}].name` = {:?} is taken by an earlier source: names must be unique",
                    s.name
                ));
            }
        }
        Ok(())
    }

    fn validate_moe(&self) -> std::result::Result<(), String> {
        let moe = &self.model.moe;
        if moe.n_experts == 0 {
            return Err("`model.moe.n_experts` must be at least 1".into());
        }
        if moe.top_k == 0 || moe.top_k > moe.n_experts {
            return Err(format!(
                "`model.moe.top_k` ({}) must be between 1 and `model.moe.n_experts` ({})",
                moe.top_k, moe.n_experts
            ));
        }
        if !(moe.capacity_factor >= 0.0 && moe.capacity_factor.is_finite()) {
            return Err(format!(
                "`model.moe.capacity_factor` must be >= 0 (0 = dropless), got {}",
                moe.capacity_factor
            ));
        }
        for (key, v) in
            [("aux_loss_weight", moe.aux_loss_weight), ("z_loss_weight", moe.z_loss_weight)]
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("`model.moe.{key}` must be >= 0, got {v}"));
            }
        }
        if moe.router == RouterKind::Xmoe && (moe.xmoe_dim == 0 || !(moe.xmoe_temperature > 0.0)) {
            return Err(
                "`model.moe.xmoe_dim` must be >= 1 and `model.moe.xmoe_temperature` > 0".into()
            );
        }
        if moe.routing == Routing::ExpertChoice {
            let g = moe.group_size;
            if g == 0 {
                return Err("`model.moe.group_size` must be at least 1".into());
            }
            if moe.capacity_factor == 0.0 {
                return Err("expert choice needs `model.moe.capacity_factor` > 0: it sets how many tokens each expert takes".into());
            }
            self.batches_hold_groups(g, "expert choice groups `model.moe.group_size`")?;
        }
        Ok(())
    }

    fn validate_mot(&self) -> std::result::Result<(), String> {
        let mot = &self.model.mot;
        if mot.n_experts == 0 || mot.group_size == 0 {
            return Err(
                "`model.mot.n_experts` and `model.mot.group_size` must be at least 1".into()
            );
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
        self.batches_hold_groups(mot.group_size, "Mixture of Tokens mixes `model.mot.group_size`")
    }

    /// Layers that work on groups of `g` sequences at one position need micro and eval batches
    /// that are whole numbers of groups.
    fn batches_hold_groups(&self, g: usize, who: &str) -> std::result::Result<(), String> {
        let t = &self.train;
        for (key, b) in [
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.eval_batch_size", t.eval_batch_size),
        ] {
            if b % g != 0 {
                return Err(format!(
                    "{who} = {g} sequences at one position, so `{key}` ({b}) must be a multiple of it"
                ));
            }
        }
        Ok(())
    }

    fn validate_pesc(&self) -> std::result::Result<(), String> {
        let p = &self.model.pesc;
        if p.n_experts == 0 || p.adapter_dim == 0 {
            return Err(
                "`model.pesc.n_experts` and `model.pesc.adapter_dim` must be at least 1".into()
            );
        }
        if p.top_k == 0 || p.top_k > p.n_experts {
            return Err(format!(
                "`model.pesc.top_k` ({}) must be between 1 and `model.pesc.n_experts` ({})",
                p.top_k, p.n_experts
            ));
        }
        if !p.adapter_scale.is_finite() {
            return Err(format!(
                "`model.pesc.adapter_scale` must be a finite number, got {}",
                p.adapter_scale
            ));
        }
        if !(0.0..1.0).contains(&p.adapter_dropout) {
            return Err(format!(
                "`model.pesc.adapter_dropout` must be in [0, 1), got {}",
                p.adapter_dropout
            ));
        }
        for (key, v) in [("aux_loss_weight", p.aux_loss_weight), ("z_loss_weight", p.z_loss_weight)]
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("`model.pesc.{key}` must be >= 0, got {v}"));
            }
        }
        Ok(())
    }
}

/// The dotted key of the first NaN or infinite float in `v`.
fn non_finite(v: &toml::Value, key: &str) -> Option<String> {
    let at = |k: &str| if key.is_empty() { k.to_string() } else { format!("{key}.{k}") };
    match v {
        toml::Value::Float(x) if !x.is_finite() => Some(key.to_string()),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| non_finite(v, &at(k))),
        toml::Value::Array(a) => {
            a.iter().enumerate().find_map(|(i, v)| non_finite(v, &format!("{key}[{i}]")))
        }
        _ => None,
    }
}

/// Parameters plus position tables, as a float (no overflow): a sanity bound that stops a
/// corrupt or hostile size before any allocation, not an estimate for users (`model::estimate`).
fn estimated_elements(m: &ModelConfig) -> f64 {
    let (v, d, f, l, t) = (
        m.vocab_size as f64,
        m.d_model as f64,
        m.d_ff as f64,
        m.n_layers as f64,
        m.max_seq_len as f64,
    );
    let experts = match m.ffn {
        FfnKind::Moe => {
            m.moe.n_experts.max(1) as f64 * (m.moe.expert_size.max(m.d_ff)) as f64 / f.max(1.0)
        }
        FfnKind::Mot => {
            m.mot.n_experts.max(1) as f64 * m.mot.expert_width(m.d_ff) as f64 / f.max(1.0)
        }
        _ => 1.0,
    };
    let adapters = match m.ffn {
        FfnKind::Pesc => m.pesc.n_experts as f64 * (2.0 * m.pesc.adapter_dim as f64 + 1.0) * d,
        _ => 0.0,
    };
    let shared = match m.ffn {
        FfnKind::Moe => 3.0 * d * m.moe.shared_expert_size as f64,
        _ => 0.0,
    };
    2.0 * v * d + t * d + l * (4.0 * d * d + 3.0 * d * f * experts + adapters + shared)
}

impl RopeScaling {
    /// `factor` > 0; Llama 3's kind also needs `0 < low_freq_factor < high_freq_factor` and
    /// `original_max_position_embeddings`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.factor > 0.0) {
            return Err(format!("`model.rope_scaling.factor` must be > 0, got {}", self.factor));
        }
        if self.rope_type == RopeScalingKind::Llama3 {
            let (Some(low), Some(high), Some(_)) = (
                self.low_freq_factor,
                self.high_freq_factor,
                self.original_max_position_embeddings,
            ) else {
                return Err("`model.rope_scaling` of rope_type \"llama3\" needs low_freq_factor, high_freq_factor and original_max_position_embeddings".into());
            };
            if !(low > 0.0 && high > low) {
                return Err(format!("`model.rope_scaling`: need 0 < low_freq_factor < high_freq_factor, got {low} and {high}"));
            }
        }
        Ok(())
    }
}
