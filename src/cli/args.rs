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
    pub(crate) fn open(&self) -> Result<Gpu, Error> {
        let gpu = Gpu::new(GpuOptions {
            backends: self.backend.as_deref().map(wgpu::Backends::from_comma_list),
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
    /// Continue from the output folder's checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Stop after this many rounds in this process (continue later with --resume).
    #[arg(long)]
    pub(crate) stop_after: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// The configuration fields that a `prism train` flag sets (flag id, field).
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
    ("dp_noise", "dp"),
    ("dp_clip", "dp"),
    ("dp_delta", "dp"),
    ("drop_rate", "drop_rate"),
    ("adversaries", "adversaries"),
    ("no_entropy_coding", "entropy_coding"),
    ("robust", "robust"),
];

impl TrainArgs {
    /// The run's configuration: the flags, or the --config file with the flags given on the
    /// command line (`given`) laid over it.
    pub(crate) fn resolve(&self, given: &dyn Fn(&str) -> bool) -> Result<TrainConfig, Error> {
        let flags = self.config();
        let Some(path) = &self.config else {
            return Ok(flags);
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let what = path.display().to_string();
        let mut merged: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(&what, format!("not JSON: {e}")))?;
        let flag_values =
            serde_json::to_value(&flags).map_err(|e| Error::invalid(e.to_string()))?;
        if let Some(obj) = merged.as_object_mut() {
            for (flag, field) in FLAG_FIELDS {
                if given(flag) {
                    obj.insert(field.to_string(), flag_values[field].clone());
                }
            }
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
    /// From a checkpoint: draw one mask sample (the paper's final model) or take the most
    /// likely mask (keep where p > 0.5).
    #[arg(long, value_enum, default_value = "sample")]
    pub(crate) mask: MaskArg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub(crate) enum MaskArg {
    Sample,
    Threshold,
}

impl Source {
    pub(crate) fn load(&self) -> Result<Model, Error> {
        match (&self.model, &self.checkpoint) {
            (Some(m), _) => Model::load(m),
            (None, Some(c)) => model::from_checkpoint(c, self.choice()),
            (None, None) => Err(Error::invalid("give --model FILE or --checkpoint FILE")),
        }
    }

    pub(crate) fn choice(&self) -> model::MaskKind {
        match self.mask {
            MaskArg::Sample => model::MaskKind::Sample,
            MaskArg::Threshold => model::MaskKind::Threshold,
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
