//! Value shapes of a model: what it declares ([`crate::ir::facts::known_shapes`]) completed and
//! corrected by tract's shape analysis. Best effort: a model tract cannot analyse keeps its
//! declared shapes only; one tract cannot load (int4 weights...) is analysed through its
//! simulation graph, which keeps every op output's name.

use super::{infer_value_shapes, simulation_graph, ValueShape};
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
    let inferred = infer_value_shapes(proto, input_shapes);
    value_shapes_given(model, proto, input_shapes, inferred.ok())
}

/// [`value_shapes`] for a caller that already ran tract's analysis of `proto` (`None` when it
/// failed: the simulation graph is tried then).
pub fn value_shapes_given(
    model: &Model,
    proto: &ModelProto,
    input_shapes: &[(String, Vec<usize>)],
    inferred: Option<Vec<ValueShape>>,
) -> HashMap<String, Vec<usize>> {
    let mut shapes = known_shapes(model);
    let values = inferred.ok_or(()).or_else(|_| {
        let (sim, _) = simulation_graph(proto).map_err(|_| ())?;
        infer_value_shapes(&sim, input_shapes).map_err(|_| ())
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
