//! Layers without parameters that map each plane on its own: ReLU, tanh, nearest 2x
//! upsampling and the fixed 3x3 smoothing.

use super::Kind;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Tensor};
use crate::kernels::elementwise as ew;
use crate::nn::arch::Shape;
use crate::nn::cpu::Pass;
use crate::nn::record::{Act, ForwardRecorder, OneKernelOp, Recorded};

/// A pointwise layer: one kind for the four, told apart by [`Which`].
pub(super) struct Pointwise(pub Which);

/// Which pointwise layer.
#[derive(Clone, Copy)]
pub(super) enum Which {
    Relu,
    Tanh,
    Upsample2x,
    Blur,
}

impl Which {
    /// The forward kernel on x [batch, s].
    fn forward(self, gpu: &Gpu, batch: usize, s: Shape, x: &Tensor, y: &Tensor) -> Result<Kernel> {
        let planes = ew::Planes {
            count: batch * s.c,
            h: s.h,
            w: s.w,
        };
        match self {
            Which::Relu => ew::relu(gpu, x, y),
            Which::Tanh => ew::tanh(gpu, x, y),
            Which::Upsample2x => ew::upsample2x(gpu, &planes, x, y),
            Which::Blur => ew::blur3x3(gpu, &planes, x, y),
        }
    }

    /// The backward kernel: dx from dy on input shape `s`, given the op's output `y`.
    fn backward(
        self,
        gpu: &Gpu,
        batch: usize,
        s: Shape,
        y: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
    ) -> Result<Kernel> {
        let planes = ew::Planes {
            count: batch * s.c,
            h: s.h,
            w: s.w,
        };
        match self {
            Which::Relu => ew::relu_backward(gpu, dy, y, dx),
            Which::Tanh => ew::tanh_backward(gpu, dy, y, dx),
            Which::Upsample2x => ew::upsample2x_adjoint(gpu, &planes, dy, dx),
            // The smoothing is self-adjoint: its gradient is the same stencil.
            Which::Blur => ew::blur3x3(gpu, &planes, dy, dx),
        }
    }

    fn cpu_forward(self, batch: usize, s: Shape, x: &[f32]) -> Vec<f32> {
        match self {
            Which::Relu => x.iter().map(|v| v.max(0.0)).collect(),
            Which::Tanh => x.iter().map(|v| v.tanh()).collect(),
            Which::Upsample2x => ew::cpu::upsample2x(batch * s.c, s.h, s.w, x),
            Which::Blur => ew::cpu::blur3x3(batch * s.c, s.h, s.w, x),
        }
    }

    fn cpu_backward(self, batch: usize, s: Shape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        match self {
            Which::Relu => x
                .iter()
                .zip(dy)
                .map(|(v, g)| if *v > 0.0 { *g } else { 0.0 })
                .collect(),
            Which::Tanh => x
                .iter()
                .zip(dy)
                .map(|(v, g)| g * (1.0 - v.tanh() * v.tanh()))
                .collect(),
            Which::Upsample2x => ew::cpu::upsample2x_adjoint(batch * s.c, s.h, s.w, dy),
            Which::Blur => ew::cpu::blur3x3(batch * s.c, s.h, s.w, dy),
        }
    }

    fn name(self) -> (&'static str, &'static str) {
        match self {
            Which::Relu => ("relu", "relu gradient"),
            Which::Tanh => ("tanh", "tanh gradient"),
            Which::Upsample2x => ("upsampled", "upsample gradient"),
            Which::Blur => ("smoothed", "smoothing gradient"),
        }
    }
}

impl Kind for Pointwise {
    fn output_shape(&self, s: Shape, _bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        Ok(match self.0 {
            Which::Upsample2x => Shape {
                c: s.c,
                h: 2 * s.h,
                w: 2 * s.w,
            },
            Which::Relu | Which::Tanh | Which::Blur => s,
        })
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let which = self.0;
        let y = f.act(out, which.name().0)?;
        let (batch, s) = (f.opts.batch, x.shape);
        f.forward.push(which.forward(f.gpu, batch, s, &x.t, &y.t)?);
        let yt = y.t.clone();
        Ok(Box::new(OneKernelOp {
            x: x.clone(),
            y,
            what: which.name().1,
            kernel: Box::new(move |gpu, dy, dx| which.backward(gpu, batch, s, &yt, dy, dx)),
        }))
    }

    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>> {
        Ok(self.0.cpu_forward(p.batch, s, x))
    }

    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        Ok(self.0.cpu_backward(p.batch, s, x, dy))
    }
}
