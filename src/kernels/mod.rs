//! Kernel launchers, one module per shader file, each with the CPU reference it is tested
//! against (`cpu` submodules).
//!
//! A launcher checks shapes, picks the shader variant and returns a [`Kernel`]: built once,
//! recorded as often as needed.

pub mod adam;
pub mod conv;
pub mod data;
pub mod elementwise;
pub mod mask;
pub mod matmul;
pub mod mmd;
pub mod moments;
pub mod norm;
pub mod pool;
pub mod weights;

use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

pub use weights::{Init, LayerWeights, MaskSource, WeightGen};

/// Per-step state read by training kernels (`StepState` in shaders/common.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepState {
    /// Client id: part of the mask and latent keys.
    pub client: u32,
    /// The client's step counter, running on across rounds (Adam's t is step + 1).
    pub step: u32,
    /// Round number.
    pub round: u32,
    /// Run seed.
    pub seed: u32,
    /// `step` when the current local run began.
    pub step_base: u32,
    pub _pad: [u32; 3],
}

impl StepState {
    /// Words of the state on the GPU.
    pub const WORDS: usize = 8;
}

/// The buffers of a masked layer's score gradient: the layer's input `x`, the gradient `dy`
/// of its output, its `scores`, and `grad` = dL/ds (written).
#[derive(Clone, Copy)]
pub struct ScoreGradIo<'a> {
    pub x: &'a Tensor,
    pub dy: &'a Tensor,
    pub scores: &'a Tensor,
    pub grad: &'a Tensor,
}

/// The sizes of a masked layer's activations, for checking the buffers of its score gradient:
/// `x` input values, `dy` output values and `weights` scores, all f32; `kind` names the layer
/// in errors ("linear", "conv").
#[derive(Clone, Copy)]
pub(crate) struct LayerSizes {
    pub x: usize,
    pub dy: usize,
    pub weights: usize,
    pub kind: &'static str,
}

impl LayerSizes {
    /// Checks the layer's input and output gradient.
    pub(crate) fn check_activations(&self, x: &Tensor, dy: &Tensor) -> Result<()> {
        check(x, self.x, DType::F32, &format!("{} input", self.kind))?;
        check(
            dy,
            self.dy,
            DType::F32,
            &format!("{} output gradient", self.kind),
        )
    }
}

impl ScoreGradIo<'_> {
    /// Checks all four buffers against the layer's sizes.
    pub(crate) fn check(&self, sizes: &LayerSizes) -> Result<()> {
        sizes.check_activations(self.x, self.dy)?;
        check(self.scores, sizes.weights, DType::F32, "scores")?;
        check(self.grad, sizes.weights, DType::F32, "score gradient")
    }
}

/// Arithmetic of the inner products of masked layers in inference.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// f16 multiplications accumulated in f32 (adapters with SHADER_F16); memory stays f32.
    F16,
}

impl Precision {
    /// The template flag `half`, refusing f16 on adapters without SHADER_F16.
    pub(crate) fn half(self, gpu: &crate::gpu::Gpu) -> Result<bool> {
        if self == Precision::F16 && !gpu.features().shader_f16 {
            return Err(Error::invalid(
                "this adapter has no SHADER_F16: f16 arithmetic is unavailable",
            ));
        }
        Ok(self == Precision::F16)
    }
}

/// The operands of one masked product (a forward pass or an input gradient): the layer's frozen
/// weights, where its mask comes from, the tensor it reads and the one it writes, and the
/// arithmetic of its multiplications.
#[derive(Clone, Copy)]
pub struct Product<'a> {
    pub layer: &'a LayerWeights,
    pub source: &'a MaskSource<'a>,
    pub input: &'a Tensor,
    pub output: &'a Tensor,
    pub precision: Precision,
}

impl<'a> Product<'a> {
    /// A product in f32.
    pub fn new(
        layer: &'a LayerWeights,
        source: &'a MaskSource<'a>,
        input: &'a Tensor,
        output: &'a Tensor,
    ) -> Self {
        Product {
            layer,
            source,
            input,
            output,
            precision: Precision::F32,
        }
    }

    /// The same product at `precision`.
    pub fn at(self, precision: Precision) -> Self {
        Product { precision, ..self }
    }

