//! Batch normalisation with batch statistics and no affine parameters, and the fixed
//! per-channel affine map of BatchNorm in inference form and of conv biases
//! (`shaders/norm.wgsl`).

use super::{check, groups_for, u32_of};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// PyTorch's default epsilon.
pub const EPS: f32 = 1e-5;

/// Channels with at most this many values use one invocation each instead of a workgroup.
const SMALL: usize = 512;

/// How a normalisation kernel runs for a shape.
struct Variant {
    entry: String,
    workgroups: u32,
    /// Operands bound as vectors of four (`x4`, ...).
    vectors: bool,
}

/// The kernel form for a channel size: a workgroup per large channel, an invocation per
/// small one, or per 4 small channels of dense activations.
fn variant(s: &NormShape, entry: &'static str) -> Result<Variant> {
    let channels = u32_of(s.channels, "channels")?;
    Ok(if s.batch * s.size > SMALL {
        Variant {
            entry: entry.to_string(),
            workgroups: channels,
            vectors: false,
        }
    } else if s.size == 1 && s.channels % 4 == 0 {
        Variant {
            entry: format!("{entry}_small4"),
            workgroups: (channels / 4).div_ceil(32),
            vectors: true,
        }
    } else {
        Variant {
            entry: format!("{entry}_small"),
            workgroups: channels.div_ceil(64),
            vectors: false,
        }
    })
}

/// The operand name of the variant's view (`x` or `x4`).
fn operand(v: &Variant, name: &str) -> String {
    if v.vectors {
        format!("{name}4")
    } else {
        name.to_string()
    }
}

/// A tensor viewed as [batch, channels, size] (size = h * w, or 1 for dense activations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    pub batch: usize,
    pub channels: usize,
    pub size: usize,
}

impl NormShape {
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.size
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    channels: u32,
    size: u32,
    eps: f32,
    n: u32,
    inv_size: f32,
    inv_channels: f32,
    _pad: u32,
}

fn params(s: &NormShape) -> Result<Params> {
    Ok(Params {
        batch: u32_of(s.batch, "batch")?,
        channels: u32_of(s.channels, "channels")?,
        size: u32_of(s.size, "positions")?,
        eps: EPS,
        n: 0,
        inv_size: 1.0 / s.size.max(1) as f32,
        inv_channels: 1.0 / s.channels.max(1) as f32,
        _pad: 0,
    })
}

/// Parameters of the per-channel affine kernels (whose index arithmetic is exact below 2^31).
fn affine_params(s: &NormShape) -> Result<Params> {
    if s.len() >= 1 << 31 || s.is_empty() {
        return Err(Error::invalid(format!(
            "per-channel affine map of {s:?}: 1 to 2^31 - 1 elements are supported"
        )));
    }
    Ok(Params {
        n: s.len() as u32,
        ..params(s)?
    })
}

/// y <- a_c x + b_c per channel c; `coef` holds (a_c, b_c) pairs (2 * channels f32).
pub fn affine(gpu: &Gpu, s: &NormShape, coef: &Tensor, x: &Tensor, y: &Tensor) -> Result<Kernel> {
    check(x, s.len(), DType::F32, "affine input")?;
    check(y, s.len(), DType::F32, "affine output")?;
    check(coef, 2 * s.channels, DType::F32, "affine coefficients")?;
    Ok(gpu
        .kernel(ShaderKey::new("norm.wgsl"), "affine")
        .params(&affine_params(s)?)
        .bind("coef", coef)
        .bind("x", x)
        .bind("y", y)
        .groups(groups_for(s.len(), 256)?)
        .build()?)
}

