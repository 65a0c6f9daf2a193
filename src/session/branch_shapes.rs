//! Declared shapes inside `If` branches against what the branch computes, as tract infers it.
//!
//! The tool passes subgraphs through unchanged, so a branch whose declared output (or
//! `value_info`) shape contradicts its nodes (`then_branch () => (float[1,21,8,8] t)` where the
//! Conv gives 4 channels) would be re-emitted and rejected by ONNX shape inference. tract only
//! reports the main graph's values, so each branch is analysed as a model of its own:
//!
//! ```text
//! main graph:  x[1,3,8,8] -> ... -> If(cond) { then: Conv(x, W) -> Relu -> t_out }
//! branch model: (x: float[1,3,8,8] from the main graph's shapes, W: its initializer)
//!               -> Conv -> Relu -> t_out      (value_info and outputs as the branch declares)
//! ```
//!
//! Values the branch reads from enclosing graphs become its inputs, typed and shaped as the
//! enclosing graph's analysis says (or initializers, copied). Nested `If`s are analysed the same
//! way inside the branch model. Best effort: a branch that reads a value of unknown type, or
//! that tract cannot analyse, is left alone. Comparison rules: [`compare_declared`] (ranks
//! always, dims when every input dim is known), which the main graph's check in
//! [`super::preflight`] uses too.

use crate::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::onnx::proto::{
    tensor_shape_proto, type_proto, GraphProto, ModelProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::runtime::ValueShape;
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};

/// Check every `If` branch of `graph` (see the module docs). `outer` holds the analysed
/// values visible to the branches; `initializers` the constants of enclosing graphs.
pub fn check_if_branches(
    proto: &ModelProto,
    graph: &GraphProto,
    outer: &[ValueShape],
    initializers: &HashMap<String, TensorProto>,
) -> Result<()> {
    let mut constants = initializers.clone();
    for t in &graph.initializer {
        constants.insert(t.name().to_string(), t.clone());
    }
    for node in graph.node.iter().filter(|n| n.op_type() == "If") {
        for a in &node.attribute {
            let Some(branch) = a.g.as_ref() else { continue };
            check_branch(proto, branch, outer, &constants).with_context(|| {
                format!(
                    "in attribute '{}' of node '{}' (If)",
                    a.name(),
                    crate::ir::op::node_label(node)
                )
            })?;
        }
    }
    Ok(())
}

fn check_branch(
    proto: &ModelProto,
    branch: &GraphProto,
    outer: &[ValueShape],
    constants: &HashMap<String, TensorProto>,
) -> Result<()> {
    let produced: HashSet<&str> = branch
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(|o| o.as_str()))
        .chain(branch.initializer.iter().map(|t| t.name()))
        .collect();
    let mut read = Vec::new();
    for n in &branch.node {
        reads(n, &mut read);
    }
    let mut inputs = Vec::new();
    let mut initializer = branch.initializer.clone();
    let mut seen = HashSet::new();
    for name in read {
        if produced.contains(name.as_str()) || !seen.insert(name.clone()) {
            continue;
        }
        if let Some(t) = constants.get(&name) {
            initializer.push(t.clone());
            continue;
        }
        let Some(v) = outer.iter().find(|v| v.name == name) else {
            return Ok(());
        };
        let (Some(elem), Some(shape)) = (v.elem_type, v.shape.as_ref()) else {
            return Ok(());
        };
        inputs.push(value_info(&name, elem as i32, shape));
    }
    let model = ModelProto {
        graph: Some(GraphProto {
            name: branch.name.clone(),
            node: branch.node.clone(),
            input: inputs,
            initializer,
            output: branch.output.clone(),
            value_info: branch.value_info.clone(),
            ..Default::default()
        }),
        ..proto.clone()
    };
    let Ok(inferred) = crate::runtime::infer_value_shapes(&model, &[]) else {
        return Ok(());
    };
    let graph = model.graph.as_ref().context("branch model has a graph")?;
    let dims_known = graph.input.iter().all(|i| {
        shape_of(i).is_some_and(|s| {
            s.dim
                .iter()
                .all(|d| matches!(d.value, Some(tensor_shape_proto::dimension::Value::DimValue(v)) if v >= 0))
        })
    });
    let declared = graph
        .output
        .iter()
        .map(|v| ("graph output", v))
        .chain(graph.value_info.iter().map(|v| ("value_info", v)));
    compare_declared(declared, &inferred, dims_known)?;
    check_if_branches(&model, graph, &inferred, constants)
}

fn shape_of(v: &ValueInfoProto) -> Option<&TensorShapeProto> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.shape.as_ref(),
        _ => None,
    }
}

/// Every value name `node` reads, its subgraphs' reads included.
fn reads(node: &NodeProto, out: &mut Vec<String>) {
    out.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
    for a in &node.attribute {
        for sub in a.g.iter().chain(&a.graphs) {
            for n in &sub.node {
                reads(n, out);
            }
        }
    }
}

fn value_info(name: &str, elem: i32, shape: &[Option<usize>]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: d
                                .map(|d| tensor_shape_proto::dimension::Value::DimValue(d as i64)),
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

/// Declared values whose rank (or, when `dims_known`, a fixed dim) contradicts `inferred`.
pub(super) fn compare_declared<'a>(
    declared_values: impl Iterator<Item = (&'static str, &'a crate::onnx::proto::ValueInfoProto)>,
    inferred: &[crate::runtime::ValueShape],
    dims_known: bool,
) -> Result<()> {
    for (kind, out) in declared_values {
        let Some(type_proto::Value::TensorType(tt)) =
            out.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        let Some(declared) = &tt.shape else { continue };
        let Some(computed) = inferred
            .iter()
            .find(|v| v.name == out.name())
            .and_then(|v| v.shape.clone())
        else {
            continue;
        };
        let show = |d: &[Option<i64>]| {
            d.iter()
                .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let declared: Vec<Option<i64>> = declared
            .dim
            .iter()
            .map(|d| match d.value {
                // -1 is some exporters' way to write an unknown dim.
                Some(Dim::DimValue(v)) if v >= 0 => Some(v),
                _ => None,
            })
            .collect();
        let computed: Vec<Option<i64>> = computed.iter().map(|d| d.map(|v| v as i64)).collect();
        // A declared symbolic dim matches anything. Tract pins symbolic input dims to 1, so
        // computed dims are compared only when every input dim is known.
        let contradicts = declared.len() != computed.len()
            || (dims_known
                && declared
                    .iter()
                    .zip(&computed)
                    .any(|(d, c)| matches!((d, c), (Some(d), Some(c)) if d != c)));
        if contradicts {
            bail!(
                "{kind} '{}' is declared [{}] but the graph computes [{}]: ONNX shape inference (and every runtime) rejects the model",
                out.name(),
                show(&declared),
                show(&computed)
            );
        }
    }
    Ok(())
}
