//! overlayd's userspace VXLAN dataplane.
//!
//! **What it is.** The part of overlayd that moves Ethernet frames between a host's containers
//! and other hosts inside VXLAN (RFC 7348, byte-compatible with Linux's vxlan device):
//! - [`wire`]: zero-copy views of the formats on the wire (our own VXLAN header; etherparse's
//!   slices for Ethernet, 802.1Q, ARP, IPv4, IPv6 and UDP);
//! - [`switch`]: the sans-IO switching core, frame in → decision out;
//! - [`tables`] and [`learn`]: the forwarding tables the hot loops read without locks, the
//!   writer API that programs them, and data-plane learning as a fallback;
//! - [`offload`] and [`segment`]: the virtio-net header of a TAP with offloads, TCP segments
//!   joined into super-frames, and super-frames cut into segments (sans-IO as well);
//! - [`crypto`]: sealing and opening the datagrams of encrypted networks (AES-256-GCM with a
//!   key per sender session, and a replay window), sans-IO as well;
//! - [`counters`]: what was forwarded and every drop by reason, in all and per network;
//! - [`alloc_count`]: a counting global allocator, so that "no per-packet allocation" is
//!   measured by tests and benchmarks;
//! - `linux` (Linux only): the I/O shell — TAP devices opened with ioctls, the UDP sockets,
//!   and the hot loops (a thread per direction, or one for both) with batched
//!   system calls and no per-packet allocation, lock or log line.
//!
//! **What it is not.** It does not talk to other agents, decide which networks exist or which
//! hosts are peers, or create bridges: that is `control` (cluster state) and `agent` (the
//! `overlayd` binary, host plumbing over netlink), which program this crate through
//! [`tables::SharedTables::update`] and [`linux::Dataplane`].
//!
//! **Neighbours.** `agent` builds a [`linux::Dataplane`] and attaches TAPs to it; `benches`
//! measures [`switch`] and [`wire`]; `testbed` drives the built binary end to end.

#![warn(missing_docs)]

pub mod alloc_count;
pub mod counters;
pub mod crypto;
pub mod learn;
pub mod offload;
pub mod segment;
pub mod switch;
pub mod tables;
pub mod wire;

#[cfg(target_os = "linux")]
pub mod linux;

pub use counters::{Counters, CountersSnapshot, DropReason, NetworkCounters, NetworkCountersSnapshot};
pub use wire::{MacAddr, Vni};
