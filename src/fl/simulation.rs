//! An in-process simulation of a federated run: K clients on one GPU, all randomness derived
//! from the configuration's seed (same seed, same adapter: same result), checkpoints after
//! rounds so that a killed run resumes exactly, a progress bar, a metrics log, sample grids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::checkpoint::{write_atomic, Checkpoint};
use super::client::{ClientState, Trainer};
use super::config::TrainConfig;
use super::dp::Accountant;
use super::message::{self, MaskCoder, Payload, Upload};
use super::server::{Failure, FailureReason, Prism, ServerModel, Strategy};
use crate::codec::RangeCoder;
use crate::data::locate::{Named, Split};
use crate::data::partition::Partition;
use crate::data::resolve::load_dataset;
use crate::error::{Error, Result};
use crate::generate::Generator;
use crate::gpu::{DType, Gpu};
use crate::io::grid::{write_grid, Images};
use crate::kernels::mask::Aggregation;
use crate::kernels::mmd::{self, LossKind, GMMN_MNIST_SIGMAS};
use crate::model::{self, MaskKind};
use crate::nn::WeightMode;
use crate::rng::{self, HostRng};

/// Options of a run that do not change its result.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Folder for metrics, samples, checkpoints and the model.
    pub out: PathBuf,
    /// Where the dataset is (else $PRISM_DATA, ./data, ~/.cache/prism/data).
    pub data: Option<PathBuf>,
    /// Fetch the dataset when it is missing.
    pub fetch: bool,
    /// Write a sample grid every this many rounds (and after the last).
    pub sample_every: usize,
    /// Measure MMD to held-out images every this many rounds (and after the last).
    pub eval_every: usize,
    /// Save a checkpoint every this many rounds (and after the last).
    pub checkpoint_every: usize,
    /// Continue from the folder's checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop after this many rounds in this process (the run can be resumed).
    pub stop_after: Option<usize>,
}

impl RunOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            data: None,
            fetch: false,
            sample_every: 4,
            eval_every: 4,
            checkpoint_every: 1,
            resume: false,
            progress: false,
            stop_after: None,
        }
    }
}

/// Output into `runs/mnist` (the CLI's default folder), everything else as [`RunOptions::new`]
/// (unlike the CLI: no fetching and no progress bar unless asked).
impl Default for RunOptions {
    fn default() -> Self {
        Self::new("runs/mnist")
    }
}

/// One line of the metrics log.
#[derive(Clone, Debug, Serialize)]
pub struct RoundMetrics {
    pub round: u32,
    /// Mean over participating clients of their mean local loss.
    pub loss: f64,
    /// Mean over participating clients of their last local loss.
    pub loss_last: f64,
    pub lambda: Option<f64>,
    pub selected: usize,
    pub valid_uploads: usize,
    /// Uploads that did not count: malformed, dropped, unexpected, duplicate, rejected.
    pub failures: usize,
    /// Of those, rejected by robust aggregation.
    pub rejected: usize,
    pub kept_previous: bool,
    /// Bits received from all clients this round.
    pub bits_up: u64,
    /// Mean bits per uploading client, and per masked weight.
    pub bits_up_per_client: f64,
    pub bits_per_weight: f64,
    /// Bits the server broadcast (f32 scores to every selected client).
    pub bits_down: u64,
    pub epsilon: Option<f64>,
    /// MMD^2 (biased, pixel space) between generated and held-out real images.
    pub mmd_heldout: Option<f64>,
    pub wall_s: f64,
    /// Where the round's wall time went (the checkpoint after it is in [`RunSummary`]).
    pub timing: RoundTiming,
}

/// Wall time of a round's phases, in seconds. The local runs' three parts are summed over
/// clients; `local_steps` counts the steps they took, so that
/// `(local_record_s + local_device_s + local_readback_s) / local_steps` is a client step's cost
/// as the run pays it, comparable with the training bench's device time of one step.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RoundTiming {
    pub local_steps: usize,
    pub local_record_s: f64,
    pub local_device_s: f64,
    pub local_readback_s: f64,
    /// Encoding each upload as the wire message and the server's intake of it.
    pub upload_s: f64,
    /// Aggregation and MADA.
    pub aggregate_s: f64,
    /// Drawing the round's model and the held-out MMD.
    pub eval_s: f64,
    /// Generating and writing the sample grids.
    pub grid_s: f64,
}

