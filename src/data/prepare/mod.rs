//! Raw text to llm.c shards, streaming, and the `prepare.json` manifest beside them.
//!
//! A reader thread walks the inputs ([`DocReader`]) and cuts the documents into chunks; worker
//! threads tokenize chunks; the calling thread writes the chunks in input order into the train
//! and val shards. At most `in_flight_bytes` (default [`IN_FLIGHT_BYTES`]) of text are between reading and writing, so memory
//! does not grow with the corpus, and since documents are numbered by the reader and written in
//! order, the shards are the same bytes whatever the number of threads. Each document is
//! preceded by the end-of-text token; it goes to val when a hash of its index and the seed falls
//! below `--val-fraction`, so appending inputs never moves a document between splits.

use super::inputs::{self, Bad, DocReader, InputFile, Item, ReadOptions, FIRST_LOCATIONS};
use super::shards;
use super::tokenizer::Tokenizer;
use super::DataError;
use crate::rng::splitmix64;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;

/// Text (bytes) read but not yet written: the bound on memory, with the tokens it becomes.
pub const IN_FLIGHT_BYTES: usize = 128 << 20;
/// Documents are handed to the tokenizing threads in chunks of about this much text.
const CHUNK_BYTES: usize = 1 << 20;
pub const MANIFEST: &str = "prepare.json";
const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub name: String,
    pub val_fraction: f64,
    pub seed: u64,
    pub shard_tokens: usize,
    /// Tokenizing threads; 0 = one per core.
    pub threads: usize,
    pub read: ReadOptions,
    /// Replace the shards of an earlier `prepare` into `out` made from other inputs or options.
    pub overwrite: bool,
    pub progress: bool,
    /// Text between the reader and the writer (the memory bound); [`IN_FLIGHT_BYTES`] by default.
    pub in_flight_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// The shards were already there, made by the same recipe, and were checked, not rewritten.
    pub up_to_date: bool,
    pub manifest: Manifest,
    pub files: Vec<PathBuf>,
    pub seconds: f64,
}

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
    pub val_fraction: f64,
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
}

/// Whether document `index` is held out for val.
pub fn is_val(index: u64, seed: u64, fraction: f64) -> bool {
    let h = splitmix64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ splitmix64(index));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

