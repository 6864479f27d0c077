//! What the resolver and the forwarder did, as plain counters: the shell owns one
//! [`Counters`] per network's resolver, passes it by `&mut` to every call, and exports it to
//! Prometheus as `overlayd_dns_*`.

use crate::wire::WireError;

macro_rules! drop_reasons {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal, )*) => {
        /// Why a message got no reply at all. Every drop has one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason { $( $(#[doc = $doc])* $variant, )* }

        impl DropReason {
            /// Every reason, in counter order (`self as usize` indexes [`Counters::dropped`]).
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant),*];
            /// How many there are.
            pub const COUNT: usize = Self::ALL.len();

            /// The reason's name in metrics (`overlayd_dns_dropped_total{reason="…"}`).
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    /// A query shorter than the 12-byte header: there is no ID to answer with.
    ShortQuery = "short_query",
    /// A message with QR set sent to the resolver: answering responses invites loops.
    NotAQuery = "not_a_query",
    /// The caller's output buffer cannot hold the reply or the query to forward (a bug in
    /// the shell: 64 KiB always suffices).
    OutputTooSmall = "output_too_small",
    /// A query handed to the forwarder that the resolver would not have forwarded (no header
    /// or no single well-formed question).
    NotForwardable = "not_forwardable",
    /// An upstream reply shorter than a header, with QR clear, or whose question does not parse.
    ReplyMalformed = "reply_malformed",
    /// An upstream reply whose ID matches no query in flight (late, duplicate or spoofed).
    ReplyUnknownId = "reply_unknown_id",
    /// An upstream reply with a known ID from another address than the upstream asked.
    ReplyWrongSource = "reply_wrong_source",
    /// An upstream reply whose question is not the one asked.
    ReplyWrongQuestion = "reply_wrong_question",
}

/// Counters of one resolver (one network on one host). Plain `u64`s: the shell's task owns
/// them; if it wants to publish them to another thread it copies the struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Messages handed to [`crate::Resolver::answer`].
    pub queries: u64,
    /// Replies handed to the shell for a client, by RCODE (index = the 4-bit code, see
    /// [`crate::wire::rcode::name`]): the resolver's own and the upstreams' alike.
    pub answers: [u64; 16],
    /// NOERROR replies without an answer: the name is ours but not with that type (AAAA).
    pub nodata: u64,
    /// Replies cut to the client's UDP size, with TC set.
    pub truncated: u64,
    /// Names not found on an internal network, answered NXDOMAIN instead of forwarded.
    pub internal_nxdomain: u64,
    /// Queries for a network the table does not have, answered REFUSED.
    pub unknown_network: u64,
    /// Queries of other classes than IN, answered REFUSED.
    pub refused_class: u64,
    /// Queries handed to the forwarder.
    pub forwarded: u64,
    /// Queries sent to an upstream, first tries and retries.
    pub upstream_queries: u64,
    /// Upstream tries that got no reply in time.
    pub upstream_timeouts: u64,
    /// Upstream replies with SERVFAIL (the next upstream is tried).
    pub upstream_servfail: u64,
    /// Upstream replies with REFUSED (the next upstream is tried).
    pub upstream_refused: u64,
    /// Forwarded queries answered SERVFAIL because every upstream failed or the time ran out.
    pub forward_failed: u64,
    /// Forwarded queries answered SERVFAIL at once: too many in flight.
    pub forward_table_full: u64,
    /// Forwarded queries answered SERVFAIL at once: no upstream is configured.
    pub forward_no_upstream: u64,
    /// Upstream replies too large for the shell's buffer, answered SERVFAIL.
    pub forward_reply_too_large: u64,
    /// Queries longer than [`crate::forward::MAX_FORWARDED_QUERY_LEN`], answered REFUSED.
    pub forward_query_too_large: u64,
    /// Malformed queries (answered FORMERR), by reason (index = `WireError as usize`).
    pub malformed: [u64; WireError::COUNT],
    /// Messages that got no reply, by reason (index = `DropReason as usize`).
    pub dropped: [u64; DropReason::COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            queries: 0,
            answers: [0; 16],
            nodata: 0,
            truncated: 0,
            internal_nxdomain: 0,
            unknown_network: 0,
            refused_class: 0,
            forwarded: 0,
            upstream_queries: 0,
            upstream_timeouts: 0,
            upstream_servfail: 0,
            upstream_refused: 0,
            forward_failed: 0,
            forward_table_full: 0,
            forward_no_upstream: 0,
            forward_reply_too_large: 0,
            forward_query_too_large: 0,
            malformed: [0; WireError::COUNT],
            dropped: [0; DropReason::COUNT],
        }
    }
}

impl Counters {
    /// Replies sent with `rcode`.
    pub fn answered(&self, rcode: u8) -> u64 {
        self.answers[(rcode & 0x0f) as usize]
    }

    /// Messages dropped for `reason`.
    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    /// Malformed queries for `error`.
    pub fn malformed_for(&self, error: WireError) -> u64 {
        self.malformed[error as usize]
    }

    /// Every message dropped, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    #[inline]
    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }

    #[inline]
    pub(crate) fn answer(&mut self, rcode: u8) {
        self.answers[(rcode & 0x0f) as usize] += 1;
    }
}
