// Elementwise and layout operations the generator needs around its masked layers: ReLU, tanh,
// nearest 2x upsampling and its adjoint, residual adds, scaling, weighted sums of loss
// gradients, and Gaussian latents drawn from the counter-based hash (rng.wgsl).
//% include "common.wgsl"
//% include "rng.wgsl"

struct Params {
    n: u32,        // elements of the output
    h: u32,        // upsample: input height and width
    w: u32,
    key: u32,      // latent: base key (seed, LATENT); the step adds client and step
    alpha: f32,    // scale / axpy factor
    inv: f32,      // upsample, blur: 1 / (row width of the indexed tensor), for div_small
    inv_h: f32,    // blur: 1 / h, for div_small
    runs: u32,     // blur: runs of pixels per row
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> step: StepState;
// The same operands as vectors of four, for the maps below (bound padded to 16 bytes).
@group(0) @binding(5) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> out4: array<vec4<f32>>;

// Vectors each invocation of a map handles (KernelFeatures::vectors_per_invocation: 8 on CPU
// adapters, which pay per invocation and per scalar access, 1 on GPUs). A constant, so that
// the loop unrolls.
const VECTORS_PER_INVOCATION: u32 = {{ vectors | default(1) }}u;

fn index(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return linear_workgroup(wid, nwg) * 256u + li;
}





// Elementwise maps out = f(a, b), written once: vectors of four, a workgroup's vectors strided
// by 256 so that neighbouring invocations touch neighbouring vectors. The last vector may run
// past p.n into the buffers' padding; what lands there is never read.
//% macro map(name, value)
@compute @workgroup_size(256)
fn {{ name }}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * VECTORS_PER_INVOCATION) + li;
    let vectors = (p.n + 3u) / 4u;
    for (var k = 0u; k < VECTORS_PER_INVOCATION; k++) {
        let q = first + 256u * k;
        if (q >= vectors) {
            return;
        }
        out4[q] = {{ value }};
    }
}
//% endmacro

// out = max(a, 0)
{{ map("relu", "max(a4[q], vec4<f32>(0.0))") }}
// out = a (upstream gradient) where b (the ReLU's output) > 0, else 0
{{ map("relu_backward", "select(vec4<f32>(0.0), a4[q], b4[q] > vec4<f32>(0.0))") }}
// out = tanh(a)
{{ map("tanh_forward", "tanh(a4[q])") }}
// out = a * (1 - b^2) with b = tanh output
{{ map("tanh_backward", "a4[q] * (1.0 - b4[q] * b4[q])") }}
// out = a + b
{{ map("add", "a4[q] + b4[q]") }}
// out = alpha * a
{{ map("scale", "p.alpha * a4[q]") }}
// out = alpha * a + b (a loss term's gradient added to another's with its weight)
{{ map("axpy", "fma(vec4<f32>(p.alpha), a4[q], b4[q])") }}

// Nearest 2x upsampling: out [planes, 2h, 2w] from a [planes, h, w]; p.n = output elements.
@compute @workgroup_size(256)
fn upsample2x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i >= p.n) {
        return;
    }
    // Rows of all planes in sequence: output row `row` reads input row row / 2 (planes have
    // an even number of output rows), column ox / 2.
    let ow = 2u * p.w;
    let row = div_small(i, ow, p.inv);
    let ox = i - row * ow;
    out[i] = a[(row / 2u) * p.w + ox / 2u];
}

// upsample2x on output vectors of four, for even w: an output row (2w wide) then holds whole
// vectors, each repeating two neighbouring input pixels; p.n = output elements.
@compute @workgroup_size(256)
fn upsample2x4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * VECTORS_PER_INVOCATION) + li;
    let vectors = p.n / 4u;
    let ow = 2u * p.w;
    for (var k = 0u; k < VECTORS_PER_INVOCATION; k++) {
        let q = first + 256u * k;
        if (q >= vectors) {
            return;
        }
        let row = div_small(4u * q, ow, p.inv);
        let src = (row / 2u) * p.w + (4u * q - row * ow) / 2u;
        let left = a[src];
        let right = a[src + 1u];
        out4[q] = vec4<f32>(left, left, right, right);
    }
}

