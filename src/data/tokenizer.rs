//! Tokenizers: GPT-2's BPE (built in, offline, via tiktoken-rs) or any HF `tokenizer.json`, and
//! training a byte-level BPE of our own.

use super::DataError;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

pub const EOT: &str = "<|endoftext|>";

pub enum Tokenizer {
    Gpt2(&'static tiktoken_rs::CoreBPE),
    Hf(Box<tokenizers::Tokenizer>, u32),
}

impl Tokenizer {
    /// `gpt2` or the path of a HF tokenizer.json.
    pub fn load(spec: &str) -> Result<Tokenizer, DataError> {
        if spec == "gpt2" {
            return Ok(Tokenizer::Gpt2(tiktoken_rs::r50k_base_singleton()));
        }
        let path = Path::new(spec);
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: "no such file (expected `gpt2` or the path of a tokenizer.json)".into(),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer { path: path.to_path_buf(), message: format!("not a valid tokenizer.json: {e}") })?;
        let eot = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"]
            .iter()
            .find_map(|t| tok.token_to_id(t))
            .ok_or_else(|| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("has no end-of-text token (looked for {EOT}, </s>, <eos>)"),
            })?;
        Ok(Tokenizer::Hf(Box::new(tok), eot))
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
            Tokenizer::Hf(t, _) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer { path: PathBuf::from("tokenizer"), message: e.to_string() }),
        }
    }

    /// Decodes ids to text; bytes that do not (yet) form valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Gpt2(bpe) => String::from_utf8_lossy(&bpe.decode_bytes(ids).unwrap_or_default()).into_owned(),
            Tokenizer::Hf(t, _) => t.decode(ids, false).unwrap_or_default(),
        }
    }
}

/// Trains a GPT-2 style byte-level BPE on text files and writes a HF tokenizer.json.
pub fn train_bpe(inputs: &[PathBuf], vocab_size: usize, out: &Path) -> Result<(), DataError> {
    if vocab_size < 257 {
        return Err(DataError::Invalid(format!("--vocab-size {vocab_size} is too small: a byte-level BPE needs at least 257 (256 bytes + end-of-text)")));
    }
    let files: Vec<String> = super::prepare::text_files(inputs)?.iter().map(|p| p.display().to_string()).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = TokenizerBuilder::<BPE, tokenizers::NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| DataError::Invalid(format!("building the tokenizer: {e}")))?;
    tokenizer
        .train_from_files(&mut trainer, files)
        .map_err(|e| DataError::Invalid(format!("training the tokenizer: {e}")))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    tokenizer
        .save(out, false)
        .map_err(|e| DataError::Tokenizer { path: out.to_path_buf(), message: format!("cannot write: {e}") })?;
    Ok(())
}
