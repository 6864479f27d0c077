//! Plumbing a container into a network: a veth whose host end is on the network's bridge and
//! whose other end becomes the container's interface, with its address, MAC, MTU and a
//! default route via the gateway. Which address, and the records, are `endpoints`' business.
//!
//! The host end carries the endpoint's record as its alias ([`VethTag`]), so that the kernel
//! alone tells which endpoint a veth is ([`inspect`]) when the records on disk are lost.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use dataplane::MacAddr;
use dataplane::segment::endpoint_gso_max_size;
use futures::TryStreamExt;
use rtnetlink::{LinkUnspec, LinkVeth};
use serde::{Deserialize, Serialize};

use crate::endpoints::{LocalEndpoint, Origin};
use crate::netdev::{self, Bridge, Iface};

/// A container's network namespace, opened.
pub struct Netns {
    pub path: PathBuf,
    file: File,
    pub id: (u64, u64),
}

impl Netns {
    /// Opens a namespace by path, or `/proc/PID/ns/net`.
    pub fn open(path: Option<&str>, pid: Option<u32>) -> Result<Netns> {
        let path = match (path, pid) {
            (Some(p), None) if !p.is_empty() => PathBuf::from(p),
            (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            _ => bail!("give the container's network namespace with --netns PATH or --pid PID (one of them)"),
        };
        let file = File::open(&path).with_context(|| {
            format!("cannot open the network namespace {} (does the container or namespace exist?)", path.display())
        })?;
        nstype::check_net(&file).map_err(|what| {
            anyhow::anyhow!(
                "{} is not a network namespace ({what}): give a container's namespace, /run/netns/NAME or \
                 /proc/PID/ns/net, or its process with --pid",
                path.display()
            )
        })?;
        let meta = file.metadata()?;
        Ok(Netns { path, id: (meta.dev(), meta.ino()), file })
    }

    /// The namespace whose identity is `id`: at `path` if it still is there, else wherever
    /// `/run/netns` or a process shows it.
    pub fn find(path: &str, id: (u64, u64)) -> Option<Netns> {
        let here = |p: PathBuf| {
            let meta = std::fs::metadata(&p).ok()?;
            ((meta.dev(), meta.ino()) == id).then(|| Netns::open(p.to_str(), None).ok()).flatten()
        };
        if !path.is_empty()
            && let Some(ns) = here(PathBuf::from(path))
        {
            return Some(ns);
        }
        let named = std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
        let procs = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
            .map(|e| e.path().join("ns/net"));
        named.chain(procs).find_map(here)
    }

    /// A default endpoint name: the namespace file's name, or `pid<N>`.
    pub fn default_name(&self) -> String {
        let s = self.path.to_string_lossy();
        if let Some(pid) = s.strip_prefix("/proc/").and_then(|r| r.strip_suffix("/ns/net")) {
            return format!("pid{pid}");
        }
        self.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "container".into())
    }

    /// Runs `f` with a netlink handle inside this namespace, on a thread of its own (setns
    /// changes only the calling thread, which ends with `f`).
    pub(crate) async fn with_netlink<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        let fd = self.file.try_clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("overlayd-netns".into()).spawn(move || {
            let run = || -> Result<T> {
                // SAFETY: setns with a valid namespace fd; it affects only this short-lived thread.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("cannot enter the network namespace: {}", std::io::Error::last_os_error());
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let (conn, handle, _) = rtnetlink::new_connection()?;
                    tokio::spawn(conn);
                    f(handle).await
                })
            };
            let _ = tx.send(run());
        })?;
        rx.await.context("the namespace thread died")?
    }
}

/// The process an endpoint was attached by (`attach --pid`: its namespace path is
/// `/proc/PID/ns/net`), if it was.
pub fn attached_pid(netns: &str) -> Option<u32> {
    netns.strip_prefix("/proc/")?.strip_suffix("/ns/net")?.parse().ok()
}

