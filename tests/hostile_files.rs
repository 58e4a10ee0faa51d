//! Hostile input files: llm.c shards, checkpoints (`state.json`, `model.safetensors`) and configs
//! that lie about themselves. Each must be refused with an error that names the file, through
//! the library function that reads it and through the binary (exit code 2, one `error:` line, no
//! panic) — never a panic, an abort or a runaway allocation.
//!
//! The fuzz targets under `fuzz/` (run by `scripts/fuzz.sh`, not by CI) feed the same functions
//! with mutated bytes; every crash they find becomes a case here. Cases marked `#[ignore = "bug:
//! ..."]` still fail and wait for a fix in `src/`.
//!
//! The binary always runs here under `ulimit -v` (4 GiB) and `ulimit -t` (CPU seconds): a file
//! that makes motrain allocate without bound must fail fast rather than take the machine with it
//! (jemalloc maps with MAP_NORESERVE, so without the limit such an allocation "succeeds" and the
//! OOM killer ends it later).

mod common;
#[path = "../fuzz/harness.rs"]
mod harness;

use common::*;
use motrain::checkpoint::{load_state, load_tensors};
use motrain::config::{apply_override, Config};
use motrain::data::loader::EvalStream;
use motrain::data::shards::Shard;
use motrain::model::{Params, Transformer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// helpers

/// `motrain ARGS...` in `cwd`, under a 4 GiB address-space limit and a 60 s CPU limit.
fn motrain_limited(cwd: &Path, args: &[&str]) -> Out {
    let mut sh = Command::new("sh");
    sh.arg("-c").arg("ulimit -v 4194304 && ulimit -t 60 && exec \"$0\" \"$@\"").arg(bin());
    run_motrain(sh, cwd, args)
}

/// The tiny dense model every checkpoint here describes (2.2k parameters).
fn tiny_toml(val_glob: &str) -> String {
    format!(
        "[run]\nname = \"tiny\"\ndevice = \"cpu\"\n\
         [data]\ntrain = \"{val_glob}\"\nval = \"{val_glob}\"\nseq_len = 8\n\
         [model]\nvocab_size = 16\nd_model = 8\nn_layers = 1\nn_heads = 2\nd_ff = 16\n\
         [train]\nbatch_size = 2\neval_batches = 2\n"
    )
}

/// A valid checkpoint of the tiny model in a scratch directory, with a val shard to eval on.
struct Ckpt {
    tmp: tempfile::TempDir,
    /// `state.json` as written.
    state: Value,
    /// `model.safetensors` as written.
    model: Vec<u8>,
}

impl Ckpt {
    fn new() -> Ckpt {
        let tmp = tempfile::Builder::new().prefix("motrain-hostile-").tempdir().unwrap();
        let shards = tmp.path().join("shards");
        std::fs::create_dir_all(&shards).unwrap();
        write_shard(&shards.join("tiny_val_000000.bin"), &pattern_tokens(200, 16));
        let glob = shards.join("tiny_val_*.bin").display().to_string();
        let cfg = Config::from_toml_str(&tiny_toml(&glob), "tiny").unwrap();
        let mut params = Params::new(&candle_core::Device::Cpu, 0, cfg.model.init_scale);
        Transformer::new(&cfg.model, &mut params).unwrap();
        let dir = tmp.path().join("ckpt");
        std::fs::create_dir_all(&dir).unwrap();
        let tensors = params.tensors();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        candle_core::safetensors::save(&tensors, dir.join("optimizer.safetensors")).unwrap();
        let state = json!({
            "step": 2, "tokens": 32, "data_cursor": 4, "optimizer_t": 2, "seed": 0, "elapsed_s": 0.5,
            "motrain_version": "0.1.0", "config": serde_json::to_value(&cfg).unwrap(),
        });
        std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&state).unwrap()).unwrap();
        let model = std::fs::read(dir.join("model.safetensors")).unwrap();
        Ckpt { tmp, state, model }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("ckpt")
    }

    fn state_path(&self) -> PathBuf {
        self.dir().join("state.json")
    }

    fn model_path(&self) -> PathBuf {
        self.dir().join("model.safetensors")
    }

    fn write_state(&self, bytes: &[u8]) {
        std::fs::write(self.state_path(), bytes).unwrap();
    }

    fn write_model(&self, bytes: &[u8]) {
        std::fs::write(self.model_path(), bytes).unwrap();
    }

    /// `motrain eval --checkpoint DIR`.
    fn eval(&self) -> Out {
        let dir = self.dir().display().to_string();
        motrain_limited(self.tmp.path(), &["eval", "--checkpoint", &dir])
    }

    /// The state with one key (a dotted path) replaced, or removed when `value` is None.
    fn state_with(&self, key: &str, value: Option<Value>) -> Value {
        let mut s = self.state.clone();
        let parts: Vec<&str> = key.split('.').collect();
        let mut obj = &mut s;
        for p in &parts[..parts.len() - 1] {
            obj = obj.get_mut(*p).unwrap_or_else(|| panic!("no {p} in state"));
        }
        let map = obj.as_object_mut().unwrap();
        let last = parts[parts.len() - 1];
        match value {
            Some(v) => {
                map.insert(last.to_string(), v);
            }
            None => {
                assert!(map.remove(last).is_some(), "no {key} in state");
            }
        }
        s
    }
}

