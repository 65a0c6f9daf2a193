//! Activation Q/DQ inside the `If` branches the calibration data takes, with the main graph's
//! placement rules, ranges observed on the copy specialized to that data.
//!
//! ```text
//! before: graph (float[?,?] input, float[2,?,128] state, int64 sr) {
//!           out = If(sr == 16000)
//!             then { Wc = Constant <[128,129,3]>; h = Conv(input', Wc, Bc); r = Relu(h) ... }
//!             else { ...8 kHz net... }
//!         }
//! after:  graph (float[?,?] input, float[2,?,128] state, int64 sr) {
//!           out = If(sr == 16000)
//!             then { initializers: Wc_int8, s_w[128], Bc_int32, s_a, zp_a, ...
//!                    x_q = QuantizeLinear(input', s_x, zp_x); x_dq = DequantizeLinear(x_q, ...)
//!                    Wc = DequantizeLinear(Wc_int8, s_w, axis 0); Bc = DequantizeLinear(Bc_int32, ...)
//!                    r_f = Relu(Conv(x_dq, Wc, Bc)); r = DequantizeLinear(QuantizeLinear(r_f)) ... }
//!             else { ...8 kHz net, float activations (weights: weight-only, main graph)... }
//!         }
//! ```
//! Steps, per branch the calibration data takes (found in the specialized copy of
//! [`super::specialized`], [`specialized::inlined_branches`], nested `If`s followed):
//! 1. the body becomes a [`Graph`] of its own (outer names visible); the `Constant`s it feeds to
//!    a Conv/ConvTranspose/Gemm/MatMul weight or bias input are seen as initializers, and so
//!    are the float initializers of the enclosing graph that this body alone reads
//!    (silero_vad_op18_ifless keeps its branch weights in the main graph);
//! 2. [`placement`] marks it with the options of the main graph. Left float: layers whose weight
//!    one scale per channel serves badly (weight-only's per-tap scales, as in the main graph),
//!    layers whose weight is an enclosing graph's constant that others read too (weight-only
//!    stores it there; a DequantizeLinear inside the body would need a second copy), and tensors
//!    the copy does not hold (folded to constants, or a name the check of `inlined_branches`
//!    rejected);
//! 3. the marked tensors are observed on the copy under their copy names (one tract run per
//!    branch; `--method auto` takes its fixed fallback here: its scoring runs the model as
//!    given), each sharing group takes the union of its ranges, and [`super::keep_quiet_float`]
//!    applies as in the main graph;
//! 4. the used `Constant`s become body initializers (the used enclosing initializers move into
//!    the body and leave the enclosing graph) and [`insert`] adds the weight, activation
//!    and bias Q/DQ inside the body, so ONNX Runtime's QDQ fusion sees the whole unit in one
//!    graph. A value of an enclosing graph read by a quantized layer gets its Q/DQ inside the
//!    body (its producer is not in the body; other readers are not touched).
//!
//! Branches no calibration feed takes (silero-vad's 8 kHz branch), and `Loop`/`Scan` bodies (the
//! copy does not unroll them), keep float activations; weight-only stores their weights int8 as
//! before. The note and `details.bodies` name every body and why.
//!
//! Names: every name added here avoids every name of the model, in all scopes
//! ([`insert::Namer::avoiding`]); [`check_new_names`] then checks that each is defined exactly
//! once in the whole model, so no body value shadows or collides with another scope's.
//!
//! Off by default (`QuantizeOptions::body_activations`, `--body-activations on`): on
//! silero_vad_op18_ifless it costs 0.19 point of speech F1 (0.9960 -> 0.9941: a 0.59-point drop
//! against fp32, past the issue's 0.5-point bar; its LSTM is Gemms), on silero_vad.onnx 0.06
//! point with no change in ONNX Runtime time. (op18 runs faster with it, 1.48x instead of
//! 1.80x fp32's time, because its branch weights then sit in the body where ORT fuses them;
//! both layouts pay for DequantizeLinears of weights run at every inference: BENCHMARKS.md,
//! silero section.)
//!
//! Invariants: models without an `If` whose body holds a heavy op never reach this code (their
//! outputs are unchanged); running twice equals running once (the pass leaves a model that
//! holds Q/DQ alone); bodies not taken by the data are not touched.

