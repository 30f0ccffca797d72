//! Entropy coding of masks with a range coder (the `constriction` crate).
//!
//! A mask of n bits with k ones is coded with the static model P(1) = k / n quantised to 24
//! bits, so its size is n H(k/n) bits plus the 32-bit count of ones (the log2(n) term of the
//! ideal bound, rounded up to a word) and the coder's final flush. Both sides build the model
//! from the integer count, so it is the same on every machine. Where coding would not make a
//! layer smaller (a fair mask, a tiny layer), callers send the packed bits instead.
//!
//! Coded layout: ones u32 | range-coder words (u32, little endian).

use constriction::stream::model::DefaultContiguousCategoricalEntropyModel;
use constriction::stream::queue::{DefaultRangeDecoder, DefaultRangeEncoder};
use constriction::stream::{Decode, Encode};

use crate::error::{Error, Result};

/// Entropy coding of mask layers, as uploads and model files use it.
pub trait MaskCoder {
    /// Codes the `n` bits of `words`; None when coding would not make them smaller.
    fn encode(&self, words: &[u32], n: usize) -> Option<Vec<u8>>;
    /// Decodes `n` bits; refuses malformed input with an error.
    fn decode(&self, bytes: &[u8], n: usize) -> Result<Vec<u32>>;
}

const PRECISION: u32 = 24;

/// The fixed-point model of a mask with `ones` of `n` bits set (0 < ones < n).
fn model(ones: usize, n: usize) -> Result<DefaultContiguousCategoricalEntropyModel> {
    let total = 1u64 << PRECISION;
    let p1 = ((ones as u64 * total + n as u64 / 2) / n as u64).clamp(1, total - 1) as u32;
    DefaultContiguousCategoricalEntropyModel::from_nonzero_fixed_point_probabilities(
        [total as u32 - p1, p1],
        false,
    )
    .map_err(|_| Error::invalid("entropy model could not be built"))
}

fn bit(words: &[u32], i: usize) -> usize {
    ((words[i >> 5] >> (i & 31)) & 1) as usize
}

/// The ideal size n H(f) + log2(n) of a mask, in bits.
pub fn ideal_bits(words: &[u32], n: usize) -> f64 {
    let ones = (0..n).filter(|&i| bit(words, i) == 1).count();
    let f = ones as f64 / n.max(1) as f64;
    let h = if f <= 0.0 || f >= 1.0 {
        0.0
    } else {
        -(f * f.log2() + (1.0 - f) * (1.0 - f).log2())
    };
    n as f64 * h + (n.max(1) as f64).log2()
}

