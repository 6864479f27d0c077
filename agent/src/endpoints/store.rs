//! `endpoints.json`: the endpoints of this host as the state dir keeps them, written on every
//! attach and detach, read back at start. Apart from the rest of `endpoints` (which plumbs and
//! gossips) so that the agent's fuzz targets compile the very reader the daemon runs.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Result, bail};
use control::cidr::Ipv4Cidr;
use control::gossip::Health;
use dataplane::MacAddr;
use serde::{Deserialize, Serialize};

use crate::statefile;

/// One container attached to one network on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub network: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The network's prefix length (the container sees the whole subnet on-link).
    pub prefix_len: u8,
    pub mac: MacAddr,
    /// The veth end on the bridge.
    pub host_ifname: String,
    /// The container's namespace as given (path).
    pub netns: String,
    /// The namespace's identity (device, inode), to recognise it under another path.
    pub netns_id: (u64, u64),
    /// The interface inside the namespace.
    pub ifname: String,
    /// The runtime's id of the container (CNI_CONTAINERID, Docker's endpoint id); empty for
    /// `overlayd attach`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// Who attached it.
    #[serde(default)]
    pub origin: Origin,
    /// Other names it answers to on its network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The service it is a replica of (`attach --service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The CNI network configuration (its `name`) that attached it, for CNI's GC of that
    /// configuration; empty unless the CNI plugin attached it (and for what an older overlayd
    /// attached, which GC leaves alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni_network: String,
}

/// Who attached an endpoint: its lifecycle is the same, whoever it was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `overlayd attach`.
    #[default]
    Attach,
    /// A container runtime through the CNI plugin.
    Cni,
    /// Docker through the network driver.
    Docker,
}

impl Origin {
    /// Its name in the API and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Attach => "attach",
            Origin::Cni => "cni",
            Origin::Docker => "docker",
        }
    }

    /// The origin an attach request names (`""`: `overlayd attach`).
    pub fn parse(s: &str) -> Result<Origin> {
        Ok(match s {
            "" | "attach" => Origin::Attach,
            "cni" => Origin::Cni,
            "docker" => Origin::Docker,
            other => bail!("{other:?} is not an endpoint origin (attach, cni or docker)"),
        })
    }
}

/// The endpoints of this host, persisted in the state dir.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStore {
    /// Attached: plumbed and committed.
    pub endpoints: Vec<LocalEndpoint>,
    /// Attaches begun and not committed: on disk only while one is under way, or after a crash
    /// in the middle of one (rolled back at start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<LocalEndpoint>,
    /// Addresses Docker's IPAM handed out: taken, whether an endpoint holds them yet (or still)
    /// or not, until Docker releases them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved: Vec<Reservation>,
    /// The health of the replicas here, as their checks last found it, by (network, address);
    /// not kept across a restart: the checks start again (see `endpoints::replica_health`).
    #[serde(skip)]
    pub health: HashMap<(String, Ipv4Addr), Health>,
}

/// An address handed out by Docker's IPAM (see [`EndpointStore::reserved`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub network: String,
    pub ip: Ipv4Addr,
}

/// Why the store file could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// It holds no valid store (JSON error): it can be set aside and the store rebuilt.
    Corrupt(anyhow::Error),
    /// It could not be read at all.
    Unreadable(anyhow::Error),
}

/// Where the store is kept: its file, or (in tests) a disk that fails when told to.
pub trait Persist {
    /// Replaces what is kept with `store`, durably.
    fn persist(&self, store: &EndpointStore) -> Result<()>;
}

impl Persist for Path {
    fn persist(&self, store: &EndpointStore) -> Result<()> {
        store.save(self)
    }
}

impl EndpointStore {
    /// Loads the store (empty if the file does not exist).
    pub fn load(path: &Path) -> Result<EndpointStore, LoadError> {
        match std::fs::read(path) {
            Ok(b) => EndpointStore::from_slice(&b)
                .map_err(|e| LoadError::Corrupt(anyhow::anyhow!("{} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EndpointStore::default()),
            Err(e) => {
                Err(LoadError::Unreadable(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))))
            }
        }
    }

    /// The store a file holds; an error means the file is corrupt.
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<EndpointStore> {
        serde_json::from_slice(bytes)
    }

    /// Saves it: atomically and durably ([`statefile::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        statefile::write_atomic(path, &serde_json::to_vec_pretty(self)?)
    }

    /// The lowest free address of `block` for `network`: not the block's first or last
    /// address, not the gateway, not held by an endpoint (or an attach under way).
    pub fn allocate(&self, network: &str, block: Ipv4Cidr, gateway: Ipv4Addr) -> Option<Ipv4Addr> {
        let taken = |ip: Ipv4Addr| ip == gateway || self.holder(network, ip).is_some();
        (1..block.size().saturating_sub(1)).filter_map(|n| block.nth(n)).find(|ip| !taken(*ip))
    }

    /// Who holds `ip` of `network`: an endpoint's name (or an attach under way), or Docker's
    /// IPAM.
    pub fn holder(&self, network: &str, ip: Ipv4Addr) -> Option<&str> {
        if let Some(e) = self.endpoints.iter().chain(&self.pending).find(|e| e.network == network && e.ip == ip) {
            return Some(&e.name);
        }
        self.reserved.iter().any(|r| r.network == network && r.ip == ip).then_some("Docker's IPAM")
    }

    /// Whether this host still uses `network` (an endpoint, an attach under way, or an address
    /// Docker holds).
    pub fn uses(&self, network: &str) -> bool {
        self.endpoints.iter().chain(&self.pending).any(|e| e.network == network)
            || self.reserved.iter().any(|r| r.network == network)
    }

    /// Endpoints of one network.
    pub fn in_network<'a>(&'a self, network: &'a str) -> impl Iterator<Item = &'a LocalEndpoint> + 'a {
        self.endpoints.iter().filter(move |e| e.network == network)
    }
}
