//! Generated corpora for the `prepare` tests: documents, JSONL, compressed files, and running
//! prepare through the library.

use super::Lcg;
use motrain::data::inputs::{OnBad, ReadOptions};
use motrain::data::prepare::{self, PrepareOptions, ValSplit};
use motrain::data::Tokenizer;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Words for generated documents, some of them not ASCII.
const WORDS: &[&str] = &[
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "and",
    "then",
    "runs",
    "into",
    "forest",
    "where",
    "a",
    "small",
    "bird",
    "sings",
    "softly",
    "under",
    "green",
    "trees",
    "while",
    "river",
    "flows",
    "past",
    "old",
    "stone",
    "bridge",
    "naïve",
    "café",
    "日本語",
    "🙂",
];

/// A document of `words` words.
pub fn doc(r: &mut Lcg, words: usize) -> String {
    let mut s = String::new();
    for j in 0..words {
        s.push_str(WORDS[r.below(WORDS.len() as u64) as usize]);
        s.push(if j % 11 == 10 { '\n' } else { ' ' });
    }
    s
}

/// `n` documents of 5 to 64 words.
pub fn docs(n: usize, seed: u64) -> Vec<String> {
    let mut r = Lcg(seed);
    (0..n)
        .map(|_| {
            let words = 5 + r.below(60) as usize;
            doc(&mut r, words)
        })
        .collect()
}

/// JSON lines `{"id", "meta", "text"}`, one per document.
pub fn jsonl(docs: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        out.extend(serde_json::to_vec(&json!({"id": i, "meta": {"text": 5}, "text": d})).unwrap());
        out.push(b'\n');
    }
    out
}

pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn zst(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// Runs prepare through the library with `threads` tokenizing threads.
pub fn prepare_with(
    inputs: &[PathBuf], out: &Path, threads: usize, val: ValSplit,
) -> prepare::PrepareReport {
    let tok = Tokenizer::load("gpt2").unwrap();
    let opts = PrepareOptions {
        name: "t".into(),
        val,
        seed: 7,
        shard_tokens: 300_000,
        threads,
        read: ReadOptions { text_field: "text".into(), on_bad: OnBad::Default },
        overwrite: false,
        progress: false,
        in_flight_bytes: prepare::IN_FLIGHT_BYTES,
    };
    prepare::prepare(&tok, "gpt2", inputs, out, &opts).unwrap()
}

/// Every file of `dir` (name, bytes), sorted by name.
pub fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}
