//! Compiles `proto/overlayd.proto` with protox (a protobuf compiler in pure Rust: no system
//! `protoc` needed) and generates prost messages and tonic services from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["overlayd.proto"], ["proto"])?;
    let mut b = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Maps in a fixed (sorted) order: --json and /metrics print the same order every call.
        .btree_map(".")
        // Every message renders as JSON for the CLI's --json; enum fields by name, bytes as hex.
        .type_attribute(".overlayd.v1", "#[derive(serde::Serialize)]");
    for field in [
        "overlayd.v1.Node.gossip_public_key",
        "overlayd.v1.RaftMessage.payload",
        "overlayd.v1.JoinRequest.csr_der",
        "overlayd.v1.JoinRequest.gossip_public_key",
        "overlayd.v1.JoinReply.gossip_key",
        "overlayd.v1.EpochKey.key",
        "overlayd.v1.GossipKeyReply.key",
        "overlayd.v1.CertifyRequest.csr_der",
    ] {
        b = b.field_attribute(field, "#[serde(serialize_with = \"crate::json::hex\")]");
    }
    for field in [
        "overlayd.v1.Node.role",
        "overlayd.v1.JoinReply.role",
        "overlayd.v1.JoinClusterReply.role",
        "overlayd.v1.ClusterStatus.role",
        "overlayd.v1.JoinTokenReply.role",
        "overlayd.v1.SetNodeRoleRequest.role",
        "overlayd.v1.CertifyReply.role",
    ] {
        b = b.field_attribute(field, "#[serde(serialize_with = \"crate::json::role\")]");
    }
    b = b.field_attribute("overlayd.v1.Node.status", "#[serde(serialize_with = \"crate::json::node_status\")]");
    b.compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/overlayd.proto");
    Ok(())
}
