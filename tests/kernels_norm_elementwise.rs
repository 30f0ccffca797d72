//! BatchNorm, ReLU, tanh, upsampling, add/scale/axpy and latents against CPU twins, with
//! finite-difference checks of every backward.

mod common;

use common::{assert_close, check_fd, devices, dot, normal, uniform};
use prism::gpu::{DType, Gpu, Tensor};
use prism::kernels::elementwise as ew;
use prism::kernels::norm::{self, NormShape};
use prism::kernels::StepState;
use prism::rng::{self, HostRng};

fn up(gpu: &Gpu, v: &[f32]) -> Tensor {
    gpu.upload_f32(v, &[v.len()], "t").unwrap()
}

fn out(gpu: &Gpu, n: usize) -> Tensor {
    gpu.tensor(&[n], DType::F32, "out").unwrap()
}

#[test]
fn batchnorm_matches_cpu() {
    let mut rng = HostRng::new(41, &[]);
    let shapes = [
        NormShape {
            batch: 1,
            channels: 3,
            size: 5,
        },
        NormShape {
            batch: 64,
            channels: 512,
            size: 1,
        },
        NormShape {
            batch: 7,
            channels: 5,
            size: 49,
        },
        NormShape {
            batch: 64,
            channels: 4,
            size: 256,
        },
        // Dense activations: 4 channels an invocation (36 channels: 9 invocations, not a
        // whole workgroup) and, with channels not a multiple of 4, one.
        NormShape {
            batch: 5,
            channels: 36,
            size: 1,
        },
        NormShape {
            batch: 9,
            channels: 6,
            size: 1,
        },
    ];
    for gpu in devices() {
        for s in shapes {
            // A large common offset checks that the variance is computed accurately.
            let x: Vec<f32> = normal(&mut rng, s.len())
                .iter()
                .map(|v| 3.0 * v + 50.0)
                .collect();
            let dy = uniform(&mut rng, s.len());
            let (tx, ty, tst, tdy, tdx) = (
                up(&gpu, &x),
                out(&gpu, s.len()),
                out(&gpu, 2 * s.channels),
                up(&gpu, &dy),
                out(&gpu, s.len()),
            );
            let f = norm::forward(&gpu, &s, &tx, &ty, &tst).unwrap();
            let b = norm::backward(&gpu, &s, &tdy, &ty, &tst, &tdx).unwrap();
            gpu.run(&[&f, &b]).unwrap();
            let (y, stats) = norm::cpu::forward(&s, &x);
            let y_gpu = gpu.read_f32(&ty).unwrap();
            let tol = if s.batch * s.size == 1 { 1e-2 } else { 2e-4 };
            assert_close(&format!("bn forward {s:?}"), &y_gpu, &y, tol, 1e-3);
            assert_close(
                &format!("bn stats {s:?}"),
                &gpu.read_f32(&tst).unwrap(),
                &stats,
                1e-4,
                1e-4,
            );
            let dx = norm::cpu::backward(&s, &dy, &y_gpu, &gpu.read_f32(&tst).unwrap());
            assert_close(
                &format!("bn backward {s:?}"),
                &gpu.read_f32(&tdx).unwrap(),
                &dx,
                2e-4,
                1e-3,
            );
        }
    }
}

