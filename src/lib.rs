//! onnx-compress: make trained ONNX models small and fast without retraining, and prove the
//! result by running original and output side by side in tract.
//!
//! Layers, each importing only from those before it (a test keeps it so, see ARCHITECTURE.md):
//! `onnx`, `progress`, `limits` < `ir` < `runtime` < `calibrate`, `hessian` < `passes`, `validate`,
//! `pipeline` < `session` < `report`. The command line lives in the binary (`src/cli/`).
pub mod calibrate;
pub mod hessian;
pub mod ir;
pub mod limits;
pub mod onnx;
pub mod passes;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod session;
pub mod validate;

pub use pipeline::Pipeline;
