//! Elementwise and layout kernels (`shaders/elementwise.wgsl`): ReLU, tanh, nearest 2x
//! upsampling and its adjoint, fixed 3x3 smoothing, add, scale, axpy, transpose, and Gaussian
//! latents.

use super::StepState;
use super::{check, groups_for, u32_of};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    h: u32,
    w: u32,
    key: u32,
    alpha: f32,
    inv: f32,
    inv_h: f32,
    runs: u32,
}

fn launch(
    gpu: &Gpu,
    entry: &str,
    p: Params,
    inputs: &[(&str, &Tensor)],
    out: &Tensor,
) -> Result<Kernel> {
    // One invocation per item of p.n; the blur's runs are sized by the vectors define.
    let key =
        ShaderKey::new("elementwise.wgsl").def("vectors", gpu.features().vectors_per_invocation);
    let mut k = gpu
        .kernel(key, entry)
        .params(&p)
        .bind("out", out)
        .groups(groups_for(p.n as usize, 256)?);
    for (name, t) in inputs {
        k = k.bind(name, t);
    }
    Ok(k.build()?)
}

/// A map of `shaders/elementwise.wgsl` (`out = f(a, b)` over vectors of four): binds the
/// operands' vector views (`inputs`, as `{name}4`, padded) and any read as scalars (`scalars`),
/// and sizes the grid by the adapter's vectors per invocation.
fn launch_map(
    gpu: &Gpu,
    entry: &str,
    p: Params,
    inputs: &[(&str, &Tensor)],
    scalars: &[(&str, &Tensor)],
    out: &Tensor,
) -> Result<Kernel> {
    let vectors = gpu.features().vectors_per_invocation;
    let mut k = gpu
        .kernel(
            ShaderKey::new("elementwise.wgsl").def("vectors", vectors),
            entry,
        )
        .params(&p)
        .bind_padded("out4", out, 16)
        .groups(groups_for(
            (p.n as usize).div_ceil(4),
            256 * vectors as usize,
        )?);
    for (name, t) in inputs {
        k = k.bind_padded(&format!("{name}4"), t, 16);
    }
    for (name, t) in scalars {
        k = k.bind(name, t);
    }
    Ok(k.build()?)
}

fn unary(gpu: &Gpu, entry: &str, a: &Tensor, out: &Tensor) -> Result<Kernel> {
    let n = a.len();
    check(out, n, DType::F32, entry)?;
    check(a, n, DType::F32, entry)?;
    let p = Params {
        n: u32_of(n, "elements")?,
        ..Default::default()
    };
    launch_map(gpu, entry, p, &[("a", a)], &[], out)
}

