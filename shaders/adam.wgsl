// Adam on the scores, fused with the refresh of the 16-bit keep thresholds that the next
// step's masked kernels read (see mask.wgsl), so a step makes one pass over the scores; and the
// per-step bookkeeping of a training run (loss record, step counter).
//
// The step number t for bias correction is StepState.step + 1: a client's step counter runs on
// across rounds, as its Adam state does.
//% include "common.wgsl"

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    ln_beta1: f32,  // ln(beta1) and ln(beta2), computed in f64 on the host
    ln_beta2: f32,
    _pad0: u32,
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

// Moments below TINY_MOMENT are flushed to zero, and gradients below TINY_GRADIENT are not
// squared: with beta1 = 0.5 the first moment of a weight whose gradient stays 0 halves every
// step and is subnormal after about 130 steps, and CPUs (lavapipe) take a slow path for every
// operation on a subnormal (this kernel ran 4 times slower on them); GPUs may flush them or
// not. What is dropped is 22 orders of magnitude below eps. The CPU twin does the same.
const TINY_MOMENT: f32 = 1e-30;
const TINY_GRADIENT: f32 = 1e-18;

fn flush(x: vec4<f32>) -> vec4<f32> {
    return select(x, vec4<f32>(0.0), abs(x) < vec4<f32>(TINY_MOMENT));
}

fn threshold(s: f32) -> u32 {
    return min(u32(round(sigmoid(s) * 65536.0)), 65535u);
}

// 1 - beta^t without cancellation: beta2 = 0.999 makes 1 - pow(beta2, 1) = 0.001, where the
// GPU's pow error would be magnified a thousandfold. With x = t ln(beta) <= 0, a series for
// small |x| and 1 - exp(x) otherwise.
fn one_minus_pow(ln_beta: f32, t: f32) -> f32 {
    let x = t * ln_beta;
    if (x > -0.1) {
        return -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))));
    }
    return 1.0 - exp(x);
}

// A workgroup's quads are strided by 256 so that neighbouring invocations touch neighbouring
// quads.
@compute @workgroup_size(256)
fn step_scores(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let first = linear_workgroup(wid, nwg) * (256u * QUADS_PER_INVOCATION) + li;
    let quads = (p.n + 3u) / 4u;
    let t = f32(step.step + 1u);
    let c1 = one_minus_pow(p.ln_beta1, t);
    let c2 = one_minus_pow(p.ln_beta2, t);
    for (var k = 0u; k < QUADS_PER_INVOCATION; k++) {
        let q = first + 256u * k;
        if (q >= quads) {
            return;
        }
        let valid = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.n);
        let g = select(vec4<f32>(0.0), grad[q], valid);
        let lo = moments[2u * q];
        let hi = moments[2u * q + 1u];
        let m = flush(p.beta1 * vec4<f32>(lo.x, lo.z, hi.x, hi.z) + (1.0 - p.beta1) * g);
        let gs = select(g, vec4<f32>(0.0), abs(g) < vec4<f32>(TINY_GRADIENT));
        let v = flush(p.beta2 * vec4<f32>(lo.y, lo.w, hi.y, hi.w) + (1.0 - p.beta2) * gs * gs);
        moments[2u * q] = vec4<f32>(m.x, v.x, m.y, v.y);
        moments[2u * q + 1u] = vec4<f32>(m.z, v.z, m.w, v.w);
        let s = scores[q] - p.lr * (m / c1) / (sqrt(v / c2) + p.eps);
        scores[q] = s;
        let th = select(vec4<u32>(0u), vec4<u32>(threshold(s.x), threshold(s.y), threshold(s.z),
                                                 threshold(s.w)), valid);
        keep[q] = vec2<u32>(th.x | (th.y << 16u), th.z | (th.w << 16u));
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
