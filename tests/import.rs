//! `motrain import` against tiny Hugging Face models that transformers made
//! (`scripts/make_hf_fixtures.py` → `tests/fixtures/hf/`, with transformers' own logits): the
//! imported model computes transformers' logits, exporting it gives back the original tensors,
//! PESC upcycling keeps its logits, the run evaluates, generates and trains, and broken model
//! folders are refused with nothing written.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MODELS: [&str; 7] =
    ["llama", "mistral", "qwen2", "qwen2_tied", "mixtral", "qwen2_moe", "qwen2_moe_norm"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn import(cwd: &Path, src: &Path, out: &Path) -> Out {
    motrain(cwd, &["import", "--hf", src.to_str().unwrap(), "--out", out.to_str().unwrap()])
}

/// Every tensor of a safetensors file, or of all the files in a folder, as f32.
fn tensors_in(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".safetensors") && name != "expected.safetensors" {
            for (k, t) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                all.insert(k, t.to_dtype(DType::F32).unwrap());
            }
        }
    }
    all
}

/// Largest |a − b| over two tensors of one shape.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Our logits for transformers' input ids, `[B·S, V]`, and transformers' logits the same shape.
fn logits(run: &Path, name: &str) -> (Tensor, Tensor) {
    let expected =
        candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &expected["logits"];
    let (_, model) = motrain::checkpoint::load_model(run).unwrap();
    let got = model.forward(&ids, None).unwrap();
    let v = want.dim(2).unwrap();
    (got, want.reshape(((), v)).unwrap())
}

#[test]
fn imported_models_compute_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let run = tmp.path().join(name);
        let out = import(tmp.path(), &fixture(name), &run).ok();
        let report = out.last_json();
        assert_eq!(report["out"].as_str().unwrap(), run.to_str().unwrap());
        let (got, want) = logits(&run, name);
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{name}: max |Δlogit| vs transformers {diff}");
        // The logits vary: a model whose mapping dropped a tensor would still run.
        let spread: f32 = want.flatten_all().unwrap().var(0).unwrap().to_scalar().unwrap();
        assert!(spread > 1e-3, "{name}: degenerate fixture");
    }
}

#[test]
fn import_then_export_gives_back_the_original_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let run = tmp.path().join(name);
        import(tmp.path(), &fixture(name), &run).ok();
        let hf = tmp.path().join(format!("{name}-hf"));
        motrain(
            tmp.path(),
            &["export", "--checkpoint", run.to_str().unwrap(), "--out", hf.to_str().unwrap()],
        )
        .ok();
        let (original, exported) = (tensors_in(&fixture(name)), tensors_in(&hf));
        for (k, t) in &original {
            let e = exported.get(k).unwrap_or_else(|| panic!("{name}: export lacks `{k}`"));
            assert_eq!(max_diff(t, e), 0.0, "{name}: `{k}` changed");
        }
        let cfg = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap()
        };
        if fixture(name).join("tokenizer.json").is_file() {
            let read = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
            assert_eq!(read(&fixture(name)), read(&hf), "{name}: the tokenizer travels");
        }
        let (a, b) = (cfg(&fixture(name)), cfg(&hf));
        for key in [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "rope_theta",
            "tie_word_embeddings",
            "num_experts",
            "num_local_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "norm_topk_prob",
            "mlp_only_layers",
        ] {
            if !a[key].is_null() {
                assert_eq!(a[key], b[key], "{name}: config.json `{key}`");
            }
        }
        if let Some(s) = a["rope_scaling"].as_object() {
            for (k, v) in s {
                assert_eq!(&b["rope_scaling"][k], v, "{name}: rope_scaling.{k}");
            }
        }
    }
}

#[test]
fn pesc_upcycling_an_imported_llama_keeps_its_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("llama");
    import(tmp.path(), &fixture("llama"), &run).ok();
    let pesc = tmp.path().join("pesc");
    let out = motrain(
        tmp.path(),
        &[
            "upcycle",
            "--checkpoint",
            run.to_str().unwrap(),
            "--out",
            pesc.to_str().unwrap(),
            "--experts",
            "4",
            "--top-k",
            "2",
            "--adapter-dim",
            "8",
        ],
    )
    .ok();
    let diff = out.last_json()["max_logit_diff"].as_f64().unwrap();
    assert!(diff <= 1e-5, "upcycled vs dense: {diff}");
    let (dense, want) = logits(&run, "llama");
    let (upcycled, _) = logits(&pesc, "llama");
    assert!(max_diff(&dense, &upcycled) <= 1e-5);
    assert!(max_diff(&upcycled, &want) < 1e-4);
}

