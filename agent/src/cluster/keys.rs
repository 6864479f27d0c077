//! The keys of encrypted networks on this host: fetched from a manager (`Manager.NetworkKeys`,
//! over mutual TLS) whenever the view's key epochs say there is a new one, held in memory only,
//! and turned, at each moment, into what the dataplane opens and seals with ([`sealing`]).
//!
//! A rotation must lose nothing: every host takes the new key as soon as it hears of it (to
//! open with), but seals with it only [`SWITCH_AFTER`] the key was made, when every host has
//! had time to fetch it; and it keeps opening with the one before for [`ACCEPT_PREVIOUS_FOR`],
//! after which a key that was replaced (say, because a node holding it was removed) opens
//! nothing any more.
//!
//! Neighbours: `control::state` (the keys in the managers' secrets, the epochs in the view),
//! the reconciler (which puts [`sealing`]'s answer into each network's tables), `host` (which
//! hands it to the dataplane, `dataplane::tables::NetworkCrypto`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use control::state::Network;

/// How long after a key was made hosts start sealing with it.
pub const SWITCH_AFTER: Duration = Duration::from_secs(3);
/// How long after a key was made hosts still open datagrams sealed with the one before it.
pub const ACCEPT_PREVIOUS_FOR: Duration = Duration::from_secs(30);

/// A network key: its epoch (as the view counts them) and its 32 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey {
    pub epoch: u32,
    pub key: [u8; 32],
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key of epoch {}", self.epoch)
    }
}

/// Every encrypted network's keys as last fetched (oldest first).
pub type Keys = BTreeMap<String, Vec<EpochKey>>;

/// What a network's dataplane opens with (the keys) and seals with (the epoch `send`, if this
/// host has its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealKeys {
    pub keys: Vec<EpochKey>,
    pub send: Option<u32>,
}

impl SealKeys {
    /// The keys as the dataplane takes them (epochs on the wire are counted modulo 256).
    pub fn for_dataplane(&self) -> (Vec<dataplane::crypto::NetworkKey>, Option<u8>) {
        let keys =
            self.keys.iter().map(|k| dataplane::crypto::NetworkKey { epoch: k.epoch as u8, secret: k.key }).collect();
        (keys, self.send.map(|e| e as u8))
    }
}

/// What `net` opens and seals with at `now` (Unix seconds), from the keys `have`: the current
/// epoch's key, and the one before while [`ACCEPT_PREVIOUS_FOR`] has not passed; sealing with
/// the current one once [`SWITCH_AFTER`] has passed (or when the one before is not here).
/// With no key of the current epoch here yet, it opens with what it has and seals with the one
/// before if it may.
pub fn sealing(net: &Network, have: &[EpochKey], now: u64) -> SealKeys {
    let age = now.saturating_sub(net.key_made_at);
    let current = net.key_epoch;
    let previous = current.checked_sub(1).filter(|_| age < ACCEPT_PREVIOUS_FOR.as_secs());
    let keys: Vec<EpochKey> =
        have.iter().filter(|k| k.epoch == current || Some(k.epoch) == previous).cloned().collect();
    let has = |e: u32| keys.iter().any(|k| k.epoch == e);
    let send = match previous {
        Some(p) if age < SWITCH_AFTER.as_secs() && has(p) => Some(p),
        _ if has(current) => Some(current),
        Some(p) if has(p) => Some(p),
        _ => None,
    };
    SealKeys { keys, send }
}

/// When `sealing` next changes its answer for any network of `networks`, after `now` (Unix
/// seconds): the next switch or end of a window.
pub fn next_change<'a>(networks: impl IntoIterator<Item = &'a Network>, now: u64) -> Option<u64> {
    networks
        .into_iter()
        .filter(|n| n.encrypted && n.key_epoch > 0)
        .flat_map(|n| [n.key_made_at + SWITCH_AFTER.as_secs(), n.key_made_at + ACCEPT_PREVIOUS_FOR.as_secs()])
        .filter(|t| *t > now)
        .min()
}

/// Whether `have` lacks a key the view says exists (a new network, a rotation).
pub fn missing(networks: &BTreeMap<String, Network>, have: &Keys) -> bool {
    networks
        .values()
        .filter(|n| n.encrypted)
        .any(|n| !have.get(&n.name).is_some_and(|keys| keys.iter().any(|k| k.epoch == n.key_epoch)))
}

