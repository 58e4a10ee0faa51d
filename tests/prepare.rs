//! `motrain prepare` and `tokenizer train` at scale: every input kind, every kind of bad record,
//! the document-level val split, the manifest, and output that does not depend on threads.

mod common;

use common::corpus::*;
use common::*;
use motrain::data::inputs::{self, DocReader, Item, OnBad, ReadOptions};
use motrain::data::prepare::{self, ValSplit};
use motrain::data::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A Parquet file with string columns `columns`, every column holding the row's value, one row
/// group per entry of `groups`.
fn write_parquet(path: &Path, columns: &[&str], groups: &[Vec<Option<&str>>]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    let fields: String = columns.iter().map(|c| format!("optional binary {c} (UTF8); ")).collect();
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!("message m {{ {fields}}}")).unwrap(),
    );
    let props = Arc::new(
        parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut w = parquet::file::writer::SerializedFileWriter::new(
        std::fs::File::create(path).unwrap(),
        schema,
        props,
    )
    .unwrap();
    for rows in groups {
        let mut rg = w.next_row_group().unwrap();
        while let Some(mut col) = rg.next_column().unwrap() {
            let values: Vec<ByteArray> =
                rows.iter().flatten().map(|s| ByteArray::from(*s)).collect();
            let defs: Vec<i16> = rows.iter().map(|r| r.is_some() as i16).collect();
            col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

fn read_all(paths: &[PathBuf], on_bad: OnBad) -> Result<(Vec<String>, Vec<inputs::Bad>), String> {
    let files = inputs::discover(paths).map_err(|e| e.to_string())?;
    let mut texts: Vec<String> = Vec::new();
    let mut bad = Vec::new();
    for item in DocReader::new(files, ReadOptions { text_field: "text".into(), on_bad }) {
        match item.map_err(|e| e.to_string())? {
            Item::Doc(d) if d.starts => texts.push(d.text),
            Item::Doc(d) => {
                texts.last_mut().expect("a continuation follows its start").push_str(&d.text)
            }
            Item::Bad(b) => bad.push(b),
        }
    }
    Ok((texts, bad))
}

#[test]
fn every_input_kind_reads_the_same_documents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let want = docs(40, 1);
    let lines = jsonl(&want);
    std::fs::write(d.join("a.jsonl"), &lines).unwrap();
    std::fs::write(d.join("a.jsonl.zst"), zst(&lines)).unwrap();
    // Multi-member gzip, as `cat a.gz b.gz` makes: both members are read.
    let mut two = gz(&lines[..lines.len() / 2 + 1]);
    let cut = lines[..lines.len() / 2 + 1].len();
    two.extend(gz(&lines[cut..]));
    std::fs::write(d.join("a.jsonl.gz"), two).unwrap();
    let rows: Vec<Option<&str>> = want.iter().map(|s| Some(s.as_str())).collect();
    write_parquet(
        &d.join("a.parquet"),
        &["id", "text"],
        &[rows[..15].to_vec(), rows[15..].to_vec()],
    );
    std::fs::write(d.join("a.parquet.zst"), zst(&std::fs::read(d.join("a.parquet")).unwrap()))
        .unwrap();
    for name in ["a.jsonl", "a.jsonl.zst", "a.jsonl.gz", "a.parquet", "a.parquet.zst"] {
        let (got, bad) = read_all(&[d.join(name)], OnBad::Default).unwrap();
        assert!(bad.is_empty(), "{name}: {bad:?}");
        assert_eq!(got, want, "{name}");
    }
    // Text: one document per file, whatever its size (a large one streams in pieces).
    let big: String = docs(12_000, 2).concat();
    assert!(big.len() > 2 * inputs::PIECE_BYTES, "the big text must span pieces");
    std::fs::create_dir_all(d.join("txt/sub")).unwrap();
    std::fs::write(d.join("txt/1.txt"), &want[0]).unwrap();
    std::fs::write(d.join("txt/sub/2.txt.gz"), gz(big.as_bytes())).unwrap();
    std::fs::write(d.join("txt/sub/3.txt.zst"), zst(want[1].as_bytes())).unwrap();
    std::fs::write(d.join("txt/README.md"), "not a corpus file").unwrap();
    std::fs::write(d.join("txt/.hidden.txt"), "hidden").unwrap();
    let (got, bad) = read_all(&[d.join("txt")], OnBad::Default).unwrap();
    assert!(bad.is_empty());
    assert_eq!(
        got,
        vec![want[0].clone(), big.clone(), want[1].clone()],
        "a directory is searched recursively, sorted, corpus files only"
    );
    // A glob, and a file named twice is read once.
    let (got, _) = read_all(&[d.join("a.json*"), d.join("a.jsonl")], OnBad::Default).unwrap();
    assert_eq!(got.len(), 3 * want.len(), "a.jsonl, a.jsonl.gz, a.jsonl.zst");
    let e = read_all(&[d.join("nothing*.jsonl")], OnBad::Default).unwrap_err();
    assert!(e.contains("no files match"), "{e}");
}

#[test]
fn shards_are_the_same_bytes_at_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // About 5 MB of text: several chunks in flight at once, several shards per split.
    let corpus = docs(40_000, 3);
    std::fs::write(d.join("c.jsonl.zst"), zst(&jsonl(&corpus))).unwrap();
    let inputs = vec![d.join("c.jsonl.zst")];
    let one = prepare_with(&inputs, &d.join("one"), 1, ValSplit::Fraction(0.1));
    let two = prepare_with(&inputs, &d.join("two"), 2, ValSplit::Fraction(0.1));
    assert!(one.files.len() >= 4, "{:?}", one.files);
    let (a, b) = (dir_bytes(&d.join("one")), dir_bytes(&d.join("two")));
    assert_eq!(
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        if name != "prepare.json" {
            assert!(x == y, "{name} differs between 1 and 2 threads");
        }
    }
    assert_eq!(one.manifest.tokens, two.manifest.tokens);
    assert_eq!(one.manifest.documents.train + one.manifest.documents.val, corpus.len() as u64);

    // Every document is whole in one split: decoding each split gives documents of the corpus,
    // in corpus order, and together all of them.
    let tok = Tokenizer::load("gpt2").unwrap();
    let split_docs = |split: &str| -> Vec<String> {
        let mut toks = Vec::new();
        for f in one.files.iter().filter(|f| f.to_string_lossy().contains(&format!("_{split}_"))) {
            toks.extend(read_shard(f).iter().map(|&t| t as u32));
        }
        assert_eq!(toks.first(), Some(&50256), "{split} starts with end-of-text");
        toks.split(|&t| t == 50256).skip(1).map(|d| tok.decode(d)).collect()
    };
    let (train, val) = (split_docs("train"), split_docs("val"));
    assert_eq!(val.len() as u64, one.manifest.documents.val);
    let share = val.len() as f64 / corpus.len() as f64;
    assert!((share - 0.1).abs() < 0.01, "val share {share}");
    let mut merged = Vec::new();
    let (mut t, mut v) = (train.iter(), val.iter());
    for (i, doc) in corpus.iter().enumerate() {
        let next = if prepare::is_val(i as u64, 7, 0.1) { v.next() } else { t.next() };
        merged.push(next.cloned().unwrap_or_default());
        assert_eq!(&merged[i], doc, "document {i}");
    }
}

#[test]
fn manifest_skips_a_rerun_refuses_other_options_and_val_survives_appending() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    let d = cwd.as_path();
    std::fs::write(d.join("a.jsonl"), jsonl(&docs(300, 4))).unwrap();
    std::fs::write(d.join("b.jsonl"), jsonl(&docs(100, 5))).unwrap();
    let out = d.join("out");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "prepare",
            "--tokenizer",
            "gpt2",
            "--input",
            "a.jsonl",
            "--out",
            "out",
            "--name",
            "x",
            "--val-fraction",
            "0.2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| f.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    run(args(&[])).ok();
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("prepare.json")).unwrap()).unwrap();
    assert_eq!(
        m["documents"]["train"].as_u64().unwrap() + m["documents"]["val"].as_u64().unwrap(),
        300,
        "{m}"
    );
    assert_eq!(m["recipe"]["tokenizer"]["spec"], "gpt2");
    assert_eq!(m["recipe"]["tokenizer"]["sha256"].as_str().unwrap().len(), 64);
    let input = &m["recipe"]["inputs"][0];
    assert!(
        input["path"].as_str().unwrap().ends_with("a.jsonl")
            && input["bytes"].as_u64().unwrap() > 0
            && input["mtime_ns"].as_u64().unwrap() > 0,
        "{m}"
    );
    let shard_sum: u64 =
        m["shards"].as_array().unwrap().iter().map(|s| s["tokens"].as_u64().unwrap()).sum();
    assert_eq!(
        shard_sum,
        m["tokens"]["train"].as_u64().unwrap() + m["tokens"]["val"].as_u64().unwrap()
    );
    let val_before = read_shard(&out.join("x_val_000000.bin"));
    let modified = std::fs::metadata(out.join("x_train_000000.bin")).unwrap().modified().unwrap();

    // Same inputs and options: verified, not redone.
    let again = run(args(&[])).ok();
    assert!(again.stdout.contains("up to date"), "{}", again.describe());
    assert_eq!(
        std::fs::metadata(out.join("x_train_000000.bin")).unwrap().modified().unwrap(),
        modified
    );

    // Other options: refused, naming what differs, until --overwrite.
    let refused = run(args(&["--seed", "3"]));
    assert_bad_input(&refused, &["prepare.json", "--seed", "--overwrite"]);
    run(args(&["--seed", "3", "--overwrite"])).ok();

    // Appending an input: the documents already there keep their split, so the old val stream
    // is a prefix of the new one.
    let mut a = args(&["--overwrite"]);
    a.insert(5, "b.jsonl".into());
    run(a).ok();
    let val_after = read_shard(&out.join("x_val_000000.bin"));
    assert!(
        val_after.len() > val_before.len() && val_after[..val_before.len()] == val_before[..],
        "val changed when data was appended"
    );
}

