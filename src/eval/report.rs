//! A generator's evaluation against held-out real images: the metrics of [`super`] in pixel
//! space and in the features of a frozen random encoder, beside reference rows (real against
//! real, and real images degraded by noise and by blur) that show what the numbers mean.
//!
//! The generator comes in as a function from a count to images, so that evaluation depends on
//! no model file or generator type (the layers above call it).

use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::Metrics;
use crate::data::locate::Split;
use crate::data::resolve::load_images;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::matmul::Estimator;
use crate::kernels::mmd::GMMN_MNIST_SIGMAS;
use crate::loss::{self, median_distance};
use crate::nn::{Backward, BuildOptions, Network, Normalisation, Shape, WeightMode, Wiring};
use crate::rng;

/// What to evaluate against.
#[derive(Clone, Copy, Debug)]
pub struct EvalSetup<'a> {
    /// The training dataset's name (its test split is the held-out set).
    pub dataset: &'a str,
    /// The generator's architecture name (for the table's title).
    pub arch: &'a str,
    /// Where the data lies (None: the usual places).
    pub data: Option<&'a Path>,
    /// The generator's output shape (the test images are brought to it).
    pub shape: Shape,
    /// Seeds the noise of the degraded row, the KID subsets and the feature encoder.
    pub seed: u32,
    /// Images per set, at most half the test split.
    pub count: usize,
}

/// One row of an evaluation table.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    pub name: &'static str,
    pub metrics: Metrics,
}

/// An evaluation: per space, the reference rows and the generated row. `Display` prints it as
/// two tables.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub dataset: String,
    pub arch: String,
    /// Images per set.
    pub count: usize,
    /// The per-image shape (c, h, w).
    pub shape: [usize; 3],
    /// Pixels in [0, 1], with GMMN's bandwidths.
    pub pixels: Vec<EvalRow>,
    /// Random convolutional features, bandwidths from their median distance.
    pub features: Vec<EvalRow>,
}

impl Evaluation {
    /// The generated images' row in pixel space.
    pub fn generated(&self) -> &Metrics {
        &self.pixels.last().expect("an evaluation has rows").metrics
    }
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [c, h, w] = self.shape;
        writeln!(
            f,
            "{n} generated vs {n} held-out {} images ({} of {c}x{h}x{w})\n",
            self.dataset,
            self.arch,
            n = self.count
        )?;
        let table = |f: &mut fmt::Formatter<'_>, title: &str, rows: &[EvalRow]| -> fmt::Result {
            writeln!(f, "{title}:")?;
            writeln!(
                f,
                "{:<30} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9}",
                "", "MMD^2", "KID", "precision", "recall", "density", "coverage"
            )?;
            for r in rows {
                let m = &r.metrics;
                writeln!(
                    f,
                    "{:<30} {:>9.4} {:>11.5} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    r.name, m.mmd2, m.kid, m.precision, m.recall, m.density, m.coverage
                )?;
            }
            Ok(())
        };
        table(f, "pixel space", &self.pixels)?;
        writeln!(f)?;
        table(
            f,
            "random convolutional features (frozen encoder regenerated from the seed)",
            &self.features,
        )
    }
}

