//! The CNI plugin (spec 1.1; 0.3.x, 0.4.0 and 1.0.0 configurations too): `overlayd` run by a
//! container runtime with `CNI_COMMAND` set. A thin client: it reads the runtime's environment
//! and configuration, asks the local daemon (which attaches and detaches), and answers in the
//! spec's result or error format.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

/// The spec versions this plugin speaks (what VERSION answers).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes (SPEC.md, "Error codes").
pub mod code {
    /// The configuration's `cniVersion` is not one this plugin speaks.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// The container is unknown or does not exist (its namespace is gone).
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A needed `CNI_*` variable is missing or wrong.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// An I/O error (the daemon could not be reached).
    pub const IO_FAILURE: u32 = 5;
    /// The configuration or a result could not be decoded.
    pub const DECODING_FAILURE: u32 = 6;
    /// The network configuration is invalid (unknown network, bad address).
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later (the daemon is busy or not in a cluster yet).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// overlayd's own: the daemon refused (the message says why).
    pub const REFUSED: u32 = 100;
    /// overlayd's own: the container already has an endpoint on this network (ADD twice).
    pub const ALREADY_ATTACHED: u32 = 101;
}

/// An error as the spec writes it on stdout: `{cniVersion, code, msg, details}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    fn details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// The verbs of `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Verb {
    fn parse(s: &str) -> Result<Verb, CniError> {
        Ok(match s {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "STATUS" => Verb::Status,
            "GC" => Verb::Gc,
            "VERSION" => Verb::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!("CNI_COMMAND={other:?} is not a CNI verb (ADD, DEL, CHECK, STATUS, GC or VERSION)"),
                ));
            }
        })
    }
}

/// What the runtime passes in the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K=V`.
    pub args: Vec<(String, String)>,
}

impl CniEnv {
    /// The environment as `get` gives its variables (`std::env::var` in the plugin).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> CniEnv {
        let args = get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        CniEnv {
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
        }
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    fn require(&self, what: &str, value: &str) -> Result<(), CniError> {
        if value.is_empty() {
            return Err(CniError::new(code::INVALID_ENVIRONMENT, format!("{what} is not set")));
        }
        Ok(())
    }
}

/// The plugin's network configuration (the plugin object of a conflist, with `name` and
/// `cniVersion` of the list, as the runtime passes it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The overlayd network [default: the configuration's `name`].
    #[serde(default)]
    pub network: Option<String>,
    /// The daemon's state dir [default: `OVERLAYD_STATE_DIR`, else /var/lib/overlayd].
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The service the containers of this configuration are replicas of (`overlayd service
    /// create`, on the same network): a conflist per service, e.g. `web-replicas` with
    /// `"network": "front", "service": "web"`; `OVERLAYD_SERVICE=` of `CNI_ARGS` overrides it.
    #[serde(default)]
    pub service: Option<String>,
    /// ADD only on an encrypted network (`overlayd network create NAME --encrypted`): with
    /// `"encrypted": true`, a container is never put on a network whose traffic crosses the
    /// underlay in the clear, and CHECK fails if the network is not encrypted.
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// What ADD returned (DEL and CHECK).
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC: the attachments the runtime still has; every other one goes.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Capabilities the runtime fills in (`runtimeConfig`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    /// The `aliases` capability (podman's network aliases of the container).
    #[serde(default)]
    pub aliases: Aliases,
}

/// The `aliases` capability as CNI's CONVENTIONS.md gives it and podman fills it in: the
/// container's aliases by network name (`{"web": ["db"]}`); a plain list is taken too.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Aliases {
    ByNetwork(std::collections::BTreeMap<String, BTreeSet<String>>),
    List(BTreeSet<String>),
}

impl Default for Aliases {
    fn default() -> Aliases {
        Aliases::List(BTreeSet::new())
    }
}

impl Aliases {
    /// The aliases on the runtime's network `name` (the configuration's `name`).
    pub fn on(&self, name: &str) -> Vec<String> {
        match self {
            Aliases::ByNetwork(m) => m.get(name).into_iter().flatten().cloned().collect(),
            Aliases::List(l) => l.iter().cloned().collect(),
        }
    }
}

/// One attachment the runtime knows (GC).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// The overlayd network to attach to.
    pub fn network(&self) -> &str {
        self.network.as_deref().filter(|n| !n.is_empty()).unwrap_or(&self.name)
    }
}

