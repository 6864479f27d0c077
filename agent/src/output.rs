//! What the CLI prints: the daemon's replies as tables, or as JSON with `--json`.

use std::fmt::Write as _;

use anyhow::Result;
use proto as pb;
use serde::Serialize;

/// Prints `reply` as JSON (see [`absent_as_null`]) or through `human`.
pub fn print<T: Serialize>(json: bool, reply: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    let text = if json {
        let mut v = serde_json::to_value(reply)?;
        absent_as_null(&mut v);
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        human(reply)
    };
    use std::io::Write as _;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// In the JSON the CLI prints, a field that has no value is `null`: the replies' empty strings
/// (an address, a block, a reason that does not apply) become `null`. Numbers and lists stay as
/// they are (a count of 0 is a count).
pub fn absent_as_null(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) if s.is_empty() => *v = Value::Null,
        Value::Array(items) => items.iter_mut().for_each(absent_as_null),
        Value::Object(fields) => fields.values_mut().for_each(absent_as_null),
        _ => {}
    }
}

/// A warning for a cluster left with `managers` managers, if that is an even number: Raft needs
/// a majority, so 2 managers survive no loss (as 1 does) and 4 survive one (as 3 do).
pub fn even_managers(managers: usize) -> Option<String> {
    (managers > 0 && managers.is_multiple_of(2)).then(|| {
        format!(
            "the cluster now has {managers} managers: Raft needs a majority of them, so an even number tolerates no \
             more lost managers than one fewer ({} of {managers}); make it an odd number (join or remove one)",
            managers / 2 - 1
        )
    })
}

/// What kind of failure ended a command, and the exit code that says so (README, "Scripting").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 1: the daemon or the cluster refused the request, or it failed (the message says why).
    Refused,
    /// 2: bad usage: an unknown flag, a malformed value (clap's own code too).
    Usage,
    /// 3: no daemon answers at the state dir.
    Unreachable,
    /// 4: not permitted: not root, or a worker asking what only a manager may do.
    NotPermitted,
    /// 5: no such network, node, service or endpoint.
    NotFound,
    /// 6: not now: no leader or quorum, not in a cluster yet; retrying later may succeed.
    Unavailable,
}

impl Failure {
    pub fn exit_code(self) -> i32 {
        match self {
            Failure::Refused => 1,
            Failure::Usage => 2,
            Failure::Unreachable => 3,
            Failure::NotPermitted => 4,
            Failure::NotFound => 5,
            Failure::Unavailable => 6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Usage => "usage",
            Failure::Unreachable => "unreachable",
            Failure::NotPermitted => "not_permitted",
            Failure::NotFound => "not_found",
            Failure::Unavailable => "unavailable",
        }
    }

    /// The class of `e`: from a [`Failure`] or a daemon's [`tonic::Status`] in its chain, else
    /// [`Failure::Refused`].
    pub fn of(e: &anyhow::Error) -> Failure {
        // anyhow finds a context's type at any depth of the chain.
        if let Some(c) = e.downcast_ref::<Classified>() {
            return c.0;
        }
        if let Some(s) = e.downcast_ref::<Refusal>() {
            return match s.0 {
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Failure::Usage,
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Failure::NotPermitted,
                tonic::Code::NotFound => Failure::NotFound,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Failure::Unavailable,
                _ => Failure::Refused,
            };
        }
        Failure::Refused
    }
}

/// An error message with its class (for [`Failure::of`]), e.g. as an `anyhow` context.
#[derive(Debug)]
pub struct Classified(pub Failure, pub String);

impl std::fmt::Display for Classified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Classified {}

