//! Sealing of VXLAN datagrams for encrypted networks: the sans-IO AEAD core that turns a plain
//! VXLAN datagram into a sealed one in place ([`Sealer`]) and back ([`Opener`]), with a replay
//! window per sender.
//!
//! **What it is.** Byte arrays in, byte arrays out: no I/O, no clock, no logging, and no
//! allocation per packet (an [`Opener`] allocates only when a sender address is first
//! authenticated). A sealed datagram is the UDP payload below, all integers big-endian:
//!
//! ```text
//! bytes 0          flags 0x0c: the I bit (0x08) and the "sealed" bit (0x04)
//!       1..4       reserved, zero
//!       4..7       VNI
//!       7          key epoch
//!       8..16      the sender's session (u64)
//!       16..24     the packet counter within the session (u64)
//!       24..len-16 the inner Ethernet frame, encrypted
//!       len-16..   the AES-GCM tag
//! ```
//!
//! A plain RFC 7348 datagram has flags exactly 0x08, so a kernel VTEP (or an overlayd VTEP of a
//! plain network) drops a sealed one at the header, and the two are never confused. The VNI is
//! where [`crate::wire::vxlan::VxlanPacket::vni`] reads it, so the shell finds the network (and
//! its [`Opener`]) with the existing view before opening.
//!
//! The AEAD is AES-256-GCM. Each sender session has its own key, HKDF-SHA256 of the network's
//! 32-byte secret (salt `"overlayd vxlan seal v1"`, info = the sender's underlay address as 16
//! bytes, IPv4 mapped into IPv6, then the session): the session is a number the sender picks
//! at start, strictly larger than any it used before (its start time in ns), so a restarted
//! sender never reuses a key, and the nonce can be the packet counter alone (4 zero bytes, then
//! the counter). The header (VNI, epoch, session, counter) and the outer source address are
//! authenticated: a datagram cannot be moved to another network, replayed under another
//! counter, or claimed by another sender. The outer destination is not: one sealed datagram
//! goes to every member of a flood list as it is (and every holder of the network's key is a
//! member anyway).
//!
//! Why ring's AES-256-GCM: the `seal` benchmark (BENCHMARKS.md, "Sealing (issue 16)") seals
//! 1400-byte segments at about 4.4 GB/s with it on AES-NI/PCLMULQDQ hardware, three times
//! ring's ChaCha20-Poly1305. aws-lc-rs's AES-256-GCM was about 20 % faster there, which is
//! 0.05 s of CPU per GB, a few per cent of the agent's own cost per GB: not worth a second
//! crypto library with a C build beside the ring that rustls and the control plane already
//! use. Switching is local to this module (the key type and three calls; the wire format does
//! not change) if sealing ever dominates the end-to-end profile.
//!
//! **What it is not.** It does not decide which networks are encrypted, distribute or rotate
//! keys, or touch a socket: the control plane hands the keys to [`crate::tables`], and the
//! Linux shell (`linux`) seals before sending and opens after receiving, counting every refusal
//! by its [`DropReason`] in [`crate::counters`] (`From<OpenError> for DropReason`).

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use crate::counters::DropReason;
use crate::tables::FastMap;
use crate::wire::vxlan::FLAGS_VNI_VALID;
use crate::wire::{Vni, ethernet};

mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const RESERVED: Range<usize> = 1..4;
    pub const VNI: Range<usize> = 4..7;
    pub const EPOCH: usize = 7;
    pub const SESSION: Range<usize> = 8..16;
    pub const COUNTER: Range<usize> = 16..24;
    pub const PAYLOAD: usize = 24;
}

/// Length of the sealed header: the VXLAN header (with the epoch in its last byte), the
/// sender's session and the packet counter.
pub const SEALED_HEADER_LEN: usize = field::PAYLOAD;

/// Length of the AES-GCM authentication tag that ends a sealed datagram.
pub const TAG_LEN: usize = 16;

/// Bytes a sealed datagram carries beyond a plain VXLAN datagram with the same inner frame:
/// 16 bytes of session and counter, and the tag.
pub const OVERHEAD: usize = SEALED_HEADER_LEN - crate::wire::vxlan::HEADER_LEN + TAG_LEN;

/// The flags byte of a sealed datagram: the I bit and the "sealed" bit (0x04).
pub const SEALED_FLAGS: u8 = FLAGS_VNI_VALID | 0x04;

/// The shortest datagram [`Opener::open`] looks at: a header, an Ethernet header and a tag.
const MIN_SEALED_LEN: usize = SEALED_HEADER_LEN + ethernet::HEADER_LEN + TAG_LEN;

/// HKDF salt: names the format, so that a later one derives other keys from the same secret.
const KDF_SALT: &[u8] = b"overlayd vxlan seal v1";

