//! The service load balancer in each client container's own network namespace: nftables DNAT
//! from a service's virtual IP to one of its replicas, picked by a [`super::maglev`] table, and
//! the reset of open connections to a replica that went.
//!
//! **What it is.** [`script`] turns the services a container can reach into one `nft -f -`
//! script for the table `ip overlayd_lb` of the container's namespace; [`apply`] loads it there
//! as one transaction (the table is rewritten whole, so the container is never without rules).
//! The table holds, per service, a map `svc_<name>` from a Maglev slot to a replica's address,
//! and in the chain `output` (NAT, output hook) a rule that sends a new connection to the VIP's
//! ports to the replica of slot `jhash(client address . client port) mod size` (same port).
//! Conntrack, in the container's namespace, pins the flow from then on: the agent is not on the
//! path, so a flow outlives an agent restart and has no idle timeout of ours (the kernel's is 5
//! days for an established TCP flow; after it, the flow hashes to the same replica as long as
//! the replica set is the same). The chain's first rule counts new connections to the VIPs
//! and, as it matches on conntrack state, keeps the kernel tracking in the namespace when no
//! service has a replica: without a rule that needs conntrack, the kernel stops tracking there
//! and open flows lose their translation. The chain `unserved` counts and rejects what is still
//! addressed to a VIP after NAT (a service with no replica, a port it does not have), at once
//! rather than leaving an ARP request unanswered: a TCP reset, or an ICMP port unreachable for
//! UDP (the sender's `send` itself fails with `EPERM`). [`reset`], called once the new rules are
//! in, ends the flows pinned to replicas that went: TCP sockets are destroyed (the application
//! sees `ECONNABORTED`, the replica a RST), UDP flows are forgotten (the next datagram is a new
//! flow, to a replica that lives); [`reset_except`] does the same for every replica but a given
//! set. [`remove`] deletes the table.
//!
//! **How [`reset`] finds the flows.** A socket knows only the VIP; the replica a flow went to is
//! in conntrack. So it dumps the namespace's conntrack table (ctnetlink) and keeps the IPv4
//! flows whose original destination is the VIP and whose reply source is a replica that went;
//! deletes those that are UDP; and for those that are TCP, dumps the namespace's TCP sockets
//! (sock_diag) and destroys each open one with exactly that 4-tuple by its socket cookie
//! (`SOCK_DESTROY`, what `ss -K` does; the kernel needs `CONFIG_INET_DIAG_DESTROY`), so that
//! nothing else can be hit (a listener on the client's port, which the kernel's lookup by
//! tuple alone would fall back to). No new flow goes to a gone replica once [`apply`] has
//! committed, so one pass is enough: the only window is a packet that was being evaluated
//! against the old rules during the commit, microseconds, long over by the time [`reset`] has
//! entered the namespace. Measured in the test below: 10 to 20 ms for some 15 flows.
//!
//! **What it is not.** It does not decide which replicas are healthy (the caller gives the
//! set), does not run per packet (the kernel looks the map up once per new connection), and
//! does not care where a replica runs: one on this host and one on another are reached the same
//! way, the overlay subnet being on-link for the container. Neighbours: [`super::maglev`] (the
//! table), the agent's services shell (which knows each local container's namespace and calls
//! these), `firewall` (the host's own tables, which this never touches).
//!
//! **Why in the client's namespace.** NAT in the host's namespace sees a container's packets
//! only when they are routed, not bridged: a local replica's reply would need SNAT to come back
//! through it (hairpin), a remote replica's replies reach the container over the overlay
//! without passing it, and SNAT is what costs swarm the client's address (moby #25526). NAT in
//! the userspace dataplane keeps its flow state in the agent, lost when the agent restarts, and
//! never sees a local replica's traffic, which stays on the host's bridge. In the client's own
//! namespace the first packet of a connection is translated before it leaves, every reply is
//! translated back before the socket sees it, the replica sees the client's own address, and
//! the state is the kernel's. The cost: one table per client container, with a map of
//! [`maglev::DEFAULT_SIZE`] elements (some 100 KB of kernel memory) per service, loaded in
//! about 25 ms. Measured against the bound any mechanism has, a connection straight to the
//! replica (BENCHMARKS.md, "Services", same run): through the VIP 1.08x the direct path's
//! throughput and 1.00–1.18x its new connections per second, 1.14–1.41x haproxy's — the
//! translation is lost in the noise of the direct path itself, so a userspace NAT (a rewrite
//! per packet in the hot loop, a flow table of its own) could at best tie it, at the price of
//! the restart and local-replica problems above; it was not built.
//!
//! The `nft` program is run inside the namespace (not netlink): see the `firewall` module for
//! why; an operator reads the table with `nsenter --net=PATH nft list table ip overlayd_lb`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::maglev;

/// overlayd's table in each client namespace.
pub const TABLE: &str = "overlayd_lb";

/// The `jhash` seed of the connection hash: fixed, so the same connection hashes to the same
/// slot in every namespace and after every rewrite ("ovlb").
pub const HASH_SEED: u32 = 0x6f76_6c62;

/// A transport protocol a service port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Its name in nft (and in `80/tcp`).
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// Its IP protocol number.
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

/// A port of a service, e.g. 80/tcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePort {
    /// The port, the same on the VIP and on the replicas.
    pub port: u16,
    /// The protocol.
    pub proto: Proto,
}

/// A service as a client namespace sees it: its VIP, ports and healthy replicas.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VipService {
    /// The service's name (in the map's name and the rule's comment).
    pub name: String,
    /// Its virtual IP, from the overlay network's subnet.
    pub vip: Ipv4Addr,
    /// Its ports; none means every TCP and UDP port.
    pub ports: Vec<ServicePort>,
    /// The replicas' addresses on the overlay network; none means every connection to the VIP
    /// is refused.
    pub backends: Vec<Ipv4Addr>,
}

