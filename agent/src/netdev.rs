//! Host plumbing over netlink (rtnetlink, never by running `ip`): the bridge and TAP of each
//! network, and the MTU of the underlay interface.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoBridge, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

pub use self::reply::Iface;
use self::reply::{alias_of, iface_of, is_bridge, mtu_of};

mod reply;

/// The alias overlayd writes on bridges it creates, so that a bridge left behind by a crashed
/// agent is recognised as ours, adopted, and removed on the next clean exit.
pub const BRIDGE_ALIAS: &str = "created by overlayd";

/// Opens a netlink connection served on the current tokio runtime.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The names of links as they are deleted, from the kernel's link notifications (a veth goes
/// when the namespace holding its other end does). The channel closes if the socket fails.
pub fn link_deletions() -> Result<tokio::sync::mpsc::UnboundedReceiver<String>> {
    link_notifications(reply::deleted_link)
}

/// Every change the kernel announces of this namespace's interfaces (`RTM_NEWLINK`: one made,
/// or its MTU, state or name changed), as a wake-up: the receiver reads what it cares about.
pub fn link_changes() -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    link_notifications(|msg| reply::is_new_link(msg).then_some(()))
}

/// The kernel's link notifications (`RTMGRP_LINK`) that `pick` keeps, on a channel of their
/// own (a socket each).
fn link_notifications<T: Send + 'static>(
    pick: fn(&rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>) -> Option<T>,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<T>> {
    use futures::StreamExt as _;
    use rtnetlink::sys::{AsyncSocket as _, SocketAddr};
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().context("cannot open a netlink socket for link notifications")?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
        .context("cannot subscribe to link notifications")?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let Some(x) = pick(&msg)
                && tx.send(x).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match h.link().get().match_name(name.to_owned()).execute().try_next().await {
        Ok(m) => Ok(m),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot look up interface {name}")),
    }
}

/// The MTU of the interface that holds `addr`. Fails, listing this host's addresses, if no
/// interface holds it.
pub async fn underlay_mtu(h: &Handle, addr: IpAddr) -> Result<(String, u32)> {
    let mut found = None;
    let mut seen = Vec::new();
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = a {
                if *ip == addr {
                    found = Some(msg.header.index);
                }
                if !seen.contains(ip) {
                    seen.push(*ip);
                }
            }
        }
    }
    let Some(index) = found else {
        let list = seen.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        bail!(
            "the underlay address {addr} is not assigned to any interface in this network namespace \
             (addresses here: {list}); pass this host's own address with --underlay-addr"
        );
    };
    let link = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .context("cannot read the underlay interface")?
        .context("the underlay interface vanished")?;
    let name = link
        .attributes
        .iter()
        .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
        .unwrap_or_default();
    let mtu = mtu_of(&link).context("the underlay interface reports no MTU")?;
    Ok((name, mtu))
}

/// A bridge ready for use, and whether overlayd owns it (and so removes it on exit).
#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub index: u32,
    pub owned: bool,
}

/// Creates the bridge `name` with `mtu`, or adopts an existing one. An existing interface that
/// is not a bridge is an error. A bridge someone else made is used but never removed.
pub async fn ensure_bridge(h: &Handle, name: &str, mtu: u32) -> Result<Bridge> {
    let (link, owned) = match link_by_name(h, name).await? {
        Some(link) => {
            if !is_bridge(&link) {
                bail!("the interface {name} exists and is not a bridge; remove it or choose another bridge name");
            }
            let owned = alias_of(&link) == Some(BRIDGE_ALIAS);
            (link, owned)
        }
        None => {
            h.link()
                .add(
                    LinkBridge::new(name)
                        .down()
                        .mtu(mtu)
                        .alias(BRIDGE_ALIAS)
                        // Snooping makes the bridge join 224.0.0.106 and announce it with IGMP
                        // into every network; all multicast is replicated to every VTEP anyway.
                        .append_info_data(InfoBridge::MulticastSnooping(false))
                        .build(),
                )
                .execute()
                .await
                .with_context(|| format!("cannot create the bridge {name}"))?;
            let link = link_by_name(h, name).await?.with_context(|| format!("the new bridge {name} vanished"))?;
            (link, true)
        }
    };
    let index = link.header.index;
    disable_ipv6(name);
    // The alias is set here, not with the add: the kernel ignores IFLA_IFALIAS when it creates
    // a link, and a bridge without it is not recognised as ours by the next daemon.
    let mut set = LinkUnspec::new_with_index(index).mtu(mtu).up();
    if owned {
        set = set.alias(BRIDGE_ALIAS);
    }
    h.link()
        .set(set.build())
        .execute()
        .await
        .with_context(|| format!("cannot set MTU {mtu} and bring up the bridge {name}"))?;
    Ok(Bridge { name: name.to_owned(), index, owned })
}

