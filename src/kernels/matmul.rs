//! Masked dense layer (`shaders/masked_matmul.wgsl`): forward, gradient with respect to the
//! input, and gradient with respect to the scores, with weights regenerated in the kernel.

use super::adam::{AdamConfig, AdamParams, TrainingState};
use super::{
    check, launch_masked, u32_of, LayerSizes, LayerWeights, MaskSource, Product, ScoreGradIo,
    Tiling, WeightGen,
};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

/// Shape of a dense layer: x [batch, inputs] -> y [batch, outputs], weights [outputs, inputs].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub inputs: usize,
    pub outputs: usize,
}

impl LinearShape {
    pub fn weights(&self) -> usize {
        self.inputs * self.outputs
    }

    /// The sizes its score gradient checks.
    pub(crate) fn sizes(&self) -> LayerSizes {
        LayerSizes {
            x: self.batch * self.inputs,
            dy: self.batch * self.outputs,
            weights: self.weights(),
            kind: "linear",
        }
    }

    /// Multiply-adds of one forward pass.
    pub fn macs(&self) -> u64 {
        (self.batch * self.inputs * self.outputs) as u64
    }

    fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.inputs == 0 || self.outputs == 0 {
            return Err(Error::invalid(format!("empty linear layer {self:?}")));
        }
        u32_of(self.weights(), "weights of a layer")?;
        u32_of(
            self.batch * self.inputs.max(self.outputs),
            "activations of a layer",
        )?;
        Ok(())
    }

    /// Inputs and outputs multiples of 4: the kernels' vec4 forms.
    pub fn aligned(&self) -> bool {
        self.inputs % 4 == 0 && self.outputs % 4 == 0
    }
}

/// The score-gradient estimator (PRISM.md section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Estimator {
    /// The reference code's: dm/dp treated as p, so dL/ds = dL/dw_eff * w * p^2 (1 - p).
    PScaled,
    /// Plain straight-through: dm/dp = 1, so dL/ds = dL/dw_eff * w * p (1 - p).
    StraightThrough,
}

