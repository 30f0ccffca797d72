//! A generator instantiated at a fixed batch size: every activation, gradient and parameter
//! buffer allocated once, and the forward and backward passes recorded as kernel lists that
//! run again and again without allocating or compiling anything.

use std::rc::Rc;

use super::arch::{Architecture, Layer, MaskedLayerInfo, Shape};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::conv::{self, ConvShape, ConvTransposeShape};
use crate::kernels::matmul::{self, Estimator, LinearShape};
use crate::kernels::norm::{self, NormShape};
use crate::kernels::pool::{self, Pool, PoolShape};
use crate::kernels::{adam, elementwise as ew, mask, Init, LayerWeights, MaskSource, Precision};

/// Kernels to run in order, with the scratch tensors they need kept alive.
#[derive(Default)]
pub struct Program {
    pub kernels: Vec<Kernel>,
    scratch: Vec<Tensor>,
}

impl Program {
    fn push(&mut self, k: Kernel) {
        self.kernels.push(k);
    }

    fn push_score_grad(&mut self, g: conv::ScoreGrad) {
        let ([a, b], scratch) = g.into_parts();
        self.kernels.push(a);
        self.kernels.push(b);
        self.scratch.push(scratch);
    }

    /// References for [`Gpu::submit`] and friends.
    pub fn refs(&self) -> Vec<&Kernel> {
        self.kernels.iter().collect()
    }
}

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
    /// Materialised weights (dense mode).
    pub dense: Option<Tensor>,
}

#[derive(Clone)]
struct Act {
    t: Rc<Tensor>,
    shape: Shape,
}

/// A recorded forward op, kept for building the backward pass.
enum Node {
    Masked {
        layer: usize,
        spec: Layer,
        x: Act,
        y: Act,
    },
    Norm {
        x: Act,
        y: Act,
        stats: Rc<Tensor>,
    },
    Relu {
        y: Act,
    },
    Tanh {
        y: Act,
    },
    Up {
        x: Act,
        y: Act,
    },
    Blur {
        y: Act,
    },
    Pool {
        pool: Pool,
        x: Act,
        y: Act,
    },
    Affine {
        x: Act,
        y: Act,
        coef: Rc<Tensor>,
    },
    Reshape {
        x: Act,
    },
    Residual {
        main: Vec<Node>,
        skip: Vec<Node>,
        x: Act,
    },
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
    /// The tapped activations ([`Network::build_tapped`]), in tap order.
    pub taps: Vec<Tap>,
    pub forward: Program,
    pub backward: Program,
    /// Masked layers whose Adam step `backward` takes (BuildOptions::adam).
    pub adam_fused: Vec<usize>,
    acts: Vec<Rc<Tensor>>,
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

struct Builder<'g> {
    gpu: &'g Gpu,
    opts: BuildOptions,
    init: Init,
    layers: Vec<MaskedLayer>,
    infos: Vec<MaskedLayerInfo>,
    step: Option<Rc<Tensor>>,
    forward: Program,
    acts: Vec<Rc<Tensor>>,
    affine: Vec<Rc<Tensor>>,
}

impl<'g> Builder<'g> {
    fn act(&mut self, shape: Shape, what: &str) -> Result<Act> {
        let t = Rc::new(self.gpu.tensor(
            &[self.opts.batch, shape.c, shape.h, shape.w],
            DType::F32,
            what,
        )?);
        self.acts.push(t.clone());
        Ok(Act { t, shape })
    }

