//! Encoders from files (torchvision's VGG layout, written by the tests themselves), their GPU
//! forward pass against the CPU twin, the streamed real statistics, and the moment loss's
//! gradient through a whole encoder against finite differences.

mod common;

use std::rc::Rc;

use common::{assert_close, devices, safetensors_bytes, uniform, vgg_file};
use prism::gpu::{DType, Gpu};
use prism::kernels::data;
use prism::kernels::moments::{self as mk, TrackerConfig};
use prism::kernels::StepState;
use prism::loss::{real_statistics, Encoder, MomentLoss};
use prism::nn::{Layer, Shape};
use prism::rng::HostRng;

/// VGG's "A" configuration in miniature: conv, pool, conv, conv, pool, conv.
const STAGES: &[Option<usize>] = &[Some(4), None, Some(6), Some(5), None, Some(7)];

fn load(bytes: &[u8]) -> Encoder {
    Encoder::from_bytes(bytes, "test encoder").unwrap()
}

#[test]
fn vgg_layout_loads_with_batchnorm_folded_and_pools_inferred() {
    let (bytes, tensors) = vgg_file(STAGES, 3, true, 1);
    let e = load(&bytes);
    assert_eq!(e.channels, 3);
    let conv = |cout| Layer::conv3x3(cout);
    let block = |c| vec![conv(c), Layer::Affine, Layer::Relu];
    let mut want = block(4);
    want.push(Layer::MaxPool2);
    want.extend(block(6));
    want.extend(block(5));
    want.push(Layer::MaxPool2);
    want.extend(block(7));
    assert_eq!(e.layers, want);
    assert_eq!(e.weights.len(), 4);
    assert_eq!(e.weights[0], tensors[0].2, "features.0.weight verbatim");
    // features.1 is the first BatchNorm: a = g / sqrt(v + eps), b = a (bias - mean) + shift.
    let get = |n: &str| tensors.iter().find(|t| t.0 == n).unwrap().2.clone();
    let (bias, g, sh, m, v) = (
        get("features.0.bias"),
        get("features.1.weight"),
        get("features.1.bias"),
        get("features.1.running_mean"),
        get("features.1.running_var"),
    );
    for c in 0..4 {
        let a = g[c] as f64 / (v[c] as f64 + 1e-5).sqrt();
        assert!((e.affine[0][2 * c] as f64 - a).abs() < 1e-6);
        let b = a * (bias[c] as f64 - m[c] as f64) + sh[c] as f64;
        assert!((e.affine[0][2 * c + 1] as f64 - b).abs() < 1e-6);
    }
    // ReLUs 1 to 4; taps by number.
    assert_eq!(e.relu_layers(), vec![2, 6, 9, 13]);
    assert_eq!(e.taps(Some(&[4, 2])).unwrap(), vec![6, 13]);
    assert!(e
        .taps(Some(&[5]))
        .unwrap_err()
        .to_string()
        .contains("ReLUs 1 to 4"));
    // Without BatchNorm a conv's bias becomes an affine map of scale 1.
    let (plain, t2) = vgg_file(&[Some(3), None, Some(2)], 1, false, 2);
    let p = load(&plain);
    assert_eq!(p.layers.len(), 7);
    assert_eq!(
        p.affine[1].iter().step_by(2).copied().collect::<Vec<_>>(),
        vec![1.0, 1.0]
    );
    let b1 = &t2.iter().find(|t| t.0 == "features.3.bias").unwrap().2;
    assert_eq!(
        p.affine[1]
            .iter()
            .skip(1)
            .step_by(2)
            .copied()
            .collect::<Vec<_>>(),
        *b1
    );
}

