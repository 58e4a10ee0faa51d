//! The named parameters of a model: creation with the initialisation of `models.md`, lookup by
//! the tensor names of `product.md`, and loading with shape checks.

use crate::rng;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;

/// An empty vector with room for exactly the tensor's elements, or an error (not an abort)
/// when that much memory is not to be had.
/// Beyond the machine's memory counts as "not to be had": with overcommit a huge allocation
/// "succeeds" and the process is later killed by the kernel instead.
fn alloc(name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    // A plain message: `bail!` would append a backtrace under RUST_BACKTRACE.
    n.and_then(crate::alloc::reserve_exact).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "cannot allocate parameter `{name}` of shape {shape:?}: more than this machine's memory"
        ))
    })
}

/// A predicate on parameter names.
type NameFilter = Box<dyn Fn(&str) -> bool>;

/// Parameters in creation order. Each tensor's initial values depend only on the seed and its
/// name, so adding a tensor never changes the others.
pub struct Params {
    device: Device,
    /// f32 for training; f64 lets tests take finite differences of a whole model.
    dtype: DType,
    seed: u64,
    init_scale: f64,
    entries: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    /// Names that stay fixed in training (PESC's `train_only_adapters`).
    frozen: Option<NameFilter>,
    /// Values to take instead of initialising (a checkpoint's), each moved out as it is used.
    pretrained: Option<HashMap<String, Tensor>>,
}

impl Params {
    pub fn new(device: &Device, seed: u64, init_scale: f64) -> Params {
        Params {
            device: device.clone(),
            dtype: DType::F32,
            seed,
            init_scale,
            entries: Vec::new(),
            index: HashMap::new(),
            frozen: None,
            pretrained: None,
        }
    }

    /// Every parameter takes its value from `tensors` instead of being initialised: a model
    /// built from a checkpoint holds one copy of its weights, not two. A name `tensors` lacks,
    /// or holds in another shape, fails the build; see [`Params::unused_pretrained`] for names
    /// the model lacks.
    pub fn pretrained(mut self, tensors: HashMap<String, Tensor>) -> Params {
        self.pretrained = Some(tensors);
        self
    }

    /// After the build: an error naming a pretrained tensor the model did not take.
    pub fn unused_pretrained(&self) -> std::result::Result<(), String> {
        match self.pretrained.as_ref().and_then(|t| t.keys().min()) {
            Some(extra) => {
                Err(format!("tensor `{extra}` is not part of the model the config describes"))
            }
            None => Ok(()),
        }
    }

