//! The envelope of every gossip datagram: ChaCha20-Poly1305 under a key derived from the
//! cluster's gossip key (which a host receives when it joins), with the sender, its life and
//! its datagram's number authenticated so that a receiver takes each datagram once (see
//! [`super::replay`]). A datagram that does not open — a host outside the cluster, a stale
//! key, line noise — is refused before any of its bytes are parsed.
//!
//! ```text
//!  0      2         3            11               19            27             35
//! +------+---------+------------+----------------+-------------+--------------+--------------------------------+----------+
//! | "og" | version | sender (8) | generation (8) | counter (8) | receiver (8) | sealed: kind(1) | payload ...  | tag (16) |
//! +------+---------+------------+----------------+-------------+--------------+--------------------------------+----------+
//! ```
//!
//! Version 4; integers big-endian; the 35-byte header is the associated data. The kind says
//! what the payload is ([`Kind`]); a kind a release does not know is refused after opening
//! (`UnknownKind`, counted as `rx_malformed`), so a kind can be added within a version, as
//! [`Kind::Ring`] was, when its sender copes with receivers that never answer it.
//!
//! - **sender**: the sending host's node id.
//! - **generation**: the sender's epoch, which grows with every start of its agent and never
//!   goes back, even when the clock does (the agent keeps the last one in its state dir). A
//!   host that stays up keeps its generation when SWIM renews its identity.
//! - **counter**: the sender's datagrams numbered from 0 in this generation, whoever they go
//!   to; it never repeats.
//! - **receiver**: the node id of the host it is for; any other refuses it, so a datagram
//!   captured on its way to one host cannot be replayed to another.
//!
//! Each (sender, generation) seals under its own key, HKDF-SHA256 of the cluster key with
//! the sender and generation as info, and the nonce is the counter (four zero bytes, then the
//! counter): under one key a nonce never repeats, with no randomness to trust and no birthday
//! bound, as long as a node id never runs twice in one generation.
//!
//! Version 1 (a random nonce, nothing identifying the sender) could be replayed at will;
//! version 2 had this envelope, with endpoint records that carried no aliases (see
//! [`super::record::Endpoint::aliases`]); version 3 had records with no service and health
//! ([`super::record::Endpoint::service`]). A datagram of another version is refused before it
//! is opened (`OtherVersion`, counted as `rx_other_version`): hosts that run overlayd releases
//! of different gossip versions do not hear each other, and say so in `overlayd peers`.
//!
//! The cluster key is rotated when a node is removed (it holds the old one). A host that
//! learns the new key opens with both for a while, then seals with the new one
//! ([`Sealer::rekey`]: the counter goes on, so the receivers' windows do too), then forgets
//! the old (see [`super::node::GossipNode::rotate_key`]). Nothing in the header names the
//! key: a receiver tries each it holds.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::state::NodeId;

/// Length of a gossip key.
pub const KEY_LEN: usize = 32;
const MAGIC: [u8; 2] = *b"og";
const VERSION: u8 = 4;
const TAG_LEN: usize = 16;
/// HKDF salt of the per-sender keys (fixed: the cluster key is already random).
const SALT: &[u8] = b"overlayd gossip";
/// HKDF info prefix of the per-sender keys (the sender and generation follow).
const SENDER_INFO: &[u8] = b"overlayd gossip v2 sender";

/// Where the header's fields are.
mod field {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const SENDER: Range<usize> = 3..11;
    pub const GENERATION: Range<usize> = 11..19;
    pub const COUNTER: Range<usize> = 19..27;
    pub const RECEIVER: Range<usize> = 27..35;
}

const HEADER_LEN: usize = field::RECEIVER.end;
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
    /// A ring-watch ping or ack (see [`super::ring`]). Added within version 4: a host of an
    /// earlier release refuses it as a kind it does not know (and never answers it), which
    /// the ring watch allows for.
    Ring = 3,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short or wrong magic: not an overlayd gossip datagram.
    #[error("not an overlayd gossip datagram")]
    NotGossip,
    /// An overlayd gossip datagram of another format version (a host that runs another
    /// overlayd release): the version it says.
    #[error("a gossip datagram of format version {0}, not {VERSION}: the sender runs another overlayd release")]
    OtherVersion(u8),
    /// Right shape, but it does not open under our key (another cluster, a forgery).
    #[error("does not authenticate under the cluster's gossip key")]
    BadAuth,
    /// Authenticated, but of a kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
}

/// Who sealed a datagram, in which life, its number, and whom it is for (authenticated once
/// the datagram opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sending host.
    pub sender: NodeId,
    /// The sender's generation (its epoch: grows with every start).
    pub generation: u64,
    /// The datagram's number among all the sender sealed in this generation.
    pub counter: u64,
    /// The host it is for.
    pub receiver: NodeId,
}

