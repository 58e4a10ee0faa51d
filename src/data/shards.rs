//! llm.c token shards (and headerless nanoGPT `.bin`): reading with every check the format
//! allows, and writing.

use super::DataError;
use std::path::{Path, PathBuf};

pub const HEADER_BYTES: usize = 1024;
pub const MAGIC_U16: i32 = 20240520;
pub const MAGIC_U32: i32 = 20240801;

/// Tokens of one shard, memory-mapped, in their on-disk width.
pub struct Shard {
    pub path: PathBuf,
    map: memmap2::Mmap,
    offset: usize,
    width: usize,
    len: usize,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({}, {} tokens)", self.path.display(), self.len)
    }
}

impl Shard {
    /// Opens a shard and checks its header, its size and (when `vocab_size` is given) every id.
    pub fn open(path: &Path, format: &str, vocab_size: Option<usize>) -> Result<Shard, DataError> {
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        // SAFETY: shards are read-only inputs; a concurrent truncation would be a user error that
        // at worst raises SIGBUS, which mmap-based readers (llm.c, numpy) accept too.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        let bad = |msg: String| DataError::Shard { path: path.to_path_buf(), message: msg };
        let (offset, width, len) = if format == "nanogpt" {
            if map.len() % 2 != 0 {
                return Err(bad(format!(
                    "size {} is odd, but a nanoGPT .bin holds uint16 tokens",
                    map.len()
                )));
            }
            (0, 2, map.len() / 2)
        } else {
            if map.len() < HEADER_BYTES {
                return Err(bad(format!(
                    "{} bytes is shorter than the 1024-byte llm.c header",
                    map.len()
                )));
            }
            let h = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
            let width = match (h(0), h(1)) {
                (MAGIC_U16, 1) => 2,
                (MAGIC_U32, 7) => 4,
                (MAGIC_U16 | MAGIC_U32, v) => return Err(bad(format!("unsupported version {v} for magic {}", h(0)))),
                (m, _) => {
                    return Err(bad(format!(
                        "wrong magic {m}: expected {MAGIC_U16} (uint16) or {MAGIC_U32} (uint32) — is this an llm.c shard? (headerless files need data.format = \"nanogpt\")"
                    )))
                }
            };
            let count = h(2);
            if count < 0 {
                return Err(bad(format!("negative token count {count} in header")));
            }
            let expect = HEADER_BYTES as u64 + count as u64 * width as u64;
            if map.len() as u64 != expect {
                return Err(bad(format!(
                    "file is {} bytes but its header promises {count} tokens ({expect} bytes): truncated or corrupt",
                    map.len()
                )));
            }
            (HEADER_BYTES, width, count as usize)
        };
        let shard = Shard { path: path.to_path_buf(), map, offset, width, len };
        if let Some(v) = vocab_size {
            if let Some((i, id)) = shard.first_id_at_least(v) {
                return Err(bad(format!(
                    "token {i} has id {id}, which is not below model.vocab_size = {v}"
                )));
            }
        }
        Ok(shard)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let p = self.offset + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.map[p], self.map[p + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[p..p + 4].try_into().unwrap())
        }
    }

    /// Copies tokens `[start, start + out.len())` into `out`.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.get(start + k);
        }
    }

    fn first_id_at_least(&self, vocab: usize) -> Option<(usize, u32)> {
        (0..self.len).map(|i| (i, self.get(i))).find(|&(_, id)| id as usize >= vocab)
    }
}

/// Whether a vocabulary needs uint32 shards (ids above 65535).
pub fn is_wide(vocab_size: usize) -> bool {
    vocab_size > u16::MAX as usize + 1
}

/// The 1024-byte llm.c header of a shard of `count` tokens.
pub fn header(path: &Path, count: usize, wide: bool) -> Result<Vec<u8>, DataError> {
    let mut header = [0i32; 256];
    header[0] = if wide { MAGIC_U32 } else { MAGIC_U16 };
    header[1] = if wide { 7 } else { 1 };
    header[2] = i32::try_from(count).map_err(|_| DataError::Shard {
        path: path.to_path_buf(),
        message: format!("{count} tokens do not fit one shard (max {})", i32::MAX),
    })?;
    Ok(header.iter().flat_map(|h| h.to_le_bytes()).collect())
}

/// Writes an llm.c shard, uint16 when every id fits, else uint32; atomically via a temp file.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<(), DataError> {
    let wide = is_wide(vocab_size);
    let mut bytes = header(path, tokens.len(), wide)?;
    bytes.reserve(tokens.len() * if wide { 4 } else { 2 });
    for &t in tokens {
        if wide {
            bytes.extend_from_slice(&t.to_le_bytes());
        } else {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        }
    }
    Ok(crate::run_dir::write_atomic(path, &bytes)?)
}

/// The files a glob names, sorted; an error when there are none.
pub fn expand_glob(pattern: &str) -> Result<Vec<PathBuf>, DataError> {
    let paths = glob::glob(pattern)
        .map_err(|e| DataError::Glob { pattern: pattern.into(), message: e.to_string() })?;
    let mut files: Vec<PathBuf> = paths.filter_map(|p| p.ok()).filter(|p| p.is_file()).collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::Glob { pattern: pattern.into(), message: "no files match".into() });
    }
    Ok(files)
}

/// Opens every shard a glob names.
pub fn open_all(pattern: &str, format: &str, vocab_size: usize) -> Result<Vec<Shard>, DataError> {
    expand_glob(pattern)?.iter().map(|p| Shard::open(p, format, Some(vocab_size))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [1000usize, 100_000] {
            let p = dir.path().join(format!("s{vocab}.bin"));
            let toks: Vec<u32> = (0..500).map(|i| (i * 37 % vocab) as u32).collect();
            write_shard(&p, &toks, vocab).unwrap();
            let s = Shard::open(&p, "llmc", Some(vocab)).unwrap();
            let mut back = vec![0; 500];
            s.read(0, &mut back);
            assert_eq!(back, toks);
            assert!(Shard::open(&p, "llmc", Some(10))
                .unwrap_err()
                .to_string()
                .contains("not below"));
        }
    }

    #[test]
    fn corrupt_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_shard(&p, &[1, 2, 3, 4], 10).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Shard::open(&p, "llmc", None).unwrap_err().to_string().contains("truncated"));
        let mut bad = bytes.clone();
        bad[0] = 7;
        std::fs::write(&p, &bad).unwrap();
        assert!(Shard::open(&p, "llmc", None).unwrap_err().to_string().contains("magic"));
    }
}
