//! Test helpers: seeded random tensors, closeness, and gradient checks that hold a fused op's
//! backward to finite differences of the plain formulation computed in f64.

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

/// Checks `fused`'s gradients three ways: against the autograd of `reference` (f32), and against
/// central finite differences of `reference` in f64 on a sample of elements of every input.
pub fn check_grads<F, R>(inputs: &[Tensor], fused: F, reference: R)
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
    R: Fn(&[Tensor]) -> Result<Tensor>,
{
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = fused(&ts).unwrap();
    let proj = randn(out.dims(), 99);
    let grads = (out.clone() * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let ref_out = reference(&ts).unwrap();
    let ref_grads = (ref_out * &proj).unwrap().sum_all().unwrap().backward().unwrap();

    let inputs64: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let proj64 = proj.to_dtype(DType::F64).unwrap();
    let loss64 = |xs: &[Tensor]| -> f64 {
        (reference(xs).unwrap() * &proj64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("input {i} got no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rg = ref_grads.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (k, (a, b)) in g.iter().zip(&rg).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "input {i} elem {k}: fused {a} vs autograd {b}"
            );
        }
        let base: Vec<f64> = inputs64[i].flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..12.min(base.len()) {
            let k = rng.random_range(0..base.len());
            let h = 1e-6;
            let at = |delta: f64| {
                let mut p = base.clone();
                p[k] += delta;
                let mut xs = inputs64.clone();
                xs[i] = Tensor::from_vec(p, inputs64[i].shape(), &Device::Cpu).unwrap();
                loss64(&xs)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let analytic = g[k] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "input {i} elem {k}: analytic {analytic} vs finite difference {numeric}"
            );
        }
    }
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
