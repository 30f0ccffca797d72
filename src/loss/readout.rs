//! An encoder the federation learns first, in one round and in closed form: the frozen random
//! conv encoder's features (regenerated from the seed, as the generator's weights are) followed
//! by a linear readout fitted to all clients' data.
//!
//! Each client computes sufficient statistics of its features f over its own images: the count
//! n, the sum of f, the Gram matrix sum f f^T and, with labels, the class counts and sum
//! f y^T (y one-hot). The server adds them (exact: the sums of the union) and fits
//!   - `lda`: ridge regression of the centred one-hot labels on the centred features,
//!     W = (G_c + r tr(G_c)/D I)^-1 C_c: a linear discriminant readout (uses labels);
//!   - `pca`: the top principal directions of the features, whitened (no labels).
//!
//! The code is (f - mean) W. The statistics are computed on the GPU (features of every image
//! written into one matrix, transposed, and multiplied by the dense matmul kernel); the fit is
//! f64 on the host.

use std::rc::Rc;

use nalgebra::{DMatrix, SymmetricEigen};

use super::encoder::Encoder;
use super::random_conv_encoder;
use super::RANDOM_ENCODER_LAYER_OFFSET;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::matmul::{self, LinearShape};
use crate::kernels::norm::{self, NormShape};
use crate::kernels::weights::cpu::frozen_all;
use crate::kernels::{data, elementwise as ew, LayerWeights, MaskSource, Product};
use crate::nn::{Layer, Shape};

/// How the readout is fitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadoutKind {
    /// Linear discriminant readout (ridge regression to one-hot labels): uses labels.
    Lda,
    /// Whitened principal directions: no labels.
    Pca,
}

impl ReadoutKind {
    /// The built-in encoder names of the configuration.
    pub fn parse(name: &str) -> Option<ReadoutKind> {
        match name {
            "lda" => Some(ReadoutKind::Lda),
            "pca" => Some(ReadoutKind::Pca),
            _ => None,
        }
    }
}

/// Dimensions of the PCA code (LDA's is the number of classes).
pub const PCA_DIMS: usize = 32;
/// Ridge of the LDA fit, relative to the mean feature variance.
pub const RIDGE: f64 = 1e-2;

/// One client's sufficient statistics (or their combination over clients), centred on their
/// own mean: raw sums of f f^T over thousands of images would lose the covariance of features
/// with a large mean to f32 cancellation, centred sums keep it, and combining centred
/// statistics is exact (Chan et al.'s parallel formula).
#[derive(Clone, Debug, PartialEq)]
pub struct ReadoutStats {
    pub count: f64,
    /// Mean of f \[d\].
    pub mean: Vec<f64>,
    /// Sum of (f - mean)(f - mean)^T [d, d] (row-major, symmetric).
    pub gram: Vec<f64>,
    /// Sum of (f - mean) y^T [d, classes].
    pub cross: Vec<f64>,
    /// Images per class \[classes\].
    pub class_counts: Vec<f64>,
}

impl ReadoutStats {
    pub fn features(&self) -> usize {
        self.mean.len()
    }

    /// Bits of this upload at f32 for a readout of `kind`: the Gram matrix's upper triangle,
    /// the sums and the count, and for LDA the cross moments and class counts.
    pub fn upload_bits(&self, kind: ReadoutKind) -> u64 {
        let d = self.features() as u64;
        let c = match kind {
            ReadoutKind::Lda => self.class_counts.len() as u64,
            ReadoutKind::Pca => 0,
        };
        32 * (d * (d + 1) / 2 + d + d * c + c + 1)
    }

    /// The statistics of the union of the clients' data (the server's aggregation):
    /// with m the overall mean, gram = sum_k gram_k + n_k (m_k - m)(m_k - m)^T and
    /// cross = sum_k cross_k + (m_k - m)(counts_k - n_k counts / n)^T.
    pub fn combine(all: &[ReadoutStats]) -> Result<ReadoutStats> {
        let first = all
            .first()
            .ok_or_else(|| Error::invalid("no client statistics to fit a readout"))?;
        let (d, c) = (first.features(), first.class_counts.len());
        if all
            .iter()
            .any(|s| s.features() != d || s.class_counts.len() != c)
        {
            return Err(Error::invalid("client statistics of different sizes"));
        }
        let n: f64 = all.iter().map(|s| s.count).sum();
        let mut mean = vec![0f64; d];
        let mut counts = vec![0f64; c];
        for s in all {
            mean.iter_mut()
                .zip(&s.mean)
                .for_each(|(m, v)| *m += s.count * v / n);
            counts
                .iter_mut()
                .zip(&s.class_counts)
                .for_each(|(a, b)| *a += b);
        }
        let mut gram = vec![0f64; d * d];
        let mut cross = vec![0f64; d * c];
        for s in all {
            let dm: Vec<f64> = s.mean.iter().zip(&mean).map(|(a, b)| a - b).collect();
            for i in 0..d {
                for j in 0..d {
                    gram[i * d + j] += s.gram[i * d + j] + s.count * dm[i] * dm[j];
                }
                for k in 0..c {
                    cross[i * c + k] +=
                        s.cross[i * c + k] + dm[i] * (s.class_counts[k] - s.count * counts[k] / n);
                }
            }
        }
        Ok(ReadoutStats {
            count: n,
            mean,
            gram,
            cross,
            class_counts: counts,
        })
    }
}

