//! The server: global scores on the GPU and the aggregation strategies, with Flower's
//! vocabulary: each round the strategy's `configure_fit` picks the clients that train, and
//! `aggregate_fit` turns their results (and the failures) into the next global model.

use super::message::{MaskCoder, Payload, Upload};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::mask::{self, AggregateOptions, Aggregation};
use crate::rng::{self, HostRng};

/// Why a client's round did not count.
#[derive(Clone, Debug, PartialEq)]
pub enum FailureReason {
    /// The upload did not decode (wrong length, magic, version, checksum, values...).
    Malformed(String),
    /// The client did not answer in time (or dropped out).
    Dropped,
    /// The client was not selected this round, or answered for another round.
    Unexpected,
    /// A second upload from the same client in one round.
    Duplicate,
    /// Rejected by robust aggregation: the mask is far from the round's majority.
    Outlier,
}

/// A failed client in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub client: u32,
    pub reason: FailureReason,
}

/// What an aggregation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AggregateReport {
    /// MADA's lambda (None without MADA or when the round was skipped).
    pub lambda: Option<f64>,
    /// Valid uploads used.
    pub used: usize,
    /// True when too few valid uploads arrived and the previous global scores were kept.
    pub kept_previous: bool,
    /// Clients whose uploads robust aggregation rejected.
    pub rejected: Vec<u32>,
}

/// The global model and the scratch buffers of aggregation, on the GPU.
pub struct ServerModel {
    pub sizes: Vec<usize>,
    /// Layers whose clients upload scores (PRISM-alpha) instead of masks.
    pub score_layers: Vec<bool>,
    pub scores: Vec<Tensor>,
    keep: Vec<Tensor>,
    pub prior: Vec<Tensor>,
    s_hat: Vec<Tensor>,
    keep_hat: Vec<Tensor>,
    bits_a: Vec<Tensor>,
    bits_b: Vec<Tensor>,
    masks: Vec<Tensor>,
    next: Vec<Tensor>,
    count: Tensor,
    capacity: usize,
    /// The run seed, which keys MADA's comparison samples.
    seed: u32,
}

impl ServerModel {
    /// Initial scores s ~ N(0, 1) from the run seed, and room for `capacity` uploads a round.
    pub fn new(
        gpu: &Gpu,
        sizes: &[usize],
        score_layers: &[bool],
        capacity: usize,
        seed: u32,
    ) -> Result<ServerModel> {
        let mut rng = HostRng::new(seed, &[rng::stream::SCORE_INIT]);
        let mut m = ServerModel {
            sizes: sizes.to_vec(),
            score_layers: score_layers.to_vec(),
            scores: Vec::new(),
            keep: Vec::new(),
            prior: Vec::new(),
            s_hat: Vec::new(),
            keep_hat: Vec::new(),
            bits_a: Vec::new(),
            bits_b: Vec::new(),
            masks: Vec::new(),
            next: Vec::new(),
            count: gpu.zeros(&[1], DType::U32, "hamming count")?,
            capacity: capacity.max(1),
            seed,
        };
        for &n in sizes {
            let s: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            m.scores.push(gpu.upload_f32(&s, &[n], "global scores")?);
            m.keep
                .push(gpu.zeros(&[mask::keep_words(n)], DType::U32, "global thresholds")?);
            m.prior
                .push(gpu.upload_f32(&vec![1.0; 2 * n], &[2 * n], "Beta prior")?);
            m.s_hat.push(gpu.zeros(&[n], DType::F32, "s_hat")?);
            m.keep_hat
                .push(gpu.zeros(&[mask::keep_words(n)], DType::U32, "s_hat thresholds")?);
            m.bits_a
                .push(gpu.zeros(&[mask::packed_words(n)], DType::U32, "MADA sample A")?);
            m.bits_b
                .push(gpu.zeros(&[mask::packed_words(n)], DType::U32, "MADA sample B")?);
            m.masks.push(gpu.zeros(
                &[m.capacity * mask::packed_words(n)],
                DType::U32,
                "client masks",
            )?);
            m.next.push(gpu.zeros(&[n], DType::F32, "next scores")?);
        }
        Ok(m)
    }