/// A safetensors file: 8-byte little-endian header length, the header JSON, then `data`.
fn safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// The JSON header of a safetensors file (what `Ckpt::model` holds).
fn header_of(bytes: &[u8]) -> serde_json::Map<String, Value> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice::<Value>(&bytes[8..8 + n]).unwrap().as_object().unwrap().clone()
}

/// Asserts that `load_tensors` refuses the model file with an error naming it.
fn assert_tensors_refused(c: &Ckpt, case: &str) {
    match load_tensors(&c.model_path(), &candle_core::Device::Cpu) {
        Ok(t) => panic!("{case}: load_tensors accepted it ({} tensors)", t.len()),
        Err(e) => assert!(
            e.to_string().contains("model.safetensors"),
            "{case}: the error does not name the file: {e}"
        ),
    }
}

/// Asserts that `eval` refuses the checkpoint: exit 2, an `error:` line naming `file`.
fn assert_eval_refused(c: &Ckpt, case: &str, file: &str) {
    let out = c.eval();
    assert!(out.code == Some(2), "{case}: expected exit code 2\n{}", out.describe());
    assert_bad_input(&out, &[file]);
}

// ---------------------------------------------------------------------------------------------
// the fuzz corpus

/// The committed seeds of every fuzz target go through the fuzz harness without a panic, and the
/// real files among them (a checkpoint `motrain train` wrote, in F32 and recoded to F16 and
/// F8_E4M3; the configs) still load all the way: when a file format changes, regenerate them with
/// `fuzz/make_corpus.sh`.
#[test]
fn the_fuzz_seeds_replay() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus");
    let scratch = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for target in ["shard", "checkpoint", "config"] {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(corpus.join(target)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            match target {
                "shard" => harness::shard(&data, scratch.path()),
                "checkpoint" => {
                    let reach = harness::checkpoint(&data, scratch.path());
                    if name.starts_with("tiny_checkpoint") {
                        assert!(
                            reach.state_loaded && reach.tensors_loaded && reach.params_loaded,
                            "{name}: {reach:?}"
                        );
                    }
                }
                _ => assert!(harness::config(&data, scratch.path()), "{name}: no config loaded"),
            }
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} seeds under {}", corpus.display());
}

// ---------------------------------------------------------------------------------------------
// the fixture itself is valid

#[test]
fn the_valid_checkpoint_evaluates() {
    let c = Ckpt::new();
    let state = load_state(&c.dir()).unwrap();
    let tensors = load_tensors(&c.model_path(), &candle_core::Device::Cpu).unwrap();
    let mut params = Params::new(&candle_core::Device::Cpu, 0, state.config.model.init_scale);
    Transformer::new(&state.config.model, &mut params).unwrap();
    params.load(&tensors).unwrap();
    let out = c.eval().ok();
    let v = out.last_json();
    assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{}", out.describe());
}

// ---------------------------------------------------------------------------------------------
// model.safetensors that lies

