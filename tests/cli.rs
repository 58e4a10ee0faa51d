//! End-to-end tests of the `motrain` binary: every test runs the real executable on tiny models
//! and tiny llm.c shards in a temporary directory and checks what it prints and writes against
//! the contract in product.md.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// train

/// The tensors of a safetensors file: name -> (dtype, shape), from its JSON header.
fn safetensors_header(path: &Path) -> serde_json::Map<String, Value> {
    let b = read(path);
    assert!(b.len() >= 8, "{}: too short for safetensors", path.display());
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    assert!(8 + n <= b.len(), "{}: header length {n} past the end", path.display());
    let v: Value = serde_json::from_slice(&b[8..8 + n])
        .unwrap_or_else(|e| panic!("{}: header is not JSON: {e}", path.display()));
    let mut m = v.as_object().unwrap().clone();
    m.remove("__metadata__");
    m
}

fn shape(h: &serde_json::Map<String, Value>, name: &str) -> Vec<u64> {
    let t = h.get(name).unwrap_or_else(|| {
        panic!("tensor {name} missing; have {:?}", h.keys().collect::<Vec<_>>())
    });
    assert_eq!(t["dtype"], "F32", "{name} dtype");
    t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect()
}

#[test]
fn train_writes_a_complete_run_and_learns_a_pattern() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "e2e", &["train.keep_checkpoints=2"]).ok();
    let run = f.run_dir("e2e");

    // The resolved config: valid TOML, our values, absolute data paths.
    let text = std::fs::read_to_string(run.join("config.toml")).expect("run dir has config.toml");
    let t: toml::Table =
        text.parse().unwrap_or_else(|e| panic!("config.toml is not TOML: {e}\n{text}"));
    assert_eq!(t["run"]["name"].as_str(), Some("e2e"));
    assert_eq!(t["model"]["vocab_size"].as_integer(), Some(64));
    assert_eq!(t["train"]["keep_checkpoints"].as_integer(), Some(2));
    let train_glob = t["data"]["train"].as_str().unwrap();
    assert!(
        Path::new(train_glob).is_absolute(),
        "data.train in config.toml should be absolute: {train_glob}"
    );
    assert!(train_glob.ends_with("shards/tiny_train_*.bin"), "{train_glob}");
    assert!(
        train_glob.starts_with(&f.root().display().to_string()) || train_glob.contains(f.root().file_name().unwrap().to_str().unwrap()),
        "data.train should point into the fixture (relative to the config file, not the cwd): {train_glob}"
    );

    // Training lines: one per step (log_every = 1), every required field, consistent counters.
    let lines = train_lines(&run);
    assert_eq!(lines.len(), 60, "one training line per step");
    let mut last_elapsed = 0.0;
    for (i, v) in lines.iter().enumerate() {
        let step = i as u64 + 1;
        assert_eq!(step_of(v), step, "training lines in step order: {v}");
        for k in ["loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"] {
            let x = num(v, k);
            assert!(x.is_finite(), "{k} = {x} in {v}");
        }
        assert_eq!(
            v["tokens"].as_u64(),
            Some(step * 4 * 16),
            "tokens seen = step * batch * seq_len: {v}"
        );
        assert!(num(v, "lr") > 0.0 && num(v, "lr") <= 1e-2 + 1e-12, "{v}");
        assert!(num(v, "grad_norm") >= 0.0 && num(v, "tokens_per_s") > 0.0, "{v}");
        assert!(num(v, "elapsed_s") >= last_elapsed, "elapsed_s goes backwards: {v}");
        last_elapsed = num(v, "elapsed_s");
    }
    // Warm-up: lr * (step + 1) / W for step 0, counted from 0.
    assert!((num(&lines[0], "lr") - 1e-2 / 5.0).abs() < 1e-12, "first lr {}", lines[0]);

    // Eval lines at eval_every and at the end.
    let evals = eval_lines(&run);
    assert_eq!(
        evals.iter().map(step_of).collect::<Vec<_>>(),
        vec![20, 40, 60],
        "eval lines: {evals:?}"
    );
    for e in &evals {
        assert_eq!(e["split"], "val", "{e}");
        let (loss, ppl) = (num(e, "loss"), num(e, "ppl"));
        assert!(((ppl - loss.exp()) / loss.exp()).abs() < 1e-9, "ppl != exp(loss): {e}");
    }

    // The loss falls on a learnable sequence.
    let first = num(&lines[0], "loss");
    let tail: f64 = lines[55..].iter().map(|v| num(v, "loss")).sum::<f64>() / 5.0;
    assert!(first > 3.0, "initial loss {first} should be near ln(64) = 4.16");
    assert!(
        tail < 0.5 && tail < first / 8.0,
        "the loss did not fall: first {first}, mean of the last 5 {tail}"
    );
    assert!(num(&evals[2], "loss") < 0.5, "final val loss {}", evals[2]);

    // Checkpoints: latest names a complete directory; retention keeps the newest two.
    let (name, dir) = latest(&run).expect("checkpoints/latest");
    assert_eq!(name, "step-000060");
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(dir.join(file).is_file(), "{} missing", dir.join(file).display());
    }
    // The weights are as readable as the rest of the run (safetensors' writer makes them 0600).
    let mode = |file: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode("model.safetensors"), mode("state.json"), "model.safetensors' mode");
    assert_eq!(mode("optimizer.safetensors"), mode("state.json"), "optimizer.safetensors' mode");
    let mut kept: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["step-000040", "step-000060"], "keep_checkpoints = 2");
    let st = state_json(&dir);
    assert_eq!(st["step"].as_u64(), Some(60), "state.json: {st}");
    assert_eq!(st["tokens"].as_u64(), Some(60 * 64), "state.json: {st}");

    // Tensor names and layouts of product.md.
    let h = safetensors_header(&dir.join("model.safetensors"));
    assert_eq!(shape(&h, "model.embed_tokens.weight"), vec![64, 32]);
    assert_eq!(shape(&h, "lm_head.weight"), vec![64, 32]);
    assert_eq!(shape(&h, "model.norm.weight"), vec![32]);
    for i in 0..2 {
        for p in ["q", "k", "v", "o"] {
            assert_eq!(
                shape(&h, &format!("model.layers.{i}.self_attn.{p}_proj.weight")),
                vec![32, 32]
            );
        }
        assert_eq!(shape(&h, &format!("model.layers.{i}.input_layernorm.weight")), vec![32]);
        assert_eq!(
            shape(&h, &format!("model.layers.{i}.post_attention_layernorm.weight")),
            vec![32]
        );
        assert_eq!(shape(&h, &format!("model.layers.{i}.mlp.gate_proj.weight")), vec![64, 32]);
        assert_eq!(shape(&h, &format!("model.layers.{i}.mlp.up_proj.weight")), vec![64, 32]);
        assert_eq!(shape(&h, &format!("model.layers.{i}.mlp.down_proj.weight")), vec![32, 64]);
    }
    assert!(
        !h.keys().any(|k| k.ends_with(".bias")),
        "bias = none: {:?}",
        h.keys().collect::<Vec<_>>()
    );
    assert_eq!(h.len(), 3 + 2 * 9, "unexpected tensors: {:?}", h.keys().collect::<Vec<_>>());
}

