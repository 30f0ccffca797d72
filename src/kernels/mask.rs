//! Masks (`shaders/mask.wgsl`): keep thresholds from scores, packed Bernoulli samples,
//! unpacking, Hamming distance and the server's aggregation.

use super::{check, groups_for, u32_of};
use crate::error::Result;
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    key: u32,
    clients: u32,
    mode: u32,
    lo: f32,
    hi: f32,
    total: u32,
    sigma: f32,
}

fn shader() -> ShaderKey {
    ShaderKey::new("mask.wgsl")
}

/// Words of a packed mask of `n` bits.
pub fn packed_words(n: usize) -> usize {
    n.div_ceil(32)
}

/// Words of the keep thresholds of `n` weights (two per word).
pub fn keep_words(n: usize) -> usize {
    n.div_ceil(2)
}

/// `keep` <- 16-bit keep thresholds of `scores` (n f32 -> ceil(n/2) u32).
pub fn thresholds(gpu: &Gpu, scores: &Tensor, keep: &Tensor) -> Result<Kernel> {
    let n = scores.len();
    check(scores, n, DType::F32, "scores")?;
    check(keep, keep_words(n), DType::U32, "keep thresholds")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "thresholds")
        .params(&p)
        .bind("scores", scores)
        .bind("keep", keep)
        .groups(groups_for(keep_words(n), 256)?)
        .build()?)
}

/// The launch of a sampling entry point: `bits` <- a Bernoulli sample of `n` weights from the
/// keep thresholds `keep`, stream `key`.
fn sampler<'a>(
    gpu: &'a Gpu,
    entry: &str,
    n: usize,
    keep: &'a Tensor,
    key: u32,
    bits: &'a Tensor,
) -> Result<crate::gpu::KernelBuilder<'a>> {
    check(keep, keep_words(n), DType::U32, "keep thresholds")?;
    check(bits, packed_words(n), DType::U32, "packed mask")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        key,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), entry)
        .params(&p)
        .bind("keep_in", keep)
        .bind("bits", bits)
        .groups(groups_for(packed_words(n), 256)?))
}

/// `bits` <- one Bernoulli sample of `n` weights from keep thresholds, with stream `key`.
pub fn sample_packed(
    gpu: &Gpu,
    n: usize,
    keep: &Tensor,
    key: u32,
    bits: &Tensor,
) -> Result<Kernel> {
    Ok(sampler(gpu, "sample_packed", n, keep, key, bits)?.build()?)
}

/// `bits` <- the training mask of the step in `step` ([`StepState`](super::StepState): client
/// and step counter) for a layer with mask stream `mask_key`: the same bits as the "train"
/// weight source draws in the matmul kernels, sampled once so that they can read them packed.
pub fn sample_step(
    gpu: &Gpu,
    n: usize,
    keep: &Tensor,
    mask_key: u32,
    step: &Tensor,
    bits: &Tensor,
) -> Result<Kernel> {
    Ok(sampler(gpu, "sample_step", n, keep, mask_key, bits)?
        .bind("step", step)
        .build()?)
}

/// `keep` <- thresholds of theta = clamp(clip(sigmoid(scores), [clip, 1 - clip]) + N(0,
/// sigma^2), [0, 1]): the differentially private probabilities a client samples its upload from.
pub fn dp_thresholds(
    gpu: &Gpu,
    scores: &Tensor,
    clip: f32,
    sigma: f32,
    key: u32,
    keep: &Tensor,
) -> Result<Kernel> {
    let n = scores.len();
    check(keep, keep_words(n), DType::U32, "noisy thresholds")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        key,
        lo: clip,
        sigma,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "dp_thresholds")
        .params(&p)
        .bind("scores", scores)
        .bind("keep", keep)
        .groups(groups_for(keep_words(n), 256)?)
        .build()?)
}

/// `values` <- bits of a packed mask as 0.0 / 1.0.
pub fn unpack(gpu: &Gpu, n: usize, bits: &Tensor, values: &Tensor) -> Result<Kernel> {
    check(bits, packed_words(n), DType::U32, "packed mask")?;
    check(values, n, DType::F32, "unpacked mask")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "unpack")
        .params(&p)
        .bind("bits_a", bits)
        .bind("values", values)
        .groups(groups_for(n, 256)?)
        .build()?)
}

