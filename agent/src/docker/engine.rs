//! A client of the Docker Engine API (HTTP over dockerd's Unix socket), for the few calls the
//! driver makes itself: a network's name (Docker does not tell its drivers), and making the
//! cluster's networks appear in every host's Docker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::Value;

/// How long one Engine API call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// dockerd's API socket.
#[derive(Debug, Clone)]
pub struct Engine {
    socket: PathBuf,
}

/// A Docker network as the Engine API lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EngineNetwork {
    pub name: String,
    pub id: String,
    pub driver: String,
    #[serde(default)]
    pub containers: std::collections::BTreeMap<String, EngineEndpoint>,
}

/// A container on a network.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EngineEndpoint {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
}

/// A container as `docker inspect` shows it, what the driver needs of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineContainer {
    /// Its labels (`docker run --label`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The PID of its first process (0 when it is not running).
    pub pid: u32,
    /// Its aliases on each of its networks, by the Docker network's name (`docker run
    /// --network-alias`, `docker network connect --alias`, and the short id Docker adds).
    pub aliases: std::collections::BTreeMap<String, Vec<String>>,
}

impl EngineContainer {
    /// From the Engine API's `GET /containers/{id}/json`.
    pub fn from_inspect(v: &Value) -> Result<EngineContainer> {
        let labels = v.pointer("/Config/Labels").cloned().unwrap_or(Value::Null);
        let labels = if labels.is_null() { Default::default() } else { serde_json::from_value(labels)? };
        let pid = v.pointer("/State/Pid").and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let aliases = v
            .pointer("/NetworkSettings/Networks")
            .and_then(Value::as_object)
            .map(|nets| {
                nets.iter()
                    .map(|(net, n)| {
                        let list = n["Aliases"].as_array().into_iter().flatten().filter_map(Value::as_str);
                        (net.clone(), list.map(str::to_owned).collect())
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(EngineContainer { labels, pid, aliases })
    }
}

impl Engine {
    /// The engine at `host` (`unix:///run/docker.sock` or a socket path).
    pub fn new(host: &str) -> Result<Engine> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if path.is_empty() || host.contains("://") && !host.starts_with("unix://") {
            bail!("docker_host {host:?}: give the Docker daemon's Unix socket, e.g. unix:///run/docker.sock");
        }
        Ok(Engine { socket: PathBuf::from(path) })
    }

    /// One request; the answer's status and JSON body.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let go = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .with_context(|| format!("cannot reach dockerd at {}", self.socket.display()))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let bytes = body.map(|b| b.to_string()).unwrap_or_default();
            let req = hyper::Request::builder()
                .method(method)
                .uri(format!("http://docker{path}"))
                .header("Host", "docker")
                .header("Content-Type", "application/json")
                .body(Full::new(Bytes::from(bytes)))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            let value =
                if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
            anyhow::Ok((status, value))
        };
        tokio::time::timeout(TIMEOUT, go).await.with_context(|| format!("dockerd did not answer {method} {path}"))?
    }

    /// Every network.
    pub async fn networks(&self) -> Result<Vec<EngineNetwork>> {
        let (status, v) = self.call("GET", "/networks", None).await?;
        if status != 200 {
            bail!("dockerd refused to list its networks ({status}): {v}");
        }
        Ok(serde_json::from_value(v)?)
    }

    /// What the driver learns of a container once Docker runs it: see [`EngineContainer`].
    pub async fn container(&self, id: &str) -> Result<EngineContainer> {
        let (status, v) = self.call("GET", &format!("/containers/{id}/json"), None).await?;
        if status != 200 {
            bail!("dockerd refused to show container {id} ({status}): {v}");
        }
        EngineContainer::from_inspect(&v)
    }

    /// One network, with its containers; `None` if Docker has none with this id.
    pub async fn network(&self, id: &str) -> Result<Option<EngineNetwork>> {
        let (status, v) = self.call("GET", &format!("/networks/{id}"), None).await?;
        match status {
            200 => Ok(Some(serde_json::from_value(v)?)),
            404 => Ok(None),
            s => bail!("dockerd refused to show network {id} ({s}): {v}"),
        }
    }

    /// Creates a network of `driver` (and its IPAM) with one pool.
    pub async fn create_network(
        &self,
        name: &str,
        driver: &str,
        subnet: &str,
        gateway: &str,
        internal: bool,
    ) -> Result<()> {
        let body = serde_json::json!({
            "Name": name,
            "CheckDuplicate": true,
            "Driver": driver,
            "Internal": internal,
            "IPAM": { "Driver": driver, "Config": [{ "Subnet": subnet, "Gateway": gateway }] },
            "Labels": { "io.overlayd.network": name },
        });
        let (status, v) = self.call("POST", "/networks/create", Some(body)).await?;
        match status {
            200 | 201 | 409 => Ok(()),
            s => bail!("dockerd refused to create network {name} ({s}): {v}"),
        }
    }

    /// Removes a network (a network still used by a container stays).
    pub async fn remove_network(&self, id: &str) -> Result<()> {
        let (status, v) = self.call("DELETE", &format!("/networks/{id}"), None).await?;
        match status {
            200 | 204 | 404 => Ok(()),
            s => bail!("dockerd refused to remove network {id} ({s}): {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_inspected_gives_its_labels_pid_and_aliases_per_network() {
        // As Docker 20.10 answers for `docker run --network-alias api --label k=v` on `web`
        // (the short id is an alias Docker adds itself), trimmed.
        let v = serde_json::json!({
            "Config": { "Labels": { "io.overlayd.service": "front", "k": "v" } },
            "State": { "Pid": 4242 },
            "NetworkSettings": { "Networks": {
                "web": { "Aliases": ["api", "0123456789ab"], "IPAddress": "10.128.0.2" },
                "other": { "Aliases": null }
            } }
        });
        let c = EngineContainer::from_inspect(&v).unwrap();
        assert_eq!(c.pid, 4242);
        assert_eq!(c.labels["io.overlayd.service"], "front");
        assert_eq!(c.aliases["web"], ["api", "0123456789ab"]);
        assert!(c.aliases["other"].is_empty());
        // A stopped container: no PID, no labels, no networks.
        let c =
            EngineContainer::from_inspect(&serde_json::json!({ "Config": { "Labels": null }, "State": { "Pid": 0 } }))
                .unwrap();
        assert_eq!(c, EngineContainer::default());
    }
}
