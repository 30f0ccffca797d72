//! The masked layers: dense (Linear), convolution and transposed convolution. Their weights
//! are regenerated from the seed, their scores are what training learns.

use std::rc::Rc;

use super::Kind;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Tensor};
use crate::kernels::conv::{self, ConvShape, ConvTransposeShape};
use crate::kernels::matmul::{self, LinearShape};
use crate::kernels::{adam, Precision, Product, ScoreGradIo};
use crate::nn::arch::{weight_count, MaskedLayerInfo, Shape};
use crate::nn::cpu::Pass;
use crate::nn::network::Backward;
use crate::nn::record::{Act, BackwardRecorder, ForwardRecorder, InputGrad, Recorded};

/// A masked dense layer on flattened activations (no bias).
pub(super) struct Linear {
    pub outputs: usize,
}

/// A masked k x k convolution, or its transpose.
pub(super) struct Conv {
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub transposed: bool,
}

/// The kernel shape of a masked layer at a batch size.
#[derive(Clone, Copy)]
enum MaskedShape {
    Linear(LinearShape),
    Conv(ConvShape),
    ConvT(ConvTransposeShape),
}

/// What distinguishes the masked kinds; the rest of their [`Kind`] is shared.
trait MaskedKind {
    fn sizes(&self) -> Vec<usize>;
    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape>;
    fn collect_masked(&self, s: Shape, out: &mut Vec<MaskedLayerInfo>) -> Result<()>;
    /// The kernel shape at a batch size for input shape `s`.
    fn shape(&self, batch: usize, s: Shape) -> MaskedShape;
}

impl<T: MaskedKind> Kind for T {
    fn sizes(&self) -> Vec<usize> {
        MaskedKind::sizes(self)
    }

    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        MaskedKind::output_shape(self, s, bad)
    }

    fn collect_masked(&self, s: Shape, out: &mut Vec<MaskedLayerInfo>) -> Result<()> {
        MaskedKind::collect_masked(self, s, out)
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let shape = self.shape(f.opts.batch, x.shape);
        let layer = f.new_masked()?;
        let y = f.act(out, "activation")?;
        let lw = f.layers[layer].weights;
        let precision = if f.opts.half {
            Precision::F16
        } else {
            Precision::F32
        };
        let source = f.source(layer);
        let op = Product::new(&lw, &source, &x.t, &y.t).at(precision);
        let k = shape.forward_kernel(f.gpu, &op)?;
        f.forward.push(k);
        Ok(Box::new(MaskedOp {
            layer,
            shape,
            x: x.clone(),
            y,
        }))
    }

    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>> {
        let (_, w) = p.next_weights();
        Ok(self.shape(p.batch, s).cpu_forward(x, w))
    }

    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        let (index, w) = p.next_weights();
        let (dx, dw) = self.shape(p.batch, s).cpu_backward(x, w, dy);
        p.add_weight_gradient(index, &dw);
        Ok(dx)
    }
}

impl MaskedKind for Linear {
    fn output_shape(&self, _s: Shape, _bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        Ok(Shape::flat(self.outputs))
    }

    fn sizes(&self) -> Vec<usize> {
        vec![self.outputs]
    }

    fn shape(&self, batch: usize, s: Shape) -> MaskedShape {
        MaskedShape::Linear(LinearShape {
            batch,
            inputs: s.len(),
            outputs: self.outputs,
        })
    }

    fn collect_masked(&self, s: Shape, out: &mut Vec<MaskedLayerInfo>) -> Result<()> {
        out.push(MaskedLayerInfo {
            index: out.len() as u32,
            weights: weight_count(&[s.len(), self.outputs])?,
            fan_in: s.len() as u32,
            kind: "linear",
            dims: [self.outputs, s.len(), 1, 1],
        });
        Ok(())
    }
}

impl MaskedKind for Conv {
    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        let (k, stride, pad) = (self.k, self.stride, self.pad);
        if s.h * s.w == 0 {
            return Err(bad("empty input"));
        }
        if self.transposed {
            let h = ((s.h - 1) * stride + k).checked_sub(2 * pad);
            let w = ((s.w - 1) * stride + k).checked_sub(2 * pad);
            return match (h, w) {
                (Some(h), Some(w)) if h > 0 && w > 0 => Ok(Shape { c: self.cout, h, w }),
                _ => Err(bad("empty output")),
            };
        }
        if s.h + 2 * pad < k || s.w + 2 * pad < k || stride == 0 || k == 0 {
            return Err(bad("kernel larger than the padded input"));
        }
        Ok(Shape {
            c: self.cout,
            h: (s.h + 2 * pad - k) / stride + 1,
            w: (s.w + 2 * pad - k) / stride + 1,
        })
    }

    fn sizes(&self) -> Vec<usize> {
        vec![self.cout, self.k, self.stride, self.pad]
    }

    fn shape(&self, batch: usize, s: Shape) -> MaskedShape {
        let c = ConvShape {
            batch,
            cin: s.c,
            cout: self.cout,
            h: s.h,
            w: s.w,
            kh: self.k,
            kw: self.k,
            stride: self.stride,
            pad: self.pad,
        };
        if !self.transposed {
            return MaskedShape::Conv(c);
        }
        MaskedShape::ConvT(ConvTransposeShape {
            batch: c.batch,
            cin: c.cin,
            cout: c.cout,
            h: c.h,
            w: c.w,
            kh: c.kh,
            kw: c.kw,
            stride: c.stride,
            pad: c.pad,
        })
    }

    fn collect_masked(&self, s: Shape, out: &mut Vec<MaskedLayerInfo>) -> Result<()> {
        let (cout, k) = (self.cout, self.k);
        out.push(if self.transposed {
            // PRISM.md: the reference's fan_in of a transposed conv is cout * kh * kw.
            MaskedLayerInfo {
                index: out.len() as u32,
                weights: weight_count(&[s.c, cout, k, k])?,
                fan_in: weight_count(&[cout, k, k])? as u32,
                kind: "conv_transpose",
                dims: [s.c, cout, k, k],
            }
        } else {
            MaskedLayerInfo {
                index: out.len() as u32,
                weights: weight_count(&[s.c, cout, k, k])?,
                fan_in: weight_count(&[s.c, k, k])? as u32,
                kind: "conv",
                dims: [cout, s.c, k, k],
            }
        });
        Ok(())
    }
}

