//! Faults a federated server must survive: malformed, late, unselected and duplicate uploads
//! (counted as failures of the round, which goes on), rounds with too few valid uploads (the
//! previous global scores stay), clients that drop out at random for a whole run, an
//! adversary that uploads all ones (robust aggregation bounds its effect), and a training
//! process killed with SIGKILL at random moments (resuming gives exactly the scores of an
//! uninterrupted run).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prism::codec::RangeCoder;
use prism::fl::checkpoint::Checkpoint;
use prism::fl::message::{self, MaskCoder, Payload, Upload};
use prism::fl::server::{outliers, receive};
use prism::fl::simulation::{run, RunOptions};
use prism::fl::{FailureReason, Prism, ServerModel, Strategy, TrainConfig};
use prism::rng::HostRng;

/// A mask of `n` weights, each kept with probability `p`.
fn random_bits(rng: &mut HostRng, n: usize, p: f64) -> Vec<u32> {
    let mut w = vec![0u32; n.div_ceil(32)];
    for i in 0..n {
        if rng.unit_f64() < p {
            w[i / 32] |= 1 << (i % 32);
        }
    }
    w
}

fn all_ones(n: usize) -> Vec<u32> {
    let mut w = vec![u32::MAX; n.div_ceil(32)];
    if n % 32 != 0 {
        w[n / 32] = (1u32 << (n % 32)) - 1;
    }
    w
}

fn upload(rng: &mut HostRng, sizes: &[usize], round: u32, client: u32) -> Upload {
    Upload {
        round,
        client,
        layers: sizes
            .iter()
            .map(|&n| Payload::Bits(random_bits(rng, n, 0.5)))
            .collect(),
    }
}

#[test]
fn malformed_late_unselected_and_duplicate_uploads_are_failures_not_errors() {
    let sizes = [70usize, 33];
    let mut rng = HostRng::new(5, &[1]);
    let coder: &dyn MaskCoder = &RangeCoder;
    let selected = [0usize, 2, 3];
    let good = upload(&mut rng, &sizes, 4, 2);
    let bytes = message::encode(&good, &sizes, Some(coder));
    let first = receive(&bytes, &sizes, 4, &selected, &[], Some(coder)).unwrap();
    assert_eq!(first, good);

    // The same client again in the same round.
    assert_eq!(
        receive(
            &bytes,
            &sizes,
            4,
            &selected,
            std::slice::from_ref(&first),
            Some(coder)
        ),
        Err(FailureReason::Duplicate)
    );
    // Late: an answer for an earlier round.
    let late = message::encode(&upload(&mut rng, &sizes, 3, 0), &sizes, Some(coder));
    assert_eq!(
        receive(&late, &sizes, 4, &selected, &[], Some(coder)),
        Err(FailureReason::Unexpected)
    );
    // A client that was not asked to train.
    let stranger = message::encode(&upload(&mut rng, &sizes, 4, 1), &sizes, Some(coder));
    assert_eq!(
        receive(&stranger, &sizes, 4, &selected, &[], Some(coder)),
        Err(FailureReason::Unexpected)
    );
    // Damaged in transit, truncated, for another model, or not an upload at all.
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    let other_model = message::encode(&good, &[70, 34], Some(coder));
    for (what, b) in [
        ("flipped bit", flipped),
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
        ("other model", other_model),
        ("empty", Vec::new()),
        ("text", b"hello, server".to_vec()),
    ] {
        match receive(&b, &sizes, 4, &selected, &[], Some(coder)) {
            Err(FailureReason::Malformed(m)) => assert!(!m.is_empty(), "{what}"),
            other => panic!("{what}: expected a malformed upload, got {other:?}"),
        }
    }
}