/// Resolves when process `pid`, the one whose network namespace is `id`, exits. Fails (with
/// nothing to wait for) when it has exited already, or `pid` is another process by now.
///
/// A container attached by its process is gone when that process exits and nothing else holds
/// its namespace ([`namespace_held`]): this says so at once, where the veth that goes with the
/// namespace goes only when the kernel gets to tearing the namespace down (seconds later on a
/// busy host).
pub fn process_exit(pid: u32, id: (u64, u64)) -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::pid_t::try_from(pid).unwrap_or(-1), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after the pidfd is open: a PID reused before it would show another namespace (or
    // none), and one reused after cannot be, while the pidfd pins the process we checked.
    let meta = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
    if (meta.dev(), meta.ino()) != id {
        return Err(std::io::Error::other(format!("process {pid} is in another network namespace now")));
    }
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and the same until it drops.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    Ok(async move {
        // A pidfd turns readable when its process exits; an error (never seen) ends the wait too.
        let _ = fd.readable().await;
    })
}

/// Whether the namespace `id` is still at `path` (a name that was deleted, or is another
/// namespace's now, says no).
pub fn still_at(path: &str, id: (u64, u64)) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// Whether anything still holds the network namespace `id`: a process in it, a name under
/// `/run/netns`, a bind mount of it anywhere, or an open file of it in any process (a runtime
/// keeping it for a container that restarts). Reads `/proc`: for the moments a process exits,
/// not for a loop.
pub fn namespace_held(id: (u64, u64)) -> bool {
    if Netns::find("", id).is_some() {
        return true;
    }
    let link = format!("net:[{}]", id.1);
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(3) == Some(link.as_str())));
    mounted
        || std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|p| {
            std::fs::read_dir(p.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == link.as_str()))
        })
}

/// Sets an endpoint's MTU: its veth on the bridge, and its interface in the container (when
/// the container's namespace is still there), with the GSO size that goes with the MTU on a
/// network `sealed` or not ([`endpoint_gso_max_size`]).
pub async fn set_mtu(nl: &rtnetlink::Handle, ep: &LocalEndpoint, mtu: u32, sealed: bool) -> Result<()> {
    netdev::set_mtu(nl, &ep.host_ifname, mtu).await?;
    let Some(ns) = Netns::find(&ep.netns, ep.netns_id) else {
        tracing::debug!(endpoint = %ep.name, "its namespace is gone: only the host's end changed MTU");
        return Ok(());
    };
    let ifname = ep.ifname.clone();
    ns.with_netlink(move |h| async move {
        netdev::set_mtu(&h, &ifname, mtu).await?;
        netdev::set_gso_max_size(&h, &ifname, endpoint_gso_max_size(mtu, sealed)).await
    })
    .await
}

/// What an endpoint's veth is named after: the runtime's container id if it has one (its name
/// may be learned later), else its name.
pub fn veth_key<'a>(container_id: &'a str, name: &'a str) -> &'a str {
    if container_id.is_empty() { name } else { container_id }
}

/// Short, stable interface names for an endpoint: the host end and a temporary name for the
/// container end while it moves (Docker moves it itself, from that name).
pub fn veth_names(network: &str, name: &str) -> (String, String) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (network, name).hash(&mut h);
    let x = h.finish() & 0xff_ffff_ffff;
    (format!("ovl{x:010x}"), format!("ovp{x:010x}"))
}

/// What the host end of an endpoint's veth says of it (its alias: `overlayd-endpoint {json}`),
/// enough, with what the container's interface holds, to rebuild the endpoint's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethTag {
    /// The network.
    pub net: String,
    /// The endpoint's name.
    pub name: String,
    /// The interface in the container.
    pub ifname: String,
    /// The namespace's path as given to attach ("" when it did not fit).
    pub netns: String,
    /// The namespace's identity (device, inode).
    pub ns: (u64, u64),
    /// The runtime's id of the container, if a runtime attached it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cid: String,
    /// Who attached it.
    #[serde(default)]
    pub origin: Origin,
    /// The CNI network configuration that attached it (absent in an older overlayd's tags, and
    /// when it did not fit: GC then leaves the endpoint alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni: String,
}