/// Additional authenticated data: the sealed header and the outer source.
const AAD_LEN: usize = SEALED_HEADER_LEN + 16;

/// Whether a datagram is sealed (its flags byte is [`SEALED_FLAGS`]), as opposed to plain
/// VXLAN (0x08) or garbage: the RX loop's dispatch, before [`Opener::open`].
#[inline]
pub fn is_sealed(datagram: &[u8]) -> bool {
    datagram.first() == Some(&SEALED_FLAGS)
}

/// One network's secret, as the control plane distributes it: 32 random bytes and the epoch
/// that names them on the wire (byte 7 of the sealed header). `Debug` does not print the secret.
#[derive(Clone)]
pub struct NetworkKey {
    /// Which key this is; a rotation moves to the next epoch (wrapping).
    pub epoch: u8,
    /// The network secret every per-session key is derived from.
    pub secret: [u8; 32],
}

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkKey").field("epoch", &self.epoch).field("secret", &"<redacted>").finish()
    }
}

/// Why [`Opener::open`] refused a sealed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The datagram is shorter than a sealed header, an Ethernet header and a tag.
    #[error("sealed datagram shorter than its header, an Ethernet header and the tag")]
    Truncated,
    /// The datagram's key epoch is not one this network accepts (an old key after a
    /// rotation, or a peer ahead of us).
    #[error("sealed with a key epoch this network does not accept")]
    UnknownKey,
    /// The sender's session is older than the newest one it has authenticated, or the counter
    /// was already seen or is older than the replay window.
    #[error("replayed, or too old for the replay window")]
    Replay,
    /// The tag does not match: a wrong key (another network's secret), a modified datagram,
    /// or other outer addresses than the sender sealed for.
    #[error("authentication tag mismatch")]
    AuthFailed,
}

impl From<OpenError> for DropReason {
    fn from(e: OpenError) -> DropReason {
        match e {
            OpenError::Truncated => DropReason::SealTruncated,
            OpenError::UnknownKey => DropReason::UnknownKey,
            OpenError::Replay => DropReason::Replayed,
            OpenError::AuthFailed => DropReason::AuthFailed,
        }
    }
}

/// An underlay address as the 16 bytes the key derivation and the AAD use (IPv4 mapped).
#[inline]
fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The AES-256-GCM key of one sender session under one network secret.
fn session_key(secret: &[u8; 32], sender: &[u8; 16], session: u64) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(secret);
    let session = session.to_be_bytes();
    let info = [&sender[..], &session[..]];
    let okm = prk.expand(&info, &AES_256_GCM).expect("32 bytes is far below HKDF-SHA256's output limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

#[inline]
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

#[inline]
fn aad(header: &[u8], src: &[u8; 16]) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    a[..SEALED_HEADER_LEN].copy_from_slice(header);
    a[SEALED_HEADER_LEN..].copy_from_slice(src);
    a
}

/// This host's sealing state for one network: the current key (its epoch), this host's
/// underlay address and session, and the packet counter. Shared by reference between the
/// threads that send (the counter is atomic).
///
/// Never build two `Sealer`s with the same key and session: their counters would both start at
/// 0 and reuse nonces. A rotation builds a new `Sealer` for the new key, and may keep the
/// session (the derived key differs, and the [`Opener`] keeps a replay window per epoch); a
/// restart picks a new, larger session.
pub struct Sealer {
    epoch: u8,
    key: LessSafeKey,
    local: [u8; 16],
    session: u64,
    next: AtomicU64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("epoch", &self.epoch)
            .field("session", &self.session)
            .field("next", &self.next.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Derives this host's key for `session` (see the module doc) from the network's `key`.
    /// `local` is the underlay address this host sends from, as peers see it.
    pub fn new(key: &NetworkKey, local: IpAddr, session: u64) -> Sealer {
        let local = addr16(local);
        Sealer {
            epoch: key.epoch,
            key: session_key(&key.secret, &local, session),
            local,
            session,
            next: AtomicU64::new(0),
        }
    }

    /// The epoch of the key this sealer seals with.
    pub fn epoch(&self) -> u8 {
        self.epoch
    }

    /// Reserves `n` consecutive counters (one `fetch_add`) and returns the first: a batch of
    /// `n` datagrams is sealed with `first..first + n`.
    #[inline]
    pub fn reserve(&self, n: u64) -> u64 {
        // Relaxed: the counter only has to be unique, which the atomic read-modify-write
        // guarantees whatever the ordering. 2^64 datagrams do not happen.
        self.next.fetch_add(n, Ordering::Relaxed)
    }

    /// Seals one datagram in place: writes the sealed header (flags, VNI, epoch, session,
    /// `counter`) into `datagram[..SEALED_HEADER_LEN]`, encrypts the inner frame in
    /// `datagram[SEALED_HEADER_LEN..SEALED_HEADER_LEN + plain_len]` and writes the tag right
    /// after it. The same bytes may go to several destinations. Returns the sealed datagram's
    /// length, `SEALED_HEADER_LEN + plain_len + TAG_LEN`.
    ///
    /// `counter` must come from [`Sealer::reserve`] and be used once.
    ///
    /// # Panics
    ///
    /// If `datagram` is shorter than `SEALED_HEADER_LEN + plain_len + TAG_LEN`.
    #[inline]
    pub fn seal(&self, vni: Vni, counter: u64, datagram: &mut [u8], plain_len: usize) -> usize {
        let len = SEALED_HEADER_LEN + plain_len + TAG_LEN;
        assert!(datagram.len() >= len, "datagram buffer of {} bytes cannot hold {len} sealed", datagram.len());
        let (header, rest) = datagram.split_at_mut(SEALED_HEADER_LEN);
        header[field::FLAGS] = SEALED_FLAGS;
        header[field::RESERVED].fill(0);
        header[field::VNI].copy_from_slice(&vni.to_be_bytes());
        header[field::EPOCH] = self.epoch;
        header[field::SESSION].copy_from_slice(&self.session.to_be_bytes());
        header[field::COUNTER].copy_from_slice(&counter.to_be_bytes());
        let aad = aad(header, &self.local);
        let (text, rest) = rest.split_at_mut(plain_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&aad), text)
            .expect("AES-GCM seals up to 64 GB; a datagram is far below");
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        len
    }
}