use super::materialize::{self, ActivationRanges};
use super::placement::{self, NodeSelection};
use super::{insert, specialized, QuantizeOptions, QuietTensor};
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::observe::{observe_model, Method, ObserveOptions, Observed};
use crate::ir::graph::subgraphs;
use crate::ir::op::node_label;
use crate::ir::{Graph, Model, Patch, Source};
use crate::onnx::proto::{GraphProto, ModelProto};
use crate::passes::PassStats;
use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use serde_json::json;
use std::collections::{HashMap, HashSet};

/// The ops that make a body worth quantizing (the int8 kernels).
const HEAVY: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];

fn holds_heavy(b: &GraphProto) -> bool {
    b.node
        .iter()
        .any(|n| HEAVY.contains(&n.op_type()) || subgraphs(n).any(holds_heavy))
}

/// Whether a node of `g` holds a body (If/Loop/Scan).
pub fn has_bodies(g: &Graph) -> bool {
    g.node_indices()
        .any(|ix| subgraphs(g.node(ix)).next().is_some())
}

/// Whether a node of `g` holds a body (any depth) with a Conv/ConvTranspose/Gemm/MatMul.
pub fn has_heavy_bodies(g: &Graph) -> bool {
    g.node_indices()
        .any(|ix| subgraphs(g.node(ix)).any(holds_heavy))
}

/// The note of a run that leaves activations inside bodies float (`body_activations` off).
pub const LEFT_FLOAT: &str = "activations inside If/Loop/Scan bodies left float (the default; --body-activations on gives the branches the calibration data takes activation Q/DQ); weight-only stores their weights int8";

/// What happened to one body, for the note and `details.bodies`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BodyRecord {
    pub body: String,
    pub activation_pairs: usize,
    pub weights: usize,
    pub biases: usize,
    /// Why the body's activations stay float (None when it got Q/DQ).
    pub float_because: Option<String>,
    /// Layers of a quantized body left float, with the reason.
    pub layers_left_float: Vec<String>,
    pub kept_float_quiet: Vec<QuietTensor>,
}

impl BodyRecord {
    fn float(body: String, why: impl Into<String>) -> BodyRecord {
        BodyRecord {
            body,
            activation_pairs: 0,
            weights: 0,
            biases: 0,
            float_because: Some(why.into()),
            layers_left_float: Vec::new(),
            kept_float_quiet: Vec::new(),
        }
    }
}

struct Stage<'a> {
    opts: &'a QuantizeOptions,
    copy: &'a specialized::ForObservation,
    branches: Vec<specialized::InlinedBranch>,
    /// Values of the copy a run can observe (node outputs, graph inputs).
    copy_values: HashSet<String>,
    /// Values of the original main graph (they keep their names in the copy).
    main_values: HashSet<String>,
    namer: insert::Namer,
    records: Vec<BodyRecord>,
    shapes: Option<HashMap<String, Vec<usize>>>,
}

