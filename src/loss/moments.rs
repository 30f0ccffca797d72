//! The reference code's loss on the GPU (PRISM.md section 3): each client's real feature
//! statistics, computed once over its data, GFMN's per-feature trackers that each client keeps
//! across rounds, and the kernels of one training step over the taps of an encoder.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::kernels::data;
use crate::kernels::moments::{self as mk, LayerIo, TrackerConfig};
use crate::nn::{Network, Tap};

/// The moment loss of one training step.
pub struct MomentLoss {
    /// Per tap: the tracker update and the feature gradient; then the loss reduction.
    pub kernels: Vec<Kernel>,
    /// \[0\] the GFMN objective, \[1\] the recorded loss (mean squared moment difference), both
    /// times the loss weight.
    pub loss: Tensor,
    /// The working buffers the kernels bind, per tap: real (mean, variance) [2d], trackers
    /// (v_m, v_v) [2d], the trackers' Adam moments [4d].
    real: Vec<Tensor>,
    track: Vec<Tensor>,
    opt: Vec<Tensor>,
    _terms: Tensor,
    features: Vec<usize>,
}

/// Features per sample of a tap.
fn tap_features(t: &Tap) -> usize {
    t.shape.len()
}

impl MomentLoss {
    /// The step kernels over the taps of `encoder` (built with an input backward: each tap's
    /// gradient is written here), with trackers stepped by `cfg` at the step's t.
    pub fn new(
        gpu: &Gpu,
        cfg: &TrackerConfig,
        encoder: &Network,
        step: &Tensor,
    ) -> Result<MomentLoss> {
        let features: Vec<usize> = encoder.taps.iter().map(tap_features).collect();
        let total: usize = features.iter().sum();
        if total == 0 {
            return Err(Error::invalid(
                "moment matching needs at least one tapped layer",
            ));
        }
        let real = zeros(gpu, &features, 2, "real feature statistics")?;
        let track = zeros(gpu, &features, 2, "moment trackers")?;
        let opt = zeros(gpu, &features, 4, "moment trackers' Adam state")?;
        let terms = gpu.zeros(&[2 * total], DType::F32, "moment loss terms")?;
        let loss = gpu.zeros(&[8], DType::F32, "moment loss")?;
        let mut kernels = Vec::with_capacity(features.len() + 1);
        let mut offset = 0;
        for (i, tap) in encoder.taps.iter().enumerate() {
            let grad = tap
                .grad
                .as_ref()
                .ok_or_else(|| Error::invalid("moment matching needs the encoder's backward"))?;
            let io = LayerIo {
                features: &tap.output,
                real: &real[i],
                track: &track[i],
                opt: &opt[i],
                grad,
            };
            kernels.push(mk::step(gpu, cfg, &io, offset, &terms, step)?);
            offset += features[i];
        }
        kernels.push(mk::reduce(gpu, cfg, &terms, &loss)?);
        Ok(MomentLoss {
            kernels,
            loss,
            real,
            track,
            opt,
            _terms: terms,
            features,
        })
    }

    /// Sizes (f32) of the state a client keeps across rounds: per tap, its trackers \[2d\] and
    /// their Adam moments \[4d\].
    pub fn state_sizes(&self) -> Vec<usize> {
        self.features.iter().flat_map(|&d| [2 * d, 4 * d]).collect()
    }

    /// Records copies of a client's real statistics (from [`real_statistics`]) and its state
    /// (laid out as [`MomentLoss::state_sizes`]) into the working buffers.
    pub fn copy_in(
        &self,
        enc: &mut wgpu::CommandEncoder,
        real: &[Tensor],
        state: &[Tensor],
    ) -> Result<()> {
        self.check(real, state)?;
        let copy = |enc: &mut wgpu::CommandEncoder, a: &Tensor, b: &Tensor| {
            enc.copy_buffer_to_buffer(a.buffer(), 0, b.buffer(), 0, a.bytes())
        };
        for i in 0..self.features.len() {
            copy(enc, &real[i], &self.real[i]);
            copy(enc, &state[2 * i], &self.track[i]);
            copy(enc, &state[2 * i + 1], &self.opt[i]);
        }
        Ok(())
    }

    /// Records copies of the working trackers back into a client's state.
    pub fn copy_out(&self, enc: &mut wgpu::CommandEncoder, state: &[Tensor]) -> Result<()> {
        self.check(&self.real, state)?;
        for i in 0..self.features.len() {
            let (t, o) = (&self.track[i], &self.opt[i]);
            enc.copy_buffer_to_buffer(t.buffer(), 0, state[2 * i].buffer(), 0, t.bytes());
            enc.copy_buffer_to_buffer(o.buffer(), 0, state[2 * i + 1].buffer(), 0, o.bytes());
        }
        Ok(())
    }

    fn check(&self, real: &[Tensor], state: &[Tensor]) -> Result<()> {
        let sizes = self.state_sizes();
        let ok = real.len() == self.features.len()
            && real
                .iter()
                .zip(&self.features)
                .all(|(r, &d)| r.len() == 2 * d)
            && state.len() == sizes.len()
            && state.iter().zip(&sizes).all(|(t, &n)| t.len() == n);
        if !ok {
            return Err(Error::invalid(
                "moment loss: a client's statistics or state do not match the encoder's taps",
            ));
        }
        Ok(())
    }
}

fn zeros(gpu: &Gpu, features: &[usize], per: usize, what: &str) -> Result<Vec<Tensor>> {
    features
        .iter()
        .map(|&d| Ok(gpu.zeros(&[per * d], DType::F32, what)?))
        .collect()
}

/// Each tap's real (mean, unbiased variance) over all `count` images of `pixels` bytes in
/// `images`, streamed through `encoder` (a forward-only tapped network whose input it fills,
/// one batch at a time) in one submission.
pub fn real_statistics(
    gpu: &Gpu,
    encoder: &Network,
    images: &Tensor,
    count: usize,
    pixels: usize,
) -> Result<Vec<Tensor>> {
    let batch = encoder.opts.batch;
    if count < 2 {
        return Err(Error::invalid(
            "real feature statistics need at least two images",
        ));
    }
    let features: Vec<usize> = encoder.taps.iter().map(tap_features).collect();
    let acc = zeros(gpu, &features, 2, "feature statistics accumulator")?;
    let real = zeros(gpu, &features, 2, "real feature statistics")?;
    // Per batch: load the images, run the encoder, merge each tap's batch statistics.
    let mut batches: Vec<(Kernel, Vec<Kernel>)> = Vec::new();
    let mut first = 0;
    while first < count {
        let rows = batch.min(count - first);
        let load = data::load_range(gpu, images, count, pixels, first, &encoder.input)?;
        let merges = encoder
            .taps
            .iter()
            .zip(&features)
            .zip(&acc)
            .map(|((tap, &d), a)| mk::stats_merge(gpu, &tap.output, rows, d, first, a))
            .collect::<Result<Vec<_>>>()?;
        batches.push((load, merges));
        first += rows;
    }
    let mut order: Vec<&Kernel> = Vec::new();
    for (load, merges) in &batches {
        order.push(load);
        order.extend(encoder.forward.refs());
        order.extend(merges.iter());
    }
    let finish: Vec<Kernel> = acc
        .iter()
        .zip(&real)
        .map(|(a, r)| mk::stats_finish(gpu, a, count, r))
        .collect::<Result<_>>()?;
    order.extend(finish.iter());
    gpu.run(&order)?;
    Ok(real)
}
