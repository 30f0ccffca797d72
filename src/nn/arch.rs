//! Generator architectures as layer lists, and the presets.

use crate::error::{Error, Result};
use crate::kernels::Init;

/// One layer. Masked layers (linear, conv, transposed conv) have frozen random weights and
/// trained scores; the others have no parameters (BatchNorm has no affine part in PRISM).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Layer {
    /// Masked dense layer on flattened activations.
    Linear {
        outputs: usize,
    },
    /// Masked convolution, kernel k x k.
    Conv {
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    },
    /// Masked transposed convolution, kernel k x k.
    ConvT {
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    },
    /// Batch-statistics normalisation per channel (per feature for flat activations).
    BatchNorm,
    Relu,
    Tanh,
    /// Nearest-neighbour 2x upsampling.
    Upsample2x,
    /// Fixed (not trained, no weights) 3x3 binomial smoothing of every channel,
    /// `[1 2 1] x [1 2 1] / 16` with zero padding. Before the output nonlinearity of a fully
    /// connected generator it turns independent per-pixel mask noise into a 2.7x smaller,
    /// spatially smooth residue, so the loss spends its signal on shapes, not on speckle.
    Blur,
    /// 2x2 max pooling with stride 2 (PyTorch's `MaxPool2d(2)`: odd last rows and columns
    /// dropped). Encoders only pool; generators have no use for it.
    MaxPool2,
    /// 2x2 average pooling with stride 2 (`AvgPool2d(2)`).
    AvgPool2,
    /// A fixed per-channel affine map `a_c x + b_c`: a pretrained encoder's conv bias and
    /// BatchNorm in inference form, folded. Its parameters are loaded with the encoder (they are
    /// not a function of the seed), so generators, whose files hold only a seed and a mask,
    /// cannot have one.
    Affine,
    /// Views flat activations as images.
    Reshape {
        c: usize,
        h: usize,
        w: usize,
    },
    /// `main(x) + skip(x)`.
    Residual {
        main: Vec<Layer>,
        skip: Vec<Layer>,
    },
}

/// Per-sample activation shape: channels x height x width (flat: features x 1 x 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub fn flat(n: usize) -> Shape {
        Shape { c: n, h: 1, w: 1 }
    }

    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A generator: latent size, output image shape, layers, and how weights are initialised.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Architecture {
    pub name: String,
    pub latent: usize,
    pub layers: Vec<Layer>,
    pub init: Init,
}

/// A masked layer's static description, in network order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskedLayerInfo {
    /// Index among masked layers (the `layer` of its weight stream).
    pub index: u32,
    pub weights: usize,
    pub fan_in: u32,
    pub kind: &'static str,
    /// The weight tensor's shape in PyTorch's layout: linear [out, in], conv [out, in, k, k],
    /// transposed conv [in, out, k, k] (unused trailing entries are 1).
    pub dims: [usize; 4],
}

/// Largest channel count, side, kernel, stride, padding or width a layer table may name.
/// Layer tables come from model files and checkpoints, so every size is bounded before any
/// arithmetic: with these bounds no product below overflows.
pub const MAX_DIM: usize = 1 << 16;
/// Largest activation (elements of one image at one layer).
pub const MAX_ACTIVATION: usize = 1 << 26;
/// Largest number of masked weights of a whole network (2^31: indices stay u32 in kernels).
pub const MAX_WEIGHTS: usize = 1 << 31;

impl Layer {
    /// A 3x3 convolution to `cout` channels that keeps the size (stride 1, padding 1), as most
    /// of the generators' convolutions are.
    pub fn conv3x3(cout: usize) -> Layer {
        Layer::Conv {
            cout,
            k: 3,
            stride: 1,
            pad: 1,
        }
    }

    /// Output shape for an input shape, or an error saying why the layer cannot apply.
    pub fn output_shape(&self, s: Shape) -> Result<Shape> {
        let bad = |why: &str| Err(Error::invalid(format!("{self:?} on input {s:?}: {why}")));
        if super::layers::kind(self)
            .sizes()
            .iter()
            .chain([&s.c, &s.h, &s.w])
            .any(|&d| d > MAX_DIM)
        {
            return bad(&format!("a size beyond {MAX_DIM}"));
        }
        if s.len() > MAX_ACTIVATION {
            return bad(&format!("more than {MAX_ACTIVATION} activations"));
        }
        super::layers::kind(self).output_shape(s, &|why| {
            Error::invalid(format!("{self:?} on input {s:?}: {why}"))
        })
    }
}