#[test]
fn backward_kernels_finite_differences() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(42, &[]);
    let s = NormShape {
        batch: 4,
        channels: 3,
        size: 6,
    };
    let n = s.len();
    let x: Vec<f32> = uniform(&mut rng, n)
        .iter()
        .map(|v| v * 2.0 + 0.05)
        .collect();
    let r = uniform(&mut rng, n);
    let tx = up(&gpu, &x);
    let ty = out(&gpu, n);
    let tst = out(&gpu, 2 * s.channels);
    let tr = up(&gpu, &r);
    let tdx = out(&gpu, n);
    // (name, forward kernel, backward kernel)
    let cases: Vec<(&str, Vec<prism::gpu::Kernel>, prism::gpu::Kernel)> = vec![
        (
            "batchnorm",
            vec![norm::forward(&gpu, &s, &tx, &ty, &tst).unwrap()],
            norm::backward(&gpu, &s, &tr, &ty, &tst, &tdx).unwrap(),
        ),
        (
            "relu",
            vec![ew::relu(&gpu, &tx, &ty).unwrap()],
            ew::relu_backward(&gpu, &tr, &ty, &tdx).unwrap(),
        ),
        (
            "tanh",
            vec![ew::tanh(&gpu, &tx, &ty).unwrap()],
            ew::tanh_backward(&gpu, &tr, &ty, &tdx).unwrap(),
        ),
    ];
    let h = 1e-3f32;
    for (name, fwd, bwd) in &cases {
        let mut loss = |xv: &[f32]| -> f64 {
            gpu.write_f32(&tx, xv).unwrap();
            gpu.run(&fwd.iter().collect::<Vec<_>>()).unwrap();
            dot(&gpu.read_f32(&ty).unwrap(), &r)
        };
        loss(&x);
        gpu.run(&[bwd]).unwrap();
        let dx = gpu.read_f32(&tdx).unwrap();
        check_fd(&format!("{name} dx"), &x, &dx, h, 5e-3, &mut loss);
    }
}

#[test]
fn vector_maps_match_the_reference_at_every_length() {
    // Lengths with every remainder mod 4 and across the 1,024 and 8,192 values a workgroup
    // covers with 1 and 8 vectors per invocation.
    let mut rng = HostRng::new(44, &[]);
    for gpu in devices() {
        for n in [1usize, 2, 3, 4, 5, 1023, 1025, 8191, 8193, 20_003] {
            let a = normal(&mut rng, n);
            let b = normal(&mut rng, n);
            let (ta, tb, to) = (up(&gpu, &a), up(&gpu, &b), out(&gpu, n));
            type Reference = fn(f32, f32) -> f32;
            let cases: Vec<(&str, prism::gpu::Kernel, Reference)> = vec![
                ("relu", ew::relu(&gpu, &ta, &to).unwrap(), |a, _| a.max(0.0)),
                (
                    "relu_backward",
                    ew::relu_backward(&gpu, &ta, &tb, &to).unwrap(),
                    |a, b| if b > 0.0 { a } else { 0.0 },
                ),
                ("tanh", ew::tanh(&gpu, &ta, &to).unwrap(), |a, _| a.tanh()),
                (
                    "tanh_backward",
                    ew::tanh_backward(&gpu, &ta, &tb, &to).unwrap(),
                    |a, b| a * (1.0 - b * b),
                ),
                ("add", ew::add(&gpu, &ta, &tb, &to).unwrap(), |a, b| a + b),
                (
                    "scale",
                    ew::scale(&gpu, -0.75, &ta, &to).unwrap(),
                    |a, _| -0.75 * a,
                ),
                (
                    "axpy",
                    ew::axpy(&gpu, 1.5, &ta, &tb, &to).unwrap(),
                    |a, b| 1.5f32.mul_add(a, b),
                ),
            ];
            for (name, k, f) in cases {
                gpu.run(&[&k]).unwrap();
                let want: Vec<f32> = a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect();
                assert_close(
                    &format!("{name} n {n}"),
                    &gpu.read_f32(&to).unwrap(),
                    &want,
                    1e-6,
                    1e-5,
                );
            }
        }
    }
}

type PlaneOp = fn(&Gpu, &ew::Planes, &Tensor, &Tensor) -> prism::Result<prism::gpu::Kernel>;

/// Runs a plane operator on random x and its adjoint on random r (`grow` output values per
/// input value) and checks <op(x), r> = <x, adjoint(r)>; returns x, r, op(x) and adjoint(r).
fn run_with_adjoint(
    gpu: &Gpu,
    rng: &mut HostRng,
    s: &ew::Planes,
    grow: usize,
    [op, adjoint]: [PlaneOp; 2],
) -> [Vec<f32>; 4] {
    let x = uniform(rng, s.count * s.h * s.w);
    let r = uniform(rng, grow * x.len());
    let (tx, ty, tr, tdx) = (
        up(gpu, &x),
        out(gpu, r.len()),
        up(gpu, &r),
        out(gpu, x.len()),
    );
    let f = op(gpu, s, &tx, &ty).unwrap();
    let b = adjoint(gpu, s, &tr, &tdx).unwrap();
    gpu.run(&[&f, &b]).unwrap();
    let (y, dx) = (gpu.read_f32(&ty).unwrap(), gpu.read_f32(&tdx).unwrap());
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(u, v)| (*u as f64) * (*v as f64))
            .sum()
    };
    let (lhs, rhs) = (dot(&y, &r), dot(&x, &dx));
    assert!(
        (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
        "adjoint of {s:?}: {lhs} vs {rhs}"
    );
    [x, r, y, dx]
}

