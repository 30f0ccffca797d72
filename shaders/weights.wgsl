// Masked weights: the frozen weight of element i regenerated from (seed, layer, i), times a
// mask bit. Included by masked_matmul.wgsl and masked_conv.wgsl; with `standalone` it is also
// the kernel that materialises weights into memory (the dense baseline, export, tests).
//
// Template variable `source` picks where the mask comes from:
//   "dense"  - no mask and no generation: plain f32 weights `w` read from memory.
//   "train"  - a fresh Bernoulli sample every step: 16-bit uniform of the step's mask stream
//              compared with a 16-bit keep threshold (two per word in `keep`, written by the
//              Adam kernel from the scores). The mask is never stored; forward and backward
//              regenerate it from the same counter.
//   "packed" - a fixed bit-packed mask `bits` (32 weights per word), as in a model file.
//   "frozen" - no mask at all (all ones): the frozen random network itself.
//% include "rng.wgsl"

// How a layer's frozen weights are generated. Lives inside each kernel's parameter block.
struct WeightGen {
    key: u32,       // weight stream key of the layer: key(seed, WEIGHT, layer)
    init: u32,      // 0: signed Kaiming constant, 1: Kaiming normal (Irwin-Hall, exact)
    scale: f32,     // 0: sqrt(2 / fan_in); 1: sqrt(2 / fan_in) / 53509.57 (see rng.wgsl)
    mask_key: u32,  // "train": key(seed, MASK, layer); the step's key adds client and step
}

//% if source == "dense"
@group(0) @binding(8) var<storage, read> w: array<f32>;
//% elif source == "train"
@group(0) @binding(8) var<storage, read> keep: array<u32>;
@group(0) @binding(9) var<storage, read> step: StepState;
//% elif source == "packed"
@group(0) @binding(8) var<storage, read> bits: array<u32>;
//% endif

// The mask stream key of the current step (only meaningful for "train").
fn step_mask_key(g: WeightGen) -> u32 {
//% if source == "train"
    return rng_key(rng_key(g.mask_key, step.client), step.step);
//% else
    return 0u;
//% endif
}

fn frozen1(g: WeightGen, i: u32) -> f32 {
    if (g.init == 0u) {
        return select(-g.scale, g.scale, rng_sign_bit(g.key, i) == 1u);
    }
    return f32(rng_irwin_hall_centered(g.key, i)) * g.scale;
}

// The 32 sign bits of elements (i & ~31) .. (i | 31): one draw serves 32 weights.
fn sign_word(g: WeightGen, i: u32) -> u32 {
    return rng_u32(g.key, i >> 5u);
}

// Frozen weights i0 .. i0+3 (i0 % 4 == 0) given the sign word of their block of 32.
fn frozen4(g: WeightGen, i0: u32, word: u32) -> vec4<f32> {
    if (g.init == 0u) {
        let s = word >> (i0 & 31u);
        let b = vec4<u32>(s, s >> 1u, s >> 2u, s >> 3u) & vec4<u32>(1u);
        return select(vec4<f32>(-g.scale), vec4<f32>(g.scale), b == vec4<u32>(1u));
    }
    return vec4<f32>(frozen1(g, i0), frozen1(g, i0 + 1u), frozen1(g, i0 + 2u), frozen1(g, i0 + 3u));
}

//% if source == "train"
fn keep1(i: u32, mkey: u32) -> bool {
    let t = (keep[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
    return rng_u16(mkey, i) < t;
}

// Mask of elements i0 .. i0+3 (i0 % 4 == 0): two draws, two threshold words.
fn mask4(i0: u32, mkey: u32) -> vec4<f32> {
    let pair = i0 >> 1u;
    let t0 = keep[pair];
    let t1 = keep[pair + 1u];
    let h0 = rng_u32(mkey, pair);
    let h1 = rng_u32(mkey, pair + 1u);
    let u = vec4<u32>(h0 & 0xffffu, h0 >> 16u, h1 & 0xffffu, h1 >> 16u);
    let t = vec4<u32>(t0 & 0xffffu, t0 >> 16u, t1 & 0xffffu, t1 >> 16u);
    return select(vec4<f32>(0.0), vec4<f32>(1.0), u < t);
}
//% elif source == "packed"
fn keep1(i: u32, mkey: u32) -> bool {
    return ((bits[i >> 5u] >> (i & 31u)) & 1u) == 1u;
}

fn mask4(i0: u32, mkey: u32) -> vec4<f32> {
    let s = bits[i0 >> 5u] >> (i0 & 31u);
    let b = vec4<u32>(s, s >> 1u, s >> 2u, s >> 3u) & vec4<u32>(1u);
    return select(vec4<f32>(0.0), vec4<f32>(1.0), b == vec4<u32>(1u));
}
//% else
fn keep1(i: u32, mkey: u32) -> bool {
    return true;
}

fn mask4(i0: u32, mkey: u32) -> vec4<f32> {
    return vec4<f32>(1.0);
}
//% endif

// Effective weight w * m of element i.
fn weff1(g: WeightGen, i: u32, mkey: u32) -> f32 {
//% if source == "dense"
    return w[i];
//% else
    return select(0.0, frozen1(g, i), keep1(i, mkey));
//% endif
}

// Effective weights of elements i0 .. i0+3 (i0 % 4 == 0).
fn weff4(g: WeightGen, i0: u32, mkey: u32) -> vec4<f32> {
//% if source == "dense"
    return vec4<f32>(w[i0], w[i0 + 1u], w[i0 + 2u], w[i0 + 3u]);
//% else
    return frozen4(g, i0, sign_word(g, i0)) * mask4(i0, mkey);
//% endif
}

// As weff4, with the sign word already at hand (loops reuse one word for 8 calls).
fn weff4_word(g: WeightGen, i0: u32, mkey: u32, word: u32) -> vec4<f32> {
//% if source == "dense"
    return vec4<f32>(w[i0], w[i0 + 1u], w[i0 + 2u], w[i0 + 3u]);
//% else
    return frozen4(g, i0, word) * mask4(i0, mkey);
//% endif
}

//% if standalone
//% include "common.wgsl"
struct Params {
    g: WeightGen,
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// Writes the effective weights of all n elements (the frozen weights for source "frozen").
@compute @workgroup_size(256)
fn materialize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = linear_workgroup(wid, nwg) * 256u + li;
    if (i >= p.n) {
        return;
    }
    out[i] = weff1(p.g, i, step_mask_key(p.g));
}
//% endif
