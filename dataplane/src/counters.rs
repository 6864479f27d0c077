//! Per-agent counters: what was forwarded, and every drop by its reason, written by the hot
//! loops without locks and read as a [`CountersSnapshot`]; and per network
//! ([`NetworkCounters`]), what came in from each side and the drops charged to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Adds `n` to a counter that only the calling thread writes.
///
/// Each counter has exactly one writer thread (the TX loop writes `tx` and the TAP-side drop
/// reasons, the RX loop writes `rx` and the underlay-side ones), so this is a relaxed load and
/// store, not a locked read-modify-write; readers see a value at most one increment old.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

macro_rules! drop_reasons {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal, )*) => {
        /// Why a frame (TAP side) or a datagram (underlay side) was dropped. Every drop has one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason { $( $(#[doc = $doc])* $variant, )* }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant),*];

            /// The reason's name in metrics and JSON (`overlayd_dropped_total{reason="…"}`).
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }

            /// Whether a drop for this reason can be charged to a network: every reason but
            /// those that refuse a datagram before its VNI is known.
            pub const fn has_network(self) -> bool {
                !matches!(
                    self,
                    DropReason::Truncated
                        | DropReason::BadFlags
                        | DropReason::ReservedBits
                        | DropReason::BadRemoteChecksum
                        | DropReason::UnknownVni
                        | DropReason::Oversized
                )
            }
        }
    };
}

drop_reasons! {
    /// Underlay: the datagram is shorter than a VXLAN header plus an Ethernet header.
    Truncated = "truncated",
    /// Underlay: the VXLAN flags byte is not exactly 0x08.
    BadFlags = "bad_flags",
    /// Underlay: a reserved field of the VXLAN header is not zero.
    ReservedBits = "reserved_bits",
    /// Underlay: VXLAN remote checksum offload (RCO) whose checksum start or field lies
    /// outside the inner frame.
    BadRemoteChecksum = "bad_remote_checksum",
    /// Underlay: no network on this host has the datagram's VNI.
    UnknownVni = "unknown_vni",
    /// Underlay: the sender is not a member VTEP of the datagram's VNI (anti-spoofing).
    NotMember = "not_member",
    /// Underlay: on a cluster network, the inner frame's source is not the sending VTEP's: its
    /// source MAC is neither derived from an address of the sender's block nor one of the
    /// sender's endpoints, or its IPv4 source (or ARP sender) lies outside the sender's block
    /// or is the gateway (anti-spoofing between hosts).
    SourceNotOfSender = "source_not_of_sender",
    /// Underlay: the datagram did not fit the receive buffer and was cut.
    Oversized = "oversized",
    /// Underlay: the inner frame exceeds the network's MTU and is not TCP or UDP, so it cannot
    /// be segmented (an MTU mismatch between hosts).
    OversizedFrame = "oversized_frame",
    /// Underlay: writing the decapsulated frame to the TAP failed.
    TapWriteFailed = "tap_write_failed",
    /// Underlay: a sealed datagram (encrypted network) shorter than its sealed header, an
    /// Ethernet header and the authentication tag.
    SealTruncated = "sealed_truncated",
    /// Underlay: a sealed datagram whose key epoch the network does not accept (a key retired
    /// by a rotation, or a sender that has a newer key than this host yet).
    UnknownKey = "unknown_key",
    /// Underlay: a sealed datagram already received, older than the replay window, or from a
    /// sender session older than the newest one that sender has proven.
    Replayed = "replayed",
    /// Underlay: a sealed datagram whose authentication tag does not verify: another network's
    /// secret, a modified datagram, or outer addresses other than those it was sealed for.
    AuthFailed = "auth_failed",
    /// Underlay: a plain VXLAN datagram for a network that is encrypted.
    PlainOnEncrypted = "plaintext_on_encrypted_network",
    /// Underlay: a sealed datagram for a network that is not encrypted.
    SealedOnPlain = "sealed_on_plain_network",
    /// TAP: the frame is shorter than an Ethernet header.
    RuntFrame = "runt_frame",
    /// TAP: an ARP request for an address of this host's own block or the gateway: its owner
    /// on this host answers, so it is not flooded.
    ArpForLocal = "arp_for_local_address",
    /// TAP: an ARP request, on a cluster network, for an address no endpoint holds: not
    /// flooded (every endpoint is known), answered by nobody.
    ArpUnknownTarget = "arp_for_unknown_address",
    /// TAP: a frame for an address of a host confirmed down: its block stays leased, but
    /// nothing is sent to it until it is back.
    DestinationDown = "destination_host_down",
    /// TAP: the frame must be flooded but the network's flood list is empty, or it is for an
    /// address of this host's own block that no container here holds.
    NoDestination = "no_destination",
    /// TAP: on a cluster network, a frame to send whose source MAC is no endpoint of this host,
    /// or whose IPv4 source (or ARP sender) is not that endpoint's address (anti-spoofing
    /// between containers: a container sends only with its own MAC and IP).
    SourceNotLocal = "source_not_local_endpoint",
    /// TAP: on an encrypted network, a frame to send while this host has no key to seal it
    /// with (the key not fetched yet): never sent in the clear.
    NoSealingKey = "no_sealing_key",
    /// TAP: the frame does not fit in one datagram to the underlay.
    FrameTooLarge = "frame_too_large",
    /// TAP: the frame carries offload metadata the agent cannot honour (an unknown GSO type,
    /// checksum offsets outside the frame, a super-frame that does not parse): never sent
    /// malformed.
    UnsupportedOffload = "unsupported_offload",
    /// TAP: the kernel refused to send the datagram.
    SendFailed = "send_failed",
    /// TAP: writing an ARP answer back to the TAP failed.
    ArpReplyFailed = "arp_reply_failed",
}

