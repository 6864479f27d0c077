//! Writes the seed corpora of the agent's fuzz targets into `corpus/<target>/`: config files
//! like the README's (with and without flags), `cluster.json` as `join` writes it, rtnetlink
//! datagrams: this host's kernel's own replies to the requests `netdev` makes (link and address
//! dumps, an unknown link), and the messages it makes for a bridge, a veth and a deleted link;
//! and for `agent_inputs`, `endpoints.json` and `docker.json` as the daemon writes them, the
//! gossip key files, CNI calls as runtimes make them and Docker's calls as Docker makes them.
//!
//! ```sh
//! cd agent/fuzz && cargo run --example seeds
//! ```

use std::path::{Path, PathBuf};

use agent_fuzz::docker_wire::{DockerEndpoint, DockerNetwork, DriverStore};
use agent_fuzz::endpoint_store::{EndpointStore, LocalEndpoint, Origin, Reservation};
use agent_fuzz::membership::Membership;
use control::state::Role;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::sys::Socket;
use rtnetlink::sys::protocols::NETLINK_ROUTE;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("a corpus directory");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).expect("a seed");
}

/// A config file, then the daemon's arguments (the format `config_file` reads).
fn config(file: &str, args: &[&str]) -> Vec<u8> {
    let mut v = file.as_bytes().to_vec();
    for a in args {
        v.push(0);
        v.extend_from_slice(a.as_bytes());
    }
    v
}

fn config_seeds() {
    let static_file = r#"
underlay_addr = "198.18.0.1"
vxlan_port = 4789
source_ports = "61000-61015"
offloads = "tap,gso"

[[network]]
name = "blue"
vni = 100
peers = ["198.18.0.2", "198.18.0.3"]
mtu = 1450

[[network]]
name = "red"
vni = 200
bridge = "br-red"
tap = "tap-red"
learning = false
peers = ["198.18.0.2"]
fdb = { "02:4f:0a:00:00:03" = "198.18.0.3" }
arp = { "10.0.0.3" = "02:4f:0a:00:00:03" }
"#;
    write("config_file", "static", &config(static_file, &[]));
    let cluster_file = r#"
log = "debug"
advertise_addr = "198.18.0.7"
metrics_addr = "127.0.0.1:9477"
underlay_mtu = 9000
dataplane_threads = "auto"
docker_plugin = "overlayd"
"#;
    write("config_file", "cluster", &config(cluster_file, &[]));
    write("config_file", "flags_over_file", &config(cluster_file, &["--log", "info", "--offloads", "all"]));
    let flags = ["--underlay-addr", "198.18.0.1", "--vni", "42", "--peer", "198.18.0.2", "--fdb"];
    let mut with_fdb = flags.to_vec();
    with_fdb.extend(["02:4f:0a:00:00:02=198.18.0.2", "--arp", "10.0.0.2=02:4f:0a:00:00:02", "--no-learning"]);
    write("config_file", "flags_only", &config("", &with_fdb));
    let v6 = "underlay_addr = \"fd00::1\"\n[[network]]\nvni = 7\npeers = [\"fd00::2\"]\nmtu = 1430\n";
    write("config_file", "ipv6", &config(v6, &[]));
}

fn membership_seeds() {
    let m = Membership {
        cluster_id: "9f2c41d07be35a16".into(),
        node_id: 3,
        name: "worker-3".into(),
        role: Role::Worker,
        advertise: "198.18.0.3:7947".parse().expect("an address"),
        underlay: "198.18.0.3".parse().expect("an address"),
        managers: vec!["198.18.0.1:7947".parse().expect("an address")],
        gossip: "198.18.0.3:7946".parse().expect("an address"),
    };
    write("membership_file", "worker", &serde_json::to_vec_pretty(&m).expect("encodes"));
    let v6 = Membership {
        role: Role::Manager,
        advertise: "[fd00::1]:7947".parse().expect("an address"),
        underlay: "fd00::1".parse().expect("an address"),
        managers: vec!["[fd00::1]:7947".parse().expect("an address"), "[fd00::2]:7947".parse().expect("an address")],
        gossip: "[fd00::1]:7946".parse().expect("an address"),
        ..m
    };
    write("membership_file", "manager_v6", &serde_json::to_vec_pretty(&v6).expect("encodes"));
}

