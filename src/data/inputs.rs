//! Raw-text inputs: which files `--input` names (files, directories, globs), what each holds
//! (`.txt`, `.jsonl`, `.parquet`, each optionally `.gz` or `.zst`), and one streaming reader of
//! their documents, each with the place it came from, that `prepare` and `tokenizer train` share.
//! Problems with single records are reported as [`Bad`] items; problems with a whole file (a
//! corrupt compressed stream, an unreadable Parquet footer or row group) end the read with an
//! error unless the caller asked to skip them.

use super::DataError;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
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

/// What can be wrong with one record, or (the last three) with a whole file or part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BadKind {
    InvalidUtf8,
    MalformedJson,
    MissingField,
    NotAString,
    TooLong,
    CorruptFile,
    UnreadableRowGroup,
}

impl BadKind {
    pub fn name(self) -> &'static str {
        match self {
            BadKind::InvalidUtf8 => "invalid_utf8",
            BadKind::MalformedJson => "malformed_json",
            BadKind::MissingField => "missing_field",
            BadKind::NotAString => "not_a_string",
            BadKind::TooLong => "too_long",
            BadKind::CorruptFile => "corrupt_file",
            BadKind::UnreadableRowGroup => "unreadable_row_group",
        }
    }

    /// Damage to a file rather than one bad record.
    pub fn is_file_level(self) -> bool {
        matches!(self, BadKind::CorruptFile | BadKind::UnreadableRowGroup)
    }
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

/// A skipped record (or, for file-level kinds, the records lost with the damaged part).
#[derive(Debug, Clone, PartialEq)]
pub struct Bad {
    pub kind: BadKind,
    /// `file:line` (1-based) for line-based files, `file:row N` (0-based) or `file:row group N`
    /// for Parquet, `file` alone for a file that could not be opened as its format.
    pub location: String,
    pub detail: String,
    /// Records this covers: 1, or the rows of a Parquet file without the column.
    pub records: u64,
}

/// One document, or one piece of a long `.txt` document (`starts == false` for the pieces that
/// continue it).
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub text: String,
    pub starts: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Doc(Doc),
    Bad(Bad),
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

enum Field {
    Text(String),
    Missing,
    NotAString(&'static str),
}

/// The string field `name` of a JSON object, ignoring (without building) every other field.
fn json_field(line: &str, name: &str) -> Result<Field, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let field = FieldSeed(name).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(field)
}

struct FieldSeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Field;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Field;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        let mut out = Field::Missing;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.0))? {
            if is_field && matches!(out, Field::Missing) {
                out = match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(s) => Field::Text(s),
                    serde_json::Value::Null => Field::NotAString("null"),
                    serde_json::Value::Bool(_) => Field::NotAString("a boolean"),
                    serde_json::Value::Number(_) => Field::NotAString("a number"),
                    serde_json::Value::Array(_) => Field::NotAString("an array"),
                    serde_json::Value::Object(_) => Field::NotAString("an object"),
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// Deserializes a map key to whether it equals the wanted name, without allocating it.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// A compressed Parquet file inflated to a temporary file (removed on drop).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn inflate_to_temp(mut reader: Box<dyn Read + Send>) -> std::io::Result<(std::fs::File, TempFile)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "motrain-{}-{}.parquet",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = TempFile(path.clone());
    let mut out = std::fs::File::create(&path)?;
    std::io::copy(&mut reader, &mut out)?;
    drop(out);
    Ok((std::fs::File::open(&path)?, temp))
}

/// The text column of a Parquet file, read row group by row group in batches of rows.
struct ParquetSource {
    path: PathBuf,
    reader: parquet::file::serialized_reader::SerializedFileReader<std::fs::File>,
    column: usize,
    max_def: i16,
    row_group: usize,
    column_reader:
        Option<parquet::column::reader::ColumnReaderImpl<parquet::data_type::ByteArrayType>>,
    /// Rows of the current row group read so far, and rows of the file before it.
    rg_rows_done: u64,
    rows_before: u64,
    items: Vec<Item>,
    _temp: Option<TempFile>,
}

const PARQUET_BATCH: usize = 1024;

impl ParquetSource {
    /// The source, or none (with the bad items that say why) when the file has no usable column.
    fn open(
        path: &Path, file: std::fs::File, temp: Option<TempFile>, field: &str,
    ) -> Result<(Option<ParquetSource>, Vec<Bad>), Bad> {
        use parquet::file::reader::FileReader;
        let reader =
            parquet::file::serialized_reader::SerializedFileReader::new(file).map_err(|e| Bad {
                kind: BadKind::CorruptFile,
                location: path.display().to_string(),
                detail: format!("not a readable Parquet file: {e}"),
                records: 0,
            })?;
        let meta = reader.metadata();
        let rows = meta.file_metadata().num_rows().max(0) as u64;
        let schema = meta.file_metadata().schema_descr();
        let at = format!("{}:row 0", path.display());
        let Some(column) = schema.columns().iter().position(|c| c.path().string() == field) else {
            let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
            let detail = format!(
                "no column {field:?} (columns: {}); all {rows} rows skipped",
                names.join(", ")
            );
            return Ok((
                None,
                vec![Bad { kind: BadKind::MissingField, location: at, detail, records: rows }],
            ));
        };
        let descr = schema.column(column);
        if descr.physical_type() != parquet::basic::Type::BYTE_ARRAY || descr.max_rep_level() > 0 {
            let detail = format!(
                "column {field:?} is {:?}, not a string column; all {rows} rows skipped",
                descr.physical_type()
            );
            return Ok((
                None,
                vec![Bad { kind: BadKind::NotAString, location: at, detail, records: rows }],
            ));
        }
        let max_def = descr.max_def_level();
        Ok((
            Some(ParquetSource {
                path: path.to_path_buf(),
                reader,
                column,
                max_def,
                row_group: 0,
                column_reader: None,
                rg_rows_done: 0,
                rows_before: 0,
                items: Vec::new(),
                _temp: temp,
            }),
            Vec::new(),
        ))
    }

