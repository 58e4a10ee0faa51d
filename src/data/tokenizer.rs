//! Tokenizers: GPT-2's BPE (built in, offline, via tiktoken-rs) or any HF `tokenizer.json`, and
//! training a byte-level BPE of our own.

use super::DataError;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

pub const EOT: &str = "<|endoftext|>";

pub enum Tokenizer {
    /// An instance of its own: threads that share one contend for its regex's scratch pool.
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    Hf(Box<tokenizers::Tokenizer>, u32),
}

fn gpt2() -> Result<Tokenizer, DataError> {
    let bpe = tiktoken_rs::r50k_base().map_err(|e| DataError::Tokenizer {
        path: PathBuf::from("gpt2"),
        message: format!("building GPT-2's BPE: {e}"),
    })?;
    Ok(Tokenizer::Gpt2(Box::new(bpe)))
}

impl Tokenizer {
    /// `gpt2` or the path of a HF tokenizer.json.
    pub fn load(spec: &str) -> Result<Tokenizer, DataError> {
        if spec == "gpt2" {
            return gpt2();
        }
        let path = Path::new(spec);
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: "no such file (expected `gpt2` or the path of a tokenizer.json)".into(),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("not a valid tokenizer.json: {e}"),
        })?;
        let eot = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"]
            .iter()
            .find_map(|t| tok.token_to_id(t))
            .ok_or_else(|| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("has no end-of-text token (looked for {EOT}, </s>, <eos>)"),
            })?;
        Ok(Tokenizer::Hf(Box::new(tok), eot))
    }

    /// Another instance for another thread. Sharing one GPT-2 BPE across threads sends every
    /// regex search through the slow path of a shared scratch pool: a third of `prepare`'s time
    /// on 2 threads went there.
    pub fn for_thread(&self) -> Result<Tokenizer, DataError> {
        match self {
            Tokenizer::Gpt2(_) => gpt2(),
            Tokenizer::Hf(t, eot) => Ok(Tokenizer::Hf(t.clone(), *eot)),
        }
    }

    pub fn eot(&self) -> u32 {
        match self {
            Tokenizer::Gpt2(_) => 50256,
            Tokenizer::Hf(_, eot) => *eot,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Gpt2(_) => 50257,
            Tokenizer::Hf(t, _) => t.get_vocab_size(true),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Tokenizer::Hf(t, _) => {
                t.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| {
                    DataError::Tokenizer {
                        path: PathBuf::from("tokenizer"),
                        message: e.to_string(),
                    }
                })
            }
        }
    }

    /// Decodes ids to text; bytes that do not (yet) form valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Gpt2(bpe) => {
                String::from_utf8_lossy(&bpe.decode_bytes(ids).unwrap_or_default()).into_owned()
            }
            Tokenizer::Hf(t, _) => t.decode(ids, false).unwrap_or_default(),
        }
    }
}

