//! Shared helpers of the GPU tests.
//!
//! GPU tests need an adapter. Where there is none they fail with a message that says how to get
//! one; they never pass silently.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use prism::gpu::{Gpu, GpuOptions};
use prism::model::{MaskKind, Model};
use prism::nn::Architecture;
use prism::rng::HostRng;

fn open(portable: bool) -> Arc<Gpu> {
    match Gpu::new(GpuOptions {
        portable,
        // The portable device also takes the streaming kernels' GPU form (one vector per
        // invocation), so that both forms run on any adapter; the default device keeps the
        // adapter's own (8 on a CPU adapter such as lavapipe).
        vectors_per_invocation: portable.then_some(1),
        ..Default::default()
    }) {
        Ok(g) => Arc::new(g),
        Err(e) => panic!(
            "GPU tests need a wgpu adapter and none could be opened: {e}\n\
             On a Linux machine without a GPU run `.ci/setup` (it installs Mesa's software \
             Vulkan driver, lavapipe) or `apt-get install -y mesa-vulkan-drivers libvulkan1`."
        ),
    }
}

/// The default device (subgroup kernels where the adapter has them), or the portable one when
/// `PRISM_TEST_PORTABLE=1` (the adapter matrix's `--portable` form, `.ci/matrix`). Which
/// adapter: wgpu's own variables (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`) choose it.
pub fn gpu() -> Arc<Gpu> {
    static G: OnceLock<Arc<Gpu>> = OnceLock::new();
    G.get_or_init(|| open(std::env::var("PRISM_TEST_PORTABLE").is_ok_and(|v| v == "1")))
        .clone()
}

/// The same adapter restricted to the portable kernel forms (no subgroups, no f16), which is
/// what the GL backend and WebGPU without subgroups get, with one vector per invocation in
/// the streaming kernels, as GPUs have it.
pub fn portable() -> Arc<Gpu> {
    static G: OnceLock<Arc<Gpu>> = OnceLock::new();
    G.get_or_init(|| open(true)).clone()
}

/// Both devices, for tests that must cover every kernel form; in a form of the adapter matrix
/// (`.ci/matrix` sets `PRISM_EXPECT_FORM`) only that form's device: the portable forms have
/// their own entry in the matrix, and running them again in every form only doubles its time.
pub fn devices() -> Vec<Arc<Gpu>> {
    if std::env::var_os("PRISM_EXPECT_FORM").is_some() {
        return vec![gpu()];
    }
    vec![gpu(), portable()]
}

/// Uniform values in [-1, 1).
pub fn uniform(rng: &mut HostRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
        .collect()
}

/// Standard normal values.
pub fn normal(rng: &mut HostRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Asserts |a - b| <= atol + rtol * |b| elementwise, reporting the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        // NaN counts as a failure.
        if (excess.is_nan() || excess > 0.0) && (excess > worst.1 || worst.1 == 0.0) {
            worst = (i, excess.max(f32::MIN_POSITIVE));
        }
        assert!(g.is_finite(), "{what}: element {i} is {g}");
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i} is {} but should be {} (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}

/// The folder holding MNIST: $PRISM_DATA, else the shared data next to the checkout. Fails
/// with the fix when MNIST is not there.
pub fn data_dir() -> PathBuf {
    let p = std::env::var_os("PRISM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(
        p.join("mnist").is_dir() || p.join("train-images-idx3-ubyte.gz").is_file(),
        "MNIST not found in {} (set PRISM_DATA to a folder holding mnist/)",
        p.display()
    );
    p
}

