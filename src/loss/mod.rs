//! Feature-space losses: frozen encoders with loaded parameters ([`encoder`]) and the
//! reference code's mean-and-variance matching with GFMN's moving averages ([`moments`]).
//! Kernel MMD lives in `kernels::mmd`; the trainer combines them.

pub mod encoder;
pub mod moments;
pub mod objective;
pub mod readout;

pub use encoder::Encoder;
pub use moments::{real_statistics, MomentLoss};
pub use objective::{median_distance, ClientLoss, Objective, ObjectiveSpec, StepIo};

use serde::{Deserialize, Serialize};

use crate::kernels::Init;
use crate::nn::{Architecture, Layer};

/// Feature space of the loss.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum FeatureSpace {
    /// Raw pixels (mapped to [0, 1]).
    Pixels,
    /// Pixels plus the features of a frozen random convolutional encoder regenerated from the
    /// seed (two stride-2 4x4 convs with ReLU).
    RandomConv,
    /// Pixels plus the first layer of that encoder only: 32 random 4x4 patch detectors
    /// (stride 2, ReLU). Cheap, and it penalises the isolated bright pixels of mask noise that
    /// pixel-space MMD with GMMN's bandwidths barely sees.
    RandomPatches,
}

impl FeatureSpace {
    /// Conv+ReLU stages of the frozen random encoder whose features join the pixels in the
    /// loss; None for pixels alone.
    pub fn encoder_stages(self) -> Option<usize> {
        match self {
            FeatureSpace::Pixels => None,
            FeatureSpace::RandomConv => Some(2),
            FeatureSpace::RandomPatches => Some(1),
        }
    }
}

/// Loss function.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum LossChoice {
    /// sqrt(MMD^2) with a sum of Gaussian kernels (biased estimator).
    Mmd,
    /// Unbiased MMD^2 estimate under the square root.
    MmdUnbiased,
    /// Mean-and-variance matching (the reference code's loss).
    Moments,
}

/// The frozen random encoder of the `random-conv` feature space: two stride-2 4x4
/// convolutions with ReLU, weights regenerated from the seed.
pub fn random_conv_encoder(depth: usize) -> Architecture {
    let mut a = Architecture {
        name: "random-conv-encoder".into(),
        latent: 0,
        layers: vec![
            Layer::Conv {
                cout: 32,
                k: 4,
                stride: 2,
                pad: 1,
            },
            Layer::Relu,
            Layer::Conv {
                cout: 64,
                k: 4,
                stride: 2,
                pad: 1,
            },
            Layer::Relu,
        ],
        init: Init::SignedConstant,
    };
    // Weights are a function of (seed, layer, index), so the one-stage encoder is exactly the
    // first stage of the two-stage one.
    a.layers.truncate(2 * depth.clamp(1, 2));
    a
}

/// Layer offset of the random encoder's weight streams, keeping them unrelated to the
/// generator's.
pub const RANDOM_ENCODER_LAYER_OFFSET: u32 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_encoder_is_the_first_stage_of_the_conv_encoder() {
        let one = random_conv_encoder(1);
        let two = random_conv_encoder(2);
        assert_eq!(one.layers.len(), 2);
        assert_eq!(one.layers[..], two.layers[..2]);
        let shape = crate::nn::Shape { c: 1, h: 28, w: 28 };
        assert_eq!(
            crate::nn::arch::shape_through(&one.layers, shape).unwrap(),
            crate::nn::Shape {
                c: 32,
                h: 14,
                w: 14
            }
        );
    }
}
