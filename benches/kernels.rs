//! Kernel benchmarks: dense f32 matmul against masked matmul with seed-regenerated weights
//! (training mode: a fresh Bernoulli mask per step; inference mode: a packed mask), and masked
//! convolution at the paper's layer shapes against the same convolution on dense weights.
//!
//! Every kernel is checked against the CPU reference before it is timed. Times come from GPU
//! timestamps where the adapter has them. Criterion reports throughput in elements/s where one
//! element is one floating-point operation, so "Gelem/s" reads as GFLOP/s; a summary table with
//! the masked/dense ratio measured in the same run is printed at the end.
//!
//! `PRISM_BENCH_QUICK=1` runs small sizes only (the smoke test of .ci/run); `PRISM_BENCH_MAX=N`
//! takes the square matmuls up to N (default 1024).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Mutex;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use prism::gpu::{DType, Gpu, Kernel, Tensor};
use prism::kernels::conv::{self, ConvShape};
use prism::kernels::mask;
use prism::kernels::matmul::{self, LinearShape};
use prism::kernels::weights::{self, cpu as wcpu, Init, LayerWeights, MaskSource};
use prism::kernels::{Product, ScoreGradIo, StepState};
use prism::rng::HostRng;
use support::quick;

fn open_gpu() -> Gpu {
    Gpu::new(Default::default()).unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"))
}

/// Rows of the summary table: (benchmark, variant, GFLOP/s).
static SUMMARY: Mutex<Vec<(String, String, f64)>> = Mutex::new(Vec::new());

/// GFLOP/s of a kernel from a direct timed run (10 repetitions, best of 3).
fn gflops(gpu: &Gpu, k: &Kernel, flops: f64) -> f64 {
    let reps = 10;
    let best = (0..3)
        .map(|_| gpu.time_kernels(&[k], reps).expect("timing failed"))
        .min()
        .unwrap_or(Duration::MAX);
    flops * reps as f64 / best.as_secs_f64() / 1e9
}

/// The three weight sources of a layer of `n` weights, with their CPU effective weights.
struct Sources {
    dense: Tensor,
    keep: Tensor,
    step: Tensor,
    bits: Tensor,
    weff_dense: Vec<f32>,
    weff_train: Vec<f32>,
    weff_packed: Vec<f32>,
}

fn sources(gpu: &Gpu, layer: &LayerWeights, n: usize, rng: &mut HostRng) -> Sources {
    let scores: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let keep_cpu = mask::cpu::thresholds(&scores);
    let bits_cpu = mask::cpu::sample_packed(n, &keep_cpu, 99);
    let step = StepState {
        client: 0,
        step: 1,
        round: 0,
        seed: layer.seed,
        ..Default::default()
    };
    let dense = gpu.tensor(&[n], DType::F32, "dense weights").unwrap();
    gpu.run(&[&weights::materialize(gpu, layer, n, &MaskSource::Frozen, &dense).unwrap()])
        .unwrap();
    Sources {
        weff_dense: gpu.read_f32(&dense).unwrap(),
        dense,
        keep: gpu
            .upload_u32(&keep_cpu, &[keep_cpu.len()], "keep")
            .unwrap(),
        step: gpu
            .upload_u32(bytemuck::cast_slice(&[step]), &[8], "step")
            .unwrap(),
        bits: gpu
            .upload_u32(&bits_cpu, &[bits_cpu.len()], "bits")
            .unwrap(),
        weff_train: wcpu::effective(
            layer,
            n,
            &wcpu::Source::Train {
                keep: &keep_cpu,
                step,
            },
        ),
        weff_packed: wcpu::effective(layer, n, &wcpu::Source::Packed(&bits_cpu)),
    }
}

fn assert_near(what: &str, got: f32, want: f64) {
    assert!(
        (got as f64 - want).abs() <= 1e-3 * (1.0 + want.abs()),
        "{what}: GPU {got} but CPU {want}; not timing a wrong kernel"
    );
}

