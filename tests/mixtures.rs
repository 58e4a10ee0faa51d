//! `[[data.sources]]` end to end: config errors, a one-source mixture equal to the single-source
//! config, per-source train and val losses checked against independent computations, and an
//! exact resume.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// The tiny pattern shards and a second, random source over the same vocabulary.
fn two_sources() -> Fixture {
    let f = Fixture::new();
    f.shards("noise", &random_tokens(3000, 64, 5), &random_tokens(600, 64, 6));
    f
}

fn sources_of(v: &Value) -> serde_json::Map<String, Value> {
    v.get("sources")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(|| panic!("no sources map in {v}"))
}

#[test]
fn mixture_config_errors_are_named() {
    let f = two_sources();
    let both = f.config_with_data(
        "both.toml",
        "train = \"shards/tiny_train_*.bin\"\n[[data.sources]]\ntrain = \"shards/noise_train_*.bin\"\nweight = 1.0\n",
        64,
    );
    let none = f.config_with_data("none.toml", "sources = []\n", 64);
    let zero = f.mixture_config("zero.toml", &[("tiny", 0.7), ("noise", 0.0)], 64);
    let negative = f.mixture_config("neg.toml", &[("tiny", -1.0), ("noise", 1.0)], 64);
    let missing = f.mixture_config("missing.toml", &[("tiny", 0.5), ("nothing", 0.5)], 64);
    let huge = f.mixture_config("huge.toml", &[("tiny", 1e308), ("noise", 1e308)], 64);
    let cases: [(&Path, &[&str]); 6] = [
        (&both, &["data.sources", "data.train", "exclude"]),
        (&none, &["data.sources", "no source"]),
        (&zero, &["data.sources[1].weight", "> 0", "got 0"]),
        (&negative, &["data.sources[0].weight", "-1"]),
        (&missing, &["data.sources[1] (nothing) train", "nothing_train_*.bin", "no files match"]),
        (&huge, &["data.sources", "sum to inf"]),
    ];
    for (cfg, needles) in cases {
        let out = f.train(cfg, "bad", &[]);
        assert_bad_input(&out, needles);
    }
    // A weight may be left out nowhere, and names must be unique.
    let unnamed = f.config_with_data(
        "noweight.toml",
        "[[data.sources]]\ntrain = \"shards/tiny_train_*.bin\"\n",
        64,
    );
    assert_bad_input(&f.train(&unnamed, "bad", &[]), &["data.sources", "weight"]);
    let twice = f.config_with_data(
        "twice.toml",
        "[[data.sources]]\nname = \"a\"\ntrain = \"shards/tiny_train_*.bin\"\nweight = 1\n\
         [[data.sources]]\nname = \"a\"\ntrain = \"shards/noise_train_*.bin\"\nweight = 1\n",
        64,
    );
    assert_bad_input(&f.train(&twice, "bad", &[]), &["data.sources[1].name", "unique"]);
}

#[test]
fn one_source_of_weight_one_is_the_single_source_run() {
    let f = Fixture::new();
    let single = f.config();
    let mixed = f.mixture_config("one.toml", &[("tiny", 1.0)], 64);
    let extra = ["train.steps=8", "train.eval_every=4", "train.ckpt_every=8"];
    f.train(&single, "single", &extra).ok();
    f.train(&mixed, "mixed", &extra).ok();
    let (a, b) = (train_lines(&f.run_dir("single")), train_lines(&f.run_dir("mixed")));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(num(x, "loss").to_bits(), num(y, "loss").to_bits(), "{x} vs {y}");
        assert_eq!(num(x, "grad_norm").to_bits(), num(y, "grad_norm").to_bits());
        assert!(x.get("sources").is_none(), "a single-source run logs no sources: {x}");
        // The one source's loss is the step's loss (the mean over the same tokens).
        let l = sources_of(y)["tiny"].as_f64().unwrap();
        assert!((l - num(y, "loss")).abs() < 1e-5 * l, "{y}");
    }
    let (ea, eb) = (eval_lines(&f.run_dir("single")), eval_lines(&f.run_dir("mixed")));
    assert_eq!(ea.len(), 2);
    for (x, y) in ea.iter().zip(&eb) {
        assert_eq!(num(x, "loss").to_bits(), num(y, "loss").to_bits());
        assert_eq!(sources_of(y)["tiny"].as_f64().unwrap().to_bits(), num(y, "loss").to_bits());
    }
}

