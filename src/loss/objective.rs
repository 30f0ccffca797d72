//! The whole loss of a training step, from the generated batch to the generator's output
//! gradient: pixel-space kernel MMD, optionally weighted, plus one feature-space term: kernel
//! MMD on the features of the frozen random conv encoder, kernel MMD on the tapped layers of a
//! loaded encoder, or the reference's mean-and-variance matching on them.

use std::rc::Rc;

use super::encoder::Encoder;
use super::moments::{real_statistics, MomentLoss};
use super::{random_conv_encoder, FeatureSpace, LossChoice, RANDOM_ENCODER_LAYER_OFFSET};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::elementwise as ew;
use crate::kernels::matmul::Estimator;
use crate::kernels::mmd::{self, LossKernels, LossKind};
use crate::kernels::moments::TrackerConfig;
use crate::nn::{Backward, BuildOptions, Network, Normalisation, Shape, WeightMode, Wiring};

/// What the loss is made of.
pub struct ObjectiveSpec<'a> {
    pub loss: LossChoice,
    /// Feature space of the MMD losses without an encoder (pixels, or pixels plus the frozen
    /// random conv encoder's features).
    pub features: FeatureSpace,
    /// The pixel-space MMD's Gaussian bandwidths (pixels in [0, 1]).
    pub bandwidths: &'a [f32],
    /// Weight of the pixel-space MMD (0: none).
    pub pixel_weight: f32,
    /// A loaded encoder (already adapted to the images' channels) and the layers it taps.
    pub encoder: Option<(&'a Encoder, &'a [usize])>,
    /// GFMN's trackers (moment matching).
    pub tracker: TrackerConfig,
    /// The run seed (the random conv encoder's weights).
    pub seed: u32,
}

/// The tensors a step's loss reads and writes.
pub struct StepIo<'a> {
    /// The generated batch [batch, image].
    pub fake: &'a Rc<Tensor>,
    /// The real batch [real batch, image], filled by the trainer's gather.
    pub real: &'a Rc<Tensor>,
    /// dLoss/d fake, written (the generator's output gradient).
    pub grad: &'a Rc<Tensor>,
    pub image: Shape,
    /// The step state (the trackers' Adam reads t).
    pub step: &'a Rc<Tensor>,
}

/// What the loss fixes per client: its real feature statistics (moment matching), computed
/// once from its data; nothing otherwise. (What changes as a client trains lives in the
/// state of [`Objective::state_sizes`], which checkpoints hold.)
pub struct ClientLoss {
    real: Vec<Tensor>,
}

/// The kernels of one step's loss.
pub struct Objective {
    /// Run in order after the generator's forward pass and before its backward pass.
    pub kernels: Vec<Kernel>,
    /// \[1\]: the step's loss as recorded (the weighted sum of the terms' recorded values).
    pub loss: Rc<Tensor>,
    /// Whether a real batch must be gathered each step (moment matching alone reads none).
    pub uses_real_batch: bool,
    moments: Option<MomentLoss>,
    /// The encoder at the statistics batch, forward only (moment matching).
    stats: Option<Network>,
    _keep: Vec<Network>,
    _losses: Vec<LossKernels>,
    _tensors: Vec<Rc<Tensor>>,
}

fn mmd_kind(loss: LossChoice, sigmas: Vec<f32>) -> LossKind {
    LossKind::Mmd {
        sigmas,
        unbiased: loss == LossChoice::MmdUnbiased,
        sqrt: true,
    }
}

/// Median pairwise distance between the rows of a [n, d] matrix.
pub fn median_distance(v: &[f32], n: usize) -> f32 {
    let d = v.len() / n;
    let mut dist = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let s: f64 = (0..d)
                .map(|k| (v[i * d + k] as f64 - v[j * d + k] as f64).powi(2))
                .sum();
            dist.push(s.sqrt());
        }
    }
    dist.sort_by(|a, b| a.total_cmp(b));
    dist.get(dist.len() / 2).copied().unwrap_or(1.0).max(1e-6) as f32
}

/// Feature-space MMD bandwidths: multiples of the median distance between real features.
fn median_sigmas(gpu: &Gpu, real_features: &Tensor, n: usize) -> Result<Vec<f32>> {
    let med = median_distance(&gpu.read_f32(real_features)?, n);
    Ok([0.25f32, 0.5, 1.0, 2.0, 4.0]
        .iter()
        .map(|f| f * med)
        .collect())
}

