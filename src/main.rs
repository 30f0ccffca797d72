//! The `prism` command line: parses arguments, calls the library, reports.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use prism::gpu::{describe_adapter, list_adapters, Gpu, GpuOptions};

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
    /// Use the adapter whose name contains this text (default: $WGPU_ADAPTER_NAME, else the best
    /// one, a real GPU before a software one).
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Restrict backends, e.g. "vulkan", "gl", "metal", "dx12" (default: $WGPU_BACKEND or all).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Use only the portable kernel forms (no subgroups, no f16).
    #[arg(long, global = true)]
    portable: bool,
}

impl GpuArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            backends: self.backend.as_deref().map(wgpu::Backends::from_comma_list),
            adapter_name: self.adapter.clone(),
            portable: self.portable,
            limits: None,
        }
    }
}

#[derive(Args, Clone, Debug)]
struct TrainArgs {
    /// Dataset: mnist, fashion-mnist, cifar10, or a folder of PNG/JPEG images.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Where the dataset files are (default: $PRISM_DATA, ./data, ~/.cache/prism/data).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Output folder: metrics.jsonl, samples.png, checkpoint.bin, model.prism.
    #[arg(long, default_value = "runs/mnist")]
    out: std::path::PathBuf,
    #[arg(long, default_value = "conv28")]
    arch: String,
    #[arg(long, default_value_t = 10)]
    clients: usize,
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    #[arg(long, default_value_t = 10)]
    local_steps: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value = "shards:4")]
    partition: String,
    #[arg(long, default_value_t = 1)]
    seed: u32,
    /// Continue from the output folder's checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 10)]
    sample_every: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Federated training (defaults: MNIST, 10 clients, non-IID shards, MADA).
    Train {
        #[command(flatten)]
        args: TrainArgs,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Print the adapter, backend, driver, features and limits.
    Info {
        #[command(flatten)]
        gpu: GpuArgs,
    },
}

fn info(gpu_args: &GpuArgs) -> Result<(), prism::Error> {
    println!("adapters wgpu can see:");
    let all = list_adapters(gpu_args.options().backends);
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
    let gpu = Gpu::new(gpu_args.options())?;
    println!("selected:");
    print!("{}", gpu.report());
    Ok(())
}

fn train(a: &TrainArgs, gpu_args: &GpuArgs) -> Result<(), prism::Error> {
    let cfg = prism::fl::TrainConfig {
        dataset: a.dataset.clone(),
        arch: a.arch.clone(),
        clients: a.clients,
        rounds: a.rounds,
        local_steps: a.local_steps,
        batch: a.batch,
        partition: a.partition.clone(),
        seed: a.seed,
        ..Default::default()
    };
    let gpu = Gpu::new(gpu_args.options())?;
    eprintln!("{}", describe_adapter(gpu.info()));
    let mut opts = prism::fl::simulation::RunOptions::new(&a.out);
    opts.data = a.data.clone();
    opts.fetch = true;
    opts.resume = a.resume;
    opts.progress = true;
    opts.sample_every = a.sample_every;
    opts.eval_every = a.sample_every;
    let s = prism::fl::simulation::run(&gpu, &cfg, &opts)?;
    eprintln!(
        "{} rounds in {:.1} s; samples in {}",
        s.rounds_done,
        s.wall_s,
        s.grid.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info { gpu } => info(gpu),
        Command::Train { args, gpu } => train(args, gpu),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
