//! Weight regeneration and mask kernels against their CPU twins: bit-exact where the
//! arithmetic is integer (hash, weights, masks), close where it goes through exp/log.

mod common;

use common::{assert_close, devices, normal};
use prism::gpu::DType;
use prism::kernels::mask::{self, AggregateOptions, Aggregation};
use prism::kernels::weights::{self, cpu as wcpu, Init, LayerWeights, MaskSource};
use prism::kernels::{adam, StepState};
use prism::rng::{self, HostRng};

const SIZES: &[usize] = &[1, 31, 32, 33, 1000, 4099, 70_001];

#[test]
fn frozen_weights_are_bit_identical_to_cpu() {
    for gpu in devices() {
        for init in [Init::SignedConstant, Init::KaimingNormal] {
            for &n in SIZES {
                let layer = LayerWeights {
                    seed: 1234,
                    layer: 3,
                    init,
                    fan_in: 77,
                };
                let out = gpu.tensor(&[n], DType::F32, "w").unwrap();
                let k = weights::materialize(&gpu, &layer, n, &MaskSource::Frozen, &out).unwrap();
                gpu.run(&[&k]).unwrap();
                let got = gpu.read_f32(&out).unwrap();
                let want = wcpu::frozen_all(&layer, n);
                let got_bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                let want_bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got_bits, want_bits, "{init:?} n={n}");
            }
        }
    }
}

#[test]
fn weight_statistics_match_kaiming() {
    let n = 200_000;
    let fan_in = 50;
    for init in [Init::SignedConstant, Init::KaimingNormal] {
        let layer = LayerWeights {
            seed: 9,
            layer: 0,
            init,
            fan_in,
        };
        let w = wcpu::frozen_all(&layer, n);
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.003, "{init:?} mean {mean}");
        assert!(
            (var / (2.0 / fan_in as f64) - 1.0).abs() < 0.02,
            "{init:?} var {var}"
        );
    }
    // Different layers and seeds give unrelated weights.
    let a = wcpu::frozen_all(&common::layer(1, 0, Init::SignedConstant, 4), 10_000);
    let b = wcpu::frozen_all(&common::layer(1, 1, Init::SignedConstant, 4), 10_000);
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!((4_700..5_300).contains(&agree), "{agree}");
}

/// Thresholds against the CPU twin, and the training mask from them exact: drawn in-kernel
/// (the "train" source) and sampled once per step into packed bits (`mask::sample_step`, what
/// training networks read), on both adapter forms and sizes off the 32-bit word.
#[test]
fn thresholds_match_cpu_and_training_masks_are_exact() {
    let mut rng = HostRng::new(5, &[1]);
    for gpu in devices() {
        for &n in SIZES {
            let scores: Vec<f32> = normal(&mut rng, n).iter().map(|x| x * 3.0).collect();
            let s = gpu.upload_f32(&scores, &[n], "scores").unwrap();
            let keep = gpu
                .tensor(&[mask::keep_words(n)], DType::U32, "keep")
                .unwrap();
            gpu.run(&[&mask::thresholds(&gpu, &s, &keep).unwrap()])
                .unwrap();
            let got = gpu.read_u32(&keep).unwrap();
            // sigmoid is not exactly rounded on GPUs: thresholds may differ by one unit.
            for (i, &s) in scores.iter().enumerate() {
                let g = wcpu::threshold_of(&got, i) as i64;
                let w = mask::cpu::threshold(s) as i64;
                assert!((g - w).abs() <= 1, "threshold {i}: {g} vs {w}");
            }
            // Given the thresholds, the training mask is integer arithmetic: exact.
            let step = StepState {
                client: 4,
                step: 17,
                round: 2,
                seed: 0,
                ..Default::default()
            };
            let st = gpu
                .upload_u32(bytemuck::cast_slice(&[step]), &[8], "step")
                .unwrap();
            let layer = common::layer(77, 1, Init::SignedConstant, 9);
            let out = gpu.tensor(&[n], DType::F32, "weff").unwrap();
            let src = MaskSource::Train {
                keep: &keep,
                step: &st,
            };
            gpu.run(&[&weights::materialize(&gpu, &layer, n, &src, &out).unwrap()])
                .unwrap();
            let want = wcpu::effective(&layer, n, &wcpu::Source::Train { keep: &got, step });
            assert_eq!(gpu.read_f32(&out).unwrap(), want, "train mask n={n}");
            // The step's mask sampled once into packed bits (what training networks read)
            // is the same mask: bit for bit against the CPU twin, and as a weight source.
            let bits = gpu
                .tensor(&[mask::packed_words(n)], DType::U32, "step mask")
                .unwrap();
            let mask_key = layer.gen().mask_key;
            gpu.run(&[&mask::sample_step(&gpu, n, &keep, mask_key, &st, &bits).unwrap()])
                .unwrap();
            let step_bits = gpu.read_u32(&bits).unwrap();
            let key = wcpu::step_mask_key(&layer.gen(), &step);
            assert_eq!(
                step_bits,
                mask::cpu::sample_packed(n, &got, key),
                "step mask n={n}"
            );
            gpu.run(&[
                &weights::materialize(&gpu, &layer, n, &MaskSource::Packed(&bits), &out).unwrap(),
            ])
            .unwrap();
            assert_eq!(
                gpu.read_f32(&out).unwrap(),
                want,
                "step mask as weights n={n}"
            );
        }
    }
}

