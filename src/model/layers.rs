//! The small pieces every block uses: a linear map and a norm.

use super::params::Params;
use crate::config::Norm as NormKind;
use crate::ops;
use candle_core::{Result, Tensor};

/// `y = x·Wᵀ + b`, `W` stored `[out, in]` as PyTorch's `Linear`.
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn new(
        p: &mut Params, name: &str, out_f: usize, in_f: usize, bias: bool,
    ) -> Result<Linear> {
        let w = p.matrix(&format!("{name}.weight"), &[out_f, in_f])?;
        let b = if bias { Some(p.constant(&format!("{name}.bias"), &[out_f], 0.0)?) } else { None };
        Ok(Linear { w, b })
    }

    /// The maps side by side: one matmul computes all their outputs, concatenated.
    pub fn stacked(parts: &[&Linear]) -> Result<Linear> {
        let w = Tensor::cat(&parts.iter().map(|l| &l.w).collect::<Vec<_>>(), 0)?;
        let b = match parts.iter().map(|l| l.b.as_ref()).collect::<Option<Vec<_>>>() {
            Some(bs) => Some(Tensor::cat(&bs, 0)?),
            None => None,
        };
        Ok(Linear { w, b })
    }

    /// `x [N, in]` → `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.rank() == 2 && ops::fused(&[x, &self.w]) {
            ops::linear::matmul_t(x, &self.w)?
        } else {
            x.matmul(&self.w.t()?)?
        };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Clone)]
pub enum Norm {
    Rms { w: Tensor, eps: f64 },
    Layer { w: Tensor, b: Tensor, eps: f64 },
}

impl Norm {
    pub fn new(p: &mut Params, name: &str, kind: NormKind, d: usize, eps: f64) -> Result<Norm> {
        let w = p.constant(&format!("{name}.weight"), &[d], 1.0)?;
        Ok(match kind {
            NormKind::Rmsnorm => Norm::Rms { w, eps },
            NormKind::Layernorm => {
                Norm::Layer { w, b: p.constant(&format!("{name}.bias"), &[d], 0.0)?, eps }
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { w, eps } => ops::norm::rms_norm(x, w, *eps),
            Norm::Layer { w, b, eps } => ops::norm::layer_norm(x, w, b, *eps),
        }
    }
}