/// The daemon's refusal of a request: its gRPC code (for [`Failure::of`]) and its message.
#[derive(Debug)]
pub struct Refusal(pub tonic::Code, pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Refusal {}

/// The CLI's last word on a failed command: the message on stderr and, with `--json`, the
/// error as JSON on stdout; returns the exit code.
pub fn failed(e: &anyhow::Error, json: bool) -> i32 {
    let class = Failure::of(e);
    let message = format!("{e:#}");
    #[allow(clippy::print_stderr)]
    {
        eprintln!("overlayd: {message}");
    }
    if json {
        let v = serde_json::json!({
            "error": { "class": class.name(), "exit_code": class.exit_code(), "message": message }
        });
        #[allow(clippy::print_stdout)]
        {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
    }
    class.exit_code()
}

/// A command line clap refuses: with `--json` among the arguments, clap's message on stderr and
/// the error as JSON on stdout (as [`failed`] prints every other error), exit code 2; without,
/// clap's own output and exit. Help and version requests are printed as clap does.
pub fn usage_error(e: clap::Error, json: bool) -> ! {
    if !json || !e.use_stderr() {
        e.exit();
    }
    let _ = e.print();
    // clap's text without its "error: " and the usage and hint that follow the message.
    let text = e.to_string();
    let message = text.split("\n\nUsage:").next().unwrap_or(&text);
    let message = message.split("\n\nFor more information").next().unwrap_or(message);
    let message = message.trim().trim_start_matches("error:").trim();
    let class = Failure::Usage;
    let v = serde_json::json!({
        "error": { "class": class.name(), "exit_code": class.exit_code(), "message": message }
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    std::process::exit(class.exit_code())
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn role(v: i32) -> &'static str {
    match pb::Role::try_from(v) {
        Ok(pb::Role::Manager) => "manager",
        Ok(pb::Role::Worker) => "worker",
        _ => "?",
    }
}

pub fn status(s: &pb::StatusReply) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "overlayd {} (pid {}), {} mode, up {}s", s.version, s.pid, s.mode, s.uptime_secs);
    if s.mode == "idle" {
        o.push_str("not in a cluster: run `overlayd init` to start one, or `overlayd join MANAGER --token TOKEN`\n");
        return o;
    }
    if let Some(c) = &s.cluster {
        let leader = if c.leader_id != 0 { format!(", leader {}", c.leader_id) } else { String::new() };
        let link =
            if c.connected { format!("following {}", c.connected_to) } else { "NOT connected to a manager".into() };
        let _ = writeln!(
            o,
            "cluster    {} as node {} ({}, {}), API {}{leader}\nstate      revision {}, {link}",
            c.cluster_id,
            c.node_id,
            c.node_name,
            role(c.role),
            c.api_addr,
            c.revision
        );
        if c.removed {
            o.push_str(
                "REMOVED    removed from the cluster: run `overlayd leave --force` to forget the membership here \
                 (the managers refuse this node's certificate; `overlayd join` with a token makes it a new node)\n",
            );
        }
        if let Some(h) = &c.handshakes {
            let _ = writeln!(
                o,
                "control    TLS handshakes: {} completed, {} failed, {} timed out, {} in progress; refused: {} source busy, {} full",
                h.completed, h.failed, h.timed_out, h.in_progress, h.refused_source_busy, h.refused_full
            );
        }
    }
    let _ = writeln!(
        o,
        "underlay   {} on {} (MTU {}), VXLAN port {}, source ports {}",
        s.underlay_addr,
        s.underlay_interface,
        s.underlay_mtu.unwrap_or_default(),
        s.vxlan_port.unwrap_or_default(),
        s.source_ports
    );
    if let Some(f) = &s.offloads {
        let _ = writeln!(
            o,
            "offloads   tap {}  udp gso {}  udp gro {}  coalesce {}",
            on(f.tap),
            on(f.udp_gso),
            on(f.udp_gro),
            on(f.coalesce)
        );
    }
    if s.dataplane_threads > 0 {
        let now = if s.dataplane_threads == 1 { "1 thread for both directions" } else { "a thread per direction" };
        if s.dataplane_threads_setting == "auto" {
            let _ = writeln!(
                o,
                "hot loops  auto: {now} now (one while idle, one per direction under load; switches so far: {})",
                s.dataplane_loop_switches
            );
        } else {
            let _ = writeln!(o, "hot loops  {now}");
        }
    }
    let _ = writeln!(
        o,
        "\nNETWORK     VNI       BRIDGE         TAP            MTU    LEARN  FLOOD  FDB    LEARNED  ARP    BLOCKS  LOCAL BLOCK"
    );
    for n in &s.networks {
        let _ = writeln!(
            o,
            "{:<11} {:<9} {:<14} {:<14} {:<6} {:<6} {:<6} {:<6} {:<8} {:<6} {:<7} {}",
            n.name,
            n.vni,
            n.bridge,
            n.tap,
            n.mtu,
            if n.learning { "yes" } else { "no" },
            n.flood_list.len(),
            n.fdb_entries,
            n.learned_entries,
            n.arp_entries,
            n.blocks,
            if n.local_block.is_empty() { "-" } else { &n.local_block }
        );
    }
    for n in s.networks.iter().filter(|n| !n.sealing.is_empty() && n.sealing != "none") {
        let _ = writeln!(o, "{:<11} encrypted: {}", n.name, n.sealing);
    }
    // Per network, by the names of the JSON's `networks[].counters` (and of /metrics).
    for n in &s.networks {
        let Some(c) = &n.counters else { continue };
        let drops: Vec<String> = c.dropped.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "{:<11} tx_frames {}  tx_bytes {}  rx_frames {}  rx_bytes {}  dropped {}",
            n.name,
            c.tx_frames,
            c.tx_bytes,
            c.rx_frames,
            c.rx_bytes,
            if drops.is_empty() { "none".to_owned() } else { drops.join("  ") }
        );
    }
    if let Some(c) = &s.counters {
        let v = |k: &str| c.values.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "\nTAP -> underlay   tx_frames {}  tx_bytes {}  tx_unicast {}  tx_flooded {}  tx_datagrams {}  tx_gso_sends {}  arp_replies {}",
            v("tx_frames"),
            v("tx_bytes"),
            v("tx_unicast"),
            v("tx_flooded"),
            v("tx_datagrams"),
            v("tx_gso_sends"),
            v("arp_replies")
        );
        let _ = writeln!(
            o,
            "underlay -> TAP   rx_datagrams {}  rx_bytes {}  rx_delivered {}  rx_coalesced {}  learned {}  aged_out {}",
            v("rx_datagrams"),
            v("rx_bytes"),
            v("rx_delivered"),
            v("rx_coalesced"),
            v("learned"),
            v("aged_out")
        );
        let drops: Vec<String> = c.dropped.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
        let _ =
            writeln!(o, "dropped           {}", if drops.is_empty() { "none".to_owned() } else { drops.join("  ") });
        if s.allocation_counting {
            let _ = writeln!(
                o,
                "hot-loop heap allocations since start: tx {}  rx {}",
                v("tx_loop_allocations"),
                v("rx_loop_allocations")
            );
        }
    }
    o
}

