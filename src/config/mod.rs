//! The config file: parsing TOML and `--set` overrides into the typed schema, resolving the
//! zero-means-derived defaults, and the resolved config written into a run. The schema lives in
//! `schema`, the checks in `validate`, override and path handling in `overrides`.

mod overrides;
mod schema;
mod validate;

pub use overrides::{absolute, apply_override};
pub use schema::*;

use overrides::{anchor_data_paths, one_line, split_override};
use std::path::{Path, PathBuf};

/// Everything that can be wrong with a config file or an override.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{origin}: malformed TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

type Result<T> = std::result::Result<T, ConfigError>;

impl Config {
    /// Reads a config file, applies `--set` overrides, resolves paths and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_path_buf(), error: source })?;
        let origin = path.display().to_string();
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Syntax { origin: origin.clone(), message: one_line(&e.to_string()) }
        })?;
        // Paths in [data] are relative to the file, paths from `--set` to the current directory,
        // so anchor the file's own paths before the overrides land.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        anchor_data_paths(&mut value, &base);
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        Self::from_table(value, &origin).map_err(|e| blame_override(e, overrides))
    }

    /// Parses an already resolved table (a run's config.toml or a checkpoint's state.json).
    pub fn from_table(value: toml::Table, origin: &str) -> Result<Config> {
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| {
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
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { origin: origin.to_string(), message })?;
        Ok(config)
    }

    /// Parses the text of a resolved config.toml.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Syntax { origin: origin.into(), message: one_line(&e.to_string()) }
        })?;
        Self::from_table(value, origin)
    }

    /// The config as TOML. Fails only for a number TOML cannot hold (above 2^63 − 1), which a
    /// config built from flags or a Hugging Face config.json, not yet validated, may carry.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid {
            origin: format!("the config of {}", self.run_dir().display()),
            message: format!("{e} (TOML integers stop at 2^63 - 1)"),
        })
    }

    /// Fills the zero-means-derived defaults so that every later reader sees one number.
    fn resolve(&mut self) {
        self.data.name_sources();
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
        self.run.name =
            dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    }

    /// Gradient accumulation steps per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.train.batch_size / self.train.micro_batch_size
    }

    /// A config derived from this one (by `transition-tune` or `upcycle`) with the user's
    /// `--set` overrides applied on top, validated like a file.
    pub fn with_overrides(&self, overrides: &[String], origin: &str) -> Result<Config> {
        let mut table: toml::Table = toml::from_str(&self.to_toml()?)
            .map_err(|e| ConfigError::Invalid { origin: origin.into(), message: e.to_string() })?;
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        Config::from_table(table, origin).map_err(|e| blame_override(e, overrides))
    }
}

/// A config value as a config file spells it (`"dense"`, where Rust's name is `Dense`), for
/// messages that name it.
pub fn toml_value<T: serde::Serialize>(value: &T) -> String {
    toml::Value::try_from(value).map_or_else(|e| format!("<{e}>"), |v| v.to_string())
}