    /// Total weights of mask layers (MADA's lambda is a fraction of these).
    pub fn mask_weights(&self) -> usize {
        self.sizes
            .iter()
            .zip(&self.score_layers)
            .filter(|(_, s)| !**s)
            .map(|(n, _)| n)
            .sum()
    }

    /// Reads the global scores back.
    pub fn read_scores(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .scores
            .iter()
            .map(|t| gpu.read_f32(t))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Overwrites the global scores (resuming from a checkpoint).
    pub fn write_scores(&self, gpu: &Gpu, scores: &[Vec<f32>]) -> Result<()> {
        if scores.len() != self.scores.len() {
            return Err(Error::invalid("score layers do not match the model"));
        }
        for (t, s) in self.scores.iter().zip(scores) {
            gpu.write_f32(t, s)?;
        }
        Ok(())
    }
}

/// The server's intake of one message: decode and validate it (`coder` decodes entropy-coded
/// layers), then check that it belongs to this round, comes from a selected client and is that
/// client's first. Anything else is a failure of the round, never an error of the server.
pub fn receive(
    bytes: &[u8],
    sizes: &[usize],
    round: u32,
    selected: &[usize],
    so_far: &[Upload],
    coder: Option<&dyn MaskCoder>,
) -> std::result::Result<Upload, FailureReason> {
    let up = super::message::decode(bytes, sizes, coder)
        .map_err(|e| FailureReason::Malformed(e.to_string()))?;
    if up.round != round || !selected.contains(&(up.client as usize)) {
        return Err(FailureReason::Unexpected);
    }
    if so_far.iter().any(|u| u.client == up.client) {
        return Err(FailureReason::Duplicate);
    }
    Ok(up)
}

/// A federated strategy (Flower's interface, specialised to mask uploads).
pub trait Strategy {
    fn name(&self) -> String;

    /// The clients that train in `round`, out of `available`.
    fn configure_fit(&mut self, round: u32, available: usize, rng: &mut HostRng) -> Vec<usize>;

    /// Aggregates the valid uploads into `model`; failures are reported for the record.
    fn aggregate_fit(
        &mut self,
        gpu: &Gpu,
        round: u32,
        model: &mut ServerModel,
        results: &[Upload],
        failures: &[Failure],
    ) -> Result<AggregateReport>;
}

/// PRISM's server: FedPM's Bayesian aggregation of smoothed masks (reset or persistent prior),
/// optionally followed by MADA; PRISM-alpha layers average scores.
#[derive(Clone, Debug)]
pub struct Prism {
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub rule: Aggregation,
    pub mada: bool,
    /// Smoothing of bits: 0 -> lo, 1 -> hi (PRISM: 0.01, 0.99).
    pub lo: f32,
    pub hi: f32,
    /// Reject uploads whose masks are outliers (see `outliers` in this module).
    pub robust: bool,
    /// Poisson selection: each client trains with probability `fraction_fit`, independently
    /// (a round may then have fewer than `min_fit_clients`, or none, and keeps the previous
    /// scores). This is the sampling the DP accountant assumes; DP runs use it. Otherwise a
    /// fixed-size random subset (Flower's way).
    pub poisson: bool,
}

impl Default for Prism {
    fn default() -> Self {
        Self {
            fraction_fit: 1.0,
            min_fit_clients: 1,
            rule: Aggregation::MeanOfSmoothed,
            mada: true,
            lo: 0.01,
            hi: 0.99,
            robust: false,
            poisson: false,
        }
    }
}

/// Robust aggregation's test: the uploads (indices) whose masks are far from the round's
/// coordinate-wise majority. A client's distance is the fraction of mask bits where it
/// disagrees with the majority; an upload is an outlier when its distance exceeds the median
/// distance by more than 3 median absolute deviations plus 0.02. Honest clients sample from
/// similar probabilities and sit close together; a mask of all ones (or any mask unrelated to
/// the model) sits far away. Needs at least 3 uploads.
pub fn outliers(results: &[Upload], score_layers: &[bool]) -> Vec<usize> {
    let m = results.len();
    if m < 3 {
        return Vec::new();
    }
    let mut dist = vec![0u64; m];
    let mut total = 0u64;
    for (l, &is_scores) in score_layers.iter().enumerate() {
        if is_scores {
            continue;
        }
        let masks: Vec<&Vec<u32>> = results
            .iter()
            .filter_map(|u| match &u.layers[l] {
                Payload::Bits(b) => Some(b),
                Payload::Scores(_) => None,
            })
            .collect();
        if masks.len() != m {
            continue;
        }
        for w in 0..masks[0].len() {
            // Majority of each bit position: count ones across clients, 32 positions at once.
            let mut majority = 0u32;
            for bit in 0..32 {
                let ones = masks.iter().filter(|b| (b[w] >> bit) & 1 == 1).count();
                if 2 * ones > m {
                    majority |= 1 << bit;
                }
            }
            for (d, b) in dist.iter_mut().zip(&masks) {
                *d += (b[w] ^ majority).count_ones() as u64;
            }
            total += 32;
        }
    }
    if total == 0 {
        return Vec::new();
    }
    let frac: Vec<f64> = dist.iter().map(|&d| d as f64 / total as f64).collect();
    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let med = median(&mut frac.clone());
    let mad = median(&mut frac.iter().map(|f| (f - med).abs()).collect());
    (0..m)
        .filter(|&i| frac[i] > med + 3.0 * mad + 0.02)
        .collect()
}

impl Strategy for Prism {
    fn name(&self) -> String {
        let rule = match self.rule {
            Aggregation::MeanOfSmoothed => "FedPM mean",
            Aggregation::PersistentPrior => "FedPM persistent prior",
        };
        format!("{rule}{}", if self.mada { " + MADA" } else { "" })
    }

