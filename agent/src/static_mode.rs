//! Static mode: networks, peers and entries from the configuration, no control plane — for
//! talking to kernel or hardware VTEPs, or a fixed set of hosts. An encrypted network here has
//! one pre-shared key (`--key-file`), epoch 0, never rotated.

use anyhow::{Context, Result};

use crate::config::DaemonConfig;
use crate::host::{Host, NetworkSpec};

/// Starts the dataplane and brings every configured network up. On failure, what was made
/// is removed again.
pub async fn start(nl: rtnetlink::Handle, cfg: &DaemonConfig) -> Result<Host> {
    let s = &cfg.settings;
    let underlay = s.underlay_addr.context("static mode needs an underlay address")?;
    let host = Host::start(nl, underlay, s.underlay_mtu, s.dataplane.clone()).await?;
    let result = async {
        for net in &cfg.networks {
            let what = format!("network {:?} (vni {})", net.name, net.vni);
            let key = match &net.key_file {
                Some(path) => Some(crate::config::read_key_file(path).with_context(|| what.clone())?),
                None => None,
            };
            // A sealed datagram is 32 bytes longer than a plain one.
            let overhead = host.overhead() + if key.is_some() { dataplane::crypto::OVERHEAD as u32 } else { 0 };
            let mtu = match net.mtu {
                Some(m) => m,
                None => host.underlay.mtu.checked_sub(overhead).filter(|m| *m >= 68).with_context(|| {
                    format!(
                        "{what}: the underlay MTU {} leaves no room for {overhead} bytes of VXLAN overhead; set --mtu",
                        host.underlay.mtu
                    )
                })?,
            };
            let spec = NetworkSpec {
                encrypted: key.is_some(),
                name: net.name.clone(),
                vni: net.vni,
                bridge: net.bridge.clone(),
                tap: net.tap.clone(),
                mtu,
                learning: net.learning,
                gateway: None,
            };
            host.add_network(spec).await.with_context(|| format!("cannot set up {what}"))?;
            if let Some(key) = key {
                host.seal_with_static_key(net.vni, key)?;
            }
            host.dataplane.update(|tx| {
                tx.set_flood_list(net.vni, net.peers.iter().copied())?;
                for (mac, vtep) in &net.fdb {
                    tx.set_fdb(net.vni, *mac, *vtep)?;
                }
                for (ip, mac) in &net.arp {
                    tx.set_arp(net.vni, *ip, *mac)?;
                }
                Ok(())
            })?;
        }
        // Remote checksum offload is a VTEP's capability, whatever the network.
        let rco = cfg.networks.iter().filter(|n| n.remote_checksum);
        let vteps: Vec<_> = rco.flat_map(|n| n.peers.iter().copied().chain(n.fdb.iter().map(|(_, v)| *v))).collect();
        host.dataplane.update(|tx| {
            tx.set_remote_checksum_vteps(vteps);
            Ok::<_, dataplane::tables::TableError>(())
        })?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        host.shutdown().await;
        return Err(e);
    }
    Ok(host)
}
