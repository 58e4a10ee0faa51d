//! Causal multi-head self-attention with RoPE or learned positions, and its KV cache.

use super::layers::Linear;
use super::params::Params;
use crate::config::Bias;
use crate::ops::attention::causal_attention;
use crate::ops::rope::{rope, RopeTables};
use candle_core::{Result, Tensor};

pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
}

/// Keys and values of the positions seen so far, `[B, T, KVH, dh]` each.
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
        p: &mut Params, prefix: &str, d: usize, (n_heads, n_kv_heads): (usize, usize), bias: Bias,
        rope: Option<RopeTables>,
    ) -> Result<Attention> {
        let head_dim = d / n_heads;
        let qkv_bias = matches!(bias, Bias::Qkv | Bias::All);
        let lin = |p: &mut Params, n: &str, out: usize, bias: bool| {
            Linear::new(p, &format!("{prefix}.{n}_proj"), out, d, bias)
        };
        Ok(Attention {
            q: lin(p, "q", d, qkv_bias)?,
            k: lin(p, "k", n_kv_heads * head_dim, qkv_bias)?,
            v: lin(p, "v", n_kv_heads * head_dim, qkv_bias)?,
            o: lin(p, "o", d, bias == Bias::All)?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope,
        })
    }

    /// `x [B·S, d]` → `[B·S, d]`. With a cache, the S new positions follow the cached ones.
    pub fn forward(
        &self, x: &Tensor, b: usize, s: usize, cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (h, kvh, dh) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let heads = |l: &Linear, n: usize| l.forward(x)?.reshape((b, s, n, dh)); // [B, S, n, dh]
        let rotate = |t: Tensor| match &self.rope {
            Some(tables) => rope(&t, tables, offset),
            None => Ok(t),
        };
        let q = rotate(heads(&self.q, h)?)?;
        let mut k = rotate(heads(&self.k, kvh)?)?;
        let mut v = heads(&self.v, kvh)?;
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