#[test]
fn paths_in_the_config_are_relative_to_it_and_on_the_command_line_to_the_cwd() {
    let f = Fixture::new();
    let sub = f.root().join("a").join("b");
    std::fs::create_dir_all(&sub).unwrap();
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("\"shards/", "\"../../shards/")
        .replace(&format!("out_dir = \"{}\"", f.runs().display()), "out_dir = \"rel_runs\"");
    assert!(text.contains("out_dir = \"rel_runs\""));
    let cfg = sub.join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    // cwd is <root>/cwd, so ../shards is the same directory seen from the cwd (but not from a/b).
    f.train(&cfg, "rel", &["train.steps=3", "data.val=../shards/tiny_val_*.bin"]).ok();
    let run = f.cwd().join("rel_runs").join("rel");
    assert!(
        run.join("config.toml").is_file(),
        "run.out_dir is relative to the cwd: no {}",
        run.display()
    );
    let t: toml::Table = std::fs::read_to_string(run.join("config.toml")).unwrap().parse().unwrap();
    for key in ["train", "val"] {
        let p = t["data"][key].as_str().unwrap();
        assert!(Path::new(p).is_absolute(), "data.{key} = {p}");
        let parent = Path::new(p).parent().unwrap();
        assert_eq!(
            std::fs::canonicalize(parent).unwrap(),
            std::fs::canonicalize(f.root().join("shards")).unwrap(),
            "data.{key} = {p}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// resume and determinism

fn assert_same_training_lines(a: &Path, b: &Path, steps: std::ops::RangeInclusive<u64>) {
    let la = train_lines(a);
    let lb = train_lines(b);
    for s in steps {
        let va = la
            .iter()
            .find(|v| step_of(v) == s)
            .unwrap_or_else(|| panic!("{}: no step {s}", a.display()));
        let vb = lb
            .iter()
            .find(|v| step_of(v) == s)
            .unwrap_or_else(|| panic!("{}: no step {s}", b.display()));
        for k in ["loss", "grad_norm", "lr"] {
            assert_eq!(
                num(va, k).to_bits(),
                num(vb, k).to_bits(),
                "step {s}: {k} differs: {} vs {}\n  {va}\n  {vb}",
                num(va, k),
                num(vb, k)
            );
        }
        assert_eq!(va["tokens"], vb["tokens"], "step {s}: tokens");
    }
}

fn assert_same_final_checkpoint(a: &Path, b: &Path) {
    let (na, da) = latest(a).unwrap();
    let (nb, db) = latest(b).unwrap();
    assert_eq!(na, nb);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            read(&da.join(f)) == read(&db.join(f)),
            "{f} of {} and {} differ",
            da.display(),
            db.display()
        );
    }
    let (sa, sb) = (state_json(&da), state_json(&db));
    for k in ["step", "tokens", "data_cursor", "optimizer_t"] {
        assert_eq!(sa.get(k), sb.get(k), "state.json {k}");
    }
}

#[test]
fn resume_gives_the_same_losses_as_an_uninterrupted_run() {
    let f = Fixture::new();
    let cfg = f.config();
    // The schedule does not depend on train.steps (constant after warm-up), so stopping at 10 and
    // extending to 20 is the same run as 20 straight.
    let common = [
        "train.schedule=constant",
        "train.warmup_steps=3",
        "train.ckpt_every=10",
        "train.eval_every=0",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        common.iter().chain(extra).copied().collect()
    };
    f.train(&cfg, "a", &with(&["train.steps=20"])).ok();
    f.train(&cfg, "b", &with(&["train.steps=10"])).ok();
    assert_eq!(latest(&f.run_dir("b")).unwrap().0, "step-000010");
    let out = f.train(&cfg, "b", &with(&["train.steps=20", "--resume"])).ok();
    let (a, b) = (f.run_dir("a"), f.run_dir("b"));
    assert_same_training_lines(&a, &b, 1..=20);
    assert_eq!(
        train_lines(&b).iter().map(step_of).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>(),
        "{}",
        out.describe()
    );
    assert_no_duplicate_steps(&b);
    assert_same_final_checkpoint(&a, &b);
    let elapsed: Vec<f64> = train_lines(&b).iter().map(|v| num(v, "elapsed_s")).collect();
    assert!(
        elapsed.windows(2).all(|w| w[1] >= w[0]),
        "elapsed_s should keep growing across a resume: {elapsed:?}"
    );
}

#[test]
fn resume_after_a_crash_is_exact_with_a_cosine_schedule() {
    let f = Fixture::new();
    let cfg = f.config();
    let extra =
        ["train.steps=20", "train.ckpt_every=10", "train.eval_every=5", "train.keep_checkpoints=5"];
    f.train(&cfg, "straight", &extra).ok();
    f.train(&cfg, "crashed", &extra).ok();
    let run = f.run_dir("crashed");
    // Simulate a crash just after step 10's checkpoint became `latest`, while step 20 was being
    // written: metrics.jsonl already holds lines up to step 20, a half-written temp dir is left.
    let ck = run.join("checkpoints");
    std::fs::remove_dir_all(ck.join("step-000020")).unwrap();
    std::fs::write(ck.join("latest"), "step-000010").unwrap();
    let tmp = ck.join(".tmp-step-000020-999999");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"half a file").unwrap();
    let out = f.train(&cfg, "crashed", &[&extra[..], &["--resume"]].concat()).ok();
    assert!(
        out.stdout.contains("step-000010") || out.stdout.contains("step 10"),
        "should say where it resumed\n{}",
        out.describe()
    );
    let straight = f.run_dir("straight");
    assert_same_training_lines(&straight, &run, 1..=20);
    assert_eq!(
        train_lines(&run).iter().map(step_of).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_no_duplicate_steps(&run);
    let ev = |r: &Path| {
        eval_lines(r).iter().map(|e| (step_of(e), num(e, "loss").to_bits())).collect::<Vec<_>>()
    };
    assert_eq!(ev(&straight), ev(&run), "eval lines after resume");
    assert_same_final_checkpoint(&straight, &run);
}

#[test]
fn resume_logs_the_same_losses_when_log_every_does_not_divide_ckpt_every() {
    // Training lines average the loss over the steps since the previous line. A run resumed from
    // step 10 with log_every = 4 must still log, at step 12, what the uninterrupted run logged.
    let f = Fixture::new();
    let cfg = f.config();
    let extra = [
        "train.steps=20",
        "train.log_every=4",
        "train.ckpt_every=10",
        "train.eval_every=0",
        "train.keep_checkpoints=5",
    ];
    f.train(&cfg, "straight", &extra).ok();
    f.train(&cfg, "crashed", &extra).ok();
    let run = f.run_dir("crashed");
    // A crash at step 13: step 10's checkpoint is latest, step 20's does not exist yet.
    std::fs::remove_dir_all(run.join("checkpoints/step-000020")).unwrap();
    std::fs::write(run.join("checkpoints/latest"), "step-000010").unwrap();
    f.train(&cfg, "crashed", &[&extra[..], &["--resume"]].concat()).ok();
    let steps: Vec<u64> = train_lines(&run).iter().map(step_of).collect();
    assert_eq!(steps, vec![4, 8, 12, 16, 20]);
    assert_same_final_checkpoint(&f.run_dir("straight"), &run);
    for s in [4, 8, 12, 16, 20] {
        assert_same_training_lines(&f.run_dir("straight"), &run, s..=s);
    }
}

#[test]
fn a_crash_before_the_first_latest_does_not_strand_the_run() {
    // A kill between renaming the first checkpoint into place and writing `latest` leaves
    // `checkpoints/step-000002/` (complete) and no `latest`. Then either --resume must continue
    // from it or a fresh `train` must be allowed; refusing both leaves the user stuck.
    let f = Fixture::new();
    let cfg = f.config();
    let extra = ["train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=5"];
    f.train(&cfg, "stranded", &extra).ok();
    let run = f.run_dir("stranded");
    std::fs::remove_dir_all(run.join("checkpoints/step-000004")).unwrap();
    std::fs::remove_file(run.join("checkpoints/latest")).unwrap();
    let resume = f.train(&cfg, "stranded", &[&extra[..], &["--resume"]].concat());
    let fresh = f.train(&cfg, "stranded", &extra);
    assert!(
        resume.code == Some(0) || fresh.code == Some(0),
        "neither --resume nor a fresh train works:
{}
{}",
        resume.describe(),
        fresh.describe()
    );
}

#[test]
fn eval_without_val_data_asks_for_data() {
    let f = Fixture::new();
    let cfg = f.config();
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("val = \"shards/tiny_val_*.bin\"\n", "");
    let p = f.root().join("noval.toml");
    std::fs::write(&p, text).unwrap();
    f.run(&[
        "train",
        "--config",
        p.to_str().unwrap(),
        "--set",
        "run.name=noval",
        "--set",
        "train.steps=2",
    ])
    .ok();
    let run = f.run_dir("noval");
    assert!(eval_lines(&run).is_empty(), "no val data, no eval lines");
    assert_bad_input(&f.run(&["eval", "--checkpoint", run.to_str().unwrap()]), &["--data"]);
    f.run(&["eval", "--checkpoint", run.to_str().unwrap(), "--data", "../shards/tiny_val_*.bin"])
        .ok();
}

#[test]
fn resuming_a_finished_run_changes_nothing() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "done", &["train.steps=10", "train.ckpt_every=5"]).ok();
    let run = f.run_dir("done");
    let before_metrics = read(&run.join("metrics.jsonl"));
    let before_model = read(&run.join("checkpoints/step-000010/model.safetensors"));
    let out = f.train(&cfg, "done", &["train.steps=10", "train.ckpt_every=5", "--resume"]).ok();
    assert_eq!(read(&run.join("metrics.jsonl")), before_metrics, "metrics.jsonl changed");
    assert_eq!(read(&run.join("checkpoints/step-000010/model.safetensors")), before_model);
    assert_eq!(latest(&run).unwrap().0, "step-000010");
    assert!(
        !out.stdout.contains("NaN"),
        "a finished run should not report a NaN loss\n{}",
        out.describe()
    );
}

