//! `cleanup`: remove what computes nothing and precompute what is constant.
//!
//! Rules (each a local rewrite, driven to a fixpoint), then two whole-graph steps:
//!
//! | rule | before | after |
//! |---|---|---|
//! | `identity` | `y = Identity(x)` | readers of `y` read `x` |
//! | `dropout` | `y = Dropout(x, ratio)` (inference, mask unused) | readers of `y` read `x` |
//! | `dead-node` | `t = Relu(x)`, `t` read by nothing | (gone) |
//! | `constant-fold` | `s = Shape(x)` with `x: float[1,3,8,8]` | initializer `s = [1,3,8,8]` |
//! | `matmul-add-to-gemm` | `t = MatMul(x, W)`, `y = Add(t, b)` | `y = Gemm(x, W, b)` |
//! | dedup initializers | `w1`, `w2` with equal type, dims and bytes | readers of `w2` read `w1` |
//! | unused initializers | initializer read by nothing | (gone) |
//! | exporter stack traces | node `metadata_props` `pkg.torch.onnx.stack_trace` (any depth) | (gone) |
//!
//! Conditions:
//! - Identity/Dropout: when `y` is a graph output, `x` must be a plain node output (then the
//!   producer is renamed to produce `y`, keeping the output name); an Identity from a graph
//!   input or initializer straight to a graph output stays. Dropout must be in inference mode:
//!   `training_mode` absent or constant false (opset >= 12), `is_test` not 0 (opset < 7), and
//!   its mask output absent or unused.
//! - Dead nodes: standard-domain nodes (subgraph holders included) with at least one output
//!   and none read by a node, a subgraph or a graph output. Custom-domain nodes stay.
//! - Constant folding: see [`crate::passes::constant_fold`] (Constant, Shape of a statically
//!   shaped value, Gather/Unsqueeze/Squeeze/Concat/Reshape/Cast/Add/Mul/Sub/Div on constant
//!   float/int tensors of at most [`constant_fold::MAX_FOLD_ELEMENTS`] elements); outputs that
//!   are graph outputs are not folded.
//! - MatMul+Add → Gemm: `W` constant 2-D `[K, N]`, `b` constant `[N]` or `[1, N]` of the same
//!   float type, `x` known to be 2-D (declared shape, or produced by Flatten/Gemm), the MatMul
//!   output read only by the Add and not a graph output.
//! - Duplicate initializers: not graph inputs (overridable) and not graph outputs; the first
//!   in initializer order is kept.
//!
//! - Exporter stack traces: the Python source lines PyTorch's dynamo exporter records on every
//!   node (`pkg.torch.onnx.stack_trace`), a debugging aid no runtime reads; silero-vad's
//!   `op18_ifless` carries 608 KB of them, 21% of its file. The other metadata (namespace,
//!   class hierarchy, names) stays.
//!
//! Invariants: running twice equals running once (the rules run to a fixpoint, and the
//! whole-graph steps enable no rule). Graph input and output names are unchanged. Numerics are
//! exact except MatMul+Add → Gemm, which lets the runtime fuse the bias add. `changes` counts
//! applied patches plus deduplicated and removed initializers.

use crate::ir::facts::static_rank;
use crate::ir::op::{self, Attrs};
use crate::ir::{Graph, InSlot, Model, Patch};
use crate::onnx::proto::TensorProto;
use crate::onnx::tensor;
use crate::passes::constant_fold;
use crate::passes::rewrite::{rewrite, Rule};
use crate::passes::{Pass, PassContext, PassStats};
use anyhow::Result;
use petgraph::stable_graph::NodeIndex;
use prost::Message;
use std::collections::HashMap;

pub struct Cleanup;

