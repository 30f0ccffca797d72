//! MMD and moment matching against f64 CPU references, with finite-difference gradient checks.

mod common;

use common::uniform;
use prism::gpu::{DType, Gpu};
use prism::kernels::mmd::{self, cpu, LossKind, GMMN_MNIST_SIGMAS};
use prism::rng::HostRng;

fn run_loss(
    gpu: &Gpu,
    kind: &LossKind,
    x: &[f32],
    y: &[f32],
    d: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (n, m) = (x.len() / d, y.len() / d);
    let tx = gpu.upload_f32(x, &[n, d], "x").unwrap();
    let ty = gpu.upload_f32(y, &[m, d], "y").unwrap();
    let tdx = gpu.tensor(&[n, d], DType::F32, "dx").unwrap();
    let l = mmd::loss(gpu, kind, scale, &tx, &ty, &tdx).unwrap();
    gpu.run(&l.kernels.iter().collect::<Vec<_>>()).unwrap();
    (gpu.read_f32(&l.loss).unwrap(), gpu.read_f32(&tdx).unwrap())
}

#[test]
fn mmd_values_match_cpu() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(61, &[]);
    // (200, 100, 12): more rows than a workgroup has lanes, and a Gram matrix of several tiles.
    for (n, m, d) in [
        (2, 2, 1),
        (5, 7, 3),
        (64, 64, 784),
        (31, 17, 50),
        (200, 100, 12),
    ] {
        let x: Vec<f32> = uniform(&mut rng, n * d);
        let y: Vec<f32> = uniform(&mut rng, m * d)
            .iter()
            .map(|v| v * 0.8 + 0.1)
            .collect();
        for unbiased in [false, true] {
            for scale in [1.0f32, 0.25] {
                let sigmas = GMMN_MNIST_SIGMAS.to_vec();
                let kind = LossKind::Mmd {
                    sigmas: sigmas.clone(),
                    unbiased,
                    sqrt: false,
                };
                let (l, _) = run_loss(&gpu, &kind, &x, &y, d, scale);
                let want = cpu::mmd2(&x, &y, d, &sigmas, unbiased, scale as f64);
                assert!(
                    (l[0] as f64 - want).abs() < 1e-5 + 1e-4 * want.abs(),
                    "{n} {m} {d} unbiased={unbiased}: {} vs {want}",
                    l[0]
                );
                assert_eq!(l[0], l[1]);
                let kind = LossKind::Mmd {
                    sigmas: sigmas.clone(),
                    unbiased,
                    sqrt: true,
                };
                let (l, _) = run_loss(&gpu, &kind, &x, &y, d, scale);
                let want = cpu::loss(&kind, &x, &y, d, scale as f64);
                assert!((l[1] as f64 - want).abs() < 1e-4, "sqrt loss");
            }
        }
    }
}

#[test]
fn mmd_is_accurate_when_the_batches_nearly_agree() {
    // MMD^2 is a difference of large similar sums; with y = x + tiny noise it is ~1e-7 of them.
    let gpu = common::gpu();
    let mut rng = HostRng::new(62, &[]);
    let (n, d) = (64, 784);
    let x: Vec<f32> = uniform(&mut rng, n * d)
        .iter()
        .map(|v| v * 0.5 + 0.5)
        .collect();
    let y: Vec<f32> = x
        .iter()
        .map(|v| v + 1e-3 * (rng.unit_f64() as f32 - 0.5))
        .collect();
    let sigmas = GMMN_MNIST_SIGMAS.to_vec();
    let kind = LossKind::Mmd {
        sigmas: sigmas.clone(),
        unbiased: false,
        sqrt: false,
    };
    let (l, _) = run_loss(&gpu, &kind, &x, &y, d, 1.0);
    let want = cpu::mmd2(&x, &y, d, &sigmas, false, 1.0);
    // The kernel means are ~3; f32 carries ~1e-7 relative, so 1e-6 absolute is the floor.
    assert!((l[0] as f64 - want).abs() < 2e-6, "{} vs {want}", l[0]);
    assert!(
        l[0] > -2e-6,
        "biased MMD^2 must not go meaningfully negative: {}",
        l[0]
    );
}

/// Central differences of the GPU loss against the GPU gradient.
fn fd_check(gpu: &Gpu, kind: &LossKind, n: usize, m: usize, d: usize, scale: f32, seed: u32) {
    let mut rng = HostRng::new(seed, &[]);
    let x: Vec<f32> = uniform(&mut rng, n * d);
    let y: Vec<f32> = uniform(&mut rng, m * d).iter().map(|v| v * 0.5).collect();
    let (_, grad) = run_loss(gpu, kind, &x, &y, d, scale);
    let loss_at = |xv: &[f32]| cpu::loss(kind, xv, &y, d, scale as f64);
    let h = 1e-3f32;
    // About 64 coordinates spread over x (all of them for small batches).
    for i in (0..x.len()).step_by(x.len().div_ceil(64)) {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss_at(&xp) - loss_at(&xm)) / (2.0 * h as f64);
        assert!(
            (fd - grad[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()) + 1e-5,
            "{kind:?} dx[{i}]: fd {fd} vs {}",
            grad[i]
        );
    }
}

#[test]
fn mmd_gradients_finite_differences() {
    let gpu = common::gpu();
    let sig = vec![0.5f32, 1.0, 2.0];
    for unbiased in [false, true] {
        for sqrt in [false, true] {
            fd_check(
                &gpu,
                &LossKind::Mmd {
                    sigmas: sig.clone(),
                    unbiased,
                    sqrt,
                },
                4,
                5,
                3,
                1.0,
                63,
            );
        }
    }
    fd_check(
        &gpu,
        &LossKind::Mmd {
            sigmas: sig,
            unbiased: false,
            sqrt: true,
        },
        3,
        3,
        4,
        0.25,
        64,
    );
    // More samples than a workgroup has lanes: rows split over lanes, several Gram tiles.
    fd_check(
        &gpu,
        &LossKind::Mmd {
            sigmas: vec![2.0, 4.0],
            unbiased: true,
            sqrt: true,
        },
        170,
        130,
        8,
        0.25,
        65,
    );
}

#[test]
fn bad_loss_options_are_errors() {
    let gpu = common::gpu();
    let t = gpu.zeros(&[2, 4], DType::F32, "t").unwrap();
    let kind = LossKind::Mmd {
        sigmas: vec![],
        unbiased: false,
        sqrt: true,
    };
    assert!(mmd::loss(&gpu, &kind, 1.0, &t, &t, &t).is_err());
    let kind = LossKind::Mmd {
        sigmas: vec![-1.0],
        unbiased: false,
        sqrt: true,
    };
    assert!(mmd::loss(&gpu, &kind, 1.0, &t, &t, &t).is_err());
    let one = gpu.zeros(&[1, 8], DType::F32, "a").unwrap();
    assert!(mmd::loss(&gpu, &LossKind::default(), 1.0, &one, &t, &one).is_err());
    let other = gpu.zeros(&[2, 3], DType::F32, "b").unwrap();
    assert!(
        mmd::loss(&gpu, &LossKind::default(), 1.0, &t, &other, &t).is_err(),
        "dimension mismatch"
    );
}