impl Objective {
    /// Builds the loss. `calibrate` fills `io.real` with one real batch (the feature MMDs take
    /// their bandwidths from its median distance).
    pub fn new(
        gpu: &Gpu,
        spec: &ObjectiveSpec,
        io: &StepIo,
        calibrate: &dyn Fn() -> Result<()>,
    ) -> Result<Objective> {
        let fake_batch = io.fake.shape().first().copied().unwrap_or(0);
        let real_batch = io.real.shape().first().copied().unwrap_or(0);
        let mut kernels = Vec::new();
        let mut keep = Vec::new();
        let mut losses = Vec::new();
        let mut tensors: Vec<Rc<Tensor>> = Vec::new();
        let mut moments = None;
        let mut stats = None;
        let pixel_term = spec.loss != LossChoice::Moments || spec.pixel_weight > 0.0;
        let feature_term = spec.encoder.is_some() || spec.features.encoder_stages().is_some();
        if spec.loss == LossChoice::Moments && spec.encoder.is_none() {
            return Err(Error::invalid(
                "the moment-matching loss needs an encoder (--encoder)",
            ));
        }
        if spec.encoder.is_some() && spec.features.encoder_stages().is_some() {
            return Err(Error::invalid(
                "an encoder and the random conv features are two feature spaces: choose one",
            ));
        }
        if !pixel_term && !feature_term {
            return Err(Error::invalid("the loss has no terms"));
        }
        // (gradient, loss) of the feature term, weight 1.
        let mut feature: Option<(Rc<Tensor>, Rc<Tensor>)> = None;
        if let Some((enc, taps)) = spec.encoder {
            let net = enc.build(gpu, fake_batch, io.fake.clone(), io.image, taps, true)?;
            let gin = net
                .grad_input
                .clone()
                .ok_or_else(|| Error::invalid("encoder without an input gradient"))?;
            kernels.extend(net.forward.kernels.iter().cloned());
            match spec.loss {
                LossChoice::Moments => {
                    let m = MomentLoss::new(gpu, &spec.tracker, &net, io.step)?;
                    kernels.extend(m.kernels.iter().cloned());
                    let stats_input = Rc::new(gpu.tensor(
                        &[fake_batch, io.image.c, io.image.h, io.image.w],
                        DType::F32,
                        "statistics input",
                    )?);
                    stats = Some(enc.build(gpu, fake_batch, stats_input, io.image, taps, false)?);
                    let loss = Rc::new(gpu.zeros(&[8], DType::F32, "moment loss")?);
                    kernels.push(ew::scale(gpu, 1.0, &m.loss, &loss)?);
                    feature = Some((gin, loss));
                    moments = Some(m);
                }
                LossChoice::Mmd | LossChoice::MmdUnbiased => {
                    let real_net =
                        enc.build(gpu, real_batch, io.real.clone(), io.image, taps, false)?;
                    calibrate()?;
                    gpu.run(&real_net.forward.refs())?;
                    kernels.extend(real_net.forward.kernels.iter().cloned());
                    let total = Rc::new(gpu.zeros(&[8], DType::F32, "feature loss")?);
                    let mut acc: Option<Rc<Tensor>> = None;
                    for (t, r) in net.taps.iter().zip(&real_net.taps) {
                        let sig = median_sigmas(gpu, &r.output, real_batch)?;
                        let grad = t
                            .grad
                            .as_ref()
                            .ok_or_else(|| Error::invalid("tap without gradient"))?;
                        let l = mmd::loss(
                            gpu,
                            &mmd_kind(spec.loss, sig),
                            1.0,
                            &t.output,
                            &r.output,
                            grad,
                        )?;
                        kernels.extend(l.kernels.iter().cloned());
                        let next = Rc::new(gpu.zeros(&[8], DType::F32, "feature loss sum")?);
                        match &acc {
                            None => kernels.push(ew::scale(gpu, 1.0, &l.loss, &next)?),
                            Some(a) => kernels.push(ew::add(gpu, a, &l.loss, &next)?),
                        }
                        acc = Some(next.clone());
                        tensors.push(next);
                        losses.push(l);
                    }
                    let sum = acc.ok_or_else(|| Error::invalid("an encoder with no taps"))?;
                    kernels.push(ew::scale(gpu, 1.0, &sum, &total)?);
                    feature = Some((gin, total));
                    keep.push(real_net);
                }
            }
            kernels.extend(net.backward.kernels.iter().cloned());
            keep.push(net);
        } else if let Some(stages) = spec.features.encoder_stages() {
            let enc = random_conv_encoder(stages);
            let opts = BuildOptions {
                batch: fake_batch,
                seed: spec.seed,
                mode: WeightMode::Frozen,
                backward: Backward::Input,
                estimator: Estimator::PScaled,
                layer_offset: RANDOM_ENCODER_LAYER_OFFSET,
                half: false,
                adam: None,
                norm: Normalisation::Batch,
            };
            let net = Network::build(
                gpu,
                &enc,
                opts,
                Wiring::image(Some(io.fake.clone()), io.image),
            )?;
            let real_net = Network::build(
                gpu,
                &enc,
                BuildOptions {
                    backward: Backward::None,
                    batch: real_batch,
                    ..opts
                },
                Wiring::image(Some(io.real.clone()), io.image),
            )?;
            calibrate()?;
            gpu.run(&real_net.forward.refs())?;
            let sig = median_sigmas(gpu, &real_net.output, real_batch)?;
            let grad = net
                .grad_output
                .clone()
                .ok_or_else(|| Error::invalid("encoder without output gradient"))?;
            let l = mmd::loss(
                gpu,
                &mmd_kind(spec.loss, sig),
                1.0,
                &net.output,
                &real_net.output,
                &grad,
            )?;
            kernels.extend(net.forward.kernels.iter().cloned());
            kernels.extend(real_net.forward.kernels.iter().cloned());
            kernels.extend(l.kernels.iter().cloned());
            kernels.extend(net.backward.kernels.iter().cloned());
            let gin = net
                .grad_input
                .clone()
                .ok_or_else(|| Error::invalid("encoder without an input gradient"))?;
            let loss = Rc::new(gpu.zeros(&[8], DType::F32, "feature loss")?);
            kernels.push(ew::scale(gpu, 1.0, &l.loss, &loss)?);
            feature = Some((gin, loss));
            losses.push(l);
            keep.push(net);
            keep.push(real_net);
        }
        let total = Rc::new(gpu.zeros(&[8], DType::F32, "loss")?);
        if pixel_term {
            let w = if spec.loss == LossChoice::Moments {
                spec.pixel_weight
            } else {
                spec.pixel_weight.max(0.0)
            };
            // Generator outputs are tanh values in [-1, 1]; the scale 1/4 measures distances
            // between pixels in [0, 1], the space GMMN's bandwidths are meant for.
            let kind = mmd_kind(
                if spec.loss == LossChoice::Moments {
                    LossChoice::Mmd
                } else {
                    spec.loss
                },
                spec.bandwidths.to_vec(),
            );
            let direct = feature.is_none() && w == 1.0;
            let pixel_grad = if direct {
                io.grad.clone()
            } else {
                Rc::new(gpu.tensor(io.grad.shape(), DType::F32, "pixel loss gradient")?)
            };
            let l = mmd::loss(gpu, &kind, 0.25, io.fake, io.real, &pixel_grad)?;
            kernels.extend(l.kernels.iter().cloned());
            match &feature {
                Some((g, fl)) => {
                    kernels.push(ew::axpy(gpu, w, &pixel_grad, g, io.grad)?);
                    kernels.push(ew::axpy(gpu, w, &l.loss, fl, &total)?);
                }
                None => {
                    if !direct {
                        kernels.push(ew::scale(gpu, w, &pixel_grad, io.grad)?);
                    }
                    kernels.push(ew::scale(gpu, w, &l.loss, &total)?);
                }
            }
            tensors.push(pixel_grad);
            losses.push(l);
        } else if let Some((g, fl)) = &feature {
            kernels.push(ew::scale(gpu, 1.0, g, io.grad)?);
            kernels.push(ew::scale(gpu, 1.0, fl, &total)?);
        }
        if let Some((g, fl)) = feature {
            tensors.push(g);
            tensors.push(fl);
        }
        Ok(Objective {
            kernels,
            loss: total,
            uses_real_batch: pixel_term || spec.loss != LossChoice::Moments,
            moments,
            stats,
            _keep: keep,
            _losses: losses,
            _tensors: tensors,
        })
    }

