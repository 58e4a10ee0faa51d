//! A `Linear`'s products in bf16 on each engine this CPU has (AMX tiles, AVX512_BF16's dot
//! product) against f32 gemm (all motrain's op, `ops::linear`) on motrain's bench shapes, per
//! product of a linear map's step: forward `X·Wᵀ`, input gradient `dY·W`, weight gradient
//! `dYᵀ·X` (ms, median of 9 after 3 warm-ups, and GFLOP/s = 2·M·N·K / time); then the packing
//! of one bench-mot layer's expert weights as a training forward packs them (both layouts, read
//! cold from four layers' worth). Needs a CPU with a bf16 dot product:
//! `cargo run --release --example bf16_matmul_bench`.
mod common;

use candle_core::{Device, Tensor};
use motrain::ops::bf16::{engines, with_engine};
use motrain::ops::grouped::{grouped_matmul, grouped_matmul_cat};
use motrain::ops::linear::matmul_t_on;
use motrain::ops::Kernel;
fn main() {
    if engines().is_empty() {
        eprintln!("this CPU has no bf16 dot product (AMX tiles or AVX512_BF16)");
        std::process::exit(2);
    }
    let dev = Device::Cpu;
    for (m, k, n) in [(4096, 256, 768), (4096, 256, 2048), (4096, 1024, 256), (4096, 256, 8192)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
        let flop = 2.0 * (m * n * k) as f64;
        let t = |f: &dyn Fn()| common::median_time(3, 9, f);
        let three = |kernel: Kernel| {
            let mm = |x: &Tensor, w: &Tensor| matmul_t_on(kernel, x, w).unwrap();
            [
                t(&|| drop(mm(&a, &w))),
                t(&|| drop(mm(&dy, &w.t().unwrap()))),
                t(&|| drop(mm(&dy.t().unwrap(), &a.t().unwrap()))),
            ]
        };
        let say = |name: &str, s: [f64; 3]| {
            let [f, da, dw] = s.map(|x| format!("{:.2} ms {:.0} GFLOP/s", x * 1e3, flop / x / 1e9));
            println!("{m}x{k}x{n} {name:>11}: fwd {f}  dA {da}  dW {dw}");
        };
        say("f32", three(Kernel::F32));
        for e in engines() {
            say(e.name(), with_engine(e, || three(Kernel::Bf16)));
        }
    }
    expert_packing();
}

/// bench-mot's experts (16 of d 256 → f 1024, SwiGLU) given 16 rows each, so that packing their
/// weights for the tiles is most of a training forward's time; four layers' stacks in turn, so
/// that each is read from memory as in a step.
fn expert_packing() {
    motrain::ops::bf16::set_enabled(true);
    let (e, d, f, rows) = (16, 256, 1024, 16);
    let dev = Device::Cpu;
    let randn = |shape: (usize, usize, usize)| Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
    let layers: Vec<[Tensor; 3]> =
        (0..4).map(|_| [randn((e, f, d)), randn((e, f, d)), randn((e, d, f))]).collect();
    let x = Tensor::randn(0f32, 1.0, (e * rows, d), &dev).unwrap();
    let h = Tensor::randn(0f32, 1.0, (e * rows, f), &dev).unwrap();
    let offsets: Vec<usize> = (0..=e).map(|i| i * rows).collect();
    let per_layer = common::median_time(1, 9, &|| {
        for [gate, up, down] in &layers {
            grouped_matmul_cat(&x, gate, up, &offsets, true).unwrap();
            grouped_matmul(&h, down, &offsets, true).unwrap();
        }
    }) / layers.len() as f64;
    println!("bench-mot expert weights of one layer, packed cold: {:.2} ms", per_layer * 1e3);
}
