//! The Linux I/O shell around the switching core: TAP devices, the underlay sockets, and the
//! hot loops (TAP → underlay in `tx`, underlay → TAP in `rx`), on one thread while idle and a
//! thread per direction under load, or always one way ([`LoopThreads`]).

mod batch;
mod rx;
mod settings;
mod sys;
mod tap;
mod threads;
mod tx;
mod udp;

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

pub use settings::{DataplaneSettings, LoopThreads, Offloads, PortRange, parse_tcp_port, parse_udp_port};
pub use tap::{MAX_NAME_LEN, Tap, TapOffloads};
pub use udp::BindError;

use crate::counters::Counters;
use crate::learn::{self, LearnedFdb, SharedLearned};
use crate::tables::{NetworkSettings, SharedTables, TableError, Tables, Transaction};
use crate::wire::Vni;

/// Room in front of each frame read from a TAP for headers written in place (the virtio-net
/// header on read, then the VXLAN header). Received datagrams are read at the same offset.
const HEADROOM: usize = 64;

/// epoll data value of the transmit loop's wake-up eventfd (table slots are the TAPs' values).
const WAKE: u64 = u64::MAX;
/// epoll data value of the underlay socket, while the transmit loop's thread also receives.
const UNDERLAY: u64 = u64::MAX - 1;

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
    /// This host's VTEP address: the sockets are bound to it.
    pub(crate) local: IpAddr,
    pub(crate) settings: DataplaneSettings,
    pub(crate) tables: SharedTables<Arc<Tap>>,
    pub(crate) learned: SharedLearned,
    pub(crate) counters: Counters,
    pub(crate) stop: AtomicBool,
    pub(crate) tx_wake: sys::EventFd,
    pub(crate) rx_wake: sys::EventFd,
    /// UDP GSO is wanted and the kernel has not refused it yet.
    pub(crate) gso_ok: AtomicBool,
    /// The receive loop runs on a thread of its own (always with [`LoopThreads::PerDirection`],
    /// under load with [`LoopThreads::Auto`]).
    pub(crate) split: AtomicBool,
    /// How often [`LoopThreads::Auto`] split or joined the loops.
    pub(crate) loop_switches: AtomicU64,
    /// Nanoseconds the transmit thread of [`LoopThreads::Auto`] has spent working (not
    /// waiting), for the receive thread's decision to join.
    pub(crate) tx_busy_ns: AtomicU64,
    /// Set when a hot loop died.
    failure: Mutex<Option<String>>,
    clock_base: Instant,
}

impl Shared {
    /// A dataplane's shared state without sockets or loops, for unit tests of the loops' parts.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Shared {
        Shared {
            local: IpAddr::from([127, 0, 0, 1]),
            settings: DataplaneSettings::default(),
            tables: SharedTables::default(),
            learned: learn::shared_learned(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            tx_wake: sys::EventFd::new().expect("an eventfd"),
            rx_wake: sys::EventFd::new().expect("an eventfd"),
            gso_ok: AtomicBool::new(true),
            split: AtomicBool::new(false),
            loop_switches: AtomicU64::new(0),
            tx_busy_ns: AtomicU64::new(0),
            failure: Mutex::new(None),
            clock_base: Instant::now(),
        }
    }

    /// Seconds since the dataplane started: the clock of learning and ageing.
    pub(crate) fn now_secs(&self) -> u64 {
        self.clock_base.elapsed().as_secs()
    }
}

/// A running dataplane, the handle the agent holds: it starts the hot loops, attaches a TAP per
/// network, exposes the table writer API and the counters, and stops the loops on shutdown.
///
/// The loops share nothing mutable but atomics, the swapped table snapshots, and the receive
/// loop itself, which the thread running it holds behind a mutex (taken per wake-up by the
/// one thread that runs both directions, held across wake-ups by the receive thread; handed
/// over only when the loops split or join).
pub struct Dataplane {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    // The sockets live as long as the loops that use their fds.
    _sockets: udp::UnderlaySockets,
}

