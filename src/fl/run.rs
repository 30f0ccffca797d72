//! A federated run as a value: [`Run::start`] sets it up (or resumes it from its checkpoint),
//! and each round is a sequence of steps that can be called and tested one at a time —
//! [`Run::fit`] (selection, local training, uploads and their intake), [`Run::aggregate`]
//! (strategy and MADA), [`Run::observe`] (held-out MMD and sample grids) and [`Run::record`]
//! (metrics log and checkpoint); [`Run::round`] runs them in order.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::{write_atomic, Checkpoint};
use super::client::{ClientState, Trainer};
use super::config::TrainConfig;
use super::dp::Accountant;
use super::message::{self, MaskCoder, Payload, Upload};
use super::records::{RoundMetrics, RoundTiming, RunOptions, RunSummary};
use super::server::{AggregateReport, Failure, FailureReason, Prism, ServerModel, Strategy};
use crate::codec::RangeCoder;
use crate::data::locate::Split;
use crate::data::partition::Partition;
use crate::data::resolve::load_dataset;
use crate::error::{Error, Result};
use crate::generate::Generator;
use crate::gpu::{DType, Gpu};
use crate::io::grid::{write_grid, Images};
use crate::kernels::mask::Aggregation;
use crate::kernels::mmd::{self, LossKind, GMMN_MNIST_SIGMAS};
use crate::model::{self, MaskKind};
use crate::nn::{Shape, WeightMode};
use crate::rng::{self, HostRng};

/// A federated run in progress: the trainer, the server, every client's state, the outputs.
pub struct Run<'g> {
    gpu: &'g Gpu,
    cfg: TrainConfig,
    opts: RunOptions,
    trainer: Trainer,
    server: ServerModel,
    strategy: Prism,
    clients: Vec<ClientState>,
    accountant: Option<Accountant>,
    /// Masked weights per layer, and in all.
    sizes: Vec<usize>,
    total_weights: usize,
    /// The metrics log's lines so far (a resumed run's start with its checkpoint's).
    history: Vec<serde_json::Value>,
    log: std::fs::File,
    metrics_path: PathBuf,
    grid_path: PathBuf,
    checkpoint_path: PathBuf,
    /// Draws the round's model for the grids and the held-out MMD.
    grid_gen: Generator,
    image: Shape,
    heldout: Vec<f32>,
    heldout_n: usize,
    /// Rounds done when this process started, and now.
    start_round: usize,
    done: usize,
    started: Instant,
    timing: RoundTiming,
    checkpoint_s: f64,
    last: Option<RoundMetrics>,
}

/// What a round's clients sent and how the intake judged it ([`Run::fit`]).
pub struct Fit {
    pub round: u32,
    pub selected: Vec<usize>,
    /// Valid uploads, in arrival order.
    pub results: Vec<Upload>,
    /// Uploads that did not count (dropped clients, malformed or unexpected messages).
    pub failures: Vec<Failure>,
    /// Per uploading client: its mean and its last local loss.
    pub losses: Vec<(f64, f64)>,
    pub bits_up: u64,
    /// The round's phases so far; the later steps add theirs.
    pub timing: RoundTiming,
    started: Instant,
}

/// Refuses, before any client is allocated, a federation whose clients' state does not fit:
/// each client keeps Adam's two moments of every weight (8 bytes a weight) on the adapter, and
/// a checkpoint gathers them all on the host twice (the values, then the encoded file). On a
/// CPU adapter (lavapipe) the adapter's memory is the host's too.
fn check_client_memory(gpu: &Gpu, cfg: &TrainConfig, weights: usize) -> Result<()> {
    let copies = if gpu.info().device_type == wgpu::DeviceType::Cpu {
        3
    } else {
        2
    };
    let per_client = 8 * weights as u64 * copies;
    crate::limits::check_host(
        per_client.saturating_mul(cfg.clients as u64),
        &format!("{} clients of {weights} weights", cfg.clients),
        &|left| {
            format!(
                "their Adam state takes {} a client with its {copies} copies: at most {} clients fit",
                crate::limits::human_bytes(per_client),
                left / per_client.max(1)
            )
        },
    )
}

/// The mean of some values, None for none (an empty sum is -0.0, which is not a loss).
fn mean_of(v: impl ExactSizeIterator<Item = f64>) -> Option<f64> {
    let n = v.len();
    (n > 0).then(|| v.sum::<f64>() / n as f64)
}

/// The files a run writes into its folder (sample grids per round go to `samples/`).
const RUN_FILES: &[&str] = &[
    "checkpoint.bin",
    "metrics.jsonl",
    "config.json",
    "model.prism",
    "samples.png",
    "encoder.json",
];

