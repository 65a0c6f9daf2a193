//! Pass `weight-only`: int8 storage for the constant weights of ops that run in float, so the
//! file shrinks ~4x while every runtime executes them as before (a DequantizeLinear of a
//! constant is folded at load by tract and ONNX Runtime alike).
//!
//! ```text
//! before: X -> LSTM(W[2,2048,512], R[2,2048,512], B) -> Y, Y_h, Y_c
//! after:  W = DequantizeLinear(W_int8, s_W[2048], axis 1)      (no zero point: symmetric)
//!         R = DequantizeLinear(R_int8, s_R[2048], axis 1)
//!         X -> LSTM(W, R, B) -> Y, Y_h, Y_c                    (B, states: float, untouched)
//! ```
//! Which weights, and the axis of their per-channel scales, come from [`RULES`] (one row per
//! op and weight input), restricted to the ops the run's [`Policy`] lists:
//! - LSTM / GRU / RNN `W`, `R` (`[num_directions, gates * hidden, rows]`): axis 1, one scale per
//!   gate row, so each gate's rows keep their own range;
//! - Gather `data` on a constant table with dynamic indices (embeddings, `[vocab, dim]`): the
//!   Gather axis, one scale per gathered row;
//! - Conv `W` axis 0, ConvTranspose `W` axis 1 (per-tensor when `group > 1`), Gemm `B` axis 0
//!   with `transB = 1` else 1, MatMul constant `B` its last axis (the output channels).
//!
//! Conditions: the weight is a float initializer of at least [`MIN_ELEMENTS`] finite values,
//! every reader is a rule row of the policy that asks for the same axis (a weight also read by
//! other ops stays float), and the node passes the user's op/name filters (`--exclude-op`,
//! `--exclude-node`, `--include-node`). Scales: `s_c = max|W_c| / 127`, int8 round-to-nearest
//! ([`crate::passes::quantize::insert::weight`], shared with `quantize`); per-tensor instead of
//! per-channel when a channel holds fewer than [`MIN_PER_CHANNEL`] values, where a float scale
//! per channel would cost more than the precision it buys.
//!
//! Invariants: activations, biases, recurrent state inputs and outputs stay float; readers keep
//! reading the weight's name (now a DequantizeLinear output); running the pass twice equals
//! running it once (a quantized weight is no longer a constant). Changes counted: weights
//! stored as int8. Sits after `quantize` in the pipeline, so in the `generic` policy only the
//! weights the activation rules left float are touched; after a budgeted `mixed-precision`
//! run the layers it assigned (Conv/ConvTranspose/Gemm/MatMul, fp32 ones included) are left
//! as it chose them.
//!
//! **`--weight-bits 4`** ([`WeightOnlyOptions::bits`]): first the MatMul/Gemm weights (the LM
//! head included) go int4 in blocks along their input axis, as `com.microsoft.MatMulNBits` or
//! opset-21 block-wise DequantizeLinear, rounded by GPTQ, a clipping search or
//! round-to-nearest, whichever gives the lowest layer output error on the calibration data
//! ([`int4`], numerics in [`rounding`]); `quantize` is skipped (activations float); then the
//! rules above store what is left (Gather tables, layers narrower than one block) as int8.

pub mod awq;
pub mod captured;
pub mod int4;
pub mod rounding;
pub mod taps;

pub use int4::Format;
pub use rounding::Method;

use super::quantize::insert::{self, Namer, Rounding, WeightReport};
use super::quantize::opset;
use super::target::Policy;
#[cfg(test)]
use super::target::Target;
use super::{Pass, PassContext, PassStats};
use crate::ir::layer::Layer;
use crate::ir::op::{is_standard_domain, node_label, Attrs};
use crate::ir::{Graph, InSlot, Model};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::NodeProto;
use crate::onnx::tensor;
use anyhow::{Context, Result};
use indexmap::IndexMap;
use regex::Regex;
use serde_json::json;

/// Weights below this many values stay float: the DequantizeLinear node, its scale and names
/// cost about as much as the 3 bytes per value saved.
pub const MIN_ELEMENTS: usize = 256;

