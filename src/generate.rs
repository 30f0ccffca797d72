//! Generation: an inference network with packed masks (or the dense weights they select), in
//! batches of latents drawn from the counter-based hash.

use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::matmul::Estimator;
use crate::kernels::{elementwise as ew, mask, norm, StepState};
use crate::nn::{
    Architecture, Backward, BuildOptions, Network, Normalisation, Shape, WeightMode, Wiring,
};
use crate::rng;

/// Client id of the latent stream of generation (training clients use 0, 1, ...).
pub const GENERATION_CLIENT: u32 = u32::MAX;
/// Client id of the latents that calibrate population statistics (kept apart from the
/// latents of generated images).
pub const CALIBRATION_CLIENT: u32 = u32::MAX - 1;
/// Calibration runs this many batches of [`CALIBRATION_BATCH`] latents.
pub const CALIBRATION_BATCHES: usize = 16;
/// The batch size of calibration (the training batch is 128 by default; a larger batch is
/// closer to the population).
pub const CALIBRATION_BATCH: usize = 256;

/// Per-channel population statistics of a generator's BatchNorm layers, in layer order:
/// what generation normalises with by default ([`Normalisation::Population`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PopulationStats {
    pub layers: Vec<ChannelStats>,
}

/// One BatchNorm layer's per-channel mean and (biased) variance.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

impl PopulationStats {
    /// The (a_c, b_c) pairs of each layer's inference form.
    pub fn coefficients(&self) -> Vec<Vec<f32>> {
        self.layers
            .iter()
            .map(|l| norm::population_coefficients(&l.mean, &l.var))
            .collect()
    }
}

/// The first image index of evaluation's latents (`prism eval`, the held-out MMD of a run):
/// far from the sample grids' images, which start at 0.
pub const EVALUATION_LATENTS: u32 = 1 << 30;

/// How a [`Generator`] is built.
#[derive(Clone, Copy, Debug)]
pub struct GeneratorOptions {
    /// Images a batch.
    pub batch: usize,
    /// Packed masks or materialised dense weights.
    pub mode: WeightMode,
    /// f16 multiplications in the masked layers (adapters with SHADER_F16; activations stay
    /// f32 in memory and sums accumulate in f32).
    pub half: bool,
    /// How BatchNorm normalises: population statistics (set with
    /// [`Generator::set_population`]) or each batch's own.
    pub norm: Normalisation,
}

impl GeneratorOptions {
    /// Packed masks, f32, BatchNorm with the batch's statistics (the reference's form).
    pub fn batch_statistics(batch: usize) -> GeneratorOptions {
        GeneratorOptions {
            batch,
            mode: WeightMode::Packed,
            half: false,
            norm: Normalisation::Batch,
        }
    }

    /// Packed masks, f32, BatchNorm in inference form with population statistics.
    pub fn population(batch: usize) -> GeneratorOptions {
        GeneratorOptions {
            norm: Normalisation::Population,
            ..Self::batch_statistics(batch)
        }
    }
}

/// A generator ready to produce images in batches.
pub struct Generator {
    pub net: Network,
    pub batch: usize,
    pub image: Shape,
    step: Rc<Tensor>,
    latent: Kernel,
}

impl Generator {
    /// An inference network of `arch` with weights from `seed`, in packed-mask or dense mode,
    /// BatchNorm with each batch's statistics.
    pub fn new(
        gpu: &Gpu,
        arch: &Architecture,
        seed: u32,
        batch: usize,
        mode: WeightMode,
    ) -> Result<Generator> {
        Self::build(
            gpu,
            arch,
            seed,
            &GeneratorOptions {
                mode,
                ..GeneratorOptions::batch_statistics(batch)
            },
        )
    }

    /// An inference network of `arch` with weights from `seed`, built as `o` says.
    pub fn build(
        gpu: &Gpu,
        arch: &Architecture,
        seed: u32,
        o: &GeneratorOptions,
    ) -> Result<Generator> {
        if !matches!(o.mode, WeightMode::Packed | WeightMode::Dense) {
            return Err(Error::invalid(
                "generators run on packed masks or dense weights",
            ));
        }
        let image = arch.validate()?;
        let opts = BuildOptions {
            batch: o.batch,
            seed,
            mode: o.mode,
            backward: Backward::None,
            estimator: Estimator::PScaled,
            layer_offset: 0,
            half: o.half,
            adam: None,
            norm: o.norm,
        };
        let net = Network::build(gpu, arch, opts, Wiring::default())?;
        let step = Rc::new(gpu.zeros(&[StepState::WORDS], DType::U32, "generation step")?);
        let latent = ew::latent_images(
            gpu,
            rng::key_path(seed, &[rng::stream::LATENT]),
            &step,
            &net.input,
            arch.latent,
        )?;
        Ok(Generator {
            net,
            batch: o.batch,
            image,
            step,
            latent,
        })
    }

