// Counter-based random numbers, included by every kernel that needs randomness.
//
// Everything here except `rng_normal_bm` is integer arithmetic followed by at most one
// exactly-rounded float operation, so the CPU twin in src/rng.rs produces the same bits on
// every backend. That is what lets tests compare weights and masks CPU-versus-GPU exactly,
// and what lets the frozen weights be a pure function of (seed, layer, index).
//
// Construction: a stream key is built by chaining `mix32` over (seed, stream tag, ids...);
// value number `ctr` of a stream is `mix32((ctr * golden) ^ key)`, a SplitMix-style Weyl
// step followed by Wellons' lowbias32 finaliser.

const RNG_GOLDEN: u32 = 0x9e3779b9u;

// lowbias32 (Chris Wellons): a bijective 32-bit mixer with very low avalanche bias.
fn mix32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// Derives a sub-key: the key of stream `key` for the extra id `id`.
fn rng_key(key: u32, id: u32) -> u32 {
    return mix32(key ^ mix32(id));
}

// Value number `ctr` of the stream `key`.
fn rng_u32(key: u32, ctr: u32) -> u32 {
    return mix32((ctr * RNG_GOLDEN) ^ key);
}

// Uniform in [0, 1) with 24 random bits; exact (the product by 2^-24 is exact).
fn rng_unit(key: u32, ctr: u32) -> f32 {
    return f32(rng_u32(key, ctr) >> 8u) * 5.9604644775390625e-8;
}

// Sign bit of element `i`: 32 elements share one draw, one bit each.
fn rng_sign_bit(key: u32, i: u32) -> u32 {
    return (rng_u32(key, i >> 5u) >> (i & 31u)) & 1u;
}

// 16-bit uniform of element `i`: two elements share one draw. Bernoulli masks compare it
// with a 16-bit keep threshold (see mask.wgsl).
fn rng_u16(key: u32, i: u32) -> u32 {
    return (rng_u32(key, i >> 1u) >> ((i & 1u) * 16u)) & 0xffffu;
}

// Bit-exact approximate normal: Irwin-Hall sum of eight 16-bit uniforms, centred, as an
// integer in [-262140, 262140]. Multiply by `scale / 53509.5...` on the host side so that the
// only float rounding is one product. Tails end at 4.9 sigma; excess kurtosis is -0.15.
fn rng_irwin_hall_centered(key: u32, i: u32) -> i32 {
    var sum = 0u;
    for (var j = 0u; j < 4u; j++) {
        let h = rng_u32(key, i * 4u + j);
        sum += (h & 0xffffu) + (h >> 16u);
    }
    return i32(sum) - 262140;
}

// True standard normal by Box-Muller (used for latents and for differential-privacy noise,
// where the distribution must be exactly Gaussian). log/cos/sin are not exactly rounded on
// GPUs, so this agrees with the CPU twin to a few ulp, not bit for bit.
fn rng_normal_bm(key: u32, i: u32) -> f32 {
    let pair = i >> 1u;
    let u1 = (f32(rng_u32(key, 2u * pair) >> 8u) + 0.5) * 5.9604644775390625e-8;
    let u2 = f32(rng_u32(key, 2u * pair + 1u) >> 8u) * 5.9604644775390625e-8;
    let r = sqrt(-2.0 * log(u1));
    let theta = 6.283185307179586 * u2;
    if ((i & 1u) == 0u) {
        return r * cos(theta);
    }
    return r * sin(theta);
}