/// Quantize the activations inside the `If` branches the calibration data takes (module docs).
/// `original` is the model before the `quantize` pass (what the copy is specialized from).
pub fn quantize(
    model: &mut Model,
    original: &ModelProto,
    opts: &QuantizeOptions,
    calibration: Option<&CalibrationSet>,
    stats: &mut PassStats,
) -> Result<()> {
    if !opts.body_activations {
        stats.notes.push(LEFT_FLOAT.into());
        return Ok(());
    }
    if original.ir_version() < 4 {
        // Below IR 4 an initializer must also be a graph input, which an If body cannot have.
        stats.notes.push(
            "activations inside If bodies left float: IR version below 4 (a body cannot hold the int8 weights as initializers)".into(),
        );
        return Ok(());
    }
    let calib =
        CalibrationSet::given_or_synthetic(calibration, model, opts.synthetic_samples, opts.seed)?;
    let calib = &*calib;
    let copy = match specialized::for_observation(original, calib) {
        Ok(s) => s,
        Err(e) => {
            stats.notes.push(format!(
                "activations inside If bodies stay float: no copy of the model specialized to the calibration data ({e:#})"
            ));
            return Ok(());
        }
    };
    let branches = specialized::inlined_branches(original, &copy.proto);
    if !branches.is_empty() {
        // Per-channel DequantizeLinear needs opset 13 (a no-op when the main graph's
        // quantization raised it already).
        stats.notes.extend(super::opset::upgrade(
            model,
            super::opset::PER_CHANNEL,
            &opts.input_shapes,
        )?);
    }
    let mut copy_values = HashSet::new();
    if let Some(g) = &copy.proto.graph {
        copy_values.extend(g.input.iter().map(|v| v.name().to_string()));
        copy_values.extend(g.node.iter().flat_map(|n| n.output.iter().cloned()));
    }
    let before = model_names(&model.graph);
    let mut stage = Stage {
        opts,
        copy: &copy,
        branches,
        copy_values,
        main_values: specialized::main_graph_names(original),
        namer: insert::Namer::avoiding(opts.naming, before.clone()),
        records: Vec::new(),
        shapes: None,
    };
    let outer_constants: HashSet<String> = model.graph.initializers.keys().cloned().collect();
    walk(
        &mut model.graph,
        &[],
        "",
        &HashMap::new(),
        &outer_constants,
        &mut stage,
    )?;
    check_new_names(&model.graph, &before)?;

    let records = stage.records;
    let quantized: Vec<&BodyRecord> = records
        .iter()
        .filter(|r| r.float_because.is_none())
        .collect();
    if !quantized.is_empty() {
        // The main graph's "nothing matched" note no longer holds.
        stats
            .notes
            .retain(|n| n != "no node matched a quantization rule; model unchanged");
        stats.changes += quantized
            .iter()
            .map(|r| r.activation_pairs + r.weights + r.biases)
            .sum::<usize>();
    }
    let mut parts: Vec<String> = quantized
        .iter()
        .map(|r| {
            format!(
                "{}: {} activation Q/DQ pair(s), {} weight(s), {} bias(es){}{}",
                r.body,
                r.activation_pairs,
                r.weights,
                r.biases,
                if r.kept_float_quiet.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} activation(s) kept float as too quiet for an int8 grid ({})",
                        r.kept_float_quiet.len(),
                        r.kept_float_quiet
                            .iter()
                            .map(|q| format!("'{}' {:.1} dB", q.tensor, q.quiet_sqnr_db))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                if r.layers_left_float.is_empty() {
                    String::new()
                } else {
                    format!(" (left float: {})", r.layers_left_float.join("; "))
                }
            )
        })
        .collect();
    parts.extend(
        records
            .iter()
            .filter_map(|r| Some(format!("{}: float, {}", r.body, r.float_because.as_ref()?))),
    );
    if !parts.is_empty() {
        stats.notes.push(format!(
            "If bodies, observed on the copy specialized to the calibration data ({}): {}",
            copy.describe(),
            parts.join("; ")
        ));
    }
    if !records.is_empty() {
        stats.details["bodies"] = json!({
            "observed_on": copy.describe(),
            "bodies": records,
        });
    }
    Ok(())
}

