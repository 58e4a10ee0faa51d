use candle_core::{Device, Tensor};
use std::time::Instant;
fn t<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, flops: f64, mut f: F) {
    f().unwrap();
    let a = Instant::now();
    for _ in 0..5 { f().unwrap(); }
    let s = a.elapsed().as_secs_f64() / 5.0;
    println!("{name:40} {:.2} ms {:.1} GFLOP/s", s * 1000.0, flops / s / 1e9);
}
fn main() {
    candle_core::utils::with_threadpool(|| {
    let d = Device::Cpu;
    let (n, dm, f) = (4096usize, 256usize, 1024usize);
    let x = Tensor::randn(0f32, 1., (n, dm), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (f, dm), &d).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    let g = Tensor::randn(0f32, 1., (n, f), &d).unwrap();
    let fl = 2.0 * (n * dm * f) as f64;
    t("x@w.t (rhs transposed view)", fl, || x.matmul(&w.t()?));
    t("x@wt (rhs contiguous)", fl, || x.matmul(&wt));
    t("g@w (dx)", fl, || g.matmul(&w));
    t("g.t@x (dw)", fl, || g.t()?.matmul(&x));
    t("x.t@g (dw^T)", fl, || x.t()?.matmul(&g));
    let h = Tensor::randn(0f32, 1., (n, f), &d).unwrap();
    let wd = Tensor::randn(0f32, 1., (dm, f), &d).unwrap();
    t("h@wd.t (down)", fl, || h.matmul(&wd.t()?));
    let wq = Tensor::randn(0f32, 1., (dm, dm), &d).unwrap();
    t("x@wq.t (q proj)", fl / 4.0, || x.matmul(&wq.t()?));
    });
}
