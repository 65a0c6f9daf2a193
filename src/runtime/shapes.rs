//! Value shapes of a model: what it declares ([`crate::ir::facts::known_shapes`]) completed and
//! corrected by tract's shape analysis. Best effort: a model tract cannot analyse keeps its
//! declared shapes only; one tract cannot load (int4 weights...) is analysed through its
//! simulation graph, which keeps every op output's name.

use super::{infer_value_shapes, simulation_graph};
use crate::ir::facts::known_shapes;
use crate::ir::Model;
use crate::onnx::proto::ModelProto;
use std::collections::HashMap;

/// Declared shapes, overridden where tract infers a fully known shape (`proto` is `model`
/// as emitted).
pub fn value_shapes(
    model: &Model,
    proto: &ModelProto,
    input_shapes: &[(String, Vec<usize>)],
) -> HashMap<String, Vec<usize>> {
    let mut shapes = known_shapes(model);
    let values = infer_value_shapes(proto, input_shapes).or_else(|_| {
        let (sim, _) = simulation_graph(proto)?;
        infer_value_shapes(&sim, input_shapes)
    });
    if let Ok(values) = values {
        for v in values {
            if let Some(dims) = v
                .shape
                .and_then(|s| s.into_iter().collect::<Option<Vec<_>>>())
            {
                shapes.insert(v.name, dims);
            }
        }
    }
    shapes
}
