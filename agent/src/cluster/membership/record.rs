//! `cluster.json`: what a host remembers of its cluster membership, written by `init` and
//! `join`, read back by `resume`. Apart from the rest of `membership` (which talks to the
//! cluster) so that the agent's fuzz targets compile the very reader the daemon runs.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use control::state::{NodeId, Role};
use serde::{Deserialize, Serialize};

use crate::statefile;

/// Its name in the state dir.
pub const MEMBERSHIP_FILE: &str = "cluster.json";

/// What a host remembers of its cluster membership (`cluster.json` in the state dir).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Membership {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    pub role: Role,
    /// Where other hosts reach this one's control API.
    pub advertise: SocketAddr,
    /// Its VTEP address.
    pub underlay: IpAddr,
    /// Managers known at join time (more are learned from the state).
    pub managers: Vec<SocketAddr>,
    /// Where its gossip socket is (UDP; the advertise address's IP).
    pub gossip: SocketAddr,
}

impl Membership {
    /// The membership kept in `dir` (`None`: not a member); a damaged file is named.
    pub fn load(dir: &Path) -> Result<Option<Membership>> {
        let path = dir.join(MEMBERSHIP_FILE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!("{} is damaged ({e}): this host's cluster membership cannot be read", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Keeps it in `dir`, atomically and durably.
    pub fn save(&self, dir: &Path) -> Result<()> {
        statefile::write_atomic(&dir.join(MEMBERSHIP_FILE), &serde_json::to_vec_pretty(self)?)
    }
}