    fn source(&self, layer: usize) -> MaskSource<'_> {
        let l = &self.layers[layer];
        match self.opts.mode {
            WeightMode::Train => MaskSource::Train {
                keep: &l.keep,
                step: self
                    .step
                    .as_deref()
                    .expect("training networks have a step buffer"),
            },
            WeightMode::Packed => MaskSource::Packed(&l.bits),
            WeightMode::Dense => {
                MaskSource::Dense(l.dense.as_ref().expect("dense networks have dense weights"))
            }
            WeightMode::Frozen => MaskSource::Frozen,
        }
    }

    fn new_masked(&mut self) -> Result<usize> {
        let idx = self.layers.len();
        let info = self.infos[idx];
        let n = info.weights;
        let gpu = self.gpu;
        let training = self.opts.backward == Backward::Scores;
        let weights = LayerWeights {
            seed: self.opts.seed,
            layer: self.opts.layer_offset + info.index,
            init: self.init,
            fan_in: info.fan_in,
        };
        let dense = if self.opts.mode == WeightMode::Dense {
            Some(gpu.tensor(&[n], DType::F32, "dense weights")?)
        } else {
            None
        };
        self.layers.push(MaskedLayer {
            info,
            weights,
            scores: gpu.zeros(&[n], DType::F32, "scores")?,
            keep: gpu.zeros(&[mask::keep_words(n)], DType::U32, "keep thresholds")?,
            grad: if training {
                Some(gpu.zeros(&[n], DType::F32, "score gradient")?)
            } else {
                None
            },
            moments: if training {
                Some(gpu.zeros(&[2 * n], DType::F32, "Adam moments")?)
            } else {
                None
            },
            bits: gpu.zeros(&[mask::packed_words(n)], DType::U32, "packed mask")?,
            dense,
        });
        Ok(idx)
    }

    /// Records the forward kernels of `layers` on input `x`: the output, the tape for the
    /// backward pass, and each layer's output.
    fn build(&mut self, layers: &[Layer], mut x: Act) -> Result<(Act, Vec<Node>, Vec<Act>)> {
        let b = self.opts.batch;
        let mut tape = Vec::new();
        let mut outs = Vec::with_capacity(layers.len());
        for spec in layers {
            let out_shape = spec.output_shape(x.shape)?;
            let node = match spec {
                Layer::Linear { .. } | Layer::Conv { .. } | Layer::ConvT { .. } => {
                    let li = self.new_masked()?;
                    let y = self.act(out_shape, "activation")?;
                    let lw = self.layers[li].weights;
                    let precision = if self.opts.half {
                        Precision::F16
                    } else {
                        Precision::F32
                    };
                    let source = self.source(li);
                    let k = match spec {
                        Layer::Linear { outputs } => {
                            let s = LinearShape {
                                batch: b,
                                inputs: x.shape.len(),
                                outputs: *outputs,
                            };
                            matmul::forward_in(self.gpu, &s, &lw, &source, &x.t, &y.t, precision)?
                        }
                        Layer::Conv { .. } => conv::forward_in(
                            self.gpu,
                            &conv_shape(b, spec, x.shape),
                            &lw,
                            &source,
                            &x.t,
                            &y.t,
                            precision,
                        )?,
                        _ => conv::transpose_forward_in(
                            self.gpu,
                            &convt_shape(b, spec, x.shape),
                            &lw,
                            &source,
                            &x.t,
                            &y.t,
                            precision,
                        )?,
                    };
                    self.forward.push(k);
                    Node::Masked {
                        layer: li,
                        spec: spec.clone(),
                        x: x.clone(),
                        y: y.clone(),
                    }
                }
                Layer::BatchNorm => {
                    let y = self.act(out_shape, "normalised")?;
                    let stats = Rc::new(self.gpu.tensor(
                        &[2 * x.shape.c],
                        DType::F32,
                        "batch statistics",
                    )?);
                    self.acts.push(stats.clone());
                    self.forward.push(norm::forward(
                        self.gpu,
                        &norm_shape(b, x.shape),
                        &x.t,
                        &y.t,
                        &stats,
                    )?);
                    Node::Norm {
                        x: x.clone(),
                        y,
                        stats,
                    }
                }
                Layer::Relu => {
                    let y = self.act(out_shape, "relu")?;
                    self.forward.push(ew::relu(self.gpu, &x.t, &y.t)?);
                    Node::Relu { y }
                }
                Layer::Tanh => {
                    let y = self.act(out_shape, "tanh")?;
                    self.forward.push(ew::tanh(self.gpu, &x.t, &y.t)?);
                    Node::Tanh { y }
                }
                Layer::Upsample2x => {
                    let y = self.act(out_shape, "upsampled")?;
                    self.forward.push(ew::upsample2x(
                        self.gpu,
                        b * x.shape.c,
                        x.shape.h,
                        x.shape.w,
                        &x.t,
                        &y.t,
                    )?);
                    Node::Up { x: x.clone(), y }
                }
                Layer::Blur => {
                    let y = self.act(out_shape, "smoothed")?;
                    self.forward.push(ew::blur3x3(
                        self.gpu,
                        b * x.shape.c,
                        x.shape.h,
                        x.shape.w,
                        &x.t,
                        &y.t,
                    )?);
                    Node::Blur { y }
                }
                Layer::MaxPool2 | Layer::AvgPool2 => {
                    let y = self.act(out_shape, "pooled")?;
                    let pool = if matches!(spec, Layer::MaxPool2) {
                        Pool::Max
                    } else {
                        Pool::Avg
                    };
                    self.forward.push(pool::forward(
                        self.gpu,
                        pool,
                        &pool_shape(b, x.shape),
                        &x.t,
                        &y.t,
                    )?);
                    Node::Pool {
                        pool,
                        x: x.clone(),
                        y,
                    }
                }
                Layer::Affine => {
                    let y = self.act(out_shape, "affine")?;
                    let identity: Vec<f32> = (0..2 * x.shape.c)
                        .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
                        .collect();
                    let coef = Rc::new(self.gpu.upload_f32(
                        &identity,
                        &[2 * x.shape.c],
                        "affine coefficients",
                    )?);
                    self.affine.push(coef.clone());
                    self.forward.push(norm::affine(
                        self.gpu,
                        &norm_shape(b, x.shape),
                        &coef,
                        &x.t,
                        &y.t,
                    )?);
                    Node::Affine {
                        x: x.clone(),
                        y,
                        coef,
                    }
                }
                Layer::Reshape { .. } => Node::Reshape { x: x.clone() },
                Layer::Residual { main, skip } => {
                    let (ym, main_tape, _) = self.build(main, x.clone())?;
                    let (ys, skip_tape, _) = self.build(skip, x.clone())?;
                    let y = self.act(out_shape, "residual sum")?;
                    self.forward.push(ew::add(self.gpu, &ym.t, &ys.t, &y.t)?);
                    tape.push(Node::Residual {
                        main: main_tape,
                        skip: skip_tape,
                        x: x.clone(),
                    });
                    x = y;
                    outs.push(x.clone());
                    continue;
                }
            };
            x = match &node {
                Node::Masked { y, .. }
                | Node::Norm { y, .. }
                | Node::Relu { y }
                | Node::Tanh { y }
                | Node::Blur { y }
                | Node::Pool { y, .. }
                | Node::Affine { y, .. }
                | Node::Up { y, .. } => y.clone(),
                Node::Reshape { x } => Act {
                    t: x.t.clone(),
                    shape: out_shape,
                },
                Node::Residual { .. } => unreachable!("handled above"),
            };
            tape.push(node);
            outs.push(x.clone());
        }
        Ok((x, tape, outs))
    }
}

