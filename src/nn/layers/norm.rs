//! Per-channel normalisation layers: BatchNorm with the batch's statistics or, for inference,
//! in the affine form of population statistics; and the fixed affine map of a pretrained
//! encoder (its bias and inference-form BatchNorm, folded).

use std::rc::Rc;

use super::Kind;
use crate::error::{Error, Result};
use crate::kernels::norm::{self, NormShape};
use crate::nn::arch::Shape;
use crate::nn::cpu::Pass;
use crate::nn::network::Normalisation;
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
        if f.opts.norm == Normalisation::Population {
            let coef = identity_coefficients(f, x.shape.c, "population coefficients")?;
            f.population.push(coef.clone());
            return affine_op(f, x, out, coef);
        }
        let y = f.act(out, "normalised")?;
        let stats = f.tensor(&[2 * x.shape.c], "batch statistics")?;
        f.batch_stats.push(stats.clone());
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
        if let Some(coef) = p.next_population() {
            return Ok(norm::cpu::affine(&norm_shape(p.batch, s), coef, x));
        }
        Ok(norm::cpu::forward(&norm_shape(p.batch, s), x).0)
    }

    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        let shape = norm_shape(p.batch, s);
        if let Some(coef) = p.next_population() {
            return Ok(norm::cpu::affine_backward(&shape, coef, dy));
        }
        let (y, stats) = norm::cpu::forward(&shape, x);
        Ok(norm::cpu::backward(&shape, dy, &y, &stats))
    }
}

impl Kind for Affine {
    fn output_shape(&self, s: Shape, _bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        Ok(s)
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let coef = identity_coefficients(f, x.shape.c, "affine coefficients")?;
        f.affine.push(coef.clone());
        affine_op(f, x, out, coef)
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

/// (a_c, b_c) = (1, 0) for `channels` channels, until a loader writes the real ones.
fn identity_coefficients(
    f: &mut ForwardRecorder,
    channels: usize,
    what: &str,
) -> Result<Rc<crate::gpu::Tensor>> {
    let identity: Vec<f32> = (0..2 * channels)
        .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
        .collect();
    Ok(Rc::new(f.gpu.upload_f32(
        &identity,
        &[2 * channels],
        what,
    )?))
}

/// y = a_c x + b_c with the coefficients in `coef`, and its input gradient.
fn affine_op(
    f: &mut ForwardRecorder,
    x: &Act,
    out: Shape,
    coef: Rc<crate::gpu::Tensor>,
) -> Result<Box<dyn Recorded>> {
    let y = f.act(out, "affine")?;
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