impl Header {
    /// Reads the header of a datagram, not yet authenticated.
    pub fn parse(datagram: &[u8]) -> Result<Header, SealError> {
        if datagram.len() < OVERHEAD || datagram[field::MAGIC] != MAGIC {
            return Err(SealError::NotGossip);
        }
        if datagram[field::VERSION] != VERSION {
            return Err(SealError::OtherVersion(datagram[field::VERSION]));
        }
        let u64_at = |r: std::ops::Range<usize>| u64::from_be_bytes(datagram[r].try_into().expect("8 bytes"));
        Ok(Header {
            sender: u64_at(field::SENDER),
            generation: u64_at(field::GENERATION),
            counter: u64_at(field::COUNTER),
            receiver: u64_at(field::RECEIVER),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&self.receiver.to_be_bytes());
    }

    fn nonce(&self) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[NONCE_LEN - 8..].copy_from_slice(&self.counter.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }
}

/// A datagram that opened.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened<'d> {
    /// Its header, authenticated.
    pub header: Header,
    /// What it carries.
    pub kind: Kind,
    /// The payload.
    pub payload: &'d [u8],
}

/// The cluster's gossip key (what every per-sender key is derived from).
pub struct GossipKey {
    prk: hkdf::Prk,
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GossipKey(..)")
    }
}

impl GossipKey {
    /// The key from its bytes.
    pub fn new(bytes: &[u8; KEY_LEN]) -> GossipKey {
        GossipKey { prk: hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(bytes) }
    }

    /// Fresh random key bytes (for a new cluster).
    pub fn generate() -> [u8; KEY_LEN] {
        let mut k = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut k).expect("the system random source works");
        k
    }

    /// The key `sender` seals under in `generation`.
    fn sender_key(&self, sender: NodeId, generation: u64) -> LessSafeKey {
        let (sender, generation) = (sender.to_be_bytes(), generation.to_be_bytes());
        let info = [SENDER_INFO, &sender, &generation];
        let okm =
            self.prk.expand(&info, &CHACHA20_POLY1305).expect("a 32-byte key is within HKDF-SHA256's output limit");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    /// What host `sender` seals with in `generation`, counting from 0. One per life of a host:
    /// two sealers of one sender and generation would repeat nonces.
    pub fn sealer(&self, sender: NodeId, generation: u64) -> Sealer {
        Sealer { key: self.sender_key(sender, generation), sender, generation, next: 0 }
    }

    /// Seals `payload` of `kind` under `header` into `out` (cleared first): any header a
    /// holder of the cluster key chooses (for tests; hosts seal with a [`Sealer`]).
    pub fn seal(&self, header: &Header, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
        seal(&self.sender_key(header.sender, header.generation), header, kind, payload, out);
    }

    /// Opens a datagram in place: its header, kind and payload.
    pub fn open<'d>(&self, datagram: &'d mut [u8]) -> Result<Opened<'d>, SealError> {
        let header = Header::parse(datagram)?;
        let (head, body) = datagram.split_at_mut(HEADER_LEN);
        let plain = self
            .sender_key(header.sender, header.generation)
            .open_in_place(header.nonce(), Aad::from(&*head), body)
            .map_err(|_| SealError::BadAuth)?;
        let kind = match plain[0] {
            1 => Kind::Swim,
            2 => Kind::Sync,
            3 => Kind::Ring,
            k => return Err(SealError::UnknownKind(k)),
        };
        Ok(Opened { header, kind, payload: &plain[1..] })
    }
}

/// One host's sealing key for one life, and the number of its next datagram.
pub struct Sealer {
    key: LessSafeKey,
    sender: NodeId,
    generation: u64,
    next: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("sender", &self.sender)
            .field("generation", &self.generation)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Seals from now on under `key` (the cluster key rotated), counting on from where it
    /// is: the counter is the nonce, unique under each key, and the receivers' windows, which
    /// do not know keys, take the next datagrams as they would have.
    pub fn rekey(&mut self, key: &GossipKey) {
        self.key = key.sender_key(self.sender, self.generation);
    }

    /// Seals `payload` of `kind` for host `receiver` into `out` (cleared first), as the next
    /// datagram of this sender.
    pub fn seal(&mut self, receiver: NodeId, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
        let header = Header { sender: self.sender, generation: self.generation, counter: self.next, receiver };
        // 2^64 datagrams: at a million a second, 580,000 years.
        self.next = self.next.checked_add(1).expect("a sender's counter does not run out");
        seal(&self.key, &header, kind, payload, out);
    }
}