/// Each case: a name and the bytes of model.safetensors.
fn lying_safetensors(c: &Ckpt) -> Vec<(&'static str, Vec<u8>)> {
    let embed = "model.embed_tokens.weight";
    let f32s = |n: usize| vec![0u8; 4 * n];
    let real = header_of(&c.model);
    let data_len =
        c.model.len() - 8 - u64::from_le_bytes(c.model[..8].try_into().unwrap()) as usize;
    // The real file with one tensor's entry replaced.
    let with_entry = |name: &str, entry: Value| {
        let mut h = real.clone();
        h.insert(name.to_string(), entry);
        let n = u64::from_le_bytes(c.model[..8].try_into().unwrap()) as usize;
        safetensors(&Value::Object(h), &c.model[8 + n..])
    };
    let real_entry = real[embed].clone();
    let [start, end] = [0, 1].map(|i| real_entry["data_offsets"][i].as_u64().unwrap());
    let mut length_prefix_too_big = c.model.clone();
    length_prefix_too_big[..8].copy_from_slice(&(c.model.len() as u64 * 2).to_le_bytes());
    let mut length_prefix_max = c.model.clone();
    length_prefix_max[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    vec![
        // data offsets
        (
            "offsets beyond the end of the file",
            with_entry(
                embed,
                json!({"dtype": "F32", "shape": [16, 8], "data_offsets": [start, data_len as u64 + 4096]}),
            ),
        ),
        (
            "one tensor alone, its data cut short",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 512]}}),
                &f32s(100),
            ),
        ),
        (
            "overlapping tensors",
            safetensors(
                &json!({"a": {"dtype": "F32", "shape": [128], "data_offsets": [0, 512]}, "b": {"dtype": "F32", "shape": [128], "data_offsets": [256, 768]}}),
                &f32s(192),
            ),
        ),
        (
            "reversed offsets",
            with_entry(
                embed,
                json!({"dtype": "F32", "shape": [16, 8], "data_offsets": [end, start]}),
            ),
        ),
        (
            "offsets that leave a gap",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [16, 8], "data_offsets": [64, 576]}}),
                &f32s(144),
            ),
        ),
        (
            "offsets not numbers",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [16, 8], "data_offsets": ["0", "512"]}}),
                &f32s(128),
            ),
        ),
        (
            "negative offset",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [16, 8], "data_offsets": [-512, 0]}}),
                &f32s(128),
            ),
        ),
        // shapes
        (
            "shape product below the byte length",
            with_entry(
                embed,
                json!({"dtype": "F32", "shape": [16, 4], "data_offsets": [start, end]}),
            ),
        ),
        (
            "shape product above the byte length",
            with_entry(
                embed,
                json!({"dtype": "F32", "shape": [16, 16], "data_offsets": [start, end]}),
            ),
        ),
        (
            "shape product overflowing u64",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [1u64 << 40, 1u64 << 40], "data_offsets": [0, 512]}}),
                &f32s(128),
            ),
        ),
        (
            "negative dimension",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [-16, 8], "data_offsets": [0, 512]}}),
                &f32s(128),
            ),
        ),
        // dtypes
        (
            "F16 on F32-sized data",
            with_entry(
                embed,
                json!({"dtype": "F16", "shape": [16, 8], "data_offsets": [start, end]}),
            ),
        ),
        (
            "unknown dtype string",
            with_entry(
                embed,
                json!({"dtype": "Q4_K", "shape": [16, 8], "data_offsets": [start, end]}),
            ),
        ),
        (
            "lower-case dtype",
            with_entry(
                embed,
                json!({"dtype": "f32", "shape": [16, 8], "data_offsets": [start, end]}),
            ),
        ),
        (
            "BOOL weights",
            safetensors(
                &json!({embed: {"dtype": "BOOL", "shape": [16, 8], "data_offsets": [0, 128]}}),
                &[0u8; 128],
            ),
        ),
        (
            "I32 weights (integers read as numbers)",
            with_entry(
                embed,
                json!({"dtype": "I32", "shape": [16, 8], "data_offsets": [start, end]}),
            ),
        ),
        (
            "U8 weights",
            safetensors(
                &json!({embed: {"dtype": "U8", "shape": [16, 8], "data_offsets": [0, 128]}}),
                &[7u8; 128],
            ),
        ),
        (
            "F4 dtype on F32-sized data",
            with_entry(
                embed,
                json!({"dtype": "F4", "shape": [16, 8], "data_offsets": [start, end]}),
            ),
        ),
        // the header and its length prefix
        ("empty file", vec![]),
        ("shorter than the length prefix", vec![8, 0, 0]),
        ("length prefix larger than the file", length_prefix_too_big),
        ("length prefix u64::MAX", length_prefix_max),
        ("length prefix zero", 0u64.to_le_bytes().to_vec()),
        ("header not JSON", [&24u64.to_le_bytes()[..], b"this is not json at all!"].concat()),
        ("header a JSON array", safetensors(&json!([1, 2, 3]), &[])),
        (
            "header entry missing its dtype",
            safetensors(&json!({embed: {"shape": [16, 8], "data_offsets": [0, 512]}}), &f32s(128)),
        ),
        ("header not UTF-8", [&9u64.to_le_bytes()[..], b"{\"\xff\xfe\": 1}"].concat()),
    ]
}

