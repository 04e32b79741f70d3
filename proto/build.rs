//! Compiles `proto/cairn/v1/*.proto` with a pure-Rust protobuf compiler
//! (protox), so building never needs `protoc` or the network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/cairn/v1/peer.proto", "proto/cairn/v1/data.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        // Data payloads stay reference-counted from socket to disk.
        .bytes([".cairn.data.v1"])
        .compile_fds(fds)?;
    Ok(())
}
