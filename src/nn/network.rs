//! A generator instantiated at a fixed batch size: every activation, gradient and parameter
//! buffer allocated once, and the forward and backward passes recorded as kernel lists that
//! run again and again without allocating or compiling anything.

use std::rc::Rc;

use super::arch::{Architecture, Layer, MaskedLayerInfo, Shape};
pub use super::record::Program;
use super::record::{Act, BackwardRecorder, ForwardRecorder};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::kernels::matmul::Estimator;
use crate::kernels::{adam, mask, LayerWeights};

/// Where the masks of the built kernels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// Fresh Bernoulli masks every step from the layers' keep thresholds (training).
    Train,
    /// The layers' packed masks (generation from a model).
    Packed,
    /// The layers' materialised dense weights (the baseline a model file is compared with).
    Dense,
    /// No mask (frozen random networks, such as the loss's feature encoder).
    Frozen,
}

/// Which gradients the backward program computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// None: forward only.
    None,
    /// Gradients with respect to the input only (a frozen feature encoder).
    Input,
    /// Score gradients of every masked layer (training), not the input's.
    Scores,
}

/// How BatchNorm layers normalise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Normalisation {
    /// With the statistics of the batch being run (training, and the reference's generation,
    /// which evaluates in training mode): an image then depends on the other images of its
    /// batch.
    #[default]
    Batch,
    /// Inference form: y = a_c x + b_c with per-channel coefficients from population
    /// statistics (the network's `population` coefficients, identity until written), so that an image depends
    /// on its latent alone.
    Population,
}

/// Options of [`Network::build`].
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    pub batch: usize,
    pub seed: u32,
    pub mode: WeightMode,
    pub backward: Backward,
    pub estimator: Estimator,
    /// Offset added to masked-layer indices in the weight and mask streams (keeps a loss
    /// encoder's weights unrelated to the generator's).
    pub layer_offset: u32,
    /// f16 multiplications in the masked layers (inference on adapters with SHADER_F16;
    /// activations stay f32 in memory, sums are accumulated in f32).
    pub half: bool,
    /// Training: Adam fused into the score gradients. The backward program then takes the
    /// Adam step of each layer whose score-gradient kernel can carry it (dense layers with
    /// inputs and outputs multiples of 4), so that its gradient never goes to memory;
    /// [`Network::adam_program`] steps the others. None: every layer's gradient is stored.
    pub adam: Option<adam::AdamConfig>,
    /// How the BatchNorm layers normalise.
    pub norm: Normalisation,
}

/// The buffers of one masked layer.
pub struct MaskedLayer {
    pub info: MaskedLayerInfo,
    pub weights: LayerWeights,
    /// Scores (training) — the layer's trained parameters.
    pub scores: Tensor,
    /// 16-bit keep thresholds of the scores (read by training kernels).
    pub keep: Tensor,
    /// dL/ds (training).
    pub grad: Option<Tensor>,
    /// Adam moments (training).
    pub moments: Option<Tensor>,
    /// Packed mask (generation, uploads).
    pub bits: Tensor,
    /// WeightMode::Train: the current step's mask, packed (sampled at the start of the
    /// layer's forward pass by `mask::sample_step`, read by its matmuls or convolutions).
    pub step_bits: Option<Tensor>,
    /// Materialised weights (dense mode).
    pub dense: Option<Tensor>,
}

/// A generator (or encoder) at a fixed batch size.
pub struct Network {
    pub arch: Architecture,
    pub opts: BuildOptions,
    /// Input [batch, latent] (or [batch, c, h, w] for an encoder).
    pub input: Rc<Tensor>,
    /// Output [batch, c, h, w].
    pub output: Rc<Tensor>,
    pub output_shape: Shape,
    /// dL/d output: the backward program reads it.
    pub grad_output: Option<Rc<Tensor>>,
    /// dL/d input (Backward::Input).
    pub grad_input: Option<Rc<Tensor>>,
    pub layers: Vec<MaskedLayer>,
    /// (a_c, b_c) coefficients of each Affine layer in order, [2 channels] each, identity
    /// until an encoder loader writes them.
    pub affine: Vec<Rc<Tensor>>,
    /// Normalisation::Batch: each BatchNorm layer's (mean, 1 / sqrt(var + eps)) pairs of the
    /// last batch run, [2 channels] each, in layer order.
    pub batch_stats: Vec<Rc<Tensor>>,
    /// Normalisation::Population: each BatchNorm layer's (a_c, b_c) coefficients, [2 channels]
    /// each, in layer order (identity until written).
    pub population: Vec<Rc<Tensor>>,
    /// The tapped activations ([`Wiring::taps`]), in tap order.
    pub taps: Vec<Tap>,
    pub forward: Program,
    pub backward: Program,
    /// Masked layers whose Adam step `backward` takes (BuildOptions::adam).
    pub adam_fused: Vec<usize>,
    acts: Vec<Rc<Tensor>>,
}