/// What ADD asks the daemon for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachArgs {
    pub network: String,
    pub netns: String,
    pub ifname: String,
    pub container_id: String,
    /// The endpoint's name: podman's container name, else the container id's first 12.
    pub name: String,
    pub aliases: Vec<String>,
    /// `IP=` of `CNI_ARGS`.
    pub ip: Option<Ipv4Addr>,
    /// `MAC=` of `CNI_ARGS`.
    pub mac: Option<String>,
    /// The service it is a replica of.
    pub service: Option<String>,
    /// The configuration's `name` (the CNI network), recorded with the endpoint for GC.
    pub cni_network: String,
}

/// An endpoint as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub network: String,
    /// The CNI network configuration that attached it; empty if an older overlayd did.
    pub cni_network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
    pub mtu: u32,
    /// The resolver containers of the network use: its gateway, where the network's DNS
    /// resolver listens on every host (none for a network without one).
    pub nameservers: Vec<String>,
}

/// The local daemon, as the plugin uses it.
pub trait Daemon {
    /// Attaches a container; fails if it has an endpoint on the network already.
    fn attach(&mut self, args: &AttachArgs) -> Result<Attached, CniError>;
    /// Detaches a container's endpoint on `network`; nothing attached is fine.
    fn detach(&mut self, network: &str, container_id: &str, ifname: &str) -> Result<(), CniError>;
    /// This host's endpoints that runtimes attached through CNI, on `network`.
    fn cni_endpoints(&mut self, network: &str) -> Result<Vec<Attached>, CniError>;
    /// Whether ADD on `network` can be served now.
    fn ready(&mut self, network: &str) -> Result<(), CniError>;
    /// Whether `network` is encrypted.
    fn encrypted(&mut self, network: &str) -> Result<bool, CniError>;
}

/// With `"encrypted": true` in the configuration, fails unless the network is encrypted.
fn require_encryption(conf: &NetConf, daemon: &mut dyn Daemon) -> Result<(), CniError> {
    if conf.encrypted && !daemon.encrypted(conf.network())? {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!(
                "the configuration asks for an encrypted network, and {:?} is not encrypted: create it with \
                 `overlayd network create {} --encrypted`, or drop \"encrypted\" from the configuration",
                conf.network(),
                conf.network()
            ),
        ));
    }
    Ok(())
}

/// Runs one plugin call: the verb, the environment and the configuration's bytes → what to
/// print on stdout, and whether it is a success.
pub fn run(verb: &str, env: &CniEnv, stdin: &[u8], daemon: impl FnOnce(&NetConf) -> Box<dyn Daemon>) -> (Value, bool) {
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_owned());
    match call(verb, env, stdin, daemon) {
        Ok(v) => (v, true),
        Err(e) => (e.to_json(&version), false),
    }
}