#[test]
fn inputs_without_text_are_refused() {
    let f = Fixture::empty();
    let d = f.cwd();
    std::fs::write(d.join("empty.jsonl"), b"").unwrap();
    let prepare = |extra: &[&str]| {
        let args =
            [&["prepare", "--tokenizer", "gpt2", "--input", "empty.jsonl", "--out", "o"], extra];
        f.run(&args.concat())
    };
    assert_bad_input(&prepare(&[]), &["no documents", "--text-field"]);
    assert_bad_input(&prepare(&["--text-field", ""]), &["--text-field"]);
    assert_bad_input(&prepare(&["--threads", "100000"]), &["--threads", "1024"]);
    assert!(!d.join("o").join("prepare.json").exists(), "a refused prepare wrote its manifest");
}

#[test]
fn bad_records_are_counted_with_their_locations_or_fail() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    let d = cwd.as_path();
    let good = docs(5, 6);
    let mut lines = jsonl(&good[..2]);
    lines.extend(b"{\"text\": \"broken\n");
    lines.extend(b"{\"text\": 42}\n");
    lines.extend(b"{\"body\": \"no text field\"}\n");
    lines.extend(b"{\"text\": \"bad \xff byte\"}\n");
    lines.extend(b"\n");
    lines.extend(jsonl(&good[2..]));
    std::fs::write(d.join("bad.jsonl"), &lines).unwrap();
    let out = f
        .run(&[
            "prepare",
            "--tokenizer",
            "gpt2",
            "--input",
            "bad.jsonl",
            "--out",
            "o",
            "--val-fraction",
            "0",
        ])
        .ok();
    for needle in [
        "skipped 1 records: malformed_json (first at bad.jsonl:3)",
        "skipped 1 records: not_a_string (first at bad.jsonl:4)",
        "skipped 1 records: missing_field (first at bad.jsonl:5)",
        "skipped 1 records: invalid_utf8 (first at bad.jsonl:6)",
        "5 documents",
    ] {
        assert!(out.stdout.contains(needle), "missing {needle:?}\n{}", out.describe());
    }
    let m: Value =
        serde_json::from_slice(&std::fs::read(d.join("o/prepare.json")).unwrap()).unwrap();
    assert_eq!(m["skipped"]["not_a_string"], json!({"records": 1, "first": ["bad.jsonl:4"]}));
    let tokens = read_shard(&d.join("o/data_train_000000.bin"));
    assert_eq!(
        tokens.iter().filter(|&&t| t == 50256).count(),
        5,
        "the good documents, each after end-of-text"
    );

    let failed = f.run(&[
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        "bad.jsonl",
        "--out",
        "o2",
        "--on-bad-record",
        "fail",
    ]);
    assert_bad_input(&failed, &["bad.jsonl:3", "malformed_json"]);
    let failed = f.run(&[
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        "bad.jsonl",
        "--out",
        "o2",
        "--on-bad-record",
        "maybe",
    ]);
    assert_bad_input(&failed, &["--on-bad-record", "skip or fail"]);
}