#[test]
fn same_config_and_seed_give_identical_losses() {
    let f = Fixture::new();
    let cfg = f.config();
    let extra = ["train.steps=15", "train.eval_every=5", "train.ckpt_every=0"];
    f.train(&cfg, "one", &extra).ok();
    f.train(&cfg, "two", &extra).ok();
    f.train(&cfg, "seed1", &[&extra[..], &["run.seed=1"]].concat()).ok();
    let bits = |r: &str| {
        metrics(&f.run_dir(r))
            .iter()
            .map(|v| (step_of(v), num(v, "loss").to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits("one").len(), 15 + 3);
    assert_eq!(bits("one"), bits("two"), "two runs of one config differ");
    assert_ne!(bits("one"), bits("seed1"), "run.seed has no effect");
    assert_eq!(
        read(&latest(&f.run_dir("one")).unwrap().1.join("model.safetensors")),
        read(&latest(&f.run_dir("two")).unwrap().1.join("model.safetensors"))
    );
}

// ---------------------------------------------------------------------------------------------
// --init-from

#[test]
fn init_from_starts_from_the_checkpoint_weights() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "teacher", &[]).ok();
    let teacher = f.run_dir("teacher");
    let teacher_final = num(train_lines(&teacher).last().unwrap(), "loss");
    let model_before = read(&teacher.join("checkpoints/step-000060/model.safetensors"));

    let short = ["train.steps=3", "train.eval_every=0"];
    f.train(&cfg, "fresh", &short).ok();
    f.train(&cfg, "warm", &[&short[..], &["--init-from", teacher.to_str().unwrap()]].concat()).ok();
    let ckpt_dir = teacher.join("checkpoints/step-000040");
    f.train(&cfg, "warm40", &[&short[..], &["--init-from", ckpt_dir.to_str().unwrap()]].concat())
        .ok();

    let fresh = num(&train_lines(&f.run_dir("fresh"))[0], "loss");
    for name in ["warm", "warm40"] {
        let lines = train_lines(&f.run_dir(name));
        assert_eq!(
            lines.iter().map(step_of).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "{name}: a new run counts steps from 0"
        );
        let warm = num(&lines[0], "loss");
        assert!(
            warm < fresh / 4.0,
            "{name}: first loss {warm} vs fresh {fresh}: weights not loaded?"
        );
        assert!(
            warm < teacher_final + 0.3,
            "{name}: first loss {warm}, teacher ended at {teacher_final}"
        );
        assert_eq!(state_json(&latest(&f.run_dir(name)).unwrap().1)["step"].as_u64(), Some(3));
    }
    assert_eq!(
        read(&teacher.join("checkpoints/step-000060/model.safetensors")),
        model_before,
        "--init-from modified its source"
    );
    assert_eq!(latest(&teacher).unwrap().0, "step-000060");
}