impl Estimator {
    pub(crate) fn code(self) -> u32 {
        match self {
            Estimator::PScaled => 0,
            Estimator::StraightThrough => 1,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    g: WeightGen,
    batch: u32,
    inputs: u32,
    outputs: u32,
    tiles_n: u32,
    tiles_total: u32,
    estimator: u32,
    om: u32,
    on: u32,
    /// grad_score_adam's Adam step (unread by the other entry points).
    adam: AdamParams,
}

fn params(s: &LinearShape, g: WeightGen, t: &Tiling, m: usize, n: usize, est: u32) -> Params {
    let (tiles_n, tiles_total) = t.grid(m as u32, n as u32);
    Params {
        g,
        batch: s.batch as u32,
        inputs: s.inputs as u32,
        outputs: s.outputs as u32,
        tiles_n,
        tiles_total,
        estimator: est,
        om: t.om,
        on: t.on,
        adam: AdamParams::default(),
    }
}

fn shader(s: &LinearShape, source: &str, t: &Tiling, half: bool) -> ShaderKey {
    ShaderKey::new("masked_matmul.wgsl")
        .def("half", half)
        .def("source", source)
        .def("rows", t.rows)
        .def("aligned", s.aligned())
}

/// y <- x (w * m)^T, multiplying at the product's precision.
pub fn forward(gpu: &Gpu, s: &LinearShape, op: &Product) -> Result<Kernel> {
    s.validate()?;
    let lens = [s.batch * s.inputs, s.batch * s.outputs];
    let half = op.check(gpu, s.weights(), lens, ["linear input", "linear output"])?;
    let t = Tiling::choose(s.batch as u32, s.outputs as u32);
    let p = params(s, op.layer.gen(), &t, s.batch, s.outputs, 0);
    let key = shader(s, op.source.name(), &t, half);
    let io = [("x", op.input), ("y", op.output)];
    launch_masked(gpu, op.source, key, "forward", &p, io, p.tiles_total)
}

/// The layer to name when a tensor serves as a matmul's dense "weights" (a Gram matrix, the
/// MMD's coefficients times samples): the dense source reads them from memory, so nothing of
/// it is used.
pub const DENSE_OPERAND: LayerWeights = LayerWeights {
    seed: 0,
    layer: 0,
    init: super::Init::SignedConstant,
    fan_in: 1,
};

/// The lower triangle, diagonal included, of the Gram matrix g = z z^T of z [rows, dims]: a
/// forward pass with z as its own dense weights that skips the tiles wholly above the
/// diagonal (g is symmetric, so they repeat the ones below), leaving them as they were. The
/// MMD's pairwise products.
pub fn gram_lower(gpu: &Gpu, z: &Tensor, g: &Tensor) -> Result<Kernel> {
    let rows = z.shape().first().copied().unwrap_or(0);
    let s = LinearShape {
        batch: rows,
        inputs: z.len().checked_div(rows).unwrap_or(0),
        outputs: rows,
    };
    s.validate()?;
    check(z, s.batch * s.inputs, DType::F32, "Gram input")?;
    check(g, s.batch * s.batch, DType::F32, "Gram matrix")?;
    let t = lower_tiling(rows as u32);
    let p = params(&s, DENSE_OPERAND.gen(), &t, s.batch, s.outputs, 0);
    let key = shader(&s, "dense", &t, false).def("lower", true);
    let io = [("x", z), ("y", g)];
    launch_masked(
        gpu,
        &MaskSource::Dense(z),
        key,
        "forward",
        &p,
        io,
        p.tiles_total,
    )
}

/// Tiles a lower-triangle kernel computes for an m x m output.
pub(crate) fn lower_tiles(t: &Tiling, m: u32) -> u32 {
    let (tiles_n, tiles_total) = t.grid(m, m);
    (0..tiles_total)
        .filter(|tile| (tile % tiles_n) * t.tile_n() < (tile / tiles_n + 1) * t.tile_m())
        .count() as u32
}

/// The arrangement that computes the least area for the lower triangle of an m x m output.
fn lower_tiling(m: u32) -> Tiling {
    let rows = Tiling::choose(m, m).rows;
    [(1, 8), (2, 4), (4, 2), (8, 1)]
        .into_iter()
        .map(|(om, on)| Tiling { rows, om, on })
        .min_by_key(|t| lower_tiles(t, m) as u64 * (t.tile_m() * t.tile_n()) as u64)
        .expect("four arrangements")
}

/// dx <- dy (w * m), in f32 (the input gradient of training; no f16 form).
pub fn grad_input(gpu: &Gpu, s: &LinearShape, op: &Product) -> Result<Kernel> {
    s.validate()?;
    let lens = [s.batch * s.outputs, s.batch * s.inputs];
    if op.check(
        gpu,
        s.weights(),
        lens,
        ["output gradient", "input gradient"],
    )? {
        return Err(Error::invalid("a linear input gradient runs in f32 only"));
    }
    let t = Tiling::choose(s.batch as u32, s.inputs as u32);
    let p = params(s, op.layer.gen(), &t, s.batch, s.inputs, 0);
    let key = shader(s, op.source.name(), &t, false);
    let io = [("dy", op.input), ("dx", op.output)];
    launch_masked(gpu, op.source, key, "grad_input", &p, io, p.tiles_total)
}

/// grad <- (dy^T x) * w * f(sigmoid(scores)), the gradient of the loss with respect to the
/// scores through the chosen estimator.
pub fn grad_score(
    gpu: &Gpu,
    s: &LinearShape,
    layer: &LayerWeights,
    estimator: Estimator,
    io: &ScoreGradIo,
) -> Result<Kernel> {
    s.validate()?;
    io.check(&s.sizes())?;
    let ScoreGradIo {
        x,
        dy,
        scores,
        grad,
    } = *io;
    let t = Tiling::choose(s.outputs as u32, s.inputs as u32);
    let p = params(s, layer.gen(), &t, s.outputs, s.inputs, estimator.code());
    Ok(gpu
        .kernel(shader(s, "frozen", &t, false), "grad_score")
        .params(&p)
        .bind("x", x)
        .bind("dy", dy)
        .bind("scores", scores)
        .bind("grad", grad)
        .groups(p.tiles_total)
        .build()?)
}

/// [`grad_score`] with the layer's Adam step applied in the kernel instead of the gradient
/// being stored: scores, moments ((m, v) interleaved, 2n f32) and keep thresholds are updated as
/// [`super::adam::step`] would from that gradient, at t = step.step + 1. For aligned shapes
/// (inputs and outputs multiples of 4); the caller must record every kernel that reads this
/// layer's scores or keep thresholds in the step (its forward and grad_input) before this one.
pub fn grad_score_adam(
    gpu: &Gpu,
    s: &LinearShape,
    layer: &LayerWeights,
    estimator: Estimator,
    adam: &AdamConfig,
    io: &AdamState,
) -> Result<Kernel> {
    let (x, dy) = (io.x, io.dy);
    s.validate()?;
    if !s.aligned() {
        return Err(Error::invalid(format!(
            "Adam in the score gradient needs inputs and outputs that are multiples of 4: {s:?}"
        )));
    }
    s.sizes().check_activations(x, dy)?;
    io.state.check(s.weights())?;
    let t = Tiling::choose(s.outputs as u32, s.inputs as u32);
    let p = Params {
        adam: adam.into(),
        ..params(s, layer.gen(), &t, s.outputs, s.inputs, estimator.code())
    };
    Ok(gpu
        .kernel(
            shader(s, "frozen", &t, false).def("adam", true),
            "grad_score",
        )
        .params(&p)
        .bind("x", x)
        .bind("dy", dy)
        .bind("scores", io.state.scores)
        .bind("moments", io.state.moments)
        .bind("keep_out", io.state.keep)
        .bind("adam_step", io.state.step)
        .groups(p.tiles_total)
        .build()?)
}

/// What [`grad_score_adam`] reads (the layer's input and output gradient) and updates (the
/// layer's training state).
pub struct AdamState<'a> {
    pub x: &'a Tensor,
    pub dy: &'a Tensor,
    pub state: TrainingState<'a>,
}

/// CPU references (f64 accumulation).
pub mod cpu {
    use super::{Estimator, LinearShape};