fn bench_matmul(c: &mut Criterion) {
    let gpu = open_gpu();
    let mut rng = HostRng::new(1, &[]);
    // Square sizes from 256, doubling up to PRISM_BENCH_MAX (default 1024; tools/gpu_check.sh
    // asks for 4096 on a GPU, where 1024^3 is over in microseconds).
    let max: usize = std::env::var("PRISM_BENCH_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let all: Vec<usize> = std::iter::successors(Some(256usize), |n| Some(n * 2))
        .take_while(|&n| n <= max.max(256))
        .collect();
    let sizes: &[usize] = if quick() { &[256] } else { &all };
    let mut group = c.benchmark_group("matmul");
    for &n in sizes {
        let s = LinearShape {
            batch: n,
            inputs: n,
            outputs: n,
        };
        let layer = common::layer(7, 0, Init::SignedConstant, n as u32);
        let src = sources(&gpu, &layer, s.weights(), &mut rng);
        let x: Vec<f32> = (0..n * n).map(|_| rng.unit_f64() as f32 - 0.5).collect();
        let tx = gpu.upload_f32(&x, &[n, n], "x").unwrap();
        let ty = gpu.tensor(&[n, n], DType::F32, "y").unwrap();
        let variants: [(&str, MaskSource, &Vec<f32>); 3] = [
            ("dense f32", MaskSource::Dense(&src.dense), &src.weff_dense),
            (
                "masked train",
                MaskSource::Train {
                    keep: &src.keep,
                    step: &src.step,
                },
                &src.weff_train,
            ),
            (
                "masked packed",
                MaskSource::Packed(&src.bits),
                &src.weff_packed,
            ),
        ];
        let flops = 2.0 * s.macs() as f64;
        group.throughput(Throughput::Elements(flops as u64));
        for (name, source, weff) in &variants {
            let k = matmul::forward(&gpu, &s, &Product::new(&layer, source, &tx, &ty)).unwrap();
            gpu.run(&[&k]).unwrap();
            let y = gpu.read_f32(&ty).unwrap();
            for &b in &[0, n / 2, n - 1] {
                for &o in &[0, n / 3, n - 1] {
                    let want: f64 = (0..n)
                        .map(|i| x[b * n + i] as f64 * weff[o * n + i] as f64)
                        .sum();
                    assert_near(&format!("matmul {name} {n}"), y[b * n + o], want);
                }
            }
            let id = BenchmarkId::new(*name, n);
            let row = (format!("matmul {n}x{n}x{n}"), *name);
            time_and_record(&mut group, &gpu, id, &k, row, flops);
        }
    }
    group.finish();
}

/// The masked matmuls of one training step of the default network (`mlp28-up` at batch 128:
/// forward and input gradient on the step's sampled mask, read packed as a step does, the
/// score gradient through the p-scaled estimator), each checked against the CPU reference,
/// beside the dense f32 forward and the packed-mask forward (a model file's mask) of the same
/// shape, and the sampling of the step's mask on its own.
fn bench_training_matmuls(c: &mut Criterion) {
    let gpu = open_gpu();
    let mut rng = HostRng::new(3, &[]);
    let batch = if quick() { 16 } else { 128 };
    let layers: &[(usize, usize)] = if quick() {
        &[(32, 256)]
    } else {
        &[(32, 256), (256, 512), (512, 1024), (1024, 196)]
    };
    let mut group = c.benchmark_group("training matmul");
    for (l, &(inputs, outputs)) in layers.iter().enumerate() {
        let s = LinearShape {
            batch,
            inputs,
            outputs,
        };
        let layer = common::layer(7, l as u32, Init::SignedConstant, inputs as u32);
        let src = sources(&gpu, &layer, s.weights(), &mut rng);
        let x: Vec<f32> = (0..batch * inputs)
            .map(|_| rng.unit_f64() as f32 - 0.5)
            .collect();
        let dy: Vec<f32> = (0..batch * outputs)
            .map(|_| rng.unit_f64() as f32 - 0.5)
            .collect();
        let scores: Vec<f32> = (0..s.weights()).map(|_| rng.normal() as f32).collect();
        let tx = gpu.upload_f32(&x, &[batch, inputs], "x").unwrap();
        let tdy = gpu.upload_f32(&dy, &[batch, outputs], "dy").unwrap();
        let tscores = gpu.upload_f32(&scores, &[s.weights()], "scores").unwrap();
        let ty = gpu.tensor(&[batch, outputs], DType::F32, "y").unwrap();
        let tdx = gpu.tensor(&[batch, inputs], DType::F32, "dx").unwrap();
        let tgrad = gpu.tensor(&[s.weights()], DType::F32, "grad").unwrap();
        // What a training step runs: the step's mask sampled once into packed bits
        // (mask::sample_step, checked bit for bit against the CPU twin, timed on its own
        // below), then the matmuls reading it packed.
        let n = s.weights();
        let step_bits = gpu
            .tensor(&[mask::packed_words(n)], DType::U32, "step mask")
            .unwrap();
        let mask_key = layer.gen().mask_key;
        let sample =
            mask::sample_step(&gpu, n, &src.keep, mask_key, &src.step, &step_bits).unwrap();
        gpu.run(&[&sample]).unwrap();
        let step_state: StepState = bytemuck::cast_slice(&gpu.read_u32(&src.step).unwrap())[0];
        assert_eq!(
            gpu.read_u32(&step_bits).unwrap(),
            mask::cpu::sample_packed(
                n,
                &gpu.read_u32(&src.keep).unwrap(),
                wcpu::step_mask_key(&layer.gen(), &step_state)
            ),
            "step mask of layer {l}: not timing a wrong kernel"
        );
        group.throughput(Throughput::Elements(n as u64)); // weights sampled
        group.bench_with_input(
            BenchmarkId::new("step mask", format!("{batch}x{outputs}x{inputs}")),
            &sample,
            |bch, k| {
                bch.iter_custom(|iters| gpu.time_kernels(&[k], iters as u32).expect("timing"));
            },
        );
        let train = MaskSource::Packed(&step_bits);
        let kernels = [
            (
                "dense f32",
                matmul::forward(
                    &gpu,
                    &s,
                    &Product::new(&layer, &MaskSource::Dense(&src.dense), &tx, &ty),
                )
                .unwrap(),
            ),
            (
                "packed forward",
                matmul::forward(
                    &gpu,
                    &s,
                    &Product::new(&layer, &MaskSource::Packed(&src.bits), &tx, &ty),
                )
                .unwrap(),
            ),
            (
                "forward",
                matmul::forward(&gpu, &s, &Product::new(&layer, &train, &tx, &ty)).unwrap(),
            ),
            (
                "grad_input",
                matmul::grad_input(&gpu, &s, &Product::new(&layer, &train, &tdy, &tdx)).unwrap(),
            ),
            (
                "grad_score",
                matmul::grad_score(
                    &gpu,
                    &s,
                    &layer,
                    matmul::Estimator::PScaled,
                    &ScoreGradIo {
                        x: &tx,
                        dy: &tdy,
                        scores: &tscores,
                        grad: &tgrad,
                    },
                )
                .unwrap(),
            ),
        ];
        let name = format!("{batch}x{outputs}x{inputs}");
        for (variant, k) in &kernels {
            gpu.run(&[k]).unwrap();
            // The whole output against the CPU references, so the bench never times a
            // kernel that computes something else.
            let (what, got, want) = match *variant {
                "dense f32" => ("y", gpu.read_f32(&ty).unwrap(), {
                    matmul::cpu::forward(&s, &x, &src.weff_dense)
                }),
                "packed forward" => ("y", gpu.read_f32(&ty).unwrap(), {
                    matmul::cpu::forward(&s, &x, &src.weff_packed)
                }),
                "forward" => ("y", gpu.read_f32(&ty).unwrap(), {
                    matmul::cpu::forward(&s, &x, &src.weff_train)
                }),
                "grad_input" => ("dx", gpu.read_f32(&tdx).unwrap(), {
                    matmul::cpu::grad_input(&s, &dy, &src.weff_train)
                }),
                _ => ("grad", gpu.read_f32(&tgrad).unwrap(), {
                    let gw = matmul::cpu::grad_weight(&s, &x, &dy);
                    matmul::cpu::grad_score(
                        matmul::Estimator::PScaled,
                        &gw,
                        &src.weff_dense,
                        &scores,
                    )
                }),
            };
            for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_near(&format!("{variant} {name} {what}[{idx}]"), *g, *w as f64);
            }
            group.throughput(Throughput::Elements(2 * s.macs()));
            let id = BenchmarkId::new(*variant, &name);
            let row = (format!("mlp28-up layer {l}: {name}"), *variant);
            time_and_record(&mut group, &gpu, id, k, row, 2.0 * s.macs() as f64);
        }
    }
    group.finish();
}

