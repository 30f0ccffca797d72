//! Model files: small, faithful to the checkpoint they come from, reloadable as dense weights
//! (safetensors), and refused when damaged.

mod common;

use std::path::PathBuf;

use common::assert_close;
use prism::fl::checkpoint::Checkpoint;
use prism::fl::simulation::{run, RunOptions};
use prism::fl::TrainConfig;
use prism::model::{self, MaskKind, Model};
use prism::nn::Architecture;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("prism-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn model_files_are_small() {
    let dir = tmp("size");
    for (preset, bound) in [("conv28", 30.0), ("resnet32", 16.0)] {
        let m = common::random_model(Architecture::preset(preset, 1).unwrap(), 5);
        let path = dir.join(format!("{preset}.prism"));
        m.save(&path).unwrap();
        let size = std::fs::metadata(&path).unwrap().len() as f64;
        let f32_size = 4.0 * m.weights() as f64;
        assert!(
            size * bound <= f32_size,
            "{preset}: {size} bytes is more than 1/{bound} of {f32_size}"
        );
        assert_eq!(Model::load(&path).unwrap(), m);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_model_regenerates_its_checkpoints_images_and_its_dense_twin_agrees() {
    let gpu = common::gpu();
    let dir = tmp("faithful");
    let cfg = TrainConfig {
        arch: "conv28".into(),
        clients: 2,
        rounds: 1,
        local_steps: 2,
        batch: 16,
        seed: 3,
        ..Default::default()
    };
    let mut o = RunOptions::new(dir.join("run"));
    o.data = Some(common::data_dir());
    o.sample_every = 0;
    o.eval_every = 0;
    run(&gpu, &cfg, &o).unwrap();
    let ckpt = dir.join("run/checkpoint.bin");
    for kind in [MaskKind::Sample, MaskKind::Threshold] {
        // From the checkpoint directly: the global scores and the chosen mask.
        let direct = model::from_checkpoint(&ckpt, kind).unwrap();
        let c = Checkpoint::load(&ckpt).unwrap();
        assert_eq!(
            direct.masks,
            model::masks_from_scores(&c.scores, kind, c.config.seed)
        );
        // Through a file.
        let path = dir.join("m.prism");
        direct.save(&path).unwrap();
        let loaded = Model::load(&path).unwrap();
        let a = direct
            .generator(&gpu, 20)
            .unwrap()
            .generate(&gpu, 20, 0)
            .unwrap();
        let b = loaded
            .generator(&gpu, 20)
            .unwrap()
            .generate(&gpu, 20, 0)
            .unwrap();
        assert_eq!(
            a, b,
            "a model file gives the same images as its checkpoint (same latents, same adapter)"
        );
        // f16 arithmetic where the adapter has SHADER_F16: close to the f32 images.
        if gpu.features().shader_f16 {
            let h = loaded
                .generator_f16(&gpu, 20)
                .unwrap()
                .generate(&gpu, 20, 0)
                .unwrap();
            let worst = h
                .iter()
                .zip(&a)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let mean = h.iter().zip(&a).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
            assert!(
                worst < 0.1 && mean < 0.01,
                "f16 vs f32: worst {worst}, mean {mean}"
            );
        }
        // The same network with dense f32 weights in memory.
        let d = loaded
            .dense_generator(&gpu, 20)
            .unwrap()
            .generate(&gpu, 20, 0)
            .unwrap();
        assert_close("dense vs packed", &d, &a, 1e-5, 1e-4);
        // Safetensors export and reload.
        let st = dir.join("m.safetensors");
        loaded.export_safetensors(&st).unwrap();
        let (arch, weights) = model::load_safetensors(&st).unwrap();
        assert_eq!(arch, loaded.arch);
        let o = prism::GeneratorOptions {
            mode: prism::nn::WeightMode::Dense,
            ..prism::GeneratorOptions::population(20)
        };
        let g = prism::generate::Generator::build(&gpu, &arch, loaded.seed, &o).unwrap();
        g.set_dense_weights(&gpu, &weights).unwrap();
        // The statistics travel with the model file, not with the safetensors export.
        let mut calibrated = loaded.clone();
        calibrated.calibrate(&gpu).unwrap();
        g.set_population(&gpu, calibrated.population.as_ref().unwrap())
            .unwrap();
        assert_close(
            "safetensors reload",
            &g.generate(&gpu, 20, 0).unwrap(),
            &a,
            1e-5,
            1e-4,
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_or_foreign_model_files_are_refused() {
    let dir = tmp("damage");
    let m = common::random_model(Architecture::preset("mlp28", 1).unwrap(), 2);
    let path = dir.join("m.prism");
    m.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.prism");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (bytes[..bytes.len() / 2].to_vec(), "checksum"),
        (
            {
                let mut b = bytes.clone();
                b[100] ^= 0x20;
                b
            },
            "checksum",
        ),
        (b"PK\x03\x04 definitely a zip".to_vec(), "magic"),
        (Vec::new(), "too short"),
    ];
    for (b, want) in cases {
        std::fs::write(&bad, &b).unwrap();
        let e = Model::load(&bad).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("bad.prism"), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `Model::evaluate` on real held-out MNIST: the table's rows are ordered and sane (real
/// against real is closest, the degraded rows are farther), and the Display prints them.
#[test]
fn evaluation_rows_rank_real_above_degraded() {
    let gpu = common::gpu();
    let m = common::random_model(Architecture::preset("mlp28-up", 1).unwrap(), 9);
    let data = common::data_dir();
    let e = m
        .evaluate(&gpu, 120, Some(&data), prism::Normalisation::Population)
        .unwrap();
    assert_eq!(e.count, 120);
    assert_eq!(e.shape, [1, 28, 28]);
    for rows in [&e.pixels, &e.features] {
        let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "real vs real (reference)",
                "real + noise 0.5 (degraded)",
                "real blurred 5x5 (degraded)",
                "generated"
            ]
        );
        let mmd: Vec<f64> = rows.iter().map(|r| r.metrics.mmd2).collect();
        assert!(mmd.iter().all(|v| v.is_finite()), "{mmd:?}");
        assert!(
            mmd[0] < mmd[1] && mmd[0] < mmd[2],
            "real vs real is not closest: {mmd:?}"
        );
        // Random masks of an untrained generator are far from digits.
        assert!(mmd[3] > mmd[0], "{mmd:?}");
    }
    assert_eq!(e.generated(), &e.pixels[3].metrics);
    let table = e.to_string();
    assert!(table.starts_with("120 generated vs 120 held-out mnist images (mlp28-up of 1x28x28)"));
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("generated "))
            .count(),
        2
    );
}