#[test]
fn a_round_below_min_fit_clients_keeps_the_previous_scores() {
    let gpu = common::gpu();
    let sizes = [300usize, 77];
    let mut server = ServerModel::new(&gpu, &sizes, &[false, false], 4, 9).unwrap();
    let before = server.read_scores(&gpu).unwrap();
    let mut strategy = Prism {
        min_fit_clients: 3,
        ..Default::default()
    };
    let mut rng = HostRng::new(2, &[0]);
    let ups: Vec<Upload> = (0..3).map(|k| upload(&mut rng, &sizes, 0, k)).collect();

    let r = strategy
        .aggregate_fit(&gpu, 0, &mut server, &ups[..2], &[])
        .unwrap();
    assert!(r.kept_previous, "two uploads of three needed: {r:?}");
    assert_eq!(r.lambda, None);
    assert_eq!(server.read_scores(&gpu).unwrap(), before);

    let r = strategy
        .aggregate_fit(&gpu, 0, &mut server, &ups, &[])
        .unwrap();
    assert!(!r.kept_previous);
    assert_eq!(r.used, 3);
    assert_ne!(server.read_scores(&gpu).unwrap(), before);
}

/// MADA's comparison samples are keyed by the run seed (rng.rs): the same uploads over the
/// same global scores give the same lambda under one seed and another under another seed.
#[test]
fn madas_samples_are_keyed_by_the_run_seed() {
    let gpu = common::gpu();
    let sizes = [20_000usize, 3000];
    let mut rng = HostRng::new(4, &[0]);
    let ups: Vec<Upload> = (0..3).map(|k| upload(&mut rng, &sizes, 0, k)).collect();
    let lambda = |seed: u32| {
        let mut server = ServerModel::new(&gpu, &sizes, &[false, false], 4, seed).unwrap();
        for (t, &n) in server.scores.iter().zip(&sizes) {
            let same: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.3).collect();
            gpu.write_f32(t, &same).unwrap();
        }
        let mut strategy = Prism::default();
        assert!(strategy.mada);
        let r = strategy
            .aggregate_fit(&gpu, 0, &mut server, &ups, &[])
            .unwrap();
        r.lambda.unwrap()
    };
    assert_eq!(lambda(1), lambda(1));
    assert_ne!(lambda(1), lambda(2));
}

#[test]
fn the_outlier_test_rejects_masks_unrelated_to_the_majority() {
    let sizes = [4000usize, 1000];
    let mut rng = HostRng::new(3, &[7]);
    // Honest clients sample from the same probabilities (different per weight).
    let probs: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| 0.05 + 0.9 * rng.unit_f64()).collect())
        .collect();
    let honest = |rng: &mut HostRng, k: u32| Upload {
        round: 0,
        client: k,
        layers: probs
            .iter()
            .map(|p| {
                let mut w = vec![0u32; p.len().div_ceil(32)];
                for (i, &q) in p.iter().enumerate() {
                    if rng.unit_f64() < q {
                        w[i / 32] |= 1 << (i % 32);
                    }
                }
                Payload::Bits(w)
            })
            .collect(),
    };
    let mut ups: Vec<Upload> = (0..9).map(|k| honest(&mut rng, k)).collect();
    assert!(outliers(&ups, &[false, false]).is_empty(), "honest clients");
    let attacks: Vec<(&str, Vec<Payload>)> = vec![
        (
            "all ones",
            sizes.iter().map(|&n| Payload::Bits(all_ones(n))).collect(),
        ),
        (
            "all zeros",
            sizes
                .iter()
                .map(|&n| Payload::Bits(vec![0; n.div_ceil(32)]))
                .collect(),
        ),
        (
            "coin flips",
            sizes
                .iter()
                .map(|&n| Payload::Bits(random_bits(&mut rng, n, 0.5)))
                .collect(),
        ),
    ];
    for (what, layers) in attacks {
        ups.push(Upload {
            round: 0,
            client: 9,
            layers,
        });
        assert_eq!(outliers(&ups, &[false, false]), vec![9], "{what}");
        ups.pop();
    }
}