impl Dataplane {
    /// Binds the sockets and starts the loops. No network is attached yet.
    pub fn start(local: IpAddr, settings: DataplaneSettings) -> Result<Dataplane, DataplaneError> {
        let ports = settings.source_ports;
        if ports.count == 0 || ports.first == 0 || u32::from(ports.first) + u32::from(ports.count) - 1 > 65_535 {
            return Err(DataplaneError::Config(format!(
                "source ports {}+{} do not fit below 65536",
                ports.first, ports.count
            )));
        }
        if ports.contains(settings.vxlan_port) {
            return Err(DataplaneError::Config(format!(
                "the source port range {ports} contains the VXLAN port {}",
                settings.vxlan_port
            )));
        }
        let mut settings = settings;
        let sockets = udp::bind(local, settings.vxlan_port, (ports.first, ports.count), settings.socket_buffer_bytes)?;
        if settings.offloads.udp_gro && !sockets.enable_gro() {
            settings.offloads.udp_gro = false;
        }
        if !settings.offloads.tap {
            settings.offloads.coalesce = false;
        }
        let udp_gso = settings.offloads.udp_gso;
        let per_direction = settings.dataplane_threads == LoopThreads::PerDirection;
        let shared = Arc::new(Shared {
            local,
            settings,
            tables: SharedTables::default(),
            learned: learn::shared_learned(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            tx_wake: sys::EventFd::new().map_err(DataplaneError::Start)?,
            rx_wake: sys::EventFd::new().map_err(DataplaneError::Start)?,
            gso_ok: AtomicBool::new(udp_gso),
            split: AtomicBool::new(per_direction),
            loop_switches: AtomicU64::new(0),
            tx_busy_ns: AtomicU64::new(0),
            failure: Mutex::new(None),
            clock_base: Instant::now(),
        });
        let tx_fds: Vec<_> = sockets.tx.iter().map(AsRawFd::as_raw_fd).collect();
        let tx_loop = tx::TxLoop::new(Arc::clone(&shared), &tx_fds).map_err(DataplaneError::Start)?;
        let rx_loop = rx::RxLoop::new(Arc::clone(&shared), sockets.rx.as_raw_fd());
        let dp = Dataplane { shared, threads: Mutex::new(Vec::new()), _sockets: sockets };
        let spawn = |name: &'static str, f: Box<dyn FnOnce() + Send>| {
            let shared = Arc::clone(&dp.shared);
            std::thread::Builder::new().name(name.into()).spawn(move || {
                // A panic in a hot loop is a bug; make it visible to the owner instead of
                // leaving a dataplane that silently stopped moving one direction.
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    let why = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    *shared.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{name}: {why}"));
                }
            })
        };
        let mut threads = dp.threads.lock().unwrap_or_else(|p| p.into_inner());
        // The receive loop runs on the receive thread while the loops are split (always with
        // a thread per direction), on the transmit thread otherwise.
        let threads_setting = dp.shared.settings.dataplane_threads;
        let may_split = threads_setting == LoopThreads::Auto;
        let rx_fd = rx_loop.fd();
        let rx_loop = Arc::new(Mutex::new(rx_loop));
        let epoll = tx_loop.epoll();
        let tx_receives = threads_setting != LoopThreads::PerDirection;
        if tx_receives {
            tx_loop.watch_underlay(rx_fd).map_err(DataplaneError::Start)?;
        }
        let rx_for_tx = Arc::clone(&rx_loop);
        let name = if tx_receives { "overlayd-dp" } else { "overlayd-tx" };
        threads.push(
            spawn(name, Box::new(move || tx_loop.run(tx_receives.then_some(&*rx_for_tx), may_split)))
                .map_err(DataplaneError::Start)?,
        );
        if threads_setting != LoopThreads::One {
            threads.push(
                spawn("overlayd-rx", Box::new(move || rx::RxLoop::run(&rx_loop, may_split.then_some(&*epoll))))
                    .map_err(DataplaneError::Start)?,
            );
        }
        drop(threads);
        Ok(dp)
    }

    /// `Some(what)` if a hot loop has died (a bug): the dataplane no longer forwards in that
    /// direction, and the owner should stop and be restarted.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The settings it runs with (offloads the kernel refused are off).
    pub fn settings(&self) -> &DataplaneSettings {
        &self.shared.settings
    }

    /// The VTEP address it is bound to.
    pub fn local(&self) -> IpAddr {
        self.shared.local
    }

    /// Opens a TAP the way this dataplane wants it (with offloads unless they are off).
    pub fn open_tap(&self, name: &str) -> io::Result<Tap> {
        Tap::create(name, self.shared.settings.offloads.tap)
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
    pub fn update<R>(
        &self,
        f: impl FnOnce(&mut Transaction<Arc<Tap>>) -> Result<R, TableError>,
    ) -> Result<R, TableError> {
        let out = self.shared.tables.update(f)?;
        self.shared.tx_wake.notify();
        Ok(out)
    }

    /// An encrypted network's keys for [`Transaction::set_crypto`](crate::tables::Transaction::set_crypto):
    /// opened with `keys`, sealed with epoch `send`, in a session of its own (larger than any
    /// this host had before, this process or an earlier one: its start time in nanoseconds),
    /// so that a sealer made anew never repeats a nonce of an earlier one. Make one per change
    /// of keys and keep it while they stay the same: its counter goes on.
    pub fn network_crypto(
        &self,
        keys: Vec<crate::crypto::NetworkKey>,
        send: Option<u8>,
    ) -> Arc<crate::tables::NetworkCrypto> {
        Arc::new(crate::tables::NetworkCrypto::new(keys, send, self.shared.local, next_session()))
    }

    /// The current tables.
    pub fn tables(&self) -> Arc<Tables<Arc<Tap>>> {
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

    /// Whether the receive loop runs on a thread of its own right now, and how often
    /// [`LoopThreads::Auto`] has split or joined the loops.
    pub fn loops(&self) -> (bool, u64) {
        (self.shared.split.load(Ordering::Relaxed), self.shared.loop_switches.load(Ordering::Relaxed))
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

/// A sealing session number: nanoseconds since the Unix epoch, and above every one handed out
/// before in this process.
fn next_session() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}
