//! Batch normalisation with batch statistics and no affine parameters (`shaders/norm.wgsl`).

use super::{check, u32_of};
use crate::error::Result;
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// PyTorch's default epsilon.
pub const EPS: f32 = 1e-5;

/// Channels with at most this many values use one invocation each instead of a workgroup.
const SMALL: usize = 512;

/// (entry point, workgroups) for a channel size.
fn variant(s: &NormShape, entry: &'static str) -> Result<(String, u32)> {
    let channels = u32_of(s.channels, "channels")?;
    if s.batch * s.size <= SMALL {
        Ok((format!("{entry}_small"), channels.div_ceil(64)))
    } else {
        Ok((entry.to_string(), channels))
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
}

fn params(s: &NormShape) -> Result<Params> {
    Ok(Params {
        batch: u32_of(s.batch, "batch")?,
        channels: u32_of(s.channels, "channels")?,
        size: u32_of(s.size, "positions")?,
        eps: EPS,
    })
}

/// y <- normalised x; stats <- (mean, invstd) per channel (2 * channels f32).
pub fn forward(gpu: &Gpu, s: &NormShape, x: &Tensor, y: &Tensor, stats: &Tensor) -> Result<Kernel> {
    check(x, s.len(), DType::F32, "batchnorm input")?;
    check(y, s.len(), DType::F32, "batchnorm output")?;
    check(stats, 2 * s.channels, DType::F32, "batchnorm statistics")?;
    let (entry, groups) = variant(s, "forward")?;
    Ok(gpu
        .kernel(ShaderKey::new("norm.wgsl"), &entry)
        .params(&params(s)?)
        .bind("x", x)
        .bind("y", y)
        .bind("stats", stats)
        .groups(groups)
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
    let (entry, groups) = variant(s, "backward")?;
    Ok(gpu
        .kernel(ShaderKey::new("norm.wgsl"), &entry)
        .params(&params(s)?)
        .bind("dy", dy)
        .bind("yn", y)
        .bind("stats_in", stats)
        .bind("dx", dx)
        .groups(groups)
        .build()?)
}

/// CPU twins (f64).
pub mod cpu {
    use super::{NormShape, EPS};

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