/// An empty scratch folder for this test process (`prefix` names the test file).
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("prism-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The lines of a run's `metrics.jsonl`, one JSON object per round.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A named f32 tensor as a test writes it into a safetensors file: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A small encoder file in torchvision's VGG state-dict layout: `stages` lists the conv
/// widths, `None` standing for a max-pooling module ("M" in torchvision's configurations);
/// with `bn`, every conv is followed by BatchNorm with random running statistics. The weights
/// are random (He-scaled) f32 values from `seed`. Also returns the tensors by name.
pub fn vgg_file(
    stages: &[Option<usize>],
    channels: usize,
    bn: bool,
    seed: u32,
) -> (Vec<u8>, Vec<NamedTensor>) {
    let mut rng = HostRng::new(seed, &[]);
    let mut tensors: Vec<NamedTensor> = Vec::new();
    let mut i = 0;
    let mut cin = channels;
    for s in stages {
        match s {
            None => i += 1,
            Some(cout) => {
                let fan = (cin * 9) as f64;
                let w = (0..cout * cin * 9)
                    .map(|_| (rng.normal() * (2.0 / fan).sqrt()) as f32)
                    .collect();
                tensors.push((format!("features.{i}.weight"), vec![*cout, cin, 3, 3], w));
                let b = (0..*cout).map(|_| (rng.normal() * 0.1) as f32).collect();
                tensors.push((format!("features.{i}.bias"), vec![*cout], b));
                if bn {
                    let n = |rng: &mut HostRng, s: f64, o: f64| -> Vec<f32> {
                        (0..*cout).map(|_| (rng.normal() * s + o) as f32).collect()
                    };
                    let (g, sh, m) = (
                        n(&mut rng, 0.2, 1.0),
                        n(&mut rng, 0.1, 0.0),
                        n(&mut rng, 0.3, 0.0),
                    );
                    let v: Vec<f32> = (0..*cout).map(|_| (0.5 + rng.unit_f64()) as f32).collect();
                    for (p, t) in [
                        ("weight", g),
                        ("bias", sh),
                        ("running_mean", m),
                        ("running_var", v),
                    ] {
                        tensors.push((format!("features.{}.{p}", i + 1), vec![*cout], t));
                    }
                    i += 3;
                } else {
                    i += 2;
                }
                cin = *cout;
            }
        }
    }
    // A classifier tensor, as in torchvision's files: ignored by the loader.
    tensors.push(("classifier.0.weight".into(), vec![2, 3], vec![0.5; 6]));
    (safetensors_bytes(&tensors), tensors)
}

/// Serialises (name, shape, f32 values) as safetensors.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

/// A federation small enough for a test: `clients` clients of mlp28 on two label shards each,
/// 6 local steps at batch 32 a round.
pub fn tiny_config(clients: usize, rounds: usize, seed: u32) -> prism::TrainConfig {
    prism::TrainConfig {
        arch: "mlp28".into(),
        clients,
        rounds,
        local_steps: 6,
        batch: 32,
        real_batch: 0,
        lr: 0.1,
        partition: "shards:2".into(),
        seed,
        ..Default::default()
    }
}

/// A model of `arch` with masks sampled from random scores (no training needed for sizes).
pub fn random_model(arch: Architecture, seed: u32) -> Model {
    let mut rng = HostRng::new(seed, &[]);
    let scores: Vec<Vec<f32>> = arch
        .masked_layers()
        .unwrap()
        .iter()
        .map(|l| (0..l.weights).map(|_| rng.normal() as f32).collect())
        .collect();
    Model {
        masks: prism::model::masks_from_scores(&scores, MaskKind::Sample, seed),
        arch,
        seed,
        mask_kind: MaskKind::Sample,
        dataset: "mnist".into(),
        population: None,
    }
}

/// <a, b>, accumulated in f64.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(u, v)| *u as f64 * *v as f64).sum()
}

/// Central differences of `loss` at x against the analytic gradient `grad`, coordinate by
/// coordinate (all of them: the tests keep x small).
pub fn check_fd(
    what: &str,
    x: &[f32],
    grad: &[f32],
    h: f32,
    tol: f64,
    loss: &mut dyn FnMut(&[f32]) -> f64,
) {
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
        assert!(
            (fd - grad[i] as f64).abs() < tol * (1.0 + fd.abs()),
            "{what}: d/dx[{i}]: finite difference {fd}, gradient {}",
            grad[i]
        );
    }
}

/// The frozen weights of layer `layer` of a network of seed `seed`: `init` with fan-in `fan_in`.
pub fn layer(
    seed: u32,
    layer: u32,
    init: prism::kernels::Init,
    fan_in: u32,
) -> prism::kernels::LayerWeights {
    prism::kernels::LayerWeights {
        seed,
        layer,
        init,
        fan_in,
    }
}