/// What a network is built on besides its architecture and options: the buffers it shares
/// with other networks, its input's shape, and the layers a loss reads.
#[derive(Clone, Default)]
pub struct Wiring {
    /// The step-state buffer training kernels read (required for [`WeightMode::Train`]).
    pub step: Option<Rc<Tensor>>,
    /// The input buffer, to chain networks (allocated when None).
    pub input: Option<Rc<Tensor>>,
    /// The input's per-sample shape (an encoder's image); None: `[latent]`.
    pub input_shape: Option<Shape>,
    /// Layers (indices into `arch.layers`, increasing) whose outputs are exposed as
    /// [`Network::taps`]: a feature encoder whose loss reads several layers. The network
    /// ends at the last tap; with an input backward, each tap gets a gradient buffer that the
    /// backward pass adds in where that layer's output is used.
    pub taps: Vec<usize>,
}

impl Wiring {
    /// A training network's: its step-state buffer.
    pub fn training(step: Rc<Tensor>) -> Wiring {
        Wiring {
            step: Some(step),
            ..Wiring::default()
        }
    }

    /// An encoder's: reading images of `shape` from `input` (allocated when None).
    pub fn image(input: Option<Rc<Tensor>>, shape: Shape) -> Wiring {
        Wiring {
            input,
            input_shape: Some(shape),
            ..Wiring::default()
        }
    }
}

/// An activation a loss reads (a feature encoder's layer output) and, with an input backward,
/// the gradient the loss writes for it.
pub struct Tap {
    /// Index of the tapped layer in the architecture's layer list.
    pub layer: usize,
    pub output: Rc<Tensor>,
    pub shape: Shape,
    /// dL/d output, added into the backward pass (the last tap's is the network's
    /// `grad_output`).
    pub grad: Option<Rc<Tensor>>,
}

impl MaskedLayer {
    /// The buffers of a masked layer for a network built with `opts`.
    pub(crate) fn allocate(
        gpu: &Gpu,
        opts: &BuildOptions,
        info: MaskedLayerInfo,
        weights: LayerWeights,
    ) -> Result<MaskedLayer> {
        let n = info.weights;
        // Score gradients and Adam moments exist only in training networks.
        let training = |len: usize, what: &str| -> Result<Option<Tensor>> {
            match opts.backward {
                Backward::Scores => Ok(Some(gpu.zeros(&[len], DType::F32, what)?)),
                _ => Ok(None),
            }
        };
        let dense = if opts.mode == WeightMode::Dense {
            Some(gpu.tensor(&[n], DType::F32, "dense weights")?)
        } else {
            None
        };
        Ok(MaskedLayer {
            info,
            weights,
            scores: gpu.zeros(&[n], DType::F32, "scores")?,
            keep: gpu.zeros(&[mask::keep_words(n)], DType::U32, "keep thresholds")?,
            grad: training(n, "score gradient")?,
            moments: training(2 * n, "Adam moments")?,
            bits: gpu.zeros(&[mask::packed_words(n)], DType::U32, "packed mask")?,
            step_bits: match opts.mode {
                WeightMode::Train => {
                    Some(gpu.zeros(&[mask::packed_words(n)], DType::U32, "step mask")?)
                }
                _ => None,
            },
            dense,
        })
    }
}

