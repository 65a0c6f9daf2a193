//! Fused activations: which activation directly follows a Conv/ConvTranspose/Gemm/MatMul as
//! the only reader of its output (QDQ placement puts no Q/DQ pair between the two), and the
//! range of its output: Relu `[0, inf)`, Clip its constant bounds, LeakyRelu `(-inf, inf)`,
//! HardSwish `[-3/8, inf)`, HardSigmoid `[0, 1]`. Nothing is rewritten here.

use crate::ir::facts::clip_bounds;
use crate::ir::op;
use crate::ir::{Graph, InSlot};
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;

/// The activations that may share a quantized layer's output (no Q/DQ between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActivationKind {
    Relu,
    Clip,
    LeakyRelu,
    HardSwish,
    HardSigmoid,
}

/// An activation fused with the layer before it, with the range of its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedActivation {
    pub node: NodeIndex,
    pub kind: ActivationKind,
    /// Output range: `[0, 6]` for Clip(0, 6), `[0, inf)` for Relu, `(-inf, inf)` for LeakyRelu.
    pub min: f64,
    pub max: f64,
}

/// The activation node directly after `producer` (a Conv, ConvTranspose, Gemm or MatMul whose
/// output it alone reads), if any: QDQ placement puts no Q/DQ between the two.
pub fn fused_activation(graph: &Graph, producer: NodeIndex) -> Option<NodeIndex> {
    activation_info(graph, producer).map(|a| a.node)
}

/// Like [`fused_activation`], with the activation's kind and output range.
pub fn activation_info(graph: &Graph, producer: NodeIndex) -> Option<FusedActivation> {
    if !graph.contains(producer) {
        return None;
    }
    let p = graph.node(producer);
    if !op::is_standard_domain(p.domain())
        || !matches!(p.op_type(), "Conv" | "ConvTranspose" | "Gemm" | "MatMul")
    {
        return None;
    }
    let out = p.output.first()?;
    let [(act, InSlot::Arg(0))] = graph.consumers(out) else {
        return None;
    };
    if graph.is_graph_output(out) {
        return None;
    }
    let (kind, min, max) = activation_range(graph, *act)?;
    Some(FusedActivation {
        node: *act,
        kind,
        min,
        max,
    })
}

/// The kind and output range of an activation node; `None` for other nodes and for a Clip
/// whose bounds are not constant.
pub fn activation_range(graph: &Graph, ix: NodeIndex) -> Option<(ActivationKind, f64, f64)> {
    let n = graph.node(ix);
    if !op::is_standard_domain(n.domain()) {
        return None;
    }
    let inf = f64::INFINITY;
    Some(match n.op_type() {
        "Relu" => (ActivationKind::Relu, 0.0, inf),
        "LeakyRelu" => (ActivationKind::LeakyRelu, -inf, inf),
        // x·relu6(x+3)/6 has its minimum −3/8 at x = −3/2.
        "HardSwish" => (ActivationKind::HardSwish, -0.375, inf),
        "HardSigmoid" => (ActivationKind::HardSigmoid, 0.0, 1.0),
        "Clip" => {
            let (min, max) = clip_bounds(graph, n)?;
            (ActivationKind::Clip, min, max)
        }
        _ => return None,
    })
}
