//! Raising the default-domain opset without changing what any node computes, in stages: to 13
//! (per-channel DequantizeLinear: the `quantize` pass, int8 layers of `mixed-precision`), then
//! on to 21 (int4 DequantizeLinear and block-wise scales). [`upgrade`] runs the stages up to its
//! target; a stage the model already meets changes nothing and says nothing.
//!
//! Stage 13, converted (top-level graph):
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
//! Stage 13, refused with the node named: models below opset 7 (legacy broadcast /
//! `consumed_inputs` semantics), `Upsample`, `Scatter`, `Resize` < 11 (its coordinate mapping
//! changed), and any affected op inside a subgraph.
//!
//! Stage 21 (from 13 or later), converted: the other `Reduce*` ops' `axes` attribute becomes an
//! int64 input (changed at 18: `ReduceSum` already moved at 13), a `Split` with neither `split`
//! input nor `num_outputs` gets `num_outputs` = its output count (required from 18). Refused:
//! `GroupNormalization` (per-group scale/bias became per-channel at 21) and any affected op in
//! a subgraph. The IR version is raised to 10 (the first to know INT4).
//!
//! The stages stay separate (each a full sweep over the graph): fresh initializer names and
//! their order in the file come out as one stage after the other, whatever the target.

use crate::ir::facts::declared_rank;
use crate::ir::op::{self, Attrs};
use crate::ir::{Model, Patch};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::tensor;
use anyhow::{bail, ensure, Context, Result};
use ndarray::arr0;

/// Per-channel DequantizeLinear (`axis`) exists from opset 13.
pub const PER_CHANNEL: i64 = 13;
/// INT4 / UINT4 and block-wise DequantizeLinear (`block_size`) exist from opset 21.
pub const INT4: i64 = 21;

/// What a node needs when moving from `from` to opset 13 (stage 13): the first opset where its
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

