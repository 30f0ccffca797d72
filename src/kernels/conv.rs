//! Masked 2-D convolution and transposed convolution (`shaders/masked_conv.wgsl`).
//!
//! A transposed convolution with weights [cin_t, cout_t, kh, kw] is a convolution's adjoint:
//! its forward is the convolution's input gradient with the weights read as a convolution
//! [cout = cin_t, cin = cout_t, kh, kw] (the same memory), its input gradient is the
//! convolution's forward, and its score gradient the convolution's with x and dy exchanged.

use super::matmul::Estimator;
use super::{
    groups_for, launch_masked, u32_of, LayerSizes, LayerWeights, Precision, Product, ScoreGradIo,
    Tiling, WeightGen,
};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// A convolution: x [batch, cin, h, w] -> y [batch, cout, oh, ow], weights [cout, cin, kh, kw].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad).saturating_sub(self.kh) / self.stride.max(1) + 1
    }

    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad).saturating_sub(self.kw) / self.stride.max(1) + 1
    }

    pub fn weights(&self) -> usize {
        self.cout * self.cin * self.kh * self.kw
    }

    pub fn input_len(&self) -> usize {
        self.batch * self.cin * self.h * self.w
    }

    pub fn output_len(&self) -> usize {
        self.batch * self.cout * self.oh() * self.ow()
    }

    /// Multiply-adds of one forward pass.
    pub fn macs(&self) -> u64 {
        (self.batch * self.oh() * self.ow()) as u64 * self.weights() as u64
    }

    fn validate(&self) -> Result<()> {
        let dims = [
            self.batch,
            self.cin,
            self.cout,
            self.h,
            self.w,
            self.kh,
            self.kw,
            self.stride,
        ];
        if dims.contains(&0) {
            return Err(Error::invalid(format!("empty convolution {self:?}")));
        }
        if self.h + 2 * self.pad < self.kh || self.w + 2 * self.pad < self.kw {
            return Err(Error::invalid(format!(
                "kernel larger than the padded input in {self:?}"
            )));
        }
        if self.pad >= self.kh.max(self.kw) {
            return Err(Error::invalid(format!(
                "padding must be smaller than the kernel in {self:?}"
            )));
        }
        u32_of(
            self.input_len().max(self.output_len()),
            "activations of a convolution",
        )?;
        u32_of(self.weights(), "weights of a convolution")?;
        Ok(())
    }
}

