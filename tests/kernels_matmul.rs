//! Masked matmul (forward, grad_input, grad_score) against the CPU reference on random shapes,
//! including batch 1 and sizes that are not multiples of the tiles, for every weight source and
//! both kernel forms (subgroup and portable); plus finite-difference checks of the gradients.

mod common;

use common::{assert_close, check_fd, devices, dot, normal, uniform};
use prism::gpu::{DType, Gpu};
use prism::kernels::mask;
use prism::kernels::matmul::{self, cpu, Estimator, LinearShape};
use prism::kernels::weights::{cpu as wcpu, Init, LayerWeights, MaskSource};
use prism::kernels::{adam, Product, ScoreGradIo, StepState};
use prism::rng::HostRng;

/// (batch, inputs, outputs): tile multiples, odd sizes, batch 1, unaligned (not multiples of 4).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 8, 4),
    (1, 784, 300),
    (3, 5, 7),
    (7, 33, 65),
    (32, 64, 256),
    (64, 100, 36),
    (65, 257, 31),
    (40, 128, 513),
    // Aligned, with a batch that is not a multiple of 4 (the score gradient takes batch rows
    // four at a time, then the rest).
    (6, 12, 8),
];

struct Case {
    shape: LinearShape,
    layer: LayerWeights,
    scores: Vec<f32>,
    keep: Vec<u32>,
    bits: Vec<u32>,
    step: StepState,
}

fn case(rng: &mut HostRng, (batch, inputs, outputs): (usize, usize, usize), init: Init) -> Case {
    let shape = LinearShape {
        batch,
        inputs,
        outputs,
    };
    let scores = normal(rng, shape.weights());
    let keep = mask::cpu::thresholds(&scores);
    let bits = mask::cpu::sample_packed(shape.weights(), &keep, 1234);
    Case {
        shape,
        layer: LayerWeights {
            seed: 42,
            layer: 2,
            init,
            fan_in: inputs as u32,
        },
        scores,
        keep,
        bits,
        step: StepState {
            client: 3,
            step: 11,
            round: 1,
            seed: 42,
            ..Default::default()
        },
    }
}

/// Runs `f` with each mask source on the GPU, giving the CPU effective weights alongside.
fn for_each_source(gpu: &Gpu, c: &Case, mut f: impl FnMut(&MaskSource, &[f32], &str)) {
    let n = c.shape.weights();
    let keep = gpu.upload_u32(&c.keep, &[c.keep.len()], "keep").unwrap();
    let step = gpu
        .upload_u32(bytemuck::cast_slice(&[c.step]), &[8], "step")
        .unwrap();
    let bits = gpu.upload_u32(&c.bits, &[c.bits.len()], "bits").unwrap();
    let frozen = wcpu::frozen_all(&c.layer, n);
    let dense = gpu.upload_f32(&frozen, &[n], "dense").unwrap();
    let train = MaskSource::Train {
        keep: &keep,
        step: &step,
    };
    let weff_train = wcpu::effective(
        &c.layer,
        n,
        &wcpu::Source::Train {
            keep: &c.keep,
            step: c.step,
        },
    );
    f(&train, &weff_train, "train");
    let weff_packed = wcpu::effective(&c.layer, n, &wcpu::Source::Packed(&c.bits));
    f(&MaskSource::Packed(&bits), &weff_packed, "packed");
    f(&MaskSource::Frozen, &frozen, "frozen");
    f(&MaskSource::Dense(&dense), &frozen, "dense");
}

type Launch = fn(&Gpu, &LinearShape, &Product) -> prism::Result<prism::gpu::Kernel>;
type Reference = fn(&LinearShape, &[f32], &[f32]) -> Vec<f32>;

