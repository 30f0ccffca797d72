//! The command line's arguments: clap definitions of every command and flag, and how the
//! training flags and a `--config` file merge into a [`TrainConfig`].

use std::path::PathBuf;

use crate::error::Error;
use crate::fl::simulation::RunOptions;
use crate::fl::{DpConfig, FeatureSpace, LossChoice, TrainConfig};
use crate::gpu::{describe_adapter, Gpu, GpuOptions};
use crate::model::{self, Model};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "prism",
    version,
    about = "PRISM: federated learning of generative models by stochastic binary masks, on any GPU"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options that choose the GPU, shared by every subcommand.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct GpuArgs {
    /// Use the adapter whose name contains this text (default: $WGPU_ADAPTER_NAME, else the
    /// best one, a real GPU before a software one).
    #[arg(long, global = true)]
    pub(crate) adapter: Option<String>,
    /// Restrict backends: vulkan, gl, metal, dx12 (default: $WGPU_BACKEND, else all).
    #[arg(long, global = true)]
    pub(crate) backend: Option<String>,
    /// Use only the portable kernel forms (no subgroups, no f16).
    #[arg(long, global = true)]
    pub(crate) portable: bool,
}

impl GpuArgs {
    /// The --backend list, each name checked: wgpu reads an unknown name as no backend at
    /// all, which would end in "no adapter" and advice to install drivers.
    pub(crate) fn backends(&self) -> Result<Option<wgpu::Backends>, Error> {
        let Some(list) = self.backend.as_deref() else {
            return Ok(None);
        };
        let mut all = wgpu::Backends::empty();
        for name in list.split(',').map(str::trim) {
            let b = wgpu::Backends::from_comma_list(name);
            if b.is_empty() {
                return Err(Error::invalid(format!(
                    "--backend: unknown backend {name:?}; use vulkan, gl, metal or dx12 (a comma \
                     list for several)"
                )));
            }
            all |= b;
        }
        Ok(Some(all))
    }

