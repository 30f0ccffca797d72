//! The client trainer: local steps of PRISM (sections 2 and 3) on the GPU.
//!
//! One set of programs serves every client. A local run copies the broadcast scores and the
//! client's own Adam moments into the training network, records all its steps into one
//! submission (latents, real batch, forward, loss, backward, Adam; the step counter advances on
//! the GPU), samples the upload mask, and copies the moments back. The host reads the per-step
//! losses and the upload once, at the end.

use std::rc::Rc;

use super::config::{DpConfig, LossChoice, TrainConfig};
use super::message::Payload;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::matmul::Estimator;
use crate::kernels::mmd::{self, LossKernels, LossKind};
use crate::kernels::{adam, data, elementwise as ew, mask, Init, StepState};
use crate::nn::{Architecture, Backward, BuildOptions, Layer, Network, Program, Shape, WeightMode};
use crate::rng;

/// A client's local data on the GPU and the kernel that samples its minibatches.
pub struct ClientData {
    pub count: usize,
    gather: Kernel,
    _images: Tensor,
}

/// What a client keeps between rounds.
pub struct ClientState {
    /// Adam moments per masked layer.
    pub moments: Vec<Tensor>,
    /// Steps taken so far: the mask, latent and data streams and Adam's t continue from it.
    pub step: u32,
}

/// The result of one local run.
pub struct LocalRun {
    /// Loss of every local step.
    pub losses: Vec<f32>,
    /// The upload: a mask sample per layer (scores for PRISM-alpha layers).
    pub upload: Vec<Payload>,
}

/// The frozen random encoder of the feature-space loss: two stride-2 4x4 convolutions.
pub fn encoder_arch() -> Architecture {
    encoder_layers(2)
}

/// The first `depth` (1 or 2) conv+ReLU stages of the encoder. Weights are a function of
/// (seed, layer, index), so the one-stage encoder is exactly the first stage of the two-stage one.
pub fn encoder_layers(depth: usize) -> Architecture {
    let mut a = Architecture {
        name: "random-conv-encoder".into(),
        latent: 0,
        layers: vec![
            Layer::Conv {
                cout: 32,
                k: 4,
                stride: 2,
                pad: 1,
            },
            Layer::Relu,
            Layer::Conv {
                cout: 64,
                k: 4,
                stride: 2,
                pad: 1,
            },
            Layer::Relu,
        ],
        init: Init::SignedConstant,
    };
    a.layers.truncate(2 * depth.clamp(1, 2));
    a
}

/// Layer offset of the encoder's weight streams, keeping them unrelated to the generator's.
pub const ENCODER_LAYER_OFFSET: u32 = 1 << 20;

/// The feature-space part of the loss.
struct FeatureLoss {
    generated: Network,
    real: Network,
    loss: LossKernels,
    /// pixel gradient + encoder input gradient -> generator output gradient
    sum_grads: Kernel,
    /// pixel loss + feature loss -> recorded loss
    sum_losses: Kernel,
    total_loss: Tensor,
    _pixel_grad: Rc<Tensor>,
}

/// The shared training programs.
pub struct Trainer {
    pub net: Network,
    pub step: Rc<Tensor>,
    pub image: Shape,
    pub batch: usize,
    pub local_steps: usize,
    pub clients: Vec<ClientData>,
    seed: u32,
    /// Masked layers (counted from the output side) that upload scores (PRISM-alpha).
    alpha_layers: usize,
    dp: Option<DpConfig>,
    latent: Kernel,
    thresholds: Program,
    pixel_loss: LossKernels,
    features: Option<FeatureLoss>,
    adam: Program,
    record: Kernel,
    advance: Kernel,
    losses: Tensor,
    _real: Rc<Tensor>,
}

fn loss_kind(c: LossChoice, sigmas: Vec<f32>) -> LossKind {
    match c {
        LossChoice::Mmd => LossKind::Mmd {
            sigmas,
            unbiased: false,
            sqrt: true,
        },
        LossChoice::MmdUnbiased => LossKind::Mmd {
            sigmas,
            unbiased: true,
            sqrt: true,
        },
        LossChoice::Moments => LossKind::Moments,
    }
}

/// Number of masked layers (from the output side) that upload real scores under PRISM-alpha.
pub fn alpha_layer_count(layers: usize, alpha: f64) -> usize {
    ((layers as f64) * alpha).round() as usize
}

