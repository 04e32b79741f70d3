//! Compiles the CSI spec's protobuf (`proto/csi.proto`, package `csi.v1`)
//! with protox, so building needs neither `protoc` nor the network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "../proto/csi.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["../proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
