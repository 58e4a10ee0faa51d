//! AdamW with f32 moments and decoupled weight decay (`p -= lr·wd·p`) on tensors of two or more
//! dims. On CPU the update is one in-place pass per tensor over parameter, gradient and moments.

use crate::config::TrainConfig;
use crate::model::Params;
use crate::ops::vec::{prefetch, AHEAD, LINE};
use crate::ops::{simd, slice};
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

pub struct Slot {
    pub name: String,
    pub var: Var,
    decay: bool,
    moments: Moments,
}

pub struct AdamW {
    pub slots: Vec<Slot>,
    /// Updates taken so far (Adam's t).
    pub t: u64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// State for every parameter that `trainable` admits.
    pub fn new(
        params: &Params, trainable: impl Fn(&str) -> bool, cfg: &TrainConfig,
    ) -> Result<AdamW> {
        let mut slots = Vec::new();
        for (name, var) in params.iter().filter(|(n, _)| trainable(n)) {
            let moments = if var.device().is_cpu() {
                Moments::Host { m: vec![0.0; var.elem_count()], v: vec![0.0; var.elem_count()] }
            } else {
                Moments::Device { m: var.zeros_like()?, v: var.zeros_like()? }
            };
            slots.push(Slot {
                name: name.to_string(),
                var: var.clone(),
                decay: var.rank() >= 2,
                moments,
            });
        }
        Ok(AdamW { slots, t: 0, betas: cfg.betas, eps: cfg.eps, weight_decay: cfg.weight_decay })
    }

    /// One update with `grads` aligned with `slots`, each multiplied by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let k = Kernel::new(lr, self.betas, self.eps, self.t, grad_scale);
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let wd = k.decay_factor(slot.decay, lr, self.weight_decay);
            let g = g.contiguous()?;
            match &mut slot.moments {
                Moments::Host { m, v } => {
                    let op = HostUpdate { k: &k, wd, m: Mutex::new(m), v: Mutex::new(v) };
                    slot.var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Device { m, v } => {
                    let g = (g * k.gscale as f64)?;
                    let nm = ((&*m * k.b1 as f64)? + (&g * (1.0 - k.b1) as f64)?)?;
                    let nv = ((&*v * k.b2 as f64)? + (g.sqr()? * (1.0 - k.b2) as f64)?)?;
                    let upd =
                        ((&nm / k.bc1 as f64)? / ((&nv / k.bc2 as f64)?.sqrt()? + k.eps as f64)?)?;
                    let p = ((slot.var.as_tensor() * wd as f64)? - (upd * k.lr as f64)?)?;
                    slot.var.set(&p)?;
                    *m = nm;
                    *v = nv;
                }
            }
        }
        Ok(())
    }

    /// Moments as tensors named `{param}.exp_avg` / `{param}.exp_avg_sq`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let (m, v) = match &s.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, s.var.shape(), &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, s.var.shape(), &candle_core::Device::Cpu)?,
                ),
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("{}.exp_avg", s.name), m);
            out.insert(format!("{}.exp_avg_sq", s.name), v);
        }
        Ok(out)
    }

    pub fn load_state(
        &mut self, tensors: &HashMap<String, Tensor>, t: u64,
    ) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            let get = |suffix| moment(tensors, &s.name, suffix, &s.var);
            let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
            s.moments = match &s.moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?,
                    v: v.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?,
                },
                Moments::Device { .. } => {
                    let dev = s.var.device();
                    Moments::Device {
                        m: m.to_device(dev).map_err(|e| e.to_string())?,
                        v: v.to_device(dev).map_err(|e| e.to_string())?,
                    }
                }
            };
        }
        self.t = t;
        Ok(())
    }
}

/// A checkpoint's moment `{name}.{suffix}` (exp_avg or exp_avg_sq) of the parameter `var`, in
/// f32, checked against the parameter's shape.
pub(super) fn moment(
    tensors: &HashMap<String, Tensor>, name: &str, suffix: &str, var: &Var,
) -> std::result::Result<Tensor, String> {
    let key = format!("{name}.{suffix}");
    let t = tensors.get(&key).ok_or_else(|| format!("optimizer tensor `{key}` is missing"))?;
    if t.dims() != var.dims() {
        return Err(format!(
            "optimizer tensor `{key}` has shape {:?}, expected {:?}",
            t.dims(),
            var.dims()
        ));
    }
    t.to_dtype(DType::F32).map_err(|e| e.to_string())
}