/// The imported run with its own tokenizer: shards from `prepare`, then eval, generate and
/// continued pretraining.
#[test]
fn an_imported_run_evaluates_generates_and_trains_with_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let run = cwd.join("llama");
    let report = import(cwd, &fixture("llama"), &run).ok().last_json();
    let tok = report["tokenizer"].as_str().unwrap().to_string();
    assert!(run.join("tokenizer.json").is_file());
    let docs: String = (0..400)
        .map(|i| format!("{}\n", serde_json::json!({"text": format!("The quick brown fox {i} jumps over the lazy dog.")})))
        .collect();
    std::fs::write(cwd.join("corpus.jsonl"), docs).unwrap();
    motrain(
        cwd,
        &[
            "prepare",
            "--input",
            "corpus.jsonl",
            "--out",
            "shards",
            "--tokenizer",
            &tok,
            "--val-fraction",
            "0.2",
        ],
    )
    .ok();
    let val = "shards/*_val_*.bin";
    let no_len = motrain(cwd, &["eval", "--checkpoint", "llama", "--data", val]);
    assert_bad_input(&no_len, &["--seq-len"]);
    let too_long =
        motrain(cwd, &["eval", "--checkpoint", "llama", "--data", val, "--seq-len", "100000"]);
    assert_bad_input(&too_long, &["--seq-len", "max_seq_len"]);
    let eval = motrain(
        cwd,
        &[
            "eval",
            "--checkpoint",
            "llama",
            "--data",
            val,
            "--seq-len",
            "32",
            "--batches",
            "2",
            "--batch-size",
            "2",
        ],
    )
    .ok();
    let loss = eval.last_json()["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    let generated = motrain(
        cwd,
        &[
            "generate",
            "--checkpoint",
            "llama",
            "--prompt",
            "The quick",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ],
    )
    .ok();
    assert!(generated.stdout.starts_with("The quick"), "{}", generated.describe());
    // Continued pretraining: the imported config, new data and schedule.
    let cfg = run.join("config.toml").to_str().unwrap().to_string();
    let trained = motrain(
        cwd,
        &[
            "train",
            "--config",
            &cfg,
            "--init-from",
            "llama",
            "--set",
            "run.name=\"cont\"",
            "--set",
            "run.out_dir=\"runs\"",
            "--set",
            "data.train=\"shards/*_train_*.bin\"",
            "--set",
            "data.val=\"shards/*_val_*.bin\"",
            "--set",
            "data.seq_len=32",
            "--set",
            "train.steps=3",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.micro_batch_size=2",
            "--set",
            "train.eval_every=3",
            "--set",
            "train.eval_batches=1",
        ],
    )
    .ok();
    assert!(trained.stdout.contains("initialised from"), "{}", trained.describe());
    assert!(cwd.join("runs/cont/checkpoints/latest").is_file());
    // Training the imported run itself needs data.
    let no_data = motrain(cwd, &["train", "--config", &cfg]);
    assert_bad_input(&no_data, &["data.train"]);
}

#[test]
fn a_sliding_window_caps_the_context_and_a_longer_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = copy_fixture("mistral", tmp.path());
    edit_config(&src, |c| c["sliding_window"] = 8.into());
    let run = tmp.path().join("run");
    let out = import(tmp.path(), &src, &run).ok();
    assert!(out.stderr.contains("sliding window of 8 tokens"), "{}", out.describe());
    assert_eq!(out.last_json()["max_seq_len"], 8);
    // Within the window the imported model is transformers' exactly: the first 8 positions.
    let expected = candle_core::safetensors::load(
        fixture("mistral").join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = expected["input_ids"].narrow(1, 0, 8).unwrap().to_dtype(DType::U32).unwrap();
    let want = expected["logits"].narrow(1, 0, 8).unwrap();
    let (_, model) = motrain::checkpoint::load_model(&run).unwrap();
    let got = model.forward(&ids, None).unwrap().reshape(want.dims()).unwrap();
    assert!(max_diff(&got, &want) < 1e-4);
    let shard = tmp.path().join("v_val_000000.bin");
    write_shard(&shard, &pattern_tokens(200, 96));
    let glob = tmp.path().join("v_val_*.bin");
    let long = motrain(
        tmp.path(),
        &["eval", "--checkpoint", "run", "--data", glob.to_str().unwrap(), "--seq-len", "16"],
    );
    assert_bad_input(&long, &["--seq-len 16", "max_seq_len = 8"]);
}

