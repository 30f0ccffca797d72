//! The client trainer: local steps of PRISM (sections 2 and 3) on the GPU.
//!
//! One set of programs serves every client. A local run copies the broadcast scores and the
//! client's own Adam moments into the training network, records all its steps into one
//! submission (latents, real batch, forward, loss, backward, Adam; the step counter advances on
//! the GPU), samples the upload mask, and copies the moments back. The host reads the per-step
//! losses and the upload once, at the end.

use std::rc::Rc;

use super::config::{DpConfig, TrainConfig};
use super::message::Payload;
use super::server::ServerModel;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::matmul::Estimator;
use crate::kernels::moments::TrackerConfig;
use crate::kernels::{adam, data, elementwise as ew, mask, StepState};
use crate::loss::readout::{self, ReadoutKind, ReadoutStats};
use crate::loss::{ClientLoss, Encoder, Objective, ObjectiveSpec, StepIo};
use crate::nn::{
    Architecture, Backward, BuildOptions, Network, Normalisation, Program, Shape, WeightMode,
    Wiring,
};
use crate::rng;

/// A client's local data on the GPU, the kernel that samples its minibatches, and its part
/// of the loss state (real feature statistics for moment matching).
pub struct ClientData {
    pub count: usize,
    gather: Kernel,
    loss: ClientLoss,
    _images: Tensor,
}

/// What a client keeps between rounds.
pub struct ClientState {
    /// Adam moments per masked layer.
    pub moments: Vec<Tensor>,
    /// The loss's own state (moment matching: trackers and their Adam moments), laid out as
    /// `Objective::state_sizes`.
    pub loss: Vec<Tensor>,
    /// Steps taken so far: the mask, latent and data streams and Adam's t continue from it.
    pub step: u32,
}

/// What learning the encoder cost, when the federation learns it first (`--encoder lda|pca`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EncoderPhase {
    pub encoder: String,
    /// Bits each client uploaded (its sufficient statistics at f32).
    pub bits_up_per_client: Vec<u64>,
    /// Bits the server sent each client (the readout at f32).
    pub bits_down_per_client: u64,
    /// Features of the random conv encoder and dimensions of the code.
    pub features: usize,
    pub code: usize,
    pub seconds: f64,
}

/// The result of one local run.
pub struct LocalRun {
    /// Loss of every local step.
    pub losses: Vec<f32>,
    /// The upload: a mask sample per layer (scores for PRISM-alpha layers).
    pub upload: Vec<Payload>,
    /// Where the run's wall time went.
    pub timing: LocalTiming,
}

/// Wall time of one local run's parts, in seconds: building the upload's kernels and recording
/// every step into one command buffer, the submission and the wait for the device, and the
/// readback of the losses and the upload.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LocalTiming {
    pub record_s: f64,
    pub device_s: f64,
    pub readback_s: f64,
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
    /// The encoder phase's cost, when the federation learned the loss's encoder.
    pub encoder_phase: Option<EncoderPhase>,
    dp: Option<DpConfig>,
    latent: Kernel,
    thresholds: Program,
    objective: Objective,
    adam: Program,
    record: Kernel,
    advance: Kernel,
    losses: Tensor,
    _real: Rc<Tensor>,
}

/// The encoder phase of `--encoder lda|pca`: every client computes the sufficient statistics of
/// the random conv features of its images (with its labels for LDA) and uploads them; the server
/// sums them, fits the readout and sends it back. Returns the encoder and what it cost.
#[allow(clippy::too_many_arguments)]
fn learn_readout(
    gpu: &Gpu,
    seed: u32,
    kind: ReadoutKind,
    name: &str,
    image: Shape,
    dataset: &Dataset,
    parts: &[Vec<usize>],
    uploads: &[(usize, Tensor, Kernel)],
) -> Result<(Encoder, EncoderPhase)> {
    let start = std::time::Instant::now();
    let base = readout::random_features(seed, image)?;
    let classes = dataset.classes().max(1);
    let mut stats = Vec::with_capacity(parts.len());
    for (part, (count, images, _)) in parts.iter().zip(uploads) {
        let labels: Vec<u8> = part.iter().map(|&i| dataset.labels[i]).collect();
        stats.push(readout::client_statistics(
            gpu, &base, image, images, &labels, *count, classes,
        )?);
    }
    let fitted = readout::fit(&ReadoutStats::combine(&stats)?, kind)?;
    let phase = EncoderPhase {
        encoder: name.to_string(),
        bits_up_per_client: stats.iter().map(|s| s.upload_bits(kind)).collect(),
        bits_down_per_client: fitted.download_bits(),
        features: stats[0].features(),
        code: fitted.dims,
        seconds: start.elapsed().as_secs_f64(),
    };
    let name = format!("random-conv features + {name} readout");
    Ok((readout::with_readout(&base, &fitted, &name), phase))
}

