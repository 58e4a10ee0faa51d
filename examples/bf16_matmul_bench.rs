//! The bf16 AMX matmul against candle's f32 matmul on motrain's bench shapes, per product of a
//! linear map's step: forward `X·Wᵀ`, input gradient `dY·W`, weight gradient `dYᵀ·X` (ms, median
//! of 9 after 3 warm-ups). Needs a CPU with AMX tiles:
//! `cargo run --release --example bf16_matmul_bench`.
use candle_core::{Device, Tensor};
use motrain::ops::amx::matmul_bf16_t as mm;
fn time(f: &dyn Fn()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut ts = vec![];
    for _ in 0..9 {
        let t = std::time::Instant::now();
        f();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[4]
}
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
        let t = |f: &dyn Fn()| time(f) * 1e3;
        println!(
            "{m}x{k}x{n} ms  f32/bf16: fwd {:.2}/{:.2}  dA {:.2}/{:.2}  dW {:.2}/{:.2}",
            t(&|| {
                a.matmul(&w.t().unwrap()).unwrap();
            }),
            t(&|| {
                mm(&a, &w).unwrap();
            }),
            t(&|| {
                dy.matmul(&w).unwrap();
            }),
            t(&|| {
                mm(&dy, &w.t().unwrap()).unwrap();
            }),
            t(&|| {
                dy.t().unwrap().matmul(&a).unwrap();
            }),
            t(&|| {
                mm(&dy.t().unwrap(), &a.t().unwrap()).unwrap();
            })
        );
    }
}