/// A fitted readout: code = W f + b with W [dims, d] (PyTorch's Linear layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Readout {
    pub dims: usize,
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Readout {
    /// Bits the server broadcasts to each client (f32).
    pub fn download_bits(&self) -> u64 {
        32 * (self.weights.len() + self.bias.len()) as u64
    }
}

/// The frozen random conv encoder (two stride-2 4x4 stages, ReLU) as a dense [`Encoder`]: its
/// weights regenerated on the host by the bit-identical twin of the kernels' hash.
pub fn random_features(seed: u32, image: Shape) -> Result<Encoder> {
    let channels = image.c;
    let arch = random_conv_encoder(2);
    let mut a = arch.clone();
    a.latent = image.len();
    a.layers.insert(
        0,
        Layer::Reshape {
            c: image.c,
            h: image.h,
            w: image.w,
        },
    );
    let mut weights = Vec::new();
    for info in a.masked_layers()? {
        let lw = LayerWeights {
            seed,
            layer: RANDOM_ENCODER_LAYER_OFFSET + info.index,
            init: arch.init,
            fan_in: info.fan_in,
        };
        weights.push(frozen_all(&lw, info.weights));
    }
    let mut e = Encoder {
        name: "random-conv features".into(),
        channels,
        layers: arch.layers,
        weights,
        affine: Vec::new(),
        features: Vec::new(),
    };
    e.features = vec![e.layers.len() - 1];
    Ok(e)
}

/// A client's statistics of `base`'s last-layer features over its `count` images (on the GPU as
/// `data::upload_images` stores them) with their `labels` (class < `classes`).
#[allow(clippy::too_many_arguments)]
pub fn client_statistics(
    gpu: &Gpu,
    base: &Encoder,
    image: Shape,
    images: &Tensor,
    labels: &[u8],
    count: usize,
    classes: usize,
) -> Result<ReadoutStats> {
    if labels.len() != count || count == 0 || classes == 0 {
        return Err(Error::invalid(
            "readout statistics: labels do not match the images",
        ));
    }
    let last = base.layers.len() - 1;
    let batch = count.min(256);
    let input = Rc::new(gpu.tensor(
        &[batch, image.c, image.h, image.w],
        DType::F32,
        "readout input",
    )?);
    let net = base.build(gpu, batch, input, image, &[last], false)?;
    let d = net.output_shape.len();
    let feats = gpu.tensor(&[count, d], DType::F32, "client features")?;
    let pixels = image.len();
    // Features of every image, batch by batch, copied into one [count, d] matrix.
    let mut first = 0;
    while first < count {
        let rows = batch.min(count - first);
        let load = data::load_range(gpu, images, count, pixels, first, &net.input)?;
        let mut ks: Vec<&Kernel> = vec![&load];
        ks.extend(net.forward.refs());
        gpu.submit(&ks)?;
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            net.output.buffer(),
            0,
            feats.buffer(),
            (first * d * 4) as u64,
            (rows * d * 4) as u64,
        );
        gpu.queue().submit([enc.finish()]);
        first += rows;
    }
    // F^T, its column... row sums (through the matmul with a row of ones), the mean, F^T centred
    // (the per-channel affine map with channels = features), then the Gram matrix and the cross
    // moments of the centred features: F^T as the matmul's input rows, F^T and Y^T as its
    // "weights".
    let ft = gpu.tensor(&[d, count], DType::F32, "client features, transposed")?;
    let t = ew::transpose(gpu, count, d, &feats, &ft)?;
    let ones = gpu.upload_f32(&vec![1.0; count], &[1, count], "ones")?;
    let sums = gpu.tensor(&[d], DType::F32, "client feature sums")?;
    let as_weights = LayerWeights {
        seed: 0,
        layer: 0,
        init: crate::kernels::Init::SignedConstant,
        fan_in: 1,
    };
    let shape = |outputs| LinearShape {
        batch: d,
        inputs: count,
        outputs,
    };
    let s = matmul::forward(
        gpu,
        &shape(1),
        &Product::new(&as_weights, &MaskSource::Dense(&ones), &ft, &sums),
    )?;
    gpu.run(&[&t, &s])?;
    let mean: Vec<f64> = gpu
        .read_f32(&sums)?
        .iter()
        .map(|&v| v as f64 / count as f64)
        .collect();
    let shift: Vec<f32> = mean.iter().flat_map(|&m| [1.0, -m as f32]).collect();
    let coef = gpu.upload_f32(&shift, &[2 * d], "centring")?;
    let fc = gpu.tensor(&[d, count], DType::F32, "client features, centred")?;
    let centre = norm::affine(
        gpu,
        &NormShape {
            batch: 1,
            channels: d,
            size: count,
        },
        &coef,
        &ft,
        &fc,
    )?;
    let mut ys = vec![0f32; classes * count];
    let mut class_counts = vec![0f64; classes];
    for (i, &l) in labels.iter().enumerate() {
        let l = l as usize;
        if l >= classes {
            return Err(Error::invalid(format!("label {l} of {classes} classes")));
        }
        ys[l * count + i] = 1.0;
        class_counts[l] += 1.0;
    }
    let yt = gpu.upload_f32(&ys, &[classes, count], "labels, one-hot")?;
    let gram = gpu.tensor(&[d, d], DType::F32, "client Gram matrix")?;
    let cross = gpu.tensor(&[d, classes], DType::F32, "client cross moments")?;
    let g = matmul::forward(
        gpu,
        &shape(d),
        &Product::new(&as_weights, &MaskSource::Dense(&fc), &fc, &gram),
    )?;
    let c = matmul::forward(
        gpu,
        &shape(classes),
        &Product::new(&as_weights, &MaskSource::Dense(&yt), &fc, &cross),
    )?;
    gpu.run(&[&centre, &g, &c])?;
    let to64 = |v: Vec<f32>| v.into_iter().map(|x| x as f64).collect();
    Ok(ReadoutStats {
        count: count as f64,
        mean,
        gram: to64(gpu.read_f32(&gram)?),
        cross: to64(gpu.read_f32(&cross)?),
        class_counts,
    })
}