/// Visit the bodies of `g`'s nodes: quantize each taken `If` branch, then its own bodies.
/// `renamed` maps the names of the enclosing bodies to the copy; `outer_constants` are the
/// constants of the enclosing graphs. Returns whether anything changed.
fn walk(
    g: &mut Graph,
    path: &[(String, String)],
    label: &str,
    renamed: &HashMap<String, String>,
    outer_constants: &HashSet<String>,
    stage: &mut Stage,
) -> Result<bool> {
    let mut changed_any = false;
    let holders: Vec<_> = g
        .topo_order()?
        .into_iter()
        .filter(|&ix| subgraphs(g.node(ix)).any(holds_heavy))
        .collect();
    for ix in holders {
        let mut node = g.node(ix).clone();
        let here = |attr: &str| {
            format!(
                "{label}{}{} '{}' {attr}",
                if label.is_empty() { "" } else { " > " },
                node.op_type(),
                node_label(&node)
            )
        };
        if node.op_type() != "If" {
            for a in node.attribute.iter().filter(|a| a.g.is_some()) {
                stage.records.push(BodyRecord::float(
                    here(a.name()),
                    "a Loop/Scan body: the specialized copy does not unroll it",
                ));
            }
            continue;
        }
        let first = node.output.first().cloned().unwrap_or_default();
        let scope = g.scope_names();
        let mut changed = false;
        let mut records = Vec::new();
        let mut moved_out: Vec<String> = Vec::new();
        // Free names of each body, to see which initializers only one body reads.
        let free: Vec<std::collections::BTreeSet<String>> = node
            .attribute
            .iter()
            .map(|a| {
                a.g.iter()
                    .chain(a.graphs.iter())
                    .flat_map(crate::ir::graph::free_names)
                    .collect()
            })
            .collect();
        for (k, a) in node.attribute.iter_mut().enumerate() {
            let attr = a.name().to_string();
            let Some(body) = a.g.as_mut() else { continue };
            if !holds_heavy(body) {
                continue;
            }
            let mut p = path.to_vec();
            p.push((first.clone(), attr.clone()));
            let Some(branch) = stage.branches.iter().find(|b| b.path == p).cloned() else {
                // The copy inlined the other branch, or kept the If (a condition the fixed
                // inputs and shapes do not decide, e.g. one computed from the data).
                let other_taken = stage.branches.iter().any(|b| {
                    b.path.len() == p.len()
                        && b.path[..path.len()] == *path
                        && b.path[path.len()].0 == first
                });
                records.push(BodyRecord::float(
                    format!(
                        "{label}{}If '{}' {attr}",
                        if label.is_empty() { "" } else { " > " },
                        node_label(g.node(ix))
                    ),
                    if other_taken {
                        "no calibration feed takes it (the copy specialized to the data holds the other branch)"
                    } else {
                        "the calibration data does not decide its condition (the copy specialized to the data keeps the If), so no range inside it can be observed"
                    },
                ));
                continue;
            };
            let mut names = renamed.clone();
            names.extend(branch.names.iter().map(|(k, v)| (k.clone(), v.clone())));
            let mut bg = Graph::from_proto(body.clone(), scope.clone())
                .with_context(|| format!("{}: reading the body", branch.label))?;
            let others: HashSet<String> = free
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != k)
                .flat_map(|(_, f)| f.iter().cloned())
                .collect();
            let movable = movable_initializers(g, ix, body, &others);
            let (record, moved) = quantize_body(
                &mut bg,
                &names,
                outer_constants,
                &movable,
                &branch.label,
                stage,
            )?;
            moved_out.extend(moved);
            let body_changed = record.float_because.is_none();
            records.push(record);
            let mut inner_constants = outer_constants.clone();
            inner_constants.extend(bg.initializers.keys().cloned());
            let nested = walk(&mut bg, &p, &branch.label, &names, &inner_constants, stage)?;
            if body_changed || nested {
                *body = bg
                    .to_proto()
                    .with_context(|| format!("{}: writing the body", branch.label))?;
                changed = true;
            }
        }
        stage.records.extend(records);
        if changed {
            g.replace_node(ix, node).with_context(|| {
                format!("If '{}': replacing its bodies", node_label(g.node(ix)))
            })?;
            // Initializers that moved into a body (read by it alone) leave this graph, so the
            // body's name shadows nothing.
            for m in &moved_out {
                if g.consumers(m).is_empty() {
                    g.initializers.shift_remove(m);
                }
            }
            changed_any = true;
        }
    }
    Ok(changed_any)
}

/// Float initializers of `g` that only `body` (of node `ix`) reads: no other node, no other
/// body of `ix` (`others`: their free names), no graph output. Such a weight can move into the
/// body, where a DequantizeLinear next to its layer lets ONNX Runtime fuse the unit
/// (silero_vad_op18_ifless keeps its branch weights in the main graph).
fn movable_initializers(
    g: &Graph,
    ix: petgraph::stable_graph::NodeIndex,
    body: &GraphProto,
    others: &HashSet<String>,
) -> IndexMap<String, crate::onnx::proto::TensorProto> {
    crate::ir::graph::free_names(body)
        .into_iter()
        .filter(|n| !others.contains(n) && !g.is_graph_input(n) && !g.is_graph_output(n))
        .filter(|n| {
            g.consumers(n)
                .iter()
                .all(|&(c, slot)| c == ix && slot == crate::ir::InSlot::Capture)
        })
        .filter_map(|n| {
            let t = g.initializers.get(&n)?;
            (crate::onnx::tensor::data_type(t).ok()
                == Some(crate::onnx::proto::tensor_proto::DataType::Float))
            .then(|| (n.clone(), t.clone()))
        })
        .collect()
}