    /// The pretrained value of `name`, checked against `shape`, if the parameters have them.
    fn take_pretrained(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(tensors) = &mut self.pretrained else { return Ok(None) };
        match tensors.remove(name) {
            Some(t) if t.dims() == shape => Ok(Some(t)),
            Some(t) => Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, but the config gives {shape:?}",
                t.dims()
            ))),
            None => Err(candle_core::Error::Msg(format!("tensor `{name}` is missing"))),
        }
    }

    /// The parameters that `frozen` names stay fixed: the model gets them outside the autograd
    /// graph (sharing the variable's storage, so loading still reaches them), and backward
    /// computes no gradient for them at all. Set before the model is built.
    pub fn freezing(mut self, frozen: impl Fn(&str) -> bool + 'static) -> Params {
        self.frozen = Some(Box::new(frozen));
        self
    }

    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.as_ref().is_some_and(|f| f(name))
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The same parameters (same initial values) in another dtype.
    pub fn with_dtype(mut self, dtype: DType) -> Params {
        self.dtype = dtype;
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn count(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Elements of the parameters that train (all, unless some are frozen).
    pub fn trainable_count(&self) -> usize {
        self.entries.iter().filter(|(n, _)| !self.is_frozen(n)).map(|(_, v)| v.elem_count()).sum()
    }

    fn add(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        assert!(!self.index.contains_key(name), "parameter {name} created twice");
        let var = Var::from_tensor(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        let out =
            if self.is_frozen(name) { var.as_tensor().detach() } else { var.as_tensor().clone() };
        self.index.insert(name.to_string(), self.entries.len());
        self.entries.push((name.to_string(), var));
        Ok(out)
    }

    fn rng(&self, name: &str) -> rng::SeededRng {
        let h = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        rng::seeded(rng::splitmix64(self.seed ^ h))
    }

    /// Truncated normal, std `sqrt(init_scale / fan_in)`, cut at `±2·init_scale`.
    pub fn normal(&mut self, name: &str, shape: &[usize], fan_in: usize) -> Result<Tensor> {
        if let Some(t) = self.take_pretrained(name, shape)? {
            return self.add(name, t);
        }
        let std = (self.init_scale / fan_in as f64).sqrt() as f32;
        let cut = 2.0 * self.init_scale as f32;
        let mut rng = self.rng(name);
        let mut v = alloc(name, shape)?;
        let n = v.capacity();
        while v.len() < n {
            let z = rng::normal_f32(&mut rng) * std;
            if z.abs() <= cut {
                v.push(z);
            }
        }
        self.add(name, Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// A matrix `[out, in]` (or stacked `[E, out, in]`): fan-in is the last axis.
    pub fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let fan_in = *shape.last().expect("a matrix has dims");
        self.normal(name, shape, fan_in)
    }

    /// A `[rows, cols]` matrix with orthonormal rows (or columns, when rows > cols), by
    /// Gram-Schmidt on Gaussian noise.
    pub fn orthogonal(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        if let Some(t) = self.take_pretrained(name, &[rows, cols])? {
            return self.add(name, t);
        }
        let (m, n) = if rows <= cols { (rows, cols) } else { (cols, rows) };
        let mut rng = self.rng(name);
        let mut vecs: Vec<Vec<f64>> = Vec::with_capacity(m);
        while vecs.len() < m {
            let mut v: Vec<f64> = (0..n).map(|_| rng::normal_f64(&mut rng)).collect();
            for u in &vecs {
                let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-6 {
                vecs.push(v.into_iter().map(|a| a / norm).collect());
            }
        }
        let mut data = vec![0f32; rows * cols];
        for (i, v) in vecs.iter().enumerate() {
            for (j, &a) in v.iter().enumerate() {
                let (r, c) = if rows <= cols { (i, j) } else { (j, i) };
                data[r * cols + c] = a as f32;
            }
        }
        self.add(name, Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
    }

    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Tensor> {
        if let Some(t) = self.take_pretrained(name, shape)? {
            return self.add(name, t);
        }
        let mut v = alloc(name, shape)?;
        v.resize(v.capacity(), value);
        self.add(name, Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// Overwrites every parameter from `tensors`, which must hold each name with its shape.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
        if let Some((name, _)) = self.entries.iter().find(|(n, _)| !tensors.contains_key(n)) {
            return Err(format!("tensor `{name}` is missing"));
        }
        self.overwrite(tensors)
    }

    /// Overwrites the parameters `tensors` names, each with its shape; the others keep their
    /// values. A name the model does not have is an error.
    pub fn overwrite(&self, tensors: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
        if let Some(extra) = tensors.keys().filter(|k| !self.index.contains_key(*k)).min() {
            return Err(format!("tensor `{extra}` is not part of the model the config describes"));
        }
        for (name, var) in self.entries.iter().filter(|(n, _)| tensors.contains_key(n)) {
            let t = &tensors[name];
            if t.dims() != var.dims() {
                return Err(format!(
                    "tensor `{name}` has shape {:?}, but the config gives {:?}",
                    t.dims(),
                    var.dims()
                ));
            }
            // First line only: candle appends a backtrace when RUST_BACKTRACE is set.
            let first_line = |e: candle_core::Error| {
                e.to_string().lines().next().unwrap_or_default().to_string()
            };
            let t = t
                .to_dtype(self.dtype)
                .and_then(|t| t.to_device(&self.device))
                .map_err(first_line)?;
            var.set(&t).map_err(first_line)?;
        }
        Ok(())
    }

    /// Every parameter by name, for saving.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.entries.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }
}
