//! Bounded little-endian encoding of message bodies. Every read checks the
//! bytes left and every length against a limit before anything is
//! allocated: a hostile peer gets an error, never a panic or a huge
//! allocation.

use crate::error::{Error, Result};

/// Longest string in a message (model names, error messages).
pub const MAX_STR: usize = 16 << 10;
/// Most elements of any list in a message.
pub const MAX_LIST: usize = 4096;

pub(crate) fn malformed(what: impl Into<String>) -> Error {
    Error::Protocol(format!("malformed message: {}", what.into()))
}

/// Appends values to a body.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub fn len(&mut self, n: usize) -> &mut Self {
        self.u32(n as u32)
    }
}

/// Reads values from a body, each checked.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(malformed(format!("{what}: {n} bytes needed, {} left", self.buf.len() - self.pos)));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u32(&mut self, what: &str) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    pub fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(self.u32(what)? as i32)
    }
    pub fn u64(&mut self, what: &str) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn f64(&mut self, what: &str) -> Result<f64> {
        Ok(f64::from_bits(self.u64(what)?))
    }
    pub fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(malformed(format!("{what}: {v} is not a boolean"))),
        }
    }
    /// A byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize, what: &str) -> Result<&'a [u8]> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(malformed(format!("{what}: {n} bytes, at most {max}")));
        }
        self.take(n, what)
    }
    pub fn str(&mut self, what: &str) -> Result<String> {
        let b = self.bytes(MAX_STR, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }
    /// A list length, bounded by `MAX_LIST` and by the bytes left (each
    /// element takes at least `min_elem` bytes).
    pub fn len(&mut self, min_elem: usize, what: &str) -> Result<usize> {
        let n = self.u32(what)? as usize;
        let left = self.buf.len() - self.pos;
        if n > MAX_LIST || n.saturating_mul(min_elem.max(1)) > left {
            return Err(malformed(format!("{what}: {n} elements do not fit")));
        }
        Ok(n)
    }
    /// Fails unless every byte was read.
    pub fn finish(&self, what: &str) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(malformed(format!("{what}: {} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}