// ---------------------------------------------------------------------------------------------
// eval

#[test]
fn eval_prints_loss_and_perplexity_as_json() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "ev", &[]).ok();
    let run = f.run_dir("ev");
    let logged: Vec<(u64, f64)> =
        eval_lines(&run).iter().map(|e| (step_of(e), num(e, "loss"))).collect();

    let check = |v: &Value| {
        let (loss, ppl) = (num(v, "loss"), num(v, "ppl"));
        assert!(loss.is_finite() && loss > 0.0, "{v}");
        assert!(((ppl - loss.exp()) / loss.exp()).abs() < 1e-9, "ppl != exp(loss): {v}");
    };

    let regroup = f.run(&["eval", "--checkpoint", run.to_str().unwrap(), "--group-size", "3"]);
    assert_bad_input(&regroup, &["--group-size", "no MoT layers"]);

    // A run directory: its latest checkpoint, with the run's eval settings (4 batches of 4).
    let out = f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok();
    let v = out.last_json();
    check(&v);
    assert_eq!(v["step"].as_u64(), Some(60), "{v}");
    let (_, at60) = logged.iter().find(|(s, _)| *s == 60).unwrap();
    assert!(
        ((num(&v, "loss") - at60) / at60).abs() < 1e-9,
        "eval {} vs the run's own eval at step 60 {at60}",
        num(&v, "loss")
    );

    // --batches / --batch-size.
    let out = f
        .run(&[
            "eval",
            "--checkpoint",
            run.to_str().unwrap(),
            "--batches",
            "1",
            "--batch-size",
            "2",
        ])
        .ok();
    let small = out.last_json();
    check(&small);
    assert_eq!(small["batches"].as_u64(), Some(1), "{small}");
    assert_eq!(small["batch_size"].as_u64(), Some(2), "{small}");
    if let Some(t) = small.get("tokens") {
        assert_eq!(t.as_u64(), Some(2 * 16), "{small}");
    }
    assert_ne!(
        num(&small, "loss").to_bits(),
        num(&v, "loss").to_bits(),
        "--batches 1 --batch-size 2 had no effect"
    );

    // A checkpoint directory.
    let dir40 = run.join("checkpoints/step-000040");
    let out = f.run(&["eval", "--checkpoint", dir40.to_str().unwrap()]).ok();
    let v40 = out.last_json();
    check(&v40);
    assert_eq!(v40["step"].as_u64(), Some(40), "{v40}");
    let (_, at40) = logged.iter().find(|(s, _)| *s == 40).unwrap();
    assert!(
        ((num(&v40, "loss") - at40) / at40).abs() < 1e-9,
        "eval {} vs the run's eval at step 40 {at40}",
        num(&v40, "loss")
    );

    // --data, relative to the cwd.
    let out = f
        .run(&[
            "eval",
            "--checkpoint",
            run.to_str().unwrap(),
            "--data",
            "../shards/tiny_train_*.bin",
            "--batches",
            "2",
        ])
        .ok();
    check(&out.last_json());
}

// ---------------------------------------------------------------------------------------------
// bench

#[test]
fn bench_prints_speed_as_json() {
    let f = Fixture::new();
    let cfg = f.config();
    let out = f.run(&["bench", "--config", cfg.to_str().unwrap(), "--steps", "2"]).ok();
    let v = out.last_json();
    assert!(num(&v, "tokens_per_s") > 0.0, "{v}");
    assert!(num(&v, "step_time_s") > 0.0, "{v}");
    assert!(num(&v, "flops_per_token") > 0.0, "{v}");
    assert!(num(&v, "gflops_per_s") > 0.0, "{v}");
    assert!(v["peak_rss_bytes"].as_u64().is_some_and(|b| b > 1 << 20), "{v}");
    // Consistency: GFLOP/s = flops per token * tokens per s / 1e9.
    let g = num(&v, "flops_per_token") * num(&v, "tokens_per_s") / 1e9;
    assert!(((num(&v, "gflops_per_s") - g) / g).abs() < 1e-6, "{v}");
    // The phases of a step add up to the step: forward and backward take most of it, nothing
    // is negative beyond timer rounding, and the rest ("other") is what the phases do not
    // cover.
    let phase =
        |k: &str| v["phases_ms"][k].as_f64().unwrap_or_else(|| panic!("phases_ms.{k}: {v}"));
    let names = ["forward", "backward", "comm", "norm", "update", "other"];
    let sum: f64 = names.iter().map(|k| phase(k)).sum();
    assert!((sum - 1e3 * num(&v, "step_time_s")).abs() < 1e-6, "{v}");
    assert!(names.iter().all(|k| phase(k) >= -1e-3), "{v}");
    assert!(phase("forward") > 0.0 && phase("backward") > 0.0 && phase("update") > 0.0, "{v}");
    // bench must not create a run directory.
    assert!(!f.run_dir("base").exists(), "bench wrote a run directory");
}

/// `--vs` times a second model step by step in turn with the first: one JSON line each, then
/// their comparison; a --vs config that does not load is a clear error.
#[test]
fn bench_vs_compares_two_models_in_one_run() {
    let f = Fixture::new();
    let cfg = f.config();
    let cfg = cfg.to_str().unwrap();
    let args =
        ["bench", "--config", cfg, "--vs-set", "model.ffn=moe", "--steps", "2", "--warmup", "0"];
    let out = f.run(&args).ok();
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", out.describe());
    assert_eq!(lines[0]["ffn"], "dense", "{}", lines[0]);
    assert_eq!(lines[1]["ffn"], "moe", "{}", lines[1]);
    let ratio = num(&lines[2], "ratio");
    let expected = num(&lines[1], "tokens_per_s") / num(&lines[0], "tokens_per_s");
    assert!(ratio > 0.0 && (ratio - expected).abs() < 1e-9 * expected, "{}", lines[2]);
    assert!(out.stderr.contains("alternated step by step"), "{}", out.describe());

    let out = f.run(&["bench", "--config", cfg, "--vs", "/nonexistent/b.toml", "--steps", "1"]);
    assert_bad_input(&out, &["/nonexistent/b.toml"]);
    let out = f.run(&["bench", "--config", cfg, "--vs-set", "model.nope=1", "--steps", "1"]);
    assert_bad_input(&out, &["model.nope"]);
    assert!(!f.run_dir("base").exists(), "bench wrote a run directory");
}

