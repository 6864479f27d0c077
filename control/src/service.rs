//! Services (issue 15): one name and one virtual IP for several replicas.
//!
//! **What it is.** The service as the replicated state keeps it — its name, its network, its
//! mode (`vip`: one virtual IP the clients' hosts balance over the replicas; `dnsrr`: DNS
//! answers every replica), its ports, its published ports and its health check — with the
//! parsers of the CLI's words for them (`80/tcp`, `8080:80/tcp`, `tcp:8080`, `30s`) and the
//! checks that keep a bad one out of the state. Which containers are a service's replicas is
//! not here: each host says so for its own endpoints in gossip (their `services`), with their
//! health.
//!
//! **What it is not.** The load balancer, the health checker or DNS: the agent does those
//! from [`Service`] and gossip.
//!
//! **Neighbours.** [`crate::state`] applies `CreateService`/`RemoveService` (VIP allocation,
//! uniqueness of names and published ports); [`crate::convert`] puts a service on the wire.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cidr::Ipv4Cidr;

/// How clients reach a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// One virtual IP; each client's host spreads connections over the healthy replicas.
    #[default]
    Vip,
    /// DNS round robin: the name answers every healthy replica, no virtual IP.
    Dnsrr,
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceMode::Vip => "vip",
            ServiceMode::Dnsrr => "dnsrr",
        })
    }
}

impl FromStr for ServiceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ServiceMode, String> {
        match s {
            "vip" => Ok(ServiceMode::Vip),
            "dnsrr" => Ok(ServiceMode::Dnsrr),
            _ => Err(format!("{s:?} is not a service mode: vip or dnsrr")),
        }
    }
}

/// A transport protocol of a port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("{s:?} is not a protocol: tcp or udp")),
        }
    }
}

fn port_number(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a {what}: a number from 1 to 65535")),
        Ok(p) => Ok(p),
    }
}

/// A port of a service: `80/tcp`, `53/udp` (`80` is TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    /// The port, the same on the VIP and on the replicas.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

impl FromStr for ServicePort {
    type Err = String;
    fn from_str(s: &str) -> Result<ServicePort, String> {
        let (port, protocol) = s.split_once('/').unwrap_or((s, "tcp"));
        Ok(ServicePort { port: port_number(port, "port")?, protocol: protocol.parse()? })
    }
}

/// Where a published port is served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every host, to a healthy replica wherever it runs (swarm's routing mesh).
    #[default]
    Ingress,
    /// On each host to that host's own replicas only.
    Host,
}

impl fmt::Display for PublishMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        })
    }
}

/// A port published on the hosts: `8080:80/tcp` (host port 8080 to the replicas' 80),
/// `8080:80/tcp,host` for the host-local mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The port on the hosts' underlay addresses.
    pub published: u16,
    /// The replicas' port.
    pub target: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// Every host, or each host's own replicas.
    #[serde(default)]
    pub mode: PublishMode,
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.published, self.target, self.protocol)?;
        if self.mode == PublishMode::Host {
            f.write_str(",host")?;
        }
        Ok(())
    }
}

impl FromStr for PublishedPort {
    type Err = String;
    fn from_str(s: &str) -> Result<PublishedPort, String> {
        let (spec, mode) = match s.split_once(',') {
            None => (s, PublishMode::Ingress),
            Some((spec, "host")) => (spec, PublishMode::Host),
            Some((spec, "ingress")) => (spec, PublishMode::Ingress),
            Some((_, m)) => return Err(format!("{m:?} is not a publish mode: ingress (the default) or host")),
        };
        let (ports, protocol) = spec.split_once('/').unwrap_or((spec, "tcp"));
        let Some((published, target)) = ports.split_once(':') else {
            return Err(format!("{s:?} is not a published port: PUBLISHED:TARGET[/tcp|udp][,host], e.g. 8080:80/tcp"));
        };
        Ok(PublishedPort {
            published: port_number(published, "published port")?,
            target: port_number(target, "target port")?,
            protocol: protocol.parse()?,
            mode,
        })
    }
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProbe {
    /// Connects to this TCP port of the replica.
    Tcp(u16),
    /// GETs this path on the service's first TCP port: 2xx or 3xx passes.
    Http(String),
    /// Runs this command (through `sh -c`) in the replica's network namespace: exit 0 passes.
    Cmd(String),
}

/// A service's health check, run by each replica's host (Docker's names and defaults).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What it does.
    pub probe: HealthProbe,
    /// Between two checks (ms).
    pub interval_ms: u64,
    /// How long one check may take (ms).
    pub timeout_ms: u64,
    /// Failures in a row that make a replica unhealthy.
    pub retries: u32,
    /// After a replica appears, failures that do not count yet (ms).
    pub start_period_ms: u64,
}