/// Words of the replay bitmap. A power of two, so a counter's word is a mask away.
const WINDOW_WORDS: usize = 128;

/// Counters behind the newest one that the window still judges: all but the newest's word,
/// so that every judged counter lies in a word not yet reused for a newer one.
const WINDOW: u64 = (WINDOW_WORDS as u64 - 1) * 64;

/// A sliding replay window over packet counters (RFC 6479): a ring of bits, one per counter,
/// at least [`WINDOW`] (8128) counters behind the newest accepted one. A GSO/GRO batch of 64
/// datagrams from several flows may arrive reordered, and several batches may be in flight;
/// 8128 leaves room for that at any realistic rate. O(1) per check, and no allocation.
///
/// [`check`](Self::check) before the tag is verified, [`accept`](Self::accept) after, so a
/// forged datagram never moves the window.
#[derive(Clone)]
struct ReplayWindow {
    /// The newest accepted counter (0 before any, with its bit clear).
    newest: u64,
    bits: [u64; WINDOW_WORDS],
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow").field("newest", &self.newest).finish_non_exhaustive()
    }
}

impl ReplayWindow {
    fn new() -> ReplayWindow {
        ReplayWindow { newest: 0, bits: [0; WINDOW_WORDS] }
    }

    #[inline]
    fn slot(counter: u64) -> (usize, u64) {
        ((counter / 64) as usize % WINDOW_WORDS, 1 << (counter % 64))
    }

    /// Whether `counter` may be new: ahead of the newest, or within the window and not seen.
    #[inline]
    fn check(&self, counter: u64) -> bool {
        if counter > self.newest {
            return true;
        }
        if self.newest - counter >= WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & bit == 0
    }

    /// Records `counter` as seen (it passed [`check`](Self::check) and its tag verified),
    /// sliding the window forward if it is the newest.
    #[inline]
    fn accept(&mut self, counter: u64) {
        if counter > self.newest {
            let (from, to) = (self.newest / 64, counter / 64);
            // Clear the words the window slides over: they held counters a whole ring ago.
            let advance = (to - from).min(WINDOW_WORDS as u64);
            for i in 1..=advance {
                self.bits[(from + i) as usize % WINDOW_WORDS] = 0;
            }
            self.newest = counter;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
    }
}

/// A sender session's key and replay window under one epoch.
#[derive(Debug)]
struct EpochState {
    epoch: u8,
    key: LessSafeKey,
    window: ReplayWindow,
}

/// What an [`Opener`] knows of one sender address: its newest authenticated session, and that
/// session's key and window per accepted epoch.
#[derive(Debug)]
struct Sender {
    session: u64,
    epochs: Vec<EpochState>,
}

/// One network's opening state: the keys it accepts (the current epoch and, during a rotation,
/// the previous ones) and, per sender address, its newest session's derived keys (one per
/// epoch) and replay windows.
///
/// The state of a sender is created or replaced only by a datagram whose tag verified, so
/// forged datagrams cost a key derivation at most, and never memory or a moved window.
pub struct Opener {
    keys: Vec<NetworkKey>,
    senders: FastMap<[u8; 16], Sender>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let epochs: Vec<u8> = self.keys.iter().map(|k| k.epoch).collect();
        f.debug_struct("Opener").field("epochs", &epochs).field("senders", &self.senders.len()).finish_non_exhaustive()
    }
}