#[test]
fn per_source_losses_match_independent_computations() {
    let f = two_sources();
    // Equal weights and 4 rows a step: two rows of each source in every step, so the step's
    // loss is the mean of the two sources' losses.
    let cfg = f.mixture_config("mix.toml", &[("tiny", 1.0), ("noise", 1.0)], 64);
    let out = f.train(&cfg, "mix", &["train.steps=20", "train.eval_every=10"]).ok();
    assert!(out.stdout.contains("mixture of 2 sources by weight: tiny 0.500"), "{}", out.stdout);
    assert!(out.stdout.contains("(tiny "), "the step lines name the sources\n{}", out.stdout);
    let run = f.run_dir("mix");
    let lines = train_lines(&run);
    for v in &lines {
        let s = sources_of(v);
        let (tiny, noise) = (s["tiny"].as_f64().unwrap(), s["noise"].as_f64().unwrap());
        let mean = (tiny + noise) / 2.0;
        assert!((mean - num(v, "loss")).abs() < 1e-5 * mean, "{v}");
    }
    // The pattern is learnt, the noise is not.
    let last = sources_of(lines.last().unwrap());
    assert!(last["tiny"].as_f64().unwrap() < last["noise"].as_f64().unwrap() - 0.5, "{last:?}");

    // Each source's val loss is what `eval --data` computes on that source's shards alone, and
    // the overall val loss their mean weighted by the weights.
    let evals = eval_lines(&run);
    let last_eval = evals.iter().find(|v| step_of(v) == 20).expect("an eval at the last step");
    let per = sources_of(last_eval);
    for name in ["tiny", "noise"] {
        let glob = f.root().join(format!("shards/{name}_val_*.bin"));
        let alone = f
            .run(&["eval", "--checkpoint", run.to_str().unwrap(), "--data", glob.to_str().unwrap()])
            .ok();
        let loss = alone.last_json()["loss"].as_f64().unwrap();
        assert_eq!(per[name].as_f64().unwrap().to_bits(), loss.to_bits(), "{name}");
    }
    let weighted = (per["tiny"].as_f64().unwrap() + per["noise"].as_f64().unwrap()) / 2.0;
    assert!((weighted - num(last_eval, "loss")).abs() < 1e-12, "{last_eval}");

    // `eval` of the run reports every source too.
    let e = f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok();
    let j = e.last_json();
    assert!((j["loss"].as_f64().unwrap() - num(last_eval, "loss")).abs() < 1e-12, "{j}");
    for name in ["tiny", "noise"] {
        assert_eq!(j["sources"][name]["loss"], per[name], "{j}");
    }
}

#[test]
fn a_resumed_mixture_run_equals_an_uninterrupted_one() {
    let f = two_sources();
    let cfg = f.mixture_config("mix.toml", &[("tiny", 0.7), ("noise", 0.3)], 64);
    let common = [
        "data.sampler=epoch",
        "train.schedule=constant",
        "train.eval_every=5",
        "train.ckpt_every=7",
    ];
    let with = |steps: &'static str| -> Vec<&'static str> {
        common.iter().copied().chain([steps]).collect()
    };
    f.train(&cfg, "straight", &with("train.steps=15")).ok();
    f.train(&cfg, "resumed", &with("train.steps=7")).ok();
    let (_, ckpt) = latest(&f.run_dir("resumed")).unwrap();
    let cursors = state_json(&ckpt)["source_cursors"].clone();
    // 7 steps of 4 rows at 0.7 / 0.3: 20 and 8 windows drawn.
    assert_eq!(cursors, serde_json::json!([20, 8]), "per-source cursors in state.json");
    let out = f.train(&cfg, "resumed", &[with("train.steps=15"), vec!["--resume"]].concat()).ok();
    assert!(out.stdout.contains("resumed"), "{}", out.describe());
    // Every line of the uninterrupted run, train and val, is in the resumed run's log (which
    // also holds the eval its first part made when it ended at step 7).
    let (a, b) = (metrics(&f.run_dir("straight")), metrics(&f.run_dir("resumed")));
    assert_eq!(a.len(), 15 + 3);
    for x in &a {
        let y = b
            .iter()
            .find(|y| step_of(y) == step_of(x) && is_eval(y) == is_eval(x))
            .unwrap_or_else(|| panic!("no line for {x} after resuming"));
        assert_eq!(num(x, "loss").to_bits(), num(y, "loss").to_bits(), "{x} vs {y}");
        assert_eq!(sources_of(x), sources_of(y), "step {}", step_of(x));
    }
    // Resuming with another number of sources is refused.
    let three = f.mixture_config("three.toml", &[("tiny", 0.7), ("noise", 0.3), ("tiny", 0.1)], 64);
    let out = f.train(&three, "resumed", &[with("train.steps=20"), vec!["--resume"]].concat());
    assert_bad_input(&out, &["state.json", "2 train source", "3"]);
}

#[test]
fn the_shipped_mixture_config_loads_its_sources() {
    let cfg_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/mixture-tiny.toml");
    let cfg = motrain::config::Config::load(&cfg_path, &[]).unwrap();
    let data = motrain::data::Mixture::open(&cfg.data, cfg.model.vocab_size, 0).unwrap();
    let names: Vec<&str> = data.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["shakespeare", "kjv"]);
    let val = motrain::data::mixture::open_val(&cfg.data, cfg.model.vocab_size).unwrap();
    assert!(
        val.iter().all(|v| v.stream.windows() >= cfg.train.eval_batch_size),
        "a full eval batch"
    );
}