fn pool_shape(batch: usize, s: Shape) -> PoolShape {
    PoolShape {
        planes: batch * s.c,
        h: s.h,
        w: s.w,
    }
}

fn conv_shape(batch: usize, spec: &Layer, s: Shape) -> ConvShape {
    match spec {
        Layer::Conv {
            cout,
            k,
            stride,
            pad,
        } => ConvShape {
            batch,
            cin: s.c,
            cout: *cout,
            h: s.h,
            w: s.w,
            kh: *k,
            kw: *k,
            stride: *stride,
            pad: *pad,
        },
        _ => unreachable!("conv_shape of a non-conv layer"),
    }
}

fn convt_shape(batch: usize, spec: &Layer, s: Shape) -> ConvTransposeShape {
    match spec {
        Layer::ConvT {
            cout,
            k,
            stride,
            pad,
        } => ConvTransposeShape {
            batch,
            cin: s.c,
            cout: *cout,
            h: s.h,
            w: s.w,
            kh: *k,
            kw: *k,
            stride: *stride,
            pad: *pad,
        },
        _ => unreachable!("convt_shape of a non-transposed-conv layer"),
    }
}

fn norm_shape(batch: usize, s: Shape) -> NormShape {
    NormShape {
        batch,
        channels: s.c,
        size: s.h * s.w,
    }
}