/// Mean keep probability sigmoid(s) over all weights of a checkpoint.
fn mean_keep_probability(ckpt: &Path) -> f64 {
    let c = Checkpoint::load(ckpt).unwrap();
    let (sum, n) = c
        .scores
        .iter()
        .flatten()
        .fold((0.0f64, 0usize), |(s, n), &x| {
            (s + 1.0 / (1.0 + (-x as f64).exp()), n + 1)
        });
    sum / n as f64
}

fn small(clients: usize, rounds: usize) -> TrainConfig {
    common::tiny_config(clients, rounds, 21)
}

fn options(out: &Path, eval_every: usize) -> RunOptions {
    let mut o = RunOptions::new(out);
    o.data = Some(common::data_dir());
    o.sample_every = 0;
    o.eval_every = eval_every;
    o
}

#[test]
fn a_run_with_thirty_percent_of_clients_dropping_still_converges() {
    let gpu = common::gpu();
    let out = common::scratch("faults", "drops");
    let cfg = TrainConfig {
        drop_rate: 0.3,
        ..small(10, 8)
    };
    run(&gpu, &cfg, &options(&out, 1)).unwrap();
    let m = common::metrics(&out);
    assert_eq!(m.len(), 8);
    let dropped: u64 = m.iter().map(|l| l["failures"].as_u64().unwrap()).sum();
    let selected: u64 = m.iter().map(|l| l["selected"].as_u64().unwrap()).sum();
    let rate = dropped as f64 / selected as f64;
    assert!(
        (0.15..0.45).contains(&rate),
        "{dropped} of {selected} uploads dropped"
    );
    let f = |i: usize, k: &str| m[i][k].as_f64().unwrap();
    eprintln!(
        "30% drops: {dropped}/{selected} uploads lost; loss {:.4} -> {:.4}; held-out MMD^2 {:.4} -> {:.4}",
        f(0, "loss"),
        f(7, "loss"),
        f(0, "mmd_heldout"),
        f(7, "mmd_heldout")
    );
    assert!(f(7, "loss") < 0.8 * f(0, "loss"));
    assert!(f(7, "mmd_heldout") < 0.8 * f(0, "mmd_heldout"));
}

#[test]
fn robust_aggregation_bounds_what_one_all_ones_client_does() {
    let gpu = common::gpu();
    let base = TrainConfig {
        partition: "iid".into(),
        ..small(10, 4)
    };
    let mut p = Vec::new();
    for (name, adversaries, robust) in [
        ("honest", 0, false),
        ("attacked", 1, false),
        ("attacked-robust", 1, true),
    ] {
        let out = common::scratch("faults", name);
        let cfg = TrainConfig {
            adversaries,
            robust,
            ..base.clone()
        };
        run(&gpu, &cfg, &options(&out, 0)).unwrap();
        let rejected: Vec<u64> = common::metrics(&out)
            .iter()
            .map(|l| l["rejected"].as_u64().unwrap())
            .collect();
        if robust {
            assert_eq!(
                rejected,
                vec![1; 4],
                "the adversary is rejected every round"
            );
        }
        p.push(mean_keep_probability(&out.join("checkpoint.bin")));
    }
    let shift = (p[1] - p[0]).abs();
    let robust_shift = (p[2] - p[0]).abs();
    eprintln!(
        "mean keep probability after 4 rounds: honest {:.4}, one all-ones client of ten {:.4} \
         (shift {shift:.4}), the same with --robust {:.4} (shift {robust_shift:.4})",
        p[0], p[1], p[2]
    );
    // Without the option the adversary drags every probability towards one; with it, the
    // only change left is that one honest client fewer is averaged.
    assert!(shift > 0.02, "the attack should matter: shift {shift}");
    assert!(
        robust_shift < shift / 4.0,
        "robust shift {robust_shift} vs {shift}"
    );
}