// Adjoint of upsample2x: out [planes, h, w] = sum of the 2x2 block of a [planes, 2h, 2w];
// p.n = output elements.
@compute @workgroup_size(256)
fn upsample2x_adjoint(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i >= p.n) {
        return;
    }
    // Input row `row` (of all planes in sequence) sums output rows 2 row and 2 row + 1.
    let row = div_small(i, p.w, p.inv);
    let x0 = 2u * (i - row * p.w);
    let ow = 2u * p.w;
    let base = 2u * row * ow + x0;
    out[i] = a[base] + a[base + 1u] + a[base + ow] + a[base + ow + 1u];
}

// Pixels of a row each blur invocation computes.
const BLUR_RUN: u32 = 4u * VECTORS_PER_INVOCATION;

// The vertical [1 2 1] of column x around the row starting at `base`, 0 outside the row: `up`
// and `down` are the offsets to the rows above and below, 0 where that row is padding (the
// load then reads the centre again, in bounds, and select drops it).
fn column(base: i32, up: i32, down: i32, x: i32, w: i32) -> f32 {
    if (x < 0 || x >= w) {
        return 0.0;
    }
    let above = select(0.0, a[base - up + x], up != 0);
    let below = select(0.0, a[base + down + x], down != 0);
    return above + 2.0 * a[base + x] + below;
}

// Fixed 3x3 binomial smoothing of every plane, ([1 2 1] x [1 2 1]) / 16 with zero padding:
// out and a are [planes, h, w]. The stencil is symmetric with stride 1, so this kernel is also
// its own adjoint: the backward pass runs it on the output gradient. One invocation per run of
// BLUR_RUN pixels of a row, p.runs runs a row (p.inv = 1 / p.runs), p.n runs in all.
@compute @workgroup_size(256)
fn blur3x3(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i >= p.n) {
        return;
    }
    let row = div_small(i, p.runs, p.inv); // row of all planes in sequence
    let x0 = i32((i - row * p.runs) * BLUR_RUN);
    let y = row - div_small(row, p.h, p.inv_h) * p.h;
    let w = i32(p.w);
    let base = i32(row * p.w);
    let up = select(0, w, y > 0u);
    let down = select(0, w, y + 1u < p.h);
    // Slide along the run: each new column costs three loads, not nine per pixel.
    var left = column(base, up, down, x0 - 1, w);
    var mid = column(base, up, down, x0, w);
    for (var k = 0; k < i32(BLUR_RUN); k++) {
        let x = x0 + k;
        if (x >= w) {
            return;
        }
        let right = column(base, up, down, x + 1, w);
        out[base + x] = (left + 2.0 * mid + right) * 0.0625;
        left = mid;
        mid = right;
    }
}




// Transpose of a [rows, cols] matrix: out [cols, rows]; p.h = rows, p.w = cols, p.inv = 1 / rows.
// One invocation per output element (reads are strided, writes contiguous).
@compute @workgroup_size(256)
fn transpose(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i >= p.n) {
        return;
    }
    let c = div_small(i, p.h, p.inv);   // output row = input column
    let r = i - c * p.h;
    out[i] = a[r * p.w + c];
}

// out = standard normal latents of this step: element i of the stream
// key(key(base, client), step), by Box-Muller.
@compute @workgroup_size(256)
fn latent(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = rng_normal_bm(rng_key(rng_key(p.key, step.client), step.step), i);
    }
}

// out = standard normal latents, one stream per image: row r (p.w values) is element j of the
// stream key(key(base, client), step + r), so an image's latent depends on its index alone,
// not on the batch it is generated in (generation; step holds the batch's first image).
@compute @workgroup_size(256)
fn latent_images(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        let r = i / p.w;
        out[i] = rng_normal_bm(rng_key(rng_key(p.key, step.client), step.step + r), i - r * p.w);
    }
}
