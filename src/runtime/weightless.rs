//! A copy of a model for shape analysis only: its large weights become graph inputs of the
//! same type and shape, so tract types the graph without copying them.
//!
//! ```text
//! before:  initializer W float[4096, 4096] (64 MiB)      y = Gemm(x, W, b)
//! after:   input W float[4096, 4096] (no payload)         y = Gemm(x, W, b)
//! ```
//!
//! Loading a model into tract copies every weight three times on the way (our protobuf
//! encoding, tract's decoded protobuf, tract's tensors); for a 2 GiB model each shape analysis
//! cost seconds and gigabytes although no weight value decides a shape there.
//!
//! Conditions: an initializer of at least [`LIGHT_ABOVE_BYTES`] bytes of the main graph, read
//! only by the slots below, where tract needs the operand's shape and never its value to
//! type the node (a Reshape's shape operand or a Resize's scales are values that decide
//! shapes; they are never turned into inputs). Everything else stays as it is, so the analysis
//! computes the same shapes.

use crate::onnx::proto::{
    tensor_shape_proto::{dimension::Value as Dim, Dimension},
    type_proto, ModelProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::{HashMap, HashSet};

/// Initializers below this size are left in place: copying them costs nothing worth a change.
pub const LIGHT_ABOVE_BYTES: usize = 256 << 10;

/// (op type, input slot) pairs whose operand's value never decides the output's shape.
const SHAPE_ONLY_SLOTS: &[(&str, usize)] = &[
    ("Conv", 1),
    ("ConvTranspose", 1),
    ("Gemm", 0),
    ("Gemm", 1),
    ("Gemm", 2),
    ("MatMul", 0),
    ("MatMul", 1),
    ("LSTM", 1),
    ("LSTM", 2),
    ("LSTM", 3),
    ("GRU", 1),
    ("GRU", 2),
    ("GRU", 3),
    ("RNN", 1),
    ("RNN", 2),
    ("RNN", 3),
    ("Gather", 0),
    ("DequantizeLinear", 0),
    ("MatMulNBits", 1),
];

/// A model for shape analysis and the initializers it turned into inputs.
pub struct ShapeAnalysisCopy {
    pub model: ModelProto,
    /// Not inputs of the original: their shapes are not results of the analysis.
    pub lifted: HashSet<String>,
}

/// `model` with its large shape-only initializers turned into inputs, or `None` when there is
/// none (callers then analyse `model` itself).
pub fn shape_analysis_copy(model: &ModelProto) -> Option<ShapeAnalysisCopy> {
    let graph = model.graph.as_ref()?;
    let mut uses: HashMap<&str, bool> = HashMap::new();
    for node in &graph.node {
        for (slot, name) in node.input.iter().enumerate() {
            let shape_only = SHAPE_ONLY_SLOTS.contains(&(node.op_type(), slot));
            *uses.entry(name.as_str()).or_insert(true) &= shape_only;
        }
        // Names a branch reads from the outer scope keep their values.
        for a in &node.attribute {
            for g in a.g.iter().chain(&a.graphs) {
                mark_outer_reads(g, &mut uses);
            }
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
    let light: HashSet<String> = graph
        .initializer
        .iter()
        .filter(|t| {
            let name = t.name();
            crate::onnx::tensor::payload_bytes(t).is_ok_and(|b| b >= LIGHT_ABOVE_BYTES)
                && uses.get(name).copied().unwrap_or(false)
                && !outputs.contains(name)
        })
        .map(|t| t.name().to_string())
        .collect();
    if light.is_empty() {
        return None;
    }
    let mut copy = model.clone();
    let g = copy.graph.as_mut()?;
    g.input.retain(|i| !light.contains(i.name()));
    g.value_info.retain(|v| !light.contains(v.name()));
    let mut kept = Vec::with_capacity(g.initializer.len());
    for t in std::mem::take(&mut g.initializer) {
        if !light.contains(t.name()) {
            kept.push(t);
            continue;
        }
        let dims = t
            .dims
            .iter()
            .map(|&d| Dimension {
                value: Some(Dim::DimValue(d)),
                ..Default::default()
            })
            .collect();
        g.input.push(ValueInfoProto {
            name: t.name.clone(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: t.data_type,
                    shape: Some(TensorShapeProto { dim: dims }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    g.initializer = kept;
    Some(ShapeAnalysisCopy {
        model: copy,
        lifted: light,
    })
}

/// Every name `g` (or a graph nested in it) reads without producing it: outer-scope reads,
/// whose values the branch may need.
fn mark_outer_reads<'a>(g: &'a crate::onnx::proto::GraphProto, uses: &mut HashMap<&'a str, bool>) {
    for node in &g.node {
        for name in &node.input {
            uses.insert(name.as_str(), false);
        }
        for a in &node.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                mark_outer_reads(sub, uses);
            }
        }
    }
}