fn call(
    verb: &str,
    env: &CniEnv,
    stdin: &[u8],
    daemon: impl FnOnce(&NetConf) -> Box<dyn Daemon>,
) -> Result<Value, CniError> {
    let verb = Verb::parse(verb)?;
    if verb == Verb::Version {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS }));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODING_FAILURE, "the network configuration on stdin is not valid JSON")
            .details(e.to_string())
    })?;
    let version = conf.cni_version.as_str();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported: use one of {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let at_least = |v: (u32, u32)| parse_version(version) >= v;
    if conf.network().is_empty() {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "the configuration names no network: give \"network\" (or the list's \"name\")",
        ));
    }
    match verb {
        Verb::Version => unreachable!("answered above"),
        Verb::Add => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            env.require("CNI_NETNS", &env.netns)?;
            env.require("CNI_IFNAME", &env.ifname)?;
            let args = attach_args(&conf, env)?;
            let mut d = daemon(&conf);
            require_encryption(&conf, d.as_mut())?;
            let a = d.attach(&args)?;
            Ok(result(version, &a))
        }
        Verb::Del => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            let ifname = if env.ifname.is_empty() { "eth0" } else { &env.ifname };
            daemon(&conf).detach(conf.network(), &env.container_id, ifname)?;
            Ok(Value::Null)
        }
        Verb::Check => {
            if !at_least((0, 4)) {
                return Err(CniError::new(code::INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later"));
            }
            env.require("CNI_CONTAINERID", &env.container_id)?;
            env.require("CNI_IFNAME", &env.ifname)?;
            let prev = conf
                .prev_result
                .as_ref()
                .ok_or_else(|| CniError::new(code::INVALID_NETWORK_CONFIG, "CHECK needs the prevResult of the ADD"))?;
            let mut d = daemon(&conf);
            require_encryption(&conf, d.as_mut())?;
            let mine = d.cni_endpoints(conf.network())?;
            let a = mine.iter().find(|a| a.container_id == env.container_id && a.ifname == env.ifname).ok_or_else(
                || {
                    CniError::new(
                        code::UNKNOWN_CONTAINER,
                        format!(
                            "container {} has no endpoint {} on network {:?}",
                            short(&env.container_id),
                            env.ifname,
                            conf.network()
                        ),
                    )
                },
            )?;
            let want = format!("{}/{}", a.ip, a.prefix_len);
            let listed = prev["ips"].as_array().into_iter().flatten().any(|ip| ip["address"] == want.as_str());
            if !listed {
                return Err(CniError::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!("the endpoint has {want}, which the prevResult does not list"),
                ));
            }
            Ok(Value::Null)
        }
        Verb::Status => {
            if !at_least((1, 1)) {
                return Err(CniError::new(code::INCOMPATIBLE_VERSION, "STATUS needs cniVersion 1.1.0"));
            }
            daemon(&conf).ready(conf.network()).map_err(|e| CniError { code: code::NOT_AVAILABLE, ..e })?;
            Ok(Value::Null)
        }
        Verb::Gc => {
            if !at_least((1, 1)) {
                return Err(CniError::new(code::INCOMPATIBLE_VERSION, "GC needs cniVersion 1.1.0"));
            }
            let valid: BTreeSet<(String, String)> =
                conf.valid_attachments.iter().flatten().map(|a| (a.container_id.clone(), a.ifname.clone())).collect();
            let mut d = daemon(&conf);
            // GC is about the attachments of this configuration (its `name`, which the spec
            // calls the network), not of every configuration on the same overlayd network. An
            // endpoint with no recorded configuration (attached by an older overlayd) is left
            // alone: it may be another configuration's, and DEL still removes it.
            let ours = |a: &Attached| !a.cni_network.is_empty() && a.cni_network == conf.name;
            for a in d.cni_endpoints(conf.network())?.into_iter().filter(ours) {
                if !valid.contains(&(a.container_id.clone(), a.ifname.clone())) {
                    d.detach(&a.network, &a.container_id, &a.ifname)?;
                }
            }
            Ok(Value::Null)
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The endpoint's name when the runtime gives none: the container id, cut to 12 characters
/// only when it is a runtime's 64-hex id (as podman and Docker show those); an id such as ctr's
/// `<namespace>-<id>` stays whole, or two containers whose ids share 12 characters would clash.
fn default_name(id: &str) -> String {
    let hex = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if hex || id.len() > 63 { short(id).to_owned() } else { id.to_owned() }
}

fn parse_version(v: &str) -> (u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn attach_args(conf: &NetConf, env: &CniEnv) -> Result<AttachArgs, CniError> {
    let ip = env
        .arg("IP")
        .map(|s| {
            s.split('/').next().unwrap_or(s).parse::<Ipv4Addr>().map_err(|_| {
                CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_ARGS IP={s:?} is not an IPv4 address"))
            })
        })
        .transpose()?;
    let name = env.arg("K8S_POD_NAME").map_or_else(|| default_name(&env.container_id), str::to_owned);
    Ok(AttachArgs {
        network: conf.network().to_owned(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        container_id: env.container_id.clone(),
        name,
        aliases: conf.runtime_config.aliases.on(&conf.name),
        ip,
        mac: env.arg("MAC").map(str::to_owned),
        service: env.arg("OVERLAYD_SERVICE").map(str::to_owned).or_else(|| conf.service.clone()),
        cni_network: conf.name.clone(),
    })
}

/// The ADD result in the configuration's version: 0.3.x and 0.4.0 write each IP's version,
/// 1.0.0 and later do not.
fn result(version: &str, a: &Attached) -> Value {
    let legacy = parse_version(version) < (1, 0);
    let mut ip =
        json!({ "address": format!("{}/{}", a.ip, a.prefix_len), "gateway": a.gateway.to_string(), "interface": 0 });
    if legacy {
        ip["version"] = json!("4");
    }
    let mut iface = json!({ "name": a.ifname, "mac": a.mac, "sandbox": a.netns });
    if parse_version(version) >= (1, 1) {
        iface["mtu"] = json!(a.mtu);
    }
    let mut dns = json!({});
    if !a.nameservers.is_empty() {
        dns["nameservers"] = json!(a.nameservers);
    }
    json!({
        "cniVersion": version,
        "interfaces": [iface],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }],
        "dns": dns,
    })
}

/// The daemon of a state dir, over its Unix socket: what the plugin runs with.
pub struct Client {
    rt: tokio::runtime::Runtime,
    state_dir: PathBuf,
    /// Where `state_dir` came from, for the error that says the daemon cannot be reached.
    from: &'static str,
    api: Option<proto::agent_client::AgentClient<tonic::transport::Channel>>,
}

impl Client {
    /// A client of the daemon the configuration names (`stateDir`), else the one of
    /// `OVERLAYD_STATE_DIR`, else of the default state dir.
    pub fn for_conf(conf: &NetConf) -> Box<dyn Daemon> {
        let (state_dir, from) = match (&conf.state_dir, std::env::var_os("OVERLAYD_STATE_DIR")) {
            (Some(d), _) => (d.clone(), "chosen by stateDir in the network configuration"),
            (None, Some(d)) => (PathBuf::from(d), "chosen by OVERLAYD_STATE_DIR"),
            (None, None) => (
                PathBuf::from(crate::DEFAULT_STATE_DIR),
                // podman runs the DEL of a stopped container from conmon's cleanup process, whose
                // environment is not the one `podman run` had.
                "the default, as neither stateDir in the network configuration nor OVERLAYD_STATE_DIR \
                 names one (a runtime may run DEL without its own environment, as podman's cleanup \
                 process does: stateDir works everywhere)",
            ),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        Box::new(Client { rt, state_dir, from, api: None })
    }

    fn call<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut proto::agent_client::AgentClient<tonic::transport::Channel>) -> Result<T, tonic::Status>,
    ) -> Result<T, CniError> {
        let Client { rt, state_dir, from, api } = self;
        rt.block_on(async {
            if api.is_none() {
                let c = crate::api::connect(state_dir).await.map_err(|e| {
                    CniError::new(code::IO_FAILURE, "cannot reach the overlayd daemon")
                        .details(format!("{e:#}; the state dir is {from}"))
                })?;
                *api = Some(c);
            }
            f(api.as_mut().expect("connected")).await.map_err(status_error)
        })
    }
}

/// The daemon's refusal in the spec's terms.
fn status_error(s: tonic::Status) -> CniError {
    let msg = s.message().to_owned();
    let code = match s.code() {
        tonic::Code::AlreadyExists => code::ALREADY_ATTACHED,
        tonic::Code::Unavailable => code::TRY_AGAIN_LATER,
        _ if msg.contains("no network named") => code::INVALID_NETWORK_CONFIG,
        _ if msg.contains("network namespace") => code::UNKNOWN_CONTAINER,
        _ if msg.contains("is not an address this host gives") || msg.contains("is not an IPv4 address") => {
            code::INVALID_NETWORK_CONFIG
        }
        _ => code::REFUSED,
    };
    CniError::new(code, msg)
}

fn attached(e: &proto::Endpoint) -> Result<Attached, CniError> {
    let bad = |what: &str| CniError::new(code::DECODING_FAILURE, format!("the daemon answered with a bad {what}"));
    let gateway =
        if e.gateway.is_empty() { Ipv4Addr::UNSPECIFIED } else { e.gateway.parse().map_err(|_| bad("gateway"))? };
    Ok(Attached {
        network: e.network.clone(),
        cni_network: e.cni_network.clone(),
        container_id: e.container_id.clone(),
        ifname: e.ifname.clone(),
        netns: e.netns.clone(),
        ip: e.ip.parse().map_err(|_| bad("address"))?,
        prefix_len: u8::try_from(e.prefix_len).map_err(|_| bad("prefix length"))?,
        gateway,
        mac: e.mac.clone(),
        mtu: e.mtu,
        nameservers: if gateway.is_unspecified() { Vec::new() } else { vec![gateway.to_string()] },
    })
}

impl Daemon for Client {
    fn attach(&mut self, a: &AttachArgs) -> Result<Attached, CniError> {
        let req = proto::AttachRequest {
            network: a.network.clone(),
            netns: a.netns.clone(),
            name: a.name.clone(),
            ifname: a.ifname.clone(),
            container_id: a.container_id.clone(),
            ip: a.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            mac: a.mac.clone().unwrap_or_default(),
            origin: "cni".into(),
            aliases: a.aliases.clone(),
            service: a.service.clone().unwrap_or_default(),
            cni_network: a.cni_network.clone(),
            ..Default::default()
        };
        let e = self.call(async |c| c.attach(req).await.map(tonic::Response::into_inner))?;
        attached(&e)
    }

    fn detach(&mut self, network: &str, container_id: &str, ifname: &str) -> Result<(), CniError> {
        let req = proto::DetachRequest {
            network: network.to_owned(),
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            missing_ok: true,
            ..Default::default()
        };
        self.call(async |c| c.detach(req).await.map(drop))
    }

    fn cni_endpoints(&mut self, network: &str) -> Result<Vec<Attached>, CniError> {
        let req = proto::EndpointsRequest { network: network.to_owned() };
        let all = self.call(async |c| c.endpoints(req).await.map(tonic::Response::into_inner))?;
        all.endpoints.iter().filter(|e| e.origin == "cni").map(attached).collect()
    }

    fn encrypted(&mut self, network: &str) -> Result<bool, CniError> {
        Ok(self.network(network, code::INVALID_NETWORK_CONFIG)?.encrypted)
    }

    fn ready(&mut self, network: &str) -> Result<(), CniError> {
        self.network(network, code::NOT_AVAILABLE).map(drop)
    }
}

impl Client {
    /// The cluster's network `name`, or the error `missing` says it is not there.
    fn network(&mut self, name: &str, missing: u32) -> Result<proto::Network, CniError> {
        let nets = self.call(async |c| c.network_list(proto::Empty {}).await.map(tonic::Response::into_inner))?;
        nets.networks.into_iter().find(|n| n.name == name).ok_or_else(|| {
            CniError::new(missing, format!("the cluster has no network {name:?} (see overlayd network ls)"))
        })
    }
}

/// Whether this process was started by a container runtime as a CNI plugin (`CNI_COMMAND` set
/// and no arguments).
pub fn invoked() -> bool {
    std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1
}

/// The plugin's `main`: reads stdin and the environment, prints the answer, exits 0 or 1.
pub fn main(daemon: impl FnOnce(&NetConf) -> Box<dyn Daemon>) -> ! {
    let mut stdin = Vec::new();
    let verb = std::env::var("CNI_COMMAND").unwrap_or_default();
    let (out, ok) = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => run(&verb, &CniEnv::from_vars(|k| std::env::var(k).ok()), &stdin, daemon),
        Err(e) => (CniError::new(code::IO_FAILURE, format!("cannot read stdin: {e}")).to_json("1.1.0"), false),
    };
    if !out.is_null() {
        println!("{out}");
    }
    std::process::exit(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// A daemon that remembers what it was asked, for the plugin's rules (the real one is
    /// exercised by the runtime tests in agent/tests).
    #[derive(Default)]
    struct Recorded {
        attached: Vec<Attached>,
        calls: Vec<String>,
        down: bool,
        /// The networks that are encrypted.
        encrypted: BTreeSet<String>,
    }

    struct Fake(Rc<RefCell<Recorded>>);

    impl Daemon for Fake {
        fn attach(&mut self, a: &AttachArgs) -> Result<Attached, CniError> {
            let mut r = self.0.borrow_mut();
            r.calls.push(format!(
                "attach {} {} {:?} {:?}{}",
                a.network,
                a.name,
                a.ip,
                a.aliases,
                a.service.as_ref().map(|s| format!(" service={s}")).unwrap_or_default()
            ));
            if r.attached.iter().any(|e| e.container_id == a.container_id && e.network == a.network) {
                return Err(CniError::new(code::ALREADY_ATTACHED, "already attached"));
            }
            let e = Attached {
                network: a.network.clone(),
                cni_network: a.cni_network.clone(),
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                netns: a.netns.clone(),
                ip: a.ip.unwrap_or(Ipv4Addr::new(10, 128, 1, 2)),
                prefix_len: 16,
                gateway: Ipv4Addr::new(10, 128, 0, 1),
                mac: "02:4f:0a:80:01:02".into(),
                mtu: 1450,
                nameservers: Vec::new(),
            };
            r.attached.push(e.clone());
            Ok(e)
        }

        fn detach(&mut self, network: &str, id: &str, ifname: &str) -> Result<(), CniError> {
            let mut r = self.0.borrow_mut();
            r.calls.push(format!("detach {network} {id} {ifname}"));
            r.attached.retain(|e| !(e.network == network && e.container_id == id && e.ifname == ifname));
            Ok(())
        }

        fn cni_endpoints(&mut self, network: &str) -> Result<Vec<Attached>, CniError> {
            Ok(self.0.borrow().attached.iter().filter(|e| e.network == network).cloned().collect())
        }

        fn ready(&mut self, _: &str) -> Result<(), CniError> {
            if self.0.borrow().down { Err(CniError::new(code::IO_FAILURE, "no daemon")) } else { Ok(()) }
        }

        fn encrypted(&mut self, network: &str) -> Result<bool, CniError> {
            Ok(self.0.borrow().encrypted.contains(network))
        }
    }

    fn env(id: &str, args: &str) -> CniEnv {
        CniEnv::from_vars(|k| {
            Some(match k {
                "CNI_CONTAINERID" => id.to_owned(),
                "CNI_NETNS" => "/run/netns/x".to_owned(),
                "CNI_IFNAME" => "eth0".to_owned(),
                "CNI_ARGS" => args.to_owned(),
                _ => return None,
            })
        })
    }

    fn call(state: &Rc<RefCell<Recorded>>, verb: &str, env: &CniEnv, conf: &str) -> (Value, bool) {
        let s = Rc::clone(state);
        run(verb, env, conf.as_bytes(), move |_| Box::new(Fake(s)))
    }

    const MINIMAL: &str = r#"{"cniVersion":"1.0.0","name":"web","type":"overlayd","network":"web"}"#;

    #[test]
    fn add_returns_the_interface_address_gateway_and_route_in_the_configured_version() {
        let s = Rc::default();
        let (out, ok) = call(&s, "ADD", &env("c0ffee00c0ffee00", "IgnoreUnknown=1;K8S_POD_NAME=web1"), MINIMAL);
        assert!(ok, "{out}");
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(
            out["interfaces"][0],
            json!({"name": "eth0", "mac": "02:4f:0a:80:01:02", "sandbox": "/run/netns/x"})
        );
        assert_eq!(out["ips"][0], json!({"address": "10.128.1.2/16", "gateway": "10.128.0.1", "interface": 0}));
        assert_eq!(out["routes"][0], json!({"dst": "0.0.0.0/0", "gw": "10.128.0.1"}));
        assert_eq!(s.borrow().calls, ["attach web web1 None []"], "podman's container name names the endpoint");
        let hex = "c0ffee00".repeat(8);
        for (id, name) in [(hex.as_str(), "c0ffee00c0ff"), ("default-worker-1", "default-worker-1")] {
            let s = Rc::default();
            assert!(call(&s, "ADD", &env(id, "IgnoreUnknown=1"), MINIMAL).1);
            assert_eq!(s.borrow().calls, [format!("attach web {name} None []")], "no name given: from the id {id}");
        }
        let old = r#"{"cniVersion":"0.4.0","name":"web","type":"overlayd"}"#;
        let (out, ok) = call(&Rc::default(), "ADD", &env("c2", ""), old);
        assert!(ok, "{out}");
        assert_eq!(out["ips"][0]["version"], "4", "0.4.0 results say each IP's version");
        assert_eq!(out["cniVersion"], "0.4.0");
        let (out, _) = call(&Rc::default(), "ADD", &env("c3", ""), &MINIMAL.replace("1.0.0", "1.1.0"));
        assert_eq!(out["interfaces"][0]["mtu"], 1450, "1.1.0 results carry the MTU");
    }

    #[test]
    fn the_result_names_the_networks_resolver_on_its_gateway() {
        let e = proto::Endpoint {
            network: "web".into(),
            ip: "10.128.1.2".into(),
            prefix_len: 16,
            gateway: "10.128.0.1".into(),
            mac: "02:4f:0a:80:01:02".into(),
            ..Default::default()
        };
        let a = attached(&e).unwrap();
        assert_eq!(a.nameservers, ["10.128.0.1"]);
        assert_eq!(result("1.0.0", &a)["dns"], json!({"nameservers": ["10.128.0.1"]}));
        let none = attached(&proto::Endpoint { gateway: String::new(), ..e }).unwrap();
        assert_eq!(result("1.0.0", &none)["dns"], json!({}), "no gateway, no resolver");
    }

    #[test]
    fn a_second_add_fails_and_del_is_idempotent() {
        let s = Rc::default();
        let e = env("c0ffee00c0ffee00", "");
        assert!(call(&s, "ADD", &e, MINIMAL).1);
        let (out, ok) = call(&s, "ADD", &e, MINIMAL);
        assert!(!ok);
        assert_eq!(out["code"], code::ALREADY_ATTACHED);
        assert_eq!(call(&s, "DEL", &e, MINIMAL), (Value::Null, true));
        assert_eq!(call(&s, "DEL", &e, MINIMAL), (Value::Null, true), "DEL twice succeeds");
        let gone = CniEnv { netns: String::new(), ..e };
        assert_eq!(call(&s, "DEL", &gone, MINIMAL), (Value::Null, true), "DEL without a netns (ctr after exit)");
    }

    #[test]
    fn static_ip_and_aliases_reach_the_daemon() {
        let s = Rc::default();
        // As podman passes it (by network name), with an alias on another network left out.
        let conf = r#"{"cniVersion":"1.0.0","name":"web","type":"overlayd",
            "runtimeConfig":{"aliases":{"web":["web","db"],"other":["x"]}}}"#;
        let (out, ok) = call(&s, "ADD", &env("c1", "IP=10.128.1.9;MAC=02:4f:0a:80:01:09"), conf);
        assert!(ok, "{out}");
        assert_eq!(s.borrow().calls, [r#"attach web c1 Some(10.128.1.9) ["db", "web"]"#]);
        let (out, ok) = call(&Rc::default(), "ADD", &env("c2", "IP=ten"), conf);
        assert!(!ok);
        assert_eq!(out["code"], code::INVALID_ENVIRONMENT);
    }

    #[test]
    fn a_configuration_makes_its_containers_replicas_of_a_service() {
        let s = Rc::default();
        let conf =
            r#"{"cniVersion":"1.0.0","name":"web-replicas","type":"overlayd","network":"front","service":"web"}"#;
        assert!(call(&s, "ADD", &env("c1", ""), conf).1);
        assert!(call(&s, "ADD", &env("c2", "OVERLAYD_SERVICE=api"), conf).1);
        let calls = s.borrow().calls.clone();
        assert!(calls[0].starts_with("attach front ") && calls[0].ends_with(" service=web"), "{calls:?}");
        assert!(calls[1].ends_with(" service=api"), "CNI_ARGS wins: {calls:?}");
    }

    #[test]
    fn check_compares_the_endpoint_with_the_prev_result() {
        let s = Rc::default();
        let e = env("c1", "");
        let (added, _) = call(&s, "ADD", &e, MINIMAL);
        let with_prev = |prev: &Value| {
            let mut c: Value = serde_json::from_str(MINIMAL).unwrap();
            c["prevResult"] = prev.clone();
            c.to_string()
        };
        assert_eq!(call(&s, "CHECK", &e, &with_prev(&added)), (Value::Null, true));
        let mut other = added.clone();
        other["ips"][0]["address"] = json!("10.128.1.3/16");
        assert_eq!(call(&s, "CHECK", &e, &with_prev(&other)).0["code"], code::INVALID_NETWORK_CONFIG);
        assert_eq!(call(&s, "CHECK", &env("c9", ""), &with_prev(&added)).0["code"], code::UNKNOWN_CONTAINER);
        assert_eq!(call(&s, "CHECK", &e, MINIMAL).0["code"], code::INVALID_NETWORK_CONFIG, "no prevResult");
    }

    #[test]
    fn gc_detaches_what_the_runtime_no_longer_has_and_status_says_if_add_can_work() {
        let s = Rc::default();
        for id in ["a", "b", "c"] {
            assert!(call(&s, "ADD", &env(id, ""), &MINIMAL.replace("1.0.0", "1.1.0")).1);
        }
        let gc = r#"{"cniVersion":"1.1.0","name":"web","type":"overlayd",
            "cni.dev/valid-attachments":[{"containerID":"b","ifname":"eth0"}]}"#;
        assert_eq!(call(&s, "GC", &CniEnv::default(), gc), (Value::Null, true));
        let left: Vec<String> = s.borrow().attached.iter().map(|a| a.container_id.clone()).collect();
        assert_eq!(left, ["b"]);
        // Another configuration on the same overlayd network, and an endpoint an older overlayd
        // attached (no configuration recorded): neither is this configuration's to collect.
        let other = r#"{"cniVersion":"1.1.0","name":"web-replicas","type":"overlayd","network":"web"}"#;
        assert!(call(&s, "ADD", &env("d", ""), other).1);
        let old = Attached { container_id: "e".into(), cni_network: String::new(), ..s.borrow().attached[0].clone() };
        s.borrow_mut().attached.push(old);
        assert_eq!(call(&s, "GC", &CniEnv::default(), gc), (Value::Null, true));
        let left: Vec<String> = s.borrow().attached.iter().map(|a| a.container_id.clone()).collect();
        assert_eq!(left, ["b", "d", "e"]);
        let gc_other = gc.replace(r#""name":"web""#, r#""name":"web-replicas","network":"web""#);
        assert_eq!(call(&s, "GC", &CniEnv::default(), &gc_other), (Value::Null, true));
        let left: Vec<String> = s.borrow().attached.iter().map(|a| a.container_id.clone()).collect();
        assert_eq!(left, ["b", "e"], "web-replicas' GC takes its own d only");
        let status = r#"{"cniVersion":"1.1.0","name":"web","type":"overlayd"}"#;
        assert_eq!(call(&s, "STATUS", &CniEnv::default(), status), (Value::Null, true));
        s.borrow_mut().down = true;
        assert_eq!(call(&s, "STATUS", &CniEnv::default(), status).0["code"], code::NOT_AVAILABLE);
        assert_eq!(call(&s, "GC", &CniEnv::default(), MINIMAL).0["code"], code::INCOMPATIBLE_VERSION, "GC is 1.1");
    }

    #[test]
    fn a_configuration_that_asks_for_encryption_adds_only_to_an_encrypted_network() {
        let s: Rc<RefCell<Recorded>> = Rc::default();
        let conf = r#"{"cniVersion":"1.0.0","name":"web","type":"overlayd","network":"web","encrypted":true}"#;
        let (out, ok) = call(&s, "ADD", &env("c1", ""), conf);
        assert!(!ok);
        assert_eq!(out["code"], code::INVALID_NETWORK_CONFIG);
        assert!(out["msg"].as_str().unwrap().contains("overlayd network create web --encrypted"), "{out}");
        assert!(s.borrow().calls.is_empty(), "nothing attached to the plain network");
        s.borrow_mut().encrypted.insert("web".into());
        let (out, ok) = call(&s, "ADD", &env("c1", ""), conf);
        assert!(ok, "{out}");
        assert_eq!(s.borrow().calls.len(), 1);
    }

    #[test]
    fn bad_input_gets_the_specs_error_codes() {
        let s = Rc::default();
        let e = env("c1", "");
        let (out, ok) = call(&s, "ADD", &e, "{not json");
        assert!(!ok);
        assert_eq!((out["code"].as_u64(), out["cniVersion"].as_str()), (Some(6), Some("1.1.0")));
        assert_eq!(call(&s, "ADD", &e, r#"{"cniVersion":"9.9.9","name":"web"}"#).0["code"], code::INCOMPATIBLE_VERSION);
        assert_eq!(call(&s, "ADD", &e, r#"{"cniVersion":"1.0.0","name":""}"#).0["code"], code::INVALID_NETWORK_CONFIG);
        assert_eq!(call(&s, "ADD", &CniEnv::default(), MINIMAL).0["code"], code::INVALID_ENVIRONMENT);
        assert_eq!(call(&s, "FROB", &e, MINIMAL).0["code"], code::INVALID_ENVIRONMENT);
        let wrong_type = r#"{"cniVersion":"1.0.0","name":"web","network":7}"#;
        assert_eq!(call(&s, "ADD", &e, wrong_type).0["code"], code::DECODING_FAILURE);
        assert!(s.borrow().calls.is_empty(), "nothing reached the daemon");
        let (v, ok) =
            call(&s, "VERSION", &CniEnv { netns: "dummy".into(), ..CniEnv::default() }, r#"{"cniVersion":"1.0.0"}"#);
        assert!(ok);
        assert_eq!((v["cniVersion"].as_str(), &v["supportedVersions"]), (Some("1.0.0"), &json!(SUPPORTED_VERSIONS)));
    }
}