pub fn prepare(
    tok: &Tokenizer, tok_spec: &str, inputs: &[PathBuf], out: &Path, opts: &PrepareOptions,
) -> Result<PrepareReport, DataError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::Invalid(format!(
            "--val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if opts.shard_tokens == 0 || opts.shard_tokens > i32::MAX as usize {
        return Err(DataError::Invalid(format!(
            "--shard-tokens must be in 1..={}, got {}",
            i32::MAX,
            opts.shard_tokens
        )));
    }
    if opts.name.is_empty() || opts.name.contains(['/', '\\']) {
        return Err(DataError::Invalid(format!(
            "--name {:?} must be a non-empty file name prefix",
            opts.name
        )));
    }
    let start = Instant::now();
    let files = inputs::discover(inputs)?;
    let mut recorded = files.clone();
    for f in &mut recorded {
        f.path = std::fs::canonicalize(&f.path).map_err(|e| DataError::io(&f.path, e))?;
    }
    let recipe = Recipe {
        inputs: recorded,
        tokenizer: TokenizerId {
            spec: tok_spec.to_string(),
            sha256: super::tokenizer::fingerprint(tok_spec)?,
            vocab_size: tok.vocab_size(),
            eot: tok.eot(),
        },
        name: opts.name.clone(),
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        shard_tokens: opts.shard_tokens,
        text_field: opts.read.text_field.clone(),
        on_bad_record: opts.read.on_bad.name().to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    let manifest_path = out.join(MANIFEST);
    if manifest_path.exists() {
        let old = read_manifest(&manifest_path)?;
        if old.recipe == recipe {
            match verify(out, &old) {
                Ok(files) => {
                    return Ok(PrepareReport {
                        up_to_date: true,
                        manifest: old,
                        files,
                        seconds: start.elapsed().as_secs_f64(),
                    })
                }
                Err(why) => eprintln!(
                    "note: {} lists shards that do not check out ({why}); preparing them again",
                    manifest_path.display()
                ),
            }
        } else if !opts.overwrite {
            return Err(DataError::Invalid(format!(
                "{} was written with other inputs or options (differing: {}); pass --overwrite to replace those shards, or choose another --out",
                manifest_path.display(),
                differences(&old.recipe, &recipe)
            )));
        }
        for s in &old.shards {
            remove_if_exists(&out.join(&s.file))?;
        }
        remove_if_exists(&manifest_path)?;
    }
    // Shards of this name without a manifest are from an interrupted run: they would be mixed
    // with the new ones by a glob, so they go.
    for entry in std::fs::read_dir(out).map_err(|e| DataError::io(out, e))? {
        let path = entry.map_err(|e| DataError::io(out, e))?.path();
        if is_our_shard(&path, &opts.name) {
            remove_if_exists(&path)?;
        }
    }

    let total_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let reader = DocReader::new(files, opts.read.clone());
    let budget = Budget::new(opts.in_flight_bytes.max(1));
    let wide = shards::is_wide(tok.vocab_size());
    let mut writers = [
        ShardWriter::new(out, &opts.name, "train", opts.shard_tokens, wide),
        ShardWriter::new(out, &opts.name, "val", opts.shard_tokens, wide),
    ];
    let mut documents = Split::default();
    let mut progress = Progress::new(opts.progress, total_bytes);

    let (chunk_tx, chunk_rx) = mpsc::channel::<Chunk>();
    let chunk_rx = Mutex::new(chunk_rx);
    let (enc_tx, enc_rx) = mpsc::channel::<Result<Encoded, DataError>>();
    let (read_result, write_result) = std::thread::scope(|s| {
        let budget = &budget;
        let reading = s.spawn(move || read_chunks(reader, chunk_tx, budget, opts));
        for _ in 0..threads {
            let enc_tx = enc_tx.clone();
            let chunk_rx = &chunk_rx;
            s.spawn(move || loop {
                let next = chunk_rx.lock().map(|rx| rx.recv());
                let Ok(Ok(chunk)) = next else { break };
                if enc_tx.send(encode(tok, chunk)).is_err() {
                    break;
                }
            });
        }
        drop(enc_tx);
        let write_result = (|| -> Result<(), DataError> {
            let mut waiting = BTreeMap::new();
            let mut next = 0u64;
            for enc in &enc_rx {
                let enc = enc?;
                waiting.insert(enc.seq, enc);
                while let Some(enc) = waiting.remove(&next) {
                    writers[0].push(&enc.tokens[0])?;
                    writers[1].push(&enc.tokens[1])?;
                    documents.train += enc.documents.train;
                    documents.val += enc.documents.val;
                    budget.release(enc.bytes);
                    progress.update(
                        enc.read_to,
                        documents.train + documents.val,
                        writers[0].total + writers[1].total,
                    );
                    next += 1;
                }
            }
            Ok(())
        })();
        if write_result.is_err() {
            budget.abort();
        }
        // Unblock the workers and the reader whatever happened, then collect the reader's end.
        drop(enc_rx);
        (
            reading
                .join()
                .unwrap_or_else(|_| Err(DataError::Invalid("the input reader panicked".into()))),
            write_result,
        )
    });
    progress.finish();
    let skipped = match (read_result, write_result) {
        (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
        (Ok(skipped), Ok(())) => skipped,
    };
    let [train, val] = writers;
    let mut shard_entries = Vec::new();
    let mut files = Vec::new();
    let mut tokens = Split::default();
    for (w, count) in [(train, &mut tokens.train), (val, &mut tokens.val)] {
        *count = w.total;
        let split = w.split;
        for (path, n) in w.finish()? {
            shard_entries.push(ShardEntry {
                file: path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                split: split.to_string(),
                tokens: n,
            });
            files.push(path);
        }
    }
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        motrain: env!("CARGO_PKG_VERSION").to_string(),
        recipe,
        documents,
        tokens,
        skipped,
        shards: shard_entries,
    };
    write_manifest(&manifest_path, &manifest)?;
    Ok(PrepareReport { up_to_date: false, manifest, files, seconds: start.elapsed().as_secs_f64() })
}

/// Documents for the tokenizing threads, numbered so the writer can put them back in order.
struct Chunk {
    seq: u64,
    /// Text, whether it starts a document, whether it goes to val.
    docs: Vec<(String, bool, bool)>,
    bytes: usize,
    /// Input bytes read when the chunk was complete: progress counts what is written, not what
    /// the reader has run ahead to.
    read_to: u64,
}

struct Encoded {
    seq: u64,
    /// Train and val tokens.
    tokens: [Vec<u32>; 2],
    documents: Split,
    bytes: usize,
    read_to: u64,
}

fn encode(tok: &Tokenizer, chunk: Chunk) -> Result<Encoded, DataError> {
    let mut out = Encoded {
        seq: chunk.seq,
        tokens: [Vec::new(), Vec::new()],
        documents: Split::default(),
        bytes: chunk.bytes,
        read_to: chunk.read_to,
    };
    for (text, starts, val) in chunk.docs {
        let dst = &mut out.tokens[val as usize];
        if starts {
            dst.push(tok.eot());
            if val {
                out.documents.val += 1;
            } else {
                out.documents.train += 1;
            }
        }
        dst.extend(tok.encode(&text)?);
    }
    Ok(out)
}

/// The reader thread: documents to chunks, the split of each decided by its index; returns the
/// bad records it skipped.
fn read_chunks(
    reader: DocReader, tx: mpsc::Sender<Chunk>, budget: &Budget, opts: &PrepareOptions,
) -> Result<BTreeMap<String, Skipped>, DataError> {
    let mut skipped: BTreeMap<String, Skipped> = BTreeMap::new();
    let read = reader.bytes_read.clone();
    let mut chunk = Chunk { seq: 0, docs: Vec::new(), bytes: 0, read_to: 0 };
    let mut index = 0u64;
    let mut val = false;
    let send = |chunk: &mut Chunk| -> bool {
        if chunk.docs.is_empty() {
            return true;
        }
        if !budget.acquire(chunk.bytes) {
            return false;
        }
        chunk.read_to = read.load(Ordering::Relaxed);
        let next = Chunk { seq: chunk.seq + 1, docs: Vec::new(), bytes: 0, read_to: 0 };
        tx.send(std::mem::replace(chunk, next)).is_ok()
    };
    for item in reader {
        match item? {
            Item::Doc(d) => {
                if d.starts {
                    val = is_val(index, opts.seed, opts.val_fraction);
                    index += 1;
                }
                chunk.bytes += d.text.len();
                chunk.docs.push((d.text, d.starts, val));
                if chunk.bytes >= CHUNK_BYTES && !send(&mut chunk) {
                    return Ok(skipped);
                }
            }
            Item::Bad(Bad { kind, location, records, .. }) => {
                let s = skipped.entry(kind.name().to_string()).or_default();
                s.records += records;
                if s.first.len() < FIRST_LOCATIONS {
                    s.first.push(location);
                }
            }
        }
    }
    send(&mut chunk);
    Ok(skipped)
}

/// Bytes of text between the reader and the writer; a chunk larger than the whole budget still
/// goes through, alone.
struct Budget {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
    cap: usize,
}

impl Budget {
    fn new(cap: usize) -> Budget {
        Budget { state: Mutex::new((0, false)), cv: Condvar::new(), cap }
    }

    /// Waits for room; false once the writer has given up.
    fn acquire(&self, n: usize) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        while !s.1 && s.0 > 0 && s.0 + n > self.cap {
            s = match self.cv.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        s.0 += n;
        !s.1
    }

    fn release(&self, n: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = s.0.saturating_sub(n);
        }
        self.cv.notify_all();
    }

    fn abort(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
        self.cv.notify_all();
    }
}

