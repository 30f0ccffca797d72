//! Edge inference: load a 1-bit model file, regenerate the frozen weights from its seed inside
//! the kernels, generate images and save them as a PNG grid.
//!
//! `cargo run --release --example edge_inference -- runs/mnist/model.prism grid.png`

use std::path::PathBuf;

use prism::{write_grid, Gpu, Images, Model};

fn main() -> Result<(), prism::Error> {
    let mut args = std::env::args().skip(1);
    let model_path = PathBuf::from(args.next().unwrap_or("runs/mnist/model.prism".into()));
    let out = PathBuf::from(args.next().unwrap_or("edge_samples.png".into()));

    let model = Model::load(&model_path)?; // checks magic, version, layer table and checksum
    let gpu = Gpu::new(Default::default())?;
    let generator = model.generator(&gpu, 64)?; // packed mask read directly by the kernels
    let started = std::time::Instant::now();
    let images = generator.generate(&gpu, 64, 0)?; // values in [-1, 1], channel-major
    let seconds = started.elapsed().as_secs_f64();

    let batch = Images {
        values: &images,
        count: 64,
        shape: generator.image,
    };
    write_grid(&out, &batch, 8)?;
    println!(
        "{} ({} bytes, {} weights): 64 images in {:.3} s on {}; grid: {}",
        model_path.display(),
        std::fs::metadata(&model_path).map(|m| m.len()).unwrap_or(0),
        model.weights(),
        seconds,
        gpu.info().name,
        out.display()
    );
    Ok(())
}
