//! Endpoint records: one change to one host's endpoint table, signed by that host.
//!
//! A host is the only writer of its table. Each change gets the next version of the table's
//! epoch (a new epoch starts each time the agent starts) and an Ed25519 signature under the
//! host's gossip signing key, whose public half the host registered in Raft when it joined.
//! Records travel as they were signed — piggybacked on SWIM messages, relayed by any host,
//! served in anti-entropy — and every receiver checks the signature against the owner's
//! registered key, so a host can neither add to nor delete from another host's table.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::state::NodeId;

/// Length of a record's signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Longest endpoint name, and longest alias.
pub const MAX_NAME_LEN: usize = 64;
/// Most aliases an endpoint record carries: with [`MAX_NAME_LEN`], a record stays under 800
/// bytes, so that it fits one gossip datagram beside SWIM's own messages.
pub const MAX_ALIASES: usize = 8;

/// Where an endpoint is: its network (by VNI) and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointKey {
    /// The network's VNI.
    pub vni: u32,
    /// The container's address.
    pub ip: Ipv4Addr,
}

/// What is known of an endpoint besides its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The container interface's MAC.
    pub mac: [u8; 6],
    /// The endpoint's name (as given at attach).
    pub name: String,
    /// Other names it answers to on its network (`attach --alias`, CNI's and Docker's
    /// aliases), for every host's DNS resolver: at most [`MAX_ALIASES`], each at most
    /// [`MAX_NAME_LEN`] bytes.
    ///
    /// Added in gossip format version 3 (see [`super::seal`]): a record is postcard, which
    /// has no room for fields an older decoder does not know (it refuses trailing bytes), so
    /// the datagram format's version went up with it and hosts of mixed versions refuse each
    /// other's datagrams, counted as `rx_other_version`, rather than misread them.
    pub aliases: Vec<String>,
    /// The service it is a replica of (`attach --service`), at most [`MAX_NAME_LEN`] bytes.
    ///
    /// Added with [`Endpoint::health`] in gossip format version 4, for the same reason as
    /// the aliases in 3.
    pub service: Option<String>,
    /// Its health as its host's checks of its service find it.
    pub health: Health,
}

/// A replica's health, as its own host's checks find it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Serving: no check, or its check passes.
    #[default]
    Healthy,
    /// Its check has not passed yet (it gets no traffic yet).
    Starting,
    /// Its check failed as many times in a row as the service allows.
    Unhealthy,
}

impl Health {
    /// Its word in `service inspect` and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Starting => "starting",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl Endpoint {
    /// Whether its name, aliases and service are within the bounds every host enforces on
    /// records.
    pub fn within_bounds(&self) -> bool {
        self.name.len() <= MAX_NAME_LEN
            && self.aliases.len() <= MAX_ALIASES
            && self.aliases.iter().all(|a| a.len() <= MAX_NAME_LEN)
            && self.service.as_ref().is_none_or(|s| s.len() <= MAX_NAME_LEN)
    }
}

/// The change a record makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The first record of an epoch: the owner (re)started its table; older epochs are void.
    Epoch,
    /// The endpoint exists.
    Put(EndpointKey, Endpoint),
    /// The endpoint is gone (a tombstone).
    Delete(EndpointKey),
}

/// The table slot a record fills: later versions of the same slot replace earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// The epoch marker.
    Epoch,
    /// An endpoint (present or deleted).
    Endpoint(EndpointKey),
}

#[derive(Serialize)]
struct BodyRef<'c> {
    owner: NodeId,
    epoch: u64,
    version: u64,
    change: &'c Change,
}

#[derive(Deserialize)]
struct Body {
    owner: NodeId,
    epoch: u64,
    version: u64,
    change: Change,
}

/// Why record bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not a record (bad encoding, trailing bytes, too short for a signature).
    #[error("malformed endpoint record")]
    Malformed,
    /// An endpoint name or alias longer than [`MAX_NAME_LEN`], more than [`MAX_ALIASES`]
    /// aliases, or version 0.
    #[error("endpoint record out of bounds")]
    OutOfBounds,
    /// The signature does not verify under the owner's key.
    #[error("endpoint record not signed by its owner")]
    Forged,
}

/// A host's gossip signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Signer").field(&hex::encode(self.public_key())).finish()
    }
}

impl Signer {
    /// A fresh key.
    pub fn generate() -> Signer {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("the system random source works");
        Signer::from_pkcs8(doc.as_ref()).expect("a freshly generated key parses")
    }

