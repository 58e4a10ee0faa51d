//! Raw-text inputs: which files `--input` names (files, directories, globs), what each holds
//! (`.txt`, `.jsonl`, `.parquet`, each optionally `.gz` or `.zst`), and one streaming reader of
//! their documents, each with the place it came from, that `prepare` and `tokenizer train` share.
//! Problems with single records are reported as [`Bad`] items; problems with a whole file (a
//! corrupt compressed stream, an unreadable Parquet footer or row group) end the read with an
//! error unless the caller asked to skip them.

use super::columnar::{inflate_to_temp, ParquetSource};
use super::json_field::{json_field, Field};
pub use super::records::{Bad, BadKind, Doc, Item};
use super::DataError;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A `.txt` file is one document, read in pieces of about this many bytes (cut at a line end)
/// so that a large file never sits in memory whole.
pub const PIECE_BYTES: usize = 1 << 20;
/// A longer line (a `.jsonl` record, or a `.txt` line) is a bad record of kind `too_long`: it
/// bounds memory for inputs with no line breaks.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// Locations kept per kind of bad record.
pub const FIRST_LOCATIONS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Jsonl,
    Parquet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputFile {
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time in nanoseconds since the Unix epoch (0 where the platform has none).
    pub mtime_ns: u64,
}

impl InputFile {
    pub fn kind(&self) -> (Format, Compression) {
        kind_of(&self.path)
    }
}

/// The format and compression a file name says, e.g. `a.jsonl.zst`; an unknown extension is
/// plain text, as a file named on the command line always was.
pub fn kind_of(path: &Path) -> (Format, Compression) {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst").or_else(|| name.strip_suffix(".zstd")) {
        (s, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    let format = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
        Format::Jsonl
    } else if stem.ends_with(".parquet") {
        Format::Parquet
    } else {
        Format::Text
    };
    (format, compression)
}

/// Whether a file found inside a directory is an input: `.txt`, `.jsonl` (`.ndjson`) or
/// `.parquet`, optionally `.gz`/`.zst`. Other files there (READMEs, shards, manifests) are not.
fn is_corpus_file(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let stem = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .or_else(|| name.strip_suffix(".zstd"))
        .unwrap_or(&name);
    [".txt", ".jsonl", ".ndjson", ".parquet"].iter().any(|e| stem.ends_with(e))
}

