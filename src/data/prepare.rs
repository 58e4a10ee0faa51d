//! Raw text to llm.c shards: one document per text file (or per line of a .jsonl file's
//! `text`), each preceded by the end-of-text token, the tail of the stream held out for val.

use super::inputs::text_files;
use super::shards::write_shard;
use super::tokenizer::Tokenizer;
use super::DataError;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

pub struct PrepareOptions {
    pub name: String,
    pub val_fraction: f64,
    pub shard_tokens: usize,
}

pub struct PrepareReport {
    pub documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub files: Vec<PathBuf>,
}

fn documents(path: &Path) -> Result<Vec<String>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::Shard {
        path: path.to_path_buf(),
        message: format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| DataError::Shard {
                        path: path.to_path_buf(),
                        message: format!("line {}: {e}", i + 1),
                    })?;
                v.get("text").and_then(|t| t.as_str()).map(str::to_string).ok_or_else(|| {
                    DataError::Shard {
                        path: path.to_path_buf(),
                        message: format!("line {}: no string field \"text\"", i + 1),
                    }
                })
            })
            .collect()
    } else {
        Ok(vec![text])
    }
}

pub fn prepare(
    tok: &Tokenizer, inputs: &[PathBuf], out: &Path, opts: &PrepareOptions,
) -> Result<PrepareReport, DataError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::Invalid(format!(
            "--val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if opts.shard_tokens == 0 {
        return Err(DataError::Invalid("--shard-tokens must be at least 1".into()));
    }
    let files = text_files(inputs)?;
    let mut docs = Vec::new();
    for f in &files {
        docs.extend(documents(f)?);
    }
    let encoded: Vec<Vec<u32>> =
        docs.par_iter().map(|d| tok.encode(d)).collect::<Result<_, _>>()?;
    let mut stream = Vec::with_capacity(encoded.iter().map(|d| d.len() + 1).sum());
    for d in &encoded {
        stream.push(tok.eot());
        stream.extend_from_slice(d);
    }
    let n_val = (stream.len() as f64 * opts.val_fraction).round() as usize;
    let (train, val) = stream.split_at(stream.len() - n_val);
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    let mut written = Vec::new();
    for (split, tokens) in [("train", train), ("val", val)] {
        for (i, chunk) in tokens.chunks(opts.shard_tokens).enumerate() {
            let path = out.join(format!("{}_{split}_{i:06}.bin", opts.name));
            write_shard(&path, chunk, tok.vocab_size())?;
            written.push(path);
        }
    }
    Ok(PrepareReport {
        documents: docs.len(),
        train_tokens: train.len(),
        val_tokens: val.len(),
        files: written,
    })
}
