//! CPU reference of a whole network, forward and backward, composed from the layer kinds'
//! CPU twins (which are composed from the kernels' CPU twins).

use super::arch::{Architecture, Layer, Shape};
use super::layers::kind as layer_kind;
use crate::error::Result;

/// What a CPU pass reads besides its input: each masked layer's effective weights (in
/// [`Architecture::masked_layers`] order), each Affine layer's (a_c, b_c) pairs, and, for
/// BatchNorm in inference form, each BatchNorm layer's (a_c, b_c) pairs from population
/// statistics (None: BatchNorm uses the batch's statistics).
pub struct Params<'a> {
    pub weights: &'a [Vec<f32>],
    pub affine: &'a [Vec<f32>],
    pub population: Option<&'a [Vec<f32>]>,
}

/// Position in a [`Params`] while a layer list runs.
#[derive(Clone, Copy, Default)]
struct Cursor {
    weight: usize,
    affine: usize,
    population: usize,
}

/// One CPU pass through a network: the parameters, where the pass stands in them, and the
/// weight gradients a backward pass accumulates.
pub struct Pass<'a> {
    pub batch: usize,
    params: &'a Params<'a>,
    at: Cursor,
    weight_grads: Vec<Vec<f32>>,
}

impl<'a> Pass<'a> {
    /// The next masked layer's index and effective weights.
    pub(crate) fn next_weights(&mut self) -> (usize, &'a [f32]) {
        let i = self.at.weight;
        self.at.weight += 1;
        let params: &'a Params<'a> = self.params;
        (i, &params.weights[i])
    }

    /// The next Affine layer's coefficients.
    pub(crate) fn next_affine(&mut self) -> &'a [f32] {
        let i = self.at.affine;
        self.at.affine += 1;
        let params: &'a Params<'a> = self.params;
        &params.affine[i]
    }

    /// The next BatchNorm layer's inference coefficients, when the pass has them.
    pub(crate) fn next_population(&mut self) -> Option<&'a [f32]> {
        let params: &'a Params<'a> = self.params;
        let coef = params.population?;
        let i = self.at.population;
        self.at.population += 1;
        Some(&coef[i])
    }

    /// Adds `g` into masked layer `index`'s dL/dw_eff (backward passes only).
    pub(crate) fn add_weight_gradient(&mut self, index: usize, g: &[f32]) {
        let acc = &mut self.weight_grads[index];
        acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
    }
}

/// Runs `layers` forward; `outs` receives each layer's output (this list's only) when given.
pub(crate) fn run(
    p: &mut Pass,
    layers: &[Layer],
    mut x: Vec<f32>,
    mut s: Shape,
    mut outs: Option<&mut Vec<(Vec<f32>, Shape)>>,
) -> Result<(Vec<f32>, Shape)> {
    for l in layers {
        let out = l.output_shape(s)?;
        x = layer_kind(l).cpu_forward(p, &x, s)?;
        s = out;
        if let Some(o) = outs.as_deref_mut() {
            o.push((x.clone(), s));
        }
    }
    Ok((x, s))
}

/// dL/dx of `layers` for input `x` [batch, s] and dL/d output `dy`, adding the masked layers'
/// dL/dw_eff into the pass. Runs the list forward first to have each layer's input.
pub(crate) fn run_backward(
    p: &mut Pass,
    layers: &[Layer],
    x: &[f32],
    s: Shape,
    dy: &[f32],
) -> Result<Vec<f32>> {
    let mut inputs = Vec::with_capacity(layers.len());
    let (mut x, mut s) = (x.to_vec(), s);
    for l in layers {
        let at = p.at;
        let y = layer_kind(l).cpu_forward(p, &x, s)?;
        let out = l.output_shape(s)?;
        inputs.push((at, std::mem::replace(&mut x, y), s));
        s = out;
    }
    let end = p.at;
    let mut dy = dy.to_vec();
    for (l, (at, x, s)) in layers.iter().zip(inputs).rev() {
        // Each layer reads the parameters it read going forward.
        p.at = at;
        dy = layer_kind(l).cpu_backward(p, &x, s, &dy)?;
    }
    p.at = end;
    Ok(dy)
}

/// A pass over `params`; `gradients`: it runs backward, so it holds zeroed dL/dw_eff.
fn pass<'a>(batch: usize, params: &'a Params<'a>, gradients: bool) -> Pass<'a> {
    let weight_grads = match gradients {
        true => params.weights.iter().map(|w| vec![0.0; w.len()]).collect(),
        false => Vec::new(),
    };
    Pass {
        batch,
        params,
        at: Cursor::default(),
        weight_grads,
    }
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
    let mut p = pass(batch, params, false);
    run(&mut p, layers, input.to_vec(), shape, Some(&mut outs))?;
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
    generator_forward(arch, batch, input, weff, None)
}

/// As [`forward`], with BatchNorm in inference form: `population` holds each BatchNorm
/// layer's (a_c, b_c) pairs ([`crate::kernels::norm::population_coefficients`]).
pub fn forward_population(
    arch: &Architecture,
    batch: usize,
    input: &[f32],
    weff: &[Vec<f32>],
    population: &[Vec<f32>],
) -> Result<Vec<f32>> {
    generator_forward(arch, batch, input, weff, Some(population))
}

/// A generator's forward pass from latents, BatchNorm as `population` says.
fn generator_forward(
    arch: &Architecture,
    batch: usize,
    input: &[f32],
    weff: &[Vec<f32>],
    population: Option<&[Vec<f32>]>,
) -> Result<Vec<f32>> {
    let params = Params {
        weights: weff,
        affine: &[],
        population,
    };
    let mut p = pass(batch, &params, false);
    let shape = Shape::flat(arch.latent);
    Ok(run(&mut p, &arch.layers, input.to_vec(), shape, None)?.0)
}

/// The gradients of `L = <grad_output, network output>`.
pub struct Gradients {
    /// dL/d input [batch, latent].
    pub input: Vec<f32>,
    /// dL/dw_eff of every masked layer, in [`Architecture::masked_layers`] order.
    pub weights: Vec<Vec<f32>>,
}

/// The backward pass of [`forward`]: the input and effective-weight gradients for
/// `grad_output`, the gradient of the loss with respect to the network's output.
pub fn backward(
    arch: &Architecture,
    batch: usize,
    input: &[f32],
    weff: &[Vec<f32>],
    grad_output: &[f32],
) -> Result<Gradients> {
    let params = Params {
        weights: weff,
        affine: &[],
        population: None,
    };
    let mut p = pass(batch, &params, true);
    let shape = Shape::flat(arch.latent);
    let input = run_backward(&mut p, &arch.layers, input, shape, grad_output)?;
    Ok(Gradients {
        input,
        weights: p.weight_grads,
    })
}
