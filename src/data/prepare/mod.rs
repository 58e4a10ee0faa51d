//! Raw text to llm.c shards, streaming, and `prepare.json` beside them (`manifest`).
//!
//! A reader thread walks the inputs ([`DocReader`]) and cuts the documents into chunks; worker
//! threads tokenize chunks; the calling thread writes the chunks in input order into the train
//! and val shards (`writer`). At most `in_flight_bytes` (default [`IN_FLIGHT_BYTES`]) of text
//! are between reading and writing, so memory does not grow with the corpus, and since
//! documents are numbered by the reader and written in order, the shards are the same bytes
//! whatever the number of threads. Each document is preceded by the end-of-text token; whether
//! it goes to val depends on a hash of its index and the seed (and, with `--val-docs`, on how
//! many went before), so appending inputs never moves a document between splits.
//!
//! After each completed shard, `prepare.partial.json` records where the completed shards end. A
//! rerun with the same recipe checks them, reads the inputs again without tokenizing the
//! documents they hold, and writes on: the shards and `prepare.json` come out byte for byte as
//! an uninterrupted run writes them.

mod manifest;
mod progress;
mod writer;

pub use manifest::{
    read_manifest, Manifest, Partial, Recipe, ShardEntry, Skipped, Split, SplitProgress,
    TokenizerId, MANIFEST, PARTIAL,
};

use super::inputs::{self, Bad, DocReader, InputFile, Item, ReadOptions, FIRST_LOCATIONS};
use super::shards;
use super::tokenizer::Tokenizer;
use super::DataError;
use crate::rng::splitmix64;
use manifest::{differences, is_our_shard, remove_if_exists, verify, write_json};
use progress::Progress;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;
use writer::ShardWriter;

/// Text (bytes) read but not yet written: the bound on memory, with the tokens it becomes.
pub const IN_FLIGHT_BYTES: usize = 128 << 20;
/// Tokenizing threads at most: each holds its own tokenizer and chunk of text in flight.
const MAX_THREADS: usize = 1024;

/// Documents are handed to the tokenizing threads in chunks of about this much text.
const CHUNK_BYTES: usize = 1 << 20;
/// `--val-docs N`: documents are held out at this rate (by the hash of their index) until N are.
pub const VAL_DOCS_RATE: f64 = 1.0 / 16.0;
/// Test hook: the process kills itself (SIGKILL) once this many shards are completed and
/// recorded, as an interrupted run would end.
const KILL_AFTER_SHARDS_ENV: &str = "MOTRAIN_FAULT_PREPARE_KILL_AFTER_SHARDS";

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub name: String,
    pub val: ValSplit,
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

/// Which documents are held out for val.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSplit {
    /// `--val-fraction F`: document i when `hash(i, seed)` falls below F.
    Fraction(f64),
    /// `--val-docs N`: document i when `hash(i, seed)` falls below [`VAL_DOCS_RATE`] and fewer
    /// than N documents are held out before it.
    Docs(u64),
}

