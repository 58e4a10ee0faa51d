//! The checkpoint loader on arbitrary bytes. Input: a u32 LE length N, then N bytes of
//! `state.json`, then the rest as `model.safetensors`. `load_state` and `load_tensors` may fail
//! but never panic; a state that loads and describes a small model (under ~1M parameters) is
//! built, and `Params::load` with the fuzzed tensors must return Ok or Err, never panic. When the
//! state does not load, the tensors go into a fixed tiny model instead, so the tensor checks are
//! reached either way.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use motrain::checkpoint::{load_state, load_tensors};
use motrain::config::{Bias, Config, ModelConfig, Position};
use motrain::model::{Params, Transformer};
use std::path::PathBuf;
use std::sync::OnceLock;

const TINY: &str = "[run]\nname='t'\n[data]\ntrain='x/*.bin'\nseq_len=8\n\
                    [model]\nvocab_size=16\nd_model=8\nn_layers=1\nn_heads=2\nd_ff=16\n";

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("motrain-fuzz-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn tiny() -> &'static ModelConfig {
    static CFG: OnceLock<ModelConfig> = OnceLock::new();
    CFG.get_or_init(|| Config::from_toml_str(TINY, "tiny").unwrap().model)
}

/// The parameter count of a dense model, or None when it is not small enough to build here.
fn small_enough(m: &ModelConfig) -> bool {
    let caps = [(m.d_model, 256), (m.n_layers, 8), (m.vocab_size, 4096), (m.d_ff, 2048), (m.max_seq_len, 4096), (m.n_heads, 256)];
    if caps.iter().any(|&(v, cap)| v > cap) {
        return false;
    }
    let (d, f, l, v, s) = (m.d_model as u64, m.d_ff as u64, m.n_layers as u64, m.vocab_size as u64, m.max_seq_len as u64);
    let attn = 4 * d * d + if m.bias == Bias::All { 4 * d } else { 0 };
    let per_block = attn + 3 * d * f + 3 * f + 4 * d;
    let embed = v * d * if m.tie_embeddings { 1 } else { 2 };
    let pos = if m.position == Position::Learned { s * d } else { 0 };
    l * per_block + embed + pos + 2 * d + s * d <= 1_000_000
}

fn build_and_load(m: &ModelConfig, seed: u64, tensors: &std::collections::HashMap<String, candle_core::Tensor>) {
    let mut params = Params::new(&Device::Cpu, seed, m.init_scale);
    if Transformer::new(m, &mut params).is_ok() {
        let _ = params.load(tensors);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let n = (u32::from_le_bytes(data[..4].try_into().unwrap()) as usize).min(data.len() - 4);
    let (state_bytes, model_bytes) = data[4..].split_at(n);
    let dir = scratch();
    std::fs::write(dir.join("state.json"), state_bytes).unwrap();
    let model_path = dir.join("model.safetensors");
    std::fs::write(&model_path, model_bytes).unwrap();

    let state = load_state(dir);
    let tensors = load_tensors(&model_path, &Device::Cpu);
    let Ok(tensors) = tensors else { return };
    match state {
        Ok(s) if small_enough(&s.config.model) => build_and_load(&s.config.model, s.config.run.seed, &tensors),
        Ok(_) => {}
        Err(_) => build_and_load(tiny(), 0, &tensors),
    }
});
