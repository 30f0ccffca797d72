// Adam's update of four scores and the refresh of their 16-bit keep thresholds, shared by
// adam.wgsl (a pass over a layer's scores) and masked_matmul.wgsl's grad_score_adam (the same
// update in the score gradient's epilogue, so that the gradient never goes to memory).
// Included, not a kernel of its own: it declares no bindings.

struct AdamParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    ln_beta1: f32,  // ln(beta1) and ln(beta2), computed in f64 on the host
    ln_beta2: f32,
    _pad0: u32,
    _pad1: u32,
}

// Moments below TINY_MOMENT are flushed to zero, and gradients below TINY_GRADIENT are not
// squared: with beta1 = 0.5 the first moment of a weight whose gradient stays 0 halves every
// step and is subnormal after about 130 steps, and CPUs (lavapipe) take a slow path for every
// operation on a subnormal (Adam ran 4 times slower on them); GPUs may flush them or not. What
// is dropped is 22 orders of magnitude below eps. The CPU twin does the same.
const TINY_MOMENT: f32 = 1e-30;
const TINY_GRADIENT: f32 = 1e-18;

fn adam_flush(x: vec4<f32>) -> vec4<f32> {
    return select(x, vec4<f32>(0.0), abs(x) < vec4<f32>(TINY_MOMENT));
}

fn keep_threshold(s: f32) -> u32 {
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

// Bias corrections (1 - beta1^t, 1 - beta2^t) at step t (1-based).
fn adam_corrections(a: AdamParams, t: f32) -> vec2<f32> {
    return vec2<f32>(one_minus_pow(a.ln_beta1, t), one_minus_pow(a.ln_beta2, t));
}

// Four scores after one step: moments as stored, (m0, v0, m1, v1) and (m2, v2, m3, v3); keep
// as two words of two thresholds each, thresholds 0 where `valid` is false.
struct AdamQuad {
    scores: vec4<f32>,
    lo: vec4<f32>,
    hi: vec4<f32>,
    keep: vec2<u32>,
}

fn adam_quad(a: AdamParams, c: vec2<f32>, g: vec4<f32>, s: vec4<f32>, lo: vec4<f32>,
             hi: vec4<f32>, valid: vec4<bool>) -> AdamQuad {
    let m = adam_flush(a.beta1 * vec4<f32>(lo.x, lo.z, hi.x, hi.z) + (1.0 - a.beta1) * g);
    let gs = select(g, vec4<f32>(0.0), abs(g) < vec4<f32>(TINY_GRADIENT));
    let v = adam_flush(a.beta2 * vec4<f32>(lo.y, lo.w, hi.y, hi.w) + (1.0 - a.beta2) * gs * gs);
    let s1 = s - a.lr * (m / c.x) / (sqrt(v / c.y) + a.eps);
    let th = select(vec4<u32>(0u), vec4<u32>(keep_threshold(s1.x), keep_threshold(s1.y),
                                             keep_threshold(s1.z), keep_threshold(s1.w)), valid);
    return AdamQuad(s1, vec4<f32>(m.x, v.x, m.y, v.y), vec4<f32>(m.z, v.z, m.w, v.w),
                    vec2<u32>(th.x | (th.y << 16u), th.z | (th.w << 16u)));
}
