//! Generation: an inference network with packed masks (or the dense weights they select), in
//! batches of latents drawn from the counter-based hash.

use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::matmul::Estimator;
use crate::kernels::{elementwise as ew, mask, StepState};
use crate::nn::{Architecture, Backward, BuildOptions, Network, Shape, WeightMode, Wiring};
use crate::rng;

/// Client id used in the latent stream of generation (training clients use 0, 1, ...).
const GENERATION_CLIENT: u32 = u32::MAX;

/// A generator ready to produce images in batches.
pub struct Generator {
    pub net: Network,
    pub batch: usize,
    pub image: Shape,
    step: Rc<Tensor>,
    latent: Kernel,
}

impl Generator {
    /// An inference network of `arch` with weights from `seed`, in packed-mask or dense mode.
    pub fn new(
        gpu: &Gpu,
        arch: &Architecture,
        seed: u32,
        batch: usize,
        mode: WeightMode,
    ) -> Result<Generator> {
        Self::with_precision(gpu, arch, seed, batch, mode, false)
    }

    /// As [`Generator::new`], with the masked layers multiplying in f16 when `half` (adapters
    /// with SHADER_F16; activations stay f32 in memory and sums accumulate in f32).
    pub fn with_precision(
        gpu: &Gpu,
        arch: &Architecture,
        seed: u32,
        batch: usize,
        mode: WeightMode,
        half: bool,
    ) -> Result<Generator> {
        if !matches!(mode, WeightMode::Packed | WeightMode::Dense) {
            return Err(Error::invalid(
                "generators run on packed masks or dense weights",
            ));
        }
        let image = arch.validate()?;
        let opts = BuildOptions {
            batch,
            seed,
            mode,
            backward: Backward::None,
            estimator: Estimator::PScaled,
            layer_offset: 0,
            half,
            adam: None,
        };
        let net = Network::build(gpu, arch, opts, Wiring::default())?;
        let step = Rc::new(gpu.zeros(&[StepState::WORDS], DType::U32, "generation step")?);
        let latent = ew::latent(
            gpu,
            rng::key_path(seed, &[rng::stream::LATENT]),
            &step,
            &net.input,
        )?;
        Ok(Generator {
            net,
            batch,
            image,
            step,
            latent,
        })
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

    /// Sets which batch of the latent stream the next run uses.
    pub fn set_batch_index(&self, gpu: &Gpu, index: u32) -> Result<()> {
        let st = StepState {
            client: GENERATION_CLIENT,
            step: index,
            ..Default::default()
        };
        gpu.write_u32(&self.step, bytemuck::cast_slice(&[st]))?;
        Ok(())
    }

    /// Generates `count` images [count, c, h, w] in [-1, 1]; batch i uses latents of index
    /// `first_batch + i`, so the same call gives the same images.
    pub fn generate(&self, gpu: &Gpu, count: usize, first_batch: u32) -> Result<Vec<f32>> {
        let per = self.image.len();
        let mut out = Vec::with_capacity(count * per);
        let mut i = 0u32;
        while out.len() < count * per {
            self.set_batch_index(gpu, first_batch + i)?;
            gpu.run(&self.batch_kernels())?;
            let imgs = gpu.read_f32(&self.net.output)?;
            let need = (count * per - out.len()).min(imgs.len());
            out.extend_from_slice(&imgs[..need]);
            i += 1;
        }
        Ok(out)
    }
}
