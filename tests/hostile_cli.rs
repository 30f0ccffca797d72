//! Hostile use of the command line (issue 18): each finding of the probe, run on the binary as
//! a careless or malicious user would, some under a memory cap (`ulimit -v`). Every case must
//! end in a clean error naming the real cause (exit 2 usage, 3 data), never a panic, a signal
//! or a silently wrong result.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use prism::kernels::Init;
use prism::model::{MaskKind, Model};
use prism::nn::{Architecture, Layer};

/// Runs `prism args`, under `ulimit -v cap_kb` when given; returns (exit code, stderr).
fn run(args: &[&str], cap_kb: Option<u64>) -> (Option<i32>, String) {
    let bin = env!("CARGO_BIN_EXE_prism");
    let out = match cap_kb {
        None => Command::new(bin).args(args).output().unwrap(),
        Some(kb) => Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {kb} && exec \"$0\" \"$@\""))
            .arg(bin)
            .args(args)
            .output()
            .unwrap(),
    };
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Expects exit `code` and every one of `words` in the error.
fn refused(code: i32, args: &[&str], cap_kb: Option<u64>, words: &[&str]) -> String {
    let (got, err) = run(args, cap_kb);
    assert_eq!(got, Some(code), "prism {args:?}: {err}");
    assert!(!err.contains("panicked"), "prism {args:?} panicked: {err}");
    for w in words {
        assert!(err.contains(w), "prism {args:?}: {w:?} not in {err}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 3 GB of address space: lavapipe and LLVM start in it, and every refusal below asks for more.
const CAP_KB: u64 = 3_000_000;

fn data() -> PathBuf {
    common::data_dir()
}

/// A model whose one layer is Linear `inputs` -> `h * w` grey pixels, all weights masked off.
fn one_layer_model(inputs: usize, h: usize, w: usize) -> Model {
    let arch = Architecture {
        name: "bomb".into(),
        latent: inputs,
        layers: vec![
            Layer::Linear { outputs: h * w },
            Layer::Reshape { c: 1, h, w },
            Layer::Tanh,
        ],
        init: Init::SignedConstant,
    };
    let n = inputs * h * w;
    Model {
        masks: vec![vec![0u32; n.div_ceil(32)]],
        arch,
        seed: 1,
        mask_kind: MaskKind::Sample,
        dataset: "mnist".into(),
        population: None,
    }
}

#[test]
fn partition_and_count_overflows_are_refused_by_name() {
    let dir = common::scratch("hostile", "counts");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("run");
    let d = data();
    // 1. shards:2^63 x 2 clients wrapped and panicked; 2.5 became 2.
    refused(
        2,
        &[
            "train",
            "--data",
            s(&d),
            "--clients",
            "2",
            "--partition",
            "shards:9223372036854775808",
            "--out",
            s(&out),
        ],
        None,
        &["cannot make 9223372036854775808 shards for each of 2 clients"],
    );
    let cfg = dir.join("c.json");
    std::fs::write(&cfg, br#"{"clients": 2, "partition": "shards:2.5"}"#).unwrap();
    refused(
        3,
        &[
            "train",
            "--data",
            s(&d),
            "--config",
            s(&cfg),
            "--out",
            s(&out),
        ],
        None,
        &["whole number"],
    );
    assert!(
        !out.join("config.json").exists(),
        "a refused run leaves no run behind"
    );
    // 9. rounds x local steps past the 32-bit step counter.
    refused(
        2,
        &[
            "train",
            "--rounds",
            "1000000",
            "--local-steps",
            "5000",
            "--out",
            s(&out),
        ],
        None,
        &["32-bit step counter"],
    );
    // 12. A JSON array as the configuration.
    std::fs::write(&cfg, b"[1, 2]").unwrap();
    refused(
        3,
        &["train", "--config", s(&cfg)],
        None,
        &["not a JSON object"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sample_counts_are_bounded_and_the_grid_is_refused_up_front() {
    let dir = common::scratch("hostile", "sample");
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = common::random_model(Architecture::preset("mlp28", 1).unwrap(), 4);
    m.calibrate(&common::gpu()).unwrap();
    let model = dir.join("m.prism");
    m.save(&model).unwrap();
    let grid = dir.join("g.png");
    // 2. -n 2^64-1 panicked ("capacity overflow"); 2^60+4 wrapped to 4 images.
    for n in ["18446744073709551615", "1152921504606846980"] {
        refused(
            2,
            &["sample", "--model", s(&model), "-n", n, "--out", s(&grid)],
            Some(CAP_KB),
            &["give 1 to 4294967296 images"],
        );
    }
    // 3. -n 1e8 allocated every image up front (313.6 GB) and aborted: refused before any work.
    refused(
        2,
        &[
            "sample",
            "--model",
            s(&model),
            "-n",
            "100000000",
            "--out",
            s(&grid),
        ],
        Some(CAP_KB),
        &["larger than its limit of 16384", "--folder"],
    );
    // ... and streamed to a .npy: 20,000 images, a grid of the first 16,384.
    let raw = dir.join("x.npy");
    let (code, err) = run(
        &[
            "sample",
            "--model",
            s(&model),
            "-n",
            "20000",
            "--batch",
            "500",
            "--raw",
            s(&raw),
            "--out",
            s(&grid),
        ],
        Some(CAP_KB),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("grid of the first 16384"), "{err}");
    assert_eq!(
        std::fs::metadata(&raw).unwrap().len(),
        128 + 20_000 * 784 * 4,
        "a .npy header and 20,000 float images"
    );
    // 12. --portable --f16 blamed the adapter; an unknown backend advised installing Mesa.
    refused(
        2,
        &[
            "sample",
            "--model",
            s(&model),
            "--portable",
            "--f16",
            "--out",
            s(&grid),
        ],
        None,
        &["--portable turns off"],
    );
    refused(
        2,
        &["info", "--backend", "foo"],
        None,
        &["unknown backend \"foo\""],
    );
    // eval -n was clamped to 2..5000 silently.
    for n in ["0", "1", "5001"] {
        refused(
            2,
            &["eval", "--model", s(&model), "-n", n, "--data", s(&data())],
            None,
            &["evaluation takes 2 to 5000 images"],
        );
    }
    assert!(
        !std::fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".part")),
        "no .part files left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn oversized_models_and_files_are_refused_before_memory_is_spent() {
    let dir = common::scratch("hostile", "models");
    std::fs::create_dir_all(&dir).unwrap();
    // 6. Export of a small file that inflates to 2 GiB of f32 weights (Linear 16384 -> 32768,
    // every weight masked off), under a 1.5 GB cap: refused by the estimate, not by an abort.
    let bomb = dir.join("bomb.prism");
    one_layer_model(16_384, 128, 256).save(&bomb).unwrap();
    assert!(
        std::fs::metadata(&bomb).unwrap().len() < 4096,
        "a coded all-zero mask is tiny"
    );
    let st = dir.join("bomb.safetensors");
    refused(
        2,
        &["export", "--model", s(&bomb), "--safetensors", s(&st)],
        Some(1_500_000),
        &["exporting a layer of 536870912 weights", "ulimit -v"],
    );
    assert!(!st.exists() && !dir.join("bomb.safetensors.part").exists());
    // 12. Sampling it said "scores needs a ... buffer".
    let (code, err) = run(
        &[
            "sample",
            "--model",
            s(&bomb),
            "--out",
            s(&dir.join("g.png")),
        ],
        Some(CAP_KB),
    );
    assert!(matches!(code, Some(2) | Some(0)), "{err}");
    if code == Some(2) {
        assert!(
            err.contains("masked layer 0 of this model has 536870912 weights"),
            "{err}"
        );
    }
    // 4. 70,000 layers in a valid file: refused by the layer limit.
    let mut deep = one_layer_model(4, 2, 2);
    deep.arch.layers = std::iter::repeat_n(Layer::Relu, 70_000)
        .chain(deep.arch.layers)
        .collect();
    let deep_file = dir.join("deep.prism");
    std::fs::write(&deep_file, deep.encode(None).unwrap()).unwrap();
    refused(
        3,
        &[
            "sample",
            "--model",
            s(&deep_file),
            "--out",
            s(&dir.join("g.png")),
        ],
        Some(CAP_KB),
        &["70003 layers; at most 1024"],
    );
    // 7. A 5 GB file as a model or a checkpoint is refused without being read.
    let huge = dir.join("huge.prism");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(5 << 30).unwrap(); // sparse: no disk spent
    let t = std::time::Instant::now();
    refused(
        3,
        &[
            "sample",
            "--model",
            s(&huge),
            "--out",
            s(&dir.join("g.png")),
        ],
        Some(CAP_KB),
        &["larger than any prism model file can be"],
    );
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::rename(&huge, run_dir.join("checkpoint.bin")).unwrap();
    refused(
        3,
        &["train", "--resume", "--out", s(&run_dir)],
        Some(CAP_KB),
        &["not a prism checkpoint (wrong magic)"],
    );
    assert!(t.elapsed().as_secs() < 30, "the 5 GB file was read");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn runs_are_protected_and_client_counts_bounded() {
    let dir = common::scratch("hostile", "runs");
    let d = data();
    let out = dir.join("run");
    let tiny = [
        "--data",
        s(&d),
        "--arch",
        "mlp28",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--batch",
        "16",
        "--quiet",
        "--sample-every",
        "1",
        "--out",
        s(&out),
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        std::iter::once("train")
            .chain(tiny.iter().copied())
            .chain(extra.iter().copied())
            .map(String::from)
            .collect()
    };
    fn call(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    // 11. --resume with nothing to resume started from round 0.
    refused(
        2,
        &call(&with(&["--resume"])),
        None,
        &["holds no checkpoint to resume"],
    );
    // 8. A second run into the same folder replaced the first silently.
    let (code, err) = run(&call(&with(&["--stop-after", "1"])), None);
    assert_eq!(code, Some(0), "{err}");
    let first = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let err = refused(
        2,
        &call(&with(&[])),
        None,
        &["holds a run", "--resume", "--overwrite"],
    );
    assert!(err.contains("checkpoint.bin"), "{err}");
    // 12. The resume mismatch names the field.
    let mut changed = with(&["--resume"]);
    let at = changed.iter().position(|a| a == "--local-steps").unwrap();
    changed[at + 1] = "3".into();
    refused(2, &call(&changed), None, &["local_steps: 2 -> 3"]);
    // Resuming keeps the log's earlier lines byte for byte.
    let (code, err) = run(&call(&with(&["--resume"])), None);
    assert_eq!(code, Some(0), "{err}");
    let resumed = std::fs::read(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        &resumed[..first.len()],
        &first[..],
        "metrics rewritten on resume"
    );
    // --overwrite replaces the run and leaves no grid of the old one.
    std::fs::write(out.join("samples/round-0099.png"), b"old").unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let (code, err) = run(&call(&with(&["--overwrite", "--stop-after", "1"])), None);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.join("samples/round-0099.png").exists());
    assert!(
        out.join("notes.txt").exists(),
        "only the run's own files are removed"
    );
    // 5. 5000 clients allocated every client's state up front until lavapipe crashed.
    refused(
        2,
        &[
            "train",
            "--data",
            s(&d),
            "--clients",
            "5000",
            "--out",
            s(&dir.join("many")),
        ],
        Some(CAP_KB),
        &["5000 clients of 864256 weights need", "at most"],
    );
    // 12. --stop-after 0 named files it never wrote.
    refused(
        2,
        &call(&with(&["--overwrite", "--stop-after", "0"])),
        None,
        &["--stop-after 0"],
    );
    // 10. --data naming a folder without the data never falls back to other places.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(["train", "--data", s(&empty), "--no-fetch", "--out"])
        .arg(dir.join("nodata"))
        .env("PRISM_DATA", &d) // the data is there, and must not be used
        .output()
        .unwrap();
    let (code, err) = (o.status.code(), String::from_utf8_lossy(&o.stderr));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains(s(&empty)), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// No product of user-given sizes wraps: partitions, configurations and layer tables built
    /// from any values (up to usize::MAX) give a result or an error, never a panic, and an
    /// accepted configuration's counters fit their types.
    #[test]
    fn user_sizes_never_wrap(
        per in proptest::prelude::any::<usize>(),
        clients in proptest::prelude::any::<usize>(),
        rounds in proptest::prelude::any::<usize>(),
        steps in proptest::prelude::any::<usize>(),
        batch in proptest::prelude::any::<usize>(),
        width in proptest::prelude::any::<usize>(),
        latent in proptest::prelude::any::<usize>(),
    ) {
        let labels: Vec<u8> = (0..600).map(|i| (i % 10) as u8).collect();
        let mut rng = prism::rng::HostRng::new(1, &[]);
        let shards = prism::data::partition::Partition::Shards { shards_per_client: per };
        if let Ok(parts) = shards.split(&labels, clients.clamp(1, 600), &mut rng) {
            proptest::prop_assert!(parts.iter().map(Vec::len).sum::<usize>() == 600);
        }
        let cfg = prism::TrainConfig {
            clients,
            rounds,
            local_steps: steps,
            batch,
            min_fit_clients: 0,
            ..Default::default()
        };
        if cfg.validate().is_ok() {
            proptest::prop_assert!((rounds as u64) * (steps as u64) <= u32::MAX as u64);
        }
        let arch = Architecture {
            name: "any".into(),
            latent,
            layers: vec![Layer::Linear { outputs: width }, Layer::Tanh],
            init: Init::SignedConstant,
        };
        if let Ok(layers) = arch.masked_layers() {
            proptest::prop_assert!(layers[0].weights as u128 == latent as u128 * width as u128);
        }
        let _ = arch.validate();
        let _ = prism::limits::product(&[(per, "a"), (clients, "b"), (width, "c")], "x");
    }
}
