//! The gossip layer: which hosts are alive, and every host's endpoints.
//!
//! **What it is.** SWIM membership among all hosts (the `foca` crate) on its own UDP port,
//! each datagram sealed under the cluster's gossip key for one receiver, which takes it only
//! once and only from a host of the directory ([`seal`], [`replay`]; the key is rotated when a
//! node is removed, without cutting anyone off), beside it a ring watch in which every host
//! pings its successor each probe period, so that a dead host is suspected within a period
//! ([`ring`]); per-host endpoint tables that only their owner writes, as
//! owner-signed, versioned records piggybacked on SWIM messages; anti-entropy rounds that
//! repair whatever a host missed. Sans-IO: [`node::GossipNode`]
//! takes datagrams, timer expiries and local changes and returns datagrams, timers and
//! events, so the same code runs behind a UDP socket in the agent and over an in-memory
//! network with a simulated clock in [`sim`].
//!
//! **What it is not.** The agreed cluster state (that is Raft: [`crate::state`]), or the
//! dataplane: the agent turns [`node::Event`]s into table updates.
//!
//! **Neighbours.** Raft's node registry supplies the directory (each host's gossip address
//! and public key, see [`node::DirectoryEntry`]); the agent's gossip task drives the node and
//! programs the dataplane.

pub mod node;
pub mod record;
pub mod replay;
pub mod ring;
pub mod seal;
pub mod sim;
pub mod sync;
pub mod tables;
pub mod vecmap;

pub use node::{
    Directory, DirectoryEntry, Event, GossipConfig, GossipCounters, GossipNode, Output, Peer, PeerStatus, Timer,
};
pub use record::{Endpoint, EndpointKey, Health, Signer};
pub use seal::GossipKey;

/// The gossip port, UDP (as Docker swarm's).
pub const DEFAULT_PORT: u16 = 7946;