    /// Population mode: writes each BatchNorm layer's inference coefficients.
    pub fn set_population(&self, gpu: &Gpu, stats: &PopulationStats) -> Result<()> {
        if self.net.opts.norm != Normalisation::Population {
            return Err(Error::invalid(
                "population statistics need a generator built with Normalisation::Population",
            ));
        }
        if stats.layers.len() != self.net.population.len() {
            return Err(Error::invalid(format!(
                "statistics of {} BatchNorm layers for a network of {}",
                stats.layers.len(),
                self.net.population.len()
            )));
        }
        for (t, coef) in self.net.population.iter().zip(stats.coefficients()) {
            if coef.len() != t.len() {
                return Err(Error::invalid(format!(
                    "statistics of {} channels for a BatchNorm layer of {}",
                    coef.len() / 2,
                    t.len() / 2
                )));
            }
            gpu.write_f32(t, &coef)?;
        }
        Ok(())
    }

    /// Sets the masks from packed bits (a model file's).
    pub fn set_masks(&self, gpu: &Gpu, bits: &[Vec<u32>]) -> Result<()> {
        if bits.len() != self.net.layers.len() {
            return Err(Error::invalid("one mask per masked layer"));
        }
        for (l, b) in self.net.layers.iter().zip(bits) {
            if b.len() != mask::packed_words(l.info.weights) {
                return Err(Error::invalid(format!(
                    "layer {}: mask of {} words for {} weights",
                    l.info.index,
                    b.len(),
                    l.info.weights
                )));
            }
            gpu.write_u32(&l.bits, b)?;
        }
        self.materialize(gpu)
    }

    /// Dense mode: sets the weights directly (e.g. loaded from safetensors).
    pub fn set_dense_weights(&self, gpu: &Gpu, weights: &[Vec<f32>]) -> Result<()> {
        if weights.len() != self.net.layers.len() {
            return Err(Error::invalid("one weight tensor per masked layer"));
        }
        for (l, w) in self.net.layers.iter().zip(weights) {
            let d = l
                .dense
                .as_ref()
                .ok_or_else(|| Error::invalid("dense weights need a dense-mode generator"))?;
            if w.len() != l.info.weights {
                return Err(Error::invalid(format!(
                    "layer {}: {} weights, expected {}",
                    l.info.index,
                    w.len(),
                    l.info.weights
                )));
            }
            gpu.write_f32(d, w)?;
        }
        Ok(())
    }

    /// In dense mode, writes w * m of every layer (the baseline with weights in memory).
    fn materialize(&self, gpu: &Gpu) -> Result<()> {
        let mut ks = Vec::new();
        for l in &self.net.layers {
            if let Some(d) = &l.dense {
                ks.push(crate::kernels::weights::materialize(
                    gpu,
                    &l.weights,
                    l.info.weights,
                    &crate::kernels::MaskSource::Packed(&l.bits),
                    d,
                )?);
            }
        }
        gpu.run(&ks.iter().collect::<Vec<_>>())?;
        Ok(())
    }

    /// The packed masks currently set.
    pub fn masks(&self, gpu: &Gpu) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .net
            .layers
            .iter()
            .map(|l| gpu.read_u32(&l.bits))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// The kernels of one batch (latents, then the forward pass), for timing.
    pub fn batch_kernels(&self) -> Vec<&Kernel> {
        let mut v = vec![&self.latent];
        v.extend(self.net.forward.refs());
        v
    }

    /// Sets the index of the next run's first image: image `first + r` of the batch gets the
    /// latent of that index (`client` chooses the stream).
    fn set_first_image_of(&self, gpu: &Gpu, client: u32, first: u32) -> Result<()> {
        let st = StepState {
            client,
            step: first,
            ..Default::default()
        };
        gpu.write_u32(&self.step, bytemuck::cast_slice(&[st]))?;
        Ok(())
    }