pub fn fdb(r: &pb::FdbReply) -> String {
    let mut o = String::new();
    for n in &r.networks {
        let flood = if n.flood_list.is_empty() { "(empty)".into() } else { n.flood_list.join(", ") };
        let _ = writeln!(o, "network {} (vni {})  flood list: {flood}", n.name, n.vni);
        if !n.blocks.is_empty() {
            let _ = writeln!(o, "  BLOCK               VTEP");
            for b in &n.blocks {
                let note = if b.down { "  (host down: nothing sent)" } else { "" };
                let _ = writeln!(o, "  {:<19} {}{note}", b.cidr, if b.local { "local" } else { &b.vtep });
            }
        }
        if !n.fdb.is_empty() {
            let _ = writeln!(o, "  MAC                 VTEP                                     ORIGIN   AGE");
            for e in &n.fdb {
                let age = e.age_secs.map_or("-".into(), |a| format!("{a}s"));
                let _ = writeln!(o, "  {:<19} {:<40} {:<8} {}", e.mac, e.vtep, e.origin, age);
            }
        }
        if !n.arp.is_empty() {
            let _ = writeln!(o, "  ARP answers:");
            for a in &n.arp {
                let _ = writeln!(o, "  {:<19} is-at {}", a.ip, a.mac);
            }
        }
        o.push('\n');
    }
    if r.networks.is_empty() {
        o.push_str("no networks on this host\n");
    }
    o
}