const TAG_PREFIX: &str = "overlayd-endpoint ";
/// Linux keeps at most this much of an alias (IFALIASZ - 1).
const ALIAS_MAX: usize = 255;

impl VethTag {
    fn of(ep: &LocalEndpoint) -> VethTag {
        VethTag {
            net: ep.network.clone(),
            name: ep.name.clone(),
            ifname: ep.ifname.clone(),
            netns: ep.netns.clone(),
            ns: ep.netns_id,
            cid: ep.container_id.clone(),
            origin: ep.origin,
            cni: ep.cni_network.clone(),
        }
    }

    /// The alias text; without the path if it would not fit (the namespace is then found by
    /// its identity), and then without the CNI configuration's name (a record rebuilt from it
    /// is one CNI's GC leaves alone, rather than one it removes by mistake).
    pub fn alias(&self) -> String {
        let text = |t: &VethTag| format!("{TAG_PREFIX}{}", serde_json::to_string(t).unwrap_or_default());
        let full = text(self);
        if full.len() <= ALIAS_MAX {
            return full;
        }
        let pathless = VethTag { netns: String::new(), ..self.clone() };
        let short = text(&pathless);
        if short.len() <= ALIAS_MAX { short } else { text(&VethTag { cni: String::new(), ..pathless }) }
    }

    /// The tag an alias holds, if it holds one.
    pub fn parse(alias: &str) -> Option<VethTag> {
        serde_json::from_str(alias.strip_prefix(TAG_PREFIX)?).ok()
    }
}

/// Removes endpoint veths that no endpoint of this host's store holds (left by a state dir
/// that was wiped, say) whose tag names endpoint `name` or namespace `ns`; returns each as
/// (endpoint, network).
pub async fn remove_strays(
    nl: &rtnetlink::Handle,
    name: &str,
    ns: Option<(u64, u64)>,
    known: &[String],
) -> Result<Vec<(String, String)>> {
    let mut removed = Vec::new();
    for veth in netdev::links(nl).await? {
        if !is_endpoint_veth(&veth.name) || known.contains(&veth.name) {
            continue;
        }
        let Some(tag) = veth.alias.as_deref().and_then(VethTag::parse) else { continue };
        if (!name.is_empty() && tag.name == name) || ns.is_some_and(|id| tag.ns == id) {
            unplumb(nl, &veth.name).await?;
            tracing::info!(endpoint = %tag.name, network = %tag.net, veth = %veth.name, "removed a veth that no endpoint of this host holds");
            removed.push((tag.name, tag.net));
        }
    }
    Ok(removed)
}

