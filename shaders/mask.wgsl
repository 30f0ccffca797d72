// Masks: keep thresholds from scores, Bernoulli samples packed 32 to a word, unpacking,
// Hamming distance, and the server's aggregation of client masks.
//
// A keep threshold is p = sigmoid(s) quantised to 16 bits: t = min(round(p * 65536), 65535).
// Element i is kept when its 16-bit uniform is below t, so P(keep) = t / 65536. Two thresholds
// share a word (`keep`), which halves what the training kernels read per weight. Sampling from
// thresholds is integer-exact, so the CPU twin (src/kernels/mask.rs) gives the same bits.
//% include "common.wgsl"
//% include "rng.wgsl"

struct Params {
    n: u32,          // number of weights
    key: u32,        // random stream of the sample
    clients: u32,    // aggregate: number of masks
    mode: u32,       // aggregate: 0 mean of smoothed masks, 1 persistent Beta prior
    lo: f32,         // aggregate: smoothed value of a 0 bit (0.01)
    hi: f32,         // aggregate: smoothed value of a 1 bit (0.99)
    total: u32,      // blend: weights in all layers (lambda's denominator)
    sigma: f32,      // dp_thresholds: noise standard deviation
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> keep: array<u32>;
@group(0) @binding(3) var<storage, read> keep_in: array<u32>;
@group(0) @binding(4) var<storage, read_write> bits: array<u32>;
@group(0) @binding(5) var<storage, read> bits_a: array<u32>;
@group(0) @binding(6) var<storage, read> bits_b: array<u32>;
@group(0) @binding(7) var<storage, read_write> count: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read_write> values: array<f32>;
@group(0) @binding(9) var<storage, read_write> scores_out: array<f32>;
@group(0) @binding(10) var<storage, read_write> prior: array<vec2<f32>>;
@group(0) @binding(11) var<storage, read> step: StepState;

// The 16-bit threshold of keep probability q.
fn quantise(q: f32) -> u32 {
    return min(u32(round(q * 65536.0)), 65535u);
}

// An entry point that writes keep[j], the thresholds of elements 2j and 2j+1, each from
// `threshold_of(i)`.
//% macro thresholds_entry(name, threshold_of)
@compute @workgroup_size(256)
fn {{ name }}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let j = linear_workgroup(wid, nwg) * 256u + li;
    let i = 2u * j;
    if (i >= p.n) {
        return;
    }
    var word = 0u;
    for (var h = 0u; h < 2u; h++) {
        if (i + h < p.n) {
            word |= {{ threshold_of }}(i + h) << (16u * h);
        }
    }
    keep[j] = word;
}
//% endmacro

fn score_threshold(i: u32) -> u32 {
    return quantise(sigmoid(scores[i]));
}

// keep <- the thresholds of the scores.
{{ thresholds_entry("thresholds", "score_threshold") }}

// Differential privacy (PRISM.md section 5, the sound mechanism): theta = sigmoid(s) clipped to
// [lo, 1 - lo], plus N(0, sigma^2) noise, clamped to [0, 1]; keep <- its thresholds. The
// noise must be truly Gaussian for the accountant's guarantee, hence Box-Muller.
fn noisy_threshold(i: u32) -> u32 {
    let theta = clamp(sigmoid(scores[i]), p.lo, 1.0 - p.lo);
    let noisy = clamp(theta + p.sigma * rng_normal_bm(p.key, i), 0.0, 1.0);
    return quantise(noisy);
}

{{ thresholds_entry("dp_thresholds", "noisy_threshold") }}

// An entry point that writes bits[w], bit b being set where `bit_of(32w + b)` holds.
//% macro pack_entry(name, bit_of)
@compute @workgroup_size(256)
fn {{ name }}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let w = linear_workgroup(wid, nwg) * 256u + li;
    let i0 = 32u * w;
    if (i0 >= p.n) {
        return;
    }
    var word = 0u;
    for (var b = 0u; b < 32u; b++) {
        if (i0 + b < p.n && {{ bit_of }}(i0 + b)) {
            word |= 1u << b;
        }
    }
    bits[w] = word;
}
//% endmacro