/// The gossip counters of `overlayd peers`, in groups, by the names of the JSON's `counters`
/// (a counter no group names is printed under "other").
const PEER_COUNTER_GROUPS: [(&str, &[&str]); 5] = [
    ("datagrams", &["rx_datagrams", "rx_bytes", "tx_datagrams", "tx_bytes"]),
    (
        "refused",
        &[
            "rx_not_gossip",
            "rx_other_version",
            "rx_bad_auth",
            "rx_malformed",
            "rx_replayed",
            "rx_stale_generation",
            "rx_misdirected",
            "rx_unknown_sender",
            "tx_not_in_directory",
        ],
    ),
    (
        "records",
        &[
            "records_applied",
            "records_stale",
            "records_forged",
            "records_unknown_owner",
            "records_malformed",
            "sync_rounds",
            "sync_repaired",
            "sync_records_sent",
        ],
    ),
    (
        "swim",
        &[
            "suspicions",
            "refutations",
            "rebirths",
            "probe_cycles_incomplete",
            "probe_timers_disconnected",
            "swim_unencodable",
            "records_not_piggybacked",
            "cluster_size_refused",
            "swim_unexpected",
        ],
    ),
    ("ring", &["ring_pings", "ring_acks", "ring_suspicions", "ring_unproven"]),
];

/// `overlayd peers`: the columns and counters by the JSON's names (`--json`), upper-cased.
pub fn peers(r: &pb::PeersReply) -> String {
    let mut o = String::from(
        "NODE_ID  NAME                 GOSSIP_ADDR            STATE    RAFT_STATUS  GENERATION        INCARNATION  \
         TABLE_EPOCH:TABLE_VERSION  ENDPOINTS\n",
    );
    for p in &r.peers {
        let table = if p.table_epoch == 0 { "-".to_owned() } else { format!("{}:{}", p.table_epoch, p.table_version) };
        let _ = writeln!(
            o,
            "{:<8} {:<20} {:<22} {:<8} {:<12} {:<17} {:<12} {:<26} {}",
            p.node_id, p.name, p.gossip_addr, p.state, p.raft_status, p.generation, p.incarnation, table, p.endpoints
        );
    }
    let c = &r.counters;
    let named =
        |keys: &[&str]| keys.iter().map(|k| format!("{k} {}", c.get(*k).copied().unwrap_or(0))).collect::<Vec<_>>();
    o.push_str("\ncounters\n");
    for (group, keys) in PEER_COUNTER_GROUPS {
        let _ = writeln!(o, "  {group:<10} {}", named(keys).join("  "));
    }
    let others: Vec<&str> = c
        .keys()
        .map(String::as_str)
        .filter(|k| !PEER_COUNTER_GROUPS.iter().any(|(_, keys)| keys.contains(k)))
        .collect();
    if !others.is_empty() {
        let _ = writeln!(o, "  {:<10} {}", "other", named(&others).join("  "));
    }
    o
}

pub fn init(r: &pb::InitReply) -> String {
    format!(
        "Cluster {} initialized; this host is node {} and its first manager.\n\n\
         To add a worker to this cluster, run on it:\n\n    overlayd join {} --token {}\n\n\
         To add a manager, run on it:\n\n    overlayd join {} --token {}\n",
        r.cluster_id, r.node_id, r.manager_addr, r.worker_token, r.manager_addr, r.manager_token
    )
}

pub fn join_token(r: &pb::JoinTokenReply) -> String {
    let rotated = if r.rotated {
        format!("The {} token was rotated: the previous one is refused.\n\n", role(r.role))
    } else {
        String::new()
    };
    format!(
        "{rotated}To add a {} to this cluster, run on it:\n\n    overlayd join {} --token {}\n",
        role(r.role),
        r.manager_addr,
        r.token
    )
}

pub fn join(r: &pb::JoinClusterReply) -> String {
    let mut o = format!("This host joined cluster {} as node {}, a {}.\n", r.cluster_id, r.node_id, role(r.role));
    if !r.warning.is_empty() {
        let _ = writeln!(o, "warning: {}", r.warning);
    }
    o
}

