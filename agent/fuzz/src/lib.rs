//! The agent's code its fuzz targets run. The agent is a binary crate, so the modules that
//! read bytes from outside and stand on their own are compiled in here from the agent's own
//! source files, by path: a target runs exactly what the daemon (or the CNI plugin) runs.
//!
//! Not part of the workspace: built by `cargo fuzz`, or `cargo run --example seeds`. Empty as a
//! test: the included modules' own tests need the whole agent, and run in its crate.
#![cfg(not(test))]

use std::path::PathBuf;
use std::sync::LazyLock;

#[path = "../../src/cni.rs"]
pub mod cni;
#[path = "../../src/config.rs"]
pub mod config;
#[path = "../../src/docker/wire.rs"]
pub mod docker_wire;
#[path = "../../src/endpoints/store.rs"]
pub mod endpoint_store;
#[path = "../../src/gossip/keyfiles.rs"]
pub mod gossip_keyfiles;
#[path = "../../src/cluster/membership/record.rs"]
pub mod membership;
#[path = "../../src/netdev/reply.rs"]
pub mod netdev_reply;
#[path = "../../src/statefile.rs"]
pub mod statefile;

/// The state dir `cni` falls back to, as the agent's `main` has it.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/overlayd";

/// The one item `cni` takes from the agent's `api` module, which serves the daemon's socket and
/// does not compile on its own: the plugin's connection to the daemon. The targets give the
/// plugin a daemon of their own, so none connects.
pub mod api {
    use std::path::Path;

    use proto::agent_client::AgentClient;
    use tonic::transport::Channel;

    pub async fn connect(state_dir: &Path) -> anyhow::Result<AgentClient<Channel>> {
        anyhow::bail!("a fuzz target reaches no daemon (asked for the one of {})", state_dir.display())
    }
}

/// The one item `config` takes from the agent's `host` module, which drives the host and does
/// not compile on its own: the VXLAN overhead, as `host::overhead` has it.
pub mod host {
    use std::net::IpAddr;

    /// Outer IPv4 20 (or IPv6 40) + UDP 8 + VXLAN 8 + inner Ethernet 14.
    pub fn overhead(addr: IpAddr) -> u32 {
        if addr.is_ipv4() { 50 } else { 70 }
    }
}

/// A directory of this process's own for the files a target reads: on tmpfs where there is
/// one, since the state files are synced on every write.
pub fn scratch_dir() -> &'static PathBuf {
    static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() };
        let dir = base.join(format!("overlayd-agent-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    });
    &DIR
}

/// The daemon's command line (`overlayd daemon`'s settings and network flags), as
/// `overlayd daemon` parses it.
pub fn daemon_command() -> clap::Command {
    use clap::Args as _;
    static COMMAND: LazyLock<clap::Command> = LazyLock::new(|| {
        let c = clap::Command::new("daemon").no_binary_name(true);
        config::FlagNetwork::augment_args(config::DaemonSettings::augment_args(c))
    });
    COMMAND.clone()
}
