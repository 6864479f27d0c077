//! The agent's code its fuzz targets run. The agent is a binary crate, so the modules that
//! read bytes from outside and stand on their own are compiled in here from the agent's own
//! source files, by path: a target runs exactly what the daemon runs.
//!
//! Not part of the workspace: built by `cargo fuzz`, or `cargo run --example seeds`. Empty as a
//! test: the included modules' own tests need the whole agent, and run in its crate.
#![cfg(not(test))]

use std::path::PathBuf;
use std::sync::LazyLock;

#[path = "../../src/config.rs"]
pub mod config;
#[path = "../../src/cluster/membership/record.rs"]
pub mod membership;
#[path = "../../src/netdev/reply.rs"]
pub mod netdev_reply;
#[path = "../../src/statefile.rs"]
pub mod statefile;

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
