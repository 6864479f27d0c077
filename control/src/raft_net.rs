//! Raft between managers over gRPC with mutual TLS: openraft's requests and replies travel as
//! JSON inside [`proto::RaftMessage`]. The client connects lazily and reconnects after a
//! failure; an unreachable peer is reported as such so that openraft backs off. The serving
//! side (the manager's Raft service) hears these only from managers still in the cluster, and
//! votes only from voters (see [`crate::authz`]): a removed manager is refused, which its
//! client here takes for an unreachable peer.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use proto::raft_client::RaftClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::pki;
use crate::state::NodeId;
use crate::transport;
use crate::types::{RaftNode, TypeConfig};

/// How long to wait for a TCP+TLS connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes a client per peer, all with this node's mutual-TLS identity.
#[derive(Clone)]
pub struct NetworkFactory {
    identity: Arc<pki::NodeIdentity>,
}

impl NetworkFactory {
    /// A factory connecting as `identity`.
    pub fn new(identity: Arc<pki::NodeIdentity>) -> NetworkFactory {
        NetworkFactory { identity }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> PeerClient {
        PeerClient { target, addr: node.api_addr.clone(), identity: Arc::clone(&self.identity), client: None }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    identity: Arc<pki::NodeIdentity>,
    client: Option<RaftClient<Channel>>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, RaftNode, RaftError<NodeId, E>>;

impl PeerClient {
    async fn client(&mut self) -> Result<RaftClient<Channel>, Unreachable> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let addr = self.addr.parse().map_err(|e| Unreachable::new(&AddrError(format!("{}: {e}", self.addr))))?;
        let channel =
            transport::connect(addr, &self.identity, CONNECT_TIMEOUT).await.map_err(|e| Unreachable::new(&e))?;
        let c = RaftClient::new(channel);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Req, Resp, E>(&mut self, which: Rpc, req: &Req, option: &RPCOption) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.client().await.map_err(RPCError::Unreachable)?;
        let msg = proto::RaftMessage { payload };
        let fut = async {
            match which {
                Rpc::Append => client.append_entries(msg).await,
                Rpc::Vote => client.vote(msg).await,
                Rpc::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                // The connection may be gone: start afresh next time.
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&StatusError(status))));
            }
            Err(_) => {
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&AddrError(format!(
                    "no answer from {} within {:?}",
                    self.addr,
                    option.hard_ttl()
                )))));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AddrError(String);

#[derive(Debug, thiserror::Error)]
#[error("gRPC error {}: {}", .0.code(), .0.message())]
struct StatusError(tonic::Status);

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