impl Default for Opener {
    fn default() -> Opener {
        Opener::new()
    }
}

impl Opener {
    /// An opener that accepts no key yet.
    pub fn new() -> Opener {
        Opener { keys: Vec::new(), senders: FastMap::default() }
    }

    /// Replaces the accepted keys. Per-sender state is kept for the epochs still accepted with
    /// the same secret, and forgotten for the rest. If two keys share an epoch, the first wins.
    ///
    /// A key dropped here and accepted again later starts with fresh replay windows, so its old
    /// datagrams would open once more: the control plane never re-accepts a retired key.
    pub fn set_keys(&mut self, keys: &[NetworkKey]) {
        let unchanged = |epoch: u8| {
            let old = self.keys.iter().find(|k| k.epoch == epoch);
            let new = keys.iter().find(|k| k.epoch == epoch);
            matches!((old, new), (Some(o), Some(n)) if o.secret == n.secret)
        };
        for sender in self.senders.values_mut() {
            sender.epochs.retain(|e| unchanged(e.epoch));
            // Room for every accepted epoch, so opening a datagram of a new one never allocates.
            sender.epochs.reserve(keys.len());
        }
        self.senders.retain(|_, s| !s.epochs.is_empty());
        self.keys.clear();
        self.keys.extend(keys.iter().cloned());
    }

    /// Opens in place a sealed datagram received from `src`: on success, returns where the
    /// decrypted inner frame lies in `datagram` (`SEALED_HEADER_LEN..datagram.len() - TAG_LEN`).
    ///
    /// The caller has checked [`is_sealed`]; the rest of the header is authenticated. The
    /// replay window moves, and a newer session replaces its sender's older one, only after
    /// the tag verified. On an error, the inner frame may be overwritten.
    pub fn open(&mut self, src: IpAddr, datagram: &mut [u8]) -> Result<Range<usize>, OpenError> {
        let len = datagram.len();
        if len < MIN_SEALED_LEN {
            return Err(OpenError::Truncated);
        }
        let (header, body) = datagram.split_at_mut(SEALED_HEADER_LEN);
        let epoch = header[field::EPOCH];
        let session = u64::from_be_bytes(header[field::SESSION].try_into().expect("8 bytes"));
        let counter = u64::from_be_bytes(header[field::COUNTER].try_into().expect("8 bytes"));
        let Some(key) = self.keys.iter().find(|k| k.epoch == epoch) else {
            return Err(OpenError::UnknownKey);
        };
        let src = addr16(src);
        let aad = aad(header, &src);
        let unseal = |key: &LessSafeKey, body: &mut [u8]| {
            key.open_in_place(nonce(counter), Aad::from(&aad), body).map(|_| ()).map_err(|_| OpenError::AuthFailed)
        };
        let plain = SEALED_HEADER_LEN..len - TAG_LEN;

        let sender = match self.senders.get_mut(&src) {
            Some(sender) if session < sender.session => return Err(OpenError::Replay),
            Some(sender) if session == sender.session => sender,
            known => {
                // A sender not seen yet, or restarted: its session's key, adopted once a
                // datagram proves it.
                let state =
                    EpochState { epoch, key: session_key(&key.secret, &src, session), window: ReplayWindow::new() };
                unseal(&state.key, body)?;
                let sender = match known {
                    Some(sender) => {
                        sender.session = session;
                        sender.epochs.clear();
                        sender
                    }
                    None => self
                        .senders
                        .entry(src)
                        .or_insert(Sender { session, epochs: Vec::with_capacity(self.keys.len()) }),
                };
                sender.epochs.push(state);
                let state = sender.epochs.last_mut().expect("just pushed");
                state.window.accept(counter);
                return Ok(plain);
            }
        };
        let i = match sender.epochs.iter().position(|e| e.epoch == epoch) {
            Some(i) => i,
            None => {
                // The session's first datagram under this epoch (a rotation): the key is a pure
                // function of what is authenticated, so deriving it before the tag is checked
                // adopts nothing a forger controls.
                let key = session_key(&key.secret, &src, session);
                sender.epochs.push(EpochState { epoch, key, window: ReplayWindow::new() });
                sender.epochs.len() - 1
            }
        };
        let state = &mut sender.epochs[i];
        if !state.window.check(counter) {
            return Err(OpenError::Replay);
        }
        unseal(&state.key, body)?;
        state.window.accept(counter);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::alloc_count::{self, CountingAllocator};

    // Counts this test binary's allocations, so that "sealing and opening allocate nothing per
    // packet" is checked.
    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
    const KEY1: NetworkKey = NetworkKey { epoch: 1, secret: [0x11; 32] };
    const KEY2: NetworkKey = NetworkKey { epoch: 2, secret: [0x22; 32] };
    /// Another network's secret, under the same epoch number.
    const OTHER: NetworkKey = NetworkKey { epoch: 1, secret: [0x99; 32] };

    fn vni() -> Vni {
        Vni::new(4242).unwrap()
    }

    /// An inner Ethernet frame of `len` bytes whose content depends on `seed`.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// `frame` sealed by `sealer` for `dst` with the next counter.
    fn sealed(sealer: &Sealer, dst: IpAddr, frame: &[u8]) -> Vec<u8> {
        sealed_with(sealer, sealer.reserve(1), dst, frame)
    }

    fn sealed_with(sealer: &Sealer, counter: u64, _dst: IpAddr, frame: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; SEALED_HEADER_LEN + frame.len() + TAG_LEN];
        d[SEALED_HEADER_LEN..SEALED_HEADER_LEN + frame.len()].copy_from_slice(frame);
        let n = sealer.seal(vni(), counter, &mut d, frame.len());
        assert_eq!(n, d.len());
        d
    }

