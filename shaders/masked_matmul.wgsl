//% if half
enable f16;
//% endif
// Masked dense layer: y = x (w * m)^T with w regenerated from the seed inside the kernel and
// m from the weight source (weights.wgsl). Three entry points:
//   forward     y[b, o]  = sum_i x[b, i]  weff[o, i]          (M = batch,   N = outputs, K = inputs)
//   grad_input  dx[b, i] = sum_o dy[b, o] weff[o, i]          (M = batch,   N = inputs,  K = outputs)
//   grad_score  g[o, i]  = sum_b dy[b, o] x[b, i] * w[o, i] * f(p[o, i])
//                                                             (M = outputs, N = inputs,  K = batch)
// where f is p^2 (1 - p) for the reference's p-scaled estimator (estimator 0) and p (1 - p) for
// the plain straight-through one (estimator 1), p = sigmoid(score). No w * m tensor exists in
// memory: each weight is regenerated where it is multiplied.
//
// Tiling. A workgroup is 64 lanes = 8 octets of 8 lanes, arranged om x on (parameters). An octet
// computes `rows` x 32 outputs; each lane owns 4 adjacent columns and accumulates them for all
// the octet's rows. The rows' operand values are loaded once per octet and shared:
//   broadcast - lane j loads rows j, j+8, ...; subgroupBroadcast with constant ids hands them to
//               the other lanes (subgroups of exactly 8 lanes, e.g. lavapipe on AVX2);
//   shuffle   - the same with subgroupShuffle inside each group of 8 (any multiple of 8);
//   direct    - every lane loads the rows itself (no subgroups; GPUs broadcast same-address
//               loads in hardware).
// A generated weight is reused for all `rows` rows of the octet, which is what makes the
// generation cost small next to the multiply-adds.
//
// `aligned` (inputs and outputs multiples of 4) reads operands as vec4 and takes one sign draw
// per 32 weights; otherwise a scalar loop handles any shape. `half` (inference on adapters with
// SHADER_F16) multiplies in f16 and accumulates in f32; memory stays f32.
//% include "common.wgsl"
//% include "weights.wgsl"
//% include "octet.wgsl"
//% import "octet.wgsl" as octet

const R: u32 = {{ rows }}u;

//% if adam
//% include "adam_update.wgsl"
//% endif

struct Params {
    g: WeightGen,
    batch: u32,
    inputs: u32,
    outputs: u32,
    tiles_n: u32,      // tiles along N of this entry point's problem
    tiles_total: u32,  // tiles in all
    estimator: u32,    // grad_score: 0 p-scaled (reference), 1 straight-through
    om: u32,           // octets along M and along N (om * on = 8)
    on: u32,
//% if adam
    adam: AdamParams,  // `adam`: the Adam step grad_score applies
//% endif
}
@group(0) @binding(0) var<uniform> p: Params;
//% if aligned
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> dy: array<vec4<f32>>;
//% else
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
//% endif
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
//% if aligned and adam
// `adam` (aligned shapes only): grad_score applies the layer's Adam step and refreshes its keep
// thresholds in its epilogue instead of storing the gradient, so that the gradient never goes
// to memory and the step needs no Adam pass over the layer. Every score is read and written by
// the one lane that owns it, and nothing else in the step reads the layer's scores or keep
// thresholds after this kernel (the launcher records the layer's grad_input before it).
@group(0) @binding(10) var<storage, read_write> scores: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> moments: array<vec4<f32>>;  // (m, v) interleaved
@group(0) @binding(13) var<storage, read_write> keep_out: array<vec2<u32>>;
@group(0) @binding(14) var<storage, read> adam_step: StepState;
//% elif aligned
@group(0) @binding(10) var<storage, read> scores: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> grad: array<vec4<f32>>;
//% else
@group(0) @binding(10) var<storage, read> scores: array<f32>;
@group(0) @binding(11) var<storage, read_write> grad: array<f32>;
//% endif

fn store_y(out_index: u32, col0: u32, n: u32, v: vec4<f32>) {
    for (var q = 0u; q < 4u; q++) {
        if (col0 + q < n) {
            y[out_index + q] = v[q];
        }
    }
}

fn store_dx(out_index: u32, col0: u32, n: u32, v: vec4<f32>) {
    for (var q = 0u; q < 4u; q++) {
        if (col0 + q < n) {
            dx[out_index + q] = v[q];
        }
    }
}