    fn configure_fit(&mut self, _round: u32, available: usize, rng: &mut HostRng) -> Vec<usize> {
        if self.poisson {
            return (0..available)
                .filter(|_| rng.unit_f64() < self.fraction_fit)
                .collect();
        }
        let want = ((available as f64 * self.fraction_fit).round() as usize)
            .clamp(self.min_fit_clients.min(available), available);
        let mut all: Vec<usize> = (0..available).collect();
        rng.shuffle(&mut all);
        let mut chosen = all[..want.max(1).min(available)].to_vec();
        chosen.sort_unstable();
        chosen
    }

    fn aggregate_fit(
        &mut self,
        gpu: &Gpu,
        round: u32,
        model: &mut ServerModel,
        results: &[Upload],
        _failures: &[Failure],
    ) -> Result<AggregateReport> {
        let rejected_idx = if self.robust {
            outliers(results, &model.score_layers)
        } else {
            Vec::new()
        };
        let rejected: Vec<u32> = rejected_idx.iter().map(|&i| results[i].client).collect();
        let kept: Vec<Upload> = results
            .iter()
            .enumerate()
            .filter(|(i, _)| !rejected_idx.contains(i))
            .map(|(_, u)| u.clone())
            .collect();
        let results = &kept[..];
        if results.len() < self.min_fit_clients.max(1) {
            return Ok(AggregateReport {
                lambda: None,
                used: results.len(),
                kept_previous: true,
                rejected,
            });
        }
        if results.len() > model.capacity {
            return Err(Error::invalid(format!(
                "{} uploads but room for {}",
                results.len(),
                model.capacity
            )));
        }
        let opts = AggregateOptions {
            rule: self.rule,
            lo: self.lo,
            hi: self.hi,
        };
        let m = results.len();
        let mut ks: Vec<Kernel> = Vec::new();
        // Stage the masks; average the scores of PRISM-alpha layers on the host.
        for (l, &n) in model.sizes.iter().enumerate() {
            if model.score_layers[l] {
                let mut mean = vec![0f64; n];
                for up in results {
                    let Payload::Scores(s) = &up.layers[l] else {
                        return Err(Error::invalid(format!("layer {l} expects scores")));
                    };
                    for (a, v) in mean.iter_mut().zip(s) {
                        *a += *v as f64 / m as f64;
                    }
                }
                let mean: Vec<f32> = mean.into_iter().map(|v| v as f32).collect();
                gpu.write_f32(&model.next[l], &mean)?;
                continue;
            }
            let words = mask::packed_words(n);
            for (c, up) in results.iter().enumerate() {
                let Payload::Bits(b) = &up.layers[l] else {
                    return Err(Error::invalid(format!("layer {l} expects a mask")));
                };
                gpu.queue().write_buffer(
                    model.masks[l].buffer(),
                    (c * words * 4) as u64,
                    bytemuck::cast_slice(b),
                );
            }
            ks.push(mask::aggregate(
                gpu,
                n,
                m,
                &opts,
                &model.masks[l],
                &model.prior[l],
                &model.s_hat[l],
            )?);
        }
        let total = model.mask_weights();
        if self.mada && total > 0 {
            gpu.write_u32(&model.count, &[0])?;
            let key = rng::key_path(model.seed, &[rng::stream::MADA, round]);
            for (l, &n) in model.sizes.iter().enumerate() {
                if model.score_layers[l] {
                    continue;
                }
                // A ~ Bernoulli(sigmoid(s_t)), B ~ Bernoulli(sigmoid(s_hat)); lambda = Hamming / total.
                let draws = [
                    (&model.scores[l], &model.keep[l], &model.bits_a[l]),
                    (&model.s_hat[l], &model.keep_hat[l], &model.bits_b[l]),
                ];
                for (scores, keep, _) in draws {
                    ks.push(mask::thresholds(gpu, scores, keep)?);
                }
                for (i, (_, keep, bits)) in draws.into_iter().enumerate() {
                    let k = rng::key(rng::key(key, i as u32), l as u32);
                    ks.push(mask::sample_packed(gpu, n, keep, k, bits)?);
                }
                ks.push(mask::hamming(
                    gpu,
                    n,
                    &model.bits_a[l],
                    &model.bits_b[l],
                    &model.count,
                )?);
            }
            for (l, _) in model.sizes.iter().enumerate() {
                if !model.score_layers[l] {
                    ks.push(mask::blend(
                        gpu,
                        total,
                        &model.count,
                        &model.s_hat[l],
                        &model.scores[l],
                        &model.next[l],
                    )?);
                }
            }
        }
        gpu.run(&ks.iter().collect::<Vec<_>>())?;
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        for l in 0..model.sizes.len() {
            let from = if model.score_layers[l] || self.mada {
                &model.next[l]
            } else {
                &model.s_hat[l]
            };
            enc.copy_buffer_to_buffer(
                from.buffer(),
                0,
                model.scores[l].buffer(),
                0,
                model.scores[l].bytes(),
            );
        }
        gpu.queue().submit([enc.finish()]);
        let lambda = if self.mada && total > 0 {
            Some(gpu.read_u32(&model.count)?[0] as f64 / total as f64)
        } else {
            None
        };
        Ok(AggregateReport {
            lambda,
            used: m,
            kept_previous: false,
            rejected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Poisson selection takes each client independently at fraction_fit (so a round's size
    /// varies, and may be 0); the fixed-size form takes round(fraction_fit * clients).
    #[test]
    fn poisson_selection_samples_each_client_at_the_rate() {
        let mut poisson = Prism {
            fraction_fit: 0.3,
            poisson: true,
            ..Default::default()
        };
        let mut fixed = Prism {
            poisson: false,
            ..poisson.clone()
        };
        let mut sizes = Vec::new();
        let mut total = 0usize;
        for r in 0..200u32 {
            let mut rng = HostRng::new(5, &[r]);
            let chosen = poisson.configure_fit(r, 50, &mut rng);
            assert!(chosen.windows(2).all(|w| w[0] < w[1]) && chosen.iter().all(|&c| c < 50));
            sizes.push(chosen.len());
            total += chosen.len();
            assert_eq!(fixed.configure_fit(r, 50, &mut rng).len(), 15);
        }
        // 10,000 draws at 0.3: 3,000 +- 46 (one standard deviation).
        assert!((total as f64 - 3000.0).abs() < 200.0, "{total}");
        assert!(sizes.iter().min() < sizes.iter().max());
        let mut none = Prism {
            fraction_fit: 0.001,
            poisson: true,
            ..Default::default()
        };
        assert!(none
            .configure_fit(0, 3, &mut HostRng::new(1, &[]))
            .is_empty());
    }
}