#[test]
fn lying_safetensors_are_refused_by_load_tensors() {
    let c = Ckpt::new();
    for (case, bytes) in lying_safetensors(&c) {
        c.write_model(&bytes);
        assert_tensors_refused(&c, case);
    }
}

/// Lies that still parse as safetensors (an honest file of the wrong tensors) must be caught
/// when the weights go into the model: `Params::load` returns an error, it does not panic.
#[test]
fn wrong_tensors_are_refused_by_params_load() {
    let c = Ckpt::new();
    let state = load_state(&c.dir()).unwrap();
    let embed = "model.embed_tokens.weight";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no tensors", safetensors(&json!({}), &[])),
        (
            "one stray tensor",
            safetensors(
                &json!({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
                &[0; 8],
            ),
        ),
        (
            "embedding of zero rows",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [0, 8], "data_offsets": [0, 0]}}),
                &[],
            ),
        ),
        (
            "scalar embedding",
            safetensors(
                &json!({embed: {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}),
                &[0; 4],
            ),
        ),
    ];
    for (case, bytes) in cases {
        c.write_model(&bytes);
        let tensors = load_tensors(&c.model_path(), &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let mut params = Params::new(&candle_core::Device::Cpu, 0, state.config.model.init_scale);
        Transformer::new(&state.config.model, &mut params).unwrap();
        assert!(params.load(&tensors).is_err(), "{case}: Params::load accepted it");
    }
    // The embedding stored as F4, which candle loads as an opaque dtype it cannot convert.
    c.write_model(&f4_embedding());
    let tensors = load_tensors(&c.model_path(), &candle_core::Device::Cpu).unwrap();
    let mut params = Params::new(&candle_core::Device::Cpu, 0, state.config.model.init_scale);
    Transformer::new(&state.config.model, &mut params).unwrap();
    assert!(params.load(&tensors).is_err(), "F4 embedding: Params::load accepted it");
}

/// A file holding the embedding alone, as F4 (4 bits a value).
fn f4_embedding() -> Vec<u8> {
    safetensors(
        &json!({"model.embed_tokens.weight": {"dtype": "F4", "shape": [16, 8], "data_offsets": [0, 64]}}),
        &[0x11; 64],
    )
}

#[test]
fn lying_safetensors_fail_eval_with_an_error_naming_the_file() {
    let c = Ckpt::new();
    let mut cases = lying_safetensors(&c);
    let embed = "model.embed_tokens.weight";
    cases.push(("no tensors", safetensors(&json!({}), &[])));
    cases.push((
        "a tensor of the wrong shape",
        safetensors(
            &json!({embed: {"dtype": "F32", "shape": [8, 16], "data_offsets": [0, 512]}}),
            &[0; 512],
        ),
    ));
    for (case, bytes) in cases {
        c.write_model(&bytes);
        assert_eval_refused(&c, case, "model.safetensors");
    }
}

/// A weight in a dtype candle loads but cannot convert to f32: the error must be one line, not
/// the candle backtrace that `Error::bt()` attaches when RUST_BACKTRACE is set.
#[test]
fn an_f4_weight_fails_eval_without_a_backtrace() {
    let c = Ckpt::new();
    c.write_model(&f4_embedding());
    assert_eval_refused(&c, "F4 embedding", "model.safetensors");
}

// ---------------------------------------------------------------------------------------------
// state.json that lies

