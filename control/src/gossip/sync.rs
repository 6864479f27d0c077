//! Anti-entropy: the periodic exchange that repairs whatever the piggybacked deltas missed.
//!
//! Every round a host sends one random live member a [`SyncMessage::Hello`]: a fingerprint
//! of its replicas' positions in buckets of owners. The member answers for the buckets that
//! differ with its positions there ([`SyncMessage::Digest`]). Comparing, the first host pulls
//! the owners where it is behind ([`SyncMessage::Pull`]) and pushes the records of those
//! where the member is ([`SyncMessage::Records`]). Records are the owners' signed originals;
//! a `Records` message also says which stretch of the owner's history it completes, so the
//! receiver's watermark can pass versions that were superseded. In steady state a round
//! costs one small Hello and nothing else.

use serde::{Deserialize, Serialize};

use super::tables::Position;
use crate::state::NodeId;

/// One owner's position, as a digest lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The owner.
    pub owner: NodeId,
    /// Where the sender's replica of it stands.
    pub position: Position,
}

/// A member as a [`SyncMessage::Members`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its identity.
    pub peer: super::node::Peer,
    /// Its SWIM incarnation.
    pub incarnation: u16,
}

/// A request for an owner's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    /// The owner.
    pub owner: NodeId,
    /// The epoch wanted.
    pub epoch: u64,
    /// Versions above this one (0: all of the epoch).
    pub from: u64,
}

/// The anti-entropy messages (payloads of [`super::seal::Kind::Sync`] datagrams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMessage {
    /// The sender's positions, fingerprinted per bucket.
    Hello {
        /// One fingerprint per bucket (see [`super::tables::bucket`]).
        hashes: Vec<u64>,
        /// How many members the sender knows alive: a receiver that knows more sends them.
        members: u32,
    },
    /// Members the sender holds alive, for a host that knows fewer.
    Members {
        /// Each with its incarnation.
        members: Vec<MemberInfo>,
    },
    /// The sender suspects the receiver (which should refute at once).
    Suspected {
        /// The sender's node id.
        by: NodeId,
        /// The receiver's incarnation the suspicion is about.
        incarnation: u16,
    },
    /// The sender's positions for some buckets that differ from the Hello's.
    Digest {
        /// How many buckets (as in the Hello).
        buckets: u16,
        /// The buckets this digest covers completely.
        covered: Vec<u16>,
        /// The sender's positions of the owners in them.
        summaries: Vec<Summary>,
    },
    /// Send me these.
    Pull {
        /// What is wanted.
        wants: Vec<Want>,
    },
    /// Records of one owner's epoch with versions in `(from, upto]`: all the sender holds of
    /// that stretch, which its watermark says is complete.
    Records {
        /// The owner.
        owner: NodeId,
        /// The epoch.
        epoch: u64,
        /// The stretch starts after this version.
        from: u64,
        /// And ends with this one.
        upto: u64,
        /// The signed records, as they travel.
        items: Vec<serde_bytes_vec::Bytes>,
    },
}

/// `Vec<u8>` items serialized as byte strings.
pub mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Record bytes.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Bytes(pub Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
            }
            d.deserialize_bytes(V)
        }
    }
}

impl SyncMessage {
    /// Encodes into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&postcard::to_stdvec(self).expect("a sync message always encodes"));
    }

    /// Decodes a whole payload.
    pub fn decode(payload: &[u8]) -> Option<SyncMessage> {
        match postcard::take_from_bytes(payload) {
            Ok((m, [])) => Some(m),
            _ => None,
        }
    }
}

/// How many buckets a Hello uses for `owners` replicas: about 32 owners per bucket, a power
/// of two, at most 128 (a 1 KiB Hello).
pub fn buckets_for(owners: usize) -> u16 {
    let want = owners.div_ceil(32).max(1).next_power_of_two();
    want.min(128) as u16
}

/// Bytes a Records message adds around its items (generous).
pub const RECORDS_OVERHEAD: usize = 48;
/// Bytes a summary takes in a Digest.
pub fn summary_len(s: &Summary) -> usize {
    varint_len(s.owner) + varint_len(s.position.epoch) + varint_len(s.position.watermark)
}

fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_does_not_decode() {
        let msgs = [
            SyncMessage::Hello { hashes: vec![1, u64::MAX], members: 3 },
            SyncMessage::Suspected { by: 4, incarnation: 2 },
            SyncMessage::Digest {
                buckets: 4,
                covered: vec![1, 3],
                summaries: vec![Summary { owner: 3, position: Position { epoch: 2, watermark: 9 } }],
            },
            SyncMessage::Pull { wants: vec![Want { owner: 3, epoch: 2, from: 0 }] },
            SyncMessage::Records {
                owner: 3,
                epoch: 2,
                from: 4,
                upto: 9,
                items: vec![serde_bytes_vec::Bytes(vec![1, 2, 3])],
            },
        ];
        let mut buf = Vec::new();
        for m in msgs {
            m.encode(&mut buf);
            assert_eq!(SyncMessage::decode(&buf), Some(m.clone()));
            buf.push(0);
            assert_eq!(SyncMessage::decode(&buf), None, "trailing bytes");
        }
        assert_eq!(SyncMessage::decode(&[0xff; 20]), None);
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(1000), 32);
        assert_eq!(buckets_for(100_000), 128);
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let s = Summary { owner: v, position: Position { epoch: v, watermark: v } };
            assert_eq!(summary_len(&s), postcard::to_stdvec(&s).unwrap().len(), "{v}");
        }
    }
}