/// An error about a key that a `--set` gave is that override's, not the file's: the user looks
/// for the mistake where it is.
fn blame_override(e: ConfigError, overrides: &[String]) -> ConfigError {
    let ConfigError::Invalid { origin, message } = e else { return e };
    let names = |arg: &&String| {
        split_override(arg).is_some_and(|(key, _)| message.contains(&format!("`{key}`")))
    };
    match overrides.iter().rev().find(names) {
        Some(arg) => ConfigError::Override { arg: arg.clone(), message },
        None => ConfigError::Invalid { origin, message },
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

    /// The spec writes `type = "llama3"`; Hugging Face now writes `rope_type`: both load.
    #[test]
    fn rope_scaling_takes_the_spec_and_hf_key() {
        for key in ["type", "rope_type"] {
            let mut t: toml::Table = MIN.parse().unwrap();
            let set = format!("model.rope_scaling={{{key}=\"llama3\", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192}}");
            apply_override(&mut t, &set).unwrap();
            let c = Config::from_table(t, "test").unwrap();
            assert_eq!(c.model.rope_scaling.unwrap().rope_type, RopeScalingKind::Llama3);
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        for (set, needle) in [
            ("model.n_heads=3", "divisible"),
            ("model.norm=\"batchnorm\"", "model.norm"),
            ("train.micro_batch_size=5", "multiple"),
            ("model.d_model=\"big\"", "model.d_model"),
            ("model.ffn_layers=[9]", "block 9"),
            ("run.dtype=\"f16\"", "expected f32 or bf16"),
            ("model.n_kv_heads=3", "must divide `model.n_heads` (4)"),
            ("model.n_kv_heads=0", "model.n_kv_heads"),
            ("model.rope_scaling={rope_type=\"linear\", factor=0}", "factor"),
            ("model.rope_scaling={type=\"linear\", factor=-1}", "factor"),
            ("model.rope_scaling={rope_type=\"llama3\", factor=8}", "low_freq_factor"),
            ("model.rope_scaling={rope_type=\"yarn\", factor=8}", "rope_scaling"),
        ] {
            let mut t: toml::Table = MIN.parse().unwrap();
            apply_override(&mut t, set).unwrap();
            let e = Config::from_table(t, "test").unwrap_err().to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
    }

    const MIX: &str = "[run]\nname='t'\n[data]\n[[data.sources]]\ntrain='web/web_train_*.bin'\nval='web/web_val_*.bin'\nweight=3\n[[data.sources]]\ntrain='code/*_train_*.bin'\nweight=1\n[[data.sources]]\ntrain='web/web_train_*.bin'\nweight=1\n[[data.sources]]\nname='mine'\ntrain='*'\nweight=0.5\n[model]\nvocab_size=100\n";

    #[test]
    fn sources_are_named_anchored_and_round_trip() {
        let c = parse(MIX).unwrap();
        let sources = c.data.sources.as_ref().unwrap();
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "code", "web-2", "mine"]);
        assert!(sources.iter().all(|s| Path::new(&s.train).is_absolute()));
        assert!(sources[0].val.as_deref().is_some_and(|v| v.ends_with("web/web_val_*.bin")));
        assert!(c.data.is_mixture() && c.data.source_list().len() == 4);
        let back = Config::from_toml_str(&c.to_toml().unwrap(), "back").unwrap();
        assert_eq!(c, back);
        // `--set data.sources=[...]` paths are relative to the current directory.
        let mut t: toml::Table = MIN.parse().unwrap();
        t.get_mut("data").unwrap().as_table_mut().unwrap().remove("train");
        apply_override(&mut t, "data.sources=[{train='a/*.bin', weight=1}]").unwrap();
        let c = Config::from_table(t, "test").unwrap();
        let s = &c.data.sources.unwrap()[0];
        assert_eq!(s.train, absolute(Path::new("a/*.bin")));
        assert_eq!(s.name, "a");
    }

    #[test]
    fn bad_sources_are_rejected() {
        for (text, needle) in [
            (MIN.replace("[model]", "[[data.sources]]\ntrain='b'\nweight=1\n[model]"), "exclude"),
            (MIX.replace("weight=3", "weight=-3"), "`data.sources[0].weight` must be a number > 0"),
            (MIX.replace("weight=3", "weight=nan"), "`data.sources[0].weight`"),
            (MIX.replace("weight=3", ""), "weight"),
            (MIX.replace("train='code/", "name='mine'\ntrain='code/"), "`data.sources[3].name`"),
            (MIX.replace("weight=3", "weight=3\nbogus=1"), "bogus"),
            ("[run]\nname='t'\n[data]\nsources=[]\n[model]\nvocab_size=100\n".into(), "no source"),
            (
                "[run]\nname='t'\n[data]\nval='v'\n[model]\nvocab_size=100\n".into(),
                "needs a `data.train`",
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = parse(MIN).unwrap();
        let back = Config::from_toml_str(&c.to_toml().unwrap(), "back").unwrap();
        assert_eq!(c, back);
    }
}