/// Builds backward kernels for a tape: `dy` is the gradient of the tape's output; returns the
/// gradient of its input (None when nothing upstream needs it).
struct BackBuilder<'g, 'n> {
    gpu: &'g Gpu,
    opts: BuildOptions,
    layers: &'n [MaskedLayer],
    step: Option<&'n Tensor>,
    program: Program,
    grads: Vec<Rc<Tensor>>,
    /// Gradients of tapped top-level layer outputs (by layer index) to add into the pass;
    /// the last tap's is the pass's starting gradient and is not listed.
    tap_grads: Vec<(usize, Rc<Tensor>)>,
    /// Layers whose Adam step the pass takes (BuildOptions::adam).
    adam_fused: Vec<usize>,
}

impl BackBuilder<'_, '_> {
    fn grad_like_tensor(&mut self, t: &Tensor, what: &str) -> Result<Rc<Tensor>> {
        let g = Rc::new(self.gpu.tensor(t.shape(), DType::F32, what)?);
        self.grads.push(g.clone());
        Ok(g)
    }

    fn grad_like(&mut self, a: &Act, what: &str) -> Result<Rc<Tensor>> {
        let t = Rc::new(self.gpu.tensor(
            &[self.opts.batch, a.shape.c, a.shape.h, a.shape.w],
            DType::F32,
            what,
        )?);
        self.grads.push(t.clone());
        Ok(t)
    }

