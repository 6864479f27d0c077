//! What overlayd reads in the kernel's rtnetlink replies and notifications once
//! netlink-packet-route has parsed them: a link's name, MTU, alias, kind, peer and MAC, and the
//! name of a link that was deleted. No I/O, so that the agent's fuzz targets run these on
//! whatever the kernel could send.

use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};

/// The name of the link a notification says was deleted (`RTM_DELLINK`), if it names one.
pub fn deleted_link(msg: &NetlinkMessage<RouteNetlinkMessage>) -> Option<String> {
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) = &msg.payload else { return None };
    link.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
}

/// Whether a notification says a link was made or changed (`RTM_NEWLINK`).
pub fn is_new_link(msg: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
    matches!(&msg.payload, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(_)))
}

/// A link's MTU.
pub fn mtu_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(v) = a { Some(*v) } else { None })
}

/// Whether a link is a bridge.
pub fn is_bridge(m: &LinkMessage) -> bool {
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

/// A link's alias (`ip link set DEV alias TEXT`).
pub fn alias_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| if let LinkAttribute::IfAlias(s) = a { Some(s.as_str()) } else { None })
}

/// What a listing of this namespace's interfaces tells about one of them.
#[derive(Debug, Clone)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub alias: Option<String>,
    /// Its veth peer's index (in the peer's namespace), or its lower device's.
    pub peer: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub veth: bool,
}

/// What a link message tells about its link.
pub fn iface_of(m: &LinkMessage) -> Iface {
    let mut info = Iface {
        name: String::new(),
        index: m.header.index,
        alias: alias_of(m).map(str::to_owned),
        peer: None,
        mac: None,
        veth: false,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Link(p) => info.peer = Some(*p),
            LinkAttribute::Address(mac) => info.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                info.veth |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    info
}
