//! The IDX format of MNIST and Fashion-MNIST (raw or gzipped): a magic number giving the
//! element type and rank, big-endian dimensions, then the elements.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Largest decompressed IDX file accepted (the biggest real one is 47 MB).
pub const MAX_IDX_BYTES: u64 = 1 << 30;

/// Reads a file, gunzipping it when it starts with the gzip magic; refuses files that
/// decompress beyond [`MAX_IDX_BYTES`].
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let mut dec = flate2::read::GzDecoder::new(&raw[..]).take(MAX_IDX_BYTES + 1);
        dec.read_to_end(&mut out).map_err(|e| {
            Error::format(
                path.display().to_string(),
                format!("not a valid gzip file: {e}"),
            )
        })?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(Error::format(
                path.display().to_string(),
                "decompresses to more than 1 GiB",
            ));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes holding unsigned bytes (type 0x08). `what` names the source in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<IdxArray> {
    let bad = |m: String| Error::format(what, m);
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes is too short for an IDX header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("wrong magic number: not an IDX file".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x} is not unsigned bytes (0x08)",
            bytes[2]
        )));
    }
    let rank = bytes[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(bad(format!("rank {rank} is not 1 to 4")));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let o = 4 + 4 * i;
        dims.push(
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize,
        );
    }
    // The element count comes from the file: check it against the bytes present before
    // allocating anything from it.
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let body = bytes.len() - header;
    if body != count {
        return Err(bad(format!(
            "dimensions {dims:?} need {count} bytes but the file has {body} after the header"
        )));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file (raw or gzipped).
pub fn read(path: &Path) -> Result<IdxArray> {
    parse(&read_maybe_gz(path)?, &path.display().to_string())
}

/// Encodes an IDX array of bytes (used by tests and fixtures).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let data: Vec<u8> = (0..24).collect();
        let enc = encode(&[2, 3, 4], &data);
        assert_eq!(
            parse(&enc, "t").unwrap(),
            IdxArray {
                dims: vec![2, 3, 4],
                data
            }
        );
        assert!(parse(&enc[..enc.len() - 1], "t")
            .unwrap_err()
            .to_string()
            .contains("need 24 bytes"));
        assert!(parse(&[0, 0, 8], "t").is_err());
        assert!(parse(&[1, 0, 8, 1, 0, 0, 0, 0], "t")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(parse(&[0, 0, 0x0d, 1, 0, 0, 0, 0], "t")
            .unwrap_err()
            .to_string()
            .contains("element type"));
        assert!(parse(&[0, 0, 8, 9], "t")
            .unwrap_err()
            .to_string()
            .contains("rank"));
        // An absurd dimension is refused without allocating.
        let huge = encode(&[0xffff_ffff, 0xffff_ffff, 0xffff_ffff], &[]);
        assert!(parse(&huge, "t").is_err());
    }
}
