//! Everything a federated run is a function of (with the adapter): the configuration
//! recorded in checkpoints and metrics.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::adam::AdamConfig;
use crate::kernels::mmd::{check_bandwidths, GMMN_MNIST_SIGMAS};
pub use crate::loss::{FeatureSpace, LossChoice};

/// Differential privacy of uploads (PRISM.md section 5).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// theta is clipped to [clip, 1 - clip].
    pub clip: f32,
    /// Noise standard deviation in units of the L2 sensitivity (1 - 2 clip) sqrt(d).
    pub noise_multiplier: f64,
    /// The delta at which epsilon is reported.
    pub delta: f64,
}

/// A federated training run. As JSON (a `--config` file, the `config.json` of a run folder)
/// missing fields take their defaults and unknown fields are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// mnist, fashion-mnist, cifar10, or a folder of images.
    pub dataset: String,
    /// Generator preset.
    pub arch: String,
    pub clients: usize,
    pub rounds: usize,
    pub local_steps: usize,
    /// Latents per step.
    pub batch: usize,
    /// Real images per step (the MMD's other sample); 0 means the same as `batch`.
    #[serde(default)]
    pub real_batch: usize,
    /// `iid`, `shards[:N]`, `dirichlet[:ALPHA]`.
    pub partition: String,
    /// Fraction of clients asked to train each round (Flower's fraction_fit).
    pub fraction_fit: f64,
    /// Fewest valid uploads a round needs to change the global model.
    pub min_fit_clients: usize,
    pub mada: bool,
    /// FedPM's persistent Beta prior instead of the per-round reset.
    pub persistent_prior: bool,
    /// PRISM-alpha: the last fraction of masked layers (from the output) send real scores.
    pub alpha: f64,
    pub loss: LossChoice,
    /// Bandwidths of the Gaussian kernels of the pixel-space MMD, for pixels in [0, 1]
    /// (GMMN's MNIST set by default). Feature-space MMDs take theirs from the median heuristic.
    pub bandwidths: Vec<f32>,
    pub features: FeatureSpace,
    /// A frozen encoder whose features the loss matches: a safetensors file in torchvision's
    /// VGG layout (see `loss::encoder`).
    #[serde(default)]
    pub encoder: Option<String>,
    /// The encoder's ReLU outputs the loss matches, numbered from 1 (default: all of them, as
    /// the reference does).
    #[serde(default)]
    pub encoder_layers: Option<Vec<usize>>,
    /// Weight of the pixel-space MMD in the loss (with `moments`: 0 is the reference's loss
    /// alone).
    #[serde(default = "default_pixel_weight")]
    pub pixel_weight: f32,
    /// Learning rate of GFMN's mean and variance trackers (the reference's `lrMovAvrg`).
    #[serde(default = "default_tracker_lr")]
    pub tracker_lr: f32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Score-gradient estimator: the reference's p-scaled one (true) or plain straight-through.
    pub p_scaled_estimator: bool,
    pub seed: u32,
    pub dp: Option<DpConfig>,
    /// Fraction of selected clients that drop out of a round (fault injection).
    pub drop_rate: f64,
    /// The first this many clients are adversaries that upload all-ones masks (fault
    /// injection, to show what robust aggregation does).
    #[serde(default)]
    pub adversaries: usize,
    /// Entropy-code uploads.
    pub entropy_coding: bool,
    /// Bound how far one client can move the global probabilities (robust aggregation).
    pub robust: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            dataset: "mnist".into(),
            arch: "mlp28-up".into(),
            clients: 10,
            rounds: 8,
            local_steps: 50,
            batch: 128,
            real_batch: 128,
            partition: "shards:4".into(),
            fraction_fit: 1.0,
            min_fit_clients: 1,
            mada: true,
            persistent_prior: false,
            alpha: 0.0,
            loss: LossChoice::Mmd,
            bandwidths: GMMN_MNIST_SIGMAS.to_vec(),
            features: FeatureSpace::Pixels,
            encoder: None,
            encoder_layers: None,
            pixel_weight: default_pixel_weight(),
            tracker_lr: default_tracker_lr(),
            lr: AdamConfig::default().lr,
            beta1: AdamConfig::default().beta1,
            beta2: AdamConfig::default().beta2,
            p_scaled_estimator: true,
            seed: 1,
            dp: None,
            drop_rate: 0.0,
            adversaries: 0,
            entropy_coding: true,
            robust: false,
        }
    }
}

fn default_pixel_weight() -> f32 {
    1.0
}

fn default_tracker_lr() -> f32 {
    1e-5
}

impl TrainConfig {
    /// The generator this configuration trains (its preset at the dataset's channels).
    pub fn architecture(&self) -> Result<crate::nn::Architecture> {
        crate::nn::Architecture::preset(
            &self.arch,
            crate::data::resolve::dataset_channels(&self.dataset),
        )
    }

    /// Real images per step.
    pub fn real_batch(&self) -> usize {
        if self.real_batch == 0 {
            self.batch
        } else {
            self.real_batch
        }
    }