pub fn nodes(r: &pb::NodeListReply) -> String {
    let mut o = String::from("ID    NAME                 ROLE      STATUS  UNDERLAY         API                    \n");
    for n in &r.nodes {
        let status = match pb::NodeStatus::try_from(n.status) {
            Ok(pb::NodeStatus::Down) => "down",
            _ => "ready",
        };
        let mut notes = Vec::new();
        if n.id == r.leader_id {
            notes.push("leader");
        }
        if n.id == r.self_id {
            notes.push("this host");
        }
        let _ = writeln!(
            o,
            "{:<5} {:<20} {:<9} {:<7} {:<16} {:<22} {}",
            n.id,
            n.name,
            role(n.role),
            status,
            n.underlay_addr,
            n.api_addr,
            notes.join(", ")
        );
    }
    o
}

/// A network's way out: through each host (masqueraded), or none.
fn egress(n: &pb::Network) -> &'static str {
    if n.internal { "off (internal)" } else { "on" }
}

pub fn network(n: &pb::Network) -> String {
    let way_out = if n.internal { "internal (no egress)" } else { "egress through each host (masqueraded)" };
    format!(
        "network {}: VNI {}, subnet {}, gateway {}, MTU {}, a /{} block per host, {way_out}, {}\n",
        n.name,
        n.vni,
        n.subnet,
        n.gateway,
        n.mtu,
        n.block_prefix,
        sealing(n)
    )
}

/// Whether a network is sealed between hosts, and with which key.
fn sealing(n: &pb::Network) -> String {
    if n.encrypted { format!("encrypted (AES-256-GCM, key epoch {})", n.key_epoch) } else { "not encrypted".into() }
}

fn service_ports(s: &pb::Service) -> String {
    let ports: Vec<String> = s.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
    if ports.is_empty() { "-".into() } else { ports.join(",") }
}

fn published_ports(s: &pb::Service) -> String {
    let ports: Vec<String> = s
        .published
        .iter()
        .map(|p| {
            let host = if p.mode == "host" { ",host" } else { "" };
            format!("{}:{}/{}{host}", p.published, p.target, p.protocol)
        })
        .collect();
    if ports.is_empty() { "-".into() } else { ports.join(",") }
}

fn health_check(s: &pb::Service) -> String {
    match &s.health {
        None => "none (a replica is healthy while it lives)".into(),
        Some(h) => {
            let what = match h.kind.as_str() {
                "http" => format!("HTTP GET {}", h.target),
                "cmd" => format!("command {:?}", h.target),
                _ => format!("TCP connect to port {}", h.target),
            };
            format!(
                "{what}, every {} ms, timeout {} ms, unhealthy after {} failures, start period {} ms",
                h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms
            )
        }
    }
}

pub fn service(s: &pb::Service) -> String {
    let how = if s.mode == "dnsrr" { "DNS round robin".to_owned() } else { format!("VIP {}", s.vip) };
    format!(
        "service {} on network {}: {how}, ports {}, published {}; health check: {}\n",
        s.name,
        s.network,
        service_ports(s),
        published_ports(s),
        health_check(s)
    )
}

pub fn services(r: &pb::ServiceListReply) -> String {
    let mut o = String::from(
        "NAME              NETWORK     MODE   VIP               PORTS             PUBLISHED         REPLICAS\n",
    );
    for info in &r.services {
        let Some(s) = &info.service else { continue };
        let healthy = info.replicas.iter().filter(|r| r.health == "healthy").count();
        let _ = writeln!(
            o,
            "{:<17} {:<11} {:<6} {:<17} {:<17} {:<17} {healthy}/{} healthy",
            s.name,
            s.network,
            s.mode,
            if s.vip.is_empty() { "-" } else { &s.vip },
            service_ports(s),
            published_ports(s),
            info.replicas.len()
        );
    }
    o
}

