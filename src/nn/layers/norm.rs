//! Per-channel normalisation layers: BatchNorm with the batch's statistics, and the fixed
//! affine map of a pretrained encoder (its bias and inference-form BatchNorm, folded).

use std::rc::Rc;

use super::Kind;
use crate::error::{Error, Result};
use crate::kernels::norm::{self, NormShape};
use crate::nn::arch::Shape;
use crate::nn::cpu::Pass;
use crate::nn::record::{Act, ForwardRecorder, OneKernelOp, Recorded};

pub(super) struct BatchNorm;
pub(super) struct Affine;

fn norm_shape(batch: usize, s: Shape) -> NormShape {
    NormShape {
        batch,
        channels: s.c,
        size: s.h * s.w,
    }
}

impl Kind for BatchNorm {
    fn output_shape(&self, s: Shape, _bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        Ok(s)
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let y = f.act(out, "normalised")?;
        let stats = f.tensor(&[2 * x.shape.c], "batch statistics")?;
        let shape = norm_shape(f.opts.batch, x.shape);
        f.forward
            .push(norm::forward(f.gpu, &shape, &x.t, &y.t, &stats)?);
        let yt = y.t.clone();
        Ok(Box::new(OneKernelOp {
            x: x.clone(),
            y,
            what: "batchnorm gradient",
            kernel: Box::new(move |gpu, dy, dx| norm::backward(gpu, &shape, dy, &yt, &stats, dx)),
        }))
    }

    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>> {
        Ok(norm::cpu::forward(&norm_shape(p.batch, s), x).0)
    }

    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        let shape = norm_shape(p.batch, s);
        let (y, stats) = norm::cpu::forward(&shape, x);
        Ok(norm::cpu::backward(&shape, dy, &y, &stats))
    }
}

impl Kind for Affine {
    fn output_shape(&self, s: Shape, _bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        Ok(s)
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let y = f.act(out, "affine")?;
        let identity: Vec<f32> = (0..2 * x.shape.c)
            .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let coef = Rc::new(
            f.gpu
                .upload_f32(&identity, &[2 * x.shape.c], "affine coefficients")?,
        );
        f.affine.push(coef.clone());
        let shape = norm_shape(f.opts.batch, x.shape);
        f.forward
            .push(norm::affine(f.gpu, &shape, &coef, &x.t, &y.t)?);
        Ok(Box::new(OneKernelOp {
            x: x.clone(),
            y,
            what: "affine gradient",
            kernel: Box::new(move |gpu, dy, dx| norm::affine_backward(gpu, &shape, &coef, dy, dx)),
        }))
    }

    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>> {
        let coef = p.next_affine();
        Ok(norm::cpu::affine(&norm_shape(p.batch, s), coef, x))
    }

    fn cpu_backward(&self, p: &mut Pass, _x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        let coef = p.next_affine();
        Ok(norm::cpu::affine_backward(
            &norm_shape(p.batch, s),
            coef,
            dy,
        ))
    }
}