/// The `nft -f -` script that makes the table `ip overlayd_lb` hold exactly `services` (one
/// transaction: created if missing, deleted, written anew). Services are written in name
/// order, so the same services give the same script.
pub fn script(services: &[VipService]) -> String {
    let size = maglev::DEFAULT_SIZE;
    let mut services: Vec<&VipService> = services.iter().collect();
    services.sort_by(|a, b| (&a.name, a.vip).cmp(&(&b.name, b.vip)));
    let mut maps = String::new();
    let mut rules = String::new();
    let mut taken = BTreeSet::new();
    for s in &services {
        let name = comment_text(&s.name);
        if s.backends.is_empty() {
            continue;
        }
        let map = map_name(&s.name, &mut taken);
        let _ = writeln!(maps, "\tmap {map} {{");
        // The key type of `jhash … mod size`, spelt as nft can list it back (`typeof jhash …`
        // makes nft 1.0.6 crash when it lists the map).
        let _ = writeln!(maps, "\t\ttypeof numgen inc mod {size} : ip daddr");
        let _ = writeln!(maps, "\t\tcomment \"{name}: Maglev slot to replica\"");
        maglev_elements(&mut maps, &s.backends, size, |b| b.to_string());
        maps.push_str("\t}\n");
        let hash = format!("jhash ip saddr . th sport mod {size} seed {HASH_SEED:#x}");
        let ports = port_match(&s.ports);
        let _ = writeln!(rules, "\t\tip daddr {} {ports} dnat to {hash} map @{map} comment \"{name}\"", s.vip);
    }
    let vips: BTreeSet<Ipv4Addr> = services.iter().map(|s| s.vip).collect();
    let mut out = String::new();
    let t = format!("ip {TABLE}");
    let _ = writeln!(out, "# overlayd: the service VIPs this container reaches (rewritten whole by overlayd)");
    let _ = writeln!(out, "table {t}\ndelete table {t}\ntable {t} {{");
    out.push_str("\tcomment \"overlayd: service VIPs, balanced in this namespace\"\n");
    out.push_str("\tset vips {\n\t\ttype ipv4_addr\n");
    if !vips.is_empty() {
        let list: Vec<String> = vips.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
    }
    out.push_str("\t}\n");
    out.push_str(&maps);
    out.push_str("\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n");
    // Also what keeps conntrack on in the namespace when no service has a replica: without an
    // expression that needs it (a `ct` match, a NAT statement), the kernel stops tracking,
    // and the flows already translated lose their translation.
    out.push_str("\t\tip daddr @vips ct state new counter comment \"new connections to a VIP\"\n");
    out.push_str(&rules);
    out.push_str("\t}\n");
    out.push_str("\tchain unserved {\n\t\ttype filter hook output priority 0; policy accept;\n");
    out.push_str(
        "\t\tip daddr @vips meta l4proto tcp counter reject with tcp reset comment \"no replica or no such port\"\n",
    );
    out.push_str("\t\tip daddr @vips counter reject comment \"no replica or no such port\"\n");
    out.push_str("\t}\n}\n");
    out
}

/// Writes the `elements = { … }` of a map from each slot of a Maglev table of `size` over
/// `backends` (not empty) to the backend's value, as `value` spells it.
pub fn maglev_elements(out: &mut String, backends: &[Ipv4Addr], size: usize, value: impl Fn(Ipv4Addr) -> String) {
    let slots = maglev::table(backends, size);
    out.push_str("\t\telements = {");
    for (i, b) in slots.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let indent = if i % 8 == 0 { "\n\t\t\t" } else { " " };
        let _ = write!(out, "{sep}{indent}{i} : {}", value(backends[usize::from(*b)]));
    }
    out.push_str("\n\t\t}\n");
}

/// `meta l4proto . th dport { tcp . 80, … }`, or every TCP and UDP port.
fn port_match(ports: &[ServicePort]) -> String {
    if ports.is_empty() {
        return "meta l4proto { tcp, udp }".into();
    }
    let set: BTreeSet<&ServicePort> = ports.iter().collect();
    let items: Vec<String> = set.iter().map(|p| format!("{} . {}", p.proto.name(), p.port)).collect();
    format!("meta l4proto . th dport {{ {} }}", items.join(", "))
}

/// `svc_<name>` in the characters nft takes in a name, made unique.
fn map_name(service: &str, taken: &mut BTreeSet<String>) -> String {
    let clean: String =
        service.chars().take(48).map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let base = format!("svc_{clean}");
    let mut name = base.clone();
    let mut n = 1;
    while !taken.insert(name.clone()) {
        n += 1;
        name = format!("{base}_{n}");
    }
    name
}

/// A service name as it can stand in an nft comment (quoted, at most 128 bytes in all).
pub fn comment_text(s: &str) -> String {
    s.chars().take(64).map(|c| if c == '"' || c == '\\' || c.is_control() { '_' } else { c }).collect()
}

/// Loads `script` (from [`script`]) into the network namespace at `netns` (`/run/netns/NAME`,
/// `/proc/PID/ns/net`), with `nft -f -` run inside it.
pub async fn apply(netns: &Path, script: &str) -> Result<()> {
    let script = script.to_owned();
    in_netns(netns, move || nft(&script))
        .await
        .with_context(|| format!("cannot load the service rules into the network namespace {}", netns.display()))
}

/// Deletes the table from the namespace at `netns`; a table already gone is fine.
///
/// The flows through a VIP that are still open then hang: with the table goes the last rule
/// that needs conntrack, so the kernel stops tracking (and translating) in the namespace. For
/// a container that lives on, end them first ([`reset_except`] each VIP, keeping none); when
/// the agent stops, leave the table, so that the flows survive the restart.
pub async fn remove(netns: &Path) -> Result<()> {
    let t = format!("ip {TABLE}");
    in_netns(netns, move || nft(&format!("table {t}\ndelete table {t}\n")))
        .await
        .with_context(|| format!("cannot remove the service rules from the network namespace {}", netns.display()))
}

