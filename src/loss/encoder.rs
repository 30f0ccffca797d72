//! Frozen feature encoders with loaded parameters: the feature space of the reference code's
//! loss (PRISM.md section 3). An encoder is a layer list (convolutions and dense layers with
//! loaded weights, Affine layers for conv biases and BatchNorm in inference form, ReLU, 2x2
//! pooling) run by the same [`Network`] machinery as the generators, in dense-weight mode.
//!
//! Files are safetensors in the layout of torchvision's VGG state dicts (`features.N.weight`
//! and `.bias` for convolutions, `features.N.{weight,bias,running_mean,running_var}` for
//! BatchNorm; ReLU and max-pooling modules have no tensors and are inferred from the gaps in
//! the module numbers). VGG19-BN exported from torchvision loads as it is; the project's own
//! encoders are written in the same layout.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::matmul::Estimator;
use crate::kernels::norm::{fold_batchnorm, EPS};
use crate::kernels::Init;
use crate::nn::arch::{shape_through, Architecture, Layer, Shape};
use crate::nn::cpu;
use crate::nn::{Backward, BuildOptions, Network, Normalisation, WeightMode, Wiring};

/// The encoder a configuration names by a file: a safetensors file. (The built-in learned
/// encoders, `lda` and `pca`, are fitted by the federation: see `loss::readout`.)
pub fn load_file(name: &str) -> Result<Encoder> {
    Encoder::load(Path::new(name))
}

/// Largest encoder file read (VGG19-BN with its classifier is 548 MB).
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// A frozen encoder: layers, their loaded parameters, and the input channels it reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoder {
    /// Where it came from (a file name), for messages.
    pub name: String,
    /// Input channels of the first layer.
    pub channels: usize,
    pub layers: Vec<Layer>,
    /// Weights of each Conv and Linear layer in order, in PyTorch's layout.
    pub weights: Vec<Vec<f32>>,
    /// (a_c, b_c) pairs of each Affine layer in order.
    pub affine: Vec<Vec<f32>>,
    /// The layers the loss matches unless told otherwise: every ReLU output for VGG-style
    /// files (as the reference), the code for a learned readout.
    pub features: Vec<usize>,
}

/// The tensors of one `features.N` module.
type Module = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tensor_values(what: &str, name: &str, t: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let d = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::format(
                what,
                format!("tensor {name} is {other:?}; encoders take F32, F16 or BF16"),
            ))
        }
    };
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::format(
            what,
            format!("tensor {name} holds NaN or infinity"),
        ));
    }
    Ok(v)
}

