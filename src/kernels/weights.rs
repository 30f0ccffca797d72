//! Frozen weights regenerated from (seed, layer, index), and the mask sources they are
//! multiplied with (`shaders/weights.wgsl`).

use super::StepState;
use super::{check, groups_for, u32_of};
use crate::error::Result;
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, KernelBuilder, Tensor};
use crate::rng;

/// Initialisation of the frozen weights (PRISM.md section 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Init {
    /// `±sqrt(2 / fan_in)` with a fair sign: the paper's default.
    SignedConstant,
    /// Kaiming normal `N(0, 2 / fan_in)`, drawn as a bit-exact Irwin-Hall approximation.
    KaimingNormal,
}

impl Init {
    pub fn code(self) -> u32 {
        match self {
            Init::SignedConstant => 0,
            Init::KaimingNormal => 1,
        }
    }

    pub fn from_code(c: u32) -> Option<Init> {
        match c {
            0 => Some(Init::SignedConstant),
            1 => Some(Init::KaimingNormal),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Init::SignedConstant => "signed-constant",
            Init::KaimingNormal => "kaiming-normal",
        }
    }
}

/// `WeightGen` of shaders/weights.wgsl: how a layer's frozen weights are regenerated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WeightGen {
    pub key: u32,
    pub init: u32,
    pub scale: f32,
    pub mask_key: u32,
}

/// The frozen weights of one masked layer: a pure function of (seed, layer, index).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerWeights {
    pub seed: u32,
    pub layer: u32,
    pub init: Init,
    /// The fan-in used for the Kaiming scale (PRISM.md: out*kh*kw for transposed convs).
    pub fan_in: u32,
}

impl LayerWeights {
    /// The parameters kernels need.
    pub fn gen(&self) -> WeightGen {
        let std = (2.0f64 / self.fan_in.max(1) as f64).sqrt();
        let scale = match self.init {
            Init::SignedConstant => std as f32,
            Init::KaimingNormal => (std / rng::IRWIN_HALL_STD) as f32,
        };
        WeightGen {
            key: rng::key_path(self.seed, &[rng::stream::WEIGHT, self.layer]),
            init: self.init.code(),
            scale,
            mask_key: rng::key_path(self.seed, &[rng::stream::MASK, self.layer]),
        }
    }
}