/// Copies a fixture into `dir` for breaking.
fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let to = dir.join(format!("broken-{name}"));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn broken_model_folders_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    const FIRST_SHARD: &str = "model-00001-of-00004.safetensors";
    let first_shard = FIRST_SHARD;
    type Break = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Break, Vec<&str>)> = vec![
        (
            "llama",
            Box::new(|d: &Path| {
                let p = d.join(FIRST_SHARD);
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len - 100)
                    .unwrap();
            }),
            vec![first_shard, "truncated"],
        ),
        (
            "llama",
            Box::new(|d: &Path| std::fs::remove_file(d.join(FIRST_SHARD)).unwrap()),
            vec![first_shard, "does not exist"],
        ),
        (
            "mistral",
            Box::new(|d: &Path| {
                let p = d.join("model.safetensors");
                let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
                let name = "model.norm.weight";
                let bad = t[name].to_dtype(DType::I64).unwrap();
                t.insert(name.into(), bad);
                candle_core::safetensors::save(&t, &p).unwrap();
            }),
            vec!["model.norm.weight", "I64", "BF16"],
        ),
        (
            "qwen2",
            Box::new(|d: &Path| edit_config(d, |c| c["intermediate_size"] = 72.into())),
            vec!["gate_proj", "[64, 32]", "[72, 32]"],
        ),
        (
            "qwen2",
            Box::new(|d: &Path| {
                edit_config(d, |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]))
            }),
            vec!["architectures", "GPT2LMHeadModel", "Qwen2ForCausalLM"],
        ),
        (
            "llama",
            Box::new(|d: &Path| edit_config(d, |c| c["rope_scaling"]["rope_type"] = "yarn".into())),
            vec!["rope_type", "yarn", "llama3"],
        ),
        (
            "mixtral",
            Box::new(|d: &Path| edit_config(d, |c| c["num_local_experts"] = 3.into())),
            vec!["gate.weight", "[4, 32]", "[3, 32]"],
        ),
        (
            "mixtral",
            Box::new(|d: &Path| edit_config(d, |c| c["num_hidden_layers"] = 1.into())),
            vec!["no place for", "model.layers.1."],
        ),
        (
            "mistral",
            Box::new(|d: &Path| std::fs::write(d.join("config.json"), "{not json").unwrap()),
            vec!["config.json", "JSON"],
        ),
        (
            // A context no TOML integer holds (was a caught panic writing config.toml).
            "llama",
            Box::new(|d: &Path| {
                edit_config(d, |c| c["max_position_embeddings"] = (1u64 << 63).into())
            }),
            vec!["config.json", "2^63"],
        ),
    ];
    for (i, (name, breaker, needles)) in cases.into_iter().enumerate() {
        let src = copy_fixture(name, cwd);
        breaker(&src);
        let out_dir = cwd.join(format!("out{i}"));
        let out = import(cwd, &src, &out_dir);
        assert_bad_input(&out, &needles);
        assert!(!out_dir.exists(), "case {i}: {} was created", out_dir.display());
        let leftovers: Vec<_> = std::fs::read_dir(cwd)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "case {i}: staging left behind");
    }
    // An --out that holds something is not touched.
    let full = cwd.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    assert_bad_input(&import(cwd, &fixture("qwen2"), &full), &["not empty"]);
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "mine");
    assert_bad_input(&import(cwd, &cwd.join("nowhere"), &cwd.join("x")), &["no such directory"]);
    let file = full.join("keep.txt");
    assert_bad_input(&import(cwd, &file, &cwd.join("x")), &["is a file", "folder"]);
}
