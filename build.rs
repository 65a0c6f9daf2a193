//! Generates the ONNX protobuf types from the vendored schema with protox (pure Rust), so a
//! fresh machine needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    prost_build::Config::new()
        // Tensor payloads can be hundreds of MB: share them instead of copying.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