/// The server's fit from the combined statistics.
pub fn fit(total: &ReadoutStats, kind: ReadoutKind) -> Result<Readout> {
    let d = total.features();
    let classes = total.class_counts.len();
    let n = total.count;
    if n < 2.0 || d == 0 {
        return Err(Error::invalid("a readout needs at least two images"));
    }
    let mean = &total.mean;
    // Symmetrised: the GPU's sums of the two triangles may differ in the last bits.
    let centred = DMatrix::from_fn(d, d, |i, j| {
        0.5 * (total.gram[i * d + j] + total.gram[j * d + i])
    });
    let (w, dims) = match kind {
        ReadoutKind::Lda => {
            let trace: f64 = (0..d).map(|i| centred[(i, i)]).sum();
            let ridge = RIDGE * trace.max(1e-12) / d as f64;
            let a = &centred + DMatrix::<f64>::identity(d, d) * ridge;
            // Centred labels: sum (f - mean)(y - ybar)^T = sum (f - mean) y^T.
            let b = DMatrix::from_fn(d, classes, |i, c| total.cross[i * classes + c]);
            let chol = a
                .cholesky()
                .ok_or_else(|| Error::invalid("readout: the feature covariance is not positive"))?;
            (chol.solve(&b), classes)
        }
        ReadoutKind::Pca => {
            let dims = PCA_DIMS.min(d);
            let eig = SymmetricEigen::new(centred / n);
            let mut order: Vec<usize> = (0..d).collect();
            order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
            let w = DMatrix::from_fn(d, dims, |i, k| {
                let j = order[k];
                eig.eigenvectors[(i, j)] / eig.eigenvalues[j].max(1e-12).sqrt()
            });
            (w, dims)
        }
    };
    // Linear layout [dims, d]; bias = -mean W.
    let mut weights = Vec::with_capacity(dims * d);
    let mut bias = Vec::with_capacity(dims);
    for k in 0..dims {
        let mut b = 0.0;
        for i in 0..d {
            weights.push(w[(i, k)] as f32);
            b -= mean[i] * w[(i, k)];
        }
        bias.push(b as f32);
    }
    if weights.iter().chain(&bias).any(|v| !v.is_finite()) {
        return Err(Error::invalid("readout: the fit is not finite"));
    }
    Ok(Readout {
        dims,
        weights,
        bias,
    })
}

/// `base` followed by the readout: a Linear layer and an Affine layer for its bias; the code
/// (the last layer) is the encoder's feature.
pub fn with_readout(base: &Encoder, r: &Readout, name: &str) -> Encoder {
    let mut e = base.clone();
    e.name = name.to_string();
    e.layers.push(Layer::Linear { outputs: r.dims });
    e.weights.push(r.weights.clone());
    e.layers.push(Layer::Affine);
    e.affine
        .push(r.bias.iter().flat_map(|&b| [1.0, b]).collect());
    e.features = vec![e.layers.len() - 1];
    e
}
