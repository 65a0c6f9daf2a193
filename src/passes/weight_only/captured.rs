//! Weights used inside `If`/`Loop`/`Scan` bodies: stored int8 in the main graph, where every
//! body keeps reading them by name.
//!
//! ```text
//! before: graph (float[?,?] input, int64 sr) {          W_enc = initializer [128,129,3]
//!           out = If(sr == 16000)
//!             then { Wc = Constant <[64,128,3]>; h = Conv(input, W_enc); y = Conv(h, Wc) ... }
//!             else { ... }
//!         }
//! after:  graph (float[?,?] input, int64 sr) {
//!           W_enc = DequantizeLinear(W_enc_quantized, s[128], axis 0)
//!           Wc = DequantizeLinear(Wc_quantized, s[64], axis 0)     hoisted out of `then`
//!           out = If(sr == 16000)
//!             then { h = Conv(input, W_enc); y = Conv(h, Wc) ... }
//!             else { ... }
//!         }
//! ```
//! Candidates: float initializers of the main graph read only by subgraphs (no main-graph
//! node reads them), and float `Constant` nodes inside bodies (any depth), each of at least
//! [`super::MIN_ELEMENTS`] values. A candidate qualifies when, following it through layout ops
//! ([`LAYOUT`]: PyTorch writes an LSTM's gate reordering as Slice/Concat of its weight), every
//! use ends in a weight input of a [`super::RULES`] row the policy lists (Gather excepted: its
//! `also` condition reads the main graph); anything else (an `Add`, a body output) leaves it
//! float. A qualifying `Constant` moves to the main graph's initializers under its own name
//! (unique in the model, else it stays), which changes nothing a body computes: a constant is
//! the same in every branch and iteration.
//!
//! Scales: the rule's channel axis when a rule node reads the candidate itself, else axis 0
//! (the rows a layout op slices and concatenates: an LSTM weight `[4H, in]` gets one scale
//! per gate row); per-(channel, tap) for a Conv weight [`super::taps`] selects.
//!
//! Why here: nothing else in the pipeline looks inside bodies, so before this the three
//! silero-vad models whose compute sits in `If` branches left every weight float (99.9-100% of
//! their bytes). Activations inside bodies stay float, unless `quantize` gave a taken branch
//! its own Q/DQ (`--body-activations on`, [`crate::passes::quantize::bodies`]): that branch's
//! quantized weights are then body initializers behind their own DequantizeLinear, no longer
//! candidates here.
//!
//! Invariants: bodies are unchanged except for the hoisted `Constant`s; running twice equals
//! running once (a stored weight is a DequantizeLinear or Mul output, no longer a constant).

use super::{channel_axis, Rule, RULES};
use crate::ir::graph::subgraphs;
use crate::ir::op::node_label;
use crate::ir::{Graph, InSlot};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::tensor;
use anyhow::{Context, Result};
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};

/// Ops that move or regroup a weight's values without computing with them: a weight followed
/// through these (data input only, every input of Concat) keeps being a weight.
const LAYOUT: &[&str] = &[
    "Identity",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Slice",
    "Concat",
    "Split",
    "Flatten",
];

/// A weight to store: its channel axis, the node reading it (for the report), whether that
/// reader is a Conv reading it directly (per-tap scales may apply).
#[derive(Debug, Clone)]
pub struct Captured {
    pub axis: Option<usize>,
    pub node: String,
    pub conv: bool,
}

/// Every node of every body of `g`'s nodes, at any depth, and every body output name.
fn body_nodes(g: &Graph) -> (Vec<NodeProto>, HashSet<String>) {
    fn walk(b: &GraphProto, nodes: &mut Vec<NodeProto>, outputs: &mut HashSet<String>) {
        outputs.extend(b.output.iter().map(|o| o.name().to_string()));
        for n in &b.node {
            nodes.push(n.clone());
            for sub in subgraphs(n) {
                walk(sub, nodes, outputs);
            }
        }
    }
    let (mut nodes, mut outputs) = (Vec::new(), HashSet::new());
    for ix in g.node_indices() {
        for sub in subgraphs(g.node(ix)) {
            walk(sub, &mut nodes, &mut outputs);
        }
    }
    (nodes, outputs)
}

