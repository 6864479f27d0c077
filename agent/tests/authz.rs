//! Who may do what (issue 12, items 1–3): managers manage, workers only run. Real daemons in
//! network namespaces; the attacks come from a host's own namespace with its own node
//! certificate (the files in its state dir's `pki/`), through a gRPC client of the control
//! port — not only through the CLI, which asks its daemon first.
//!
//! These tests need root (they create namespaces). They fail, never skip, when they cannot run.
#![allow(clippy::print_stderr)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use control::pki::NodeIdentity;
use proto as pb;
use proto::manager_client::ManagerClient;
use proto::raft_client::RaftClient;
use serde_json::Value;
use testbed::cluster::Cluster;
use testbed::measure::wait_for;
use testbed::{Host, Options, Testbed};
use tonic::transport::Channel;
use tonic::{Code, Status};

const T: Duration = Duration::from_secs(20);
const CONTROL_PORT: u16 = 7947;

fn bed() -> Testbed {
    Testbed::new(Options::new(env!("CARGO_BIN_EXE_overlayd"))).expect("cannot build the testbed (run as root)")
}

fn form(bed: &Testbed, managers: usize, workers: usize) -> Cluster {
    let c = Cluster::form(bed, managers, workers).expect("cannot form the cluster");
    c.await_nodes(managers + workers, &[], T).unwrap();
    c
}

/// The clients an attacker holding a node's certificate has of one node's control port.
struct Clients {
    manager: ManagerClient<Channel>,
    raft: RaftClient<Channel>,
    channel: Channel,
}

/// Runs `f` with clients of `target`'s control port, made in `from`'s namespace with the
/// node certificate in `pki` (a state dir's `pki/`, or a copy of one). The outer error is the
/// harness's; the inner one is what the control port answered.
fn attack<T, F, Fut>(from: &Host, pki: &Path, target: IpAddr, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(Clients) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let pki = pki.to_owned();
    testbed::netns::within(from.ns(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let identity = NodeIdentity::load(&pki)?.ok_or_else(|| anyhow::anyhow!("no certificate in {pki:?}"))?;
            let addr = SocketAddr::new(target, CONTROL_PORT);
            let channel = control::transport::connect(addr, &identity, Duration::from_secs(5)).await?;
            let clients = Clients {
                manager: ManagerClient::new(channel.clone()),
                raft: RaftClient::new(channel.clone()),
                channel,
            };
            Ok(tokio::time::timeout(Duration::from_secs(15), f(clients)).await?)
        })
    })
    .expect("the attack could not run")
}

