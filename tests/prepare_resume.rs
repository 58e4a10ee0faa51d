//! `prepare --val-docs N`, and an interrupted `prepare` continued by a rerun: the shards and
//! `prepare.json` come out byte for byte as an uninterrupted run writes them.

mod common;

use common::corpus::*;
use common::*;
use motrain::data::prepare::{self, ValSplit, VAL_DOCS_RATE};
use motrain::data::Tokenizer;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// The documents of a split's shards, decoded, in order.
fn split_docs(report: &prepare::PrepareReport, split: &str) -> Vec<String> {
    let tok = Tokenizer::load("gpt2").unwrap();
    let mut toks = Vec::new();
    for f in report.files.iter().filter(|f| f.to_string_lossy().contains(&format!("_{split}_"))) {
        toks.extend(read_shard(f).iter().map(|&t| t as u32));
    }
    toks.split(|&t| t == 50256).skip(1).map(|d| tok.decode(d)).collect()
}

#[test]
fn val_docs_holds_out_the_first_hashed_documents_up_to_n() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = docs(600, 21);
    std::fs::write(d.join("a.jsonl"), jsonl(&corpus)).unwrap();
    let inputs = vec![d.join("a.jsonl")];
    let one = prepare_with(&inputs, &d.join("one"), 1, ValSplit::Docs(20));
    prepare_with(&inputs, &d.join("two"), 2, ValSplit::Docs(20));
    let (a, b) = (dir_bytes(&d.join("one")), dir_bytes(&d.join("two")));
    assert!(a == b, "the shards and manifest differ between 1 and 2 threads");
    assert_eq!(one.manifest.documents.val, 20);
    assert_eq!(one.manifest.recipe.val_docs, Some(20));
    assert_eq!(one.manifest.recipe.val_fraction, VAL_DOCS_RATE);
    // Independently: the first 20 documents whose hash falls under 1/16, in input order.
    let chosen: Vec<usize> =
        (0..corpus.len()).filter(|&i| prepare::is_val(i as u64, 7, 1.0 / 16.0)).take(20).collect();
    let want: Vec<String> = chosen.iter().map(|&i| corpus[i].clone()).collect();
    assert_eq!(split_docs(&one, "val"), want);
    let train: Vec<String> =
        (0..corpus.len()).filter(|i| !chosen.contains(i)).map(|i| corpus[i].clone()).collect();
    assert_eq!(split_docs(&one, "train"), train);

    // Appending documents leaves val as it is once it holds N; a corpus that gives fewer than N
    // holds out what it can, and more data only adds to it.
    let mut more = corpus.clone();
    more.extend(docs(300, 22));
    std::fs::write(d.join("more.jsonl"), jsonl(&more)).unwrap();
    let appended = prepare_with(&[d.join("more.jsonl")], &d.join("more"), 2, ValSplit::Docs(20));
    assert_eq!(split_docs(&appended, "val"), want);
    let few = prepare_with(&inputs, &d.join("few"), 2, ValSplit::Docs(1000));
    let few_val = split_docs(&few, "val");
    assert!(few_val.len() > 20 && few_val.len() < 100, "{} val documents", few_val.len());
    let few_more = prepare_with(&[d.join("more.jsonl")], &d.join("fm"), 2, ValSplit::Docs(1000));
    assert_eq!(split_docs(&few_more, "val")[..few_val.len()], few_val[..]);
}

#[test]
fn val_docs_on_the_command_line() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    std::fs::write(cwd.join("a.jsonl"), jsonl(&docs(200, 3))).unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        let base = ["prepare", "--tokenizer", "gpt2", "--input", "a.jsonl", "--out", "o"];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |a: Vec<String>| f.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let both = run(args(&["--val-docs", "3", "--val-fraction", "0.1"]));
    assert_bad_input(&both, &["--val-docs", "--val-fraction"]);
    let out = run(args(&["--val-docs", "3"])).ok();
    assert!(out.stdout.contains("(197 train, 3 val)"), "{}", out.describe());
    let m: Value = serde_json::from_slice(&read(&cwd.join("o/prepare.json"))).unwrap();
    assert_eq!(m["recipe"]["val_docs"], 3, "{m}");
    // Another N is another recipe.
    let other = run(args(&["--val-docs", "4"]));
    assert_bad_input(&other, &["prepare.json", "--val-docs", "--overwrite"]);
    // Asking for more than the corpus gives: done, with a warning naming the realized count.
    let many = run(args(&["--val-docs", "500", "--overwrite"])).ok();
    let m: Value = serde_json::from_slice(&read(&cwd.join("o/prepare.json"))).unwrap();
    let got = m["documents"]["val"].as_u64().unwrap();
    assert!(
        many.stderr
            .contains(&format!("warning: --val-docs 500: the corpus gave {got} val documents")),
        "{}",
        many.describe()
    );
}