    fn opener(_local: IpAddr, keys: &[NetworkKey]) -> Opener {
        let mut o = Opener::new();
        o.set_keys(keys);
        o
    }

    /// Opens a copy of `d` and checks the plaintext is `frame`.
    fn open_ok(o: &mut Opener, src: IpAddr, d: &[u8], frame: &[u8]) {
        let mut d = d.to_vec();
        let range = o.open(src, &mut d).expect("opens");
        assert_eq!(range, SEALED_HEADER_LEN..d.len() - TAG_LEN);
        assert_eq!(&d[range], frame);
    }

    fn open_err(o: &mut Opener, src: IpAddr, d: &[u8]) -> OpenError {
        o.open(src, &mut d.to_vec()).expect_err("refused")
    }

    #[test]
    fn constants_match_the_format() {
        assert_eq!(SEALED_HEADER_LEN, 24);
        assert_eq!(TAG_LEN, 16);
        assert_eq!(OVERHEAD, 32);
        assert_eq!(SEALED_FLAGS, 0x0c);
        assert_eq!(MIN_SEALED_LEN, 54);
    }

    #[test]
    fn round_trip_and_header_layout() {
        let s = Sealer::new(&KEY1, A, 0x0102_0304_0506_0708);
        assert_eq!(s.epoch(), 1);
        let f = frame(1400, 7);
        let d = sealed(&s, B, &f);
        assert!(is_sealed(&d));
        assert_eq!(&d[..8], &[0x0c, 0, 0, 0, 0x00, 0x10, 0x92, 1], "flags, reserved, VNI 4242, epoch");
        assert_eq!(&d[8..16], &[1, 2, 3, 4, 5, 6, 7, 8], "session");
        assert_eq!(&d[16..24], &[0; 8], "the first counter is 0");
        assert_ne!(&d[24..24 + f.len()], &f[..], "encrypted");
        assert_eq!(
            crate::wire::vxlan::VxlanPacket::new_checked(&d[..]).unwrap().vni(),
            vni(),
            "the plain view finds the VNI"
        );
        let mut o = opener(B, &[KEY1]);
        open_ok(&mut o, A, &d, &f);
        // The smallest frame, and IPv6 underlay addresses.
        let s6 = Sealer::new(&KEY1, V6, 9);
        let mut o6 = opener(A, &[KEY1]);
        let small = frame(14, 1);
        open_ok(&mut o6, V6, &sealed(&s6, A, &small), &small);
    }

    #[test]
    fn plain_vxlan_is_not_sealed() {
        assert!(!is_sealed(&[0x08, 0, 0, 0, 0, 0, 1, 0]));
        assert!(!is_sealed(&[]));
        assert!(is_sealed(&[0x0c]));
    }

    #[test]
    fn reserve_hands_out_consecutive_ranges() {
        let s = Sealer::new(&KEY1, A, 1);
        assert_eq!(s.reserve(46), 0);
        assert_eq!(s.reserve(1), 46);
        assert_eq!(s.reserve(3), 47);
        assert_eq!(s.reserve(0), 50);
    }

