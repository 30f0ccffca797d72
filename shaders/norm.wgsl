// Batch normalisation with the statistics of the current batch and no affine parameters (the
// generator of PRISM always runs in training mode): y = (x - mean_c) / sqrt(var_c + eps), the
// biased variance over batch and positions, as PyTorch's training mode.
//
// Tensors are viewed as [batch, channels, size] (size = h * w for images, 1 for dense
// activations). Statistics take two passes (mean, then centred squares), which keeps the
// variance accurate when the mean is large. Large channels (images) get a workgroup each with a
// tree reduction; small ones (after a dense layer: one value per sample) get one invocation
// each, so that neighbouring lanes read neighbouring channels and no barrier is needed.
//
// Backward: dx = invstd * (dy - mean(dy) - y * mean(dy * y)), the same per-channel reduction.
//% include "common.wgsl"

struct Params {
    batch: u32,
    channels: u32,
    size: u32,
    eps: f32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec2<f32>>;  // (mean, invstd)
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read> yn: array<f32>;                 // forward output
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read> stats_in: array<vec2<f32>>;

const WG: u32 = 256u;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

fn element(c: u32, j: u32) -> u32 {
    // j runs over batch * size: (b, s) -> x[b, c, s]
    let b = j / p.size;
    let s = j % p.size;
    return (b * p.channels + c) * p.size + s;
}

// Tree reduction of red_a and red_b; the result ends in element 0 of each.
fn reduce2(li: u32) {
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (li < half) {
            red_a[li] += red_a[li + half];
            red_b[li] += red_b[li + half];
        }
    }
    workgroupBarrier();
}

// stats[c] <- (mean, 1 / sqrt(var + eps)); then y = (x - mean) * invstd.
@compute @workgroup_size(256)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let c = linear_workgroup(wid, nwg);
    if (c >= p.channels) {
        return;
    }
    let count = p.batch * p.size;
    var s = 0.0;
    for (var j = li; j < count; j += WG) {
        s += x[element(c, j)];
    }
    red_a[li] = s;
    red_b[li] = 0.0;
    reduce2(li);
    let mean = red_a[0] / f32(count);
    workgroupBarrier();
    var q = 0.0;
    for (var j = li; j < count; j += WG) {
        let d = x[element(c, j)] - mean;
        q += d * d;
    }
    red_a[li] = q;
    red_b[li] = 0.0;
    reduce2(li);
    let invstd = 1.0 / sqrt(red_a[0] / f32(count) + p.eps);
    if (li == 0u) {
        stats[c] = vec2<f32>(mean, invstd);
    }
    for (var j = li; j < count; j += WG) {
        let e = element(c, j);
        y[e] = (x[e] - mean) * invstd;
    }
}

// dx from dy, the forward output yn and the forward statistics.
@compute @workgroup_size(256)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let c = linear_workgroup(wid, nwg);
    if (c >= p.channels) {
        return;
    }
    let count = p.batch * p.size;
    var sd = 0.0;
    var sdy = 0.0;
    for (var j = li; j < count; j += WG) {
        let e = element(c, j);
        sd += dy[e];
        sdy += dy[e] * yn[e];
    }
    red_a[li] = sd;
    red_b[li] = sdy;
    reduce2(li);
    let mean_dy = red_a[0] / f32(count);
    let mean_dyy = red_b[0] / f32(count);
    let invstd = stats_in[c].y;
    for (var j = li; j < count; j += WG) {
        let e = element(c, j);
        dx[e] = invstd * (dy[e] - mean_dy - yn[e] * mean_dyy);
    }
}

// One invocation per channel: the `_small` forms for channels of few values.
@compute @workgroup_size(64)
fn forward_small(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let c = linear_workgroup(wid, nwg) * 64u + li;
    if (c >= p.channels) {
        return;
    }
    let count = p.batch * p.size;
    var s = 0.0;
    for (var j = 0u; j < count; j++) {
        s += x[element(c, j)];
    }
    let mean = s / f32(count);
    var q = 0.0;
    for (var j = 0u; j < count; j++) {
        let d = x[element(c, j)] - mean;
        q += d * d;
    }
    let invstd = 1.0 / sqrt(q / f32(count) + p.eps);
    stats[c] = vec2<f32>(mean, invstd);
    for (var j = 0u; j < count; j++) {
        let e = element(c, j);
        y[e] = (x[e] - mean) * invstd;
    }
}

@compute @workgroup_size(64)
fn backward_small(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let c = linear_workgroup(wid, nwg) * 64u + li;
    if (c >= p.channels) {
        return;
    }
    let count = p.batch * p.size;
    var sd = 0.0;
    var sdy = 0.0;
    for (var j = 0u; j < count; j++) {
        let e = element(c, j);
        sd += dy[e];
        sdy += dy[e] * yn[e];
    }
    let mean_dy = sd / f32(count);
    let mean_dyy = sdy / f32(count);
    let invstd = stats_in[c].y;
    for (var j = 0u; j < count; j++) {
        let e = element(c, j);
        dx[e] = invstd * (dy[e] - mean_dy - yn[e] * mean_dyy);
    }
}