/// The input files `--input` names, in order: a file as given (whatever its extension); a
/// directory as its corpus files (see [`is_corpus_file`]), recursively, sorted by path, hidden
/// entries skipped; a path that does not exist but holds `*`, `?` or `[` as a glob, its matches
/// sorted and each taken as a file or directory. A file named twice is read once.
pub fn discover(inputs: &[PathBuf]) -> Result<Vec<InputFile>, DataError> {
    let mut paths = Vec::new();
    for input in inputs {
        let text = input.to_string_lossy();
        if !input.exists() && text.contains(['*', '?', '[']) {
            let matches = glob::glob(&text).map_err(|e| DataError::Glob {
                pattern: text.to_string(),
                message: e.to_string(),
            })?;
            let mut found: Vec<PathBuf> = matches.filter_map(|p| p.ok()).collect();
            found.sort();
            if found.is_empty() {
                return Err(DataError::Glob {
                    pattern: text.to_string(),
                    message: "no files match".into(),
                });
            }
            for p in found {
                add_path(&p, &mut paths)?;
            }
        } else if input.exists() {
            add_path(input, &mut paths)?;
        } else {
            return Err(DataError::Invalid(format!(
                "{}: no such file, directory or matching glob",
                input.display()
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(p.clone()));
    if paths.is_empty() {
        return Err(DataError::Invalid(
            "--input names no corpus files (directories are searched for .txt, .jsonl, .parquet, optionally .gz/.zst)".into(),
        ));
    }
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            Ok(InputFile { path, bytes: meta.len(), mtime_ns })
        })
        .collect()
}

fn add_path(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    if path.is_dir() {
        let mut found = Vec::new();
        walk(path, &mut found)?;
        found.sort();
        out.extend(found);
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() && is_corpus_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// `--on-bad-record`: `skip` or `fail` for every problem; when not given, records are skipped
/// and a truncated or corrupt file fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBad {
    Default,
    Skip,
    Fail,
}

impl OnBad {
    pub fn parse(s: Option<&str>) -> Result<OnBad, DataError> {
        match s {
            None => Ok(OnBad::Default),
            Some("skip") => Ok(OnBad::Skip),
            Some("fail") => Ok(OnBad::Fail),
            Some(other) => {
                Err(DataError::Invalid(format!("--on-bad-record {other:?}: expected skip or fail")))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OnBad::Default => "default",
            OnBad::Skip => "skip",
            OnBad::Fail => "fail",
        }
    }

    fn skips(self, kind: BadKind) -> bool {
        match self {
            OnBad::Default => !kind.is_file_level(),
            OnBad::Skip => true,
            OnBad::Fail => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// The JSON field or Parquet column holding the text (a dotted path names a nested column).
    pub text_field: String,
    pub on_bad: OnBad,
}

/// Streams the documents of the input files in order. `bytes_read` counts the bytes taken from
/// disk (compressed bytes for compressed files), for progress.
pub struct DocReader {
    files: Vec<InputFile>,
    next_file: usize,
    opts: ReadOptions,
    source: Option<Source>,
    pending: VecDeque<Item>,
    pub bytes_read: Arc<AtomicU64>,
}

enum Source {
    Lines {
        path: PathBuf,
        format: Format,
        reader: Box<dyn BufRead + Send>,
        line: u64,
        buf: Vec<u8>,
        piece: String,
        started: bool,
    },
    Parquet(Box<ParquetSource>),
}

impl DocReader {
    pub fn new(files: Vec<InputFile>, opts: ReadOptions) -> DocReader {
        DocReader {
            files,
            next_file: 0,
            opts,
            source: None,
            pending: VecDeque::new(),
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }

    fn open_next(&mut self) -> Result<bool, DataError> {
        let Some(file) = self.files.get(self.next_file).cloned() else {
            return Ok(false);
        };
        self.next_file += 1;
        let (format, compression) = file.kind();
        let path = file.path.clone();
        let raw = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let counted = Counted { inner: raw, count: self.bytes_read.clone() };
        let reader: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(counted),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                BufReader::with_capacity(1 << 16, counted),
            )),
            Compression::Zstd => match zstd::stream::read::Decoder::new(counted) {
                Ok(d) => Box::new(d),
                Err(e) => {
                    let item = check(
                        self.opts.on_bad,
                        Bad {
                            kind: BadKind::CorruptFile,
                            location: path.display().to_string(),
                            detail: format!("zstd: {e}"),
                            records: 0,
                        },
                    )?;
                    self.pending.push_back(item);
                    return Ok(true);
                }
            },
        };
        match format {
            Format::Parquet => {
                // Parquet needs random access: a compressed one is inflated to a temporary file.
                let (handle, temp) = if compression == Compression::None {
                    drop(reader);
                    (std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?, None)
                } else {
                    match inflate_to_temp(reader) {
                        Ok((f, t)) => (f, Some(t)),
                        Err(e) => {
                            let item = check(
                                self.opts.on_bad,
                                Bad {
                                    kind: BadKind::CorruptFile,
                                    location: path.display().to_string(),
                                    detail: e.to_string(),
                                    records: 0,
                                },
                            )?;
                            self.pending.push_back(item);
                            return Ok(true);
                        }
                    }
                };
                match ParquetSource::open(&path, handle, temp, &self.opts.text_field) {
                    Ok((src, early)) => {
                        for b in early {
                            let item = check(self.opts.on_bad, b)?;
                            self.pending.push_back(item);
                        }
                        if let Some(src) = src {
                            self.source = Some(Source::Parquet(Box::new(src)));
                        }
                    }
                    Err(b) => {
                        let item = check(self.opts.on_bad, b)?;
                        self.pending.push_back(item);
                    }
                }
                if compression == Compression::None {
                    self.bytes_read.fetch_add(file.bytes, Ordering::Relaxed);
                }
            }
            Format::Text | Format::Jsonl => {
                let reader = Box::new(BufReader::with_capacity(1 << 20, reader));
                self.source = Some(Source::Lines {
                    path,
                    format,
                    reader,
                    line: 0,
                    buf: Vec::new(),
                    piece: String::new(),
                    started: false,
                });
            }
        }
        Ok(true)
    }

    /// The next item of the current source, `None` when it is exhausted.
    fn step(&mut self) -> Result<Option<Item>, DataError> {
        let on_bad = self.opts.on_bad;
        let Some(source) = self.source.as_mut() else {
            return Ok(None);
        };
        match source {
            Source::Parquet(p) => loop {
                match p.next_batch() {
                    Ok(true) => {
                        for it in std::mem::take(&mut p.items) {
                            let it = match it {
                                Item::Bad(b) => check(on_bad, b)?,
                                doc => doc,
                            };
                            self.pending.push_back(it);
                        }
                        if let Some(it) = self.pending.pop_front() {
                            return Ok(Some(it));
                        }
                    }
                    Ok(false) => return Ok(None),
                    Err(b) => return check(on_bad, b).map(Some),
                }
            },
            Source::Lines { path, format, reader, line, buf, piece, started } => loop {
                let at = |line: u64| format!("{}:{line}", path.display());
                match read_line(reader.as_mut(), buf, MAX_LINE_BYTES) {
                    Err(e) => {
                        let b = Bad {
                            kind: BadKind::CorruptFile,
                            location: at(*line + 1),
                            detail: describe_stream_error(&e),
                            records: 0,
                        };
                        let item = check(on_bad, b)?;
                        // Skipping: the lines read before the damage stand, the rest of the file
                        // is lost.
                        if *format == Format::Text && (!piece.is_empty() || !*started) {
                            self.pending.push_back(item);
                            let doc = Doc { text: std::mem::take(piece), starts: !*started };
                            self.source = None;
                            return Ok(Some(Item::Doc(doc)));
                        }
                        self.source = None;
                        return Ok(Some(item));
                    }
                    Ok(None) => {
                        if *format == Format::Text && (!*started || !piece.is_empty()) {
                            let doc = Doc { text: std::mem::take(piece), starts: !*started };
                            *started = true;
                            return Ok(Some(Item::Doc(doc)));
                        }
                        return Ok(None);
                    }
                    Ok(Some(complete)) => {
                        *line += 1;
                        if !complete {
                            let detail = format!("line longer than {} MiB", MAX_LINE_BYTES >> 20);
                            return check(
                                on_bad,
                                Bad {
                                    kind: BadKind::TooLong,
                                    location: at(*line),
                                    detail,
                                    records: 1,
                                },
                            )
                            .map(Some);
                        }
                        let text = match std::str::from_utf8(buf) {
                            Ok(t) => t,
                            Err(e) => {
                                let detail = format!(
                                    "invalid UTF-8 at byte {} of the line",
                                    e.valid_up_to()
                                );
                                return check(
                                    on_bad,
                                    Bad {
                                        kind: BadKind::InvalidUtf8,
                                        location: at(*line),
                                        detail,
                                        records: 1,
                                    },
                                )
                                .map(Some);
                            }
                        };
                        if *format == Format::Text {
                            piece.push_str(text);
                            if piece.len() >= PIECE_BYTES {
                                let doc = Doc { text: std::mem::take(piece), starts: !*started };
                                *started = true;
                                return Ok(Some(Item::Doc(doc)));
                            }
                            continue;
                        }
                        if text.trim().is_empty() {
                            continue;
                        }
                        let field = &self.opts.text_field;
                        let b = |kind, detail: String| Bad {
                            kind,
                            location: at(*line),
                            detail,
                            records: 1,
                        };
                        let item = match json_field(text, field) {
                            Ok(Field::Text(t)) => Item::Doc(Doc { text: t, starts: true }),
                            Ok(Field::Missing) => check(
                                on_bad,
                                b(BadKind::MissingField, format!("no field {field:?}")),
                            )?,
                            Ok(Field::NotAString(v)) => check(
                                on_bad,
                                b(
                                    BadKind::NotAString,
                                    format!("field {field:?} is {v}, not a string"),
                                ),
                            )?,
                            Err(e) => check(on_bad, b(BadKind::MalformedJson, e))?,
                        };
                        return Ok(Some(item));
                    }
                }
            },
        }
    }
}

/// A bad item, or the error that ends the read when the policy says fail.
fn check(on_bad: OnBad, b: Bad) -> Result<Item, DataError> {
    if on_bad.skips(b.kind) {
        Ok(Item::Bad(b))
    } else {
        let hint = if b.kind.is_file_level() {
            "--on-bad-record skip reads past it"
        } else {
            "--on-bad-record skip skips such records"
        };
        Err(DataError::BadRecord {
            location: b.location,
            message: format!("{}: {} ({hint})", b.kind.name(), b.detail),
        })
    }
}

impl Iterator for DocReader {
    type Item = Result<Item, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.source.is_some() {
                match self.step() {
                    Ok(Some(item)) => return Some(Ok(item)),
                    Ok(None) => self.source = None,
                    Err(e) => {
                        self.source = None;
                        self.next_file = self.files.len();
                        return Some(Err(e));
                    }
                }
                continue;
            }
            match self.open_next() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    self.next_file = self.files.len();
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Counts the bytes read from disk.
struct Counted {
    inner: std::fs::File,
    count: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads one line (without its `\n`, or `\r\n`) into `buf`: `None` at the end of the input,
/// `Some(false)` when the line is longer than `max` (it is consumed, `buf` holds its start).
fn read_line(r: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(!too_long))
}

fn describe_stream_error(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        format!("truncated compressed stream ({e})")
    } else {
        format!("corrupt compressed stream ({e})")
    }
}
