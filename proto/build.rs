//! Compiles `proto/overlayd.proto` with protox (a protobuf compiler in pure Rust: no system
//! `protoc` needed) and generates prost messages and tonic services from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["overlayd.proto"], ["proto"])?;
    let mut b = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Every message renders as JSON for the CLI's --json; enum fields by name.
        .type_attribute(".overlayd.v1", "#[derive(serde::Serialize)]")
        // Maps iterate in key order, so JSON and metrics list them the same way every time.
        .btree_map(".");
    for field in [
        "overlayd.v1.Node.role",
        "overlayd.v1.JoinReply.role",
        "overlayd.v1.JoinClusterReply.role",
        "overlayd.v1.ClusterStatus.role",
        "overlayd.v1.JoinTokenReply.role",
    ] {
        b = b.field_attribute(field, "#[serde(serialize_with = \"crate::json::role\")]");
    }
    b = b.field_attribute("overlayd.v1.Node.status", "#[serde(serialize_with = \"crate::json::node_status\")]");
    b.compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/overlayd.proto");
    Ok(())
}