/// Fewer values per channel than this: one scale for the whole tensor (a 4-byte scale per
/// channel of e.g. an 8-wide embedding row would undo half the saving).
pub const MIN_PER_CHANNEL: usize = 8;

/// Weights listed in the terminal table (lowest SQNR first).
const TABLE_ROWS: usize = 12;

/// Where a rule's per-channel scales go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// A fixed axis of the weight.
    Fixed(usize),
    /// Gemm `B`: 0 with `transB = 1`, else 1 (the output channels).
    GemmB,
    /// ConvTranspose `W` `[C_in, C_out / group, ...]`: 1 when `group = 1`, else per-tensor.
    ConvTransposeW,
    /// The last axis (MatMul `B` `[..., K, N]`: the N output channels).
    Last,
    /// Gather `data`: the node's `axis` attribute (default 0), one scale per gathered slice.
    GatherAxis,
}

/// One row: the op, which input holds its weight, the channel axis, and why.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub op: &'static str,
    pub input: usize,
    pub axis: Axis,
    /// The precondition on the node beyond a constant float weight, `None` = none.
    pub also: Option<fn(&Graph, &NodeProto) -> bool>,
}

/// Gather: only a lookup into a constant table with indices computed at run time.
fn dynamic_indices(g: &Graph, n: &NodeProto) -> bool {
    n.input
        .get(1)
        .is_some_and(|i| !i.is_empty() && g.constant(i).is_none())
}

/// The rules table. Recurrent weights `[num_directions, gates * hidden, rows]` get one scale per
/// gate row (axis 1): the four LSTM gates' rows have ranges that differ by up to 4x in trained
/// models, and one scale per direction would give the narrow gates a quarter of the levels.
pub const RULES: &[Rule] = &[
    row("LSTM", 1, Axis::Fixed(1)),
    row("LSTM", 2, Axis::Fixed(1)),
    row("GRU", 1, Axis::Fixed(1)),
    row("GRU", 2, Axis::Fixed(1)),
    row("RNN", 1, Axis::Fixed(1)),
    row("RNN", 2, Axis::Fixed(1)),
    Rule {
        also: Some(dynamic_indices),
        ..row("Gather", 0, Axis::GatherAxis)
    },
    row("Conv", 1, Axis::Fixed(0)),
    row("ConvTranspose", 1, Axis::ConvTransposeW),
    row("Gemm", 1, Axis::GemmB),
    row("MatMul", 1, Axis::Last),
];

const fn row(op: &'static str, input: usize, axis: Axis) -> Rule {
    Rule {
        op,
        input,
        axis,
        also: None,
    }
}

/// Options of `weight-only`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightOnlyOptions {
    /// 8: the int8 rules only; 4: int4 MatMul/Gemm weights first ([`int4`]).
    pub bits: u32,
    /// How int4 weights are written.
    pub format: Format,
    /// int4 values per scale, along the input axis.
    pub block_size: usize,
    /// Force one int4 rounding; `None`: the lowest output error per layer.
    pub rounding: Option<Method>,
}

impl Default for WeightOnlyOptions {
    fn default() -> Self {
        WeightOnlyOptions {
            bits: 8,
            format: Format::MatMulNBits,
            block_size: 32,
            rounding: None,
        }
    }
}

pub struct WeightOnly;