/// The float `value` of a `Constant` node, when it has one.
fn constant_value(n: &NodeProto) -> Option<&TensorProto> {
    if n.op_type() != "Constant" || n.attribute.len() != 1 {
        return None;
    }
    let a = &n.attribute[0];
    (a.name() == "value")
        .then_some(a.t.as_ref())
        .flatten()
        .filter(|t| tensor::data_type(t).ok() == Some(DataType::Float))
}

/// Whether `t` is a finite float tensor worth storing as int8.
fn big_finite(t: &TensorProto) -> bool {
    tensor::to_f32(t)
        .is_ok_and(|a| a.len() >= super::MIN_ELEMENTS && a.iter().all(|v| v.is_finite()))
}

/// Follow `name` through layout ops inside the bodies: `Some(direct readers)` (rule rows
/// reading `name` itself, with their rule) when every use ends in a rule's weight input,
/// `None` when any use does something else.
fn follow<'a>(
    name: &str,
    readers: &HashMap<&str, Vec<(&'a NodeProto, usize)>>,
    body_outputs: &HashSet<String>,
    rule_ok: &dyn Fn(&str) -> bool,
) -> Option<Vec<(&'a NodeProto, &'static Rule)>> {
    let mut direct = Vec::new();
    let mut reached = false;
    let mut stack = vec![name.to_string()];
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.clone()) {
            continue;
        }
        if body_outputs.contains(&v) {
            return None;
        }
        for &(n, k) in readers.get(v.as_str()).map(|r| r.as_slice()).unwrap_or(&[]) {
            let op = n.op_type();
            let rule = RULES
                .iter()
                .find(|r| r.op == op && r.input == k && r.also.is_none() && rule_ok(op));
            if let Some(rule) = rule {
                reached = true;
                if v == name {
                    direct.push((n, rule));
                }
            } else if LAYOUT.contains(&op) && (k == 0 || op == "Concat") {
                stack.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
            } else {
                return None;
            }
        }
    }
    reached.then_some(direct)
}

