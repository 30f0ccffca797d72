// The reference code's loss (PRISM.md section 3, GFMN of Santos et al. 2019): match the
// per-feature mean and variance of a frozen encoder's features of the generated batch to those
// of the client's real data, through GFMN's moving-average estimator.
//
// A "feature" is one element of a tapped activation (channel and position): f [batch, d].
//
//   stats_merge   real statistics, streamed: merges one batch of `rows` real feature vectors
//                 into running (mean, M2) with Chan's update, so a client's whole data set is
//                 read once in batches and nothing is stored per image
//   stats_finish  (mean, M2) -> (mean, unbiased variance)
//   step          one invocation per feature of one tapped layer, per training step:
//                   fake mean mu and unbiased variance var over the batch (torch.var);
//                   the trackers NetMean, NetVar (one weight per feature) take an Adam step
//                   on mean_all((v - (real - fake))^2) (MSELoss over every feature of every
//                   tapped layer, so the gradient carries 1 / total_d);
//                   generator loss L = sum v_m (real_mean - mu) + v_v (real_var - var) with
//                   the updated trackers, so dL/df[b] = -v_m / n - v_v 2 (f[b] - mu) / (n - 1)
//                   (times the loss weight);
//                   terms[offset + i] = (v_m dm + v_v dv, dm^2 + dv^2) for the loss record
//   reduce        one workgroup: loss[0] = sum of the objective terms (times the weight),
//                 loss[1] = weight * mean of the squared moment differences (the recorded
//                 loss: it falls as the moments approach the real ones)
//% include "common.wgsl"
//% include "adam_update.wgsl"

struct Params {
    n: u32,            // rows of f (the batch)
    d: u32,            // features of this layer
    offset: u32,       // this layer's first feature among all tapped layers
    total_d: u32,      // features of all tapped layers
    weight: f32,       // loss weight
    count: u32,        // stats_merge: real samples merged before this batch; stats_finish: all
    _pad0: u32,
    _pad1: u32,
    adam: AdamParams,  // the trackers' Adam
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> f: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc: array<vec2<f32>>;     // (mean, M2)
@group(0) @binding(3) var<storage, read> acc_in: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> real: array<vec2<f32>>;    // (mean, var)
@group(0) @binding(5) var<storage, read> real_in: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> track: array<vec2<f32>>;   // (v_m, v_v)
@group(0) @binding(7) var<storage, read_write> opt: array<vec4<f32>>;     // Adam of v_m, v_v
@group(0) @binding(8) var<storage, read_write> df: array<f32>;
@group(0) @binding(9) var<storage, read_write> terms: array<vec2<f32>>;
@group(0) @binding(10) var<storage, read> terms_in: array<vec2<f32>>;
@group(0) @binding(11) var<storage, read_write> loss: array<f32>;
@group(0) @binding(12) var<storage, read> step: StepState;

fn feature(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return linear_workgroup(wid, nwg) * 256u + li;
}

// Mean and sum of squared deviations of feature i over the first `rows` rows of f.
fn column_stats(i: u32, rows: u32) -> vec2<f32> {
    var s = 0.0;
    for (var b = 0u; b < rows; b++) {
        s += f[b * p.d + i];
    }
    let mean = s / f32(rows);
    var q = 0.0;
    for (var b = 0u; b < rows; b++) {
        let e = f[b * p.d + i] - mean;
        q += e * e;
    }
    return vec2<f32>(mean, q);
}

@compute @workgroup_size(256)
fn stats_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = feature(wid, nwg, li);
    if (i >= p.d) {
        return;
    }
    let batch = column_stats(i, p.n);
    if (p.count == 0u) {
        acc[i] = batch;
        return;
    }
    let a = acc[i];
    let na = f32(p.count);
    let nb = f32(p.n);
    let total = na + nb;
    let delta = batch.x - a.x;
    acc[i] = vec2<f32>(a.x + delta * nb / total, a.y + batch.y + delta * delta * na * nb / total);
}

@compute @workgroup_size(256)
fn stats_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = feature(wid, nwg, li);
    if (i >= p.d) {
        return;
    }
    let a = acc_in[i];
    real[i] = vec2<f32>(a.x, a.y / f32(max(p.count, 2u) - 1u));
}

@compute @workgroup_size(256)
fn step_layer(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let i = feature(wid, nwg, li);
    if (i >= p.d) {
        return;
    }
    let st = column_stats(i, p.n);
    let mu = st.x;
    let var_f = st.y / f32(p.n - 1u);
    let r = real_in[i];
    let diff = vec2<f32>(r.x - mu, r.y - var_f);
    // The trackers' Adam step on MSE(v, diff) over all total_d features.
    let t = f32(step.step + 1u);
    let c = adam_corrections(p.adam, t);
    let c1 = c.x;
    let c2 = c.y;
    var v = track[i];
    let g = 2.0 * (v - diff) / f32(p.total_d);
    var o = opt[i];
    o.x = p.adam.beta1 * o.x + (1.0 - p.adam.beta1) * g.x;
    o.y = p.adam.beta2 * o.y + (1.0 - p.adam.beta2) * g.x * g.x;
    o.z = p.adam.beta1 * o.z + (1.0 - p.adam.beta1) * g.y;
    o.w = p.adam.beta2 * o.w + (1.0 - p.adam.beta2) * g.y * g.y;
    opt[i] = o;
    v.x -= p.adam.lr * (o.x / c1) / (sqrt(o.y / c2) + p.adam.eps);
    v.y -= p.adam.lr * (o.z / c1) / (sqrt(o.w / c2) + p.adam.eps);
    track[i] = v;
    // The generator's gradient through the updated estimates.
    let gm = -p.weight * v.x / f32(p.n);
    let gv = -p.weight * v.y * 2.0 / f32(p.n - 1u);
    for (var b = 0u; b < p.n; b++) {
        let e = b * p.d + i;
        df[e] = gm + gv * (f[e] - mu);
    }
    terms[p.offset + i] = vec2<f32>(v.x * diff.x + v.y * diff.y, dot(diff, diff));
}

var<workgroup> red: array<vec2<f32>, 256>;

@compute @workgroup_size(256)
fn reduce(@builtin(local_invocation_index) li: u32) {
    var s = vec2<f32>(0.0);
    for (var i = li; i < p.total_d; i += 256u) {
        s += terms_in[i];
    }
    red[li] = s;
    for (var half = 128u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (li < half) {
            red[li] += red[li + half];
        }
    }
    workgroupBarrier();
    if (li == 0u) {
        loss[0] = p.weight * red[0].x;
        loss[1] = p.weight * red[0].y / f32(p.total_d);
    }
}
