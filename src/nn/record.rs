//! Recording a layer list as GPU kernels: the forward recorder walks the layers and keeps a
//! tape of recorded ops; the backward recorder walks the tape in reverse. What each layer kind
//! records lives with that kind in [`super::layers`]; this file holds only the walk.

use std::rc::Rc;

use super::arch::{Layer, MaskedLayerInfo, Shape};
use super::layers;
use super::network::{BuildOptions, MaskedLayer, WeightMode};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::{conv, Init, LayerWeights, MaskSource};

/// Kernels to run in order, with the scratch tensors they need kept alive.
#[derive(Default)]
pub struct Program {
    pub kernels: Vec<Kernel>,
    scratch: Vec<Tensor>,
}

impl Program {
    pub(crate) fn push(&mut self, k: Kernel) {
        self.kernels.push(k);
    }

    pub(crate) fn push_score_grad(&mut self, g: conv::ScoreGrad) {
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

/// An activation: its buffer [batch, c, h, w] and per-sample shape.
#[derive(Clone)]
pub(crate) struct Act {
    pub t: Rc<Tensor>,
    pub shape: Shape,
}

/// What a recorded op's backward pass gives: dL/d input, or None when nothing upstream needs it.
pub(crate) type InputGrad = Result<Option<Rc<Tensor>>>;

/// One recorded forward op: what its backward pass needs.
pub(crate) trait Recorded {
    /// The op's output.
    fn output(&self) -> &Act;
    /// Records the backward kernels from dL/d output `dy`. Returns dL/d input, or None when
    /// `want_dx` is false and so nothing upstream needs it (which ends the pass).
    fn backward(&self, r: &mut BackwardRecorder, dy: Rc<Tensor>, want_dx: bool) -> InputGrad;
    /// Whether the op holds a masked layer (whose scores want gradients).
    fn has_masked(&self) -> bool {
        false
    }
}

/// The backward kernel of a [`OneKernelOp`]: (gpu, dL/dy, dL/dx) to the kernel writing dL/dx.
pub(crate) type BackwardKernel = Box<dyn Fn(&Gpu, &Tensor, &Tensor) -> Result<Kernel>>;

/// A recorded op without parameters to train, whose backward pass is one kernel from dL/dy to
/// dL/dx, run only when something upstream needs dL/dx.
pub(crate) struct OneKernelOp {
    pub x: Act,
    pub y: Act,
    /// The gradient buffer's label.
    pub what: &'static str,
    pub kernel: BackwardKernel,
}

impl Recorded for OneKernelOp {
    fn output(&self) -> &Act {
        &self.y
    }

    fn backward(&self, r: &mut BackwardRecorder, dy: Rc<Tensor>, want_dx: bool) -> InputGrad {
        if !want_dx {
            return Ok(None);
        }
        let dx = r.grad_like(&self.x, self.what)?;
        r.program.push((self.kernel)(r.gpu, &dy, &dx)?);
        Ok(Some(dx))
    }
}

/// A masked layer's weights as the network's weight mode reads them: the one mapping from
/// [`WeightMode`] to [`MaskSource`], used by forward and backward kernels alike. A training
/// network's matmuls read the step's mask packed (`step_bits`, sampled once per step by
/// [`step_mask_kernel`]): the same bits as the "train" source draws in-kernel, at one load
/// per 32 weights instead of two hashes and two threshold loads per four in every tile.
pub(crate) fn mask_source(mode: WeightMode, layer: &MaskedLayer) -> MaskSource<'_> {
    match mode {
        WeightMode::Train => MaskSource::Packed(
            layer
                .step_bits
                .as_ref()
                .expect("training networks have a step mask"),
        ),
        WeightMode::Packed => MaskSource::Packed(&layer.bits),
        WeightMode::Dense => MaskSource::Dense(
            layer
                .dense
                .as_ref()
                .expect("dense networks have dense weights"),
        ),
        WeightMode::Frozen => MaskSource::Frozen,
    }
}

/// The kernel that samples a training layer's mask of the current step into its `step_bits`
/// (None for other weight modes); recorded before the layer's first matmul of the step.
pub(crate) fn step_mask_kernel(
    gpu: &Gpu,
    mode: WeightMode,
    layer: &MaskedLayer,
    step: Option<&Tensor>,
) -> Result<Option<Kernel>> {
    let (WeightMode::Train, Some(bits)) = (mode, layer.step_bits.as_ref()) else {
        return Ok(None);
    };
    let step = step.expect("training networks have a step buffer");
    Ok(Some(crate::kernels::mask::sample_step(
        gpu,
        layer.info.weights,
        &layer.keep,
        layer.weights.gen().mask_key,
        step,
        bits,
    )?))
}

/// Records forward kernels and allocates what they write.
pub(crate) struct ForwardRecorder<'g> {
    pub gpu: &'g Gpu,
    pub opts: BuildOptions,
    pub init: Init,
    pub layers: Vec<MaskedLayer>,
    pub infos: Vec<MaskedLayerInfo>,
    pub step: Option<Rc<Tensor>>,
    pub forward: Program,
    pub acts: Vec<Rc<Tensor>>,
    pub affine: Vec<Rc<Tensor>>,
    pub batch_stats: Vec<Rc<Tensor>>,
    pub population: Vec<Rc<Tensor>>,
}

