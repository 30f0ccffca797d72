//! One place per layer kind. Each kind implements [`Kind`]: its shape rule, the masked-layer
//! description it adds (if any), what it records on the GPU forward and backward, and its CPU
//! twin in both directions. [`kind`] is the only dispatch on [`Layer`]; adding a kind means a
//! variant of [`Layer`], one `impl Kind` here and its shader.

mod masked;
mod norm;
mod pointwise;
mod pool;
mod structure;

use super::arch::{Layer, MaskedLayerInfo, Shape};
use super::cpu::Pass;
use super::record::{Act, ForwardRecorder, Recorded};
use crate::error::{Error, Result};
use pointwise::{Pointwise, Which};

/// A layer kind.
pub(crate) trait Kind {
    /// The sizes the layer's description names (bounded by [`super::arch::MAX_DIM`] before any
    /// arithmetic, since layer tables come from files).
    fn sizes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// The output shape for input shape `s` (its sizes already bounded), or `bad(why)`.
    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape>;

    /// Appends the masked layers this layer holds, in network order, for input shape `s`.
    fn collect_masked(&self, _s: Shape, _out: &mut Vec<MaskedLayerInfo>) -> Result<()> {
        Ok(())
    }

    /// Records the forward kernels on `x`, whose output has shape `out`.
    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>>;

    /// CPU twin of the forward pass: the output for `x` [batch, s].
    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>>;

    /// CPU twin of the backward pass: dL/dx for input `x` [batch, s] and dL/dy `dy`. Masked
    /// kinds add their dL/dw_eff into the pass.
    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>>;
}

/// The kind of a layer.
pub(crate) fn kind(l: &Layer) -> Box<dyn Kind + '_> {
    match l {
        Layer::Linear { outputs } => Box::new(masked::Linear { outputs: *outputs }),
        Layer::Conv {
            cout,
            k,
            stride,
            pad,
        }
        | Layer::ConvT {
            cout,
            k,
            stride,
            pad,
        } => Box::new(masked::Conv {
            cout: *cout,
            k: *k,
            stride: *stride,
            pad: *pad,
            transposed: matches!(l, Layer::ConvT { .. }),
        }),
        Layer::BatchNorm => Box::new(norm::BatchNorm),
        Layer::Affine => Box::new(norm::Affine),
        Layer::Relu => Box::new(Pointwise(Which::Relu)),
        Layer::Tanh => Box::new(Pointwise(Which::Tanh)),
        Layer::Upsample2x => Box::new(Pointwise(Which::Upsample2x)),
        Layer::Blur => Box::new(Pointwise(Which::Blur)),
        Layer::MaxPool2 => Box::new(pool::Pool2(crate::kernels::pool::Pool::Max)),
        Layer::AvgPool2 => Box::new(pool::Pool2(crate::kernels::pool::Pool::Avg)),
        Layer::Reshape { c, h, w } => Box::new(structure::Reshape(Shape {
            c: *c,
            h: *h,
            w: *w,
        })),
        Layer::Residual { main, skip } => Box::new(structure::Residual { main, skip }),
    }
}
