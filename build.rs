//! Compiles `proto/onnx.proto` into the `pb` module with the pure-Rust protox compiler and
//! prost-build, so building needs no `protoc` binary. `bytes` fields become `bytes::Bytes`,
//! which decode zero-copy out of a buffer that owns the memory map.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
