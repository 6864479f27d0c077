//! The agent's other inputs from outside and from its state dir, the first byte picking which
//! reader gets the rest, each the reader the daemon (or the CNI plugin) runs:
//!
//! 0. `endpoints.json`, through `EndpointStore::load`: a store that loads saves and loads back
//!    the same, and every address it holds has a holder; a corrupt one is named (the daemon sets
//!    it aside and rebuilds it).
//! 1. `docker.json`, as the Docker driver reads it: what loads encodes and decodes the same.
//! 2. `gossip.key`: a key that reads is 32 bytes whose hex reads back the same.
//! 3. `gossip.key-generation`: a generation that reads is written and read back the same.
//! 4. `gossip-epoch` (after 8 bytes of the clock, in µs): the next epoch is above the last and
//!    the clock, with room above it, and the start after it is later still; or the file is
//!    refused as holding no room above it.
//! 5. The CNI plugin: a verb (a byte), `CNI_ARGS`, `CNI_CONTAINERID`, `CNI_NETNS` and
//!    `CNI_IFNAME` (each ended by a zero byte; empty: unset), then the configuration on stdin,
//!    run against a daemon that attaches anything: an error is the spec's, in a version the
//!    plugin speaks, and only a complete request reaches the daemon.
//! 6. The Docker driver: a call (a byte) and its body, decoded as the driver decodes it: a
//!    refusal is 400 for a known call (naming it), 404 for another; the driver's first checks of
//!    what decodes run too.
#![no_main]

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;

use agent_fuzz::cni::{self, AttachArgs, Attached, CniEnv, CniError, Daemon, SUPPORTED_VERSIONS};
use agent_fuzz::docker_wire::{DriverStore, Request, wants_encryption};
use agent_fuzz::endpoint_store::{EndpointStore, LoadError};
use agent_fuzz::gossip_keyfiles::{self as keyfiles, EPOCH_ROOM};
use agent_fuzz::scratch_dir;
use control::cidr::Ipv4Cidr;
use libfuzzer_sys::fuzz_target;

/// The verbs a runtime gives the plugin, and one it does not.
const VERBS: [&str; 7] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "FROB"];

/// The calls Docker makes of the driver, and one it does not.
const CALLS: [&str; 20] = [
    "Plugin.Activate",
    "NetworkDriver.GetCapabilities",
    "IpamDriver.GetCapabilities",
    "IpamDriver.GetDefaultAddressSpaces",
    "IpamDriver.RequestPool",
    "IpamDriver.ReleasePool",
    "IpamDriver.RequestAddress",
    "IpamDriver.ReleaseAddress",
    "NetworkDriver.CreateNetwork",
    "NetworkDriver.DeleteNetwork",
    "NetworkDriver.CreateEndpoint",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.Join",
    "NetworkDriver.Leave",
    "NetworkDriver.EndpointOperInfo",
    "NetworkDriver.ProgramExternalConnectivity",
    "NetworkDriver.RevokeExternalConnectivity",
    "NetworkDriver.DiscoverNew",
    "NetworkDriver.DiscoverDelete",
    "NetworkDriver.Frob",
];

fn endpoints_file(data: &[u8]) {
    let path = scratch_dir().join("endpoints.json");
    std::fs::write(&path, data).expect("the file is written");
    match EndpointStore::load(&path) {
        Ok(store) => {
            store.save(&path).expect("a store that loads saves");
            let again = EndpointStore::load(&path).map_err(|_| ()).expect("what was saved loads");
            assert_eq!(again, store, "a store saved loads back the same");
            for e in store.endpoints.iter().chain(&store.pending) {
                assert!(store.holder(&e.network, e.ip).is_some() && store.uses(&e.network), "{e:?}");
                assert!(store.in_network(&e.network).all(|x| x.network == e.network));
                // The block of the endpoint's network on this host, kept small.
                let Some(block) = Ipv4Cidr::containing(e.ip, e.prefix_len.clamp(24, 32)) else { continue };
                let gateway = block.nth(1).unwrap_or(e.ip);
                if let Some(ip) = store.allocate(&e.network, block, gateway) {
                    assert!(block.contains(ip) && ip != gateway && ip != block.addr(), "{ip} of {block}");
                    assert!(store.holder(&e.network, ip).is_none(), "{ip} is free");
                }
            }
            for r in &store.reserved {
                assert!(store.holder(&r.network, r.ip).is_some() && store.uses(&r.network), "{r:?}");
            }
        }
        Err(LoadError::Corrupt(e)) => {
            assert!(EndpointStore::from_slice(data).is_err());
            assert!(format!("{e:#}").contains("endpoints.json"), "a corrupt store is named: {e:#}");
        }
        Err(LoadError::Unreadable(e)) => panic!("the file is there: {e:#}"),
    }
}

