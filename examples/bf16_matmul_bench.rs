//! A `Linear`'s products in bf16 on AMX tiles against f32 gemm (both motrain's op,
//! `ops::linear`) on motrain's bench shapes, per product of a linear map's step: forward `X·Wᵀ`,
//! input gradient `dY·W`, weight gradient `dYᵀ·X` (ms, median of 9 after 3 warm-ups); then the
//! packing of one bench-mot layer's expert weights as a training forward packs them (both
//! layouts, read cold from four layers' worth). Needs a CPU with AMX tiles:
//! `cargo run --release --example bf16_matmul_bench`.
mod common;

use candle_core::{Device, Tensor};
use motrain::ops::grouped::{grouped_matmul, grouped_matmul_cat};
use motrain::ops::linear::matmul_t_on;
use motrain::ops::Kernel;
fn main() {
    if !motrain::ops::amx::available() {
        eprintln!("this CPU has no AMX bf16 tiles");
        std::process::exit(2);
    }
    let dev = Device::Cpu;
    for (m, k, n) in [(4096, 256, 768), (4096, 256, 2048), (4096, 1024, 256), (4096, 256, 8192)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
        let t = |f: &dyn Fn()| common::median_time(3, 9, f) * 1e3;
        let f32 = |x: &Tensor, w: &Tensor| matmul_t_on(Kernel::F32, x, w);
        let mm = |x: &Tensor, w: &Tensor| matmul_t_on(Kernel::Amx, x, w);
        println!(
            "{m}x{k}x{n} ms  f32/bf16: fwd {:.2}/{:.2}  dA {:.2}/{:.2}  dW {:.2}/{:.2}",
            t(&|| {
                f32(&a, &w).unwrap();
            }),
            t(&|| {
                mm(&a, &w).unwrap();
            }),
            t(&|| {
                f32(&dy, &w.t().unwrap()).unwrap();
            }),
            t(&|| {
                mm(&dy, &w.t().unwrap()).unwrap();
            }),
            t(&|| {
                f32(&dy.t().unwrap(), &a.t().unwrap()).unwrap();
            }),
            t(&|| {
                mm(&dy.t().unwrap(), &a.t().unwrap()).unwrap();
            })
        );
    }
    expert_packing();
}

/// bench-mot's experts (16 of d 256 → f 1024, SwiGLU) given 16 rows each, so that packing their
/// weights for the tiles is most of a training forward's time; four layers' stacks in turn, so
/// that each is read from memory as in a step.
fn expert_packing() {
    motrain::ops::amx::set_enabled(true);
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
