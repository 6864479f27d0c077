//! What the control plane's fuzz targets share: fixed keys, a receiving gossip node and the
//! byte format that drives it, an initialized cluster state, and a reader over the fuzzer's
//! bytes. The seed generator (`examples/seeds.rs`) writes its corpora with the same encoders,
//! so a seed means to a target what it meant when it was written.
//!
//! Not part of the workspace: built by `cargo fuzz`, or `cargo run --example seeds`.

pub mod cluster;
pub mod gossip;

/// Reads the fuzzer's bytes front to back; past the end every read gives zeros or nothing.
#[derive(Debug)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    /// Over `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { rest: data }
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((b, rest)) => {
                self.rest = rest;
                *b
            }
            None => 0,
        }
    }

    /// A big-endian u16 (missing bytes read as 0).
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// A big-endian u64 (missing bytes read as 0).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_be_bytes(b)
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        head
    }

    /// A u16 length, then that many bytes (fewer if the input ends first).
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

/// Writes what [`Input::chunk`] reads.
pub fn put_chunk(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = u16::try_from(bytes.len()).expect("a chunk holds at most 65535 bytes");
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Splits `data` at the first `n - 1` zero bytes into `n` parts (text inputs made of several
/// files: the files of a test identity, say); missing parts are empty.
pub fn split_parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = data.splitn(n, |b| *b == 0).collect();
    parts.resize(n, &[]);
    parts
}