fn docker_file(data: &[u8]) {
    let Ok(store) = DriverStore::from_slice(data) else { return };
    let json = serde_json::to_vec_pretty(&store).expect("encodes");
    let again = DriverStore::from_slice(&json).expect("what was saved loads");
    assert_eq!(again, store, "the driver's store saved loads back the same");
}

fn cluster_key(data: &[u8]) {
    // The daemon reads it as text: other bytes cannot be read.
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(key) = keyfiles::cluster_key(text) {
        assert_eq!(text.trim().len(), 64);
        assert_eq!(keyfiles::cluster_key(&hex::encode(key)), Some(key));
    }
}

fn key_generation(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(g) = keyfiles::key_generation(text) {
        assert_eq!(keyfiles::key_generation(&g.to_string()), Ok(g));
    }
}

fn epoch_file(data: &[u8]) {
    let (now, file) = data.split_at(data.len().min(8));
    let mut clock = [0; 8];
    clock[..now.len()].copy_from_slice(now);
    let now = u64::from_le_bytes(clock);
    // The daemon takes a file it cannot read as text as no file.
    let text = std::str::from_utf8(file).ok();
    let last = text.and_then(|t| t.trim().parse::<u64>().ok());
    match keyfiles::next_epoch(text, now) {
        Some(epoch) => {
            assert!(epoch >= now && epoch > last.unwrap_or(0), "{epoch} after {last:?} at {now}");
            assert!(epoch.checked_add(EPOCH_ROOM).is_some(), "room for this life's rejoins");
            if let Some(next) = keyfiles::next_epoch(Some(&epoch.to_string()), now) {
                assert!(next > epoch, "the next start's epoch is later");
            }
        }
        None => {
            let room = |t: u64| t.checked_add(EPOCH_ROOM);
            let last = last.unwrap_or(0);
            assert!(room(last).and_then(|above| room(now.max(above))).is_none(), "{last} at {now} leaves room");
        }
    }
}

/// A daemon that attaches anything asked of it once (its endpoints kept across the plugin's
/// runs), and checks that it is asked only what a complete request asks.
#[derive(Clone, Default)]
struct AnyDaemon(Rc<RefCell<Vec<Attached>>>);

impl Daemon for AnyDaemon {
    fn attach(&mut self, a: &AttachArgs) -> Result<Attached, CniError> {
        for (what, v) in [("network", &a.network), ("netns", &a.netns), ("ifname", &a.ifname), ("id", &a.container_id)]
        {
            assert!(!v.is_empty(), "an attach with no {what}: {a:?}");
        }
        assert!(!a.name.is_empty(), "an endpoint with no name: {a:?}");
        let mut attached = self.0.borrow_mut();
        if attached.iter().any(|e| e.container_id == a.container_id && e.network == a.network) {
            return Err(CniError::new(cni::code::ALREADY_ATTACHED, "already attached"));
        }
        let e = Attached {
            network: a.network.clone(),
            cni_network: a.cni_network.clone(),
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            netns: a.netns.clone(),
            ip: a.ip.unwrap_or(Ipv4Addr::new(10, 128, 1, 2)),
            prefix_len: 16,
            gateway: Ipv4Addr::new(10, 128, 0, 1),
            mac: "02:4f:0a:80:01:02".into(),
            mtu: 1450,
            nameservers: vec!["10.128.0.1".into()],
        };
        attached.push(e.clone());
        Ok(e)
    }