/// Each case: a name and the bytes of state.json.
fn lying_states(c: &Ckpt) -> Vec<(String, Vec<u8>)> {
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty file".into(), vec![]),
        ("not JSON".into(), b"step = 2".to_vec()),
        ("truncated JSON".into(), serde_json::to_vec(&c.state).unwrap()[..40].to_vec()),
        (
            "trailing garbage".into(),
            [serde_json::to_vec(&c.state).unwrap(), b"}}".to_vec()].concat(),
        ),
        ("a JSON array".into(), b"[1, 2, 3]".to_vec()),
        ("JSON null".into(), b"null".to_vec()),
        ("not UTF-8".into(), b"{\"step\": \xff\xfe}".to_vec()),
    ];
    for key in [
        "step",
        "tokens",
        "data_cursor",
        "optimizer_t",
        "seed",
        "elapsed_s",
        "motrain_version",
        "config",
        "config.model",
        "config.model.vocab_size",
        "config.run.name",
    ] {
        cases.push((
            format!("missing {key}"),
            serde_json::to_vec(&c.state_with(key, None)).unwrap(),
        ));
    }
    let wrong: Vec<(&str, Value)> = vec![
        ("step", json!("two")),
        ("step", json!(-1)),
        ("step", json!(1.5)),
        ("step", json!(null)),
        ("step", json!(1e30)),
        ("tokens", json!(-32)),
        ("data_cursor", json!([4])),
        ("data_cursor", json!(33)), // more windows than the 32 tokens trained
        ("data_cursor", json!(u64::MAX)),
        ("tokens", json!(u64::MAX)),
        ("source_cursors", json!([1, 2])), // a mixture's sources that do not sum to data_cursor
        ("source_cursors", json!([u64::MAX, 5])),
        ("optimizer_t", json!(true)),
        ("optimizer_t", json!(3)), // more updates than steps
        ("optimizer_t", json!(u64::MAX)),
        ("seed", json!(-5)),
        ("elapsed_s", json!("fast")),
        ("motrain_version", json!(1)),
        ("config", json!("tiny.toml")),
        ("config.model.d_model", json!(-8)),
        ("config.model.vocab_size", json!(0)),
        ("config.model.n_heads", json!(3)),
        ("config.model.norm", json!("batchnorm")),
        ("config.model.ffn_layers", json!([5])),
        ("config.data.seq_len", json!(1_000_000)),
        ("config.train.betas", json!([0.9])),
        ("config.model.bogus", json!(1)),
    ];
    for (key, v) in wrong {
        cases.push((
            format!("{key} = {v}"),
            serde_json::to_vec(&c.state_with(key, Some(v))).unwrap(),
        ));
    }
    cases
}

#[test]
fn lying_states_are_refused_by_load_state() {
    let c = Ckpt::new();
    for (case, bytes) in lying_states(&c) {
        c.write_state(&bytes);
        match load_state(&c.dir()) {
            Ok(_) => panic!("{case}: load_state accepted it"),
            Err(e) => assert!(
                e.to_string().contains("state.json"),
                "{case}: the error does not name the file: {e}"
            ),
        }
    }
}

#[test]
fn lying_states_fail_eval_with_an_error_naming_the_file() {
    let c = Ckpt::new();
    for (case, bytes) in lying_states(&c) {
        c.write_state(&bytes);
        assert_eval_refused(&c, &case, "state.json");
    }
}

/// A checkpoint directory whose name and `state.json` disagree on the step (a copy gone wrong,
/// or an edit): resuming from it would write over the checkpoint of the step it names.
#[test]
fn a_step_that_does_not_match_its_directory_is_named() {
    let c = Ckpt::new();
    let named = c.tmp.path().join("step-000005");
    std::fs::rename(c.dir(), &named).unwrap();
    let e = load_state(&named).expect_err("a step-000005 holding step 2 loaded");
    assert!(e.to_string().contains("in the directory of step 5"), "{e}");
    std::fs::rename(&named, c.tmp.path().join("step-000002")).unwrap();
    load_state(&c.tmp.path().join("step-000002")).unwrap();
}

#[test]
fn a_latest_pointer_that_lies_is_named() {
    let c = Ckpt::new();
    // A run directory whose checkpoints/latest names something that is not a checkpoint.
    let run = c.tmp.path().join("run");
    let ckpts = run.join("checkpoints");
    std::fs::create_dir_all(&ckpts).unwrap();
    for latest in [&b""[..], b"step-999999", b"../../..", b"\xff\xfe", b"step-000002\nstep-000004"]
    {
        std::fs::write(ckpts.join("latest"), latest).unwrap();
        let out = motrain_limited(c.tmp.path(), &["eval", "--checkpoint", run.to_str().unwrap()]);
        assert_bad_input(&out, &["latest"]);
    }
}

// ---------------------------------------------------------------------------------------------
// a state.json or config that describes an impossible model: a clear error, not an abort
//
// Each of these is a valid JSON/TOML file of a few hundred bytes; motrain must refuse it before
// it tries to allocate, rather than abort ("memory allocation of N bytes failed"), panic on a
// capacity overflow, or (without a ulimit) grow until the OOM killer ends it.

#[test]
fn a_state_with_absurd_n_layers_is_refused() {
    let c = Ckpt::new();
    c.write_state(
        &serde_json::to_vec(&c.state_with("config.model.n_layers", Some(json!(1u64 << 60))))
            .unwrap(),
    );
    assert_eval_refused(&c, "n_layers = 2^60", "state.json");
}

