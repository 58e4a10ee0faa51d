//! ZeRO stage 1: AdamW whose moments are sharded over the data-parallel ranks.
//!
//! The trainable tensors, in slot order, form one flat vector of `total` elements, padded to a
//! multiple of the world size; rank r owns `dist::shard_range(total, size, r)` of it. A step
//! reduce-scatters the gradients (each rank receives the sum of its shard only), updates its
//! shard of the parameters with its shard of the moments, and all-gathers the parameters. Each
//! rank keeps `2·total/size` moments instead of `2·total`. The update is element-wise and the
//! same kernel as unsharded AdamW's, so both compute the same numbers.

use super::optim::{moment, Kernel};
use crate::config::TrainConfig;
use crate::dist::{padded_len, shard_range, Dist};
use crate::model::Params;
use candle_core::{Device, Result, Tensor, Var};
use std::collections::HashMap;
use std::ops::Range;

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// The slot's elements in the flat vector.
    range: Range<usize>,
}

pub struct ShardedAdamW {
    slots: Vec<Slot>,
    total: usize,
    /// This rank's elements of the flat vector.
    shard: Range<usize>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Updates taken so far (Adam's t).
    pub t: u64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    size: usize,
}

/// A step's gradients as this rank holds them after the reduce-scatter: its shard, summed.
pub struct ShardGrads(Vec<f32>);

impl ShardedAdamW {
    /// State for this rank's shard of every parameter that `trainable` admits.
    pub fn new(
        params: &Params, trainable: impl Fn(&str) -> bool, cfg: &TrainConfig, dist: &Dist,
    ) -> Result<ShardedAdamW> {
        let mut slots = Vec::new();
        let mut total = 0;
        for (name, var) in params.iter().filter(|(n, _)| trainable(n)) {
            if !var.device().is_cpu() {
                candle_core::bail!("train.zero = 1 runs on the CPU only (for now)");
            }
            let n = var.elem_count();
            let decay = var.rank() >= 2;
            slots.push(Slot {
                name: name.to_string(),
                var: var.clone(),
                decay,
                range: total..total + n,
            });
            total += n;
        }
        let size = dist.size();
        let shard = shard_range(total, size, dist.rank());
        let n = shard.len();
        Ok(ShardedAdamW {
            slots,
            total,
            shard,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
            betas: cfg.betas,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            size,
        })
    }

    /// The variables whose gradients `reduce` expects, in order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Moments this rank holds (both of them), for the memory report.
    pub fn moments_len(&self) -> usize {
        self.m.len() + self.v.len()
    }

    /// The flat vector of `tensors` (one per slot), zero-padded for the collectives.
    fn flatten(&self, tensors: &[Tensor]) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(padded_len(self.total, self.size));
        for t in tensors {
            flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        flat.resize(padded_len(self.total, self.size), 0.0);
        Ok(flat)
    }

    /// Sums this rank's local gradients with every other rank's; keeps this rank's shard.
    pub fn reduce(&self, dist: &Dist, local: &[Tensor]) -> Result<ShardGrads> {
        let mut shard = dist.reduce_scatter_sum(&self.flatten(local)?);
        shard.truncate(self.shard.len());
        Ok(ShardGrads(shard))
    }

    /// The global gradient norm, from every rank's shard.
    pub fn norm(&self, dist: &Dist, grads: &ShardGrads) -> f64 {
        let mut sq = [crate::ops::sum_of_squares_host(&grads.0)];
        dist.all_reduce_sum_in_place_f64(&mut sq);
        sq[0].sqrt()
    }

    /// One update of this rank's shard, then every rank's updated parameters gathered into
    /// every rank's model.
    pub fn step(
        &mut self, dist: &Dist, grads: &ShardGrads, lr: f64, grad_scale: f64,
    ) -> Result<()> {
        self.t += 1;
        let k = Kernel::new(lr, self.betas, self.eps, self.t, grad_scale);
        let params: Vec<Tensor> = self.slots.iter().map(|s| s.var.as_tensor().clone()).collect();
        let flat = self.flatten(&params)?;
        let mut mine = flat[self.shard.clone()].to_vec();
        for s in &self.slots {
            // The part of this slot inside the shard, relative to the shard's start.
            let (a, b) = (s.range.start.max(self.shard.start), s.range.end.min(self.shard.end));
            if a >= b {
                continue;
            }
            let r = a - self.shard.start..b - self.shard.start;
            let wd = k.decay_factor(s.decay, lr, self.weight_decay);
            let (m, v) = (&mut self.m[r.clone()], &mut self.v[r.clone()]);
            k.apply(&mut mine[r.clone()], m, v, &grads.0[r], wd);
        }
        let gathered = dist.all_gather(&self.padded_shard(&mine));
        for s in &self.slots {
            let t = Tensor::from_slice(&gathered[s.range.clone()], s.var.shape(), &Device::Cpu)?;
            s.var.set(&t)?;
        }
        Ok(())
    }