    /// Reads the next batch of rows into `items`: `Ok(false)` at the end of the file; an error
    /// for a row group that cannot be read (the rest of that row group is lost, the reader then
    /// goes on with the next one).
    fn next_batch(&mut self) -> Result<bool, Bad> {
        use parquet::file::reader::FileReader;
        loop {
            if self.column_reader.is_none() {
                if self.row_group >= self.reader.num_row_groups() {
                    return Ok(false);
                }
                let opened = self
                    .reader
                    .get_row_group(self.row_group)
                    .and_then(|rg| rg.get_column_reader(self.column));
                match opened {
                    Ok(parquet::column::reader::ColumnReader::ByteArrayColumnReader(r)) => {
                        self.column_reader = Some(r)
                    }
                    Ok(_) => {
                        // The schema said BYTE_ARRAY; a row group that disagrees is damaged.
                        let e = parquet::errors::ParquetError::General(
                            "column chunk is not BYTE_ARRAY".into(),
                        );
                        return Err(self.lose_row_group(e));
                    }
                    Err(e) => return Err(self.lose_row_group(e)),
                }
            }
            let mut defs = Vec::with_capacity(PARQUET_BATCH);
            let mut values = Vec::with_capacity(PARQUET_BATCH);
            let reader = self.column_reader.as_mut().expect("opened above");
            let read = reader.read_records(
                PARQUET_BATCH,
                (self.max_def > 0).then_some(&mut defs),
                None,
                &mut values,
            );
            let (records, _, _) = match read {
                Ok(r) => r,
                Err(e) => return Err(self.lose_row_group(e)),
            };
            if records == 0 {
                self.finish_row_group();
                continue;
            }
            let mut values = values.into_iter();
            for k in 0..records {
                let row = self.rows_before + self.rg_rows_done + k as u64;
                let at = || format!("{}:row {row}", self.path.display());
                // A required column has no definition levels: every row is present.
                let present = self.max_def == 0 || defs.get(k) == Some(&self.max_def);
                let item = match present.then(|| values.next()).flatten() {
                    None => Item::Bad(Bad {
                        kind: BadKind::NotAString,
                        location: at(),
                        detail: "null".into(),
                        records: 1,
                    }),
                    Some(v) => match String::from_utf8(v.data().to_vec()) {
                        Ok(text) => Item::Doc(Doc { text, starts: true }),
                        Err(e) => Item::Bad(Bad {
                            kind: BadKind::InvalidUtf8,
                            location: at(),
                            detail: format!(
                                "invalid UTF-8 at byte {}",
                                e.utf8_error().valid_up_to()
                            ),
                            records: 1,
                        }),
                    },
                };
                self.items.push(item);
            }
            self.rg_rows_done += records as u64;
            return Ok(true);
        }
    }

    fn finish_row_group(&mut self) {
        use parquet::file::reader::FileReader;
        let rows = self.reader.metadata().row_group(self.row_group).num_rows().max(0) as u64;
        self.rows_before += rows;
        self.rg_rows_done = 0;
        self.row_group += 1;
        self.column_reader = None;
    }

    fn lose_row_group(&mut self, e: parquet::errors::ParquetError) -> Bad {
        use parquet::file::reader::FileReader;
        let rows = self.reader.metadata().row_group(self.row_group).num_rows().max(0) as u64;
        let lost = rows.saturating_sub(self.rg_rows_done);
        let b = Bad {
            kind: BadKind::UnreadableRowGroup,
            location: format!("{}:row group {}", self.path.display(), self.row_group),
            detail: format!("{e}; {lost} rows lost"),
            records: lost,
        };
        self.finish_row_group();
        b
    }
}