/// Whether `name` is one overlayd gives the host end of an endpoint's veth ([`veth_names`]).
pub fn is_endpoint_veth(name: &str) -> bool {
    name.len() == 13 && name.starts_with("ovl") && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The endpoint whose host-side veth is `veth`, as the kernel shows it: the veth's tag, and the
/// address and MAC of its other end in the container. `Err` says why it is no endpoint.
pub async fn inspect(veth: &Iface) -> Result<LocalEndpoint, String> {
    let alias = veth.alias.as_deref().unwrap_or_default();
    let tag = VethTag::parse(alias).ok_or("its alias holds no overlayd endpoint tag")?;
    if veth_names(&tag.net, veth_key(&tag.cid, &tag.name)).0 != veth.name {
        return Err(format!(
            "its record names endpoint {:?} of network {:?}, whose veth has another name",
            tag.name, tag.net
        ));
    }
    let ns = Netns::find(&tag.netns, tag.ns).ok_or("the container's network namespace is gone")?;
    let (ifname, host_index) = (tag.ifname.clone(), veth.index);
    let inside = ns
        .with_netlink(move |h| async move {
            let Some(iface) = netdev::iface(&h, &ifname).await? else { return Ok(None) };
            let addrs = netdev::ipv4_addresses(&h, iface.index).await?;
            Ok(Some((iface, addrs)))
        })
        .await
        .map_err(|e| format!("cannot look into the container's namespace: {e:#}"))?;
    let Some((iface, addrs)) = inside else { return Err(format!("the container has no interface {}", tag.ifname)) };
    if iface.peer != Some(host_index) {
        return Err(format!("the container's {} is not the other end of this veth", tag.ifname));
    }
    let mac = iface.mac.map(MacAddr).ok_or("the container's interface has no MAC")?;
    let &(ip, prefix_len) = addrs
        .iter()
        .find(|(ip, _)| MacAddr::from_ipv4(*ip) == mac)
        .ok_or_else(|| format!("the container's {} has no address that its MAC {mac} derives from", tag.ifname))?;
    Ok(LocalEndpoint {
        network: tag.net,
        name: tag.name,
        ip,
        prefix_len,
        mac,
        host_ifname: veth.name.clone(),
        netns: ns.path.to_string_lossy().into_owned(),
        netns_id: ns.id,
        ifname: tag.ifname,
        container_id: tag.cid,
        origin: tag.origin,
        cni_network: tag.cni,
        // Aliases and the service are not kept on the veth (its alias has no room for them).
        aliases: Vec::new(),
        service: None,
    })
}

/// Creates the veth and configures both ends. On failure, the veth is removed again.
pub async fn plumb(
    nl: &rtnetlink::Handle,
    ns: &Netns,
    ep: &LocalEndpoint,
    bridge: &Bridge,
    mtu: u32,
    sealed: bool,
    gateway: Ipv4Addr,
) -> Result<()> {
    let tmp = create_veth(nl, ep, mtu, sealed).await?;
    let result = async {
        let peer = netdev::link_index(nl, &tmp).await?.context("the new veth's other end vanished")?;
        nl.link()
            .set(LinkUnspec::new_with_index(peer).setns_by_fd(ns.file.as_raw_fd()).build())
            .execute()
            .await
            .context("cannot move the veth into the container's namespace")?;
        let ep2 = ep.clone();
        ns.with_netlink(move |h| async move { configure_inside(&h, &tmp, &ep2, mtu, gateway).await }).await?;
        netdev::enslave(nl, &ep.host_ifname, bridge, mtu).await
    }
    .await;
    if result.is_err() {
        let _ = netdev::delete_link(nl, &ep.host_ifname).await;
    }
    result
}

/// Creates the veth for Docker: the host end on the bridge, the other end (returned) left in
/// this namespace with the endpoint's MAC, for Docker to move into the container and address.
pub async fn plumb_for_docker(
    nl: &rtnetlink::Handle,
    ep: &LocalEndpoint,
    bridge: &Bridge,
    mtu: u32,
    sealed: bool,
) -> Result<String> {
    let peer = create_veth(nl, ep, mtu, sealed).await?;
    let result = async {
        let index = netdev::link_index(nl, &peer).await?.context("the new veth's other end vanished")?;
        nl.link()
            .set(LinkUnspec::new_with_index(index).address(ep.mac.0.to_vec()).build())
            .execute()
            .await
            .context("cannot give the container's end its MAC")?;
        netdev::enslave(nl, &ep.host_ifname, bridge, mtu).await
    }
    .await;
    match result {
        Ok(()) => Ok(peer),
        Err(e) => {
            let _ = netdev::delete_link(nl, &ep.host_ifname).await;
            Err(e)
        }
    }
}

/// Writes the endpoint's record again on its veth (it changed: a name learned later).
pub async fn retag(nl: &rtnetlink::Handle, ep: &LocalEndpoint) -> Result<()> {
    let host = netdev::link_index(nl, &ep.host_ifname).await?.context("the endpoint's veth is gone")?;
    netdev::set_alias(nl, host, &VethTag::of(ep).alias()).await
}

/// The endpoint's veth, its host end tagged with the endpoint's record, the container's end
/// with the [`endpoint_gso_max_size`] of the network's MTU; returns the other end's (temporary) name.
async fn create_veth(nl: &rtnetlink::Handle, ep: &LocalEndpoint, mtu: u32, sealed: bool) -> Result<String> {
    let (_, tmp) = veth_names(&ep.network, veth_key(&ep.container_id, &ep.name));
    nl.link()
        .add(LinkVeth::new(&ep.host_ifname, &tmp).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("cannot create the veth {} (is it left over? run overlayd detach)", ep.host_ifname))?;
    let tagged = async {
        let host = netdev::link_index(nl, &ep.host_ifname).await?.context("the new veth vanished")?;
        netdev::set_alias(nl, host, &VethTag::of(ep).alias()).await?;
        netdev::set_gso_max_size(nl, &tmp, endpoint_gso_max_size(mtu, sealed)).await
    }
    .await;
    if let Err(e) = tagged {
        let _ = netdev::delete_link(nl, &ep.host_ifname).await;
        return Err(e);
    }
    Ok(tmp)
}

async fn configure_inside(
    h: &rtnetlink::Handle,
    tmp: &str,
    ep: &LocalEndpoint,
    mtu: u32,
    gateway: Ipv4Addr,
) -> Result<()> {
    if netdev::link_exists(h, &ep.ifname).await? {
        bail!("the namespace already has an interface {}: give another with --ifname", ep.ifname);
    }
    let idx = netdev::link_index(h, tmp).await?.context("the veth did not arrive in the namespace")?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).name(ep.ifname.clone()).address(ep.mac.0.to_vec()).mtu(mtu).build())
        .execute()
        .await
        .context("cannot name the container's interface")?;
    h.address()
        .add(idx, IpAddr::V4(ep.ip), ep.prefix_len)
        .execute()
        .await
        .context("cannot give the container its address")?;
    h.link().set(LinkUnspec::new_with_index(idx).up().build()).execute().await?;
    if let Some(lo) = netdev::link_index(h, "lo").await? {
        h.link().set(LinkUnspec::new_with_index(lo).up().build()).execute().await?;
    }
    let has_default = h
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map(|routes| routes.iter().any(|r| r.header.destination_prefix_length == 0))
        .unwrap_or(false);
    if !has_default {
        // Only the first network a container joins gives it its default route, as Docker does.
        let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(idx).build();
        netdev::ignore_exists(h.route().add(route).execute().await).context("cannot add the default route")?;
    }
    Ok(())
}

