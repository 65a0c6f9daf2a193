//! The part of a model downstream of one weight, as a model of its own: the nodes that
//! (transitively) read the weight, with the upstream values they read (layer input, residual
//! branches, ...) and the weight itself as graph inputs (the weight last), and the graph
//! outputs they reach as outputs. tract plans it once; every probe then runs only this part.
//! Also which outputs the loss compares with KL (`Auto`: `[N, C>1]` outputs not produced by a
//! Softmax/LogSoftmax).

use super::Loss;
use crate::ir::graph::{free_names, subgraphs};
use crate::ir::layer::Layer;
use crate::ir::Model;
use crate::onnx::proto::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, GraphProto, ModelProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use anyhow::Result;
use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use std::collections::{BTreeSet, HashMap, HashSet};

/// The part of a model downstream of one weight, with upstream values as inputs.
pub(crate) struct SubModel {
    pub(crate) proto: ModelProto,
    /// Upstream values fed as inputs (in input order), before the weight (last input).
    pub(crate) boundary: Vec<String>,
    pub(crate) kl: Vec<bool>,
    /// The graph outputs it computes (indices into the model's outputs), in its output order.
    pub(crate) outputs: Vec<usize>,
}

/// A graph input or output declaration: element type, optional fixed shape.
pub(crate) fn value_info(name: &str, elem: i32, shape: Option<&[usize]>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: shape.map(|s| TensorShapeProto {
                    dim: s
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Which outputs use KL under `loss`.
pub(super) fn kl_outputs(model: &Model, loss: Loss, shapes: &[Vec<usize>]) -> Vec<bool> {
    model
        .graph
        .outputs
        .iter()
        .zip(shapes)
        .map(|(o, s)| match loss {
            Loss::Kl => s.len() == 2,
            Loss::Mse => false,
            Loss::Auto => {
                let probs = model.graph.producer_node(o.name()).is_some_and(|ix| {
                    matches!(model.graph.node(ix).op_type(), "Softmax" | "LogSoftmax")
                });
                s.len() == 2 && s[1] > 1 && !probs
            }
        })
        .collect()
}

pub(crate) fn sub_model(
    model: &Model,
    layer: &Layer,
    elem_types: &HashMap<String, i32>,
    kl: &[bool],
) -> Result<Option<SubModel>> {
    let g = &model.graph;
    // Downstream closure of the weight's readers.
    let mut down: HashSet<NodeIndex> = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.consumers(&layer.weight).iter().map(|c| c.0).collect();
    while let Some(ix) = stack.pop() {
        if down.insert(ix) {
            stack.extend(g.dag().neighbors_directed(ix, Direction::Outgoing));
        }
    }
    let order: Vec<NodeIndex> = g
        .topo_order()?
        .into_iter()
        .filter(|ix| down.contains(ix))
        .collect();
    let produced: HashSet<&str> = order
        .iter()
        .flat_map(|&ix| g.node(ix).output.iter().map(String::as_str))
        .collect();
    let mut reads: BTreeSet<String> = BTreeSet::new();
    for &ix in &order {
        let n = g.node(ix);
        reads.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        for sub in subgraphs(n) {
            reads.extend(free_names(sub));
        }
    }
    let mut boundary = Vec::new();
    let mut initializers = Vec::new();
    for name in &reads {
        if produced.contains(name.as_str()) || name == &layer.weight {
            continue;
        }
        if let Some(t) = g.constant(name) {
            initializers.push(t.clone());
        } else {
            boundary.push(name.clone());
        }
    }
    let outputs: Vec<usize> = g
        .outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| produced.contains(o.name()))
        .map(|(i, _)| i)
        .collect();
    if outputs.is_empty() {
        return Ok(None);
    }
    let mut inputs: Vec<ValueInfoProto> = boundary
        .iter()
        .map(|b| {
            value_info(
                b,
                *elem_types.get(b).unwrap_or(&(DataType::Float as i32)),
                None,
            )
        })
        .collect();
    inputs.push(value_info(
        &layer.weight,
        DataType::Float as i32,
        Some(&layer.weight_shape),
    ));
    let gp = GraphProto {
        name: Some(format!("downstream of {}", layer.weight)),
        node: order.iter().map(|&ix| g.node(ix).clone()).collect(),
        initializer: initializers,
        input: inputs,
        output: outputs.iter().map(|&i| g.outputs[i].clone()).collect(),
        ..Default::default()
    };
    let mut proto = model.shell.clone();
    proto.graph = Some(gp);
    Ok(Some(SubModel {
        proto,
        boundary,
        kl: outputs.iter().map(|&i| kl[i]).collect(),
        outputs,
    }))
}