/// The differentially private thresholds (PRISM.md section 5): against the CPU twin element by
/// element, and as a distribution over many draws: the noise has mean 0 and variance sigma^2
/// where theta + noise stays inside [0, 1]; theta is clipped to [c, 1 - c] before the noise,
/// and the noisy value clamped to [0, 1] after it.
#[test]
fn dp_thresholds_match_cpu_and_have_the_mechanisms_distribution() {
    let (clip, sigma, key) = (0.1f32, 0.05f32, rng::key_path(3, &[rng::stream::DP, 1, 2]));
    for gpu in devices() {
        // The kernel's packed noisy thresholds of `scores` at noise `sigma`.
        let noisy = |scores: &[f32], sigma: f32| {
            let n = scores.len();
            let s = gpu.upload_f32(scores, &[n], "scores").unwrap();
            let keep = gpu
                .tensor(&[mask::keep_words(n)], DType::U32, "keep")
                .unwrap();
            gpu.run(&[&mask::dp_thresholds(&gpu, &s, clip, sigma, key, &keep).unwrap()])
                .unwrap();
            gpu.read_u32(&keep).unwrap()
        };
        let mut rng = HostRng::new(6, &[2]);
        for &n in SIZES {
            let scores: Vec<f32> = normal(&mut rng, n).iter().map(|x| x * 4.0).collect();
            let got = noisy(&scores, sigma);
            let want = mask::cpu::dp_thresholds(&scores, clip, sigma, key);
            for i in 0..n {
                let (g, w) = (wcpu::threshold_of(&got, i), wcpu::threshold_of(&want, i));
                assert!(g.abs_diff(w) <= 1, "noisy threshold {i} of {n}: {g} vs {w}");
            }
        }
        // The distribution: one score per clip regime, 200,000 draws each.
        let n = 200_000;
        for (score, theta) in [(0.0f32, 0.5f32), (-9.0, clip), (9.0, 1.0 - clip)] {
            let got = noisy(&vec![score; n], sigma);
            let values: Vec<f64> = (0..n)
                .map(|i| wcpu::threshold_of(&got, i) as f64 / 65536.0)
                .collect();
            let mean = values.iter().sum::<f64>() / n as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            // theta is at least 0.1 from either end and sigma 0.05: clamping touches 2.3% of
            // the draws at most, so mean and spread are the noise's (quantisation adds 1/65536).
            assert!(
                (mean - theta as f64).abs() < 0.001,
                "score {score}: mean {mean}, clipped theta {theta}"
            );
            let sd = var.sqrt();
            assert!(
                (sd - sigma as f64).abs() < 0.002,
                "score {score}: noise sd {sd}, sigma {sigma}"
            );
            assert!(values.iter().all(|v| (0.0..=65535.0 / 65536.0).contains(v)));
        }
        // Large noise: clamped to [0, 1], so both ends are hit and nothing falls outside.
        let big = 2.0f32;
        let got = noisy(&vec![0.0; n], big);
        let zeros = (0..n).filter(|&i| wcpu::threshold_of(&got, i) == 0).count();
        let ones = (0..n)
            .filter(|&i| wcpu::threshold_of(&got, i) == 65535)
            .count();
        // P(0.5 + 2 z < 0) = P(z < -0.25) = 0.401.
        for (what, count) in [("0", zeros), ("1", ones)] {
            let share = count as f64 / n as f64;
            assert!((share - 0.401).abs() < 0.01, "clamped at {what}: {share}");
        }
    }
}