/// Runs a masked product (the forward pass, or with `adjoint` the input gradient) on every
/// shape, initialisation and mask source, on random inputs of `[batch, inputs]` (adjoint:
/// `[batch, outputs]`), and compares it with its CPU twin.
fn check_products(seed: u32, (launch, reference): (Launch, Reference), adjoint: bool, what: &str) {
    let mut rng = HostRng::new(seed, &[]);
    for gpu in devices() {
        for &sh in SHAPES {
            for init in [Init::SignedConstant, Init::KaimingNormal] {
                let c = case(&mut rng, sh, init);
                let s = c.shape;
                let [from, to] = if adjoint {
                    [s.outputs, s.inputs]
                } else {
                    [s.inputs, s.outputs]
                };
                let input = uniform(&mut rng, s.batch * from);
                let ti = gpu.upload_f32(&input, &[s.batch, from], "in").unwrap();
                let to = gpu.tensor(&[s.batch, to], DType::F32, "out").unwrap();
                for_each_source(&gpu, &c, |src, weff, name| {
                    let k = launch(&gpu, &s, &Product::new(&c.layer, src, &ti, &to)).unwrap();
                    gpu.run(&[&k]).unwrap();
                    let row_share = gpu.features().row_share;
                    let what = format!("{what} {name} {s:?} {init:?} {row_share:?}");
                    let got = gpu.read_f32(&to).unwrap();
                    assert_close(&what, &got, &reference(&s, &input, weff), 1e-5, 1e-4);
                });
            }
        }
    }
}

#[test]
fn forward_matches_cpu() {
    check_products(21, (matmul::forward, cpu::forward), false, "forward");
}

#[test]
fn grad_input_matches_cpu() {
    check_products(
        22,
        (matmul::grad_input, cpu::grad_input),
        true,
        "grad_input",
    );
}

#[test]
fn grad_score_matches_cpu() {
    let mut rng = HostRng::new(23, &[]);
    for gpu in devices() {
        for &sh in SHAPES {
            for est in [Estimator::PScaled, Estimator::StraightThrough] {
                let c = case(&mut rng, sh, Init::KaimingNormal);
                let s = c.shape;
                let x = uniform(&mut rng, s.batch * s.inputs);
                let dy = uniform(&mut rng, s.batch * s.outputs);
                let tx = gpu.upload_f32(&x, &[s.batch, s.inputs], "x").unwrap();
                let tdy = gpu.upload_f32(&dy, &[s.batch, s.outputs], "dy").unwrap();
                let ts = gpu.upload_f32(&c.scores, &[s.weights()], "scores").unwrap();
                let tg = gpu.tensor(&[s.weights()], DType::F32, "grad").unwrap();
                let k = matmul::grad_score(
                    &gpu,
                    &s,
                    &c.layer,
                    est,
                    &ScoreGradIo {
                        x: &tx,
                        dy: &tdy,
                        scores: &ts,
                        grad: &tg,
                    },
                )
                .unwrap();
                gpu.run(&[&k]).unwrap();
                let frozen = wcpu::frozen_all(&c.layer, s.weights());
                let want = cpu::grad_score(est, &cpu::grad_weight(&s, &x, &dy), &frozen, &c.scores);
                let what = format!("grad_score {est:?} {s:?} {:?}", gpu.features().row_share);
                assert_close(&what, &gpu.read_f32(&tg).unwrap(), &want, 1e-6, 1e-4);
            }
        }
    }
}

