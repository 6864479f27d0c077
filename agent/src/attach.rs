//! Plumbing a container into a network: a veth whose host end is on the network's bridge and
//! whose other end becomes the container's interface, with its address, MAC, MTU and a
//! default route via the gateway. Which address, and the records, are `endpoints`' business.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use rtnetlink::{LinkUnspec, LinkVeth};

use crate::endpoints::LocalEndpoint;
use crate::netdev::{self, Bridge};

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
        let meta = file.metadata()?;
        Ok(Netns { path, id: (meta.dev(), meta.ino()), file })
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
    async fn with_netlink<F, Fut, T>(&self, f: F) -> Result<T>
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

/// Short, stable interface names for an endpoint: the host end and a temporary name for the
/// container end while it moves.
pub fn veth_names(network: &str, name: &str) -> (String, String) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (network, name).hash(&mut h);
    let x = h.finish() & 0xff_ffff_ffff;
    (format!("ovl{x:010x}"), format!("ovp{x:010x}"))
}

/// Creates the veth and configures both ends. On failure, the veth is removed again.
pub async fn plumb(
    nl: &rtnetlink::Handle,
    ns: &Netns,
    ep: &LocalEndpoint,
    bridge: &Bridge,
    mtu: u32,
    gateway: Ipv4Addr,
) -> Result<()> {
    let (_, tmp) = veth_names(&ep.network, &ep.name);
    nl.link()
        .add(LinkVeth::new(&ep.host_ifname, &tmp).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("cannot create the veth {} (is it left over? run overlayd detach)", ep.host_ifname))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_limits() {
        let (h, t) = veth_names("network-10", "a-very-long-container-name-indeed");
        assert!(h.len() <= 15 && t.len() <= 15);
        assert_ne!(veth_names("a", "x").0, veth_names("b", "x").0);
    }
}
