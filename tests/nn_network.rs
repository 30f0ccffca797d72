//! Whole networks built from layer lists: GPU forward against the CPU interpreter, and the
//! recorded backward passes against finite differences.

mod common;

use std::rc::Rc;

use common::{assert_close, normal};
use prism::gpu::Gpu;
use prism::kernels::matmul::{cpu as mcpu, Estimator};
use prism::kernels::weights::cpu as wcpu;
use prism::kernels::{mask, Init, StepState};
use prism::nn::{
    arch, cpu, Architecture, Backward, BuildOptions, Layer, Network, Normalisation, WeightMode,
    Wiring,
};
use prism::rng::HostRng;

/// A miniature of the paper's ResNet: transposed conv from 1x1, one residual block, output conv.
fn tiny_resnet() -> Architecture {
    Architecture {
        name: "tiny-resnet".into(),
        latent: 6,
        layers: vec![
            Layer::Reshape { c: 6, h: 1, w: 1 },
            Layer::ConvT {
                cout: 4,
                k: 4,
                stride: 1,
                pad: 0,
            },
            arch::res_block(3),
            Layer::BatchNorm,
            Layer::Relu,
            Layer::conv3x3(2),
            Layer::Tanh,
        ],
        init: Init::SignedConstant,
    }
}

/// conv28's shape in miniature: linear, reshape, upsample-conv.
fn tiny_conv() -> Architecture {
    Architecture {
        name: "tiny-conv".into(),
        latent: 5,
        layers: vec![
            Layer::Linear { outputs: 4 * 3 * 3 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Reshape { c: 4, h: 3, w: 3 },
            Layer::Upsample2x,
            Layer::conv3x3(2),
            Layer::Tanh,
        ],
        init: Init::KaimingNormal,
    }
}

/// mlp28's shape in miniature: linear layers, reshape to images, fixed smoothing, tanh.
fn tiny_mlp() -> Architecture {
    Architecture {
        name: "tiny-mlp".into(),
        latent: 4,
        layers: vec![
            Layer::Linear { outputs: 6 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Linear { outputs: 2 * 5 * 4 },
            Layer::Reshape { c: 2, h: 5, w: 4 },
            Layer::Blur,
            Layer::Tanh,
        ],
        init: Init::SignedConstant,
    }
}

fn opts(batch: usize, mode: WeightMode, backward: Backward) -> BuildOptions {
    BuildOptions {
        batch,
        seed: 11,
        mode,
        backward,
        estimator: Estimator::StraightThrough,
        layer_offset: 0,
        half: false,
        adam: None,
        norm: Normalisation::Batch,
    }
}

fn step_state() -> StepState {
    StepState {
        client: 1,
        step: 3,
        round: 0,
        seed: 11,
        ..Default::default()
    }
}

/// Fills every layer's scores with random values and their thresholds; returns the CPU
/// effective weights of the training mask of `step_state()`.
fn init_scores(gpu: &Gpu, net: &Network, rng: &mut HostRng) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut weff = Vec::new();
    let mut scores_all = Vec::new();
    for l in &net.layers {
        let scores: Vec<f32> = normal(rng, l.info.weights)
            .iter()
            .map(|v| v * 2.0)
            .collect();
        let keep = mask::cpu::thresholds(&scores);
        gpu.write_f32(&l.scores, &scores).unwrap();
        gpu.write_u32(&l.keep, &keep).unwrap();
        weff.push(wcpu::effective(
            &l.weights,
            l.info.weights,
            &wcpu::Source::Train {
                keep: &keep,
                step: step_state(),
            },
        ));
        scores_all.push(scores);
    }
    (weff, scores_all)
}

/// A training network of `arch` with random scores, run forward and backward on a random
/// latent `z` with a random output gradient `r`: (network, CPU effective weights, scores, z, r).
type Trained = (Network, Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

fn trained_backward(gpu: &Gpu, arch: &Architecture, batch: usize, rng: &mut HostRng) -> Trained {
    let step = Rc::new(
        gpu.upload_u32(bytemuck::cast_slice(&[step_state()]), &[8], "step")
            .unwrap(),
    );
    let net = Network::build(
        gpu,
        arch,
        opts(batch, WeightMode::Train, Backward::Scores),
        Wiring::training(step),
    )
    .unwrap();
    let (weff, scores) = init_scores(gpu, &net, rng);
    let z = normal(rng, batch * arch.latent);
    let r = normal(rng, net.output.len());
    gpu.write_f32(&net.input, &z).unwrap();
    gpu.write_f32(net.grad_output.as_ref().unwrap(), &r)
        .unwrap();
    gpu.run(&net.forward.refs()).unwrap();
    gpu.run(&net.backward.refs()).unwrap();
    (net, weff, scores, z, r)
}

/// A frozen network of `arch` (an encoder) run forward on `z` and backward from `r`, and the
/// CPU twins of its weights.
fn frozen_backward(
    gpu: &Gpu,
    arch: &Architecture,
    batch: usize,
    z: &[f32],
    r: &[f32],
) -> (Network, Vec<Vec<f32>>) {
    let net = Network::build(
        gpu,
        arch,
        opts(batch, WeightMode::Frozen, Backward::Input),
        Wiring::default(),
    )
    .unwrap();
    let weff = net
        .layers
        .iter()
        .map(|l| wcpu::frozen_all(&l.weights, l.info.weights))
        .collect();
    gpu.write_f32(&net.input, z).unwrap();
    gpu.write_f32(net.grad_output.as_ref().unwrap(), r).unwrap();
    gpu.run(&net.forward.refs()).unwrap();
    gpu.run(&net.backward.refs()).unwrap();
    (net, weff)
}

#[test]
fn training_forward_matches_the_cpu_interpreter() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(71, &[]);
    for arch in [tiny_resnet(), tiny_conv(), tiny_mlp()] {
        for batch in [1usize, 4] {
            let step = Rc::new(
                gpu.upload_u32(bytemuck::cast_slice(&[step_state()]), &[8], "step")
                    .unwrap(),
            );
            let net = Network::build(
                &gpu,
                &arch,
                opts(batch, WeightMode::Train, Backward::Scores),
                Wiring::training(step),
            )
            .unwrap();
            assert_eq!(net.masked_weights(), arch.masked_weights().unwrap());
            let (weff, _) = init_scores(&gpu, &net, &mut rng);
            let z = normal(&mut rng, batch * arch.latent);
            gpu.write_f32(&net.input, &z).unwrap();
            gpu.run(&net.forward.refs()).unwrap();
            let want = cpu::forward(&arch, batch, &z, &weff).unwrap();
            // Batch 1 normalises every channel to zero: compare anyway (both give the same).
            assert_close(
                &format!("{} batch {batch}", arch.name),
                &gpu.read_f32(&net.output).unwrap(),
                &want,
                1e-4,
                1e-3,
            );
        }
    }
}

#[test]
fn encoder_input_gradient_finite_differences() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(72, &[]);
    let arch = tiny_conv();
    let batch = 3;
    let z = normal(&mut rng, batch * arch.latent);
    let r = normal(&mut rng, batch * arch.output().unwrap().len());
    let (net, weff) = frozen_backward(&gpu, &arch, batch, &z, &r);
    let dz = gpu.read_f32(net.grad_input.as_ref().unwrap()).unwrap();
    let loss = |zv: &[f32]| -> f64 {
        cpu::forward(&arch, batch, zv, &weff)
            .unwrap()
            .iter()
            .zip(&r)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let h = 1e-3f32;
    for i in 0..z.len() {
        let (mut zp, mut zm) = (z.clone(), z.clone());
        zp[i] += h;
        zm[i] -= h;
        let fd = (loss(&zp) - loss(&zm)) / (2.0 * h as f64);
        assert!(
            (fd - dz[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()),
            "dz[{i}]: fd {fd} vs {}",
            dz[i]
        );
    }
}

/// dL/ds of a layer = dL/dw_eff * w * f(s): check it on sampled weights of every layer, with
/// dL/dw_eff from central differences of the CPU forward.
#[test]
fn score_gradients_finite_differences() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(73, &[]);
    for arch in [tiny_conv(), tiny_resnet(), tiny_mlp()] {
        let batch = 3;
        let (net, weff, scores, z, r) = trained_backward(&gpu, &arch, batch, &mut rng);
        let loss = |w: &[Vec<f32>]| -> f64 {
            cpu::forward(&arch, batch, &z, w)
                .unwrap()
                .iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        for (li, l) in net.layers.iter().enumerate() {
            let g = gpu.read_f32(l.grad.as_ref().unwrap()).unwrap();
            let frozen = wcpu::frozen_all(&l.weights, l.info.weights);
            for _ in 0..6 {
                let i = rng.below(l.info.weights as u32) as usize;
                // Small enough that no ReLU of the batch changes side (1e-3 does, at a few weights).
                let h = 1e-4f32;
                let (mut wp, mut wm) = (weff.clone(), weff.clone());
                wp[li][i] += h;
                wm[li][i] -= h;
                let dw = (loss(&wp) - loss(&wm)) / (2.0 * h as f64);
                let want = dw
                    * frozen[i] as f64
                    * mcpu::score_factor(Estimator::StraightThrough, scores[li][i]) as f64;
                assert!(
                    (want - g[i] as f64).abs() < 1e-2 * (1.0 + want.abs()) + 1e-4,
                    "{} layer {li} weight {i}: {want} vs {}",
                    arch.name,
                    g[i]
                );
            }
        }
    }
}

#[test]
fn inference_modes_agree() {
    // Packed masks and materialised dense weights give the same images.
    let gpu = common::gpu();
    let mut rng = HostRng::new(74, &[]);
    let arch = tiny_resnet();
    let batch = 4;
    let packed = Network::build(
        &gpu,
        &arch,
        opts(batch, WeightMode::Packed, Backward::None),
        Wiring::default(),
    )
    .unwrap();
    let dense = Network::build(
        &gpu,
        &arch,
        opts(batch, WeightMode::Dense, Backward::None),
        Wiring::default(),
    )
    .unwrap();
    for (p, d) in packed.layers.iter().zip(&dense.layers) {
        let bits = mask::cpu::pack(
            &(0..p.info.weights)
                .map(|_| rng.unit_f64() < 0.5)
                .collect::<Vec<_>>(),
        );
        gpu.write_u32(&p.bits, &bits).unwrap();
        let w = wcpu::effective(&p.weights, p.info.weights, &wcpu::Source::Packed(&bits));
        gpu.write_f32(d.dense.as_ref().unwrap(), &w).unwrap();
    }
    let z = normal(&mut rng, batch * arch.latent);
    gpu.write_f32(&packed.input, &z).unwrap();
    gpu.write_f32(&dense.input, &z).unwrap();
    gpu.run(&packed.forward.refs()).unwrap();
    gpu.run(&dense.forward.refs()).unwrap();
    assert_close(
        "packed vs dense",
        &gpu.read_f32(&packed.output).unwrap(),
        &gpu.read_f32(&dense.output).unwrap(),
        1e-5,
        1e-4,
    );
}

/// An encoder's shape in miniature: convolutions and both poolings.
fn tiny_encoder() -> Architecture {
    Architecture {
        name: "tiny-encoder".into(),
        latent: 2 * 6 * 6,
        layers: vec![
            Layer::Reshape { c: 2, h: 6, w: 6 },
            Layer::conv3x3(3),
            Layer::Relu,
            Layer::MaxPool2,
            Layer::conv3x3(2),
            Layer::AvgPool2,
        ],
        init: Init::KaimingNormal,
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum()
}

/// The CPU interpreter's backward pass against central differences of its own forward, for
/// the input and for sampled effective weights of every masked layer (no GPU).
#[test]
fn cpu_backward_finite_differences() {
    let mut rng = HostRng::new(75, &[]);
    for arch in [tiny_conv(), tiny_resnet(), tiny_mlp(), tiny_encoder()] {
        let batch = 3;
        let weff: Vec<Vec<f32>> = arch
            .masked_layers()
            .unwrap()
            .iter()
            .map(|l| {
                normal(&mut rng, l.weights)
                    .iter()
                    .map(|v| v * 0.5)
                    .collect()
            })
            .collect();
        let z = normal(&mut rng, batch * arch.latent);
        let out = cpu::forward(&arch, batch, &z, &weff).unwrap();
        let r = normal(&mut rng, out.len());
        let g = cpu::backward(&arch, batch, &z, &weff, &r).unwrap();
        let loss =
            |zv: &[f32], w: &[Vec<f32>]| dot(&cpu::forward(&arch, batch, zv, w).unwrap(), &r);
        let h = 1e-3f32;
        let close = |what: String, fd: f64, got: f32| {
            assert!(
                (fd - got as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                "{} {what}: fd {fd} vs {got}",
                arch.name
            )
        };
        for i in 0..z.len().min(40) {
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[i] += h;
            zm[i] -= h;
            let fd = (loss(&zp, &weff) - loss(&zm, &weff)) / (2.0 * h as f64);
            close(format!("dz[{i}]"), fd, g.input[i]);
        }
        for (li, w) in weff.iter().enumerate() {
            for _ in 0..8 {
                let i = rng.below(w.len() as u32) as usize;
                let (mut wp, mut wm) = (weff.clone(), weff.clone());
                wp[li][i] += h;
                wm[li][i] -= h;
                let fd = (loss(&z, &wp) - loss(&z, &wm)) / (2.0 * h as f64);
                close(format!("layer {li} dw[{i}]"), fd, g.weights[li][i]);
            }
        }
    }
}

/// Both GPU backward programs against the CPU interpreter's backward pass, element by
/// element: the score gradients of a training network, and the input gradient of a frozen one.
#[test]
fn gpu_backward_matches_the_cpu_interpreter() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(76, &[]);
    for arch in [tiny_conv(), tiny_resnet(), tiny_mlp(), tiny_encoder()] {
        let batch = 3;
        let (net, weff, scores, z, r) = trained_backward(&gpu, &arch, batch, &mut rng);
        let want = cpu::backward(&arch, batch, &z, &weff, &r).unwrap();
        for (li, l) in net.layers.iter().enumerate() {
            let frozen = wcpu::frozen_all(&l.weights, l.info.weights);
            let ds = mcpu::grad_score(
                Estimator::StraightThrough,
                &want.weights[li],
                &frozen,
                &scores[li],
            );
            assert_close(
                &format!("{} layer {li} score gradient", arch.name),
                &gpu.read_f32(l.grad.as_ref().unwrap()).unwrap(),
                &ds,
                1e-4,
                1e-3,
            );
        }

        let (frozen_net, weff) = frozen_backward(&gpu, &arch, batch, &z, &r);
        let want = cpu::backward(&arch, batch, &z, &weff, &r).unwrap();
        assert_close(
            &format!("{} input gradient", arch.name),
            &gpu.read_f32(frozen_net.grad_input.as_ref().unwrap())
                .unwrap(),
            &want.input,
            1e-4,
            1e-3,
        );
    }
}
