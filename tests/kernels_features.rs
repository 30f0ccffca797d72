//! The kernels of the feature-space loss against their CPU twins, with finite-difference checks
//! of every backward: 2x2 pooling, the per-channel affine map (BatchNorm in inference form),
//! sequential image loading, real feature statistics and GFMN's moment-matching step.

mod common;

use common::{assert_close, check_fd, devices, dot, uniform};
use prism::gpu::{DType, Gpu, Kernel, Tensor};
use prism::kernels::moments::{self as mk, LayerIo, TrackerConfig};
use prism::kernels::norm::{self, NormShape};
use prism::kernels::pool::{self, Pool, PoolShape};
use prism::kernels::{data, StepState};
use prism::rng::HostRng;

fn up(gpu: &Gpu, v: &[f32]) -> Tensor {
    gpu.upload_f32(v, &[v.len()], "t").unwrap()
}

fn out(gpu: &Gpu, n: usize) -> Tensor {
    gpu.tensor(&[n], DType::F32, "out").unwrap()
}

#[test]
fn pooling_matches_cpu_on_odd_and_even_shapes() {
    let mut rng = HostRng::new(61, &[]);
    for gpu in devices() {
        // Even sides, odd sides (the last row and column are dropped), one-plane and many-plane
        // tensors, a 1-row output, and the 28x28 planes of a batch of encoder inputs.
        for (planes, h, w) in [
            (1, 2, 2),
            (3, 5, 7),
            (2, 3, 2),
            (7, 9, 4),
            (256, 28, 28),
            (5, 2, 33),
        ] {
            let s = PoolShape { planes, h, w };
            let x = uniform(&mut rng, s.input_len());
            let dy = uniform(&mut rng, s.output_len());
            for p in [Pool::Max, Pool::Avg] {
                let (tx, ty, tdy, tdx) = (
                    up(&gpu, &x),
                    out(&gpu, s.output_len()),
                    up(&gpu, &dy),
                    out(&gpu, s.input_len()),
                );
                let f = pool::forward(&gpu, p, &s, &tx, &ty).unwrap();
                let b = pool::backward(&gpu, p, &s, &tx, &tdy, &tdx).unwrap();
                gpu.run(&[&f, &b]).unwrap();
                let y = gpu.read_f32(&ty).unwrap();
                assert_close(
                    &format!("{p:?} pool {s:?}"),
                    &y,
                    &pool::cpu::forward(p, &s, &x),
                    1e-6,
                    1e-6,
                );
                let dx = gpu.read_f32(&tdx).unwrap();
                assert_close(
                    &format!("{p:?} pool backward {s:?}"),
                    &dx,
                    &pool::cpu::backward(p, &s, &x, &dy),
                    1e-6,
                    1e-6,
                );
                // The backward is the adjoint of the forward's linearisation at x.
                let lhs = dot(&y, &dy);
                let rhs = dot(&x, &dx);
                let tol = 1e-4 * (1.0 + lhs.abs());
                assert!((lhs - rhs).abs() < tol, "{p:?} {s:?}: {lhs} vs {rhs}");
            }
        }
        // Too small to pool: a clear error, not a kernel.
        let s = PoolShape {
            planes: 1,
            h: 1,
            w: 4,
        };
        let t = out(&gpu, 4);
        assert!(pool::forward(&gpu, Pool::Max, &s, &t, &out(&gpu, 1)).is_err());
    }
}

