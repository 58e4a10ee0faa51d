//! Causal multi-head self-attention with RoPE or learned positions, and its KV cache.

use super::layers::Linear;
use super::params::Params;
use crate::ops::attention::causal_attention;
use crate::ops::rope::{rope, RopeTables};
use candle_core::{Result, Tensor};

pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
}

/// Keys and values of the positions seen so far, `[B, T, H, dh]` each.
#[derive(Default, Clone)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Attention {
    pub fn new(
        p: &mut Params, prefix: &str, d: usize, n_heads: usize, bias: bool,
        rope: Option<RopeTables>,
    ) -> Result<Attention> {
        let lin =
            |p: &mut Params, n: &str| Linear::new(p, &format!("{prefix}.{n}_proj"), d, d, bias);
        Ok(Attention {
            q: lin(p, "q")?,
            k: lin(p, "k")?,
            v: lin(p, "v")?,
            o: lin(p, "o")?,
            n_heads,
            head_dim: d / n_heads,
            rope,
        })
    }

    /// `x [B·S, d]` → `[B·S, d]`. With a cache, the S new positions follow the cached ones.
    pub fn forward(
        &self, x: &Tensor, b: usize, s: usize, cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (h, dh) = (self.n_heads, self.head_dim);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let heads = |l: &Linear| l.forward(x)?.reshape((b, s, h, dh)); // [B, S, H, dh]
        let rotate = |t: Tensor| match &self.rope {
            Some(tables) => rope(&t, tables, offset),
            None => Ok(t),
        };
        let q = rotate(heads(&self.q)?)?;
        let mut k = rotate(heads(&self.k)?)?;
        let mut v = heads(&self.v)?;
        if let Some(c) = cache {
            if let (Some(pk), Some(pv)) = (&c.k, &c.v) {
                k = Tensor::cat(&[pk, &k], 1)?;
                v = Tensor::cat(&[pv, &v], 1)?;
            }
            c.k = Some(k.clone());
            c.v = Some(v.clone());
        }
        let y = causal_attention(&q, &k, &v, 1.0 / (dh as f64).sqrt())?; // [B, S, H, dh]
        self.o.forward(&y.reshape((b * s, h * dh))?)
    }
}
