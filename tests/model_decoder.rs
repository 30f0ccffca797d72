//! The model format as another implementation reads it: `tools/model_decoder.py` (numpy only,
//! written from docs/MODEL_FORMAT.md) decodes model files written by `prism`, and must derive
//! the same effective weights bit for bit as `prism export --safetensors` and the same images
//! to within 1e-4 as `prism sample --raw`. The test vector in tests/data/ pins the format: a
//! tiny model file, its effective weights and its first images.
//!
//! The decoder runs where Python is present (CI has it); with Python but without numpy the
//! test fails and says how to install it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use prism::kernels::Init;
use prism::model::{masks_from_scores, MaskKind, Model};
use prism::nn::{arch, Architecture, Layer};
use prism::rng::HostRng;

/// Every generator layer kind: flat and image BatchNorm, a transposed conv, a residual block
/// (conv, upsampling, BatchNorm on both paths' input), smoothing and tanh.
fn tiny_arch(init: Init) -> Architecture {
    Architecture {
        name: "test-vector".into(),
        latent: 6,
        layers: vec![
            Layer::Linear { outputs: 24 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Reshape { c: 6, h: 2, w: 2 },
            Layer::ConvT {
                cout: 4,
                k: 4,
                stride: 2,
                pad: 1,
            },
            arch::res_block(3),
            Layer::BatchNorm,
            Layer::Relu,
            Layer::conv3x3(1),
            Layer::Blur,
            Layer::Tanh,
        ],
        init,
    }
}

/// A model of `arch` whose first layer keeps few weights (so that its record is range-coded)
/// and the rest about half, with calibrated population statistics.
fn tiny_model(init: Init, seed: u32) -> Model {
    let arch = tiny_arch(init);
    let mut rng = HostRng::new(seed, &[]);
    let scores: Vec<Vec<f32>> = arch
        .mask_sizes()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(l, &n)| {
            let shift = if l == 0 { -2.5 } else { 0.0 };
            (0..n).map(|_| rng.normal() as f32 + shift).collect()
        })
        .collect();
    let mut m = Model {
        masks: masks_from_scores(&scores, MaskKind::Sample, seed),
        arch,
        seed,
        mask_kind: MaskKind::Sample,
        dataset: "mnist".into(),
        population: None,
    };
    m.calibrate(&common::gpu()).unwrap();
    m
}

fn prism(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prism {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python that runs the decoder: tools/.venv's when it exists, else python3; None when
/// there is no Python at all.
fn python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/.venv/bin/python");
    let py = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let probe = Command::new(&py).args(["-c", "import numpy"]).output();
    match probe {
        Err(_) => None,
        Ok(o) if o.status.success() => Some(py),
        Ok(o) => panic!(
            "{} has no numpy, which tools/model_decoder.py needs ({}); install it with \
             `python3 -m pip install numpy` (.ci/setup does)",
            py.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
    }
}

/// Runs the independent decoder on `model` against prism's weights and images.
fn decode_independently(model: &Path, weights: &Path, images: &Path, first: u32, count: usize) {
    let Some(py) = python() else {
        eprintln!("no Python here: tools/model_decoder.py not run (CI runs it)");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/model_decoder.py");
    let out = Command::new(py)
        .arg(script)
        .arg(model)
        .arg("--safetensors")
        .arg(weights)
        .arg("--raw")
        .arg(images)
        .args(["--first", &first.to_string(), "--count", &count.to_string()])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(
        out.status.success(),
        "the independent decoder disagrees:\n{said}"
    );
    assert!(
        said.contains("bit-identical") && !said.contains("DIFFERENT"),
        "{said}"
    );
}

#[test]
fn an_independent_decoder_reproduces_weights_and_images() {
    let dir = common::scratch("decoder", "fresh");
    std::fs::create_dir_all(&dir).unwrap();
    for (init, seed) in [(Init::SignedConstant, 11), (Init::KaimingNormal, 12)] {
        let m = tiny_model(init, seed);
        let path = dir.join(format!("{seed}.prism"));
        m.save(&path).unwrap();
        // One record range-coded, the others packed: the decoder reads both encodings.
        let bytes = std::fs::read(&path).unwrap();
        let header = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        assert_eq!(bytes[16 + header], 2, "the first record is range-coded");
        let (st, raw) = (
            dir.join(format!("{seed}.st")),
            dir.join(format!("{seed}.npy")),
        );
        let (p, s, r) = (
            path.to_str().unwrap(),
            st.to_str().unwrap(),
            raw.to_str().unwrap(),
        );
        prism(&["export", "--model", p, "--safetensors", s]);
        let grid = dir.join("grid.png");
        prism(&[
            "sample",
            "--model",
            p,
            "-n",
            "5",
            "--latents",
            "3",
            "--batch",
            "2",
            "--raw",
            r,
            "--out",
            grid.to_str().unwrap(),
        ]);
        decode_independently(&path, &st, &raw, 3, 5);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn vector_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The committed test vector still decodes to its committed weights and images, in prism and
/// in the independent decoder.
#[test]
fn the_test_vector_decodes_to_its_weights_and_images() {
    let d = vector_dir();
    let m = Model::load(&d.join("test-vector.prism")).unwrap();
    assert_eq!(m.arch, tiny_arch(Init::SignedConstant));
    let dir = common::scratch("decoder", "vector");
    std::fs::create_dir_all(&dir).unwrap();
    // The effective weights, bit for bit (the files' metadata order may differ).
    m.export_safetensors(&dir.join("w.safetensors")).unwrap();
    let (_, now) = prism::model::load_safetensors(&dir.join("w.safetensors")).unwrap();
    let (_, then) = prism::model::load_safetensors(&d.join("test-vector.safetensors")).unwrap();
    let bits = |w: &[Vec<f32>]| -> Vec<Vec<u32>> {
        w.iter()
            .map(|l| l.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    assert!(
        bits(&now) == bits(&then),
        "the effective weights of the test vector changed"
    );
    let gpu = common::gpu();
    let images = m.generator(&gpu, 4).unwrap().generate(&gpu, 4, 0).unwrap();
    let want = std::fs::read(d.join("test-vector-images.npy")).unwrap();
    let want: Vec<f32> = want[want.len() - 4 * images.len()..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    common::assert_close("test-vector images", &images, &want, 1e-5, 1e-4);
    decode_independently(
        &d.join("test-vector.prism"),
        &d.join("test-vector.safetensors"),
        &d.join("test-vector-images.npy"),
        0,
        4,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes the test vector (run by hand when the format changes on purpose:
/// `cargo test --test model_decoder -- --ignored write_test_vector`).
#[test]
#[ignore = "writes the committed test vector; run by hand only when the format changes on \
            purpose (the_test_vector_decodes_to_its_weights_and_images checks it in CI)"]
fn write_test_vector() {
    let d = vector_dir();
    std::fs::create_dir_all(&d).unwrap();
    let m = tiny_model(Init::SignedConstant, 7);
    m.save(&d.join("test-vector.prism")).unwrap();
    m.export_safetensors(&d.join("test-vector.safetensors"))
        .unwrap();
    let gpu = common::gpu();
    let images = m.generator(&gpu, 4).unwrap().generate(&gpu, 4, 0).unwrap();
    let batch = prism::Images {
        values: &images,
        count: 4,
        shape: m.arch.output().unwrap(),
    };
    prism::write_npy(&d.join("test-vector-images.npy"), &batch).unwrap();
}