/// One split's shards, streamed: tokens go to a temporary file whose header is written when
/// the shard is full (or the input ends), then it is renamed into place.
struct ShardWriter {
    dir: PathBuf,
    name: String,
    split: &'static str,
    cap: usize,
    wide: bool,
    open: Option<(std::io::BufWriter<std::fs::File>, PathBuf)>,
    in_shard: usize,
    done: Vec<(PathBuf, u64)>,
    total: u64,
    bytes: Vec<u8>,
}

impl ShardWriter {
    fn new(dir: &Path, name: &str, split: &'static str, cap: usize, wide: bool) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            split,
            cap,
            wide,
            open: None,
            in_shard: 0,
            done: Vec::new(),
            total: 0,
            bytes: Vec::new(),
        }
    }

    fn path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{}_{}_{index:06}.bin", self.name, self.split))
    }

    fn push(&mut self, mut tokens: &[u32]) -> Result<(), DataError> {
        while !tokens.is_empty() {
            if self.open.is_none() {
                let tmp = self.path(self.done.len()).with_extension("bin.tmp");
                let mut f = std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?,
                );
                f.write_all(&[0u8; shards::HEADER_BYTES]).map_err(|e| DataError::io(&tmp, e))?;
                self.open = Some((f, tmp));
                self.in_shard = 0;
            }
            let take = tokens.len().min(self.cap - self.in_shard);
            self.bytes.clear();
            for &t in &tokens[..take] {
                if self.wide {
                    self.bytes.extend_from_slice(&t.to_le_bytes());
                } else {
                    self.bytes.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            let (f, tmp) = self.open.as_mut().expect("opened above");
            f.write_all(&self.bytes).map_err(|e| DataError::io(tmp, e))?;
            self.in_shard += take;
            self.total += take as u64;
            tokens = &tokens[take..];
            if self.in_shard == self.cap {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), DataError> {
        let Some((f, tmp)) = self.open.take() else {
            return Ok(());
        };
        let path = self.path(self.done.len());
        let mut file = f.into_inner().map_err(|e| DataError::io(&tmp, e.into_error()))?;
        let header = shards::header(&path, self.in_shard, self.wide)?;
        file.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.sync_all())
            .map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
        self.done.push((path, self.in_shard as u64));
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<(PathBuf, u64)>, DataError> {
        self.close()?;
        Ok(std::mem::take(&mut self.done))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some((_, tmp)) = self.open.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// `NAME_train_NNNNNN.bin`, `NAME_val_NNNNNN.bin` and their `.bin.tmp`.
fn is_our_shard(path: &Path, name: &str) -> bool {
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

fn remove_if_exists(path: &Path) -> Result<(), DataError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataError::io(path, e)),
        _ => Ok(()),
    }
}

pub fn read_manifest(path: &Path) -> Result<Manifest, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Shard {
        path: path.to_path_buf(),
        message: format!("not a prepare manifest ({e}); delete it or pass --overwrite"),
    })
}

