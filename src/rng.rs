//! CPU twin of `shaders/rng.wgsl`: the counter-based hash every kernel uses.
//!
//! All functions except [`normal_bm`] give the same bits as the shader on every backend (they
//! are integer arithmetic plus at most one exactly rounded float operation). Tests rely on this
//! to compare weights and masks CPU-versus-GPU exactly.

/// Multiplier of the Weyl step (the golden ratio in 32-bit fixed point).
pub const GOLDEN: u32 = 0x9e37_79b9;

/// Standard deviation of the centred Irwin-Hall sum of eight uniform 16-bit integers:
/// `sqrt(8 * (65536^2 - 1) / 12)`.
pub const IRWIN_HALL_STD: f64 = 53_509.566_819_036_45;

/// Stream tags: the first id chained into a key, so that streams never share values.
pub mod stream {
    /// Frozen weights of a layer: key(seed, WEIGHT, layer).
    pub const WEIGHT: u32 = 0x5745_4947;
    /// Training masks: key(seed, MASK, layer) then client and step in the kernel.
    pub const MASK: u32 = 0x4d41_534b;
    /// Generator latents: key(seed, LATENT) then client and step.
    pub const LATENT: u32 = 0x4c41_5445;
    /// Initial scores.
    pub const SCORE_INIT: u32 = 0x5343_4f52;
    /// Mask samples uploaded by clients: key(seed, UPLOAD, round, client).
    pub const UPLOAD: u32 = 0x5550_4c44;
    /// MADA's two comparison samples: key(seed, MADA, round, 0 or 1).
    pub const MADA: u32 = 0x4d41_4441;
    /// Differential-privacy noise: key(seed, DP, round, client).
    pub const DP: u32 = 0x4450_4e53;
    /// Real-data minibatch indices: key(seed, DATA, client) then step.
    pub const DATA: u32 = 0x4441_5441;
    /// Frozen random feature encoder of the loss.
    pub const ENCODER: u32 = 0x454e_4344;
    /// Client selection and data partitions on the host.
    pub const HOST: u32 = 0x484f_5354;
}

/// lowbias32 (Chris Wellons): a bijective 32-bit mixer.
#[inline]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Derives the key of sub-stream `id` of stream `key` (same as `rng_key` in WGSL).
#[inline]
pub fn key(key: u32, id: u32) -> u32 {
    mix32(key ^ mix32(id))
}

/// Chains [`key`] over several ids, starting from the run seed.
pub fn key_path(seed: u32, ids: &[u32]) -> u32 {
    ids.iter().fold(mix32(seed), |k, &id| key(k, id))
}

/// Value number `ctr` of stream `key`.
#[inline]
pub fn u32_at(key: u32, ctr: u32) -> u32 {
    mix32(ctr.wrapping_mul(GOLDEN) ^ key)
}

/// Uniform in [0, 1) with 24 random bits.
#[inline]
pub fn unit(key: u32, ctr: u32) -> f32 {
    (u32_at(key, ctr) >> 8) as f32 * 5.960_464_5e-8
}

/// Sign bit of element `i` (32 elements share one draw).
#[inline]
pub fn sign_bit(key: u32, i: u32) -> u32 {
    (u32_at(key, i >> 5) >> (i & 31)) & 1
}

/// 16-bit uniform of element `i` (two elements share one draw).
#[inline]
pub fn u16_at(key: u32, i: u32) -> u32 {
    (u32_at(key, i >> 1) >> ((i & 1) * 16)) & 0xffff
}

/// Centred Irwin-Hall sum of eight 16-bit uniforms (see `rng_irwin_hall_centered`).
#[inline]
pub fn irwin_hall_centered(key: u32, i: u32) -> i32 {
    let mut sum = 0u32;
    for j in 0..4 {
        let h = u32_at(key, i.wrapping_mul(4).wrapping_add(j));
        sum += (h & 0xffff) + (h >> 16);
    }
    sum as i32 - 262_140
}

/// Box-Muller standard normal, the twin of `rng_normal_bm` (agrees to a few ulp, not exactly).
pub fn normal_bm(key: u32, i: u32) -> f32 {
    let pair = i >> 1;
    let u1 = ((u32_at(key, 2 * pair) >> 8) as f32 + 0.5) * 5.960_464_5e-8;
    let u2 = (u32_at(key, 2 * pair + 1) >> 8) as f32 * 5.960_464_5e-8;
    let r = (-2.0 * u1.ln()).sqrt();
    let theta = std::f32::consts::TAU * u2;
    if i & 1 == 0 {
        r * theta.cos()
    } else {
        r * theta.sin()
    }
}

