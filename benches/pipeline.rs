//! Whole-pipeline benchmarks: generation from a model file (packed masks read in the kernels,
//! optionally f16 arithmetic) against the same network with dense f32 weights in memory; one
//! training step; one federated round. Each is checked before it is timed.
//!
//! Generation reports images/s (criterion's elements/s), latency at batch 1 and peak GPU
//! memory (the buffer pool's high-water mark of the generator alone).
//! `PRISM_BENCH_QUICK=1` runs small sizes only (the smoke test of .ci/run). Training benches
//! need MNIST (`$PRISM_DATA`, or ../shared/data). `PRISM_BENCH_PRESETS=a,b` keeps only those
//! presets: criterion's name filter skips timing but not each preset's set-up and check.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prism::data::locate::Split;
use prism::data::resolve::load_dataset;
use prism::fl::{TrainConfig, Trainer};
use prism::generate::Generator;
use prism::gpu::Gpu;
use prism::model::Model;
use prism::nn::{Architecture, WeightMode};
use prism::rng::HostRng;
use support::quick;

/// `list`, less the presets `PRISM_BENCH_PRESETS` (comma-separated) leaves out.
fn presets(list: &[&'static str]) -> Vec<&'static str> {
    match std::env::var("PRISM_BENCH_PRESETS") {
        Ok(keep) => {
            let keep: Vec<&str> = keep.split(',').map(str::trim).collect();
            list.iter().copied().filter(|p| keep.contains(p)).collect()
        }
        Err(_) => list.to_vec(),
    }
}

fn open_gpu() -> Gpu {
    Gpu::new(Default::default()).unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"))
}

fn data_dir() -> PathBuf {
    std::env::var_os("PRISM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// A model of `preset` with random masks and population statistics (calibrated at batch 16,
/// enough for timing and for the non-constant-image check).
fn model(preset: &str) -> Model {
    let gpu = open_gpu();
    let mut m = common::random_model(Architecture::preset(preset, 1).unwrap(), 1);
    let g = Generator::new(&gpu, &m.arch, m.seed, 16, WeightMode::Packed).unwrap();
    g.set_masks(&gpu, &m.masks).unwrap();
    m.population = Some(g.calibrate(&gpu).unwrap());
    m
}

/// A fresh adapter per variant, so that the pool's high-water mark is the variant's own.
fn build(m: &Model, variant: &str, batch: usize) -> (Gpu, Generator) {
    let gpu = open_gpu();
    let g = match variant {
        "packed mask" => m.generator(&gpu, batch).unwrap(),
        "packed mask f16" => m.generator_f16(&gpu, batch).unwrap(),
        _ => m.dense_generator(&gpu, batch).unwrap(),
    };
    (gpu, g)
}

fn bench_generation(c: &mut Criterion) {
    let presets = presets(if quick() {
        &["conv28"]
    } else {
        &["mlp28-up", "mlp28-deep", "conv28", "resnet32"]
    });
    let mut group = c.benchmark_group("generation");
    let mut report = Vec::new();
    for &preset in &presets {
        let m = model(preset);
        for batch in [1usize, if quick() { 16 } else { 256 }] {
            group.throughput(Throughput::Elements(batch as u64));
            let reference = {
                let (gpu, g) = build(&m, "packed mask", batch);
                g.generate(&gpu, batch, 0).unwrap()
            };
            // BatchNorm in inference form: even a batch of one image is an image, not the
            // constant a batch's own statistics would make of it.
            let per = reference.len() / batch;
            let first = &reference[..per];
            let spread = first.iter().fold(f32::MIN, |a, &b| a.max(b))
                - first.iter().fold(f32::MAX, |a, &b| a.min(b));
            assert!(
                spread > 0.01,
                "{preset} at batch {batch}: the first image is constant (spread {spread})"
            );
            for variant in ["packed mask", "packed mask f16", "dense f32 weights"] {
                if variant.ends_with("f16") && !open_gpu().features().shader_f16 {
                    continue;
                }
                let (gpu, g) = build(&m, variant, batch);
                let imgs = g.generate(&gpu, batch, 0).unwrap();
                let worst = imgs
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let tol = if variant.ends_with("f16") { 0.1 } else { 1e-4 };
                assert!(
                    worst <= tol,
                    "{preset} {variant}: images differ from the packed-mask ones by {worst}"
                );
                let peak = gpu.pool_stats().peak_bytes;
                group.bench_with_input(
                    BenchmarkId::new(format!("{preset} {variant}"), batch),
                    &batch,
                    |b, _| {
                        b.iter_custom(|iters| {
                            let t = Instant::now();
                            for i in 0..iters {
                                g.set_first_image(&gpu, (i as u32).wrapping_mul(batch as u32))
                                    .unwrap();
                                gpu.run(&g.batch_kernels()).unwrap();
                            }
                            t.elapsed()
                        })
                    },
                );
                let reps = 5;
                let t = Instant::now();
                for i in 0..reps {
                    g.set_first_image(&gpu, i * batch as u32).unwrap();
                    gpu.run(&g.batch_kernels()).unwrap();
                }
                let per = t.elapsed().as_secs_f64() / reps as f64;
                report.push((preset, variant, batch, per, peak));
            }
        }
    }
    group.finish();
    println!(
        "\nGeneration ({} wall clock per batch, including submission and wait):",
        prism::gpu::describe_adapter(open_gpu().info())
    );
    println!("| model | variant | batch | images/s | latency | peak GPU memory |");
    println!("|---|---|---|---|---|---|");
    for (preset, variant, batch, per, peak) in report {
        println!(
            "| {preset} | {variant} | {batch} | {:.1} | {:.2} ms | {:.1} MiB |",
            batch as f64 / per,
            per * 1e3,
            peak as f64 / (1 << 20) as f64
        );
    }
}

fn bench_training(c: &mut Criterion) {
    let gpu = open_gpu();
    let presets = presets(if quick() {
        &["mlp28"]
    } else {
        &["mlp28-up", "mlp28-deep", "conv28", "mlp28"]
    });
    let mut group = c.benchmark_group("training");
    for &preset in &presets {
        let batch = if quick() {
            16
        } else {
            TrainConfig::default().batch
        };
        let cfg = TrainConfig {
            arch: preset.into(),
            batch,
            clients: 1,
            local_steps: 1,
            ..Default::default()
        };
        let (ds, arch) =
            load_dataset("mnist", Some(&data_dir()), false, Split::Train, preset, 1).unwrap();
        let ds = ds.take(2000);
        let trainer = Trainer::new(&gpu, &cfg, &arch, &ds, &[(0..2000).collect()]).unwrap();
        let server = prism::fl::ServerModel::new(
            &gpu,
            &trainer.layer_sizes(),
            &vec![false; trainer.layer_sizes().len()],
            1,
            1,
        )
        .unwrap();
        let mut state = trainer.new_client_state(&gpu).unwrap();
        // Checked before timing: a step runs and yields a finite loss.
        let run = trainer
            .local_run(&gpu, 0, 0, &server.scores, &mut state)
            .unwrap();
        assert!(
            run.losses.iter().all(|l| l.is_finite() && *l > 0.0),
            "{:?}",
            run.losses
        );
        let ks = trainer.step_kernels(0);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("step (images/s)", preset), |b| {
            b.iter_custom(|iters| gpu.time_kernels(&ks, iters as u32).unwrap());
        });
    }
    group.finish();
}

/// One federated round of the default configuration (the default network, batch, non-IID
/// shards and PRISM's aggregation with MADA), at fewer local steps: every client's local run,
/// its upload's encoding, the server's intake and aggregation. Beside it, in the same run, the
/// baseline it is held to: the same number of client steps recorded back to back in one
/// submission (`time_kernels`, criterion's training row), so that what a round spends outside
/// the step kernels is printed as a share and tracked from run to run.
fn bench_round(c: &mut Criterion) {
    let gpu = open_gpu();
    let mut group = c.benchmark_group("round");
    group.sample_size(10);
    let defaults = TrainConfig::default();
    let (clients, steps, batch) = if quick() {
        (2, 2, 16)
    } else {
        (defaults.clients, 5, defaults.batch)
    };
    let preset = defaults.arch.clone();
    let cfg = TrainConfig {
        clients,
        local_steps: steps,
        batch,
        real_batch: batch,
        ..defaults
    };
    let (ds, arch) =
        load_dataset("mnist", Some(&data_dir()), false, Split::Train, &preset, 1).unwrap();
    let parts = prism::data::partition::Partition::parse(&cfg.partition)
        .unwrap()
        .split(&ds.labels, clients, &mut HostRng::new(1, &[]))
        .unwrap();
    let trainer = Trainer::new(&gpu, &cfg, &arch, &ds, &parts).unwrap();
    let sizes = trainer.layer_sizes();
    let mut server =
        prism::fl::ServerModel::new(&gpu, &sizes, &vec![false; sizes.len()], clients, 1).unwrap();
    let mut states: Vec<_> = (0..clients)
        .map(|_| trainer.new_client_state(&gpu).unwrap())
        .collect();
    let mut strategy = prism::fl::Prism::default();
    use prism::fl::Strategy;
    let mut round = 0u32;
    let mut one_round = || {
        let mut ups = Vec::new();
        for (k, state) in states.iter_mut().enumerate() {
            let run = trainer
                .local_run(&gpu, k, round, &server.scores, state)
                .unwrap();
            ups.push(prism::fl::message::Upload {
                round,
                client: k as u32,
                layers: run.upload,
            });
        }
        let r = strategy
            .aggregate_fit(&gpu, round, &mut server, &ups, &[])
            .unwrap();
        round += 1;
        r
    };
    // Checked before timing: every client's upload counts and MADA's weight is a fraction.
    let first = one_round();
    assert!(first.lambda.is_some_and(|l| l > 0.0 && l < 1.0) && first.used == clients);
    let client_steps = (clients * steps) as u32;
    let ks = trainer.step_kernels(0);
    let name = format!("{clients} clients x {steps} local steps, {preset}, batch {batch}");
    let (mut round_total, mut round_iters) = (Duration::ZERO, 0u64);
    group.bench_function(format!("{name}: the round"), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                one_round();
            }
            let e = t.elapsed();
            round_total += e;
            round_iters += iters;
            e
        })
    });
    let (mut steps_total, mut steps_iters) = (Duration::ZERO, 0u64);
    group.bench_function(
        format!("{name}: its client steps back to back (baseline)"),
        |b| {
            b.iter_custom(|iters| {
                let e = gpu.time_kernels(&ks, iters as u32 * client_steps).unwrap();
                steps_total += e;
                steps_iters += iters;
                e
            })
        },
    );
    group.finish();
    if round_iters > 0 && steps_iters > 0 {
        let per_round = round_total.as_secs_f64() / round_iters as f64;
        let per_steps = steps_total.as_secs_f64() / steps_iters as f64;
        println!(
            "round: {:.1} ms a client step in the round, {:.1} ms back to back; \
             {:.1}% of the round outside the step kernels",
            per_round * 1e3 / client_steps as f64,
            per_steps * 1e3 / client_steps as f64,
            100.0 * (1.0 - per_steps / per_round)
        );
    }
}

criterion_group! {
    name = benches;
    config = support::config(Duration::from_secs(5));
    targets = bench_generation, bench_training, bench_round
}
criterion_main!(benches);
