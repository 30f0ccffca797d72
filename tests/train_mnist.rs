//! The training path end to end on real MNIST (from ../shared/data or $PRISM_DATA): a few
//! rounds of a tiny configuration learn (loss and held-out MMD fall), a run is a function of
//! its seed, and a stopped run resumes to exactly the same result.

mod common;

use std::path::PathBuf;

use prism::fl::checkpoint::Checkpoint;
use prism::fl::simulation::{run, RunOptions};
use prism::fl::{FeatureSpace, TrainConfig};

fn tiny(rounds: usize) -> TrainConfig {
    common::tiny_config(3, rounds, 7)
}

fn options(out: &PathBuf) -> RunOptions {
    let mut o = RunOptions::new(out);
    o.data = Some(common::data_dir());
    o.sample_every = 0;
    o.eval_every = 1;
    o
}

#[test]
fn a_tiny_federated_run_learns() {
    let gpu = common::gpu();
    let out = common::scratch("test", "learns");
    // Packed uploads: exactly one bit per masked weight plus the header.
    let cfg = TrainConfig {
        entropy_coding: false,
        ..tiny(8)
    };
    let s = run(&gpu, &cfg, &options(&out)).unwrap();
    assert_eq!(s.rounds_done, 8);
    let lines = common::metrics(&out);
    assert_eq!(lines.len(), 8);
    let f = |i: usize, k: &str| lines[i][k].as_f64().unwrap();
    assert_learns(&lines, "default features");
    // One bit per masked weight plus a small header.
    let weights = prism::nn::Architecture::preset("mlp28", 1)
        .unwrap()
        .masked_weights()
        .unwrap() as f64;
    let per_client = f(0, "bits_up_per_client");
    assert!(
        per_client >= weights && per_client < weights + 1024.0,
        "{per_client} bits for {weights} weights"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["lambda"].as_f64().is_some_and(|v| v > 0.0 && v < 1.0)),
        "MADA's lambda each round"
    );
    assert!(out.join("samples.png").is_file() && out.join("checkpoint.bin").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

/// From the first round to the last, the mean local loss and the held-out MMD each fall by
/// more than 20%.
fn assert_learns(lines: &[serde_json::Value], what: &str) {
    let f = |i: usize, k: &str| lines[i][k].as_f64().unwrap();
    let last = lines.len() - 1;
    for (key, name) in [("loss", "loss"), ("mmd_heldout", "held-out MMD")] {
        assert!(
            f(last, key) < 0.8 * f(0, key),
            "{what}: {name} {} -> {}",
            f(0, key),
            f(last, key)
        );
    }
}

/// Both feature-space losses (pixels plus a frozen random encoder of one or two stages, the
/// second through the strided narrow input-gradient kernel) train: loss and held-out MMD fall.
#[test]
fn feature_space_losses_learn() {
    let gpu = common::gpu();
    for features in [FeatureSpace::RandomPatches, FeatureSpace::RandomConv] {
        let out = common::scratch("test", &format!("features-{features:?}"));
        let cfg = TrainConfig {
            features,
            ..tiny(6)
        };
        run(&gpu, &cfg, &options(&out)).unwrap();
        let lines = common::metrics(&out);
        assert_learns(&lines, &format!("{features:?}"));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn same_seed_same_result_and_exact_resume() {
    let gpu = common::gpu();
    let cfg = tiny(4);
    let a = common::scratch("test", "det-a");
    let b = common::scratch("test", "det-b");
    run(&gpu, &cfg, &options(&a)).unwrap();
    // The second run stops after 2 rounds and resumes for the rest.
    let mut o = options(&b);
    o.stop_after = Some(2);
    assert_eq!(run(&gpu, &cfg, &o).unwrap().rounds_done, 2);
    o.stop_after = None;
    o.resume = true;
    assert_eq!(run(&gpu, &cfg, &o).unwrap().rounds_done, 4);
    let ca = Checkpoint::load(&a.join("checkpoint.bin")).unwrap();
    let cb = Checkpoint::load(&b.join("checkpoint.bin")).unwrap();
    assert_eq!(
        ca.scores, cb.scores,
        "resumed run differs from the uninterrupted one"
    );
    assert_eq!(ca.client_moments, cb.client_moments);
    assert_eq!(ca.client_loss, cb.client_loss);
    assert_eq!(ca.client_steps, cb.client_steps);
    assert_eq!(ca.metrics.len(), cb.metrics.len());
    // Entropy-coded uploads (the default) never cost more than the packed bits.
    assert!(ca
        .metrics
        .iter()
        .all(|m| m["bits_per_weight"].as_f64().unwrap() < 1.01));
    // A different seed gives a different model.
    let c = common::scratch("test", "det-c");
    run(&gpu, &TrainConfig { seed: 8, ..cfg }, &options(&c)).unwrap();
    assert_ne!(
        Checkpoint::load(&c.join("checkpoint.bin")).unwrap().scores,
        ca.scores
    );
    for d in [a, b, c] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// A small VGG-shaped encoder file (conv 8, pool, conv 16, with BatchNorm) in a scratch folder.
fn encoder_file(dir: &std::path::Path, seed: u32) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let (bytes, _) = common::vgg_file(&[Some(8), None, Some(16)], 1, true, seed);
    let p = dir.join("encoder.safetensors");
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// The reference's loss alone (moment matching of a loaded encoder's ReLU outputs, no pixel
/// term): the recorded loss falls, and a stopped run resumes to exactly the same scores and
/// trackers (the trackers are client state, held by checkpoints).
#[test]
fn moment_matching_with_a_loaded_encoder_learns_and_resumes_exactly() {
    let gpu = common::gpu();
    let dir = common::scratch("test", "moments-encoder");
    let cfg = TrainConfig {
        loss: prism::fl::LossChoice::Moments,
        encoder: Some(encoder_file(&dir, 21)),
        pixel_weight: 0.0,
        tracker_lr: 1e-3,
        ..tiny(6)
    };
    let a = dir.join("a");
    run(&gpu, &cfg, &options(&a)).unwrap();
    let lines = common::metrics(&a);
    let f = |i: usize| lines[i]["loss"].as_f64().unwrap();
    assert!(f(5) < 0.8 * f(0), "moment loss {} -> {}", f(0), f(5));
    let b = dir.join("b");
    let mut o = options(&b);
    o.stop_after = Some(3);
    run(&gpu, &cfg, &o).unwrap();
    o.stop_after = None;
    o.resume = true;
    run(&gpu, &cfg, &o).unwrap();
    let ca = Checkpoint::load(&a.join("checkpoint.bin")).unwrap();
    let cb = Checkpoint::load(&b.join("checkpoint.bin")).unwrap();
    assert_eq!(ca.scores, cb.scores, "resumed run differs");
    assert!(
        ca.client_loss.iter().all(|c| c.len() == 4),
        "2 taps: trackers and Adam each"
    );
    assert_eq!(
        ca.client_loss, cb.client_loss,
        "trackers differ after resuming"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kernel MMD on a loaded encoder's tapped layers plus pixel MMD trains (loss and held-out MMD
/// fall).
#[test]
fn encoder_feature_mmd_learns() {
    let gpu = common::gpu();
    let dir = common::scratch("test", "mmd-encoder");
    let cfg = TrainConfig {
        encoder: Some(encoder_file(&dir, 22)),
        encoder_layers: Some(vec![2]),
        ..tiny(6)
    };
    let out = dir.join("run");
    run(&gpu, &cfg, &options(&out)).unwrap();
    assert_learns(&common::metrics(&out), "encoder MMD");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The paper's configuration in miniature (issue: `--arch resnet32 --encoder FILE`): a small
/// ResNet generator at 32x32 trained with the moment loss of a loaded encoder for a few local
/// steps; the loss falls.
#[test]
fn a_small_resnet_with_the_feature_loss_learns() {
    use prism::data::locate::{self, Named, Split};
    use prism::fl::Trainer;
    let gpu = common::gpu();
    let dir = common::scratch("test", "resnet-features");
    let arch = prism::nn::arch::resnet("resnet-small", 1, 16, [32, 16, 8, 8]);
    let data = locate::load(Named::Mnist, Some(&common::data_dir()), Split::Train, false)
        .unwrap()
        .take(512)
        .resized(32, 32)
        .unwrap();
    let cfg = TrainConfig {
        loss: prism::fl::LossChoice::Moments,
        encoder: Some(encoder_file(&dir, 23)),
        pixel_weight: 0.0,
        tracker_lr: 1e-3,
        batch: 16,
        local_steps: 10,
        lr: 0.1,
        ..Default::default()
    };
    let parts = vec![(0..512).collect::<Vec<usize>>()];
    let trainer = Trainer::new(&gpu, &cfg, &arch, &data, &parts).unwrap();
    let mut rng = prism::rng::HostRng::new(5, &[]);
    let scores: Vec<_> = trainer
        .layer_sizes()
        .iter()
        .map(|&n| {
            let s: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            gpu.upload_f32(&s, &[n], "scores").unwrap()
        })
        .collect();
    let mut state = trainer.new_client_state(&gpu).unwrap();
    let mut losses = Vec::new();
    for round in 0..3 {
        let r = trainer
            .local_run(&gpu, 0, round, &scores, &mut state)
            .unwrap();
        // The client continues from its own scores: copy them back as the next broadcast.
        for (t, l) in scores.iter().zip(&trainer.net.layers) {
            gpu.copy(&l.scores, t).unwrap();
        }
        losses.extend(r.losses);
    }
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        last < 0.8 * first,
        "moment loss of the small ResNet {first} -> {last}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The round loop one step at a time (`Run::fit`, `aggregate`, `observe`, `metrics`,
/// `record`): each step's result is what it says, and the stepped run ends where the driver
/// `run` ends (same metrics apart from wall times, same scores).
#[test]
fn a_run_stepped_round_by_round_matches_the_driver() {
    use prism::fl::simulation::Run;
    let gpu = common::gpu();
    let cfg = TrainConfig {
        drop_rate: 0.3,
        ..tiny(3)
    };
    let driven = common::scratch("test", "driven");
    run(&gpu, &cfg, &options(&driven)).unwrap();
    let stepped = common::scratch("test", "stepped");
    let mut r = Run::start(&gpu, &cfg, &options(&stepped)).unwrap();
    assert_eq!((r.start_round(), r.rounds_done()), (0, 0));
    while r.wants_round() {
        let round = r.rounds_done();
        let mut fit = r.fit().unwrap();
        assert_eq!(fit.round as usize, round);
        assert_eq!(fit.selected, [0, 1, 2], "fraction_fit 1 selects everyone");
        assert_eq!(fit.results.len() + fit.failures.len(), 3);
        assert_eq!(fit.losses.len(), fit.results.len());
        assert_eq!(fit.timing.local_steps, 6 * fit.results.len());
        assert!(fit.bits_up > 0 || fit.results.is_empty());
        assert_eq!(
            r.rounds_done(),
            round,
            "fit alone does not finish the round"
        );
        let report = r.aggregate(&mut fit).unwrap();
        assert_eq!(r.rounds_done(), round + 1);
        assert_eq!(report.lambda.is_some(), !fit.results.is_empty());
        let mmd = r.observe(&mut fit.timing).unwrap();
        assert!(
            mmd.is_some_and(|v| v.is_finite() && v > 0.0),
            "eval_every 1: {mmd:?}"
        );
        let m = r.metrics(&fit, &report, mmd);
        assert_eq!(m.round as usize, round + 1);
        r.record(&m).unwrap();
    }
    assert_eq!(r.summary().rounds_done, 3);
    let strip = |out: &PathBuf| -> Vec<serde_json::Value> {
        common::metrics(out)
            .into_iter()
            .map(|mut l| {
                let o = l.as_object_mut().unwrap();
                o.remove("wall_s");
                o.remove("timing");
                l
            })
            .collect()
    };
    assert_eq!(strip(&stepped), strip(&driven));
    let scores = |out: &PathBuf| {
        Checkpoint::load(&out.join("checkpoint.bin"))
            .unwrap()
            .scores
    };
    assert_eq!(scores(&stepped), scores(&driven));
}

/// A DP run end to end: clients upload masks sampled from noisy clipped probabilities, the
/// server selects clients by Poisson sampling at fraction_fit (what the accountant assumes),
/// and each round's reported epsilon is the accountant's for that noise, rate and round count.
#[test]
fn a_dp_run_reports_the_accountants_epsilon_for_its_sampling() {
    use prism::fl::dp::Accountant;
    use prism::fl::DpConfig;
    let gpu = common::gpu();
    let out = common::scratch("test", "dp");
    let dp = DpConfig {
        clip: 0.1,
        noise_multiplier: 1.0,
        delta: 1e-5,
    };
    let cfg = TrainConfig {
        clients: 6,
        fraction_fit: 0.5,
        dp: Some(dp),
        ..tiny(4)
    };
    run(&gpu, &cfg, &options(&out)).unwrap();
    let lines = common::metrics(&out);
    assert_eq!(lines.len(), 4);
    let accountant = Accountant::new(0.5, 1.0, 1e-5);
    let mut sizes = Vec::new();
    for (r, l) in lines.iter().enumerate() {
        let eps = l["epsilon"].as_f64().expect("a DP run reports epsilon");
        assert!(
            (eps - accountant.epsilon(r + 1)).abs() < 1e-9,
            "round {}: {eps}",
            r + 1
        );
        sizes.push(l["selected"].as_u64().unwrap());
        assert!(l["mmd_heldout"].as_f64().is_some_and(f64::is_finite));
    }
    // Poisson selection: the number of clients varies from round to round (a fixed-size
    // subset would always be 3 of 6).
    assert!(
        sizes.iter().any(|&s| s != sizes[0]),
        "selected clients per round: {sizes:?}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// Partial participation, FedPM's persistent prior and PRISM-alpha each run end to end and do
/// what they say: half the clients train a round, the prior accumulates over rounds instead of
/// resetting, and the alpha layers upload scores (32 bits a weight) instead of masks.
#[test]
fn partial_participation_persistent_prior_and_alpha_run_end_to_end() {
    let gpu = common::gpu();
    let runs = [
        (
            "fraction",
            TrainConfig {
                clients: 4,
                fraction_fit: 0.5,
                ..tiny(2)
            },
        ),
        (
            "prior",
            TrainConfig {
                persistent_prior: true,
                ..tiny(2)
            },
        ),
        (
            "alpha",
            TrainConfig {
                alpha: 0.5,
                ..tiny(2)
            },
        ),
    ];
    for (name, cfg) in runs {
        let out = common::scratch("test", name);
        run(&gpu, &cfg, &options(&out)).unwrap();
        let lines = common::metrics(&out);
        assert_eq!(lines.len(), 2, "{name}");
        for l in &lines {
            assert!(
                l["mmd_heldout"].as_f64().is_some_and(f64::is_finite),
                "{name}"
            );
            let selected = l["selected"].as_u64().unwrap();
            let bits = l["bits_per_weight"].as_f64().unwrap();
            match name {
                "fraction" => assert_eq!(selected, 2, "half of 4 clients"),
                "alpha" => assert!(bits > 8.0, "score layers send f32: {bits} bits a weight"),
                _ => assert!(bits < 1.1, "{name}: masks at about 1 bit a weight, {bits}"),
            }
        }
        if name == "prior" {
            // Beta(1, 1) plus each round's smoothed masks: after 2 rounds of 3 clients the
            // prior's two parameters sum to 2 + 2 x 3 everywhere.
            let c = Checkpoint::load(&out.join("checkpoint.bin")).unwrap();
            for p in &c.priors {
                for ab in p.chunks(2) {
                    assert!((ab[0] + ab[1] - 8.0).abs() < 1e-3, "prior {ab:?}");
                }
            }
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A folder of images with class sub-folders: a held-out tenth chosen by the seed that
/// training never sees, class labels that make label shards work, and `prism eval` on it.
#[test]
fn a_folder_dataset_has_a_held_out_split_classes_and_evaluation() {
    use prism::data::locate::Split;
    use prism::data::resolve::{folder_heldout, load_images};
    use prism::nn::Shape;
    let gpu = common::gpu();
    let dir = common::scratch("test", "folder-data");
    // 3 classes of 20 images, each image a distinct pattern.
    for c in 0..3u32 {
        let class = dir.join(format!("class{c}"));
        std::fs::create_dir_all(&class).unwrap();
        for i in 0..20u32 {
            let img = image::RgbImage::from_fn(28, 28, |x, y| {
                let v = ((x * (c + 1) + y * 3 + i * 11) % 256) as u8;
                image::Rgb([v, (c * 100) as u8, 255 - v])
            });
            img.save(class.join(format!("{i:02}.png"))).unwrap();
        }
    }
    let name = dir.to_str().unwrap().to_string();
    let shape = Shape { c: 3, h: 28, w: 28 };
    let load = |split, seed| load_images(&name, None, false, split, shape, seed).unwrap();
    let (train, test) = (load(Split::Train, 5), load(Split::Test, 5));
    assert_eq!((train.len(), test.len()), (54, 6), "a tenth held out");
    let held = folder_heldout(60, 5);
    assert_eq!(held.len(), 6);
    // Disjoint: no held-out image is among the training images.
    for t in 0..test.len() {
        assert!(
            (0..train.len()).all(|i| train.image(i) != test.image(t)),
            "held-out image {t} is in the training split"
        );
    }
    // Another seed holds out other images; the same seed the same ones.
    assert_ne!(folder_heldout(60, 6), held);
    assert_eq!(folder_heldout(60, 5), held);
    // Classes from the sub-folders.
    let mut classes = train.labels.clone();
    classes.sort_unstable();
    classes.dedup();
    assert_eq!(classes, vec![0, 1, 2]);

    // A federation on the folder with label shards, then evaluation on its held-out split.
    let out = common::scratch("test", "folder-run");
    let cfg = TrainConfig {
        dataset: name.clone(),
        partition: "shards:1".into(),
        ..tiny(1)
    };
    run(&gpu, &cfg, &options(&out)).unwrap();
    let lines = common::metrics(&out);
    assert!(lines[0]["mmd_heldout"].as_f64().is_some_and(f64::is_finite));
    let m = prism::model::from_checkpoint(&out.join("checkpoint.bin"), prism::MaskKind::Sample)
        .unwrap();
    assert_eq!(m.dataset, name);
    let e = m
        .evaluate(&gpu, 3, None, prism::Normalisation::Population)
        .unwrap();
    assert_eq!(e.count, 3, "3 of the 6 held-out images against 3 others");
    assert!(e.generated().mmd2.is_finite());
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
