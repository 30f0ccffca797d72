//! Adam on the scores, fused with the refresh of the keep thresholds (`shaders/adam.wgsl`).

use super::StepState;
use super::{check, groups_for, mask::keep_words, u32_of};
use crate::error::Result;
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// Adam's hyperparameters. The default is the project's one default for training the scores
/// (the training configuration takes it from here): PRISM's betas (0.5, 0.999) and eps 1e-8,
/// and lr 0.3 where the paper has 0.1, because 0.3 learned faster within the default run's
/// budget (README's lr rows; `--lr 0.1` restores the paper's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 0.3,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// `AdamParams` of shaders/adam_update.wgsl: the hyperparameters as the kernels read them.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AdamParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    ln_beta1: f32,
    ln_beta2: f32,
    _pad: [u32; 2],
}

impl From<&AdamConfig> for AdamParams {
    fn from(cfg: &AdamConfig) -> Self {
        Self {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            // In f64: the bias corrections of the first steps are sensitive to them.
            ln_beta1: (cfg.beta1 as f64).ln() as f32,
            ln_beta2: (cfg.beta2 as f64).ln() as f32,
            _pad: [0; 2],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
    adam: AdamParams,
}

/// A layer's training state, which an Adam step updates: its scores, their Adam moments
/// ((m, v) interleaved, 2n f32), the keep thresholds written for the next step, and the step
/// state it is at.
pub struct TrainingState<'a> {
    pub scores: &'a Tensor,
    pub moments: &'a Tensor,
    pub keep: &'a Tensor,
    pub step: &'a Tensor,
}

impl TrainingState<'_> {
    /// Checks the state's sizes for `n` scores.
    pub(crate) fn check(&self, n: usize) -> Result<()> {
        check(self.scores, n, DType::F32, "scores")?;
        check(self.moments, 2 * n, DType::F32, "Adam moments")?;
        check(self.keep, keep_words(n), DType::U32, "keep thresholds")?;
        check(self.step, StepState::WORDS, DType::U32, "step state")
    }
}

/// One Adam step (t = step.step + 1) on the state's scores from their gradient `grad`,
/// refreshing the keep thresholds.
pub fn step(gpu: &Gpu, cfg: &AdamConfig, grad: &Tensor, state: &TrainingState) -> Result<Kernel> {
    let n = state.scores.len();
    check(grad, n, DType::F32, "gradient")?;
    state.check(n)?;
    let p = Params {
        n: u32_of(n, "scores")?,
        _pad: [0; 3],
        adam: cfg.into(),
    };
    let quads = gpu.features().vectors_per_invocation;
    Ok(gpu
        .kernel(
            ShaderKey::new("adam.wgsl").def("quads", quads),
            "step_scores",
        )
        .params(&p)
        .bind("step", state.step)
        .bind_padded("grad", grad, 16)
        .bind_padded("scores", state.scores, 16)
        .bind_padded("moments", state.moments, 32)
        .bind_padded("keep", state.keep, 8)
        .groups(groups_for(n.div_ceil(4), 256 * quads as usize)?)
        .build()?)
}

/// losses[step - step_base] <- loss\[1\] (the loss value of the step just taken).
pub fn record_loss(gpu: &Gpu, step: &Tensor, loss: &Tensor, losses: &Tensor) -> Result<Kernel> {
    check(step, StepState::WORDS, DType::U32, "step state")?;
    Ok(gpu
        .kernel(ShaderKey::new("adam.wgsl"), "record_loss")
        .bind("step", step)
        .bind("loss_in", loss)
        .bind("losses", losses)
        .groups(1)
        .build()?)
}

/// Increments `step.step` on the GPU.
pub fn advance(gpu: &Gpu, step: &Tensor) -> Result<Kernel> {
    check(step, StepState::WORDS, DType::U32, "step state")?;
    Ok(gpu
        .kernel(ShaderKey::new("adam.wgsl"), "advance")
        .bind("step_out", step)
        .groups(1)
        .build()?)
}

/// CPU twin.
pub mod cpu {
    use super::AdamConfig;

    /// Moments below this are flushed to zero, and gradients below [`TINY_GRADIENT`] are not
    /// squared, as in `shaders/adam.wgsl` (it says why: subnormals).
    pub const TINY_MOMENT: f32 = 1e-30;
    pub const TINY_GRADIENT: f32 = 1e-18;

    fn flush(x: f32) -> f32 {
        if x.abs() < TINY_MOMENT {
            0.0
        } else {
            x
        }
    }

    /// One Adam step with bias correction at step `t` (1-based); moments interleaved (m, v).
    pub fn step(cfg: &AdamConfig, t: u32, grad: &[f32], scores: &mut [f32], moments: &mut [f32]) {
        let c1 = (1.0 - (cfg.beta1 as f64).powi(t as i32)) as f32;
        let c2 = (1.0 - (cfg.beta2 as f64).powi(t as i32)) as f32;
        for i in 0..scores.len() {
            let g = grad[i];
            let m = flush(cfg.beta1 * moments[2 * i] + (1.0 - cfg.beta1) * g);
            let gs = if g.abs() < TINY_GRADIENT { 0.0 } else { g };
            let v = flush(cfg.beta2 * moments[2 * i + 1] + (1.0 - cfg.beta2) * gs * gs);
            moments[2 * i] = m;
            moments[2 * i + 1] = v;
            scores[i] -= cfg.lr * (m / c1) / ((v / c2).sqrt() + cfg.eps);
        }
    }
}