fn binary(gpu: &Gpu, entry: &str, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<Kernel> {
    let n = a.len();
    check(b, n, DType::F32, entry)?;
    check(out, n, DType::F32, entry)?;
    let p = Params {
        n: u32_of(n, "elements")?,
        ..Default::default()
    };
    launch_map(gpu, entry, p, &[("a", a), ("b", b)], &[], out)
}

/// out <- max(x, 0).
pub fn relu(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<Kernel> {
    unary(gpu, "relu", x, out)
}

/// dx <- dy where y > 0 (y: the ReLU's output).
pub fn relu_backward(gpu: &Gpu, dy: &Tensor, y: &Tensor, dx: &Tensor) -> Result<Kernel> {
    binary(gpu, "relu_backward", dy, y, dx)
}

/// out <- tanh(x).
pub fn tanh(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<Kernel> {
    unary(gpu, "tanh_forward", x, out)
}

/// dx <- dy (1 - y^2) (y: the tanh output).
pub fn tanh_backward(gpu: &Gpu, dy: &Tensor, y: &Tensor, dx: &Tensor) -> Result<Kernel> {
    binary(gpu, "tanh_backward", dy, y, dx)
}

/// out <- a + b.
pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<Kernel> {
    binary(gpu, "add", a, b, out)
}

/// out <- alpha * a.
pub fn scale(gpu: &Gpu, alpha: f32, a: &Tensor, out: &Tensor) -> Result<Kernel> {
    let n = a.len();
    check(out, n, DType::F32, "scale")?;
    let p = Params {
        n: u32_of(n, "elements")?,
        alpha,
        ..Default::default()
    };
    launch_map(gpu, "scale", p, &[("a", a)], &[], out)
}

/// out <- alpha * a + b.
pub fn axpy(gpu: &Gpu, alpha: f32, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<Kernel> {
    let n = a.len();
    check(b, n, DType::F32, "axpy")?;
    check(out, n, DType::F32, "axpy")?;
    let p = Params {
        n: u32_of(n, "elements")?,
        alpha,
        ..Default::default()
    };
    launch_map(gpu, "axpy", p, &[("a", a), ("b", b)], &[], out)
}

/// out [cols, rows] <- the transpose of a [rows, cols].
pub fn transpose(gpu: &Gpu, rows: usize, cols: usize, a: &Tensor, out: &Tensor) -> Result<Kernel> {
    check(a, rows * cols, DType::F32, "transpose input")?;
    check(out, rows * cols, DType::F32, "transpose output")?;
    let p = Params {
        n: check_small(rows * cols)?,
        h: rows as u32,
        w: cols as u32,
        inv: 1.0 / rows.max(1) as f32,
        ..Default::default()
    };
    launch(gpu, "transpose", p, &[("a", a)], out)
}

/// `count` planes of h x w values, one after another: what upsampling and smoothing work on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planes {
    pub count: usize,
    pub h: usize,
    pub w: usize,
}

/// `div_small` in the shaders is exact below 2^31.
fn check_small(n: usize) -> Result<u32> {
    if n >= 1 << 31 {
        return Err(Error::invalid(format!(
            "{n} elements in one upsampling or smoothing exceed 2^31; use a smaller batch"
        )));
    }
    Ok(n as u32)
}

/// Nearest 2x upsampling of the planes.
pub fn upsample2x(gpu: &Gpu, s: &Planes, x: &Tensor, out: &Tensor) -> Result<Kernel> {
    let Planes {
        count: planes,
        h,
        w,
    } = *s;
    check(x, planes * h * w, DType::F32, "upsample input")?;
    check(out, 4 * planes * h * w, DType::F32, "upsample output")?;
    let p = Params {
        n: check_small(4 * planes * h * w)?,
        h: h as u32,
        w: w as u32,
        inv: 1.0 / (2 * w) as f32,
        ..Default::default()
    };
    if w % 2 == 0 {
        // Whole output vectors per row: the vec4 form.
        return launch_map(gpu, "upsample2x4", p, &[], &[("a", x)], out);
    }
    launch(gpu, "upsample2x", p, &[("a", x)], out)
}

/// Adjoint of [`upsample2x`]: sums each 2x2 block (h, w: the small size).
pub fn upsample2x_adjoint(gpu: &Gpu, s: &Planes, dy: &Tensor, dx: &Tensor) -> Result<Kernel> {
    let Planes {
        count: planes,
        h,
        w,
    } = *s;
    check(
        dy,
        4 * planes * h * w,
        DType::F32,
        "upsample output gradient",
    )?;
    check(dx, planes * h * w, DType::F32, "upsample input gradient")?;
    check_small(4 * planes * h * w)?;
    let p = Params {
        n: (planes * h * w) as u32,
        h: h as u32,
        w: w as u32,
        inv: 1.0 / w as f32,
        ..Default::default()
    };
    launch(gpu, "upsample2x_adjoint", p, &[("a", dy)], dx)
}

/// Fixed 3x3 binomial smoothing of the planes, zero padding. Self-adjoint, so
/// it is also the backward pass (applied to the output gradient).
pub fn blur3x3(gpu: &Gpu, s: &Planes, x: &Tensor, out: &Tensor) -> Result<Kernel> {
    let Planes {
        count: planes,
        h,
        w,
    } = *s;
    check(x, planes * h * w, DType::F32, "blur input")?;
    check(out, planes * h * w, DType::F32, "blur output")?;
    check_small(planes * h * w)?;
    // Each invocation computes a run of pixels of one row (BLUR_RUN in the shader).
    let vectors = gpu.features().vectors_per_invocation;
    let runs = w.div_ceil(4 * vectors as usize);
    let p = Params {
        n: check_small(planes * h * runs)?,
        h: h as u32,
        w: w as u32,
        inv: 1.0 / runs as f32,
        inv_h: 1.0 / h as f32,
        runs: runs as u32,
        ..Default::default()
    };
    launch(gpu, "blur3x3", p, &[("a", x)], out)
}

/// out <- standard normal latents of the current step: stream key(key(base, client), step).
pub fn latent(gpu: &Gpu, base_key: u32, step: &Tensor, out: &Tensor) -> Result<Kernel> {
    check(step, StepState::WORDS, DType::U32, "step state")?;
    if out.dtype() != DType::F32 {
        return Err(Error::invalid("latents are f32"));
    }
    let p = Params {
        n: u32_of(out.len(), "latents")?,
        key: base_key,
        ..Default::default()
    };
    latent_kernel(gpu, "latent", p, step, out)
}

/// A latent entry point writing `out` from the step state (one invocation per value).
fn latent_kernel(gpu: &Gpu, entry: &str, p: Params, step: &Tensor, out: &Tensor) -> Result<Kernel> {
    Ok(gpu
        .kernel(ShaderKey::new("elementwise.wgsl"), entry)
        .params(&p)
        .bind("out", out)
        .bind("step", step)
        .groups(groups_for(out.len(), 256)?)
        .build()?)
}

/// out [rows, cols] <- standard normal latents, one stream per image: row r is elements
/// 0..cols of the stream key(key(base, client), step + r), so an image's latent depends on its
/// index (the step state's `step` plus its row), not on the batch size.
pub fn latent_images(
    gpu: &Gpu,
    base_key: u32,
    step: &Tensor,
    out: &Tensor,
    cols: usize,
) -> Result<Kernel> {
    check(step, StepState::WORDS, DType::U32, "step state")?;
    if out.dtype() != DType::F32 || cols == 0 || out.len() % cols != 0 {
        return Err(Error::invalid("latents are f32 rows of the latent size"));
    }
    let p = Params {
        n: u32_of(out.len(), "latents")?,
        w: u32_of(cols, "latent size")?,
        key: base_key,
        ..Default::default()
    };
    latent_kernel(gpu, "latent_images", p, step, out)
}

/// CPU twins.
pub mod cpu {
    use crate::kernels::StepState;
    use crate::rng;

    /// out [cols, rows] = a [rows, cols] transposed.
    pub fn transpose(rows: usize, cols: usize, a: &[f32]) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| a[(i % rows) * cols + i / rows])
            .collect()
    }

    pub fn upsample2x(planes: usize, h: usize, w: usize, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; 4 * planes * h * w];
        for p in 0..planes {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    out[(p * 2 * h + oy) * 2 * w + ox] = x[(p * h + oy / 2) * w + ox / 2];
                }
            }
        }
        out
    }

    pub fn upsample2x_adjoint(planes: usize, h: usize, w: usize, dy: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f32; planes * h * w];
        for p in 0..planes {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    dx[(p * h + oy / 2) * w + ox / 2] += dy[(p * 2 * h + oy) * 2 * w + ox];
                }
            }
        }
        dx
    }

    /// [`super::blur3x3`]: same stencil, same summation order (rows of three, then rows).
    pub fn blur3x3(planes: usize, h: usize, w: usize, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; planes * h * w];
        for p in 0..planes {
            for y in 0..h {
                for x0 in 0..w {
                    let mut sum = 0f32;
                    for dy in -1i64..=1 {
                        let yy = y as i64 + dy;
                        if yy < 0 || yy >= h as i64 {
                            continue;
                        }
                        let mut row_sum = 0f32;
                        for dx in -1i64..=1 {
                            let xx = x0 as i64 + dx;
                            if xx < 0 || xx >= w as i64 {
                                continue;
                            }
                            let wx = if dx == 0 { 2.0 } else { 1.0 };
                            row_sum += wx * x[(p * h + yy as usize) * w + xx as usize];
                        }
                        sum += if dy == 0 { 2.0 } else { 1.0 } * row_sum;
                    }
                    out[(p * h + y) * w + x0] = sum * 0.0625;
                }
            }
        }
        out
    }

    /// Latents of a step.
    pub fn latent(base_key: u32, step: &StepState, n: usize) -> Vec<f32> {
        let key = rng::key(rng::key(base_key, step.client), step.step);
        (0..n as u32).map(|i| rng::normal_bm(key, i)).collect()
    }

    /// Latents of `rows` images from image `step.step` on, `cols` values each.
    pub fn latent_images(base_key: u32, step: &StepState, rows: usize, cols: usize) -> Vec<f32> {
        let client = rng::key(base_key, step.client);
        (0..rows as u32)
            .flat_map(|r| {
                let key = rng::key(client, step.step.wrapping_add(r));
                (0..cols as u32).map(move |j| rng::normal_bm(key, j))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    /// `div_small` of shaders/common.wgsl, step for step in f32 and u32/i32 arithmetic that
    /// wraps as WGSL's does (`i32(u32)` reinterprets the bits).
    fn div_small(a: u32, b: u32, inv_b: f32) -> u32 {
        let mut q = (a as f32 * inv_b) as u32;
        let r = a.wrapping_sub(q.wrapping_mul(b)) as i32;
        q = (q as i32).wrapping_add((r as f32 * inv_b).floor() as i32) as u32;
        if q.wrapping_mul(b) > a {
            q = q.wrapping_sub(1);
        } else if q.wrapping_add(1).wrapping_mul(b) <= a {
            q = q.wrapping_add(1);
        }
        q
    }

    #[test]
    fn float_division_with_corrections_is_exact_below_2_to_the_31() {
        let mut rng = crate::rng::HostRng::new(3, &[]);
        for i in 0..1_000_000u32 {
            let b = match i % 4 {
                0 => 1 + rng.next_u32() % 8,
                1 => 1 + rng.next_u32() % 1000,
                2 => 1 + rng.next_u32() % (1 << 20),
                _ => 1 + rng.next_u32() % (1 << 31),
            };
            let a = if i % 7 == 0 {
                (1u32 << 31) - 1 - rng.next_u32() % 1000
            } else {
                rng.next_u32() >> 1
            };
            assert_eq!(div_small(a, b, 1.0 / b as f32), a / b, "{a} / {b}");
        }
    }
}
