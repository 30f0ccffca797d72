//! The `prism` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("info") => match prism::gpu::Gpu::new(Default::default()) {
            Ok(gpu) => {
                print!("{}", gpu.report());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: prism info");
            ExitCode::FAILURE
        }
    }
}
