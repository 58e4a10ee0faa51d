//! Every SIMD path this CPU has, held to the portable path at sizes where the vector loops and
//! their remainders run (the per-op tests use tiny shapes that mostly exercise the tails).

use super::testing::{assert_rel_close, randn, value_and_grads};
use super::{attention, grouped, linear_ce, mot, norm, rope, simd, swiglu};
use crate::config::Activation;
use candle_core::{Device, Result, Tensor};

/// Output and gradients of `op` on every path against the portable path, to 1e-5 relative.
fn same_on_every_path<F>(what: &str, inputs: &[Tensor], op: F)
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Sync,
{
    let proj = randn(op(inputs).unwrap().dims(), 17);
    let run = |level| simd::with_level(level, || value_and_grads(inputs, &op, &proj));
    let (out, grads) = run(simd::Level::Portable);
    for level in simd::available().into_iter().skip(1) {
        let (o, g) = run(level);
        assert_rel_close(&format!("{what} on {level}: output"), &o, &out, 1e-5);
        for (i, (a, b)) in g.iter().zip(&grads).enumerate() {
            assert_rel_close(&format!("{what} on {level}: gradient {i}"), a, b, 1e-5);
        }
    }
}

#[test]
fn norms_and_activations_agree_on_every_path() {
    let (x, w, b) = (randn(&[37, 131], 1), randn(&[131], 2), randn(&[131], 3));
    same_on_every_path("rms_norm", &[x.clone(), w.clone()], |t| norm::rms_norm(&t[0], &t[1], 1e-5));
    same_on_every_path("layer_norm", &[x, w, b], |t| norm::layer_norm(&t[0], &t[1], &t[2], 1e-5));
    same_on_every_path("swiglu", &[randn(&[37, 2 * 75], 4)], |t| swiglu::swiglu(&t[0]));
}

#[test]
fn attention_and_rope_agree_on_every_path() {
    let qkv: Vec<Tensor> = (0..3).map(|i| randn(&[2, 150, 3, 40], 10 + i)).collect();
    same_on_every_path("attention", &qkv, |t| {
        attention::causal_attention(&t[0], &t[1], &t[2], 0.2)
    });
    let gqa =
        [randn(&[2, 150, 4, 40], 14), randn(&[2, 150, 2, 40], 15), randn(&[2, 150, 2, 40], 16)];
    same_on_every_path("grouped-query attention", &gqa, |t| {
        attention::causal_attention(&t[0], &t[1], &t[2], 0.2)
    });
    let tables = rope::RopeTables::new(40, 256, 10_000.0, None).unwrap();
    same_on_every_path("rope", &qkv[..1], |t| rope::rope(&t[0], &tables, 3));
}

#[test]
fn cross_entropy_and_grouped_experts_agree_on_every_path() {
    let targets: Vec<u32> = (0..37).map(|i| (i * 7 % 101) as u32).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    same_on_every_path("linear_cross_entropy", &[randn(&[37, 64], 5), randn(&[101, 64], 6)], |t| {
        linear_ce::linear_cross_entropy(&t[0], &t[1], &targets, true)
    });
    let offsets = [0, 11, 11, 37];
    let inputs = [randn(&[37, 48], 7), randn(&[3, 70, 48], 8), randn(&[3, 70, 48], 9)];
    same_on_every_path("grouped_up", &inputs, |t| {
        grouped::grouped_up(&t[0], Some(&t[1]), &t[2], Activation::Swiglu, &offsets)
    });
}

#[test]
fn mot_mixing_agrees_on_every_path() {
    let (x, z) = (randn(&[8, 9, 67], 11), randn(&[8, 9, 5], 12));
    same_on_every_path("group_softmax", std::slice::from_ref(&z), |t| mot::group_softmax(&t[0], 4));
    same_on_every_path("merge", &[x, z.clone()], |t| mot::merge(&t[0], &t[1], 4));
    same_on_every_path("emit", &[randn(&[5, 18, 67], 13), z], |t| mot::emit(&t[0], &t[1], 4));
    // Groups of 6: the AVX-512 dot products take members four at a time, then the other two.
    let (x6, z6) = (randn(&[12, 9, 67], 18), randn(&[12, 9, 5], 19));
    same_on_every_path("merge in groups of 6", &[x6, z6.clone()], |t| mot::merge(&t[0], &t[1], 6));
    same_on_every_path("emit in groups of 6", &[randn(&[5, 18, 67], 20), z6], |t| {
        mot::emit(&t[0], &t[1], 6)
    });
    // A layer's mixing, whose backward runs through the softmax and the controller, with a
    // stand-in expert y = m ⊙ t[2] (a controller 96 wide takes the logits kernel, 67 not).
    for d in [67, 96] {
        let inputs = [randn(&[8, 9, d], 14), randn(&[5, d], 15), randn(&[5, 18, d], 16)];
        same_on_every_path("mix", &inputs, |t| {
            let mixed = mot::mixing::mix(&t[0], &t[1], 4)?;
            mixed.emit(&(&mixed.m * &t[2])?)
        });
    }
}

/// The gradient norm's sum of squares: on every path within f64 rounding of a naive f64 loop
/// (several chunks and a ragged tail), and the same bits on one thread and on four.
#[test]
fn sum_of_squares_matches_a_naive_loop_on_every_path() {
    let x = randn(&[3 * (1 << 16) + 123], 21);
    let naive: f64 = x.to_vec1::<f32>().unwrap().iter().map(|&v| v as f64 * v as f64).sum();
    for level in simd::available() {
        let got = simd::with_level(level, || super::sum_of_squares(&x).unwrap());
        assert!((got - naive).abs() <= 1e-12 * naive, "{level}: {got} against {naive}");
    }
    let on = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| super::sum_of_squares(&x).unwrap())
    };
    assert_eq!(on(1).to_bits(), on(4).to_bits());
}

/// `stream_copy` on every path copies exactly, whatever the destination's alignment (16- and
/// 64-byte stores and their plain fallbacks) and length (tails shorter than a store), and
/// writes nothing outside it.
#[test]
fn stream_copy_copies_exactly_on_every_path() {
    let src: Vec<f32> = (0..200).map(|i| i as f32 * 0.37 - 5.0).collect();
    for level in simd::available() {
        simd::with_level(level, || {
            // Over-allocated so that some offset of every alignment class exists.
            let mut buf = vec![-1f32; 300];
            for offset in 0..17 {
                for len in [0, 1, 3, 4, 15, 16, 17, 31, 32, 33, 64, 100, 160] {
                    buf.fill(-1.0);
                    super::stream_copy(&mut buf[offset..offset + len], &src[..len]);
                    super::stream_fence();
                    assert_eq!(&buf[offset..offset + len], &src[..len], "{level} {offset} {len}");
                    assert!(
                        buf[..offset].iter().chain(&buf[offset + len..]).all(|&v| v == -1.0),
                        "{level} {offset} {len}: wrote outside"
                    );
                }
            }
        });
    }
}
