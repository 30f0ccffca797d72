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

#[derive(Subcommand)]
enum Command {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info { gpu } => info(gpu),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
