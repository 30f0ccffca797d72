//! Little-endian reading of untrusted bytes (uploads, model files, checkpoints, coded masks).
//!
//! Every read checks the bytes that remain before it slices, and lengths multiply with
//! overflow checks, so a hostile length is a typed error: never a panic, and never an
//! allocation larger than the input that claims it.

use crate::error::{Error, Result};

/// A cursor over untrusted bytes; `what` names the input in errors.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], what: &'a str) -> Self {
        Self { bytes, at: 0, what }
    }

    /// Byte offset of the next read.
    pub fn position(&self) -> usize {
        self.at
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// The next `n` bytes, or an error naming where the input ends.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::format(
                self.what,
                format!(
                    "truncated at byte {} (needs {n} more, has {})",
                    self.at,
                    self.remaining()
                ),
            ));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(le_u32(self.take(4)?))
    }

    /// `n` f32 values, all finite (NaN and infinity are refused).
    pub fn finite_f32s(&mut self, n: usize, name: &str) -> Result<Vec<f32>> {
        let len = n.checked_mul(4).ok_or_else(|| {
            Error::format(self.what, format!("{name}: {n} values overflow a length"))
        })?;
        let v = f32s(self.take(len)?);
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::format(
                self.what,
                format!("{name} contain NaN or infinity"),
            ));
        }
        Ok(v)
    }

    /// Refuses bytes left after the last field.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(Error::format(
                self.what,
                format!("{} unexpected bytes after the last field", self.remaining()),
            ));
        }
        Ok(())
    }
}

/// The u32 in the first four bytes of `b` (callers pass slices of at least four bytes; shorter
/// ones read as zero-padded rather than panic).
pub fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    for (d, s) in a.iter_mut().zip(b) {
        *d = *s;
    }
    u32::from_le_bytes(a)
}

/// Little-endian f32 values of `b` (a trailing partial value is ignored).
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian u32 values of `b` (a trailing partial value is ignored).
pub fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads a file of a binary format whole, after refusing it by its size (more than `max`
/// bytes, the most its format can hold, or more than this process may still allocate) and by
/// its first bytes (`magic`), so that a huge or foreign file is never read into memory.
/// `kind` names the format in errors ("prism model file").
pub fn read_file(path: &std::path::Path, magic: &[u8], max: u64, kind: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    crate::limits::check_file_size(path, max, kind)?;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = Vec::with_capacity(magic.len());
    f.by_ref()
        .take(magic.len() as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    let what = path.display().to_string();
    if head.len() < magic.len() {
        return Err(Error::format(&what, format!("too short to be a {kind}")));
    }
    if head != magic {
        return Err(Error::format(&what, format!("not a {kind} (wrong magic)")));
    }
    crate::limits::check_host(len, &format!("reading {what}"), &|_| {
        "free memory or move the file".into()
    })?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len as usize)
        .map_err(|_| Error::invalid(format!("{what}: no memory for {len} bytes")))?;
    bytes.extend_from_slice(&head);
    f.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Splits off a trailing CRC-32 and checks it against the rest.
pub fn split_crc<'a>(bytes: &'a [u8], what: &str) -> Result<&'a [u8]> {
    if bytes.len() < 4 {
        return Err(Error::format(what, "too short to hold a checksum"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != le_u32(crc) {
        return Err(Error::format(
            what,
            "checksum mismatch: the data is damaged or truncated",
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_refuse_to_run_past_the_end() {
        let b = [1u8, 0, 2, 0, 0, 0, 7];
        let mut r = Reader::new(&b, "t");
        assert_eq!(r.u16().unwrap(), 1);
        assert_eq!(r.u32().unwrap(), 2);
        assert!(r.u16().is_err());
        assert_eq!(r.u8().unwrap(), 7);
        assert!(r.finish().is_ok());
        assert!(Reader::new(&b, "t").finite_f32s(usize::MAX, "x").is_err());
        let nan = f32::NAN.to_le_bytes();
        assert!(Reader::new(&nan, "t").finite_f32s(1, "x").is_err());
    }

    #[test]
    fn checksums_are_checked() {
        let mut v = b"hello".to_vec();
        v.extend_from_slice(&crc32fast::hash(b"hello").to_le_bytes());
        assert_eq!(split_crc(&v, "t").unwrap(), b"hello");
        v[0] ^= 1;
        assert!(split_crc(&v, "t").is_err());
        assert!(split_crc(&v[..3], "t").is_err());
    }
}