/// Whether any layer, inside residual blocks too, satisfies `pred`.
pub fn any_layer(layers: &[Layer], pred: &dyn Fn(&Layer) -> bool) -> bool {
    layers.iter().any(|l| {
        pred(l)
            || matches!(l, Layer::Residual { main, skip }
                if any_layer(main, pred) || any_layer(skip, pred))
    })
}

/// The shape after a list of layers.
pub fn shape_through(layers: &[Layer], mut s: Shape) -> Result<Shape> {
    for l in layers {
        s = l.output_shape(s)?;
    }
    Ok(s)
}

/// The product of sizes, refused beyond [`MAX_WEIGHTS`] (sizes come from untrusted files).
pub(crate) fn weight_count(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| {
            a.checked_mul(d).filter(|&p| p <= MAX_WEIGHTS)
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "a layer of {dims:?} weights; at most {MAX_WEIGHTS} are supported"
            ))
        })
}

/// Appends the masked layers of `layers` on input shape `s`; returns the output shape.
pub(crate) fn collect_masked(
    layers: &[Layer],
    mut s: Shape,
    out: &mut Vec<MaskedLayerInfo>,
) -> Result<Shape> {
    for l in layers {
        let next = l.output_shape(s)?;
        super::layers::kind(l).collect_masked(s, out)?;
        s = next;
    }
    Ok(s)
}

impl Architecture {
    /// The output image shape.
    pub fn output(&self) -> Result<Shape> {
        shape_through(&self.layers, Shape::flat(self.latent))
    }

    /// The masked layers in order (main path before skip path inside a residual block).
    pub fn masked_layers(&self) -> Result<Vec<MaskedLayerInfo>> {
        let mut v = Vec::new();
        collect_masked(&self.layers, Shape::flat(self.latent), &mut v)?;
        Self::check_size(&v)?;
        Ok(v)
    }

    /// The channels of each BatchNorm layer, in the order the forward pass runs them (main
    /// path before skip path inside a residual block): the layout of population statistics.
    pub fn batchnorm_channels(&self) -> Result<Vec<usize>> {
        fn walk(layers: &[Layer], mut s: Shape, out: &mut Vec<usize>) -> Result<()> {
            for l in layers {
                match l {
                    Layer::BatchNorm => out.push(s.c),
                    Layer::Residual { main, skip } => {
                        walk(main, s, out)?;
                        walk(skip, s, out)?;
                    }
                    _ => {}
                }
                s = l.output_shape(s)?;
            }
            Ok(())
        }
        let mut v = Vec::new();
        walk(&self.layers, Shape::flat(self.latent), &mut v)?;
        Ok(v)
    }

    /// Total number of masked weights.
    pub fn masked_weights(&self) -> Result<usize> {
        Ok(self.mask_sizes()?.iter().sum())
    }

    /// The number of weights of each masked layer, in order.
    pub fn mask_sizes(&self) -> Result<Vec<usize>> {
        Ok(self.masked_layers()?.iter().map(|l| l.weights).collect())
    }

    /// Refuses networks too large to address (see [`MAX_WEIGHTS`]).
    fn check_size(layers: &[MaskedLayerInfo]) -> Result<()> {
        let total: usize = layers.iter().map(|l| l.weights).sum();
        if total > MAX_WEIGHTS {
            return Err(Error::invalid(format!(
                "{total} masked weights; at most {MAX_WEIGHTS} are supported"
            )));
        }
        Ok(())
    }

    /// Checks the architecture: shapes compose, at least one masked layer, image output, and no
    /// layer with loaded parameters (a generator is a seed and a mask).
    pub fn validate(&self) -> Result<Shape> {
        fn count(layers: &[Layer]) -> usize {
            layers
                .iter()
                .map(|l| match l {
                    Layer::Residual { main, skip } => 1 + count(main) + count(skip),
                    _ => 1,
                })
                .sum()
        }
        let layers = count(&self.layers);
        if layers > crate::limits::MAX_LAYERS {
            return Err(Error::invalid(format!(
                "{layers} layers; at most {} are supported",
                crate::limits::MAX_LAYERS
            )));
        }
        if self.latent == 0 {
            return Err(Error::invalid("latent size must be positive"));
        }
        if any_layer(&self.layers, &|l| matches!(l, Layer::Affine)) {
            return Err(Error::invalid(
                "a generator cannot have Affine layers: their parameters are loaded with an \
                 encoder, and a generator is only a seed and a mask",
            ));
        }
        let out = self.output()?;
        if self.masked_layers()?.is_empty() {
            return Err(Error::invalid(
                "an architecture needs at least one masked layer",
            ));
        }
        Ok(out)
    }