impl Pass for Cleanup {
    fn name(&self) -> &'static str {
        "cleanup"
    }

    fn summary(&self) -> &'static str {
        "remove Identity/Dropout/dead nodes/unused and duplicate initializers; fold constants"
    }

    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        let graph = &mut model.graph;
        let rules: [(&'static str, Rule); 5] = [
            ("identity", rule_identity),
            ("dropout", rule_dropout),
            ("dead-node", rule_dead_node),
            ("constant-fold", constant_fold::rule_constant_fold),
            ("matmul-add-to-gemm", rule_matmul_add_to_gemm),
        ];
        let mut counts = rewrite(graph, &rules, ctx.max_patches)?;
        let deduped = dedup_initializers(graph)?;
        let removed = graph.remove_unused_initializers();
        counts.push(("duplicate-initializer", deduped));
        counts.push(("unused-initializer", removed));
        let (traces, trace_bytes) = drop_stack_traces(graph)?;
        let mut notes = vec![];
        if traces > 0 {
            // Only when present: reports of models without traces keep their keys.
            counts.push(("exporter-stack-trace", traces));
            notes.push(format!(
                "dropped the PyTorch exporter's stack traces (metadata 'pkg.torch.onnx.stack_trace') of {traces} node(s), {:.0} KB of debugging text no runtime reads",
                trace_bytes as f64 / 1024.0
            ));
        }
        let changes = counts.iter().map(|(_, c)| c).sum();
        let details: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(name, c)| (name.to_string(), (*c).into()))
            .collect();
        Ok(PassStats {
            changes,
            notes,
            details: serde_json::Value::Object(details),
            ..Default::default()
        })
    }
}

/// The metadata key under which PyTorch's dynamo exporter stores each node's Python stack.
const STACK_TRACE_KEY: &str = "pkg.torch.onnx.stack_trace";

/// Remove [`STACK_TRACE_KEY`] entries from every node, subgraph bodies included; returns the
/// nodes changed and the bytes of text dropped.
fn drop_stack_traces(graph: &mut Graph) -> Result<(usize, usize)> {
    fn strip(n: &mut crate::onnx::proto::NodeProto, count: &mut usize, bytes: &mut usize) {
        let before = n.metadata_props.len();
        n.metadata_props.retain(|p| {
            let drop = p.key() == STACK_TRACE_KEY;
            if drop {
                *bytes += p.value().len();
            }
            !drop
        });
        *count += usize::from(n.metadata_props.len() != before);
        for a in n.attribute.iter_mut() {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                for m in g.node.iter_mut() {
                    strip(m, count, bytes);
                }
            }
        }
    }
    let (mut count, mut bytes) = (0, 0);
    let indices: Vec<NodeIndex> = graph.node_indices().collect();
    for ix in indices {
        let mut proto = graph.node(ix).clone();
        let was = count;
        strip(&mut proto, &mut count, &mut bytes);
        if count != was {
            graph.replace_node(ix, proto)?;
        }
    }
    Ok((count, bytes))
}

/// Whether readers of `y` can be moved to `x` and the node between them dropped: a graph
/// output `y` needs `x` to be a plain node output that the producer can be renamed from.
fn bypassable(graph: &Graph, x: &str, y: &str) -> bool {
    if x.is_empty() || y.is_empty() || x == y {
        return false;
    }
    if !graph.is_graph_output(y) {
        return true;
    }
    graph.producer(x).is_some() && !graph.is_graph_output(x)
}

fn bypass(ix: NodeIndex, x: &str, y: &str) -> Patch {
    Patch {
        remove: vec![ix],
        shunts: vec![(y.to_string(), x.to_string())],
        ..Default::default()
    }
}

/// Identity(x) = x.
fn rule_identity(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let n = graph.node(ix);
    if n.op_type() != "Identity"
        || !op::is_standard_domain(n.domain())
        || n.input.len() != 1
        || n.output.len() != 1
    {
        return Ok(None);
    }
    let (x, y) = (&n.input[0], &n.output[0]);
    Ok(bypassable(graph, x, y).then(|| bypass(ix, x, y)))
}

/// Dropout(x) = x in inference mode.
fn rule_dropout(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let n = graph.node(ix);
    if n.op_type() != "Dropout" || !op::is_standard_domain(n.domain()) || n.output.is_empty() {
        return Ok(None);
    }
    if n.output[1..]
        .iter()
        .any(|m| !m.is_empty() && graph.use_count(m) > 0)
    {
        return Ok(None);
    }
    if n.attr_int("is_test")? == Some(0) {
        return Ok(None);
    }
    if let Some(tm) = n.input.get(2).filter(|s| !s.is_empty()) {
        let Some(t) = graph.constant(tm) else {
            return Ok(None);
        };
        if tensor::to_f64(t)?.iter().any(|&v| v != 0.0) {
            return Ok(None);
        }
    }
    let (x, y) = (&n.input[0], &n.output[0]);
    Ok(bypassable(graph, x, y).then(|| bypass(ix, x, y)))
}

