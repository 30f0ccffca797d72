//! The model file: a seed and a bit mask are the whole generator (docs/MODEL_FORMAT.md).
//!
//! Layout (little endian):
//! ```text
//! magic "PRISMMDL" | version u16 | reserved u16 (0) | header length u32 | header (JSON) |
//! per masked layer: encoding u8 (0 packed bits, 2 entropy-coded) | weights u32 |
//!                   payload bytes u32 | payload
//! version 2: population statistics: present u8 | if 1: BatchNorm layers u32, then per
//!            layer: channels u32 | mean f32 x channels | variance f32 x channels
//! crc32 of everything before it
//! ```
//! The JSON header holds the architecture (preset name and full layer table), the weight
//! seed and init scheme, how the mask was chosen (one sample of the final probabilities, or
//! the thresholded mask), and the dataset it was trained on. Loading checks every field
//! against the architecture and refuses a damaged or foreign file with a clear error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bytes::{split_crc, Reader};
use crate::codec::MaskCoder;
use crate::codec::RangeCoder;
use crate::error::{Error, Result};
use crate::eval::{EvalSetup, Evaluation};
use crate::fl::checkpoint::{write_atomic, Checkpoint};
use crate::generate::{
    ChannelStats, Generator, GeneratorOptions, PopulationStats, CALIBRATION_BATCH,
    EVALUATION_LATENTS,
};
use crate::gpu::Gpu;
use crate::kernels::{mask, Init, LayerWeights};
use crate::nn::{Architecture, Normalisation, WeightMode};
use crate::rng;

pub const MAGIC: &[u8; 8] = b"PRISMMDL";
/// The version written; version 1 (no population statistics) still reads.
pub const VERSION: u16 = 2;
/// Largest header accepted (a layer table is a few kilobytes).
const MAX_HEADER: usize = 1 << 20;
/// Largest model file the format allows: the header, every layer's mask packed (the coded
/// form is never larger) with its 9-byte prefix, and BatchNorm statistics for the largest
/// layer table; larger files are refused by their size before they are read.
const MAX_FILE: u64 = (20 + MAX_HEADER + crate::nn::arch::MAX_WEIGHTS / 8) as u64
    + crate::limits::MAX_LAYERS as u64 * (9 + 4 + 8 * crate::nn::arch::MAX_DIM as u64)
    + 5
    + 4;

/// How the final mask was drawn from the trained probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskKind {
    /// One sample M ~ Bernoulli(sigmoid(s)), as the paper's final model.
    Sample,
    /// The most likely mask: keep where sigmoid(s) > 0.5.
    Threshold,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Header {
    architecture: Architecture,
    seed: u32,
    init: Init,
    mask: MaskKind,
    dataset: String,
    /// Weights per masked layer (checked against the architecture).
    layers: Vec<usize>,
}

/// A generator as a seed plus masks.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub arch: Architecture,
    pub seed: u32,
    pub mask_kind: MaskKind,
    pub dataset: String,
    /// Packed masks per masked layer.
    pub masks: Vec<Vec<u32>>,
    /// Population statistics of the BatchNorm layers under these masks
    /// ([`Model::calibrate`]); None: not calibrated yet (a version-1 file, or a model made
    /// on the host), and generation calibrates when it needs them.
    pub population: Option<PopulationStats>,
}

/// The key of the final mask sample of a run (also the key of its sample grids).
pub fn final_mask_key(seed: u32) -> u32 {
    rng::key_path(seed, &[rng::stream::UPLOAD, u32::MAX])
}

/// Masks from scores, on the host (so that a checkpoint and the model exported from it give
/// the same bits on every machine).
pub fn masks_from_scores(scores: &[Vec<f32>], kind: MaskKind, seed: u32) -> Vec<Vec<u32>> {
    let key = final_mask_key(seed);
    scores
        .iter()
        .enumerate()
        .map(|(l, s)| match kind {
            MaskKind::Sample => mask::cpu::sample_packed(
                s.len(),
                &mask::cpu::thresholds(s),
                rng::key(key, l as u32),
            ),
            MaskKind::Threshold => mask::cpu::pack(&s.iter().map(|&v| v > 0.0).collect::<Vec<_>>()),
        })
        .collect()
}