// ---------------------------------------------------------------------------------------------
// tokenizer + prepare

const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "runs", "into",
    "forest", "where", "a", "small", "bird", "sings", "softly", "under", "green", "trees", "while",
    "river", "flows", "past", "old", "stone", "bridge",
];

fn corpus(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Lcg(42);
    let mut docs = Vec::new();
    for i in 0..3 {
        let mut s = String::new();
        for j in 0..300 {
            s.push_str(WORDS[r.below(WORDS.len() as u64) as usize]);
            s.push(if j % 12 == 11 { '\n' } else { ' ' });
        }
        s.push_str("Ünïcödé ✓ and digits 12345.\n");
        std::fs::write(dir.join(format!("doc{i}.txt")), &s).unwrap();
        docs.push(s);
    }
    docs
}

/// A `--seed` that puts exactly one of `n` documents in val at `--val-fraction 0.2`.
fn seed_with_one_val_doc(n: usize) -> u64 {
    (0..)
        .find(|&s| {
            (0..n as u64).filter(|&i| motrain::data::prepare::is_val(i, s, 0.2)).count() == 1
        })
        .unwrap()
}

#[test]
fn tokenizer_train_and_prepare_write_valid_shards() {
    let f = Fixture::empty();
    let input = f.root().join("text");
    let docs = corpus(&input);
    let tok = f.root().join("tok.json");
    let tok_args = |input: &std::path::Path, vocab: &str, out: &str| -> Out {
        let out = f.root().join(out);
        f.run(&[
            "tokenizer",
            "train",
            "--input",
            input.to_str().unwrap(),
            "--vocab-size",
            vocab,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    tok_args(&input, "300", "tok.json").ok();
    let hf =
        tokenizers::Tokenizer::from_file(&tok).expect("tok.json loads with the tokenizers crate");
    let vocab = hf.get_vocab_size(true);
    assert!(vocab <= 300 && vocab > 257, "vocab size {vocab}");
    let eot = hf.token_to_id("<|endoftext|>").expect("tokenizer has <|endoftext|>");

    let out_dir = f.root().join("prepared");
    let seed = seed_with_one_val_doc(docs.len());
    let prepare = |out: &std::path::Path, extra: &[&str]| -> Out {
        let (tok, input, out) = (tok.to_str().unwrap(), input.to_str().unwrap(), out.to_str());
        let args = ["prepare", "--tokenizer", tok, "--input", input, "--out", out.unwrap()];
        f.run(&[&args[..], &["--name", "x"], extra].concat())
    };
    prepare(&out_dir, &["--val-fraction", "0.2", "--seed", &seed.to_string()]).ok();
    let train = read_shard(&out_dir.join("x_train_000000.bin"));
    let val = read_shard(&out_dir.join("x_val_000000.bin"));
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["prepare.json", "x_train_000000.bin", "x_val_000000.bin"],
        "files in --out"
    );

    assert_eq!(train[0] as u32, eot, "the first train token is end-of-text");
    assert_eq!(val[0] as u32, eot, "val holds whole documents");
    let ids = |s: &[u16]| s.iter().map(|&t| t as u32).collect::<Vec<u32>>();
    let all: Vec<u32> = ids(&train).into_iter().chain(ids(&val)).collect();
    assert!(all.iter().all(|&t| (t as usize) < vocab), "ids below the vocab size");
    // Exactly one end-of-text before each document, and the documents decode back to the files,
    // each in the split its index and the seed choose.
    assert_eq!(
        all.iter().filter(|&&t| t == eot).count(),
        docs.len(),
        "one end-of-text per document"
    );
    let decode = |s: &[u32]| -> Vec<String> {
        s.split(|&t| t == eot).skip(1).map(|d| hf.decode(d, false).unwrap()).collect()
    };
    let (mut train_docs, mut val_docs) =
        (decode(&ids(&train)).into_iter(), decode(&ids(&val)).into_iter());
    let mut direct = 0;
    for (i, doc) in docs.iter().enumerate() {
        let split = if motrain::data::prepare::is_val(i as u64, seed, 0.2) {
            &mut val_docs
        } else {
            &mut train_docs
        };
        assert_eq!(split.next().as_ref(), Some(doc), "document {i} does not round-trip");
        direct += hf.encode(doc.as_str(), false).unwrap().get_ids().len() + 1;
    }
    assert_eq!(
        direct,
        all.len(),
        "token count: train + val = sum of encoded documents + one end-of-text each"
    );

    // Shards of that name which no prepare.json lists may be anyone's: kept unless --overwrite.
    let foreign = f.root().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(out_dir.join("x_train_000000.bin"), foreign.join("x_train_000000.bin")).unwrap();
    std::fs::copy(out_dir.join("x_val_000000.bin"), foreign.join("x_val_000000.bin")).unwrap();
    let before = read(&foreign.join("x_val_000000.bin"));
    let again = prepare(&foreign, &["--val-fraction", "0"]);
    assert_bad_input(&again, &["x_train_000000.bin", "--overwrite"]);
    let kept = read(&foreign.join("x_val_000000.bin"));
    assert_eq!(kept, before, "a refused prepare deleted a shard");
    prepare(&foreign, &["--val-fraction", "0", "--overwrite"]).ok();
    assert!(!foreign.join("x_val_000000.bin").exists(), "--overwrite replaced the old shards");

    // Tokenizer vocabularies beyond any in use, and inputs without text, are refused.
    assert_bad_input(&tok_args(&input, "4294967296", "big.json"), &["--vocab-size", "too large"]);
    let before = read(&tok);
    assert_bad_input(&tok_args(&input, "280", "tok.json"), &["tok.json", "--overwrite"]);
    assert_eq!(read(&tok), before, "a refused tokenizer train replaced its --out");
    let empty = f.root().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    assert_bad_input(&tok_args(&empty, "300", "empty.json"), &["no text"]);
    assert!(!f.root().join("empty.json").exists(), "a refused tokenizer was written");

    // The prepared shards train.
    let cfg = f.root().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"p\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n[data]\ntrain = \"prepared/x_train_*.bin\"\nval = \"prepared/x_val_*.bin\"\nseq_len = 16\n\
             [model]\nvocab_size = {vocab}\nd_model = 16\nn_layers = 2\nn_heads = 2\nd_ff = 32\n[train]\nbatch_size = 4\nsteps = 2\neval_batches = 2\n",
            f.runs().display()
        ),
    )
    .unwrap();
    f.run(&["train", "--config", cfg.to_str().unwrap()]).ok();
}

