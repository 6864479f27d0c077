//! The dataplane's settings: what an operator chooses (by flag, environment or config file,
//! through the agent, which flattens [`DataplaneSettings`] into its own) and their defaults.
//! One type from the command line to [`Dataplane::start`](super::Dataplane::start).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::learn;

/// Settings of the dataplane (the address it binds to is given apart: it is the host's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default)]
pub struct DataplaneSettings {
    /// VXLAN UDP port, on this host and on the peers.
    #[cfg_attr(feature = "clap", arg(long, env = "OVERLAYD_VXLAN_PORT", value_name = "PORT", default_value_t = 4789,
        value_parser = parse_udp_port))]
    pub vxlan_port: u16,

    /// Outer UDP source ports; each inner flow keeps one, chosen by hash, for ECMP and RSS.
    #[cfg_attr(feature = "clap", arg(long, env = "OVERLAYD_SOURCE_PORTS", value_name = "FIRST-LAST",
        default_value_t = PortRange::DEFAULT))]
    pub source_ports: PortRange,

    /// Offloads: all, none, or a list of tap (TSO super-frames from the TAP), gso (UDP_SEGMENT
    /// sends), gro (UDP_GRO receives), coalesce (TCP segments joined for the TAP). For diagnosis
    /// and for measuring each on its own.
    #[cfg_attr(feature = "clap", arg(long, env = "OVERLAYD_OFFLOADS", value_name = "LIST", default_value_t = Offloads::default()))]
    pub offloads: Offloads,

    /// Threads of the hot loops. `auto` runs both directions on one thread while that thread
    /// is busy less than half the time, and gives each direction its own thread as soon as it
    /// is busier (joining them again when the load has gone): the round-trip time of one
    /// thread at low load, the throughput of two under load. `1` always runs both directions
    /// on one thread (what the kernel answers while the thread writes to a TAP, a ping's reply
    /// or a TCP ACK, leaves without waking another thread: lower round-trip time, less
    /// throughput than `2`); `2` always gives each direction its own thread.
    #[cfg_attr(feature = "clap", arg(long, env = "OVERLAYD_DATAPLANE_THREADS", value_name = "auto|1|2",
        default_value_t = LoopThreads::default()))]
    pub dataplane_threads: LoopThreads,

    /// Send and receive buffer size of every socket, in bytes.
    #[cfg_attr(feature = "clap", arg(skip = DEFAULT_SOCKET_BUFFER_BYTES))]
    #[serde(skip, default = "default_socket_buffer_bytes")]
    pub socket_buffer_bytes: usize,

    /// Bound on data-plane-learned entries.
    #[cfg_attr(feature = "clap", arg(skip = learn::DEFAULT_MAX_ENTRIES))]
    #[serde(skip, default = "default_max_learned")]
    pub max_learned: usize,

    /// Seconds after which an unrefreshed learned entry is removed.
    #[cfg_attr(feature = "clap", arg(skip = learn::DEFAULT_AGEING_SECS))]
    #[serde(skip, default = "default_ageing_secs")]
    pub ageing_secs: u64,
}

/// A UDP port given on the command line, 1 to 65535; the error says so in words (clap's own
/// range check would print a Rust range). clap names the flag before it.
pub fn parse_udp_port(s: &str) -> Result<u16, String> {
    parse_port(s, "UDP")
}

/// A TCP port given on the command line, 1 to 65535 (see [`parse_udp_port`]).
pub fn parse_tcp_port(s: &str) -> Result<u16, String> {
    parse_port(s, "TCP")
}

fn parse_port(s: &str, proto: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("give a {proto} port from 1 to 65535")),
    }
}

const DEFAULT_SOCKET_BUFFER_BYTES: usize = 7 << 20;

fn default_socket_buffer_bytes() -> usize {
    DEFAULT_SOCKET_BUFFER_BYTES
}

fn default_max_learned() -> usize {
    learn::DEFAULT_MAX_ENTRIES
}

fn default_ageing_secs() -> u64 {
    learn::DEFAULT_AGEING_SECS
}