#[test]
fn packed_samples_are_exact_and_have_the_right_rate() {
    let mut rng = HostRng::new(6, &[1]);
    let gpu = common::gpu();
    for &n in SIZES {
        let scores = normal(&mut rng, n);
        let keep_cpu = mask::cpu::thresholds(&scores);
        let keep = gpu
            .upload_u32(&keep_cpu, &[keep_cpu.len()], "keep")
            .unwrap();
        let bits = gpu
            .tensor(&[mask::packed_words(n)], DType::U32, "bits")
            .unwrap();
        let key = rng::key_path(3, &[rng::stream::UPLOAD, 1, 2]);
        gpu.run(&[&mask::sample_packed(&gpu, n, &keep, key, &bits).unwrap()])
            .unwrap();
        let got = gpu.read_u32(&bits).unwrap();
        assert_eq!(got, mask::cpu::sample_packed(n, &keep_cpu, key), "n={n}");
        // Unpack round trip, and the packed mask as a weight source.
        let vals = gpu.tensor(&[n], DType::F32, "vals").unwrap();
        gpu.run(&[&mask::unpack(&gpu, n, &bits, &vals).unwrap()])
            .unwrap();
        let unpacked: Vec<bool> = gpu
            .read_f32(&vals)
            .unwrap()
            .iter()
            .map(|&v| v == 1.0)
            .collect();
        assert_eq!(mask::cpu::pack(&unpacked), got);
        let layer = common::layer(2, 5, Init::SignedConstant, 3);
        let out = gpu.tensor(&[n], DType::F32, "weff").unwrap();
        gpu.run(&[
            &weights::materialize(&gpu, &layer, n, &MaskSource::Packed(&bits), &out).unwrap(),
        ])
        .unwrap();
        assert_eq!(
            gpu.read_f32(&out).unwrap(),
            wcpu::effective(&layer, n, &wcpu::Source::Packed(&got))
        );
    }
    // The sample's rate follows the probabilities.
    let n = 400_000;
    let p = 0.3f32;
    let s = (p / (1.0 - p)).ln();
    let keep_cpu = mask::cpu::thresholds(&vec![s; n]);
    let ones: u32 = mask::cpu::sample_packed(n, &keep_cpu, 99)
        .iter()
        .map(|w| w.count_ones())
        .sum();
    assert!((ones as f64 / n as f64 - 0.3).abs() < 0.003, "{ones}");
}

