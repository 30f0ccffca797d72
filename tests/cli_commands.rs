//! Every `prism` command run as a user runs it, binary and all, on good input and on bad
//! (missing file, damaged file, wrong kind of file), with the documented exit codes: 0 ok,
//! 2 usage error, 3 data error, 4 GPU error (README, "Commands").

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prism::model::Model;
use prism::nn::Architecture;

fn prism(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `prism args` and checks its exit code; returns what it printed (stdout, stderr).
fn expect(code: i32, args: &[&str]) -> (String, String) {
    let out = prism(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert_eq!(
        out.status.code(),
        Some(code),
        "prism {args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    (stdout, stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A folder with a calibrated random mlp28 model, a damaged copy, and a file of the wrong kind.
struct Files {
    dir: PathBuf,
    model: PathBuf,
    damaged: PathBuf,
    png: PathBuf,
}

fn files(name: &str) -> Files {
    let dir = common::scratch("cli", name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = common::random_model(Architecture::preset("mlp28", 1).unwrap(), 4);
    m.calibrate(&common::gpu()).unwrap();
    let model = dir.join("m.prism");
    m.save(&model).unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let damaged = dir.join("damaged.prism");
    std::fs::write(&damaged, bytes).unwrap();
    let png = dir.join("not-a-model.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n not really").unwrap();
    Files {
        dir,
        model,
        damaged,
        png,
    }
}

#[test]
fn info_lists_the_adapters_and_describes_the_selected_one() {
    let (out, _) = expect(0, &["info"]);
    assert!(
        out.contains("adapters wgpu can see") && out.contains("selected:"),
        "{out}"
    );
    // An adapter that does not exist is a GPU error.
    let (_, err) = expect(4, &["info", "--adapter", "no such adapter name"]);
    assert!(err.contains("no such adapter name"), "{err}");
}

#[test]
fn sample_writes_a_grid_and_single_images_and_refuses_bad_files() {
    let f = files("sample");
    let grid = f.dir.join("grid.png");
    let folder = f.dir.join("images");
    expect(
        0,
        &[
            "sample",
            "--model",
            s(&f.model),
            "-n",
            "6",
            "--out",
            s(&grid),
            "--folder",
            s(&folder),
        ],
    );
    let g = image::open(&grid).unwrap();
    // 6 images of 28 x 28 in 3 columns and 2 rows, 2-pixel borders.
    assert_eq!((g.width(), g.height()), (3 * 30 + 2, 2 * 30 + 2));
    for i in 0..6 {
        let one = image::open(folder.join(format!("{i:05}.png"))).unwrap();
        assert_eq!((one.width(), one.height()), (28, 28));
    }
    assert!(!folder.join("00006.png").exists());

    let missing = f.dir.join("missing.prism");
    let (_, err) = expect(3, &["sample", "--model", s(&missing), "--out", s(&grid)]);
    assert!(err.contains("missing.prism"), "{err}");
    let (_, err) = expect(3, &["sample", "--model", s(&f.damaged), "--out", s(&grid)]);
    assert!(err.contains("checksum"), "{err}");
    let (_, err) = expect(3, &["sample", "--model", s(&f.png), "--out", s(&grid)]);
    assert!(err.contains("magic") || err.contains("too short"), "{err}");
    // Usage errors: no images, a model with a mask choice, no source at all.
    expect(2, &["sample", "--model", s(&f.model), "-n", "0"]);
    expect(
        2,
        &["sample", "--model", s(&f.model), "--mask", "threshold"],
    );
    expect(2, &["sample"]);
    expect(2, &["sample", "--no-such-flag"]);
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[test]
fn eval_prints_its_table_and_refuses_bad_files() {
    let f = files("eval");
    let data = common::data_dir();
    let (out, _) = expect(
        0,
        &[
            "eval",
            "--model",
            s(&f.model),
            "-n",
            "60",
            "--data",
            s(&data),
        ],
    );
    assert!(
        out.starts_with("60 generated vs 60 held-out mnist images"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("generated ")).count(),
        2
    );
    let (out_batch, _) = expect(
        0,
        &[
            "eval",
            "--model",
            s(&f.model),
            "-n",
            "60",
            "--data",
            s(&data),
            "--norm",
            "batch",
        ],
    );
    assert!(out_batch.contains("generated "));
    expect(3, &["eval", "--model", s(&f.damaged), "--data", s(&data)]);
    // A data folder without the data: refused, never replaced by another folder.
    let (_, err) = expect(3, &["eval", "--model", s(&f.model), "--data", s(&f.dir)]);
    assert!(err.contains(s(&f.dir)), "{err}");
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[test]
fn export_writes_a_model_and_dense_weights_and_refuses_bad_files() {
    let f = files("export");
    let again = f.dir.join("again.prism");
    let st = f.dir.join("w.safetensors");
    let (_, err) = expect(
        0,
        &[
            "export",
            "--model",
            s(&f.model),
            "--out",
            s(&again),
            "--safetensors",
            s(&st),
        ],
    );
    assert!(err.contains("bits per weight"), "{err}");
    assert_eq!(Model::load(&again).unwrap(), Model::load(&f.model).unwrap());
    let (arch, weights) = prism::model::load_safetensors(&st).unwrap();
    assert_eq!(arch, Model::load(&f.model).unwrap().arch);
    assert_eq!(
        weights,
        Model::load(&f.model).unwrap().dense_weights().unwrap()
    );

    expect(2, &["export", "--model", s(&f.model)]);
    expect(
        3,
        &[
            "export",
            "--checkpoint",
            s(&f.dir.join("none.bin")),
            "--out",
            s(&again),
        ],
    );
    // A model file is not a checkpoint.
    expect(
        3,
        &["export", "--checkpoint", s(&f.model), "--out", s(&again)],
    );
    expect(3, &["export", "--model", s(&f.damaged), "--out", s(&again)]);
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[test]
fn fetch_refuses_an_unknown_dataset_as_a_usage_error() {
    let (_, err) = expect(2, &["fetch", "imagenet"]);
    assert!(err.contains("mnist"), "{err}");
}

#[test]
fn train_refuses_bad_configurations_before_any_work() {
    expect(2, &["train", "--clients", "0"]);
    expect(2, &["train", "--dp-clip", "0.2"]);
    let dir = common::scratch("cli", "train");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.json");
    std::fs::write(&cfg, b"{ not json").unwrap();
    let (_, err) = expect(3, &["train", "--config", s(&cfg)]);
    assert!(err.contains("c.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