#[test]
fn a_state_with_absurd_vocab_size_is_refused() {
    let c = Ckpt::new();
    c.write_state(
        &serde_json::to_vec(&c.state_with("config.model.vocab_size", Some(json!(1u64 << 50))))
            .unwrap(),
    );
    assert_eval_refused(&c, "vocab_size = 2^50", "state.json");
}

#[test]
fn a_state_with_absurd_max_seq_len_is_refused() {
    let c = Ckpt::new();
    c.write_state(
        &serde_json::to_vec(&c.state_with("config.model.max_seq_len", Some(json!(1u64 << 62))))
            .unwrap(),
    );
    assert_eval_refused(&c, "max_seq_len = 2^62", "state.json");
}

#[test]
fn a_config_with_absurd_n_layers_is_refused() {
    let c = Ckpt::new();
    let glob = c.tmp.path().join("shards/tiny_val_*.bin").display().to_string();
    let cfg = c.tmp.path().join("huge.toml");
    std::fs::write(
        &cfg,
        tiny_toml(&glob).replace("n_layers = 1", &format!("n_layers = {}", 1u64 << 60)),
    )
    .unwrap();
    let out = motrain_limited(c.tmp.path(), &["train", "--config", cfg.to_str().unwrap()]);
    assert_bad_input(&out, &["n_layers"]);
    // The same through --set.
    let tiny = c.tmp.path().join("tiny.toml");
    std::fs::write(&tiny, tiny_toml(&glob)).unwrap();
    let set = format!("model.n_layers={}", 1u64 << 60);
    let out = motrain_limited(
        c.tmp.path(),
        &["train", "--config", tiny.to_str().unwrap(), "--set", &set],
    );
    assert_bad_input(&out, &["n_layers"]);
}

#[test]
fn a_config_with_absurd_vocab_size_is_refused() {
    let c = Ckpt::new();
    let glob = c.tmp.path().join("shards/tiny_val_*.bin").display().to_string();
    let cfg = c.tmp.path().join("huge.toml");
    std::fs::write(
        &cfg,
        tiny_toml(&glob).replace("vocab_size = 16", &format!("vocab_size = {}", 1u64 << 50)),
    )
    .unwrap();
    let out = motrain_limited(c.tmp.path(), &["train", "--config", cfg.to_str().unwrap()]);
    assert_bad_input(&out, &["vocab_size"]);
}

// Sizes under the sanity bound of `Config::validate` (2^40 elements) that still cannot be
// allocated: here the 4 GiB ulimit refuses them; on a real machine jemalloc maps them with
// MAP_NORESERVE, so the allocation "succeeds" and motrain fills memory until the OOM killer ends
// it. A checkpoint whose state.json and model.safetensors disagree about the sizes should be
// refused from the safetensors header before anything is allocated.

#[test]
fn a_state_bigger_than_its_weights_is_refused_before_allocating() {
    let c = Ckpt::new();
    c.write_state(
        &serde_json::to_vec(&c.state_with("config.model.vocab_size", Some(json!(1u64 << 31))))
            .unwrap(),
    );
    let out = c.eval();
    assert_bad_input(&out, &[]);
    let errors = out.error_lines().join("\n");
    assert!(
        errors.contains("state.json") || errors.contains("model.safetensors"),
        "the error names neither file\n{}",
        out.describe()
    );
}

#[test]
fn a_config_too_big_to_allocate_is_one_error_line() {
    let c = Ckpt::new();
    let glob = c.tmp.path().join("shards/tiny_val_*.bin").display().to_string();
    let cfg = c.tmp.path().join("big.toml");
    std::fs::write(
        &cfg,
        tiny_toml(&glob).replace("vocab_size = 16", &format!("vocab_size = {}", 1u64 << 31)),
    )
    .unwrap();
    let out = motrain_limited(c.tmp.path(), &["train", "--config", cfg.to_str().unwrap()]);
    assert_bad_input_code(&out, None, &[]);
}

// ---------------------------------------------------------------------------------------------
// shards that lie

fn header(magic: i32, version: i32, count: i32) -> Vec<u8> {
    shard_bytes(magic, version, count, &[])
}