impl Default for DataplaneSettings {
    fn default() -> DataplaneSettings {
        DataplaneSettings {
            vxlan_port: 4789,
            source_ports: PortRange::DEFAULT,
            offloads: Offloads::default(),
            dataplane_threads: LoopThreads::default(),
            socket_buffer_bytes: DEFAULT_SOCKET_BUFFER_BYTES,
            max_learned: learn::DEFAULT_MAX_ENTRIES,
            ageing_secs: learn::DEFAULT_AGEING_SECS,
        }
    }
}

/// Consecutive UDP ports, written `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// How many (at least 1, at most [`PortRange::MAX_COUNT`]).
    pub count: u16,
}

impl PortRange {
    /// 61000-61015, the outer source ports by default.
    pub const DEFAULT: PortRange = PortRange { first: 61_000, count: 16 };
    /// Most source ports (one socket each).
    pub const MAX_COUNT: u16 = 1024;

    /// The last port.
    pub fn last(self) -> u16 {
        self.first + (self.count - 1)
    }

    /// Whether `port` is one of them.
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last()).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last())
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let bad = || format!("{s:?} is not a port range; write FIRST-LAST, e.g. 61000-61015");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(format!("{s:?}: the first port must be 1 or more and not above the last"));
        }
        let count = last - first + 1;
        if count > PortRange::MAX_COUNT {
            return Err(format!("{s:?}: at most {} source ports (one socket each)", PortRange::MAX_COUNT));
        }
        Ok(PortRange { first, count })
    }
}

/// Which offloads the dataplane uses. All on by default; each can be turned off to diagnose or
/// to measure what it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// TAPs with `IFF_VNET_HDR` and `TUNSETOFFLOAD`: TCP super-frames from the kernel,
    /// checksums left to us, coalesced super-frames written back.
    pub tap: bool,
    /// `UDP_SEGMENT`: a run of datagrams to one VTEP in one send.
    pub udp_gso: bool,
    /// `UDP_GRO`: runs of datagrams received as one.
    pub udp_gro: bool,
    /// Joining received TCP segments into super-frames for the TAP (needs `tap`).
    pub coalesce: bool,
}

impl Default for Offloads {
    fn default() -> Offloads {
        Offloads { tap: true, udp_gso: true, udp_gro: true, coalesce: true }
    }
}

impl Offloads {
    /// None at all: one frame per system call, as classic userspace tunnels work.
    pub const NONE: Offloads = Offloads { tap: false, udp_gso: false, udp_gro: false, coalesce: false };

    /// Parses `all`, `none`, or a comma-separated list of `tap`, `gso`, `gro`, `coalesce`
    /// (those named are on, the others off).
    fn parse(s: &str) -> Result<Offloads, String> {
        match s.trim() {
            "all" => return Ok(Offloads::default()),
            "none" => return Ok(Offloads::NONE),
            _ => {}
        }
        let mut o = Offloads::NONE;
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "tap" => o.tap = true,
                "gso" => o.udp_gso = true,
                "gro" => o.udp_gro = true,
                "coalesce" => o.coalesce = true,
                other => {
                    return Err(format!(
                        "unknown offload {other:?}: write all, none, or a list of tap, gso, gro, coalesce (e.g. tap,gso)"
                    ));
                }
            }
        }
        if o.coalesce && !o.tap {
            return Err("coalesce needs tap (coalesced frames go to the TAP with a virtio-net header)".into());
        }
        Ok(o)
    }
}

/// How the hot loops are spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoopThreads {
    /// One thread runs both directions from one epoll: a frame that the kernel answers while
    /// the thread writes to a TAP (a ping's reply, a TCP ACK) is picked up by the thread that
    /// is already awake, with no cross-thread wake-up. Lower latency, less throughput.
    One,
    /// A thread per direction (TAP → underlay, underlay → TAP): more throughput (the
    /// receiving side's copies and the sending side's run on two cores), at the price of a
    /// wake-up per turnaround (see BENCHMARKS.md).
    PerDirection,
    /// The default: one thread while the loops are mostly idle (the low latency of [`One`]),
    /// split into a thread per direction as soon as that thread is busy more than half the
    /// time (the throughput of [`PerDirection`]), joined again when the load has gone. The
    /// receive loop moves between the threads at these switches only, never per packet.
    ///
    /// [`One`]: LoopThreads::One
    /// [`PerDirection`]: LoopThreads::PerDirection
    #[default]
    Auto,
}