/// The model of a checkpoint's global scores.
pub fn from_checkpoint(path: &Path, kind: MaskKind) -> Result<Model> {
    let c = Checkpoint::load(path)?;
    let arch = c.config.architecture()?;
    let sizes: Vec<usize> = arch.mask_sizes()?;
    let have: Vec<usize> = c.scores.iter().map(|s| s.len()).collect();
    if sizes != have {
        return Err(Error::format(
            path.display().to_string(),
            "scores do not match the configured architecture",
        ));
    }
    Ok(Model {
        masks: masks_from_scores(&c.scores, kind, c.config.seed),
        arch,
        seed: c.config.seed,
        mask_kind: kind,
        dataset: c.config.dataset,
        population: None,
    })
}

impl Model {
    /// Serialises the model; `coder` entropy-codes masks where that makes them smaller.
    pub fn encode(&self, coder: Option<&dyn MaskCoder>) -> Result<Vec<u8>> {
        let sizes: Vec<usize> = self.arch.mask_sizes()?;
        let header = Header {
            architecture: self.arch.clone(),
            seed: self.seed,
            init: self.arch.init,
            mask: self.mask_kind,
            dataset: self.dataset.clone(),
            layers: sizes.clone(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::invalid(e.to_string()))?;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        for (words, &n) in self.masks.iter().zip(&sizes) {
            let packed_len = n.div_ceil(8);
            match coder
                .and_then(|c| c.encode(words, n))
                .filter(|b| b.len() < packed_len)
            {
                Some(bytes) => {
                    out.push(2);
                    out.extend_from_slice(&(n as u32).to_le_bytes());
                    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    out.extend_from_slice(&bytes);
                }
                None => {
                    out.push(0);
                    out.extend_from_slice(&(n as u32).to_le_bytes());
                    out.extend_from_slice(&(packed_len as u32).to_le_bytes());
                    out.extend_from_slice(&bytemuck::cast_slice::<u32, u8>(words)[..packed_len]);
                }
            }
        }
        match &self.population {
            None => out.push(0),
            Some(p) => {
                let channels = self.arch.batchnorm_channels()?;
                let fits = p.layers.len() == channels.len()
                    && p.layers
                        .iter()
                        .zip(&channels)
                        .all(|(l, &c)| l.mean.len() == c && l.var.len() == c);
                if !fits {
                    return Err(Error::invalid(
                        "population statistics do not match the BatchNorm layers",
                    ));
                }
                out.push(1);
                out.extend_from_slice(&(p.layers.len() as u32).to_le_bytes());
                for l in &p.layers {
                    out.extend_from_slice(&(l.mean.len() as u32).to_le_bytes());
                    out.extend_from_slice(bytemuck::cast_slice::<f32, u8>(&l.mean));
                    out.extend_from_slice(bytemuck::cast_slice::<f32, u8>(&l.var));
                }
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses and validates a model file's bytes.
    pub fn decode(bytes: &[u8], what: &str, coder: Option<&dyn MaskCoder>) -> Result<Model> {
        let bad = |m: String| Error::format(what, m);
        if bytes.len() < 8 + 2 + 2 + 4 + 4 {
            return Err(bad("too short to be a prism model".into()));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a prism model file (wrong magic)".into()));
        }
        let body = split_crc(bytes, what)?;
        let mut r = Reader::new(body, what);
        r.take(8)?;
        let version = r.u16()?;
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!(
                "format version {version}; this prism reads versions 1 to {VERSION}"
            )));
        }
        let reserved = r.u16()?;
        if reserved != 0 {
            return Err(bad(format!("reserved field is {reserved}, not 0")));
        }
        let hlen = r.u32()? as usize;
        if hlen > MAX_HEADER {
            return Err(bad(format!("header length {hlen} is impossible")));
        }
        let header: Header =
            serde_json::from_slice(r.take(hlen)?).map_err(|e| bad(format!("header: {e}")))?;
        if header.init != header.architecture.init {
            return Err(bad("init scheme disagrees with the layer table".into()));
        }
        header
            .architecture
            .validate()
            .map_err(|e| bad(format!("layer table: {e}")))?;
        let sizes: Vec<usize> = header
            .architecture
            .masked_layers()
            .map_err(|e| bad(format!("layer table: {e}")))?
            .iter()
            .map(|l| l.weights)
            .collect();
        if sizes != header.layers {
            return Err(bad("layer sizes disagree with the layer table".into()));
        }
        let mut masks = Vec::with_capacity(sizes.len());
        for (i, &n) in sizes.iter().enumerate() {
            let enc = r.u8()?;
            let w = r.u32()? as usize;
            let len = r.u32()? as usize;
            if w != n {
                return Err(bad(format!(
                    "layer {i}: {w} weights, the layer table says {n}"
                )));
            }
            let payload = r.take(len)?;
            let words = match enc {
                0 => {
                    if len != n.div_ceil(8) {
                        return Err(bad(format!(
                            "layer {i}: {len} bytes of bits for {n} weights"
                        )));
                    }
                    let mut words = vec![0u32; n.div_ceil(32)];
                    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len].copy_from_slice(payload);
                    words
                }
                2 => {
                    let c = coder.ok_or_else(|| {
                        bad(format!(
                            "layer {i} is entropy-coded but no decoder was given"
                        ))
                    })?;
                    c.decode(payload, n)
                        .map_err(|e| bad(format!("layer {i}: {e}")))?
                }
                e => return Err(bad(format!("layer {i}: unknown encoding {e}"))),
            };
            if words.len() != n.div_ceil(32) || (n % 32 != 0 && words[n / 32] >> (n % 32) != 0) {
                return Err(bad(format!("layer {i}: mask bits past the last weight")));
            }
            masks.push(words);
        }
        let population = match version {
            1 => None,
            _ => read_population(&mut r, &header.architecture, &bad)?,
        };
        r.finish()?;
        Ok(Model {
            arch: header.architecture,
            seed: header.seed,
            mask_kind: header.mask,
            dataset: header.dataset,
            masks,
            population,
        })
    }

