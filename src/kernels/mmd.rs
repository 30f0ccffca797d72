//! Kernel MMD (`shaders/mmd.wgsl`): loss values and their gradients with respect to the
//! generated batch. (Mean-and-variance matching, the reference code's loss, is
//! [`super::moments`].)

use super::{check, groups_for, u32_of};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::matmul::{self, LinearShape};
use crate::kernels::{MaskSource, Product};

/// GMMN's kernel parameters for MNIST in pixel space (pixels in [0, 1]), Li et al. 2015:
/// yujiali/gmmn's `GaussianKernelMmdLoss` computes exp(-|a - b|^2 / (2 s)), so they are
/// variances (PRISM.md section 3).
pub const GMMN_MNIST_VARIANCES: [f32; 6] = [2.0, 5.0, 10.0, 20.0, 40.0, 80.0];

/// The same kernels as standard deviations, the convention of `LossKind::Mmd`'s `sigmas`
/// (exp(-|a - b|^2 / (2 sigma^2))): sqrt of [`GMMN_MNIST_VARIANCES`], about 1.4 to 8.9.
pub const GMMN_MNIST_SIGMAS: [f32; 6] = [
    std::f32::consts::SQRT_2,
    2.236068,
    3.1622777,
    4.472136,
    6.3245554,
    8.944272,
];

/// The Gaussian kernel sum takes 1 to 8 positive, finite bandwidths (the shader's array).
pub fn check_bandwidths(sigmas: &[f32]) -> Result<()> {
    if sigmas.is_empty() || sigmas.len() > 8 || sigmas.iter().any(|s| !(*s > 0.0 && s.is_finite()))
    {
        return Err(Error::invalid(format!(
            "bandwidths {sigmas:?}: the MMD takes 1 to 8 positive bandwidths"
        )));
    }
    Ok(())
}

/// Which discrepancy to minimise.
#[derive(Clone, Debug, PartialEq)]
pub enum LossKind {
    /// Kernel MMD with a sum of Gaussian kernels.
    Mmd {
        sigmas: Vec<f32>,
        unbiased: bool,
        /// Train on sqrt(MMD^2), as GMMN does.
        sqrt: bool,
    },
}