impl Encoder {
    /// Reads an encoder file (see the module documentation for the layout).
    pub fn load(path: &Path) -> Result<Encoder> {
        crate::limits::check_file_size(path, MAX_FILE_BYTES, "encoder file")?;
        let what = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, &what)
    }

    /// Parses safetensors bytes in torchvision's VGG layout; `what` names them in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Encoder> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(what, format!("not a safetensors file: {e}")))?;
        let mut modules: BTreeMap<usize, Module> = BTreeMap::new();
        for (name, t) in st.tensors() {
            let Some(rest) = name.strip_prefix("features.") else {
                continue; // classifier.*, avgpool: not used for features
            };
            let (idx, param) = rest
                .split_once('.')
                .and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p)))
                .ok_or_else(|| {
                    Error::format(what, format!("tensor {name}: expected features.N.<param>"))
                })?;
            if param == "num_batches_tracked" {
                continue;
            }
            let values = tensor_values(what, &name, &t)?;
            modules
                .entry(idx)
                .or_default()
                .insert(param.to_string(), (t.shape().to_vec(), values));
        }
        if modules.is_empty() {
            return Err(Error::format(
                what,
                "no features.N tensors: expected a torchvision VGG-style state dict",
            ));
        }
        Self::from_modules(modules, what)
    }

    fn from_modules(modules: BTreeMap<usize, Module>, what: &str) -> Result<Encoder> {
        let bad = |m: String| Err(Error::format(what, m));
        let mut enc = Encoder {
            name: what.to_string(),
            channels: 0,
            layers: Vec::new(),
            weights: Vec::new(),
            affine: Vec::new(),
            features: Vec::new(),
        };
        // The next torchvision module number not yet accounted for, and the channel count.
        let mut pos = 0usize;
        let mut channels = 0usize;
        let mut iter = modules.into_iter().peekable();
        while let Some((i, m)) = iter.next() {
            let Some((shape, w)) = m.get("weight").filter(|(s, _)| s.len() == 4) else {
                return bad(format!(
                    "features.{i} is not a convolution (no 4-D features.{i}.weight); \
                     BatchNorm must directly follow a convolution"
                ));
            };
            let (cout, cin, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
            if kh != kw || kh % 2 == 0 || cout == 0 || cin == 0 {
                return bad(format!(
                    "features.{i}.weight has shape {shape:?}: square odd kernels expected \
                     (VGG's 3x3 with padding 1)"
                ));
            }
            for key in m.keys() {
                if key != "weight" && key != "bias" {
                    return bad(format!("unexpected tensor features.{i}.{key}"));
                }
            }
            if enc.layers.is_empty() {
                if i != 0 {
                    return bad(format!(
                        "the first convolution is features.{i}; VGG's stack starts at features.0"
                    ));
                }
                enc.channels = cin;
            } else {
                if cin != channels {
                    return bad(format!(
                        "features.{i}.weight reads {cin} channels but the layers before it give \
                         {channels}"
                    ));
                }
                match i - pos {
                    0 => {}
                    1 => enc.layers.push(Layer::MaxPool2),
                    _ => {
                        return bad(format!(
                            "features.{pos}..features.{} carry no tensors: between convolution \
                             blocks VGG has at most one (max-pooling) module",
                            i - 1
                        ))
                    }
                }
            }
            let bias = match m.get("bias") {
                Some((s, b)) if s == &[cout] => Some(b.clone()),
                Some((s, _)) => {
                    return bad(format!(
                        "features.{i}.bias has shape {s:?}; expected [{cout}]"
                    ))
                }
                None => None,
            };
            enc.layers.push(Layer::Conv {
                cout,
                k: kh,
                stride: 1,
                pad: kh / 2,
            });
            enc.weights.push(w.clone());
            pos = i + 1;
            // BatchNorm directly after the convolution, in inference form.
            let bn = match iter.peek() {
                Some((j, m2)) if *j == i + 1 && m2.contains_key("running_mean") => iter.next(),
                _ => None,
            };
            let coef = match bn {
                Some((j, m2)) => {
                    let get = |p: &str| -> Result<Vec<f32>> {
                        match m2.get(p) {
                            Some((s, v)) if s == &[cout] => Ok(v.clone()),
                            Some((s, _)) => Err(Error::format(
                                what,
                                format!("features.{j}.{p} has shape {s:?}; expected [{cout}]"),
                            )),
                            None => Err(Error::format(
                                what,
                                format!("BatchNorm features.{j} has no {p}"),
                            )),
                        }
                    };
                    for key in m2.keys() {
                        if !["weight", "bias", "running_mean", "running_var"]
                            .contains(&key.as_str())
                        {
                            return bad(format!("unexpected tensor features.{j}.{key}"));
                        }
                    }
                    let var = get("running_var")?;
                    if var.iter().any(|v| *v < 0.0) {
                        return bad(format!("features.{j}.running_var has negative entries"));
                    }
                    pos = j + 1;
                    Some(fold_batchnorm(
                        bias.as_deref(),
                        &get("running_mean")?,
                        &var,
                        &get("weight")?,
                        &get("bias")?,
                        EPS as f64,
                    ))
                }
                None => bias.map(|b| b.iter().flat_map(|&v| [1.0, v]).collect()),
            };
            if let Some(c) = coef {
                enc.layers.push(Layer::Affine);
                enc.affine.push(c);
            }
            enc.layers.push(Layer::Relu);
            pos += 1; // the ReLU module
            channels = cout;
        }
        enc.features = enc.relu_layers();
        Ok(enc)
    }

    /// The encoder adapted to images of `channels` channels: a 3-channel encoder reads a grey
    /// image as the reference does (the grey channel repeated three times), which is the same
    /// as summing its first convolution's weights over the input channels.
    pub fn for_channels(&self, channels: usize) -> Result<Encoder> {
        if channels == self.channels {
            return Ok(self.clone());
        }
        if !(channels == 1 && self.channels > 1) {
            return Err(Error::invalid(format!(
                "{}: the encoder reads {} channels, the images have {channels}",
                self.name, self.channels
            )));
        }
        let mut e = self.clone();
        let Some(Layer::Conv { cout, k, .. }) = e.layers.first().cloned() else {
            return Err(Error::invalid(format!(
                "{}: the first layer is not a convolution",
                self.name
            )));
        };
        let (cin, kk) = (self.channels, k * k);
        let w = &self.weights[0];
        e.weights[0] = (0..cout)
            .flat_map(|o| {
                (0..kk).map(move |q| (0..cin).map(|c| w[(o * cin + c) * kk + q]).sum::<f32>())
            })
            .collect();
        e.channels = 1;
        Ok(e)
    }

    /// Indices (into `layers`) of the ReLU layers: the reference matches every ReLU output.
    pub fn relu_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&i| matches!(self.layers[i], Layer::Relu))
            .collect()
    }

    /// The layers whose outputs the loss matches: ReLUs numbered from 1 in `chosen`, or the
    /// encoder's own [`Encoder::features`].
    pub fn taps(&self, chosen: Option<&[usize]>) -> Result<Vec<usize>> {
        let relus = self.relu_layers();
        let Some(chosen) = chosen else {
            return Ok(self.features.clone());
        };
        let mut out = Vec::with_capacity(chosen.len());
        for &k in chosen {
            match relus.get(k.wrapping_sub(1)) {
                Some(&l) => out.push(l),
                None => {
                    return Err(Error::invalid(format!(
                        "encoder layer {k}: {} has ReLUs 1 to {}",
                        self.name,
                        relus.len()
                    )))
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The layers as an architecture (for shapes and building).
    pub fn arch(&self) -> Architecture {
        Architecture {
            name: self.name.clone(),
            latent: 0,
            layers: self.layers.clone(),
            init: Init::SignedConstant,
        }
    }

    /// Shapes of the tapped outputs for images of `image` shape, or why the layers do not apply.
    pub fn tap_shapes(&self, image: Shape, taps: &[usize]) -> Result<Vec<Shape>> {
        if image.c != self.channels {
            return Err(Error::invalid(format!(
                "{}: reads {} channels, the images have {}",
                self.name, self.channels, image.c
            )));
        }
        taps.iter()
            .map(|&t| {
                shape_through(&self.layers[..=t], image).map_err(|e| {
                    Error::invalid(format!(
                        "{}: does not apply to {}x{}x{} images: {e}",
                        self.name, image.c, image.h, image.w
                    ))
                })
            })
            .collect()
    }

    /// CPU twin: the tapped outputs for `batch` images [batch, image].
    pub fn cpu_taps(
        &self,
        batch: usize,
        images: &[f32],
        image: Shape,
        taps: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let outs = cpu::layer_outputs(
            &self.layers,
            batch,
            images,
            image,
            &cpu::Params {
                weights: &self.weights,
                affine: &self.affine,
                population: None,
            },
        )?;
        Ok(taps.iter().map(|&t| outs[t].0.clone()).collect())
    }

    /// The encoder on the GPU at a batch size, reading `input` [batch, image] and exposing the
    /// tapped outputs; with `backward`, the gradient to the input (`grad_input`) from the taps'
    /// gradients.
    pub fn build(
        &self,
        gpu: &Gpu,
        batch: usize,
        input: Rc<Tensor>,
        image: Shape,
        taps: &[usize],
        backward: bool,
    ) -> Result<Network> {
        self.tap_shapes(image, taps)?;
        let opts = BuildOptions {
            batch,
            seed: 0,
            mode: WeightMode::Dense,
            backward: if backward {
                Backward::Input
            } else {
                Backward::None
            },
            estimator: Estimator::PScaled,
            layer_offset: 0,
            half: false,
            adam: None,
            norm: Normalisation::Batch,
        };
        let net = Network::build(
            gpu,
            &self.arch(),
            opts,
            Wiring {
                taps: taps.to_vec(),
                ..Wiring::image(Some(input), image)
            },
        )?;
        for (l, w) in net.layers.iter().zip(&self.weights) {
            let dense = l
                .dense
                .as_ref()
                .ok_or_else(|| Error::invalid("dense network without weights"))?;
            gpu.write_f32(dense, w)?;
        }
        for (t, c) in net.affine.iter().zip(&self.affine) {
            gpu.write_f32(t, c)?;
        }
        Ok(net)
    }
}