#[test]
fn prepare_with_the_builtin_gpt2_tokenizer() {
    let f = Fixture::empty();
    let input = f.root().join("text");
    let docs = corpus(&input);
    let out_dir = f.root().join("g");
    let seed = seed_with_one_val_doc(docs.len()).to_string();
    f.run(&[
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--name",
        "g",
        "--val-fraction",
        "0.2",
        "--seed",
        &seed,
    ])
    .ok();
    let train = read_shard(&out_dir.join("g_train_000000.bin"));
    let val = read_shard(&out_dir.join("g_val_000000.bin"));
    assert_eq!(train[0], 50256, "GPT-2 end-of-text first");
    let eots = train.iter().chain(&val).filter(|&&t| t == 50256).count();
    assert_eq!(eots, docs.len());

    // Known GPT-2 ids: "Hello world" = [15496, 995].
    let one = f.root().join("hello.txt");
    std::fs::write(&one, "Hello world").unwrap();
    let out2 = f.root().join("h");
    f.run(&[
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        one.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--name",
        "h",
        "--val-fraction",
        "0",
    ])
    .ok();
    assert_eq!(read_shard(&out2.join("h_train_000000.bin")), vec![50256, 15496, 995]);
}

// ---------------------------------------------------------------------------------------------
// bad input: exit 2, one `error:` naming the culprit, no panic

#[test]
fn malformed_toml_is_a_config_error() {
    let f = Fixture::new();
    let p = f.root().join("broken.toml");
    std::fs::write(&p, "[run\nname = \"x\"\n").unwrap();
    let out = f.run(&["train", "--config", p.to_str().unwrap()]);
    assert_bad_input(&out, &["broken.toml"]);
}

#[test]
fn missing_config_file_is_named() {
    let f = Fixture::new();
    let p = f.root().join("nope.toml");
    assert_bad_input(&f.run(&["train", "--config", p.to_str().unwrap()]), &["nope.toml"]);
}

#[test]
fn unknown_keys_are_named_with_their_table() {
    let f = Fixture::new();
    let cfg = f.config();
    assert_bad_input(&f.train(&cfg, "x", &["model.bogus=1"]), &["model", "bogus"]);
    // In the file too, and an unknown table.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let p = f.root().join("unknown.toml");
    std::fs::write(&p, text.replace("[train]\n", "[train]\nwibble = 3\n")).unwrap();
    assert_bad_input(&f.run(&["train", "--config", p.to_str().unwrap()]), &["train", "wibble"]);
    std::fs::write(&p, format!("{text}\n[trainer]\nsteps = 3\n")).unwrap();
    assert_bad_input(&f.run(&["train", "--config", p.to_str().unwrap()]), &["trainer"]);
    assert!(
        !f.run_dir("x").exists() && !f.run_dir("base").exists(),
        "a bad config created a run directory"
    );
}

#[test]
fn wrong_type_is_named() {
    let f = Fixture::new();
    let out = f.train(&f.config(), "x", &["model.d_model=\"big\""]);
    assert_bad_input(&out, &["d_model", "big"]);
}

#[test]
fn out_of_range_values_are_named() {
    let f = Fixture::new();
    let cfg = f.config();
    assert_bad_input(&f.train(&cfg, "x", &["model.n_heads=3"]), &["n_heads", "3"]);
    assert_bad_input(&f.train(&cfg, "x", &["train.micro_batch_size=3"]), &["micro_batch_size"]);
    assert_bad_input(&f.train(&cfg, "x", &["model.norm=batchnorm"]), &["norm", "batchnorm"]);
    assert_bad_input(&f.train(&cfg, "x", &["train.eval_batches=0"]), &["eval_batches"]);
    // A section this model does not use still goes into every checkpoint's state.json.
    let unused = f.train(&cfg, "x", &["model.moe.capacity_factor=nan"]);
    assert_bad_input(&unused, &["model.moe.capacity_factor", "finite"]);
    assert!(!f.run_dir("x").exists(), "a refused config wrote its run");
}

#[test]
fn glob_matching_nothing_is_named() {
    let f = Fixture::new();
    let out = f.train(&f.config(), "x", &["data.train=nowhere/none_*.bin"]);
    assert_bad_input(&out, &["none_*.bin"]);
}

#[test]
fn shard_with_wrong_magic_is_named() {
    let f = Fixture::new();
    let p = f.root().join("shards/badmagic_train_000000.bin");
    std::fs::write(&p, shard_bytes(12345, 1, 100, &pattern_tokens(100, 64))).unwrap();
    let out = f.train(&f.config(), "x", &[&format!("data.train={}", p.display())]);
    assert_bad_input(&out, &["badmagic_train_000000.bin", "magic"]);
}

#[test]
fn truncated_shard_is_named() {
    let f = Fixture::new();
    let p = f.root().join("shards/short_train_000000.bin");
    let mut bytes = shard_bytes(MAGIC_U16, 1, 1000, &pattern_tokens(1000, 64));
    bytes.truncate(1024 + 2 * 700 + 1);
    std::fs::write(&p, bytes).unwrap();
    let out = f.train(&f.config(), "x", &[&format!("data.train={}", p.display())]);
    assert_bad_input(&out, &["short_train_000000.bin"]);
    // Shorter than the header.
    std::fs::write(&p, [0u8; 100]).unwrap();
    let out = f.train(&f.config(), "x", &[&format!("data.train={}", p.display())]);
    assert_bad_input(&out, &["short_train_000000.bin"]);
}

#[test]
fn token_id_beyond_the_vocab_is_named() {
    let f = Fixture::new();
    let mut toks = pattern_tokens(1000, 64);
    toks[777] = 200;
    write_shard(&f.root().join("shards/big_val_000000.bin"), &toks);
    let out = f.train(
        &f.config(),
        "x",
        &[&format!("data.val={}/shards/big_val_*.bin", f.root().display())],
    );
    assert_bad_input(&out, &["big_val_000000.bin", "200", "vocab_size"]);
}

#[test]
fn eval_of_a_missing_checkpoint_is_named() {
    let f = Fixture::new();
    let p = f.root().join("no_such_run");
    assert_bad_input(&f.run(&["eval", "--checkpoint", p.to_str().unwrap()]), &["no_such_run"]);
}