/// Docker's defaults are 30 s, 30 s, 3, 0; a network agent's replicas should leave sooner.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
/// The default time one check may take.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1_000;
/// The default failures in a row before a replica is unhealthy.
pub const DEFAULT_HEALTH_RETRIES: u32 = 2;

/// Parses a duration as the CLI takes it: `500ms`, `2s`, `1m`, or plain seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration: e.g. 500ms, 2s, 1m");
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1_000).ok_or_else(bad)?,
        "m" => n.checked_mul(60_000).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(ms)
}

impl HealthCheck {
    /// Checks the bounds of its numbers and the probe's words.
    pub fn check(&self) -> Result<(), String> {
        match &self.probe {
            HealthProbe::Tcp(0) => return Err("the health check's TCP port must be 1 to 65535".into()),
            HealthProbe::Http(path)
                if !path.starts_with('/') || path.len() > 1024 || path.chars().any(char::is_whitespace) =>
            {
                return Err(format!(
                    "{path:?} is not an HTTP path for a health check: /PATH, no spaces, at most 1024 bytes"
                ));
            }
            HealthProbe::Cmd(cmd) if cmd.trim().is_empty() || cmd.len() > 4096 || cmd.contains('\0') => {
                return Err("the health check's command must be non-empty, at most 4096 bytes".into());
            }
            _ => {}
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err("--health-interval must be from 100ms to 1h".into());
        }
        if !(10..=600_000).contains(&self.timeout_ms) || self.timeout_ms > self.interval_ms {
            return Err("--health-timeout must be from 10ms to 10m, and no longer than --health-interval".into());
        }
        if !(1..=100).contains(&self.retries) {
            return Err("--health-retries must be from 1 to 100".into());
        }
        if self.start_period_ms > 3_600_000 {
            return Err("--health-start-period must be at most 1h".into());
        }
        Ok(())
    }
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.probe {
            HealthProbe::Tcp(p) => write!(f, "tcp {p}")?,
            HealthProbe::Http(path) => write!(f, "http GET {path}")?,
            HealthProbe::Cmd(c) => write!(f, "cmd {c:?}")?,
        }
        write!(
            f,
            " every {} ms, timeout {} ms, {} retries, start period {} ms",
            self.interval_ms, self.timeout_ms, self.retries, self.start_period_ms
        )
    }
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Unique in the cluster; a DNS label.
    pub name: String,
    /// The overlay network its replicas and clients are on.
    pub network: String,
    /// VIP or DNS round robin.
    pub mode: ServiceMode,
    /// Its virtual IP, from the network's subnet (`vip` mode only).
    pub vip: Option<Ipv4Addr>,
    /// Its ports (the VIP balances these; SRV records name them).
    pub ports: Vec<ServicePort>,
    /// Ports published on the hosts.
    pub published: Vec<PublishedPort>,
    /// Its health check; none: a replica is healthy while its endpoint lives.
    pub health: Option<HealthCheck>,
    /// When it was created (Unix seconds).
    pub created_at: u64,
}

/// A service that `service create` asks for: the service itself, its `vip` the user's choice
/// (none: the managers choose one in `vip` mode).
pub type NewService = Service;

/// The ports overlayd itself listens on, never published for a service.
pub const RESERVED_PORTS: &[(u16, Protocol, &str)] =
    &[(4789, Protocol::Udp, "VXLAN"), (7946, Protocol::Udp, "gossip"), (7947, Protocol::Tcp, "the control port")];