/// The distinct convolution shapes of the paper's 32x32 generator (PRISM.md section 6).
fn paper_convs(batch: usize) -> Vec<(&'static str, ConvShape)> {
    let c = |cin, cout, hw, k, pad| ConvShape {
        batch,
        cin,
        cout,
        h: hw,
        w: hw,
        kh: k,
        kw: k,
        stride: 1,
        pad,
    };
    vec![
        ("3x3 512->256 @8", c(512, 256, 8, 3, 1)),
        ("3x3 256->256 @8", c(256, 256, 8, 3, 1)),
        ("1x1 512->256 @4", c(512, 256, 4, 1, 0)),
        ("3x3 256->128 @16", c(256, 128, 16, 3, 1)),
        ("3x3 128->128 @16", c(128, 128, 16, 3, 1)),
        ("3x3 128->64 @32", c(128, 64, 32, 3, 1)),
        ("3x3 64->64 @32", c(64, 64, 32, 3, 1)),
        ("3x3 64->1 @32", c(64, 1, 32, 3, 1)),
    ]
}

fn conv_point(
    s: &ConvShape,
    x: &[f32],
    weff: &[f32],
    b: usize,
    co: usize,
    oy: usize,
    ox: usize,
) -> f64 {
    let mut acc = 0f64;
    for ci in 0..s.cin {
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                if iy < 0 || ix < 0 || iy as usize >= s.h || ix as usize >= s.w {
                    continue;
                }
                let xi = ((b * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize;
                acc += x[xi] as f64 * weff[((co * s.cin + ci) * s.kh + ky) * s.kw + kx] as f64;
            }
        }
    }
    acc
}