#[test]
fn eval_of_a_corrupt_checkpoint_is_named() {
    let f = Fixture::new();
    f.train(&f.config(), "c", &["train.steps=4", "train.ckpt_every=2"]).ok();
    let run = f.run_dir("c");
    let model = run.join("checkpoints/step-000004/model.safetensors");
    std::fs::write(
        &model,
        random_tokens(3000, 65535, 9).iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    assert_bad_input(
        &f.run(&["eval", "--checkpoint", run.to_str().unwrap()]),
        &["model.safetensors"],
    );
    // A valid header whose data is cut short (a half-written file).
    let good = read(&run.join("checkpoints/step-000002/model.safetensors"));
    std::fs::write(&model, &good[..good.len() / 2]).unwrap();
    assert_bad_input(
        &f.run(&["eval", "--checkpoint", run.to_str().unwrap()]),
        &["model.safetensors"],
    );
    // A corrupt state.json.
    let dir2 = run.join("checkpoints/step-000002");
    std::fs::write(dir2.join("state.json"), "{\"step\": ").unwrap();
    assert_bad_input(&f.run(&["eval", "--checkpoint", dir2.to_str().unwrap()]), &["state.json"]);
}

#[test]
fn eval_batch_larger_than_the_val_data_is_a_usage_error() {
    let f = Fixture::new();
    f.train(&f.config(), "c", &["train.steps=2"]).ok();
    let run = f.run_dir("c");
    assert_bad_input(
        &f.run(&["eval", "--checkpoint", run.to_str().unwrap(), "--batch-size", "1000"]),
        &["batch"],
    );
    assert_bad_input(
        &f.run(&["eval", "--checkpoint", run.to_str().unwrap(), "--batches", "0"]),
        &["batches"],
    );
}

#[test]
fn init_from_with_mismatched_shapes_names_the_tensor() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "src", &["train.steps=2"]).ok();
    let src = f.run_dir("src");
    let out = f.train(&cfg, "dst", &["model.d_model=16", "--init-from", src.to_str().unwrap()]);
    assert_bad_input(&out, &["model.safetensors"]);
    let msg = out.error_lines().join("\n");
    let names = safetensors_header(&latest(&src).unwrap().1.join("model.safetensors"));
    assert!(
        names.keys().any(|n| msg.contains(n.as_str())),
        "the error should name the tensor\n{}",
        out.describe()
    );
    assert!(
        msg.contains("32") && msg.contains("16"),
        "the error should give both shapes\n{}",
        out.describe()
    );
    assert!(latest(&f.run_dir("dst")).is_none(), "a failed --init-from wrote a checkpoint");
}

#[test]
fn resume_without_a_checkpoint_is_named() {
    let f = Fixture::new();
    let out = f.train(&f.config(), "never", &["--resume"]);
    assert_bad_input(&out, &["never"]);
    assert!(!f.run_dir("never").exists(), "a refused --resume left a run directory");
    let out = f.train(&f.config(), "warm", &["--init-from", "nowhere"]);
    assert_bad_input(&out, &["nowhere"]);
    assert!(!f.run_dir("warm").exists(), "a refused --init-from left a run directory");
}

#[test]
fn a_micro_batch_beyond_the_machines_memory_is_refused() {
    let f = Fixture::new();
    let huge = ["train.batch_size=4294967296", "train.micro_batch_size=4294967296"];
    let out = f.train(&f.config(), "huge", &huge);
    assert_bad_input(&out, &["train.micro_batch_size", "data.seq_len", "GiB"]);
    assert!(!f.run_dir("huge").exists(), "a refused config wrote its run");
}

#[test]
fn a_bad_override_is_blamed_on_its_set() {
    let f = Fixture::new();
    let cfg = f.config();
    for (arg, key) in [
        ("train.stepz=5", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("model.n_heads=3", "model.n_heads"),
    ] {
        let out = f.train(&cfg, "x", &[arg]);
        assert_bad_input(&out, &[&format!("--set {arg}"), key]);
    }
}

#[test]
fn an_unreadable_log_on_resume_is_named() {
    let f = Fixture::new();
    f.train(&f.config(), "log", &["train.steps=2", "train.ckpt_every=2"]).ok();
    let log = f.run_dir("log").join("metrics.jsonl");
    std::fs::write(&log, b"\xff\xfe not text").unwrap();
    let out = f.train(&f.config(), "log", &["train.steps=4", "--resume"]);
    assert_bad_input(&out, &["metrics.jsonl"]);
    assert_eq!(read(&log), b"\xff\xfe not text", "the refused resume rewrote the log");
}

#[test]
fn set_without_equals_is_a_usage_error() {
    let f = Fixture::new();
    let out = f.run(&["train", "--config", f.config().to_str().unwrap(), "--set", "model.d_model"]);
    assert_bad_input(&out, &["model.d_model"]);
}

#[test]
fn conflicting_and_bad_flags_are_usage_errors() {
    let f = Fixture::new();
    let cfg = f.config();
    let out = f.train(&cfg, "x", &["--resume", "--init-from", "somewhere"]);
    assert_bad_input(&out, &["--resume", "--init-from"]);
    let out = f.run(&["bench", "--config", cfg.to_str().unwrap(), "--steps", "0"]);
    assert_bad_input(&out, &["steps"]);
    let out = f.run(&["bench", "--config", cfg.to_str().unwrap(), "--vs-set", "model.ffn"]);
    assert_bad_input(&out, &["--vs-set model.ffn", "KEY=VALUE"]);
}

#[test]
fn fresh_train_refuses_a_run_dir_with_checkpoints() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "taken", &["train.steps=4", "train.ckpt_every=2"]).ok();
    let run = f.run_dir("taken");
    let snapshot = |run: &Path| {
        [
            "metrics.jsonl",
            "config.toml",
            "checkpoints/latest",
            "checkpoints/step-000004/model.safetensors",
            "checkpoints/step-000004/optimizer.safetensors",
            "checkpoints/step-000004/state.json",
        ]
        .map(|p| read(&run.join(p)))
    };
    let before = snapshot(&run);
    for extra in [
        vec!["train.steps=4"],
        vec!["train.steps=6", "model.d_model=16"],
        vec!["--init-from", run.to_str().unwrap()],
    ] {
        let out = f.train(&cfg, "taken", &extra);
        // Exit 1 or 2 (a user mistake, so 2 is the better code), an `error:` line naming the run.
        assert_bad_input_code(&out, None, &["taken", "--resume"]);
        assert!(snapshot(&run) == before, "a refused `train {extra:?}` modified the existing run");
    }
}