/// Puts an (already created) TAP on a bridge with `mtu` and a long transmit queue, and brings
/// it up.
pub async fn attach_tap(h: &Handle, tap: &str, bridge: &Bridge, mtu: u32) -> Result<()> {
    let link = link_by_name(h, tap).await?.with_context(|| format!("the TAP {tap} vanished"))?;
    disable_ipv6(tap);
    h.link()
        .set(
            LinkUnspec::new_with_index(link.header.index)
                .mtu(mtu)
                .txqueuelen(TAP_TXQUEUELEN)
                .controller(bridge.index)
                .up()
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("cannot attach the TAP {tap} to the bridge {}", bridge.name))
}

/// Transmit queue of the TAP: the tun default (500) drops bursts the agent would have taken.
const TAP_TXQUEUELEN: u32 = 10_000;

/// Removes an interface by name; gone already is fine.
pub async fn delete_link(h: &Handle, name: &str) -> Result<()> {
    if let Some(link) = link_by_name(h, name).await? {
        h.link().del(link.header.index).execute().await.with_context(|| format!("cannot remove {name}"))?;
    }
    Ok(())
}

/// The bridge and TAP are layer-2 ports of the overlay: an IPv6 link-local address on them
/// would make the host itself send router and neighbour solicitations and MLD reports into
/// every network, which the TAP would flood to every VTEP. Hosts without IPv6 have no such
/// file, which is fine.
fn disable_ipv6(dev: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
}

/// The MAC of a cluster network's gateway: the same on every host (an anycast gateway, as in
/// EVPN), derived from its address under a prefix of its own (`02:4e`), so that nothing takes
/// it for an endpoint's derived MAC (`02:4f`).
pub fn gateway_mac(gw: std::net::Ipv4Addr) -> [u8; 6] {
    let o = gw.octets();
    [0x02, 0x4e, o[0], o[1], o[2], o[3]]
}

/// Puts a cluster network's gateway on its bridge (as /32, with a route to this host's own
/// block only: the host reaches its containers; the gateway never answers across the overlay).
/// The bridge gets the gateway's MAC: a bridge whose address was never set takes its lowest
/// port's, so a container or TAP coming or going would move the gateway under containers that
/// resolved it, cutting their way out until their ARP entry expires.
pub async fn set_gateway(
    h: &Handle,
    bridge: &Bridge,
    gw: std::net::Ipv4Addr,
    local_block: control::cidr::Ipv4Cidr,
) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(bridge.index).address(gateway_mac(gw).to_vec()).build())
        .execute()
        .await
        .with_context(|| format!("cannot give the bridge {} the gateway's MAC", bridge.name))?;
    ignore_exists(h.address().add(bridge.index, IpAddr::V4(gw), 32).execute().await)
        .with_context(|| format!("cannot put the gateway {gw} on the bridge {}", bridge.name))?;
    let route = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .destination_prefix(local_block.addr(), local_block.prefix())
        .output_interface(bridge.index)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .build();
    ignore_exists(h.route().add(route).execute().await)
        .with_context(|| format!("cannot route {local_block} to the bridge {}", bridge.name))
}

/// The firewall mark of a connection a published port took in (set by the services' routing
/// mesh, `services::mesh`), and the routing table that sends it to the replica through the
/// network's mesh port: "om".
pub const MESH_MARK: u32 = 0x6f6d_0000;
/// The routing table of [`MESH_MARK`]: each mesh port's subnet.
pub const MESH_TABLE: u32 = 0x6f6d;