#[test]
fn max_pooling_breaks_ties_on_the_first_element() {
    // PyTorch's CPU kernel keeps the first largest element of a window in row-major order.
    let gpu = common::gpu();
    let s = PoolShape {
        planes: 1,
        h: 2,
        w: 2,
    };
    let x = [1.0, 3.0, 3.0, 3.0];
    let (tx, tdy, tdx) = (up(&gpu, &x), up(&gpu, &[1.0]), out(&gpu, 4));
    gpu.run(&[&pool::backward(&gpu, Pool::Max, &s, &tx, &tdy, &tdx).unwrap()])
        .unwrap();
    assert_eq!(gpu.read_f32(&tdx).unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn pooling_and_affine_finite_differences() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(62, &[]);
    // Pooling: distinct values, far apart relative to the step, so no window changes its
    // maximum under the perturbation.
    let s = PoolShape {
        planes: 2,
        h: 5,
        w: 4,
    };
    let x: Vec<f32> = (0..s.input_len())
        .map(|i| ((i * 7919) % 97) as f32 * 0.1)
        .collect();
    let r = uniform(&mut rng, s.output_len());
    let (tx, ty, tr, tdx) = (
        up(&gpu, &x),
        out(&gpu, s.output_len()),
        up(&gpu, &r),
        out(&gpu, s.input_len()),
    );
    for p in [Pool::Max, Pool::Avg] {
        let f = pool::forward(&gpu, p, &s, &tx, &ty).unwrap();
        let b = pool::backward(&gpu, p, &s, &tx, &tr, &tdx).unwrap();
        gpu.run(&[&b]).unwrap();
        let dx = gpu.read_f32(&tdx).unwrap();
        check_fd(&format!("{p:?} pooling"), &x, &dx, 1e-2, 2e-3, &mut |xv| {
            gpu.write_f32(&tx, xv).unwrap();
            gpu.run(&[&f]).unwrap();
            dot(&gpu.read_f32(&ty).unwrap(), &r)
        });
        gpu.write_f32(&tx, &x).unwrap();
    }
    // The affine map on [3, 4, 5] values.
    let ns = NormShape {
        batch: 3,
        channels: 4,
        size: 5,
    };
    let coef = uniform(&mut rng, 8);
    let x = uniform(&mut rng, ns.len());
    let r = uniform(&mut rng, ns.len());
    let (tc, tx, ty, tr, tdx) = (
        up(&gpu, &coef),
        up(&gpu, &x),
        out(&gpu, ns.len()),
        up(&gpu, &r),
        out(&gpu, ns.len()),
    );
    let f = norm::affine(&gpu, &ns, &tc, &tx, &ty).unwrap();
    let b = norm::affine_backward(&gpu, &ns, &tc, &tr, &tdx).unwrap();
    gpu.run(&[&b]).unwrap();
    let dx = gpu.read_f32(&tdx).unwrap();
    assert_close(
        "affine backward",
        &dx,
        &norm::cpu::affine_backward(&ns, &coef, &r),
        1e-6,
        1e-6,
    );
    check_fd("affine", &x, &dx, 1e-2, 1e-3, &mut |xv| {
        gpu.write_f32(&tx, xv).unwrap();
        gpu.run(&[&f]).unwrap();
        dot(&gpu.read_f32(&ty).unwrap(), &r)
    });
}

#[test]
fn affine_matches_cpu_and_folds_batchnorm() {
    let mut rng = HostRng::new(63, &[]);
    for gpu in devices() {
        for ns in [
            NormShape {
                batch: 1,
                channels: 1,
                size: 1,
            },
            NormShape {
                batch: 5,
                channels: 3,
                size: 7,
            },
            NormShape {
                batch: 64,
                channels: 64,
                size: 49,
            },
            NormShape {
                batch: 2,
                channels: 513,
                size: 1,
            },
        ] {
            let coef = uniform(&mut rng, 2 * ns.channels);
            let x = uniform(&mut rng, ns.len());
            let (tc, tx, ty) = (up(&gpu, &coef), up(&gpu, &x), out(&gpu, ns.len()));
            gpu.run(&[&norm::affine(&gpu, &ns, &tc, &tx, &ty).unwrap()])
                .unwrap();
            assert_close(
                &format!("affine {ns:?}"),
                &gpu.read_f32(&ty).unwrap(),
                &norm::cpu::affine(&ns, &coef, &x),
                1e-6,
                1e-6,
            );
        }
    }
    // The fold equals PyTorch's inference BatchNorm after a biased conv.
    let (bias, mean, var, w, b) = ([0.5f32], [2.0f32], [4.0f32], [3.0f32], [-1.0f32]);
    let c = norm::fold_batchnorm(Some(&bias), &mean, &var, &w, &b, 1e-5);
    let x = 1.25f64;
    let want = 3.0 * (x + 0.5 - 2.0) / (4.0f64 + 1e-5).sqrt() - 1.0;
    assert!((c[0] as f64 * x + c[1] as f64 - want).abs() < 1e-6);
}

#[test]
fn load_range_reads_images_in_order_and_pads_with_black() {
    let gpu = common::gpu();
    let (count, pixels, batch) = (7usize, 5usize, 3usize);
    let bytes: Vec<u8> = (0..count * pixels).map(|i| (i * 37 % 256) as u8).collect();
    let images = data::upload_images(&gpu, &bytes, pixels, "images").unwrap();
    let t = out(&gpu, batch * pixels);
    for first in [0, 3, 6] {
        gpu.run(&[&data::load_range(&gpu, &images, count, pixels, first, &t).unwrap()])
            .unwrap();
        let got = gpu.read_f32(&t).unwrap();
        for b in 0..batch {
            let want = if first + b < count {
                data::image_values(&bytes, pixels, first + b)
            } else {
                vec![-1.0; pixels]
            };
            assert_eq!(
                &got[b * pixels..(b + 1) * pixels],
                &want[..],
                "image {}",
                first + b
            );
        }
    }
    assert!(data::load_range(&gpu, &images, count, pixels, 7, &t).is_err());
}

#[test]
fn gather_draws_the_twins_images() {
    // Images of 5 bytes (the scalar form) and of 8 (whole words: the vector form), a batch
    // larger than one invocation's run of vectors, on both adapter forms.
    for gpu in devices() {
        for (count, pixels, batch) in [(7usize, 5usize, 3usize), (11, 8, 300)] {
            let bytes: Vec<u8> = (0..count * pixels).map(|i| (i * 37 % 256) as u8).collect();
            let images = data::upload_images(&gpu, &bytes, pixels, "images").unwrap();
            let t = out(&gpu, batch * pixels);
            for (client, step) in [(0u32, 0u32), (3, 41)] {
                let state = StepState {
                    client,
                    step,
                    seed: 5,
                    ..Default::default()
                };
                let tstep = gpu
                    .upload_u32(bytemuck::cast_slice(&[state]), &[StepState::WORDS], "step")
                    .unwrap();
                gpu.run(&[&data::gather(&gpu, &images, count, pixels, 5, &tstep, &t).unwrap()])
                    .unwrap();
                let want: Vec<f32> = data::batch_indices(5, &state, count, batch)
                    .into_iter()
                    .flat_map(|i| data::image_values(&bytes, pixels, i))
                    .collect();
                assert_eq!(
                    gpu.read_f32(&t).unwrap(),
                    want,
                    "{pixels}-byte images, client {client} step {step}"
                );
            }
        }
    }
}

#[test]
fn streamed_statistics_match_the_whole_set() {
    let mut rng = HostRng::new(64, &[]);
    for gpu in devices() {
        // 3 features over 11 samples in batches of 4 (the last one partial), values with a
        // large common offset (the merge must not lose the variance to cancellation), and
        // 300 features (more than one workgroup) in one batch.
        for (d, n, batch) in [(3usize, 11usize, 4usize), (300, 9, 9), (5, 2, 1)] {
            let f: Vec<f32> = uniform(&mut rng, n * d).iter().map(|v| 100.0 + v).collect();
            let acc = out(&gpu, 2 * d);
            let real = out(&gpu, 2 * d);
            let fb = out(&gpu, batch * d);
            let mut first = 0;
            while first < n {
                let rows = batch.min(n - first);
                let mut chunk = f[first * d..(first + rows) * d].to_vec();
                chunk.resize(batch * d, 7.0); // rows past the data must be ignored
                gpu.write_f32(&fb, &chunk).unwrap();
                gpu.run(&[&mk::stats_merge(&gpu, &fb, rows, d, first, &acc).unwrap()])
                    .unwrap();
                first += rows;
            }
            gpu.run(&[&mk::stats_finish(&gpu, &acc, n, &real).unwrap()])
                .unwrap();
            let want = mk::cpu::interleave(&mk::cpu::feature_stats(&f, d));
            assert_close(
                &format!("statistics d={d} n={n}"),
                &gpu.read_f32(&real).unwrap(),
                &want,
                2e-5,
                2e-3,
            );
        }
    }
}

struct StepCase {
    _real: Tensor,
    k: Kernel,
    reduce: Kernel,
    f: Tensor,
    track: Tensor,
    opt: Tensor,
    grad: Tensor,
    loss: Tensor,
}

#[test]
fn moment_step_matches_cpu_over_several_steps() {
    let mut rng = HostRng::new(65, &[]);
    let cfg = TrackerConfig {
        lr: 1e-2, // larger than the reference's 1e-5, so the trackers move visibly
        weight: 0.7,
        ..Default::default()
    };
    for gpu in devices() {
        // Two tapped layers (5 and 300 features) of one loss, batch 6.
        let (n, dims) = (6usize, [5usize, 300usize]);
        let total: usize = dims.iter().sum();
        let real: Vec<Vec<f32>> = dims
            .iter()
            .map(|&d| {
                uniform(&mut rng, 2 * d)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| if i % 2 == 1 { v.abs() } else { *v })
                    .collect()
            })
            .collect();
        let terms = out(&gpu, 2 * total);
        let mut st = StepState::default();
        let tstep = gpu
            .upload_u32(bytemuck::cast_slice(&[st]), &[8], "step")
            .unwrap();
        let mut cases = Vec::new();
        let mut offset = 0;
        for (i, &d) in dims.iter().enumerate() {
            let (f, track, opt, grad, loss) = (
                out(&gpu, n * d),
                gpu.zeros(&[2 * d], DType::F32, "t").unwrap(),
                gpu.zeros(&[4 * d], DType::F32, "o").unwrap(),
                out(&gpu, n * d),
                out(&gpu, 8),
            );
            let treal = up(&gpu, &real[i]);
            let io = LayerIo {
                features: &f,
                real: &treal,
                track: &track,
                opt: &opt,
                grad: &grad,
            };
            let k = mk::step(&gpu, &cfg, &io, offset, &terms, &tstep).unwrap();
            let reduce = mk::reduce(&gpu, &cfg, &terms, &loss).unwrap();
            cases.push(StepCase {
                _real: treal,
                k,
                reduce,
                f,
                track,
                opt,
                grad,
                loss,
            });
            offset += d;
        }
        let mut cpu_track: Vec<Vec<f32>> = dims.iter().map(|&d| vec![0.0; 2 * d]).collect();
        let mut cpu_opt: Vec<Vec<f32>> = dims.iter().map(|&d| vec![0.0; 4 * d]).collect();
        for t in 0..3u32 {
            st.step = t;
            gpu.write_u32(&tstep, bytemuck::cast_slice(&[st])).unwrap();
            let feats: Vec<Vec<f32>> = dims.iter().map(|&d| uniform(&mut rng, n * d)).collect();
            for (c, f) in cases.iter().zip(&feats) {
                gpu.write_f32(&c.f, f).unwrap();
            }
            let mut ks: Vec<&Kernel> = cases.iter().map(|c| &c.k).collect();
            ks.push(&cases[0].reduce);
            gpu.run(&ks).unwrap();
            let mut sq = 0.0;
            for (i, c) in cases.iter().enumerate() {
                let (df, terms) = mk::cpu::step(
                    &cfg,
                    t + 1,
                    &feats[i],
                    dims[i],
                    total,
                    &real[i],
                    &mut cpu_track[i],
                    &mut cpu_opt[i],
                );
                assert_close(
                    &format!("trackers, layer {i}, step {t}"),
                    &gpu.read_f32(&c.track).unwrap(),
                    &cpu_track[i],
                    1e-6,
                    1e-4,
                );
                assert_close(
                    &format!("trackers' Adam, layer {i}, step {t}"),
                    &gpu.read_f32(&c.opt).unwrap(),
                    &cpu_opt[i],
                    1e-9,
                    1e-3,
                );
                assert_close(
                    &format!("feature gradient, layer {i}, step {t}"),
                    &gpu.read_f32(&c.grad).unwrap(),
                    &df,
                    1e-7,
                    1e-3,
                );
                sq += terms.iter().map(|t| t.1).sum::<f64>();
            }
            let loss = gpu.read_f32(&cases[0].loss).unwrap();
            let want = cfg.weight as f64 * sq / total as f64;
            assert!(
                (loss[1] as f64 - want).abs() < 1e-4 * (1.0 + want),
                "recorded loss {} vs {want}",
                loss[1]
            );
        }
        // The gradient is the derivative of the objective with the trackers held fixed.
        let d = dims[0];
        let c = &cases[0];
        let f = uniform(&mut rng, n * d);
        gpu.write_f32(&c.f, &f).unwrap();
        gpu.run(&[&c.k]).unwrap();
        let grad = gpu.read_f32(&c.grad).unwrap();
        let track = gpu.read_f32(&c.track).unwrap();
        check_fd("moment objective", &f, &grad, 1e-3, 1e-3, &mut |fv| {
            mk::cpu::objective(fv, d, &real[0], &track, cfg.weight as f64)
        });
    }
}