#[test]
fn truncated_and_corrupt_compressed_files_fail_unless_skipped() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    let d = cwd.as_path();
    let good = docs(200, 7);
    let lines = jsonl(&good);
    let z = zst(&lines);
    std::fs::write(d.join("cut.jsonl.zst"), &z[..z.len() * 2 / 3]).unwrap();
    let mut g = gz(&lines);
    g.extend(b"this is not a gzip member at all");
    std::fs::write(d.join("tail.jsonl.gz"), &g).unwrap();
    let mut half = gz(&lines[..lines.len() / 2]);
    half.truncate(half.len() - 20);
    std::fs::write(d.join("cut.txt.gz"), &half).unwrap();
    for name in ["cut.jsonl.zst", "tail.jsonl.gz", "cut.txt.gz"] {
        let out = f.run(&["prepare", "--tokenizer", "gpt2", "--input", name, "--out", "o"]);
        assert_bad_input(&out, &[name, "corrupt_file", "--on-bad-record skip"]);
        let out = f
            .run(&[
                "prepare",
                "--tokenizer",
                "gpt2",
                "--input",
                name,
                "--out",
                &format!("o_{name}"),
                "--on-bad-record",
                "skip",
            ])
            .ok();
        assert!(out.stdout.contains(": corrupt_file (first at "), "{}", out.describe());
        assert!(!out.stdout.contains("skipped 0 records"), "{}", out.describe());
    }
    // What precedes the damage is kept: the whole first gzip member.
    let m: Value =
        serde_json::from_slice(&std::fs::read(d.join("o_tail.jsonl.gz/prepare.json")).unwrap())
            .unwrap();
    assert_eq!(
        m["documents"]["train"].as_u64().unwrap() + m["documents"]["val"].as_u64().unwrap(),
        200,
        "{m}"
    );
}