#[test]
fn fresh_train_refuses_a_run_dir_holding_an_earlier_runs_files() {
    let f = Fixture::new();
    let run = f.run_dir("earlier");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("config.toml"), b"# an earlier run's config\n").unwrap();
    std::fs::write(run.join("metrics.jsonl"), b"{\"step\":1,\"loss\":9.0}\n").unwrap();
    let out = f.train(&f.config(), "earlier", &["train.steps=2"]);
    assert_bad_input(&out, &["earlier", "no checkpoint to resume", "metrics.jsonl"]);
    assert_eq!(read(&run.join("config.toml")), b"# an earlier run's config\n");
    assert_eq!(read(&run.join("metrics.jsonl")), b"{\"step\":1,\"loss\":9.0}\n");
}

// ---------------------------------------------------------------------------------------------
// kill -9 during checkpoint writes

fn check_after_kill(f: &Fixture, run: &Path, what: &str) -> u64 {
    let ck = run.join("checkpoints");
    let (name, dir) = latest(run).unwrap_or_else(|| panic!("{what}: no checkpoints/latest"));
    assert!(!name.starts_with(".tmp-"), "{what}: latest names a temporary directory {name:?}");
    let step: u64 = name
        .strip_prefix("step-")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: latest holds {name:?}"));
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(dir.join(file).is_file(), "{what}: latest = {name} but {file} is missing");
    }
    assert_eq!(state_json(&dir)["step"].as_u64(), Some(step), "{what}: state.json of {name}");
    let out = f.run(&["eval", "--checkpoint", run.to_str().unwrap(), "--batches", "1"]);
    assert_eq!(
        out.code,
        Some(0),
        "{what}: eval of the run after a kill failed (latest = {name})\n{}",
        out.describe()
    );
    assert_eq!(out.last_json()["step"].as_u64(), Some(step), "{what}");
    let tmps: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    eprintln!("{what}: latest = {name}; temp dirs left: {tmps:?}");
    step
}

#[test]
fn a_kill_during_checkpoint_writes_leaves_the_last_checkpoint_usable() {
    let f = Fixture::empty();
    f.shards("big", &random_tokens(20_000, 256, 7), &random_tokens(2_000, 256, 8));
    let cfg = f.config_for("big.toml", "big", 256);
    let name = "killed";
    let run = f.run_dir(name);
    // Far more steps than the kills leave time for; the last resume then stops 10 steps later.
    let sets = [
        "model.d_model=64",
        "model.d_ff=256",
        "train.ckpt_every=1",
        "train.eval_every=0",
        "train.keep_checkpoints=2",
    ];
    let spawn = |resume: bool| -> Child {
        let mut c = Command::new(bin());
        c.current_dir(f.cwd()).args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &format!("run.name={name}"),
        ]);
        for s in sets {
            c.args(["--set", s]);
        }
        c.args(["--set", "train.steps=100000"]);
        if resume {
            c.arg("--resume");
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn motrain")
    };
    let jitter =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
            as u64
            % 97;
    let mut last_step = 0;
    for (i, base) in [250u64, 430, 610, 790, 1010].into_iter().enumerate() {
        let delay = Duration::from_millis(base + jitter * (i as u64 + 1) % 97);
        let mut child = spawn(i > 0);
        if i == 0 {
            // Kill only once there is a first checkpoint: before it there is nothing to keep.
            let t0 = Instant::now();
            while latest(&run).is_none() {
                assert!(t0.elapsed() < Duration::from_secs(60), "no first checkpoint after 60 s");
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("training exited early with {st}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap();
        if finished.is_none() {
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        let what = format!("kill {} after {delay:?} ({status})", i + 1);
        let step = check_after_kill(&f, &run, &what);
        assert!(step >= last_step, "{what}: latest went back from step {last_step} to {step}");
        last_step = step;
        assert!(finished.is_none(), "{what}: training exited on its own");
    }

    // Resume to the end (10 more steps).
    let steps = last_step + 10;
    let steps_set = format!("train.steps={steps}");
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    let name_set = format!("run.name={name}");
    args.extend(["--set", &name_set]);
    for s in &sets {
        args.extend(["--set", s]);
    }
    args.extend(["--set", &steps_set]);
    args.push("--resume");
    f.run(&args).ok();
    assert_eq!(latest(&run).unwrap().0, format!("step-{steps:06}"));
    assert_eq!(
        train_lines(&run).iter().map(step_of).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "metrics.jsonl after kills and a resume should hold every step once"
    );
    assert_no_duplicate_steps(&run);
    check_after_kill(&f, &run, "after the final resume");
}

#[test]
fn gradient_accumulation_matches_one_big_batch() {
    let f = Fixture::new();
    let cfg = f.config();
    let sets = ["train.steps=6", "train.eval_every=0", "train.grad_clip=0"];
    f.train(&cfg, "whole", &sets).ok();
    f.train(&cfg, "accum", &[&sets[..], &["train.micro_batch_size=2"]].concat()).ok();
    let (a, b) = (losses(&f.run_dir("whole")), losses(&f.run_dir("accum")));
    assert_eq!(a.len(), 6);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 1e-4,
            "step {s}: batch 4 gives loss {x}, 2 × 2 accumulated gives {y}"
        );
    }
}

/// Grouped-query attention from the config: k and v project to fewer heads (the parameter
/// count says by how much), the resolved config keeps the setting, the checkpoint evaluates,
/// and a head count that does not divide is refused.
#[test]
fn grouped_query_attention_trains_evaluates_and_refuses_bad_head_counts() {
    let f = Fixture::new();
    let config = f.config();
    let parameters = |name: &str, extra: &[&str]| -> usize {
        let out = f.train(&config, name, &[&["model.n_heads=4", "train.steps=4"], extra].concat());
        let first = out.ok().stdout.lines().next().unwrap().to_string();
        first.split(" parameters").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (mha, gqa) = (parameters("mha", &[]), parameters("gqa", &["model.n_kv_heads=2"]));
    // d_model 32, 2 blocks: k and v go from 32×32 to 16×32 each.
    assert_eq!(mha - gqa, 2 * 2 * 16 * 32);
    let resolved = std::fs::read_to_string(f.run_dir("gqa").join("config.toml")).unwrap();
    assert!(resolved.contains("n_kv_heads = 2"), "{resolved}");
    // The checkpoint loads back into a model of the same shape (generate's KV cache with
    // grouped heads is held to uncached decoding in src/generate.rs).
    f.run(&["eval", "--checkpoint", f.run_dir("gqa").to_str().unwrap()]).ok();
    let bad = f.train(&config, "bad", &["model.n_heads=4", "model.n_kv_heads=3"]);
    assert_bad_input(&bad, &["model.n_kv_heads", "divide"]);
}