/// A copy of host `i`'s certificate and keys, which outlives its state dir.
fn save_pki(c: &Cluster, bed: &Testbed, i: usize) -> PathBuf {
    let from = c.agents[i].state_dir().join("pki");
    let to = bed.dir().join(format!("saved-pki-{i}"));
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, Status>) -> Status {
    match r {
        Err(s) if s.code() == Code::PermissionDenied => s,
        other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

/// The first event of a watch stream, or the refusal.
async fn first_event(mut c: Clients) -> Result<pb::WatchEvent, Status> {
    let mut stream = c.manager.watch(pb::WatchRequest { from_revision: 0 }).await?.into_inner();
    stream.message().await?.ok_or_else(|| Status::aborted("the stream ended without an event"))
}

fn node_names(agent: &testbed::Agent) -> Vec<String> {
    let ls = agent.json(&["node", "ls"]).unwrap();
    ls["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap().to_owned()).collect()
}

fn network_names(agent: &testbed::Agent) -> Vec<String> {
    let ls = agent.json(&["network", "ls"]).unwrap();
    ls["networks"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap().to_owned()).collect()
}

/// The state `node` has in `agent`'s `peers`, if it is listed.
fn gossip_state(agent: &testbed::Agent, node: u64) -> Option<String> {
    let p = agent.json(&["peers"]).ok()?;
    p["peers"].as_array()?.iter().find(|x| x["node_id"] == node)?["state"].as_str().map(str::to_owned)
}

fn node_id(agent: &testbed::Agent) -> u64 {
    agent.status().unwrap()["cluster"]["node_id"].as_u64().unwrap()
}

/// Item 1: a worker's certificate follows the state and leases its own blocks, and manages
/// nothing — not through the CLI, not by calling a manager's control port itself.
#[test]
fn a_worker_follows_and_runs_but_manages_nothing() {
    let bed = bed();
    let c = form(&bed, 2, 1);
    let (manager, manager2, worker) = (0, 1, 2);
    c.agents[manager].json(&["network", "create", "blue"]).unwrap();
    let pki = c.agents[worker].state_dir().join("pki");
    let target = c.hosts[manager].addr();
    let me = node_id(&c.agents[worker]);

    // What a worker may do: watch, heartbeat, lease and release its own block, ask who leads.
    let first = attack(&c.hosts[worker], &pki, target, first_event).expect("a worker may watch");
    assert!(first.revision > 0);
    attack(&c.hosts[worker], &pki, target, move |mut c| async move {
        c.manager.heartbeat(pb::HeartbeatRequest::default()).await?;
        let block = c.manager.lease_block(pb::LeaseBlockRequest { network: "blue".into() }).await?.into_inner();
        assert_eq!(block.node_id, me, "a worker leases for itself only");
        c.manager.release_block(pb::ReleaseBlockRequest { network: "blue".into() }).await?;
        c.manager.info(pb::Empty {}).await?;
        Ok(())
    })
    .expect("a worker may heartbeat, lease and release its block, and ask for the cluster info");

    // What it may not: remove a running manager, create or remove networks, become a voter,
    // or speak Raft.
    let h2 = c.hosts[manager2].name().to_owned();
    let s = denied(
        "RemoveNode of a running manager by a worker",
        attack(&c.hosts[worker], &pki, target, move |mut c| async move {
            c.manager.remove_node(pb::RemoveNodeRequest { node: h2, force: true }).await
        }),
    );
    assert!(s.message().contains("worker"), "{s:?}");
    denied(
        "CreateNetwork by a worker",
        attack(&c.hosts[worker], &pki, target, |mut c| async move {
            c.manager.create_network(pb::CreateNetworkRequest { name: "evil".into(), ..Default::default() }).await
        }),
    );
    denied(
        "RemoveNetwork by a worker",
        attack(&c.hosts[worker], &pki, target, |mut c| async move {
            c.manager.remove_network(pb::RemoveNetworkRequest { name: "blue".into(), force: true }).await
        }),
    );
    denied(
        "Promote by a worker",
        attack(&c.hosts[worker], &pki, target, |mut c| async move { c.manager.promote(pb::PromoteRequest {}).await }),
    );
    let propose = br#"{"Command":{"CreateNetwork":{"name":"evil2","vni":null,"subnet":null,"mtu":1450,"block_prefix":null,"created_at":1}}}"#;
    denied(
        "Raft Propose by a worker",
        attack(&c.hosts[worker], &pki, target, move |mut c| async move {
            c.raft.propose(pb::RaftMessage { payload: propose.to_vec() }).await
        }),
    );
    // Nothing changed.
    assert_eq!(node_names(&c.agents[manager]).len(), 3);
    assert_eq!(network_names(&c.agents[manager]), ["blue"]);

    // The worker's CLI says where to go before it calls anyone.
    for args in [
        &["network", "create", "red"][..],
        &["network", "rm", "blue"],
        &["node", "rm", c.hosts[manager2].name(), "--force"],
        &["join-token", "worker"],
    ] {
        let e = c.agents[worker].json(args).unwrap_err().to_string();
        assert!(e.contains("this host is a worker: run this on a manager"), "{args:?}: {e}");
        assert!(e.contains(c.hosts[manager].name()) || e.contains(c.hosts[manager2].name()), "{args:?}: {e}");
    }
    assert_eq!(network_names(&c.agents[manager]), ["blue"]);
}

/// Item 2: after `node rm`, a removed node's certificate opens nothing — whether its daemon
/// was killed first or keeps running — its daemon says it was removed, no other host counts
/// it alive, and the gossip key it holds is replaced on every remaining host.
#[test]
fn a_removed_nodes_certificate_and_gossip_identity_open_nothing() {
    let bed = bed();
    let c = form(&bed, 1, 3);
    let (manager, stays, running, killed) = (0, 1, 2, 3);
    c.agents[manager].json(&["network", "create", "blue"]).unwrap();
    let target = c.hosts[manager].addr();
    let running_id = node_id(&c.agents[running]);
    let saved = [(running, save_pki(&c, &bed, running)), (killed, save_pki(&c, &bed, killed))];
    let old_key = std::fs::read_to_string(saved[0].1.join("gossip.key")).unwrap();
    // A watch the running node holds open across its removal.
    let watching = {
        let (host, pki) = (c.hosts[running].ns().to_owned(), saved[0].1.clone());
        std::thread::spawn(move || {
            testbed::netns::within(&host, move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let identity = NodeIdentity::load(&pki)?.unwrap();
                    let channel = control::transport::connect(
                        SocketAddr::new(target, CONTROL_PORT),
                        &identity,
                        Duration::from_secs(5),
                    )
                    .await?;
                    let mut stream =
                        ManagerClient::new(channel).watch(pb::WatchRequest { from_revision: 0 }).await?.into_inner();
                    let ended = tokio::time::timeout(Duration::from_secs(30), async {
                        loop {
                            match stream.message().await {
                                Ok(Some(_)) => continue,
                                Ok(None) => return Err(Status::ok("ended without a word")),
                                Err(s) => return Err(s),
                            }
                        }
                    })
                    .await;
                    anyhow::Ok(ended.map_err(|_| anyhow::anyhow!("the watch of a removed node was not ended"))?)
                })
            })
        })
    };

    c.agents[killed].kill().unwrap();
    c.agents[manager].json(&["node", "rm", c.hosts[killed].name()]).unwrap();
    c.agents[manager].json(&["node", "rm", c.hosts[running].name()]).unwrap();

    // Its open watch is ended with the refusal.
    let ended: Result<(), Status> = watching.join().unwrap().unwrap();
    let s = ended.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("removed from the cluster"), "{s:?}");

    // Every call with a removed node's certificate is refused.
    for (i, pki) in &saved {
        let from = &c.hosts[*i];
        let s = denied("Info", attack(from, pki, target, |mut c| async move { c.manager.info(pb::Empty {}).await }));
        assert!(s.message().contains("removed from the cluster"), "{s:?}");
        denied(
            "Heartbeat",
            attack(
                from,
                pki,
                target,
                |mut c| async move { c.manager.heartbeat(pb::HeartbeatRequest::default()).await },
            ),
        );
        denied("Watch", attack(from, pki, target, first_event));
        denied(
            "CreateNetwork",
            attack(from, pki, target, |mut c| async move {
                c.manager.create_network(pb::CreateNetworkRequest { name: "evil".into(), ..Default::default() }).await
            }),
        );
        denied(
            "LeaseBlock",
            attack(from, pki, target, |mut c| async move {
                c.manager.lease_block(pb::LeaseBlockRequest { network: "blue".into() }).await
            }),
        );
        // Nor does another host's API answer it.
        denied(
            "Endpoints of a worker",
            attack(from, pki, c.hosts[stays].addr(), |c| async move {
                pb::host_client::HostClient::new(c.channel).endpoints(pb::EndpointsRequest::default()).await
            }),
        );
    }
    assert_eq!(network_names(&c.agents[manager]), ["blue"]);

    // The removed daemon (still running) says so.
    wait_for(T, "the removed daemon to say it was removed", || {
        (c.agents[running].status().ok()?["cluster"]["removed"] == true).then_some(())
    })
    .unwrap();
    let human = c.agents[running].cli(&["status"]).unwrap();
    assert!(human.contains("removed from the cluster: run `overlayd leave --force`"), "{human}");

    // No other host counts it alive, though its daemon runs on.
    for i in [manager, stays] {
        wait_for(Duration::from_secs(5), "the removed node to be no longer alive", || {
            match gossip_state(&c.agents[i], running_id).as_deref() {
                Some("alive") | Some("suspect") => None,
                _ => Some(()),
            }
        })
        .unwrap();
    }
    // The gossip key was rotated on every remaining host; they still gossip with each other.
    for i in [manager, stays] {
        let path = c.agents[i].state_dir().join("pki/gossip.key");
        wait_for(Duration::from_secs(10), "the gossip key to be rotated", || {
            (std::fs::read_to_string(&path).ok()? != old_key).then_some(())
        })
        .unwrap();
    }
    std::thread::sleep(Duration::from_secs(8));
    let stays_id = node_id(&c.agents[stays]);
    assert_eq!(gossip_state(&c.agents[manager], stays_id).as_deref(), Some("alive"));
    assert_eq!(gossip_state(&c.agents[manager], running_id), None, "the removed node is listed");
    let refused = c.agents[manager].json(&["peers"]).unwrap()["counters"]["rx_unknown_sender"].as_u64().unwrap_or(0);
    assert!(refused > 0, "the removed node's datagrams were not refused as from outside the cluster");

    // `leave --force` forgets it locally; it may join again, as a new node.
    c.agents[running].json(&["leave", "--force"]).unwrap();
    assert_eq!(c.agents[running].status().unwrap()["mode"], "idle");
    let again = c.join(running, manager, &c.worker_token.clone()).unwrap();
    assert_ne!(again["node_id"].as_u64().unwrap(), running_id, "a removed id never comes back");
}