#[test]
fn upsampling_and_its_adjoint() {
    let mut rng = HostRng::new(43, &[]);
    for gpu in devices() {
        // Odd widths take the scalar form, even ones the vector form (14: the default's).
        for (count, h, w) in [(1, 1, 1), (3, 4, 5), (64, 8, 8), (37, 14, 14), (1, 1, 2)] {
            let s = ew::Planes { count, h, w };
            let ops: [PlaneOp; 2] = [ew::upsample2x, ew::upsample2x_adjoint];
            let [x, r, y, dx] = run_with_adjoint(&gpu, &mut rng, &s, 4, ops);
            assert_eq!(y, ew::cpu::upsample2x(count, h, w, &x));
            let want = ew::cpu::upsample2x_adjoint(count, h, w, &r);
            assert_close("upsample adjoint", &dx, &want, 1e-6, 1e-6);
        }
    }
}

#[test]
fn smoothing_matches_the_reference_and_is_its_own_adjoint() {
    let mut rng = HostRng::new(47, &[]);
    for gpu in devices() {
        // 1x1 and one-row planes (only padding around), odd sizes, and the generators' 28x28
        // output planes, 256 of them so that plane boundaries fall inside workgroups.
        // Widths below, at and past the runs of 4 and 32 pixels one invocation computes.
        for (count, h, w) in [
            (1, 1, 1),
            (2, 1, 7),
            (3, 5, 4),
            (5, 13, 11),
            (2, 3, 33),
            (3, 4, 64),
            (256, 28, 28),
        ] {
            let s = ew::Planes { count, h, w };
            // The same kernel is the backward pass.
            let ops: [PlaneOp; 2] = [ew::blur3x3, ew::blur3x3];
            let [x, _, y, _] = run_with_adjoint(&gpu, &mut rng, &s, 1, ops);
            let want = ew::cpu::blur3x3(count, h, w, &x);
            assert_close("blur", &y, &want, 1e-6, 1e-6);
            // A 1x1 plane keeps 4/16 of its value: the rest of the stencil falls on padding.
            if (count, h, w) == (1, 1, 1) {
                assert!((want[0] - 0.25 * x[0]).abs() < 1e-7);
            }
        }
    }
}

#[test]
fn upsampling_past_two_to_the_24_elements_indexes_exactly() {
    // The shaders divide indices by a float reciprocal with correction steps; beyond 2^24 the
    // first estimate is off by several units, so this pins the corrections. The values are
    // their own indices, so every misplaced element shows.
    let gpu = common::gpu();
    let (planes, h, w) = (1, 2_700_001, 3); // 32,400,012 outputs (<= 128 MiB), odd row width
    let x: Vec<f32> = (0..planes * h * w).map(|i| i as f32).collect();
    let (tx, ty) = (up(&gpu, &x), out(&gpu, 4 * x.len()));
    let s = ew::Planes {
        count: planes,
        h,
        w,
    };
    let f = ew::upsample2x(&gpu, &s, &tx, &ty).unwrap();
    gpu.run(&[&f]).unwrap();
    let got = gpu.read_f32(&ty).unwrap();
    let want = ew::cpu::upsample2x(planes, h, w, &x);
    let bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(bad, None, "first wrong element");
}