/// Hoist the qualifying body `Constant`s into `g`'s initializers and return every weight to
/// store (captured initializers and hoisted constants), in a stable order.
pub fn prepare(
    g: &mut Graph,
    rule_ok: &dyn Fn(&str) -> bool,
    notes: &mut Vec<String>,
) -> Result<IndexMap<String, Captured>> {
    if !g
        .node_indices()
        .any(|ix| subgraphs(g.node(ix)).next().is_some())
    {
        return Ok(IndexMap::new());
    }
    let (nodes, body_outputs) = body_nodes(g);
    let mut readers: HashMap<&str, Vec<(&NodeProto, usize)>> = HashMap::new();
    let mut defined: HashMap<&str, usize> = HashMap::new();
    for n in &nodes {
        for (k, i) in n.input.iter().enumerate().filter(|(_, i)| !i.is_empty()) {
            readers.entry(i.as_str()).or_default().push((n, k));
        }
        for o in &n.output {
            *defined.entry(o.as_str()).or_default() += 1;
        }
    }
    let main_names: HashSet<String> = g.all_names().into_iter().map(String::from).collect();
    let mut chosen: IndexMap<String, Captured> = IndexMap::new();
    let describe = |w: &str, direct: &[(&NodeProto, &'static Rule)], shape: &[usize]| {
        let (axis, node, conv) = match direct.first() {
            Some((n, rule)) => (
                channel_axis(rule, n, shape).ok().flatten(),
                node_label(n).to_string(),
                n.op_type() == "Conv",
            ),
            None => {
                let per_row =
                    shape.iter().product::<usize>() / shape.first().copied().unwrap_or(1).max(1);
                (
                    (shape.len() >= 2 && per_row >= super::MIN_PER_CHANNEL).then_some(0),
                    format!("layout ops on '{w}' inside a body"),
                    false,
                )
            }
        };
        // Readers of the same weight asking for different axes: the first one's (axis 0 for
        // every Conv, which is the only rule a shared body weight has in practice).
        Captured { axis, node, conv }
    };
    // 1. Main-graph initializers read only by bodies.
    let captured: Vec<String> = g
        .initializers
        .keys()
        .filter(|w| {
            let c = g.consumers(w);
            !c.is_empty()
                && c.iter().all(|&(_, s)| s == InSlot::Capture)
                && !g.is_graph_output(w)
                && g.constant(w).is_some_and(|t| {
                    tensor::data_type(t).ok() == Some(DataType::Float) && big_finite(t)
                })
        })
        .cloned()
        .collect();
    for w in captured {
        if let Some(direct) = follow(&w, &readers, &body_outputs, rule_ok) {
            let shape = tensor::shape(g.constant(&w).context("checked constant")?)?;
            chosen.insert(w.clone(), describe(&w, &direct, &shape));
        }
    }
    // 2. Body constants, hoisted.
    let mut hoist: IndexMap<String, TensorProto> = IndexMap::new();
    for n in &nodes {
        let Some(t) = constant_value(n) else { continue };
        let Some(name) = n.output.first() else {
            continue;
        };
        if main_names.contains(name) || defined.get(name.as_str()) != Some(&1) || !big_finite(t) {
            continue;
        }
        if let Some(direct) = follow(name, &readers, &body_outputs, rule_ok) {
            let shape = tensor::shape(t)?;
            chosen.insert(name.clone(), describe(name, &direct, &shape));
            let mut t = t.clone();
            t.name = Some(name.clone());
            hoist.insert(name.clone(), t);
        }
    }
    if !hoist.is_empty() {
        // Each holder's initializers go in together with its new body, so the graph is
        // consistent after every step; on an error nothing is left half-done.
        let backup = g.clone();
        let holders: Vec<_> = g
            .node_indices()
            .filter(|&ix| subgraphs(g.node(ix)).next().is_some())
            .collect();
        for ix in holders {
            let mut inside = Vec::new();
            for sub in subgraphs(g.node(ix)) {
                constants_in(sub, &hoist, &mut inside);
            }
            if inside.is_empty() {
                continue;
            }
            let names: HashSet<String> = inside.iter().cloned().collect();
            let mut proto = g.node(ix).clone();
            for a in proto.attribute.iter_mut() {
                for b in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                    drop_constants(b, &names);
                }
            }
            for name in &inside {
                g.initializers.insert(name.clone(), hoist[name].clone());
            }
            let label = node_label(g.node(ix)).to_string();
            if let Err(e) = g.replace_node(ix, proto) {
                *g = backup;
                return Err(e)
                    .with_context(|| format!("hoisting weight constants out of node '{label}'"));
            }
        }
        notes.push(format!(
            "{} weight Constant(s) moved out of If/Loop/Scan bodies into the main graph's initializers (same names), to be stored int8",
            hoist.len()
        ));
    }
    Ok(chosen)
}

/// Names of the constants of `hoist` that body `b` (or its own bodies) defines.
fn constants_in(b: &GraphProto, hoist: &IndexMap<String, TensorProto>, out: &mut Vec<String>) {
    for n in &b.node {
        if n.op_type() == "Constant" {
            out.extend(n.output.iter().filter(|o| hoist.contains_key(*o)).cloned());
        }
        for sub in subgraphs(n) {
            constants_in(sub, hoist, out);
        }
    }
}