/// A transposed convolution: x [batch, cin, h, w] -> y [batch, cout, oh, ow] with
/// oh = (h - 1) * stride - 2 pad + kh; weights [cin, cout, kh, kw] (PyTorch's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTransposeShape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvTransposeShape {
    pub fn oh(&self) -> usize {
        ((self.h - 1) * self.stride + self.kh).saturating_sub(2 * self.pad)
    }

    pub fn ow(&self) -> usize {
        ((self.w - 1) * self.stride + self.kw).saturating_sub(2 * self.pad)
    }

    pub fn weights(&self) -> usize {
        self.cin * self.cout * self.kh * self.kw
    }

    /// The convolution whose adjoint this is: it maps our output back to our input.
    pub fn adjoint(&self) -> ConvShape {
        ConvShape {
            batch: self.batch,
            cin: self.cout,
            cout: self.cin,
            h: self.oh(),
            w: self.ow(),
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            pad: self.pad,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.h == 0 || self.w == 0 || self.stride == 0 || self.oh() == 0 || self.ow() == 0 {
            return Err(Error::invalid(format!(
                "empty transposed convolution {self:?}"
            )));
        }
        let a = self.adjoint();
        if a.oh() != self.h || a.ow() != self.w {
            return Err(Error::invalid(format!(
                "transposed convolution {self:?} has no exact adjoint"
            )));
        }
        a.validate()
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    g: WeightGen,
    batch: u32,
    cin: u32,
    cout: u32,
    tiles_n: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    tiles_total: u32,
    estimator: u32,
    om: u32,
    on: u32,
    splits: u32,
    k_chunk: u32,
    _pad: [u32; 2],
}

fn params(s: &ConvShape, g: WeightGen, t: &Tiling, m: usize, n: usize) -> Params {
    let (tiles_n, tiles_total) = t.grid(m as u32, n as u32);
    Params {
        g,
        batch: s.batch as u32,
        cin: s.cin as u32,
        cout: s.cout as u32,
        tiles_n,
        h: s.h as u32,
        w: s.w as u32,
        oh: s.oh() as u32,
        ow: s.ow() as u32,
        kh: s.kh as u32,
        kw: s.kw as u32,
        stride: s.stride as u32,
        pad: s.pad as u32,
        tiles_total,
        estimator: 0,
        om: t.om,
        on: t.on,
        splits: 1,
        k_chunk: 0,
        _pad: [0; 2],
    }
}

fn shader(source: &str, rows: u32, aligned: bool, stride: usize, half: bool) -> ShaderKey {
    ShaderKey::new("masked_conv.wgsl")
        .def("half", half)
        .def("source", source)
        .def("rows", rows)
        .def("aligned", aligned)
        .def("unit_stride", stride == 1)
}

/// y <- conv(x, w * m), multiplying at the product's precision.
pub fn forward(gpu: &Gpu, s: &ConvShape, op: &Product) -> Result<Kernel> {
    s.validate()?;
    let lens = [s.input_len(), s.output_len()];
    let half = op.check(gpu, s.weights(), lens, ["conv input", "conv output"])?;
    let m = s.batch * s.oh() * s.ow();
    let t = Tiling::choose(m as u32, s.cout as u32);
    let p = params(s, op.layer.gen(), &t, m, s.cout);
    let (source, io) = (op.source, [("x", op.input), ("y", op.output)]);
    if s.cout <= NARROW {
        let key = shader(source.name(), 8, false, s.stride, half);
        return launch_masked(
            gpu,
            source,
            key,
            "forward_narrow",
            &p,
            io,
            groups_for(m, 64)?,
        );
    }
    let aligned = (s.cin * s.kh * s.kw) % 4 == 0;
    let key = shader(source.name(), t.rows, aligned, s.stride, half);
    launch_masked(gpu, source, key, "forward", &p, io, p.tiles_total)
}

/// dx <- conv^T(dy, w * m), multiplying at the product's precision (f16 serves the forward pass of a
/// transposed convolution in inference).
pub fn grad_input(gpu: &Gpu, s: &ConvShape, op: &Product) -> Result<Kernel> {
    s.validate()?;
    let lens = [s.output_len(), s.input_len()];
    let half = op.check(
        gpu,
        s.weights(),
        lens,
        ["conv output gradient", "conv input gradient"],
    )?;
    let (layer, source) = (op.layer, op.source);
    let m = s.batch * s.h * s.w;
    let t = Tiling::choose(m as u32, s.cin as u32);
    let p = params(s, layer.gen(), &t, m, s.cin);
    let io = [("dy", op.input), ("dx", op.output)];
    if s.cin <= NARROW {
        let (entry, lanes) = if s.stride > 1 {
            // Lanes ordered by residue class (see the shader), each class padded to 64 lanes.
            let q = s.batch * s.h.div_ceil(s.stride) * s.w.div_ceil(s.stride);
            (
                "grad_input_strided_narrow",
                q.div_ceil(64) * 64 * s.stride * s.stride,
            )
        } else {
            ("grad_input_narrow", m)
        };
        let key = shader(source.name(), 8, false, s.stride, half);
        return launch_masked(gpu, source, key, entry, &p, io, groups_for(lanes, 64)?);
    }
    let key = shader(source.name(), t.rows, false, s.stride, half);
    if s.stride > 1 {
        // Rows by residue class (see the shader), each class padded to whole tiles.
        let q = s.batch * s.h.div_ceil(s.stride) * s.w.div_ceil(s.stride);
        let tile_m = t.tile_m() as usize;
        let rows = q.div_ceil(tile_m) * tile_m * s.stride * s.stride;
        let p = params(s, layer.gen(), &t, rows, s.cin);
        return launch_masked(
            gpu,
            source,
            key,
            "grad_input_strided",
            &p,
            io,
            p.tiles_total,
        );
    }
    launch_masked(gpu, source, key, "grad_input", &p, io, p.tiles_total)
}

/// The score gradient of a convolution: two kernels (split-K partial sums, then the reduction
/// with the chain rule) and the scratch buffer between them.
pub struct ScoreGrad {
    pub partials: Kernel,
    pub reduce: Kernel,
    _scratch: Tensor,
}

impl ScoreGrad {
    /// Both kernels in order.
    pub fn kernels(&self) -> [&Kernel; 2] {
        [&self.partials, &self.reduce]
    }

    /// The kernels and the scratch tensor they share (keep it alive as long as the kernels).
    pub fn into_parts(self) -> ([Kernel; 2], Tensor) {
        ([self.partials, self.reduce], self._scratch)
    }
}

/// Channels on the N side up to which the narrow forms (one lane per row) are used.
const NARROW: usize = 4;

/// Number of K slices for a score gradient: enough workgroups to fill a GPU when the output is
/// small, but slices of at least 1024 positions.
fn score_splits(tiles: u32, k_total: usize) -> u32 {
    let want = 256u32.div_ceil(tiles.max(1));
    want.min((k_total / 1024).max(1) as u32).clamp(1, 64)
}

/// grad <- dL/ds of a convolution's scores.
pub fn grad_score(
    gpu: &Gpu,
    s: &ConvShape,
    layer: &LayerWeights,
    estimator: Estimator,
    io: &ScoreGradIo,
) -> Result<ScoreGrad> {
    s.validate()?;
    io.check(&LayerSizes {
        x: s.input_len(),
        dy: s.output_len(),
        weights: s.weights(),
        kind: "conv",
    })?;
    let ScoreGradIo {
        x,
        dy,
        scores,
        grad,
    } = *io;
    let n = s.cin * s.kh * s.kw;
    let t = Tiling::choose(s.cout as u32, n as u32);
    let mut p = params(s, layer.gen(), &t, s.cout, n);
    let narrow = s.cout <= NARROW;
    if narrow {
        // One lane per column: tiles of 64 columns.
        p.tiles_total = u32_of(n.div_ceil(64), "weight columns")?;
    }
    let k_total = s.batch * s.oh() * s.ow();
    p.splits = score_splits(p.tiles_total, k_total);
    p.k_chunk = k_total.div_ceil(p.splits as usize) as u32;
    p.splits = (k_total as u32).div_ceil(p.k_chunk);
    p.estimator = estimator.code();
    let scratch = gpu.tensor(
        &[p.splits as usize * s.weights()],
        DType::F32,
        "score-gradient slices",
    )?;
    let partials = gpu
        .kernel(
            shader("frozen", t.rows, false, s.stride, false),
            if narrow {
                "grad_score_narrow"
            } else {
                "grad_score"
            },
        )
        .params(&p)
        .bind("x", x)
        .bind("dy", dy)
        .bind("partial", &scratch)
        .groups(p.tiles_total * p.splits)
        .build()?;
    let reduce = gpu
        .kernel(
            shader("frozen", t.rows, false, s.stride, false),
            "reduce_score",
        )
        .params(&p)
        .bind("partial_in", &scratch)
        .bind("scores", scores)
        .bind("grad", grad)
        .groups(groups_for(s.weights(), 256)?)
        .build()?;
    Ok(ScoreGrad {
        partials,
        reduce,
        _scratch: scratch,
    })
}

/// y <- conv_transpose(x, w * m), multiplying at the product's precision.
pub fn transpose_forward(gpu: &Gpu, s: &ConvTransposeShape, op: &Product) -> Result<Kernel> {
    s.validate()?;
    grad_input(gpu, &s.adjoint(), op)
}

/// dx <- the input gradient of a transposed convolution (in f32).
pub fn transpose_grad_input(gpu: &Gpu, s: &ConvTransposeShape, op: &Product) -> Result<Kernel> {
    s.validate()?;
    forward(gpu, &s.adjoint(), &op.at(Precision::F32))
}

/// grad <- dL/ds of a transposed convolution's scores.
pub fn transpose_grad_score(
    gpu: &Gpu,
    s: &ConvTransposeShape,
    layer: &LayerWeights,
    estimator: Estimator,
    io: &ScoreGradIo,
) -> Result<ScoreGrad> {
    s.validate()?;
    // The adjoint convolution's input is this layer's output (and the other way round).
    let adjoint = ScoreGradIo {
        x: io.dy,
        dy: io.x,
        ..*io
    };
    grad_score(gpu, &s.adjoint(), layer, estimator, &adjoint)
}

/// CPU references (f64 accumulation, direct loops).
pub mod cpu {
    use super::{ConvShape, ConvTransposeShape};

    fn at(s: &ConvShape, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
        (iy >= 0 && (iy as usize) < s.h).then_some(iy as usize)
    }

    fn at_x(s: &ConvShape, ox: usize, kx: usize) -> Option<usize> {
        let ix = (ox * s.stride + kx) as isize - s.pad as isize;
        (ix >= 0 && (ix as usize) < s.w).then_some(ix as usize)
    }

    /// Visits every (b, co, oy, ox, ci, ky, kx) with an in-bounds input position.
    fn each(s: &ConvShape, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = (s.oh(), s.ow());
        for b in 0..s.batch {
            for co in 0..s.cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ci in 0..s.cin {
                            for ky in 0..s.kh {
                                let Some(iy) = at(s, oy, ky) else { continue };
                                for kx in 0..s.kw {
                                    let Some(ix) = at_x(s, ox, kx) else { continue };
                                    let yi = ((b * s.cout + co) * oh + oy) * ow + ox;
                                    let xi = ((b * s.cin + ci) * s.h + iy) * s.w + ix;
                                    let wi = ((co * s.cin + ci) * s.kh + ky) * s.kw + kx;
                                    f(yi, xi, wi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn forward(s: &ConvShape, x: &[f32], weff: &[f32]) -> Vec<f32> {
        let mut y = vec![0f64; s.output_len()];
        each(s, |yi, xi, wi| y[yi] += x[xi] as f64 * weff[wi] as f64);
        y.into_iter().map(|v| v as f32).collect()
    }

    pub fn grad_input(s: &ConvShape, dy: &[f32], weff: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f64; s.input_len()];
        each(s, |yi, xi, wi| dx[xi] += dy[yi] as f64 * weff[wi] as f64);
        dx.into_iter().map(|v| v as f32).collect()
    }

    /// dL/dw_eff.
    pub fn grad_weight(s: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut g = vec![0f64; s.weights()];
        each(s, |yi, xi, wi| g[wi] += dy[yi] as f64 * x[xi] as f64);
        g.into_iter().map(|v| v as f32).collect()
    }

    /// Transposed convolution, written directly as a scatter (independent of the adjoint trick
    /// the GPU path uses): y[b, co, iy*s - p + ky, ...] += x[b, ci, iy, ix] w[ci, co, ky, kx].
    pub fn transpose_forward(s: &ConvTransposeShape, x: &[f32], weff: &[f32]) -> Vec<f32> {
        let (oh, ow) = (s.oh(), s.ow());
        let mut y = vec![0f64; s.batch * s.cout * oh * ow];
        for b in 0..s.batch {
            for ci in 0..s.cin {
                for iy in 0..s.h {
                    for ix in 0..s.w {
                        let xv = x[((b * s.cin + ci) * s.h + iy) * s.w + ix] as f64;
                        for co in 0..s.cout {
                            for ky in 0..s.kh {
                                let oy = (iy * s.stride + ky) as isize - s.pad as isize;
                                if oy < 0 || oy as usize >= oh {
                                    continue;
                                }
                                for kx in 0..s.kw {
                                    let ox = (ix * s.stride + kx) as isize - s.pad as isize;
                                    if ox < 0 || ox as usize >= ow {
                                        continue;
                                    }
                                    let wi = ((ci * s.cout + co) * s.kh + ky) * s.kw + kx;
                                    y[((b * s.cout + co) * oh + oy as usize) * ow + ox as usize] +=
                                        xv * weff[wi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }
}
