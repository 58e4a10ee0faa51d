//! What each fuzz target does with one input, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and by `tests/hostile_files.rs`, which replays the seed corpus
//! through these very functions (a crash found is best added there as its own case). Each
//! function may see its input refused with an error; it panics only on a bug: a panic inside
//! motrain, an error message carrying a backtrace, or a broken invariant checked here.
//!
//! `dir` is a scratch directory the function may overwrite (the readers take paths).
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use motrain::checkpoint::{load_state, load_tensors};
use motrain::config::{apply_override, Bias, Config, ConfigError, ModelConfig, Position};
use motrain::data::loader::EvalStream;
use motrain::data::shards::Shard;
use motrain::model::{Params, Transformer};
use std::collections::HashMap;
use std::path::Path;

/// motrain prints an error as one `error:` line. A message may still span lines when it quotes
/// input that holds a newline (a key, a `--set` argument), so what is checked is that no line
/// after the first is a backtrace frame (`  3: crate::path::fn`), which candle attaches to some
/// errors when RUST_BACKTRACE is set.
fn no_backtrace(what: &str, message: &str) {
    let frame = message.lines().skip(1).find(|l| {
        l.trim_start().split_once(": ").is_some_and(|(n, f)| {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && f.contains("::")
        })
    });
    assert!(frame.is_none(), "{what}: an error with a backtrace:\n{message}");
}

// ---------------------------------------------------------------------------------------------
// shard

/// The input is a whole shard file. Its last byte picks the vocab size and the eval shape, so
/// real shard files are valid seeds. Opens it as llm.c and as nanoGPT; when it opens, reads
/// every token through `get` and `read`, then the eval stream's batches over it.
pub fn shard(data: &[u8], dir: &Path) {
    let path = dir.join("shard.bin");
    std::fs::write(&path, data).unwrap();
    let knob = data.last().copied().unwrap_or(0) as usize;
    let vocab = [16, 64, 50257, 65536, 70001, usize::MAX][knob % 6];
    let seq_len = 1 + (knob >> 3) % 16;
    let batch_size = 1 + knob % 3;
    for format in ["llmc", "nanogpt"] {
        let shard = match Shard::open(&path, format, Some(vocab)) {
            Ok(s) => s,
            Err(e) => {
                no_backtrace("Shard::open", &e.to_string());
                continue;
            }
        };
        let n = shard.len();
        let mut all = vec![0u32; n];
        shard.read(0, &mut all);
        for (i, &t) in all.iter().enumerate() {
            assert_eq!(shard.get(i), t);
            assert!((t as usize) < vocab, "token {i} = {t} passed the vocab check of {vocab}");
        }
        let stream = EvalStream::new(vec![shard], seq_len);
        assert_eq!(stream.total_tokens(), n);
        for b in 0..stream.batches(batch_size, 4) {
            let batch = stream.batch(b, batch_size);
            assert_eq!(batch.inputs.len(), batch_size * seq_len);
            assert_eq!(batch.targets.len(), batch_size * seq_len);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// checkpoint

const TINY: &str = "[run]\nname='t'\n[data]\ntrain='x/*.bin'\nseq_len=8\n\
                    [model]\nvocab_size=16\nd_model=8\nn_layers=1\nn_heads=2\nd_ff=16\n";

/// Whether a dense model is small enough to build here: every size capped and under ~1M
/// parameters (counted as `Transformer::new` creates them, plus the rope tables).
pub fn small_enough(m: &ModelConfig) -> bool {
    let caps = [
        (m.d_model, 256),
        (m.n_layers, 8),
        (m.vocab_size, 4096),
        (m.d_ff, 2048),
        (m.max_seq_len, 4096),
        (m.n_heads, 256),
    ];
    if caps.iter().any(|&(v, cap)| v > cap) {
        return false;
    }
    let (d, f, l, v, s) = (
        m.d_model as u64,
        m.d_ff as u64,
        m.n_layers as u64,
        m.vocab_size as u64,
        m.max_seq_len as u64,
    );
    let attn = 4 * d * d + if m.bias == Bias::All { 4 * d } else { 0 };
    let per_block = attn + 3 * d * f + 3 * f + 4 * d;
    let embed = v * d * if m.tie_embeddings { 1 } else { 2 };
    let pos = if m.position == Position::Learned { s * d } else { 0 };
    l * per_block + embed + pos + 2 * d + s * d <= 1_000_000
}

/// Builds the model `m` describes and loads `tensors` into it: Ok or Err, never a panic.
/// Returns whether the load succeeded.
fn build_and_load(m: &ModelConfig, seed: u64, tensors: &HashMap<String, Tensor>) -> bool {
    let mut params = Params::new(&Device::Cpu, seed, m.init_scale);
    if Transformer::new(m, &mut params).is_err() {
        return false;
    }
    match params.load(tensors) {
        Ok(()) => true,
        Err(e) => {
            no_backtrace("Params::load", &e);
            false
        }
    }
}

/// What the checkpoint harness got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointReach {
    pub state_loaded: bool,
    pub tensors_loaded: bool,
    pub params_loaded: bool,
}

/// Splits a checkpoint input: a u32 LE length N, N bytes of `state.json`, then the rest as
/// `model.safetensors` (N is clamped to what there is).
pub fn split_checkpoint(data: &[u8]) -> Option<(&[u8], &[u8])> {
    if data.len() < 4 {
        return None;
    }
    let n = (u32::from_le_bytes(data[..4].try_into().unwrap()) as usize).min(data.len() - 4);
    Some(data[4..].split_at(n))
}

/// The input is [`split_checkpoint`]'s. `load_state` and `load_tensors` may refuse their files;
/// a state that loads and describes a small model is built and gets the tensors through
/// `Params::load`; when the state does not load, a fixed tiny model gets them instead, so the
/// tensor checks are reached either way.
pub fn checkpoint(data: &[u8], dir: &Path) -> CheckpointReach {
    let mut reach =
        CheckpointReach { state_loaded: false, tensors_loaded: false, params_loaded: false };
    let Some((state_bytes, model_bytes)) = split_checkpoint(data) else {
        return reach;
    };
    std::fs::write(dir.join("state.json"), state_bytes).unwrap();
    let model_path = dir.join("model.safetensors");
    std::fs::write(&model_path, model_bytes).unwrap();

    let state = load_state(dir);
    if let Err(e) = &state {
        no_backtrace("load_state", &e.to_string());
    }
    reach.state_loaded = state.is_ok();
    let tensors = match load_tensors(&model_path, &Device::Cpu) {
        Ok(t) => t,
        Err(e) => {
            no_backtrace("load_tensors", &e.to_string());
            return reach;
        }
    };
    reach.tensors_loaded = true;
    reach.params_loaded = match state {
        Ok(s) if small_enough(&s.config.model) => {
            build_and_load(&s.config.model, s.config.run.seed, &tensors)
        }
        Ok(_) => false,
        Err(_) => build_and_load(&Config::from_toml_str(TINY, "tiny").unwrap().model, 0, &tensors),
    };
    reach
}

// ---------------------------------------------------------------------------------------------
// config

const MIN: &str = "[run]\nname='t'\n[data]\ntrain='x/*.bin'\n[model]\nvocab_size=100\n";

fn checked<T>(r: Result<T, ConfigError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            no_backtrace("config", &e.to_string());
            None
        }
    }
}

