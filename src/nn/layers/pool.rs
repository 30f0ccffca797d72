//! 2x2 pooling with stride 2 (encoders only).

use super::Kind;
use crate::error::{Error, Result};
use crate::kernels::pool::{self, Pool, PoolShape};
use crate::nn::arch::Shape;
use crate::nn::cpu::Pass;
use crate::nn::record::{Act, ForwardRecorder, OneKernelOp, Recorded};

/// 2x2 max or average pooling.
pub(super) struct Pool2(pub Pool);

fn pool_shape(batch: usize, s: Shape) -> PoolShape {
    PoolShape {
        planes: batch * s.c,
        h: s.h,
        w: s.w,
    }
}

impl Kind for Pool2 {
    fn output_shape(&self, s: Shape, bad: &dyn Fn(&str) -> Error) -> Result<Shape> {
        if s.h < 2 || s.w < 2 {
            return Err(bad("2x2 pooling needs at least 2 x 2 positions"));
        }
        Ok(Shape {
            c: s.c,
            h: s.h / 2,
            w: s.w / 2,
        })
    }

    fn record(&self, f: &mut ForwardRecorder, x: &Act, out: Shape) -> Result<Box<dyn Recorded>> {
        let y = f.act(out, "pooled")?;
        let (pool, shape) = (self.0, pool_shape(f.opts.batch, x.shape));
        f.forward
            .push(pool::forward(f.gpu, pool, &shape, &x.t, &y.t)?);
        let xt = x.t.clone();
        Ok(Box::new(OneKernelOp {
            x: x.clone(),
            y,
            what: "pooling gradient",
            kernel: Box::new(move |gpu, dy, dx| pool::backward(gpu, pool, &shape, &xt, dy, dx)),
        }))
    }

    fn cpu_forward(&self, p: &mut Pass, x: &[f32], s: Shape) -> Result<Vec<f32>> {
        Ok(pool::cpu::forward(self.0, &pool_shape(p.batch, s), x))
    }

    fn cpu_backward(&self, p: &mut Pass, x: &[f32], s: Shape, dy: &[f32]) -> Result<Vec<f32>> {
        Ok(pool::cpu::backward(self.0, &pool_shape(p.batch, s), x, dy))
    }
}
