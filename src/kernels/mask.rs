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
    mix: u32,
    _pad: u32,
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

/// `bits` <- one Bernoulli sample of `n` weights from keep thresholds, with stream `key`.
pub fn sample_packed(
    gpu: &Gpu,
    n: usize,
    keep: &Tensor,
    key: u32,
    bits: &Tensor,
) -> Result<Kernel> {
    check(keep, keep_words(n), DType::U32, "keep thresholds")?;
    check(bits, packed_words(n), DType::U32, "packed mask")?;
    let p = Params {
        n: u32_of(n, "weights")?,
        key,
        ..Default::default()
    };
    Ok(gpu
        .kernel(shader(), "sample_packed")
        .params(&p)
        .bind("keep_in", keep)
        .bind("bits", bits)
        .groups(groups_for(packed_words(n), 256)?)
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
    /// MADA: blend with lambda = count / n; otherwise the new scores are logit(theta).
    pub mada: bool,
}

/// Tensors of [`aggregate`].
pub struct AggregateIo<'a> {
    /// `clients` packed masks one after another.
    pub masks: &'a Tensor,
    /// Current global scores s_t.
    pub scores: &'a Tensor,
    /// Hamming count (MADA's lambda numerator).
    pub count: &'a Tensor,
    /// Output: logit(theta) (s_hat).
    pub s_hat: &'a Tensor,
    /// Output: s_{t+1}.
    pub scores_out: &'a Tensor,
    /// (alpha, beta) per weight for the persistent prior (2n f32); ignored otherwise.
    pub prior: &'a Tensor,
}

/// The server step for one layer of `n` weights.
pub fn aggregate(
    gpu: &Gpu,
    n: usize,
    clients: usize,
    opts: &AggregateOptions,
    io: &AggregateIo,
) -> Result<Kernel> {
    let words = packed_words(n);
    check(io.masks, words * clients, DType::U32, "client masks")?;
    check(io.scores, n, DType::F32, "scores")?;
    check(io.s_hat, n, DType::F32, "s_hat")?;
    check(io.scores_out, n, DType::F32, "new scores")?;
    check(io.count, 1, DType::U32, "counter")?;
    check(io.prior, 2 * n, DType::F32, "prior")?;
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
        mix: opts.mada as u32,
        _pad: 0,
    };
    Ok(gpu
        .kernel(shader(), "aggregate")
        .params(&p)
        .bind("bits_a", io.masks)
        .bind("scores", io.scores)
        .bind("count", io.count)
        .bind("values", io.s_hat)
        .bind("scores_out", io.scores_out)
        .bind("prior", io.prior)
        .groups(groups_for(n, 256)?)
        .build()?)
}

/// CPU twins.
pub mod cpu {
    use super::{AggregateOptions, Aggregation};
    use crate::rng;

    /// Keep threshold of one score: round(sigmoid(s) * 65536) capped at 65535.
    pub fn threshold(s: f32) -> u32 {
        let p = 1.0 / (1.0 + (-s).exp());
        ((p * 65536.0).round() as u32).min(65535)
    }

    /// Packed keep thresholds of all scores.
    pub fn thresholds(scores: &[f32]) -> Vec<u32> {
        scores
            .chunks(2)
            .map(|c| threshold(c[0]) | c.get(1).map_or(0, |&s| threshold(s) << 16))
            .collect()
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

    /// The server step for one layer: returns (s_hat, new scores) and updates `prior`.
    pub fn aggregate(
        n: usize,
        masks: &[Vec<u32>],
        scores: &[f32],
        lambda: f32,
        opts: &AggregateOptions,
        prior: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let k = masks.len() as f32;
        let mut s_hat = vec![0f32; n];
        let mut out = vec![0f32; n];
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
            out[i] = if opts.mada {
                lambda * s_hat[i] + (1.0 - lambda) * scores[i]
            } else {
                s_hat[i]
            };
        }
        (s_hat, out)
    }
}
