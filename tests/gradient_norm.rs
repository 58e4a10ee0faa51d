//! The gradient norm of a bf16 training step on the CPU. The products that write the weight
//! gradients — the linears', the experts' and the LM head's — count each one's sum of squares
//! as they stream it out (`ops::squares`), and the norm takes those sums instead of reading
//! every gradient again. Each sum must be the one the gradient's values give, and reach the
//! very tensor the backward pass hands the optimizer.
//!
//! Its own test binary: it turns bf16 matmuls on for the whole process.

use candle_core::{Device, Tensor};
use motrain::config::Config;
use motrain::data::loader::Batch;
use motrain::model::{Params, Transformer};
use motrain::ops::{self, bf16};

/// `Σ x²` over the values, in f64, one by one.
fn read(t: &Tensor) -> f64 {
    values(t).iter().map(|&x| x as f64 * x as f64).sum()
}

#[test]
fn a_bf16_steps_weight_gradients_come_with_their_sums_of_squares() {
    if !bf16::usable() {
        eprintln!("skipped: this CPU has no bf16 dot product");
        return;
    }
    bf16::set_enabled(true);
    let (rows, seq_len, vocab) = (4, 24, 50);
    let mot = "[model.mot]\nn_experts = 4\ngroup_size = 4\n";
    let moe = "[model.moe]\nn_experts = 4\ntop_k = 1\n";
    // With `train.recompute_experts` the experts' op is another one, which counts them too.
    for (ffn, extra, recompute) in [
        ("dense", "", false),
        ("mot", mot, false),
        ("mot", mot, true),
        ("moe", moe, false),
        ("moe", moe, true),
    ] {
        let text = format!(
            "[run]\nname = 't'\n[data]\ntrain = 'x'\nseq_len = {seq_len}\n[model]\n\
             vocab_size = {vocab}\nd_model = 40\nn_layers = 2\nn_heads = 2\nd_ff = 72\n\
             ffn = '{ffn}'\n{extra}"
        );
        let cfg = Config::from_toml_str(&text, "test").unwrap().model;
        let what = format!("{ffn}{}", if recompute { " recomputing" } else { "" });
        let mut params = Params::new(&Device::Cpu, 7, 0.5);
        let model = Transformer::new(&cfg, &mut params).unwrap().with_recompute_experts(recompute);
        let n = rows * seq_len;
        let batch = Batch {
            rows,
            seq_len,
            inputs: (0..n).map(|i| (i * 7 + 3) as u32 % vocab).collect(),
            targets: (0..n).map(|i| (i * 5 + 1) as u32 % vocab).collect(),
            index: 0,
        };
        let grads = model.loss(&batch, true).unwrap().total().unwrap().backward().unwrap();
        let mut noted = Vec::new();
        for (name, var) in params.iter() {
            let Some(g) = grads.get(var) else { continue };
            let Some(sum) = ops::squares::take(g) else { continue };
            let want = read(g);
            assert!(want > 0.0, "{what} {name}: a zero gradient");
            assert!((sum - want).abs() <= 1e-6 * want, "{what} {name}: noted {sum}, values {want}");
            // Taken once: the norm asks again only by reading.
            assert_eq!(ops::squares::take(g), None, "{what} {name}");
            assert_eq!(ops::sum_of_squares(g).unwrap(), ops::sum_of_squares_host(&values(g)));
            noted.push(name.to_string());
        }
        // Every weight a product's backward writes whole: attention's four, the feed-forward's
        // (the experts' stacks in MoT and MoE), and the LM head. Not the embedding (a gather),
        // the norms' scales, or the MoT controller and MoE router (candle's matmul); nor the
        // dense SwiGLU's gate and up, one product of their concatenation, whose backward hands
        // each a part of that gradient.
        let dense_gate_up = |name: &str| {
            ffn == "dense"
                && (name.ends_with("mlp.gate_proj.weight") || name.ends_with("mlp.up_proj.weight"))
        };
        let written: Vec<String> = params
            .iter()
            .filter(|(name, v)| {
                v.as_tensor().rank() >= 2
                    && !name.contains("embed")
                    && !name.contains("controller")
                    && !name.contains("router")
                    && !dense_gate_up(name)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        // Two layers of attention's four and the feed-forward's one or three, and the head.
        let ffn_weights = if ffn == "dense" { 1 } else { 3 };
        assert_eq!(written.len(), 2 * (4 + ffn_weights) + 1, "{what}: {written:?}");
        assert_eq!(noted, written, "{what}: noted against written");
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