/// Where the mask of a masked kernel comes from.
pub enum MaskSource<'a> {
    /// No generation: plain f32 weights read from memory (the dense baseline).
    Dense(&'a Tensor),
    /// A fresh Bernoulli mask per step from 16-bit keep thresholds (two per u32) and the step
    /// state (client, step).
    Train { keep: &'a Tensor, step: &'a Tensor },
    /// A fixed bit-packed mask, 32 weights per u32.
    Packed(&'a Tensor),
    /// No mask: the frozen network itself.
    Frozen,
}

impl MaskSource<'_> {
    /// The template value of `source`.
    pub fn name(&self) -> &'static str {
        match self {
            MaskSource::Dense(_) => "dense",
            MaskSource::Train { .. } => "train",
            MaskSource::Packed(_) => "packed",
            MaskSource::Frozen => "frozen",
        }
    }

    /// Checks the source's tensors against a layer of `n` weights.
    pub(crate) fn check(&self, n: usize) -> Result<()> {
        match self {
            MaskSource::Dense(w) => check(w, n, DType::F32, "dense weights"),
            MaskSource::Train { keep, step } => {
                check(keep, n.div_ceil(2), DType::U32, "keep thresholds")?;
                check(step, StepState::WORDS, DType::U32, "step state")
            }
            MaskSource::Packed(b) => check(b, n.div_ceil(32), DType::U32, "packed mask"),
            MaskSource::Frozen => Ok(()),
        }
    }

    /// Binds the source's buffers on a kernel being built.
    pub(crate) fn bind<'a>(&'a self, k: KernelBuilder<'a>) -> KernelBuilder<'a> {
        match self {
            MaskSource::Dense(w) => k.bind("w", w),
            MaskSource::Train { keep, step } => k.bind("keep", keep).bind("step", step),
            MaskSource::Packed(b) => k.bind("bits", b),
            MaskSource::Frozen => k,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MaterializeParams {
    g: WeightGen,
    n: u32,
    _pad: [u32; 3],
}

/// A kernel writing the `n` effective weights of a layer into `out` (f32).
pub fn materialize(
    gpu: &Gpu,
    layer: &LayerWeights,
    n: usize,
    source: &MaskSource,
    out: &Tensor,
) -> Result<Kernel> {
    source.check(n)?;
    check(out, n, DType::F32, "materialized weights")?;
    let params = MaterializeParams {
        g: layer.gen(),
        n: u32_of(n, "weights")?,
        _pad: [0; 3],
    };
    let key = ShaderKey::new("weights.wgsl")
        .def("standalone", true)
        .def("source", source.name());
    let k = gpu
        .kernel(key, "materialize")
        .params(&params)
        .bind("out", out)
        .groups(groups_for(n, 256)?);
    Ok(source.bind(k).build()?)
}

/// CPU twins of the weight and mask functions.
pub mod cpu {
    use super::{LayerWeights, WeightGen};
    use crate::kernels::StepState;
    use crate::rng;

    /// Frozen weight `i` (bit-identical to `frozen1` in WGSL).
    pub fn frozen(g: &WeightGen, i: u32) -> f32 {
        if g.init == 0 {
            if rng::sign_bit(g.key, i) == 1 {
                g.scale
            } else {
                -g.scale
            }
        } else {
            rng::irwin_hall_centered(g.key, i) as f32 * g.scale
        }
    }

    /// All frozen weights of a layer.
    pub fn frozen_all(layer: &LayerWeights, n: usize) -> Vec<f32> {
        let g = layer.gen();
        (0..n as u32).map(|i| frozen(&g, i)).collect()
    }

    /// The mask key of a training step.
    pub fn step_mask_key(g: &WeightGen, step: &StepState) -> u32 {
        rng::key(rng::key(g.mask_key, step.client), step.step)
    }

    /// Keep threshold of element `i` from packed thresholds.
    pub fn threshold_of(keep: &[u32], i: usize) -> u32 {
        (keep[i >> 1] >> ((i & 1) * 16)) & 0xffff
    }

    /// Training-mode mask bit of element `i`.
    pub fn train_keep(keep: &[u32], mkey: u32, i: usize) -> bool {
        rng::u16_at(mkey, i as u32) < threshold_of(keep, i)
    }

    /// Packed-mask bit of element `i`.
    pub fn packed_keep(bits: &[u32], i: usize) -> bool {
        (bits[i >> 5] >> (i & 31)) & 1 == 1
    }

    /// CPU description of a mask source, for references.
    pub enum Source<'a> {
        Dense(&'a [f32]),
        Train { keep: &'a [u32], step: StepState },
        Packed(&'a [u32]),
        Frozen,
    }

    /// Effective weights w * m of a layer of `n` weights.
    pub fn effective(layer: &LayerWeights, n: usize, source: &Source) -> Vec<f32> {
        let g = layer.gen();
        match source {
            Source::Dense(w) => w.to_vec(),
            Source::Train { keep, step } => {
                let mkey = step_mask_key(&g, step);
                (0..n)
                    .map(|i| {
                        if train_keep(keep, mkey, i) {
                            frozen(&g, i as u32)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
            Source::Packed(bits) => (0..n)
                .map(|i| {
                    if packed_keep(bits, i) {
                        frozen(&g, i as u32)
                    } else {
                        0.0
                    }
                })
                .collect(),
            Source::Frozen => (0..n).map(|i| frozen(&g, i as u32)).collect(),
        }
    }
}