/// What [`ForwardRecorder::build`] returns: the output, the tape, each layer's output.
pub(crate) type Recording = (Act, Vec<Box<dyn Recorded>>, Vec<Act>);

impl ForwardRecorder<'_> {
    /// A new activation buffer of per-sample shape `shape`.
    pub fn act(&mut self, shape: Shape, what: &str) -> Result<Act> {
        let t = self.tensor(&[self.opts.batch, shape.c, shape.h, shape.w], what)?;
        Ok(Act { t, shape })
    }

    /// A new f32 buffer kept alive with the network.
    pub fn tensor(&mut self, dims: &[usize], what: &str) -> Result<Rc<Tensor>> {
        let t = Rc::new(self.gpu.tensor(dims, DType::F32, what)?);
        self.acts.push(t.clone());
        Ok(t)
    }

    pub fn source(&self, layer: usize) -> MaskSource<'_> {
        mask_source(self.opts.mode, &self.layers[layer])
    }

    /// Allocates the buffers of the next masked layer and records the sampling of its step
    /// mask (training networks); returns its index.
    pub fn new_masked(&mut self) -> Result<usize> {
        let idx = self.layers.len();
        let info = self.infos[idx];
        let weights = LayerWeights {
            seed: self.opts.seed,
            layer: self.opts.layer_offset + info.index,
            init: self.init,
            fan_in: info.fan_in,
        };
        let layer = MaskedLayer::allocate(self.gpu, &self.opts, info, weights)?;
        if let Some(k) = step_mask_kernel(self.gpu, self.opts.mode, &layer, self.step.as_deref())? {
            self.forward.push(k);
        }
        self.layers.push(layer);
        Ok(idx)
    }

    /// Records the forward kernels of `layers` on input `x`.
    pub fn build(&mut self, layers: &[Layer], mut x: Act) -> Result<Recording> {
        let mut tape = Vec::new();
        let mut outs = Vec::with_capacity(layers.len());
        for spec in layers {
            let out_shape = spec.output_shape(x.shape)?;
            let op = layers::kind(spec).record(self, &x, out_shape)?;
            x = op.output().clone();
            tape.push(op);
            outs.push(x.clone());
        }
        Ok((x, tape, outs))
    }
}

/// Records backward kernels for a tape.
pub(crate) struct BackwardRecorder<'g, 'n> {
    pub gpu: &'g Gpu,
    pub opts: BuildOptions,
    pub layers: &'n [MaskedLayer],
    pub step: Option<&'n Tensor>,
    pub program: Program,
    pub grads: Vec<Rc<Tensor>>,
    /// Gradients of tapped top-level layer outputs (by layer index) to add into the pass;
    /// the last tap's is the pass's starting gradient and is not listed.
    pub tap_grads: Vec<(usize, Rc<Tensor>)>,
    /// Layers whose Adam step the pass takes (BuildOptions::adam).
    pub adam_fused: Vec<usize>,
}

impl BackwardRecorder<'_, '_> {
    /// A new gradient buffer of `dims`, kept alive with the network.
    fn grad_buffer(&mut self, dims: &[usize], what: &str) -> Result<Rc<Tensor>> {
        let g = Rc::new(self.gpu.tensor(dims, DType::F32, what)?);
        self.grads.push(g.clone());
        Ok(g)
    }

    /// A new gradient buffer for activation `a`.
    pub fn grad_like(&mut self, a: &Act, what: &str) -> Result<Rc<Tensor>> {
        let s = a.shape;
        self.grad_buffer(&[self.opts.batch, s.c, s.h, s.w], what)
    }

    pub fn source(&self, layer: usize) -> MaskSource<'_> {
        mask_source(self.opts.mode, &self.layers[layer])
    }

    /// Records the backward kernels of `tape` from `dy`, the gradient of its output; returns
    /// the gradient of its input (None when nothing upstream needs it). `need_input`: whether
    /// the caller needs dL/d(input of this tape). `top`: the tape is the network's own layer
    /// list (where taps are).
    pub fn back(
        &mut self,
        tape: &[Box<dyn Recorded>],
        dy: Rc<Tensor>,
        need_input: bool,
        top: bool,
    ) -> Result<Option<Rc<Tensor>>> {
        let mut dy = dy;
        // The first op whose input gradient anything needs: ops before the first masked
        // layer (or the tape start when the input gradient is wanted) need no dx.
        let first_needed = if need_input {
            0
        } else {
            match tape.iter().position(|op| op.has_masked()) {
                Some(i) => i,
                None => return Ok(None),
            }
        };
        for (i, op) in tape.iter().enumerate().rev() {
            let want_dx = i > first_needed || need_input;
            if top {
                let tapped = self
                    .tap_grads
                    .iter()
                    .find(|(l, _)| *l == i)
                    .map(|t| t.1.clone());
                if let Some(g) = tapped {
                    // This layer's output feeds the loss directly as well as the layers after it.
                    let sum = self.grad_buffer(dy.shape(), "tap gradient sum")?;
                    self.program
                        .push(crate::kernels::elementwise::add(self.gpu, &dy, &g, &sum)?);
                    dy = sum;
                }
            }
            match op.backward(self, dy, want_dx)? {
                Some(d) => dy = d,
                None => return Ok(None),
            }
        }
        Ok(Some(dy))
    }
}