/// Median pairwise distance between the rows of a [n, d] matrix.
fn median_distance(v: &[f32], n: usize) -> f32 {
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

impl Trainer {
    /// Builds the programs for `arch` and uploads every client's images (`parts[k]` are client
    /// k's sample indices in `dataset`, already at the generator's resolution).
    pub fn new(
        gpu: &Gpu,
        cfg: &TrainConfig,
        arch: &Architecture,
        dataset: &Dataset,
        parts: &[Vec<usize>],
    ) -> Result<Trainer> {
        let image = arch.validate()?;
        if (dataset.channels, dataset.height, dataset.width) != (image.c, image.h, image.w) {
            return Err(Error::invalid(format!(
                "dataset images are {}x{}x{} but {} generates {}x{}x{}",
                dataset.channels,
                dataset.height,
                dataset.width,
                arch.name,
                image.c,
                image.h,
                image.w
            )));
        }
        let b = cfg.batch;
        let pixels = image.len();
        let step = Rc::new(gpu.zeros(&[StepState::WORDS], DType::U32, "step state")?);
        let estimator = if cfg.p_scaled_estimator {
            Estimator::PScaled
        } else {
            Estimator::StraightThrough
        };
        let opts = BuildOptions {
            batch: b,
            seed: cfg.seed,
            mode: WeightMode::Train,
            backward: Backward::Scores,
            estimator,
            layer_offset: 0,
            half: false,
        };
        let net = Network::build(gpu, arch, opts, Some(step.clone()), None, None)?;
        let real = Rc::new(gpu.tensor(
            &[cfg.real_batch(), image.c, image.h, image.w],
            DType::F32,
            "real batch",
        )?);

        let mut clients = Vec::with_capacity(parts.len());
        for (k, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(Error::invalid(format!("client {k} has no data")));
            }
            let mut bytes = Vec::with_capacity(part.len() * pixels);
            for &i in part {
                bytes.extend_from_slice(dataset.image(i));
            }
            let images = data::upload_images(gpu, &bytes, pixels, "client images")?;
            let gather = data::gather(gpu, &images, part.len(), pixels, cfg.seed, &step, &real)?;
            clients.push(ClientData {
                count: part.len(),
                gather,
                _images: images,
            });
        }

        let latent = ew::latent(
            gpu,
            rng::key_path(cfg.seed, &[rng::stream::LATENT]),
            &step,
            &net.input,
        )?;
        let grad_out = net
            .grad_output
            .clone()
            .ok_or_else(|| Error::invalid("training network has no output gradient"))?;
        let sigmas = cfg.bandwidths.clone();
        // Generator outputs are tanh values in [-1, 1]; the scale 1/4 measures distances between
        // pixels in [0, 1], the space GMMN's bandwidths are meant for.
        let (pixel_loss, features) = match cfg.features.encoder_stages() {
            None => (
                mmd::loss(
                    gpu,
                    &loss_kind(cfg.loss, sigmas),
                    0.25,
                    &net.output,
                    &real,
                    &grad_out,
                )?,
                None,
            ),
            Some(stages) => {
                let pixel_grad =
                    Rc::new(gpu.tensor(&[b * pixels], DType::F32, "pixel loss gradient")?);
                let pixel_loss = mmd::loss(
                    gpu,
                    &loss_kind(cfg.loss, sigmas),
                    0.25,
                    &net.output,
                    &real,
                    &pixel_grad,
                )?;
                let enc = encoder_layers(stages);
                let eopts = BuildOptions {
                    batch: b,
                    seed: cfg.seed,
                    mode: WeightMode::Frozen,
                    backward: Backward::Input,
                    estimator,
                    layer_offset: ENCODER_LAYER_OFFSET,
                    half: false,
                };
                let generated = Network::build(
                    gpu,
                    &enc,
                    eopts,
                    None,
                    Some(net.output.clone()),
                    Some(image),
                )?;
                let real_enc = Network::build(
                    gpu,
                    &enc,
                    BuildOptions {
                        backward: Backward::None,
                        batch: cfg.real_batch(),
                        ..eopts
                    },
                    None,
                    Some(real.clone()),
                    Some(image),
                )?;
                // Bandwidths by the median heuristic on one real batch of client 0.
                gpu.write_u32(&step, bytemuck::cast_slice(&[StepState::default()]))?;
                let mut ks: Vec<&Kernel> = vec![&clients[0].gather];
                ks.extend(real_enc.forward.refs());
                gpu.run(&ks)?;
                let med = median_distance(&gpu.read_f32(&real_enc.output)?, cfg.real_batch());
                let fsig: Vec<f32> = [0.25f32, 0.5, 1.0, 2.0, 4.0]
                    .iter()
                    .map(|f| f * med)
                    .collect();
                let eg_grad = generated
                    .grad_output
                    .clone()
                    .ok_or_else(|| Error::invalid("encoder without output gradient"))?;
                let loss = mmd::loss(
                    gpu,
                    &loss_kind(cfg.loss, fsig),
                    1.0,
                    &generated.output,
                    &real_enc.output,
                    &eg_grad,
                )?;
                let gin = generated
                    .grad_input
                    .clone()
                    .ok_or_else(|| Error::invalid("encoder without input gradient"))?;
                let sum_grads = ew::add(gpu, &pixel_grad, &gin, &grad_out)?;
                let total_loss = gpu.zeros(&[8], DType::F32, "total loss")?;
                let sum_losses = ew::add(gpu, &pixel_loss.loss, &loss.loss, &total_loss)?;
                let f = FeatureLoss {
                    generated,
                    real: real_enc,
                    loss,
                    sum_grads,
                    sum_losses,
                    total_loss,
                    _pixel_grad: pixel_grad,
                };
                (pixel_loss, Some(f))
            }
        };
        let losses = gpu.zeros(&[cfg.local_steps], DType::F32, "local losses")?;
        let loss_value = match &features {
            Some(f) => &f.total_loss,
            None => &pixel_loss.loss,
        };
        let record = adam::record_loss(gpu, &step, loss_value, &losses)?;
        let advance = adam::advance(gpu, &step)?;
        let adam_cfg = adam::AdamConfig {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
        };
        let adam = net.adam_program(gpu, &adam_cfg, &step)?;
        let thresholds = net.thresholds_program(gpu)?;
        Ok(Trainer {
            alpha_layers: alpha_layer_count(net.layers.len(), cfg.alpha),
            net,
            step,
            image,
            batch: b,
            local_steps: cfg.local_steps,
            clients,
            seed: cfg.seed,
            dp: cfg.dp,
            latent,
            thresholds,
            pixel_loss,
            features,
            adam,
            record,
            advance,
            losses,
            _real: real,
        })
    }

    /// Weights per masked layer.
    pub fn layer_sizes(&self) -> Vec<usize> {
        self.net.layers.iter().map(|l| l.info.weights).collect()
    }

    /// Whether masked layer `l` uploads scores (PRISM-alpha) rather than a mask.
    pub fn uploads_scores(&self, l: usize) -> bool {
        l + self.alpha_layers >= self.net.layers.len()
    }

    /// Fresh client state (zero Adam moments, step 0).
    pub fn new_client_state(&self, gpu: &Gpu) -> Result<ClientState> {
        let moments = self
            .net
            .layers
            .iter()
            .map(|l| gpu.zeros(&[2 * l.info.weights], DType::F32, "client Adam moments"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(ClientState { moments, step: 0 })
    }

    /// Every kernel of one training step of `client`, in order (for profiling).
    pub fn step_kernels(&self, client: usize) -> Vec<&Kernel> {
        let mut v: Vec<&Kernel> = vec![&self.latent, &self.clients[client].gather];
        v.extend(self.net.forward.kernels.iter());
        if let Some(f) = &self.features {
            v.extend(
                f.generated
                    .forward
                    .kernels
                    .iter()
                    .chain(&f.real.forward.kernels),
            );
        }
        v.extend(self.pixel_loss.kernels.iter());
        if let Some(f) = &self.features {
            v.extend(f.loss.kernels.iter().chain(&f.generated.backward.kernels));
            v.push(&f.sum_grads);
            v.push(&f.sum_losses);
        }
        v.extend(self.net.backward.kernels.iter().chain(&self.adam.kernels));
        v.push(&self.record);
        v.push(&self.advance);
        v
    }

    /// Records one training step of `client` (the kernels of [`Trainer::step_kernels`]).
    fn record_step(&self, pass: &mut wgpu::ComputePass<'_>, client: usize) {
        for k in self.step_kernels(client) {
            k.record(pass);
        }
    }

    /// One local run of `client` in `round`, starting from the global `scores`: its local steps
    /// and its upload. Updates the client's state.
    pub fn local_run(
        &self,
        gpu: &Gpu,
        client: usize,
        round: u32,
        scores: &[Tensor],
        state: &mut ClientState,
    ) -> Result<LocalRun> {
        let layers = &self.net.layers;
        if client >= self.clients.len()
            || scores.len() != layers.len()
            || state.moments.len() != layers.len()
        {
            return Err(Error::invalid(
                "local run: client, scores or state do not match the trainer",
            ));
        }
        let st = StepState {
            client: client as u32,
            step: state.step,
            round,
            seed: self.seed,
            step_base: state.step,
            _pad: [0; 3],
        };
        gpu.write_u32(&self.step, bytemuck::cast_slice(&[st]))?;
        // Upload samples: one key per (round, client, layer).
        let upload_key = rng::key_path(self.seed, &[rng::stream::UPLOAD, round, client as u32]);
        let dp_key = rng::key_path(self.seed, &[rng::stream::DP, round, client as u32]);
        let mut sample = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            if self.uploads_scores(i) {
                continue;
            }
            let key = rng::key(upload_key, i as u32);
            match &self.dp {
                None => sample.push(mask::sample_packed(
                    gpu,
                    l.info.weights,
                    &l.keep,
                    key,
                    &l.bits,
                )?),
                Some(dp) => {
                    // The sound mechanism: noise on clipped probabilities, then the sample.
                    let noisy = gpu.tensor(
                        &[mask::keep_words(l.info.weights)],
                        DType::U32,
                        "noisy thresholds",
                    )?;
                    let sigma = dp_sigma(dp, self.layer_sizes().iter().sum());
                    sample.push(mask::dp_thresholds(
                        gpu,
                        &l.scores,
                        dp.clip,
                        sigma,
                        rng::key(dp_key, i as u32),
                        &noisy,
                    )?);
                    sample.push(mask::sample_packed(
                        gpu,
                        l.info.weights,
                        &noisy,
                        key,
                        &l.bits,
                    )?);
                }
            }
        }
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        for ((l, s), m) in layers.iter().zip(scores).zip(&state.moments) {
            let moments = l
                .moments
                .as_ref()
                .ok_or_else(|| Error::invalid("training layer without moments"))?;
            enc.copy_buffer_to_buffer(s.buffer(), 0, l.scores.buffer(), 0, s.bytes());
            enc.copy_buffer_to_buffer(m.buffer(), 0, moments.buffer(), 0, m.bytes());
        }
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for k in &self.thresholds.kernels {
                k.record(&mut pass);
            }
            for _ in 0..self.local_steps {
                self.record_step(&mut pass, client);
            }
            for k in &sample {
                k.record(&mut pass);
            }
        }
        for (l, m) in layers.iter().zip(&state.moments) {
            let moments = l
                .moments
                .as_ref()
                .ok_or_else(|| Error::invalid("training layer without moments"))?;
            enc.copy_buffer_to_buffer(moments.buffer(), 0, m.buffer(), 0, m.bytes());
        }
        gpu.queue().submit([enc.finish()]);
        gpu.sync()?;
        state.step += self.local_steps as u32;
        let losses = gpu.read_f32(&self.losses)?;
        let mut upload = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            if self.uploads_scores(i) {
                upload.push(Payload::Scores(gpu.read_f32(&l.scores)?));
            } else {
                upload.push(Payload::Bits(gpu.read_u32(&l.bits)?));
            }
        }
        Ok(LocalRun { losses, upload })
    }
}

/// The per-coordinate noise standard deviation of the DP mechanism: noise multiplier times
/// the L2 sensitivity (1 - 2 clip) sqrt(d) of the clipped probability vector of d weights.
pub fn dp_sigma(dp: &DpConfig, weights: usize) -> f32 {
    (dp.noise_multiplier * (1.0 - 2.0 * dp.clip as f64) * (weights as f64).sqrt()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_encoder_is_the_first_stage_of_the_conv_encoder() {
        let one = encoder_layers(1);
        let two = encoder_arch();
        assert_eq!(one.layers.len(), 2);
        assert_eq!(one.layers[..], two.layers[..2]);
        let shape = crate::nn::Shape { c: 1, h: 28, w: 28 };
        assert_eq!(
            crate::nn::arch::shape_through(&one.layers, shape).unwrap(),
            crate::nn::Shape {
                c: 32,
                h: 14,
                w: 14
            }
        );
    }
}
