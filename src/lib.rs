//! onnx-compress: make trained ONNX models small and fast without retraining, and prove the
//! result by running original and output side by side in tract.
pub mod calibrate;
pub mod cli;
pub mod hessian;
pub mod ir;
pub mod onnx;
pub mod passes;
pub mod pipeline;
pub mod recipe;
pub mod report;
pub mod validate;

pub use pipeline::Pipeline;