/// A node none of whose outputs is read computes nothing observable.
fn rule_dead_node(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let n = graph.node(ix);
    if !op::is_standard_domain(n.domain()) || n.output.iter().all(|o| o.is_empty()) {
        return Ok(None);
    }
    if n.output
        .iter()
        .any(|o| !o.is_empty() && graph.use_count(o) > 0)
    {
        return Ok(None);
    }
    Ok(Some(Patch {
        remove: vec![ix],
        ..Default::default()
    }))
}

/// Add(MatMul(x, W), b) = Gemm(x, W, b) for 2-D x, W and 1-D b.
fn rule_matmul_add_to_gemm(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let add = graph.node(ix);
    if add.op_type() != "Add" || !op::is_standard_domain(add.domain()) || add.input.len() != 2 {
        return Ok(None);
    }
    for (mm_slot, b_slot) in [(0, 1), (1, 0)] {
        let t = &add.input[mm_slot];
        let b = &add.input[b_slot];
        let Some((m, 0)) = graph.producer(t) else {
            continue;
        };
        let mm = graph.node(m);
        if mm.op_type() != "MatMul" || !op::is_standard_domain(mm.domain()) {
            continue;
        }
        // The Add must read the MatMul output once (not Add(t, t)) and be its only reader.
        if !matches!(graph.consumers(t), [(r, InSlot::Arg(_))] if *r == ix)
            || graph.is_graph_output(t)
        {
            continue;
        }
        let (Some(w), Some(bias)) = (graph.constant(&mm.input[1]), graph.constant(b)) else {
            continue;
        };
        let dt = tensor::data_type(w)?;
        if tensor::data_type(bias)? != dt
            || !matches!(
                dt,
                crate::onnx::proto::tensor_proto::DataType::Float
                    | crate::onnx::proto::tensor_proto::DataType::Float16
                    | crate::onnx::proto::tensor_proto::DataType::Double
            )
            || w.dims.len() != 2
        {
            continue;
        }
        let n = w.dims[1];
        let bias_ok = bias.dims == [n] || bias.dims == [1, n];
        if !bias_ok || static_rank(graph, &mm.input[0]) != Some(2) {
            continue;
        }
        let name = if mm.name().is_empty() {
            graph.fresh_name(&format!("Gemm_{}", add.output[0]))
        } else {
            mm.name().to_string()
        };
        let mut gemm = op::node(
            "Gemm",
            &name,
            &[&mm.input[0], &mm.input[1], b],
            &[&add.output[0]],
        );
        gemm.doc_string = mm.doc_string.clone();
        gemm.metadata_props = mm.metadata_props.clone();
        return Ok(Some(Patch {
            add: vec![gemm],
            remove: vec![m, ix],
            anchor: Some(m),
            ..Default::default()
        }));
    }
    Ok(None)
}

/// Make initializers with equal element type, dims and payload one; returns how many were
/// redirected. Overridable (graph input) and graph-output initializers are left alone.
fn dedup_initializers(graph: &mut Graph) -> Result<usize> {
    // Bucket by cheap properties first, compare full encodings only within a bucket.
    let mut buckets: HashMap<(i32, Vec<i64>, usize), Vec<String>> = HashMap::new();
    for (name, t) in &graph.initializers {
        if graph.is_graph_input(name) || graph.is_graph_output(name) || tensor::is_external(t) {
            continue;
        }
        let len = t.encoded_len() - t.name.as_ref().map_or(0, |n| n.len());
        buckets
            .entry((t.data_type(), t.dims.clone(), len))
            .or_default()
            .push(name.clone());
    }
    let mut groups: Vec<Vec<String>> = buckets.into_values().filter(|v| v.len() > 1).collect();
    let order: HashMap<&String, usize> = graph
        .initializers
        .keys()
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    for g in &mut groups {
        g.sort_by_key(|n| order[n]);
    }
    groups.sort_by_key(|g| order[&g[0]]);
    let mut shunts = Vec::new();
    for group in groups {
        // Compared field by field, not by encoding: a clone shares the payload (`Bytes`), so
        // a bucket of large same-shaped weights is not copied, and unequal payloads usually
        // differ in their first bytes.
        let mut seen: Vec<(TensorProto, String)> = Vec::new();
        for name in group {
            let mut t = graph.initializers[&name].clone();
            t.name = None;
            t.doc_string = None;
            match seen.iter().find(|(k, _)| *k == t) {
                Some((_, keep)) => shunts.push((name, keep.clone())),
                None => seen.push((t, name)),
            }
        }
    }
    let count = shunts.len();
    if count > 0 {
        graph.apply(Patch {
            shunts,
            ..Default::default()
        })?;
    }
    Ok(count)
}
