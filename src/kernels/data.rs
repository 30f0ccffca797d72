//! Real minibatches sampled on the GPU from a client's images (`shaders/data.wgsl`).

use super::{check, groups_for, u32_of, StepState};
use crate::error::{Error, Result};
use crate::gpu::shader::ShaderKey;
use crate::gpu::{DType, Gpu, Kernel, Tensor};
use crate::rng;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    pixels: u32,
    count: u32,
    batch: u32,
    key: u32,
}

/// Uploads `count` images of `pixels` bytes each, four bytes to a word.
pub fn upload_images(gpu: &Gpu, bytes: &[u8], pixels: usize, what: &str) -> Result<Tensor> {
    if pixels == 0 || bytes.is_empty() || bytes.len() % pixels != 0 {
        return Err(Error::invalid(format!(
            "{what}: {} bytes is not a whole number of {pixels}-byte images",
            bytes.len()
        )));
    }
    let mut words = vec![0u32; bytes.len().div_ceil(4)];
    for (i, &b) in bytes.iter().enumerate() {
        words[i / 4] |= (b as u32) << (8 * (i % 4));
    }
    Ok(gpu.upload_u32(&words, &[words.len()], what)?)
}

/// The data stream key of a run.
pub fn data_key(seed: u32) -> u32 {
    rng::key_path(seed, &[rng::stream::DATA])
}

/// out [batch, pixels] <- the step's random images of this client, as floats in [-1, 1].
pub fn gather(
    gpu: &Gpu,
    images: &Tensor,
    count: usize,
    pixels: usize,
    seed: u32,
    step: &Tensor,
    out: &Tensor,
) -> Result<Kernel> {
    check(step, StepState::WORDS, DType::U32, "step state")?;
    check(images, (count * pixels).div_ceil(4), DType::U32, "images")?;
    if count == 0 {
        return Err(Error::invalid("a client with no images cannot train"));
    }
    let batch = out.len() / pixels.max(1);
    check(out, batch * pixels, DType::F32, "real batch")?;
    u32_of(count * pixels, "image bytes")?;
    let p = Params {
        pixels: pixels as u32,
        count: count as u32,
        batch: batch as u32,
        key: data_key(seed),
    };
    let k = if pixels % 4 == 0 {
        // Whole words per image: one word becomes one output vector.
        let vectors = gpu.features().vectors_per_invocation;
        gpu.kernel(
            ShaderKey::new("data.wgsl").def("vectors", vectors),
            "gather4",
        )
        .bind_padded("out4", out, 16)
        .groups(groups_for(batch * pixels / 4, 256 * vectors as usize)?)
    } else {
        gpu.kernel(ShaderKey::new("data.wgsl"), "gather")
            .bind("out", out)
            .groups(groups_for(batch * pixels, 256)?)
    };
    Ok(k.params(&p)
        .bind("step", step)
        .bind("images", images)
        .build()?)
}

/// out [batch, pixels] <- images `first` .. `first + batch` of `count`, in order, as floats in
/// [-1, 1]; rows past the last image are -1.
pub fn load_range(
    gpu: &Gpu,
    images: &Tensor,
    count: usize,
    pixels: usize,
    first: usize,
    out: &Tensor,
) -> Result<Kernel> {
    check(images, (count * pixels).div_ceil(4), DType::U32, "images")?;
    let batch = out.len() / pixels.max(1);
    check(out, batch * pixels, DType::F32, "image batch")?;
    u32_of(count * pixels, "image bytes")?;
    if first >= count {
        return Err(Error::invalid(format!(
            "images from {first}: only {count} images"
        )));
    }
    let p = Params {
        pixels: pixels as u32,
        count: count as u32,
        batch: batch as u32,
        key: first as u32,
    };
    Ok(gpu
        .kernel(ShaderKey::new("data.wgsl"), "load_range")
        .params(&p)
        .bind("images", images)
        .bind("out", out)
        .groups(groups_for(batch * pixels, 256)?)
        .build()?)
}

/// CPU twin of [`load_range`] (and of one row of [`gather`]): image `i` of `bytes` as floats.
pub fn image_values(bytes: &[u8], pixels: usize, i: usize) -> Vec<f32> {
    bytes[i * pixels..(i + 1) * pixels]
        .iter()
        .map(|&b| b as f32 / 127.5 - 1.0)
        .collect()
}

/// CPU twin: the image indices of a step's batch.
pub fn batch_indices(seed: u32, step: &StepState, count: usize, batch: usize) -> Vec<usize> {
    let k = rng::key(rng::key(data_key(seed), step.client), step.step);
    (0..batch as u32)
        .map(|b| (rng::u32_at(k, b) % count as u32) as usize)
        .collect()
}