    #[test]
    fn a_tampered_byte_anywhere_is_refused() {
        let s = Sealer::new(&KEY1, A, 1000);
        let f = frame(100, 3);
        let d = sealed_with(&s, 5, B, &f);
        for i in 0..d.len() {
            for flip in [0x01u8, 0x80] {
                let mut t = d.clone();
                t[i] ^= flip;
                // A fresh opener each time, so an earlier refusal cannot be what refuses this one.
                let mut o = opener(B, &[KEY1]);
                let e = open_err(&mut o, A, &t);
                match i {
                    field::EPOCH => assert_eq!(e, OpenError::UnknownKey, "epoch byte"),
                    _ => assert_eq!(e, OpenError::AuthFailed, "byte {i} ^ {flip:#x}"),
                }
            }
        }
        // A lower session than the sender's newest is refused before its tag is looked at.
        let mut o = opener(B, &[KEY1]);
        open_ok(&mut o, A, &d, &f);
        let lower = {
            let mut t = sealed_with(&s, 7, B, &f);
            t[field::SESSION].copy_from_slice(&999u64.to_be_bytes());
            t
        };
        assert_eq!(open_err(&mut o, A, &lower), OpenError::Replay);
        let higher = {
            let mut t = sealed_with(&s, 8, B, &f);
            t[field::SESSION].copy_from_slice(&1001u64.to_be_bytes());
            t
        };
        assert_eq!(open_err(&mut o, A, &higher), OpenError::AuthFailed);
        // Neither moved anything: the session and its window are intact.
        open_ok(&mut o, A, &sealed_with(&s, 7, B, &f), &f);
        open_ok(&mut o, A, &sealed_with(&s, 8, B, &f), &f);
    }

    #[test]
    fn wrong_outer_addresses_are_refused() {
        let s = Sealer::new(&KEY1, A, 1);
        let f = frame(64, 0);
        let d = sealed(&s, B, &f);
        // Reflected from another source.
        assert_eq!(open_err(&mut opener(B, &[KEY1]), C, &d), OpenError::AuthFailed);
        // Delivered to another host than the one it was sent to: the same datagram goes to
        // every member of a flood list.
        open_ok(&mut opener(C, &[KEY1]), A, &d, &f);
        // IPv4 and its mapped IPv6 form are the same address.
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        open_ok(&mut opener(B, &[KEY1]), mapped, &d, &f);
    }

    #[test]
    fn truncated_datagrams_are_refused() {
        let s = Sealer::new(&KEY1, A, 1);
        let d = sealed(&s, B, &frame(14, 0));
        assert_eq!(d.len(), MIN_SEALED_LEN);
        let mut o = opener(B, &[KEY1]);
        for len in [0, 1, 8, SEALED_HEADER_LEN, SEALED_HEADER_LEN + TAG_LEN, MIN_SEALED_LEN - 1] {
            assert_eq!(o.open(A, &mut d[..len].to_vec()), Err(OpenError::Truncated), "length {len}");
        }
        open_ok(&mut o, A, &d, &frame(14, 0));
    }

    #[test]
    fn an_epoch_not_accepted_is_an_unknown_key() {
        let s = Sealer::new(&KEY2, A, 1);
        let d = sealed(&s, B, &frame(64, 0));
        assert_eq!(open_err(&mut opener(B, &[KEY1]), A, &d), OpenError::UnknownKey);
        assert_eq!(open_err(&mut Opener::new(), A, &d), OpenError::UnknownKey, "no key at all");
    }

    #[test]
    fn another_networks_secret_fails_authentication() {
        let s = Sealer::new(&OTHER, A, 1);
        let d = sealed(&s, B, &frame(64, 0));
        assert_eq!(open_err(&mut opener(B, &[KEY1]), A, &d), OpenError::AuthFailed);
    }

    #[test]
    fn a_replayed_datagram_is_refused() {
        let s = Sealer::new(&KEY1, A, 1);
        let f = frame(64, 0);
        let d = sealed(&s, B, &f);
        let mut o = opener(B, &[KEY1]);
        open_ok(&mut o, A, &d, &f);
        assert_eq!(open_err(&mut o, A, &d), OpenError::Replay);
        let d2 = sealed(&s, B, &f);
        open_ok(&mut o, A, &d2, &f);
        assert_eq!(open_err(&mut o, A, &d2), OpenError::Replay);
        assert_eq!(open_err(&mut o, A, &d), OpenError::Replay);
    }

    #[test]
    fn a_forged_datagram_does_not_burn_its_counter() {
        let s = Sealer::new(&KEY1, A, 1);
        let f = frame(64, 0);
        let mut o = opener(B, &[KEY1]);
        open_ok(&mut o, A, &sealed_with(&s, 0, B, &f), &f);
        let good = sealed_with(&s, 1, B, &f);
        let mut forged = good.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(open_err(&mut o, A, &forged), OpenError::AuthFailed);
        open_ok(&mut o, A, &good, &f);
        // Nor does one far ahead move the window past the genuine ones.
        let mut ahead = sealed_with(&s, 1_000_000, B, &f);
        ahead[30] ^= 1;
        assert_eq!(open_err(&mut o, A, &ahead), OpenError::AuthFailed);
        open_ok(&mut o, A, &sealed_with(&s, 2, B, &f), &f);
    }