pub fn service_inspect(info: &pb::ServiceInfo) -> String {
    let Some(s) = &info.service else { return String::new() };
    let mut o = service(s);
    if info.replicas.is_empty() {
        o.push_str("no replicas: attach containers with `overlayd attach --service NAME`\n");
        return o;
    }
    o.push_str("\nREPLICA           ADDRESS           HOST              HEALTH\n");
    for r in &info.replicas {
        let _ = writeln!(o, "{:<17} {:<17} {:<17} {}", r.name, r.ip, r.node_name, r.health);
    }
    o
}

pub fn networks(r: &pb::NetworkListReply) -> String {
    let mut o = String::from(
        "NAME        VNI       SUBNET              GATEWAY           MTU    BLOCK  EGRESS          ENCRYPTED\n",
    );
    for n in &r.networks {
        let sealed = if n.encrypted { format!("yes (epoch {})", n.key_epoch) } else { "no".into() };
        let _ = writeln!(
            o,
            "{:<11} {:<9} {:<19} {:<17} {:<6} {:<6} {:<15} {sealed}",
            n.name,
            n.vni,
            n.subnet,
            n.gateway,
            n.mtu,
            format!("/{}", n.block_prefix),
            egress(n)
        );
    }
    o
}

pub fn inspect(r: &pb::NetworkInspectReply) -> String {
    let mut o = r.network.as_ref().map(network).unwrap_or_default();
    if r.network.as_ref().is_some_and(|n| n.encrypted) {
        let sealing = if r.sealing.is_empty() { "not up on this host" } else { &r.sealing };
        let _ = writeln!(o, "\nSEALING (this host)\n  {sealing}");
        let refused: Vec<String> = r.refused.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        if !refused.is_empty() {
            let _ = writeln!(o, "  refused datagrams: {}", refused.join("  "));
        }
    }
    let _ = writeln!(o, "\nHOSTS\n  NODE                 VTEP             BLOCK");
    for p in &r.peers {
        let _ = writeln!(o, "  {:<20} {:<16} {}", p.node_name, p.vtep, p.block);
    }
    let _ = writeln!(o, "\nCONTAINERS\n  NAME                 IP                  MAC                 HOST");
    for e in &r.endpoints {
        let _ =
            writeln!(o, "  {:<20} {:<19} {:<19} {}", e.name, format!("{}/{}", e.ip, e.prefix_len), e.mac, e.node_name);
    }
    for u in &r.unreachable {
        let _ = writeln!(o, "  (could not list the containers of {u})");
    }
    o
}

pub fn endpoint(e: &pb::Endpoint) -> String {
    format!("attached {} to {}: {}/{} ({}) via {}\n", e.name, e.network, e.ip, e.prefix_len, e.mac, e.host_ifname)
}

pub fn detached(r: &pb::DetachReply) -> String {
    r.detached.iter().map(|e| format!("detached {} from {} ({})\n", e.name, e.network, e.ip)).collect()
}