#[test]
fn pack_positive_and_hamming() {
    let mut rng = HostRng::new(7, &[1]);
    let gpu = common::gpu();
    for &n in SIZES {
        let a = normal(&mut rng, n);
        let b = normal(&mut rng, n);
        let ta = gpu.upload_f32(&a, &[n], "a").unwrap();
        let tb = gpu.upload_f32(&b, &[n], "b").unwrap();
        let ba = gpu
            .tensor(&[mask::packed_words(n)], DType::U32, "ba")
            .unwrap();
        let bb = gpu
            .tensor(&[mask::packed_words(n)], DType::U32, "bb")
            .unwrap();
        let count = gpu.zeros(&[1], DType::U32, "count").unwrap();
        let ks = [
            mask::pack_positive(&gpu, &ta, &ba).unwrap(),
            mask::pack_positive(&gpu, &tb, &bb).unwrap(),
            mask::hamming(&gpu, n, &ba, &bb, &count).unwrap(),
        ];
        gpu.run(&ks.iter().collect::<Vec<_>>()).unwrap();
        let pa = mask::cpu::pack(&a.iter().map(|&x| x > 0.0).collect::<Vec<_>>());
        let pb = mask::cpu::pack(&b.iter().map(|&x| x > 0.0).collect::<Vec<_>>());
        assert_eq!(gpu.read_u32(&ba).unwrap(), pa);
        assert_eq!(
            gpu.read_u32(&count).unwrap()[0],
            mask::cpu::hamming(&pa, &pb),
            "n={n}"
        );
    }
}

#[test]
fn aggregation_matches_cpu_for_every_rule() {
    let mut rng = HostRng::new(8, &[1]);
    for gpu in devices() {
        for &n in &[1usize, 100, 5000] {
            for rule in [Aggregation::MeanOfSmoothed, Aggregation::PersistentPrior] {
                let clients = 7;
                let masks: Vec<Vec<u32>> = (0..clients)
                    .map(|_| {
                        mask::cpu::pack(&(0..n).map(|_| rng.unit_f64() < 0.4).collect::<Vec<_>>())
                    })
                    .collect();
                let mut flat: Vec<u32> = masks.concat();
                // Room for more clients than report: only the first `clients` are read.
                flat.extend(std::iter::repeat_n(u32::MAX, mask::packed_words(n)));
                let scores = normal(&mut rng, n);
                let mut prior: Vec<f32> = (0..2 * n)
                    .map(|_| 1.0 + rng.unit_f64() as f32 * 3.0)
                    .collect();
                let lambda_count = (n / 5) as u32;
                let tm = gpu.upload_u32(&flat, &[flat.len()], "masks").unwrap();
                let ts = gpu.upload_f32(&scores, &[n], "scores").unwrap();
                let tc = gpu.upload_u32(&[lambda_count], &[1], "count").unwrap();
                let th = gpu.tensor(&[n], DType::F32, "s_hat").unwrap();
                let to = gpu.tensor(&[n], DType::F32, "out").unwrap();
                let tp = gpu.upload_f32(&prior, &[2 * n], "prior").unwrap();
                let opts = AggregateOptions {
                    rule,
                    lo: 0.01,
                    hi: 0.99,
                };
                let ka = mask::aggregate(&gpu, n, clients, &opts, &tm, &tp, &th).unwrap();
                let kb = mask::blend(&gpu, n, &tc, &th, &ts, &to).unwrap();
                gpu.run(&[&ka, &kb]).unwrap();
                let want_hat = mask::cpu::aggregate(n, &masks, &opts, &mut prior);
                let lambda = lambda_count as f32 / n as f32;
                assert_close("s_hat", &gpu.read_f32(&th).unwrap(), &want_hat, 1e-5, 1e-5);
                assert_close(
                    "blend",
                    &gpu.read_f32(&to).unwrap(),
                    &mask::cpu::blend(lambda, &want_hat, &scores),
                    1e-5,
                    1e-5,
                );
                if rule == Aggregation::PersistentPrior {
                    assert_close("prior", &gpu.read_f32(&tp).unwrap(), &prior, 0.0, 0.0);
                } else {
                    // Without the persistent prior, |s_hat| <= logit(0.99).
                    assert!(want_hat.iter().all(|s| s.abs() <= 4.5952));
                }
            }
        }
    }
}

