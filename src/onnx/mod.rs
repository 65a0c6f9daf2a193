//! The ONNX boundary: generated protobuf types, loading, saving, text form.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
pub mod load;
pub mod pages;
pub mod save;
pub mod schema;
pub mod tensor;
pub mod text;
