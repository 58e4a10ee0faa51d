//! `motrain generate` end to end: reproducible samples from a seed, several samples at once,
//! MoT models sampling in lock-step groups, and bad flags refused.

mod common;

use common::*;
use std::path::PathBuf;

/// A tiny run over a vocabulary that holds a real byte-level BPE tokenizer, and that tokenizer.
fn setup(f: &Fixture, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let text = f.root().join("text.txt");
    std::fs::write(&text, "to be or not to be, that is the question. ".repeat(50)).unwrap();
    let tok = f.root().join("tok.json");
    f.run(&[
        "tokenizer",
        "train",
        "--input",
        text.to_str().unwrap(),
        "--vocab-size",
        "270",
        "--out",
        tok.to_str().unwrap(),
    ])
    .ok();
    let cfg = f.config_for("v300.toml", "tiny", 300);
    f.train(&cfg, name, &[&["train.steps=4", "train.eval_every=0"], extra].concat()).ok();
    (f.run_dir(name), tok)
}

fn generate(f: &Fixture, run: &std::path::Path, tok: &std::path::Path, extra: &[&str]) -> Out {
    let args = [
        &[
            "generate",
            "--checkpoint",
            run.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--prompt",
            "to be",
            "--max-new-tokens",
            "8",
        ],
        extra,
    ]
    .concat();
    f.run(&args)
}

#[test]
fn samples_are_reproducible_and_several_come_at_once() {
    let f = Fixture::new();
    let (run, tok) = setup(&f, "dense", &[]);
    let a = generate(&f, &run, &tok, &["--seed", "5"]).ok();
    let b = generate(&f, &run, &tok, &["--seed", "5"]).ok();
    assert!(a.stdout.starts_with("to be"), "the prompt comes first: {:?}", a.stdout);
    assert_eq!(a.stdout, b.stdout, "the same seed gives the same text");
    let three = generate(
        &f,
        &run,
        &tok,
        &["--seed", "5", "--num-samples", "3", "--top-k", "10", "--top-p", "0.9"],
    )
    .ok();
    assert_eq!(three.stdout.matches("---------- sample").count(), 3);
    let bad = generate(&f, &run, &tok, &["--top-p", "1.5"]);
    assert_bad_input(&bad, &["--top-p"]);
    assert_bad_input(&generate(&f, &run, &tok, &["--num-samples", "0"]), &["at least 1"]);
    // More samples than memory holds: an error, not an allocation failure.
    let huge = generate(&f, &run, &tok, &["--num-samples", "1099511627776"]);
    assert_bad_input(&huge, &["--num-samples", "memory"]);
    let nan = generate(&f, &run, &tok, &["--temperature", "NaN"]);
    assert_bad_input(&nan, &["--temperature"]);
    let no_tok = f.run(&["generate", "--checkpoint", run.to_str().unwrap(), "--prompt", "x"]);
    assert_bad_input(&no_tok, &["no tokenizer", "--tokenizer"]);
}

#[test]
fn mot_samples_in_lock_step_groups() {
    let f = Fixture::new();
    let (run, tok) =
        setup(&f, "mot", &["model.ffn=mot", "model.mot.n_experts=4", "model.mot.group_size=2"]);
    let one = generate(&f, &run, &tok, &[]);
    assert_bad_input(&one, &["groups of 2", "--num-samples", "transition-tune"]);
    let two = generate(&f, &run, &tok, &["--num-samples", "2"]).ok();
    assert_eq!(two.stdout.matches("---------- sample").count(), 2);
}