/// `bits` <- the thresholded mask (score > 0, i.e. p > 0.5).
pub fn pack_positive(gpu: &Gpu, scores: &Tensor, bits: &Tensor) -> Result<Kernel> {
    let n = scores.len();
    check(bits, packed_words(n), DType::U32, "packed mask")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "pack_positive")
        .params(&p)
        .bind("scores", scores)
        .bind("bits", bits)
        .groups(groups_for(packed_words(n), 256)?)
        .build()?)
}

/// `count[0]` += Hamming distance between two packed masks of `n` bits. `count` must be
/// cleared beforehand (it accumulates, so one counter can sum several layers).
pub fn hamming(gpu: &Gpu, n: usize, a: &Tensor, b: &Tensor, count: &Tensor) -> Result<Kernel> {
    check(a, packed_words(n), DType::U32, "mask a")?;
    check(b, packed_words(n), DType::U32, "mask b")?;
    check(count, 1, DType::U32, "counter")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "hamming")
        .params(&p)
        .bind("bits_a", a)
        .bind("bits_b", b)
        .bind("count", count)
        .groups(groups_for(packed_words(n), 256)?)
        .build()?)
}

/// The server's aggregation rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Aggregation {
    /// theta = mean of smoothed masks (FedPM with the Beta(1,1) prior reset every round).
    MeanOfSmoothed,
    /// FedPM's persistent Beta prior (alpha, beta per weight, carried across rounds).
    PersistentPrior,
}

/// Options of [`aggregate`].
#[derive(Clone, Copy, Debug)]
pub struct AggregateOptions {
    pub rule: Aggregation,
    /// Smoothed value of a 0 bit (PRISM: 0.01); also the lower clamp of theta.
    pub lo: f32,
    /// Smoothed value of a 1 bit (PRISM: 0.99); also the upper clamp of theta.
    pub hi: f32,
}

/// s_hat <- logit(theta) of `clients` packed masks of a layer of `n` weights (the masks one
/// after another in `masks`; only the first `clients` are read). `prior` holds (alpha, beta)
/// per weight for the persistent prior (2n f32) and is updated in place; other rules ignore it.
pub fn aggregate(
    gpu: &Gpu,
    n: usize,
    clients: usize,
    opts: &AggregateOptions,
    masks: &Tensor,
    prior: &Tensor,
    s_hat: &Tensor,
) -> Result<Kernel> {
    let words = packed_words(n);
    if masks.len() < words * clients || masks.dtype() != DType::U32 {
        return Err(crate::Error::invalid("client masks: too few words"));
    }
    check(s_hat, n, DType::F32, "s_hat")?;
    check(prior, 2 * n, DType::F32, "prior")?;
    if clients == 0 {
        return Err(crate::Error::invalid("aggregation needs at least one mask"));
    }
    let p = Params {
        n: u32_of(n, "weights")?,
        key: 0,
        clients: u32_of(clients, "clients")?,
        mode: match opts.rule {
            Aggregation::MeanOfSmoothed => 0,
            Aggregation::PersistentPrior => 1,
        },
        lo: opts.lo,
        hi: opts.hi,
        total: 0,
        sigma: 0.0,
    };
    Ok(gpu
        .kernel(shader(), "aggregate")
        .params(&p)
        .bind("bits_a", masks)
        .bind("values", s_hat)
        .bind("prior", prior)
        .groups(groups_for(n, 256)?)
        .build()?)
}

/// MADA's update of one layer: out <- lambda s_hat + (1 - lambda) scores, where lambda =
/// count\[0\] / total (the Hamming count over all `total` weights).
pub fn blend(
    gpu: &Gpu,
    total: usize,
    count: &Tensor,
    s_hat: &Tensor,
    scores: &Tensor,
    out: &Tensor,
) -> Result<Kernel> {
    let n = scores.len();
    check(s_hat, n, DType::F32, "s_hat")?;
    check(out, n, DType::F32, "new scores")?;
    check(count, 1, DType::U32, "counter")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        total: u32_of(total, "weights")?,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "blend")
        .params(&p)
        .bind("count", count)
        .bind("values", s_hat)
        .bind("scores", scores)
        .bind("scores_out", out)
        .groups(groups_for(n, 256)?)
        .build()?)
}

/// CPU twins.
pub mod cpu {
    use super::{AggregateOptions, Aggregation};
    use crate::rng;