/// Item 2, managers: a removed manager's Raft messages are ignored by the others, however
/// high its term.
#[test]
fn a_removed_manager_cannot_vote_or_append() {
    let bed = bed();
    let c = form(&bed, 3, 0);
    let removed = 2;
    let rid = node_id(&c.agents[removed]);
    let pki = save_pki(&c, &bed, removed);
    let leader = c.leader(0).unwrap();
    assert_ne!(leader, rid, "the test removes a follower");
    c.agents[0].json(&["node", "rm", c.hosts[removed].name(), "--force"]).unwrap();
    wait_for(T, "the removed manager to be gone", || (node_names(&c.agents[0]).len() == 2).then_some(())).unwrap();

    let vote = format!(
        r#"{{"vote":{{"leader_id":{{"term":1000000,"node_id":{rid}}},"committed":false}},"last_log_id":{{"leader_id":{{"term":1000000,"node_id":{rid}}},"index":1000000}}}}"#
    );
    let append = format!(
        r#"{{"vote":{{"leader_id":{{"term":1000000,"node_id":{rid}}},"committed":true}},"prev_log_id":null,"entries":[],"leader_commit":null}}"#
    );
    for i in [0, 1] {
        let target = c.hosts[i].addr();
        let (v, a) = (vote.clone().into_bytes(), append.clone().into_bytes());
        denied(
            "Vote of a removed manager",
            attack(&c.hosts[removed], &pki, target, move |mut c| async move {
                c.raft.vote(pb::RaftMessage { payload: v }).await
            }),
        );
        denied(
            "AppendEntries of a removed manager",
            attack(&c.hosts[removed], &pki, target, move |mut c| async move {
                c.raft.append_entries(pb::RaftMessage { payload: a }).await
            }),
        );
    }
    // The leader is the same, and writes go on.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.leader(1), Some(leader));
    c.agents[1].json(&["network", "create", "after"]).unwrap();
}