/// Codes the first `n` bits of `words`.
pub fn encode(words: &[u32], n: usize) -> Result<Vec<u8>> {
    if words.len() < n.div_ceil(32) {
        return Err(Error::invalid("mask shorter than its size"));
    }
    let ones = (0..n).filter(|&i| bit(words, i) == 1).count();
    let mut out = (ones as u32).to_le_bytes().to_vec();
    if ones == 0 || ones == n {
        return Ok(out);
    }
    let m = model(ones, n)?;
    let mut enc = DefaultRangeEncoder::new();
    enc.encode_iid_symbols((0..n).map(|i| bit(words, i)), &m)
        .map_err(|e| Error::invalid(format!("range coder: {e:?}")))?;
    let compressed = enc
        .into_compressed()
        .map_err(|e| Error::invalid(format!("range coder: {e:?}")))?;
    for w in compressed {
        out.extend_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

/// Decodes `n` bits; malformed input (a count beyond n, a payload that does not decode to
/// that count) is an error, never a panic.
pub fn decode(bytes: &[u8], n: usize) -> Result<Vec<u32>> {
    let bad = |m: &str| Error::format("coded mask", m);
    if bytes.len() < 4 || (bytes.len() - 4) % 4 != 0 {
        return Err(bad("length is not a count plus whole words"));
    }
    let ones = crate::bytes::le_u32(bytes) as usize;
    if ones > n {
        return Err(bad("more ones than bits"));
    }
    let mut words = vec![0u32; n.div_ceil(32)];
    if ones == 0 || ones == n {
        if bytes.len() != 4 {
            return Err(bad("payload after a constant mask"));
        }
        if ones == n {
            for i in 0..n {
                words[i >> 5] |= 1 << (i & 31);
            }
        }
        return Ok(words);
    }
    let compressed = crate::bytes::u32s(&bytes[4..]);
    let m = model(ones, n)?;
    let mut dec = DefaultRangeDecoder::from_compressed(compressed)
        .map_err(|_| bad("unreadable range-coder state"))?;
    let mut count = 0usize;
    for (i, s) in dec.decode_iid_symbols(n, &m).enumerate() {
        let s = s.map_err(|_| bad("range decoder failed"))?;
        if s == 1 {
            words[i >> 5] |= 1 << (i & 31);
            count += 1;
        }
    }
    if count != ones {
        return Err(bad(
            "decoded bits do not match their count: the payload is damaged",
        ));
    }
    Ok(words)
}

/// The range coder as a [`MaskCoder`] for uploads and model files.
#[derive(Clone, Copy, Debug, Default)]
pub struct RangeCoder;

impl MaskCoder for RangeCoder {
    fn encode(&self, words: &[u32], n: usize) -> Option<Vec<u8>> {
        encode(words, n).ok()
    }

    fn decode(&self, bytes: &[u8], n: usize) -> Result<Vec<u32>> {
        decode(bytes, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::HostRng;

    fn random_mask(n: usize, f: f64, seed: u32) -> Vec<u32> {
        let mut rng = HostRng::new(seed, &[]);
        crate::kernels::mask::cpu::pack(&(0..n).map(|_| rng.unit_f64() < f).collect::<Vec<_>>())
    }

    #[test]
    fn lossless_and_within_one_percent_of_the_ideal() {
        for (n, f) in [
            (100_000usize, 0.5),
            (120_000, 0.3),
            (250_000, 0.05),
            (1_000_000, 0.01),
            (3_543_616, 0.41),
        ] {
            let m = random_mask(n, f, n as u32);
            let coded = encode(&m, n).unwrap();
            assert_eq!(decode(&coded, n).unwrap(), m, "n={n} f={f}");
            let bits = 8.0 * coded.len() as f64;
            let ideal = ideal_bits(&m, n);
            assert!(
                bits <= 1.01 * ideal,
                "n={n} f={f}: {bits} bits vs ideal {ideal:.0}"
            );
        }
    }

    #[test]
    fn edge_cases_round_trip() {
        for n in [1usize, 31, 32, 33, 1000] {
            for m in [vec![0u32; n.div_ceil(32)], random_mask(n, 0.5, 3)] {
                assert_eq!(decode(&encode(&m, n).unwrap(), n).unwrap(), m);
            }
            let mut all = vec![0u32; n.div_ceil(32)];
            for i in 0..n {
                all[i >> 5] |= 1 << (i & 31);
            }
            assert_eq!(decode(&encode(&all, n).unwrap(), n).unwrap(), all);
        }
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let n = 10_000;
        let m = random_mask(n, 0.2, 9);
        let coded = encode(&m, n).unwrap();
        assert!(decode(&coded[..3], n).is_err());
        assert!(decode(&coded[..coded.len() - 1], n).is_err());
        let mut too_many = coded.clone();
        too_many[..4].copy_from_slice(&(n as u32 + 1).to_le_bytes());
        assert!(decode(&too_many, n).is_err());
        let mut flipped = coded.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x10;
        // A flipped payload bit is caught by the count check or yields other bits (uploads and
        // model files also carry a CRC over everything).
        assert!(decode(&flipped, n).map(|d| d != m).unwrap_or(true));
    }
}
