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
    pub fn new(
        p: &mut Params, prefix: &str, d: usize, f: usize, activation: Activation, bias: bool,
    ) -> Result<DenseFfn> {
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
        let hidden = match &self.gate {
            // One matmul for gate and up: `[N, 2f]`, then the fused gate.
            Some(gate) => swiglu(&Linear::stacked(&[gate, &self.up])?.forward(x)?)?,
            None => activate(self.activation, &self.up.forward(x)?)?,
        };
        self.down.forward(&hidden)
    }
}

/// A non-gated activation.
pub fn activate(activation: Activation, x: &Tensor) -> Result<Tensor> {
    match activation {
        Activation::Gelu => x.gelu_erf(),
        Activation::Relu => x.relu(),
        Activation::Swiglu => swiglu(x),
    }
}
