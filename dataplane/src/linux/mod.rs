//! The Linux I/O shell around the switching core: TAP devices, the underlay sockets, and one
//! hot-loop thread per direction (TAP → underlay in `tx`, underlay → TAP in `rx`).
//!
//! [`Dataplane`] is the handle the agent holds: it starts the loops, attaches a TAP per
//! network, exposes the table writer API and the counters, and stops the loops on shutdown.
//! The loops share nothing mutable but atomics and the swapped table snapshots.

mod rx;
mod sys;
mod tap;
mod tx;
mod udp;

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

pub use tap::{MAX_NAME_LEN, Tap};
pub use udp::BindError;

use crate::counters::Counters;
use crate::learn::{self, LearnedFdb, SharedLearned};
use crate::tables::{NetworkSettings, SharedTables, TableError, Tables, Transaction};
use crate::wire::Vni;

/// What the tables hold per network in the Linux shell: its TAP.
pub type Port = Arc<Tap>;

/// Settings of the dataplane.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// This host's underlay address (its VTEP address). Sockets bind to it.
    pub local: IpAddr,
    /// The VXLAN UDP port, 4789 by default (Linux's vxlan defaults to 8472; say `dstport 4789`).
    pub port: u16,
    /// First outer source port; `source_port_count` consecutive ports are bound for sending.
    pub source_port_base: u16,
    /// How many source ports (and sending sockets) the flow hash spreads over.
    pub source_port_count: u16,
    /// Send and receive buffer size of every socket, in bytes.
    pub socket_buffer_bytes: usize,
    /// Bound on data-plane-learned entries.
    pub max_learned: usize,
    /// Seconds after which an unrefreshed learned entry is removed.
    pub ageing_secs: u64,
}

impl DataplaneConfig {
    /// Defaults for a VTEP at `local`.
    pub fn new(local: IpAddr) -> DataplaneConfig {
        DataplaneConfig {
            local,
            port: 4789,
            source_port_base: 61_000,
            source_port_count: 16,
            socket_buffer_bytes: 7 << 20,
            max_learned: learn::DEFAULT_MAX_ENTRIES,
            ageing_secs: learn::DEFAULT_AGEING_SECS,
        }
    }
}

/// Why the dataplane could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A socket could not be bound (address not on this host, port in use, …).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The configuration cannot work.
    #[error("invalid dataplane configuration: {0}")]
    Config(String),
    /// A table update was refused.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The hot-loop threads or their wake-up descriptors could not be created.
    #[error("cannot start the hot loops: {0}")]
    Start(#[source] io::Error),
}

pub(crate) struct Shared {
    pub(crate) config: DataplaneConfig,
    pub(crate) tables: SharedTables<Port>,
    pub(crate) learned: SharedLearned,
    pub(crate) counters: Counters,
    pub(crate) stop: AtomicBool,
    pub(crate) tx_wake: sys::EventFd,
    pub(crate) rx_wake: sys::EventFd,
    clock_base: Instant,
}

impl Shared {
    /// Seconds since the dataplane started: the clock of learning and ageing.
    pub(crate) fn now_secs(&self) -> u64 {
        self.clock_base.elapsed().as_secs()
    }
}

/// A running dataplane: two hot-loop threads and the handle to program them.
pub struct Dataplane {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    // The sockets live as long as the loops that use their fds.
    _sockets: udp::UnderlaySockets,
}

impl Dataplane {
    /// Binds the sockets and starts the loops. No network is attached yet.
    pub fn start(config: DataplaneConfig) -> Result<Dataplane, DataplaneError> {
        if config.source_port_count == 0 {
            return Err(DataplaneError::Config("at least one source port is needed".into()));
        }
        let last = u32::from(config.source_port_base) + u32::from(config.source_port_count) - 1;
        if config.source_port_base == 0 || last > u32::from(u16::MAX) {
            return Err(DataplaneError::Config(format!(
                "source ports {}..={last} do not fit in 1..=65535",
                config.source_port_base
            )));
        }
        let vxlan_port = config.port;
        if (config.source_port_base..=last as u16).contains(&vxlan_port) {
            return Err(DataplaneError::Config(format!("the source port range contains the VXLAN port {vxlan_port}")));
        }
        let sockets = udp::bind(
            config.local,
            config.port,
            (config.source_port_base, config.source_port_count),
            config.socket_buffer_bytes,
        )?;
        let shared = Arc::new(Shared {
            config,
            tables: SharedTables::default(),
            learned: learn::shared_learned(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            tx_wake: sys::EventFd::new().map_err(DataplaneError::Start)?,
            rx_wake: sys::EventFd::new().map_err(DataplaneError::Start)?,
            clock_base: Instant::now(),
        });
        let tx_fds: Vec<_> = sockets.tx.iter().map(AsRawFd::as_raw_fd).collect();
        let tx_loop = tx::TxLoop::new(Arc::clone(&shared), &tx_fds).map_err(DataplaneError::Start)?;
        let rx_loop = rx::RxLoop::new(Arc::clone(&shared), sockets.rx.as_raw_fd());
        let dp = Dataplane { shared, threads: Mutex::new(Vec::new()), _sockets: sockets };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().name(name.into()).spawn(f);
        let mut threads = dp.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.push(spawn("overlayd-tx", Box::new(move || tx_loop.run())).map_err(DataplaneError::Start)?);
        threads.push(spawn("overlayd-rx", Box::new(move || rx_loop.run())).map_err(DataplaneError::Start)?);
        drop(threads);
        Ok(dp)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DataplaneConfig {
        &self.shared.config
    }

    /// Attaches a network: frames of `tap` go out with `vni`, and datagrams with `vni` come in
    /// through it. Returns the network's slot.
    pub fn add_network(&self, vni: Vni, tap: Tap, settings: NetworkSettings) -> Result<usize, DataplaneError> {
        let slot = self.shared.tables.update(|tx| tx.add_network(vni, Arc::new(tap), settings))?;
        self.shared.tx_wake.notify();
        Ok(slot)
    }

    /// Detaches a network. Its TAP closes once no loop holds a snapshot that names it.
    pub fn remove_network(&self, vni: Vni) -> Result<(), DataplaneError> {
        self.shared.tables.update(|tx| tx.remove_network(vni))?;
        self.shared.tx_wake.notify();
        Ok(())
    }

    /// The writer API: applies `f`'s FDB, ARP and flood-list changes as one update.
    pub fn update<R>(&self, f: impl FnOnce(&mut Transaction<Port>) -> Result<R, TableError>) -> Result<R, TableError> {
        let out = self.shared.tables.update(f)?;
        self.shared.tx_wake.notify();
        Ok(out)
    }

    /// The current tables.
    pub fn tables(&self) -> Arc<Tables<Port>> {
        self.shared.tables.load()
    }

    /// The current data-plane-learned FDB.
    pub fn learned(&self) -> Arc<LearnedFdb> {
        self.shared.learned.load_full()
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Seconds on the dataplane's clock (the time base of learned entries' `last_seen`).
    pub fn now_secs(&self) -> u64 {
        self.shared.now_secs()
    }

    /// Stops the loops and waits for them; idempotent. Also done on drop. The TAPs close when
    /// the last handle on the tables goes.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.tx_wake.notify();
        self.shared.rx_wake.notify();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // Drop the networks so their TAPs close now, not when the handle is dropped.
        let vnis: Vec<_> = self.shared.tables.load().networks().map(|(_, n)| n.vni()).collect();
        let _ = self.shared.tables.update(|tx| vnis.iter().try_for_each(|v| tx.remove_network(*v).map(drop)));
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}