    /// This rank's shard padded to the common shard length.
    fn padded_shard(&self, shard: &[f32]) -> Vec<f32> {
        let mut out = shard.to_vec();
        out.resize(padded_len(self.total, self.size) / self.size, 0.0);
        out
    }

    /// Every rank's moments, gathered, as tensors named `{param}.exp_avg` / `.exp_avg_sq`: the
    /// checkpoint holds the same optimizer state as an unsharded run's. A collective.
    pub fn state_tensors(&self, dist: &Dist) -> Result<HashMap<String, Tensor>> {
        let m = dist.all_gather(&self.padded_shard(&self.m));
        let v = dist.all_gather(&self.padded_shard(&self.v));
        let mut out = HashMap::new();
        for s in &self.slots {
            let r = s.range.clone();
            let shape = s.var.shape();
            out.insert(
                format!("{}.exp_avg", s.name),
                Tensor::from_slice(&m[r.clone()], shape, &Device::Cpu)?,
            );
            out.insert(
                format!("{}.exp_avg_sq", s.name),
                Tensor::from_slice(&v[r], shape, &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Takes this rank's shard of a checkpoint's (unsharded) moments.
    pub fn load_state(
        &mut self, tensors: &HashMap<String, Tensor>, t: u64,
    ) -> std::result::Result<(), String> {
        let (mut m, mut v) = (Vec::with_capacity(self.total), Vec::with_capacity(self.total));
        for s in &self.slots {
            for (suffix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let t = moment(tensors, &s.name, suffix, &s.var)?;
                let flat =
                    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())?;
                out.extend(flat);
            }
        }
        self.m = m[self.shard.clone()].to_vec();
        self.v = v[self.shard.clone()].to_vec();
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamW;

    /// In a world of one the shard is everything: sharded and unsharded AdamW must compute the
    /// same parameters and moments, bit for bit (decaying matrices and non-decaying vectors).
    #[test]
    fn one_shard_equals_unsharded_adamw() {
        let make = || {
            let mut p = Params::new(&Device::Cpu, 1, 0.1);
            p.matrix("w", &[3, 5]).unwrap();
            p.constant("b", &[5], 0.5).unwrap();
            p.matrix("v", &[2, 2]).unwrap();
            p
        };
        let cfg = TrainConfig { weight_decay: 0.1, ..Default::default() };
        let (pa, pb) = (make(), make());
        let mut full = AdamW::new(&pa, |_| true, &cfg).unwrap();
        let dist = Dist::single();
        let mut sharded = ShardedAdamW::new(&pb, |_| true, &cfg, &dist).unwrap();
        for step in 0..3 {
            let grads: Vec<Tensor> =
                pa.iter().map(|(_, v)| crate::ops::testing::randn(v.dims(), 10 + step)).collect();
            full.step(&grads, 0.01, 0.7).unwrap();
            let shard = sharded.reduce(&dist, &grads).unwrap();
            sharded.step(&dist, &shard, 0.01, 0.7).unwrap();
        }
        for ((name, a), (_, b)) in pa.iter().zip(pb.iter()) {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{name}");
        }
        let (ma, mb) = (full.state_tensors().unwrap(), sharded.state_tensors(&dist).unwrap());
        for (k, t) in &ma {
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = mb[k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
        // And the moments load back into a fresh sharded optimizer.
        let mut again = ShardedAdamW::new(&pb, |_| true, &cfg, &dist).unwrap();
        again.load_state(&mb, 3).unwrap();
        assert_eq!(again.m, sharded.m);
        assert_eq!(again.t, 3);
    }
}
