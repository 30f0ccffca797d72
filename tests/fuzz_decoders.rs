//! Property-based fuzzing of every decoder of outside input: uploads, model files,
//! checkpoints, IDX and CIFAR-10 files, images, coded masks and configuration files.
//!
//! Each target gets random bytes and mutations of a valid encoding (byte overwrites,
//! insertions, truncation), and, where the format carries a CRC, mutations with the CRC
//! recomputed so that the input reaches the field checks behind it. A decoder passes when it
//! returns `Ok` or a typed error for every input: a panic fails the test, and proptest keeps the
//! failing input in `proptest-regressions/` as a regression case. Cases a target:
//! `PRISM_FUZZ_CASES` (default 5000; the closing notes record longer runs). The regression
//! corpus of inputs found by hand or by fuzzing sits at the bottom of this file.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use prism::codec::{self, RangeCoder};
use prism::data::{decode_image, idx, parse_cifar10};
use prism::fl::checkpoint::Checkpoint;
use prism::fl::message::{self, MaskCoder, Payload, Upload};
use prism::fl::TrainConfig;
use prism::model::{MaskKind, Model};
use prism::nn::arch::{Architecture, Layer};
use prism::rng::HostRng;

fn cases() -> u32 {
    std::env::var("PRISM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => any::<usize>().prop_map(Edit::Remove),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(valid: &[u8], edits: &[Edit], fix_crc: bool) -> Vec<u8> {
    let mut v = valid.to_vec();
    for e in edits {
        let n = v.len().max(1);
        match *e {
            Edit::Set(i, b) if !v.is_empty() => v[i % n] = b,
            Edit::Insert(i, b) => v.insert(i % (v.len() + 1), b),
            Edit::Remove(i) if !v.is_empty() => {
                v.remove(i % n);
            }
            Edit::Truncate(i) => v.truncate(i % n),
            _ => {}
        }
    }
    if fix_crc && v.len() >= 4 {
        let body = v.len() - 4;
        let crc = crc32fast::hash(&v[..body]);
        v[body..].copy_from_slice(&crc.to_le_bytes());
    }
    v
}

/// Runs `decode` on random bytes and on mutations of `valid` (with and without the CRC
/// recomputed); returns how many inputs were tried. Any panic fails the test.
fn fuzz(name: &str, valid: &[u8], has_crc: bool, decode: impl Fn(&[u8])) -> u64 {
    let n = cases();
    let mut tried = 0u64;
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(edit(), 1..6),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    );
    let counter = std::cell::Cell::new(0u64);
    runner
        .run(&strategy, |(edits, fix_crc, noise, use_noise)| {
            let input = if use_noise {
                noise
            } else {
                apply(valid, &edits, fix_crc && has_crc)
            };
            decode(&input);
            counter.set(counter.get() + 1);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    tried += counter.get();
    // The valid input itself must still decode (the seeds are real encodings).
    decode(valid);
    eprintln!("fuzz {name}: {tried} inputs, no panic");
    tried
}

const UPLOAD_SIZES: [usize; 3] = [200, 4000, 37];

fn valid_upload() -> Vec<u8> {
    let mut rng = HostRng::new(1, &[2]);
    let sparse: Vec<u32> = (0..4000usize.div_ceil(32))
        .map(|_| {
            let mut w = 0u32;
            for b in 0..32 {
                if rng.unit_f64() < 0.05 {
                    w |= 1 << b;
                }
            }
            w
        })
        .collect();
    let up = Upload {
        round: 3,
        client: 1,
        layers: vec![
            Payload::Bits((0..7).map(|_| rng.next_u32()).collect()),
            Payload::Bits(sparse),
            Payload::Scores((0..37).map(|i| i as f32 * 0.1 - 1.0).collect()),
        ],
    };
    let bytes = message::encode(&up, &UPLOAD_SIZES, Some(&RangeCoder));
    assert_eq!(
        message::decode(&bytes, &UPLOAD_SIZES, Some(&RangeCoder)).unwrap(),
        Upload {
            layers: {
                let mut l = up.layers.clone();
                // Bits past a layer's size are zero on the wire.
                if let Payload::Bits(b) = &mut l[0] {
                    b[6] &= (1 << (200 % 32)) - 1;
                }
                l
            },
            ..up.clone()
        }
    );
    bytes
}

#[test]
fn fuzz_upload_messages() {
    let valid = valid_upload();
    fuzz("upload", &valid, true, |b| {
        let _ = message::decode(b, &UPLOAD_SIZES, Some(&RangeCoder));
    });
}

fn tiny_arch() -> Architecture {
    Architecture {
        name: "tiny".into(),
        latent: 4,
        layers: vec![
            Layer::Linear { outputs: 40 },
            Layer::Relu,
            Layer::Linear { outputs: 16 },
            Layer::Reshape { c: 1, h: 4, w: 4 },
            Layer::Tanh,
        ],
        init: prism::kernels::Init::SignedConstant,
    }
}

fn valid_model() -> Vec<u8> {
    let arch = tiny_arch();
    let sizes: Vec<usize> = arch.mask_sizes().unwrap();
    let mut rng = HostRng::new(4, &[4]);
    let masks = sizes
        .iter()
        .map(|&n| {
            let mut w: Vec<u32> = (0..n.div_ceil(32)).map(|_| rng.next_u32()).collect();
            if n % 32 != 0 {
                w[n / 32] &= (1 << (n % 32)) - 1;
            }
            w
        })
        .collect();
    let m = Model {
        arch,
        seed: 5,
        mask_kind: MaskKind::Sample,
        dataset: "mnist".into(),
        masks,
        population: None,
    };
    let bytes = m.encode(Some(&RangeCoder)).unwrap();
    assert_eq!(Model::decode(&bytes, "seed", Some(&RangeCoder)).unwrap(), m);
    bytes
}

#[test]
fn fuzz_model_files() {
    let valid = valid_model();
    fuzz("model file", &valid, true, |b| {
        let _ = Model::decode(b, "fuzz", Some(&RangeCoder));
    });
}

fn valid_checkpoint() -> Vec<u8> {
    let sizes = [50usize, 9];
    let config = TrainConfig {
        clients: 2,
        ..Default::default()
    };
    let f = |n: usize, a: f32| -> Vec<f32> { (0..n).map(|i| a + i as f32 * 0.01).collect() };
    let c = Checkpoint {
        config,
        rounds_done: 2,
        scores: sizes.iter().map(|&n| f(n, 0.5)).collect(),
        priors: sizes.iter().map(|&n| f(2 * n, 1.0)).collect(),
        client_steps: vec![20, 20],
        client_moments: (0..2)
            .map(|_| sizes.iter().map(|&n| f(2 * n, 0.0)).collect())
            .collect(),
        client_loss: (0..2).map(|k| vec![f(6, k as f32), f(12, 0.1)]).collect(),
        metrics: vec![serde_json::json!({"round": 1, "loss": 0.5})],
    };
    let bytes = c.encode().unwrap();
    assert_eq!(Checkpoint::decode(&bytes, "seed").unwrap(), c);
    bytes
}

#[test]
fn fuzz_checkpoints() {
    let valid = valid_checkpoint();
    fuzz("checkpoint", &valid, true, |b| {
        let _ = Checkpoint::decode(b, "fuzz");
    });
}

#[test]
fn fuzz_idx_files() {
    let data: Vec<u8> = (0..3 * 5 * 4).map(|i| i as u8).collect();
    let valid = idx::encode(&[3, 5, 4], &data);
    fuzz("IDX", &valid, false, |b| {
        let _ = idx::parse(b, "fuzz");
    });
}

#[test]
fn fuzz_cifar10_batches() {
    let mut valid = Vec::new();
    for label in [3u8, 7] {
        valid.push(label);
        valid.extend((0..3072).map(|i| (i % 251) as u8));
    }
    fuzz("CIFAR-10", &valid, false, |b| {
        let _ = parse_cifar10(b, "fuzz");
    });
}

fn encoded_image(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(12, 9, |x, y| {
        image::Rgb([(x * 20) as u8, (y * 25) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn fuzz_png_and_jpeg_images() {
    for (name, format) in [
        ("PNG", image::ImageFormat::Png),
        ("JPEG", image::ImageFormat::Jpeg),
    ] {
        let valid = encoded_image(format);
        fuzz(name, &valid, false, |b| {
            if let Ok(px) = decode_image(b, "fuzz", 8, 3) {
                assert_eq!(px.len(), 3 * 8 * 8);
            }
        });
    }
}

#[test]
fn fuzz_coded_masks() {
    let mut rng = HostRng::new(8, &[8]);
    let n = 3000;
    let mut words = vec![0u32; n / 32 + 1];
    for i in 0..n {
        if rng.unit_f64() < 0.1 {
            words[i / 32] |= 1 << (i % 32);
        }
    }
    let valid = codec::encode(&words, n).unwrap();
    assert_eq!(codec::decode(&valid, n).unwrap(), words);
    fuzz("coded mask", &valid, false, |b| {
        if let Ok(w) = codec::decode(b, n) {
            assert_eq!(w.len(), n.div_ceil(32));
        }
        let _ = RangeCoder.decode(b, 77);
    });
}

#[test]
fn fuzz_configuration_files() {
    let valid = serde_json::to_vec_pretty(&TrainConfig::default()).unwrap();
    fuzz("config JSON (bytes)", &valid, false, |b| {
        let _ = TrainConfig::from_json(b, "fuzz");
    });
    // Structured: well-formed JSON with hostile values in real fields.
    let fields = [
        "clients",
        "rounds",
        "local_steps",
        "batch",
        "real_batch",
        "fraction_fit",
        "min_fit_clients",
        "alpha",
        "lr",
        "beta1",
        "drop_rate",
        "adversaries",
        "seed",
        "partition",
        "arch",
        "dp",
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!("shards:0")),
        Just(serde_json::json!("dirichlet:-1")),
        Just(serde_json::json!("shards:99999999999999999999")),
        Just(serde_json::json!({"clip": 0.7, "noise_multiplier": -1.0, "delta": 2.0})),
        Just(serde_json::json!(null)),
        "[a-z:0-9.]{0,12}".prop_map(serde_json::Value::from),
    ];
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let count = std::cell::Cell::new(0u64);
    runner
        .run(
            &prop::collection::vec((0..fields.len(), value), 1..5),
            |sets| {
                let mut v = serde_json::to_value(TrainConfig::default()).unwrap();
                for (f, x) in sets {
                    v[fields[f]] = x;
                }
                if let Ok(cfg) = TrainConfig::from_json(&serde_json::to_vec(&v).unwrap(), "fuzz") {
                    // Whatever passes validation is usable: partitions parse, sizes are sane.
                    assert!(
                        cfg.clients >= 1 && cfg.batch >= 2 && cfg.min_fit_clients <= cfg.clients
                    );
                }
                count.set(count.get() + 1);
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("config JSON (fields): {e}"));
    eprintln!(
        "fuzz config JSON (fields): {} inputs, no panic",
        count.get()
    );
}

/// Malformed inputs kept as regression cases (each once made a decoder misbehave or is a
/// boundary worth pinning).
#[test]
fn regression_corpus() {
    // A layer table whose sizes multiply past usize (weights = c * cout * k * k).
    let huge = Architecture {
        name: "huge".into(),
        latent: 60_000,
        layers: vec![
            Layer::Reshape {
                c: 60_000,
                h: 1,
                w: 1,
            },
            Layer::Conv {
                cout: 65_536,
                k: 65_536,
                stride: 1,
                pad: 40_000,
            },
        ],
        init: prism::kernels::Init::SignedConstant,
    };
    assert!(huge.masked_layers().is_err());
    assert!(huge.validate().is_err());
    // A transposed convolution on an empty input.
    let empty = Architecture {
        name: "empty".into(),
        latent: 4,
        layers: vec![
            Layer::Reshape { c: 4, h: 1, w: 1 },
            Layer::ConvT {
                cout: 1,
                k: 0,
                stride: 0,
                pad: 0,
            },
        ],
        init: prism::kernels::Init::SignedConstant,
    };
    assert!(empty.validate().is_err());
    // A coded mask that claims every bit is one but carries a payload.
    let mut b = 10u32.to_le_bytes().to_vec();
    b.extend_from_slice(&[1, 2, 3, 4]);
    assert!(codec::decode(&b, 10).is_err());
    // A coded mask that claims more ones than bits.
    assert!(codec::decode(&11u32.to_le_bytes(), 10).is_err());
    // IDX dimensions whose product overflows.
    let mut idx_bytes = vec![0, 0, 8, 3];
    for _ in 0..3 {
        idx_bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    }
    assert!(idx::parse(&idx_bytes, "regression").is_err());
    // An upload whose CRC is right but whose layer claims 2^32 - 1 weights.
    let mut up = valid_upload();
    let at = 4 + 2 + 2 + 12 + 1; // first layer's weight count
    up[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let body = up.len() - 4;
    let crc = crc32fast::hash(&up[..body]);
    up[body..].copy_from_slice(&crc.to_le_bytes());
    assert!(message::decode(&up, &UPLOAD_SIZES, Some(&RangeCoder)).is_err());
    // A checkpoint with NaN scores and a correct CRC.
    let mut ck = valid_checkpoint();
    let cfg_len = u32::from_le_bytes([ck[8], ck[9], ck[10], ck[11]]) as usize;
    let first_score = 12 + cfg_len + 4 + 4 + 4;
    ck[first_score..first_score + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let body = ck.len() - 4;
    let crc = crc32fast::hash(&ck[..body]);
    ck[body..].copy_from_slice(&crc.to_le_bytes());
    let e = Checkpoint::decode(&ck, "regression").unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}
