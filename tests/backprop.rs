//! The gradient accumulation of the vendored candle-core (vendor/README.md): a tensor used by
//! several operations gets the sum of their contributions, and a first contribution that
//! arrives strided (through a transpose) is stored contiguous, so that matmul's backward,
//! which rejects some batched strides, accepts it.

use candle_core::{Device, Tensor, Var};

/// Max |a - b| over the elements, for two tensors of one shape.
fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn var(shape: &[usize], dev: &Device) -> candle_core::Result<Var> {
    let n: usize = shape.iter().product();
    Var::from_tensor(&(Tensor::arange(0f32, n as f32, dev)?.reshape(shape)? / n as f64)?)
}

#[test]
fn contributions_add_up() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = var(&[2, 3], &dev)?;
    let w = var(&[2, 3], &dev)?;
    // loss = Σ x∘x + Σ xᵀ·w: x is used three times.
    let x2 = (x.as_tensor() * x.as_tensor())?.sum_all()?;
    let xtw = x.as_tensor().t()?.matmul(w.as_tensor())?.sum_all()?;
    let grads = (x2 + xtw)?.backward()?;
    // d/dx = 2x + (row sums of w) broadcast over x's columns; d/dw = row sums of x likewise.
    let rows = |t: &Tensor| t.sum_keepdim(1)?.broadcast_as((2, 3));
    let want_x = ((x.as_tensor() * 2.)? + rows(w.as_tensor())?)?;
    let got_x = grads.get(&x).expect("x has a gradient");
    assert!(max_diff(got_x, &want_x)? < 1e-5);
    let got_w = grads.get(&w).expect("w has a gradient");
    assert!(max_diff(got_w, &rows(x.as_tensor())?)? < 1e-5);
    Ok(())
}

#[test]
fn a_strided_first_gradient_reaches_a_batched_matmul() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let a = var(&[2, 3, 5, 4], &dev)?;
    let b = var(&[2, 3, 4, 5], &dev)?;
    let c = var(&[2, 5, 3, 5], &dev)?;
    // m's only gradient is c transposed back: strided, the way attention's head split makes it.
    let m = a.as_tensor().matmul(b.as_tensor())?;
    let loss = (m.transpose(1, 2)? * c.as_tensor())?.sum_all()?;
    let grads = loss.backward()?;
    let gm = c.as_tensor().transpose(1, 2)?.contiguous()?;
    let want_a = gm.matmul(&b.as_tensor().t()?.contiguous()?)?;
    let got_a = grads.get(&a).expect("a has a gradient");
    assert!(max_diff(got_a, &want_a)? < 1e-5);
    Ok(())
}
