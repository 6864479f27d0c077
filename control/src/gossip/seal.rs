//! The envelope of every gossip datagram: ChaCha20-Poly1305 under the cluster's gossip key,
//! which a host receives when it joins. A datagram that does not open under the key — a
//! host outside the cluster, a stale key, line noise — is refused before any of its bytes
//! are parsed.
//!
//! ```text
//! +-------+---------+-----------+-------------------------------+----------+
//! | "og"  | version | nonce(12) | sealed: kind(1) | payload ... | tag (16) |
//! +-------+---------+-----------+-------------------------------+----------+
//! ```
//!
//! The nonce is random per datagram (96 bits: no repeat to fear at gossip rates); magic and
//! version are authenticated as associated data.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a gossip key.
pub const KEY_LEN: usize = 32;
const MAGIC: [u8; 2] = *b"og";
const VERSION: u8 = 1;
const HEADER_LEN: usize = MAGIC.len() + 1 + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Bytes the envelope adds to a payload.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

/// What a sealed datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A SWIM message (foca): probes, acks, membership updates, piggybacked endpoint deltas.
    Swim = 1,
    /// An anti-entropy message (see [`super::sync`]).
    Sync = 2,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short, wrong magic or version: not an overlayd gossip datagram.
    #[error("not an overlayd gossip datagram")]
    NotGossip,
    /// Right shape, but it does not open under our key (another cluster, a forgery).
    #[error("does not authenticate under the cluster's gossip key")]
    BadAuth,
    /// Authenticated, but of a kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
}

/// The cluster's gossip key.
pub struct GossipKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GossipKey(..)")
    }
}

impl GossipKey {
    /// The key from its bytes.
    pub fn new(bytes: &[u8; KEY_LEN]) -> GossipKey {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key is valid for ChaCha20-Poly1305");
        GossipKey { key: LessSafeKey::new(unbound), rng: SystemRandom::new() }
    }

    /// Fresh random key bytes (for a new cluster).
    pub fn generate() -> [u8; KEY_LEN] {
        let mut k = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut k).expect("the system random source works");
        k
    }

    /// Seals `payload` of `kind` into `out` (cleared first).
    pub fn seal(&self, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(OVERHEAD + payload.len());
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("the system random source works");
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.push(kind as u8);
        out.extend_from_slice(payload);
        let (head, body) = out.split_at_mut(HEADER_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&head[..3]), body)
            .expect("a gossip datagram is far below ChaCha20-Poly1305's length limit");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a datagram in place; returns its kind and payload.
    pub fn open<'d>(&self, datagram: &'d mut [u8]) -> Result<(Kind, &'d [u8]), SealError> {
        if datagram.len() < OVERHEAD || datagram[..2] != MAGIC || datagram[2] != VERSION {
            return Err(SealError::NotGossip);
        }
        let (head, body) = datagram.split_at_mut(HEADER_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&head[3..]).map_err(|_| SealError::NotGossip)?;
        let plain = self.key.open_in_place(nonce, Aad::from(&head[..3]), body).map_err(|_| SealError::BadAuth)?;
        let kind = match plain[0] {
            1 => Kind::Swim,
            2 => Kind::Sync,
            k => return Err(SealError::UnknownKind(k)),
        };
        Ok((kind, &plain[1..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_datagram_opens_under_the_same_key_only() {
        let key = GossipKey::new(&[7; KEY_LEN]);
        let mut d = Vec::new();
        key.seal(Kind::Sync, b"hello", &mut d);
        assert_eq!(d.len(), OVERHEAD + 5);
        let mut copy = d.clone();
        assert_eq!(key.open(&mut copy), Ok((Kind::Sync, &b"hello"[..])));
        let other = GossipKey::new(&[8; KEY_LEN]);
        assert_eq!(other.open(&mut d.clone()), Err(SealError::BadAuth));
        for i in 0..d.len() {
            let mut flipped = d.clone();
            flipped[i] ^= 0x20;
            assert!(key.open(&mut flipped).is_err(), "a flipped bit at {i} must not open");
        }
        assert_eq!(key.open(&mut [0u8; 10]), Err(SealError::NotGossip));
        assert_eq!(key.open(&mut [0u8; 100]), Err(SealError::NotGossip));
    }
}
