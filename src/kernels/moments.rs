//! Mean-and-variance feature matching with GFMN's moving-average estimator, the reference
//! code's loss (`shaders/moments.wgsl`, PRISM.md section 3): real statistics streamed over a
//! client's data, and the per-step tracker update with the generator's feature gradient.

use super::adam::{AdamConfig, AdamParams};
use super::{check, groups_for, u32_of, StepState};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// The trackers' Adam and the loss weight. The reference: lr 1e-5 (`lrMovAvrg`), betas
/// (0.5, 0.999) (its `beta1` serves the trackers too), eps 1e-8.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackerConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Multiplies the generator's gradient and the reported loss.
    pub weight: f32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
            weight: 1.0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    d: u32,
    offset: u32,
    total_d: u32,
    weight: f32,
    count: u32,
    _pad: [u32; 2],
    adam: AdamParams,
}

impl Params {
    fn with(cfg: &TrackerConfig) -> Params {
        let adam = AdamConfig {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
        };
        Params {
            weight: cfg.weight,
            adam: (&adam).into(),
            ..Default::default()
        }
    }
}

fn key() -> ShaderKey {
    ShaderKey::new("moments.wgsl")
}

/// Merges the first `rows` rows of a batch of features f [>= rows, d] into the running
/// (mean, M2) pairs `acc` \[2d\], which already hold `before` samples (0: overwrite).
pub fn stats_merge(
    gpu: &Gpu,
    f: &Tensor,
    rows: usize,
    d: usize,
    before: usize,
    acc: &Tensor,
) -> Result<Kernel> {
    if rows == 0 || rows * d > f.len() || d == 0 {
        return Err(Error::invalid(format!(
            "feature statistics: {rows} rows of {d} features from {} values",
            f.len()
        )));
    }
    check(acc, 2 * d, DType::F32, "feature statistics accumulator")?;
    let p = Params {
        n: u32_of(rows, "rows")?,
        d: u32_of(d, "features")?,
        count: u32_of(before, "samples")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(key(), "stats_merge")
        .params(&p)
        .bind("f", f)
        .bind("acc", acc)
        .groups(groups_for(d, 256)?)
        .build()?)
}

/// real \[2d\] <- (mean, unbiased variance) from the accumulator of `count` samples.
pub fn stats_finish(gpu: &Gpu, acc: &Tensor, count: usize, real: &Tensor) -> Result<Kernel> {
    let d = acc.len() / 2;
    check(real, 2 * d, DType::F32, "real feature statistics")?;
    if count < 2 {
        return Err(Error::invalid(
            "feature statistics need at least two real samples",
        ));
    }
    let p = Params {
        d: u32_of(d, "features")?,
        count: u32_of(count, "samples")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(key(), "stats_finish")
        .params(&p)
        .bind("acc_in", acc)
        .bind("real", real)
        .groups(groups_for(d, 256)?)
        .build()?)
}

/// The buffers of one tapped layer during a training step.
pub struct LayerIo<'a> {
    /// Generated features [n, d].
    pub features: &'a Tensor,
    /// Real (mean, variance) per feature \[2d\].
    pub real: &'a Tensor,
    /// Trackers (v_m, v_v) per feature \[2d\].
    pub track: &'a Tensor,
    /// The trackers' Adam moments \[4d\].
    pub opt: &'a Tensor,
    /// dL/d features [n, d] (written).
    pub grad: &'a Tensor,
}

/// One training step's tracker update and feature gradient for a layer of `d` features whose
/// first feature is number `offset` of `total_d`; `terms` [2 total_d] receive the loss terms.
pub fn step(
    gpu: &Gpu,
    cfg: &TrackerConfig,
    io: &LayerIo,
    offset: usize,
    terms: &Tensor,
    step: &Tensor,
) -> Result<Kernel> {
    let d = io.real.len() / 2;
    let n = io.features.len() / d.max(1);
    if d == 0 || n < 2 || n * d != io.features.len() {
        return Err(Error::invalid(format!(
            "moment matching needs at least two samples of {d} features, got {} values",
            io.features.len()
        )));
    }
    let total_d = terms.len() / 2;
    if offset + d > total_d {
        return Err(Error::invalid(
            "moment terms: layer past the end of the terms",
        ));
    }
    check(io.track, 2 * d, DType::F32, "moment trackers")?;
    check(io.opt, 4 * d, DType::F32, "moment trackers' Adam state")?;
    check(io.grad, n * d, DType::F32, "feature gradient")?;
    check(step, StepState::WORDS, DType::U32, "step state")?;
    let p = Params {
        n: u32_of(n, "batch")?,
        d: u32_of(d, "features")?,
        offset: offset as u32,
        total_d: u32_of(total_d, "features")?,
        ..Params::with(cfg)
    };
    Ok(gpu
        .kernel(key(), "step_layer")
        .params(&p)
        .bind("f", io.features)
        .bind("real_in", io.real)
        .bind("track", io.track)
        .bind("opt", io.opt)
        .bind("df", io.grad)
        .bind("terms", terms)
        .bind("step", step)
        .groups(groups_for(d, 256)?)
        .build()?)
}

