pub mod onnx;
pub mod validate;