/// The score gradient with Adam in its epilogue against the two kernels it replaces (each
/// tested against its CPU twin): grad_score, then Adam with the threshold refresh, over a few
/// steps from the same state.
#[test]
fn grad_score_adam_matches_the_gradient_then_adam() {
    let mut rng = HostRng::new(25, &[]);
    let cfg = adam::AdamConfig::default();
    for gpu in devices() {
        for &sh in SHAPES.iter().filter(|(_, i, o)| i % 4 == 0 && o % 4 == 0) {
            let c = case(&mut rng, sh, Init::KaimingNormal);
            let s = c.shape;
            let est = Estimator::PScaled;
            let n = s.weights();
            let x = uniform(&mut rng, s.batch * s.inputs);
            let dy = uniform(&mut rng, s.batch * s.outputs);
            let tx = gpu.upload_f32(&x, &[s.batch, s.inputs], "x").unwrap();
            let tdy = gpu.upload_f32(&dy, &[s.batch, s.outputs], "dy").unwrap();
            let tstep = gpu
                .upload_u32(bytemuck::cast_slice(&[c.step]), &[8], "step")
                .unwrap();
            // Two copies of the layer's state: (scores, moments, keep).
            let state = || {
                (
                    gpu.upload_f32(&c.scores, &[n], "scores").unwrap(),
                    gpu.zeros(&[2 * n], DType::F32, "moments").unwrap(),
                    gpu.upload_u32(&c.keep, &[c.keep.len()], "keep").unwrap(),
                )
            };
            let (fs, fm, fk) = state();
            let (us, um, uk) = state();
            let fused = matmul::grad_score_adam(
                &gpu,
                &s,
                &c.layer,
                est,
                &cfg,
                &matmul::AdamState {
                    x: &tx,
                    dy: &tdy,
                    state: adam::TrainingState {
                        scores: &fs,
                        moments: &fm,
                        keep: &fk,
                        step: &tstep,
                    },
                },
            )
            .unwrap();
            let tg = gpu.tensor(&[n], DType::F32, "grad").unwrap();
            let grad = matmul::grad_score(
                &gpu,
                &s,
                &c.layer,
                est,
                &ScoreGradIo {
                    x: &tx,
                    dy: &tdy,
                    scores: &us,
                    grad: &tg,
                },
            )
            .unwrap();
            let state = adam::TrainingState {
                scores: &us,
                moments: &um,
                keep: &uk,
                step: &tstep,
            };
            let step = adam::step(&gpu, &cfg, &tg, &state).unwrap();
            for t in 0..3 {
                gpu.run(&[&fused, &grad, &step]).unwrap();
                let what = format!("{s:?} {:?} step {t}", gpu.features().row_share);
                let (a, b) = (gpu.read_f32(&fs).unwrap(), gpu.read_f32(&us).unwrap());
                assert_close(&format!("scores {what}"), &a, &b, 1e-6, 1e-5);
                let (a, b) = (gpu.read_f32(&fm).unwrap(), gpu.read_f32(&um).unwrap());
                assert_close(&format!("moments {what}"), &a, &b, 1e-7, 1e-5);
                let (a, b) = (gpu.read_u32(&fk).unwrap(), gpu.read_u32(&uk).unwrap());
                for i in 0..n {
                    let (g, w) = (
                        wcpu::threshold_of(&a, i) as i64,
                        wcpu::threshold_of(&b, i) as i64,
                    );
                    assert!((g - w).abs() <= 1, "keep {what} [{i}]: {g} vs {w}");
                }
            }
        }
    }
}

/// L(x) = sum(r * y(x)): dL/dx from grad_input against central differences of the GPU forward.
#[test]
fn grad_input_finite_differences() {
    let mut rng = HostRng::new(24, &[]);
    let gpu = common::gpu();
    let c = case(&mut rng, (3, 10, 6), Init::SignedConstant);
    let s = c.shape;
    let keep = gpu.upload_u32(&c.keep, &[c.keep.len()], "keep").unwrap();
    let step = gpu
        .upload_u32(bytemuck::cast_slice(&[c.step]), &[8], "step")
        .unwrap();
    let src = MaskSource::Train {
        keep: &keep,
        step: &step,
    };
    let x: Vec<f32> = uniform(&mut rng, s.batch * s.inputs);
    let r = uniform(&mut rng, s.batch * s.outputs);
    let tx = gpu.upload_f32(&x, &[s.batch, s.inputs], "x").unwrap();
    let ty = gpu.tensor(&[s.batch, s.outputs], DType::F32, "y").unwrap();
    let fwd = matmul::forward(&gpu, &s, &Product::new(&c.layer, &src, &tx, &ty)).unwrap();
    let mut loss = |xv: &[f32]| -> f64 {
        gpu.write_f32(&tx, xv).unwrap();
        gpu.run(&[&fwd]).unwrap();
        dot(&gpu.read_f32(&ty).unwrap(), &r)
    };
    let tr = gpu.upload_f32(&r, &[s.batch, s.outputs], "r").unwrap();
    let tdx = gpu.tensor(&[s.batch, s.inputs], DType::F32, "dx").unwrap();
    gpu.run(&[&matmul::grad_input(&gpu, &s, &Product::new(&c.layer, &src, &tr, &tdx)).unwrap()])
        .unwrap();
    let analytic = gpu.read_f32(&tdx).unwrap();
    check_fd("dx", &x, &analytic, 1e-2, 2e-3, &mut loss);
}