impl Pass for WeightOnly {
    fn name(&self) -> &'static str {
        "weight-only"
    }

    fn summary(&self) -> &'static str {
        "int8 weights behind DequantizeLinear for ops that run in float (LSTM, GRU, RNN, Gather tables; all weights with --target tract)"
    }

    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        // With a size budget, `mixed-precision` chose every layer's precision (fp32 included);
        // those layers are its decision, not ours.
        let mixed_ran = ctx.selected.contains(&"mixed-precision") && ctx.mixed.budget.is_some();
        if ctx.weight_only.bits != 4 {
            // Which branches the calibration data reaches, said before the bodies change.
            let reached = ctx
                .calibration
                .as_deref()
                .filter(|c| !c.synthetic)
                .and_then(|c| branches_reached(model, c));
            let names_before = crate::passes::quantize::bodies::has_bodies(&model.graph)
                .then(|| crate::passes::quantize::bodies::model_names(&model.graph));
            let mut stats = weight_only(model, ctx.target.policy(), &ctx.quantize, mixed_ran)?;
            if let Some(before) = names_before {
                // No DequantizeLinear name may shadow or collide with a body's.
                crate::passes::quantize::bodies::check_new_names(&model.graph, &before)?;
            }
            if stats
                .details
                .get("in_bodies")
                .is_some_and(|n| n.as_u64() > Some(0))
            {
                stats.notes.extend(reached);
            }
            return Ok(stats);
        }
        let filter = Filter::new(&ctx.quantize)?;
        let (layers, notes) = int4::int4(
            model,
            &filter,
            &ctx.weight_only,
            ctx.quantize.naming,
            ctx.calibration.as_deref(),
        )?;
        let mut stats = weight_only(model, ctx.target.policy(), &ctx.quantize, mixed_ran)?;
        stats.notes.splice(0..0, notes);
        Ok(merge_int4(stats, layers, &ctx.weight_only))
    }
}

/// One note naming the `If` branches the calibration data takes (the `If`s a copy specialized
/// to it folds, [`crate::passes::quantize::specialized`]); `None` without `If`s or when the
/// data fixes nothing that folds one.
fn branches_reached(
    model: &Model,
    calib: &crate::calibrate::data::CalibrationSet,
) -> Option<String> {
    if !model
        .graph
        .node_indices()
        .any(|ix| model.graph.node(ix).op_type() == "If")
    {
        return None;
    }
    let proto = model.to_proto().ok()?;
    let s = crate::passes::quantize::specialized::for_observation(&proto, calib).ok()?;
    (!s.collapsed.is_empty()).then(|| {
        format!(
            "branches the calibration data ({}) takes: {}; the other branches of these If(s) are reached by none of it; weights read inside branches are int8 in every branch (activations inside them: see quantize's note)",
            s.describe(),
            s.collapsed.join("; ")
        )
    })
}