    /// Sets the index of the next run's first image: the batch holds images `first` to
    /// `first + batch - 1`, each from its own latent.
    pub fn set_first_image(&self, gpu: &Gpu, first: u32) -> Result<()> {
        self.set_first_image_of(gpu, GENERATION_CLIENT, first)
    }

    /// Generates `count` images [count, c, h, w] in [-1, 1]: images `first` to
    /// `first + count - 1` of the latent stream, whatever the batch size (a partial last
    /// batch runs at full size and its extra images are dropped).
    pub fn generate(&self, gpu: &Gpu, count: usize, first: u32) -> Result<Vec<f32>> {
        let total = crate::limits::product(
            &[(count, "images"), (self.image.len(), "values an image")],
            "generation",
        )?;
        let mut out = Vec::new();
        out.try_reserve_exact(total)
            .map_err(|_| Error::invalid(format!("{count} images do not fit in memory")))?;
        self.generate_each(gpu, count, first, &mut |imgs| {
            out.extend_from_slice(imgs);
            Ok(())
        })?;
        Ok(out)
    }

    /// As [`Generator::generate`], but hands the images to `each` a batch at a time (values
    /// [k, c, h, w], k up to the batch size) instead of keeping them: memory stays one batch
    /// whatever `count`.
    pub fn generate_each(
        &self,
        gpu: &Gpu,
        count: usize,
        first: u32,
        each: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let per = self.image.len();
        if first as u64 + count as u64 > u32::MAX as u64 + 1 {
            return Err(Error::invalid(format!(
                "images {first} to {first} + {count} are past the latent stream's 2^32"
            )));
        }
        let mut left = count;
        let mut at = first;
        while left > 0 {
            self.set_first_image(gpu, at)?;
            gpu.run(&self.batch_kernels())?;
            let imgs = gpu.read_f32(&self.net.output)?;
            let k = left.min(imgs.len() / per);
            each(&imgs[..k * per])?;
            left -= k;
            at = at.wrapping_add(self.batch as u32);
        }
        Ok(())
    }

    /// Population statistics of this generator's BatchNorm layers under its masks:
    /// `CALIBRATION_BATCHES` (16) batches of its batch size from the calibration latents, run
    /// with batch statistics; each layer's mean is the mean of the batch means and its
    /// variance the mean of the batch variances plus the variance of the batch means (the
    /// variance over all the calibration images at the layer, as the batches see it).
    /// The generator must be built with [`Normalisation::Batch`].
    pub fn calibrate(&self, gpu: &Gpu) -> Result<PopulationStats> {
        if self.net.opts.norm != Normalisation::Batch {
            return Err(Error::invalid(
                "calibration runs a generator with batch statistics",
            ));
        }
        let mut sums: Vec<(Vec<f64>, Vec<f64>)> = self
            .net
            .batch_stats
            .iter()
            .map(|t| (vec![0.0; t.len() / 2], vec![0.0; t.len() / 2]))
            .collect();
        for b in 0..CALIBRATION_BATCHES {
            self.set_first_image_of(gpu, CALIBRATION_CLIENT, (b * self.batch) as u32)?;
            gpu.run(&self.batch_kernels())?;
            for (t, (m1, m2)) in self.net.batch_stats.iter().zip(sums.iter_mut()) {
                let st = gpu.read_f32(t)?;
                for (c, pair) in st.chunks_exact(2).enumerate() {
                    // The kernel keeps (mean, 1 / sqrt(var + eps)).
                    let mean = pair[0] as f64;
                    let var = (1.0 / (pair[1] as f64).powi(2) - norm::EPS as f64).max(0.0);
                    m1[c] += mean;
                    m2[c] += var + mean * mean;
                }
            }
        }
        let n = CALIBRATION_BATCHES as f64;
        Ok(PopulationStats {
            layers: sums
                .into_iter()
                .map(|(m1, m2)| {
                    let mean: Vec<f64> = m1.iter().map(|s| s / n).collect();
                    ChannelStats {
                        var: m2
                            .iter()
                            .zip(&mean)
                            .map(|(s, m)| (s / n - m * m).max(0.0) as f32)
                            .collect(),
                        mean: mean.iter().map(|&m| m as f32).collect(),
                    }
                })
                .collect(),
        })
    }
}