/// The straight-through score gradient is the exact derivative of the relaxed loss in which
/// the mask is replaced by its mean: L(s) = sum(r * x (w * sigmoid(s))^T). The p-scaled
/// estimator is that times p. Checked against central differences of L computed on the GPU
/// through dense weights w * sigmoid(s).
#[test]
fn grad_score_finite_differences() {
    let mut rng = HostRng::new(25, &[]);
    let gpu = common::gpu();
    let c = case(&mut rng, (5, 7, 6), Init::KaimingNormal);
    let s = c.shape;
    let n = s.weights();
    let frozen = wcpu::frozen_all(&c.layer, n);
    let x = uniform(&mut rng, s.batch * s.inputs);
    let r = uniform(&mut rng, s.batch * s.outputs);
    let tx = gpu.upload_f32(&x, &[s.batch, s.inputs], "x").unwrap();
    let ty = gpu.tensor(&[s.batch, s.outputs], DType::F32, "y").unwrap();
    let tw = gpu.tensor(&[n], DType::F32, "relaxed weights").unwrap();
    let fwd = matmul::forward(
        &gpu,
        &s,
        &Product::new(&c.layer, &MaskSource::Dense(&tw), &tx, &ty),
    )
    .unwrap();
    let loss = |sc: &[f32]| -> f64 {
        let w: Vec<f32> = frozen
            .iter()
            .zip(sc)
            .map(|(w, s)| w / (1.0 + (-s).exp()))
            .collect();
        gpu.write_f32(&tw, &w).unwrap();
        gpu.run(&[&fwd]).unwrap();
        gpu.read_f32(&ty)
            .unwrap()
            .iter()
            .zip(&r)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    };
    let tr = gpu.upload_f32(&r, &[s.batch, s.outputs], "r").unwrap();
    let ts = gpu.upload_f32(&c.scores, &[n], "scores").unwrap();
    let tg = gpu.tensor(&[n], DType::F32, "grad").unwrap();
    for est in [Estimator::StraightThrough, Estimator::PScaled] {
        let k = matmul::grad_score(
            &gpu,
            &s,
            &c.layer,
            est,
            &ScoreGradIo {
                x: &tx,
                dy: &tr,
                scores: &ts,
                grad: &tg,
            },
        )
        .unwrap();
        gpu.run(&[&k]).unwrap();
        let analytic = gpu.read_f32(&tg).unwrap();
        let h = 1e-2f32;
        for i in 0..n {
            let mut sp = c.scores.clone();
            sp[i] += h;
            let mut sm = c.scores.clone();
            sm[i] -= h;
            let mut fd = (loss(&sp) - loss(&sm)) / (2.0 * h as f64);
            if est == Estimator::PScaled {
                fd /= 1.0 + (-c.scores[i] as f64).exp(); // times p
            }
            assert!(
                (fd - analytic[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "{est:?} ds[{i}]: fd {fd} vs {}",
                analytic[i]
            );
        }
    }
}

/// A launch beyond the per-dimension workgroup limit folds into a 2-D or 3-D grid and still
/// computes every tile. The limit is lowered on purpose so that the test stays small.
#[test]
fn large_grids_fold() {
    let base = common::gpu();
    let mut limits = base.limits().clone();
    limits.max_compute_workgroups_per_dimension = 8;
    let gpu = Gpu::new(prism::gpu::GpuOptions {
        limits: Some(limits),
        ..Default::default()
    })
    .unwrap();
    // 40 x 8 = 320 tiles of 32 x 256 > 8 * 8: needs a 3-D grid.
    let s = LinearShape {
        batch: 32 * 40,
        inputs: 12,
        outputs: 256 * 8,
    };
    let layer = common::layer(1, 0, Init::SignedConstant, 12);
    let mut rng = HostRng::new(26, &[]);
    let x = uniform(&mut rng, s.batch * s.inputs);
    let tx = gpu.upload_f32(&x, &[s.batch, s.inputs], "x").unwrap();
    let ty = gpu.tensor(&[s.batch, s.outputs], DType::F32, "y").unwrap();
    let k = matmul::forward(
        &gpu,
        &s,
        &Product::new(&layer, &MaskSource::Frozen, &tx, &ty),
    )
    .unwrap();
    assert!(
        k.workgroups()[2] > 1,
        "expected a 3-D grid, got {:?}",
        k.workgroups()
    );
    gpu.run(&[&k]).unwrap();
    let w = wcpu::frozen_all(&layer, s.weights());
    assert_close(
        "folded forward",
        &gpu.read_f32(&ty).unwrap(),
        &cpu::forward(&s, &x, &w),
        1e-5,
        1e-4,
    );
}