#[test]
fn lying_shards_are_refused_by_shard_open() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.bin");
    let tokens = pattern_tokens(40, 16);
    let mut u32_beyond = header(20240801, 7, 2);
    u32_beyond.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("llmc", "empty file", vec![]),
        ("llmc", "header cut short", header(20240520, 1, 0)[..1000].to_vec()),
        ("llmc", "wrong magic", shard_bytes(12345, 1, 40, &tokens)),
        ("llmc", "uint16 magic, uint32 version", shard_bytes(20240520, 7, 40, &tokens)),
        ("llmc", "count larger than the file", shard_bytes(20240520, 1, 41, &tokens)),
        ("llmc", "count smaller than the file", shard_bytes(20240520, 1, 39, &tokens)),
        ("llmc", "negative count", shard_bytes(20240520, 1, -1, &tokens)),
        ("llmc", "count i32::MAX", shard_bytes(20240520, 1, i32::MAX, &tokens)),
        ("llmc", "count i32::MIN", shard_bytes(20240520, 1, i32::MIN, &tokens)),
        ("llmc", "uint32 id beyond the vocab", u32_beyond),
        ("llmc", "uint16 id beyond the vocab", shard_bytes(20240520, 1, 2, &[3, 16])),
        ("nanogpt", "odd size", vec![1, 0, 2]),
        ("nanogpt", "id beyond the vocab", vec![1, 0, 0xff, 0xff]),
    ];
    for (format, case, bytes) in cases {
        std::fs::write(&p, &bytes).unwrap();
        match Shard::open(&p, format, Some(16)) {
            Ok(s) => panic!("{format} {case}: accepted ({} tokens)", s.len()),
            Err(e) => assert!(
                e.to_string().contains("s.bin"),
                "{format} {case}: the error does not name the file: {e}"
            ),
        }
    }
}