// Element i of the sample: kept when its 16-bit uniform is below its threshold.
fn sampled_bit(i: u32) -> bool {
    let t = (keep_in[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
    return rng_u16(p.key, i) < t;
}

// bits[w] <- one Bernoulli sample of elements 32w .. 32w+31 from the thresholds `keep_in`.
{{ pack_entry("sample_packed", "sampled_bit") }}

// bits[w] <- a training step's mask of elements 32w .. 32w+31: the sample the "train" weight
// source draws (weights.wgsl, stream key(key(mask_key, client), step) with `p.key` the layer's
// mask key), taken once per layer and step so that the step's forward and input-gradient
// matmuls read one bit a weight instead of hashing in every tile. One hash gives the uniforms
// of two elements, whose thresholds share a word.
@compute @workgroup_size(256)
fn sample_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let w = linear_workgroup(wid, nwg) * 256u + li;
    let i0 = 32u * w;
    if (i0 >= p.n) {
        return;
    }
    let key = rng_key(rng_key(p.key, step.client), step.step);
    var word = 0u;
    for (var b = 0u; b < 32u; b += 2u) {
        let i = i0 + b;
        if (i < p.n) {
            let h = rng_u32(key, i >> 1u);
            let t = keep_in[i >> 1u];
            if ((h & 0xffffu) < (t & 0xffffu)) {
                word |= 1u << b;
            }
            if (i + 1u < p.n && (h >> 16u) < (t >> 16u)) {
                word |= 2u << b;
            }
        }
    }
    bits[w] = word;
}

// values[i] <- bit i of bits_a, as 0.0 or 1.0.
@compute @workgroup_size(256)
fn unpack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = linear_workgroup(wid, nwg) * 256u + li;
    if (i >= p.n) {
        return;
    }
    values[i] = f32((bits_a[i >> 5u] >> (i & 31u)) & 1u);
}

fn positive_score(i: u32) -> bool {
    return scores[i] > 0.0;
}

// bits[w] <- (scores[i] > 0) for i in the word: the thresholded (most likely) mask, p > 0.5.
{{ pack_entry("pack_positive", "positive_score") }}

var<workgroup> partial: atomic<u32>;

// count[0] += number of positions where bits_a and bits_b differ (words 0 .. ceil(n/32)).
// Bits past n must be zero in both (all packers here leave them zero).
@compute @workgroup_size(256)
fn hamming(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    if (li == 0u) {
        atomicStore(&partial, 0u);
    }
    workgroupBarrier();
    let w = linear_workgroup(wid, nwg) * 256u + li;
    let words = (p.n + 31u) / 32u;
    if (w < words) {
        atomicAdd(&partial, countOneBits(bits_a[w] ^ bits_b[w]));
    }
    workgroupBarrier();
    if (li == 0u) {
        atomicAdd(&count[0], atomicLoad(&partial));
    }
}

// Server aggregation of `clients` packed masks (bits_a holds them one after another, each
// ceil(n/32) words). Mode 0: theta = mean of smoothed bits (FedPM with a Beta(1,1) prior reset
// every round). Mode 1: persistent Beta prior, `prior` = (alpha, beta) per weight, updated in
// place, theta = alpha / (alpha + beta) clamped to [lo, hi]. values <- s_hat = logit(theta).
@compute @workgroup_size(256)
fn aggregate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let i = linear_workgroup(wid, nwg) * 256u + li;
    if (i >= p.n) {
        return;
    }
    let words = (p.n + 31u) / 32u;
    var ones = 0u;
    for (var c = 0u; c < p.clients; c++) {
        ones += (bits_a[c * words + (i >> 5u)] >> (i & 31u)) & 1u;
    }
    let k = f32(p.clients);
    var theta: f32;
    if (p.mode == 0u) {
        theta = (p.hi * f32(ones) + p.lo * f32(p.clients - ones)) / k;
    } else {
        let ab = prior[i] + vec2<f32>(f32(ones), f32(p.clients - ones));
        prior[i] = ab;
        theta = clamp(ab.x / (ab.x + ab.y), p.lo, p.hi);
    }
    values[i] = log(theta / (1.0 - theta));
}

// MADA: scores_out[i] <- lambda * s_hat[i] + (1 - lambda) * scores[i], with lambda the
// fraction of differing positions measured by `hamming` over all layers (count[0] / total).
@compute @workgroup_size(256)
fn blend(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let i = linear_workgroup(wid, nwg) * 256u + li;
    if (i >= p.n) {
        return;
    }
    let lambda = f32(atomicLoad(&count[0])) / f32(p.total);
    scores_out[i] = lambda * values[i] + (1.0 - lambda) * scores[i];
}