/// The scalars of one AdamW update, in the f32 the update runs in.
pub(super) struct Kernel {
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    gscale: f32,
}

impl Kernel {
    /// Update number `t` (from 1) at learning rate `lr`, gradients scaled by `gscale` (clipping).
    pub(super) fn new(lr: f64, betas: [f64; 2], eps: f64, t: u64, gscale: f64) -> Kernel {
        Kernel {
            lr: lr as f32,
            b1: betas[0] as f32,
            b2: betas[1] as f32,
            eps: eps as f32,
            bc1: (1.0 - betas[0].powi(t as i32)) as f32,
            bc2: (1.0 - betas[1].powi(t as i32)) as f32,
            gscale: gscale as f32,
        }
    }

    /// The decoupled weight decay as a factor on the parameter (1 for tensors that do not decay).
    pub(super) fn decay_factor(&self, decay: bool, lr: f64, weight_decay: f64) -> f32 {
        if decay {
            (1.0 - lr * weight_decay) as f32
        } else {
            1.0
        }
    }

    /// The update of `p [i]` with its moments and gradient, for every i.
    #[inline(always)]
    fn update(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], wd: f32) {
        for i in 0..p.len() {
            let gi = g[i] * self.gscale;
            m[i] = self.b1 * m[i] + (1.0 - self.b1) * gi;
            v[i] = self.b2 * v[i] + (1.0 - self.b2) * gi * gi;
            let update = (m[i] / self.bc1) / ((v[i] / self.bc2).sqrt() + self.eps);
            p[i] = p[i] * wd - self.lr * update;
        }
    }

    /// The update of `p` in place, with its moments, element by element (rayon over chunks).
    pub(super) fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], wd: f32) {
        const CHUNK: usize = 8192;
        let k = self;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                simd::run(
                    #[inline(always)]
                    || {
                        let n = p.len() / LINE * LINE;
                        // A line of each at a time (exact chunks, so the loop vectorises), each
                        // asked for AHEAD (see `vec::AHEAD`); then the ragged end.
                        let lines = p[..n]
                            .chunks_exact_mut(LINE)
                            .zip(m[..n].chunks_exact_mut(LINE))
                            .zip(v[..n].chunks_exact_mut(LINE))
                            .zip(g[..n].chunks_exact(LINE));
                        for (((p, m), v), g) in lines {
                            for x in [p.as_ptr(), m.as_ptr(), v.as_ptr(), g.as_ptr()] {
                                prefetch(x.wrapping_add(AHEAD));
                            }
                            k.update(p, m, v, g, wd);
                        }
                        k.update(&mut p[n..], &mut m[n..], &mut v[n..], &g[n..], wd);
                    },
                )
            });
    }
}

struct HostUpdate<'a> {
    k: &'a Kernel,
    wd: f32,
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
}

