//! SwiGLU MLP `down(silu(gate(x)) ⊙ up(x))`: the experts, the shared expert and dense layers.

use anyhow::Result;

use super::Step;
use crate::checkpoint::{Checkpoint, Matrix};
use crate::config::Fp8Config;
use crate::kernels::activation::swiglu;
use crate::kernels::matmul::products;

pub struct SwiGlu {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl SwiGlu {
    /// `prefix` is e.g. `model.layers.0.mlp.experts.3.`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        hidden: usize,
        inter: usize,
        fp8: Option<&Fp8Config>,
    ) -> Result<SwiGlu> {
        Ok(SwiGlu {
            gate: Matrix::load(ck, &format!("{prefix}gate_proj.weight"), inter, hidden, fp8)?,
            up: Matrix::load(ck, &format!("{prefix}up_proj.weight"), inter, hidden, fp8)?,
            down: Matrix::load(ck, &format!("{prefix}down_proj.weight"), hidden, inter, fp8)?,
        })
    }

    /// Expert `e` of the fused tensors `{prefix}gate_up_proj` `[E, 2I, H]` (gate rows first)
    /// and `{prefix}down_proj` `[E, H, I]`, in place.
    pub fn load_fused(
        ck: &Checkpoint,
        prefix: &str,
        experts: usize,
        e: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<SwiGlu> {
        let gate_up = format!("{prefix}gate_up_proj");
        let shape = [experts, 2 * inter, hidden];
        Ok(SwiGlu {
            gate: Matrix::load_stacked(ck, &gate_up, shape, e, 0..inter)?,
            up: Matrix::load_stacked(ck, &gate_up, shape, e, inter..2 * inter)?,
            down: Matrix::load_stacked(
                ck,
                &format!("{prefix}down_proj"),
                [experts, hidden, inter],
                e,
                0..hidden,
            )?,
        })
    }

    /// `x` is `[t, hidden]`; returns `[t, hidden]`.
    pub fn forward(&self, x: &[f32], t: usize, step: Step) -> Vec<f32> {
        let p = step.precision;
        let gu = products(&[step.job(x, t, &self.gate), step.job(x, t, &self.up)], p);
        let h = swiglu(&gu[0], &gu[1]);
        products(&[step.job(&h, t, &self.down)], p).remove(0)
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}
