//! Compiles `proto/overlayd.proto` with protox (a protobuf compiler in pure Rust: no system
//! `protoc` needed) and generates prost messages and tonic services from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["overlayd.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/overlayd.proto");
    Ok(())
}
