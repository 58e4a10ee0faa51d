//! The fused causal attention at long context, forward and forward+backward, in GFLOP/s of the
//! causal products (ms, median of 7 after 2 warm-ups):
//! `cargo run --release --example attention_bench [seq] [batch] [heads] [head_dim]`.
mod common;

use candle_core::{Device, Tensor, Var};
use motrain::ops::attention::causal_attention;

fn main() {
    let arg =
        |i, default| common::arg(i, default, "attention_bench [seq] [batch] [heads] [head_dim]");
    let (s, b, h, dh) = (arg(1, 2048), arg(2, 2), arg(3, 4), arg(4, 64));
    let dev = Device::Cpu;
    let qkv: Vec<Var> =
        (0..3).map(|_| Var::randn(0f32, 1.0, (b, s, h, dh), &dev).unwrap()).collect();
    let scale = 1.0 / (dh as f64).sqrt();
    let forward = || causal_attention(&qkv[0], &qkv[1], &qkv[2], scale).unwrap();
    let g = Tensor::randn(0f32, 1.0, (b, s, h, dh), &dev).unwrap();
    // Causal products: QKᵀ and PV over half the square, 2 flops per multiply-add.
    let fwd_flop = 2.0 * 2.0 * (b * h * dh) as f64 * (s * s) as f64 / 2.0;
    let tf = common::median_time(2, 7, &|| {
        forward();
    });
    let tb = common::median_time(2, 7, &|| {
        let y = forward();
        (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    });
    println!(
        "attention b {b} s {s} h {h} dh {dh} | {} | fwd {:.1} ms ({:.0} GFLOP/s) | fwd+bwd {:.1} ms ({:.0} GFLOP/s)",
        motrain::ops::describe(&dev),
        tf * 1e3,
        fwd_flop / tf / 1e9,
        tb * 1e3,
        3.5 * fwd_flop / tb / 1e9
    );
}