    fn detach(&mut self, network: &str, id: &str, ifname: &str) -> Result<(), CniError> {
        assert!(!network.is_empty() && !id.is_empty() && !ifname.is_empty(), "detach {network:?} {id:?} {ifname:?}");
        self.0.borrow_mut().retain(|e| !(e.network == network && e.container_id == id && e.ifname == ifname));
        Ok(())
    }

    fn cni_endpoints(&mut self, network: &str) -> Result<Vec<Attached>, CniError> {
        assert!(!network.is_empty());
        Ok(self.0.borrow().iter().filter(|e| e.network == network).cloned().collect())
    }

    fn ready(&mut self, network: &str) -> Result<(), CniError> {
        assert!(!network.is_empty());
        Ok(())
    }

    fn encrypted(&mut self, network: &str) -> Result<bool, CniError> {
        Ok(network.len() % 2 == 0)
    }
}

fn cni_call(data: &[u8]) {
    let Some((&verb, rest)) = data.split_first() else { return };
    let verb = VERBS[usize::from(verb) % VERBS.len()];
    let mut parts = rest.splitn(5, |b| *b == 0);
    let mut var = || {
        let v = parts.next().unwrap_or_default();
        // A variable that is not UTF-8 is one the plugin cannot read (`std::env::var`).
        std::str::from_utf8(v).ok().filter(|v| !v.is_empty()).map(str::to_owned)
    };
    let (args, id, netns, ifname) = (var(), var(), var(), var());
    let stdin = parts.next().unwrap_or_default();
    let env = CniEnv::from_vars(|k| match k {
        "CNI_ARGS" => args.clone(),
        "CNI_CONTAINERID" => id.clone(),
        "CNI_NETNS" => netns.clone(),
        "CNI_IFNAME" => ifname.clone(),
        _ => None,
    });
    // Twice, as a runtime may: a second ADD meets the first's endpoint.
    let daemon = AnyDaemon::default();
    for _ in 0..2 {
        let d = daemon.clone();
        let (out, ok) = cni::run(verb, &env, stdin, move |_| Box::new(d));
        if ok {
            assert!(verb != "FROB");
            if verb == "ADD" {
                let v = out["cniVersion"].as_str().expect("a result names its version");
                assert!(SUPPORTED_VERSIONS.contains(&v), "{out}");
                assert!(out["ips"][0]["address"].is_string() && out["interfaces"][0]["name"].is_string(), "{out}");
            }
        } else {
            let v = out["cniVersion"].as_str().expect("an error names its version");
            assert!(SUPPORTED_VERSIONS.contains(&v), "{out}");
            assert!(out["code"].as_u64().is_some() && out["msg"].as_str().is_some_and(|m| !m.is_empty()), "{out}");
        }
    }
}

fn docker_call(data: &[u8]) {
    let Some((&call, body)) = data.split_first() else { return };
    let call = CALLS[usize::from(call) % CALLS.len()];
    let request = match Request::decode(call, body) {
        Ok(r) => r,
        Err((status, answer)) => {
            let err = answer["Err"].as_str().expect("a refusal says why");
            match status {
                400 => assert!(err.contains(&format!("malformed {call} request")), "{err}"),
                404 => assert_eq!(call, "NetworkDriver.Frob", "a call the driver has: {err}"),
                other => panic!("{other}: {err}"),
            }
            return;
        }
    };
    let cidr = |s: &str| {
        if let Ok(c) = s.parse::<Ipv4Cidr>() {
            assert_eq!(c.to_string().parse::<Ipv4Cidr>().ok(), Some(c));
        }
    };
    match request {
        Request::RequestPool(r) => cidr(&r.pool),
        Request::RequestAddress(r) => cidr(&r.pool_id),
        Request::ReleaseAddress(r) => cidr(&r.pool_id),
        Request::CreateNetwork(r) => {
            let _ = r.options.as_ref().is_some_and(wants_encryption);
            r.ipv4_data.iter().flatten().for_each(|d| cidr(&d.pool));
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 7 {
        0 => endpoints_file(rest),
        1 => docker_file(rest),
        2 => cluster_key(rest),
        3 => key_generation(rest),
        4 => epoch_file(rest),
        5 => cni_call(rest),
        _ => docker_call(rest),
    }
});