/// A small deterministic generator for host-side choices (client selection, partitions,
/// initial scores), built on the same hash so that a run is a function of its seed alone. It
/// is a `rand` generator (`rand::Rng` over the counter stream); its integers, floats,
/// normals, gamma draws and shuffles come from `rand` and `rand_distr`, which need no
/// bit-exactness with a shader.
#[derive(Clone, Debug)]
pub struct HostRng {
    key: u32,
    ctr: u32,
}

impl HostRng {
    /// Stream of host-side draws for the given path of ids.
    pub fn new(seed: u32, ids: &[u32]) -> Self {
        let mut path = vec![stream::HOST];
        path.extend_from_slice(ids);
        Self {
            key: key_path(seed, &path),
            ctr: 0,
        }
    }

    /// Next 32 random bits of the counter stream.
    pub fn next_u32(&mut self) -> u32 {
        let v = u32_at(self.key, self.ctr);
        self.ctr = self.ctr.wrapping_add(1);
        v
    }

    /// Uniform integer in `0..n` (n > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        rand::RngExt::random_range(self, 0..n)
    }

    /// Uniform in [0, 1).
    pub fn unit_f64(&mut self) -> f64 {
        rand::RngExt::random(self)
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        rand_distr::Distribution::sample(&rand_distr::StandardNormal, self)
    }

    /// Gamma(shape, 1) (shape > 0; other shapes give NaN).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        match rand_distr::Gamma::new(shape, 1.0) {
            Ok(g) => rand_distr::Distribution::sample(&g, self),
            Err(_) => f64::NAN,
        }
    }

    /// Uniform random permutation.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        rand::seq::SliceRandom::shuffle(items, self)
    }
}

impl rand::TryRng for HostRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(HostRng::next_u32(self))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let lo = HostRng::next_u32(self) as u64;
        Ok(((HostRng::next_u32(self) as u64) << 32) | lo)
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(4) {
            let v = HostRng::next_u32(self).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix32_is_the_published_lowbias32() {
        // Reference values from an independent Python implementation of lowbias32.
        assert_eq!(mix32(0), 0);
        assert_eq!(mix32(1), 0x6889_90c0);
        assert_eq!(mix32(2), 0xd113_2181);
        assert_eq!(mix32(0xdead_beef), 0xe628_c683);
        assert_eq!(mix32(0xffff_ffff), 0x6768_824a);
        assert_eq!(u32_at(0x1234_5678, 3), 0xacb3_7db3);
    }

    #[test]
    fn unit_is_in_range_and_roughly_uniform() {
        let k = key_path(7, &[stream::LATENT]);
        let n = 100_000;
        let mut sum = 0.0f64;
        for i in 0..n {
            let u = unit(k, i);
            assert!((0.0..1.0).contains(&u));
            sum += u as f64;
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.005);
    }

    #[test]
    fn sign_bits_are_balanced() {
        let k = key_path(3, &[stream::WEIGHT, 0]);
        let ones: u32 = (0..64_000).map(|i| sign_bit(k, i)).sum();
        assert!((ones as f64 / 64_000.0 - 0.5).abs() < 0.01, "{ones}");
    }

    #[test]
    fn irwin_hall_has_unit_variance_after_scaling() {
        let k = key_path(11, &[stream::WEIGHT, 2]);
        let n = 50_000;
        let xs: Vec<f64> = (0..n)
            .map(|i| irwin_hall_centered(k, i) as f64 / IRWIN_HALL_STD)
            .collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.03, "{var}");
        assert!(xs.iter().all(|x| x.abs() < 4.9));
    }

    #[test]
    fn box_muller_moments() {
        let k = key_path(5, &[stream::LATENT]);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|i| normal_bm(k, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        assert!(mean.abs() < 0.015 && (var - 1.0).abs() < 0.02 && (kurt - 3.0).abs() < 0.1);
    }

    #[test]
    fn host_rng_below_and_gamma() {
        let mut r = HostRng::new(1, &[2]);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[r.below(10) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        let g: f64 = (0..20_000).map(|_| r.gamma(2.5)).sum::<f64>() / 20_000.0;
        assert!((g - 2.5).abs() < 0.1, "{g}");
        let g: f64 = (0..20_000).map(|_| r.gamma(0.3)).sum::<f64>() / 20_000.0;
        assert!((g - 0.3).abs() < 0.03, "{g}");
    }
}