/// SHA-256 of what defines a tokenizer: the bytes of its tokenizer.json, or for `gpt2` its
/// tokens in id order; `prepare.json` records it so shards are never mixed across tokenizers.
pub fn fingerprint(spec: &str) -> Result<String, DataError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    if spec == "gpt2" {
        let bpe = tiktoken_rs::r50k_base_singleton();
        for id in 0..50256u32 {
            let t = bpe.decode_bytes(&[id]).unwrap_or_default();
            h.update((t.len() as u32).to_le_bytes());
            h.update(&t);
        }
    } else {
        let path = Path::new(spec);
        h.update(std::fs::read(path).map_err(|e| DataError::io(path, e))?);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What `tokenizer train` read.
#[derive(Debug, Default)]
pub struct TrainReport {
    pub documents: u64,
    pub bytes: u64,
    pub skipped: u64,
}

/// The largest vocabulary `train_bpe` builds.
const MAX_VOCAB: usize = 1 << 24;

/// Trains a GPT-2 style byte-level BPE on the documents of the inputs, streamed (the trainer
/// keeps word counts, not text), and writes a HF tokenizer.json. `max_bytes` stops reading
/// after that much text: the documents are taken in input order. An existing `out` is replaced
/// only with `overwrite`.
pub fn train_bpe(
    inputs: &[PathBuf], vocab_size: usize, out: &Path, read: &super::inputs::ReadOptions,
    max_bytes: Option<u64>, overwrite: bool,
) -> Result<TrainReport, DataError> {
    if out.exists() && !overwrite {
        return Err(DataError::Invalid(format!(
            "{}: already exists; pass --overwrite to replace it, or choose another --out",
            out.display()
        )));
    }
    use super::inputs::{discover, DocReader, Item};
    if vocab_size < 257 {
        return Err(DataError::Invalid(format!("--vocab-size {vocab_size} is too small: a byte-level BPE needs at least 257 (256 bytes + end-of-text)")));
    }
    // The trainer reserves room for the whole vocabulary up front; the largest in use are
    // a few hundred thousand.
    if vocab_size > MAX_VOCAB {
        return Err(DataError::Invalid(format!(
            "--vocab-size {vocab_size} is too large: at most {MAX_VOCAB} (2^24)"
        )));
    }
    if max_bytes == Some(0) {
        return Err(DataError::Invalid("--max-bytes must be at least 1".into()));
    }
    let files = discover(inputs)?;
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = byte_level(BPE::default())
        .map_err(|e| DataError::Invalid(format!("building the tokenizer: {e}")))?;
    let mut report = TrainReport::default();
    let mut error = None;
    let limit = max_bytes.unwrap_or(u64::MAX);
    // The trainer pulls documents; a read error ends the stream and is returned afterwards.
    let docs = DocReader::new(files, read.clone()).map_while(|item| match item {
        Ok(Item::Doc(mut d)) if report.bytes < limit => {
            // The piece that crosses the limit is cut there (at a character's start).
            let room = usize::try_from(limit - report.bytes).unwrap_or(usize::MAX);
            if d.text.len() > room {
                let cut = (0..=room).rev().find(|&i| d.text.is_char_boundary(i)).unwrap_or(0);
                d.text.truncate(cut);
            }
            report.bytes += d.text.len() as u64;
            report.documents += d.starts as u64;
            Some(Some(d.text))
        }
        Ok(Item::Doc(_)) => None,
        Ok(Item::Bad(b)) => {
            report.skipped += b.records.max(1);
            Some(None)
        }
        Err(e) => {
            error = Some(e);
            None
        }
    });
    tokenizer
        .train(&mut trainer, docs.flatten())
        .map_err(|e| DataError::Invalid(format!("training the tokenizer: {e}")))?;
    if let Some(e) = error {
        return Err(e);
    }
    if report.bytes == 0 {
        return Err(DataError::Invalid(format!(
            "the inputs hold no text to train on (0 documents{}; is --text-field {:?} right?)",
            if report.skipped > 0 {
                format!(", {} bad records skipped", report.skipped)
            } else {
                String::new()
            },
            read.text_field
        )));
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    tokenizer.save(out, false).map_err(|e| DataError::Tokenizer {
        path: out.to_path_buf(),
        message: format!("cannot write: {e}"),
    })?;
    Ok(report)
}

/// GPT-2's BPE as a HF tokenizer.json, rebuilt from tiktoken's ranks (the id of a token is its
/// rank): the vocabulary in GPT-2's byte-to-unicode alphabet, and the merges that BPE with those
/// ranks performs — for every token, each split into two tokens of lower rank, ordered by the
/// token's rank (as `transformers`' tiktoken converter does). `export` writes it for runs on
/// the built-in `gpt2` tokenizer.
pub fn gpt2_tokenizer(out: &Path) -> Result<(), DataError> {
    use std::collections::HashMap;
    let bpe = tiktoken_rs::r50k_base_singleton();
    let tokens: Vec<Vec<u8>> =
        (0..50256u32).map(|id| bpe.decode_bytes(&[id]).unwrap_or_default()).collect();
    let rank: HashMap<&[u8], u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_slice(), i as u32)).collect();
    let alphabet = ByteLevel::alphabet(); // GPT-2's bytes_to_unicode, as chars in byte order
    let mut chars: Vec<char> = alphabet.into_iter().collect();
    chars.sort_by_key(|&c| byte_of(c));
    let text = |bytes: &[u8]| -> String { bytes.iter().map(|&b| chars[b as usize]).collect() };
    let vocab: HashMap<String, u32> =
        tokens.iter().enumerate().map(|(i, t)| (text(t), i as u32)).collect();
    let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
    for (r, t) in tokens.iter().enumerate().filter(|(_, t)| t.len() > 1) {
        for i in 1..t.len() {
            if let (Some(&a), Some(&b)) = (rank.get(&t[..i]), rank.get(&t[i..])) {
                merges.push((r as u32, a, b, text(&t[..i]), text(&t[i..])));
            }
        }
    }
    merges.sort();
    let merges: Vec<(String, String)> = merges.into_iter().map(|m| (m.3, m.4)).collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(|e| DataError::Invalid(format!("building GPT-2's tokenizer: {e}")))?;
    let mut tokenizer = byte_level(model)
        .map_err(|e| DataError::Invalid(format!("building GPT-2's tokenizer: {e}")))?;
    tokenizer
        .add_special_tokens(vec![AddedToken::from(EOT, true)])
        .map_err(|e| DataError::Invalid(format!("building GPT-2's tokenizer: {e}")))?;
    tokenizer.save(out, false).map_err(|e| DataError::Tokenizer {
        path: out.to_path_buf(),
        message: format!("cannot write: {e}"),
    })
}

/// The byte GPT-2's alphabet maps to `c`: printable bytes map to themselves, the others to
/// U+0100 and up, in byte order.
fn byte_of(c: char) -> u32 {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let c = c as u32;
    if c < 0x100 && printable(c) {
        return c;
    }
    // The k-th non-printable byte maps to 0x100 + k.
    (0..256).filter(|&b| !printable(b)).nth((c - 0x100) as usize).unwrap_or(0)
}

type ByteLevelTokenizer =
    tokenizers::TokenizerImpl<BPE, tokenizers::NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>;

/// A byte-level BPE tokenizer (GPT-2's pre-tokenizer, post-processor and decoder) over `model`.
fn byte_level(model: BPE) -> tokenizers::Result<ByteLevelTokenizer> {
    let byte_level = ByteLevel::new(false, true, true);
    TokenizerBuilder::new()
        .with_model(model)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_tokenizer_json_encodes_like_tiktoken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        gpt2_tokenizer(&path).unwrap();
        let hf = Tokenizer::load(path.to_str().unwrap()).unwrap();
        let gpt2 = Tokenizer::load("gpt2").unwrap();
        assert_eq!((hf.eot(), hf.vocab_size()), (50256, 50257));
        let text = "Hello, world! It's 2026 — naïve café… \n\n  indented\tcode() {x+=1;} 日本語 🙂";
        assert_eq!(hf.encode(text).unwrap(), gpt2.encode(text).unwrap());
        let ids = gpt2.encode(text).unwrap();
        assert_eq!(hf.decode(&ids), gpt2.decode(&ids));
        // As in `transformers`' GPT-2 tokenizer, the end-of-text marker is a special token.
        assert_eq!(hf.encode("a<|endoftext|>").unwrap(), vec![64, 50256]);
    }
}
