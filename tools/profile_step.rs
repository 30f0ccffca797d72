//! Times every kernel of one training step of a preset on the default adapter:
//! `cargo run --release --example profile_step -- [ARCH] [BATCH] [REAL_BATCH] [FEATURES]
//! [LOSS]` with FEATURES one of pixels, random-conv, random-patches, or an encoder (`lda`,
//! `pca` or a file, as `prism train --encoder`), and LOSS mmd or moments (needs MNIST, see
//! README).

use prism::data::locate::Split;
use prism::data::resolve::load_dataset;
use prism::fl::{FeatureSpace, LossChoice, TrainConfig, Trainer};

fn main() -> Result<(), prism::Error> {
    let args: Vec<String> = std::env::args().collect();
    let defaults = TrainConfig::default();
    let arch = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| defaults.arch.clone());
    let batch: usize = args
        .get(2)
        .and_then(|b| b.parse().ok())
        .unwrap_or(defaults.batch);
    let real_batch: usize = args
        .get(3)
        .and_then(|b| b.parse().ok())
        .unwrap_or(defaults.real_batch);
    let gpu = prism::gpu::Gpu::new(Default::default())?;
    let (features, encoder) = match args.get(4).map(String::as_str) {
        None | Some("pixels") => (FeatureSpace::Pixels, None),
        Some("random-conv") => (FeatureSpace::RandomConv, None),
        Some("random-patches") => (FeatureSpace::RandomPatches, None),
        Some(encoder) => (FeatureSpace::Pixels, Some(encoder.to_string())),
    };
    let loss = match args.get(5).map(String::as_str) {
        None | Some("mmd") => LossChoice::Mmd,
        Some("moments") => LossChoice::Moments,
        Some(other) => {
            return Err(prism::Error::invalid(format!(
                "unknown loss {other:?}: mmd or moments"
            )))
        }
    };
    let cfg = TrainConfig {
        features,
        encoder,
        loss,
        arch: arch.clone(),
        batch,
        real_batch,
        clients: 1,
        local_steps: 1,
        ..defaults
    };
    let (ds, a) = load_dataset("mnist", None, false, Split::Train, &arch, 1)?;
    let ds = ds.take(1000);
    let trainer = Trainer::new(&gpu, &cfg, &a, &ds, &[(0..1000).collect()])?;
    let ks = trainer.step_kernels(0);
    gpu.run(&ks)?; // compile everything first
                   // Each row names its place in the step (#dispatch), so that a layer's kernels can be told
                   // apart from another layer's with the same shader.
    let mut rows: Vec<(String, f64)> = Vec::new();
    for (i, k) in ks.iter().enumerate() {
        let t = gpu.time_kernels(&[k], 5)?.as_secs_f64() / 5.0;
        rows.push((format!("#{i:<3} {}", k.label()), t * 1e3));
    }
    let total: f64 = rows.iter().map(|r| r.1).sum();
    let whole = gpu.time_kernels(&ks, 5)?.as_secs_f64() / 5.0 * 1e3;
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (l, t) in rows.iter().take(25) {
        println!("{t:8.3} ms  {l}");
    }
    println!(
        "sum of kernels {total:.1} ms; whole step {whole:.1} ms ({} kernels)",
        ks.len()
    );
    Ok(())
}