/// The weight and bias inputs of the heavy ops of `g` that are `Constant` node outputs.
fn heavy_constant_inputs(g: &Graph) -> HashSet<String> {
    let mut out = HashSet::new();
    for ix in g.node_indices() {
        let n = g.node(ix);
        let slots: &[usize] = match n.op_type() {
            "Conv" | "ConvTranspose" | "Gemm" => &[1, 2],
            "MatMul" => &[1],
            _ => continue,
        };
        for &k in slots {
            let Some(v) = n.input.get(k).filter(|v| !v.is_empty()) else {
                continue;
            };
            if let Some(p) = g.producer_node(v) {
                if g.node(p).op_type() == "Constant" {
                    out.insert(v.clone());
                }
            }
        }
    }
    out
}

/// Replace the `Constant` nodes producing `names` (with a `value` tensor) by initializers of the
/// same name: the same value, visible to placement and insertion as a constant.
fn constants_to_initializers(g: &mut Graph, names: &HashSet<String>) -> Result<()> {
    let mut patch = Patch::default();
    for ix in g.node_indices() {
        let n = g.node(ix);
        if n.op_type() != "Constant" || n.output.len() != 1 || !names.contains(&n.output[0]) {
            continue;
        }
        let Some(mut t) = n
            .attribute
            .iter()
            .find(|a| a.name() == "value")
            .and_then(|a| a.t.clone())
        else {
            continue;
        };
        t.name = Some(n.output[0].clone());
        patch.remove.push(ix);
        patch.initializers.push(t);
    }
    if patch.is_empty() {
        return Ok(());
    }
    g.apply(patch)
}

