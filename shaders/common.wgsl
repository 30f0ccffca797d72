// Helpers shared by every kernel.

// Linear workgroup id of a (possibly folded) 3-D dispatch; see fold_workgroups in
// src/gpu/kernel.rs. Kernels return early when it is past their real workgroup count.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}

// Per-step state of a training run, written by the host or by the step-advance kernel, so that
// many steps can be recorded into one submission: the mask and latent keys of a step are
// derived from it inside the kernels.
struct StepState {
    client: u32,
    step: u32,         // the client's step counter, running on across rounds
    round: u32,
    seed: u32,
    step_base: u32,    // `step` when this local run began (losses are recorded from it)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// a / b for a < 2^31 without an integer division: lavapipe (and some GPUs) emulate per-lane
// integer division at tens of cycles, float products and one correction cost a few. `inv_b`
// is 1/b as f32 (computed on the host). The first estimate is within a few units of a / b (f32
// keeps 24 bits of a); a second float step on the small signed remainder brings it within one,
// and a compare fixes that.
fn div_small(a: u32, b: u32, inv_b: f32) -> u32 {
    var q = u32(f32(a) * inv_b);
    let r = i32(a - q * b);
    q = u32(i32(q) + i32(floor(f32(r) * inv_b)));
    if (q * b > a) {
        q -= 1u;
    } else if ((q + 1u) * b <= a) {
        q += 1u;
    }
    return q;
}