impl LoopThreads {
    /// Parses `auto`, `1` or `2`.
    fn parse(s: &str) -> Result<LoopThreads, String> {
        match s.trim() {
            "1" => Ok(LoopThreads::One),
            "2" => Ok(LoopThreads::PerDirection),
            "auto" => Ok(LoopThreads::Auto),
            other => Err(format!(
                "{other:?} is not a setting for the hot loops' threads: write auto (one thread while idle, a thread per direction under load; the default), 1 (one thread for both directions) or 2 (one per direction)"
            )),
        }
    }

    /// The setting as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LoopThreads::One => "1",
            LoopThreads::PerDirection => "2",
            LoopThreads::Auto => "auto",
        }
    }
}

impl FromStr for Offloads {
    type Err = String;

    fn from_str(s: &str) -> Result<Offloads, String> {
        Offloads::parse(s)
    }
}

/// As written on the command line: `all`, `none`, or the list of those on.
impl fmt::Display for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Offloads::default() {
            return f.write_str("all");
        }
        if *self == Offloads::NONE {
            return f.write_str("none");
        }
        let on = [(self.tap, "tap"), (self.udp_gso, "gso"), (self.udp_gro, "gro"), (self.coalesce, "coalesce")];
        let words: Vec<&str> = on.iter().filter(|(on, _)| *on).map(|(_, w)| *w).collect();
        f.write_str(&words.join(","))
    }
}

impl FromStr for LoopThreads {
    type Err = String;

    fn from_str(s: &str) -> Result<LoopThreads, String> {
        LoopThreads::parse(s)
    }
}

impl fmt::Display for LoopThreads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A setting written as a string in config files (`"61000-61015"`, `"tap,gso"`).
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(PortRange);
serde_as_string!(Offloads);

impl Serialize for LoopThreads {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `auto`, `"1"`, `"2"`, or the numbers 1 and 2 (as a config file writes them).
impl<'de> Deserialize<'de> for LoopThreads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LoopThreads, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Count(i64),
            Word(String),
        }
        match Written::deserialize(d)? {
            Written::Count(n) => n.to_string().parse(),
            Written::Word(w) => w.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_written_first_dash_last() {
        assert_eq!("61000-61015".parse(), Ok(PortRange::DEFAULT));
        assert_eq!(PortRange::DEFAULT.to_string(), "61000-61015");
        assert_eq!(" 5 - 5 ".parse(), Ok(PortRange { first: 5, count: 1 }));
        assert!("5-1".parse::<PortRange>().unwrap_err().contains("not above the last"));
        assert!("0-3".parse::<PortRange>().is_err() && "x".parse::<PortRange>().unwrap_err().contains("FIRST-LAST"));
        assert!("1000-3000".parse::<PortRange>().unwrap_err().contains("at most 1024"));
        assert!(PortRange::DEFAULT.contains(61_015) && !PortRange::DEFAULT.contains(61_016));
    }

    #[test]
    fn settings_round_trip_through_their_written_form() {
        let s = DataplaneSettings {
            vxlan_port: 4790,
            source_ports: PortRange { first: 5000, count: 2 },
            offloads: Offloads { coalesce: false, ..Offloads::default() },
            dataplane_threads: LoopThreads::One,
            ..DataplaneSettings::default()
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"vxlan_port":4790,"source_ports":"5000-5001","offloads":"tap,gso,gro","dataplane_threads":"1"}"#
        );
        let back: DataplaneSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let numbers: DataplaneSettings = serde_json::from_str(r#"{"dataplane_threads": 2}"#).unwrap();
        assert_eq!(numbers.dataplane_threads, LoopThreads::PerDirection);
        assert_eq!(numbers.socket_buffer_bytes, DEFAULT_SOCKET_BUFFER_BYTES, "what is not written is the default");
        let e = serde_json::from_str::<DataplaneSettings>(r#"{"dataplane_threads": 3}"#).unwrap_err().to_string();
        assert!(e.contains("write auto"), "{e}");
    }
}
