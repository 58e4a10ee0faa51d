//! The dense feed-forward network: SwiGLU `down(silu(gate(x)) · up(x))`, or `down(act(up(x)))`.

use super::layers::Linear;
use super::params::Params;
use crate::config::Activation;
use crate::ops::swiglu::swiglu;
use candle_core::{Result, Tensor};

pub struct DenseFfn {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    activation: Activation,
}

impl DenseFfn {
    pub fn new(p: &mut Params, prefix: &str, d: usize, f: usize, activation: Activation, bias: bool) -> Result<DenseFfn> {
        let gate = match activation {
            Activation::Swiglu => Some(Linear::new(p, &format!("{prefix}.gate_proj"), f, d, bias)?),
            _ => None,
        };
        Ok(DenseFfn {
            gate,
            up: Linear::new(p, &format!("{prefix}.up_proj"), f, d, bias)?,
            down: Linear::new(p, &format!("{prefix}.down_proj"), d, f, bias)?,
            activation,
        })
    }

    /// `x [N, d]` → `[N, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = activate(self.activation, self.gate.as_ref().map(|g| g.forward(x)).transpose()?, self.up.forward(x)?)?;
        self.down.forward(&hidden)
    }
}

/// The block's activation on the up projection (and, for SwiGLU, the gate projection).
pub fn activate(activation: Activation, gate: Option<Tensor>, up: Tensor) -> Result<Tensor> {
    match (activation, gate) {
        (Activation::Swiglu, Some(g)) => swiglu(&g, &up),
        (Activation::Gelu, _) => up.gelu_erf(),
        (Activation::Relu, _) => up.relu(),
        (Activation::Swiglu, None) => candle_core::bail!("swiglu needs a gate projection"),
    }
}
