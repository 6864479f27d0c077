//! Clusters of real overlayd daemons built with `overlayd init` and `overlayd join`, for the
//! tests, the demo and the control-plane benchmark.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::measure::wait_for;
use crate::{Agent, Host, Node, Testbed};

/// A cluster: the first host ran `init`, the next `managers - 1` joined with the manager
/// token, the rest with the worker token.
pub struct Cluster {
    pub hosts: Vec<Host>,
    pub agents: Vec<Agent>,
    pub worker_token: String,
    pub manager_token: String,
}

impl Cluster {
    /// Starts a daemon on each of `managers + workers` new hosts and forms the cluster.
    pub fn form(bed: &Testbed, managers: usize, workers: usize) -> Result<Cluster> {
        Cluster::form_on(bed.add_hosts(managers + workers)?, managers)
    }

    /// [`form`](Self::form) with `daemon_args` on every `overlayd daemon` command line (e.g.
    /// `--metrics-addr 127.0.0.1:9477`: each daemon binds it in its host's namespace).
    pub fn form_with(bed: &Testbed, managers: usize, workers: usize, daemon_args: &[&str]) -> Result<Cluster> {
        Cluster::form_on_with(bed.add_hosts(managers + workers)?, managers, daemon_args)
    }

    /// [`form`](Self::form) on hosts the caller made (and prepared: a host's firewall before
    /// any overlayd runs there, say); the first `managers` of them are managers.
    pub fn form_on(hosts: Vec<Host>, managers: usize) -> Result<Cluster> {
        Cluster::form_on_with(hosts, managers, &[])
    }

    fn form_on_with(hosts: Vec<Host>, managers: usize, daemon_args: &[&str]) -> Result<Cluster> {
        let workers = hosts.len().saturating_sub(managers);
        let agents = hosts.iter().map(|h| h.start_daemon(daemon_args)).collect::<Result<Vec<_>>>()?;
        let init =
            agents[0].json(&["init", "--advertise-addr", &hosts[0].addr().to_string(), "--name", hosts[0].name()])?;
        let token =
            |k: &str| init[k].as_str().map(str::to_owned).with_context(|| format!("init printed no {k}: {init}"));
        let c = Cluster { worker_token: token("worker_token")?, manager_token: token("manager_token")?, hosts, agents };
        for i in 1..managers + workers {
            let token = if i < managers { c.manager_token.clone() } else { c.worker_token.clone() };
            c.join(i, 0, &token)?;
        }
        Ok(c)
    }

    /// `overlayd join` on host `i` through the manager on host `via`.
    pub fn join(&self, i: usize, via: usize, token: &str) -> Result<Value> {
        let (me, manager) = (&self.hosts[i], &self.hosts[via]);
        self.agents[i].json(&[
            "join",
            &manager.addr().to_string(),
            "--token",
            token,
            "--advertise-addr",
            &me.addr().to_string(),
            "--name",
            me.name(),
        ])
    }

    /// Adds a host with an idle daemon (not yet joined); returns its index.
    pub fn add_host(&mut self, bed: &Testbed) -> Result<usize> {
        let h = bed.add_host()?;
        self.agents.push(h.start_daemon::<&str>(&[])?);
        self.hosts.push(h);
        Ok(self.hosts.len() - 1)
    }

    /// Waits until every agent but those in `skip` lists `n` nodes, all ready.
    pub fn await_nodes(&self, n: usize, skip: &[usize], timeout: Duration) -> Result<()> {
        for (i, a) in self.agents.iter().enumerate().filter(|(i, _)| !skip.contains(i)) {
            wait_for(timeout, &format!("{n} ready nodes on {}", self.hosts[i].name()), || {
                let ls = a.json(&["node", "ls"]).ok()?;
                let nodes = ls["nodes"].as_array()?;
                (nodes.len() == n && nodes.iter().all(|x| x["status"] == "ready")).then_some(())
            })?;
        }
        Ok(())
    }

    /// The leader's node id as host `i` sees it.
    pub fn leader(&self, i: usize) -> Option<u64> {
        self.agents[i].json(&["node", "ls"]).ok()?["leader_id"].as_u64().filter(|l| *l != 0)
    }

    /// The host index of node `id` (node ids follow the order hosts joined in, from 1).
    pub fn host_of(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    /// A fresh container namespace on host `i`, attached to `network`: it and its address.
    pub fn attach(&self, i: usize, network: &str, name: &str) -> Result<(Node, IpAddr)> {
        let ns = self.hosts[i].add_netns(name)?;
        let ep = self.agents[i].json(&["attach", "--network", network, "--netns", &ns.netns_path(), "--name", name])?;
        let ip = ep["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("attach printed no address: {ep}"))?;
        Ok((ns, ip))
    }
}