    /// Parses and validates a configuration file's bytes; `what` names it in errors.
    pub fn from_json(bytes: &[u8], what: &str) -> Result<TrainConfig> {
        let cfg: TrainConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(what, format!("configuration: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::format(what, e.to_string()))?;
        Ok(cfg)
    }

    /// Checks ranges before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.clients == 0 || self.clients > 100_000 {
            return bad(format!("clients = {} must be 1 to 100000", self.clients));
        }
        if self.rounds == 0 || self.local_steps == 0 {
            return bad("rounds and local steps must be positive".into());
        }
        if self.rounds > 1_000_000 || self.local_steps > 1_000_000 {
            return bad("rounds and local steps must be at most 1000000".into());
        }
        if self.rounds as u64 * self.local_steps as u64 > u32::MAX as u64 {
            return bad(format!(
                "rounds x local steps = {} x {} is more steps than a client's 32-bit step \
                 counter holds ({}); use fewer rounds or local steps",
                self.rounds,
                self.local_steps,
                u32::MAX
            ));
        }
        if self.min_fit_clients > self.clients {
            return bad(format!(
                "min_fit_clients = {} is more than the {} clients",
                self.min_fit_clients, self.clients
            ));
        }
        if self.batch < 2 || self.batch > 4096 {
            return bad(format!("batch = {} must be 2 to 4096", self.batch));
        }
        if self.real_batch == 1 || self.real_batch > 4096 {
            return bad(format!(
                "real batch = {} must be 0 (same as batch) or 2 to 4096",
                self.real_batch
            ));
        }
        if !(self.fraction_fit > 0.0 && self.fraction_fit <= 1.0) {
            return bad(format!(
                "fraction_fit = {} must be in (0, 1]",
                self.fraction_fit
            ));
        }
        check_bandwidths(&self.bandwidths)?;
        if !(self.pixel_weight >= 0.0 && self.pixel_weight.is_finite()) {
            return bad(format!(
                "pixel weight = {} must be finite and at least 0",
                self.pixel_weight
            ));
        }
        if !(self.tracker_lr > 0.0 && self.tracker_lr.is_finite()) {
            return bad(format!("tracker lr = {} must be positive", self.tracker_lr));
        }
        if self.loss == LossChoice::Moments && self.encoder.is_none() {
            return bad("the moments loss matches an encoder's features: give --encoder".into());
        }
        if self.encoder.is_some() && self.features != FeatureSpace::Pixels {
            return bad(
                "--encoder and --features random-conv/random-patches are two feature spaces: \
                 choose one"
                    .into(),
            );
        }
        if self.loss != LossChoice::Moments
            && self.pixel_weight == 0.0
            && self.encoder.is_none()
            && self.features == FeatureSpace::Pixels
        {
            return bad("pixel weight 0 leaves the MMD loss without terms".into());
        }
        let learned = matches!(self.encoder.as_deref(), Some("lda" | "pca"));
        if learned && self.dp.is_some() {
            return bad(
                "--encoder lda/pca: the clients' feature statistics are uploaded without noise, \
                 so differential privacy would not hold; use an encoder file with --dp-noise"
                    .into(),
            );
        }
        if let Some(l) = &self.encoder_layers {
            if l.is_empty() || l.contains(&0) || self.encoder.is_none() {
                return bad("encoder layers are ReLU numbers from 1, and need --encoder".into());
            }
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad(format!("alpha = {} must be in [0, 1]", self.alpha));
        }
        if self.alpha > 0.0 && self.dp.is_some() {
            return bad(
                "PRISM-alpha layers (--alpha) upload raw scores, which the DP mechanism does not \
                 noise, so the reported epsilon would not hold: --alpha and --dp-noise cannot \
                 be combined"
                    .into(),
            );
        }
        if self.adversaries > self.clients {
            return bad(format!(
                "{} adversaries among {} clients",
                self.adversaries, self.clients
            ));
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return bad(format!("drop rate = {} must be in [0, 1)", self.drop_rate));
        }
        let adam_ok = self.lr > 0.0
            && self.lr.is_finite()
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2);
        if !adam_ok {
            return bad("Adam needs lr > 0 and betas in [0, 1)".into());
        }
        if let Some(dp) = &self.dp {
            let dp_ok = (0.0..0.5).contains(&dp.clip)
                && dp.noise_multiplier > 0.0
                && dp.noise_multiplier.is_finite()
                && dp.delta > 0.0
                && dp.delta < 1.0;
            if !dp_ok {
                return bad(
                    "DP needs clip in [0, 0.5), noise multiplier > 0 and delta in (0, 1)".into(),
                );
            }
        }
        crate::data::partition::Partition::parse(&self.partition)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_layers_under_dp_are_refused() {
        let cfg = TrainConfig {
            alpha: 0.5,
            dp: Some(DpConfig {
                clip: 0.1,
                noise_multiplier: 1.0,
                delta: 1e-5,
            }),
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("--alpha") && e.contains("--dp-noise"), "{e}");
    }
}
