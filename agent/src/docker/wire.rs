//! What Docker sends the driver and what the driver keeps: the requests of the remote network
//! driver and IPAM protocols, decoded, and `docker.json`. Apart from the rest of `driver`
//! (which answers from the cluster runtime) so that the agent's fuzz targets compile the very
//! decoders the daemon runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use control::cidr::Ipv4Cidr;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An error answer: `{"Err": "…"}`, as Docker shows it to the user.
pub fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "Err": msg.to_string() })
}

/// What the driver remembers across restarts (Docker does not replay its calls): `docker.json`.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverStore {
    /// Docker's network id → the subnet of its overlayd network.
    #[serde(default)]
    pub networks: BTreeMap<String, DockerNetwork>,
    /// Docker's endpoint id → its network and address.
    #[serde(default)]
    pub endpoints: BTreeMap<String, DockerEndpoint>,
    /// overlayd networks this driver put into Docker (not again once a user removed them).
    #[serde(default)]
    pub mirrored: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetwork {
    pub subnet: Ipv4Cidr,
    /// Why its overlayd network could not be created, if it could not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub failed: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEndpoint {
    pub network_id: String,
    pub ip: Ipv4Addr,
}

impl DriverStore {
    /// The store `docker.json` holds; an error means the file is corrupt.
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<DriverStore> {
        serde_json::from_slice(bytes)
    }
}

// The requests, as Docker sends them (fields it may leave out default to empty).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPool {
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub sub_pool: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "V6")]
    pub v6: bool,
}

#[derive(Deserialize)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
}

/// Whether a Docker network asks to be encrypted: `docker network create --opt encrypted` (swarm's
/// word), which Docker hands the driver among its generic options; `--opt encrypted=false` does
/// not.
pub fn wants_encryption(options: &BTreeMap<String, Value>) -> bool {
    options
        .get("com.docker.network.generic")
        .and_then(|g| g.get("encrypted"))
        .is_some_and(|v| v != &json!(false) && v != &json!("false"))
}

#[derive(Deserialize)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, Value>>,
    #[serde(rename = "IPv4Data", default)]
    pub ipv4_data: Option<Vec<IpamData>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamData {
    #[serde(default)]
    pub address_space: String,
    pub pool: String,
}

#[derive(Deserialize)]
pub struct NetworkOnly {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Deserialize)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Interface", default)]
    pub interface: Option<EndpointInterface>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInterface {
    #[serde(default)]
    pub address: String,
    #[serde(default, rename = "AddressIPv6")]
    pub address_ipv6: String,
    #[serde(default)]
    pub mac_address: String,
}

#[derive(Deserialize)]
pub struct EndpointOnly {
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Deserialize)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
}

/// Decodes a request, or says what is wrong with it.
fn decode<T: DeserializeOwned>(call: &str, body: &[u8]) -> Result<T, (u16, Value)> {
    serde_json::from_slice(body).map_err(|e| (400, error(format!("malformed {call} request: {e}"))))
}

/// One of Docker's calls, its body decoded.
pub enum Request {
    /// `Plugin.Activate`.
    Activate,
    /// `NetworkDriver.GetCapabilities`.
    NetworkCapabilities,
    /// `IpamDriver.GetCapabilities`.
    IpamCapabilities,
    /// `IpamDriver.GetDefaultAddressSpaces`.
    DefaultAddressSpaces,
    RequestPool(RequestPool),
    /// `IpamDriver.ReleasePool`: nothing to forget (a pool is a network's subnet).
    ReleasePool,
    RequestAddress(RequestAddress),
    ReleaseAddress(ReleaseAddress),
    CreateNetwork(CreateNetwork),
    DeleteNetwork(NetworkOnly),
    CreateEndpoint(CreateEndpoint),
    DeleteEndpoint(EndpointOnly),
    Join(Join),
    Leave(EndpointOnly),
    /// `NetworkDriver.EndpointOperInfo`: nothing to tell.
    EndpointOperInfo,
    /// External connectivity and discovery: nothing to do.
    Nothing,
}

impl Request {
    /// Call `call` (`Interface.Method`) with `body`, decoded; or the answer that refuses it: 400
    /// for a malformed body, 404 for a call the driver does not have.
    pub fn decode(call: &str, body: &[u8]) -> Result<Request, (u16, Value)> {
        Ok(match call {
            "Plugin.Activate" => Request::Activate,
            "NetworkDriver.GetCapabilities" => Request::NetworkCapabilities,
            "IpamDriver.GetCapabilities" => Request::IpamCapabilities,
            "IpamDriver.GetDefaultAddressSpaces" => Request::DefaultAddressSpaces,
            "IpamDriver.RequestPool" => Request::RequestPool(decode(call, body)?),
            "IpamDriver.ReleasePool" => {
                decode::<serde::de::IgnoredAny>(call, body)?;
                Request::ReleasePool
            }
            "IpamDriver.RequestAddress" => Request::RequestAddress(decode(call, body)?),
            "IpamDriver.ReleaseAddress" => Request::ReleaseAddress(decode(call, body)?),
            "NetworkDriver.CreateNetwork" => Request::CreateNetwork(decode(call, body)?),
            "NetworkDriver.DeleteNetwork" => Request::DeleteNetwork(decode(call, body)?),
            "NetworkDriver.CreateEndpoint" => Request::CreateEndpoint(decode(call, body)?),
            "NetworkDriver.DeleteEndpoint" => Request::DeleteEndpoint(decode(call, body)?),
            "NetworkDriver.Join" => Request::Join(decode(call, body)?),
            "NetworkDriver.Leave" => Request::Leave(decode(call, body)?),
            "NetworkDriver.EndpointOperInfo" => {
                decode::<EndpointOnly>(call, body)?;
                Request::EndpointOperInfo
            }
            "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity"
            | "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete" => Request::Nothing,
            other => return Err((404, error(format!("overlayd's Docker driver has no call {other:?}")))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_encrypted_asks_for_an_encrypted_network() {
        let opts =
            |generic: Value| -> BTreeMap<String, Value> { [("com.docker.network.generic".to_owned(), generic)].into() };
        assert!(wants_encryption(&opts(json!({"encrypted": ""}))), "--opt encrypted");
        assert!(wants_encryption(&opts(json!({"encrypted": "true"}))));
        assert!(!wants_encryption(&opts(json!({"encrypted": "false"}))));
        assert!(!wants_encryption(&opts(json!({"mtu": "1400"}))));
        assert!(!wants_encryption(&BTreeMap::new()));
    }
}