    fn source(&self, layer: usize) -> MaskSource<'_> {
        let l = &self.layers[layer];
        match self.opts.mode {
            WeightMode::Train => MaskSource::Train {
                keep: &l.keep,
                step: self.step.expect("step buffer"),
            },
            WeightMode::Packed => MaskSource::Packed(&l.bits),
            WeightMode::Dense => {
                MaskSource::Dense(l.dense.as_ref().expect("dense networks have dense weights"))
            }
            WeightMode::Frozen => MaskSource::Frozen,
        }
    }

    /// `need_input`: whether the caller needs dL/d(input of this tape). `top`: the tape is the
    /// network's own layer list (where taps are).
    fn back(
        &mut self,
        tape: &[Node],
        dy: Rc<Tensor>,
        need_input: bool,
        top: bool,
    ) -> Result<Option<Rc<Tensor>>> {
        let b = self.opts.batch;
        let mut dy = dy;
        // The first node whose input gradient anything needs: nodes before the first masked
        // layer (or the tape start when the input gradient is wanted) need no dx.
        let first_needed = if need_input {
            0
        } else {
            match tape.iter().position(contains_masked) {
                Some(i) => i,
                None => return Ok(None),
            }
        };
        for (i, node) in tape.iter().enumerate().rev() {
            let want_dx = i > first_needed || need_input;
            let scores_wanted = self.opts.backward == Backward::Scores;
            if top {
                let tapped = self
                    .tap_grads
                    .iter()
                    .find(|(l, _)| *l == i)
                    .map(|t| t.1.clone());
                if let Some(g) = tapped {
                    // This layer's output feeds the loss directly as well as the layers after it.
                    let sum = self.grad_like_tensor(&dy, "tap gradient sum")?;
                    self.program.push(ew::add(self.gpu, &dy, &g, &sum)?);
                    dy = sum;
                }
            }
            match node {
                Node::Masked {
                    layer,
                    spec,
                    x,
                    y: _,
                } => {
                    let l = &self.layers[*layer];
                    let dx = if want_dx {
                        Some(self.grad_like(x, "input gradient")?)
                    } else {
                        None
                    };
                    match spec {
                        Layer::Linear { outputs } => {
                            let s = LinearShape {
                                batch: b,
                                inputs: x.shape.len(),
                                outputs: *outputs,
                            };
                            // With Adam fused, the score gradient updates the scores and
                            // keep thresholds that grad_input reads, so it comes after it.
                            let fused = match (self.opts.adam, &l.moments, self.step) {
                                (Some(cfg), Some(moments), Some(step))
                                    if scores_wanted && s.aligned() =>
                                {
                                    Some(matmul::grad_score_adam(
                                        self.gpu,
                                        &s,
                                        &l.weights,
                                        self.opts.estimator,
                                        &cfg,
                                        &x.t,
                                        &dy,
                                        &matmul::AdamState {
                                            scores: &l.scores,
                                            moments,
                                            keep: &l.keep,
                                            step,
                                        },
                                    )?)
                                }
                                _ => None,
                            };
                            if scores_wanted && fused.is_none() {
                                let g = l.grad.as_ref().expect("training layers have gradients");
                                self.program.push(matmul::grad_score(
                                    self.gpu,
                                    &s,
                                    &l.weights,
                                    self.opts.estimator,
                                    &x.t,
                                    &dy,
                                    &l.scores,
                                    g,
                                )?);
                            }
                            if let Some(dx) = &dx {
                                self.program.push(matmul::grad_input(
                                    self.gpu,
                                    &s,
                                    &l.weights,
                                    &self.source(*layer),
                                    &dy,
                                    dx,
                                )?);
                            }
                            if let Some(k) = fused {
                                self.program.push(k);
                                self.adam_fused.push(*layer);
                            }
                        }
                        Layer::Conv { .. } => {
                            let s = conv_shape(b, spec, x.shape);
                            if scores_wanted {
                                let g = l.grad.as_ref().expect("training layers have gradients");
                                let sg = conv::grad_score(
                                    self.gpu,
                                    &s,
                                    &l.weights,
                                    self.opts.estimator,
                                    &x.t,
                                    &dy,
                                    &l.scores,
                                    g,
                                )?;
                                self.program.push_score_grad(sg);
                            }
                            if let Some(dx) = &dx {
                                self.program.push(conv::grad_input(
                                    self.gpu,
                                    &s,
                                    &l.weights,
                                    &self.source(*layer),
                                    &dy,
                                    dx,
                                )?);
                            }
                        }
                        _ => {
                            let s = convt_shape(b, spec, x.shape);
                            if scores_wanted {
                                let g = l.grad.as_ref().expect("training layers have gradients");
                                let sg = conv::transpose_grad_score(
                                    self.gpu,
                                    &s,
                                    &l.weights,
                                    self.opts.estimator,
                                    &x.t,
                                    &dy,
                                    &l.scores,
                                    g,
                                )?;
                                self.program.push_score_grad(sg);
                            }
                            if let Some(dx) = &dx {
                                self.program.push(conv::transpose_grad_input(
                                    self.gpu,
                                    &s,
                                    &l.weights,
                                    &self.source(*layer),
                                    &dy,
                                    dx,
                                )?);
                            }
                        }
                    }
                    match dx {
                        Some(d) => dy = d,
                        None => return Ok(None),
                    }
                }
                Node::Norm { x, y, stats } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(x, "batchnorm gradient")?;
                    self.program.push(norm::backward(
                        self.gpu,
                        &norm_shape(b, x.shape),
                        &dy,
                        &y.t,
                        stats,
                        &dx,
                    )?);
                    dy = dx;
                }
                Node::Relu { y } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(y, "relu gradient")?;
                    self.program
                        .push(ew::relu_backward(self.gpu, &dy, &y.t, &dx)?);
                    dy = dx;
                }
                Node::Tanh { y } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(y, "tanh gradient")?;
                    self.program
                        .push(ew::tanh_backward(self.gpu, &dy, &y.t, &dx)?);
                    dy = dx;
                }
                Node::Up { x, .. } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(x, "upsample gradient")?;
                    self.program.push(ew::upsample2x_adjoint(
                        self.gpu,
                        b * x.shape.c,
                        x.shape.h,
                        x.shape.w,
                        &dy,
                        &dx,
                    )?);
                    dy = dx;
                }
                Node::Blur { y } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    // The smoothing is self-adjoint: its gradient is the same stencil.
                    let dx = self.grad_like(y, "smoothing gradient")?;
                    self.program.push(ew::blur3x3(
                        self.gpu,
                        b * y.shape.c,
                        y.shape.h,
                        y.shape.w,
                        &dy,
                        &dx,
                    )?);
                    dy = dx;
                }
                Node::Pool { pool, x, .. } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(x, "pooling gradient")?;
                    self.program.push(pool::backward(
                        self.gpu,
                        *pool,
                        &pool_shape(b, x.shape),
                        &x.t,
                        &dy,
                        &dx,
                    )?);
                    dy = dx;
                }
                Node::Affine { x, coef, .. } => {
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(x, "affine gradient")?;
                    self.program.push(norm::affine_backward(
                        self.gpu,
                        &norm_shape(b, x.shape),
                        coef,
                        &dy,
                        &dx,
                    )?);
                    dy = dx;
                }
                Node::Reshape { .. } => {}
                Node::Residual { main, skip, x } => {
                    let dm = self.back(main, dy.clone(), want_dx, false)?;
                    let ds = self.back(skip, dy.clone(), want_dx, false)?;
                    if !want_dx {
                        return Ok(None);
                    }
                    let dx = self.grad_like(x, "residual gradient")?;
                    match (dm, ds) {
                        (Some(a), Some(c)) => self.program.push(ew::add(self.gpu, &a, &c, &dx)?),
                        _ => {
                            return Err(Error::invalid(
                                "a residual branch produced no input gradient",
                            ))
                        }
                    }
                    dy = dx;
                }
            }
        }
        Ok(Some(dy))
    }
}