    /// Keep threshold of one score: round(sigmoid(s) * 65536) capped at 65535.
    pub fn threshold(s: f32) -> u32 {
        quantise(sigmoid(s))
    }

    fn sigmoid(s: f32) -> f32 {
        1.0 / (1.0 + (-s).exp())
    }

    /// A probability as a 16-bit threshold (mask.wgsl's `quantise`).
    fn quantise(p: f32) -> u32 {
        ((p * 65536.0).round() as u32).min(65535)
    }

    /// Packed keep thresholds of all scores.
    pub fn thresholds(scores: &[f32]) -> Vec<u32> {
        pack_thresholds(&scores.iter().map(|&s| threshold(s)).collect::<Vec<_>>())
    }

    /// 16-bit thresholds, two to a word (the first in the low half).
    fn pack_thresholds(t: &[u32]) -> Vec<u32> {
        t.chunks(2)
            .map(|c| c[0] | c.get(1).map_or(0, |&h| h << 16))
            .collect()
    }

    /// The twin of the `dp_thresholds` kernel: thresholds of theta = clamp(clip(sigmoid(s),
    /// [clip, 1 - clip]) + sigma z_i, [0, 1]) with z_i the Box-Muller normal of (key, i). The
    /// GPU's log, cos and sin agree to a few ulp, so a threshold may differ by one unit.
    pub fn dp_thresholds(scores: &[f32], clip: f32, sigma: f32, key: u32) -> Vec<u32> {
        let t: Vec<u32> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let theta = sigmoid(s).clamp(clip, 1.0 - clip);
                quantise((theta + sigma * rng::normal_bm(key, i as u32)).clamp(0.0, 1.0))
            })
            .collect();
        pack_thresholds(&t)
    }

    /// One packed Bernoulli sample from thresholds.
    pub fn sample_packed(n: usize, keep: &[u32], key: u32) -> Vec<u32> {
        let mut bits = vec![0u32; n.div_ceil(32)];
        for i in 0..n {
            let t = (keep[i >> 1] >> ((i & 1) * 16)) & 0xffff;
            if rng::u16_at(key, i as u32) < t {
                bits[i >> 5] |= 1 << (i & 31);
            }
        }
        bits
    }

    /// Packs booleans 32 to a word.
    pub fn pack(values: &[bool]) -> Vec<u32> {
        let mut bits = vec![0u32; values.len().div_ceil(32)];
        for (i, &v) in values.iter().enumerate() {
            if v {
                bits[i >> 5] |= 1 << (i & 31);
            }
        }
        bits
    }

    /// Unpacks `n` bits.
    pub fn unpack(bits: &[u32], n: usize) -> Vec<bool> {
        (0..n)
            .map(|i| (bits[i >> 5] >> (i & 31)) & 1 == 1)
            .collect()
    }

    /// Hamming distance of two packed masks.
    pub fn hamming(a: &[u32], b: &[u32]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    /// s_hat of one layer; updates `prior` for the persistent rule.
    pub fn aggregate(
        n: usize,
        masks: &[Vec<u32>],
        opts: &AggregateOptions,
        prior: &mut [f32],
    ) -> Vec<f32> {
        let k = masks.len() as f32;
        let mut s_hat = vec![0f32; n];
        for i in 0..n {
            let ones = masks
                .iter()
                .filter(|m| (m[i >> 5] >> (i & 31)) & 1 == 1)
                .count() as u32;
            let zeros = masks.len() as u32 - ones;
            let theta = match opts.rule {
                Aggregation::MeanOfSmoothed => (opts.hi * ones as f32 + opts.lo * zeros as f32) / k,
                Aggregation::PersistentPrior => {
                    prior[2 * i] += ones as f32;
                    prior[2 * i + 1] += zeros as f32;
                    (prior[2 * i] / (prior[2 * i] + prior[2 * i + 1])).clamp(opts.lo, opts.hi)
                }
            };
            s_hat[i] = (theta / (1.0 - theta)).ln();
        }
        s_hat
    }

    /// MADA's blend.
    pub fn blend(lambda: f32, s_hat: &[f32], scores: &[f32]) -> Vec<f32> {
        s_hat
            .iter()
            .zip(scores)
            .map(|(h, s)| lambda * h + (1.0 - lambda) * s)
            .collect()
    }
}
