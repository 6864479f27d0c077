//! overlayd's control plane.
//!
//! **What it is.** The state a cluster must agree on — nodes, join-token hashes and the CA,
//! networks, per-host address blocks — replicated with Raft (openraft 0.9, log and state
//! machine on redb) among the managers; the manager services (join, watch, network and node
//! operations) over gRPC with mutual TLS; and the watch through which every host follows the
//! state and resumes after a disconnect without losing an update.
//!
//! **What it is not.** Packet I/O, or host plumbing: the agent turns the state this crate
//! delivers into bridges, TAPs and dataplane tables.
//!
//! **Neighbours.** `proto` defines the wire messages; `agent` runs managers and followers and
//! owns the CLI; `dataplane` is programmed by the agent from [`state::ClusterView`].
#![warn(missing_docs)]

pub mod authz;
pub mod cidr;
pub mod convert;
pub mod follower;
pub mod gossip;
pub mod manager;
pub mod pki;
pub mod raft_net;
pub mod service;
pub mod state;
pub mod store;
pub mod transport;
pub mod types;
pub mod watch;