/// Remove the `Constant` nodes producing `names` from body `b` and its own bodies.
fn drop_constants(b: &mut GraphProto, names: &HashSet<String>) {
    b.node.retain(|n| {
        !(n.op_type() == "Constant" && n.output.first().is_some_and(|o| names.contains(o)))
    });
    for n in b.node.iter_mut() {
        for a in n.attribute.iter_mut() {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                drop_constants(sub, names);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Model;
    use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto};
    use ndarray::{ArrayD, Dimension};

    fn values(shape: &[usize], seed: usize) -> ArrayD<f32> {
        ArrayD::from_shape_fn(shape.to_vec(), |ix| {
            let k = ix.slice().iter().fold(seed, |a, &i| a * 31 + i);
            ((k * 2654435761) % 1000) as f32 / 1000.0 - 0.5
        })
    }

    /// then: `a = Add(Conv(x, W), M)`, `ty = Conv(a, Wc)` with `Wc` a Constant in the body;
    /// else: `ey = Conv(x, Concat(Wa, Wb))`. `M` is read by an Add: it stays float.
    fn if_model() -> Model {
        let mut m = crate::onnx::text::parse_model(
            r#"<ir_version: 8, opset_import: ["" : 17]>
            g (float[1,8,9] x, bool c) => (float[1,32,8] y) {
              y = If (c) <
                then_branch = g1 () => (float[1,32,8] ty) {
                  t1 = Conv (x, W)
                  a = Add (t1, M)
                  ty = Conv (a, Wc)
                },
                else_branch = g2 () => (float[1,32,8] ey) {
                  k = Concat <axis = 0> (Wa, Wb)
                  ey = Conv (x, k)
                }
              >
            }"#,
        )
        .unwrap();
        let g = m.graph.as_mut().unwrap();
        for (name, shape, seed) in [
            ("W", vec![32, 8, 2], 1),
            ("Wa", vec![16, 8, 2], 2),
            ("Wb", vec![16, 8, 2], 3),
            ("M", vec![1, 32, 8], 4),
        ] {
            g.initializer
                .push(tensor::from_f32(name, &values(&shape, seed)));
        }
        let then = g.node[0].attribute[0].g.as_mut().unwrap();
        let mut wc = crate::ir::op::node("Constant", "wc", &[], &["Wc"]);
        wc.attribute.push(AttributeProto {
            name: Some("value".into()),
            r#type: Some(AttributeType::Tensor as i32),
            t: Some(tensor::from_f32("Wc", &values(&[32, 32, 1], 5))),
            ..Default::default()
        });
        then.node.insert(0, wc);
        Model::from_proto(m).unwrap()
    }

    #[test]
    fn weights_used_in_bodies_are_found_through_layout_ops_and_constants_hoisted() {
        let mut m = if_model();
        let mut notes = Vec::new();
        let chosen = prepare(&mut m.graph, &|_| true, &mut notes).unwrap();
        let names: Vec<&str> = chosen.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["W", "Wa", "Wb", "Wc"], "M is read by an Add");
        assert!(chosen["W"].conv && chosen["Wc"].conv);
        assert_eq!(chosen["Wa"].axis, Some(0));
        assert!(!chosen["Wa"].conv, "read through a Concat");
        // Wc moved to the main graph; the body reads it by name.
        assert!(m.graph.constant("Wc").is_some());
        let holder = m.graph.node_indices().next().unwrap();
        let then = m.graph.node(holder).attribute[0].g.as_ref().unwrap();
        assert!(then.node.iter().all(|n| n.op_type() != "Constant"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        // Idempotent: a second look hoists nothing more and finds the same weights.
        let again = prepare(&mut m.graph, &|_| true, &mut notes).unwrap();
        assert_eq!(
            again.keys().collect::<Vec<_>>(),
            chosen.keys().collect::<Vec<_>>()
        );
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn weight_only_stores_body_weights_int8_in_the_main_graph() {
        let mut m = if_model();
        let policy = crate::passes::target::Target::Generic.policy();
        let stats = super::super::weight_only(&mut m, policy, &Default::default(), false).unwrap();
        assert_eq!(stats.changes, 4, "{:?}", stats.notes);
        for w in ["W", "Wa", "Wb", "Wc"] {
            let p = m.graph.producer_node(w).expect(w);
            assert_eq!(m.graph.node(p).op_type(), "DequantizeLinear", "{w}");
        }
        assert!(
            m.graph.constant("M").is_some(),
            "M stays a float initializer"
        );
        // Once stored, nothing is left to do.
        let again = super::super::weight_only(&mut m, policy, &Default::default(), false).unwrap();
        assert_eq!(again.changes, 0);
    }
}