/// Quantize one taken body in place (module docs, steps 1-4). Returns its record and the
/// initializers of the enclosing graph it took in (`movable`, used as weights or biases).
fn quantize_body(
    bg: &mut Graph,
    names: &HashMap<String, String>,
    outer_constants: &HashSet<String>,
    movable: &IndexMap<String, crate::onnx::proto::TensorProto>,
    label: &str,
    stage: &mut Stage,
) -> Result<(BodyRecord, Vec<String>)> {
    let opts = stage.opts;
    // Where a body value (or an enclosing graph's) is observed in the copy.
    let (main_values, copy_values) = (&stage.main_values, &stage.copy_values);
    let in_copy = |v: &str| -> Option<String> {
        let c = names
            .get(v)
            .cloned()
            .or_else(|| main_values.contains(v).then(|| v.to_string()))?;
        copy_values.contains(&c).then_some(c)
    };

    // 1. Planning view: the heavy ops' Constant weights and biases as initializers.
    let mut pg = bg.clone();
    let heavy_inputs = heavy_constant_inputs(&pg);
    constants_to_initializers(&mut pg, &heavy_inputs)?;
    pg.apply(Patch {
        initializers: movable.values().cloned().collect(),
        ..Default::default()
    })?;
    // 2. Layers left float, then placement with the main graph's rules.
    let mut left_float = Vec::new();
    for ix in pg.topo_order()? {
        let n = pg.node(ix);
        if !HEAVY.contains(&n.op_type()) {
            continue;
        }
        let Some(w) = n.input.get(1) else { continue };
        if n.op_type() == "Conv"
            && crate::passes::weight_only::taps::judge_constant(&pg, w).is_some()
        {
            left_float.push((
                node_label(n).to_string(),
                "its weight takes per-(channel, tap) scales (weight-only)",
            ));
        } else if !movable.contains_key(w)
            && pg.source(w) == Some(Source::Outer)
            && outer_constants.contains(w)
        {
            left_float.push((
                node_label(n).to_string(),
                "its weight is a constant of an enclosing graph that other nodes read too (stored int8 there by weight-only)",
            ));
        }
    }
    let mut o = opts.clone();
    o.exclude_nodes
        .extend(left_float.iter().map(|(n, _)| regex::escape(n)));
    let shapes =
        if o.target.policy().boundary_cost.is_some() || o.target.policy().float_layers.is_some() {
            Some(body_shapes(&pg, &in_copy, &mut stage.shapes, stage.copy))
        } else {
            None
        };
    let mut plan = placement::plan_with_shapes(&pg, &o, &NodeSelection::All, shapes.as_ref())?;
    let missing: Vec<String> = plan
        .activations
        .iter()
        .filter(|t| in_copy(t).is_none())
        .cloned()
        .collect();
    plan.activations.retain(|t| !missing.contains(t));
    plan.biases.retain(|_, m| !missing.contains(&m.input));
    // A bias shared by two marked layers would need two int32 copies (one per input scale).
    let mut bias_readers: HashMap<String, usize> = HashMap::new();
    for b in plan.biases.keys() {
        *bias_readers.entry(b.clone()).or_default() += pg
            .consumers(b)
            .iter()
            .filter(|(c, _)| plan.nodes.iter().any(|(n, _)| n == node_label(pg.node(*c))))
            .count();
    }
    plan.biases
        .retain(|b, _| bias_readers.get(b).copied().unwrap_or(0) <= 1);
    let mut record = BodyRecord::float(label.to_string(), "");
    record.float_because = None;
    record.layers_left_float = left_float
        .iter()
        .map(|(n, why)| format!("'{n}': {why}"))
        .collect();
    if !missing.is_empty() {
        record.layers_left_float.push(format!(
            "{} tensor(s) the specialized copy does not hold as values stay float",
            missing.len()
        ));
    }
    if plan.activations.is_empty() {
        record.float_because = Some("no tensor of it matched a quantization rule".into());
        return Ok((record, Vec::new()));
    }

    // 3. Observation on the copy, under the copy's names.
    let tensors: Vec<String> = plan
        .activations
        .iter()
        .map(|t| in_copy(t).context("a marked tensor lost its copy name"))
        .collect::<Result<_>>()?;
    let obs_opts = ObserveOptions {
        method: match opts.method {
            Method::Auto => Method::DEFAULT_FIXED,
            m => m,
        },
        moving_average: opts.moving_average,
        scheme: opts.activation_scheme,
    };
    let seen = match observe_model(&stage.copy.proto, &tensors, &stage.copy.calib, &obs_opts) {
        Ok(o) => o,
        Err(e) => {
            record.float_because = Some(format!(
                "observing it on the specialized copy failed ({e:#})"
            ));
            return Ok((record, Vec::new()));
        }
    };
    let observed: IndexMap<String, Observed> = plan
        .activations
        .iter()
        .zip(&tensors)
        .map(|(t, c)| {
            let o = seen
                .get(c)
                .copied()
                .with_context(|| format!("no observation of '{c}' in the specialized copy"))?;
            Ok((t.clone(), o))
        })
        .collect::<Result<_>>()?;
    let params = plan.activation_params(&observed, opts.activation_scheme)?;
    let ranges = ActivationRanges {
        observed,
        params,
        auto: None,
    };
    record.kept_float_quiet = super::keep_quiet_float(&mut plan, &ranges)?;
    if plan.activations.is_empty() {
        record.float_because =
            Some("every marked tensor is too quiet for an int8 grid (kept float)".into());
        return Ok((record, Vec::new()));
    }

    // 4. Insertion into the body itself.
    let used: HashSet<String> = plan
        .weights
        .keys()
        .chain(plan.biases.keys())
        .cloned()
        .collect();
    constants_to_initializers(bg, &used)?;
    let moved: Vec<String> = movable
        .keys()
        .filter(|n| used.contains(*n))
        .cloned()
        .collect();
    bg.apply(Patch {
        initializers: moved.iter().map(|n| movable[n].clone()).collect(),
        ..Default::default()
    })?;
    let mut weight_scales: IndexMap<String, Vec<f32>> = IndexMap::new();
    for (w, mark) in &plan.weights {
        let (scales, _) = insert::weight(
            bg,
            &mut stage.namer,
            w,
            mark.axis,
            mark.zero_point,
            &mark.node,
            opts.reduce_range,
            opts.rounding,
        )
        .with_context(|| format!("{label}: node '{}'", mark.node))?;
        weight_scales.insert(w.clone(), scales);
    }
    let biases = materialize::insert(
        bg,
        &mut stage.namer,
        &plan,
        &ranges,
        &weight_scales,
        opts.activation_scheme,
    )
    .with_context(|| format!("{label}: inserting Q/DQ"))?;
    bg.remove_unused_initializers();
    record.activation_pairs = plan.activations.len();
    record.weights = plan.weights.len();
    record.biases = biases.len();
    Ok((record, moved))
}