fn bench_conv(c: &mut Criterion) {
    let gpu = open_gpu();
    let mut rng = HostRng::new(2, &[]);
    let batch = if quick() { 2 } else { 64 };
    let mut shapes = paper_convs(batch);
    if quick() {
        shapes.truncate(2);
    }
    let mut group = c.benchmark_group("conv");
    for (name, s) in shapes {
        let layer = common::layer(3, 1, Init::SignedConstant, (s.cin * s.kh * s.kw) as u32);
        let src = sources(&gpu, &layer, s.weights(), &mut rng);
        let x: Vec<f32> = (0..s.input_len())
            .map(|_| rng.unit_f64() as f32 - 0.5)
            .collect();
        let tx = gpu.upload_f32(&x, &[x.len()], "x").unwrap();
        let ty = gpu.tensor(&[s.output_len()], DType::F32, "y").unwrap();
        let flops = 2.0 * s.macs() as f64;
        group.throughput(Throughput::Elements(flops as u64));
        let variants: [(&str, MaskSource, &Vec<f32>); 2] = [
            ("dense f32", MaskSource::Dense(&src.dense), &src.weff_dense),
            (
                "masked train",
                MaskSource::Train {
                    keep: &src.keep,
                    step: &src.step,
                },
                &src.weff_train,
            ),
        ];
        for (vname, source, weff) in &variants {
            let k = conv::forward(&gpu, &s, &Product::new(&layer, source, &tx, &ty)).unwrap();
            gpu.run(&[&k]).unwrap();
            let y = gpu.read_f32(&ty).unwrap();
            let (oh, ow) = (s.oh(), s.ow());
            for &(b, co, oy, ox) in &[
                (0, 0, 0, 0),
                (batch - 1, s.cout - 1, oh - 1, ow - 1),
                (batch / 2, s.cout / 2, oh / 2, ow / 3),
            ] {
                let want = conv_point(&s, &x, weff, b, co, oy, ox);
                assert_near(
                    &format!("conv {name} {vname}"),
                    y[((b * s.cout + co) * oh + oy) * ow + ox],
                    want,
                );
            }
            let id = BenchmarkId::new(*vname, name);
            let row = (format!("conv {name} batch {batch}"), *vname);
            time_and_record(&mut group, &gpu, id, &k, row, flops);
        }
    }
    group.finish();
}

/// Times `k` in `group` under `id` and adds its GFLOP/s for `flops` per run to the summary as
/// (`row`, `variant`).
fn time_and_record(
    group: &mut BenchmarkGroup<WallTime>,
    gpu: &Gpu,
    id: BenchmarkId,
    k: &Kernel,
    (row, variant): (String, &str),
    flops: f64,
) {
    group.bench_with_input(id, k, |bch, k| {
        bch.iter_custom(|iters| gpu.time_kernels(&[k], iters as u32).expect("timing failed"));
    });
    let rate = gflops(gpu, k, flops);
    SUMMARY
        .lock()
        .unwrap()
        .push((row, variant.to_string(), rate));
}

fn summary(_: &mut Criterion) {
    let gpu = open_gpu();
    let rows = SUMMARY.lock().unwrap();
    println!(
        "\nSummary on {} ({:?} clock):",
        prism::gpu::describe_adapter(gpu.info()),
        gpu.clock()
    );
    println!("| benchmark | variant | GFLOP/s | vs dense |");
    println!("|---|---|---|---|");
    for (bench, variant, g) in rows.iter() {
        let dense = rows
            .iter()
            .find(|(b, v, _)| b == bench && v == "dense f32")
            .map(|r| r.2);
        let ratio = dense.map_or(String::from("-"), |d| format!("{:.2}", g / d));
        println!("| {bench} | {variant} | {g:.1} | {ratio} |");
    }
}

criterion_group! {
    name = benches;
    config = support::config(Duration::from_secs(3));
    targets = bench_matmul, bench_training_matmuls, bench_conv, summary
}
criterion_main!(benches);
