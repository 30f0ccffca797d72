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
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;
@group(0) @binding(4) var<storage, read_write> moments: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> keep: array<u32>;

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

fn update(i: u32, c1: f32, c2: f32) -> f32 {
    let g = grad[i];
    var mv = moments[i];
    mv.x = p.beta1 * mv.x + (1.0 - p.beta1) * g;
    mv.y = p.beta2 * mv.y + (1.0 - p.beta2) * g * g;
    moments[i] = mv;
    let s = scores[i] - p.lr * (mv.x / c1) / (sqrt(mv.y / c2) + p.eps);
    scores[i] = s;
    return s;
}

// One invocation per pair of scores (one keep word).
@compute @workgroup_size(256)
fn step_scores(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let j = linear_workgroup(wid, nwg) * 256u + li;
    let i = 2u * j;
    if (i >= p.n) {
        return;
    }
    let t = f32(step.step + 1u);
    let c1 = one_minus_pow(p.ln_beta1, t);
    let c2 = one_minus_pow(p.ln_beta2, t);
    var word = threshold(update(i, c1, c2));
    if (i + 1u < p.n) {
        word |= threshold(update(i + 1u, c1, c2)) << 16u;
    }
    keep[j] = word;
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
