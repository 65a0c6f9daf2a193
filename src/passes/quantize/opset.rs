//! Raising the default-domain opset to 13 (per-channel DequantizeLinear needs it) without
//! changing what any node computes.
//!
//! Converted (top-level graph):
//! - `Clip` < 11: `min`/`max` attributes become scalar float inputs;
//! - `Pad` < 11: `pads` / `value` attributes become inputs;
//! - `Slice` < 10: `starts` / `ends` / `axes` attributes become inputs;
//! - `TopK` < 10: `k` attribute becomes an input;
//! - `Dropout` < 12: `ratio` / `is_test` attributes dropped (inference Dropout is the identity);
//! - `Squeeze`, `Unsqueeze`, `ReduceSum` < 13: `axes` attribute becomes an int64 input;
//! - `Split` < 13: `split` attribute becomes an int64 input;
//! - `Softmax`, `LogSoftmax`, `Hardmax` < 13: the old op coerces its input to 2-D at `axis`
//!   (default 1); the new one works along `axis` (default -1). Identical when `axis` is the last
//!   dimension, so the node gets an explicit `axis = rank - 1` when the rank is known
//!   (value_info / graph io, else tract's shape analysis) and is refused otherwise.
//!
//! Refused with the node named: models below opset 7 (legacy broadcast/`consumed_inputs`
//! semantics), `Upsample`, `Scatter`, `Resize` < 11 (its coordinate mapping changed), and any
//! affected op inside a subgraph.

use crate::ir::facts::declared_rank;
use crate::ir::op::{self, Attrs};
use crate::ir::{Model, Patch};
use crate::onnx::tensor;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use anyhow::{bail, Context, Result};
use ndarray::arr0;

pub const TARGET: i64 = 13;

/// What a node needs when moving from `from` to opset 13: the first opset where its
/// semantics changed, if that lies in (from, 13].
fn changed_at(op: &str, from: i64) -> Option<i64> {
    let at = match op {
        "Clip" | "Pad" => 11,
        "Slice" | "TopK" => 10,
        "Dropout" => 12,
        "Squeeze" | "Unsqueeze" | "ReduceSum" | "Split" | "Softmax" | "LogSoftmax" | "Hardmax" => {
            13
        }
        "Resize" => 11,
        "Upsample" | "Scatter" => 0,
        _ => return None,
    };
    (at == 0 || from < at).then_some(at)
}

fn label(n: &NodeProto) -> String {
    format!("{} '{}'", n.op_type(), n.name())
}

