//! Masked convolution and transposed convolution against direct CPU loops, for kernel sizes,
//! strides and paddings including the paper's 3x3, 1x1 and 1x1 -> 4x4 transposed layer; plus
//! finite-difference checks of the gradients.

mod common;

use common::{assert_close, check_fd, devices, dot, normal, uniform};
use prism::gpu::{DType, Gpu, Tensor};
use prism::kernels::conv::{self, cpu, ConvShape, ConvTransposeShape};
use prism::kernels::mask;
use prism::kernels::matmul::{cpu as mcpu, Estimator};
use prism::kernels::weights::{cpu as wcpu, Init, MaskSource};
use prism::kernels::{Product, ScoreGradIo, StepState};
use prism::rng::HostRng;

#[allow(clippy::too_many_arguments)]
fn cs(
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> ConvShape {
    ConvShape {
        batch,
        cin,
        cout,
        h,
        w,
        kh: k,
        kw: k,
        stride,
        pad,
    }
}

fn shapes() -> Vec<ConvShape> {
    vec![
        cs(2, 3, 5, 7, 7, 3, 1, 1),    // 3x3, odd channel counts
        cs(1, 8, 16, 8, 8, 3, 1, 1),   // batch 1, aligned K (8 * 9 = 72)
        cs(3, 4, 6, 6, 5, 1, 1, 0),    // 1x1, non-square
        cs(2, 2, 3, 9, 9, 4, 2, 1),    // stride 2
        cs(1, 3, 2, 11, 10, 5, 2, 2),  // 5x5 stride 2
        cs(2, 16, 33, 5, 5, 3, 1, 1),  // more outputs than one octet
        cs(3, 1, 32, 28, 28, 4, 2, 1), // the loss's random patch encoder
        cs(2, 4, 5, 8, 7, 3, 3, 1),    // stride 3, taps per class 1 or 2
        cs(2, 1, 4, 7, 7, 1, 2, 0),    // kernel smaller than the stride: classes without taps
        cs(3, 2, 8, 30, 30, 3, 1, 1),  // score gradient in 2 K slices of 1350 positions each
    ]
}

fn step() -> StepState {
    StepState {
        client: 2,
        step: 5,
        round: 0,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn conv_forward_grad_input_grad_score_match_cpu() {
    let mut rng = HostRng::new(31, &[]);
    for gpu in devices() {
        for s in shapes() {
            let n = s.weights();
            let layer = common::layer(3, 4, Init::SignedConstant, (s.cin * s.kh * s.kw) as u32);
            let scores = normal(&mut rng, n);
            let keep_cpu = mask::cpu::thresholds(&scores);
            let keep = gpu
                .upload_u32(&keep_cpu, &[keep_cpu.len()], "keep")
                .unwrap();
            let st = gpu
                .upload_u32(bytemuck::cast_slice(&[step()]), &[8], "step")
                .unwrap();
            let src = MaskSource::Train {
                keep: &keep,
                step: &st,
            };
            let weff = wcpu::effective(
                &layer,
                n,
                &wcpu::Source::Train {
                    keep: &keep_cpu,
                    step: step(),
                },
            );
            let x = uniform(&mut rng, s.input_len());
            let dy = uniform(&mut rng, s.output_len());
            let tx = gpu.upload_f32(&x, &[s.input_len()], "x").unwrap();
            let tdy = gpu.upload_f32(&dy, &[s.output_len()], "dy").unwrap();
            let ty = gpu.tensor(&[s.output_len()], DType::F32, "y").unwrap();
            let tdx = gpu.tensor(&[s.input_len()], DType::F32, "dx").unwrap();
            let ts = gpu.upload_f32(&scores, &[n], "scores").unwrap();
            let tg = gpu.tensor(&[n], DType::F32, "g").unwrap();
            let f = conv::forward(&gpu, &s, &Product::new(&layer, &src, &tx, &ty)).unwrap();
            let b = conv::grad_input(&gpu, &s, &Product::new(&layer, &src, &tdy, &tdx)).unwrap();
            let g = conv::grad_score(
                &gpu,
                &s,
                &layer,
                Estimator::PScaled,
                &ScoreGradIo {
                    x: &tx,
                    dy: &tdy,
                    scores: &ts,
                    grad: &tg,
                },
            )
            .unwrap();
            let [g1, g2] = g.kernels();
            gpu.run(&[&f, &b, g1, g2]).unwrap();
            let tag = format!("{s:?} {:?}", gpu.features().row_share);
            assert_close(
                &format!("forward {tag}"),
                &gpu.read_f32(&ty).unwrap(),
                &cpu::forward(&s, &x, &weff),
                1e-5,
                1e-4,
            );
            assert_close(
                &format!("grad_input {tag}"),
                &gpu.read_f32(&tdx).unwrap(),
                &cpu::grad_input(&s, &dy, &weff),
                1e-5,
                1e-4,
            );
            let frozen = wcpu::frozen_all(&layer, n);
            let want = mcpu::grad_score(
                Estimator::PScaled,
                &cpu::grad_weight(&s, &x, &dy),
                &frozen,
                &scores,
            );
            assert_close(
                &format!("grad_score {tag}"),
                &gpu.read_f32(&tg).unwrap(),
                &want,
                1e-6,
                1e-4,
            );
        }
    }
}

#[test]
fn conv_score_gradient_splits_long_reductions() {
    // 64 x 16 x 16 positions: the reduction is split into slices and summed.
    let gpu = common::gpu();
    let mut rng = HostRng::new(32, &[]);
    let s = cs(64, 4, 8, 16, 16, 3, 1, 1);
    let layer = common::layer(1, 0, Init::KaimingNormal, 36);
    let x = uniform(&mut rng, s.input_len());
    let dy = uniform(&mut rng, s.output_len());
    let scores = normal(&mut rng, s.weights());
    let tx = gpu.upload_f32(&x, &[x.len()], "x").unwrap();
    let tdy = gpu.upload_f32(&dy, &[dy.len()], "dy").unwrap();
    let ts = gpu.upload_f32(&scores, &[scores.len()], "s").unwrap();
    let tg = gpu.tensor(&[s.weights()], DType::F32, "g").unwrap();
    let g = conv::grad_score(
        &gpu,
        &s,
        &layer,
        Estimator::StraightThrough,
        &ScoreGradIo {
            x: &tx,
            dy: &tdy,
            scores: &ts,
            grad: &tg,
        },
    )
    .unwrap();
    assert!(g.partials.workgroups().iter().product::<u32>() > 1);
    let [a, b] = g.kernels();
    gpu.run(&[a, b]).unwrap();
    let frozen = wcpu::frozen_all(&layer, s.weights());
    let want = mcpu::grad_score(
        Estimator::StraightThrough,
        &cpu::grad_weight(&s, &x, &dy),
        &frozen,
        &scores,
    );
    assert_close(
        "split grad_score",
        &gpu.read_f32(&tg).unwrap(),
        &want,
        1e-5,
        1e-4,
    );
}

fn ts(
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> ConvTransposeShape {
    ConvTransposeShape {
        batch,
        cin,
        cout,
        h,
        w: h,
        kh: k,
        kw: k,
        stride,
        pad,
    }
}

#[test]
fn transposed_conv_matches_cpu_scatter() {
    let mut rng = HostRng::new(33, &[]);
    // The paper's first layer in miniature (1x1 -> 4x4, kernel 4), and strided upsampling.
    let shapes = [
        ts(3, 16, 8, 1, 4, 1, 0),
        ts(2, 3, 5, 4, 4, 2, 1),
        ts(1, 4, 4, 3, 3, 1, 1),
    ];
    for gpu in devices() {
        for s in shapes {
            let n = s.weights();
            // PRISM.md: the reference's "fan_in" of a transposed conv is cout * kh * kw.
            let layer = common::layer(8, 0, Init::SignedConstant, (s.cout * s.kh * s.kw) as u32);
            let bits_cpu =
                mask::cpu::pack(&(0..n).map(|_| rng.unit_f64() < 0.6).collect::<Vec<_>>());
            let bits = gpu
                .upload_u32(&bits_cpu, &[bits_cpu.len()], "bits")
                .unwrap();
            let weff = wcpu::effective(&layer, n, &wcpu::Source::Packed(&bits_cpu));
            let x = uniform(&mut rng, s.batch * s.cin * s.h * s.w);
            let out_len = s.batch * s.cout * s.oh() * s.ow();
            let tx = gpu.upload_f32(&x, &[x.len()], "x").unwrap();
            let ty = gpu.tensor(&[out_len], DType::F32, "y").unwrap();
            let k = conv::transpose_forward(
                &gpu,
                &s,
                &Product::new(&layer, &MaskSource::Packed(&bits), &tx, &ty),
            )
            .unwrap();
            gpu.run(&[&k]).unwrap();
            assert_close(
                &format!("convT {s:?}"),
                &gpu.read_f32(&ty).unwrap(),
                &cpu::transpose_forward(&s, &x, &weff),
                1e-5,
                1e-4,
            );
            // The adjoint identity <convT(x), r> = <x, convT^T(r)> checks the input gradient.
            let r = uniform(&mut rng, out_len);
            let tr = gpu.upload_f32(&r, &[out_len], "r").unwrap();
            let tdx = gpu.tensor(&[x.len()], DType::F32, "dx").unwrap();
            let kb = conv::transpose_grad_input(
                &gpu,
                &s,
                &Product::new(&layer, &MaskSource::Packed(&bits), &tr, &tdx),
            )
            .unwrap();
            gpu.run(&[&kb]).unwrap();
            let y = cpu::transpose_forward(&s, &x, &weff);
            let lhs: f64 = y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum();
            let rhs: f64 = gpu
                .read_f32(&tdx)
                .unwrap()
                .iter()
                .zip(&x)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            assert!(
                (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
                "adjoint {s:?}: {lhs} vs {rhs}"
            );
        }
    }
}

/// The frozen weights times the mask's mean sigmoid(s): the relaxed weights whose exact
/// derivative the straight-through estimator is.
fn relaxed(frozen: &[f32], scores: &[f32]) -> Vec<f32> {
    frozen
        .iter()
        .zip(scores)
        .map(|(w, s)| w / (1.0 + (-s).exp()))
        .collect()
}

/// The score gradient of a convolution or transposed convolution, read back.
fn score_gradient(gpu: &Gpu, kernels: conv::ScoreGrad, grad: &Tensor) -> Vec<f32> {
    let [a, b] = kernels.kernels();
    gpu.run(&[a, b]).unwrap();
    gpu.read_f32(grad).unwrap()
}

/// Central differences of L = sum(r * conv(x)) with respect to x and to the relaxed scores
/// (mask replaced by sigmoid(s), whose exact derivative the straight-through estimator is),
/// for a convolution and a transposed convolution.
#[test]
fn conv_gradients_finite_differences() {
    let gpu = common::gpu();
    let mut rng = HostRng::new(34, &[]);
    let s = cs(2, 2, 3, 4, 4, 3, 2, 1);
    let t = ts(2, 3, 2, 2, 4, 2, 1);
    let n = s.weights();
    let layer = common::layer(5, 1, Init::KaimingNormal, 18);
    let frozen = wcpu::frozen_all(&layer, n);
    let scores = normal(&mut rng, n);
    let h = 1e-2f32;

    // Convolution.
    let x = uniform(&mut rng, s.input_len());
    let r = uniform(&mut rng, s.output_len());
    let loss = |xv: &[f32], sc: &[f32]| dot(&cpu::forward(&s, xv, &relaxed(&frozen, sc)), &r);
    let tx = gpu.upload_f32(&x, &[x.len()], "x").unwrap();
    let tr = gpu.upload_f32(&r, &[r.len()], "r").unwrap();
    let tdx = gpu.tensor(&[x.len()], DType::F32, "dx").unwrap();
    let ts_ = gpu.upload_f32(&scores, &[n], "s").unwrap();
    let tg = gpu.tensor(&[n], DType::F32, "g").unwrap();
    // Input gradient of the unmasked network (an all-ones packed mask) against FD of the CPU
    // loss with sigmoid(inf) = 1; score gradient against FD of the relaxed loss.
    let all = mask::cpu::pack(&vec![true; n]);
    let bits = gpu.upload_u32(&all, &[all.len()], "ones").unwrap();
    let kb = conv::grad_input(
        &gpu,
        &s,
        &Product::new(&layer, &MaskSource::Packed(&bits), &tr, &tdx),
    )
    .unwrap();
    gpu.run(&[&kb]).unwrap();
    let ones = vec![f32::INFINITY; n];
    let dx = gpu.read_f32(&tdx).unwrap();
    check_fd("conv dx", &x, &dx, h, 2e-3, &mut |xv| loss(xv, &ones));
    let io = ScoreGradIo {
        x: &tx,
        dy: &tr,
        scores: &ts_,
        grad: &tg,
    };
    let kg = conv::grad_score(&gpu, &s, &layer, Estimator::StraightThrough, &io).unwrap();
    let gs = score_gradient(&gpu, kg, &tg);
    check_fd("conv ds", &scores, &gs, h, 2e-3, &mut |sc| loss(&x, sc));

    // Transposed convolution: score gradient against FD of the CPU scatter.
    let nt = t.weights();
    let lt = common::layer(6, 2, Init::SignedConstant, 32);
    let ft = wcpu::frozen_all(&lt, nt);
    let st = normal(&mut rng, nt);
    let xt = uniform(&mut rng, t.batch * t.cin * t.h * t.w);
    let rt = uniform(&mut rng, t.batch * t.cout * t.oh() * t.ow());
    let loss_t = |sc: &[f32]| dot(&cpu::transpose_forward(&t, &xt, &relaxed(&ft, sc)), &rt);
    let txt = gpu.upload_f32(&xt, &[xt.len()], "xt").unwrap();
    let trt = gpu.upload_f32(&rt, &[rt.len()], "rt").unwrap();
    let tst = gpu.upload_f32(&st, &[nt], "st").unwrap();
    let tgt = gpu.tensor(&[nt], DType::F32, "gt").unwrap();
    let io = ScoreGradIo {
        x: &txt,
        dy: &trt,
        scores: &tst,
        grad: &tgt,
    };
    let kt = conv::transpose_grad_score(&gpu, &t, &lt, Estimator::StraightThrough, &io).unwrap();
    let gt = score_gradient(&gpu, kt, &tgt);
    check_fd("convT ds", &st, &gt, h, 2e-3, &mut |sc| loss_t(sc));
}
