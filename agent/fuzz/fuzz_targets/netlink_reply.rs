//! Any datagram on the agent's rtnetlink sockets (the kernel's replies to its requests, and
//! the link notifications it subscribes to), cut into messages and parsed as rtnetlink's
//! connection does (netlink-proto's `NetlinkCodec`, which calls
//! `NetlinkMessage::<RouteNetlinkMessage>::deserialize`), then read as `netdev` reads each
//! one: a deleted link's name, a link's name, MTU, alias, kind, peer and MAC, and the networks
//! of this host's addresses.
#![no_main]

use std::net::IpAddr;

use agent_fuzz::netdev_reply::{alias_of, deleted_link, iface_of, is_bridge, mtu_of};
use bytes::BytesMut;
use control::cidr::Ipv4Cidr;
use libfuzzer_sys::fuzz_target;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::proto::{NetlinkCodec, NetlinkMessageCodec as _};

fn read(msg: &NetlinkMessage<RouteNetlinkMessage>) {
    let deleted = deleted_link(msg);
    let NetlinkPayload::InnerMessage(inner) = &msg.payload else {
        assert!(deleted.is_none());
        return;
    };
    if !matches!(inner, RouteNetlinkMessage::DelLink(_)) {
        assert!(deleted.is_none(), "only a deletion names a deleted link");
    }
    match inner {
        RouteNetlinkMessage::NewLink(l)
        | RouteNetlinkMessage::DelLink(l)
        | RouteNetlinkMessage::GetLink(l)
        | RouteNetlinkMessage::SetLink(l) => {
            let iface = iface_of(l);
            assert_eq!(iface.index, l.header.index);
            assert_eq!(iface.alias.as_deref(), alias_of(l));
            let _ = (mtu_of(l), is_bridge(l));
        }
        RouteNetlinkMessage::NewAddress(a)
        | RouteNetlinkMessage::DelAddress(a)
        | RouteNetlinkMessage::GetAddress(a) => {
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Address(IpAddr::V4(ip)) => {
                        if let Some(net) = Ipv4Cidr::containing(*ip, a.header.prefix_len) {
                            assert!(net.contains(*ip), "{net} holds {ip}");
                        }
                    }
                    AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => {
                        let _ = ip.is_loopback();
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut datagram = BytesMut::from(data);
    // Every message takes at least a header's 16 bytes, so this ends.
    while let Ok(Some(msg)) = NetlinkCodec::decode::<RouteNetlinkMessage>(&mut datagram) {
        read(&msg);
    }
});