/// Shards that are valid, however odd, open and read back through the eval stream.
#[test]
fn odd_but_valid_shards_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.bin");
    for (format, bytes, n) in [
        ("llmc", header(20240520, 1, 0), 0),
        ("llmc", header(20240801, 7, 0), 0),
        ("nanogpt", vec![], 0),
        ("nanogpt", vec![1, 0], 1),
        ("llmc", shard_bytes(20240520, 1, 3, &[1, 2, 3]), 3),
    ] {
        std::fs::write(&p, &bytes).unwrap();
        let s = Shard::open(&p, format, Some(16)).unwrap_or_else(|e| panic!("{format} {n}: {e}"));
        assert_eq!(s.len(), n);
        let stream = EvalStream::new(vec![s], 1);
        for b in 0..stream.batches(1, 10) {
            assert_eq!(stream.batch(b, 1).inputs.len(), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// configs and overrides

#[test]
fn hostile_configs_are_errors_not_panics() {
    let min = "[run]\nname='t'\n[data]\ntrain='x/*.bin'\n[model]\nvocab_size=100\n";
    let cases = [
        "",
        "\u{feff}",
        "[run",
        "[run]\nname='t'\n[run]\nname='u'\n",
        "run = 1",
        "[run]\nname = ''\n[data]\ntrain='x'\n[model]\nvocab_size=1\n",
        "[run]\nname = '..'\n[data]\ntrain='x'\n[model]\nvocab_size=1\n",
        &format!("{min}d_model = -1\n"),
        &format!("{min}d_model = 9223372036854775807\nn_heads = 1\n"),
        &format!("{min}norm_eps = nan\n"),
        &format!("{min}rope_theta = -inf\n"),
        &format!("{min}ffn_layers = [-1]\n"),
        &format!("{min}ffn_layers = {{}}\n"),
        &format!("{min}max_seq_len = 1\n"),
        &format!("{min}[train]\nbetas = [0.9, 1.0]\n"),
        &format!("{min}[train]\nlr = inf\n"),
        &format!("{min}[train]\nmicro_batch_size = 7\n"),
        // A shared expert past what can be allocated counts toward the parameters too.
        &format!("{min}ffn = 'moe'\n[model.moe]\nshared_expert_size = 100000000000\n"),
    ];
    for text in cases {
        assert!(Config::from_toml_str(text, "hostile").is_err(), "accepted: {text:?}");
    }
    let mut table: toml::Table = min.parse().unwrap();
    for arg in [
        "",
        "=",
        "model",
        ".=1",
        "model..d=1",
        "model.=1",
        "=1",
        "run.name.x=1",
        "model.d_model=[",
        "model.d_model=\u{0}",
    ] {
        let mut t = table.clone();
        if apply_override(&mut t, arg).is_ok() {
            let _ = Config::from_table(t, "hostile");
        }
    }
    apply_override(&mut table, "train.steps=0").unwrap();
    assert!(Config::from_table(table, "hostile").is_err());
}

// ---------------------------------------------------------------------------------------------
// file digests in state.json

/// The fixture's tensors saved the way training saves them (with digests), in `<tmp>/run`.
fn saved_with_digests(c: &Ckpt) -> PathBuf {
    let state = load_state(&c.dir()).unwrap();
    let model = load_tensors(&c.model_path(), &candle_core::Device::Cpu).unwrap();
    motrain::checkpoint::save(&c.tmp.path().join("run"), &state, &model, &model, 2).unwrap()
}

/// `path` with one bit of its last byte (tensor data, not the header) flipped: still a valid
/// safetensors file, so only the digest can tell.
fn flip_last_bit(path: &Path) {
    let mut bytes = read(path);
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn saved_checkpoints_record_the_digest_of_each_tensor_file() {
    let c = Ckpt::new();
    let dir = saved_with_digests(&c);
    let state = state_json(&dir);
    assert_eq!(state["files_digest"], "xxh3-128", "{state}");
    let files = state["files"].as_object().unwrap_or_else(|| panic!("no files in {state}"));
    assert_eq!(files.len(), 2, "{state}");
    for name in ["model.safetensors", "optimizer.safetensors"] {
        let recorded = files[name].as_str().unwrap();
        assert_eq!(recorded.len(), 32, "{name}: {recorded}");
        assert_eq!(recorded, motrain::checkpoint::digest(&read(&dir.join(name))), "{name}");
    }
    let ckpt = motrain::checkpoint::load(&dir, &candle_core::Device::Cpu).unwrap();
    ckpt.optimizer(&candle_core::Device::Cpu).unwrap();
}

#[test]
fn a_flipped_bit_in_model_safetensors_fails_eval_naming_the_file() {
    let c = Ckpt::new();
    let dir = saved_with_digests(&c);
    let ok = motrain_limited(c.tmp.path(), &["eval", "--checkpoint", dir.to_str().unwrap()]);
    assert_eq!(ok.code, Some(0), "{}", ok.describe());
    flip_last_bit(&dir.join("model.safetensors"));
    let out = motrain_limited(c.tmp.path(), &["eval", "--checkpoint", dir.to_str().unwrap()]);
    assert_bad_input(&out, &["model.safetensors", "digest"]);
    // Through the run directory too (what `--resume` and `--init-from` resolve).
    let run = c.tmp.path().join("run");
    let out = motrain_limited(c.tmp.path(), &["eval", "--checkpoint", run.to_str().unwrap()]);
    assert_bad_input(&out, &["model.safetensors", "digest"]);
}

#[test]
fn a_flipped_bit_in_optimizer_safetensors_is_refused_naming_the_file() {
    let c = Ckpt::new();
    let dir = saved_with_digests(&c);
    flip_last_bit(&dir.join("optimizer.safetensors"));
    let ckpt = motrain::checkpoint::load(&dir, &candle_core::Device::Cpu).unwrap();
    let e =
        ckpt.optimizer(&candle_core::Device::Cpu).expect_err("the corrupt optimizer state loaded");
    assert!(
        e.to_string().contains("optimizer.safetensors") && e.to_string().contains("digest"),
        "{e}"
    );
}

#[test]
fn digests_that_lie_or_go_missing_are_refused_naming_state_json() {
    let c = Ckpt::new();
    let dir = saved_with_digests(&c);
    let honest = state_json(&dir);
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut s = honest.clone();
        f(&mut s);
        std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&s).unwrap()).unwrap();
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("an unknown algorithm", Box::new(|s| s["files_digest"] = json!("md5")), "state.json"),
        (
            "no algorithm",
            Box::new(|s| {
                s.as_object_mut().unwrap().remove("files_digest");
            }),
            "state.json",
        ),
        (
            "the model's entry gone",
            Box::new(|s| {
                s["files"].as_object_mut().unwrap().remove("model.safetensors");
            }),
            "state.json",
        ),
        ("files not a map", Box::new(|s| s["files"] = json!("model.safetensors")), "state.json"),
        (
            "a wrong digest",
            Box::new(|s| s["files"]["model.safetensors"] = json!("0".repeat(32))),
            "model.safetensors",
        ),
    ];
    for (case, f, file) in cases {
        edit(&*f);
        let out = motrain_limited(c.tmp.path(), &["eval", "--checkpoint", dir.to_str().unwrap()]);
        assert!(out.code == Some(2), "{case}: expected exit code 2\n{}", out.describe());
        assert_bad_input(&out, &[file]);
    }
    // A checkpoint from before digests (neither key) still loads: the fixture's own.
    assert!(state_json(&c.dir()).get("files").is_none());
    c.eval().ok();
}
