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
    step: u32,
    round: u32,
    seed: u32,
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}