    pub(crate) fn open(&self) -> Result<Gpu, Error> {
        let gpu = Gpu::new(GpuOptions {
            backends: self.backends()?,
            adapter_name: self.adapter.clone(),
            portable: self.portable,
            ..Default::default()
        })?;
        eprintln!("GPU: {}", describe_adapter(gpu.info()));
        Ok(gpu)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LossArg {
    /// sqrt(MMD^2), a sum of Gaussian kernels (--bandwidths), biased estimator.
    Mmd,
    /// sqrt of the unbiased MMD^2 estimate.
    MmdUnbiased,
    /// Mean-and-variance matching of an encoder's features with GFMN's moving averages (the
    /// reference code's loss; needs --encoder).
    Moments,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum FeaturesArg {
    /// Raw pixels.
    Pixels,
    /// Pixels plus a frozen random convolutional encoder regenerated from the seed.
    RandomConv,
    /// Pixels plus the first layer of that encoder (random 4x4 patch detectors).
    RandomPatches,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum EstimatorArg {
    /// The reference code's: dL/ds = dL/dw_eff * w * p^2 (1 - p).
    PScaled,
    /// Plain straight-through: dL/ds = dL/dw_eff * w * p (1 - p).
    StraightThrough,
}

#[derive(Args, Clone, Debug)]
pub(crate) struct TrainArgs {
    /// A JSON file with the configuration (the fields of config.json in a run folder; missing
    /// fields take their defaults, unknown ones are refused). Flags given as well override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// mnist, fashion-mnist, cifar10, or a folder of PNG/JPEG images (sub-folders are classes).
    #[arg(long, default_value = "mnist")]
    pub(crate) dataset: String,
    /// Folder with the dataset files (default: $PRISM_DATA, ./data, ~/.cache/prism/data).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Do not download a missing dataset; fail with instructions instead.
    #[arg(long)]
    pub(crate) no_fetch: bool,
    /// Output folder: metrics.jsonl, samples.png, samples/, checkpoint.bin, model.prism.
    #[arg(long, default_value = "runs/mnist")]
    pub(crate) out: PathBuf,
    /// Generator preset: mlp28-up, mlp28-deep, mlp28-wide, mlp28, conv28, conv28-wide (28x28) or
    /// resnet32 (the paper's, 32x32).
    #[arg(long, default_value_t = TrainConfig::default().arch)]
    pub(crate) arch: String,
    /// Number of clients.
    #[arg(long, default_value_t = TrainConfig::default().clients)]
    pub(crate) clients: usize,
    /// Communication rounds.
    #[arg(long, default_value_t = TrainConfig::default().rounds)]
    pub(crate) rounds: usize,
    /// Local steps of each client per round.
    #[arg(long, default_value_t = TrainConfig::default().local_steps)]
    pub(crate) local_steps: usize,
    /// Latents per step.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    pub(crate) batch: usize,
    /// Real images per step, the MMD's other sample (0: the same as --batch).
    #[arg(long, default_value_t = TrainConfig::default().real_batch)]
    pub(crate) real_batch: usize,
    /// Data partition: iid, shards[:N] (N label-sorted shards a client), dirichlet[:ALPHA].
    #[arg(long, default_value = "shards:4")]
    pub(crate) partition: String,
    /// Fraction of clients that train each round.
    #[arg(long, default_value_t = TrainConfig::default().fraction_fit)]
    pub(crate) fraction_fit: f64,
    /// Fewest valid uploads for a round to change the model (else the previous scores stay).
    #[arg(long, default_value_t = TrainConfig::default().min_fit_clients)]
    pub(crate) min_fit_clients: usize,
    /// PRISM without MADA: the new scores are logit of the mean smoothed mask.
    #[arg(long)]
    pub(crate) no_mada: bool,
    /// FedPM's persistent Beta prior instead of the prior reset every round.
    #[arg(long)]
    pub(crate) persistent_prior: bool,
    /// PRISM-alpha: this fraction of masked layers, from the output side, send scores.
    #[arg(long, default_value_t = TrainConfig::default().alpha)]
    pub(crate) alpha: f64,
    #[arg(long, value_enum, default_value = "mmd")]
    pub(crate) loss: LossArg,
    /// Bandwidths (standard deviations) of the pixel-space MMD's Gaussian kernels, for pixels
    /// in [0, 1] (1 to 8, comma-separated; default: GMMN's MNIST set, whose variances are 2, 5,
    /// 10, 20, 40, 80).
    // Spelled out so that help shows the comma list; a test checks it equals TrainConfig's default.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1.4142135,2.236068,3.1622777,4.472136,6.3245554,8.944272"
    )]
    pub(crate) bandwidths: Vec<f32>,
    #[arg(long, value_enum, default_value = "pixels")]
    pub(crate) features: FeaturesArg,
    /// The loss's feature encoder: lda (the frozen random conv encoder with a linear
    /// discriminant readout the clients fit first from their labelled data), pca (the same with
    /// principal directions, no labels), or a safetensors file in torchvision's VGG layout (e.g.
    /// VGG19-BN's state dict).
    #[arg(long)]
    pub(crate) encoder: Option<String>,
    /// The encoder's ReLU outputs to match, numbered from 1, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub(crate) encoder_layers: Option<Vec<usize>>,
    /// Weight of the pixel-space MMD (with --loss moments, 0 is the reference's loss alone).
    #[arg(long, default_value_t = TrainConfig::default().pixel_weight)]
    pub(crate) pixel_weight: f32,
    /// Learning rate of the moment loss's mean and variance trackers.
    #[arg(long, default_value_t = TrainConfig::default().tracker_lr)]
    pub(crate) tracker_lr: f32,
    /// Adam learning rate on the scores.
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub(crate) lr: f32,
    #[arg(long, default_value_t = TrainConfig::default().beta1)]
    pub(crate) beta1: f32,
    #[arg(long, default_value_t = TrainConfig::default().beta2)]
    pub(crate) beta2: f32,
    #[arg(long, value_enum, default_value = "p-scaled")]
    pub(crate) estimator: EstimatorArg,
    /// Seed of everything: weights, scores, data split, masks, latents.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub(crate) seed: u32,
    /// Differential privacy: noise multiplier (noise std / L2 sensitivity); enables DP.
    #[arg(long)]
    pub(crate) dp_noise: Option<f64>,
    /// Differential privacy: theta is clipped to [c, 1 - c].
    #[arg(long, default_value_t = 0.1)]
    pub(crate) dp_clip: f32,
    /// Differential privacy: the delta at which epsilon is reported.
    #[arg(long, default_value_t = 1e-5)]
    pub(crate) dp_delta: f64,
    /// Fault injection: fraction of selected clients that drop out of each round.
    #[arg(long, default_value_t = TrainConfig::default().drop_rate)]
    pub(crate) drop_rate: f64,
    /// Fault injection: the first N clients are adversaries that upload all-ones masks.
    #[arg(long, default_value_t = TrainConfig::default().adversaries)]
    pub(crate) adversaries: usize,
    /// Send masks bit-packed instead of entropy-coded.
    #[arg(long)]
    pub(crate) no_entropy_coding: bool,
    /// Robust aggregation: bound how far any one client can move the global probabilities.
    #[arg(long)]
    pub(crate) robust: bool,
    /// Write a sample grid every N rounds (and after the last).
    #[arg(long, default_value_t = RunOptions::new("").sample_every)]
    pub(crate) sample_every: usize,
    /// Measure MMD to held-out images every N rounds (and after the last).
    #[arg(long, default_value_t = RunOptions::new("").eval_every)]
    pub(crate) eval_every: usize,
    /// Save a checkpoint every N rounds (and after the last).
    #[arg(long, default_value_t = RunOptions::new("").checkpoint_every)]
    pub(crate) checkpoint_every: usize,
    /// Continue from the output folder's checkpoint (an error when it has none).
    #[arg(long, conflicts_with = "overwrite")]
    pub(crate) resume: bool,
    /// Replace the run in the output folder (without it, or --resume, a folder that holds a
    /// run is refused).
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Stop after this many rounds in this process (continue later with --resume).
    #[arg(long)]
    pub(crate) stop_after: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// The configuration field that each `prism train` flag sets (flag id, field; `dp.x` is field
/// x of the `dp` object).
const FLAG_FIELDS: &[(&str, &str)] = &[
    ("dataset", "dataset"),
    ("arch", "arch"),
    ("clients", "clients"),
    ("rounds", "rounds"),
    ("local_steps", "local_steps"),
    ("batch", "batch"),
    ("real_batch", "real_batch"),
    ("partition", "partition"),
    ("fraction_fit", "fraction_fit"),
    ("min_fit_clients", "min_fit_clients"),
    ("no_mada", "mada"),
    ("persistent_prior", "persistent_prior"),
    ("alpha", "alpha"),
    ("loss", "loss"),
    ("bandwidths", "bandwidths"),
    ("features", "features"),
    ("encoder", "encoder"),
    ("encoder_layers", "encoder_layers"),
    ("pixel_weight", "pixel_weight"),
    ("tracker_lr", "tracker_lr"),
    ("lr", "lr"),
    ("beta1", "beta1"),
    ("beta2", "beta2"),
    ("estimator", "p_scaled_estimator"),
    ("seed", "seed"),
    ("dp_noise", "dp.noise_multiplier"),
    ("dp_clip", "dp.clip"),
    ("dp_delta", "dp.delta"),
    ("drop_rate", "drop_rate"),
    ("adversaries", "adversaries"),
    ("no_entropy_coding", "entropy_coding"),
    ("robust", "robust"),
];

fn no_dp() -> Error {
    Error::invalid(
        "--dp-clip and --dp-delta set details of differential privacy, which is off: give \
         --dp-noise too (or a --config file whose dp is set)",
    )
}

/// Which `prism train` flags `m` (the train subcommand's matches) got on the command line, not
/// from their defaults: these override a --config file.
pub(crate) fn typed_flags(m: &clap::ArgMatches) -> impl Fn(&str) -> bool + '_ {
    move |id: &str| {
        m.try_get_raw(id).is_ok_and(|v| v.is_some())
            && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    }
}

impl TrainArgs {
    /// The run's configuration: the flags, or the --config file with the flags given on the
    /// command line (`given`) laid over it.
    pub(crate) fn resolve(&self, given: &dyn Fn(&str) -> bool) -> Result<TrainConfig, Error> {
        let flags = self.config();
        let dp_detail = given("dp_clip") || given("dp_delta");
        let Some(path) = &self.config else {
            if dp_detail && flags.dp.is_none() {
                return Err(no_dp());
            }
            return Ok(flags);
        };
        // A configuration is a few hundred bytes; a megabyte is not one.
        crate::limits::check_file_size(path, 1 << 20, "configuration file")?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let what = path.display().to_string();
        let mut merged: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(&what, format!("not JSON: {e}")))?;
        let flag_values =
            serde_json::to_value(&flags).map_err(|e| Error::invalid(e.to_string()))?;
        // The DP flags' own values, whether or not --dp-noise turned DP on.
        let dp_flags = serde_json::json!({
            "noise_multiplier": self.dp_noise,
            "clip": self.dp_clip,
            "delta": self.dp_delta,
        });
        let obj = merged
            .as_object_mut()
            .ok_or_else(|| Error::format(&what, "not a JSON object"))?;
        for (flag, field) in FLAG_FIELDS.iter().filter(|(flag, _)| given(flag)) {
            let Some((outer, inner)) = field.split_once('.') else {
                obj.insert(field.to_string(), flag_values[field].clone());
                continue;
            };
            // A DP flag sets its own field of the file's `dp` object; --dp-noise turns DP on
            // (with the other DP flags' values) where the file has it off.
            let dp = obj.entry(outer).or_insert(serde_json::Value::Null);
            if dp.is_null() {
                if *flag != "dp_noise" {
                    return Err(no_dp());
                }
                *dp = flag_values[outer].clone();
            }
            dp[inner] = dp_flags[inner].clone();
        }
        TrainConfig::from_json(&serde_json::to_vec(&merged).unwrap_or_default(), &what)
    }

    pub(crate) fn config(&self) -> TrainConfig {
        TrainConfig {
            dataset: self.dataset.clone(),
            arch: self.arch.clone(),
            clients: self.clients,
            rounds: self.rounds,
            local_steps: self.local_steps,
            batch: self.batch,
            real_batch: self.real_batch,
            partition: self.partition.clone(),
            fraction_fit: self.fraction_fit,
            min_fit_clients: self.min_fit_clients,
            mada: !self.no_mada,
            persistent_prior: self.persistent_prior,
            alpha: self.alpha,
            loss: match self.loss {
                LossArg::Mmd => LossChoice::Mmd,
                LossArg::MmdUnbiased => LossChoice::MmdUnbiased,
                LossArg::Moments => LossChoice::Moments,
            },
            bandwidths: self.bandwidths.clone(),
            features: match self.features {
                FeaturesArg::Pixels => FeatureSpace::Pixels,
                FeaturesArg::RandomConv => FeatureSpace::RandomConv,
                FeaturesArg::RandomPatches => FeatureSpace::RandomPatches,
            },
            encoder: self.encoder.clone(),
            encoder_layers: self.encoder_layers.clone(),
            pixel_weight: self.pixel_weight,
            tracker_lr: self.tracker_lr,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            p_scaled_estimator: matches!(self.estimator, EstimatorArg::PScaled),
            seed: self.seed,
            dp: self.dp_noise.map(|z| DpConfig {
                clip: self.dp_clip,
                noise_multiplier: z,
                delta: self.dp_delta,
            }),
            drop_rate: self.drop_rate,
            adversaries: self.adversaries,
            entropy_coding: !self.no_entropy_coding,
            robust: self.robust,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct SampleArgs {
    #[command(flatten)]
    pub(crate) source: Source,
    /// Number of images.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub(crate) count: usize,
    /// A PNG grid of the images.
    #[arg(long, default_value = "samples.png")]
    pub(crate) out: PathBuf,
    /// Also write every image as its own PNG into this folder.
    #[arg(long)]
    pub(crate) folder: Option<PathBuf>,
    /// Also write the images' float values (before rounding to pixels) as a NumPy .npy file
    /// of float32 [n, c, h, w].
    #[arg(long)]
    pub(crate) raw: Option<PathBuf>,
    /// Images per generation batch (speed only: with --norm population an image depends on
    /// its latent alone).
    #[arg(long, default_value_t = 100)]
    pub(crate) batch: usize,
    /// Index of the first image's latent: image i uses latent --latents + i, whatever
    /// --batch (different indices, different images).
    #[arg(long, default_value_t = 0)]
    pub(crate) latents: u32,
    /// Multiply in f16 (adapters with SHADER_F16; sums stay f32).
    #[arg(long)]
    pub(crate) f16: bool,
    #[command(flatten)]
    pub(crate) norm: NormArgs,
}

/// How generation normalises its BatchNorm layers.
#[derive(Args, Clone, Debug)]
pub(crate) struct NormArgs {
    /// BatchNorm statistics: `population` (stored in the model file, calibrated over 16
    /// batches of 256 generated images; an image depends on its latent alone) or `batch`
    /// (each generation batch's own, as the reference and the paper's evaluation; images
    /// then depend on the batch they are generated in).
    #[arg(long, value_enum, default_value = "population")]
    pub(crate) norm: NormArg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub(crate) enum NormArg {
    Population,
    Batch,
}

impl NormArgs {
    pub(crate) fn normalisation(&self) -> crate::nn::Normalisation {
        match self.norm {
            NormArg::Population => crate::nn::Normalisation::Population,
            NormArg::Batch => crate::nn::Normalisation::Batch,
        }
    }
}

/// Where a trained generator comes from.
#[derive(Args, Clone, Debug)]
pub(crate) struct Source {
    /// A model file written by `prism train` or `prism export`.
    #[arg(long, conflicts_with = "checkpoint")]
    pub(crate) model: Option<PathBuf>,
    /// A training checkpoint (its global scores; the mask is drawn as --mask says).
    #[arg(long)]
    pub(crate) checkpoint: Option<PathBuf>,
    /// With --checkpoint: draw one mask sample (the paper's final model, the default) or take
    /// the most likely mask (keep where p > 0.5). A model file holds its mask already.
    #[arg(long, value_enum)]
    pub(crate) mask: Option<MaskArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub(crate) enum MaskArg {
    Sample,
    Threshold,
}

impl Source {
    pub(crate) fn load(&self) -> Result<Model, Error> {
        if self.model.is_some() && self.mask.is_some() {
            return Err(Error::invalid(
                "--mask chooses how a checkpoint's mask is drawn; a model file (--model) holds \
                 its mask already",
            ));
        }
        match (&self.model, &self.checkpoint) {
            (Some(m), _) => Model::load(m),
            (None, Some(c)) => model::from_checkpoint(c, self.choice()),
            (None, None) => Err(Error::invalid("give --model FILE or --checkpoint FILE")),
        }
    }

    pub(crate) fn choice(&self) -> model::MaskKind {
        match self.mask {
            None | Some(MaskArg::Sample) => model::MaskKind::Sample,
            Some(MaskArg::Threshold) => model::MaskKind::Threshold,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Federated training (defaults: MNIST, 10 clients, non-IID shards, MADA on).
    Train {
        // Boxed: the training flags make this variant several times larger than the others.
        #[command(flatten)]
        args: Box<TrainArgs>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Generate images from a model file or a checkpoint.
    Sample {
        #[command(flatten)]
        args: SampleArgs,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Measure sample quality against held-out real images, with reference rows.
    Eval {
        #[command(flatten)]
        source: Source,
        /// Images of each set.
        #[arg(short = 'n', long, default_value_t = 1000)]
        count: usize,
        /// Folder with the dataset files.
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(flatten)]
        norm: NormArgs,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Write a model file from a checkpoint, with its BatchNorm population statistics
    /// calibrated on the GPU (and optionally the dense weights as safetensors).
    Export {
        #[command(flatten)]
        source: Source,
        /// The model file to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the materialised dense weights (f32) as safetensors, for other runtimes.
        #[arg(long)]
        safetensors: Option<PathBuf>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Download a dataset (mnist, fashion-mnist, cifar10) and check its checksums.
    Fetch { name: String },
    /// Print the adapters, and the selected adapter's backend, driver, features and limits.
    Info {
        #[command(flatten)]
        gpu: GpuArgs,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// `prism train` without flags trains `TrainConfig::default()`: the flags' defaults written
    /// as strings (enums) cannot drift from the library's.
    #[test]
    fn train_flag_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["prism", "train"]).expect("parses");
        let Command::Train { args, .. } = cli.command else {
            panic!("not the train command");
        };
        assert_eq!(args.config(), TrainConfig::default());
    }

    /// The run's configuration from a command line, as `prism train` resolves it.
    fn resolved(argv: &[String]) -> Result<TrainConfig, Error> {
        let matches = Cli::command().try_get_matches_from(argv).expect("parses");
        let cli = Cli::from_arg_matches(&matches).expect("parses");
        let Command::Train { args, .. } = cli.command else {
            panic!("not the train command");
        };
        let m = matches.subcommand_matches("train").unwrap();
        let given = typed_flags(m);
        args.resolve(&given)
    }

    /// Every flag with a value and the change it makes to a configuration (None: the flag is
    /// refused for that configuration).
    #[allow(clippy::type_complexity)]
    fn flag_cases() -> Vec<(
        &'static str,
        Vec<&'static str>,
        Box<dyn Fn(&mut TrainConfig) -> bool>,
    )> {
        fn dp(c: &mut TrainConfig) -> Option<&mut DpConfig> {
            c.dp.as_mut()
        }
        vec![
            (
                "dataset",
                vec!["--dataset", "fashion-mnist"],
                Box::new(|c| {
                    c.dataset = "fashion-mnist".into();
                    true
                }),
            ),
            (
                "arch",
                vec!["--arch", "conv28"],
                Box::new(|c| {
                    c.arch = "conv28".into();
                    true
                }),
            ),
            (
                "clients",
                vec!["--clients", "7"],
                Box::new(|c| {
                    c.clients = 7;
                    true
                }),
            ),
            (
                "rounds",
                vec!["--rounds", "3"],
                Box::new(|c| {
                    c.rounds = 3;
                    true
                }),
            ),
            (
                "local_steps",
                vec!["--local-steps", "9"],
                Box::new(|c| {
                    c.local_steps = 9;
                    true
                }),
            ),
            (
                "batch",
                vec!["--batch", "32"],
                Box::new(|c| {
                    c.batch = 32;
                    true
                }),
            ),
            (
                "real_batch",
                vec!["--real-batch", "48"],
                Box::new(|c| {
                    c.real_batch = 48;
                    true
                }),
            ),
            (
                "partition",
                vec!["--partition", "iid"],
                Box::new(|c| {
                    c.partition = "iid".into();
                    true
                }),
            ),
            (
                "fraction_fit",
                vec!["--fraction-fit", "0.5"],
                Box::new(|c| {
                    c.fraction_fit = 0.5;
                    true
                }),
            ),
            (
                "min_fit_clients",
                vec!["--min-fit-clients", "2"],
                Box::new(|c| {
                    c.min_fit_clients = 2;
                    true
                }),
            ),
            (
                "no_mada",
                vec!["--no-mada"],
                Box::new(|c| {
                    c.mada = false;
                    true
                }),
            ),
            (
                "persistent_prior",
                vec!["--persistent-prior"],
                Box::new(|c| {
                    c.persistent_prior = true;
                    true
                }),
            ),
            (
                "alpha",
                vec!["--alpha", "0.25"],
                Box::new(|c| {
                    c.alpha = 0.25;
                    true
                }),
            ),
            (
                "loss",
                vec!["--loss", "moments"],
                Box::new(|c| {
                    c.loss = LossChoice::Moments;
                    true
                }),
            ),
            (
                "bandwidths",
                vec!["--bandwidths", "1,2"],
                Box::new(|c| {
                    c.bandwidths = vec![1.0, 2.0];
                    true
                }),
            ),
            (
                "features",
                vec!["--features", "random-conv"],
                Box::new(|c| {
                    c.features = FeatureSpace::RandomConv;
                    true
                }),
            ),
            (
                "encoder",
                vec!["--encoder", "lda"],
                Box::new(|c| {
                    c.encoder = Some("lda".into());
                    true
                }),
            ),
            (
                "encoder_layers",
                vec!["--encoder-layers", "2,5"],
                Box::new(|c| {
                    c.encoder_layers = Some(vec![2, 5]);
                    true
                }),
            ),
            (
                "pixel_weight",
                vec!["--pixel-weight", "0.5"],
                Box::new(|c| {
                    c.pixel_weight = 0.5;
                    true
                }),
            ),
            (
                "tracker_lr",
                vec!["--tracker-lr", "0.001"],
                Box::new(|c| {
                    c.tracker_lr = 0.001;
                    true
                }),
            ),
            (
                "lr",
                vec!["--lr", "0.05"],
                Box::new(|c| {
                    c.lr = 0.05;
                    true
                }),
            ),
            (
                "beta1",
                vec!["--beta1", "0.8"],
                Box::new(|c| {
                    c.beta1 = 0.8;
                    true
                }),
            ),
            (
                "beta2",
                vec!["--beta2", "0.99"],
                Box::new(|c| {
                    c.beta2 = 0.99;
                    true
                }),
            ),
            (
                "estimator",
                vec!["--estimator", "straight-through"],
                Box::new(|c| {
                    c.p_scaled_estimator = false;
                    true
                }),
            ),
            (
                "seed",
                vec!["--seed", "99"],
                Box::new(|c| {
                    c.seed = 99;
                    true
                }),
            ),
            (
                "dp_noise",
                vec!["--dp-noise", "0.7"],
                Box::new(|c| {
                    match dp(c) {
                        Some(d) => d.noise_multiplier = 0.7,
                        // DP turned on: the other DP fields take their flags' defaults.
                        None => {
                            c.dp = Some(DpConfig {
                                clip: 0.1,
                                noise_multiplier: 0.7,
                                delta: 1e-5,
                            })
                        }
                    }
                    true
                }),
            ),
            (
                "dp_clip",
                vec!["--dp-clip", "0.2"],
                Box::new(|c| dp(c).map(|d| d.clip = 0.2).is_some()),
            ),
            (
                "dp_delta",
                vec!["--dp-delta", "0.001"],
                Box::new(|c| dp(c).map(|d| d.delta = 0.001).is_some()),
            ),
            (
                "drop_rate",
                vec!["--drop-rate", "0.3"],
                Box::new(|c| {
                    c.drop_rate = 0.3;
                    true
                }),
            ),
            (
                "adversaries",
                vec!["--adversaries", "2"],
                Box::new(|c| {
                    c.adversaries = 2;
                    true
                }),
            ),
            (
                "no_entropy_coding",
                vec!["--no-entropy-coding"],
                Box::new(|c| {
                    c.entropy_coding = false;
                    true
                }),
            ),
            (
                "robust",
                vec!["--robust"],
                Box::new(|c| {
                    c.robust = true;
                    true
                }),
            ),
        ]
    }

    /// A random configuration file's contents: every field drawn away from its default (DP
    /// on or off).
    fn random_file(rng: &mut crate::rng::HostRng) -> TrainConfig {
        let mut u = |n: u32| (rng.next_u32() % n) as usize;
        TrainConfig {
            dataset: ["mnist", "cifar10"][u(2)].into(),
            arch: ["mlp28", "resnet32"][u(2)].into(),
            clients: 2 + u(20),
            rounds: 1 + u(30),
            local_steps: 1 + u(100),
            batch: 8 << u(4),
            real_batch: 16 << u(3),
            partition: ["shards:2", "dirichlet:0.5"][u(2)].into(),
            fraction_fit: 0.25 + 0.25 * u(3) as f64,
            min_fit_clients: 1 + u(3),
            mada: u(2) == 0,
            persistent_prior: u(2) == 0,
            alpha: 0.1 * u(5) as f64,
            loss: [LossChoice::Mmd, LossChoice::MmdUnbiased][u(2)],
            bandwidths: vec![1.0 + u(4) as f32, 10.0],
            features: [FeatureSpace::Pixels, FeatureSpace::RandomPatches][u(2)],
            encoder: [None, Some("pca".to_string())][u(2)].clone(),
            encoder_layers: [None, Some(vec![1 + u(3)])][u(2)].clone(),
            pixel_weight: 0.1 * u(10) as f32,
            tracker_lr: 1e-4 * (1 + u(9)) as f32,
            lr: 0.1 * (1 + u(9)) as f32,
            beta1: 0.5 + 0.1 * u(4) as f32,
            beta2: 0.9 + 0.01 * u(9) as f32,
            p_scaled_estimator: u(2) == 0,
            seed: 1000 + u(1000) as u32,
            dp: (u(2) == 0).then(|| DpConfig {
                clip: 0.05 + 0.05 * u(4) as f32,
                noise_multiplier: 0.5 + u(10) as f64,
                delta: 1e-6 * (1 + u(9)) as f64,
            }),
            drop_rate: 0.1 * u(5) as f64,
            adversaries: u(3),
            entropy_coding: u(2) == 0,
            robust: u(2) == 0,
        }
    }

    /// A flag overrides exactly its own field of a --config file, and the file sets the rest;
    /// DP's detail flags are refused while DP is off. Every flag, against many random files.
    #[test]
    fn a_flag_changes_exactly_its_own_field_of_a_config_file() {
        let cases = flag_cases();
        // Every flag that sets a configuration field has its case.
        let covered: Vec<&str> = cases.iter().map(|c| c.0).collect();
        for (flag, _) in FLAG_FIELDS {
            assert!(covered.contains(flag), "no case for --{flag}");
        }
        let dir = std::env::temp_dir().join(format!("prism-config-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        let mut rng = crate::rng::HostRng::new(17, &[]);
        let valid = |c: &TrainConfig| c.validate().is_ok();
        let mut round = 0;
        while round < 40 {
            let file = random_file(&mut rng);
            if !valid(&file) {
                continue; // a file prism would refuse on its own
            }
            round += 1;
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            for (flag, args, change) in &cases {
                let mut argv = vec!["prism".to_string(), "train".into(), "--config".into()];
                argv.push(path.display().to_string());
                argv.extend(args.iter().map(|s| s.to_string()));
                let mut want = file.clone();
                let allowed = change(&mut want);
                match resolved(&argv) {
                    Ok(got) => {
                        assert!(allowed, "--{flag} was accepted with DP off (file {round})");
                        assert_eq!(got, want, "--{flag} over file {round}");
                    }
                    // Refused: a DP detail flag with DP off, or a change that makes the
                    // configuration invalid (such as an lda encoder under DP).
                    Err(e) if allowed => {
                        assert!(!valid(&want), "--{flag} over file {round}: {e}");
                    }
                    Err(e) => assert!(e.to_string().contains("--dp-noise"), "{e}"),
                }
            }
        }
        // Without a file, the detail flags alone are refused too; with --dp-noise they apply.
        let plain = |rest: &[&str]| {
            let mut argv = vec!["prism".to_string(), "train".into()];
            argv.extend(rest.iter().map(|s| s.to_string()));
            resolved(&argv)
        };
        assert!(plain(&["--dp-clip", "0.2"]).is_err());
        let on = plain(&["--dp-noise", "1.5", "--dp-clip", "0.2"]).unwrap();
        assert_eq!(
            on.dp,
            Some(DpConfig {
                clip: 0.2,
                noise_multiplier: 1.5,
                delta: 1e-5
            })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mask_choice_goes_with_a_checkpoint_only() {
        let load = |rest: &[&str]| {
            let mut argv = vec!["prism", "sample"];
            argv.extend(rest);
            let Command::Sample { args, .. } = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not the sample command");
            };
            args.source.load().map(|_| ()).unwrap_err().to_string()
        };
        // Refused before any file is read; the files here do not exist.
        let e = load(&["--model", "/nonexistent/m.prism", "--mask", "threshold"]);
        assert!(e.contains("--mask"), "{e}");
        let e = load(&["--checkpoint", "/nonexistent/c.bin", "--mask", "threshold"]);
        assert!(
            !e.contains("--mask") && e.contains("/nonexistent/c.bin"),
            "{e}"
        );
        let e = load(&["--model", "/nonexistent/m.prism"]);
        assert!(
            !e.contains("--mask") && e.contains("/nonexistent/m.prism"),
            "{e}"
        );
    }

    #[test]
    fn bandwidths_are_a_comma_list_checked_before_training() {
        let parse = |list: &str| {
            let flag = format!("--bandwidths={list}");
            let cli = Cli::try_parse_from(["prism", "train", flag.as_str()]).expect("parses");
            let Command::Train { args, .. } = cli.command else {
                panic!("not the train command");
            };
            args.config()
        };
        let cfg = parse("1,2.5,8");
        assert_eq!(cfg.bandwidths, vec![1.0, 2.5, 8.0]);
        assert!(cfg.validate().is_ok());
        for bad in ["0,2", "-1", "1,2,3,4,5,6,7,8,9", "inf"] {
            let err = parse(bad).validate().expect_err(bad).to_string();
            assert!(err.contains("bandwidths"), "{bad}: {err}");
        }
        assert!(Cli::try_parse_from(["prism", "train", "--bandwidths", "2,x"]).is_err());
    }
}