/// Ends, in the namespace at `netns`, the flows through `vip` that conntrack pinned to one of
/// `gone`: destroys their TCP sockets and forgets their UDP flows. Returns how many (TCP
/// sockets destroyed plus UDP flows forgotten). Call it after [`apply`] has taken `gone` out of
/// the service, or new connections may go to them again.
pub async fn reset(netns: &Path, vip: Ipv4Addr, gone: &[Ipv4Addr]) -> Result<usize> {
    if gone.is_empty() {
        return Ok(0);
    }
    let gone: BTreeSet<Ipv4Addr> = gone.iter().copied().collect();
    in_netns(netns, move || reset_here(vip, |replica| gone.contains(&replica)))
        .await
        .with_context(|| format!("cannot reset the connections to {vip} in the network namespace {}", netns.display()))
}

/// [`reset`] of every replica but `kept`: for a caller that does not know which replicas the
/// namespace's flows were pinned to (after an agent restart, say, when replicas may have gone
/// meanwhile), or, with `kept` empty, to end every flow through a VIP before [`remove`].
pub async fn reset_except(netns: &Path, vip: Ipv4Addr, kept: &[Ipv4Addr]) -> Result<usize> {
    let kept: BTreeSet<Ipv4Addr> = kept.iter().copied().collect();
    in_netns(netns, move || reset_here(vip, |replica| !kept.contains(&replica)))
        .await
        .with_context(|| format!("cannot reset the connections to {vip} in the network namespace {}", netns.display()))
}

/// Ends the flows through `vip` whose replica (the reply's source) is `gone`, on a thread inside
/// the namespace.
fn reset_here(vip: Ipv4Addr, gone: impl Fn(Ipv4Addr) -> bool) -> Result<usize> {
    let mut ct = netlink::Netlink::open(libc::NETLINK_NETFILTER)?;
    let flows = ct.conntrack_dump()?;
    // A flow to the VIP that was never translated (refused: no replica) replies from the VIP.
    let doomed: Vec<&netlink::Flow> =
        flows.iter().filter(|f| f.orig.dst == vip && f.reply.src != vip && gone(f.reply.src)).collect();
    let mut ended = 0;
    // A UDP flow has no socket of its own to end: forget it, and the next datagram is a new
    // flow, for a replica that lives.
    for f in doomed.iter().filter(|f| f.orig.proto == Proto::Udp.number()) {
        if ct.conntrack_delete(f)? {
            ended += 1;
        }
    }
    let tcp: BTreeSet<(Ipv4Addr, u16, u16)> = doomed
        .iter()
        .filter(|f| f.orig.proto == Proto::Tcp.number())
        .map(|f| (f.orig.src, f.orig.sport, f.orig.dport))
        .collect();
    if !tcp.is_empty() {
        let mut diag = netlink::Netlink::open(libc::NETLINK_SOCK_DIAG)?;
        for s in diag.tcp_sockets()? {
            if s.dst == vip && tcp.contains(&(s.src, s.sport, s.dport)) && diag.destroy(&s)? {
                ended += 1;
            }
        }
    }
    Ok(ended)
}

/// Runs `nft -f -` with `script` (in the calling thread's namespace).
fn nft(script: &str) -> Result<()> {
    crate::firewall::load(&crate::firewall::nft_program(), script)
}

/// Runs `f` on a thread of its own that entered the network namespace at `netns` (setns changes
/// only the calling thread, which ends with `f`; processes it starts are in the namespace too).
async fn in_netns<T, F>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let file =
        std::fs::File::open(netns).with_context(|| format!("cannot open the network namespace {}", netns.display()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("overlayd-lb".into()).spawn(move || {
        let run = || -> Result<T> {
            // SAFETY: setns with a valid namespace fd; it affects only this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("cannot enter the network namespace: {}", std::io::Error::last_os_error());
            }
            f()
        };
        // The receiver is gone only when the caller was cancelled: nobody wants the result.
        let _ = tx.send(run());
    })?;
    rx.await.context("the namespace thread died")?
}

/// The two netlink conversations [`reset`] has: conntrack (dump, delete) and sock_diag (dump
/// TCP sockets, destroy one). Byte layouts from `linux/netlink.h`,
/// `linux/netfilter/nfnetlink.h`, `nfnetlink_conntrack.h` and `linux/inet_diag.h`; nothing
/// here is unsafe (socket2 makes the socket).
mod netlink {
    use std::io::Read as _;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use anyhow::{Context, Result, bail};
    use socket2::{Domain, Protocol, Socket, Type};

    const NLMSG_HDRLEN: usize = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_DUMP: u16 = 0x300;
    const NLA_F_NESTED: u16 = 0x8000;
    const NLA_TYPE_MASK: u16 = 0x3fff;

    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_NEW: u16 = 0;
    const IPCTNL_MSG_CT_GET: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_REPLY: u16 = 2;
    const CTA_ZONE: u16 = 18;
    const CTA_TUPLE_IP: u16 = 1;
    const CTA_TUPLE_PROTO: u16 = 2;
    const CTA_IP_V4_SRC: u16 = 1;
    const CTA_IP_V4_DST: u16 = 2;
    const CTA_PROTO_NUM: u16 = 1;
    const CTA_PROTO_SRC_PORT: u16 = 2;
    const CTA_PROTO_DST_PORT: u16 = 3;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const SOCK_DESTROY: u16 = 21;
    /// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
    const SOCKID_LEN: usize = 48;
    /// TCP states of an open connection (`1 << TCP_*`): ESTABLISHED, SYN_SENT, FIN_WAIT1,
    /// FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING; not LISTEN, TIME_WAIT, CLOSE.
    const OPEN_STATES: u32 = 1 << 1 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;
    /// The kernel answers within microseconds; this only bounds a wait that would be a bug.
    const TIMEOUT: Duration = Duration::from_secs(5);
    /// At most this many replies per dump (a namespace's conntrack table or sockets).
    const MAX_DUMP: usize = 1 << 20;