impl InplaceOp2 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self, ps: &mut CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout,
    ) -> Result<()> {
        let g = slice(gs, gl)?;
        let Some((a, b)) = pl.contiguous_offsets() else {
            candle_core::bail!("adamw: parameter is not contiguous")
        };
        let CpuStorage::F32(p) = ps else { candle_core::bail!("adamw: parameters must be f32") };
        let p = &mut p[a..b];
        let (mut m, mut v) = (self.m.lock().unwrap(), self.v.lock().unwrap());
        self.k.apply(p, m.as_mut_slice(), v.as_mut_slice(), g, self.wd);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on a 2×2 matrix and a vector, against a hand-rolled f64 AdamW.
    #[test]
    fn matches_a_naive_adamw() {
        let mut params = Params::new(&Device::Cpu, 0, 0.1);
        let w = params.matrix("w", &[2, 2]).unwrap();
        let b = params.constant("b", &[2], 0.5).unwrap();
        let cfg =
            TrainConfig { betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(&params, |_| true, &cfg).unwrap();
        // w and b as one vector of 6.
        let flat = || -> Vec<f32> {
            let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            w.into_iter().chain(b.to_vec1::<f32>().unwrap()).collect()
        };
        let p0: Vec<f64> = flat().into_iter().map(|x| x as f64).collect();
        let gs = [[0.1f32, -0.2, 0.3, 0.4, 1.0, -1.0], [0.2, 0.1, -0.3, 0.0, 0.5, 0.5]];
        let (lr, scale) = (0.01f64, 0.5f64);
        for g in &gs {
            let gw = Tensor::from_slice(&g[..4], (2, 2), &Device::Cpu).unwrap();
            let gb = Tensor::from_slice(&g[4..], 2, &Device::Cpu).unwrap();
            opt.step(&[gw, gb], lr, scale).unwrap();
        }
        let (mut p, mut m, mut v) = (p0, [0f64; 6], [0f64; 6]);
        for (t, g) in gs.iter().enumerate() {
            for i in 0..6 {
                let gi = g[i] as f64 * scale;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.95 * v[i] + 0.05 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - 0.95f64.powi(t as i32 + 1));
                let wd = if i < 4 { 1.0 - lr * 0.1 } else { 1.0 };
                p[i] = p[i] * wd - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = flat();
        for i in 0..6 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{i}: {} vs {}", got[i], p[i]);
        }
    }

    /// The update a cache line at a time, with a ragged end, against an f64 loop element by
    /// element: every element of every chunk is updated once, with its own moments and gradient.
    #[test]
    fn the_update_by_lines_matches_an_element_loop() {
        let n = 8192 + 3 * 16 + 5; // a whole chunk, then three lines and five more
        let init = |seed: u64| -> Vec<f32> {
            let mut rng = crate::rng::seeded(seed);
            (0..n).map(|_| crate::rng::normal_f32(&mut rng)).collect()
        };
        let (lr, betas, eps, t, scale, wd) = (1e-2, [0.9, 0.95], 1e-8, 2u64, 0.5, 0.99);
        let k = Kernel::new(lr, betas, eps, t, scale);
        let (g, v0): (Vec<f32>, Vec<f32>) = (init(4), init(3).iter().map(|x| x * x).collect());
        let (mut p, mut m, mut v) = (init(1), init(2), v0.clone());
        k.apply(&mut p, &mut m, &mut v, &g, wd as f32);
        let (p0, m0) = (init(1), init(2));
        for i in 0..n {
            let gi = g[i] as f64 * scale;
            let mi = betas[0] * m0[i] as f64 + (1.0 - betas[0]) * gi;
            let vi = betas[1] * v0[i] as f64 + (1.0 - betas[1]) * gi * gi;
            let (bc1, bc2) = (1.0 - betas[0].powi(t as i32), 1.0 - betas[1].powi(t as i32));
            let pi = p0[i] as f64 * wd - lr * (mi / bc1) / ((vi / bc2).sqrt() + eps);
            for (name, got, want) in [("p", p[i], pi), ("m", m[i], mi), ("v", v[i], vi)] {
                let err = (got as f64 - want).abs();
                assert!(err <= 1e-5 * (1.0 + want.abs()), "{name}[{i}]: {got} vs {want}");
            }
        }
    }

    /// The fused update gives the same numbers on every SIMD path, at a length with a ragged
    /// last chunk.
    #[test]
    fn the_update_is_the_same_on_every_simd_path() {
        use crate::ops::simd;
        let n = 20_011;
        let init = |seed: u64| -> Vec<f32> {
            let mut rng = crate::rng::seeded(seed);
            (0..n).map(|_| crate::rng::normal_f32(&mut rng)).collect()
        };
        let (g, k) = (init(4), Kernel::new(1e-3, [0.9, 0.95], 1e-8, 3, 0.7));
        let step = |level| {
            let v: Vec<f32> = init(3).iter().map(|x| x * x).collect();
            let (mut p, mut m, mut v) = (init(1), init(2), v);
            simd::with_level(level, || k.apply(&mut p, &mut m, &mut v, &g, 0.999));
            [p, m, v]
        };
        let portable = step(simd::Level::Portable);
        for level in simd::available() {
            for (a, b) in step(level).iter().zip(&portable) {
                crate::ops::testing::assert_rel_close(&format!("{level}"), a, b, 1e-6);
            }
        }
    }
}