/// A host's address on a network for the routing mesh (published ports): where the
/// connections it takes in for a replica come from, on the overlay, and where the replica's
/// answers go back. It is the last address of the host's block (which no endpoint is given),
/// or, when that is the subnet's broadcast address (the subnet's last block), the block's
/// first; none for a block that is the whole subnet. Its MAC is derived from it as an
/// endpoint's is, so every host's dataplane finds its owner by the block.
pub fn mesh_address(subnet: Ipv4Cidr, block: Ipv4Cidr) -> Option<Ipv4Addr> {
    if block.prefix() <= subnet.prefix() || block.size() < 4 {
        return None;
    }
    let last = block.nth(block.size() - 1)?;
    if Some(last) != subnet.nth(subnet.size() - 1) {
        return Some(last);
    }
    let first = block.nth(0)?;
    (first != subnet.addr()).then_some(first)
}

/// The networks that have a service with a published port: every host takes part in their
/// routing mesh, with or without replicas of its own.
pub fn published_networks<'a>(services: impl IntoIterator<Item = &'a Service>) -> BTreeSet<String> {
    services.into_iter().filter(|s| !s.published.is_empty()).map(|s| s.network.clone()).collect()
}

/// Checks a service name: a DNS label (1 to 63 of a-z, 0-9, '-', not starting or ending with
/// '-'), so that `NAME`, `tasks.NAME` and `_80._tcp.NAME` are names.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name != "tasks";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid service name: 1 to 63 characters from a-z, 0-9 and '-' (a DNS label, not \
             starting or ending with '-', not \"tasks\")"
        ))
    }
}