/// Number of masked layers (from the output side) that upload real scores under PRISM-alpha.
pub fn alpha_layer_count(layers: usize, alpha: f64) -> usize {
    ((layers as f64) * alpha).round() as usize
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
        let adam_cfg = adam::AdamConfig {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            ..adam::AdamConfig::default()
        };
        let opts = BuildOptions {
            batch: b,
            seed: cfg.seed,
            mode: WeightMode::Train,
            backward: Backward::Scores,
            estimator,
            layer_offset: 0,
            half: false,
            adam: Some(adam_cfg),
            norm: Normalisation::Batch,
        };
        let net = Network::build(gpu, arch, opts, Wiring::training(step.clone()))?;
        let real = Rc::new(gpu.tensor(
            &[cfg.real_batch(), image.c, image.h, image.w],
            DType::F32,
            "real batch",
        )?);

        let mut uploads = Vec::with_capacity(parts.len());
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
            uploads.push((part.len(), images, gather));
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
        let (encoder, encoder_phase) = match cfg.encoder.as_deref() {
            None => (None, None),
            Some(name) => match ReadoutKind::parse(name) {
                Some(kind) => {
                    let (e, phase) =
                        learn_readout(gpu, cfg.seed, kind, name, image, dataset, parts, &uploads)?;
                    (Some(e), Some(phase))
                }
                None => (
                    Some(crate::loss::encoder::load_file(name)?.for_channels(image.c)?),
                    None,
                ),
            },
        };
        let taps = match &encoder {
            Some(e) => e.taps(cfg.encoder_layers.as_deref())?,
            None => Vec::new(),
        };
        let spec = ObjectiveSpec {
            loss: cfg.loss,
            features: cfg.features,
            bandwidths: &cfg.bandwidths,
            pixel_weight: cfg.pixel_weight,
            encoder: encoder.as_ref().map(|e| (e, &taps[..])),
            tracker: TrackerConfig {
                lr: cfg.tracker_lr,
                beta1: cfg.beta1,
                ..Default::default()
            },
            seed: cfg.seed,
        };
        let io = StepIo {
            fake: &net.output,
            real: &real,
            grad: &grad_out,
            image,
            step: &step,
        };
        // Feature MMDs take their bandwidths from one real batch of client 0.
        let calibrate = || -> Result<()> {
            gpu.write_u32(&step, bytemuck::cast_slice(&[StepState::default()]))?;
            gpu.run(&[&uploads[0].2])?;
            Ok(())
        };
        let objective = Objective::new(gpu, &spec, &io, &calibrate)?;
        let mut clients = Vec::with_capacity(uploads.len());
        for (count, images, gather) in uploads {
            let loss = objective.client(gpu, &images, count, pixels)?;
            clients.push(ClientData {
                count,
                gather,
                loss,
                _images: images,
            });
        }
        let losses = gpu.zeros(&[cfg.local_steps], DType::F32, "local losses")?;
        let loss_value = &objective.loss;
        let record = adam::record_loss(gpu, &step, loss_value, &losses)?;
        let advance = adam::advance(gpu, &step)?;
        let adam = net.adam_program(gpu, &adam_cfg, &step)?;
        let thresholds = net.thresholds_program(gpu)?;
        Ok(Trainer {
            alpha_layers: alpha_layer_count(net.layers.len(), cfg.alpha),
            encoder_phase,
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
            objective,
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
    /// The server of this trainer's federation: its global scores (initialised from the
    /// configuration's seed) and aggregation buffers for `cfg.clients` uploads.
    pub fn new_server(&self, gpu: &Gpu, cfg: &TrainConfig) -> Result<ServerModel> {
        let sizes = self.layer_sizes();
        let score_layers: Vec<bool> = (0..sizes.len()).map(|l| self.uploads_scores(l)).collect();
        ServerModel::new(gpu, &sizes, &score_layers, cfg.clients, cfg.seed)
    }

    pub fn new_client_state(&self, gpu: &Gpu) -> Result<ClientState> {
        let moments = self
            .net
            .layers
            .iter()
            .map(|l| gpu.zeros(&[2 * l.info.weights], DType::F32, "client Adam moments"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let loss = self
            .objective
            .state_sizes()
            .iter()
            .map(|&n| gpu.zeros(&[n], DType::F32, "client loss state"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(ClientState {
            moments,
            loss,
            step: 0,
        })
    }

    /// Sizes (f32) of a client's loss state, as checkpoints hold it.
    pub fn loss_state_sizes(&self) -> Vec<usize> {
        self.objective.state_sizes()
    }

    /// Every kernel of one training step of `client`, in order (for profiling).
    pub fn step_kernels(&self, client: usize) -> Vec<&Kernel> {
        let mut v: Vec<&Kernel> = vec![&self.latent];
        if self.objective.uses_real_batch {
            v.push(&self.clients[client].gather);
        }
        v.extend(self.net.forward.kernels.iter());
        v.extend(self.objective.kernels.iter());
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
        let start = std::time::Instant::now();
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
        self.objective
            .copy_in(&mut enc, &self.clients[client].loss, &state.loss)?;
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
        self.objective.copy_out(&mut enc, &state.loss)?;
        let commands = enc.finish();
        let recorded = std::time::Instant::now();
        gpu.queue().submit([commands]);
        gpu.sync()?;
        let finished = std::time::Instant::now();
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
        let timing = LocalTiming {
            record_s: (recorded - start).as_secs_f64(),
            device_s: (finished - recorded).as_secs_f64(),
            readback_s: finished.elapsed().as_secs_f64(),
        };
        Ok(LocalRun {
            losses,
            upload,
            timing,
        })
    }
}

/// The per-coordinate noise standard deviation of the DP mechanism: noise multiplier times
/// the L2 sensitivity (1 - 2 clip) sqrt(d) of the clipped probability vector of d weights.
pub fn dp_sigma(dp: &DpConfig, weights: usize) -> f32 {
    (dp.noise_multiplier * (1.0 - 2.0 * dp.clip as f64) * (weights as f64).sqrt()) as f32
}
