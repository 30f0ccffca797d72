//! The `prism` command line: parses arguments, calls the library, reports.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use prism::data::locate::{self, Named};
use prism::fl::simulation::{self, RunOptions};
use prism::fl::{DpConfig, FeatureSpace, LossChoice, TrainConfig};
use prism::gpu::{describe_adapter, list_adapters, Gpu, GpuOptions};
use prism::model::{self, Model};
use prism::Error;

#[derive(Parser)]
#[command(
    name = "prism",
    version,
    about = "PRISM: federated learning of generative models by stochastic binary masks, on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options that choose the GPU, shared by every subcommand.
#[derive(Args, Clone, Debug, Default)]
struct GpuArgs {
    /// Use the adapter whose name contains this text (default: $WGPU_ADAPTER_NAME, else the
    /// best one, a real GPU before a software one).
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Restrict backends: vulkan, gl, metal, dx12 (default: $WGPU_BACKEND, else all).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Use only the portable kernel forms (no subgroups, no f16).
    #[arg(long, global = true)]
    portable: bool,
}

impl GpuArgs {
    fn open(&self) -> Result<Gpu, Error> {
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
enum LossArg {
    /// sqrt(MMD^2), a sum of Gaussian kernels (--bandwidths), biased estimator.
    Mmd,
    /// sqrt of the unbiased MMD^2 estimate.
    MmdUnbiased,
    /// Mean-and-variance matching of an encoder's features with GFMN's moving averages (the
    /// reference code's loss; needs --encoder).
    Moments,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FeaturesArg {
    /// Raw pixels.
    Pixels,
    /// Pixels plus a frozen random convolutional encoder regenerated from the seed.
    RandomConv,
    /// Pixels plus the first layer of that encoder (random 4x4 patch detectors).
    RandomPatches,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EstimatorArg {
    /// The reference code's: dL/ds = dL/dw_eff * w * p^2 (1 - p).
    PScaled,
    /// Plain straight-through: dL/ds = dL/dw_eff * w * p (1 - p).
    StraightThrough,
}

#[derive(Args, Clone, Debug)]
struct TrainArgs {
    /// A JSON file with the configuration (the fields of config.json in a run folder; missing
    /// fields take their defaults, unknown ones are refused). Flags given as well override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// mnist, fashion-mnist, cifar10, or a folder of PNG/JPEG images (sub-folders are classes).
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Folder with the dataset files (default: $PRISM_DATA, ./data, ~/.cache/prism/data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Do not download a missing dataset; fail with instructions instead.
    #[arg(long)]
    no_fetch: bool,
    /// Output folder: metrics.jsonl, samples.png, samples/, checkpoint.bin, model.prism.
    #[arg(long, default_value = "runs/mnist")]
    out: PathBuf,
    /// Generator preset: mlp28-up, mlp28-deep, mlp28-wide, mlp28, conv28, conv28-wide (28x28) or
    /// resnet32 (the paper's, 32x32).
    #[arg(long, default_value_t = TrainConfig::default().arch)]
    arch: String,
    /// Number of clients.
    #[arg(long, default_value_t = TrainConfig::default().clients)]
    clients: usize,
    /// Communication rounds.
    #[arg(long, default_value_t = TrainConfig::default().rounds)]
    rounds: usize,
    /// Local steps of each client per round.
    #[arg(long, default_value_t = TrainConfig::default().local_steps)]
    local_steps: usize,
    /// Latents per step.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    batch: usize,
    /// Real images per step, the MMD's other sample (0: the same as --batch).
    #[arg(long, default_value_t = TrainConfig::default().real_batch)]
    real_batch: usize,
    /// Data partition: iid, shards[:N] (N label-sorted shards a client), dirichlet[:ALPHA].
    #[arg(long, default_value = "shards:4")]
    partition: String,
    /// Fraction of clients that train each round.
    #[arg(long, default_value_t = TrainConfig::default().fraction_fit)]
    fraction_fit: f64,
    /// Fewest valid uploads for a round to change the model (else the previous scores stay).
    #[arg(long, default_value_t = TrainConfig::default().min_fit_clients)]
    min_fit_clients: usize,
    /// PRISM without MADA: the new scores are logit of the mean smoothed mask.
    #[arg(long)]
    no_mada: bool,
    /// FedPM's persistent Beta prior instead of the prior reset every round.
    #[arg(long)]
    persistent_prior: bool,
    /// PRISM-alpha: this fraction of masked layers, from the output side, send scores.
    #[arg(long, default_value_t = TrainConfig::default().alpha)]
    alpha: f64,
    #[arg(long, value_enum, default_value = "mmd")]
    loss: LossArg,
    /// Bandwidths (standard deviations) of the pixel-space MMD's Gaussian kernels, for pixels
    /// in [0, 1] (1 to 8, comma-separated; default: GMMN's MNIST set, whose variances are 2, 5,
    /// 10, 20, 40, 80).
    // Spelled out so that help shows the comma list; a test checks it equals TrainConfig's default.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1.4142135,2.236068,3.1622777,4.472136,6.3245554,8.944272"
    )]
    bandwidths: Vec<f32>,
    #[arg(long, value_enum, default_value = "pixels")]
    features: FeaturesArg,
    /// The loss's feature encoder: lda (the frozen random conv encoder with a linear
    /// discriminant readout the clients fit first from their labelled data), pca (the same with
    /// principal directions, no labels), or a safetensors file in torchvision's VGG layout (e.g.
    /// VGG19-BN's state dict).
    #[arg(long)]
    encoder: Option<String>,
    /// The encoder's ReLU outputs to match, numbered from 1, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    encoder_layers: Option<Vec<usize>>,
    /// Weight of the pixel-space MMD (with --loss moments, 0 is the reference's loss alone).
    #[arg(long, default_value_t = TrainConfig::default().pixel_weight)]
    pixel_weight: f32,
    /// Learning rate of the moment loss's mean and variance trackers.
    #[arg(long, default_value_t = TrainConfig::default().tracker_lr)]
    tracker_lr: f32,
    /// Adam learning rate on the scores.
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f32,
    #[arg(long, default_value_t = TrainConfig::default().beta1)]
    beta1: f32,
    #[arg(long, default_value_t = TrainConfig::default().beta2)]
    beta2: f32,
    #[arg(long, value_enum, default_value = "p-scaled")]
    estimator: EstimatorArg,
    /// Seed of everything: weights, scores, data split, masks, latents.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u32,
    /// Differential privacy: noise multiplier (noise std / L2 sensitivity); enables DP.
    #[arg(long)]
    dp_noise: Option<f64>,
    /// Differential privacy: theta is clipped to [c, 1 - c].
    #[arg(long, default_value_t = 0.1)]
    dp_clip: f32,
    /// Differential privacy: the delta at which epsilon is reported.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Fault injection: fraction of selected clients that drop out of each round.
    #[arg(long, default_value_t = TrainConfig::default().drop_rate)]
    drop_rate: f64,
    /// Fault injection: the first N clients are adversaries that upload all-ones masks.
    #[arg(long, default_value_t = TrainConfig::default().adversaries)]
    adversaries: usize,
    /// Send masks bit-packed instead of entropy-coded.
    #[arg(long)]
    no_entropy_coding: bool,
    /// Robust aggregation: bound how far any one client can move the global probabilities.
    #[arg(long)]
    robust: bool,
    /// Write a sample grid every N rounds (and after the last).
    #[arg(long, default_value_t = RunOptions::new("").sample_every)]
    sample_every: usize,
    /// Measure MMD to held-out images every N rounds (and after the last).
    #[arg(long, default_value_t = RunOptions::new("").eval_every)]
    eval_every: usize,
    /// Save a checkpoint every N rounds (and after the last).
    #[arg(long, default_value_t = RunOptions::new("").checkpoint_every)]
    checkpoint_every: usize,
    /// Continue from the output folder's checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many rounds in this process (continue later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
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
    fn resolve(&self, given: &dyn Fn(&str) -> bool) -> Result<TrainConfig, Error> {
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

    fn config(&self) -> TrainConfig {
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
struct SampleArgs {
    #[command(flatten)]
    source: Source,
    /// Number of images.
    #[arg(short = 'n', long, default_value_t = 100)]
    count: usize,
    /// A PNG grid of the images.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write every image as its own PNG into this folder.
    #[arg(long)]
    folder: Option<PathBuf>,
    /// Images per generation batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Latent stream offset (different offsets, different images).
    #[arg(long, default_value_t = 0)]
    latents: u32,
    /// Multiply in f16 (adapters with SHADER_F16; sums stay f32).
    #[arg(long)]
    f16: bool,
}

/// Where a trained generator comes from.
#[derive(Args, Clone, Debug)]
struct Source {
    /// A model file written by `prism train` or `prism export`.
    #[arg(long, conflicts_with = "checkpoint")]
    model: Option<PathBuf>,
    /// A training checkpoint (its global scores; the mask is drawn as --mask says).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// From a checkpoint: draw one mask sample (the paper's final model) or take the most
    /// likely mask (keep where p > 0.5).
    #[arg(long, value_enum, default_value = "sample")]
    mask: MaskArg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum MaskArg {
    Sample,
    Threshold,
}

impl Source {
    fn load(&self) -> Result<Model, Error> {
        match (&self.model, &self.checkpoint) {
            (Some(m), _) => Model::load(m),
            (None, Some(c)) => model::from_checkpoint(c, self.choice()),
            (None, None) => Err(Error::invalid("give --model FILE or --checkpoint FILE")),
        }
    }

    fn choice(&self) -> model::MaskKind {
        match self.mask {
            MaskArg::Sample => model::MaskKind::Sample,
            MaskArg::Threshold => model::MaskKind::Threshold,
        }
    }
}

#[derive(Subcommand)]
enum Command {
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
        gpu: GpuArgs,
    },
    /// Write a model file from a checkpoint (and optionally the dense weights as safetensors).
    Export {
        #[command(flatten)]
        source: Source,
        /// The model file to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the materialised dense weights (f32) as safetensors, for other runtimes.
        #[arg(long)]
        safetensors: Option<PathBuf>,
    },
    /// Download a dataset (mnist, fashion-mnist, cifar10) and check its checksums.
    Fetch { name: String },
    /// Print the adapters, and the selected adapter's backend, driver, features and limits.
    Info {
        #[command(flatten)]
        gpu: GpuArgs,
    },
}

fn info(gpu_args: &GpuArgs) -> Result<(), Error> {
    println!("adapters wgpu can see:");
    let all = list_adapters(
        gpu_args
            .backend
            .as_deref()
            .map(wgpu::Backends::from_comma_list),
    );
    if all.is_empty() {
        println!("  (none)");
    }
    for (info, compute) in all {
        let note = if compute {
            ""
        } else {
            "  [no compute shaders]"
        };
        println!("  {}{note}", describe_adapter(&info));
    }
    println!();
    let gpu = gpu_args.open()?;
    println!("selected:");
    print!("{}", gpu.report());
    Ok(())
}

fn train(a: &TrainArgs, gpu_args: &GpuArgs, given: &dyn Fn(&str) -> bool) -> Result<(), Error> {
    let cfg = a.resolve(given)?;
    cfg.validate()?;
    let gpu = gpu_args.open()?;
    let mut opts = RunOptions::new(&a.out);
    opts.data = a.data.clone();
    opts.fetch = !a.no_fetch;
    opts.resume = a.resume;
    opts.progress = !a.quiet;
    opts.sample_every = a.sample_every;
    opts.eval_every = a.eval_every;
    opts.checkpoint_every = a.checkpoint_every;
    opts.stop_after = a.stop_after;
    let s = simulation::run(&gpu, &cfg, &opts)?;
    if s.rounds_done == cfg.rounds {
        let path = a.out.join("model.prism");
        let m = model::from_checkpoint(&s.checkpoint, model::MaskKind::Sample)?;
        m.save(&path)?;
        eprintln!(
            "model: {} ({} bytes)",
            path.display(),
            std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        );
    }
    eprintln!(
        "{} of {} rounds in {:.1} s; samples: {}; checkpoint: {}",
        s.rounds_done,
        cfg.rounds,
        s.wall_s,
        s.grid.display(),
        s.checkpoint.display()
    );
    if let Some(m) = &s.last {
        eprintln!(
            "last round: loss {:.4}, held-out MMD^2 {}, {:.3} bits per weight uploaded",
            m.loss_last,
            m.mmd_heldout.map_or("-".into(), |v| format!("{v:.4}")),
            m.bits_per_weight
        );
    }
    let t = &s.timing;
    eprintln!(
        "time: local steps {:.1} s ({:.1} ms a step: record {:.1} s, device {:.1} s, readback \
         {:.1} s), uploads {:.1} s, aggregation {:.1} s, evaluation {:.1} s, grids {:.1} s, \
         checkpoints {:.1} s",
        t.local_record_s + t.local_device_s + t.local_readback_s,
        t.ms_per_local_step(),
        t.local_record_s,
        t.local_device_s,
        t.local_readback_s,
        t.upload_s,
        t.aggregate_s,
        t.eval_s,
        t.grid_s,
        s.checkpoint_s
    );
    Ok(())
}

fn sample(a: &SampleArgs, gpu_args: &GpuArgs) -> Result<(), Error> {
    let (count, out) = (a.count, &a.out);
    if count == 0 {
        return Err(Error::invalid("--count must be positive"));
    }
    let m = a.source.load()?;
    let gpu = gpu_args.open()?;
    let batch = a.batch.clamp(1, count);
    let g = if a.f16 {
        m.generator_f16(&gpu, batch)?
    } else {
        m.generator(&gpu, batch)?
    };
    let t = std::time::Instant::now();
    let imgs = g.generate(&gpu, count, a.latents)?;
    let dt = t.elapsed().as_secs_f64();
    let s = g.image;
    let cols = (count as f64).sqrt().ceil() as usize;
    let batch = prism::io::grid::Images {
        values: &imgs,
        count,
        shape: s,
    };
    prism::io::grid::write_grid(out, &batch, cols)?;
    if let Some(dir) = &a.folder {
        prism::io::grid::write_images(dir, &batch)?;
    }
    eprintln!(
        "{count} images in {dt:.2} s ({:.1} images/s); grid: {}",
        count as f64 / dt,
        out.display()
    );
    Ok(())
}

fn eval(
    source: &Source,
    count: usize,
    data: Option<&PathBuf>,
    gpu_args: &GpuArgs,
) -> Result<(), Error> {
    let m = source.load()?;
    let gpu = gpu_args.open()?;
    let report = m.evaluate(&gpu, count, data.map(|p| p.as_path()))?;
    print!("{report}");
    Ok(())
}

fn export(
    source: &Source,
    out: Option<&std::path::Path>,
    st: Option<&std::path::Path>,
) -> Result<(), Error> {
    if out.is_none() && st.is_none() {
        return Err(Error::invalid(
            "give --out FILE.prism and/or --safetensors FILE",
        ));
    }
    let m = source.load()?;
    let f32_bytes = 4 * m.weights();
    if let Some(path) = out {
        m.save(path)?;
        let size = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        eprintln!(
            "{}: {size} bytes for {} weights ({:.3} bits per weight; f32 weights would take {f32_bytes} bytes, {:.1} times more)",
            path.display(),
            m.weights(),
            8.0 * size as f64 / m.weights() as f64,
            f32_bytes as f64 / size as f64
        );
    }
    if let Some(path) = st {
        m.export_safetensors(path)?;
        eprintln!("{}: dense f32 weights", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // Which flags the user typed (not defaulted): they override a --config file.
    let given = |id: &str| {
        matches.subcommand_matches("train").is_some_and(|m| {
            m.try_get_raw(id).is_ok_and(|v| v.is_some())
                && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        })
    };
    let result = match &cli.command {
        Command::Info { gpu } => info(gpu),
        Command::Train { args, gpu } => train(args, gpu, &given),
        Command::Sample { args, gpu } => sample(args, gpu),
        Command::Eval {
            source,
            count,
            data,
            gpu,
        } => eval(source, *count, data.as_ref(), gpu),
        Command::Export {
            source,
            out,
            safetensors,
        } => export(source, out.as_deref(), safetensors.as_deref()),
        Command::Fetch { name } => match Named::parse(name) {
            Some(n) => {
                locate::fetch_into(n).map(|d| eprintln!("{} ready in {}", n.name(), d.display()))
            }
            None => Err(Error::invalid(format!(
                "unknown dataset {name:?}: mnist, fashion-mnist or cifar10"
            ))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
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