fn write_manifest(path: &Path, m: &Manifest) -> Result<(), DataError> {
    let text = serde_json::to_string_pretty(m)
        .map_err(|e| DataError::Invalid(format!("writing {}: {e}", path.display())))?;
    Ok(crate::run_dir::write_atomic(path, (text + "\n").as_bytes())?)
}

/// Checks that every shard the manifest lists is there with its header and size.
fn verify(out: &Path, m: &Manifest) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for s in &m.shards {
        let path = out.join(&s.file);
        let shard = shards::Shard::open(&path, "llmc", None).map_err(|e| e.to_string())?;
        if shard.len() as u64 != s.tokens {
            return Err(format!(
                "{} holds {} tokens, the manifest says {}",
                path.display(),
                shard.len(),
                s.tokens
            ));
        }
        files.push(path);
    }
    Ok(files)
}

/// Names what differs between two recipes, for the error.
fn differences(old: &Recipe, new: &Recipe) -> String {
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

/// An indicatif bar on stderr when it is a terminal, else a plain line every 10 seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    start: Instant,
    last: Instant,
    total: u64,
}

impl Progress {
    fn new(enabled: bool, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (enabled && tty).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let now = Instant::now();
        Progress { bar, plain: enabled && !tty, start: now, last: now, total }
    }

    fn rates(&self, docs: u64, tokens: u64) -> String {
        let s = self.start.elapsed().as_secs_f64().max(1e-9);
        format!("{:.0} docs/s {:.2}M tokens/s", docs as f64 / s, tokens as f64 / s / 1e6)
    }

    fn update(&mut self, bytes: u64, docs: u64, tokens: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            if self.last.elapsed().as_millis() >= 200 {
                bar.set_message(self.rates(docs, tokens));
                self.last = Instant::now();
            }
        } else if self.plain && self.last.elapsed().as_secs() >= 10 {
            let s = self.start.elapsed().as_secs_f64();
            let mb_s = bytes as f64 / s / 1e6;
            let eta = if bytes > 0 {
                (self.total.saturating_sub(bytes)) as f64 * s / bytes as f64
            } else {
                0.0
            };
            eprintln!(
                "prepare: {:.1}/{:.1} MB ({:.1} MB/s) {docs} docs {tokens} tokens, {}, ETA {eta:.0} s",
                bytes as f64 / 1e6,
                self.total as f64 / 1e6,
                mb_s,
                self.rates(docs, tokens)
            );
            self.last = Instant::now();
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