/// Raise the model to opset 13, converting nodes as documented above. Returns notes.
pub fn upgrade(model: &mut Model, input_shapes: &[(String, Vec<usize>)]) -> Result<Vec<String>> {
    let from = model.opset("").unwrap_or(1);
    if from >= TARGET {
        return Ok(vec![]);
    }
    if from < 7 {
        bail!("the model imports opset {from}; quantization needs opset 13 and models below opset 7 use legacy broadcasting semantics: re-export at opset >= 13");
    }
    // Subgraphs: refuse affected ops there instead of converting.
    for ix in model.graph.node_indices() {
        let n = model.graph.node(ix);
        for sub in crate::ir::graph::subgraphs(n) {
            if let Some(bad) = find_affected(sub, from) {
                bail!(
                    "opset {from} model has {bad} inside a subgraph of {}; its semantics change at opset 13 and subgraphs are not converted: re-export at opset >= 13",
                    label(n)
                );
            }
        }
    }
    // Ranks tract infers, for values the model declares no shape for (Softmax needs its input
    // rank); computed only when such a node exists.
    let needs_ranks = model.graph.node_indices().any(|ix| {
        let n = model.graph.node(ix);
        matches!(n.op_type(), "Softmax" | "LogSoftmax" | "Hardmax")
            && declared_rank(
                &model.graph,
                n.input.first().map(|s| s.as_str()).unwrap_or(""),
            )
            .is_none()
    });
    let inferred_ranks: std::collections::HashMap<String, usize> = if needs_ranks {
        crate::runtime::infer_value_shapes(&model.to_proto()?, input_shapes)
            .map(|values| {
                values
                    .into_iter()
                    .filter_map(|v| Some((v.name, v.shape?.len())))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Default::default()
    };
    let g = &mut model.graph;
    let mut converted = 0usize;
    let indices: Vec<_> = g.topo_order()?;
    for ix in indices {
        let n = g.node(ix).clone();
        if !op::is_standard_domain(n.domain()) {
            continue;
        }
        if changed_at(n.op_type(), from).is_none() {
            continue;
        }
        let refuse = |why: &str| -> Result<()> {
            bail!(
                "opset {from} model has {}{why}; quantization raises the opset to 13, where its semantics differ: re-export at opset >= 13",
                label(&n)
            )
        };
        let mut node = n.clone();
        let mut inits: Vec<TensorProto> = Vec::new();
        match n.op_type() {
            "Upsample" | "Scatter" => refuse(" (removed in later opsets)")?,
            "Resize" => refuse(" (opset 10 coordinate mapping)")?,
            "Clip" => {
                let lo = n.attr_float("min")?.unwrap_or(f32::MIN);
                let hi = n.attr_float("max")?.unwrap_or(f32::MAX);
                strip(&mut node, &["min", "max"]);
                let names =
                    g.fresh_names(&[format!("{}_min", n.name()), format!("{}_max", n.name())]);
                inits.push(tensor::from_f32(&names[0], &arr0(lo).into_dyn()));
                inits.push(tensor::from_f32(&names[1], &arr0(hi).into_dyn()));
                node.input.truncate(1);
                node.input.extend(names);
            }
            "Pad" => {
                let pads = n
                    .attr_ints("pads")?
                    .with_context(|| format!("{} has no pads", label(&n)))?;
                let value = n.attr_float("value")?.unwrap_or(0.0);
                strip(&mut node, &["pads", "value"]);
                let names =
                    g.fresh_names(&[format!("{}_pads", n.name()), format!("{}_value", n.name())]);
                inits.push(tensor::from_i64(&names[0], &[pads.len()], &pads));
                inits.push(tensor::from_f32(&names[1], &arr0(value).into_dyn()));
                node.input.truncate(1);
                node.input.extend(names);
            }
            "Slice" => {
                let mut names = vec![];
                let mut bases = vec![];
                for key in ["starts", "ends", "axes"] {
                    if let Some(v) = n.attr_ints(key)? {
                        bases.push((format!("{}_{key}", n.name()), v));
                    }
                }
                let fresh = g.fresh_names(&bases.iter().map(|b| b.0.clone()).collect::<Vec<_>>());
                for ((_, v), name) in bases.iter().zip(fresh) {
                    inits.push(tensor::from_i64(&name, &[v.len()], v));
                    names.push(name);
                }
                strip(&mut node, &["starts", "ends", "axes"]);
                node.input.truncate(1);
                node.input.extend(names);
            }
            "TopK" => {
                let k = n.attr_int("k")?.unwrap_or(1);
                strip(&mut node, &["k"]);
                let name = g.fresh_name(&format!("{}_k", n.name()));
                inits.push(tensor::from_i64(&name, &[1], &[k]));
                node.input.truncate(1);
                node.input.push(name);
            }
            "Dropout" => {
                strip(&mut node, &["ratio", "is_test"]);
            }
            "Squeeze" | "Unsqueeze" | "ReduceSum" | "Split" => {
                let key = if n.op_type() == "Split" {
                    "split"
                } else {
                    "axes"
                };
                if let Some(v) = n.attr_ints(key)? {
                    strip(&mut node, &[key]);
                    let name = g.fresh_name(&format!("{}_{key}", n.name()));
                    inits.push(tensor::from_i64(&name, &[v.len()], &v));
                    node.input.truncate(1);
                    node.input.push(name);
                }
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                let axis = n.attr_int("axis")?.unwrap_or(1);
                let input = n.input.first().cloned().unwrap_or_default();
                match declared_rank(g, &input).or_else(|| inferred_ranks.get(&input).copied()) {
                    Some(rank) => {
                        let axis = if axis < 0 { axis + rank as i64 } else { axis };
                        if axis != rank as i64 - 1 {
                            refuse(&format!(
                                " with axis {axis} on a rank-{rank} input (old coerce-to-2D semantics)"
                            ))?;
                        }
                        op::set_attr(&mut node, op::attr_int("axis", axis));
                    }
                    None if axis == -1 => {}
                    None => refuse(" whose input rank is unknown (old coerce-to-2D semantics)")?,
                }
            }
            _ => {}
        }
        if node != n {
            g.apply(Patch {
                remove: vec![ix],
                add: vec![node],
                initializers: inits,
                ..Default::default()
            })
            .with_context(|| format!("converting {} to opset 13", label(&n)))?;
            converted += 1;
        }
    }
    model.require_opset("", TARGET);
    let mut notes = vec![format!(
        "raised the default opset from {from} to {TARGET} (needed for per-channel DequantizeLinear)"
    )];
    if converted > 0 {
        notes.push(format!(
            "converted {converted} node(s) whose attributes became inputs by opset 13"
        ));
    }
    Ok(notes)
}

fn strip(node: &mut NodeProto, keys: &[&str]) {
    node.attribute.retain(|a| !keys.contains(&a.name()));
}

fn find_affected(g: &GraphProto, from: i64) -> Option<String> {
    for n in &g.node {
        if op::is_standard_domain(n.domain()) && changed_at(n.op_type(), from).is_some() {
            return Some(label(n));
        }
        for sub in crate::ir::graph::subgraphs(n) {
            if let Some(s) = find_affected(sub, from) {
                return Some(s);
            }
        }
    }
    None
}