#[test]
fn transpose_matches_cpu() {
    let mut rng = HostRng::new(48, &[]);
    for gpu in devices() {
        for (rows, cols) in [(1, 1), (1, 7), (5, 3), (257, 33), (6000, 9)] {
            let a = uniform(&mut rng, rows * cols);
            let (ta, tt) = (up(&gpu, &a), out(&gpu, a.len()));
            gpu.run(&[&ew::transpose(&gpu, rows, cols, &ta, &tt).unwrap()])
                .unwrap();
            let t = gpu.read_f32(&tt).unwrap();
            assert_eq!(t, ew::cpu::transpose(rows, cols, &a), "{rows}x{cols}");
        }
    }
    assert_eq!(
        ew::cpu::transpose(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
}

#[test]
fn add_scale_and_latents() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(44, &[]);
    let a = uniform(&mut rng, 1001);
    let b = uniform(&mut rng, 1001);
    let (ta, tb, to, ts) = (up(&gpu, &a), up(&gpu, &b), out(&gpu, 1001), out(&gpu, 1001));
    let k1 = ew::add(&gpu, &ta, &tb, &to).unwrap();
    let k2 = ew::scale(&gpu, -2.5, &ta, &ts).unwrap();
    let tw = out(&gpu, 1001);
    let k3 = ew::axpy(&gpu, 0.75, &ta, &tb, &tw).unwrap();
    gpu.run(&[&k1, &k2, &k3]).unwrap();
    assert_close(
        "axpy",
        &gpu.read_f32(&tw).unwrap(),
        &a.iter()
            .zip(&b)
            .map(|(x, y)| 0.75 * x + y)
            .collect::<Vec<_>>(),
        1e-7,
        1e-6,
    );
    assert_eq!(
        gpu.read_f32(&to).unwrap(),
        a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>()
    );
    assert_eq!(
        gpu.read_f32(&ts).unwrap(),
        a.iter().map(|x| -2.5 * x).collect::<Vec<_>>()
    );

    let step = StepState {
        client: 3,
        step: 9,
        round: 0,
        seed: 1,
        ..Default::default()
    };
    let tstep = gpu
        .upload_u32(bytemuck::cast_slice(&[step]), &[8], "step")
        .unwrap();
    let n = 64 * 128;
    let base = rng::key_path(1, &[rng::stream::LATENT]);
    let tz = out(&gpu, n);
    gpu.run(&[&ew::latent(&gpu, base, &tstep, &tz).unwrap()])
        .unwrap();
    let z = gpu.read_f32(&tz).unwrap();
    // Box-Muller goes through log/cos: close to the CPU twin, not bit-identical.
    assert_close("latents", &z, &ew::cpu::latent(base, &step, n), 1e-5, 1e-5);
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "{mean} {var}"
    );
    // Another step gives other latents.
    let z2 = ew::cpu::latent(base, &StepState { step: 10, ..step }, n);
    assert!(z.iter().zip(&z2).filter(|(a, b)| a == b).count() < 5);
}

#[test]
fn latents_per_image_depend_on_the_image_index_alone() {
    let step = |first: u32| StepState {
        client: u32::MAX,
        step: first,
        ..Default::default()
    };
    let base = rng::key_path(3, &[rng::stream::LATENT]);
    // A latent size that is not a multiple of the workgroup or of 4, rows from near the end
    // of the index range (the index wraps like the shader's u32).
    let (rows, cols) = (37, 13);
    for gpu in common::devices() {
        for first in [0u32, 5, u32::MAX - 3] {
            let st = step(first);
            let tstep = gpu
                .upload_u32(bytemuck::cast_slice(&[st]), &[8], "step")
                .unwrap();
            let tz = out(&gpu, rows * cols);
            let k = ew::latent_images(&gpu, base, &tstep, &tz, cols).unwrap();
            gpu.run(&[&k]).unwrap();
            let want = ew::cpu::latent_images(base, &st, rows, cols);
            assert_close(
                "latents per image",
                &gpu.read_f32(&tz).unwrap(),
                &want,
                1e-5,
                1e-5,
            );
        }
    }
    // Row r of a batch from image 5 is image 5 + r's latent, as a batch of one would draw it.
    let batch = ew::cpu::latent_images(base, &step(5), 4, cols);
    for r in 0..4 {
        let one = ew::cpu::latent_images(base, &step(5 + r as u32), 1, cols);
        assert_eq!(&batch[r * cols..(r + 1) * cols], &one[..]);
    }
    // The first image's latent is the training form's latent of "step" 0 (same stream).
    assert_eq!(
        ew::cpu::latent_images(base, &step(0), 1, cols),
        ew::cpu::latent(base, &step(0), cols)
    );
}