/// loss [>= 2] <- (weight * objective, weight * mean squared moment difference) from `terms`.
pub fn reduce(gpu: &Gpu, cfg: &TrackerConfig, terms: &Tensor, loss: &Tensor) -> Result<Kernel> {
    if loss.len() < 2 || loss.dtype() != DType::F32 || terms.len() < 2 {
        return Err(Error::invalid("moment loss: bad terms or loss buffer"));
    }
    let p = Params {
        total_d: u32_of(terms.len() / 2, "features")?,
        ..Params::with(cfg)
    };
    Ok(gpu
        .kernel(key(), "reduce")
        .params(&p)
        .bind("terms_in", terms)
        .bind("loss", loss)
        .groups(1)
        .build()?)
}

/// CPU twins (f64 inside).
pub mod cpu {
    use super::TrackerConfig;

    /// (mean, unbiased variance) of each of the d features of the rows of f [n, d].
    pub fn feature_stats(f: &[f32], d: usize) -> Vec<(f64, f64)> {
        let n = f.len() / d;
        (0..d)
            .map(|i| {
                let mean = (0..n).map(|b| f[b * d + i] as f64).sum::<f64>() / n as f64;
                let m2 = (0..n)
                    .map(|b| (f[b * d + i] as f64 - mean).powi(2))
                    .sum::<f64>();
                (mean, m2 / (n as f64 - 1.0))
            })
            .collect()
    }

    /// Flattens (mean, var) pairs as the GPU keeps them.
    pub fn interleave(stats: &[(f64, f64)]) -> Vec<f32> {
        stats
            .iter()
            .flat_map(|&(a, b)| [a as f32, b as f32])
            .collect()
    }

    /// The generator objective with fixed trackers: sum v_m (real_mean - mu) + v_v (real_var -
    /// var), times the weight (what the gradient of [`step`] differentiates).
    pub fn objective(f: &[f32], d: usize, real: &[f32], track: &[f32], weight: f64) -> f64 {
        feature_stats(f, d)
            .iter()
            .enumerate()
            .map(|(i, &(mu, var))| {
                track[2 * i] as f64 * (real[2 * i] as f64 - mu)
                    + track[2 * i + 1] as f64 * (real[2 * i + 1] as f64 - var)
            })
            .sum::<f64>()
            * weight
    }

    /// One step of a layer: updates `track` \[2d\] and `opt` \[4d\] in place (Adam with t), returns
    /// dL/df [n, d] and the per-feature (objective, squared difference) terms.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        cfg: &TrackerConfig,
        t: u32,
        f: &[f32],
        d: usize,
        total_d: usize,
        real: &[f32],
        track: &mut [f32],
        opt: &mut [f32],
    ) -> (Vec<f32>, Vec<(f64, f64)>) {
        let n = f.len() / d;
        let stats = feature_stats(f, d);
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        let mut df = vec![0f32; n * d];
        let mut terms = Vec::with_capacity(d);
        for (i, &(mu, var)) in stats.iter().enumerate() {
            let diff = [real[2 * i] as f64 - mu, real[2 * i + 1] as f64 - var];
            let mut v = [track[2 * i] as f64, track[2 * i + 1] as f64];
            for k in 0..2 {
                let g = 2.0 * (v[k] - diff[k]) / total_d as f64;
                let m = b1 * opt[4 * i + 2 * k] as f64 + (1.0 - b1) * g;
                let s = b2 * opt[4 * i + 2 * k + 1] as f64 + (1.0 - b2) * g * g;
                opt[4 * i + 2 * k] = m as f32;
                opt[4 * i + 2 * k + 1] = s as f32;
                v[k] -= cfg.lr as f64 * (m / c1) / ((s / c2).sqrt() + cfg.eps as f64);
                track[2 * i + k] = v[k] as f32;
            }
            let w = cfg.weight as f64;
            for b in 0..n {
                let e = b * d + i;
                df[e] = (-w * v[0] / n as f64
                    - w * v[1] * 2.0 * (f[e] as f64 - mu) / (n as f64 - 1.0))
                    as f32;
            }
            terms.push((
                v[0] * diff[0] + v[1] * diff[1],
                diff[0] * diff[0] + diff[1] * diff[1],
            ));
        }
        (df, terms)
    }
}
