// Real minibatches drawn on the GPU from a client's images, so a training step needs nothing
// from the host: sample b of a step is image rng(key(key(DATA, client), step), b) mod count.
// Images are stored as bytes, four to a word, and come out as floats in [-1, 1].
// `load_range` reads images first .. first + batch in order instead (a pass over all of a
// client's data, for statistics); rows past the last image come out as -1 (black).
//% include "common.wgsl"
//% include "rng.wgsl"

struct Params {
    pixels: u32,   // bytes per image
    count: u32,    // images of this client
    batch: u32,
    key: u32,      // gather: key(seed, DATA); load_range: the first image
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: StepState;
@group(0) @binding(2) var<storage, read> images: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> out4: array<vec4<f32>>;

// Vectors each invocation of gather4 writes (KernelFeatures::vectors_per_invocation: 8 on CPU
// adapters, 1 on GPUs); a constant, so that the loop unrolls.
const VECTORS_PER_INVOCATION: u32 = {{ vectors | default(1) }}u;

fn pixel(byte: u32) -> f32 {
    return f32(byte) / 127.5 - 1.0;
}

// Pixel px of image img, from the bytes packed four to a word.
fn image_pixel(img: u32, px: u32) -> f32 {
    let byte = img * p.pixels + px;
    return pixel((images[byte / 4u] >> (8u * (byte % 4u))) & 0xffu);
}

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    if (e >= p.batch * p.pixels) {
        return;
    }
    // Sample b of the batch is image rng_u32(k, b) of the data set.
    let k = rng_key(rng_key(p.key, step.client), step.step);
    out[e] = image_pixel(rng_u32(k, e / p.pixels) % p.count, e % p.pixels);
}

// gather for images of a multiple of 4 bytes: each output vector is one word of one image.
@compute @workgroup_size(256)
fn gather4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * VECTORS_PER_INVOCATION) + li;
    let words = p.pixels / 4u;
    let k = rng_key(rng_key(p.key, step.client), step.step);
    for (var j = 0u; j < VECTORS_PER_INVOCATION; j++) {
        let q = first + 256u * j;
        if (q >= p.batch * words) {
            return;
        }
        let b = q / words;
        let img = rng_u32(k, b) % p.count;
        let w = images[img * words + q - b * words];
        out4[q] = vec4<f32>(pixel(w & 0xffu), pixel((w >> 8u) & 0xffu),
                            pixel((w >> 16u) & 0xffu), pixel(w >> 24u));
    }
}

@compute @workgroup_size(256)
fn load_range(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    if (e >= p.batch * p.pixels) {
        return;
    }
    let img = p.key + e / p.pixels;
    if (img >= p.count) {
        out[e] = -1.0;
        return;
    }
    out[e] = image_pixel(img, e % p.pixels);
}