    /// A client's fixed part of the loss for its `count` images of `pixels` bytes (uploaded as
    /// `data::upload_images` does): moment matching computes its real statistics here, once.
    pub fn client(
        &self,
        gpu: &Gpu,
        images: &Tensor,
        count: usize,
        pixels: usize,
    ) -> Result<ClientLoss> {
        let real = match &self.stats {
            Some(net) => real_statistics(gpu, net, images, count, pixels)?,
            None => Vec::new(),
        };
        Ok(ClientLoss { real })
    }

    /// Sizes (f32) of the loss state each client keeps across rounds (moment matching: the
    /// trackers and their Adam moments; nothing for kernel MMD).
    pub fn state_sizes(&self) -> Vec<usize> {
        self.moments
            .as_ref()
            .map_or(Vec::new(), |m| m.state_sizes())
    }

    /// Records the copies of a client's statistics and state into the loss's working buffers.
    pub fn copy_in(
        &self,
        enc: &mut wgpu::CommandEncoder,
        c: &ClientLoss,
        state: &[Tensor],
    ) -> Result<()> {
        match &self.moments {
            Some(m) => m.copy_in(enc, &c.real, state),
            None => Ok(()),
        }
    }

    /// Records the copies of the working state back into a client's.
    pub fn copy_out(&self, enc: &mut wgpu::CommandEncoder, state: &[Tensor]) -> Result<()> {
        match &self.moments {
            Some(m) => m.copy_out(enc, state),
            None => Ok(()),
        }
    }
}