/// Runs `prism train` on the tiny configuration in `out`: `--resume` when the folder has a
/// checkpoint, otherwise `--overwrite` (a run killed before its first checkpoint leaves files
/// that a plain start refuses to replace).
fn train_command(out: &Path) -> Command {
    let continue_or_replace = if out.join("checkpoint.bin").exists() {
        "--resume"
    } else {
        "--overwrite"
    };
    let mut c = Command::new(env!("CARGO_BIN_EXE_prism"));
    c.args([
        "train",
        "--arch",
        "mlp28",
        "--clients",
        "3",
        "--rounds",
        "12",
        "--local-steps",
        "6",
        "--batch",
        "32",
        "--real-batch",
        "0",
        "--lr",
        "0.1",
        "--partition",
        "shards:2",
        "--seed",
        "11",
        "--no-fetch",
        "--quiet",
        "--sample-every",
        "0",
        "--eval-every",
        "0",
        continue_or_replace,
    ])
    .arg("--data")
    .arg(common::data_dir())
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    c
}

#[test]
fn killed_at_random_moments_a_run_resumes_to_exactly_the_same_scores() {
    // The reference: one uninterrupted run.
    let clean = common::scratch("faults", "clean");
    let status = train_command(&clean).status().unwrap();
    assert!(status.success(), "uninterrupted run failed: {status}");
    let want = Checkpoint::load(&clean.join("checkpoint.bin")).unwrap();
    assert_eq!(want.rounds_done, 12);

    // The same run, killed with SIGKILL at random moments and resumed each time.
    let killed = common::scratch("faults", "killed");
    let mut rng = HostRng::new(99, &[0]);
    let mut kills = 0;
    let mut rounds_at_kill = Vec::new();
    let metrics = killed.join("metrics.jsonl");
    let rounds_logged = || {
        std::fs::read_to_string(&metrics)
            .map(|m| m.lines().count())
            .unwrap_or(0)
    };
    // Kill moments are tied to the run's progress, not to the clock (other tests share the
    // CPU): once during start-up, then a random 0-400 ms after the metrics log reaches rounds
    // 2, 5, 8 and 10, which lands in the middle of a round or of a checkpoint write.
    for target in [0usize, 2, 5, 8, 10] {
        let mut child = train_command(&killed).spawn().unwrap();
        let t = Instant::now();
        let mut finished = false;
        let mut reached: Option<Instant> = None;
        let extra = Duration::from_millis(if target == 0 {
            200 + (rng.unit_f64() * 800.0) as u64
        } else {
            (rng.unit_f64() * 400.0) as u64
        });
        loop {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            if reached.is_none() && (target == 0 || rounds_logged() >= target) {
                reached = Some(Instant::now());
            }
            if reached.is_some_and(|r| r.elapsed() >= extra) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "the run hangs");
            std::thread::sleep(Duration::from_millis(5));
        }
        if finished {
            continue;
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;
        // Whatever moment the kill hit, the checkpoint on disk is whole (or not yet written).
        let ckpt = killed.join("checkpoint.bin");
        if ckpt.exists() {
            let c = Checkpoint::load(&ckpt).unwrap_or_else(|e| panic!("after kill {kills}: {e}"));
            rounds_at_kill.push(c.rounds_done);
        } else {
            rounds_at_kill.push(0);
        }
    }
    let status = train_command(&killed).status().unwrap();
    assert!(status.success(), "resumed run failed: {status}");
    eprintln!("killed {kills} times, at rounds {rounds_at_kill:?}");
    assert!(kills >= 3, "only {kills} kills landed before the run ended");
    assert!(
        rounds_at_kill.iter().any(|&r| r > 0 && r < 12),
        "no kill landed mid-run: {rounds_at_kill:?}"
    );
    let got = Checkpoint::load(&killed.join("checkpoint.bin")).unwrap();
    assert_eq!(got.rounds_done, 12);
    assert!(got.scores == want.scores, "final scores differ");
    assert!(got.priors == want.priors, "final priors differ");
    assert!(
        got.client_moments == want.client_moments && got.client_steps == want.client_steps,
        "client Adam states differ"
    );
    // The model files written at the end agree byte for byte.
    assert_eq!(
        std::fs::read(killed.join("model.prism")).unwrap(),
        std::fs::read(clean.join("model.prism")).unwrap()
    );
}