/// Evaluates the images `generate(n)` returns ([n, shape], in [-1, 1]) against the held-out
/// split of `setup.dataset`.
pub fn evaluate(
    gpu: &Gpu,
    setup: &EvalSetup,
    generate: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
) -> Result<Evaluation> {
    let out = setup.shape;
    // A named dataset's test split, or a folder's held-out images (chosen by the seed, as
    // training chose them).
    let test = load_images(
        setup.dataset,
        setup.data,
        false,
        Split::Test,
        out,
        setup.seed,
    )?;
    // Two disjoint real sets of n (the real-vs-real baseline) come from the held-out images,
    // so n is bounded by half of them; a count outside is refused, not clamped.
    let most = test.len() / 2;
    if setup.count < 2 || setup.count > most {
        return Err(Error::invalid(format!(
            "-n {}: evaluation takes 2 to {most} images here (two disjoint real sets of n from \
             the {} held-out images)",
            setup.count,
            test.len()
        )));
    }
    let n = setup.count;
    let d = out.len();
    let real_a: Vec<f32> = (0..n).flat_map(|i| test.image_f32(i)).collect();
    let real_b: Vec<f32> = (n..2 * n).flat_map(|i| test.image_f32(i)).collect();
    let fake = generate(n)?;
    if fake.len() != n * d {
        return Err(Error::invalid(format!(
            "the generator gave {} values for {n} images of {d}",
            fake.len()
        )));
    }
    let mut noise = rng::HostRng::new(setup.seed, &[0x4e4f_4953]);
    let noisy: Vec<f32> = real_b
        .iter()
        .map(|v| (v + 0.5 * noise.normal() as f32).clamp(-1.0, 1.0))
        .collect();
    let blurred = blur(&real_b, n, out.c, out.h, out.w);
    let sets: [(&'static str, &[f32]); 4] = [
        ("real vs real (reference)", &real_b),
        ("real + noise 0.5 (degraded)", &noisy),
        ("real blurred 5x5 (degraded)", &blurred),
        ("generated", &fake),
    ];
    // Pixels in [0, 1] for GMMN's bandwidths.
    let to01 = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| (x + 1.0) * 0.5).collect() };
    let ra = to01(&real_a);
    let pixels = sets
        .iter()
        .map(|(name, set)| EvalRow {
            name,
            metrics: super::compare(&ra, &to01(set), d, &GMMN_MNIST_SIGMAS, setup.seed),
        })
        .collect();
    let feats = |set: &[f32]| features(gpu, set, n, out, setup.seed);
    let fa = feats(&real_a)?;
    let fd = fa.len() / n;
    let med = median_distance(&fa, n);
    let sig: Vec<f32> = [0.5f32, 1.0, 2.0].iter().map(|f| f * med).collect();
    let mut features = Vec::with_capacity(sets.len());
    for (name, set) in sets {
        features.push(EvalRow {
            name,
            metrics: super::compare(&fa, &feats(set)?, fd, &sig, setup.seed),
        });
    }
    Ok(Evaluation {
        dataset: setup.dataset.to_string(),
        arch: setup.arch.to_string(),
        count: n,
        shape: [out.c, out.h, out.w],
        pixels,
        features,
    })
}

/// 5x5 box blur of images [n, c, h, w] (the window shrinks at the borders).
fn blur(v: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for p in 0..n * c {
        for y in 0..h {
            for x in 0..w {
                let (mut s, mut k) = (0.0, 0.0);
                for dy in -2i32..=2 {
                    for dx in -2i32..=2 {
                        let (yy, xx) = (y as i32 + dy, x as i32 + dx);
                        if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                            s += v[(p * h + yy as usize) * w + xx as usize];
                            k += 1.0;
                        }
                    }
                }
                out[(p * h + y) * w + x] = s / k;
            }
        }
    }
    out
}

/// Features of images [n, c, h, w] in [-1, 1] from the loss's frozen random encoder.
fn features(gpu: &Gpu, images: &[f32], n: usize, shape: Shape, seed: u32) -> Result<Vec<f32>> {
    let batch = n.min(256);
    let enc = loss::random_conv_encoder(2);
    let opts = BuildOptions {
        batch,
        seed,
        mode: WeightMode::Frozen,
        backward: Backward::None,
        estimator: Estimator::PScaled,
        layer_offset: loss::RANDOM_ENCODER_LAYER_OFFSET,
        half: false,
        adam: None,
        norm: Normalisation::Batch,
    };
    let net = Network::build(gpu, &enc, opts, Wiring::image(None, shape))?;
    let per = shape.len();
    let mut out = Vec::new();
    let mut chunk = vec![0f32; batch * per];
    let mut i = 0;
    while i < n {
        let k = batch.min(n - i);
        chunk[..k * per].copy_from_slice(&images[i * per..(i + k) * per]);
        gpu.write_f32(&net.input, &chunk)?;
        gpu.run(&net.forward.refs())?;
        let f = gpu.read_f32(&net.output)?;
        let fd = f.len() / batch;
        out.extend_from_slice(&f[..k * fd]);
        i += k;
    }
    Ok(out)
}
