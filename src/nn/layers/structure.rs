//! Layers that shape the graph rather than compute: a reshape of flat activations into
//! images, and a residual block `main(x) + skip(x)`.

use std::rc::Rc;

use super::Kind;
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::kernels::elementwise as ew;
use crate::nn::arch::{self, Layer, MaskedLayerInfo, Shape};
use crate::nn::cpu::{self, Pass};
use crate::nn::record::{Act, BackwardRecorder, ForwardRecorder, InputGrad, Recorded};

/// A view of the activations with another per-sample shape (no kernel).
pub(super) struct Reshape(pub Shape);

/// `main(x) + skip(x)`.
pub(super) struct Residual<'a> {
    pub main: &'a [Layer],
    pub skip: &'a [Layer],
}

impl Kind for Reshape {
    fn sizes(&self) -> Vec<usize> {
        vec![self.0.c, self.0.h, self.0.w]
    }

    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        if self.0.len() != s.len() {
            return Err(bad("element count differs"));
        }
        Ok(self.0)
    }

    fn record(&self, _f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        Ok(Box::new(ReshapeOp(Act {
            t: x.t.clone(),
            shape: out,
        })))
    }

    fn cpu_forward(&self, _p: &mut Pass, x: &[f32], _s: Shape) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn cpu_backward(&self, _p: &mut Pass, _x: &[f32], _s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        Ok(dy.to_vec())
    }
}

struct ReshapeOp(Act);

impl Recorded for ReshapeOp {
    fn output(&self) -> &Act {
        &self.0
    }

    fn backward(&self, _r: &mut BackwardRecorder, dy: Rc<Tensor>, _: bool) -> InputGrad {
        Ok(Some(dy))
    }
}

impl Kind for Residual<'_> {
    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        let a = arch::shape_through(self.main, s)?;
        let b = arch::shape_through(self.skip, s)?;
        if a != b {
            return Err(bad(&format!("main gives {a:?} but skip gives {b:?}")));
        }
        Ok(a)
    }

    fn collect_masked(&self, s: Shape, out: &mut Vec<MaskedLayerInfo>) -> Result<()> {
        arch::collect_masked(self.main, s, out)?;
        arch::collect_masked(self.skip, s, out)?;
        Ok(())
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let (ym, main, _) = f.build(self.main, x.clone())?;
        let (ys, skip, _) = f.build(self.skip, x.clone())?;
        let y = f.act(out, "residual sum")?;
        f.forward.push(ew::add(f.gpu, &ym.t, &ys.t, &y.t)?);
        Ok(Box::new(ResidualOp {
            main,
            skip,
            x: x.clone(),
            y,
        }))
    }

    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>> {
        let (a, _) = cpu::run(p, self.main, x.to_vec(), s, None)?;
        let (b, _) = cpu::run(p, self.skip, x.to_vec(), s, None)?;
        Ok(a.iter().zip(&b).map(|(p, q)| p + q).collect())
    }

    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        let a = cpu::run_backward(p, self.main, x, s, dy)?;
        let b = cpu::run_backward(p, self.skip, x, s, dy)?;
        Ok(a.iter().zip(&b).map(|(p, q)| p + q).collect())
    }
}

struct ResidualOp {
    main: Vec<Box<dyn Recorded>>,
    skip: Vec<Box<dyn Recorded>>,
    x: Act,
    y: Act,
}

impl Recorded for ResidualOp {
    fn output(&self) -> &Act {
        &self.y
    }

    fn has_masked(&self) -> bool {
        self.main.iter().chain(&self.skip).any(|op| op.has_masked())
    }

    fn backward(&self, r: &mut BackwardRecorder, dy: Rc<Tensor>, want_dx: bool) -> InputGrad {
        let dm = r.back(&self.main, dy.clone(), want_dx, false)?;
        let ds = r.back(&self.skip, dy, want_dx, false)?;
        if !want_dx {
            return Ok(None);
        }
        let dx = r.grad_like(&self.x, "residual gradient")?;
        match (dm, ds) {
            (Some(a), Some(c)) => r.program.push(ew::add(r.gpu, &a, &c, &dx)?),
            _ => {
                return Err(Error::invalid(
                    "a residual branch produced no input gradient",
                ))
            }
        }
        Ok(Some(dx))
    }
}