#[test]
fn files_that_do_not_fit_name_the_tensor() {
    let (_, tensors) = vgg_file(STAGES, 3, true, 3);
    let with = |edit: &dyn Fn(&mut Vec<common::NamedTensor>)| {
        let mut t = tensors.clone();
        edit(&mut t);
        Encoder::from_bytes(&safetensors_bytes(&t), "bad.safetensors")
            .unwrap_err()
            .to_string()
    };
    // A conv reading the wrong number of channels.
    let e = with(&|t| {
        let i = t.iter().position(|x| x.0 == "features.4.weight").unwrap();
        t[i].1 = vec![6, 3, 3, 3];
        t[i].2.truncate(6 * 3 * 9);
    });
    assert!(
        e.contains("features.4.weight") && e.contains("reads 3 channels"),
        "{e}"
    );
    // A BatchNorm without its running variance.
    let e = with(&|t| t.retain(|x| x.0 != "features.1.running_var"));
    assert!(e.contains("features.1") && e.contains("running_var"), "{e}");
    // A bias of the wrong length.
    let e = with(&|t| {
        let i = t.iter().position(|x| x.0 == "features.0.bias").unwrap();
        t[i].1 = vec![3];
        t[i].2.truncate(3);
    });
    assert!(e.contains("features.0.bias"), "{e}");
    // NaN in a weight.
    let e = with(&|t| t[0].2[5] = f32::NAN);
    assert!(e.contains("features.0.weight") && e.contains("NaN"), "{e}");
    // Two parameterless modules between blocks.
    let e = with(&|t| {
        for x in t.iter_mut() {
            if let Some(rest) = x.0.strip_prefix("features.") {
                let (i, p) = rest.split_once('.').unwrap();
                let i: usize = i.parse().unwrap();
                if i >= 4 {
                    x.0 = format!("features.{}.{p}", i + 1);
                }
            }
        }
    });
    assert!(e.contains("carry no tensors"), "{e}");
    // Not safetensors; no features at all.
    assert!(Encoder::from_bytes(b"hello world, not a file", "x").is_err());
    let none = safetensors_bytes(&[("classifier.0.weight".into(), vec![1], vec![1.0])]);
    assert!(Encoder::from_bytes(&none, "x")
        .unwrap_err()
        .to_string()
        .contains("features.N"));
    // A file on disk that is missing.
    assert!(Encoder::load(std::path::Path::new("/nonexistent/vgg.safetensors")).is_err());
}

#[test]
fn a_colour_encoder_reads_grey_images_as_the_reference_does() {
    // The reference repeats a grey image to three channels; the folded encoder must agree.
    let (bytes, _) = vgg_file(&[Some(4), None, Some(3)], 3, true, 4);
    let e = load(&bytes);
    let grey = e.for_channels(1).unwrap();
    assert_eq!(grey.channels, 1);
    let mut rng = HostRng::new(5, &[]);
    let (b, h, w) = (2, 6, 5);
    let x = uniform(&mut rng, b * h * w);
    let mut x3 = Vec::new();
    for i in 0..b {
        for _ in 0..3 {
            x3.extend_from_slice(&x[i * h * w..(i + 1) * h * w]);
        }
    }
    let taps = e.taps(None).unwrap();
    let a = e.cpu_taps(b, &x3, Shape { c: 3, h, w }, &taps).unwrap();
    let g = grey.cpu_taps(b, &x, Shape { c: 1, h, w }, &taps).unwrap();
    for (u, v) in a.iter().zip(&g) {
        assert_close("folded encoder", v, u, 1e-5, 1e-4);
    }
    assert!(e.for_channels(2).is_err());
}

#[test]
fn gpu_encoder_taps_match_cpu() {
    let mut rng = HostRng::new(6, &[]);
    let (bytes, _) = vgg_file(STAGES, 1, true, 7);
    let e = load(&bytes);
    for gpu in devices() {
        // 28x28 (MNIST), and odd sides whose pools drop the last row and column.
        for (b, h, w) in [(3usize, 28usize, 28usize), (2, 13, 11)] {
            let image = Shape { c: 1, h, w };
            let taps = e.taps(None).unwrap();
            let x = uniform(&mut rng, b * h * w);
            let input = Rc::new(gpu.upload_f32(&x, &[b, 1, h, w], "images").unwrap());
            let net = e.build(&gpu, b, input, image, &taps, false).unwrap();
            gpu.run(&net.forward.refs()).unwrap();
            let want = e.cpu_taps(b, &x, image, &taps).unwrap();
            for (t, expect) in net.taps.iter().zip(&want) {
                assert_close(
                    &format!("tap {} at {h}x{w}", t.layer),
                    &gpu.read_f32(&t.output).unwrap(),
                    expect,
                    1e-5,
                    1e-4,
                );
            }
        }
    }
    // Too many pools for tiny images: a clear error.
    let gpu = common::gpu();
    let t = Rc::new(gpu.zeros(&[1, 1, 3, 3], DType::F32, "x").unwrap());
    let taps = e.taps(None).unwrap();
    let Err(err) = e.build(&gpu, 1, t, Shape { c: 1, h: 3, w: 3 }, &taps, false) else {
        panic!("an encoder with two pools built for 3x3 images");
    };
    assert!(err.to_string().contains("does not apply to 1x3x3"), "{err}");
}