#[test]
fn parquet_problems_are_counted_per_row_or_row_group() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    let d = cwd.as_path();
    let want = docs(30, 8);
    let rows: Vec<Option<&str>> = want.iter().map(|s| Some(s.as_str())).collect();
    write_parquet(&d.join("nocol.parquet"), &["body"], std::slice::from_ref(&rows));
    let mut with_null = rows[..5].to_vec();
    with_null[2] = None;
    write_parquet(&d.join("null.parquet"), &["text"], &[with_null]);
    // An integer column named text.
    {
        use parquet::data_type::Int64Type;
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type("message m { required int64 text; }")
                .unwrap(),
        );
        let props = Arc::new(parquet::file::properties::WriterProperties::builder().build());
        let mut w = parquet::file::writer::SerializedFileWriter::new(
            std::fs::File::create(d.join("ints.parquet")).unwrap(),
            schema,
            props,
        )
        .unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>().write_batch(&[1, 2, 3], None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }
    let (got, bad) = read_all(
        &[d.join("nocol.parquet"), d.join("null.parquet"), d.join("ints.parquet")],
        OnBad::Default,
    )
    .unwrap();
    assert_eq!(got, [&want[..2], &want[3..5]].concat());
    let kinds: Vec<(&str, u64, String)> = bad
        .iter()
        .map(|b| (b.kind.name(), b.records, b.location.rsplit('/').next().unwrap().to_string()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("missing_field", 30, "nocol.parquet:row 0".to_string()),
            ("not_a_string", 1, "null.parquet:row 2".to_string()),
            ("not_a_string", 3, "ints.parquet:row 0".to_string()),
        ]
    );

    // A damaged row group: the file fails by default; skipped, the other row group is read.
    let path = d.join("damaged.parquet");
    write_parquet(&path, &["text"], &[rows[..10].to_vec(), rows[10..].to_vec()]);
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(
        std::fs::File::open(&path).unwrap(),
    )
    .unwrap();
    let (start, _) = {
        use parquet::file::reader::FileReader;
        reader.metadata().row_group(0).column(0).byte_range()
    };
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[start as usize..start as usize + 24] {
        *b = 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = read_all(std::slice::from_ref(&path), OnBad::Default).unwrap_err();
    assert!(e.contains("damaged.parquet:row group 0") && e.contains("unreadable_row_group"), "{e}");
    let (got, bad) = read_all(&[path], OnBad::Skip).unwrap();
    assert_eq!(got, want[10..].to_vec());
    assert_eq!((bad[0].kind.name(), bad[0].records), ("unreadable_row_group", 10));

    // Not Parquet at all.
    std::fs::write(d.join("junk.parquet"), b"PAR1 nothing else").unwrap();
    let out = f.run(&["prepare", "--tokenizer", "gpt2", "--input", "junk.parquet", "--out", "o"]);
    assert_bad_input(&out, &["junk.parquet", "corrupt_file"]);
}

