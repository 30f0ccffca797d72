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
    _pad: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> step: StepState;

fn index(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return linear_workgroup(wid, nwg) * 256u + li;
}

// out = max(a, 0)
@compute @workgroup_size(256)
fn relu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = max(a[i], 0.0);
    }
}

// out = a (upstream gradient) where b (the ReLU's output) > 0, else 0
@compute @workgroup_size(256)
fn relu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = select(0.0, a[i], b[i] > 0.0);
    }
}

// out = tanh(a)
@compute @workgroup_size(256)
fn tanh_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = tanh(a[i]);
    }
}

// out = a * (1 - b^2) with b = tanh output
@compute @workgroup_size(256)
fn tanh_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = a[i] * (1.0 - b[i] * b[i]);
    }
}

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

// Fixed 3x3 binomial smoothing of every plane, ([1 2 1] x [1 2 1]) / 16 with zero padding:
// out and a are [planes, h, w]; p.n = elements. The stencil is symmetric with stride 1, so
// this kernel is also its own adjoint: the backward pass runs it on the output gradient.
@compute @workgroup_size(256)
fn blur3x3(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i >= p.n) {
        return;
    }
    let row = div_small(i, p.w, p.inv); // row of all planes in sequence
    let x = i32(i - row * p.w);
    let y = i32(row - div_small(row, p.h, p.inv_h) * p.h);
    let h = i32(p.h);
    let w = i32(p.w);
    var sum = 0.0;
    for (var dy = -1; dy <= 1; dy++) {
        let yy = y + dy;
        if (yy < 0 || yy >= h) {
            continue;
        }
        let wy = select(1.0, 2.0, dy == 0);
        var row_sum = 0.0;
        for (var dx = -1; dx <= 1; dx++) {
            let xx = x + dx;
            if (xx < 0 || xx >= w) {
                continue;
            }
            row_sum += select(1.0, 2.0, dx == 0) * a[i32(i) + dy * w + dx];
        }
        sum += wy * row_sum;
    }
    out[i] = sum * 0.0625;
}

// out = a + b
@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = a[i] + b[i];
    }
}

// out = alpha * a
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = p.alpha * a[i];
    }
}

// out = alpha * a + b (a loss term's gradient added to another's with its weight)
@compute @workgroup_size(256)
fn axpy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i < p.n) {
        out[i] = fma(p.alpha, a[i], b[i]);
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