    /// Checks the product against a layer of `weights` weights whose input and output hold
    /// `[input, output]` f32 values (named `what` in errors), and returns the template flag
    /// `half`.
    pub(crate) fn check(
        &self,
        gpu: &Gpu,
        weights: usize,
        [input, output]: [usize; 2],
        [input_what, output_what]: [&str; 2],
    ) -> Result<bool> {
        let half = self.precision.half(gpu)?;
        self.source.check(weights)?;
        check(self.input, input, DType::F32, input_what)?;
        check(self.output, output, DType::F32, output_what)?;
        Ok(half)
    }
}

/// One launch of a masked product's entry point that reads `source`'s weights: the shader,
/// its parameters, its input and output buffers by WGSL name, and its workgroup count.
pub(crate) fn launch_masked<P: bytemuck::Pod>(
    gpu: &Gpu,
    source: &MaskSource,
    key: ShaderKey,
    entry: &str,
    params: &P,
    [(a, ta), (b, tb)]: [(&str, &Tensor); 2],
    groups: u32,
) -> Result<Kernel> {
    let k = gpu
        .kernel(key, entry)
        .params(params)
        .bind(a, ta)
        .bind(b, tb)
        .groups(groups);
    Ok(source.bind(k).build()?)
}

/// Workgroups needed for `n` items at `per_group` items per workgroup.
pub(crate) fn groups_for(n: usize, per_group: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per_group))
        .map_err(|_| Error::invalid(format!("{n} items is more than one launch can cover")))
}

/// Checks that a tensor holds `expect` elements of type `dtype`.
pub(crate) fn check(t: &Tensor, expect: usize, dtype: DType, what: &str) -> Result<()> {
    if t.len() != expect || t.dtype() != dtype {
        return Err(Error::invalid(format!(
            "{what}: expected {expect} elements of {dtype:?}, got {} of {:?} (shape {:?})",
            t.len(),
            t.dtype(),
            t.shape()
        )));
    }
    Ok(())
}

/// Converts a size to u32, refusing what kernels cannot index.
pub(crate) fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(format!("{what} = {n} exceeds 2^32 - 1")))
}

/// How a matmul-like kernel tiles its M x N output (see shaders/masked_matmul.wgsl): octets of
/// 8 lanes compute `rows` x 32 each, arranged `om` x `on` in a workgroup of 64 lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub rows: u32,
    pub om: u32,
    pub on: u32,
}

impl Tiling {
    /// The tiling that wastes least work on an M x N output.
    pub fn choose(m: u32, n: u32) -> Tiling {
        let rows = if m <= 8 { 8 } else { 32 };
        let mut best = Tiling { rows, om: 1, on: 8 };
        let mut best_cost = u64::MAX;
        for (om, on) in [(1, 8), (2, 4), (4, 2), (8, 1)] {
            let t = Tiling { rows, om, on };
            let cost = (m.div_ceil(t.tile_m()) * t.tile_m()) as u64
                * (n.div_ceil(t.tile_n()) * t.tile_n()) as u64;
            if cost < best_cost {
                best = t;
                best_cost = cost;
            }
        }
        best
    }

    pub fn tile_m(&self) -> u32 {
        self.rows * self.om
    }

    pub fn tile_n(&self) -> u32 {
        32 * self.on
    }

    /// (tiles along N, tiles in all) for an M x N output.
    pub fn grid(&self, m: u32, n: u32) -> (u32, u32) {
        let tn = n.div_ceil(self.tile_n());
        (tn, m.div_ceil(self.tile_m()) * tn)
    }
}

#[cfg(test)]
mod tests {
    use super::Tiling;

    #[test]
    fn tiling_prefers_the_least_padding() {
        assert_eq!(
            Tiling::choose(64, 1024),
            Tiling {
                rows: 32,
                om: 1,
                on: 8
            }
        );
        // Tall outputs get tall tiles (several arrangements tie at zero padding).
        let tall = Tiling::choose(65536, 64);
        assert!(tall.om >= 4 && tall.tile_n() <= 64, "{tall:?}");
        assert_eq!(Tiling::choose(1, 784).rows, 8);
        let t = Tiling::choose(100, 100);
        let (tn, total) = t.grid(100, 100);
        assert!(tn * t.tile_n() >= 100 && total * t.tile_m() * t.tile_n() >= 100 * 100);
    }
}