fn seal(key: &LessSafeKey, header: &Header, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(OVERHEAD + payload.len());
    header.write(out);
    out.push(kind as u8);
    out.extend_from_slice(payload);
    let (head, body) = out.split_at_mut(HEADER_LEN);
    let tag = key
        .seal_in_place_separate_tag(header.nonce(), Aad::from(&*head), body)
        .expect("a gossip datagram is far below ChaCha20-Poly1305's length limit");
    out.extend_from_slice(tag.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(counter: u64) -> Header {
        Header { sender: 3, generation: 1_700_000_000_000_000, counter, receiver: 9 }
    }

    #[test]
    fn a_sealed_datagram_opens_under_the_same_key_only() {
        let key = GossipKey::new(&[7; KEY_LEN]);
        let mut d = Vec::new();
        key.seal(&header(5), Kind::Sync, b"hello", &mut d);
        assert_eq!(d.len(), OVERHEAD + 5);
        let mut copy = d.clone();
        assert_eq!(key.open(&mut copy), Ok(Opened { header: header(5), kind: Kind::Sync, payload: &b"hello"[..] }));
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

    #[test]
    fn the_header_is_where_the_module_doc_says_and_authenticated() {
        let key = GossipKey::new(&[7; KEY_LEN]);
        let mut d = Vec::new();
        key.seal(&header(0x0102), Kind::Swim, b"x", &mut d);
        assert_eq!(&d[..3], b"og\x04");
        assert_eq!(d[3..11], 3u64.to_be_bytes());
        assert_eq!(d[11..19], 1_700_000_000_000_000u64.to_be_bytes());
        assert_eq!(d[19..27], 0x0102u64.to_be_bytes());
        assert_eq!(d[27..35], 9u64.to_be_bytes());
        assert_eq!(Header::parse(&d), Ok(header(0x0102)));
        // Another sender, generation, counter or receiver written over the header: it does
        // not open (each field is authenticated, the first two also choose the key).
        for at in [3, 11, 19, 27] {
            let mut changed = d.clone();
            changed[at + 7] ^= 1;
            assert_eq!(key.open(&mut changed), Err(SealError::BadAuth), "field at {at}");
        }
        // Version 1's layout (magic, 1, a random nonce) and version 2's records are not this
        // version's: refused by the version, before anything is opened.
        for v in [1, 2] {
            let mut old = d.clone();
            old[2] = v;
            assert_eq!(key.open(&mut old), Err(SealError::OtherVersion(v)));
        }
    }

    #[test]
    fn every_kind_opens_as_itself_and_one_of_a_later_release_is_refused_after_opening() {
        let key = GossipKey::new(&[7; KEY_LEN]);
        for kind in [Kind::Swim, Kind::Sync, Kind::Ring] {
            let mut d = Vec::new();
            key.seal(&header(1), kind, b"p", &mut d);
            assert_eq!(key.open(&mut d).map(|o| o.kind), Ok(kind));
        }
        // Kind 9, as a later release would seal it: authentic, but not understood here.
        let h = header(2);
        let mut d = Vec::new();
        h.write(&mut d);
        d.extend_from_slice(&[9, b'p']);
        let (head, body) = d.split_at_mut(HEADER_LEN);
        let tag = key
            .sender_key(h.sender, h.generation)
            .seal_in_place_separate_tag(h.nonce(), Aad::from(&*head), body)
            .unwrap();
        d.extend_from_slice(tag.as_ref());
        assert_eq!(key.open(&mut d), Err(SealError::UnknownKind(9)));
    }

    #[test]
    fn a_sealer_numbers_its_datagrams_and_never_repeats_a_keystream() {
        let key = GossipKey::new(&[7; KEY_LEN]);
        let mut sealer = key.sealer(3, 1_700_000_000_000_000);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        sealer.seal(9, Kind::Swim, &[0; 64], &mut a);
        sealer.seal(9, Kind::Swim, &[0; 64], &mut b);
        let (ha, hb) = (Header::parse(&a).unwrap(), Header::parse(&b).unwrap());
        assert_eq!((ha.counter, hb.counter), (0, 1));
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..], "the same plaintext seals differently");
        // The same counter in another generation or of another sender: another key.
        let mut c = Vec::new();
        key.sealer(3, 1_700_000_000_000_001).seal(9, Kind::Swim, &[0; 64], &mut c);
        let mut d = Vec::new();
        key.sealer(4, 1_700_000_000_000_000).seal(9, Kind::Swim, &[0; 64], &mut d);
        assert_ne!(a[HEADER_LEN..], c[HEADER_LEN..]);
        assert_ne!(a[HEADER_LEN..], d[HEADER_LEN..]);
        for mut x in [a, b, c, d] {
            assert!(key.open(&mut x).is_ok());
        }
    }

    #[test]
    fn a_rekeyed_sealer_counts_on_under_the_new_key() {
        let (old, new) = (GossipKey::new(&[7; KEY_LEN]), GossipKey::new(&[8; KEY_LEN]));
        let mut sealer = old.sealer(3, 1);
        let mut d = Vec::new();
        sealer.seal(9, Kind::Swim, b"a", &mut d);
        sealer.rekey(&new);
        sealer.seal(9, Kind::Swim, b"b", &mut d);
        assert_eq!(Header::parse(&d).unwrap().counter, 1);
        assert_eq!(old.open(&mut d.clone()), Err(SealError::BadAuth));
        assert_eq!(new.open(&mut d).unwrap().payload, b"b");
    }
}