/// Raise the model's default opset to `target` ([`PER_CHANNEL`] or [`INT4`]) through the stages
/// documented above; `input_shapes` fixes symbolic input dims for tract's shape analysis
/// (stage 13's Softmax ranks). Returns notes; nothing when the model is there already.
pub fn upgrade(
    model: &mut Model,
    target: i64,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Vec<String>> {
    ensure!(
        target == PER_CHANNEL || target == INT4,
        "internal: opset upgrade to {target} requested; only {PER_CHANNEL} and {INT4} are supported"
    );
    let mut notes = to_13(model, input_shapes)?;
    if target >= INT4 {
        notes.extend(to_21(model)?);
    }
    Ok(notes)
}

/// Stage 13.
fn to_13(model: &mut Model, input_shapes: &[(String, Vec<usize>)]) -> Result<Vec<String>> {
    const TARGET: i64 = PER_CHANNEL;
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

const REDUCE_AXES_TO_INPUT_AT_18: &[&str] = &[
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// Stage 21: raise an opset-13+ model to 21, converting or refusing the ops whose form or
/// semantics changed in between.
fn to_21(model: &mut Model) -> Result<Vec<String>> {
    let from = model.opset("").unwrap_or(1);
    if from >= INT4 {
        return Ok(vec![]);
    }
    let affected = |op_type: &str| {
        REDUCE_AXES_TO_INPUT_AT_18.contains(&op_type)
            || matches!(op_type, "Split" | "GroupNormalization")
    };
    let g = &mut model.graph;
    let mut converted = 0;
    for ix in g.topo_order()? {
        let n = g.node(ix).clone();
        for sub in crate::ir::graph::subgraphs(&n) {
            if sub.node.iter().any(|m| affected(m.op_type())) {
                bail!("int4 needs opset 21; node '{}' ({}) has a subgraph with ops whose form changed by opset 21 (Reduce*/Split/GroupNormalization); not converted", n.name(), n.op_type());
            }
        }
        if !op::is_standard_domain(n.domain()) || !affected(n.op_type()) {
            continue;
        }
        let mut node = n.clone();
        let mut inits = Vec::new();
        match n.op_type() {
            "GroupNormalization" => bail!(
                "int4 needs opset 21; node '{}' (GroupNormalization) changed semantics at opset 21 (per-group scale/bias): re-export the model at opset 21 or forbid int4",
                n.name()
            ),
            "Split" => {
                if n.input.get(1).is_none_or(|s| s.is_empty()) && n.attr("num_outputs").is_none() {
                    op::set_attr(&mut node, op::attr_int("num_outputs", n.output.len() as i64));
                }
            }
            _ => {
                if let Some(axes) = n.attr_ints("axes")? {
                    strip(&mut node, &["axes"]);
                    let name = g.fresh_name(&format!("{}_axes", n.name()));
                    inits.push(tensor::from_i64(&name, &[axes.len()], &axes));
                    node.input.truncate(1);
                    node.input.push(name);
                }
            }
        }
        if node != n {
            g.apply(Patch {
                remove: vec![ix],
                add: vec![node],
                initializers: inits,
                ..Default::default()
            })
            .with_context(|| {
                format!(
                    "converting node '{}' ({}) to opset 21",
                    n.name(),
                    n.op_type()
                )
            })?;
            converted += 1;
        }
    }
    model.require_opset("", INT4);
    if model.shell.ir_version.unwrap_or(0) < 10 {
        model.shell.ir_version = Some(10);
    }
    let mut notes = vec![format!(
        "raised the default opset from {from} to 21 and IR version to 10 (int4 DequantizeLinear)"
    )];
    if converted > 0 {
        notes.push(format!(
            "converted {converted} node(s) whose attributes became inputs by opset 21"
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Opset 11: ReduceMean and Squeeze with `axes` attributes, a Split without `split`.
    const OPSET_11: &str = r#"<ir_version: 6, opset_import: ["" : 11]>
g (float[1,4,4,4] x) => (float[1,2] y1, float[1,2] y2)
{
   [mean] r = ReduceMean <axes: ints = [2, 3], keepdims: int = 1> (x)
   [squeeze] s = Squeeze <axes: ints = [2, 3]> (r)
   [split] y1, y2 = Split <axis: int = 1> (s)
}"#;

    fn model() -> Model {
        Model::from_proto(crate::onnx::text::parse_model(OPSET_11).unwrap()).unwrap()
    }

    fn node<'a>(m: &'a Model, name: &str) -> &'a NodeProto {
        let ix = m
            .graph
            .node_indices()
            .find(|&ix| m.graph.node(ix).name() == name);
        m.graph.node(ix.unwrap())
    }

    #[test]
    fn upgrade_to_21_is_stage_13_then_stage_21() {
        let mut direct = model();
        let notes = upgrade(&mut direct, INT4, &[]).unwrap();
        let mut staged = model();
        let mut staged_notes = upgrade(&mut staged, PER_CHANNEL, &[]).unwrap();
        assert_eq!(staged.opset(""), Some(13));
        staged_notes.extend(upgrade(&mut staged, INT4, &[]).unwrap());
        assert_eq!(direct.to_proto().unwrap(), staged.to_proto().unwrap());
        assert_eq!(notes, staged_notes);

        assert_eq!(direct.opset(""), Some(21));
        assert_eq!(direct.shell.ir_version, Some(10));
        // Stage 13 moved Squeeze's axes to an input, stage 21 ReduceMean's.
        for name in ["squeeze", "mean"] {
            let n = node(&direct, name);
            assert_eq!(n.input.len(), 2, "{name}");
            assert!(n.attr("axes").is_none(), "{name}");
            let axes = direct.graph.constant(&n.input[1]).unwrap();
            assert_eq!(tensor::to_i64(axes).unwrap(), vec![2, 3], "{name}");
        }
        assert_eq!(
            node(&direct, "split").attr_int("num_outputs").unwrap(),
            Some(2)
        );
        assert!(notes.iter().any(|n| n.contains("from 11 to 13")));
        assert!(notes.iter().any(|n| n.contains("from 13 to 21")));

        // Already there: nothing changes, nothing is said.
        let before = direct.to_proto().unwrap();
        assert!(upgrade(&mut direct, INT4, &[]).unwrap().is_empty());
        assert_eq!(direct.to_proto().unwrap(), before);
    }

    #[test]
    fn only_the_staged_targets_are_accepted() {
        let mut m = model();
        let err = upgrade(&mut m, 17, &[]).unwrap_err().to_string();
        assert!(err.contains("17"), "{err}");
        assert_eq!(m.opset(""), Some(11));
    }
}