/// Makes a network's mesh port: a veth pair whose end `peer` is on the network's bridge and
/// whose end `port`, in the host, holds this host's mesh address `addr` (as /32, with the MAC
/// derived from it) and is the way, in the routing table [`MESH_TABLE`], to the network's
/// `subnet` for the connections marked [`MESH_MARK`]. So a connection a published port takes
/// in reaches its replica from a MAC and address that are this host's alone (the gateway's are
/// every host's), and the replica's answers find their way back here. The port answers ARP
/// only for its own address (and the bridge only for the gateway), takes the mark into
/// account for reverse-path filtering, and has no IPv6. A pair left by a crash is replaced.
pub async fn add_mesh_port(
    h: &Handle,
    port: &str,
    peer: &str,
    bridge: &Bridge,
    mtu: u32,
    addr: std::net::Ipv4Addr,
    subnet: control::cidr::Ipv4Cidr,
) -> Result<()> {
    delete_link(h, port).await?;
    h.link()
        .add(rtnetlink::LinkVeth::new(port, peer).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("cannot create the mesh port {port}"))?;
    let index = link_index(h, port).await?.with_context(|| format!("the new mesh port {port} vanished"))?;
    let peer_index = link_index(h, peer).await?.with_context(|| format!("the new mesh port {peer} vanished"))?;
    for dev in [port, peer] {
        disable_ipv6(dev);
    }
    for (dev, key, value) in [
        (port, "arp_ignore", "1"),
        (port, "arp_announce", "2"),
        (port, "src_valid_mark", "1"),
        (bridge.name.as_str(), "arp_ignore", "1"),
    ] {
        let path = format!("/proc/sys/net/ipv4/conf/{dev}/{key}");
        std::fs::write(&path, value).with_context(|| format!("cannot set {path} to {value}"))?;
    }
    let mac = dataplane::MacAddr::from_ipv4(addr);
    h.link()
        .set(LinkUnspec::new_with_index(index).address(mac.0.to_vec()).alias(BRIDGE_ALIAS).build())
        .execute()
        .await
        .with_context(|| format!("cannot give the mesh port {port} its MAC"))?;
    ignore_exists(h.address().add(index, IpAddr::V4(addr), 32).execute().await)
        .with_context(|| format!("cannot put the mesh address {addr} on {port}"))?;
    h.link()
        .set(LinkUnspec::new_with_index(peer_index).mtu(mtu).controller(bridge.index).up().build())
        .execute()
        .await
        .with_context(|| format!("cannot put the mesh port {peer} on the bridge {}", bridge.name))?;
    h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    let route = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .destination_prefix(subnet.addr(), subnet.prefix())
        .output_interface(index)
        .table_id(MESH_TABLE)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .build();
    ignore_exists(h.route().add(route).replace().execute().await)
        .with_context(|| format!("cannot route {subnet} to the mesh port {port}"))?;
    let rule = h
        .rule()
        .add()
        .v4()
        .fw_mark(MESH_MARK)
        .table_id(MESH_TABLE)
        .priority(MESH_TABLE)
        .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
    ignore_exists(rule.execute().await).context("cannot add the routing mesh's rule (ip rule fwmark … lookup …)")
}

/// Removes the rule [`add_mesh_port`] adds (when the host stops); gone already is fine.
pub async fn remove_mesh_rule(h: &Handle) -> Result<()> {
    let rules: Vec<_> = h.rule().get(rtnetlink::IpVersion::V4).execute().try_collect().await?;
    for r in rules {
        let ours = r
            .attributes
            .iter()
            .any(|a| matches!(a, rtnetlink::packet_route::rule::RuleAttribute::FwMark(m) if *m == MESH_MARK))
            && r.attributes
                .iter()
                .any(|a| matches!(a, rtnetlink::packet_route::rule::RuleAttribute::Table(t) if *t == MESH_TABLE));
        if ours {
            h.rule().del(r).execute().await.context("cannot remove the routing mesh's rule")?;
        }
    }
    Ok(())
}

/// `Ok` for success and for "already exists".
pub fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

/// Whether an interface exists.
pub async fn link_exists(h: &Handle, name: &str) -> Result<bool> {
    Ok(link_by_name(h, name).await?.is_some())
}

