//! The weight files of a Hugging Face model folder: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` maps tensors to. Every file is memory-mapped and its header
//! checked up front (a truncated shard is refused before anything is written); a tensor is read
//! as f32 in chunks straight into a writer, and its pages are released behind it, so importing
//! holds one chunk of memory, not the model.

use super::ImportError;
use memmap2::Mmap;
use safetensors::Dtype;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One tensor of one file: where its bytes are and how to read them.
#[derive(Debug, Clone)]
pub struct Stored {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Stored>,
}

/// The dtypes `import` reads, as their names in safetensors headers.
pub const READABLE: &str = "F32, F16, BF16";

impl Weights {
    /// Opens `dir/model.safetensors.index.json`'s shards, or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Weights, ImportError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (paths, mapped) = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ImportError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ImportError::invalid(&index, format!("not valid JSON: {e}")))?;
            let map: HashMap<String, String> = json
                .get("weight_map")
                .cloned()
                .and_then(|m| serde_json::from_value(m).ok())
                .ok_or_else(|| {
                    ImportError::invalid(&index, "has no `weight_map` of tensor names to files")
                })?;
            let mut files: Vec<String> = map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files.iter().map(|f| dir.join(f)).collect::<Vec<_>>(), Some(map))
        } else if single.is_file() {
            (vec![single], None)
        } else {
            return Err(ImportError::invalid(
                dir,
                "has neither model.safetensors nor model.safetensors.index.json (motrain imports safetensors weights only; convert .bin files with transformers' save_pretrained(safe_serialization=True))",
            ));
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(ImportError::invalid(
                    &index,
                    format!("names {}, which does not exist", path.display()),
                ));
            }
            let file = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
            // SAFETY: the mapping is read-only; a file changed under a running import could make
            // reads fault, as any reader of a mapped file (candle's loader too) would.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ImportError::io(path, e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                ImportError::invalid(
                    path,
                    format!(
                        "not a complete safetensors file ({e:?}): it may be truncated or corrupt"
                    ),
                )
            })?;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let stored = Stored {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: 8 + n + a,
                    end: 8 + n + b,
                };
                if let Some(other) = tensors.insert(name.clone(), stored) {
                    return Err(ImportError::invalid(
                        path,
                        format!(
                            "holds tensor `{name}`, which {} holds too",
                            paths[other.file].display()
                        ),
                    ));
                }
            }
            files.push((path.clone(), map));
        }
        if let Some(map) = mapped {
            for (name, file) in &map {
                match tensors.get(name) {
                    Some(s) if paths[s.file] == dir.join(file) => {}
                    Some(s) => {
                        return Err(ImportError::invalid(
                            &index,
                            format!(
                                "maps `{name}` to {file}, but it is in {}",
                                paths[s.file].display()
                            ),
                        ))
                    }
                    None => {
                        return Err(ImportError::invalid(
                            &index,
                            format!("maps `{name}` to {file}, which does not hold it"),
                        ))
                    }
                }
            }
        }
        Ok(Weights { files, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&Stored> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn path(&self, s: &Stored) -> &Path {
        &self.files[s.file].0
    }

    /// How many files the weights span, and the dtypes they hold.
    pub fn summary(&self) -> (usize, Vec<String>) {
        let mut dtypes: Vec<String> =
            self.tensors.values().map(|s| format!("{:?}", s.dtype).to_lowercase()).collect();
        dtypes.sort();
        dtypes.dedup();
        (self.files.len(), dtypes)
    }

    /// Writes `name` as little-endian f32 to `out`, and lets the kernel drop its pages.
    pub fn write_f32(&self, name: &str, out: &mut impl Write) -> std::io::Result<()> {
        let unreadable = |why: String| std::io::Error::other(format!("tensor `{name}`: {why}"));
        let s = self.tensors.get(name).ok_or_else(|| unreadable("not in the weights".into()))?;
        if !readable(s.dtype) {
            return Err(unreadable(format!("{:?} is not one of {READABLE}", s.dtype)));
        }
        let map = &self.files[s.file].1;
        let bytes = &map[s.start..s.end];
        // 1 MiB of output at a time.
        const CHUNK: usize = 1 << 18;
        let mut buf = Vec::with_capacity(CHUNK * 4);
        let width = s.dtype.bitsize() / 8;
        for chunk in bytes.chunks(CHUNK * width) {
            buf.clear();
            match s.dtype {
                Dtype::F32 => buf.extend_from_slice(chunk),
                Dtype::BF16 => {
                    for b in chunk.chunks_exact(2) {
                        let bits = u16::from_le_bytes([b[0], b[1]]);
                        // bf16 is the top half of an f32: widening is exact.
                        buf.extend_from_slice(&f32::from_bits((bits as u32) << 16).to_le_bytes());
                    }
                }
                Dtype::F16 => {
                    for b in chunk.chunks_exact(2) {
                        let v = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                        buf.extend_from_slice(&v.to_le_bytes());
                    }
                }
                _ => unreachable!("checked by `readable` above"),
            }
            out.write_all(&buf)?;
        }
        crate::checkpoint::release_pages(map, s.start, s.end);
        Ok(())
    }
}

/// Whether `import` reads this dtype.
pub fn readable(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}
