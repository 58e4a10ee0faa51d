//! The experts that MoE and MoT layers share: E feed-forward networks with stacked weights,
//! run together on the rows each one was given (grouped matmuls, one expert after another).

use super::context::FfnContext;
use super::ffn::activate;
use super::params::Params;
use crate::config::Activation;
use crate::ops::fused;
use crate::ops::grouped::{grouped_matmul, grouped_matmul_cat, grouped_up};
use crate::ops::swiglu::swiglu;
use candle_core::{Result, Tensor};

/// E experts of width f with stacked weights `[E, f, d]` (gate, up) and `[E, d, f]` (down).
pub struct Experts {
    pub(super) gate: Option<Tensor>,
    pub(super) up: Tensor,
    pub(super) down: Tensor,
    pub(super) activation: Activation,
}

impl Experts {
    pub fn new(
        p: &mut Params, prefix: &str, e: usize, d: usize, f: usize, activation: Activation,
    ) -> Result<Experts> {
        let gate = match activation {
            Activation::Swiglu => Some(p.matrix(&format!("{prefix}.gate"), &[e, f, d])?),
            _ => None,
        };
        Ok(Experts {
            gate,
            up: p.matrix(&format!("{prefix}.up"), &[e, f, d])?,
            down: p.matrix(&format!("{prefix}.down"), &[e, d, f])?,
            activation,
        })
    }

    pub fn count(&self) -> usize {
        self.up.dims()[0]
    }

    /// Every expert on its rows: `x [R, d]` holds expert `e`'s rows at
    /// `[offsets[e], offsets[e+1])`; → `[R, d]`. With `recompute` (on CPU) the hidden
    /// activations are not kept for backward but computed again there.
    pub fn forward(&self, x: &Tensor, offsets: &[usize], ctx: &FfnContext) -> Result<Tensor> {
        let train = ctx.train;
        let hidden = match &self.gate {
            _ if ctx.recompute && fused(&[x, &self.up]) => {
                grouped_up(x, self.gate.as_ref(), &self.up, self.activation, offsets)?
            }
            Some(gate) => swiglu(&grouped_matmul_cat(x, gate, &self.up, offsets, train)?)?, // [R, 2f] → [R, f]
            None => activate(self.activation, &grouped_matmul(x, &self.up, offsets, train)?)?,
        };
        grouped_matmul(&hidden, &self.down, offsets, train)
    }
}
