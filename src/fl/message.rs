//! The upload message a client sends each round: its mask sample (one bit per weight) or, for
//! PRISM-alpha layers, its scores.
//!
//! Layout (little endian):
//! ```text
//! magic "PRSM" | version u16 | kind u16 (1 = upload) | round u32 | client u32 | layers u32
//! per layer: encoding u8 (0 packed bits, 1 f32 scores, 2 entropy-coded bits) | weights u32 |
//!            payload bytes u32 | payload
//! crc32 of everything before it
//! ```
//! Decoding checks every field against what the server expects (layer count and sizes), so a
//! malformed upload is a typed error, never a panic or an unbounded allocation.

use crate::bytes::{split_crc, Reader};
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 4] = b"PRSM";
pub const VERSION: u16 = 1;
const KIND_UPLOAD: u16 = 1;

/// One layer's payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// A mask sample, 32 weights per word (bits past the layer's size are zero).
    Bits(Vec<u32>),
    /// Real scores (PRISM-alpha layers).
    Scores(Vec<f32>),
}

/// A decoded upload.
#[derive(Clone, Debug, PartialEq)]
pub struct Upload {
    pub round: u32,
    pub client: u32,
    pub layers: Vec<Payload>,
}

/// How a layer is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Packed = 0,
    Scores = 1,
    /// Arithmetic-coded bits (issue 4's codec); falls back to packed when coding would
    /// not pay.
    Coded = 2,
}

/// Entropy coding of mask layers (defined by the codec layer below this one).
pub use crate::codec::MaskCoder;

/// Encodes an upload. `coder` (when given) entropy-codes mask layers that it makes smaller.
pub fn encode(up: &Upload, sizes: &[usize], coder: Option<&dyn MaskCoder>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&KIND_UPLOAD.to_le_bytes());
    out.extend_from_slice(&up.round.to_le_bytes());
    out.extend_from_slice(&up.client.to_le_bytes());
    out.extend_from_slice(&(up.layers.len() as u32).to_le_bytes());
    for (layer, &n) in up.layers.iter().zip(sizes) {
        match layer {
            Payload::Bits(words) => {
                let coded = coder.and_then(|c| c.encode(words, n));
                let packed_len = n.div_ceil(8);
                match coded {
                    Some(bytes) if bytes.len() < packed_len => {
                        out.push(Encoding::Coded as u8);
                        out.extend_from_slice(&(n as u32).to_le_bytes());
                        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                        out.extend_from_slice(&bytes);
                    }
                    _ => {
                        out.push(Encoding::Packed as u8);
                        out.extend_from_slice(&(n as u32).to_le_bytes());
                        out.extend_from_slice(&(packed_len as u32).to_le_bytes());
                        let bytes: &[u8] = bytemuck::cast_slice(words);
                        out.extend_from_slice(&bytes[..packed_len]);
                    }
                }
            }
            Payload::Scores(s) => {
                out.push(Encoding::Scores as u8);
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&((4 * s.len()) as u32).to_le_bytes());
                for v in s {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and validates an upload for a model whose masked layers have `sizes` weights.
/// `coder` decodes entropy-coded layers.
pub fn decode(bytes: &[u8], sizes: &[usize], coder: Option<&dyn MaskCoder>) -> Result<Upload> {
    let bad = |m: String| Error::format("upload", m);
    if bytes.len() < 4 + 2 + 2 + 12 + 4 {
        return Err(bad(format!(
            "{} bytes is shorter than a header",
            bytes.len()
        )));
    }
    if &bytes[..4] != MAGIC {
        return Err(bad("wrong magic: not a prism upload".into()));
    }
    let body = split_crc(bytes, "upload")?;
    let mut r = Reader::new(body, "upload");
    r.take(4)?;
    let version = r.u16()?;
    if version != VERSION {
        return Err(bad(format!("version {version} is not {VERSION}")));
    }
    let kind = r.u16()?;
    if kind != KIND_UPLOAD {
        return Err(bad(format!("kind {kind} is not an upload")));
    }
    let round = r.u32()?;
    let client = r.u32()?;
    let layers = r.u32()? as usize;
    if layers != sizes.len() {
        return Err(bad(format!(
            "{layers} layers but the model has {}",
            sizes.len()
        )));
    }
    let mut out = Vec::with_capacity(layers);
    for (i, &n) in sizes.iter().enumerate() {
        let enc = r.u8()?;
        let weights = r.u32()? as usize;
        if weights != n {
            return Err(bad(format!(
                "layer {i}: {weights} weights but the model has {n}"
            )));
        }
        let len = r.u32()? as usize;
        // Lengths are checked against the model before anything is allocated from them.
        let payload = match enc {
            0 => {
                if len != n.div_ceil(8) {
                    return Err(bad(format!(
                        "layer {i}: {len} bytes of bits for {n} weights"
                    )));
                }
                let raw = r.take(len)?;
                let mut words = vec![0u32; n.div_ceil(32)];
                bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len].copy_from_slice(raw);
                if n % 32 != 0 && words[n / 32] >> (n % 32) != 0 {
                    return Err(bad(format!("layer {i}: bits set past the last weight")));
                }
                Payload::Bits(words)
            }
            1 => {
                if len != 4 * n {
                    return Err(bad(format!(
                        "layer {i}: {len} bytes of scores for {n} weights"
                    )));
                }
                Payload::Scores(r.finite_f32s(n, &format!("layer {i}: scores"))?)
            }
            2 => {
                if len > n.div_ceil(8) + 64 {
                    return Err(bad(format!(
                        "layer {i}: {len} coded bytes for {n} weights is more than raw bits"
                    )));
                }
                let raw = r.take(len)?;
                let dec =
                    coder.ok_or_else(|| bad(format!("layer {i}: entropy-coded but no decoder")))?;
                let words = dec
                    .decode(raw, n)
                    .map_err(|e| bad(format!("layer {i}: {e}")))?;
                if words.len() != n.div_ceil(32) {
                    return Err(bad(format!("layer {i}: decoder returned the wrong size")));
                }
                Payload::Bits(words)
            }
            e => return Err(bad(format!("layer {i}: unknown encoding {e}"))),
        };
        out.push(payload);
    }
    r.finish()?;
    Ok(Upload {
        round,
        client,
        layers: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Upload, Vec<usize>) {
        let sizes = vec![40, 64, 3];
        let up = Upload {
            round: 7,
            client: 2,
            layers: vec![
                Payload::Bits(vec![0xdead_beef, 0xab]),
                Payload::Bits(vec![1, 2]),
                Payload::Scores(vec![0.5, -1.0, 2.0]),
            ],
        };
        (up, sizes)
    }

    #[test]
    fn round_trip_and_size() {
        let (up, sizes) = sample();
        let bytes = encode(&up, &sizes, None);
        assert_eq!(decode(&bytes, &sizes, None).unwrap(), up);
        // 40 + 64 bits as 5 + 8 bytes, 12 bytes of scores, 20-byte header, 9 bytes per layer, crc.
        assert_eq!(bytes.len(), 20 + 3 * 9 + 5 + 8 + 12 + 4);
    }

    #[test]
    fn damage_is_detected() {
        let (up, sizes) = sample();
        let bytes = encode(&up, &sizes, None);
        for cut in [0, 3, 10, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], &sizes, None).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[25] ^= 1;
        assert!(decode(&flipped, &sizes, None)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        assert!(decode(&bytes, &[40, 64], None).is_err(), "layer count");
        assert!(decode(&bytes, &[41, 64, 3], None).is_err(), "layer size");
    }
}
