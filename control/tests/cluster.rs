//! Managers and a worker in one process, over loopback with real TLS and real Raft on redb:
//! bootstrap, joins with tokens, promotion to voter, writes forwarded to the leader, the watch,
//! and the loss of the leader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::follower::Follower;
use control::manager::{HostApi, Manager, ManagerConfig, unix_now};
use control::pki::{self, ClusterCa, JoinToken, NodeKey};
use control::state::{Command, NewNode, Role};
use control::transport;
use proto as pb;
use tokio::net::TcpListener;

struct NoEndpoints;
#[tonic::async_trait]
impl HostApi for NoEndpoints {
    async fn endpoints(&self, _: Option<&str>) -> Vec<pb::Endpoint> {
        Vec::new()
    }
}

struct Running {
    manager: Arc<Manager>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn serve(
    manager: Arc<Manager>,
    identity: &pki::NodeIdentity,
    listener: TcpListener,
) -> tokio::task::JoinHandle<()> {
    let routes = manager.services(Arc::new(NoEndpoints));
    let incoming = transport::incoming(listener, identity.server_config().unwrap());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_routes(routes).serve_with_incoming(incoming).await;
    })
}

async fn start_manager(identity: pki::NodeIdentity, listener: TcpListener) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ManagerConfig {
        dir: dir.path().join("raft"),
        api_addr: addr,
        default_mtu: 1450,
        cluster_id: "test".into(),
        opening: control::store::Opening::Create,
    };
    let identity = Arc::new(identity);
    let manager = Manager::open(config, Arc::clone(&identity)).await.unwrap();
    let server = serve(Arc::clone(&manager), &identity, listener).await;
    Running { manager, addr, server, _dir: dir }
}

