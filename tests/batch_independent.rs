//! Generation that does not depend on the batch: BatchNorm in inference form with population
//! statistics calibrated over generated batches, latents drawn per image, and the model file
//! that carries the statistics (version 2; version 1 still reads).

mod common;

use common::assert_close;
use prism::generate::{
    Generator, GeneratorOptions, CALIBRATION_BATCHES, CALIBRATION_CLIENT, GENERATION_CLIENT,
};
use prism::kernels::elementwise::cpu as ewcpu;
use prism::kernels::{Init, StepState};
use prism::model::Model;
use prism::nn::{arch, cpu, Architecture, Layer, Normalisation, WeightMode};
use prism::rng;

/// A residual generator in miniature: BatchNorm on flat features, on images, and inside both
/// paths' order (main before skip).
fn tiny_resnet() -> Architecture {
    Architecture {
        name: "tiny-resnet".into(),
        latent: 6,
        layers: vec![
            Layer::Linear { outputs: 4 * 2 * 2 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Reshape { c: 4, h: 2, w: 2 },
            arch::res_block(3),
            Layer::BatchNorm,
            Layer::Relu,
            Layer::conv3x3(1),
            Layer::Tanh,
        ],
        init: Init::SignedConstant,
    }
}

/// Flat layers only: at batch 1 its batch statistics make every image constant.
fn tiny_mlp() -> Architecture {
    Architecture {
        name: "tiny-mlp".into(),
        latent: 5,
        layers: vec![
            Layer::Linear { outputs: 12 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Linear { outputs: 16 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Linear { outputs: 36 },
            Layer::Reshape { c: 1, h: 6, w: 6 },
            Layer::Blur,
            Layer::Tanh,
        ],
        init: Init::KaimingNormal,
    }
}

fn calibrated(arch: Architecture, seed: u32) -> Model {
    let gpu = common::gpu();
    let mut m = common::random_model(arch, seed);
    m.calibrate(&gpu).unwrap();
    m
}

fn spread(img: &[f32]) -> f32 {
    img.iter().fold(f32::MIN, |a, &b| a.max(b)) - img.iter().fold(f32::MAX, |a, &b| a.min(b))
}

#[test]
fn population_statistics_make_an_image_depend_on_its_latent_alone() {
    for arch in [tiny_resnet(), tiny_mlp()] {
        let m = calibrated(arch, 4);
        let stats = m.population.clone().unwrap();
        assert_eq!(
            stats
                .layers
                .iter()
                .map(|l| l.mean.len())
                .collect::<Vec<_>>(),
            m.arch.batchnorm_channels().unwrap()
        );
        let count = 7;
        // The CPU twin: latents of images 0..7 of the generation stream, the effective
        // weights, BatchNorm as the affine map of the statistics.
        let key = rng::key_path(m.seed, &[rng::stream::LATENT]);
        let first = StepState {
            client: GENERATION_CLIENT,
            step: 0,
            ..Default::default()
        };
        let z = ewcpu::latent_images(key, &first, count, m.arch.latent);
        let want = cpu::forward_population(
            &m.arch,
            count,
            &z,
            &m.dense_weights().unwrap(),
            &stats.coefficients(),
        )
        .unwrap();
        for gpu in common::devices() {
            // Batch 1, a batch that leaves a partial last batch (3), and one batch of all.
            for batch in [1, 3, 7] {
                let got = m
                    .generator(&gpu, batch)
                    .unwrap()
                    .generate(&gpu, count, 0)
                    .unwrap();
                assert_close(
                    &format!("{} at batch {batch} vs the CPU twin", m.arch.name),
                    &got,
                    &want,
                    1e-5,
                    1e-4,
                );
            }
            // A batch of 256 holds the same first images as batches of one.
            let per = want.len() / count;
            let wide = m
                .generator(&gpu, 256)
                .unwrap()
                .generate(&gpu, 256, 0)
                .unwrap();
            assert_close("batch 256", &wide[..count * per], &want, 1e-5, 1e-4);
            // Image i of a run from index 2 is image i + 2 of a run from 0.
            let later = m.generator(&gpu, 4).unwrap().generate(&gpu, 3, 2).unwrap();
            assert_close(
                "images from index 2",
                &later,
                &want[2 * per..5 * per],
                1e-5,
                1e-4,
            );
            // Batch 1 images are images, not constants.
            assert!(spread(&want[..per]) > 0.01, "{}: a flat image", m.arch.name);
        }
    }
}

#[test]
fn batch_statistics_stay_available_and_are_what_batch_one_breaks() {
    let gpu = common::gpu();
    let m = calibrated(tiny_mlp(), 6);
    let by_batch = |batch: usize| {
        let o = GeneratorOptions {
            norm: Normalisation::Batch,
            ..GeneratorOptions::population(batch)
        };
        m.generator_with(&gpu, &o)
            .unwrap()
            .generate(&gpu, 4, 0)
            .unwrap()
    };
    // The reference's form: at batch 1 every feature of a flat BatchNorm is 0, so every
    // image is the same constant; at batch 4 the images differ from population ones.
    let one = by_batch(1);
    let per = one.len() / 4;
    for img in one.chunks(per) {
        assert!(
            spread(img) < 1e-6,
            "batch statistics at batch 1 give a constant"
        );
    }
    let four = by_batch(4);
    assert!(spread(&four[..per]) > 0.01);
    // The CPU twin of batch statistics at batch 4.
    let key = rng::key_path(m.seed, &[rng::stream::LATENT]);
    let st = StepState {
        client: GENERATION_CLIENT,
        ..Default::default()
    };
    let z = ewcpu::latent_images(key, &st, 4, m.arch.latent);
    let want = cpu::forward(&m.arch, 4, &z, &m.dense_weights().unwrap()).unwrap();
    assert_close("batch statistics vs CPU", &four, &want, 1e-5, 1e-4);
}

#[test]
fn calibration_gives_the_mean_and_variance_of_all_its_images() {
    // The first BatchNorm layer sees the first Linear layer's outputs of every calibration
    // latent; its population statistics must be their mean and (biased) variance over all
    // CALIBRATION_BATCHES batches.
    let gpu = common::gpu();
    let m = common::random_model(tiny_mlp(), 9);
    let batch = 32;
    let g = Generator::new(&gpu, &m.arch, m.seed, batch, WeightMode::Packed).unwrap();
    g.set_masks(&gpu, &m.masks).unwrap();
    let stats = g.calibrate(&gpu).unwrap();
    let n = CALIBRATION_BATCHES * batch;
    let key = rng::key_path(m.seed, &[rng::stream::LATENT]);
    let st = StepState {
        client: CALIBRATION_CLIENT,
        ..Default::default()
    };
    let latent = m.arch.latent;
    let z = ewcpu::latent_images(key, &st, n, latent);
    let w = &m.dense_weights().unwrap()[0];
    let outputs = w.len() / latent;
    for o in 0..outputs {
        let y: Vec<f64> = (0..n)
            .map(|s| {
                (0..latent)
                    .map(|i| w[o * latent + i] as f64 * z[s * latent + i] as f64)
                    .sum()
            })
            .collect();
        let mean = y.iter().sum::<f64>() / n as f64;
        let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let got = &stats.layers[0];
        assert!(
            (got.mean[o] as f64 - mean).abs() <= 1e-4 * (1.0 + mean.abs()),
            "channel {o}: mean {} vs {mean}",
            got.mean[o]
        );
        assert!(
            (got.var[o] as f64 - var).abs() <= 1e-3 * var + 1e-6,
            "channel {o}: variance {} vs {var}",
            got.var[o]
        );
    }
}

/// The file of `m` as version 1 wrote it: no statistics section.
fn version_one(m: &Model) -> Vec<u8> {
    let unc = Model {
        population: None,
        ..m.clone()
    };
    let mut b = unc.encode(None).unwrap();
    b.truncate(b.len() - 4); // the checksum
    assert_eq!(b.pop(), Some(0)); // "no statistics"
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn the_model_file_carries_the_statistics_and_version_one_still_reads() {
    let gpu = common::gpu();
    let m = calibrated(tiny_resnet(), 2);
    let bytes = m.encode(None).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
    let back = Model::decode(&bytes, "v2", None).unwrap();
    assert_eq!(back, m);

    // Version 1: no statistics; generation calibrates them, to the same images.
    let old = Model::decode(&version_one(&m), "v1", None).unwrap();
    assert_eq!(old.population, None);
    assert_eq!(old.masks, m.masks);
    let a = m.generator(&gpu, 5).unwrap().generate(&gpu, 5, 0).unwrap();
    let b = old
        .generator(&gpu, 5)
        .unwrap()
        .generate(&gpu, 5, 0)
        .unwrap();
    assert_eq!(a, b);

    // The reserved field must be 0.
    let mut reserved = bytes.clone();
    reserved[10] = 1;
    let n = reserved.len() - 4;
    let crc = crc32fast::hash(&reserved[..n]);
    reserved[n..].copy_from_slice(&crc.to_le_bytes());
    let e = Model::decode(&reserved, "r", None).unwrap_err().to_string();
    assert!(e.contains("reserved"), "{e}");

    // Statistics that do not fit the layer table are refused when writing and reading.
    let mut wrong = m.clone();
    wrong.population.as_mut().unwrap().layers.pop();
    assert!(wrong.encode(None).is_err());
    let mut negative = bytes.clone();
    let n = negative.len() - 4;
    // The last variance of the last layer is the last f32 before the checksum.
    negative[n - 4..n].copy_from_slice(&(-1.0f32).to_le_bytes());
    let crc = crc32fast::hash(&negative[..n]);
    negative[n..].copy_from_slice(&crc.to_le_bytes());
    let e = Model::decode(&negative, "neg", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("negative variance"), "{e}");
}
