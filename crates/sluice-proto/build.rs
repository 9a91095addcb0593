//! Compiles the project's RocketMQ v2 `.proto` files with `protox` (pure Rust,
//! no `protoc` needed) and generates prost messages plus tonic server and
//! client code.

use std::error::Error;

const PROTOS: [&str; 2] = [
    "proto/apache/rocketmq/v2/definition.proto",
    "proto/apache/rocketmq/v2/service.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Message bodies as `Bytes`: decoding splits them off the request buffer instead
        // of copying them, and a delivery shares the stored body instead of copying it.
        .bytes(".apache.rocketmq.v2.Message.body")
        .compile_fds(fds)?;
    Ok(())
}