/// Item 3: join tokens are printed and rotated on a manager only; the old one is refused at
/// once and the new one works.
#[test]
fn join_tokens_rotate_and_the_old_ones_are_refused() {
    let bed = bed();
    let mut c = form(&bed, 1, 1);
    let token = |args: &[&str]| -> String {
        let v: Value = c.agents[0].json(args).unwrap();
        v["token"].as_str().unwrap_or_else(|| panic!("no token in {v}")).to_owned()
    };
    assert_eq!(token(&["join-token", "worker"]), c.worker_token);
    assert_eq!(token(&["join-token", "manager"]), c.manager_token);
    let e = c.agents[1].json(&["join-token", "manager"]).unwrap_err().to_string();
    assert!(e.contains("this host is a worker"), "{e}");
    let e = c.agents[1].json(&["join-token", "--rotate", "manager"]).unwrap_err().to_string();
    assert!(e.contains("this host is a worker"), "{e}");

    let new_worker = token(&["join-token", "--rotate", "worker"]);
    let new_manager = token(&["join-token", "--rotate", "manager"]);
    assert_ne!(new_worker, c.worker_token);
    assert_ne!(new_manager, c.manager_token);
    assert_eq!(token(&["join-token", "worker"]), new_worker, "the current token is the rotated one");
    assert_eq!(token(&["join-token", "manager"]), new_manager);
    let human = c.agents[0].cli(&["join-token", "worker"]).unwrap();
    assert!(human.contains(&format!("overlayd join {}", c.hosts[0].addr())) && human.contains(&new_worker), "{human}");

    let joiner = c.add_host(&bed).unwrap();
    for old in [c.worker_token.clone(), c.manager_token.clone()] {
        let e = c.join(joiner, 0, &old).unwrap_err().to_string();
        assert!(e.contains("not valid for this cluster"), "{e}");
    }
    assert_eq!(c.agents[joiner].status().unwrap()["mode"], "idle");
    let joined = c.join(joiner, 0, &new_worker).unwrap();
    assert_eq!(joined["role"], "worker");
    c.await_nodes(3, &[], T).unwrap();
}
