//! CPU reference of a whole network's forward pass, composed from the kernels' CPU twins.

use super::arch::{Architecture, Layer, Shape};
use crate::error::Result;
use crate::kernels::conv::{self, ConvShape, ConvTransposeShape};
use crate::kernels::elementwise as ew;
use crate::kernels::matmul::{self, LinearShape};
use crate::kernels::norm::{self, NormShape};
use crate::kernels::pool::{self, Pool, PoolShape};

/// What a CPU forward pass reads besides its input: each masked layer's effective weights
/// (in [`Architecture::masked_layers`] order) and each Affine layer's (a_c, b_c) pairs.
pub struct Params<'a> {
    pub weights: &'a [Vec<f32>],
    pub affine: &'a [Vec<f32>],
}

/// Position in a [`Params`] while a layer list runs.
#[derive(Default)]
struct Cursor {
    weight: usize,
    affine: usize,
}

/// Runs `layers`; `outs` receives each layer's output (top level only) when given.
fn run(
    layers: &[Layer],
    batch: usize,
    mut x: Vec<f32>,
    mut s: Shape,
    params: &Params,
    at: &mut Cursor,
    mut outs: Option<&mut Vec<(Vec<f32>, Shape)>>,
) -> Result<(Vec<f32>, Shape)> {
    let weff = params.weights;
    for l in layers {
        let out = l.output_shape(s)?;
        let next = &mut at.weight;
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
            Layer::MaxPool2 | Layer::AvgPool2 => {
                let pool = if matches!(l, Layer::MaxPool2) {
                    Pool::Max
                } else {
                    Pool::Avg
                };
                let ps = PoolShape {
                    planes: batch * s.c,
                    h: s.h,
                    w: s.w,
                };
                pool::cpu::forward(pool, &ps, &x)
            }
            Layer::Affine => {
                let coef = &params.affine[at.affine];
                at.affine += 1;
                let ns = NormShape {
                    batch,
                    channels: s.c,
                    size: s.h * s.w,
                };
                norm::cpu::affine(&ns, coef, &x)
            }
            Layer::Reshape { .. } => x,
            Layer::Residual { main, skip } => {
                let (a, _) = run(main, batch, x.clone(), s, params, at, None)?;
                let (b, _) = run(skip, batch, x, s, params, at, None)?;
                a.iter().zip(&b).map(|(p, q)| p + q).collect()
            }
        };
        s = out;
        if let Some(o) = outs.as_deref_mut() {
            o.push((x.clone(), s));
        }
    }
    Ok((x, s))
}

/// Every top-level layer's output (and shape) for `input` [batch, shape]: the reference of an
/// encoder whose loss reads several layers.
pub fn layer_outputs(
    layers: &[Layer],
    batch: usize,
    input: &[f32],
    shape: Shape,
    params: &Params,
) -> Result<Vec<(Vec<f32>, Shape)>> {
    let mut outs = Vec::with_capacity(layers.len());
    run(
        layers,
        batch,
        input.to_vec(),
        shape,
        params,
        &mut Cursor::default(),
        Some(&mut outs),
    )?;
    Ok(outs)
}

/// The network's output for `input` [batch, latent] given every masked layer's effective
/// weights (in [`Architecture::masked_layers`] order).
pub fn forward(
    arch: &Architecture,
    batch: usize,
    input: &[f32],
    weff: &[Vec<f32>],
) -> Result<Vec<f32>> {
    let params = Params {
        weights: weff,
        affine: &[],
    };
    Ok(run(
        &arch.layers,
        batch,
        input.to_vec(),
        Shape::flat(arch.latent),
        &params,
        &mut Cursor::default(),
        None,
    )?
    .0)
}
