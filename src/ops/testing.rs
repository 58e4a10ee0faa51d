//! Test helpers: seeded random tensors, closeness, and gradient checks that hold a fused op's
//! backward to finite differences of the plain formulation computed in f64.

use super::simd;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::rng::seeded(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| crate::rng::normal_f32(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "shapes differ");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims());
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "max |a - b| = {d} > {tol}");
}

/// A scalar loss `Σ proj ∘ op(inputs)` and its gradients: the flattened output of `op`, then
/// the flattened gradient of every input.
pub fn value_and_grads<F>(inputs: &[Tensor], op: &F, proj: &Tensor) -> (Vec<f32>, Vec<Vec<f32>>)
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&ts).unwrap();
    let grads = (out.clone() * proj).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gs = vars
        .iter()
        .enumerate()
        .map(|(i, v)| flat(grads.get(v).unwrap_or_else(|| panic!("input {i} got no gradient"))))
        .collect();
    (flat(&out), gs)
}

/// `|a − b|∞ ≤ rtol · |b|∞`: closeness relative to the size of the values.
pub fn assert_rel_close(what: &str, a: &[f32], b: &[f32], rtol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= rtol * scale, "{what}: max |a − b| = {worst} > {rtol} · {scale}");
}

/// Checks `fused` on every SIMD path this CPU has: its output and gradients against the portable
/// path (1e-5 relative), its output and gradients against `reference` and its autograd (f32),
/// and its gradients against central finite differences of `reference` in f64 on a sample of
/// elements of every input.
pub fn check_grads<F, R>(inputs: &[Tensor], fused: F, reference: R)
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Sync,
    R: Fn(&[Tensor]) -> Result<Tensor>,
{
    let proj = randn(fused(inputs).unwrap().dims(), 99);
    let (ref_out, ref_grads) = value_and_grads(inputs, &reference, &proj);
    let numeric = finite_differences(inputs, &reference, &proj);
    let mut portable: Option<(Vec<f32>, Vec<Vec<f32>>)> = None;
    for level in simd::available() {
        let (out, grads) = simd::with_level(level, || value_and_grads(inputs, &fused, &proj));
        for (k, (a, b)) in out.iter().zip(&ref_out).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{level}: output {k}: fused {a} vs {b}"
            );
        }
        for (i, (g, rg)) in grads.iter().zip(&ref_grads).enumerate() {
            for (k, (a, b)) in g.iter().zip(rg).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{level}: input {i} elem {k}: fused {a} vs autograd {b}"
                );
            }
        }
        for &(i, k, numeric) in &numeric {
            let analytic = grads[i][k] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "{level}: input {i} elem {k}: analytic {analytic} vs finite difference {numeric}"
            );
        }
        match &portable {
            None => portable = Some((out, grads)),
            Some((p_out, p_grads)) => {
                assert_rel_close(&format!("{level} output"), &out, p_out, 1e-5);
                for (i, (g, pg)) in grads.iter().zip(p_grads).enumerate() {
                    assert_rel_close(&format!("{level} gradient of input {i}"), g, pg, 1e-5);
                }
            }
        }
    }
}

/// Central differences in f64 of `Σ proj ∘ reference(inputs)` at 12 random elements of every
/// input: (input, element, derivative).
fn finite_differences<R>(
    inputs: &[Tensor], reference: &R, proj: &Tensor,
) -> Vec<(usize, usize, f64)>
where
    R: Fn(&[Tensor]) -> Result<Tensor>,
{
    let inputs64: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let proj64 = proj.to_dtype(DType::F64).unwrap();
    let loss64 = |xs: &[Tensor]| -> f64 {
        (reference(xs).unwrap() * &proj64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut out = Vec::new();
    for (i, x) in inputs64.iter().enumerate() {
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..12.min(base.len()) {
            let k = rng.random_range(0..base.len());
            let h = 1e-6;
            let at = |delta: f64| {
                let mut p = base.clone();
                p[k] += delta;
                let mut xs = inputs64.clone();
                xs[i] = Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap();
                loss64(&xs)
            };
            out.push((i, k, (at(h) - at(-h)) / (2.0 * h)));
        }
    }
    out
}

/// Central difference of `loss` in element `k` of an f64 variable, which is restored after.
pub fn central_difference(v: &Var, k: usize, loss: impl Fn() -> f64) -> f64 {
    let base: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
    let at = |delta: f64| {
        let mut p = base.clone();
        p[k] += delta;
        v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap()).unwrap();
        let l = loss();
        v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap()).unwrap();
        l
    };
    (at(1e-6) - at(-1e-6)) / 2e-6
}

/// A variable's gradient from `grads`, flattened to f64; panics naming `what` if it has none.
pub fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var, what: &str) -> Vec<f64> {
    let g = grads.get(v).unwrap_or_else(|| panic!("{what}: no gradient"));
    g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Holds `analytic`, the flattened gradient of `v`, to central differences of `loss` at
/// `samples` evenly spaced elements: `|numeric − analytic| ≤ rtol · (floor + |numeric|)`.
pub fn assert_matches_fd(
    what: &str, v: &Var, analytic: &[f64], samples: usize, (rtol, floor): (f64, f64),
    loss: impl Fn() -> f64,
) {
    let n = v.elem_count();
    for k in (0..n).step_by((n / samples).max(1)) {
        let numeric = central_difference(v, k, &loss);
        assert!(
            (numeric - analytic[k]).abs() <= rtol * (floor + numeric.abs()),
            "{what}[{k}]: autograd {} vs finite difference {numeric}",
            analytic[k]
        );
    }
}