/// A config that loads must re-load from the resolved config.toml a run writes.
fn round_trip(c: &Config) {
    let text = c.to_toml().unwrap_or_else(|e| panic!("a loaded config does not serialise: {e}"));
    if let Err(e) = Config::from_toml_str(&text, "round trip") {
        panic!("a loaded config does not re-load from its resolved TOML: {e}\n{text}");
    }
}

/// The input is the TOML text (arbitrary UTF-8), then optionally NUL-separated `KEY=VALUE`
/// overrides. Runs `Config::from_toml_str`, `Config::load` (the text as a file, with the
/// overrides as `--set`), and `apply_override` on the parsed table (or a minimal valid one).
/// Returns whether any of them produced a config.
pub fn config(data: &[u8], dir: &Path) -> bool {
    let Ok(input) = std::str::from_utf8(data) else {
        return false;
    };
    let mut parts = input.split('\0');
    let text = parts.next().unwrap_or_default();
    let overrides: Vec<String> = parts.map(str::to_string).collect();
    let mut any = false;

    if let Some(c) = checked(Config::from_toml_str(text, "fuzz")) {
        round_trip(&c);
        any = true;
    }

    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    if let Some(c) = checked(Config::load(&path, &overrides)) {
        round_trip(&c);
        any = true;
    }

    let mut table: toml::Table = text.parse().unwrap_or_else(|_| MIN.parse().unwrap());
    for o in &overrides {
        checked(apply_override(&mut table, o));
    }
    if let Some(c) = checked(Config::from_table(table, "fuzz")) {
        round_trip(&c);
        any = true;
    }
    any
}