    /// A key from its PKCS#8 document (as [`Signer::pkcs8`] gives it).
    pub fn from_pkcs8(doc: &[u8]) -> Result<Signer, RecordError> {
        let pair = Ed25519KeyPair::from_pkcs8(doc).map_err(|_| RecordError::Malformed)?;
        Ok(Signer { pair, pkcs8: doc.to_vec() })
    }

    /// The PKCS#8 document, to store.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key others verify with.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.pair.public_key().as_ref().try_into().expect("an Ed25519 public key has 32 bytes")
    }
}

/// A signed record, with the bytes it travels as. Cheap to clone (shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record(Arc<RecordData>);

/// What a record says.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordData {
    /// The host whose table this is.
    pub owner: NodeId,
    /// The table's epoch.
    pub epoch: u64,
    /// The change's version within the epoch (from 1).
    pub version: u64,
    /// The change.
    pub change: Change,
    wire: Box<[u8]>,
}

impl std::ops::Deref for Record {
    type Target = RecordData;

    fn deref(&self) -> &RecordData {
        &self.0
    }
}

impl Record {
    /// Signs a change.
    pub fn sign(signer: &Signer, owner: NodeId, epoch: u64, version: u64, change: Change) -> Record {
        let body = BodyRef { owner, epoch, version, change: &change };
        let mut wire = postcard::to_stdvec(&body).expect("a record always encodes");
        let sig = signer.pair.sign(&wire);
        wire.extend_from_slice(sig.as_ref());
        Record(Arc::new(RecordData { owner, epoch, version, change, wire: wire.into() }))
    }

    /// Parses record bytes; the signature is not checked yet (see [`Record::verify`]).
    pub fn decode(wire: &[u8]) -> Result<Record, RecordError> {
        let body_len = wire.len().checked_sub(SIGNATURE_LEN).ok_or(RecordError::Malformed)?;
        let (body, rest): (Body, _) =
            postcard::take_from_bytes(&wire[..body_len]).map_err(|_| RecordError::Malformed)?;
        if !rest.is_empty() {
            return Err(RecordError::Malformed);
        }
        let change = body.change;
        if body.version == 0 || matches!(&change, Change::Put(_, e) if !e.within_bounds()) {
            return Err(RecordError::OutOfBounds);
        }
        Ok(Record(Arc::new(RecordData {
            owner: body.owner,
            epoch: body.epoch,
            version: body.version,
            change,
            wire: wire.into(),
        })))
    }

    /// Checks the signature against the owner's public key.
    pub fn verify(&self, public_key: &[u8; PUBLIC_KEY_LEN]) -> Result<(), RecordError> {
        let (body, sig) = self.wire.split_at(self.wire.len() - SIGNATURE_LEN);
        UnparsedPublicKey::new(&ED25519, public_key).verify(body, sig).map_err(|_| RecordError::Forged)
    }