/// dx <- a_c dy (the input gradient of [`affine`]).
pub fn affine_backward(
    gpu: &Gpu,
    s: &NormShape,
    coef: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<Kernel> {
    check(dy, s.len(), DType::F32, "affine output gradient")?;
    check(dx, s.len(), DType::F32, "affine input gradient")?;
    check(coef, 2 * s.channels, DType::F32, "affine coefficients")?;
    Ok(gpu
        .kernel(ShaderKey::new("norm.wgsl"), "affine_backward")
        .params(&affine_params(s)?)
        .bind("coef", coef)
        .bind("dy", dy)
        .bind("dx", dx)
        .groups(groups_for(s.len(), 256)?)
        .build()?)
}

/// The (a, b) of BatchNorm in inference form after a layer with bias `bias` (PyTorch's
/// `y = weight (x + bias - running_mean) / sqrt(running_var + eps) + shift`), per channel, as
/// [`affine`] takes them. Computed in f64.
pub fn fold_batchnorm(
    bias: Option<&[f32]>,
    mean: &[f32],
    var: &[f32],
    weight: &[f32],
    shift: &[f32],
    eps: f64,
) -> Vec<f32> {
    let mut coef = Vec::with_capacity(2 * mean.len());
    for c in 0..mean.len() {
        let a = weight[c] as f64 / (var[c] as f64 + eps).sqrt();
        let b0 = bias.map_or(0.0, |b| b[c] as f64);
        coef.push(a as f32);
        coef.push((a * (b0 - mean[c] as f64) + shift[c] as f64) as f32);
    }
    coef
}

/// y <- normalised x; stats <- (mean, invstd) per channel (2 * channels f32).
pub fn forward(gpu: &Gpu, s: &NormShape, x: &Tensor, y: &Tensor, stats: &Tensor) -> Result<Kernel> {
    check(x, s.len(), DType::F32, "batchnorm input")?;
    check(y, s.len(), DType::F32, "batchnorm output")?;
    check(stats, 2 * s.channels, DType::F32, "batchnorm statistics")?;
    let v = variant(s, "forward")?;
    Ok(gpu
        .kernel(ShaderKey::new("norm.wgsl"), &v.entry)
        .params(&params(s)?)
        .bind(&operand(&v, "x"), x)
        .bind(&operand(&v, "y"), y)
        .bind("stats", stats)
        .groups(v.workgroups)
        .build()?)
}

/// dx <- gradient through the normalisation, from dy, the forward output y and its stats.
pub fn backward(
    gpu: &Gpu,
    s: &NormShape,
    dy: &Tensor,
    y: &Tensor,
    stats: &Tensor,
    dx: &Tensor,
) -> Result<Kernel> {
    check(dy, s.len(), DType::F32, "batchnorm output gradient")?;
    check(y, s.len(), DType::F32, "batchnorm output")?;
    check(dx, s.len(), DType::F32, "batchnorm input gradient")?;
    check(stats, 2 * s.channels, DType::F32, "batchnorm statistics")?;
    let v = variant(s, "backward")?;
    Ok(gpu
        .kernel(ShaderKey::new("norm.wgsl"), &v.entry)
        .params(&params(s)?)
        .bind(&operand(&v, "dy"), dy)
        .bind(&operand(&v, "yn"), y)
        .bind("stats_in", stats)
        .bind(&operand(&v, "dx"), dx)
        .groups(v.workgroups)
        .build()?)
}

/// CPU twins (f64).
/// The inference form of BatchNorm with population statistics: (a_c, b_c) pairs for
/// [`affine`], a_c = 1 / sqrt(var_c + EPS) and b_c = -mean_c a_c, each computed in f64 and
/// rounded to f32 (docs/MODEL_FORMAT.md states this, so other implementations match).
pub fn population_coefficients(mean: &[f32], var: &[f32]) -> Vec<f32> {
    mean.iter()
        .zip(var)
        .flat_map(|(&m, &v)| {
            let a = 1.0 / (v as f64 + EPS as f64).sqrt();
            [a as f32, (-(m as f64) * a) as f32]
        })
        .collect()
}

pub mod cpu {
    use super::{NormShape, EPS};

    /// y = a_c x + b_c.
    pub fn affine(s: &NormShape, coef: &[f32], x: &[f32]) -> Vec<f32> {
        (0..s.len())
            .map(|e| {
                let c = (e / s.size) % s.channels;
                (coef[2 * c] as f64 * x[e] as f64 + coef[2 * c + 1] as f64) as f32
            })
            .collect()
    }

    /// dx = a_c dy.
    pub fn affine_backward(s: &NormShape, coef: &[f32], dy: &[f32]) -> Vec<f32> {
        (0..s.len())
            .map(|e| coef[2 * ((e / s.size) % s.channels)] * dy[e])
            .collect()
    }

    fn idx(s: &NormShape, b: usize, c: usize, j: usize) -> usize {
        (b * s.channels + c) * s.size + j
    }

    /// Returns (y, stats).
    pub fn forward(s: &NormShape, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0f32; s.len()];
        let mut stats = vec![0f32; 2 * s.channels];
        let count = (s.batch * s.size) as f64;
        for c in 0..s.channels {
            let vals = (0..s.batch).flat_map(|b| (0..s.size).map(move |j| (b, j)));
            let mean = vals
                .clone()
                .map(|(b, j)| x[idx(s, b, c, j)] as f64)
                .sum::<f64>()
                / count;
            let var = vals
                .clone()
                .map(|(b, j)| (x[idx(s, b, c, j)] as f64 - mean).powi(2))
                .sum::<f64>()
                / count;
            let invstd = 1.0 / (var + EPS as f64).sqrt();
            for (b, j) in vals {
                y[idx(s, b, c, j)] = ((x[idx(s, b, c, j)] as f64 - mean) * invstd) as f32;
            }
            stats[2 * c] = mean as f32;
            stats[2 * c + 1] = invstd as f32;
        }
        (y, stats)
    }

    pub fn backward(s: &NormShape, dy: &[f32], y: &[f32], stats: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f32; s.len()];
        let count = (s.batch * s.size) as f64;
        for c in 0..s.channels {
            let vals = (0..s.batch).flat_map(|b| (0..s.size).map(move |j| (b, j)));
            let md = vals
                .clone()
                .map(|(b, j)| dy[idx(s, b, c, j)] as f64)
                .sum::<f64>()
                / count;
            let mdy = vals
                .clone()
                .map(|(b, j)| (dy[idx(s, b, c, j)] * y[idx(s, b, c, j)]) as f64)
                .sum::<f64>()
                / count;
            let invstd = stats[2 * c + 1] as f64;
            for (b, j) in vals {
                let i = idx(s, b, c, j);
                dx[i] = (invstd * (dy[i] as f64 - md - y[i] as f64 * mdy)) as f32;
            }
        }
        dx
    }
}
