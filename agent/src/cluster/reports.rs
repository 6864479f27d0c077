//! What a cluster host answers the CLI: the cluster part of `status`, `node ls`, `peers` and
//! `network inspect` (other hosts' endpoints as gossip reports them: no host is asked).

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use control::state::NodeId;
use dataplane::MacAddr;
use proto as pb;

use super::ClusterRuntime;
use crate::endpoints;

/// The drop reasons `network inspect` lists as refused datagrams: those of sealing.
const REFUSALS: [&str; 5] = [
    dataplane::DropReason::AuthFailed.name(),
    dataplane::DropReason::Replayed.name(),
    dataplane::DropReason::UnknownKey.name(),
    dataplane::DropReason::SealTruncated.name(),
    dataplane::DropReason::PlainOnEncrypted.name(),
];

fn handshakes(c: &control::transport::HandshakeCounters) -> pb::ControlHandshakes {
    pb::ControlHandshakes {
        completed: c.completed,
        failed: c.failed,
        timed_out: c.timed_out,
        refused_source_busy: c.refused_source_busy,
        refused_full: c.refused_full,
        in_progress: c.in_progress,
    }
}

impl ClusterRuntime {
    /// The cluster part of `overlayd status`.
    pub async fn status(&self) -> pb::ClusterStatus {
        let view = self.follower.view();
        let (connected, to) = self.follower.connection();
        let leader = match &self.manager {
            Some(m) => m.leader().await.unwrap_or(0),
            None => 0,
        };
        pb::ClusterStatus {
            cluster_id: self.membership.cluster_id.clone(),
            node_id: self.membership.node_id,
            node_name: self.membership.name.clone(),
            role: pb::Role::from(self.membership.role) as i32,
            leader_id: leader,
            revision: view.revision,
            connected,
            connected_to: to.map(|a| a.to_string()).unwrap_or_default(),
            api_addr: self.membership.advertise.to_string(),
            handshakes: Some(handshakes(&self.admission.counters())),
            removed: self.follower.removed(),
        }
    }

    /// `overlayd node ls`.
    /// The other hosts that hold an endpoint named `name`, as "h3 (198.18.0.3, network web)",
    /// from gossip.
    pub fn holders_of(&self, name: &str) -> Vec<String> {
        let view = self.follower.view();
        let heard = self.gossip.subscribe().borrow().clone();
        let mut out = Vec::new();
        for (id, table) in &heard.endpoints {
            let Some(node) = view.nodes.get(id).filter(|_| *id != self.membership.node_id) else { continue };
            for (k, _) in table.iter().filter(|(_, e)| e.name == name) {
                let network = view.networks.values().find(|n| n.vni == k.vni).map_or("?", |n| n.name.as_str());
                out.push(format!("{} ({}, network {network})", node.name, node.underlay_addr));
            }
        }
        out
    }

    pub async fn node_list(&self) -> pb::NodeListReply {
        let view = self.follower.view();
        let leader = match self.follower.manager().await {
            Ok(mut c) => c.info(pb::Empty {}).await.map(|r| r.into_inner().leader_id).unwrap_or(0),
            Err(_) => 0,
        };
        pb::NodeListReply {
            nodes: view.nodes.values().map(pb::Node::from).collect(),
            leader_id: leader,
            self_id: self.membership.node_id,
        }
    }

