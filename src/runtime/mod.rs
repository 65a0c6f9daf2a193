//! The tract facade: everything that runs a model (tract-onnx 0.23.9) lives here, below the
//! layers that observe data (calibrate, hessian), rewrite models (passes) and compare runs
//! (validate).
//!
//! - [`allocator`]: the C allocator keeps freed activations for the next run.
//! - `by_reference`: large weights handed to tract by reference, not through the encoding.
//! - [`feed`]: a graph input's value in its declared element type.
//! - [`runner`]: load a `ModelProto` with pinned inputs, expose intermediate tensors, run.
//! - [`simulate`]: the exact rewrites that let tract run what it cannot load as is (constant
//!   `If`s inlined, constant weight `DequantizeLinear`/`Cast` folded to float).
//! - [`support`]: what tract would misread or cannot load, as a one-line reason.
//! - [`shapes`]: declared shapes completed by tract's shape analysis.
//! - [`weightless`]: a copy for shape analysis with the large weights as inputs.
//! - `tensor`: payload decoding with the type checks and messages the runtime needs.

pub mod allocator;
mod by_reference;
pub mod feed;
mod runner;
pub mod shapes;
pub(crate) mod simulate;
mod support;
mod tensor;
pub mod weightless;

pub use feed::{fingerprint, Feed, RunInput};
pub use runner::{
    infer_value_shapes, resolve_input_shapes, run_model, F32Value, InputSpec, Runner, ValueShape,
};
pub use shapes::{value_shapes, value_shapes_given};
pub use simulate::{
    fake_quant_as_float_ops, simulation_graph, simulation_graph_with, WeightFolding,
};
pub use support::refusal;

/// The runtime every check runs in.
pub const RUNTIME: &str = "tract-onnx 0.23.9";