    /// Computes and keeps the population statistics of the BatchNorm layers under this
    /// model's masks ([`Generator::calibrate`]: 16 batches of 256 calibration latents).
    pub fn calibrate(&mut self, gpu: &Gpu) -> Result<()> {
        self.population = Some(self.calibrated(gpu)?);
        Ok(())
    }

    /// The population statistics: the stored ones, or calibrated now.
    fn calibrated(&self, gpu: &Gpu) -> Result<PopulationStats> {
        if let Some(p) = &self.population {
            return Ok(p.clone());
        }
        let g = Generator::new(
            gpu,
            &self.arch,
            self.seed,
            CALIBRATION_BATCH,
            WeightMode::Packed,
        )?;
        g.set_masks(gpu, &self.masks)?;
        g.calibrate(gpu)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.encode(Some(&RangeCoder))?)
    }

    pub fn load(path: &Path) -> Result<Model> {
        let bytes = crate::bytes::read_file(path, MAGIC, MAX_FILE, "prism model file")?;
        Model::decode(&bytes, &path.display().to_string(), Some(&RangeCoder))
    }

    /// A packed-mask generator at `batch` with this model's masks, BatchNorm in inference
    /// form with the population statistics (calibrated now if the model has none): each
    /// image depends on its latent alone.
    pub fn generator(&self, gpu: &Gpu, batch: usize) -> Result<Generator> {
        self.generator_with(gpu, &GeneratorOptions::population(batch))
    }

    /// A generator with this model's masks, built as `o` says (packed or dense weights, f16,
    /// population or batch statistics).
    pub fn generator_with(&self, gpu: &Gpu, o: &GeneratorOptions) -> Result<Generator> {
        // Each masked layer's per-weight values live in one buffer of 4 bytes a weight: a
        // model whose layer exceeds the adapter's largest binding is refused by name here,
        // rather than by the first buffer that fails to allocate.
        let most = gpu
            .limits()
            .max_storage_buffer_binding_size
            .min(gpu.limits().max_buffer_size);
        for l in self.arch.masked_layers()? {
            let bytes = 4 * l.weights as u64;
            if bytes > most {
                return Err(Error::invalid(format!(
                    "masked layer {} of this model has {} weights ({} bytes at 4 a weight); this \
                     adapter binds at most {most} bytes at once, so the model is too large to \
                     run on it",
                    l.index, l.weights, bytes
                )));
            }
        }
        let g = Generator::build(gpu, &self.arch, self.seed, o)?;
        g.set_masks(gpu, &self.masks)?;
        if o.norm == Normalisation::Population {
            g.set_population(gpu, &self.calibrated(gpu)?)?;
        }
        Ok(g)
    }

    /// As [`Model::generator`], multiplying in f16 (adapters with SHADER_F16).
    pub fn generator_f16(&self, gpu: &Gpu, batch: usize) -> Result<Generator> {
        let o = GeneratorOptions {
            half: true,
            ..GeneratorOptions::population(batch)
        };
        self.generator_with(gpu, &o)
    }

    /// As [`Model::generator`], with w * m materialised as dense f32 weights (the baseline).
    pub fn dense_generator(&self, gpu: &Gpu, batch: usize) -> Result<Generator> {
        let o = GeneratorOptions {
            mode: WeightMode::Dense,
            ..GeneratorOptions::population(batch)
        };
        self.generator_with(gpu, &o)
    }

    /// Generated images against held-out images of the dataset the model was trained on
    /// (`count` per set), with reference rows ([`crate::eval::evaluate`]).
    pub fn evaluate(
        &self,
        gpu: &Gpu,
        count: usize,
        data: Option<&Path>,
        norm: Normalisation,
    ) -> Result<Evaluation> {
        let setup = EvalSetup {
            dataset: &self.dataset,
            arch: &self.arch.name,
            data,
            shape: self.arch.output()?,
            seed: self.seed,
            count,
        };
        crate::eval::evaluate(gpu, &setup, &mut |n| {
            let o = GeneratorOptions {
                norm,
                ..GeneratorOptions::population(n.min(256))
            };
            self.generator_with(gpu, &o)?
                .generate(gpu, n, EVALUATION_LATENTS)
        })
    }

    /// Masked weights in all.
    pub fn weights(&self) -> usize {
        self.arch.masked_weights().unwrap_or(0)
    }

    /// The effective weights w * m of every masked layer, regenerated on the host.
    /// How masked layer `info`'s frozen weights are generated from this model's seed.
    fn layer_weights(&self, info: &crate::nn::arch::MaskedLayerInfo) -> LayerWeights {
        LayerWeights {
            seed: self.seed,
            layer: info.index,
            init: self.arch.init,
            fan_in: info.fan_in,
        }
    }

    pub fn dense_weights(&self) -> Result<Vec<Vec<f32>>> {
        let infos = self.arch.masked_layers()?;
        Ok(infos
            .iter()
            .zip(&self.masks)
            .map(|(info, bits)| {
                crate::kernels::weights::cpu::effective(
                    &self.layer_weights(info),
                    info.weights,
                    &crate::kernels::weights::cpu::Source::Packed(bits),
                )
            })
            .collect())
    }

    /// Writes the materialised weights as safetensors (f32, PyTorch layouts, named
    /// `masked.<index>.<kind>.weight`), with the architecture in the metadata, so that other
    /// runtimes can load the generator.
    pub fn export_safetensors(&self, path: &Path) -> Result<()> {
        let infos = self.arch.masked_layers()?;
        // Layers are inflated one at a time as the file is written (LazyLayer), so memory is
        // bounded by the largest layer's f32 bytes, checked first.
        let largest = infos.iter().map(|l| l.weights).max().unwrap_or(0) as u64;
        crate::limits::check_host(
            4 * largest,
            &format!("exporting a layer of {largest} weights as f32"),
            &|_| "this model is too large to export on this machine".into(),
        )?;
        let views: Vec<(String, LazyLayer)> = infos
            .iter()
            .zip(&self.masks)
            .map(|(info, bits)| {
                let shape = match info.kind {
                    "linear" => info.dims[..2].to_vec(),
                    _ => info.dims.to_vec(),
                };
                let layer = LazyLayer {
                    weights: self.layer_weights(info),
                    count: info.weights,
                    bits,
                    shape,
                };
                (tensor_name(info), layer)
            })
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "prism".to_string());
        meta.insert(
            "architecture".to_string(),
            serde_json::to_string(&self.arch).map_err(|e| Error::invalid(e.to_string()))?,
        );
        meta.insert("seed".to_string(), self.seed.to_string());
        meta.insert("mask".to_string(), format!("{:?}", self.mask_kind));
        let tmp = path.with_extension("safetensors.part");
        let written = safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| Error::invalid(format!("safetensors: {e}")));
        crate::io::commit_part(&tmp, path, written)
    }
}