    /// `overlayd peers`: every host of the view (and any other SWIM member) as gossip sees it.
    pub async fn peers(&self) -> Result<pb::PeersReply> {
        let snap = self.gossip.snapshot().await?;
        let view = self.follower.view();
        let raft = |id: NodeId| match view.nodes.get(&id).map(|n| n.status) {
            Some(control::state::NodeStatus::Ready) => "ready",
            Some(control::state::NodeStatus::Down) => "down",
            None => "-",
        };
        let mut peers: Vec<pb::PeerInfo> = snap
            .peers
            .iter()
            .map(|p| pb::PeerInfo {
                node_id: p.node,
                name: view.nodes.get(&p.node).map(|n| n.name.clone()).unwrap_or_default(),
                state: p.state.to_owned(),
                gossip_addr: view.nodes.get(&p.node).map(|n| n.gossip_addr.to_string()).unwrap_or_default(),
                generation: p.generation,
                incarnation: u32::from(p.incarnation),
                table_epoch: p.table.map_or(0, |t| t.epoch),
                table_version: p.table.map_or(0, |t| t.watermark),
                endpoints: p.endpoints as u32,
                raft_status: raft(p.node).to_owned(),
            })
            .collect();
        let me = self.membership.node_id;
        let own = self.endpoints.lock().await.endpoints.len();
        peers.push(pb::PeerInfo {
            node_id: me,
            name: self.membership.name.clone(),
            state: "self".into(),
            gossip_addr: snap.me.addr.to_string(),
            generation: snap.me.generation,
            incarnation: 0,
            table_epoch: snap.me.generation,
            table_version: 0,
            endpoints: own as u32,
            raft_status: raft(me).to_owned(),
        });
        peers.sort_by_key(|p| p.node_id);
        let counters = serde_json::to_value(&snap.counters)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .map(|m| m.into_iter().filter_map(|(k, v)| Some((k, v.as_u64()?))).collect())
            .unwrap_or_default();
        Ok(pb::PeersReply { peers, self_id: me, counters })
    }

    /// `overlayd network inspect`: the network, each host's block, and the endpoints of every
    /// host that has a block (this host's own, the others' as gossip reports them).
    pub async fn network_inspect(&self, name: &str) -> Result<pb::NetworkInspectReply> {
        let view = self.follower.view();
        let net =
            view.networks.get(name).with_context(|| format!("no network named {name:?} (see overlayd network ls)"))?;
        let blocks = view.blocks.get(name).cloned().unwrap_or_default();
        let peers = blocks
            .iter()
            .map(|(id, cidr)| {
                let n = view.nodes.get(id);
                pb::NetworkPeer {
                    node_id: *id,
                    node_name: n.map(|n| n.name.clone()).unwrap_or_default(),
                    vtep: n.map(|n| n.underlay_addr.to_string()).unwrap_or_default(),
                    block: cidr.to_string(),
                }
            })
            .collect();
        // Other hosts' endpoints come from gossip: no host is asked, however many there are.
        let heard = self.gossip.subscribe().borrow().clone();
        let mut endpoints = Vec::new();
        let mut unreachable = Vec::new();
        for (id, cidr) in &blocks {
            let Some(node) = view.nodes.get(id) else { continue };
            if *id == self.membership.node_id {
                let store = self.endpoints.lock().await;
                endpoints.extend(store.in_network(name).map(|e| endpoints::to_pb(e, *id, &node.name)));
                continue;
            }
            if !heard.alive.contains(id) {
                unreachable.push(format!("{}: down (its endpoints are withdrawn until it is back)", node.name));
                continue;
            }
            for (k, e) in heard.endpoints.get(id).into_iter().flatten() {
                if k.vni != net.vni || !cidr.contains(k.ip) {
                    continue;
                }
                endpoints.push(pb::Endpoint {
                    network: name.to_owned(),
                    name: e.name.clone(),
                    ip: k.ip.to_string(),
                    prefix_len: u32::from(net.subnet.prefix()),
                    mac: MacAddr(e.mac).to_string(),
                    node_id: *id,
                    node_name: node.name.clone(),
                    ..Default::default()
                });
            }
        }
        endpoints.sort_by_key(|e| e.ip.parse::<Ipv4Addr>().ok());
        // This host's sealing and refusals, from the same counters as `status`.
        let here = self.host.status("cluster").await.networks.into_iter().find(|n| n.name == name);
        let (sealing, refused) = here.map_or_else(Default::default, |n| {
            let refused = n
                .counters
                .map(|c| c.dropped.into_iter().filter(|(reason, _)| REFUSALS.contains(&reason.as_str())).collect())
                .unwrap_or_default();
            (n.sealing, refused)
        });
        Ok(pb::NetworkInspectReply { network: Some(net.into()), peers, endpoints, unreachable, sealing, refused })
    }
}
