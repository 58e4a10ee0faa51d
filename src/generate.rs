//! Sampling text from a trained model: the prompt once, then one token per step with the KV
//! cache, every sample of a batch in lock-step (which a MoT model needs: it mixes the samples
//! of a group at each position, exactly as in training).

use crate::model::Transformer;
use candle_core::{DType, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub num_samples: usize,
    pub seed: u64,
    /// Recompute the whole sequence at every step instead (slow; for checking the cache).
    pub no_cache: bool,
}

/// What a sampling run produced: the new tokens of each sample (up to and without the stop
/// token), and whether the model's context cut it short.
pub struct Generated {
    pub samples: Vec<Vec<u32>>,
    pub truncated: bool,
}

/// Whether `generate` can run: the number of samples against MoT groups, the prompt against the
/// context. The message explains what to change.
pub fn check(
    model: &Transformer, prompt_len: usize, opts: &GenerateOptions,
) -> std::result::Result<(), String> {
    let (rows, g, context) = (opts.num_samples, model.batch_multiple(), model.cfg.max_seq_len);
    if rows == 0 {
        return Err("--num-samples must be at least 1".into());
    }
    if rows % g != 0 {
        return Err(format!(
            "this Mixture of Tokens model mixes groups of {g} sequences at every position, so it samples in lock-step groups: \
             --num-samples must be a multiple of {g}, got {rows}. To sample one sequence at a time, convert it with `motrain transition-tune`"
        ));
    }
    // Every sample holds a key/value cache of the whole context in every layer, and logits.
    let m = &model.cfg;
    let kv_width = m.kv_heads() * (m.d_model / m.n_heads.max(1));
    let cache =
        [2, m.n_layers, context, kv_width].iter().fold(1u64, |a, &x| a.saturating_mul(x as u64));
    let per_sample = cache.saturating_add(m.vocab_size as u64).saturating_mul(4);
    let bytes = (rows as u64).saturating_mul(per_sample);
    if !crate::alloc::fits_in_memory(bytes) {
        return Err(format!(
            "--num-samples {rows} needs {:.1} GiB for the samples' key/value caches, more than this machine's memory",
            bytes as f64 / (1u64 << 30) as f64
        ));
    }
    if prompt_len == 0 || prompt_len > context {
        return Err(format!(
            "the prompt is {prompt_len} tokens; the model takes 1 to {context} (max_seq_len)"
        ));
    }
    Ok(())
}

