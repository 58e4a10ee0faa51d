//! PESC upcycling end to end: `upcycle` writes a run whose step-0 model is the dense model,
//! `train --init-from` fine-tunes only adapters and routers (or everything), resume stays exact,
//! and bad inputs are refused without writing anything.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn is_adapter_or_router(name: &str) -> bool {
    name.contains(".mlp.adapters.") || name.contains(".mlp.router.")
}

/// A dense run of 20 steps on the fixture's data.
fn dense(f: &Fixture) -> PathBuf {
    f.train(&f.config(), "dense", &["train.steps=20"]).ok();
    f.run_dir("dense")
}

fn upcycle(f: &Fixture, dense: &Path, name: &str, extra: &[&str]) -> Out {
    let out = f.run_dir(name);
    let mut args =
        vec!["upcycle", "--checkpoint", dense.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    f.run(&args)
}

fn eval_loss(f: &Fixture, run: &Path) -> f64 {
    num(&f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok().last_json(), "loss")
}

/// `train --config RUN/config.toml --init-from RUN --set ...`.
fn fine_tune(f: &Fixture, run: &Path, sets: &[&str]) -> Out {
    let cfg = run.join("config.toml");
    let mut args =
        vec!["train", "--config", cfg.to_str().unwrap(), "--init-from", run.to_str().unwrap()];
    for s in sets {
        args.extend_from_slice(&["--set", s]);
    }
    f.run(&args)
}

#[test]
fn upcycled_model_is_the_dense_model_and_fine_tunes_only_adapters() {
    let f = Fixture::new();
    let dense = dense(&f);
    let report = upcycle(&f, &dense, "pesc", &["--experts", "4", "--adapter-dim", "8"]).ok();
    let j = report.last_json();
    assert_eq!(
        j["max_logit_diff"],
        0.0,
        "the upcycled model must compute the dense model:\n{}",
        report.describe()
    );
    assert_eq!(j["layers"], serde_json::json!([0, 1]));
    // 2 blocks × (router 4·32 + adapters 2·4·8·32).
    assert_eq!(j["added_params"], 2 * (4 * 32 + 2 * 4 * 8 * 32));
    assert_eq!(j["trained_params"], j["added_params"]);

    let run = f.run_dir("pesc");
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("ffn = \"pesc\""), "{config}");
    let (name, step0) = latest(&run).unwrap();
    assert_eq!(name, "step-000000");
    let dense_weights = tensors(&latest(&dense).unwrap().1.join("model.safetensors"));
    let before = tensors(&step0.join("model.safetensors"));
    for (n, t) in &dense_weights {
        assert_eq!(values(&before[n]), values(t), "{n} changed in upcycling");
    }
    let dims = |n: &str| before[n].dims().to_vec();
    assert_eq!(dims("model.layers.0.mlp.router.weight"), [4, 32]);
    assert_eq!(dims("model.layers.0.mlp.adapters.down"), [4, 8, 32]);
    assert_eq!(dims("model.layers.0.mlp.adapters.up"), [4, 32, 8]);
    assert_eq!(
        dims("model.layers.1.mlp.gate_proj.weight"),
        [64, 32],
        "the dense FFN keeps its names"
    );
    assert!(
        values(&before["model.layers.1.mlp.adapters.up"]).iter().all(|&v| v == 0.0),
        "Up starts at zero"
    );
    assert_eq!(before.len(), dense_weights.len() + 6);
    assert!(
        (eval_loss(&f, &dense) - eval_loss(&f, &run)).abs() < 1e-6,
        "eval loss differs at step 0"
    );

    let out =
        fine_tune(&f, &run, &["train.steps=10", "train.eval_every=10", "train.ckpt_every=10"]).ok();
    assert!(
        out.stdout.contains(&format!("({} trained)", j["trained_params"])),
        "{}",
        out.describe()
    );
    let (name, tuned_dir) = latest(&run).unwrap();
    assert_eq!(name, "step-000010");
    let after = tensors(&tuned_dir.join("model.safetensors"));
    for (n, t) in &before {
        let changed = values(&after[n]) != values(t);
        assert_eq!(changed, is_adapter_or_router(n), "{n}: changed = {changed}");
    }
    let moments: BTreeSet<String> =
        tensors(&tuned_dir.join("optimizer.safetensors")).into_keys().collect();
    let want: BTreeSet<String> = before
        .keys()
        .filter(|n| is_adapter_or_router(n))
        .flat_map(|n| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")])
        .collect();
    assert_eq!(moments, want, "the optimizer holds state for what trains, and only that");

    for l in train_lines(&run) {
        let routing = l["routing"].as_array().unwrap_or_else(|| panic!("no routing stats in {l}"));
        assert_eq!(routing.len(), 2);
        for r in routing {
            let load: f64 = r["load"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
            assert!((load - 1.0).abs() < 1e-9 && r["dropped"] == 0.0, "PESC is dropless: {r}");
            assert!(
                r["entropy"].as_f64().unwrap() > 0.0 && r["aux_loss"].as_f64().unwrap() > 0.0,
                "{r}"
            );
        }
    }
    let ev = f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok();
    assert_eq!(ev.last_json()["routing"].as_array().map(Vec::len), Some(2));
    assert!(ev.stderr.contains("load per expert"), "{}", ev.stderr);
    assert!(latest(&dense).unwrap().0 == "step-000020", "the dense run is untouched");
}

#[test]
fn full_fine_tune_and_resume_with_dropout_is_exact() {
    let f = Fixture::new();
    let dense = dense(&f);
    upcycle(
        &f,
        &dense,
        "pesc",
        &[
            "--layers",
            "1",
            "--set",
            "model.pesc.train_only_adapters=false",
            "--set",
            "model.pesc.adapter_dropout=0.1",
        ],
    )
    .ok();
    let run = f.run_dir("pesc");
    let before = tensors(&latest(&run).unwrap().1.join("model.safetensors"));
    assert!(
        !before.contains_key("model.layers.0.mlp.router.weight"),
        "--layers 1 leaves block 0 dense"
    );
    let sets = ["train.steps=8", "train.ckpt_every=4", "train.schedule=constant"];
    fine_tune(&f, &run, &[&sets[..], &["run.name=a"]].concat()).ok();
    let a = f.run_dir("a");
    let after = tensors(&latest(&a).unwrap().1.join("model.safetensors"));
    assert_ne!(
        values(&after["model.embed_tokens.weight"]),
        values(&before["model.embed_tokens.weight"]),
        "everything trains"
    );
    fine_tune(&f, &run, &[&sets[..], &["run.name=b", "train.steps=4"]].concat()).ok();
    let cfg = f.run_dir("b").join("config.toml");
    f.run(&["train", "--config", cfg.to_str().unwrap(), "--resume", "--set", "train.steps=8"]).ok();
    assert_eq!(losses(&a), losses(&f.run_dir("b")), "resume must redraw the same dropout masks");
}

#[test]
fn upcycle_refuses_bad_input_and_writes_nothing() {
    let f = Fixture::new();
    let dense = dense(&f);
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--top-k", "3", "--experts", "2"], &["--top-k", "--experts"]),
        (&["--experts", "0"], &["--experts"]),
        (&["--layers", "0,x"], &["--layers"]),
        (&["--layers", "7"], &["--layers", "block 7"]),
        (&["--set", "model.pesc.adapter_dropout=1.5"], &["adapter_dropout"]),
    ];
    for (extra, needles) in cases {
        let out = upcycle(&f, &dense, "bad", extra);
        assert_bad_input(&out, needles);
        assert!(
            !f.run_dir("bad").exists(),
            "a refused upcycle wrote {}",
            f.run_dir("bad").display()
        );
    }
    let huge = upcycle(&f, &dense, "huge", &["--experts", "9223372036854775808"]);
    assert_bad_input(&huge, &["--experts", "2^40"]);
    let missing = f.root().join("nowhere");
    assert_bad_input(&upcycle(&f, &missing, "bad", &[]), &["nowhere"]);

    f.train(&f.config(), "moe", &["model.ffn=moe", "model.moe.n_experts=2", "train.steps=2"]).ok();
    let out = upcycle(&f, &f.run_dir("moe"), "bad", &[]);
    assert_bad_input(&out, &["dense", "model.ffn"]);

    upcycle(&f, &dense, "pesc", &[]).ok();
    let out = upcycle(&f, &dense, "pesc", &[]);
    assert_bad_input(&out, &["is not empty", "choose a new --out"]);
    let out = upcycle(&f, &f.run_dir("pesc"), "again", &[]);
    assert_bad_input(&out, &["dense", "pesc"]);
}
