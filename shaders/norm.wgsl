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
//
// BatchNorm in inference form (a pretrained encoder's, with its running statistics and affine
// parameters) and a convolution's bias are both a fixed per-channel affine map
// y = a_c x + b_c: `affine` applies it, `affine_backward` (dx = a_c dy) is its input gradient.
// The host folds bias, running mean and variance, weight and shift into (a_c, b_c).
//% include "common.wgsl"

struct Params {
    batch: u32,
    channels: u32,
    size: u32,
    eps: f32,
    n: u32,              // affine: elements
    inv_size: f32,       // affine: 1 / size, for div_small
    inv_channels: f32,   // affine: 1 / channels, for div_small
    _pad: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec2<f32>>;  // (mean, invstd)
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read> yn: array<f32>;                 // forward output
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read> stats_in: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read> coef: array<vec2<f32>>;       // affine: (a_c, b_c)

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

// One invocation per unit (a channel, or 4 channels): the `_small` forms for channels of few
// values, written once for both of them. `suffix` names the form and its arrays, `T` the
// value type, `wg` the workgroup size; `setup` declares what `units` (the invocations wanted),
// `count` (values per channel) and `at` (the index of value j of the unit) use; `store_stats`
// and `load_invstd` move the statistics of the unit.
//% macro small_entry(name, wg, unit, setup, units, count)
@compute @workgroup_size({{ wg }})
fn {{ name }}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let {{ unit }} = linear_workgroup(wid, nwg) * {{ wg }}u + li;
    {{ setup }}
    if ({{ unit }} >= {{ units }}) {
        return;
    }
    let count = {{ count }};
{{ caller() }}
}
//% endmacro

//% macro small_forms(suffix, T, wg, unit, setup, units, count, at, store_stats, load_invstd)
//% call small_entry("forward_small" ~ suffix, wg, unit, setup, units, count)
    var s = {{ T }}(0.0);
    for (var j = 0u; j < count; j++) {
        s += x{{ suffix }}[{{ at }}];
    }
    let mean = s / f32(count);
    var q = {{ T }}(0.0);
    for (var j = 0u; j < count; j++) {
        let d = x{{ suffix }}[{{ at }}] - mean;
        q += d * d;
    }
    let invstd = 1.0 / sqrt(q / f32(count) + p.eps);
    {{ store_stats }}
    for (var j = 0u; j < count; j++) {
        let e = {{ at }};
        y{{ suffix }}[e] = (x{{ suffix }}[e] - mean) * invstd;
    }
//% endcall

//% call small_entry("backward_small" ~ suffix, wg, unit, setup, units, count)
    var sd = {{ T }}(0.0);
    var sdy = {{ T }}(0.0);
    for (var j = 0u; j < count; j++) {
        let e = {{ at }};
        sd += dy{{ suffix }}[e];
        sdy += dy{{ suffix }}[e] * yn{{ suffix }}[e];
    }
    let mean_dy = sd / f32(count);
    let mean_dyy = sdy / f32(count);
    let invstd = {{ load_invstd }};
    for (var j = 0u; j < count; j++) {
        let e = {{ at }};
        dx{{ suffix }}[e] = invstd * (dy{{ suffix }}[e] - mean_dy - yn{{ suffix }}[e] * mean_dyy);
    }
//% endcall
//% endmacro

{{ small_forms("", "f32", 64, "c", "", "p.channels", "p.batch * p.size", "element(c, j)",
               "stats[c] = vec2<f32>(mean, invstd);", "stats_in[c].y") }}

// The `_small4` forms: the `_small` ones for dense activations (size 1) with channels a
// multiple of 4, one invocation per 4 adjacent channels, which lie side by side in memory, so
// that each load and store moves a vector (a CPU adapter pays per scalar access). Per channel
// the arithmetic and its order are those of `_small`. 32 lanes a workgroup, so that even 256
// channels make two workgroups (a CPU adapter runs one workgroup on one core).
@group(0) @binding(9) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read> yn4: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> dx4: array<vec4<f32>>;

{{ small_forms("4", "vec4<f32>", 32, "c4", "let quads = p.channels / 4u;", "quads", "p.batch",
               "j * quads + c4",
               "for (var k = 0u; k < 4u; k++) { stats[4u * c4 + k] = vec2<f32>(mean[k], invstd[k]); }",
               "vec4<f32>(stats_in[4u * c4].y, stats_in[4u * c4 + 1u].y, stats_in[4u * c4 + 2u].y, stats_in[4u * c4 + 3u].y)") }}

// Channel of element e of a [batch, channels, size] tensor.
fn channel_of(e: u32) -> u32 {
    let plane = div_small(e, p.size, p.inv_size);
    return plane - div_small(plane, p.channels, p.inv_channels) * p.channels;
}

// y = a_c x + b_c, one invocation per element.
@compute @workgroup_size(256)
fn affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    if (e >= p.n) {
        return;
    }
    let ab = coef[channel_of(e)];
    y[e] = fma(ab.x, x[e], ab.y);
}

// dx = a_c dy.
@compute @workgroup_size(256)
fn affine_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let e = linear_workgroup(wid, nwg) * 256u + li;
    if (e >= p.n) {
        return;
    }
    dx[e] = coef[channel_of(e)].x * dy[e];
}