/// Puts an existing interface on a bridge with `mtu` and brings it up.
pub async fn enslave(h: &Handle, name: &str, bridge: &Bridge, mtu: u32) -> Result<()> {
    let link = link_by_name(h, name).await?.with_context(|| format!("no interface {name}"))?;
    h.link()
        .set(LinkUnspec::new_with_index(link.header.index).mtu(mtu).controller(bridge.index).up().build())
        .execute()
        .await
        .with_context(|| format!("cannot put {name} on the bridge {}", bridge.name))
}

/// Sets the largest super-frame an interface's own TCP sends (`gso_max_size`); 0 leaves it.
/// overlayd gives a container's interface [`dataplane::segment::endpoint_gso_max_size`], so
/// that each of its super-frames leaves the host in one UDP GSO send.
pub async fn set_gso_max_size(h: &Handle, name: &str, size: u32) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    let link = link_by_name(h, name).await?.with_context(|| format!("no interface {name}"))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(link.header.index)
                .append_extra_attribute(rtnetlink::packet_route::link::LinkAttribute::GsoMaxSize(size))
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("cannot set the GSO size of {name} to {size}"))
}

/// Sets an interface's MTU; gone is an error.
pub async fn set_mtu(h: &Handle, name: &str, mtu: u32) -> Result<()> {
    let link = link_by_name(h, name).await?.with_context(|| format!("no interface {name}"))?;
    h.link()
        .set(LinkUnspec::new_with_index(link.header.index).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("cannot set the MTU of {name} to {mtu}"))
}

/// The index of an interface.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_by_name(h, name).await?.map(|l| l.header.index))
}

/// This host's global unicast IPv4 addresses (not loopback, not link-local), in order.
pub async fn global_addresses(h: &Handle) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a
                && !ip.is_loopback()
                && !ip.is_link_local()
                && !ip.is_unspecified()
                && !out.contains(&IpAddr::V4(*ip))
            {
                out.push(IpAddr::V4(*ip));
            }
        }
    }
    Ok(out)
}

/// Every interface of this namespace.
pub async fn links(h: &Handle) -> Result<Vec<Iface>> {
    let mut out = Vec::new();
    let mut links = h.link().get().execute();
    while let Some(m) = links.try_next().await.context("cannot list interfaces")? {
        out.push(iface_of(&m));
    }
    Ok(out)
}

/// One interface by name, if it exists.
pub async fn iface(h: &Handle, name: &str) -> Result<Option<Iface>> {
    Ok(link_by_name(h, name).await?.as_ref().map(iface_of))
}

/// Sets an interface's alias (`ip link set DEV alias TEXT`).
pub async fn set_alias(h: &Handle, index: u32, alias: &str) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).alias(alias).build())
        .execute()
        .await
        .with_context(|| format!("cannot set the alias of interface {index}"))
}

/// The IPv4 addresses (with prefix length) of interface `index`.
pub async fn ipv4_addresses(h: &Handle, index: u32) -> Result<Vec<(std::net::Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                out.push((*ip, msg.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// The IPv4 networks of this host's own addresses, sorted: every interface's but loopback's,
/// link-local ones, and overlayd's own bridges' (they carry the overlay's gateways).
pub async fn host_networks(h: &Handle) -> Result<Vec<control::cidr::Ipv4Cidr>> {
    let ours: Vec<u32> = links(h)
        .await?
        .into_iter()
        .filter(|l| l.name.starts_with("ovbr-") || l.alias.as_deref() == Some(BRIDGE_ALIAS))
        .map(|l| l.index)
        .collect();
    let mut out = Vec::new();
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
        if ours.contains(&msg.header.index) {
            continue;
        }
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                if ip.is_loopback() || ip.is_link_local() {
                    continue;
                }
                if let Some(net) = control::cidr::Ipv4Cidr::containing(*ip, msg.header.prefix_len) {
                    out.push(net);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use dataplane::MacAddr;

    #[test]
    fn the_gateways_mac_is_no_endpoints() {
        let mac = MacAddr(super::gateway_mac(Ipv4Addr::new(10, 128, 0, 1)));
        assert_eq!(mac.to_string(), "02:4e:0a:80:00:01");
        assert_eq!(mac.derived_ipv4(), None, "the dataplane would take it for an endpoint's");
    }
}