/// Number of drop reasons.
pub const DROP_REASONS: usize = DropReason::ALL.len();

/// Counters of the TAP → underlay direction (written by the TX loop).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct TxCounters {
    /// Frames read from the TAPs.
    pub frames: AtomicU64,
    /// Bytes of those frames.
    pub bytes: AtomicU64,
    /// Frames sent to exactly one VTEP.
    pub unicast: AtomicU64,
    /// Frames replicated to a flood list (broadcast, multicast, unknown unicast).
    pub flooded: AtomicU64,
    /// Of those, ARP requests (a cluster network never floods one).
    pub arp_flooded: AtomicU64,
    /// Datagrams handed to the kernel (one per unicast frame, one per flood-list member).
    pub datagrams: AtomicU64,
    /// ARP requests answered locally instead of flooded.
    pub arp_replies: AtomicU64,
    /// Send system calls (each carries a batch of datagrams).
    pub send_calls: AtomicU64,
    /// Super-frames (TSO/USO from the TAP) cut into segments.
    pub segmented: AtomicU64,
    /// GSO sends: runs of up to 64 datagrams handed to the kernel as one (`UDP_SEGMENT`).
    pub gso_sends: AtomicU64,
    /// Times UDP GSO was refused by the kernel and switched off.
    pub gso_disabled: AtomicU64,
    /// Datagrams sent with VXLAN remote checksum offload (their inner checksum left partial
    /// for the receiving VTEP).
    pub remote_checksums: AtomicU64,
    /// Heap allocations made by the TX loop's thread since it started (see `alloc_count`).
    pub loop_allocations: AtomicU64,
}

/// Counters of the underlay → TAP direction (written by the RX loop).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct RxCounters {
    /// Datagrams received on the VXLAN port.
    pub datagrams: AtomicU64,
    /// Bytes of those datagrams.
    pub bytes: AtomicU64,
    /// Frames written to a TAP.
    pub delivered: AtomicU64,
    /// New or moved (MAC → VTEP) entries learned from the data plane.
    pub learned: AtomicU64,
    /// Entries not learned because the learned table was full.
    pub learn_table_full: AtomicU64,
    /// Learned entries removed after the ageing time.
    pub aged_out: AtomicU64,
    /// Receive system calls that returned data.
    pub recv_calls: AtomicU64,
    /// Inner TCP/UDP checksums a sender left partial and the agent completed.
    pub checksums_completed: AtomicU64,
    /// Datagrams received with VXLAN remote checksum offload (delivered with their inner
    /// checksum still partial, for the receiving kernel to trust or finish).
    pub remote_checksums: AtomicU64,
    /// Inner super-frames above the MTU cut into segments before delivery.
    pub resegmented: AtomicU64,
    /// Super-frames written to a TAP that joined two or more received TCP segments.
    pub coalesced: AtomicU64,
    /// Heap allocations made by the RX loop's thread since it started (see `alloc_count`).
    pub loop_allocations: AtomicU64,
}