/// The population-statistics section of a version-2 file, checked against the layer table.
fn read_population(
    r: &mut Reader,
    arch: &Architecture,
    bad: &dyn Fn(String) -> Error,
) -> Result<Option<PopulationStats>> {
    match r.u8()? {
        0 => return Ok(None),
        1 => {}
        p => return Err(bad(format!("population statistics flag {p}, not 0 or 1"))),
    }
    let channels = arch
        .batchnorm_channels()
        .map_err(|e| bad(format!("layer table: {e}")))?;
    let n = r.u32()? as usize;
    if n != channels.len() {
        return Err(bad(format!(
            "statistics of {n} BatchNorm layers; the layer table has {}",
            channels.len()
        )));
    }
    let mut layers = Vec::with_capacity(n);
    for (i, &c) in channels.iter().enumerate() {
        let have = r.u32()? as usize;
        if have != c {
            return Err(bad(format!(
                "BatchNorm layer {i}: statistics of {have} channels; the layer table says {c}"
            )));
        }
        let mean = r.finite_f32s(c, &format!("BatchNorm layer {i}: means"))?;
        let var = r.finite_f32s(c, &format!("BatchNorm layer {i}: variances"))?;
        if var.iter().any(|&v| v < 0.0) {
            return Err(bad(format!("BatchNorm layer {i}: negative variance")));
        }
        layers.push(ChannelStats { mean, var });
    }
    Ok(Some(PopulationStats { layers }))
}

