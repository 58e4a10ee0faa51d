//! What `prepare` records beside its shards: `prepare.json` once it is done, and
//! `prepare.partial.json` after every completed shard of a run still going, which is what an
//! interrupted run continues from. Both name the recipe (everything that determines the
//! shards); checking what is on disk against them is here too.

use super::super::inputs::InputFile;
use super::super::{shards, DataError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "prepare.json";
pub const PARTIAL: &str = "prepare.partial.json";
const VERSION: u32 = 1;

/// `prepare.json`: what was read, how, and what came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub motrain: String,
    pub recipe: Recipe,
    pub documents: Split,
    pub tokens: Split,
    /// Per kind of bad record: how many records, and where the first few were.
    pub skipped: BTreeMap<String, Skipped>,
    pub shards: Vec<ShardEntry>,
}

/// Everything that determines the shards: a rerun with an equal recipe has nothing to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub inputs: Vec<InputFile>,
    pub tokenizer: TokenizerId,
    pub name: String,
    /// The share of documents held out; with `--val-docs`, the rate at which documents are
    /// held out until there are that many.
    pub val_fraction: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_docs: Option<u64>,
    pub seed: u64,
    pub shard_tokens: usize,
    pub text_field: String,
    pub on_bad_record: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerId {
    pub spec: String,
    pub sha256: String,
    pub vocab_size: usize,
    pub eot: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub train: u64,
    pub val: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub records: u64,
    pub first: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub split: String,
    pub tokens: u64,
    /// XXH3-128 of the whole file (absent in manifests of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
}

/// `prepare.partial.json`: the recipe, and per split the completed shards and where they end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub version: u32,
    pub motrain: String,
    pub recipe: Recipe,
    pub train: SplitProgress,
    pub val: SplitProgress,
}

/// One split's completed shards and where in the corpus they end. Bad records and the val
/// choices before that point are not kept: a resumed run reads the inputs from the start
/// (without tokenizing what is done), so it meets and counts them again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitProgress {
    pub shards: Vec<ShardEntry>,
    /// The completed shards hold every document of this split before document `next_doc`
    /// (counting all kept documents in input order) and the first `next_doc_tokens` tokens of
    /// `next_doc` (its end-of-text token first), which continues in the next shard.
    pub next_doc: u64,
    pub next_doc_tokens: u64,
    /// Documents of this split before `next_doc`.
    pub documents: u64,
}

impl Manifest {
    pub fn new(
        recipe: Recipe, documents: Split, tokens: Split, skipped: BTreeMap<String, Skipped>,
        shards: Vec<ShardEntry>,
    ) -> Manifest {
        Manifest {
            version: VERSION,
            motrain: version(),
            recipe,
            documents,
            tokens,
            skipped,
            shards,
        }
    }
}

impl Partial {
    pub fn new(recipe: &Recipe, train: &SplitProgress, val: &SplitProgress) -> Partial {
        Partial {
            version: VERSION,
            motrain: version(),
            recipe: recipe.clone(),
            train: train.clone(),
            val: val.clone(),
        }
    }

    pub fn shards(&self) -> impl Iterator<Item = &ShardEntry> {
        self.train.shards.iter().chain(&self.val.shards)
    }
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

pub fn read_manifest(path: &Path) -> Result<Manifest, DataError> {
    read_json(path, "a prepare manifest")
}

pub fn read_partial(path: &Path) -> Result<Partial, DataError> {
    read_json(path, "the progress record of an unfinished prepare")
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Shard {
        path: path.to_path_buf(),
        message: format!("not {what} ({e}); delete it or pass --overwrite"),
    })
}

/// Replaces `path` atomically with `value` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), DataError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| DataError::Invalid(format!("writing {}: {e}", path.display())))?;
    Ok(crate::run_dir::write_atomic(path, (text + "\n").as_bytes())?)
}

/// Checks that every listed shard is in `out` with its header and size, and (when `digests`)
/// that its bytes match the recorded digest.
pub fn verify<'a>(
    out: &Path, entries: impl Iterator<Item = &'a ShardEntry>, digests: bool,
) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for s in entries {
        let path = out.join(&s.file);
        let shard = shards::Shard::open(&path, "llmc", None).map_err(|e| e.to_string())?;
        if shard.len() as u64 != s.tokens {
            return Err(format!(
                "{} holds {} tokens, the record says {}",
                path.display(),
                shard.len(),
                s.tokens
            ));
        }
        if let (true, Some(want)) = (digests, &s.xxh3) {
            let found = crate::digest::digest_file(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if &found != want {
                return Err(format!("{} does not match its recorded digest", path.display()));
            }
        }
        files.push(path);
    }
    Ok(files)
}

/// Names what differs between two recipes, for the error.
pub fn differences(old: &Recipe, new: &Recipe) -> String {
    let mut what = Vec::new();
    let old_inputs: HashMap<&Path, &InputFile> =
        old.inputs.iter().map(|f| (f.path.as_path(), f)).collect();
    if old.inputs != new.inputs {
        let changed: Vec<String> = new
            .inputs
            .iter()
            .filter(|f| old_inputs.get(f.path.as_path()) != Some(f))
            .take(3)
            .map(|f| f.path.display().to_string())
            .collect();
        if changed.is_empty() {
            what.push("inputs (files removed or reordered)".to_string());
        } else {
            what.push(format!("inputs (new or changed: {})", changed.join(", ")));
        }
    }
    if old.tokenizer != new.tokenizer {
        what.push(format!("tokenizer ({} before)", old.tokenizer.spec));
    }
    for (name, differs) in [
        ("--name", old.name != new.name),
        ("--val-fraction", old.val_fraction != new.val_fraction),
        ("--val-docs", old.val_docs != new.val_docs),
        ("--seed", old.seed != new.seed),
        ("--shard-tokens", old.shard_tokens != new.shard_tokens),
        ("--text-field", old.text_field != new.text_field),
        ("--on-bad-record", old.on_bad_record != new.on_bad_record),
    ] {
        if differs {
            what.push(name.to_string());
        }
    }
    what.join(", ")
}

/// `NAME_train_NNNNNN.bin`, `NAME_val_NNNNNN.bin` and their `.bin.tmp`.
pub fn is_our_shard(path: &Path, name: &str) -> bool {
    let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
        return false;
    };
    let Some(rest) = file.strip_prefix(name).and_then(|r| r.strip_prefix('_')) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix("train_").or_else(|| rest.strip_prefix("val_")) else {
        return false;
    };
    let digits = rest.strip_suffix(".bin").or_else(|| rest.strip_suffix(".bin.tmp")).unwrap_or("");
    digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit())
}

pub fn remove_if_exists(path: &Path) -> Result<(), DataError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataError::io(path, e)),
        _ => Ok(()),
    }
}