fn contains_masked(n: &Node) -> bool {
    match n {
        Node::Masked { .. } => true,
        Node::Residual { main, skip, .. } => {
            main.iter().any(contains_masked) || skip.iter().any(contains_masked)
        }
        _ => false,
    }
}

impl Network {
    /// Builds the network. `step` is the step-state buffer training kernels read (required
    /// for `WeightMode::Train`). `input` may be supplied (to chain networks) or is allocated.
    pub fn build(
        gpu: &Gpu,
        arch: &Architecture,
        opts: BuildOptions,
        step: Option<Rc<Tensor>>,
        input: Option<Rc<Tensor>>,
        input_shape: Option<Shape>,
    ) -> Result<Network> {
        Self::build_tapped(gpu, arch, opts, step, input, input_shape, &[])
    }

    /// [`Network::build`] with the outputs of the layers `taps` (indices into `arch.layers`,
    /// increasing) exposed as [`Network::taps`]: a feature encoder whose loss reads several
    /// layers. The network ends at the last tap; with an input backward, each tap gets a
    /// gradient buffer that the backward pass adds in where that layer's output is used.
    pub fn build_tapped(
        gpu: &Gpu,
        arch: &Architecture,
        opts: BuildOptions,
        step: Option<Rc<Tensor>>,
        input: Option<Rc<Tensor>>,
        input_shape: Option<Shape>,
        taps: &[usize],
    ) -> Result<Network> {
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
        let mut b = Builder {
            gpu,
            opts,
            init: arch.init,
            layers: Vec::new(),
            infos,
            step: step.clone(),
            forward: Program::default(),
            acts: Vec::new(),
            affine: Vec::new(),
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
        let Builder {
            layers,
            forward,
            acts,
            affine,
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
            let mut bb = BackBuilder {
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
            let BackBuilder {
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
            p.push(adam::step(
                gpu,
                cfg,
                &adam::AdamIo {
                    step,
                    grad,
                    scores: &l.scores,
                    moments,
                    keep: &l.keep,
                },
            )?);
        }
        Ok(p)
    }

    /// Total masked weights.
    pub fn masked_weights(&self) -> usize {
        self.layers.iter().map(|l| l.info.weights).sum()
    }
}