    /// Looks up a preset by name for images of `channels` channels.
    pub fn preset(name: &str, channels: usize) -> Result<Architecture> {
        match name {
            "resnet32" => Ok(resnet32(channels)),
            "conv28" => Ok(conv28(channels)),
            "conv28-wide" => Ok(conv28_wide(channels)),
            "mlp28" => Ok(mlp28(channels)),
            "mlp28-wide" => Ok(mlp28_wide(channels)),
            "mlp28-deep" => Ok(mlp28_deep(channels)),
            "mlp28-up" => Ok(mlp28_up(channels)),
            _ => Err(Error::invalid(format!(
                "unknown architecture {name:?}; presets: {}",
                PRESETS.join(", ")
            ))),
        }
    }
}

/// Names of the presets.
pub const PRESETS: &[&str] = &[
    "conv28",
    "conv28-wide",
    "mlp28",
    "mlp28-wide",
    "mlp28-deep",
    "resnet32",
];

/// The paper's residual block: main `BN, ReLU, up x2, conv3x3, BN, ReLU, conv3x3`, skip
/// `conv1x1, up x2`.
pub fn res_block(cout: usize) -> Layer {
    Layer::Residual {
        main: vec![
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Upsample2x,
            Layer::conv3x3(cout),
            Layer::BatchNorm,
            Layer::Relu,
            Layer::conv3x3(cout),
        ],
        skip: vec![
            Layer::Conv {
                cout,
                k: 1,
                stride: 1,
                pad: 0,
            },
            Layer::Upsample2x,
        ],
    }
}

/// The paper's 32x32 ResNet generator (PRISM.md section 6): latent 128, transposed conv
/// 128 -> 512 (1x1 -> 4x4), residual blocks 512 -> 256 -> 128 -> 64, then BN, ReLU,
/// conv3x3 64 -> channels, tanh. 3,543,616 masked weights for one channel.
pub fn resnet32(channels: usize) -> Architecture {
    resnet("resnet32", channels, 128, [512, 256, 128, 64])
}

/// The paper's ResNet layout at other widths: latent, transposed conv to `widths[0]` at 4x4,
/// residual blocks to `widths[1..]` doubling the side each (4 -> 32), BN, ReLU, conv3x3 to
/// `channels`, tanh.
pub fn resnet(name: &str, channels: usize, latent: usize, widths: [usize; 4]) -> Architecture {
    Architecture {
        name: name.into(),
        latent,
        layers: vec![
            Layer::Reshape {
                c: latent,
                h: 1,
                w: 1,
            },
            Layer::ConvT {
                cout: widths[0],
                k: 4,
                stride: 1,
                pad: 0,
            },
            res_block(widths[1]),
            res_block(widths[2]),
            res_block(widths[3]),
            Layer::BatchNorm,
            Layer::Relu,
            Layer::conv3x3(channels),
            Layer::Tanh,
        ],
        init: Init::SignedConstant,
    }
}

/// A small convolutional generator at 28x28, sized for the 10-minute default run on a
/// 2-core machine without a GPU: latent 32, linear to 64x7x7, then two upsample-conv stages.
pub fn conv28(channels: usize) -> Architecture {
    conv28_sized("conv28", channels, 32, 64, 32)
}

/// conv28 with twice the channels: slower, sharper.
pub fn conv28_wide(channels: usize) -> Architecture {
    conv28_sized("conv28-wide", channels, 64, 128, 64)
}

/// Linear to c1 x 7 x 7, then upsample-conv to c2 channels at 14x14 and to `channels` at 28x28.
fn conv28_sized(name: &str, channels: usize, latent: usize, c1: usize, c2: usize) -> Architecture {
    let conv3 = |cout| Layer::conv3x3(cout);
    Architecture {
        name: name.into(),
        latent,
        layers: vec![
            Layer::Linear {
                outputs: c1 * 7 * 7,
            },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Reshape { c: c1, h: 7, w: 7 },
            Layer::Upsample2x,
            conv3(c2),
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Upsample2x,
            conv3(channels),
            Layer::Tanh,
        ],
        init: Init::SignedConstant,
    }
}

/// A fully connected generator at 28x28 (GMMN-like), with fixed 3x3 smoothing of the output
/// pre-activations: each output pixel has its own masked weights, and without the smoothing
/// their unsaturated keep probabilities draw independent speckle over every image.
pub fn mlp28(channels: usize) -> Architecture {
    mlp_hidden("mlp28", channels, &[256, 512], 28)
}