    /// One direction of a conntrack entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Tuple {
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub proto: u8,
        pub sport: u16,
        pub dport: u16,
    }

    /// An IPv4 conntrack entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Flow {
        pub orig: Tuple,
        pub reply: Tuple,
        pub zone: u16,
    }

    /// A TCP socket with IPv4 addresses, as sock_diag names it: an IPv4 socket, or an IPv6 one
    /// with IPv4-mapped addresses (a dual-stack socket connected to an IPv4 address, as Java's).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TcpSocket {
        pub src: Ipv4Addr,
        pub sport: u16,
        pub dst: Ipv4Addr,
        pub dport: u16,
        /// AF_INET or AF_INET6.
        family: u8,
        /// The raw `inet_diag_sockid`, cookie included, to name exactly this socket.
        id: [u8; SOCKID_LEN],
    }

    /// A netlink socket of one protocol, in the namespace of the thread that opened it.
    pub struct Netlink {
        sock: Socket,
        seq: u32,
        buf: Vec<u8>,
    }

    impl Netlink {
        pub fn open(protocol: libc::c_int) -> Result<Netlink> {
            let sock = Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(protocol)))
                .with_context(|| format!("cannot open a netlink socket (protocol {protocol})"))?;
            sock.set_read_timeout(Some(TIMEOUT))?;
            Ok(Netlink { sock, seq: 0, buf: vec![0; 64 * 1024] })
        }

        /// Every IPv4 conntrack entry of the namespace.
        pub fn conntrack_dump(&mut self) -> Result<Vec<Flow>> {
            let msg = self.message(ct_type(IPCTNL_MSG_CT_GET), NLM_F_REQUEST | NLM_F_DUMP, &nfgenmsg());
            let mut flows = Vec::new();
            self.dump(&msg, "conntrack dump", |ty, payload| {
                if ty == ct_type(IPCTNL_MSG_CT_NEW)
                    && let Some(f) = parse_flow(payload.get(4..).unwrap_or_default())
                {
                    flows.push(f);
                }
            })?;
            Ok(flows)
        }

        /// Deletes a conntrack entry; false if it was already gone.
        pub fn conntrack_delete(&mut self, f: &Flow) -> Result<bool> {
            let mut body = nfgenmsg().to_vec();
            let mut tuple = Vec::new();
            let mut ip = Vec::new();
            attr(&mut ip, CTA_IP_V4_SRC, &f.orig.src.octets());
            attr(&mut ip, CTA_IP_V4_DST, &f.orig.dst.octets());
            attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
            let mut proto = Vec::new();
            attr(&mut proto, CTA_PROTO_NUM, &[f.orig.proto]);
            attr(&mut proto, CTA_PROTO_SRC_PORT, &f.orig.sport.to_be_bytes());
            attr(&mut proto, CTA_PROTO_DST_PORT, &f.orig.dport.to_be_bytes());
            attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
            attr(&mut body, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
            if f.zone != 0 {
                attr(&mut body, CTA_ZONE, &f.zone.to_be_bytes());
            }
            let msg = self.message(ct_type(IPCTNL_MSG_CT_DELETE), NLM_F_REQUEST | NLM_F_ACK, &body);
            match self.ack(&msg).context("conntrack delete")? {
                0 => Ok(true),
                e if e == libc::ENOENT => Ok(false),
                e => Err(std::io::Error::from_raw_os_error(e)).context("conntrack delete"),
            }
        }

        /// The namespace's open TCP sockets with IPv4 addresses (not listening, not in
        /// TIME_WAIT).
        pub fn tcp_sockets(&mut self) -> Result<Vec<TcpSocket>> {
            let mut socks = Vec::new();
            for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                let req = diag_req(family, &[0; SOCKID_LEN], OPEN_STATES);
                let msg = self.message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req);
                self.dump(&msg, "TCP socket dump", |ty, payload| {
                    // struct inet_diag_msg: family, state, timer, retrans, then the sockid.
                    if ty == SOCK_DIAG_BY_FAMILY
                        && payload.first() == Some(&family)
                        && let Some(id) = payload.get(4..4 + SOCKID_LEN)
                    {
                        let id: [u8; SOCKID_LEN] = id.try_into().expect("the length was checked");
                        if let (Some(src), Some(dst)) = (sockid_v4(family, &id[4..20]), sockid_v4(family, &id[20..36]))
                        {
                            let sport = u16::from_be_bytes([id[0], id[1]]);
                            let dport = u16::from_be_bytes([id[2], id[3]]);
                            socks.push(TcpSocket { src, sport, dst, dport, family, id });
                        }
                    }
                })?;
            }
            Ok(socks)
        }

        /// Destroys a socket (the kernel's `tcp_abort`); false if it is gone already.
        pub fn destroy(&mut self, s: &TcpSocket) -> Result<bool> {
            let msg = self.message(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &diag_req(s.family, &s.id, u32::MAX));
            match self.ack(&msg).context("SOCK_DESTROY")? {
                0 => Ok(true),
                e if e == libc::ENOENT => Ok(false),
                e if e == libc::EOPNOTSUPP => {
                    bail!("this kernel cannot destroy sockets: it was built without CONFIG_INET_DIAG_DESTROY")
                }
                e => Err(std::io::Error::from_raw_os_error(e)).context("SOCK_DESTROY"),
            }
        }

        fn message(&mut self, ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
            self.seq = self.seq.wrapping_add(1);
            let mut m = Vec::with_capacity(NLMSG_HDRLEN + payload.len());
            m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&flags.to_ne_bytes());
            m.extend_from_slice(&self.seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(payload);
            m
        }

        /// Sends a request with `NLM_F_ACK` and returns the kernel's errno (0: done).
        fn ack(&mut self, msg: &[u8]) -> Result<i32> {
            self.sock.send(msg)?;
            let seq = self.seq;
            // Bounded: a reply per read, and the kernel sends one ack (stale replies of an
            // earlier request, which only an error could leave, are skipped by their seq).
            for _ in 0..64 {
                let n = (&self.sock).read(&mut self.buf).context("reading netlink")?;
                for (ty, mseq, payload) in messages(&self.buf[..n]) {
                    if ty == NLMSG_ERROR && mseq == seq {
                        return Ok(error_code(payload));
                    }
                }
            }
            bail!("no netlink acknowledgement")
        }

        /// Sends a dump request and hands each reply to `each` until the kernel says done.
        fn dump(&mut self, msg: &[u8], what: &str, mut each: impl FnMut(u16, &[u8])) -> Result<()> {
            self.sock.send(msg)?;
            let seq = self.seq;
            let mut seen = 0usize;
            loop {
                let n = (&self.sock).read(&mut self.buf).with_context(|| format!("reading the {what}"))?;
                for (ty, mseq, payload) in messages(&self.buf[..n]) {
                    if mseq != seq {
                        continue;
                    }
                    match ty {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let e = error_code(payload);
                            return Err(std::io::Error::from_raw_os_error(e)).with_context(|| format!("the {what}"));
                        }
                        _ => each(ty, payload),
                    }
                    seen += 1;
                    if seen > MAX_DUMP {
                        bail!("the {what} has more than {MAX_DUMP} entries");
                    }
                }
            }
        }
    }

    fn ct_type(msg: u16) -> u16 {
        NFNL_SUBSYS_CTNETLINK << 8 | msg
    }

    /// `struct nfgenmsg` for IPv4, version 0, resource id 0.
    fn nfgenmsg() -> [u8; 4] {
        [libc::AF_INET as u8, 0, 0, 0]
    }

    /// `struct inet_diag_req_v2` for TCP of `family`.
    fn diag_req(family: u8, id: &[u8; SOCKID_LEN], states: u32) -> Vec<u8> {
        let mut r = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
        r.extend_from_slice(&states.to_ne_bytes());
        r.extend_from_slice(id);
        if id.iter().all(|b| *b == 0) {
            // No cookie: INET_DIAG_NOCOOKIE.
            r[8 + 40..8 + 48].fill(0xff);
        }
        r
    }

    /// An address field of a sockid (16 bytes) as IPv4: the first 4 bytes of an IPv4 socket's,
    /// an IPv6 socket's if it is IPv4-mapped.
    fn sockid_v4(family: u8, field: &[u8]) -> Option<Ipv4Addr> {
        let field: [u8; 16] = field.try_into().ok()?;
        if family == libc::AF_INET as u8 {
            Some(Ipv4Addr::new(field[0], field[1], field[2], field[3]))
        } else {
            std::net::Ipv6Addr::from(field).to_ipv4_mapped()
        }
    }

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    /// Appends a netlink attribute.
    fn attr(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
    }

    /// The messages of one read: (type, sequence number, payload).
    fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
        let mut off = 0;
        std::iter::from_fn(move || {
            let h = buf.get(off..off + NLMSG_HDRLEN)?;
            let len = u32::from_ne_bytes(h[0..4].try_into().ok()?) as usize;
            let ty = u16::from_ne_bytes(h[4..6].try_into().ok()?);
            let seq = u32::from_ne_bytes(h[8..12].try_into().ok()?);
            let payload = buf.get(off + NLMSG_HDRLEN..off.checked_add(len)?).filter(|_| len >= NLMSG_HDRLEN)?;
            off += align4(len);
            Some((ty, seq, payload))
        })
    }

    /// The positive errno of an `NLMSG_ERROR` payload (0: an acknowledgement).
    fn error_code(payload: &[u8]) -> i32 {
        payload.get(0..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes"))).map_or(libc::EPROTO, |e| -e)
    }

    /// The attributes in `buf`: (type without flags, value).
    fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        let mut off = 0;
        std::iter::from_fn(move || {
            let h = buf.get(off..off + 4)?;
            let len = usize::from(u16::from_ne_bytes([h[0], h[1]]));
            let ty = u16::from_ne_bytes([h[2], h[3]]) & NLA_TYPE_MASK;
            let value = buf.get(off + 4..off + len).filter(|_| len >= 4)?;
            off += align4(len);
            Some((ty, value))
        })
    }

    fn parse_flow(attrs_buf: &[u8]) -> Option<Flow> {
        let (mut orig, mut reply, mut zone) = (None, None, 0);
        for (ty, v) in attrs(attrs_buf) {
            match ty {
                CTA_TUPLE_ORIG => orig = parse_tuple(v),
                CTA_TUPLE_REPLY => reply = parse_tuple(v),
                CTA_ZONE => zone = u16::from_be_bytes(v.get(0..2)?.try_into().ok()?),
                _ => {}
            }
        }
        Some(Flow { orig: orig?, reply: reply?, zone })
    }

    fn parse_tuple(buf: &[u8]) -> Option<Tuple> {
        let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
        let v4 = |v: &[u8]| -> Option<Ipv4Addr> { Some(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?)) };
        let port = |v: &[u8]| -> u16 { v.get(0..2).map_or(0, |p| u16::from_be_bytes([p[0], p[1]])) };
        for (ty, v) in attrs(buf) {
            match ty {
                CTA_TUPLE_IP => {
                    for (t, a) in attrs(v) {
                        match t {
                            CTA_IP_V4_SRC => src = v4(a),
                            CTA_IP_V4_DST => dst = v4(a),
                            _ => {}
                        }
                    }
                }
                CTA_TUPLE_PROTO => {
                    for (t, a) in attrs(v) {
                        match t {
                            CTA_PROTO_NUM => proto = a.first().copied(),
                            CTA_PROTO_SRC_PORT => sport = port(a),
                            CTA_PROTO_DST_PORT => dport = port(a),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Tuple { src: src?, dst: dst?, proto: proto?, sport, dport })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A conntrack entry as the kernel sends it (nested attributes, flags on the types).
        #[test]
        fn a_flow_is_parsed_from_its_attributes() {
            let tuple = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
                let (mut ip, mut proto, mut t) = (Vec::new(), Vec::new(), Vec::new());
                attr(&mut ip, CTA_IP_V4_SRC, &src);
                attr(&mut ip, CTA_IP_V4_DST, &dst);
                attr(&mut proto, CTA_PROTO_NUM, &[6]);
                attr(&mut proto, CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
                attr(&mut proto, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
                attr(&mut t, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
                attr(&mut t, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
                t
            };
            let mut body = Vec::new();
            attr(&mut body, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple([10, 0, 0, 9], [10, 0, 0, 100], 40000, 80));
            attr(&mut body, CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple([10, 0, 0, 3], [10, 0, 0, 9], 80, 40000));
            attr(&mut body, 3, &0x188u32.to_be_bytes()); // CTA_STATUS, ignored
            let f = parse_flow(&body).expect("a flow");
            assert_eq!(
                f.orig,
                Tuple { src: [10, 0, 0, 9].into(), dst: [10, 0, 0, 100].into(), proto: 6, sport: 40000, dport: 80 }
            );
            assert_eq!(f.reply.src, Ipv4Addr::new(10, 0, 0, 3));
            assert_eq!(f.zone, 0);
            // Truncated input gives nothing rather than a panic.
            for cut in 0..body.len() {
                let _ = parse_flow(&body[..cut]);
            }
        }

        #[test]
        fn messages_stop_at_a_bad_length() {
            let mut buf = vec![0u8; 20];
            buf[0..4].copy_from_slice(&20u32.to_ne_bytes());
            buf[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
            assert_eq!(messages(&buf).count(), 1);
            buf[0..4].copy_from_slice(&8u32.to_ne_bytes());
            assert_eq!(messages(&buf).count(), 0);
            buf[0..4].copy_from_slice(&200u32.to_ne_bytes());
            assert_eq!(messages(&buf).count(), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(backends: &[[u8; 4]]) -> VipService {
        VipService {
            name: "web".into(),
            vip: Ipv4Addr::new(10, 0, 0, 100),
            ports: vec![ServicePort { port: 80, proto: Proto::Tcp }, ServicePort { port: 53, proto: Proto::Udp }],
            backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
        }
    }

    #[test]
    fn the_script_rewrites_the_table_in_one_go() {
        let s = script(&[web(&[[10, 0, 0, 2], [10, 0, 0, 3]])]);
        assert!(s.contains("table ip overlayd_lb\ndelete table ip overlayd_lb\ntable ip overlayd_lb {\n"), "{s}");
        assert!(s.contains("type nat hook output priority -100; policy accept;"));
        assert!(s.contains("type filter hook output priority 0; policy accept;"));
        assert!(s.contains("elements = { 10.0.0.100 }"));
        let rule = concat!(
            "ip daddr 10.0.0.100 meta l4proto . th dport { udp . 53, tcp . 80 } ",
            "dnat to jhash ip saddr . th sport mod 1021 seed 0x6f766c62 map @svc_web comment \"web\""
        );
        assert!(s.contains(rule), "{s}");
        assert!(s.contains("ip daddr @vips meta l4proto tcp counter reject with tcp reset"), "{s}");
        assert!(s.contains("ip daddr @vips counter reject comment"), "{s}");
    }

    #[test]
    fn the_map_is_the_maglev_table() {
        let backends = [[10, 0, 0, 3], [10, 0, 0, 2]];
        let s = script(&[web(&backends)]);
        let slots = maglev::table(&web(&backends).backends, maglev::DEFAULT_SIZE);
        let body = s.split("elements = {").nth(2).expect("the map's elements").split('}').next().unwrap();
        let elements: Vec<(usize, Ipv4Addr)> = body
            .split(',')
            .map(|e| {
                let (k, v) = e.trim().split_once(" : ").expect("slot : address");
                (k.parse().unwrap(), v.parse().unwrap())
            })
            .collect();
        assert_eq!(elements.len(), maglev::DEFAULT_SIZE);
        for (i, (k, v)) in elements.iter().enumerate() {
            assert_eq!(*k, i);
            assert_eq!(Ipv4Addr::from(backends[usize::from(slots[i])]), *v);
        }
        // Both replicas, in about equal shares.
        let twos = elements.iter().filter(|(_, v)| *v == Ipv4Addr::new(10, 0, 0, 2)).count();
        assert!((510..=511).contains(&twos), "{twos}");
    }

    #[test]
    fn a_service_without_replicas_has_no_rule_but_its_vip_is_refused() {
        let s = script(&[web(&[])]);
        assert!(!s.contains("dnat"), "{s}");
        assert!(!s.contains("map svc_web"));
        assert!(s.contains("elements = { 10.0.0.100 }"));
        // A rule that needs conntrack stays, so the flows already open keep their translation.
        assert!(s.contains("ip daddr @vips ct state new counter"), "{s}");
    }

    #[test]
    fn no_ports_means_every_tcp_and_udp_port() {
        let mut w = web(&[[10, 0, 0, 2]]);
        w.ports.clear();
        assert!(script(&[w]).contains("ip daddr 10.0.0.100 meta l4proto { tcp, udp } dnat to jhash"));
    }

    #[test]
    fn no_services_leave_an_empty_table() {
        let s = script(&[]);
        assert!(s.contains("set vips {\n\t\ttype ipv4_addr\n\t}"), "{s}");
        assert!(!s.contains("dnat"));
    }

    #[test]
    fn the_script_does_not_depend_on_input_order_and_names_are_made_safe() {
        let mut a = web(&[[10, 0, 0, 2], [10, 0, 0, 3], [10, 0, 0, 4]]);
        let mut b = a.clone();
        b.name = "db\" x".into();
        b.vip = Ipv4Addr::new(10, 0, 0, 101);
        b.backends.reverse();
        let s1 = script(&[a.clone(), b.clone()]);
        a.backends.reverse();
        a.ports.reverse();
        let s2 = script(&[b, a]);
        assert_eq!(s1, s2);
        assert!(s1.contains("map svc_db__x {"), "{s1}");
        assert!(s1.contains("comment \"db_ x\""), "{s1}");
        assert!(s1.contains("elements = { 10.0.0.100, 10.0.0.101 }"));
    }

    #[test]
    fn map_names_stay_unique() {
        let mut taken = BTreeSet::new();
        assert_eq!(map_name("a.b", &mut taken), "svc_a_b");
        assert_eq!(map_name("a_b", &mut taken), "svc_a_b_2");
        assert_eq!(map_name("a-b", &mut taken), "svc_a-b");
    }
}

/// The mechanism, for real: a bridge with three replicas and a client, each in a namespace of
/// its own (a testbed host's bridge; no overlayd runs), `nft` and busybox servers. Needs root;
/// fails without it.
#[cfg(test)]
mod netns_tests {
    use std::collections::BTreeMap;
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::{SocketAddr, TcpStream, UdpSocket};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use testbed::{Container, Options, Testbed, netns};

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
    const TCP_PORT: u16 = 80;
    const UDP_PORT: u16 = 53;

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(f)
    }

    fn service(backends: &[Ipv4Addr]) -> VipService {
        VipService {
            name: "web".into(),
            vip: VIP,
            ports: vec![
                ServicePort { port: TCP_PORT, proto: Proto::Tcp },
                ServicePort { port: UDP_PORT, proto: Proto::Udp },
            ],
            backends: backends.to_vec(),
        }
    }

    fn v4(c: &Container) -> Ipv4Addr {
        match c.ip() {
            std::net::IpAddr::V4(a) => a,
            std::net::IpAddr::V6(_) => unreachable!("the containers have IPv4 addresses"),
        }
    }

    /// A TCP connection from the client to VIP:80 and the first line the replica sends (its name).
    fn connect(client: &Container) -> Result<(TcpStream, String)> {
        connect_to(client, SocketAddr::from((VIP, TCP_PORT)))
    }

    /// The same to `to` (VIP:80 as an IPv4-mapped IPv6 address: a dual-stack socket).
    fn connect_to(client: &Container, to: SocketAddr) -> Result<(TcpStream, String)> {
        netns::within(client.ns(), move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line)?;
            Ok((s, line.trim().to_owned()))
        })
    }

    /// Fails unless the connection to replica `name` was aborted: a read fails (ECONNABORTED)
    /// or sees EOF at once, not after a timeout.
    fn aborted(s: &mut TcpStream, name: &str) {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let t = Instant::now();
        match s.read(&mut [0u8; 16]) {
            Ok(0) => {}
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut => {}
            other => panic!("the connection to {name} is still up: {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(500), "the reset took {:?}", t.elapsed());
    }

    /// Fails unless the connection to replica `name` still echoes.
    fn echo(s: &mut TcpStream, name: &str, when: &str) {
        s.write_all(b"still there\n").unwrap_or_else(|e| panic!("the connection to {name} {when}: {e}"));
        let mut line = String::new();
        BufReader::new(&mut *s).read_line(&mut line).unwrap_or_else(|e| panic!("the connection to {name} {when}: {e}"));
        assert_eq!(line, "still there\n", "the connection to {name} {when}");
    }

    /// Replicas reached by `n` fresh connections, by name.
    fn spread(client: &Container, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let (s, name) = connect(client).unwrap_or_else(|e| panic!("connection {i} through the VIP: {e:#}"));
            assert!(!name.is_empty(), "connection {i}: the replica said nothing");
            drop(s);
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    }

    /// Replicas reached by `n` UDP exchanges, each from a fresh socket.
    fn udp_spread(client: &Container, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let s = udp_client(client);
            *seen.entry(udp_ask(&s).unwrap_or_else(|e| panic!("UDP exchange {i}: {e:#}"))).or_insert(0) += 1;
        }
        seen
    }

    fn udp_client(client: &Container) -> UdpSocket {
        netns::within(client.ns(), move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect((VIP, UDP_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .expect("a UDP socket in the client")
    }

    fn udp_ask(s: &UdpSocket) -> Result<String> {
        s.send(b"who?")?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// A UDP responder in a replica's namespace: answers each datagram with the replica's name.
    /// (busybox nc serves one UDP peer only.) Runs until `stop`.
    fn udp_responder(c: &Container, name: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let addr = SocketAddr::from((v4(c), UDP_PORT));
        let sock = netns::within(c.ns(), move || Ok(UdpSocket::bind(addr)?)).expect("a UDP server socket");
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let name = name.to_owned();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    sock.send_to(name.as_bytes(), peer).expect("a UDP answer");
                }
            }
        })
    }

    #[test]
    fn connections_through_the_vip_spread_and_those_to_a_gone_replica_are_reset() {
        // No overlayd runs here; the testbed wants a path to one, and this test binary exists.
        let bed = Testbed::new(Options::new(std::env::current_exe().unwrap()))
            .expect("cannot build the testbed (this test needs root: it creates network namespaces)");
        let host = bed.add_host().unwrap();
        netns::ip(["-n", host.ns(), "link", "add", "br0", "type", "bridge"]).unwrap();
        netns::ip(["-n", host.ns(), "link", "set", "br0", "up"]).unwrap();
        let names = ["r1", "r2", "r3"];
        let replicas: Vec<Container> = names
            .iter()
            .enumerate()
            .map(|(i, n)| host.add_container(n, "br0", &format!("10.77.0.{}/24", i + 2)).unwrap())
            .collect();
        let client = host.add_container("client", "br0", "10.77.0.10/24").unwrap();
        let addr: Vec<Ipv4Addr> = replicas.iter().map(v4).collect();
        let by_name: BTreeMap<String, Ipv4Addr> =
            names.iter().map(|n| n.to_string()).zip(addr.iter().copied()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut responders = Vec::new();
        for (c, name) in replicas.iter().zip(names) {
            // Each connection: the replica's name, then an echo of whatever comes.
            c.spawn(
                &format!("nc {name}"),
                "busybox",
                &["nc", "-ll", "-p", "80", "-e", "sh", "-c", &format!("echo {name}; exec cat")],
            )
            .unwrap();
            responders.push(udp_responder(c, name, Arc::clone(&stop)));
        }
        testbed::measure::wait_for(Duration::from_secs(5), "the replicas to listen", || {
            replicas
                .iter()
                .all(|c| c.exec("ss", ["-ltnH", "sport = :80"]).is_ok_and(|o| !o.trim().is_empty()))
                .then_some(())
        })
        .unwrap();
        let ns = std::path::PathBuf::from(client.netns_path());

        // All three replicas, for TCP and UDP.
        let started = Instant::now();
        block(apply(&ns, &script(&[service(&addr)]))).unwrap();
        println!("apply (one service, {} slots): {:?}", maglev::DEFAULT_SIZE, started.elapsed());
        let listed = client.exec("nft", ["list", "table", "ip", TABLE]).unwrap();
        assert!(listed.contains("dnat to jhash ip saddr . th sport mod 1021 seed 0x6f766c62 map @svc_web"), "{listed}");
        let seen = spread(&client, 30);
        println!("30 TCP connections: {seen:?}");
        assert_eq!(seen.keys().map(String::as_str).collect::<Vec<_>>(), names, "every replica is reached: {seen:?}");
        let seen = udp_spread(&client, 30);
        println!("30 UDP exchanges: {seen:?}");
        assert_eq!(seen.keys().map(String::as_str).collect::<Vec<_>>(), names, "every replica is reached: {seen:?}");

        // Held connections, idle; the first one's replica goes.
        // The first from a dual-stack (IPv6) socket, as a Java client's would be.
        let mapped = SocketAddr::from((VIP.to_ipv6_mapped(), TCP_PORT));
        let mut held = vec![connect_to(&client, mapped).expect("a connection from an IPv6 socket")];
        held.extend((0..8).map(|_| connect(&client).unwrap()));
        assert!(held[0].0.local_addr().unwrap().is_ipv6());
        let victim = held[0].1.clone();
        let victim_addr = by_name[&victim];
        let doomed = held.iter().filter(|(_, n)| *n == victim).count();
        // A UDP flow pinned to the victim (a fresh socket until one lands there; bounded).
        let udp = (0..200)
            .map(|_| udp_client(&client))
            .find(|s| udp_ask(s).is_ok_and(|n| n == victim))
            .expect("a UDP flow to the victim within 200 tries");
        let rest: Vec<Ipv4Addr> = addr.iter().copied().filter(|a| *a != victim_addr).collect();
        block(apply(&ns, &script(&[service(&rest)]))).unwrap();
        let started = Instant::now();
        let ended = block(reset(&ns, VIP, &[victim_addr])).unwrap();
        println!("reset of {victim} ({victim_addr}): {ended} flows in {:?}", started.elapsed());
        // At least the held TCP connections and the UDP flow; the count also takes the UDP
        // flows of the exchanges above that the victim answered (conntrack keeps them 30 s) and
        // any of the 30 short connections still closing.
        assert!(ended > doomed, "{ended} flows ended; {doomed} held TCP connections and a UDP flow went to {victim}");
        for (mut s, name) in held {
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            if name == victim {
                aborted(&mut s, &name);
            } else {
                echo(&mut s, &name, "after the rewrite and the reset");
            }
        }
        let again = udp_ask(&udp).expect("the UDP flow of the gone replica is answered again");
        assert_ne!(again, victim, "the UDP flow moved to a replica that lives");
        assert_eq!(block(reset(&ns, VIP, &[victim_addr])).unwrap(), 0, "nothing left to reset");
        assert_eq!(block(reset_except(&ns, VIP, &rest)).unwrap(), 0, "nothing is pinned to a replica that went");

        // New connections reach the other two only.
        let seen = spread(&client, 30);
        println!("30 TCP connections without {victim}: {seen:?}");
        assert!(!seen.contains_key(&victim), "{seen:?}");
        assert_eq!(seen.len(), 2, "both remaining replicas are reached: {seen:?}");
        let seen = udp_spread(&client, 30);
        assert!(!seen.contains_key(&victim) && seen.len() == 2, "UDP: {seen:?}");

        // No replica: refused at once, as is a port the service does not have; a connection
        // that was open stays up (conntrack has it; ending it is `reset`'s job).
        let (mut open, name) = connect(&client).unwrap();
        block(apply(&ns, &script(&[service(&[])]))).unwrap();
        echo(&mut open, &name, "after the rules for the service went");
        for port in [TCP_PORT, 81] {
            let t = Instant::now();
            let r = netns::within(client.ns(), move || {
                Ok(TcpStream::connect_timeout(&SocketAddr::from((VIP, port)), Duration::from_secs(2)))
            })
            .unwrap();
            let e = r.expect_err("a connection to a VIP without replicas");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "port {port}: {e}");
            assert!(t.elapsed() < Duration::from_millis(500), "port {port}: refused after {:?}", t.elapsed());
        }
        // UDP: the datagram is dropped on its way out, so the send itself fails (EPERM), and
        // the ICMP port unreachable the kernel made of it fails the next receive. From a port
        // outside the ephemeral range: one of the UDP flows above (still in conntrack, to a
        // replica) would otherwise be found again if its port came back.
        let s = netns::within(client.ns(), move || {
            let s = UdpSocket::bind("0.0.0.0:20053")?;
            s.connect((VIP, UDP_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .expect("a UDP socket in the client");
        let t = Instant::now();
        match s.send(b"who?") {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}"),
            Ok(_) => {
                let e = s.recv(&mut [0u8; 64]).expect_err("an answer from a VIP without replicas");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
            }
        }
        let e = s.recv(&mut [0u8; 64]).expect_err("an answer from a VIP without replicas");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(t.elapsed() < Duration::from_millis(500), "UDP: refused after {:?}", t.elapsed());

        // A service removed from a container that lives on: its flows are reset, then the table
        // goes (removing it again is fine).
        let ended = block(reset_except(&ns, VIP, &[])).unwrap();
        assert!(ended >= 1, "the open connection to {name} is reset");
        aborted(&mut open, &name);
        block(remove(&ns)).unwrap();
        assert!(client.exec("nft", ["list", "table", "ip", TABLE]).is_err(), "the table is gone");
        block(remove(&ns)).unwrap();

        stop.store(true, Ordering::Relaxed);
        for r in responders {
            r.join().unwrap();
        }
    }

    #[test]
    fn apply_says_which_namespace_failed() {
        let e = block(apply(Path::new("/nonexistent/ns"), "")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ns"), "{e:#}");
    }
}