impl Service {
    /// What can be checked without the state: the name, ports that are unique, published
    /// ports that are unique and not overlayd's own, a health check in bounds, and a VIP only
    /// in `vip` mode.
    pub fn check(&self) -> Result<(), String> {
        check_service_name(&self.name)?;
        if self.mode == ServiceMode::Dnsrr && self.vip.is_some() {
            return Err("a dnsrr service has no VIP: leave out --vip, or use --mode vip".into());
        }
        if self.ports.len() > 32 || self.published.len() > 32 {
            return Err("a service has at most 32 ports and 32 published ports".into());
        }
        for (i, p) in self.ports.iter().enumerate() {
            if self.ports[..i].contains(p) {
                return Err(format!("port {p} is given twice"));
            }
        }
        for (i, p) in self.published.iter().enumerate() {
            if let Some(q) = self.published[..i].iter().find(|q| q.published == p.published && q.protocol == p.protocol)
            {
                return Err(format!("port {}/{} is published twice ({q} and {p})", p.published, p.protocol));
            }
            if let Some((_, _, what)) =
                RESERVED_PORTS.iter().find(|(port, proto, _)| *port == p.published && *proto == p.protocol)
            {
                return Err(format!("port {}/{} is overlayd's own ({what}): publish another", p.published, p.protocol));
            }
        }
        if let Some(h) = &self.health {
            h.check()?;
            if matches!(h.probe, HealthProbe::Http(_)) && !self.ports.iter().any(|p| p.protocol == Protocol::Tcp) {
                return Err("--health-http checks the service's first TCP port: give one with --port".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_mesh_address_is_the_last_of_its_block_unless_that_is_the_broadcast() {
        let subnet: Ipv4Cidr = "10.128.0.0/16".parse().unwrap();
        let b = |s: &str| -> Ipv4Cidr { s.parse().unwrap() };
        assert_eq!(mesh_address(subnet, b("10.128.0.0/24")), Some(Ipv4Addr::new(10, 128, 0, 255)));
        assert_eq!(mesh_address(subnet, b("10.128.7.0/24")), Some(Ipv4Addr::new(10, 128, 7, 255)));
        assert_eq!(mesh_address(subnet, b("10.128.255.0/24")), Some(Ipv4Addr::new(10, 128, 255, 0)));
        assert_eq!(mesh_address(subnet, subnet), None, "one block for the whole subnet");
        assert_eq!(mesh_address(subnet, b("10.128.0.0/31")), None, "too small to spare an address");
    }

    fn spec() -> NewService {
        NewService {
            name: "web".into(),
            network: "front".into(),
            mode: ServiceMode::Vip,
            vip: None,
            ports: vec!["80/tcp".parse().unwrap()],
            published: vec!["8080:80".parse().unwrap()],
            health: None,
            created_at: 1,
        }
    }

    #[test]
    fn the_clis_words_parse_and_print_back() {
        assert_eq!("80".parse::<ServicePort>().unwrap(), ServicePort { port: 80, protocol: Protocol::Tcp });
        assert_eq!("53/udp".parse::<ServicePort>().unwrap().to_string(), "53/udp");
        let p: PublishedPort = "8053:53/udp,host".parse().unwrap();
        assert_eq!((p.published, p.target, p.protocol, p.mode), (8053, 53, Protocol::Udp, PublishMode::Host));
        assert_eq!(p.to_string(), "8053:53/udp,host");
        assert_eq!("8080:80".parse::<PublishedPort>().unwrap().to_string(), "8080:80/tcp");
        for bad in ["0/tcp", "80/sctp", "http", "70000"] {
            assert!(bad.parse::<ServicePort>().is_err(), "{bad}");
        }
        for bad in ["8080", "8080:0", ":80", "8080:80/tcp,mesh"] {
            let e = bad.parse::<PublishedPort>().unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("2s"), Ok(2_000));
        assert_eq!(parse_duration_ms("3"), Ok(3_000));
        assert_eq!(parse_duration_ms("1m"), Ok(60_000));
        assert!(
            parse_duration_ms("2h").is_err() && parse_duration_ms("").is_err() && parse_duration_ms("-1s").is_err()
        );
    }

    #[test]
    fn a_bad_service_is_refused_with_what_to_fix() {
        assert_eq!(spec().check(), Ok(()));
        let twice = NewService { published: vec!["8080:80".parse().unwrap(), "8080:81".parse().unwrap()], ..spec() };
        assert!(twice.check().unwrap_err().contains("published twice"));
        let udp_too =
            NewService { published: vec!["8080:80".parse().unwrap(), "8080:80/udp".parse().unwrap()], ..spec() };
        assert_eq!(udp_too.check(), Ok(()), "TCP and UDP are different ports");
        let own = NewService { published: vec!["7947:80".parse().unwrap()], ..spec() };
        assert!(own.check().unwrap_err().contains("control port"));
        for name in ["", "Web", "-web", "web-", "tasks", "a.b", &"x".repeat(64)] {
            assert!(NewService { name: name.into(), ..spec() }.check().is_err(), "{name:?}");
        }
        let dnsrr_vip = NewService { mode: ServiceMode::Dnsrr, vip: Some(Ipv4Addr::new(10, 0, 0, 9)), ..spec() };
        assert!(dnsrr_vip.check().unwrap_err().contains("no VIP"));
        let health = |probe| HealthCheck {
            probe,
            interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
            retries: DEFAULT_HEALTH_RETRIES,
            start_period_ms: 0,
        };
        assert_eq!(NewService { health: Some(health(HealthProbe::Http("/health".into()))), ..spec() }.check(), Ok(()));
        for bad in [HealthProbe::Tcp(0), HealthProbe::Http("health".into()), HealthProbe::Cmd(" ".into())] {
            assert!(NewService { health: Some(health(bad.clone())), ..spec() }.check().is_err(), "{bad:?}");
        }
        let slow = HealthCheck { timeout_ms: 5_000, ..health(HealthProbe::Tcp(80)) };
        assert!(NewService { health: Some(slow), ..spec() }.check().unwrap_err().contains("--health-timeout"));
        let no_tcp = NewService {
            ports: vec!["53/udp".parse().unwrap()],
            health: Some(health(HealthProbe::Http("/".into()))),
            ..spec()
        };
        assert!(no_tcp.check().unwrap_err().contains("TCP port"));
    }
}