/// `overlayd dns`: per network, where its resolver listens, the names it answers (with the
/// endpoints they are names or aliases of) and what it counted; then the upstreams.
pub fn dns(r: &pb::DnsReply) -> String {
    let mut o = String::new();
    for n in &r.networks {
        let listening = match (n.listening, n.error.is_empty()) {
            (true, _) => format!("listening on {}:53 (UDP and TCP)", n.gateway),
            (false, false) => format!("NOT listening: {}", n.error),
            (false, true) => "not listening (the network is not up on this host)".to_owned(),
        };
        let forwards = if n.internal { "internal: other names get NXDOMAIN" } else { "other names are forwarded" };
        let _ = writeln!(o, "network {}: {listening}; {forwards}", n.name);
        let _ = writeln!(o, "  NAME                 ADDRESSES                          WHAT");
        for name in &n.names {
            let of = |alias: bool| {
                n.endpoints
                    .iter()
                    .filter(|e| {
                        if alias {
                            e.aliases.iter().any(|a| a.eq_ignore_ascii_case(&name.name))
                        } else {
                            e.name.eq_ignore_ascii_case(&name.name)
                        }
                    })
                    .map(|e| if alias { e.name.clone() } else { format!("node {}", e.node_id) })
                    .collect::<Vec<_>>()
            };
            let (endpoints, aliases) = (of(false), of(true));
            let mut what = Vec::new();
            if !endpoints.is_empty() {
                what.push(format!("endpoint on {}", endpoints.join(", ")));
            }
            if !aliases.is_empty() {
                what.push(format!("alias of {}", aliases.join(", ")));
            }
            let _ = writeln!(o, "  {:<20} {:<34} {}", name.name, name.addresses.join(", "), what.join("; "));
        }
        if n.names.is_empty() {
            let _ = writeln!(o, "  (no names yet)");
        }
        let _ = writeln!(o, "  (each also as NAME.{}, and every address back by PTR)", n.name);
        let c = |k: &str| n.counters.get(k).copied().unwrap_or(0);
        let sum = |prefix: &str| n.counters.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| *v).sum::<u64>();
        let answers: Vec<String> = n
            .counters
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("answers:")?, v)))
            .filter(|(_, v)| **v > 0)
            .map(|(code, v)| format!("{v} {code}"))
            .collect();
        let dropped: Vec<String> = n
            .counters
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("dropped:")?, v)))
            .filter(|(_, v)| **v > 0)
            .map(|(why, v)| format!("{v} {why}"))
            .collect();
        let _ = writeln!(
            o,
            "  {} queries; answers: {}; {} forwarded, {} upstream failures, {} SERVFAIL for want of an upstream; \
             {} truncated; {} malformed; dropped: {}\n",
            c("queries"),
            if answers.is_empty() { "none".to_owned() } else { answers.join(", ") },
            c("forwarded"),
            sum("upstream_failures:"),
            sum("forward_failed:"),
            c("truncated"),
            sum("malformed:"),
            if dropped.is_empty() { "none".to_owned() } else { dropped.join(", ") },
        );
    }
    if r.networks.is_empty() {
        o.push_str("no network is up on this host\n\n");
    }
    let upstreams = if r.upstreams.is_empty() { "none".to_owned() } else { r.upstreams.join(", ") };
    let _ = writeln!(o, "upstreams (from {}): {upstreams}; TTL {} s", r.upstreams_file, r.ttl);
    if !r.upstreams_error.is_empty() {
        let _ = writeln!(o, "  {}", r.upstreams_error);
    }
    for i in &r.ignored_upstreams {
        let _ = writeln!(o, "  left out: {i}");
    }
    if !r.intercepted.is_empty() {
        let _ =
            writeln!(o, "containers' queries to {} are answered by their network's resolver", r.intercepted.join(", "));
    }
    for x in &r.rejected {
        let _ = writeln!(o, "not a DNS name, not answered: {x}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `overlayd peers` names its columns and counters as its JSON does: every counter of the
    /// gossip layer by its key, in a group (none left to "other"), none summed into another.
    #[test]
    fn peers_names_columns_and_counters_by_the_json_keys() {
        let counters = serde_json::to_value(control::gossip::GossipCounters::default()).unwrap();
        let counters: std::collections::BTreeMap<String, u64> =
            counters.as_object().unwrap().iter().enumerate().map(|(i, (k, _))| (k.clone(), i as u64 + 1000)).collect();
        let peer = pb::PeerInfo { node_id: 7, name: "h7".into(), raft_status: "ready".into(), ..Default::default() };
        let r = pb::PeersReply { peers: vec![peer.clone()], self_id: 7, counters: counters.clone() };
        let text = peers(&r);
        let mut json = serde_json::to_value(&peer).unwrap().as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        json.retain(|k| !k.starts_with("table_"));
        for key in json.iter().map(|k| k.to_uppercase()).chain(["TABLE_EPOCH:TABLE_VERSION".into()]) {
            assert!(text.lines().next().unwrap().contains(&key), "no column {key}: {text}");
        }
        for (k, v) in &counters {
            assert!(text.contains(&format!("{k} {v}")), "counter {k} is not named: {text}");
        }
        assert!(!text.contains("\n  other "), "a counter without a group: {text}");
    }
}