impl Network {
    /// Builds the network on the buffers and taps `wiring` names (see [`Wiring`]).
    pub fn build(
        gpu: &Gpu,
        arch: &Architecture,
        opts: BuildOptions,
        wiring: Wiring,
    ) -> Result<Network> {
        let Wiring {
            step,
            input,
            input_shape,
            taps,
        } = wiring;
        let taps = &taps[..];
        if opts.batch == 0 {
            return Err(Error::invalid("batch size must be positive"));
        }
        if opts.mode == WeightMode::Train && step.is_none() {
            return Err(Error::invalid("training networks need a step-state buffer"));
        }
        if opts.mode == WeightMode::Dense && opts.backward == Backward::Scores {
            return Err(Error::invalid(
                "dense-weight networks have no scores to train",
            ));
        }
        if taps.windows(2).any(|w| w[0] >= w[1]) || taps.last() >= Some(&arch.layers.len()) {
            return Err(Error::invalid(format!(
                "taps {taps:?}: increasing layer indices below {} expected",
                arch.layers.len()
            )));
        }
        let mut arch = arch.clone();
        if let Some(&last) = taps.last() {
            arch.layers.truncate(last + 1);
        }
        let arch = &arch;
        let in_shape = input_shape.unwrap_or(Shape::flat(arch.latent));
        let infos = {
            let mut a = arch.clone();
            a.latent = in_shape.len();
            if input_shape.is_some() {
                a.layers.insert(
                    0,
                    Layer::Reshape {
                        c: in_shape.c,
                        h: in_shape.h,
                        w: in_shape.w,
                    },
                );
            }
            a.masked_layers()?
        };
        let mut b = ForwardRecorder {
            gpu,
            opts,
            init: arch.init,
            layers: Vec::new(),
            infos,
            step: step.clone(),
            forward: Program::default(),
            acts: Vec::new(),
            affine: Vec::new(),
            batch_stats: Vec::new(),
            population: Vec::new(),
        };
        let input = match input {
            Some(t) => {
                if t.len() != opts.batch * in_shape.len() {
                    return Err(Error::invalid("network input has the wrong size"));
                }
                t
            }
            None => Rc::new(gpu.zeros(
                &[opts.batch, in_shape.c, in_shape.h, in_shape.w],
                DType::F32,
                "network input",
            )?),
        };
        let x = Act {
            t: input.clone(),
            shape: in_shape,
        };
        let (out, tape, outs) = b.build(&arch.layers, x)?;
        let ForwardRecorder {
            layers,
            forward,
            acts,
            affine,
            batch_stats,
            population,
            ..
        } = b;
        let mut net = Network {
            arch: arch.clone(),
            opts,
            input,
            output: out.t.clone(),
            output_shape: out.shape,
            grad_output: None,
            grad_input: None,
            layers,
            affine,
            batch_stats,
            population,
            adam_fused: Vec::new(),
            taps: taps
                .iter()
                .map(|&l| Tap {
                    layer: l,
                    output: outs[l].t.clone(),
                    shape: outs[l].shape,
                    grad: None,
                })
                .collect(),
            forward,
            backward: Program::default(),
            acts,
        };
        if opts.backward != Backward::None {
            let dy = Rc::new(gpu.zeros(
                &[opts.batch, out.shape.c, out.shape.h, out.shape.w],
                DType::F32,
                "output gradient",
            )?);
            let last = net.taps.len().saturating_sub(1);
            let mut tap_grads = Vec::new();
            for (i, tap) in net.taps.iter_mut().enumerate() {
                let g = if i == last {
                    dy.clone()
                } else {
                    let s = tap.shape;
                    let g = Rc::new(gpu.zeros(
                        &[opts.batch, s.c, s.h, s.w],
                        DType::F32,
                        "tap gradient",
                    )?);
                    tap_grads.push((tap.layer, g.clone()));
                    g
                };
                tap.grad = Some(g);
            }
            let mut bb = BackwardRecorder {
                gpu,
                opts,
                layers: &net.layers,
                step: step.as_deref(),
                program: Program::default(),
                grads: Vec::new(),
                tap_grads,
                adam_fused: Vec::new(),
            };
            let dx = bb.back(&tape, dy.clone(), opts.backward == Backward::Input, true)?;
            let BackwardRecorder {
                program,
                grads,
                tap_grads,
                adam_fused,
                ..
            } = bb;
            net.adam_fused = adam_fused;
            net.backward = program;
            net.acts.extend(grads);
            net.acts.extend(tap_grads.into_iter().map(|t| t.1));
            net.grad_input = dx;
            net.grad_output = Some(dy);
        }
        Ok(net)
    }

    /// Kernels that refresh every layer's keep thresholds from its scores (after the scores
    /// are overwritten, e.g. by the server's broadcast).
    pub fn thresholds_program(&self, gpu: &Gpu) -> Result<Program> {
        let mut p = Program::default();
        for l in &self.layers {
            p.push(mask::thresholds(gpu, &l.scores, &l.keep)?);
        }
        Ok(p)
    }

    /// Adam steps on the scores of every layer whose step the backward program does not take
    /// ([`BuildOptions::adam`]; training networks).
    pub fn adam_program(
        &self,
        gpu: &Gpu,
        cfg: &adam::AdamConfig,
        step: &Tensor,
    ) -> Result<Program> {
        let mut p = Program::default();
        for (i, l) in self.layers.iter().enumerate() {
            if self.adam_fused.contains(&i) {
                continue;
            }
            let (Some(grad), Some(moments)) = (&l.grad, &l.moments) else {
                return Err(Error::invalid("Adam needs a training network"));
            };
            let state = adam::TrainingState {
                scores: &l.scores,
                moments,
                keep: &l.keep,
                step,
            };
            p.push(adam::step(gpu, cfg, grad, &state)?);
        }
        Ok(p)
    }

    /// Total masked weights.
    pub fn masked_weights(&self) -> usize {
        self.layers.iter().map(|l| l.info.weights).sum()
    }
}
