//! One split's shards, streamed: tokens go to a temporary file whose header is written when the
//! shard is full (or the input ends), then it is synced and renamed into place. The writer
//! knows which document each token belongs to, so after every completed shard it can say where
//! the completed shards end ([`SplitProgress`]) — and, resumed from that, it drops the tokens
//! those shards already hold.

use super::super::{shards, DataError};
use super::manifest::{ShardEntry, SplitProgress};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

pub struct ShardWriter {
    dir: PathBuf,
    name: String,
    pub split: &'static str,
    cap: usize,
    wide: bool,
    open: Option<(std::io::BufWriter<std::fs::File>, PathBuf)>,
    in_shard: usize,
    /// The completed shards and where they end.
    pub progress: SplitProgress,
    /// Tokens written, in completed shards and the open one.
    pub total: u64,
    /// Documents of this split begun.
    pub documents: u64,
    /// The document being written (its index among all documents) and its tokens so far.
    doc: u64,
    doc_tokens: u64,
    /// Where the shards of the run this one resumes end: those tokens are not written again.
    resumed_at: (u64, u64),
    /// Shards completed since [`ShardWriter::take_completed`] was last asked.
    completed: bool,
    bytes: Vec<u8>,
}

impl ShardWriter {
    /// A writer that continues after the completed shards of `from` (default: from nothing).
    pub fn new(
        dir: &Path, name: &str, split: &'static str, cap: usize, wide: bool, from: SplitProgress,
    ) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            split,
            cap,
            wide,
            open: None,
            in_shard: 0,
            total: from.shards.iter().map(|s| s.tokens).sum(),
            documents: from.documents,
            doc: 0,
            doc_tokens: 0,
            resumed_at: (from.next_doc, from.next_doc_tokens),
            completed: false,
            bytes: Vec::new(),
            progress: from,
        }
    }

    fn path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{}_{}_{index:06}.bin", self.name, self.split))
    }

    /// Writes the tokens of a piece of document `doc` (`starts`: its first piece, end-of-text
    /// token first).
    pub fn push(&mut self, doc: u64, starts: bool, mut tokens: &[u32]) -> Result<(), DataError> {
        if starts {
            (self.doc, self.doc_tokens) = (doc, 0);
            self.documents += 1;
        }
        let (resume_doc, resume_tokens) = self.resumed_at;
        if doc == resume_doc && self.doc_tokens < resume_tokens {
            let done = (resume_tokens - self.doc_tokens).min(tokens.len() as u64);
            self.doc_tokens += done;
            tokens = &tokens[done as usize..];
        }
        while !tokens.is_empty() {
            if self.open.is_none() {
                self.open_shard()?;
            }
            let take = tokens.len().min(self.cap - self.in_shard);
            self.write(&tokens[..take])?;
            self.in_shard += take;
            self.total += take as u64;
            self.doc_tokens += take as u64;
            tokens = &tokens[take..];
            if self.in_shard == self.cap {
                self.close()?;
                self.progress.next_doc = self.doc;
                self.progress.next_doc_tokens = self.doc_tokens;
                self.progress.documents = self.documents - 1;
            }
        }
        Ok(())
    }

    /// Whether a shard was completed since the last call.
    pub fn take_completed(&mut self) -> bool {
        std::mem::take(&mut self.completed)
    }

    fn open_shard(&mut self) -> Result<(), DataError> {
        let tmp = self.path(self.progress.shards.len()).with_extension("bin.tmp");
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?,
        );
        f.write_all(&[0u8; shards::HEADER_BYTES]).map_err(|e| DataError::io(&tmp, e))?;
        self.open = Some((f, tmp));
        self.in_shard = 0;
        Ok(())
    }

    fn write(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        self.bytes.clear();
        for &t in tokens {
            if self.wide {
                self.bytes.extend_from_slice(&t.to_le_bytes());
            } else {
                self.bytes.extend_from_slice(&(t as u16).to_le_bytes());
            }
        }
        let (f, tmp) = self.open.as_mut().expect("a shard is open");
        f.write_all(&self.bytes).map_err(|e| DataError::io(tmp, e))
    }

    fn close(&mut self) -> Result<(), DataError> {
        let Some((f, tmp)) = self.open.take() else {
            return Ok(());
        };
        let path = self.path(self.progress.shards.len());
        let mut file = f.into_inner().map_err(|e| DataError::io(&tmp, e.into_error()))?;
        let header = shards::header(&path, self.in_shard, self.wide)?;
        file.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.sync_all())
            .map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
        let digest = crate::digest::digest_file(&path).map_err(|e| DataError::io(&path, e))?;
        self.progress.shards.push(ShardEntry {
            file: path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            split: self.split.to_string(),
            tokens: self.in_shard as u64,
            xxh3: Some(digest),
        });
        self.completed = true;
        Ok(())
    }

    /// Closes the last shard; the split's shards, in order.
    pub fn finish(mut self) -> Result<Vec<ShardEntry>, DataError> {
        self.close()?;
        Ok(std::mem::take(&mut self.progress.shards))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some((_, tmp)) = self.open.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