/// A corpus of many small documents then one long `.txt` document (read in pieces), cut into
/// shards of 4000 tokens: resumes land between documents, inside documents, and inside a
/// document's later pieces.
fn resume_corpus(cwd: &Path) {
    std::fs::write(cwd.join("a.jsonl.zst"), zst(&jsonl(&docs(1500, 31)))).unwrap();
    let mut r = Lcg(32);
    let mut long = String::new();
    while long.len() < 1_300_000 {
        long += &doc(&mut r, 200);
    }
    std::fs::write(cwd.join("b.txt"), long).unwrap();
}

fn prepare_args<'a>(out: &'a str, threads: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["prepare", "--tokenizer", "gpt2", "--input", "a.jsonl.zst", "b.txt"];
    a.extend(["--out", out, "--name", "r", "--shard-tokens", "4000", "--threads", threads]);
    a.extend(extra);
    a
}

/// `prepare` that kills itself (SIGKILL) once `shards` shards are completed and recorded.
fn killed_after(f: &Fixture, shards: usize, args: &[&str]) -> Out {
    let mut c = Command::new(bin());
    c.env("MOTRAIN_FAULT_PREPARE_KILL_AFTER_SHARDS", shards.to_string());
    let out = run_motrain(c, &f.cwd(), args);
    assert_eq!(out.code, None, "expected death by SIGKILL\n{}", out.describe());
    out
}

#[test]
fn an_interrupted_prepare_resumes_to_the_same_bytes() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    resume_corpus(&cwd);
    f.run(&prepare_args("straight", "2", &["--val-docs", "40"])).ok();
    let straight = dir_bytes(&cwd.join("straight"));
    let shards = straight.iter().filter(|(n, _)| n.ends_with(".bin")).count();
    assert!(shards > 40, "{shards} shards");
    // Kill points between and inside documents, resumed at the same and at other thread counts.
    for (kill_at, threads, resume_threads) in [(1, "1", "2"), (9, "2", "1"), (60, "2", "2")] {
        let out = format!("o{kill_at}");
        killed_after(&f, kill_at, &prepare_args(&out, threads, &["--val-docs", "40"]));
        let o = cwd.join(&out);
        assert!(o.join("prepare.partial.json").is_file() && !o.join("prepare.json").exists());
        let again = f.run(&prepare_args(&out, resume_threads, &["--val-docs", "40"])).ok();
        assert!(again.stderr.contains("resuming the unfinished prepare"), "{}", again.describe());
        let got = dir_bytes(&o);
        assert_eq!(
            got.iter().map(|x| &x.0).collect::<Vec<_>>(),
            straight.iter().map(|x| &x.0).collect::<Vec<_>>(),
            "kill after {kill_at} shards"
        );
        for ((name, x), (_, y)) in got.iter().zip(&straight) {
            assert!(x == y, "kill after {kill_at} shards: {name} differs from the straight run");
        }
    }
}

#[test]
fn a_damaged_or_foreign_partial_prepare_is_redone_or_refused() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    resume_corpus(&cwd);
    f.run(&prepare_args("straight", "2", &[])).ok();
    let straight = dir_bytes(&cwd.join("straight"));

    // A completed shard that no longer matches its digest: prepared again from the start.
    killed_after(&f, 5, &prepare_args("o", "2", &[]));
    let shard = cwd.join("o/r_train_000002.bin");
    let mut bytes = read(&shard);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let again = f.run(&prepare_args("o", "2", &[])).ok();
    assert!(again.stderr.contains("do not check out"), "{}", again.describe());
    assert!(dir_bytes(&cwd.join("o")) == straight, "redone from the start");

    // Other options than the unfinished run's: refused, naming the record, until --overwrite.
    killed_after(&f, 3, &prepare_args("p", "2", &[]));
    let other = f.run(&prepare_args("p", "2", &["--seed", "5"]));
    assert_bad_input(&other, &["prepare.partial.json", "unfinished", "--seed", "--overwrite"]);
    f.run(&prepare_args("p", "2", &["--seed", "5", "--overwrite"])).ok();
    assert!(!cwd.join("p/prepare.partial.json").exists());
    let m: Value = serde_json::from_slice(&read(&cwd.join("p/prepare.json"))).unwrap();
    assert_eq!(m["recipe"]["seed"], 5);
}

#[cfg(unix)]
#[test]
fn a_prepare_killed_from_outside_resumes_to_the_same_bytes() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    resume_corpus(&cwd);
    f.run(&prepare_args("straight", "1", &[])).ok();
    let mut child = Command::new(bin())
        .args(prepare_args("o", "1", &[]))
        .current_dir(&cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL as soon as the first shards are recorded, wherever the writer is then.
    let record = cwd.join("o/prepare.partial.json");
    while !record.exists() && child.try_wait().unwrap().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let again = f.run(&prepare_args("o", "2", &[])).ok();
    if !status.success() {
        assert!(again.stderr.contains("resuming"), "{}", again.describe());
    }
    assert!(dir_bytes(&cwd.join("o")) == dir_bytes(&cwd.join("straight")));
}
