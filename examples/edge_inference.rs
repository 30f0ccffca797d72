//! Edge inference: load a 1-bit model file, regenerate the frozen weights from its seed inside
//! the kernels, and generate images one at a time (batch 1), as a device answering requests
//! would, with the latency of each; then save them as a PNG grid.
//!
//! `cargo run --release --example edge_inference -- runs/mnist/model.prism grid.png 16`
//!
//! A device needs a wgpu adapter and the model file, nothing else: BatchNorm uses the
//! population statistics stored in the file, so an image depends on its latent alone and
//! batch 1 gives the same image as any batch.

use std::path::PathBuf;
use std::time::Instant;

use prism::{write_grid, Gpu, Images, Model};

fn main() -> Result<(), prism::Error> {
    let mut args = std::env::args().skip(1);
    let model_path = PathBuf::from(args.next().unwrap_or("runs/mnist/model.prism".into()));
    let out = PathBuf::from(args.next().unwrap_or("edge_samples.png".into()));
    let count: usize = match args.next() {
        Some(n) => n
            .parse()
            .ok()
            .filter(|&n| (1..=4096).contains(&n))
            .ok_or_else(|| prism::Error::invalid("the image count is a number from 1 to 4096"))?,
        None => 16,
    };

    let started = Instant::now();
    let model = Model::load(&model_path)?; // checks magic, version, layer table and checksum
    let gpu = Gpu::new(Default::default())?;
    let generator = model.generator(&gpu, 1)?; // packed mask read directly by the kernels
    let ready = started.elapsed().as_secs_f64();

    // The first run compiles nothing (pipelines are built with the generator) but warms the
    // driver's caches; it is timed like the others and reported apart.
    let mut images = Vec::with_capacity(count * generator.image.len());
    let mut latency = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        images.extend(generator.generate(&gpu, 1, i as u32)?); // image i of the latent stream
        latency.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let first = latency[0];
    let mut rest = latency[1..].to_vec();
    rest.sort_by(f64::total_cmp);

    let batch = Images {
        values: &images,
        count,
        shape: generator.image,
    };
    write_grid(&out, &batch, (count as f64).sqrt().ceil() as usize)?;
    println!(
        "{} ({} bytes, {} weights) on {}: loaded and built in {:.3} s",
        model_path.display(),
        std::fs::metadata(&model_path).map(|m| m.len()).unwrap_or(0),
        model.weights(),
        gpu.info().name,
        ready
    );
    match rest.len() {
        0 => println!("1 image: {first:.2} ms"),
        n => println!(
            "{count} images one at a time: first {first:.2} ms, then median {:.2} ms \
             (fastest {:.2}, slowest {:.2}) an image; grid: {}",
            rest[n / 2],
            rest[0],
            rest[n - 1],
            out.display()
        ),
    }
    Ok(())
}
