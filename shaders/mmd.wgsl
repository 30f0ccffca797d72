// Kernel MMD between a generated batch x [n, d] and a real batch y [m, d] with a sum of
// Gaussian kernels k(a, b) = sum_s exp(-|a - b|^2 / (2 sigma_s^2)), and its gradient with
// respect to x. (The reference code's mean-and-variance matching is moments.wgsl.)
//
//   concat      z = (x, y) in one [n + m, d] buffer (vec4 wide where n d and m d are
//               multiples of 4)
//   (the Gram matrix G = z z^T is a masked_matmul forward with z as dense weights, computed
//   only in the tiles that touch its lower triangle: G is symmetric)
//   rows        one workgroup per row i of z: dist[i, j] = scale * max(G_ii + G_jj - 2 G_ij, 0)
//               (the clamp removes the tiny negative values cancellation can leave), the
//               row's kernel sums by kind of pair, coef[i, j] = d MMD^2 / d dist[i, j] for
//               generated rows, and its row sum; pairs never exist in memory
//   finish      one workgroup: the kernel means (a tree over the row sums), MMD^2 (biased: all
//               pairs; unbiased: diagonals dropped), the loss (MMD^2 or, as GMMN trains,
//               sqrt(MMD^2)) and d loss / d MMD^2
//   (c z = sum_j coef[i, j] z_j is a masked_matmul grad_input with z as dense weights)
//   gradient    dx[i, :] = 2 scale dloss/dMMD^2 (rowsum_i x_i - (c z)_i)
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
// Per row of z: (sum of k over its (generated, generated), (real, real) and (generated,
// real) pairs, 0).
@group(0) @binding(3) var<storage, read_write> partial: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> partial_in: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> coef: array<f32>;
// loss: [0] MMD^2, [1] loss value, [2] mean k(x, x'), [3] mean k(y, y'), [4] mean k(x, y),
// [5] d loss / d MMD^2 (which coef leaves out, so that the rows need not wait for the total)
@group(0) @binding(7) var<storage, read_write> loss: array<f32>;
@group(0) @binding(8) var<storage, read> loss_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dx: array<f32>;
@group(0) @binding(10) var<storage, read_write> z: array<f32>;
@group(0) @binding(11) var<storage, read> gram: array<f32>;
@group(0) @binding(12) var<storage, read_write> rowsum: array<f32>;
@group(0) @binding(13) var<storage, read> rowsum_in: array<f32>;
@group(0) @binding(14) var<storage, read> cz: array<f32>;
// Vector views of the same operands (bound padded to 16 bytes) for the streaming kernels.
@group(0) @binding(15) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read> y4: array<vec4<f32>>;
@group(0) @binding(17) var<storage, read_write> z4: array<vec4<f32>>;
@group(0) @binding(18) var<storage, read> cz4: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read_write> dx4: array<vec4<f32>>;

// Vectors each invocation of a streaming kernel handles (KernelFeatures::
// vectors_per_invocation: 8 on CPU adapters, 1 on GPUs); a constant, so that the loop unrolls.
const VECTORS_PER_INVOCATION: u32 = {{ vectors | default(1) }}u;

// z <- (x, y), one invocation per element of z (any shape).
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

// concat on vectors of four, for n d and m d multiples of 4 (x's last vector ends where
// y's first begins in z); a workgroup's vectors strided by 256.
@compute @workgroup_size(256)
fn concat4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * VECTORS_PER_INVOCATION) + li;
    let nx = p.n * p.d / 4u;
    let all = nx + p.m * p.d / 4u;
    for (var k = 0u; k < VECTORS_PER_INVOCATION; k++) {
        let q = first + 256u * k;
        if (q >= all) {
            return;
        }
        if (q < nx) {
            z4[q] = x4[q];
        } else {
            z4[q] = y4[q - nx];
        }
    }
}

// The pair counts the means divide by: (generated pairs, real pairs, cross pairs).
fn pair_counts() -> vec3<f32> {
    let fn_ = f32(p.n);
    let fm = f32(p.m);
    if (p.unbiased == 1u) {
        return vec3<f32>(fn_ * (fn_ - 1.0), fm * (fm - 1.0), fn_ * fm);
    }
    return vec3<f32>(fn_ * fn_, fm * fm, fn_ * fm);
}

var<workgroup> red: array<vec4<f32>, 256>;

// Sums red[0..lanes) into red[0] (lanes a power of two).
fn tree(li: u32, lanes: u32) {
    for (var half = lanes / 2u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (li < half) {
            red[li] += red[li + half];
        }
    }
    workgroupBarrier();
}