fn encode(payload: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// The kernel's reply datagrams to `request`, up to and with the one that ends a dump (or the
/// first, for a request that is not a dump).
fn ask(request: RouteNetlinkMessage, flags: u16) -> Vec<Vec<u8>> {
    let mut socket = Socket::new(NETLINK_ROUTE).expect("a netlink socket");
    socket.bind_auto().expect("bound");
    socket.connect(&rtnetlink::sys::SocketAddr::new(0, 0)).expect("connected to the kernel");
    socket.send(&encode(request, flags), 0).expect("sent");
    let mut replies = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().expect("a reply");
        // NLMSG_DONE (3) or NLMSG_ERROR (2) ends it; a non-dump reply is one datagram.
        let last = flags & NLM_F_DUMP == 0 || datagram_types(&datagram).iter().any(|t| *t == 2 || *t == 3);
        replies.push(datagram);
        if last {
            return replies;
        }
    }
}

fn datagram_types(d: &[u8]) -> Vec<u16> {
    let mut types = Vec::new();
    let mut rest = d;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        types.push(u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes")));
        if len < 16 || len > rest.len() {
            break;
        }
        rest = &rest[(len + 3) & !3..];
        if rest.is_empty() {
            break;
        }
    }
    types
}

fn netlink_seeds() {
    let dump = NLM_F_REQUEST | NLM_F_DUMP;
    let links = ask(RouteNetlinkMessage::GetLink(LinkMessage::default()), dump);
    write("netlink_reply", "kernel_links", &links[0]);
    let addresses = ask(RouteNetlinkMessage::GetAddress(AddressMessage::default()), dump);
    write("netlink_reply", "kernel_addresses", &addresses[0]);
    write("netlink_reply", "kernel_done", addresses.last().expect("a reply"));
    let mut unknown = LinkMessage::default();
    unknown.header.index = 999_999;
    let nodev = ask(RouteNetlinkMessage::GetLink(unknown), NLM_F_REQUEST | NLM_F_ACK);
    write("netlink_reply", "kernel_no_such_link", &nodev[0]);

    let mut bridge = LinkMessage::default();
    bridge.header.index = 7;
    bridge.attributes = vec![
        LinkAttribute::IfName("ovbr-blue".into()),
        LinkAttribute::Mtu(1450),
        LinkAttribute::IfAlias("created by overlayd".into()),
        LinkAttribute::Address(vec![0x02, 0x4e, 10, 128, 0, 1]),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
    ];
    let mut veth = LinkMessage::default();
    veth.header.index = 9;
    veth.attributes = vec![
        LinkAttribute::IfName("ovh-blue-web".into()),
        LinkAttribute::Mtu(1450),
        LinkAttribute::Link(2),
        LinkAttribute::Controller(7),
        LinkAttribute::Address(vec![0x02, 0x4f, 10, 128, 0, 2]),
        LinkAttribute::IfAlias("overlayd:{\"network\":\"blue\",\"name\":\"web\"}".into()),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
    ];
    let mut deleted = LinkMessage::default();
    deleted.header.index = 9;
    deleted.attributes = vec![LinkAttribute::IfName("ovh-blue-web".into())];
    write("netlink_reply", "new_bridge", &encode(RouteNetlinkMessage::NewLink(bridge.clone()), 0));
    write("netlink_reply", "deleted_veth", &encode(RouteNetlinkMessage::DelLink(deleted), 0));
    let mut both = encode(RouteNetlinkMessage::NewLink(bridge), 0);
    both.extend(encode(RouteNetlinkMessage::NewLink(veth), 0));
    write("netlink_reply", "bridge_and_veth", &both);
}

/// An `agent_inputs` seed: the byte that picks the reader, then its input.
fn input(which: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![which];
    v.extend_from_slice(bytes);
    v
}