async fn join(
    manager: SocketAddr,
    token: &JoinToken,
    name: &str,
    last: u8,
    listener: &TcpListener,
) -> (pki::NodeIdentity, pb::JoinReply) {
    let key = NodeKey::generate().unwrap();
    let channel = transport::connect_pinned(manager, token.ca_digest, Duration::from_secs(3)).await.unwrap();
    let reply = pb::manager_client::ManagerClient::new(channel)
        .join(pb::JoinRequest {
            secret: token.secret.clone(),
            name: name.into(),
            underlay_addr: format!("198.18.0.{last}"),
            api_addr: listener.local_addr().unwrap().to_string(),
            csr_der: key.csr_der(name).unwrap(),
            gossip_addr: format!("198.18.0.{last}:7946"),
            gossip_public_key: vec![last; 32],
            underlay_networks: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let identity = key.into_identity(&reply.node_cert_pem, &reply.ca_cert_pem).unwrap();
    (identity, reply)
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_and_a_worker_agree_and_survive_the_leader() {
    let ca = ClusterCa::generate("test").unwrap();
    let worker_token = JoinToken::generate(&ca);
    let manager_token = JoinToken::generate(&ca);

    // The first manager bootstraps the cluster.
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a1 = l1.local_addr().unwrap();
    let m1 = start_manager(ca.issue_node(1, Role::Manager).unwrap(), l1).await;
    let init = Command::Init {
        cluster_id: "test".into(),
        secrets: pki::cluster_secrets(&ca, &worker_token, &manager_token),
        node: NewNode {
            name: "m1".into(),
            underlay_addr: "198.18.0.1".parse().unwrap(),
            api_addr: a1,
            role: Role::Manager,
            joined_at: unix_now(),
            gossip_addr: "198.18.0.1:7946".parse().unwrap(),
            gossip_public_key: [1; 32],
            underlay_networks: Vec::new(),
        },
    };
    m1.manager.bootstrap(init).await.unwrap();

    // Two more managers join and are promoted to voters.
    let mut managers = vec![m1];
    for (name, last) in [("m2", 2u8), ("m3", 3)] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (identity, reply) = join(a1, &manager_token, name, last, &listener).await;
        assert_eq!(reply.role, pb::Role::Manager as i32);
        let id = identity.node_id();
        let ch = transport::connect(a1, &identity, Duration::from_secs(3)).await.unwrap();
        let running = start_manager(identity, listener).await;
        pb::manager_client::ManagerClient::new(ch).promote(pb::PromoteRequest {}).await.unwrap();
        let (voters, _) = managers[0].manager.members();
        assert!(voters.contains(&id), "{name} is a voter: {voters:?}");
        managers.push(running);
    }

    // A worker joins with the worker token and follows the state from the managers.
    let wl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (wid, reply) = join(managers[1].addr, &worker_token, "w1", 4, &wl).await;
    assert_eq!(reply.role, pb::Role::Worker as i32);
    let cache = tempfile::tempdir().unwrap();
    let seeds: Vec<SocketAddr> = reply.managers.iter().map(|m| m.api_addr.parse().unwrap()).collect();
    let follower = Follower::start(Arc::new(wid), seeds, cache.path().join("view.json"));
    until("the worker to see 4 nodes", async || (follower.view().nodes.len() == 4).then_some(())).await;

    // A wrong secret and a duplicate name are refused and change nothing.
    let bad = JoinToken { ca_digest: ca.digest(), secret: "a".repeat(26) };
    let key = NodeKey::generate().unwrap();
    let ch = transport::connect_pinned(a1, ca.digest(), Duration::from_secs(3)).await.unwrap();
    let err = pb::manager_client::ManagerClient::new(ch.clone())
        .join(pb::JoinRequest {
            secret: bad.secret,
            name: "x".into(),
            underlay_addr: "198.18.0.9".into(),
            api_addr: "127.0.0.1:1".into(),
            csr_der: key.csr_der("x").unwrap(),
            gossip_addr: "198.18.0.9:7946".into(),
            gossip_public_key: vec![9; 32],
            underlay_networks: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = pb::manager_client::ManagerClient::new(ch)
        .join(pb::JoinRequest {
            secret: worker_token.secret.clone(),
            name: "w1".into(),
            underlay_addr: "198.18.0.9".into(),
            api_addr: "127.0.0.1:1".into(),
            csr_der: key.csr_der("w1").unwrap(),
            gossip_addr: "198.18.0.9:7946".into(),
            gossip_public_key: vec![9; 32],
            underlay_networks: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    assert_eq!(follower.view().nodes.len(), 4);

    // A worker may not create a network; a network a manager creates through any manager
    // reaches the worker.
    let mut client = follower.manager().await.unwrap();
    let refused = client
        .create_network(pb::CreateNetworkRequest { name: "blue".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    let admin = ca.issue_node(1, Role::Manager).unwrap();
    let as_admin = async |addr| {
        pb::manager_client::ManagerClient::new(transport::connect(addr, &admin, Duration::from_secs(3)).await.unwrap())
    };
    let net = as_admin(managers[1].addr)
        .await
        .create_network(pb::CreateNetworkRequest { name: "blue".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(net.subnet, "10.128.0.0/16");
    let block = client.lease_block(pb::LeaseBlockRequest { network: "blue".into() }).await.unwrap().into_inner();
    assert_eq!(block.cidr, "10.128.0.0/24");
    until("the worker to see the network and its block", async || {
        let v = follower.view();
        (v.networks.contains_key("blue") && v.block("blue", 4).is_some()).then_some(())
    })
    .await;

    // The leader goes away: the others elect a new one and take writes again.
    let leader = managers[0].manager.leader().await.unwrap();
    let idx = managers.iter().position(|m| m.manager.node_id() == leader).unwrap();
    let dead = managers.remove(idx);
    dead.server.abort();
    dead.manager.raft.shutdown().await.unwrap();
    let new_leader = until("a new leader", async || managers[0].manager.leader().await.filter(|l| *l != leader)).await;
    assert_ne!(new_leader, leader);
    as_admin(managers[0].addr)
        .await
        .create_network(pb::CreateNetworkRequest { name: "red".into(), ..Default::default() })
        .await
        .unwrap();
    until("the worker to see the second network", async || follower.view().networks.contains_key("red").then_some(()))
        .await;
}