/// The real statistics streamed over a client's images equal those of the CPU twin's features.
#[test]
fn streamed_real_statistics_match_cpu() {
    let gpu = common::gpu();
    let (bytes, _) = vgg_file(&[Some(4), None, Some(6)], 1, true, 8);
    let e = load(&bytes);
    let (h, w, count, batch) = (8, 8, 11, 4);
    let pixels = h * w;
    let mut rng = HostRng::new(9, &[]);
    let img: Vec<u8> = (0..count * pixels)
        .map(|_| (rng.unit_f64() * 255.0) as u8)
        .collect();
    let images = data::upload_images(&gpu, &img, pixels, "images").unwrap();
    let image = Shape { c: 1, h, w };
    let taps = e.taps(None).unwrap();
    let input = Rc::new(gpu.zeros(&[batch, 1, h, w], DType::F32, "x").unwrap());
    let net = e.build(&gpu, batch, input, image, &taps, false).unwrap();
    let real = real_statistics(&gpu, &net, &images, count, pixels).unwrap();
    let x: Vec<f32> = (0..count)
        .flat_map(|i| data::image_values(&img, pixels, i))
        .collect();
    let feats = e.cpu_taps(count, &x, image, &taps).unwrap();
    for ((r, f), t) in real.iter().zip(&feats).zip(&net.taps) {
        let want = mk::cpu::interleave(&mk::cpu::feature_stats(f, t.shape.len()));
        assert_close(
            "real statistics",
            &gpu.read_f32(r).unwrap(),
            &want,
            1e-5,
            1e-3,
        );
    }
}

fn gradient_through_encoder(gpu: &Gpu, stages: &[Option<usize>], seed: u32) {
    let (bytes, _) = vgg_file(stages, 1, true, seed);
    let e = load(&bytes);
    let (b, h, w) = (4usize, 6usize, 6usize);
    let image = Shape { c: 1, h, w };
    let taps = e.taps(None).unwrap();
    let mut rng = HostRng::new(seed + 100, &[]);
    let x = uniform(&mut rng, b * h * w);
    let fake = Rc::new(gpu.upload_f32(&x, &[b, 1, h, w], "fake").unwrap());
    let net = e.build(gpu, b, fake.clone(), image, &taps, true).unwrap();
    let cfg = TrackerConfig {
        lr: 0.05, // trackers well away from zero after one step
        weight: 1.0,
        ..Default::default()
    };
    let step = gpu
        .upload_u32(bytemuck::cast_slice(&[StepState::default()]), &[8], "step")
        .unwrap();
    let loss = MomentLoss::new(gpu, &cfg, &net, &step).unwrap();
    // Real statistics of random real images through the CPU twin.
    let xr = uniform(&mut rng, 9 * h * w);
    let rf = e.cpu_taps(9, &xr, image, &taps).unwrap();
    let real: Vec<Vec<f32>> = rf
        .iter()
        .zip(&net.taps)
        .map(|(f, t)| mk::cpu::interleave(&mk::cpu::feature_stats(f, t.shape.len())))
        .collect();
    let real_t: Vec<_> = real
        .iter()
        .map(|r| gpu.upload_f32(r, &[r.len()], "real").unwrap())
        .collect();
    let state: Vec<_> = loss
        .state_sizes()
        .iter()
        .map(|&n| gpu.zeros(&[n], DType::F32, "state").unwrap())
        .collect();
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    loss.copy_in(&mut enc, &real_t, &state).unwrap();
    gpu.queue().submit([enc.finish()]);
    let mut ks = net.forward.refs();
    ks.extend(loss.kernels.iter());
    ks.extend(net.backward.refs());
    gpu.run(&ks).unwrap();
    let gx = gpu.read_f32(net.grad_input.as_ref().unwrap()).unwrap();
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    loss.copy_out(&mut enc, &state).unwrap();
    gpu.queue().submit([enc.finish()]);
    // The trackers of tap i are state[2 i].
    let track: Vec<Vec<f32>> = state
        .iter()
        .step_by(2)
        .map(|t| gpu.read_f32(t).unwrap())
        .collect();
    assert!(
        track.iter().flatten().any(|v| v.abs() > 1e-3),
        "trackers moved"
    );
    // CPU: the objective of every tap with the trackers fixed, by central differences in x.
    let objective = |xv: &[f32]| -> f64 {
        let f = e.cpu_taps(b, xv, image, &taps).unwrap();
        f.iter()
            .zip(&net.taps)
            .enumerate()
            .map(|(i, (fi, t))| mk::cpu::objective(fi, t.shape.len(), &real[i], &track[i], 1.0))
            .sum()
    };
    let hstep = 1e-3f32;
    let mut worst = 0f64;
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += hstep;
        xm[i] -= hstep;
        let fd = (objective(&xp) - objective(&xm)) / (2.0 * hstep as f64);
        let err = (fd - gx[i] as f64).abs() / (1e-3 + fd.abs().max(gx[i].abs() as f64));
        worst = worst.max(err);
        assert!(
            (fd - gx[i] as f64).abs() < 2e-3 + 2e-2 * fd.abs(),
            "d/dx[{i}]: finite difference {fd}, gradient {}",
            gx[i]
        );
    }
    assert!(
        gx.iter().any(|g| g.abs() > 1e-4),
        "a gradient that is not zero"
    );
    eprintln!("worst relative error {worst:.2e}");
}