impl ValSplit {
    /// The hash threshold.
    pub fn rate(self) -> f64 {
        match self {
            ValSplit::Fraction(f) => f,
            ValSplit::Docs(_) => VAL_DOCS_RATE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// The shards were already there, made by the same recipe, and were checked, not rewritten.
    pub up_to_date: bool,
    pub manifest: Manifest,
    pub files: Vec<PathBuf>,
    pub seconds: f64,
}

/// Whether document `index` hashes below `fraction` (with the seed): the val choice.
pub fn is_val(index: u64, seed: u64, fraction: f64) -> bool {
    let h = splitmix64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ splitmix64(index));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Decides the split of each document, visited in input order.
struct Splitter {
    seed: u64,
    val: ValSplit,
    taken: u64,
}

impl Splitter {
    fn is_val(&mut self, index: u64) -> bool {
        let under = is_val(index, self.seed, self.val.rate());
        let chosen = match self.val {
            ValSplit::Fraction(_) => under,
            ValSplit::Docs(n) => under && self.taken < n,
        };
        self.taken += chosen as u64;
        chosen
    }
}

pub fn prepare(
    tok: &Tokenizer, tok_spec: &str, inputs: &[PathBuf], out: &Path, opts: &PrepareOptions,
) -> Result<PrepareReport, DataError> {
    check_options(opts)?;
    let start = Instant::now();
    let files = inputs::discover(inputs)?;
    let recipe = recipe(tok, tok_spec, &files, opts)?;
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    let from = match existing_output(out, &recipe, opts)? {
        Existing::UpToDate(manifest, files) => {
            let seconds = start.elapsed().as_secs_f64();
            return Ok(PrepareReport { up_to_date: true, manifest, files, seconds });
        }
        Existing::Unfinished(partial) => {
            say_resumed(out, &partial);
            [partial.train, partial.val]
        }
        Existing::Nothing => Default::default(),
    };
    let wide = shards::is_wide(tok.vocab_size());
    let [train, val] = from;
    let writers = [
        ShardWriter::new(out, &opts.name, "train", opts.shard_tokens, wide, train),
        ShardWriter::new(out, &opts.name, "val", opts.shard_tokens, wide, val),
    ];
    let total_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let run = Pipeline { tok, opts, out, recipe: &recipe, total_bytes };
    let (writers, skipped) = run.run(files, writers)?;
    let [train, val] = writers;
    let documents = Split { train: train.documents, val: val.documents };
    // Inputs with no text at all (bad records skipped on request are reported instead).
    if documents.train + documents.val == 0 && skipped.is_empty() {
        return Err(DataError::Invalid(format!(
            "the inputs hold no documents: nothing to write (is --text-field {:?} right?)",
            opts.read.text_field
        )));
    }
    let tokens = Split { train: train.total, val: val.total };
    let mut entries = train.finish()?;
    entries.extend(val.finish()?);
    let files = entries.iter().map(|e| out.join(&e.file)).collect();
    let manifest = Manifest::new(recipe, documents, tokens, skipped, entries);
    write_json(&out.join(MANIFEST), &manifest)?;
    remove_if_exists(&out.join(PARTIAL))?;
    Ok(PrepareReport { up_to_date: false, manifest, files, seconds: start.elapsed().as_secs_f64() })
}

fn check_options(opts: &PrepareOptions) -> Result<(), DataError> {
    if let ValSplit::Fraction(f) = opts.val {
        if !(0.0..1.0).contains(&f) {
            return Err(DataError::Invalid(format!("--val-fraction must be in [0, 1), got {f}")));
        }
    }
    if opts.shard_tokens == 0 || opts.shard_tokens > i32::MAX as usize {
        return Err(DataError::Invalid(format!(
            "--shard-tokens must be in 1..={}, got {}",
            i32::MAX,
            opts.shard_tokens
        )));
    }
    if opts.read.text_field.is_empty() {
        return Err(DataError::Invalid("--text-field must name a field".into()));
    }
    if opts.threads > MAX_THREADS {
        return Err(DataError::Invalid(format!(
            "--threads must be at most {MAX_THREADS}, got {}",
            opts.threads
        )));
    }
    if opts.name.is_empty() || opts.name.contains(['/', '\\']) {
        return Err(DataError::Invalid(format!(
            "--name {:?} must be a non-empty file name prefix",
            opts.name
        )));
    }
    Ok(())
}

fn recipe(
    tok: &Tokenizer, tok_spec: &str, files: &[InputFile], opts: &PrepareOptions,
) -> Result<Recipe, DataError> {
    let mut recorded = files.to_vec();
    for f in &mut recorded {
        f.path = std::fs::canonicalize(&f.path).map_err(|e| DataError::io(&f.path, e))?;
    }
    Ok(Recipe {
        inputs: recorded,
        tokenizer: TokenizerId {
            spec: tok_spec.to_string(),
            sha256: super::tokenizer::fingerprint(tok_spec)?,
            vocab_size: tok.vocab_size(),
            eot: tok.eot(),
        },
        name: opts.name.clone(),
        val_fraction: opts.val.rate(),
        val_docs: match opts.val {
            ValSplit::Docs(n) => Some(n),
            ValSplit::Fraction(_) => None,
        },
        seed: opts.seed,
        shard_tokens: opts.shard_tokens,
        text_field: opts.read.text_field.clone(),
        on_bad_record: opts.read.on_bad.name().to_string(),
    })
}

/// What an earlier prepare left in `--out`.
enum Existing {
    /// Complete, by the same recipe, and its shards check out.
    UpToDate(Manifest, Vec<PathBuf>),
    /// Interrupted, by the same recipe: its completed shards check out and are kept.
    Unfinished(Partial),
    /// Nothing to keep (any shards of this name have been removed).
    Nothing,
}

/// Looks at what an earlier prepare left in `out`: complete output of the same recipe is
/// verified and kept, unfinished output of the same recipe is verified and continued, output of
/// another recipe is an error unless `--overwrite`; whatever is not kept is removed, so a glob
/// never mixes two runs' shards.
fn existing_output(
    out: &Path, recipe: &Recipe, opts: &PrepareOptions,
) -> Result<Existing, DataError> {
    let (manifest_path, partial_path) = (out.join(MANIFEST), out.join(PARTIAL));
    let recorded = manifest_path.exists() || partial_path.exists();
    let mut stale: Vec<ShardEntry> = Vec::new();
    if manifest_path.exists() {
        let old = manifest::read_manifest(&manifest_path)?;
        if old.recipe == *recipe {
            match verify(out, old.shards.iter(), false) {
                Ok(files) => {
                    remove_if_exists(&partial_path)?;
                    return Ok(Existing::UpToDate(old, files));
                }
                Err(why) => eprintln!(
                    "note: {} lists shards that do not check out ({why}); preparing them again",
                    manifest_path.display()
                ),
            }
        } else if !opts.overwrite {
            return Err(other_recipe(&manifest_path, "was written", &old.recipe, recipe));
        }
        stale.extend(old.shards);
        remove_if_exists(&manifest_path)?;
    }
    let mut kept = None;
    if partial_path.exists() {
        let old = manifest::read_partial(&partial_path)?;
        let keep = if old.recipe == *recipe {
            let checked = verify(out, old.shards(), true);
            if let Err(why) = &checked {
                eprintln!(
                    "note: {} lists shards that do not check out ({why}); preparing from the start",
                    partial_path.display()
                );
            }
            checked.is_ok()
        } else if opts.overwrite {
            false
        } else {
            let what = "records an unfinished prepare";
            return Err(other_recipe(&partial_path, what, &old.recipe, recipe));
        };
        if keep {
            kept = Some(old);
        } else {
            stale.extend(old.shards().cloned());
            remove_if_exists(&partial_path)?;
        }
    }
    for s in &stale {
        remove_if_exists(&out.join(&s.file))?;
    }
    // Other shards of this name are from a run interrupted after its last record (or before
    // its first): they would be mixed with the new ones by a glob, so they go.
    // Without a record of ours in `out`, they may be anyone's: only --overwrite removes them.
    let keep: HashSet<&str> = kept.iter().flat_map(Partial::shards).map(|s| &*s.file).collect();
    let mut doomed = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| DataError::io(out, e))? {
        let path = entry.map_err(|e| DataError::io(out, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if is_our_shard(&path, &opts.name) && !keep.contains(&*name) {
            doomed.push(path);
        }
    }
    if !recorded && !opts.overwrite && !doomed.is_empty() {
        doomed.sort();
        return Err(DataError::Invalid(format!(
            "{} already holds shards named {}_* ({}) that no {MANIFEST} lists; pass --overwrite to replace them (for instance after an interrupted prepare), or choose another --out or --name",
            out.display(),
            opts.name,
            doomed[0].file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    for path in doomed {
        remove_if_exists(&path)?;
    }
    Ok(kept.map_or(Existing::Nothing, Existing::Unfinished))
}

fn other_recipe(path: &Path, what: &str, old: &Recipe, new: &Recipe) -> DataError {
    DataError::Invalid(format!(
        "{} {what} with other inputs or options (differing: {}); pass --overwrite to replace those shards, or choose another --out",
        path.display(),
        differences(old, new)
    ))
}

fn say_resumed(out: &Path, p: &Partial) {
    let tokens: u64 = p.shards().map(|s| s.tokens).sum();
    let at = |s: &SplitProgress| match s.next_doc_tokens {
        0 => format!("document {}", s.next_doc),
        n => format!("document {} ({n} tokens in)", s.next_doc),
    };
    eprintln!(
        "resuming the unfinished prepare in {}: {} train and {} val shards ({tokens} tokens) checked and kept; \
         continuing at train {} and val {}; earlier documents are read again, not tokenized",
        out.display(),
        p.train.shards.len(),
        p.val.shards.len(),
        at(&p.train),
        at(&p.val)
    );
}

/// The reader, the tokenizing threads and the ordered writer of one run.
struct Pipeline<'a> {
    tok: &'a Tokenizer,
    opts: &'a PrepareOptions,
    out: &'a Path,
    recipe: &'a Recipe,
    total_bytes: u64,
}

type Writers = [ShardWriter; 2];

impl Pipeline<'_> {
    /// Streams `files` through the writers; returns them (not yet finished) and the bad records
    /// skipped.
    fn run(
        &self, files: Vec<InputFile>, mut writers: Writers,
    ) -> Result<(Writers, BTreeMap<String, Skipped>), DataError> {
        let opts = self.opts;
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let tokenizers: Vec<Tokenizer> =
            (0..threads).map(|_| self.tok.for_thread()).collect::<Result<_, _>>()?;
        let reader = DocReader::new(files, opts.read.clone());
        let budget = Budget::new(opts.in_flight_bytes.max(1));
        let resume = [writers[0].progress.next_doc, writers[1].progress.next_doc];
        let mut progress = Progress::new(opts.progress, self.total_bytes);
        let (chunk_tx, chunk_rx) = mpsc::channel::<Chunk>();
        let chunk_rx = Mutex::new(chunk_rx);
        let (enc_tx, enc_rx) = mpsc::channel::<Result<Encoded, DataError>>();
        let (read_result, write_result) = std::thread::scope(|s| {
            let budget = &budget;
            let reading = s.spawn(move || read_chunks(reader, chunk_tx, budget, opts, resume));
            for tok in tokenizers {
                let enc_tx = enc_tx.clone();
                let chunk_rx = &chunk_rx;
                s.spawn(move || loop {
                    let next = chunk_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok(chunk)) = next else { break };
                    if enc_tx.send(encode(&tok, chunk)).is_err() {
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
                        self.write(&mut writers, &enc)?;
                        budget.release(enc.bytes);
                        progress.update(
                            enc.read_to,
                            writers[0].documents + writers[1].documents,
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
                reading.join().unwrap_or_else(|_| {
                    Err(DataError::Invalid("the input reader panicked".into()))
                }),
                write_result,
            )
        });
        progress.finish();
        match (read_result, write_result) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(skipped), Ok(())) => Ok((writers, skipped)),
        }
    }

    /// Writes one chunk's tokens, then records the completed shards if there are new ones.
    fn write(&self, writers: &mut Writers, enc: &Encoded) -> Result<(), DataError> {
        let mut at = [0usize; 2];
        for span in &enc.spans {
            let tokens = &enc.tokens[span.split][at[span.split]..at[span.split] + span.len];
            writers[span.split].push(span.doc, span.starts, tokens)?;
            at[span.split] += span.len;
        }
        let completed = [writers[0].take_completed(), writers[1].take_completed()];
        if completed.contains(&true) {
            let partial = Partial::new(self.recipe, &writers[0].progress, &writers[1].progress);
            write_json(&self.out.join(PARTIAL), &partial)?;
            kill_if_asked(partial.shards().count());
        }
        Ok(())
    }
}

/// The test hook of [`KILL_AFTER_SHARDS_ENV`].
fn kill_if_asked(completed: usize) {
    let at = std::env::var(KILL_AFTER_SHARDS_ENV).ok().and_then(|v| v.parse::<usize>().ok());
    if at.is_some_and(|n| completed >= n) {
        // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL cannot be caught.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Documents for the tokenizing threads, numbered so the writer can put them back in order.
struct Chunk {
    seq: u64,
    docs: Vec<Piece>,
    bytes: usize,
    /// Input bytes read when the chunk was complete: progress counts what is written, not what
    /// the reader has run ahead to.
    read_to: u64,
}

/// A document, or a piece of a long one.
struct Piece {
    text: String,
    /// The document's index among all kept documents, in input order.
    doc: u64,
    starts: bool,
    val: bool,
}

struct Encoded {
    seq: u64,
    /// Train and val tokens.
    tokens: [Vec<u32>; 2],
    /// The pieces' tokens, in order, each a run of `tokens[split]`.
    spans: Vec<Span>,
    bytes: usize,
    read_to: u64,
}

struct Span {
    doc: u64,
    starts: bool,
    split: usize,
    len: usize,
}

fn encode(tok: &Tokenizer, chunk: Chunk) -> Result<Encoded, DataError> {
    let mut out = Encoded {
        seq: chunk.seq,
        tokens: [Vec::new(), Vec::new()],
        spans: Vec::with_capacity(chunk.docs.len()),
        bytes: chunk.bytes,
        read_to: chunk.read_to,
    };
    for p in chunk.docs {
        let split = p.val as usize;
        let dst = &mut out.tokens[split];
        let before = dst.len();
        if p.starts {
            dst.push(tok.eot());
        }
        dst.extend(tok.encode(&p.text)?);
        out.spans.push(Span { doc: p.doc, starts: p.starts, split, len: dst.len() - before });
    }
    Ok(out)
}

/// The reader thread: documents to chunks, the split of each decided by its index; returns the
/// bad records it skipped. A document of split s before `resume[s]` is in completed shards of
/// the run being resumed: it is read (to count documents and bad records) but not sent.
fn read_chunks(
    reader: DocReader, tx: mpsc::Sender<Chunk>, budget: &Budget, opts: &PrepareOptions,
    resume: [u64; 2],
) -> Result<BTreeMap<String, Skipped>, DataError> {
    let mut skipped: BTreeMap<String, Skipped> = BTreeMap::new();
    let read = reader.bytes_read.clone();
    let mut chunk = Chunk { seq: 0, docs: Vec::new(), bytes: 0, read_to: 0 };
    let mut splitter = Splitter { seed: opts.seed, val: opts.val, taken: 0 };
    let (mut next, mut doc, mut val) = (0u64, 0u64, false);
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
                    (doc, val) = (next, splitter.is_val(next));
                    next += 1;
                }
                if doc < resume[val as usize] {
                    continue;
                }
                chunk.bytes += d.text.len();
                chunk.docs.push(Piece { text: d.text, doc, starts: d.starts, val });
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