    #[test]
    fn datagrams_reordered_within_the_window_are_accepted() {
        let s = Sealer::new(&KEY1, A, 1);
        let f = frame(100, 9);
        let batch: Vec<Vec<u8>> = (0..200).map(|_| sealed(&s, B, &f)).collect();
        let mut o = opener(B, &[KEY1]);
        // Newest first, then the rest in a shuffled order (a stride coprime to 200).
        open_ok(&mut o, A, &batch[199], &f);
        for k in 0..199 {
            open_ok(&mut o, A, &batch[(k * 7) % 199], &f);
        }
        for d in &batch {
            assert_eq!(open_err(&mut o, A, d), OpenError::Replay);
        }
    }

    #[test]
    fn a_restarted_sender_replaces_its_old_session() {
        let old = Sealer::new(&KEY1, A, 1_000);
        let f = frame(64, 0);
        let mut o = opener(B, &[KEY1]);
        let old_early = sealed(&old, B, &f);
        let old_late = sealed(&old, B, &f);
        open_ok(&mut o, A, &old_early, &f);
        // The sender restarts with a later session; its counters start at 0 again.
        let new = Sealer::new(&KEY1, A, 2_000);
        open_ok(&mut o, A, &sealed(&new, B, &f), &f);
        open_ok(&mut o, A, &sealed(&new, B, &f), &f);
        // The old session's datagrams, even never-seen ones, are refused now.
        assert_eq!(open_err(&mut o, A, &old_late), OpenError::Replay);
        assert_eq!(open_err(&mut o, A, &sealed(&old, B, &f)), OpenError::Replay);
        // Other senders are not affected.
        let c = Sealer::new(&KEY1, C, 5);
        open_ok(&mut o, C, &sealed(&c, B, &f), &f);
    }

    #[test]
    fn both_epochs_open_during_a_rotation_and_the_old_one_is_dropped_after() {
        let f = frame(64, 0);
        let old = Sealer::new(&KEY1, A, 7);
        // The rotation keeps the session: the new epoch's key differs, so counters restart.
        let new = Sealer::new(&KEY2, A, 7);
        let mut o = opener(B, &[KEY2, KEY1]);
        open_ok(&mut o, A, &sealed(&old, B, &f), &f);
        open_ok(&mut o, A, &sealed(&new, B, &f), &f);
        let late_old = sealed(&old, B, &f);
        open_ok(&mut o, A, &sealed(&new, B, &f), &f);
        // Each epoch has its own window: counter 1 is new under both.
        open_ok(&mut o, A, &late_old, &f);
        assert_eq!(open_err(&mut o, A, &late_old), OpenError::Replay);
        // Replacing the keys keeps the window of an epoch still accepted.
        let seen_new = sealed(&new, B, &f);
        open_ok(&mut o, A, &seen_new, &f);
        o.set_keys(&[KEY2]);
        assert_eq!(open_err(&mut o, A, &seen_new), OpenError::Replay);
        open_ok(&mut o, A, &sealed(&new, B, &f), &f);
        assert_eq!(open_err(&mut o, A, &sealed(&old, B, &f)), OpenError::UnknownKey);
        // An epoch reused with another secret starts over.
        let reused = NetworkKey { epoch: 2, secret: [0x33; 32] };
        o.set_keys(std::slice::from_ref(&reused));
        assert_eq!(open_err(&mut o, A, &sealed(&new, B, &f)), OpenError::AuthFailed);
        open_ok(&mut o, A, &sealed(&Sealer::new(&reused, A, 7), B, &f), &f);
    }

    #[test]
    fn open_errors_map_to_drop_reasons() {
        assert_eq!(DropReason::from(OpenError::Truncated), DropReason::SealTruncated);
        assert_eq!(DropReason::from(OpenError::UnknownKey), DropReason::UnknownKey);
        assert_eq!(DropReason::from(OpenError::Replay), DropReason::Replayed);
        assert_eq!(DropReason::from(OpenError::AuthFailed), DropReason::AuthFailed);
    }

    #[test]
    fn debug_does_not_print_secrets() {
        let key = NetworkKey { epoch: 3, secret: [0xab; 32] };
        let all = format!("{key:?} {:?} {:?}", Sealer::new(&key, A, 1), opener(B, std::slice::from_ref(&key)));
        assert!(!all.contains("171"), "{all}");
        assert!(all.contains("redacted"));
    }