/// Static shapes of the body's values, from tract's analysis of the copy (for the target's
/// speed rule).
fn body_shapes(
    pg: &Graph,
    in_copy: &dyn Fn(&str) -> Option<String>,
    cache: &mut Option<HashMap<String, Vec<usize>>>,
    copy: &specialized::ForObservation,
) -> HashMap<String, Vec<usize>> {
    let copy_shapes = cache.get_or_insert_with(|| {
        crate::runtime::infer_value_shapes(&copy.proto, &copy.input_shapes)
            .map(|values| {
                values
                    .into_iter()
                    .filter_map(|v| {
                        let dims = v.shape?.into_iter().collect::<Option<Vec<_>>>()?;
                        Some((v.name, dims))
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    let mut out = HashMap::new();
    for v in pg.all_names() {
        if let Some(dims) = in_copy(v).and_then(|c| copy_shapes.get(&c)) {
            out.insert(v.to_string(), dims.clone());
        }
    }
    for (name, t) in &pg.initializers {
        if let Ok(s) = crate::onnx::tensor::shape(t) {
            out.insert(name.clone(), s);
        }
    }
    out
}

/// Every name of `g` and of its bodies at any depth (values, nodes, initializers).
pub fn model_names(g: &Graph) -> HashSet<String> {
    let mut names: HashSet<String> = g.all_names().into_iter().map(String::from).collect();
    for ix in g.node_indices() {
        for sub in subgraphs(g.node(ix)) {
            insert::body_names(sub, &mut names);
        }
    }
    names
}

/// Definitions of each value and node name over every scope of `g` (inputs, initializers,
/// node outputs, node names).
pub fn definitions(g: &Graph) -> HashMap<String, usize> {
    fn body(b: &GraphProto, count: &mut HashMap<String, usize>) {
        let mut add = |n: &str| {
            if !n.is_empty() {
                *count.entry(n.to_string()).or_default() += 1;
            }
        };
        b.input.iter().for_each(|v| add(v.name()));
        b.initializer.iter().for_each(|t| add(t.name()));
        for n in &b.node {
            add(n.name());
            n.output.iter().for_each(|o| add(o));
        }
        for n in &b.node {
            for sub in subgraphs(n) {
                body(sub, count);
            }
        }
    }
    let mut count = HashMap::new();
    let mut add = |n: &str| {
        if !n.is_empty() {
            *count.entry(n.to_string()).or_default() += 1;
        }
    };
    g.inputs.iter().for_each(|v| add(v.name()));
    g.initializers.keys().for_each(|t| add(t));
    for ix in g.node_indices() {
        let n = g.node(ix);
        add(n.name());
        n.output.iter().for_each(|o| add(o));
    }
    for ix in g.node_indices() {
        for sub in subgraphs(g.node(ix)) {
            body(sub, &mut count);
        }
    }
    count
}

/// Every name of `g` (all scopes) not in `before` is defined exactly once in the whole model:
/// a new Q/DQ, scale or zero-point name neither shadows nor collides with any other scope's.
/// `quantize` (both stages) and `weight-only` check their additions with it on models with
/// bodies.
pub fn check_new_names(g: &Graph, before: &HashSet<String>) -> Result<()> {
    let mut clashes: Vec<(String, usize)> = definitions(g)
        .into_iter()
        .filter(|(n, c)| *c > 1 && !before.contains(n))
        .collect();
    clashes.sort();
    if let Some((name, count)) = clashes.first() {
        bail!(
            "internal: name '{name}' added by this pass is defined {count} times across the main graph and its bodies ({} such name(s))",
            clashes.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op;
    use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto};

    fn body(nodes: Vec<crate::onnx::proto::NodeProto>, out: &str) -> GraphProto {
        GraphProto {
            name: Some("b".into()),
            node: nodes,
            output: vec![crate::onnx::proto::ValueInfoProto {
                name: Some(out.into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn if_node(then_b: GraphProto, else_b: GraphProto) -> crate::onnx::proto::NodeProto {
        let mut n = op::node("If", "if", &["c"], &["y"]);
        for (name, g) in [("then_branch", then_b), ("else_branch", else_b)] {
            n.attribute.push(AttributeProto {
                name: Some(name.into()),
                r#type: Some(AttributeType::Graph as i32),
                g: Some(g),
                ..Default::default()
            });
        }
        n
    }

    fn graph(then_b: GraphProto, else_b: GraphProto) -> Graph {
        let gp = GraphProto {
            name: Some("main".into()),
            node: vec![if_node(then_b, else_b)],
            input: vec![
                crate::onnx::proto::ValueInfoProto {
                    name: Some("c".into()),
                    ..Default::default()
                },
                crate::onnx::proto::ValueInfoProto {
                    name: Some("x".into()),
                    ..Default::default()
                },
            ],
            output: vec![crate::onnx::proto::ValueInfoProto {
                name: Some("y".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        Graph::from_proto(gp, HashSet::new()).unwrap()
    }

    #[test]
    fn a_name_defined_in_two_scopes_is_refused_only_when_new() {
        // Both branches define 'a0_q' (a sibling reuse the model already had): allowed. A new
        // name defined in the main graph and a body is refused.
        let t = body(vec![op::node("Relu", "r", &["x"], &["a0_q"])], "a0_q");
        let e = body(vec![op::node("Relu", "r2", &["x"], &["a0_q"])], "a0_q");
        let g = graph(t, e);
        let before = model_names(&g);
        check_new_names(&g, &before).unwrap();
        let mut after = before.clone();
        after.remove("a0_q");
        let err = check_new_names(&g, &after).unwrap_err().to_string();
        assert!(
            err.contains("'a0_q' added by this pass is defined 2 times"),
            "{err}"
        );
    }

    #[test]
    fn a_namer_avoiding_the_model_skips_ids_used_in_any_scope() {
        // The then-branch defines a0_f and w1_q; a namer seeded with the model's names hands out
        // ids whose names are free everywhere.
        let t = body(
            vec![
                op::node("Relu", "r", &["x"], &["a0_f"]),
                op::node("Relu", "w1_q", &["a0_f"], &["w1_q_out"]),
            ],
            "w1_q_out",
        );
        let e = body(vec![op::node("Identity", "i", &["x"], &["e"])], "e");
        let g = graph(t, e);
        let mut namer = insert::Namer::avoiding(insert::Naming::Compact, model_names(&g));
        let [f, q] = namer.take(&g, 'a', "t", [("float", "f"), ("quantized", "q")]);
        assert_eq!((f.as_str(), q.as_str()), ("a1_f", "a1_q"));
        let [wq] = namer.take(&g, 'w', "w", [("quantized", "q")]);
        assert_eq!(wq, "w2_q");
    }

    #[test]
    fn a_plain_namer_avoids_names_defined_inside_bodies() {
        // The main-graph namer of a later pass (weight-only) must not define a name a body
        // already defines: that would shadow it.
        let t = body(vec![op::node("Relu", "r", &["x"], &["w0_q"])], "w0_q");
        let e = body(vec![op::node("Identity", "i", &["x"], &["e"])], "e");
        let g = graph(t, e);
        let mut namer = insert::Namer::new(insert::Naming::Compact);
        let [wq] = namer.take(&g, 'w', "w", [("quantized", "q")]);
        assert_eq!(wq, "w0_q_1");
    }
}