/// Removes an endpoint's veth (both ends go); gone already is fine.
pub async fn unplumb(nl: &rtnetlink::Handle, host_ifname: &str) -> Result<()> {
    netdev::delete_link(nl, host_ifname).await
}

/// What kind of file a namespace path opened: a network namespace or not (fenced `unsafe`).
mod nstype {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// `statfs.f_type` of the nsfs filesystem that namespace files live on.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    /// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)`: the `CLONE_NEW*` type of a namespace file (Linux 4.11).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

    /// `Ok` for a network namespace; else what it is instead.
    pub fn check_net(file: &File) -> Result<(), String> {
        // SAFETY: fstatfs writes into the zeroed statfs we pass, for an fd we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return Err(format!("cannot inspect it: {}", std::io::Error::last_os_error()));
        }
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
        if st.f_type as i64 != NSFS_MAGIC {
            let what = match file.metadata() {
                Ok(m) if m.is_dir() => "a directory",
                Ok(m) if m.is_file() => "a regular file",
                _ => "not a namespace file",
            };
            return Err(what.to_owned());
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd's namespace.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        match kind {
            k if k == libc::CLONE_NEWNET => Ok(()),
            // An older kernel cannot say: setns will.
            -1 => Ok(()),
            k => Err(format!("it is {}", name(k))),
        }
    }

    fn name(kind: libc::c_int) -> &'static str {
        match kind {
            libc::CLONE_NEWNS => "a mount namespace",
            libc::CLONE_NEWPID => "a PID namespace",
            libc::CLONE_NEWUTS => "a UTS namespace",
            libc::CLONE_NEWIPC => "an IPC namespace",
            libc::CLONE_NEWUSER => "a user namespace",
            libc::CLONE_NEWCGROUP => "a cgroup namespace",
            _ => "another kind of namespace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_network_namespace_passes() {
        let me = File::open("/proc/self/ns/net").unwrap();
        assert_eq!(nstype::check_net(&me), Ok(()));
        let mnt = File::open("/proc/self/ns/mnt").unwrap();
        assert_eq!(nstype::check_net(&mnt), Err("it is a mount namespace".into()));
        let file = File::open("/proc/self/status").unwrap();
        assert_eq!(nstype::check_net(&file), Err("a regular file".into()));
        let dir = File::open("/proc/self").unwrap();
        assert_eq!(nstype::check_net(&dir), Err("a directory".into()));
    }

    #[test]
    fn a_tag_round_trips_and_gives_up_the_path_before_the_limit() {
        let tag = VethTag {
            net: "blue".into(),
            name: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/c1".into(),
            ns: (4, 4026532001),
            cid: String::new(),
            origin: Origin::Attach,
            cni: String::new(),
        };
        assert_eq!(VethTag::parse(&tag.alias()), Some(tag.clone()));
        // A tag of an older overlayd (no CNI configuration) still parses.
        let old = r#"overlayd-endpoint {"net":"blue","name":"c1","ifname":"eth0","netns":"/run/netns/c1","ns":[4,4026532001],"origin":"cni"}"#;
        assert_eq!(VethTag::parse(old), Some(VethTag { origin: Origin::Cni, ..tag.clone() }));
        // The longest a runtime makes: a 63-character name, a 64-hex container id.
        let runtime = VethTag {
            net: "abcdefghij".into(),
            name: "n".repeat(63),
            cid: "f".repeat(64),
            origin: Origin::Docker,
            netns: "/var/run/docker/netns/0123456789ab".into(),
            ..tag.clone()
        };
        let alias = runtime.alias();
        assert!(alias.len() <= ALIAS_MAX, "{}", alias.len());
        assert_eq!(VethTag::parse(&alias), Some(VethTag { netns: String::new(), ..runtime.clone() }));
        let long = VethTag { netns: format!("/run/netns/{}", "x".repeat(250)), ..tag.clone() };
        let alias = long.alias();
        assert!(alias.len() <= ALIAS_MAX, "{}", alias.len());
        assert_eq!(VethTag::parse(&alias), Some(VethTag { netns: String::new(), ..long }));
        // A CNI configuration's name goes after the path, when even that is not enough (the
        // longest names and ids: the store file has it, a record rebuilt from the tag does not).
        let cni = VethTag { origin: Origin::Cni, cni: "web-replicas".into(), name: "web1".into(), ..runtime.clone() };
        assert_eq!(VethTag::parse(&cni.alias()), Some(cni.clone()), "a short name leaves room for all");
        let longest = VethTag { name: runtime.name.clone(), ..cni };
        let alias = longest.alias();
        assert!(alias.len() <= ALIAS_MAX, "{}", alias.len());
        assert_eq!(VethTag::parse(&alias), Some(VethTag { netns: String::new(), cni: String::new(), ..longest }));
        assert_eq!(VethTag::parse("created by someone"), None);
        assert_eq!(VethTag::parse("overlayd-endpoint {"), None);
    }

    #[test]
    fn endpoint_veth_names_are_recognised() {
        let (host, peer) = veth_names("blue", "c1");
        assert!(is_endpoint_veth(&host));
        assert!(!is_endpoint_veth(&peer));
        assert!(!is_endpoint_veth("ovl0"));
        assert!(!is_endpoint_veth("ovlzzzzzzzzzz"));
    }

    #[test]
    fn names_fit_linux_limits() {
        let (h, t) = veth_names("network-10", "a-very-long-container-name-indeed");
        assert!(h.len() <= 15 && t.len() <= 15);
        assert_ne!(veth_names("a", "x").0, veth_names("b", "x").0);
    }
}
