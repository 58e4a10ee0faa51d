//! Mixture of Tokens end to end: training logs and eval report mixing statistics, the
//! checkpoint holds the spec's tensor names, batches must be multiples of the group, eval can
//! regroup, resume is exact, and transition tuning turns the model into a MoE that runs one
//! sequence at a time.

mod common;

use common::*;

const MOT: [&str; 6] = [
    "model.ffn=mot",
    "model.mot.n_experts=4",
    "model.mot.group_size=2",
    "train.steps=12",
    "train.eval_every=12",
    "train.ckpt_every=6",
];

fn safetensors(
    path: &std::path::Path,
) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = read(path);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

#[test]
fn mot_trains_and_reports_mixing_statistics() {
    let f = Fixture::new();
    let cfg = f.config();
    // Logged at steps 5, 10 and 12: the statistics, computed only on the steps that are logged,
    // are on every line that is.
    let sets = ["model.mot.learn_temperature=true", "train.log_every=5"];
    f.train(&cfg, "mot", &[&MOT[..], &sets].concat()).ok();
    let run = f.run_dir("mot");
    let lines = train_lines(&run);
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [5, 10, 12]);
    for l in lines {
        let layers =
            l["routing"].as_array().unwrap_or_else(|| panic!("no mixing statistics in {l}"));
        assert_eq!(layers.len(), 2, "one entry per MoT layer");
        for s in layers {
            assert_eq!(s["kind"], "mot");
            let peak: Vec<f64> =
                s["max_weight"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let entropy: Vec<f64> =
                s["entropy"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!((peak.len(), entropy.len()), (4, 4));
            assert!(
                peak.iter().all(|&p| (0.5..=1.0).contains(&p)),
                "the top weight of a group of 2 is in [1/2, 1]: {s}"
            );
            assert!(
                entropy.iter().all(|&h| (0.0..=2f64.ln() + 1e-9).contains(&h)),
                "entropy within [0, ln 2]: {s}"
            );
            assert!(s["temperature"].as_f64().unwrap() > 0.0);
        }
    }
    let tensors = safetensors(&latest(&run).unwrap().1.join("model.safetensors"));
    assert_eq!(tensors["model.layers.1.mlp.controller.weight"].0, vec![4, 32]);
    // FLOP-matched: d_ff · G / E = 64 · 2 / 4.
    assert_eq!(tensors["model.layers.1.mlp.experts.gate"].0, vec![4, 32, 32]);
    assert_eq!(tensors["model.layers.1.mlp.experts.up"].0, vec![4, 32, 32]);
    assert_eq!(tensors["model.layers.1.mlp.experts.down"].0, vec![4, 32, 32]);
    assert_eq!(tensors["model.layers.1.mlp.log_temperature"].0, Vec::<usize>::new());
    assert!(
        tensors["model.layers.1.mlp.log_temperature"].1[0] != 0.0,
        "the learned temperature trained"
    );

    let ckpt = run.to_str().unwrap();
    let out = f.run(&["eval", "--checkpoint", ckpt]).ok();
    let j = out.last_json();
    assert_eq!(j["group_size"], 2);
    assert_eq!(j["routing"][0]["kind"], "mot");
    assert!(
        out.stderr.contains("top mixing weight per expert"),
        "eval prints the mixing table:\n{}",
        out.stderr
    );

    let regrouped = f.run(&["eval", "--checkpoint", ckpt, "--group-size", "4"]).ok().last_json();
    assert_eq!(regrouped["group_size"], 4);
    assert_ne!(regrouped["loss"], j["loss"], "a different group size mixes different tokens");
    let single = f
        .run(&["eval", "--checkpoint", ckpt, "--group-size", "1", "--batch-size", "1"])
        .ok()
        .last_json();
    assert_eq!((single["group_size"].as_u64(), single["batch_size"].as_u64()), (Some(1), Some(1)));

    let bad = f.run(&["eval", "--checkpoint", ckpt, "--batch-size", "3"]);
    assert_bad_input(&bad, &["groups of 2", "multiple of 2", "--group-size"]);
}

#[test]
fn batches_that_are_not_multiples_of_the_group_are_refused() {
    let f = Fixture::new();
    let cfg = f.config();
    let out = f.train(&cfg, "bad", &[&MOT[..], &["model.mot.group_size=3"]].concat());
    assert_bad_input(&out, &["model.mot.group_size", "train.micro_batch_size", "multiple"]);
    let out = f.train(&cfg, "bad", &[&MOT[..], &["train.eval_batch_size=3"]].concat());
    assert_bad_input(&out, &["train.eval_batch_size", "multiple"]);
    let out = f.train(&cfg, "bad", &[&MOT[..], &["model.mot.temperature=0"]].concat());
    assert_bad_input(&out, &["model.mot.temperature"]);
    assert!(!f.run_dir("bad").join("checkpoints").exists());
}

#[test]
fn mot_resume_is_exact() {
    let f = Fixture::new();
    let cfg = f.config();
    let sets = [
        &MOT[..],
        &[
            "model.mot.learn_temperature=true",
            "model.ffn_layers=second_half",
            "train.schedule=constant",
        ],
    ]
    .concat();
    f.train(&cfg, "a", &sets).ok();
    f.train(&cfg, "b", &[&sets[..], &["train.steps=6"]].concat()).ok();
    f.train(&cfg, "b", &[&sets[..], &["--resume"]].concat()).ok();
    assert_eq!(losses(&f.run_dir("a")), losses(&f.run_dir("b")));
}

#[test]
fn transition_tuning_converts_evaluates_and_tunes() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "mot", &MOT).ok();
    let mot = f.run_dir("mot");
    let out_dir = f.runs().join("switch");
    let out = f
        .run(&[
            "transition-tune",
            "--checkpoint",
            mot.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--steps",
            "4",
        ])
        .ok();
    for needle in
        ["before conversion (MoT, step 12)", "after conversion (top-1 MoE)", "after 4 tuning steps"]
    {
        assert!(out.stderr.contains(needle), "missing {needle:?} in:\n{}", out.stderr);
    }
    let j = out.last_json();
    let (before, converted, tuned) =
        (num(&j, "loss_before"), num(&j, "loss_converted"), num(&j, "loss_tuned"));
    assert!(before.is_finite() && converted.is_finite() && tuned.is_finite(), "{j}");
    assert!(tuned < converted, "tuning recovers from the conversion: {j}");

    // The converted checkpoint keeps every tensor: the controller is now the router.
    let mot_w = safetensors(&latest(&mot).unwrap().1.join("model.safetensors"));
    let conv = safetensors(&out_dir.join("checkpoints/step-000012/model.safetensors"));
    assert_eq!(
        conv["model.layers.0.mlp.router.weight"],
        mot_w["model.layers.0.mlp.controller.weight"]
    );
    assert_eq!(conv["model.layers.1.mlp.experts.down"], mot_w["model.layers.1.mlp.experts.down"]);
    assert!(!conv.keys().any(|k| k.contains("controller")));
    assert_eq!(conv.len(), mot_w.len());

    // Tuning continued the run: its steps, its tokens, its learning-rate schedule (the MoT run
    // ended its cosine at min_lr_ratio · lr, and the schedule stays there).
    let lines = train_lines(&out_dir);
    assert_eq!(lines.iter().map(step_of).collect::<Vec<_>>(), vec![13, 14, 15, 16]);
    let mot_last = train_lines(&mot).last().cloned().unwrap();
    assert_eq!(num(&lines[0], "tokens"), num(&mot_last, "tokens") + 64.0);
    for l in &lines {
        assert!((num(l, "lr") - 1e-3).abs() < 1e-12, "lr {}", num(l, "lr"));
        assert_eq!(l["routing"][0]["kind"], "moe");
    }
    // It is a MoE now: one sequence at a time is the same model.
    let e = f
        .run(&["eval", "--checkpoint", out_dir.to_str().unwrap(), "--batch-size", "1"])
        .ok()
        .last_json();
    assert!(e.get("group_size").is_none());
    assert!(num(&e, "loss").is_finite());

    let convert = |out: &std::path::Path, extra: &[&str]| {
        let (mot, out) = (mot.to_str().unwrap(), out.to_str().unwrap());
        f.run(&[&["transition-tune", "--checkpoint", mot, "--out", out], extra].concat())
    };
    // A second conversion into the same directory would overwrite it: refused.
    assert_bad_input(&convert(&out_dir, &[]), &["is not empty", "choose a new --out"]);
    // --steps past what config.toml's integers hold.
    let huge = convert(&f.runs().join("huge"), &["--steps", "18446744073709551615"]);
    assert_bad_input(&huge, &["--steps", "too large"]);
    let reshaped = convert(&f.runs().join("reshaped"), &["--set", "model.d_model=64"]);
    assert_bad_input(&reshaped, &["model's shape"]);
    assert!(!f.runs().join("reshaped").exists(), "a refused conversion wrote its --out");
    // --steps 0 converts only.
    let only = f.runs().join("convert-only");
    let j = convert(&only, &[]).ok().last_json();
    assert!(j["loss_tuned"].is_null());
    assert_eq!(latest(&only).unwrap().0, "step-000012");
}

#[test]
fn transition_tuning_needs_a_mot_checkpoint() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "dense", &["train.steps=2"]).ok();
    let out = f.run(&[
        "transition-tune",
        "--checkpoint",
        f.run_dir("dense").to_str().unwrap(),
        "--out",
        f.runs().join("x").to_str().unwrap(),
    ]);
    assert_bad_input(&out, &["Mixture of Tokens checkpoint", "`model.ffn` = \"dense\""]);
    assert!(!f.runs().join("x").exists());
}
