//! CPU reference of a whole network's forward pass, composed from the kernels' CPU twins.

use super::arch::{Architecture, Layer, Shape};
use crate::error::Result;
use crate::kernels::conv::{self, ConvShape, ConvTransposeShape};
use crate::kernels::elementwise as ew;
use crate::kernels::matmul::{self, LinearShape};
use crate::kernels::norm::{self, NormShape};

fn run(
    layers: &[Layer],
    batch: usize,
    mut x: Vec<f32>,
    mut s: Shape,
    weff: &[Vec<f32>],
    next: &mut usize,
) -> Result<(Vec<f32>, Shape)> {
    for l in layers {
        let out = l.output_shape(s)?;
        x = match l {
            Layer::Linear { outputs } => {
                let w = &weff[*next];
                *next += 1;
                matmul::cpu::forward(
                    &LinearShape {
                        batch,
                        inputs: s.len(),
                        outputs: *outputs,
                    },
                    &x,
                    w,
                )
            }
            Layer::Conv {
                cout,
                k,
                stride,
                pad,
            } => {
                let w = &weff[*next];
                *next += 1;
                let cs = ConvShape {
                    batch,
                    cin: s.c,
                    cout: *cout,
                    h: s.h,
                    w: s.w,
                    kh: *k,
                    kw: *k,
                    stride: *stride,
                    pad: *pad,
                };
                conv::cpu::forward(&cs, &x, w)
            }
            Layer::ConvT {
                cout,
                k,
                stride,
                pad,
            } => {
                let w = &weff[*next];
                *next += 1;
                let ts = ConvTransposeShape {
                    batch,
                    cin: s.c,
                    cout: *cout,
                    h: s.h,
                    w: s.w,
                    kh: *k,
                    kw: *k,
                    stride: *stride,
                    pad: *pad,
                };
                conv::cpu::transpose_forward(&ts, &x, w)
            }
            Layer::BatchNorm => {
                norm::cpu::forward(
                    &NormShape {
                        batch,
                        channels: s.c,
                        size: s.h * s.w,
                    },
                    &x,
                )
                .0
            }
            Layer::Relu => x.iter().map(|v| v.max(0.0)).collect(),
            Layer::Tanh => x.iter().map(|v| v.tanh()).collect(),
            Layer::Upsample2x => ew::cpu::upsample2x(batch * s.c, s.h, s.w, &x),
            Layer::Blur => ew::cpu::blur3x3(batch * s.c, s.h, s.w, &x),
            Layer::Reshape { .. } => x,
            Layer::Residual { main, skip } => {
                let (a, _) = run(main, batch, x.clone(), s, weff, next)?;
                let (b, _) = run(skip, batch, x, s, weff, next)?;
                a.iter().zip(&b).map(|(p, q)| p + q).collect()
            }
        };
        s = out;
    }
    Ok((x, s))
}

/// The network's output for `input` [batch, latent] given every masked layer's effective
/// weights (in [`Architecture::masked_layers`] order).
pub fn forward(
    arch: &Architecture,
    batch: usize,
    input: &[f32],
    weff: &[Vec<f32>],
) -> Result<Vec<f32>> {
    let mut next = 0;
    Ok(run(
        &arch.layers,
        batch,
        input.to_vec(),
        Shape::flat(arch.latent),
        weff,
        &mut next,
    )?
    .0)
}