@compute @workgroup_size(64)
fn forward({{ octet.entry_args() }}) {
{{ octet.tile_start() }}
//% if lower
    // A Gram matrix (x = weights), which is symmetric: only the tiles that reach the lower
    // triangle (first column <= last row) are computed; the others are left as they were.
    if ((tile % p.tiles_n) * 32u * p.on > (tile / p.tiles_n + 1u) * R * p.om - 1u) {
        return;
    }
//% endif
{{ octet.lane_setup() }}
    let m = p.batch;
    let n = p.outputs;
    let k = p.inputs;
{{ octet.tile_origin() }}
{{ octet.columns() }}
    let mkey = step_mask_key(p.g);
{{ octet.accumulators() }}
//% if aligned
    let k4n = k / 4u;
{{ octet.sign_words() }}
    for (var k4 = 0u; k4 < k4n; k4++) {
        let i = k4 * 4u;
{{ octet.shared_loads("x[min(row0 + lane.lane8 + @8ju, m - 1u) * k4n + k4]") }}
{{ octet.weights4("k4 == 0u") }}
{{ octet.accumulate("x[min(row0 + @ru, m - 1u) * k4n + k4]", "dot4") }}
    }
//% else
    for (var i = 0u; i < k; i++) {
{{ octet.shared_loads("x[min(row0 + lane.lane8 + @8ju, m - 1u) * k + i]") }}
{{ octet.weights1("@c * k + i") }}
{{ octet.accumulate("x[min(row0 + @ru, m - 1u) * k + i]", "scale") }}
    }
//% endif
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        store_y((row0 + {{ r }}u) * n + col0, col0, n, acc{{ r }});
    }
//% endfor
}

@compute @workgroup_size(64)
fn grad_input({{ octet.entry_args() }}) {
{{ octet.tile_start() }}
{{ octet.lane_setup() }}
    let m = p.batch;
    let n = p.inputs;
    let k = p.outputs;
{{ octet.tile_origin() }}
    let mkey = step_mask_key(p.g);
{{ octet.accumulators() }}
//% if aligned
    let k4n = k / 4u;
    // First of this lane's 4 columns, clamped to the last whole group of 4.
    let ci = min(col0, n - 4u);
    for (var k4 = 0u; k4 < k4n; k4++) {
        let o = k4 * 4u;
{{ octet.shared_loads("dy[min(row0 + lane.lane8 + @8ju, m - 1u) * k4n + k4]") }}
        let w0 = weff4(p.g, o * n + ci, mkey);
        let w1 = weff4(p.g, (o + 1u) * n + ci, mkey);
        let w2 = weff4(p.g, (o + 2u) * n + ci, mkey);
        let w3 = weff4(p.g, (o + 3u) * n + ci, mkey);
{{ octet.accumulate("dy[min(row0 + @ru, m - 1u) * k4n + k4]", "combine") }}
    }
//% else
{{ octet.columns() }}
    for (var o = 0u; o < k; o++) {
{{ octet.shared_loads("dy[min(row0 + lane.lane8 + @8ju, m - 1u) * k + o]") }}
{{ octet.weights1("o * n + @c") }}
{{ octet.accumulate("dy[min(row0 + @ru, m - 1u) * k + o]", "scale32") }}
    }
//% endif
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        store_dx((row0 + {{ r }}u) * n + col0, col0, n, acc{{ r }});
    }
//% endfor
}

//% if source != "dense"
fn score_factor(s: f32) -> f32 {
    let q = sigmoid(s);
    if (p.estimator == 0u) {
        return q * q * (1.0 - q);
    }
    return q * (1.0 - q);
}

fn score_factor4(s: vec4<f32>) -> vec4<f32> {
    let q = 1.0 / (1.0 + exp(-s));
    if (p.estimator == 0u) {
        return q * q * (1.0 - q);
    }
    return q * (1.0 - q);
}

