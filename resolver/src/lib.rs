//! The sans-IO core of overlayd's embedded DNS resolver.
//!
//! **What it is.** Everything a per-network DNS resolver does that does not touch a socket:
//! - [`wire`]: DNS messages as zero-copy views (header, one question with bounded
//!   compression, the EDNS0 OPT record) and a writer of responses into the caller's buffer;
//! - [`names`]: the [`NameTable`], built from the agent's snapshot of every network's
//!   endpoints (name, aliases, IPv4 address), immutable, with lookups that allocate nothing;
//! - [`answer`]: [`Resolver::answer`], query bytes in → reply bytes out, or "forward", or
//!   "drop", with the semantics of Docker's embedded resolver (A for names, aliases and
//!   `NAME.NETWORK` of the asking network only, shuffled; PTR; NODATA for AAAA; TC when a
//!   UDP reply does not fit; NXDOMAIN instead of forwarding on internal networks);
//! - [`forward`]: the [`Forwarder`], a state machine that sends other names to the host's
//!   upstream resolvers (from resolv.conf) with Docker's failover rules and bounded time and
//!   memory;
//! - [`counters`]: what happened, for `overlayd_dns_*` metrics, every drop with its reason.
//!
//! **What it is not.** No sockets, no clock, no threads, no logging: time (`Instant`) and
//! randomness (`rand::Rng`) are arguments, and every output is written into a buffer the
//! caller owns. It does not learn names either: it answers from the table it is given.
//!
//! **Neighbours.** The agent's DNS shell (in `agent`) listens on each overlay network's gateway
//! address (UDP and TCP 53 on the host's bridge), builds a [`NameTable`] from the endpoint
//! tables the control plane replicates and gossips (its own endpoints and other hosts'),
//! swaps it in an `Arc` on every change, reads the host's resolv.conf into [`Upstreams`], and
//! moves bytes between its sockets and these calls:
//!
//! ```no_run
//! # use std::{net::*, time::Instant}; use resolver::*;
//! # let (table, query, client, upstream, reply): (NameTable, &[u8], SocketAddr, SocketAddr, &[u8]) = todo!();
//! let resolver = Resolver::new(ResolverConfig::default()); // TTL 5 s
//! let upstreams = Upstreams::from_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap(), &[]);
//! let mut fwd = Forwarder::new(upstreams, ForwarderConfig::default(), rand::rngs::StdRng::from_entropy());
//! let (mut counters, mut out, mut rng) = (Counters::default(), [0u8; 65535], rand::thread_rng());
//! match resolver.answer(&table, "blue", query, Transport::Udp, &mut rng, &mut out, &mut counters) {
//!     Outcome::Answer { len } | Outcome::NotFoundInternal { len } => { /* send out[..len] to client */ }
//!     Outcome::Forward => { let _send = fwd.forward(query, client, Instant::now(), &mut out, &mut counters); }
//!     Outcome::Drop(_) => {}
//! }
//! // An upstream's datagram, and the timer set to `fwd.poll_timeout()`:
//! let _send = fwd.handle_reply(upstream, reply, Instant::now(), &mut out, &mut counters);
//! while let Some(_send) = fwd.handle_timeout(Instant::now(), &mut out, &mut counters) {}
//! # use rand::SeedableRng;
//! ```

#![warn(missing_docs)]

pub mod answer;
pub mod counters;
pub mod forward;
pub mod names;
pub mod wire;

pub use answer::{Outcome, Resolver, ResolverConfig, Transport};
pub use counters::{Counters, DropReason};
pub use forward::{Forwarder, ForwarderConfig, Transmit, Upstreams};
pub use names::{NameTable, NameTableBuilder, NetworkNames};
pub use wire::WireError;