#[test]
fn moment_loss_gradient_through_a_whole_encoder_matches_finite_differences() {
    let gpu = common::gpu();
    // Convs with BatchNorm folded, ReLUs, one max pool; every ReLU tapped.
    gradient_through_encoder(&gpu, &[Some(3), None, Some(4)], 11);
}

#[test]
fn loaded_encoder_files_round_trip_from_disk() {
    let (bytes, _) = vgg_file(STAGES, 3, true, 12);
    let dir = common::scratch("encoder", "disk");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("vgg.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let e = Encoder::load(&p).unwrap();
    assert_eq!(
        e,
        Encoder {
            name: p.display().to_string(),
            ..load(&bytes)
        }
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client's readout statistics from the GPU equal the sums over the CPU twin's features, and
/// the fit on them is a working readout: LDA separates two well-separated classes.
#[test]
fn readout_statistics_match_cpu_and_the_fit_separates_classes() {
    use prism::loss::readout::{self, ReadoutKind, ReadoutStats};
    let gpu = common::gpu();
    let (bytes, _) = vgg_file(&[Some(3)], 1, false, 31);
    let mut base = load(&bytes);
    base.features = vec![base.layers.len() - 1];
    let (h, w, count, classes) = (5usize, 4usize, 300usize, 2usize);
    let image = Shape { c: 1, h, w };
    let pixels = h * w;
    let mut rng = HostRng::new(32, &[]);
    // Class 1 images are bright in the top half, class 0 in the bottom half.
    let labels: Vec<u8> = (0..count).map(|i| (i % 2) as u8).collect();
    let img: Vec<u8> = (0..count)
        .flat_map(|i| {
            let top = labels[i] == 1;
            let noise: Vec<f64> = (0..pixels).map(|_| rng.unit_f64()).collect();
            (0..pixels).map(move |p| {
                let bright = (p < pixels / 2) == top;
                ((if bright { 180.0 } else { 40.0 }) + 60.0 * noise[p]) as u8
            })
        })
        .collect();
    let images = data::upload_images(&gpu, &img, pixels, "images").unwrap();
    let s =
        readout::client_statistics(&gpu, &base, image, &images, &labels, count, classes).unwrap();
    let x: Vec<f32> = (0..count)
        .flat_map(|i| data::image_values(&img, pixels, i))
        .collect();
    let f = base
        .cpu_taps(count, &x, image, &base.features)
        .unwrap()
        .remove(0);
    let d = f.len() / count;
    assert_eq!(s.features(), d);
    let mean: Vec<f64> = (0..d)
        .map(|a| (0..count).map(|i| f[i * d + a] as f64).sum::<f64>() / count as f64)
        .collect();
    let mut gram = vec![0f64; d * d];
    let mut cross = vec![0f64; d * classes];
    for i in 0..count {
        let c: Vec<f64> = (0..d).map(|a| f[i * d + a] as f64 - mean[a]).collect();
        for a in 0..d {
            cross[a * classes + labels[i] as usize] += c[a];
            for b in 0..d {
                gram[a * d + b] += c[a] * c[b];
            }
        }
    }
    let close = |what: &str, got: &[f64], want: &[f64]| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() < 1e-3 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    };
    close("gram", &s.gram, &gram);
    close("mean", &s.mean, &mean);
    close("cross", &s.cross, &cross);
    assert_eq!(s.class_counts, vec![150.0, 150.0]);
    // Statistics of two halves combine into those of the whole (the server's aggregation).
    let half = count / 2;
    let img_a = data::upload_images(&gpu, &img[..half * pixels], pixels, "a").unwrap();
    let img_b = data::upload_images(&gpu, &img[half * pixels..], pixels, "b").unwrap();
    let sa = readout::client_statistics(&gpu, &base, image, &img_a, &labels[..half], half, classes)
        .unwrap();
    let sb = readout::client_statistics(
        &gpu,
        &base,
        image,
        &img_b,
        &labels[half..],
        count - half,
        classes,
    )
    .unwrap();
    let both = ReadoutStats::combine(&[sa, sb]).unwrap();
    assert_eq!(both.count, count as f64);
    close("combined gram", &both.gram, &gram);
    close("combined mean", &both.mean, &mean);
    close("combined cross", &both.cross, &cross);
    // The LDA code of class 1 exceeds class 0's in the class-1 coordinate.
    let r = readout::fit(&s, ReadoutKind::Lda).unwrap();
    let e = readout::with_readout(&base, &r, "lda");
    let code = e.cpu_taps(count, &x, image, &e.features).unwrap().remove(0);
    let right = (0..count)
        .filter(|&i| (code[2 * i + 1] > code[2 * i]) == (labels[i] == 1))
        .count();
    assert!(right > count * 95 / 100, "{right} of {count} separated");
    let p = readout::fit(&s, ReadoutKind::Pca).unwrap();
    assert_eq!(p.dims, readout::PCA_DIMS.min(d));
}
