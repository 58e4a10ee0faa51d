//! The Mixture of Tokens mixing kernels one by one, at a layer's shape (default: bench-mot's,
//! B 32, S 256, d 256, E 16, G 16), then the two one-pass backward kernels, the controller's
//! logits and a layer's whole mixing with and without `mix`'s folded backward (and, where the
//! CPU has AMX tiles, as a bf16 run does it), in ms (median of 7 after 2 warm-ups) and GFLOP/s
//! of their multiply-adds:
//! `cargo run --release --example mot_bench [B] [S] [d] [E] [G]`.
//!
//! Repeated calls find their operands in cache, which a training step does not: the backward
//! reads activations the forward wrote long before. `MOT_BENCH_COLD=1` evicts every cache level
//! before each timed call: an upper bound on their in-step times, where warm calls give a lower
//! one.
mod common;

use candle_core::{Device, Tensor};
use motrain::ops::logits::logits;
use motrain::ops::mot::mixing::mix;
use motrain::ops::mot::{emit, emit_backward, group_dot, group_softmax, merge, merge_backward};

fn main() {
    let arg = |i, default| common::arg(i, default, "mot_bench [B] [S] [d] [E] [G]");
    let (b, s, d, e, g) = (arg(1, 32), arg(2, 256), arg(3, 256), arg(4, 16), arg(5, 16));
    if b % g != 0 {
        eprintln!("error: the batch ({b}) must be a multiple of the group size ({g})");
        std::process::exit(2)
    }
    let dev = Device::Cpu;
    let cold = std::env::var_os("MOT_BENCH_COLD").is_some();
    let time = |f: &dyn Fn()| match cold {
        true => common::median_time_cold(2, 7, f),
        false => common::median_time(2, 7, f),
    };
    let x = Tensor::randn(0f32, 1.0, (b, s, d), &dev).unwrap();
    let z = Tensor::randn(0f32, 1.0, (b, s, e), &dev).unwrap();
    let w = group_softmax(&z, g).unwrap();
    let m = merge(&x, &w, g).unwrap();
    // Every kernel but the softmax does B·S·E·d multiply-adds.
    let flop = 2.0 * (b * s * e * d) as f64;
    let report_n = |name: &str, t: f64, kernels: f64| {
        println!("{name:<13} {:7.2} ms {:6.1} GFLOP/s", t * 1e3, kernels * flop / t / 1e9);
    };
    let report = |name: &str, t: f64| report_n(name, t, 1.0);
    println!("mot b {b} s {s} d {d} e {e} g {g} | {}", motrain::ops::describe(&dev));
    report("group_softmax", time(&|| drop(group_softmax(&z, g).unwrap())));
    let zv = candle_core::Var::from_tensor(&z).unwrap();
    let dw = Tensor::randn(0f32, 1.0, (b, s, e), &dev).unwrap();
    report(
        "softmax+bwd",
        time(&|| {
            drop(
                (group_softmax(&zv, g).unwrap() * &dw)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap(),
            )
        }),
    );
    report("merge", time(&|| drop(merge(&x, &w, g).unwrap())));
    report("emit", time(&|| drop(emit(&m, &w, g).unwrap())));
    report("group_dot", time(&|| drop(group_dot(&x, &m, g).unwrap())));
    // Each backward pass does the multiply-adds of two kernels (emit and group_dot for merge's,
    // merge and group_dot for emit's); any tensors of the right shapes stand for the gradients.
    let (dm, dout) = (&m, &x);
    let t = time(&|| drop(merge_backward(dm, &x, &w, g).unwrap()));
    report_n("merge_bwd", t, 2.0);
    let t = time(&|| drop(emit_backward(dout, &m, &w, g).unwrap()));
    report_n("emit_bwd", t, 2.0);
    // The controller's logits `x·Cᵀ` over the B·S tokens, then with their backward (`dx = dz·C`
    // and `dC = dzᵀ·x`) through autograd, the product of the logits with a fixed `dz` summed.
    let (xs, c) = (x.reshape((b * s, d)).unwrap(), Tensor::randn(0f32, 1.0, (e, d), &dev).unwrap());
    let t = time(&|| drop(logits(&xs, &c).unwrap()));
    report("logits", t);
    let (xv, cv) =
        (candle_core::Var::from_tensor(&xs).unwrap(), candle_core::Var::from_tensor(&c).unwrap());
    let dz = Tensor::randn(0f32, 1.0, (b * s, e), &dev).unwrap();
    let t = time(&|| {
        drop((logits(&xv, &cv).unwrap() * &dz).unwrap().sum_all().unwrap().backward().unwrap())
    });
    report_n("logits+bwd", t, 3.0);
    // A layer's whole mixing, forward and backward (the expert the identity, the gradient of
    // its output a fixed one): as separate ops chained by autograd, then as `mix`, whose merge
    // backward runs through the softmax and the controller. 9 kernels' multiply-adds each.
    let (x3, dout) = (candle_core::Var::from_tensor(&x).unwrap(), &x);
    let t = time(&|| {
        let z = logits(&x3.reshape((b * s, d)).unwrap(), &cv).unwrap();
        let w = group_softmax(&z.reshape((b, s, e)).unwrap(), g).unwrap();
        let out = emit(&merge(&x3, &w, g).unwrap(), &w, g).unwrap();
        drop((out * dout).unwrap().sum_all().unwrap().backward().unwrap())
    });
    report_n("layer ops", t, 9.0);
    let layer_mix = || {
        let mixed = mix(&x3, &cv, g).unwrap();
        let out = mixed.emit(&mixed.m).unwrap();
        drop((out * dout).unwrap().sum_all().unwrap().backward().unwrap())
    };
    report_n("layer mix", time(&layer_mix), 9.0);
    // As a bf16 run on AMX tiles does it: merge's backward on the tiles.
    use motrain::ops::bf16;
    if bf16::engine() == Some(bf16::Engine::Tiles) {
        bf16::set_enabled(true);
        report_n("layer mix amx", time(&layer_mix), 9.0);
        bf16::set_enabled(false);
    }
}