    /// The bytes it travels as (body and signature).
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The slot it fills.
    pub fn slot(&self) -> Slot {
        match &self.change {
            Change::Epoch => Slot::Epoch,
            Change::Put(k, _) | Change::Delete(k) => Slot::Endpoint(*k),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> Change {
        Change::Put(
            EndpointKey { vni: 4096, ip: Ipv4Addr::new(10, 128, 1, 2) },
            Endpoint {
                mac: [2, 0x4f, 10, 128, 1, 2],
                name: "web-1".into(),
                aliases: vec!["www".into(), "front".into()],
                service: Some("web".into()),
                health: Health::Starting,
            },
        )
    }

    #[test]
    fn a_record_round_trips_and_verifies_under_its_owners_key_only() {
        let (a, b) = (Signer::generate(), Signer::generate());
        let r = Record::sign(&a, 7, 3, 12, put());
        let back = Record::decode(r.wire()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.verify(&a.public_key()), Ok(()));
        assert_eq!(back.verify(&b.public_key()), Err(RecordError::Forged));
        assert_eq!(back.slot(), Slot::Endpoint(EndpointKey { vni: 4096, ip: Ipv4Addr::new(10, 128, 1, 2) }));
        let again = Signer::from_pkcs8(a.pkcs8()).unwrap();
        assert_eq!(again.public_key(), a.public_key());
    }

    #[test]
    fn tampering_is_caught_and_garbage_is_refused() {
        let a = Signer::generate();
        let r = Record::sign(&a, 7, 3, 12, Change::Delete(EndpointKey { vni: 1, ip: Ipv4Addr::new(10, 0, 0, 9) }));
        for i in 0..r.wire().len() {
            let mut w = r.wire().to_vec();
            w[i] ^= 1;
            match Record::decode(&w) {
                Ok(t) => assert_eq!(t.verify(&a.public_key()), Err(RecordError::Forged), "byte {i}"),
                Err(e) => assert!(matches!(e, RecordError::Malformed | RecordError::OutOfBounds), "byte {i}: {e}"),
            }
        }
        assert_eq!(Record::decode(&[1, 2, 3]), Err(RecordError::Malformed));
        let mut long = r.wire().to_vec();
        long.insert(0, 0);
        assert!(Record::decode(&long).is_err() || Record::decode(&long).unwrap().verify(&a.public_key()).is_err());
        let big = Change::Put(
            EndpointKey { vni: 1, ip: Ipv4Addr::new(10, 0, 0, 9) },
            Endpoint { mac: [0; 6], name: "x".repeat(65), aliases: Vec::new(), service: None, health: Health::Healthy },
        );
        assert_eq!(Record::decode(Record::sign(&a, 1, 1, 1, big).wire()), Err(RecordError::OutOfBounds));
        assert_eq!(Record::decode(Record::sign(&a, 1, 1, 0, put()).wire()), Err(RecordError::OutOfBounds));
    }

    fn with_aliases(aliases: Vec<String>) -> Change {
        Change::Put(
            EndpointKey { vni: 1, ip: Ipv4Addr::new(10, 0, 0, 9) },
            Endpoint {
                mac: [2, 0x4f, 10, 0, 0, 9],
                name: "n".repeat(MAX_NAME_LEN),
                aliases,
                service: Some("s".repeat(MAX_NAME_LEN)),
                health: Health::Unhealthy,
            },
        )
    }

    #[test]
    fn aliases_travel_within_their_bounds_and_the_largest_record_fits_a_datagram() {
        let a = Signer::generate();
        let most = vec!["a".repeat(MAX_NAME_LEN); MAX_ALIASES];
        let r = Record::sign(&a, 7, 1, 1, with_aliases(most.clone()));
        let back = Record::decode(r.wire()).unwrap();
        assert!(matches!(&back.change, Change::Put(_, e) if e.aliases == most));
        assert_eq!(back.verify(&a.public_key()), Ok(()));
        // The gossip payload is 1400 - 52 bytes; a record must leave room for SWIM's own.
        assert!(r.wire().len() < 800, "{} bytes", r.wire().len());
        let mut too_many = most.clone();
        too_many.push("b".into());
        let too_long = vec!["a".repeat(MAX_NAME_LEN + 1)];
        for aliases in [too_many, too_long] {
            let r = Record::sign(&a, 7, 1, 1, with_aliases(aliases.clone()));
            assert_eq!(Record::decode(r.wire()), Err(RecordError::OutOfBounds), "{aliases:?}");
        }
    }

    /// A put as gossip format version 2 encoded it (no aliases), and what a version-2 decoder
    /// made of version 3's: neither is taken for the other.
    #[test]
    fn records_of_the_format_before_aliases_do_not_parse_and_vice_versa() {
        #[derive(Serialize, Deserialize)]
        struct OldEndpoint {
            mac: [u8; 6],
            name: String,
        }
        #[derive(Serialize, Deserialize)]
        enum OldChange {
            Epoch,
            Put(EndpointKey, OldEndpoint),
            Delete(EndpointKey),
        }
        #[derive(Serialize, Deserialize)]
        struct OldBody {
            owner: NodeId,
            epoch: u64,
            version: u64,
            change: OldChange,
        }
        let key = EndpointKey { vni: 1, ip: Ipv4Addr::new(10, 0, 0, 9) };
        let old = OldBody {
            owner: 7,
            epoch: 1,
            version: 1,
            change: OldChange::Put(key, OldEndpoint { mac: [2; 6], name: "web".into() }),
        };
        let mut wire = postcard::to_stdvec(&old).unwrap();
        wire.extend_from_slice(&[0; SIGNATURE_LEN]);
        assert_eq!(Record::decode(&wire), Err(RecordError::Malformed));
        let new = Record::sign(&Signer::generate(), 7, 1, 1, with_aliases(vec!["www".into()]));
        let body = &new.wire()[..new.wire().len() - SIGNATURE_LEN];
        let (_, rest): (OldBody, _) = postcard::take_from_bytes(body).unwrap();
        assert!(!rest.is_empty(), "a version-2 decoder finds trailing bytes, and refuses the record");
    }
}