/// A CNI call as `agent_inputs` reads it: the verb (its index), `CNI_ARGS`, `CNI_CONTAINERID`,
/// `CNI_NETNS` and `CNI_IFNAME`, then the configuration.
fn cni(verb: u8, vars: [&str; 4], conf: &str) -> Vec<u8> {
    let mut v = vec![5, verb];
    for var in vars {
        v.extend_from_slice(var.as_bytes());
        v.push(0);
    }
    v.extend_from_slice(conf.as_bytes());
    v
}

/// A Docker call as `agent_inputs` reads it: its index in the target's list, then its body.
fn docker(call: u8, body: &str) -> Vec<u8> {
    let mut v = vec![6, call];
    v.extend_from_slice(body.as_bytes());
    v
}

fn agent_input_seeds() {
    let t = "agent_inputs";
    let web = LocalEndpoint {
        network: "web".into(),
        name: "app1".into(),
        ip: "10.128.1.2".parse().expect("an address"),
        prefix_len: 16,
        mac: "02:4f:0a:80:01:02".parse().expect("a MAC"),
        host_ifname: "ovh-web-app1".into(),
        netns: "/run/netns/app1".into(),
        netns_id: (4, 4026532841),
        ifname: "eth0".into(),
        container_id: String::new(),
        origin: Origin::Attach,
        aliases: vec!["db".into()],
        service: Some("api".into()),
        cni_network: String::new(),
    };
    let cni_ep = LocalEndpoint {
        name: "3f2a9c1b7d4e".into(),
        ip: "10.128.1.3".parse().expect("an address"),
        mac: "02:4f:0a:80:01:03".parse().expect("a MAC"),
        host_ifname: "ovh-web-3f2a9c".into(),
        container_id: "3f2a9c1b7d4e".repeat(5) + "abcd",
        origin: Origin::Cni,
        aliases: Vec::new(),
        service: None,
        ..web.clone()
    };
    let store = EndpointStore {
        endpoints: vec![web.clone()],
        pending: vec![cni_ep],
        reserved: vec![Reservation { network: "web".into(), ip: "10.128.1.9".parse().expect("an address") }],
        ..EndpointStore::default()
    };
    write(t, "endpoints", &input(0, &serde_json::to_vec_pretty(&store).expect("encodes")));
    write(t, "endpoints_empty", &input(0, br#"{"endpoints": []}"#));
    let driver = DriverStore {
        networks: [(
            "5e1b0c".to_owned(),
            DockerNetwork { subnet: "10.128.0.0/16".parse().expect("a subnet"), failed: String::new() },
        )]
        .into(),
        endpoints: [(
            "9d2f41".to_owned(),
            DockerEndpoint { network_id: "5e1b0c".into(), ip: "10.128.1.4".parse().expect("an address") },
        )]
        .into(),
        mirrored: ["web".to_owned()].into(),
    };
    write(t, "docker", &input(1, &serde_json::to_vec_pretty(&driver).expect("encodes")));
    write(t, "gossip_key", &input(2, format!("{}\n", "9f".repeat(32)).as_bytes()));
    write(t, "gossip_key_generation", &input(3, b"2"));
    let mut epoch = 1_764_000_000_000_000u64.to_le_bytes().to_vec();
    epoch.extend_from_slice(b"1764000000123456");
    write(t, "gossip_epoch", &input(4, &epoch));

    let vars = |args| [args, "3f2a9c1b7d4e", "/run/netns/cni-1", "eth0"];
    let conf = r#"{"cniVersion":"1.0.0","name":"web","type":"overlayd","network":"web"}"#;
    let rich = r#"{"cniVersion":"1.1.0","name":"web-replicas","type":"overlayd","network":"web","service":"api",
        "encrypted":true,"stateDir":"/var/lib/overlayd","runtimeConfig":{"aliases":{"web-replicas":["db","cache"]}}}"#;
    let args = "IgnoreUnknown=1;K8S_POD_NAME=app1;IP=10.128.1.7/16;MAC=02:4f:0a:80:01:07;OVERLAYD_SERVICE=web";
    let check = r#"{"cniVersion":"1.0.0","name":"web","type":"overlayd","network":"web","prevResult":{"cniVersion":"1.0.0",
        "interfaces":[{"name":"eth0","mac":"02:4f:0a:80:01:02","sandbox":"/run/netns/cni-1"}],
        "ips":[{"address":"10.128.1.2/16","gateway":"10.128.0.1","interface":0}]}}"#;
    let status = r#"{"cniVersion":"1.1.0","name":"web","type":"overlayd"}"#;
    let gc = r#"{"cniVersion":"1.1.0","name":"web","type":"overlayd",
        "cni.dev/valid-attachments":[{"containerID":"3f2a9c1b7d4e","ifname":"eth0"}]}"#;
    let list = r#"{"cniVersion":"0.3.1","name":"web","type":"overlayd","runtimeConfig":{"aliases":["db"]}}"#;
    // The verbs' indexes are the target's: ADD, DEL, CHECK, STATUS, GC, VERSION.
    for (name, verb, vars, conf) in [
        ("cni_add", 0, vars(""), conf),
        ("cni_add_args", 0, vars(args), rich),
        ("cni_del", 1, vars(""), conf),
        ("cni_check", 2, vars(""), check),
        ("cni_status", 3, vars(""), status),
        ("cni_gc", 4, vars(""), gc),
        ("cni_version", 5, ["", "", "", ""], r#"{"cniVersion":"0.4.0"}"#),
        ("cni_list_aliases", 0, vars(""), list),
    ] {
        write(t, name, &cni(verb, vars, conf));
    }

    let create = r#"{"NetworkID":"5e1b0c","Options":{"com.docker.network.enable_ipv6":false,
        "com.docker.network.generic":{"encrypted":""},"com.docker.network.internal":true},
        "IPv4Data":[{"AddressSpace":"overlayd","Pool":"10.128.0.0/16","Gateway":"10.128.0.1/16"}],"IPv6Data":[]}"#;
    let endpoint = r#"{"NetworkID":"5e1b0c","EndpointID":"9d2f41",
        "Interface":{"Address":"10.128.1.4/16","AddressIPv6":"","MacAddress":""},"Options":{}}"#;
    let join = r#"{"NetworkID":"5e1b0c","EndpointID":"9d2f41","SandboxKey":"/var/run/docker/netns/0123456789ab","Options":{}}"#;
    let ids = r#"{"NetworkID":"5e1b0c","EndpointID":"9d2f41"}"#;
    // The calls' indexes are the target's.
    for (name, call, body) in [
        ("docker_activate", 0, ""),
        (
            "docker_request_pool",
            4,
            r#"{"AddressSpace":"overlayd","Pool":"10.128.0.0/16","SubPool":"","Options":{"network":"web"},"V6":false}"#,
        ),
        ("docker_release_pool", 5, r#"{"PoolID":"10.128.0.0/16"}"#),
        (
            "docker_request_gateway",
            6,
            r#"{"PoolID":"10.128.0.0/16","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
        ),
        ("docker_request_address", 6, r#"{"PoolID":"10.128.0.0/16","Address":"10.128.1.4"}"#),
        ("docker_release_address", 7, r#"{"PoolID":"10.128.0.0/16","Address":"10.128.1.4/16"}"#),
        ("docker_create_network", 8, create),
        ("docker_delete_network", 9, r#"{"NetworkID":"5e1b0c"}"#),
        ("docker_create_endpoint", 10, endpoint),
        ("docker_delete_endpoint", 11, ids),
        ("docker_join", 12, join),
        ("docker_leave", 13, ids),
        ("docker_oper_info", 14, ids),
    ] {
        write(t, name, &docker(call, body));
    }
}

fn main() {
    config_seeds();
    membership_seeds();
    netlink_seeds();
    agent_input_seeds();
    for target in ["config_file", "membership_file", "netlink_reply", "agent_inputs"] {
        let n = std::fs::read_dir(corpus(target)).expect("written").count();
        println!("{target}: {n} seeds");
    }
}