/// The int8 pass's stats with the int4 layers in front: changes, a note, table rows, details.
fn merge_int4(
    mut stats: PassStats,
    layers: Vec<int4::LayerReport>,
    opts: &WeightOnlyOptions,
) -> PassStats {
    if layers.is_empty() {
        return stats;
    }
    let mut counts: IndexMap<Method, usize> = IndexMap::new();
    for l in &layers {
        *counts.entry(l.method).or_default() += 1;
    }
    let chosen = |l: &int4::LayerReport| {
        l.sqnr_db
            .iter()
            .find(|(m, _)| *m == l.method)
            .map_or(f64::NAN, |s| s.1)
    };
    stats.notes.insert(
        0,
        format!(
            "{} linear layer(s) stored int4 ({}, block {}), rounding by lowest output error: {}; activations float",
            layers.len(),
            match opts.format {
                Format::MatMulNBits => "com.microsoft.MatMulNBits",
                Format::DequantizeLinear => "block-wise DequantizeLinear, opset 21",
            },
            opts.block_size,
            counts
                .iter()
                .map(|(m, c)| format!("{c} {}", m.label()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let mut rows: Vec<String> = layers
        .iter()
        .map(|l| {
            let nearest = l
                .sqnr_db
                .iter()
                .find(|(m, _)| *m == Method::Nearest)
                .map_or("-".to_string(), |s| format!("{:.1}", s.1));
            format!(
                "{:<32} {:>5}x{:<5} int4 {:<8} output SQNR {:>5.1} dB (nearest {nearest})",
                l.node,
                l.k,
                l.n,
                l.method.label(),
                chosen(l)
            )
        })
        .collect();
    rows.truncate(TABLE_ROWS);
    rows.append(&mut stats.table);
    stats.table = rows;
    stats.changes += layers.len();
    let int8 = std::mem::take(&mut stats.details);
    stats.details = json!({ "int4": { "format": opts.format, "block_size": opts.block_size, "layers": layers }, "int8": int8 });
    stats
}

/// What one weight's row asks for: the per-channel axis (`None` = per-tensor) and the node.
#[derive(Debug, Clone, PartialEq)]
struct Ask {
    axis: Option<usize>,
    node: String,
    /// The reader is a Conv: per-(channel, tap) scales may apply ([`taps`]).
    conv: bool,
}

/// The channel axis `rule` gives weight `shape` on node `n`.
fn channel_axis(rule: &Rule, n: &NodeProto, shape: &[usize]) -> Result<Option<usize>> {
    let rank = shape.len();
    let axis = match rule.axis {
        Axis::Fixed(a) => Some(a),
        Axis::GemmB => Some(if n.attr_int("transB")?.unwrap_or(0) == 1 {
            0
        } else {
            1
        }),
        Axis::ConvTransposeW => (n.attr_int("group")?.unwrap_or(1) == 1).then_some(1),
        Axis::Last => rank.checked_sub(1),
        Axis::GatherAxis => {
            let a = n.attr_int("axis")?.unwrap_or(0);
            let a = if a < 0 { a + rank as i64 } else { a };
            usize::try_from(a).ok()
        }
    };
    let Some(axis) = axis.filter(|&a| a < rank && rank >= 2) else {
        return Ok(None);
    };
    let per_channel = shape.iter().product::<usize>() / shape[axis].max(1);
    Ok((per_channel >= MIN_PER_CHANNEL).then_some(axis))
}

/// The user's op and node-name filters (the same options `quantize` honours).
struct Filter {
    exclude_ops: Vec<String>,
    exclude: Vec<Regex>,
    include: Vec<Regex>,
}

fn anchored(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .or_else(|_| Regex::new(&format!("^{}$", regex::escape(pattern))))
        .with_context(|| format!("node pattern '{pattern}'"))
}

impl Filter {
    fn new(opts: &super::quantize::QuantizeOptions) -> Result<Filter> {
        let compile = |ps: &[String]| ps.iter().map(|p| anchored(p)).collect::<Result<Vec<_>>>();
        Ok(Filter {
            exclude_ops: opts.exclude_ops.clone(),
            exclude: compile(&opts.exclude_nodes)?,
            include: compile(&opts.include_nodes)?,
        })
    }

    fn allows(&self, n: &NodeProto) -> bool {
        let name = node_label(n);
        !self.exclude_ops.iter().any(|o| o == n.op_type())
            && !self.exclude.iter().any(|r| r.is_match(name))
            && (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
    }
}

/// Whether `w` is a float initializer worth storing as int8.
fn candidate(g: &Graph, w: &str) -> bool {
    let Some(t) = g.constant(w) else { return false };
    if tensor::data_type(t).ok() != Some(DataType::Float) {
        return false;
    }
    let Ok(values) = tensor::to_f32(t) else {
        return false;
    };
    values.len() >= MIN_ELEMENTS && values.iter().all(|v| v.is_finite())
}

/// Every weight the policy's rows ask for, with its axis, in topological order of the first
/// reader; weights whose readers disagree (or include ops without a row) are left out with a
/// note.
fn plan(
    g: &Graph,
    policy: &Policy,
    filter: &Filter,
    skip_layers: bool,
    notes: &mut Vec<String>,
) -> Result<IndexMap<String, Ask>> {
    let mut asks: IndexMap<String, Vec<(petgraph::stable_graph::NodeIndex, usize, Ask)>> =
        IndexMap::new();
    for ix in g.topo_order()? {
        let n = g.node(ix);
        if !is_standard_domain(n.domain())
            || !policy.weight_only(n.op_type())
            || !filter.allows(n)
            || (skip_layers && Layer::of(g, ix).is_some())
        {
            continue;
        }
        for rule in RULES.iter().filter(|r| r.op == n.op_type()) {
            let Some(w) = n.input.get(rule.input).filter(|w| !w.is_empty()) else {
                continue;
            };
            if rule.also.is_some_and(|also| !also(g, n)) || !candidate(g, w) {
                continue;
            }
            let shape = tensor::shape(g.constant(w).context("checked constant")?)?;
            let axis = channel_axis(rule, n, &shape)
                .with_context(|| format!("node '{}'", node_label(n)))?;
            let ask = Ask {
                axis,
                node: node_label(n).to_string(),
                conv: n.op_type() == "Conv",
            };
            asks.entry(w.clone())
                .or_default()
                .push((ix, rule.input, ask));
        }
    }
    let mut chosen = IndexMap::new();
    for (w, readers) in asks {
        let first = readers[0].2.clone();
        let all_rows = g.consumers(&w).iter().all(|&(ix, slot)| {
            matches!(slot, InSlot::Arg(k) if readers.iter().any(|(r, input, _)| *r == ix && *input == k))
        });
        if g.is_graph_output(&w) || !all_rows {
            notes.push(format!(
                "weight '{w}' of '{}' is also read by ops without a weight-only rule; left float",
                first.node
            ));
        } else if readers.iter().any(|(_, _, a)| a.axis != first.axis) {
            notes.push(format!(
                "weight '{w}' is read by '{}' and others with different channel axes; left float",
                first.node
            ));
        } else {
            chosen.insert(w, first);
        }
    }
    Ok(chosen)
}

/// Store the constant weights the policy's rules select as int8 + DequantizeLinear.
pub fn weight_only(
    model: &mut Model,
    policy: &Policy,
    opts: &super::quantize::QuantizeOptions,
    mixed_precision_ran: bool,
) -> Result<PassStats> {
    let mut stats = PassStats::default();
    let filter = Filter::new(opts)?;
    if mixed_precision_ran {
        stats.notes.push(
            "mixed-precision set the precision of Conv/ConvTranspose/Gemm/MatMul layers; only the other rules apply".into(),
        );
    }
    // Weights read inside If/Loop/Scan bodies ([`captured`]): only models with bodies pay for
    // the copy.
    let mut hoisted = None;
    let mut in_bodies = IndexMap::new();
    if model
        .graph
        .node_indices()
        .any(|ix| crate::ir::graph::has_subgraphs(model.graph.node(ix)))
    {
        let mut m = model.clone();
        let rule_ok = |op: &str| policy.weight_only(op) && op != "Gather";
        in_bodies = captured::prepare(&mut m.graph, &rule_ok, &mut stats.notes)?;
        hoisted = Some(m);
    }
    let chosen = plan(
        hoisted.as_ref().map_or(&model.graph, |m| &m.graph),
        policy,
        &filter,
        mixed_precision_ran,
        &mut stats.notes,
    )?;
    if chosen.is_empty() && in_bodies.is_empty() {
        stats.notes.push(format!(
            "no float weight of at least {MIN_ELEMENTS} values matched a weight-only rule (target {}); model unchanged",
            policy.name
        ));
        return Ok(stats);
    }
    let mut work = hoisted.unwrap_or_else(|| model.clone());
    stats.notes.extend(opset::upgrade(
        &mut work,
        opset::PER_CHANNEL,
        &opts.input_shapes,
    )?);
    let mut namer = Namer::new(opts.naming);
    let mut reports: Vec<WeightReport> = Vec::new();
    let mut per_tap = 0;
    for (w, ask) in &chosen {
        if ask.conv && taps::judge_constant(&work.graph, w).is_some() {
            reports.push(taps::insert(&mut work.graph, w, &ask.node)?);
            per_tap += 1;
            continue;
        }
        let parts = match policy.split_weights_above {
            Some(limit) => split(&mut work.graph, w, ask.axis, limit)
                .with_context(|| format!("splitting weight '{w}' (node '{}')", ask.node))?,
            None => vec![w.clone()],
        };
        for part in &parts {
            let (_, report) = insert::weight(
                &mut work.graph,
                &mut namer,
                part,
                ask.axis,
                false,
                &ask.node,
                false,
                Rounding::Nearest,
            )
            .with_context(|| format!("weight-only int8 of '{part}' (node '{}')", ask.node))?;
            reports.push(report);
        }
    }
    for (w, c) in &in_bodies {
        if c.conv && taps::judge_constant(&work.graph, w).is_some() {
            reports.push(taps::insert(&mut work.graph, w, &c.node)?);
            per_tap += 1;
            continue;
        }
        let (_, report) = insert::weight(
            &mut work.graph,
            &mut namer,
            w,
            c.axis,
            false,
            &c.node,
            false,
            Rounding::Nearest,
        )
        .with_context(|| format!("weight-only int8 of '{w}' (read inside a body)"))?;
        reports.push(report);
    }
    if !in_bodies.is_empty() {
        stats.notes.push(format!(
            "{} weight(s) read inside If/Loop/Scan bodies stored int8 in the main graph (the bodies read them by name)",
            in_bodies.len()
        ));
    }
    if per_tap > 0 {
        stats.notes.push(format!(
            "{per_tap} Conv weight(s) with one dominant kernel tap stored with one scale per (output channel, tap) (Cast·Mul, float compute): their per-channel int8 SQNR is below {} dB",
            taps::MAX_PER_CHANNEL_SQNR_DB
        ));
    }
    work.graph.remove_unused_initializers();
    stats.changes = reports.len();
    // The terminal shows the least accurate weights; the report keeps them all.
    let mut shown: Vec<&WeightReport> = reports.iter().collect();
    shown.sort_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db));
    shown.truncate(TABLE_ROWS);
    stats.table = shown
        .iter()
        .map(|r| {
            format!(
                "{:<32} {:<24} {:>10}  SQNR {:>5.1} dB",
                r.tensor,
                r.node,
                match (r.axis, r.channels) {
                    (Some(a), c) => format!("axis {a} x{c}"),
                    // [`taps`]: one scale per (output channel, kernel position).
                    (None, c) if c > 1 => format!("per tap x{c}"),
                    _ => "per-tensor".to_string(),
                },
                r.sqnr_db
            )
        })
        .collect();
    let worst = reports
        .iter()
        .min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db));
    stats.notes.push(format!(
        "{} weight(s) stored int8 (target {}), activations float{}",
        reports.len(),
        policy.name,
        worst
            .map(|w| format!("; lowest weight SQNR {:.1} dB ('{}')", w.sqnr_db, w.tensor))
            .unwrap_or_default()
    ));
    stats.details = json!({ "target": policy.name, "weights": reports });
    if !in_bodies.is_empty() {
        stats.details["in_bodies"] = json!(in_bodies.len());
    }
    *model = work;
    Ok(stats)
}

/// Split float initializer `w` into chunks of at most `limit` bytes along `axis` (axis 0 when
/// per-tensor), produced again as `w` by a Concat; returns the chunks' names, or `[w]` when it
/// fits (see [`Policy::split_weights_above`]). Per-channel scales stay exact: the split runs
/// along the channel axis, so every channel lies in one chunk.
fn split(g: &mut Graph, w: &str, axis: Option<usize>, limit: usize) -> Result<Vec<String>> {
    let t = g.constant(w).context("weight is not a constant")?;
    let a = tensor::to_f32(t)?;
    let bytes = a.len() * 4;
    let axis = axis.unwrap_or(0);
    let dim = a.shape()[axis];
    if bytes <= limit || dim < 2 {
        return Ok(vec![w.to_string()]);
    }
    let per_slice = bytes / dim;
    let slices_per_chunk = (limit / per_slice.max(1)).max(1);
    let mut names = Vec::new();
    let mut chunks = Vec::new();
    for (i, start) in (0..dim).step_by(slices_per_chunk).enumerate() {
        let end = (start + slices_per_chunk).min(dim);
        let name = g.fresh_name(&format!("{w}_part{i}"));
        let part = a.slice_axis(ndarray::Axis(axis), ndarray::Slice::from(start..end));
        chunks.push(tensor::from_f32(&name, &part.to_owned()));
        names.push(name);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut concat =
        crate::ir::op::node("Concat", &g.fresh_name(&format!("{w}_concat")), &refs, &[w]);
    crate::ir::op::set_attr(&mut concat, crate::ir::op::attr_int("axis", axis as i64));
    insert::replace_constant(g, w, chunks, concat)?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::text::parse_model;

    fn model(text: &str) -> Model {
        Model::from_proto(parse_model(text).unwrap()).unwrap()
    }

    #[test]
    fn channel_axis_follows_the_layout_and_falls_back_to_per_tensor() {
        let node = |op: &str, attrs: &[(&str, i64)]| {
            let mut n = crate::ir::op::node(op, "n", &["a", "w"], &["y"]);
            for (k, v) in attrs {
                crate::ir::op::set_attr(&mut n, crate::ir::op::attr_int(k, *v));
            }
            n
        };
        let rule = |op: &str| RULES.iter().find(|r| r.op == op && r.input != 2).unwrap();
        let axis = |op: &str, attrs: &[(&str, i64)], shape: &[usize]| {
            channel_axis(rule(op), &node(op, attrs), shape).unwrap()
        };
        assert_eq!(axis("LSTM", &[], &[2, 64, 16]), Some(1));
        assert_eq!(axis("Gemm", &[("transB", 1)], &[10, 32]), Some(0));
        assert_eq!(axis("Gemm", &[], &[32, 10]), Some(1));
        assert_eq!(axis("MatMul", &[], &[32, 10]), Some(1));
        assert_eq!(axis("ConvTranspose", &[("group", 2)], &[8, 4, 3, 3]), None);
        assert_eq!(axis("Gather", &[("axis", -2)], &[100, 16]), Some(0));
        // 4 values per row: one scale per row would cost as much as it saves.
        assert_eq!(axis("Gather", &[], &[100, 4]), None);
    }

    #[test]
    fn split_chunks_along_the_channel_axis_and_concatenates_back_exactly() {
        let values: Vec<String> = (0..48).map(|i| format!("{}.5", i - 24)).collect();
        let m = model(&format!(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,12] y)
< float[4,12] w = {{{}}} >
{{
   [mm] y = MatMul (x, w)
}}"#,
            values.join(", ")
        ));
        let mut g = m.graph;
        let before = tensor::to_f32(g.constant("w").unwrap()).unwrap();
        // 4 x 12 floats = 192 bytes; 80 bytes per chunk along axis 1 = 5 columns of 16 bytes.
        let parts = split(&mut g, "w", Some(1), 80).unwrap();
        assert_eq!(parts.len(), 3);
        let widths: Vec<usize> = parts
            .iter()
            .map(|p| tensor::shape(g.constant(p).unwrap()).unwrap()[1])
            .collect();
        assert_eq!(widths, [5, 5, 2]);
        let chunks: Vec<_> = parts
            .iter()
            .map(|p| tensor::to_f32(g.constant(p).unwrap()).unwrap())
            .collect();
        let views: Vec<_> = chunks.iter().map(|c| c.view()).collect();
        let back = ndarray::concatenate(ndarray::Axis(1), &views).unwrap();
        assert_eq!(back, before);
        g.check().unwrap();
        // Fits: left alone.
        let mut g2 = model(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2] x) => (float[1,2] y)
< float[2,2] w = {1.0, 2.0, 3.0, 4.0} >
{
   [mm] y = MatMul (x, w)
}"#,
        )
        .graph;
        assert_eq!(split(&mut g2, "w", Some(1), 80).unwrap(), ["w"]);
    }

    #[test]
    fn tract_policy_splits_big_weights_and_generic_does_not() {
        let text = |rows: usize| {
            let vals: Vec<String> = (0..rows * 256)
                .map(|i| format!("{}", (i % 7) as f32 - 3.0))
                .collect();
            format!(
                r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,256] x) => (float[1,{rows}] y)
< float[{rows},256] w = {{{}}} >
{{
   [fc] y = Gemm <transB: int = 1> (x, w)
}}"#,
                vals.join(", ")
            )
        };
        // 4200 rows x 256 floats = 4.1 MiB: above tract's 4 MiB folding budget.
        let mut m = model(&text(4200));
        let opts = super::super::quantize::QuantizeOptions::default();
        let stats = weight_only(&mut m, Target::Tract.policy(), &opts, false).unwrap();
        assert_eq!(stats.changes, 2, "two chunks: {:?}", stats.notes);
        let concat = m
            .graph
            .node_indices()
            .filter(|&ix| m.graph.node(ix).op_type() == "Concat");
        assert_eq!(concat.count(), 1);
        let mut m = model(&text(4200));
        let stats = weight_only(&mut m, Target::Generic.policy(), &opts, false).unwrap();
        assert_eq!(stats.changes, 1);
    }
}