/// All counters of one dataplane. The two directions sit on separate cache lines so the hot
/// loops do not share one.
#[derive(Debug, Default)]
pub struct Counters {
    /// TAP → underlay.
    pub tx: TxCounters,
    /// Underlay → TAP.
    pub rx: RxCounters,
    drops: DropCounters,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct DropCounters([AtomicU64; DROP_REASONS]);

impl Counters {
    /// Counts one drop.
    #[inline]
    pub fn dropped(&self, reason: DropReason) {
        bump(&self.drops.0[reason as usize], 1);
    }

    /// Counts one drop of a frame or datagram of the network `net` counts for: here and there.
    #[inline]
    pub fn dropped_in(&self, net: &NetworkCounters, reason: DropReason) {
        self.dropped(reason);
        bump(&net.drops.0[reason as usize], 1);
    }

    /// Drops so far for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.0[reason as usize].load(Relaxed)
    }

    /// A copy of every counter, for reports.
    pub fn snapshot(&self) -> CountersSnapshot {
        let t = &self.tx;
        let r = &self.rx;
        CountersSnapshot {
            tx_frames: t.frames.load(Relaxed),
            tx_bytes: t.bytes.load(Relaxed),
            tx_unicast: t.unicast.load(Relaxed),
            tx_flooded: t.flooded.load(Relaxed),
            tx_arp_flooded: t.arp_flooded.load(Relaxed),
            tx_datagrams: t.datagrams.load(Relaxed),
            tx_send_calls: t.send_calls.load(Relaxed),
            tx_segmented: t.segmented.load(Relaxed),
            tx_gso_sends: t.gso_sends.load(Relaxed),
            tx_gso_disabled: t.gso_disabled.load(Relaxed),
            tx_remote_checksums: t.remote_checksums.load(Relaxed),
            arp_replies: t.arp_replies.load(Relaxed),
            rx_datagrams: r.datagrams.load(Relaxed),
            rx_bytes: r.bytes.load(Relaxed),
            rx_delivered: r.delivered.load(Relaxed),
            rx_recv_calls: r.recv_calls.load(Relaxed),
            rx_checksums_completed: r.checksums_completed.load(Relaxed),
            rx_remote_checksums: r.remote_checksums.load(Relaxed),
            rx_resegmented: r.resegmented.load(Relaxed),
            rx_coalesced: r.coalesced.load(Relaxed),
            learned: r.learned.load(Relaxed),
            learn_table_full: r.learn_table_full.load(Relaxed),
            aged_out: r.aged_out.load(Relaxed),
            tx_loop_allocations: t.loop_allocations.load(Relaxed),
            rx_loop_allocations: r.loop_allocations.load(Relaxed),
            dropped: DropReason::ALL.iter().map(|&d| (d.name().to_owned(), self.drops(d))).collect(),
        }
    }
}

/// What came in to one network from one side.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct NetworkFlow {
    /// Frames (from the TAP), or datagrams carrying one (from the underlay).
    pub frames: AtomicU64,
    /// Bytes of those frames, without the VXLAN (or sealing) header.
    pub bytes: AtomicU64,
}

/// The counters of one network (one VNI), for per-network metrics: what came in from each side,
/// counted before the checks that may drop it, and every drop charged to the network, by reason.
///
/// A network's table entry holds them ([`crate::tables::NetworkTable::counters`]), so every
/// snapshot of the tables shares them and a hot loop reaches them with the table it already
/// looked up: no map, no lock. They are written as [`Counters`] are, each field by one loop (the
/// TX loop writes `tx` and the TAP-side drop reasons, the RX loop `rx` and the underlay-side
/// ones); the two directions sit on separate cache lines. A network that is removed and comes
/// back starts again from zero.
#[derive(Debug, Default)]
pub struct NetworkCounters {
    /// TAP → underlay: frames read from the network's TAP (sent by its containers on this host).
    pub tx: NetworkFlow,
    /// Underlay → TAP: datagrams received with the network's VNI.
    pub rx: NetworkFlow,
    drops: DropCounters,
}