impl RoundTiming {
    fn add(&mut self, o: &RoundTiming) {
        self.local_steps += o.local_steps;
        self.local_record_s += o.local_record_s;
        self.local_device_s += o.local_device_s;
        self.local_readback_s += o.local_readback_s;
        self.upload_s += o.upload_s;
        self.aggregate_s += o.aggregate_s;
        self.eval_s += o.eval_s;
        self.grid_s += o.grid_s;
    }

    /// The local runs' wall time per step, in milliseconds.
    pub fn ms_per_local_step(&self) -> f64 {
        let local = self.local_record_s + self.local_device_s + self.local_readback_s;
        1e3 * local / self.local_steps.max(1) as f64
    }
}

/// What a finished (or stopped) run produced.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub rounds_done: usize,
    pub wall_s: f64,
    pub last: Option<RoundMetrics>,
    pub grid: PathBuf,
    pub checkpoint: PathBuf,
    /// The rounds' phases summed over the rounds this run did, and its checkpoints' time.
    pub timing: RoundTiming,
    pub checkpoint_s: f64,
}

/// Runs (or resumes) a federated training.
pub fn run(gpu: &Gpu, cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    cfg.validate()?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let ckpt_path = opts.out.join("checkpoint.bin");
    let resumed = if opts.resume && ckpt_path.exists() {
        Some(Checkpoint::load(&ckpt_path)?)
    } else {
        None
    };
    if let Some(c) = &resumed {
        let mut a = c.config.clone();
        let mut b = cfg.clone();
        a.rounds = 0;
        b.rounds = 0;
        if a != b {
            return Err(Error::invalid(format!(
                "{} was written by a run with another configuration; use a new --out folder or the same flags",
                ckpt_path.display()
            )));
        }
    }
    write_atomic(
        &opts.out.join("config.json"),
        &serde_json::to_vec_pretty(cfg).map_err(|e| Error::invalid(e.to_string()))?,
    )?;

    let (train, arch) = load_dataset(
        &cfg.dataset,
        opts.data.as_deref(),
        opts.fetch,
        Split::Train,
        &cfg.arch,
    )?;
    let heldout = match Named::parse(&cfg.dataset) {
        Some(_) => {
            load_dataset(
                &cfg.dataset,
                opts.data.as_deref(),
                false,
                Split::Test,
                &cfg.arch,
            )?
            .0
        }
        None => train.take(1000),
    };
    let partition = Partition::parse(&cfg.partition)?;
    let parts = partition.split(
        &train.labels,
        cfg.clients,
        &mut HostRng::new(cfg.seed, &[0x5041_5254]),
    )?;
    let trainer = Trainer::new(gpu, cfg, &arch, &train, &parts)?;
    if let Some(p) = &trainer.encoder_phase {
        // The encoder the federation learned first: what it cost, beside the rounds' metrics.
        write_atomic(
            &opts.out.join("encoder.json"),
            &serde_json::to_vec_pretty(p).map_err(|e| Error::invalid(e.to_string()))?,
        )?;
        if opts.progress {
            let up: u64 = p.bits_up_per_client.iter().sum();
            eprintln!(
                "encoder {}: {} features to a {}-dimensional code, fitted in {:.1} s from the \
                 clients' statistics ({:.1} MB up in all, {:.2} MB down per client)",
                p.encoder,
                p.features,
                p.code,
                p.seconds,
                up as f64 / 8e6,
                p.bits_down_per_client as f64 / 8e6
            );
        }
    }
    let sizes = trainer.layer_sizes();
    let total_weights: usize = sizes.iter().sum();
    let score_layers: Vec<bool> = (0..sizes.len())
        .map(|l| trainer.uploads_scores(l))
        .collect();
    let mut server = ServerModel::new(gpu, &sizes, &score_layers, cfg.clients, cfg.seed)?;
    let mut strategy = Prism {
        fraction_fit: cfg.fraction_fit,
        min_fit_clients: cfg.min_fit_clients,
        rule: if cfg.persistent_prior {
            Aggregation::PersistentPrior
        } else {
            Aggregation::MeanOfSmoothed
        },
        mada: cfg.mada,
        robust: cfg.robust,
        ..Default::default()
    };
    let mut clients: Vec<ClientState> = (0..cfg.clients)
        .map(|_| trainer.new_client_state(gpu))
        .collect::<Result<_>>()?;
    let accountant = cfg
        .dp
        .map(|dp| Accountant::new(cfg.fraction_fit, dp.noise_multiplier, dp.delta));

    let mut history: Vec<serde_json::Value> = Vec::new();
    let mut start_round = 0usize;
    if let Some(c) = resumed {
        server.write_scores(gpu, &c.scores)?;
        for (t, p) in server.prior.iter().zip(&c.priors) {
            gpu.write_f32(t, p)?;
        }
        for (k, (state, (step, moments))) in clients
            .iter_mut()
            .zip(c.client_steps.iter().zip(&c.client_moments))
            .enumerate()
        {
            state.step = *step;
            for (t, m) in state.moments.iter().zip(moments) {
                gpu.write_f32(t, m)?;
            }
            let loss = c.client_loss.get(k).map(Vec::as_slice).unwrap_or(&[]);
            let fits = loss.len() == state.loss.len()
                && loss
                    .iter()
                    .zip(&state.loss)
                    .all(|(a, t)| a.len() == t.len());
            if !fits {
                return Err(Error::invalid(format!(
                    "the checkpoint's loss state of client {k} does not fit this configuration"
                )));
            }
            for (t, a) in state.loss.iter().zip(loss) {
                gpu.write_f32(t, a)?;
            }
        }
        history = c.metrics;
        start_round = c.rounds_done as usize;
    }
    // The metrics log restarts from the checkpoint's history, so it never holds rounds that a
    // resumed run repeats.
    let metrics_path = opts.out.join("metrics.jsonl");
    let mut log = std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    for h in &history {
        writeln!(log, "{h}").map_err(|e| Error::io(&metrics_path, e))?;
    }

    let grid_gen = Generator::new(gpu, &arch, cfg.seed, 100, WeightMode::Packed)?;
    let image = arch.output()?;
    let heldout_n = heldout.len().min(300);
    let heldout_flat: Vec<f32> = (0..heldout_n).flat_map(|i| heldout.image_f32(i)).collect();
    let grid_path = opts.out.join("samples.png");

    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(cfg.rounds as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} round {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        );
        pb.set_position(start_round as u64);
        Some(pb)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut last = None;
    let mut timing = RoundTiming::default();
    let mut checkpoint_s = 0.0;
    let mut done = start_round;
    for round in start_round..cfg.rounds {
        if opts.stop_after.is_some_and(|n| done - start_round >= n) {
            break;
        }
        let rt = Instant::now();
        let r = round as u32;
        let selected = strategy.configure_fit(
            r,
            cfg.clients,
            &mut HostRng::new(cfg.seed, &[rng::stream::HOST, r]),
        );
        let mut drops = HostRng::new(cfg.seed, &[0x4452_4f50, r]);
        let mut results: Vec<Upload> = Vec::new();
        let mut failures: Vec<Failure> = Vec::new();
        let mut losses = Vec::new();
        let mut bits_up = 0u64;
        let mut rt_parts = RoundTiming::default();
        for &k in &selected {
            if cfg.drop_rate > 0.0 && drops.unit_f64() < cfg.drop_rate {
                failures.push(Failure {
                    client: k as u32,
                    reason: FailureReason::Dropped,
                });
                continue;
            }
            let run = trainer.local_run(gpu, k, r, &server.scores, &mut clients[k])?;
            rt_parts.local_steps += run.losses.len();
            rt_parts.local_record_s += run.timing.record_s;
            rt_parts.local_device_s += run.timing.device_s;
            rt_parts.local_readback_s += run.timing.readback_s;
            let upload_start = Instant::now();
            let mean =
                run.losses.iter().map(|&v| v as f64).sum::<f64>() / run.losses.len().max(1) as f64;
            losses.push((mean, *run.losses.last().unwrap_or(&0.0) as f64));
            let mut layers = run.upload;
            if k < cfg.adversaries {
                // Fault injection: an adversary replaces its mask by all ones.
                for (l, payload) in layers.iter_mut().enumerate() {
                    if let Payload::Bits(b) = payload {
                        *b = all_ones(sizes[l]);
                    }
                }
            }
            let up = Upload {
                round: r,
                client: k as u32,
                layers,
            };
            let coder = cfg.entropy_coding.then_some(&RangeCoder as &dyn MaskCoder);
            let bytes = message::encode(&up, &sizes, coder);
            bits_up += 8 * bytes.len() as u64;
            match super::server::receive(&bytes, &sizes, r, &selected, &results, Some(&RangeCoder))
            {
                Ok(up) => results.push(up),
                Err(reason) => failures.push(Failure {
                    client: k as u32,
                    reason,
                }),
            }
            rt_parts.upload_s += upload_start.elapsed().as_secs_f64();
        }
        let phase = Instant::now();
        let report = strategy.aggregate_fit(gpu, r, &mut server, &results, &failures)?;
        rt_parts.aggregate_s = phase.elapsed().as_secs_f64();
        let phase = Instant::now();
        done = round + 1;
        let last_round = done == cfg.rounds;
        let every = |n: usize| n > 0 && done % n == 0;
        let want_eval = every(opts.eval_every) || last_round;
        let want_grid = every(opts.sample_every) || last_round;
        if want_eval || want_grid {
            // The model this round would export: one mask sample of the global scores, drawn
            // on the host exactly as `model::from_checkpoint` draws it.
            let scores = server.read_scores(gpu)?;
            grid_gen.set_masks(
                gpu,
                &model::masks_from_scores(&scores, MaskKind::Sample, cfg.seed),
            )?;
        }
        let mmd_heldout = if want_eval {
            Some(heldout_mmd(
                gpu,
                &grid_gen,
                &heldout_flat,
                heldout_n,
                image.len(),
            )?)
        } else {
            None
        };
        rt_parts.eval_s = phase.elapsed().as_secs_f64();
        let phase = Instant::now();
        if want_grid {
            let imgs = grid_gen.generate(gpu, 100, 0)?;
            let batch = Images {
                values: &imgs,
                count: 100,
                shape: image,
            };
            write_grid(&grid_path, &batch, 10)?;
            write_grid(
                &opts.out.join(format!("samples/round-{done:04}.png")),
                &batch,
                10,
            )?;
        }
        rt_parts.grid_s = phase.elapsed().as_secs_f64();
        timing.add(&rt_parts);
        let n_up = results.len().max(1);
        let m = RoundMetrics {
            round: done as u32,
            loss: losses.iter().map(|l| l.0).sum::<f64>() / losses.len().max(1) as f64,
            loss_last: losses.iter().map(|l| l.1).sum::<f64>() / losses.len().max(1) as f64,
            lambda: report.lambda,
            selected: selected.len(),
            valid_uploads: results.len(),
            failures: failures.len() + report.rejected.len(),
            rejected: report.rejected.len(),
            kept_previous: report.kept_previous,
            bits_up,
            bits_up_per_client: bits_up as f64 / n_up as f64,
            bits_per_weight: bits_up as f64 / n_up as f64 / total_weights as f64,
            bits_down: 32 * total_weights as u64 * selected.len() as u64,
            epsilon: accountant.as_ref().map(|a| a.epsilon(done)),
            mmd_heldout,
            wall_s: rt.elapsed().as_secs_f64(),
            timing: rt_parts,
        };
        let line = serde_json::to_value(&m).map_err(|e| Error::invalid(e.to_string()))?;
        writeln!(log, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        history.push(line);
        if every(opts.checkpoint_every)
            || last_round
            || opts.stop_after.is_some_and(|n| done - start_round >= n)
        {
            let phase = Instant::now();
            save_checkpoint(gpu, cfg, done, &server, &clients, &history, &ckpt_path)?;
            checkpoint_s += phase.elapsed().as_secs_f64();
        }
        if let Some(pb) = &bar {
            let eps = m.epsilon.map_or(String::new(), |e| format!(" eps {e:.2}"));
            let lam = m
                .lambda
                .map_or(String::new(), |l| format!(" lambda {l:.3}"));
            pb.set_message(format!("loss {:.4}{lam}{eps}", m.loss_last));
            pb.set_position(done as u64);
        }
        last = Some(m);
    }
    if let Some(pb) = bar {
        pb.finish();
    }
    Ok(RunSummary {
        rounds_done: done,
        wall_s: t0.elapsed().as_secs_f64(),
        last,
        grid: grid_path,
        checkpoint: ckpt_path,
        timing,
        checkpoint_s,
    })
}

/// A packed mask of `n` ones.
fn all_ones(n: usize) -> Vec<u32> {
    let mut w = vec![u32::MAX; n.div_ceil(32)];
    if n % 32 != 0 {
        w[n / 32] = (1u32 << (n % 32)) - 1;
    }
    w
}

fn save_checkpoint(
    gpu: &Gpu,
    cfg: &TrainConfig,
    done: usize,
    server: &ServerModel,
    clients: &[ClientState],
    history: &[serde_json::Value],
    path: &Path,
) -> Result<()> {
    let mut client_moments = Vec::with_capacity(clients.len());
    let mut client_loss = Vec::with_capacity(clients.len());
    let read = |ts: &[crate::gpu::Tensor]| {
        ts.iter()
            .map(|t| gpu.read_f32(t))
            .collect::<std::result::Result<Vec<_>, _>>()
    };
    for c in clients {
        client_moments.push(read(&c.moments)?);
        client_loss.push(read(&c.loss)?);
    }
    Checkpoint {
        config: cfg.clone(),
        rounds_done: done as u32,
        scores: server.read_scores(gpu)?,
        priors: server
            .prior
            .iter()
            .map(|t| gpu.read_f32(t))
            .collect::<std::result::Result<_, _>>()?,
        client_steps: clients.iter().map(|c| c.step).collect(),
        client_moments,
        client_loss,
        metrics: history.to_vec(),
    }
    .save(path)
}

/// MMD^2 (biased, pixels in [0, 1], GMMN bandwidths) between `n` images of the generator and
/// `n` held-out images.
fn heldout_mmd(
    gpu: &Gpu,
    generator: &Generator,
    heldout: &[f32],
    n: usize,
    pixels: usize,
) -> Result<f64> {
    // Latent batches far from the grid's, so the measure does not reuse the grid's latents.
    let gen = generator.generate(gpu, n, 1000)?;
    let x = gpu.upload_f32(&gen, &[n, pixels], "generated for evaluation")?;
    let y = gpu.upload_f32(heldout, &[n, pixels], "held-out images")?;
    let dx = gpu.tensor(&[n, pixels], DType::F32, "unused gradient")?;
    let kind = LossKind::Mmd {
        sigmas: GMMN_MNIST_SIGMAS.to_vec(),
        unbiased: false,
        sqrt: false,
    };
    let l = mmd::loss(gpu, &kind, 0.25, &x, &y, &dx)?;
    gpu.run(&l.kernels.iter().collect::<Vec<_>>())?;
    Ok(gpu.read_f32(&l.loss)?[0] as f64)
}

#[cfg(test)]
mod tests {
    use super::RunOptions;

    #[test]
    fn run_options_default_writes_into_the_clis_folder() {
        let o = RunOptions::default();
        assert_eq!(o.out, std::path::PathBuf::from("runs/mnist"));
        assert_eq!(
            (o.sample_every, o.eval_every, o.checkpoint_every),
            (4, 4, 1)
        );
        assert!(!o.resume && !o.fetch && o.stop_after.is_none());
    }
}