impl Default for LossKind {
    fn default() -> Self {
        LossKind::Mmd {
            sigmas: GMMN_MNIST_SIGMAS.to_vec(),
            unbiased: false,
            sqrt: true,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    m: u32,
    d: u32,
    unbiased: u32,
    sqrt_loss: u32,
    bandwidths: u32,
    scale: f32,
    _pad: u32,
    inv_two_sigma2: [f32; 8],
}

/// The loss kernels of one (generated, real) batch pair, with their scratch buffers.
pub struct LossKernels {
    pub kernels: Vec<Kernel>,
    /// [MMD^2, loss, mean k(x,x'), mean k(y,y'), mean k(x,y), d loss / d MMD^2].
    pub loss: Tensor,
    _scratch: Vec<Tensor>,
}

/// Builds the kernels computing the loss between x [n, ...] and y [m, ...] (samples along
/// the first dimension) and writing dLoss/dx to `dx`. `scale` multiplies squared distances
/// (0.25 maps [-1, 1] to [0, 1]).
pub fn loss(
    gpu: &Gpu,
    kind: &LossKind,
    scale: f32,
    x: &Tensor,
    y: &Tensor,
    dx: &Tensor,
) -> Result<LossKernels> {
    let (n, m) = (
        x.shape().first().copied().unwrap_or(0),
        y.shape().first().copied().unwrap_or(0),
    );
    if n < 2 || m < 2 {
        return Err(Error::invalid(
            "MMD needs at least two generated and two real samples",
        ));
    }
    let d = x.len() / n;
    check(y, m * d, DType::F32, "real batch")?;
    check(dx, n * d, DType::F32, "loss gradient")?;
    if d == 0 || x.len() != n * d {
        return Err(Error::invalid("samples must have the same positive size"));
    }
    let mut p = Params {
        n: u32_of(n, "batch")?,
        m: u32_of(m, "batch")?,
        d: u32_of(d, "dimensions")?,
        scale,
        ..Default::default()
    };
    let key = || ShaderKey::new("mmd.wgsl");
    let loss = gpu.zeros(&[8], DType::F32, "loss values")?;
    match kind {
        LossKind::Mmd {
            sigmas,
            unbiased,
            sqrt,
        } => {
            check_bandwidths(sigmas)?;
            p.unbiased = *unbiased as u32;
            p.sqrt_loss = *sqrt as u32;
            p.bandwidths = sigmas.len() as u32;
            for (i, s) in sigmas.iter().enumerate() {
                p.inv_two_sigma2[i] = 1.0 / (2.0 * s * s);
            }
            let t = n + m;
            let z = gpu.tensor(&[t, d], DType::F32, "generated and real samples")?;
            let gram = gpu.tensor(&[t, t], DType::F32, "Gram matrix")?;
            let partial = gpu.tensor(&[t, 4], DType::F32, "MMD kernel sums per row")?;
            let coef = gpu.tensor(&[n, t], DType::F32, "MMD coefficients")?;
            let rowsum = gpu.tensor(&[n], DType::F32, "MMD coefficient row sums")?;
            let cz = gpu.tensor(&[n, d], DType::F32, "coefficients times samples")?;
            // z serves as the dense "weights" of a layer with t outputs and d inputs: its
            // input gradient for dy = coef is coef z.
            let cz_shape = LinearShape {
                batch: n,
                inputs: d,
                outputs: t,
            };
            // The streaming kernels go vec4 wide where every vector stays inside one sample
            // (and so inside x or y).
            let vectors = gpu.features().vectors_per_invocation;
            let streaming = |entry: &str, items: usize| {
                let wide = d % 4 == 0;
                let k = gpu
                    .kernel(
                        key().def("vectors", vectors),
                        &format!("{entry}{}", if wide { "4" } else { "" }),
                    )
                    .params(&p);
                let groups = if wide {
                    groups_for(items / 4, 256 * vectors as usize)
                } else {
                    groups_for(items, 256)
                };
                groups.map(|g| (k.groups(g), wide))
            };
            let concat = {
                let (k, wide) = streaming("concat", t * d)?;
                if wide {
                    k.bind_padded("x4", x, 16)
                        .bind_padded("y4", y, 16)
                        .bind_padded("z4", &z, 16)
                } else {
                    k.bind("x", x).bind("y", y).bind("z", &z)
                }
                .build()?
            };
            let gradient = {
                let (k, wide) = streaming("gradient", n * d)?;
                let k = k.bind("rowsum_in", &rowsum).bind("loss_in", &loss);
                if wide {
                    k.bind_padded("x4", x, 16)
                        .bind_padded("cz4", &cz, 16)
                        .bind_padded("dx4", dx, 16)
                } else {
                    k.bind("x", x).bind("cz", &cz).bind("dx", dx)
                }
                .build()?
            };
            let kernels = vec![
                concat,
                matmul::gram_lower(gpu, &z, &gram)?,
                gpu.kernel(key(), "rows")
                    .params(&p)
                    .bind("gram", &gram)
                    .bind("partial", &partial)
                    .bind("coef", &coef)
                    .bind("rowsum", &rowsum)
                    .groups(u32_of(t, "samples")?)
                    .build()?,
                gpu.kernel(key(), "finish")
                    .params(&p)
                    .bind("partial_in", &partial)
                    .bind("loss", &loss)
                    .groups(1)
                    .build()?,
                matmul::grad_input(
                    gpu,
                    &cz_shape,
                    &Product::new(&matmul::DENSE_OPERAND, &MaskSource::Dense(&z), &coef, &cz),
                )?,
                gradient,
            ];
            Ok(LossKernels {
                kernels,
                loss,
                _scratch: vec![z, gram, partial, coef, rowsum, cz],
            })
        }
    }
}

/// CPU references (f64).
pub mod cpu {
    use super::LossKind;

    /// Squared distance in the scaled space.
    fn dist(a: &[f32], b: &[f32], scale: f64) -> f64 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum::<f64>()
            * scale
    }

    fn k(dd: f64, sigmas: &[f32]) -> f64 {
        sigmas
            .iter()
            .map(|s| (-dd / (2.0 * (*s as f64).powi(2))).exp())
            .sum()
    }

    /// The loss value the GPU reports (loss\[1\]) for `kind` between x [n, d] and y [m, d]:
    /// MMD^2, or its square root (floored at 1e-6).
    pub fn loss(kind: &LossKind, x: &[f32], y: &[f32], d: usize, scale: f64) -> f64 {
        let LossKind::Mmd {
            sigmas,
            unbiased,
            sqrt,
        } = kind;
        let v = mmd2(x, y, d, sigmas, *unbiased, scale);
        if *sqrt {
            v.max(1e-12).sqrt()
        } else {
            v
        }
    }

    /// MMD^2 between x [n, d] and y [m, d].
    pub fn mmd2(x: &[f32], y: &[f32], d: usize, sigmas: &[f32], unbiased: bool, scale: f64) -> f64 {
        let (n, m) = (x.len() / d, y.len() / d);
        let row = |v: &[f32], i: usize| v[i * d..(i + 1) * d].to_vec();
        let mut kxx = 0.0;
        let mut kyy = 0.0;
        let mut kxy = 0.0;
        for i in 0..n {
            for j in 0..n {
                if !(unbiased && i == j) {
                    kxx += k(dist(&row(x, i), &row(x, j), scale), sigmas);
                }
            }
            for j in 0..m {
                kxy += k(dist(&row(x, i), &row(y, j), scale), sigmas);
            }
        }
        for i in 0..m {
            for j in 0..m {
                if !(unbiased && i == j) {
                    kyy += k(dist(&row(y, i), &row(y, j), scale), sigmas);
                }
            }
        }
        let (nn, mm) = if unbiased {
            ((n * (n - 1)) as f64, (m * (m - 1)) as f64)
        } else {
            ((n * n) as f64, (m * m) as f64)
        };
        kxx / nn + kyy / mm - 2.0 * kxy / (n * m) as f64
    }
}