#[test]
fn adam_matches_cpu_and_refreshes_thresholds() {
    let mut rng = HostRng::new(10, &[1]);
    let cfg = adam::AdamConfig::default();
    // Both forms of the kernel: eight vectors per invocation (lavapipe's default) and one.
    for gpu in common::devices() {
        // Sizes around the kernel's vectors of four scores and its 4,096 scores per workgroup,
        // with every remainder mod 4.
        for n in [1usize, 2, 3, 4, 5, 3001, 4096, 4097, 8190, 12_291] {
            let mut scores = normal(&mut rng, n);
            let mut moments = vec![0f32; 2 * n];
            let ts = gpu.upload_f32(&scores, &[n], "scores").unwrap();
            let tm = gpu.upload_f32(&moments, &[2 * n], "moments").unwrap();
            let tk = gpu
                .tensor(&[mask::keep_words(n)], DType::U32, "keep")
                .unwrap();
            let step = StepState {
                client: 0,
                step: 0,
                round: 0,
                seed: 0,
                ..Default::default()
            };
            let tst = gpu
                .upload_u32(bytemuck::cast_slice(&[step]), &[8], "step")
                .unwrap();
            let tg = gpu.tensor(&[n], DType::F32, "grad").unwrap();
            let state = adam::TrainingState {
                scores: &ts,
                moments: &tm,
                keep: &tk,
                step: &tst,
            };
            let k_step = adam::step(&gpu, &cfg, &tg, &state).unwrap();
            let k_adv = adam::advance(&gpu, &tst).unwrap();
            for t in 1..=5u32 {
                let grad = normal(&mut rng, n);
                gpu.write_f32(&tg, &grad).unwrap();
                gpu.run(&[&k_step, &k_adv]).unwrap();
                adam::cpu::step(&cfg, t, &grad, &mut scores, &mut moments);
            }
            if n == 3001 {
                // Gradients that stay 0 or tiny: the first moments halve each step until they
                // are flushed to 0 (not left subnormal), on the GPU as in the twin.
                let tiny: Vec<f32> = (0..n)
                    .map(|i| if i % 2 == 0 { 0.0 } else { 1e-20 })
                    .collect();
                gpu.write_f32(&tg, &tiny).unwrap();
                for t in 6..=160u32 {
                    gpu.run(&[&k_step, &k_adv]).unwrap();
                    adam::cpu::step(&cfg, t, &tiny, &mut scores, &mut moments);
                }
                let got = gpu.read_f32(&tm).unwrap();
                let zeros = moments.iter().filter(|&&m| m == 0.0).count();
                assert!(zeros >= n / 2, "only {zeros} moments were flushed");
                for (i, (&g, &w)) in got.iter().zip(&moments).enumerate() {
                    assert!(g.is_normal() || g == 0.0, "moment {i} is subnormal: {g:e}");
                    assert_eq!(g == 0.0, w == 0.0, "moment {i}: {g:e} vs the twin's {w:e}");
                }
            }
            assert_close("scores", &gpu.read_f32(&ts).unwrap(), &scores, 1e-5, 1e-4);
            assert_close("moments", &gpu.read_f32(&tm).unwrap(), &moments, 1e-6, 1e-4);
            assert_eq!(
                gpu.read_u32(&tst).unwrap()[1],
                if n == 3001 { 160 } else { 5 },
                "step counter advanced once per step"
            );
            let keep = gpu.read_u32(&tk).unwrap();
            for (i, &s) in scores.iter().enumerate() {
                let g = wcpu::threshold_of(&keep, i) as i64;
                let w = mask::cpu::threshold(s) as i64;
                assert!((g - w).abs() <= 2, "n {n}, threshold {i}: {g} vs {w}");
            }
            if n % 2 == 1 {
                assert_eq!(
                    keep[n / 2] >> 16,
                    0,
                    "n {n}: the last keep word's unused half stays 0"
                );
            }
        }
    }
}
