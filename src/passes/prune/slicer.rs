//! Step 4 of `prune`: apply a plan to the graph, all or nothing.
//!
//! Every member of a group loses the planned channels on its axis: producers their filters
//! and bias entries, depthwise convs their filters (and their `group` attribute shrinks), BN
//! parameters and per-channel constants their entries, consumers the matching input slices
//! (at the segment's offset, `block` rows per channel after Flatten), and the values on the
//! way their value_info dims. [`Applied`] records what changed, for reconstruction.

use super::groups::{self, Group, Member};
use super::planner::Plan;
use crate::ir::op;
use crate::ir::{Graph, Patch};
use crate::onnx::proto::tensor_shape_proto::dimension::Value as DimValue;
use crate::onnx::proto::type_proto;
use crate::onnx::tensor;
use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, Axis};
use petgraph::stable_graph::NodeIndex;
use std::collections::BTreeMap;

/// Remove `idx` along `axis` of `a`.
fn drop_indices(a: &ArrayD<f32>, axis: usize, idx: &[usize]) -> Result<ArrayD<f32>> {
    let n = *a
        .shape()
        .get(axis)
        .with_context(|| format!("axis {axis} out of range for shape {:?}", a.shape()))?;
    if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
        bail!("channel {bad} out of range (axis {axis} has {n})");
    }
    let keep: Vec<usize> = (0..n).filter(|i| idx.binary_search(i).is_err()).collect();
    Ok(a.select(Axis(axis), &keep))
}

/// What apply changed, for reconstruction.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Consumer node -> (weight in-axis, removed indices on that axis, sorted).
    pub consumers: BTreeMap<NodeIndex, (usize, Vec<usize>)>,
    /// Node -> (weight out-axis, removed output channels), for nodes whose outputs shrank.
    pub producers: BTreeMap<NodeIndex, (usize, Vec<usize>)>,
}

/// `(node, input slot)` -> `[(axis, removed indices)]`.
type Cuts = BTreeMap<(NodeIndex, usize), Vec<(usize, Vec<usize>)>>;