impl NetworkCounters {
    /// A copy of every counter, for reports.
    pub fn snapshot(&self) -> NetworkCountersSnapshot {
        NetworkCountersSnapshot {
            tx_frames: self.tx.frames.load(Relaxed),
            tx_bytes: self.tx.bytes.load(Relaxed),
            rx_frames: self.rx.frames.load(Relaxed),
            rx_bytes: self.rx.bytes.load(Relaxed),
            dropped: DropReason::ALL
                .iter()
                .filter(|d| d.has_network())
                .map(|&d| (d.name().to_owned(), self.drops.0[d as usize].load(Relaxed)))
                .collect(),
        }
    }
}

/// A point-in-time copy of [`NetworkCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkCountersSnapshot {
    /// Frames read from the network's TAP.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Datagrams received with the network's VNI.
    pub rx_frames: u64,
    /// Bytes of the frames they carry.
    pub rx_bytes: u64,
    /// Drops charged to the network by reason name: every reason that can be
    /// ([`DropReason::has_network`]), zeros included.
    pub dropped: BTreeMap<String, u64>,
}

/// A point-in-time copy of [`Counters`], serializable for the CLI, JSON and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CountersSnapshot {
    /// Frames read from the TAPs.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames sent to exactly one VTEP.
    pub tx_unicast: u64,
    /// Frames replicated to a flood list.
    pub tx_flooded: u64,
    /// See [`TxCounters::arp_flooded`].
    pub tx_arp_flooded: u64,
    /// Datagrams sent to the underlay.
    pub tx_datagrams: u64,
    /// Send system calls.
    pub tx_send_calls: u64,
    /// Super-frames cut into segments.
    pub tx_segmented: u64,
    /// GSO sends.
    pub tx_gso_sends: u64,
    /// Times UDP GSO was switched off after a refusal.
    pub tx_gso_disabled: u64,
    /// Datagrams sent with remote checksum offload.
    pub tx_remote_checksums: u64,
    /// ARP requests answered locally.
    pub arp_replies: u64,
    /// Datagrams received.
    pub rx_datagrams: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames written to a TAP.
    pub rx_delivered: u64,
    /// Receive system calls that returned data.
    pub rx_recv_calls: u64,
    /// Partial inner checksums completed.
    pub rx_checksums_completed: u64,
    /// Datagrams received with remote checksum offload.
    pub rx_remote_checksums: u64,
    /// Super-frames segmented before delivery.
    pub rx_resegmented: u64,
    /// Coalesced super-frames written to a TAP.
    pub rx_coalesced: u64,
    /// Entries learned from the data plane.
    pub learned: u64,
    /// Entries not learned because the table was full.
    pub learn_table_full: u64,
    /// Learned entries aged out.
    pub aged_out: u64,
    /// Heap allocations of the TX loop's thread.
    pub tx_loop_allocations: u64,
    /// Heap allocations of the RX loop's thread.
    pub rx_loop_allocations: u64,
    /// Drops by reason name.
    pub dropped: BTreeMap<String, u64>,
}

impl CountersSnapshot {
    /// Drops for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason.name()).copied().unwrap_or(0)
    }

    /// Drops over all reasons.
    pub fn total_drops(&self) -> u64 {
        self.dropped.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_counted_apart() {
        let names: std::collections::HashSet<_> = DropReason::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(names.len(), DROP_REASONS);
        let c = Counters::default();
        c.dropped(DropReason::NotMember);
        c.dropped(DropReason::NotMember);
        c.dropped(DropReason::BadFlags);
        let s = c.snapshot();
        assert_eq!(s.drops(DropReason::NotMember), 2);
        assert_eq!(s.drops(DropReason::BadFlags), 1);
        assert_eq!(s.drops(DropReason::Truncated), 0);
        assert_eq!(s.total_drops(), 3);
    }

    #[test]
    fn a_drop_charged_to_a_network_counts_there_and_in_the_total() {
        let (c, net) = (Counters::default(), NetworkCounters::default());
        c.dropped_in(&net, DropReason::NotMember);
        c.dropped(DropReason::UnknownVni);
        let s = net.snapshot();
        assert_eq!(s.dropped.get("not_member"), Some(&1));
        assert_eq!(s.dropped.get("unknown_vni"), None, "never a network's: its VNI is unknown");
        assert_eq!(s.dropped.len(), DropReason::ALL.iter().filter(|d| d.has_network()).count(), "zeros included");
        assert_eq!(c.snapshot().total_drops(), 2);
    }
}
