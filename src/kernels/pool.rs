//! 2x2 max and average pooling with stride 2, and their input gradients (`shaders/pool.wgsl`).

use super::{check, groups_for};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// Which pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Max,
    Avg,
}

impl Pool {
    fn prefix(self) -> &'static str {
        match self {
            Pool::Max => "max",
            Pool::Avg => "avg",
        }
    }
}

/// `planes` planes of h x w pooled to (h / 2) x (w / 2), rounded down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
}

impl PoolShape {
    pub fn oh(&self) -> usize {
        self.h / 2
    }

    pub fn ow(&self) -> usize {
        self.w / 2
    }

    pub fn input_len(&self) -> usize {
        self.planes * self.h * self.w
    }

    pub fn output_len(&self) -> usize {
        self.planes * self.oh() * self.ow()
    }

    fn validate(&self) -> Result<()> {
        if self.oh() == 0 || self.ow() == 0 || self.planes == 0 {
            return Err(Error::invalid(format!(
                "2x2 pooling of {self:?}: the input needs at least 2 x 2 positions"
            )));
        }
        // div_small in the shader is exact below 2^31.
        if self.input_len() >= 1 << 31 {
            return Err(Error::invalid(format!(
                "2x2 pooling of {self:?}: more than 2^31 elements; use a smaller batch"
            )));
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    inv_w: f32,
    inv_h: f32,
    _pad: u32,
}

fn params(s: &PoolShape, n: usize, row: usize, height: usize) -> Params {
    Params {
        n: n as u32,
        h: s.h as u32,
        w: s.w as u32,
        oh: s.oh() as u32,
        ow: s.ow() as u32,
        inv_w: 1.0 / row as f32,
        inv_h: 1.0 / height as f32,
        _pad: 0,
    }
}

/// out <- pooled x.
pub fn forward(gpu: &Gpu, pool: Pool, s: &PoolShape, x: &Tensor, out: &Tensor) -> Result<Kernel> {
    s.validate()?;
    check(x, s.input_len(), DType::F32, "pooling input")?;
    check(out, s.output_len(), DType::F32, "pooling output")?;
    let p = params(s, s.output_len(), s.ow(), s.oh());
    Ok(gpu
        .kernel(
            ShaderKey::new("pool.wgsl"),
            &format!("{}_forward", pool.prefix()),
        )
        .params(&p)
        .bind("x", x)
        .bind("out", out)
        .groups(groups_for(s.output_len(), 256)?)
        .build()?)
}

/// dx <- the input gradient of the pooling for output gradient dy (max pooling reads its input
/// x to find each window's largest element again).
pub fn backward(
    gpu: &Gpu,
    pool: Pool,
    s: &PoolShape,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<Kernel> {
    s.validate()?;
    check(dy, s.output_len(), DType::F32, "pooling output gradient")?;
    check(dx, s.input_len(), DType::F32, "pooling input gradient")?;
    let p = params(s, s.input_len(), s.w, s.h);
    let mut k = gpu
        .kernel(
            ShaderKey::new("pool.wgsl"),
            &format!("{}_backward", pool.prefix()),
        )
        .params(&p)
        .bind("dy", dy)
        .bind("dx", dx)
        .groups(groups_for(s.input_len(), 256)?);
    if pool == Pool::Max {
        check(x, s.input_len(), DType::F32, "pooling input")?;
        k = k.bind("x", x);
    }
    Ok(k.build()?)
}

/// CPU twins.
pub mod cpu {
    use super::{Pool, PoolShape};

    /// (input index of each window element) for output element (plane, oy, ox).
    fn window(s: &PoolShape, plane: usize, oy: usize, ox: usize) -> [usize; 4] {
        let b = (plane * s.h + 2 * oy) * s.w + 2 * ox;
        [b, b + 1, b + s.w, b + s.w + 1]
    }

    /// Position of the first largest value of a window.
    fn argmax(x: &[f32], win: &[usize; 4]) -> usize {
        let mut at = 0;
        for k in 1..4 {
            if x[win[k]] > x[win[at]] {
                at = k;
            }
        }
        at
    }

    pub fn forward(pool: Pool, s: &PoolShape, x: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(s.output_len());
        for plane in 0..s.planes {
            for oy in 0..s.oh() {
                for ox in 0..s.ow() {
                    let win = window(s, plane, oy, ox);
                    out.push(match pool {
                        Pool::Max => x[win[argmax(x, &win)]],
                        Pool::Avg => win.iter().map(|&i| x[i] as f64).sum::<f64>() as f32 / 4.0,
                    });
                }
            }
        }
        out
    }

    pub fn backward(pool: Pool, s: &PoolShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut dx = vec![0.0; s.input_len()];
        let mut o = 0;
        for plane in 0..s.planes {
            for oy in 0..s.oh() {
                for ox in 0..s.ow() {
                    let win = window(s, plane, oy, ox);
                    match pool {
                        Pool::Max => dx[win[argmax(x, &win)]] = dy[o],
                        Pool::Avg => win.iter().for_each(|&i| dx[i] = dy[o] / 4.0),
                    }
                    o += 1;
                }
            }
        }
        dx
    }
}
