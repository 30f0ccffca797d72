// Kernel MMD between a generated batch x [n, d] and a real batch y [m, d] with a sum of
// Gaussian kernels k(a, b) = sum_s exp(-|a - b|^2 / (2 sigma_s^2)), and its gradient with
// respect to x. (The reference code's mean-and-variance matching is moments.wgsl.)
//
//   concat      z = (x, y) in one [n + m, d] buffer
//   (the Gram matrix G = z z^T is a masked_matmul forward with z as dense weights)
//   distances   dist[i, j] = scale * max(G_ii + G_jj - 2 G_ij, 0): the matmul does the heavy
//               part; the clamp removes the tiny negative values cancellation can leave
//   reduce      one workgroup: the three kernel means in blocked sums plus a tree, MMD^2
//               (biased: all pairs; unbiased: diagonals dropped), the loss (MMD^2 or, as GMMN
//               trains, sqrt(MMD^2)), coef[i, j] = dLoss/d dist[i, j] and its row sums
//   (c z = sum_j coef[i, j] z_j is a masked_matmul grad_input with z as dense weights)
//   gradient    dx[i, :] = 2 scale (rowsum_i x_i - (c z)_i)
//
// `scale` maps the stored values to the space the bandwidths are meant for (0.25 turns
// tanh outputs in [-1, 1] into pixels in [0, 1]).
//% include "common.wgsl"

struct Params {
    n: u32,            // generated samples
    m: u32,            // real samples
    d: u32,            // dimensions
    unbiased: u32,
    sqrt_loss: u32,    // 1: loss = sqrt(max(MMD^2, tiny)) (GMMN)
    bandwidths: u32,   // number of sigmas in use (<= 8)
    scale: f32,
    _pad: u32,
    inv_two_sigma2: array<vec4<f32>, 2>,  // 1 / (2 sigma^2) per bandwidth
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> dist: array<f32>;
@group(0) @binding(4) var<storage, read> dist_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> coef: array<f32>;
// loss: [0] MMD^2, [1] loss value, [2] mean k(x, x'), [3] mean k(y, y'), [4] mean k(x, y)
@group(0) @binding(7) var<storage, read_write> loss: array<f32>;
@group(0) @binding(8) var<storage, read> loss_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dx: array<f32>;
@group(0) @binding(10) var<storage, read_write> z: array<f32>;
@group(0) @binding(11) var<storage, read> gram: array<f32>;
@group(0) @binding(12) var<storage, read_write> rowsum: array<f32>;
@group(0) @binding(13) var<storage, read> rowsum_in: array<f32>;
@group(0) @binding(14) var<storage, read> cz: array<f32>;

// z <- (x, y), one invocation per element of z.
@compute @workgroup_size(256)
fn concat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    let nx = p.n * p.d;
    if (e < nx) {
        z[e] = x[e];
    } else if (e < nx + p.m * p.d) {
        z[e] = y[e - nx];
    }
}

// dist[i, j] from the Gram matrix, one invocation per pair.
@compute @workgroup_size(256)
fn distances(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let t = p.n + p.m;
    let pair = linear_workgroup(wid, nwg) * 256u + li;
    if (pair >= t * t) {
        return;
    }
    let i = pair / t;
    let j = pair % t;
    var s = 0.0;
    if (i != j) {
        s = max(gram[i * t + i] + gram[j * t + j] - 2.0 * gram[pair], 0.0);
    }
    dist[pair] = s * p.scale;
}

fn kernel_value(dd: f32) -> f32 {
    var s = 0.0;
    for (var b = 0u; b < p.bandwidths; b++) {
        s += exp(-dd * p.inv_two_sigma2[b / 4u][b % 4u]);
    }
    return s;
}

// dk/d(dist)
fn kernel_slope(dd: f32) -> f32 {
    var s = 0.0;
    for (var b = 0u; b < p.bandwidths; b++) {
        let c = p.inv_two_sigma2[b / 4u][b % 4u];
        s -= c * exp(-dd * c);
    }
    return s;
}

var<workgroup> red: array<vec3<f32>, 256>;

@compute @workgroup_size(256)
fn reduce(@builtin(local_invocation_index) li: u32) {
    let n = p.n;
    let m = p.m;
    let t = n + m;
    // Each lane sums a contiguous block of pairs (blocked summation), then a tree joins the
    // 256 block sums: the error grows with log(pairs), not with pairs.
    let pairs = t * t;
    let per = (pairs + 255u) / 256u;
    var acc = vec3<f32>(0.0);
    for (var q = li * per; q < min(pairs, (li + 1u) * per); q++) {
        let i = q / t;
        let j = q % t;
        if (i == j && p.unbiased == 1u) {
            continue;
        }
        let kv = kernel_value(dist_in[q]);
        if (i < n && j < n) {
            acc.x += kv;
        } else if (i >= n && j >= n) {
            acc.y += kv;
        } else if (i < n) {
            acc.z += kv;  // cross pairs counted once, as (generated, real)
        }
    }
    red[li] = acc;
    for (var half = 128u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (li < half) {
            red[li] += red[li + half];
        }
    }
    workgroupBarrier();
    let fn_ = f32(n);
    let fm = f32(m);
    var nxx = fn_ * fn_;
    var nyy = fm * fm;
    if (p.unbiased == 1u) {
        nxx = fn_ * (fn_ - 1.0);
        nyy = fm * (fm - 1.0);
    }
    let kxx = red[0].x / nxx;
    let kyy = red[0].y / nyy;
    let kxy = red[0].z / (fn_ * fm);
    let mmd2 = kxx + kyy - 2.0 * kxy;
    // d(loss)/d(MMD^2)
    var outer = 1.0;
    var value = mmd2;
    if (p.sqrt_loss == 1u) {
        value = sqrt(max(mmd2, 1e-12));
        outer = 0.5 / value;
    }
    if (li == 0u) {
        loss[0] = mmd2;
        loss[1] = value;
        loss[2] = kxx;
        loss[3] = kyy;
        loss[4] = kxy;
    }
    // coef[i, j] for generated i and any j: d loss / d dist[i, j], counting both orders of a
    // generated pair (dist is symmetric); one lane per row, which also sums the row.
    for (var i = li; i < n; i += 256u) {
        var row = 0.0;
        for (var j = 0u; j < t; j++) {
            var c = 0.0;
            if (i != j || p.unbiased == 0u) {
                let slope = kernel_slope(dist_in[i * t + j]);
                if (j < n) {
                    c = 2.0 * slope / nxx;
                } else {
                    c = -2.0 * slope / (fn_ * fm);
                }
            }
            coef[i * t + j] = outer * c;
            row += outer * c;
        }
        rowsum[i] = row;
    }
}

// dx[i, k] = sum_j coef[i, j] d dist[i, j] / dx[i, k] with d dist[i, j] / dx_i = 2 scale
// (x_i - z_j): 2 scale (rowsum_i x[i, k] - cz[i, k]).
@compute @workgroup_size(256)
fn gradient(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    if (e >= p.n * p.d) {
        return;
    }
    let i = e / p.d;
    dx[e] = 2.0 * p.scale * (rowsum_in[i] * x[e] - cz[e]);
}