#[test]
fn tokenizer_train_streams_inputs_and_stops_at_max_bytes() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    let d = cwd.as_path();
    let corpus = docs(400, 9);
    std::fs::write(d.join("c.jsonl.zst"), zst(&jsonl(&corpus))).unwrap();
    let out = f
        .run(&[
            "tokenizer",
            "train",
            "--input",
            "c.jsonl.zst",
            "--vocab-size",
            "300",
            "--out",
            "tok.json",
        ])
        .ok();
    assert!(out.stdout.contains("trained on 400 documents"), "{}", out.describe());
    let out = f
        .run(&[
            "tokenizer",
            "train",
            "--input",
            "c.jsonl.zst",
            "--vocab-size",
            "300",
            "--out",
            "tok2.json",
            "--max-bytes",
            "2000",
        ])
        .ok();
    let n: u64 = out
        .stdout
        .split("trained on ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(n > 0 && n < 100, "--max-bytes 2000 took {n} documents\n{}", out.describe());
    // The document that crosses the limit is cut there: exactly the first 2000 bytes.
    assert!(out.stdout.contains("documents, 2000 bytes"), "{}", out.describe());
    let tok = Tokenizer::load(d.join("tok2.json").to_str().unwrap()).unwrap();
    assert!(tok.vocab_size() > 257);
}