/// One masked layer's dense f32 weights for the safetensors writer, computed only when the
/// writer asks for its bytes (one layer in memory at a time).
struct LazyLayer<'a> {
    weights: LayerWeights,
    count: usize,
    bits: &'a [u32],
    shape: Vec<usize>,
}

impl safetensors::View for LazyLayer<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        // weights::cpu::effective's packed-mask rule, written straight into bytes so that
        // only the 4 bytes a weight of the output are held (not a f32 copy beside them).
        use crate::kernels::weights::cpu::{frozen, packed_keep};
        let g = self.weights.gen();
        let mut out = Vec::with_capacity(4 * self.count);
        for i in 0..self.count {
            let w = if packed_keep(self.bits, i) {
                frozen(&g, i as u32)
            } else {
                0.0
            };
            out.extend_from_slice(&w.to_le_bytes());
        }
        std::borrow::Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        4 * self.count
    }
}

fn tensor_name(info: &crate::nn::arch::MaskedLayerInfo) -> String {
    format!("masked.{}.{}.weight", info.index, info.kind)
}

/// Reads a safetensors file written by [`Model::export_safetensors`]: the architecture and
/// each masked layer's dense weights, every tensor checked for name, type and shape.
pub fn load_safetensors(path: &Path) -> Result<(Architecture, Vec<Vec<f32>>)> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(&what, format!("not a safetensors file: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(&what, e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let arch: Architecture = serde_json::from_str(
        meta.get("architecture")
            .ok_or_else(|| Error::format(&what, "no architecture in the metadata"))?,
    )
    .map_err(|e| Error::format(&what, format!("architecture: {e}")))?;
    arch.validate()
        .map_err(|e| Error::format(&what, e.to_string()))?;
    let mut weights = Vec::new();
    for info in arch.masked_layers()? {
        let name = tensor_name(&info);
        let t = st
            .tensor(&name)
            .map_err(|_| Error::format(&what, format!("missing tensor {name}")))?;
        if t.dtype() != safetensors::Dtype::F32
            || t.shape().iter().product::<usize>() != info.weights
        {
            return Err(Error::format(
                &what,
                format!("{name}: expected {} f32 values", info.weights),
            ));
        }
        let w: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if w.iter().any(|v| !v.is_finite()) {
            return Err(Error::format(
                &what,
                format!("{name} holds NaN or infinity"),
            ));
        }
        weights.push(w);
    }
    Ok((arch, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Model {
        let arch = Architecture::preset("mlp28", 1).unwrap();
        let sizes: Vec<usize> = arch.mask_sizes().unwrap();
        let scores: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect())
            .collect();
        Model {
            masks: masks_from_scores(&scores, MaskKind::Sample, 3),
            arch,
            seed: 3,
            mask_kind: MaskKind::Sample,
            dataset: "mnist".into(),
            population: None,
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let m = tiny();
        let bytes = m.encode(None).unwrap();
        assert_eq!(Model::decode(&bytes, "t", None).unwrap(), m);
        assert!(Model::decode(&bytes[..bytes.len() - 1], "t", None)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut foreign = bytes.clone();
        foreign[0] = b'X';
        assert!(Model::decode(&foreign, "t", None)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(Model::decode(&flipped, "t", None).is_err());
        assert!(Model::decode(b"PRISMMDL", "t", None).is_err());
    }

    #[test]
    fn threshold_masks_keep_positive_scores() {
        let m = masks_from_scores(&[vec![1.0, -1.0, 0.5, 0.0]], MaskKind::Threshold, 1);
        assert_eq!(m, vec![vec![0b0101]]);
    }
}