/// Apply a plan to the graph (all or nothing).
pub fn apply(graph: &mut Graph, groups: &[Group], plan: &Plan) -> Result<Applied> {
    // (node, slot) -> [(axis, removed indices)]
    let mut cuts: Cuts = BTreeMap::new();
    let mut value_cuts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut depthwise = std::collections::BTreeSet::new();
    let mut applied = Applied::default();
    let mut add = |key: (NodeIndex, usize), axis: usize, idx: Vec<usize>| {
        let e = cuts.entry(key).or_default();
        match e.iter_mut().find(|(a, _)| *a == axis) {
            Some((_, v)) => v.extend(idx),
            None => e.push((axis, idx)),
        }
    };
    for g in groups {
        let r = &plan.remove[g.id];
        if r.is_empty() {
            continue;
        }
        if !g.prunable() {
            bail!(
                "internal: plan removes channels of unprunable group {}",
                g.id
            );
        }
        for m in &g.members {
            match m {
                Member::Producer {
                    node, axis, bias, ..
                } => {
                    add((*node, 1), *axis, r.clone());
                    if bias.is_some() {
                        add((*node, 2), 0, r.clone());
                    }
                    let e = applied.producers.entry(*node).or_insert((*axis, vec![]));
                    e.1.extend(r.iter().copied());
                }
                Member::Depthwise {
                    node, bias, offset, ..
                } => {
                    let idx: Vec<usize> = r.iter().map(|c| c + offset).collect();
                    add((*node, 1), 0, idx.clone());
                    if bias.is_some() {
                        add((*node, 2), 0, idx.clone());
                    }
                    depthwise.insert(*node);
                    let e = applied.producers.entry(*node).or_insert((0, vec![]));
                    e.1.extend(idx);
                }
                Member::Consumer {
                    node,
                    axis,
                    offset,
                    block,
                    ..
                } => {
                    let idx: Vec<usize> = r
                        .iter()
                        .flat_map(|c| ((c + offset) * block)..((c + offset + 1) * block))
                        .collect();
                    add((*node, 1), *axis, idx.clone());
                    let e = applied.consumers.entry(*node).or_insert((*axis, vec![]));
                    e.1.extend(idx);
                }
                Member::Param {
                    node,
                    slot,
                    axis,
                    offset,
                    block,
                    ..
                } => {
                    let idx: Vec<usize> = r
                        .iter()
                        .flat_map(|c| ((c + offset) * block)..((c + offset + 1) * block))
                        .collect();
                    add((*node, *slot), *axis, idx);
                }
                Member::Value {
                    name,
                    axis_from_end,
                    block,
                    ..
                } => {
                    let e = value_cuts
                        .entry(name.clone())
                        .or_insert((*axis_from_end, 0));
                    e.1 += r.len() * block;
                }
            }
        }
    }
    for v in applied
        .consumers
        .values_mut()
        .chain(applied.producers.values_mut())
    {
        v.1.sort_unstable();
        v.1.dedup();
    }
    let mut g2 = graph.clone();
    let mut new_inits = Vec::new();
    let mut node_edits: BTreeMap<NodeIndex, crate::onnx::proto::NodeProto> = BTreeMap::new();
    let mut replaced_names = Vec::new();
    for ((node, slot), axes) in &cuts {
        let proto = graph.node(*node);
        let name = proto
            .input
            .get(*slot)
            .with_context(|| format!("{} has no input {slot}", groups::label(graph, *node)))?;
        let t = graph
            .constant(name)
            .with_context(|| format!("'{name}' is not a constant"))?;
        let mut a = tensor::to_f32(t).with_context(|| format!("reading '{name}'"))?;
        for (axis, idx) in axes {
            let mut idx = idx.clone();
            idx.sort_unstable();
            idx.dedup();
            a = drop_indices(&a, *axis, &idx).with_context(|| {
                format!(
                    "slicing '{name}' (input {slot} of {})",
                    groups::label(graph, *node)
                )
            })?;
        }
        let sole = graph.consumers(name).len() == 1 && !graph.is_graph_output(name);
        let new_name = if sole {
            name.clone()
        } else {
            let n = g2.fresh_name(&format!("{name}_pruned"));
            replaced_names.push(name.clone());
            let edit = node_edits.entry(*node).or_insert_with(|| proto.clone());
            edit.input[*slot] = n.clone();
            n
        };
        // Reserve the name so later fresh names differ.
        g2.initializers
            .insert(new_name.clone(), tensor::from_f32(&new_name, &a));
        new_inits.push(tensor::from_f32(&new_name, &a));
    }
    for node in &depthwise {
        let channels = cuts
            .get(&(*node, 1))
            .and_then(|_| {
                new_inits.iter().find(|t| {
                    let n = node_edits
                        .get(node)
                        .map(|p| p.input[1].clone())
                        .unwrap_or_else(|| graph.node(*node).input[1].clone());
                    t.name() == n
                })
            })
            .and_then(|t| t.dims.first().copied())
            .context("depthwise weight was not sliced")?;
        let edit = node_edits
            .entry(*node)
            .or_insert_with(|| graph.node(*node).clone());
        op::set_attr(edit, op::attr_int("group", channels));
    }
    let mut out = graph.clone();
    out.apply(Patch {
        initializers: new_inits,
        ..Default::default()
    })?;
    for (ix, proto) in node_edits {
        out.replace_node(ix, proto)?;
    }
    for name in replaced_names {
        if out.consumers(&name).is_empty()
            && !out.is_graph_output(&name)
            && !out.is_graph_input(&name)
        {
            out.initializers.shift_remove(&name);
        }
    }
    // value_info: shrink the channel dim of every touched value.
    for vi in out.value_info.iter_mut() {
        let Some(&(from_end, removed)) = value_cuts.get(vi.name()) else {
            continue;
        };
        if let Some(type_proto::Value::TensorType(t)) =
            vi.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if let Some(shape) = t.shape.as_mut() {
                let rank = shape.dim.len();
                if rank > from_end {
                    let d = &mut shape.dim[rank - 1 - from_end];
                    match d.value {
                        Some(DimValue::DimValue(v)) if v as usize >= removed => {
                            d.value = Some(DimValue::DimValue(v - removed as i64))
                        }
                        _ => d.value = None,
                    }
                }
            }
        }
    }
    out.check().context("pruned graph is inconsistent")?;
    *graph = out;
    Ok(applied)
}