#[test]
fn epoch_sampler_is_validated_trains_and_resumes_exactly() {
    let f = Fixture::new();
    let cfg = f.config();
    let bad = f.train(&cfg, "bad", &["data.sampler=shuffled"]);
    assert_bad_input(&bad, &["data.sampler", "shuffled", "epoch"]);
    let common = [
        "data.sampler=epoch",
        "train.schedule=constant",
        "train.warmup_steps=2",
        "train.ckpt_every=6",
        "train.eval_every=0",
    ];
    let with = |extra: &'static str| -> Vec<&'static str> {
        common.iter().copied().chain([extra]).collect()
    };
    f.train(&cfg, "straight", &with("train.steps=12")).ok();
    f.train(&cfg, "resumed", &with("train.steps=6")).ok();
    f.train(&cfg, "resumed", &[with("train.steps=12"), vec!["--resume"]].concat()).ok();
    let (a, b) = (train_lines(&f.run_dir("straight")), train_lines(&f.run_dir("resumed")));
    for s in 7..=12 {
        let (va, vb) = (
            a.iter().find(|v| step_of(v) == s).unwrap(),
            b.iter().find(|v| step_of(v) == s).unwrap(),
        );
        assert_eq!(num(va, "loss").to_bits(), num(vb, "loss").to_bits(), "step {s}: {va} vs {vb}");
    }
    // The sampler reaches the loader: the random sampler feeds other windows.
    f.train(&cfg, "random", &["data.sampler=random", "train.steps=1", "train.eval_every=0"]).ok();
    let r = train_lines(&f.run_dir("random"));
    assert_ne!(
        num(&r[0], "loss").to_bits(),
        num(&a[0], "loss").to_bits(),
        "the same first batch with both samplers"
    );
    let (_, ckpt) = latest(&f.run_dir("resumed")).unwrap();
    assert_eq!(state_json(&ckpt)["config"]["data"]["sampler"], "epoch");
}

/// Peak RSS (MiB) of `motrain ARGS` run in `cwd` with `env`: the high-water mark the kernel
/// keeps for its address space (`VmHWM`), polled until it exits. (The child's `ru_maxrss` would
/// count the test process it was forked from.)
#[cfg(target_os = "linux")]
fn peak_rss_mib(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> f64 {
    let mut child = std::process::Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_file) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "motrain {args:?} failed");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    peak_kib as f64 / 1024.0
}

#[cfg(target_os = "linux")]
#[test]
fn memory_does_not_follow_the_corpus() {
    let f = Fixture::empty();
    let cwd = f.cwd();
    // 64 MB of text: holding it, or its tokens, would show in the peak.
    let pool = docs(2000, 10);
    let mut lines = Vec::new();
    let mut r = Lcg(11);
    while lines.len() < 64 << 20 {
        lines.extend(serde_json::to_vec(&json!({"text": pool[r.below(2000) as usize]})).unwrap());
        lines.push(b'\n');
    }
    std::fs::write(cwd.join("big.jsonl.zst"), zstd::encode_all(&lines[..], 1).unwrap()).unwrap();
    drop(lines);
    let args = [
        "prepare",
        "--tokenizer",
        "gpt2",
        "--input",
        "big.jsonl.zst",
        "--out",
        "o",
        "--threads",
        "2",
    ];
    let peak = peak_rss_mib(&cwd, &args, &[("MOTRAIN_PREPARE_IN_FLIGHT_MB", "2")]);
    let m: Value =
        serde_json::from_slice(&std::fs::read(cwd.join("o/prepare.json")).unwrap()).unwrap();
    let tokens = m["tokens"]["train"].as_u64().unwrap() + m["tokens"]["val"].as_u64().unwrap();
    assert!(tokens > 10_000_000, "{tokens} tokens");
    // Less than the text alone: about 22 MiB of program and tokenizer, plus what is in flight.
    assert!(peak < 64.0, "peak RSS {peak:.0} MiB for 64 MB of text with 2 MiB in flight");
}