/// Samples `num_samples` continuations of `prompt`, calling `on_token(sample, token)` as each
/// token is chosen. A sample ends at `stop` or after `max_new_tokens`.
pub fn generate(
    model: &Transformer, prompt: &[u32], opts: &GenerateOptions, stop: Option<u32>,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Generated> {
    check(model, prompt.len(), opts).map_err(candle_core::Error::Msg)?;
    let (rows, context) = (opts.num_samples, model.cfg.max_seq_len);
    let new_tokens = opts.max_new_tokens.min(context - prompt.len());
    let sampling = match (opts.temperature, opts.top_k, opts.top_p) {
        (t, _, _) if t <= 0.0 => Sampling::ArgMax,
        (temperature, None, None) => Sampling::All { temperature },
        (temperature, Some(k), None) => Sampling::TopK { k, temperature },
        (temperature, None, Some(p)) => Sampling::TopP { p, temperature },
        (temperature, Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
    };
    // One generator per sample, so sample i is the same whatever the number of samples.
    let mut samplers: Vec<LogitsProcessor> = (0..rows)
        .map(|i| {
            LogitsProcessor::from_sampling(
                crate::rng::derive(opts.seed, i as u64),
                sampling.clone(),
            )
        })
        .collect();

    let dev = model.device();
    let mut sequences: Vec<Vec<u32>> = vec![prompt.to_vec(); rows];
    let mut caches = model.new_caches();
    let mut out = vec![Vec::new(); rows];
    let mut done = vec![false; rows];
    for _ in 0..new_tokens {
        // The cache holds every position but the last token; without it, run them all.
        let fed = if opts.no_cache { 0 } else { caches[0].len() };
        let len = sequences[0].len() - fed;
        let ids: Vec<u32> = sequences.iter().flat_map(|s| s[fed..].iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (rows, len), dev)?;
        let logits = match opts.no_cache {
            true => model.forward(&ids, None)?,
            false => model.forward(&ids, Some(&mut caches))?,
        };
        let last = logits
            .reshape((rows, len, ()))?
            .narrow(1, len - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?; // [rows, V]
        for (i, sampler) in samplers.iter_mut().enumerate() {
            let token = sampler.sample(&last.get(i)?)?;
            // Finished samples go on in lock-step (MoT mixes them with the others), unseen.
            sequences[i].push(token);
            if done[i] {
                continue;
            }
            if Some(token) == stop {
                done[i] = true;
            } else {
                out[i].push(token);
                on_token(i, token);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    let truncated = new_tokens < opts.max_new_tokens && done.iter().any(|&d| !d);
    Ok(Generated { samples: out, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FfnKind};
    use crate::model::Params;
    use candle_core::Device;

    fn model(ffn: FfnKind) -> Transformer {
        model_with(ffn, None)
    }

    /// A tiny model of 4 query heads on `kv_heads` key/value heads (4 when `None`).
    fn model_with(ffn: FfnKind, kv_heads: Option<usize>) -> Transformer {
        let text = "[run]\nname='t'\n[data]\ntrain='x'\nseq_len=24\n[train]\nbatch_size=4\n[model]\nvocab_size=50\nd_model=16\nn_layers=2\nn_heads=4\nd_ff=32\n[model.mot]\nn_experts=4\ngroup_size=2\n";
        let mut cfg = Config::from_toml_str(text, "test").unwrap().model;
        (cfg.ffn, cfg.n_kv_heads) = (ffn, kv_heads);
        // A larger init than training uses, so the untrained model has opinions to sample.
        let mut p = Params::new(&Device::Cpu, 1, 1.0);
        let m = Transformer::new(&cfg, &mut p).unwrap();
        // PESC's Up starts at zero (the dense model); give the adapters something to say.
        for (_, up) in p.iter().filter(|(n, _)| n.ends_with("adapters.up")) {
            up.set(&crate::ops::testing::randn(up.dims(), 4)).unwrap();
        }
        m
    }

    fn opts(temperature: f64, num_samples: usize, no_cache: bool) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: 12,
            temperature,
            top_k: Some(20),
            top_p: Some(0.95),
            num_samples,
            seed: 3,
            no_cache,
        }
    }

    #[test]
    fn cached_and_uncached_decoding_give_the_same_tokens() {
        for (ffn, samples, kv_heads) in [
            (FfnKind::Dense, 1, None),
            (FfnKind::Dense, 3, None),
            (FfnKind::Dense, 2, Some(2)),
            (FfnKind::Dense, 2, Some(1)),
            (FfnKind::Moe, 2, None),
            (FfnKind::Mot, 4, Some(2)),
            (FfnKind::Pesc, 2, None),
        ] {
            let m = model_with(ffn, kv_heads);
            for t in [0.0, 1.0] {
                let cached = generate(&m, &[1, 2, 3], &opts(t, samples, false), None, |_, _| {})
                    .unwrap()
                    .samples;
                let full = generate(&m, &[1, 2, 3], &opts(t, samples, true), None, |_, _| {})
                    .unwrap()
                    .samples;
                assert_eq!(cached, full, "{ffn:?}, kv heads {kv_heads:?}, temperature {t}");
                assert!(cached.iter().all(|s| s.len() == 12));
            }
        }
    }

    #[test]
    fn sample_i_does_not_depend_on_the_number_of_samples() {
        let m = model(FfnKind::Dense);
        let one = generate(&m, &[4, 5], &opts(1.0, 1, false), None, |_, _| {}).unwrap().samples;
        let three = generate(&m, &[4, 5], &opts(1.0, 3, false), None, |_, _| {}).unwrap().samples;
        assert_eq!(one[0], three[0]);
        assert_ne!(three[0], three[1], "different samples differ");
    }

    #[test]
    fn stops_at_the_stop_token_and_at_the_context() {
        let m = model(FfnKind::Dense);
        let greedy =
            generate(&m, &[1], &opts(0.0, 1, false), None, |_, _| {}).unwrap().samples[0].clone();
        let stopped = generate(&m, &[1], &opts(0.0, 1, false), Some(greedy[2]), |_, _| {}).unwrap();
        assert_eq!(
            stopped.samples[0],
            greedy[..greedy.iter().position(|&t| t == greedy[2]).unwrap()]
        );
        let long = GenerateOptions { max_new_tokens: 100, ..opts(0.0, 1, false) };
        let g = generate(&m, &[1; 20], &long, None, |_, _| {}).unwrap();
        assert_eq!((g.samples[0].len(), g.truncated), (4, true), "24-token context");
        assert!(generate(&m, &[1; 25], &long, None, |_, _| {}).is_err());
    }
}