    #[test]
    fn sealing_and_opening_allocate_nothing_per_packet() {
        assert!(alloc_count::is_installed());
        let s = Sealer::new(&KEY1, A, 1);
        let mut o = opener(B, &[KEY1, KEY2]);
        let f = frame(1400, 0);
        let mut d = vec![0u8; SEALED_HEADER_LEN + f.len() + TAG_LEN];
        let mut seal_open = |o: &mut Opener, s: &Sealer| {
            d[SEALED_HEADER_LEN..SEALED_HEADER_LEN + f.len()].copy_from_slice(&f);
            s.seal(vni(), s.reserve(1), &mut d, f.len());
            assert!(o.open(A, &mut d).is_ok());
        };
        seal_open(&mut o, &s); // the sender's first datagram: its state is created
        let before = alloc_count::thread_allocations();
        for _ in 0..1000 {
            seal_open(&mut o, &s);
        }
        // A rotation to an epoch already accepted, and a restarted sender: no allocation either.
        let rotated = Sealer::new(&KEY2, A, 1);
        let restarted = Sealer::new(&KEY1, A, 2);
        for _ in 0..10 {
            seal_open(&mut o, &rotated);
        }
        for _ in 0..10 {
            seal_open(&mut o, &restarted);
        }
        assert_eq!(alloc_count::thread_allocations() - before, 0);
    }

    // -----------------------------------------------------------------------------------------
    // The replay window alone.

    fn seen(w: &mut ReplayWindow, c: u64) -> bool {
        if w.check(c) {
            w.accept(c);
            true
        } else {
            false
        }
    }

    #[test]
    fn window_in_order_and_counter_zero() {
        let mut w = ReplayWindow::new();
        assert!(seen(&mut w, 0), "counter 0 is accepted once");
        assert!(!seen(&mut w, 0));
        for c in 1..20_000 {
            assert!(seen(&mut w, c), "{c}");
            assert!(!seen(&mut w, c), "{c} again");
        }
    }

    #[test]
    fn window_reordered_duplicates_and_too_old() {
        let mut w = ReplayWindow::new();
        assert!(seen(&mut w, 10_000));
        // Everything within the window behind the newest, in a scrambled order, once.
        let low = 10_000 - WINDOW + 1;
        let n = WINDOW - 1; // low..10_000
        for k in 0..n {
            let c = low + (k * 4099) % n; // 4099 is prime, coprime to n
            assert!(seen(&mut w, c), "{c}");
        }
        for c in low..=10_000 {
            assert!(!seen(&mut w, c), "duplicate {c}");
        }
        assert!(!seen(&mut w, low - 1), "just older than the window");
        assert!(!seen(&mut w, 0), "far older");
        assert!(seen(&mut w, 10_001));
        assert!(!seen(&mut w, low), "slid out");
    }

    #[test]
    fn window_is_at_least_4096_wide() {
        let mut w = ReplayWindow::new();
        assert!(seen(&mut w, 5_000));
        assert!(seen(&mut w, 5_000 - 4096));
        const { assert!(WINDOW >= 4096) };
    }

    #[test]
    fn window_jumps_ahead_clear_what_they_slide_over() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            assert!(seen(&mut w, c));
        }
        // Jumps of less than, exactly and more than a whole ring.
        let mut newest = 99;
        for jump in [64, 63 * 64, WINDOW, WINDOW_WORDS as u64 * 64, 1 << 40] {
            let c = newest + jump;
            assert!(seen(&mut w, c));
            // Counters behind it within the window, never seen, are new despite the bits of
            // earlier counters that mapped to the same words.
            for back in [1, 63, 64, 65, 1000, WINDOW - 1] {
                if back < jump {
                    assert!(w.check(c - back), "jump {jump}, {back} back");
                }
            }
            if c >= WINDOW {
                assert!(!w.check(c - WINDOW), "jump {jump}: out of the window");
            }
            // What was seen before the jump and is still within the window stays refused.
            if jump < WINDOW {
                assert!(!w.check(newest), "jump {jump}: the previous newest");
            }
            newest = c;
        }
        // And what was accepted right before a jump stays refused.
        let c = newest + 1;
        assert!(seen(&mut w, c));
        assert!(seen(&mut w, c + 10));
        assert!(!seen(&mut w, c));
    }

    #[test]
    fn window_u64_edges() {
        let mut w = ReplayWindow::new();
        assert!(seen(&mut w, u64::MAX - 1));
        assert!(seen(&mut w, u64::MAX));
        assert!(!seen(&mut w, u64::MAX));
        assert!(!seen(&mut w, u64::MAX - 1));
        assert!(seen(&mut w, u64::MAX - 2));
        assert!(seen(&mut w, u64::MAX - WINDOW + 1));
        assert!(!seen(&mut w, u64::MAX - WINDOW));
        assert!(!seen(&mut w, 0));
        // Jumping from 0 straight to the top.
        let mut w = ReplayWindow::new();
        assert!(seen(&mut w, 0));
        assert!(seen(&mut w, u64::MAX));
        assert!(seen(&mut w, u64::MAX - 64));
        assert!(!seen(&mut w, 0));
    }
}