/// mlp28 with 1,024 units before the output. A masked output pixel sums over the hidden units
/// with random keep decisions, so a wider fan-in lowers the relative mask noise of the images.
pub fn mlp28_wide(channels: usize) -> Architecture {
    mlp_hidden("mlp28-wide", channels, &[256, 1024], 28)
}

/// mlp28-wide with a third hidden layer (256, 512, 1024), the default generator before mlp28-up.
/// In the 10-minute default run it reached lower MMD and higher precision, density and coverage
/// than mlp28-wide (README's table) for 25% more time a step.
pub fn mlp28_deep(channels: usize) -> Architecture {
    mlp_hidden("mlp28-deep", channels, &[256, 512, 1024], 28)
}

/// mlp28-deep whose output layer draws a 14x14 image, upsampled 2x (nearest) to 28x28 before
/// the smoothing: the default generator. The output layer, 55% of mlp28-deep's weights, shrinks
/// 4x, so a step takes about 0.65 of the time, and each kept output weight shapes a 2x2 block,
/// which reads better per step (README's table).
pub fn mlp28_up(channels: usize) -> Architecture {
    mlp_hidden("mlp28-up", channels, &[256, 512, 1024], 14)
}

/// Latent 32, then `Linear, BatchNorm, ReLU` per hidden width, the masked output layer drawing
/// `side` x `side` images, 2x upsampling until they are 28x28, smoothing and tanh.
fn mlp_hidden(name: &str, channels: usize, hidden: &[usize], side: usize) -> Architecture {
    let mut layers = Vec::new();
    for &outputs in hidden {
        layers.extend([Layer::Linear { outputs }, Layer::BatchNorm, Layer::Relu]);
    }
    layers.extend([
        Layer::Linear {
            outputs: channels * side * side,
        },
        Layer::Reshape {
            c: channels,
            h: side,
            w: side,
        },
    ]);
    let mut s = side;
    while s < 28 {
        layers.push(Layer::Upsample2x);
        s *= 2;
    }
    assert_eq!(s, 28, "side must be 28 / 2^k");
    layers.extend([Layer::Blur, Layer::Tanh]);
    Architecture {
        name: name.into(),
        latent: 32,
        layers,
        init: Init::SignedConstant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_resnet_has_the_published_weight_count() {
        let a = resnet32(1);
        assert_eq!(a.masked_weights().unwrap(), 3_543_616);
        assert_eq!(a.output().unwrap(), Shape { c: 1, h: 32, w: 32 });
        let layers = a.masked_layers().unwrap();
        assert_eq!(layers.len(), 11);
        assert_eq!(layers[0].weights, 128 * 512 * 16);
        assert_eq!(
            layers[0].fan_in,
            512 * 16,
            "the reference's transposed-conv fan_in quirk"
        );
        // 14.18 MB as f32, 0.443 MB as a 1-bit mask (PRISM.md).
        assert_eq!(a.masked_weights().unwrap() * 4, 14_174_464);
        assert_eq!(a.masked_weights().unwrap().div_ceil(8), 442_952);
        assert_eq!(resnet32(3).output().unwrap().c, 3);
    }

    #[test]
    fn presets_compose() {
        for name in PRESETS {
            for ch in [1, 3] {
                let a = Architecture::preset(name, ch).unwrap();
                let out = a.validate().unwrap();
                assert_eq!(out.c, ch);
                assert!(out.h == 28 || out.h == 32);
            }
        }
        assert!(Architecture::preset("nope", 1).is_err());
    }

    #[test]
    fn small_presets_have_the_documented_weight_counts() {
        // README's flag table and BENCHMARKS.md quote these.
        for (name, weights) in [
            ("conv28", 119_072),
            ("mlp28", 540_672),
            ("mlp28-wide", 1_073_152),
            ("mlp28-deep", 1_466_368),
            ("mlp28-up", 864_256),
        ] {
            let a = Architecture::preset(name, 1).unwrap();
            assert_eq!(a.masked_weights().unwrap(), weights, "{name}");
        }
    }

    #[test]
    fn shape_errors_are_reported() {
        let a = Architecture {
            name: "bad".into(),
            latent: 10,
            layers: vec![Layer::Reshape { c: 3, h: 2, w: 2 }],
            init: Init::SignedConstant,
        };
        assert!(a.validate().is_err());
    }
}