impl MaskedShape {
    fn forward_kernel(&self, gpu: &Gpu, op: &Product) -> Result<Kernel> {
        match self {
            MaskedShape::Linear(s) => matmul::forward(gpu, s, op),
            MaskedShape::Conv(s) => conv::forward(gpu, s, op),
            MaskedShape::ConvT(s) => conv::transpose_forward(gpu, s, op),
        }
    }

    fn cpu_forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        match self {
            MaskedShape::Linear(s) => matmul::cpu::forward(s, x, w),
            MaskedShape::Conv(s) => conv::cpu::forward(s, x, w),
            MaskedShape::ConvT(s) => conv::cpu::transpose_forward(s, x, w),
        }
    }

    /// (dL/dx, dL/dw_eff). A transposed convolution is the adjoint of the convolution
    /// `s.adjoint()`, so its gradients are that convolution's forward and weight gradient.
    fn cpu_backward(&self, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        match self {
            MaskedShape::Linear(s) => (
                matmul::cpu::grad_input(s, dy, w),
                matmul::cpu::grad_weight(s, x, dy),
            ),
            MaskedShape::Conv(s) => (
                conv::cpu::grad_input(s, dy, w),
                conv::cpu::grad_weight(s, x, dy),
            ),
            MaskedShape::ConvT(s) => {
                let a = s.adjoint();
                (
                    conv::cpu::forward(&a, dy, w),
                    conv::cpu::grad_weight(&a, dy, x),
                )
            }
        }
    }
}

/// A recorded masked layer.
struct MaskedOp {
    layer: usize,
    shape: MaskedShape,
    x: Act,
    y: Act,
}

impl Recorded for MaskedOp {
    fn output(&self) -> &Act {
        &self.y
    }

    fn has_masked(&self) -> bool {
        true
    }

    fn backward(&self, r: &mut BackwardRecorder, dy: Rc<Tensor>, want_dx: bool) -> InputGrad {
        let layers = r.layers;
        let l = &layers[self.layer];
        let x = &self.x;
        let dx = if want_dx {
            Some(r.grad_like(x, "input gradient")?)
        } else {
            None
        };
        let scores_wanted = r.opts.backward == Backward::Scores;
        let estimator = r.opts.estimator;
        let score_io = || ScoreGradIo {
            x: &x.t,
            dy: &dy,
            scores: &l.scores,
            grad: l.grad.as_ref().expect("training layers have gradients"),
        };
        // With Adam fused into a linear layer's score gradient, that kernel updates the scores
        // and keep thresholds that grad_input reads, so it comes after it.
        let mut fused = None;
        if scores_wanted {
            match &self.shape {
                MaskedShape::Linear(s) => match (r.opts.adam, &l.moments, r.step) {
                    (Some(cfg), Some(moments), Some(step)) if s.aligned() => {
                        let state = matmul::AdamState {
                            x: &x.t,
                            dy: &dy,
                            state: adam::TrainingState {
                                scores: &l.scores,
                                moments,
                                keep: &l.keep,
                                step,
                            },
                        };
                        let w = &l.weights;
                        fused = Some(matmul::grad_score_adam(
                            r.gpu, s, w, estimator, &cfg, &state,
                        )?);
                    }
                    _ => {
                        let k = matmul::grad_score(r.gpu, s, &l.weights, estimator, &score_io())?;
                        r.program.push(k);
                    }
                },
                MaskedShape::Conv(s) => {
                    let sg = conv::grad_score(r.gpu, s, &l.weights, estimator, &score_io())?;
                    r.program.push_score_grad(sg);
                }
                MaskedShape::ConvT(s) => {
                    let io = score_io();
                    let sg = conv::transpose_grad_score(r.gpu, s, &l.weights, estimator, &io)?;
                    r.program.push_score_grad(sg);
                }
            }
        }
        if let Some(dx) = &dx {
            let source = r.source(self.layer);
            let op = Product::new(&l.weights, &source, &dy, dx);
            let k = match &self.shape {
                MaskedShape::Linear(s) => matmul::grad_input(r.gpu, s, &op)?,
                MaskedShape::Conv(s) => conv::grad_input(r.gpu, s, &op)?,
                MaskedShape::ConvT(s) => conv::transpose_grad_input(r.gpu, s, &op)?,
            };
            r.program.push(k);
        }
        if let Some(k) = fused {
            r.program.push(k);
            r.adam_fused.push(self.layer);
        }
        Ok(dx)
    }
}