/// Fetches every encrypted network's keys from a manager.
pub async fn fetch(follower: &control::follower::Follower) -> Result<Keys> {
    let mut manager = follower.manager().await?;
    let reply = manager.network_keys(proto::Empty {}).await.context("cannot fetch the network keys")?.into_inner();
    let mut out = Keys::new();
    for (name, set) in reply.networks {
        let mut keys = Vec::new();
        for k in set.keys {
            let key: [u8; 32] =
                k.key.as_slice().try_into().context("a manager sent a network key of the wrong length")?;
            keys.push(EpochKey { epoch: k.epoch, key });
        }
        out.insert(name, keys);
    }
    Ok(out)
}

/// Keeps `keys` holding every encrypted network's keys the view names, fetching them when it
/// names one this host lacks (retrying every second while a manager does not have it yet).
pub async fn follow(follower: Arc<control::follower::Follower>, keys: tokio::sync::watch::Sender<Arc<Keys>>) {
    let mut views = follower.subscribe();
    loop {
        let lacking = missing(&views.borrow_and_update().networks, &keys.borrow());
        if lacking && !follower.removed() {
            match fetch(&follower).await {
                Ok(k) => {
                    keys.send_if_modified(|have| {
                        let changed = **have != k;
                        if changed {
                            *have = Arc::new(k);
                        }
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot fetch the network keys; retrying"),
            }
            if missing(&follower.view().networks, &keys.borrow()) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(epoch: u32, made_at: u64) -> Network {
        Network {
            name: "s".into(),
            vni: 4096,
            subnet: "10.128.0.0/16".parse().unwrap(),
            gateway: "10.128.0.1".parse().unwrap(),
            mtu: 1418,
            block_prefix: 24,
            created_at: 0,
            internal: false,
            encrypted: true,
            key_epoch: epoch,
            key_made_at: made_at,
        }
    }

    fn key(epoch: u32) -> EpochKey {
        EpochKey { epoch, key: [epoch as u8; 32] }
    }

    #[test]
    fn a_rotation_opens_with_both_keys_seals_with_the_new_one_after_a_moment_and_forgets_the_old() {
        let n = net(1, 1000);
        let both = [key(0), key(1)];
        let at = |t: u64| sealing(&n, &both, 1000 + t);
        assert_eq!(at(0), SealKeys { keys: both.to_vec(), send: Some(0) }, "every host hears of it first");
        assert_eq!(at(SWITCH_AFTER.as_secs()), SealKeys { keys: both.to_vec(), send: Some(1) });
        assert_eq!(
            at(ACCEPT_PREVIOUS_FOR.as_secs()),
            SealKeys { keys: vec![key(1)], send: Some(1) },
            "the old key goes"
        );
        // The new key not fetched yet: the old one still seals, while it may.
        assert_eq!(sealing(&n, &[key(0)], 1000), SealKeys { keys: vec![key(0)], send: Some(0) });
        assert_eq!(sealing(&n, &[key(0)], 1000 + ACCEPT_PREVIOUS_FOR.as_secs()), SealKeys { keys: vec![], send: None });
        // A new network: its one key at once.
        assert_eq!(sealing(&net(0, 5), &[key(0)], 5), SealKeys { keys: vec![key(0)], send: Some(0) });
        assert_eq!(next_change([&n], 1000), Some(1000 + SWITCH_AFTER.as_secs()));
        assert_eq!(next_change([&n], 1000 + ACCEPT_PREVIOUS_FOR.as_secs()), None);
    }

    #[test]
    fn a_key_the_view_names_and_this_host_lacks_is_missing() {
        let networks: BTreeMap<String, Network> = [("s".to_owned(), net(1, 0))].into();
        assert!(missing(&networks, &Keys::new()));
        assert!(missing(&networks, &[("s".to_owned(), vec![key(0)])].into()));
        assert!(!missing(&networks, &[("s".to_owned(), vec![key(0), key(1)])].into()));
        assert!(format!("{:?}", key(7)).find("07").is_none(), "no secret in Debug");
    }
}