@compute @workgroup_size(64)
fn grad_score({{ octet.entry_args() }}) {
{{ octet.tile_start() }}
{{ octet.lane_setup() }}
    let m = p.outputs;
    let n = p.inputs;
    let k = p.batch;
{{ octet.tile_origin() }}
{{ octet.accumulators() }}
//% if aligned
    let m4 = m / 4u;
    let n4 = n / 4u;
    let cv = min(col0 / 4u, n4 - 1u);
    // Four batch rows at a time: their products are summed in registers before they reach an
    // accumulator, so the 32 accumulators (which a CPU adapter keeps in memory) are read and
    // written once per four rows, as the forward's dot products do. The loop below takes the
    // rest.
    let kq = k / 4u;
    for (var bq = 0u; bq < kq; bq++) {
        let b = 4u * bq;
//% for u in range(4)
        let xv{{ u }} = x[(b + {{ u }}u) * n4 + cv];
//% if row_share != "direct"
        let a{{ u }} = dy[(b + {{ u }}u) * m4 + min(row0 / 4u + lane.lane8, m4 - 1u)];
//% endif
//% endfor
//% for v in range(rows // 4)
        {
//% for u in range(4)
//% if row_share == "direct"
            let d{{ u }} = dy[(b + {{ u }}u) * m4 + min(row0 / 4u + {{ v }}u, m4 - 1u)];
//% else
            let d{{ u }} = {{ octet.share("a" ~ u, v) | trim }};
//% endif
//% endfor
//% for c in ["x", "y", "z", "w"]
            acc{{ 4 * v + loop.index0 }} += d0.{{ c }} * xv0 + d1.{{ c }} * xv1 + d2.{{ c }} * xv2
                + d3.{{ c }} * xv3;
//% endfor
        }
//% endfor
    }
    for (var b = 4u * kq; b < k; b++) {
        let xv = x[b * n4 + cv];
//% if row_share != "direct"
        // Lanes 0 .. rows/4-1 load 4 consecutive rows each; the others load a clamped copy.
        let a = dy[b * m4 + min(row0 / 4u + lane.lane8, m4 - 1u)];
//% endif
//% for v in range(rows // 4)
        {
//% if row_share == "direct"
            let d = dy[b * m4 + min(row0 / 4u + {{ v }}u, m4 - 1u)];
//% else
            let d = {{ octet.share("a", v) | trim }};
//% endif
            acc{{ 4 * v }} += d.x * xv;
            acc{{ 4 * v + 1 }} += d.y * xv;
            acc{{ 4 * v + 2 }} += d.z * xv;
            acc{{ 4 * v + 3 }} += d.w * xv;
        }
//% endfor
    }
//% else
{{ octet.columns() }}
    for (var b = 0u; b < k; b++) {
        let xv = vec4<f32>(x[b * n + c0], x[b * n + c1], x[b * n + c2], x[b * n + c3]);
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = dy[b * m + min(row0 + lane.lane8 + {{ 8 * j }}u, m - 1u)];
//% endfor
//% endif
//% for r in range(rows)
        {
//% if row_share == "direct"
            let d = dy[b * m + min(row0 + {{ r }}u, m - 1u)];
//% else
            let d = {{ octet.share("a" ~ (r // 8), r % 8) | trim }};
//% endif
            acc{{ r }} += d * xv;
        }
//% endfor
    }
//% endif
    // Epilogue: chain rule through w_eff = w * m and the estimator of dm/ds. With K = batch
    // the loop above is short, so this part costs a third of the kernel unless it is vec4
    // wide: a lane's 4 columns lie in one block of 32 weights (n % 4 == 0), so one sign draw
    // serves them, and scores and gradients move as vec4.
//% if aligned
//% if adam
    let corrections = adam_corrections(p.adam, f32(adam_step.step + 1u));
//% endif
    if (col0 < n) {
//% for r in range(rows)
        if (row0 + {{ r }}u < m) {
            let i0 = (row0 + {{ r }}u) * n + col0;
            let q = i0 / 4u;
            let s = scores[q];
            let g = acc{{ r }} * frozen4(p.g, i0, sign_word(p.g, i0)) * score_factor4(s);
//% if adam
            let u = adam_quad(p.adam, corrections, g, s, moments[2u * q], moments[2u * q + 1u],
                              vec4<bool>(true));
            scores[q] = u.scores;
            moments[2u * q] = u.lo;
            moments[2u * q + 1u] = u.hi;
            keep_out[q] = u.keep;
//% else
            grad[q] = g;
//% endif
        }
//% endfor
    }
//% else
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        for (var q = 0u; q < 4u; q++) {
            if (col0 + q < n) {
                let idx = (row0 + {{ r }}u) * n + col0 + q;
                grad[idx] = acc{{ r }}[q] * frozen1(p.g, idx) * score_factor(scores[idx]);
            }
        }
    }
//% endfor
//% endif
}
//% endif
