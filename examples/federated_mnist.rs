//! Federated PRISM on MNIST through the library: ten non-IID clients, MADA on, a few rounds,
//! then the final 1-bit model file.
//!
//! `cargo run --release --example federated_mnist` (finds MNIST as README says, or fetches it).

use prism::{from_checkpoint, run, Gpu, MaskKind, RunOptions, TrainConfig};

fn main() -> Result<(), prism::Error> {
    let gpu = Gpu::new(Default::default())?; // a real GPU first, lavapipe where there is none
    let config = TrainConfig {
        rounds: 5, // the rest are the defaults: MNIST, 10 clients, 4 label shards each, MADA
        ..Default::default()
    };
    let mut options = RunOptions::new("runs/example");
    options.fetch = true;
    options.progress = true;
    let summary = run(&gpu, &config, &options)?;

    let model = from_checkpoint(&summary.checkpoint, MaskKind::Sample)?;
    model.save(&options.out.join("model.prism"))?;
    println!(
        "{} rounds in {:.0} s; samples in {}; model of {} weights in runs/example/model.prism",
        summary.rounds_done,
        summary.wall_s,
        summary.grid.display(),
        model.weights()
    );
    Ok(())
}
