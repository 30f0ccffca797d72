// Adam on the scores, fused with the refresh of the 16-bit keep thresholds that the next
// step's masked kernels read (see mask.wgsl), so a step makes one pass over the scores; and the
// per-step bookkeeping of a training run (loss record, step counter).
//
// The step number t for bias correction is StepState.step + 1: a client's step counter runs on
// across rounds, as its Adam state does.
//% include "common.wgsl"

//% include "adam_update.wgsl"

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    adam: AdamParams,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: StepState;
// Viewed as vectors of four scores (a "quad"), with QUADS_PER_INVOCATION quads per
// invocation (KernelFeatures::vectors_per_invocation; a constant, so that the loop unrolls:
// as a uniform it ran 1.5 times slower on lavapipe): lavapipe pays per invocation and per scalar access, so there each invocation
// updates 8 quads (2.5 times faster than one score pair per invocation); GPUs get one quad per
// invocation, so 16-byte loads and a quarter of the invocations. The last quad may run past n into the buffers' padding (the
// launcher binds them padded): its extra lanes are computed on zeros and never written into
// a keep word.
@group(0) @binding(2) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> scores: array<vec4<f32>>;
// (m, v) interleaved: quad q's moments are moments[2q] = (m0, v0, m1, v1), moments[2q + 1].
@group(0) @binding(4) var<storage, read_write> moments: array<vec4<f32>>;
// Two keep words (four 16-bit thresholds) per quad.
@group(0) @binding(5) var<storage, read_write> keep: array<vec2<u32>>;

const QUADS_PER_INVOCATION: u32 = {{ quads | default(1) }}u;

// A workgroup's quads are strided by 256 so that neighbouring invocations touch neighbouring
// quads.
@compute @workgroup_size(256)
fn step_scores(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * QUADS_PER_INVOCATION) + li;
    let quads = (p.n + 3u) / 4u;
    let c = adam_corrections(p.adam, f32(step.step + 1u));
    for (var k = 0u; k < QUADS_PER_INVOCATION; k++) {
        let q = first + 256u * k;
        if (q >= quads) {
            return;
        }
        let valid = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.n);
        let g = select(vec4<f32>(0.0), grad[q], valid);
        let u = adam_quad(p.adam, c, g, scores[q], moments[2u * q], moments[2u * q + 1u], valid);
        moments[2u * q] = u.lo;
        moments[2u * q + 1u] = u.hi;
        scores[q] = u.scores;
        keep[q] = u.keep;
    }
}

// losses[step - step_base] <- loss_in[1]: keeps every step's loss of a local run for the host
// to read once at its end.
@group(0) @binding(7) var<storage, read> loss_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> losses: array<f32>;

@compute @workgroup_size(1)
fn record_loss(@builtin(local_invocation_index) li: u32) {
    let i = step.step - step.step_base;
    if (i < arrayLength(&losses)) {
        losses[i] = loss_in[1];
    }
}

// Advances the step counter: recorded after each step so that many steps fit in one
// submission.
@compute @workgroup_size(1)
fn advance(@builtin(local_invocation_index) li: u32) {
    step_out.step = step_out.step + 1u;
}
@group(0) @binding(6) var<storage, read_write> step_out: StepState;