    /// The products' sums as f32: `term(i, j, k)` gives the accumulator and the value of one
    /// product; k, innermost, runs over the summed index, so each sum is accumulated (in f64) in
    /// index order.
    fn sum(
        len: usize,
        [ni, nj, nk]: [usize; 3],
        mut term: impl FnMut(usize, usize, usize) -> (usize, f64),
    ) -> Vec<f32> {
        let mut acc = vec![0f64; len];
        for i in 0..ni {
            for j in 0..nj {
                for k in 0..nk {
                    let (at, v) = term(i, j, k);
                    acc[at] += v;
                }
            }
        }
        acc.into_iter().map(|v| v as f32).collect()
    }

    /// y = x weff^T with weff [outputs, inputs].
    pub fn forward(s: &LinearShape, x: &[f32], weff: &[f32]) -> Vec<f32> {
        let (n, k) = (s.outputs, s.inputs);
        sum(s.batch * n, [s.batch, n, k], |b, o, i| {
            (b * n + o, x[b * k + i] as f64 * weff[o * k + i] as f64)
        })
    }

    /// dx = dy weff.
    pub fn grad_input(s: &LinearShape, dy: &[f32], weff: &[f32]) -> Vec<f32> {
        let (n, k) = (s.outputs, s.inputs);
        sum(s.batch * k, [s.batch, k, n], |b, i, o| {
            (b * k + i, dy[b * n + o] as f64 * weff[o * k + i] as f64)
        })
    }

    /// dL/dw_eff = dy^T x.
    pub fn grad_weight(s: &LinearShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (n, k) = (s.outputs, s.inputs);
        sum(s.weights(), [n, k, s.batch], |o, i, b| {
            (o * k + i, dy[b * n + o] as f64 * x[b * k + i] as f64)
        })
    }

    /// The estimator's factor df/ds at score s.
    pub fn score_factor(estimator: Estimator, s: f32) -> f32 {
        let p = 1.0 / (1.0 + (-s).exp());
        match estimator {
            Estimator::PScaled => p * p * (1.0 - p),
            Estimator::StraightThrough => p * (1.0 - p),
        }
    }

    /// dL/ds from dL/dw_eff, the frozen weights and the scores.
    pub fn grad_score(
        estimator: Estimator,
        grad_weight: &[f32],
        frozen: &[f32],
        scores: &[f32],
    ) -> Vec<f32> {
        grad_weight
            .iter()
            .zip(frozen)
            .zip(scores)
            .map(|((g, w), s)| g * w * score_factor(estimator, *s))
            .collect()
    }
}
