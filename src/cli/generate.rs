//! `motrain generate`: the checks of its flags, the tokenizer, and streaming one sample.

use super::UsageError;
use crate::checkpoint;
use crate::data::Tokenizer;
use anyhow::Result;
use std::path::PathBuf;

pub fn generate(
    path: PathBuf, prompt: &str, tokenizer: Option<String>, opts: &crate::generate::GenerateOptions,
) -> Result<()> {
    use std::io::Write;
    if let Some(p) = opts.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(UsageError(format!("--top-p must be in (0, 1], got {p}")).into());
    }
    if opts.top_k == Some(0) {
        return Err(UsageError("--top-k must be at least 1".into()).into());
    }
    if !opts.temperature.is_finite() || opts.temperature < 0.0 {
        return Err(UsageError(format!(
            "--temperature must be a number >= 0 (0 = greedy), got {}",
            opts.temperature
        ))
        .into());
    }
    let (ckpt, model) = checkpoint::load_model(&path)?;
    let state = ckpt.state;
    let spec = tokenizer.or(state.config.data.tokenizer.clone()).ok_or_else(|| {
        UsageError("the run records no tokenizer (data.tokenizer): pass --tokenizer gpt2 or --tokenizer PATH/tokenizer.json".into())
    })?;
    let tok = Tokenizer::load(&spec)?;
    if tok.vocab_size() > model.cfg.vocab_size {
        return Err(UsageError(format!(
            "the tokenizer {spec} has {} tokens, more than the model's vocab_size {}",
            tok.vocab_size(),
            model.cfg.vocab_size
        ))
        .into());
    }
    let ids = tok.encode(prompt)?;
    let ids = if ids.is_empty() { vec![tok.eot()] } else { ids };
    crate::generate::check(&model, ids.len(), opts).map_err(UsageError)?;
    // One sample streams: print the text of each new token as it comes (decoding the whole
    // sample each time, so tokens that split a character come out whole).
    let streaming = opts.num_samples == 1;
    let mut stdout = std::io::stdout();
    let mut shown = String::new();
    let mut sample = Vec::new();
    if streaming {
        print!("{prompt}");
    }
    let generated = crate::generate::generate(&model, &ids, opts, Some(tok.eot()), |_, t| {
        if streaming {
            sample.push(t);
            let text = tok.decode(&sample);
            if let Some(new) = text.strip_prefix(shown.as_str()) {
                print!("{new}");
                let _ = stdout.flush();
            }
            shown = text;
        }
    })?;
    if streaming {
        println!();
    } else {
        for (i, s) in generated.samples.iter().enumerate() {
            println!("---------- sample {} ----------\n{prompt}{}", i + 1, tok.decode(s));
        }
    }
    if generated.truncated {
        eprintln!(
            "note: stopped at the model's context of {} tokens (max_seq_len)",
            model.cfg.max_seq_len
        );
    }
    Ok(())
}