// Lanes of a row's workgroup: few, because a CPU adapter pays for every barrier of the tree
// in each of the n + m workgroups (lavapipe, default step: 256 lanes 4.8 ms, 64 lanes 2.1 ms,
// 32 lanes 0.9 to 1.0 ms, 16 lanes 0.7 to 1.0 ms); 32 is one subgroup on most GPUs.
const ROW_LANES: u32 = 32u;

// Row i of the pairs: each lane takes columns li, li + ROW_LANES, ... (blocked sums), a tree joins
// them. Cross pairs are counted once, as (generated, real), so a real row needs only the
// real columns. G is read from its lower triangle.
@compute @workgroup_size(ROW_LANES)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let n = p.n;
    let t = n + p.m;
    let i = linear_workgroup(wid, nwg);
    if (i >= t) {
        return;
    }
    let counts = pair_counts();
    let gii = gram[i * t + i];
    let first = select(0u, n, i >= n);
    var acc = vec4<f32>(0.0);
    for (var j = first + li; j < t; j += ROW_LANES) {
        var dd = 0.0;
        if (i != j) {
            let g = gram[max(i, j) * t + min(i, j)];
            dd = p.scale * max(gii + gram[j * t + j] - 2.0 * g, 0.0);
        }
        // The kernel's value and its slope dk/d(dist) share their exponentials.
        var kv = 0.0;
        var slope = 0.0;
        for (var b = 0u; b < p.bandwidths; b++) {
            let c = p.inv_two_sigma2[b / 4u][b % 4u];
            let e = exp(-dd * c);
            kv += e;
            slope -= c * e;
        }
        if (i == j && p.unbiased == 1u) {
            kv = 0.0;
            slope = 0.0;
        }
        if (i < n) {
            // d MMD^2 / d dist[i, j], counting both orders of a generated pair (dist is
            // symmetric).
            var c = 0.0;
            if (j < n) {
                acc.x += kv;
                c = 2.0 * slope / counts.x;
            } else {
                acc.z += kv;
                c = -2.0 * slope / counts.z;
            }
            coef[i * t + j] = c;
            acc.w += c;
        } else {
            acc.y += kv;
        }
    }
    red[li] = acc;
    tree(li, ROW_LANES);
    if (li == 0u) {
        partial[i] = vec4<f32>(red[0].xyz, 0.0);
        if (i < n) {
            rowsum[i] = red[0].w;
        }
    }
}

@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_index) li: u32) {
    let t = p.n + p.m;
    var acc = vec4<f32>(0.0);
    for (var r = li; r < t; r += 256u) {
        acc += partial_in[r];
    }
    red[li] = acc;
    tree(li, 256u);
    if (li == 0u) {
        let means = red[0].xyz / pair_counts();
        let mmd2 = means.x + means.y - 2.0 * means.z;
        // d(loss)/d(MMD^2)
        var outer = 1.0;
        var value = mmd2;
        if (p.sqrt_loss == 1u) {
            value = sqrt(max(mmd2, 1e-12));
            outer = 0.5 / value;
        }
        loss[0] = mmd2;
        loss[1] = value;
        loss[2] = means.x;
        loss[3] = means.y;
        loss[4] = means.z;
        loss[5] = outer;
    }
}

// dx[i, k] = outer sum_j coef[i, j] d dist[i, j] / dx[i, k] with d dist[i, j] / dx_i = 2 scale
// (x_i - z_j): 2 scale outer (rowsum_i x[i, k] - cz[i, k]).
@compute @workgroup_size(256)
fn gradient(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    if (e >= p.n * p.d) {
        return;
    }
    let i = e / p.d;
    dx[e] = 2.0 * p.scale * loss_in[5] * (rowsum_in[i] * x[e] - cz[e]);
}

// gradient on vectors of four, for d a multiple of 4 (a vector stays in one row).
@compute @workgroup_size(256)
fn gradient4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * VECTORS_PER_INVOCATION) + li;
    let all = p.n * p.d / 4u;
    let factor = 2.0 * p.scale * loss_in[5];
    let d4 = p.d / 4u;
    for (var k = 0u; k < VECTORS_PER_INVOCATION; k++) {
        let q = first + 256u * k;
        if (q >= all) {
            return;
        }
        dx4[q] = factor * (rowsum_in[q / d4] * x4[q] - cz4[q]);
    }
}