/// Makes `out` ready for a new run: refuses a folder that holds a run unless `overwrite`, in
/// which case the run's own files (and nothing else) are removed first, so that no file of the
/// old run (a round's grid) stays beside the new one's.
fn claim_folder(out: &std::path::Path, overwrite: bool) -> Result<()> {
    let present: Vec<&str> = RUN_FILES
        .iter()
        .copied()
        .filter(|f| out.join(f).exists())
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::invalid(format!(
            "{} holds a run ({}); give --resume to continue it, --overwrite to replace it, or \
             another --out folder",
            out.display(),
            present.join(", ")
        )));
    }
    for f in present {
        let p = out.join(f);
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
    }
    let grids = out.join("samples");
    if let Ok(entries) = std::fs::read_dir(&grids) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("round-") && name.ends_with(".png") {
                std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
            }
        }
    }
    Ok(())
}

/// The fields in which two configurations differ, as `name: old -> new` (the round count may
/// differ: a resumed run may be extended).
fn config_differences(old: &TrainConfig, new: &TrainConfig) -> Vec<String> {
    let as_map = |c: &TrainConfig| match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (as_map(old), as_map(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| k.as_str() != "rounds")
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".into(), |v| v.to_string());
            format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

impl<'g> Run<'g> {
    /// Validates the configuration, loads the data, builds the trainer, server and clients,
    /// and resumes from the output folder's checkpoint when `opts.resume` (an error when there
    /// is none); without it, a folder holding a run is refused unless `opts.overwrite`.
    pub fn start(gpu: &'g Gpu, cfg: &TrainConfig, opts: &RunOptions) -> Result<Run<'g>> {
        cfg.validate()?;
        let checkpoint_path = opts.out.join("checkpoint.bin");
        let resumed = if opts.resume {
            if !checkpoint_path.exists() {
                return Err(Error::invalid(format!(
                    "--resume: {} holds no checkpoint to resume (checkpoint.bin); start the run \
                     without --resume",
                    opts.out.display()
                )));
            }
            Some(Checkpoint::load(&checkpoint_path)?)
        } else {
            claim_folder(&opts.out, opts.overwrite)?;
            None
        };
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        if let Some(c) = &resumed {
            let differ = config_differences(&c.config, cfg);
            if !differ.is_empty() {
                return Err(Error::invalid(format!(
                    "{} was written by a run with another configuration ({}); use a new --out \
                     folder or the same flags",
                    checkpoint_path.display(),
                    differ.join("; ")
                )));
            }
        }

        let (train, arch) = load_dataset(
            &cfg.dataset,
            opts.data.as_deref(),
            opts.fetch,
            Split::Train,
            &cfg.arch,
            cfg.seed,
        )?;
        // The test split, or a folder's held-out images: never trained on.
        let heldout = load_dataset(
            &cfg.dataset,
            opts.data.as_deref(),
            false,
            Split::Test,
            &cfg.arch,
            cfg.seed,
        )?
        .0;
        let partition = Partition::parse(&cfg.partition)?;
        let parts = partition.split(
            &train.labels,
            cfg.clients,
            &mut HostRng::new(cfg.seed, &[0x5041_5254]),
        )?;
        check_client_memory(gpu, cfg, arch.masked_weights()?)?;
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
        let server = trainer.new_server(gpu, cfg)?;
        let strategy = Prism {
            fraction_fit: cfg.fraction_fit,
            min_fit_clients: cfg.min_fit_clients,
            rule: if cfg.persistent_prior {
                Aggregation::PersistentPrior
            } else {
                Aggregation::MeanOfSmoothed
            },
            mada: cfg.mada,
            robust: cfg.robust,
            // The accountant assumes Poisson sampling at rate fraction_fit.
            poisson: cfg.dp.is_some(),
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
        // Written once the run is set up, so that a configuration that fails on the data (a
        // partition that does not fit) leaves no run behind in the folder.
        write_atomic(
            &opts.out.join("config.json"),
            &serde_json::to_vec_pretty(cfg).map_err(|e| Error::invalid(e.to_string()))?,
        )?;
        // The metrics log restarts from the checkpoint's history, so it never holds rounds that a
        // resumed run repeats.
        let metrics_path = opts.out.join("metrics.jsonl");
        let mut log =
            std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
        for h in &history {
            writeln!(log, "{h}").map_err(|e| Error::io(&metrics_path, e))?;
        }
        let grid_gen = Generator::new(gpu, &arch, cfg.seed, 100, WeightMode::Packed)?;
        let image = arch.output()?;
        let heldout_n = heldout.len().min(300);
        let heldout: Vec<f32> = (0..heldout_n).flat_map(|i| heldout.image_f32(i)).collect();
        Ok(Run {
            gpu,
            cfg: cfg.clone(),
            opts: opts.clone(),
            trainer,
            server,
            strategy,
            clients,
            accountant,
            sizes,
            total_weights,
            history,
            log,
            metrics_path,
            grid_path: opts.out.join("samples.png"),
            checkpoint_path,
            grid_gen,
            image,
            heldout,
            heldout_n,
            start_round,
            done: start_round,
            started: Instant::now(),
            timing: RoundTiming::default(),
            checkpoint_s: 0.0,
            last: None,
        })
    }

    /// Rounds done so far (a resumed run's count includes the earlier process's).
    pub fn rounds_done(&self) -> usize {
        self.done
    }

    /// Rounds done when this process started (0 unless resumed).
    pub fn start_round(&self) -> usize {
        self.start_round
    }

    /// The configuration this run trains.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Whether this process should run another round: rounds remain, and `stop_after` (if
    /// any) is not reached.
    pub fn wants_round(&self) -> bool {
        self.done < self.cfg.rounds && !self.stop_reached()
    }

    fn stop_reached(&self) -> bool {
        self.opts
            .stop_after
            .is_some_and(|n| self.done - self.start_round >= n)
    }

    /// Runs the next round's steps in order; returns its metrics line.
    pub fn round(&mut self) -> Result<RoundMetrics> {
        let mut fit = self.fit()?;
        let report = self.aggregate(&mut fit)?;
        let mmd_heldout = self.observe(&mut fit.timing)?;
        let m = self.metrics(&fit, &report, mmd_heldout);
        self.record(&m)?;
        Ok(m)
    }

    /// Step 1: the strategy selects the round's clients; each trains locally from the global
    /// scores and uploads its mask as a wire message, which the server's intake decodes and
    /// validates. With fault injection, some clients drop out or upload all ones.
    pub fn fit(&mut self) -> Result<Fit> {
        let started = Instant::now();
        let (gpu, cfg) = (self.gpu, &self.cfg);
        let r = self.done as u32;
        let selected = self.strategy.configure_fit(
            r,
            cfg.clients,
            &mut HostRng::new(cfg.seed, &[rng::stream::HOST, r]),
        );
        let mut drops = HostRng::new(cfg.seed, &[0x4452_4f50, r]);
        let mut fit = Fit {
            round: r,
            selected: Vec::new(),
            results: Vec::new(),
            failures: Vec::new(),
            losses: Vec::new(),
            bits_up: 0,
            timing: RoundTiming::default(),
            started,
        };
        let sizes = &self.sizes;
        for &k in &selected {
            if cfg.drop_rate > 0.0 && drops.unit_f64() < cfg.drop_rate {
                fit.failures.push(Failure {
                    client: k as u32,
                    reason: FailureReason::Dropped,
                });
                continue;
            }
            let run =
                self.trainer
                    .local_run(gpu, k, r, &self.server.scores, &mut self.clients[k])?;
            let t = &mut fit.timing;
            t.local_steps += run.losses.len();
            t.local_record_s += run.timing.record_s;
            t.local_device_s += run.timing.device_s;
            t.local_readback_s += run.timing.readback_s;
            let upload_start = Instant::now();
            let mean =
                run.losses.iter().map(|&v| v as f64).sum::<f64>() / run.losses.len().max(1) as f64;
            fit.losses
                .push((mean, *run.losses.last().unwrap_or(&0.0) as f64));
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
            let bytes = message::encode(&up, sizes, coder);
            fit.bits_up += 8 * bytes.len() as u64;
            let intake = super::server::receive(
                &bytes,
                sizes,
                r,
                &selected,
                &fit.results,
                Some(&RangeCoder),
            );
            match intake {
                Ok(up) => fit.results.push(up),
                Err(reason) => fit.failures.push(Failure {
                    client: k as u32,
                    reason,
                }),
            }
            fit.timing.upload_s += upload_start.elapsed().as_secs_f64();
        }
        fit.selected = selected;
        Ok(fit)
    }

    /// Step 2: the strategy aggregates the valid uploads into new global scores (MADA
    /// included); the round then counts as done.
    pub fn aggregate(&mut self, fit: &mut Fit) -> Result<AggregateReport> {
        let phase = Instant::now();
        let report = self.strategy.aggregate_fit(
            self.gpu,
            fit.round,
            &mut self.server,
            &fit.results,
            &fit.failures,
        )?;
        fit.timing.aggregate_s = phase.elapsed().as_secs_f64();
        self.done = fit.round as usize + 1;
        Ok(report)
    }

    fn every(&self, n: usize) -> bool {
        n > 0 && self.done % n == 0
    }

    fn last_round(&self) -> bool {
        self.done == self.cfg.rounds
    }

    /// Step 3, when the round is due for it (`eval_every`, `sample_every`, the last round):
    /// draws the model this round would export and measures its held-out MMD (returned), and
    /// writes the sample grids.
    pub fn observe(&mut self, timing: &mut RoundTiming) -> Result<Option<f64>> {
        let gpu = self.gpu;
        let phase = Instant::now();
        let want_eval = self.every(self.opts.eval_every) || self.last_round();
        let want_grid = self.every(self.opts.sample_every) || self.last_round();
        if want_eval || want_grid {
            // The model this round would export: one mask sample of the global scores, drawn
            // on the host exactly as `model::from_checkpoint` draws it.
            let scores = self.server.read_scores(gpu)?;
            self.grid_gen.set_masks(
                gpu,
                &model::masks_from_scores(&scores, MaskKind::Sample, self.cfg.seed),
            )?;
        }
        let mmd_heldout = if want_eval {
            Some(heldout_mmd(
                gpu,
                &self.grid_gen,
                &self.heldout,
                self.heldout_n,
                self.image.len(),
            )?)
        } else {
            None
        };
        timing.eval_s = phase.elapsed().as_secs_f64();
        let phase = Instant::now();
        if want_grid {
            let imgs = self.grid_gen.generate(gpu, 100, 0)?;
            let batch = Images {
                values: &imgs,
                count: 100,
                shape: self.image,
            };
            write_grid(&self.grid_path, &batch, 10)?;
            let done = self.done;
            let path = self.opts.out.join(format!("samples/round-{done:04}.png"));
            write_grid(&path, &batch, 10)?;
        }
        timing.grid_s = phase.elapsed().as_secs_f64();
        Ok(mmd_heldout)
    }

    /// The round's metrics line from its steps' results.
    pub fn metrics(
        &self,
        fit: &Fit,
        report: &AggregateReport,
        mmd_heldout: Option<f64>,
    ) -> RoundMetrics {
        let total_weights = self.total_weights;
        let n_up = fit.results.len().max(1);
        let losses = &fit.losses;
        RoundMetrics {
            round: self.done as u32,
            loss: mean_of(losses.iter().map(|l| l.0)),
            loss_last: mean_of(losses.iter().map(|l| l.1)),
            lambda: report.lambda,
            selected: fit.selected.len(),
            valid_uploads: fit.results.len(),
            failures: fit.failures.len() + report.rejected.len(),
            rejected: report.rejected.len(),
            kept_previous: report.kept_previous,
            bits_up: fit.bits_up,
            bits_up_per_client: fit.bits_up as f64 / n_up as f64,
            bits_per_weight: fit.bits_up as f64 / n_up as f64 / total_weights as f64,
            bits_down: 32 * total_weights as u64 * fit.selected.len() as u64,
            epsilon: self.accountant.as_ref().map(|a| a.epsilon(self.done)),
            mmd_heldout,
            wall_s: fit.started.elapsed().as_secs_f64(),
            timing: fit.timing,
        }
    }

    /// Step 4: appends the metrics line to the log and saves a checkpoint when one is due
    /// (`checkpoint_every`, the last round, or a `stop_after` stop).
    pub fn record(&mut self, m: &RoundMetrics) -> Result<()> {
        self.timing.add(&m.timing);
        let line = serde_json::to_value(m).map_err(|e| Error::invalid(e.to_string()))?;
        writeln!(self.log, "{line}").map_err(|e| Error::io(&self.metrics_path, e))?;
        self.history.push(line);
        if self.every(self.opts.checkpoint_every) || self.last_round() || self.stop_reached() {
            let phase = Instant::now();
            save_checkpoint(
                self.gpu,
                &self.cfg,
                self.done,
                &self.server,
                &self.clients,
                &self.history,
                &self.checkpoint_path,
            )?;
            self.checkpoint_s += phase.elapsed().as_secs_f64();
        }
        self.last = Some(m.clone());
        Ok(())
    }

    /// What the run has produced so far.
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            rounds_done: self.done,
            wall_s: self.started.elapsed().as_secs_f64(),
            last: self.last.clone(),
            grid: self.grid_path.clone(),
            checkpoint: self.checkpoint_path.clone(),
            timing: self.timing,
            checkpoint_s: self.checkpoint_s,
        }
    }
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
    // Latents far from the grid's, so the measure does not reuse the grid's images.
    let gen = generator.generate(gpu, n, crate::generate::EVALUATION_LATENTS)?;
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
