use candle_core::{Device, Tensor, DType};
use std::time::Instant;
fn t<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, mut f: F) {
    f().unwrap();
    let a = Instant::now();
    for _ in 0..5 { f().unwrap(); }
    println!("{name:40} {:.2} ms", a.elapsed().as_secs_f64() * 1000.0 / 5.0);
}
fn main() {
    candle_core::utils::with_threadpool(|| {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (4096, 128), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (8192, 128), &d).unwrap();
    let wf = Tensor::randn(0f32, 1., (512, 128), &d).unwrap();
    let g = Tensor::randn(0f32, 1., (4096, 8192), &d).unwrap();
    t("lm_head fwd x@w.t", || x.matmul(&w.t()?));
    t("lm_head bwd dx = g@w", || g.matmul(&w));
    t("lm_head bwd dw = g.t@x", || g.t()?.matmul(&x));
    t("ffn up x@wf.t", || x.matmul(&wf.t()?));
    let qa = Tensor::randn(0f32, 1., (32, 128, 4, 32), &d).unwrap();
    let q = Tensor::randn(0f32, 1., (32, 4, 128, 32), &d).unwrap();
    t("q@k.t batched", || q.matmul(&q.t()?));
    let p = Tensor::randn(0f32, 1., (32, 4, 128, 128), &d).unwrap();
    t("p@v batched", || p.matmul(&q));
    let wq = Tensor::randn(0f32, 1., (128, 128), &d).unwrap();
    let nw = Tensor::ones(128, DType::F32, &d).unwrap();
    let h = Tensor::randn(0f32, 1., (4096, 512), &d).unwrap();
    let wd = Tensor::randn(0f32, 1., (128, 512), &d).unwrap();
    t("q proj x@wq.t", || x.matmul(&wq.t()?));
    t("down proj h@wd.t", || h.matmul(&wd.t()?));
    t("rmsnorm", || motrain::ops::norm::rms_norm(&x, &nw, 1e-5));
    t("swiglu", || motrain::ops::swiglu::swiglu(&h, &h));
    let tables = motrain::ops::rope::RopeTables::new(32, 128, 1e4);
    t("rope", || motrain::ops::rope::rope(&qa, &tables, 0));
    t("zeros 4096x8192", || g.zeros_like());
    t("add 4096x8192", || &g + &g);
    t("add 4096x128", || &x + &x);
    let tg = Tensor::zeros(4096, DType::U32, &d).unwrap();
    let xx = Tensor::randn(0f32, 1., (4096, 128), &d).unwrap();
    t("linear ce fwd only", || motrain::ops::linear_ce::linear_cross_entropy(&xx, &w, &tg, false));
    t("linear ce fwd+grad", || motrain::ops::linear_ce::linear_cross_entropy(&xx, &w, &tg, true));
    t("ce fwd", || motrain::ops::cross_entropy::cross_entropy(&g, &tg));
    t("fused attention fwd", || motrain::ops::attention::causal_attention(&qa, &qa, &qa, 0.1));
    t("copy transpose", || p.transpose(1,2)?.contiguous());
    });
}
pub fn lce() {}
