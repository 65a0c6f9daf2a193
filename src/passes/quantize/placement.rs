//! Placement: per-op rules that only *mark* which tensors get quantized and how. Nothing is
//! inserted here; [`super::insert`] does that once per tensor from the finished [`Plan`].
//!
//! Rules (nodes visited in topological order; "marked" = an activation already in the plan):
//! - `Conv`: input 0 activation; constant weight per-channel on axis 0; constant bias int32.
//!   `ConvTranspose`: same with weight axis 1 (per-tensor when `group > 1`, where axis 1 only
//!   holds `C_out / group` channels).
//! - `Gemm`: A activation; constant B per-channel on axis 0 if `transB = 1` else axis 1;
//!   constant 1-D C of length N with alpha = beta = 1 as int32 bias; otherwise C stays float.
//!   A dynamic B is an activation.
//! - `MatMul`: A activation; constant B per-channel on its last axis; dynamic B activation.
//! - The output of Conv/ConvTranspose/Gemm/MatMul is an activation, *unless* its only reader is
//!   a `Relu` or `Clip` (not excluded): then the activation's output is marked instead and no
//!   Q/DQ separates the op from its activation (the fused unit; the range observed after the
//!   activation is non-negative so uint8 uses its whole range).
//! - Pass-through, sharing their input's scale and zero point (output in the input's group):
//!   `MaxPool`, `GlobalMaxPool`, `Reshape`, `Transpose`, `Flatten`, `Squeeze`, `Unsqueeze`,
//!   `Identity` — only when input 0 is marked. They only move or select values, so one grid
//!   serves both sides exactly.
//! - Own output range, when input 0 is marked: `AveragePool`, `GlobalAveragePool` (averaging
//!   narrows the range, so sharing the input's grid would waste resolution; ORT likewise gives
//!   its QLinear(Global)AveragePool separate input and output parameters), and a `Relu`/`Clip`
//!   not fused into a producer.
//! - `Sigmoid` used as a gate: when its input is marked and it is read only by `Mul` nodes (SiLU,
//!   squeeze-excitation), its output gets its own range ([0, 1]); the `Mul` then has both
//!   inputs marked. ORT fuses these into QLinearSigmoid / QLinearMul. A sigmoid feeding other
//!   math (or a graph output) stays float.
//! - `Add`, `Mul`: when both inputs are marked; the output (or that of a Relu/Clip fused
//!   after it, as for Conv) gets its own range.
//! - `Concat`: when every input is marked; inputs and output share one group (the union of
//!   their ranges, which is the output's range), so concatenation needs no requantization.
//!   Except when fused Relu/Clip outputs meet inputs that may be negative: a shared grid would
//!   give the Relu a zero point above 0, ORT could no longer drop it into QLinearConv and would
//!   keep that Conv in float. Those inputs keep their own group (zero point 0) and ORT's
//!   QLinearConcat requantizes them.
//! - Everything else (Softmax, other Sigmoids, Tanh, LayerNormalization, BatchNormalization, ...)
//!   stays float; it reads the dequantized value of a marked input.
//!
//! In a transformer (see [`super::transformer`]: a layer norm or an attention unit is present)
//! these rules give way to the transformer table: linear layers only (`MatMul`/`Gemm` with a
//! constant 2-D weight: activation input and per-channel weight marked, output float), the
//! attention products only with [`QuantizeOptions::attention_int8`], nothing else.
//!
//! The target's policy ([`crate::passes::target::Policy`]) then adjusts this placement:
//! - `int8_outputs = false` (OpenVINO): heavy ops' outputs are not marked, only their
//!   activation inputs (and what pass-through ops carry);
//! - `convs_in_transformers`: in a transformer graph, Conv/ConvTranspose still take the CNN
//!   rule above;
//! - `boundary_cost` (ORT): the quantized nodes form regions (connected where one reads what
//!   another writes); a region whose Conv/Gemm/MatMul MACs are below
//!   `boundaries x fixed_macs + macs_per_value x values crossing them` goes float as a whole,
//!   and the placement is redone without it until every region pays (each round only removes
//!   layers, so this ends). The removed layers are listed in [`Plan::kept_float`].
//!   A `Shape` reading a region's value is no boundary where `shape_reads_int8` lets it read
//!   the int8 tensor;
//! - `pass_through` (ORT: `Slice`): more ops that carry their input's grid;
//! - `scalar_operands` (off in every shipped policy, measured in target.rs): `Mul(t, k)` with
//!   `t` marked and `k > 0` a scalar constant is [`Plan::scaled`] (no Q/DQ of its own: a
//!   DequantizeLinear of `t`'s int8 value with scale `k s_t`); `Add`/`Mul` of a marked value and
//!   another scalar constant marks its output (or fused Relu/Clip) and stores the constant as an
//!   exact uint8 value ([`Plan::constants`], see [`super::scalar`]). In a transformer graph
//!   these elementwise rules then also apply to the conv backbone (not to linear layers or
//!   layout ops).
//!
//! User filters: `exclude_ops`, `exclude_nodes` (exact names or regexes), and `include_nodes`
//! (when given, only matching nodes are quantized). A caller that already knows its nodes
//! (`mixed-precision`: the readers of its int8/int4 weights) passes them as a
//! [`NodeSelection`] instead of names to match.

use super::QuantizeOptions;
use crate::calibrate::observe::Observed;
use crate::calibrate::params::{self, ActScheme, QParams};
use crate::ir::op::{node_label, Attrs};
use crate::ir::Graph;
use crate::onnx::proto::NodeProto;
use crate::onnx::tensor;
use crate::passes::target::Policy;
use anyhow::{Context, Result};
use indexmap::{IndexMap, IndexSet};
use petgraph::stable_graph::NodeIndex;
use regex::Regex;
use std::collections::HashSet;

/// Which nodes a plan may quantize, on top of the options' op and name filters.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum NodeSelection {
    /// Every node the filters allow.
    #[default]
    All,
    /// Only these nodes of the graph the plan is built on (a fused Relu/Clip or a gating Mul
    /// included only when listed itself).
    Only(HashSet<NodeIndex>),
}

/// How a constant weight is quantized.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightMark {
    /// Per-channel axis, `None` = per-tensor.
    pub axis: Option<usize>,
    /// The node that asked (for the report).
    pub node: String,
    /// Emit the (all-zero) zero-point input. Conv weights go without: ONNX defaults it to 0,
    /// ORT still fuses QLinearConv, and per-channel zeros cost a byte per output channel plus a
    /// name. ORT's QGemm fusion needs the input, so Gemm/MatMul weights keep it.
    pub zero_point: bool,
}

/// An int32 bias: scale = scale(input) * scale(weight).
#[derive(Debug, Clone, PartialEq)]
pub struct BiasMark {
    pub input: String,
    pub weight: String,
    pub node: String,
}

/// Which tensors get quantized and how.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Activation tensors, in marking order.
    pub activations: IndexSet<String>,
    /// Union-find parent for scale sharing (absent = own root).
    parent: IndexMap<String, String>,
    pub weights: IndexMap<String, WeightMark>,
    pub biases: IndexMap<String, BiasMark>,
    /// (node name, op type) of every node whose inputs and outputs are quantized.
    pub nodes: Vec<(String, String)>,
    pub notes: Vec<String>,
    /// Outputs of Relu/Clip units fused into their producer (non-negative, zero point 0 when
    /// their group stays non-negative, which is what lets ORT drop the Relu into QLinearConv).
    fused: IndexSet<String>,
    /// The graph was recognised as a transformer and placed by its table.
    pub transformer: bool,
    /// Heavy ops the target's speed rule ([`crate::passes::target::Policy::min_macs_per_value`])
    /// left float, for the report.
    pub kept_float: Vec<KeptFloat>,
    /// `y = Mul(t, k)`, `k` a positive scalar constant, `t` marked: `y -> (t, k)`. `y` counts as
    /// marked but gets no Q/DQ pair: it is `t`'s int8 value read through a DequantizeLinear of
    /// scale `k s_t` ([`super::scalar`]).
    pub scaled: IndexMap<String, (String, f32)>,
    /// Scalar constants read by int8 `Add`/`Mul` nodes, stored as exact uint8 values.
    pub constants: IndexSet<String>,
}

/// A heavy op left float because its int8 kernel would not pay for its Q/DQ on the target.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeptFloat {
    pub node: String,
    pub op: String,
    pub macs: u64,
    /// MACs of all heavy ops of the int8 region it was in.
    pub region_macs: u64,
    /// Values crossing that region's boundaries.
    pub values: u64,
    /// What those boundaries cost, in MACs the region's int8 kernels must save to break even.
    pub boundary_macs: u64,
    /// Which rule kept it float: `"region"` (its region did not pay for its boundaries,
    /// [`crate::passes::target::Policy::boundary_cost`]), or one of the per-layer rules of
    /// [`crate::passes::target::Policy::float_layers`]: `"depthwise"`, `"stem"`, `"few MACs"`,
    /// `"few weights"`.
    pub rule: &'static str,
}

impl Plan {
    pub fn is_marked(&self, t: &str) -> bool {
        self.activations.contains(t) || self.scaled.contains_key(t)
    }

    fn mark(&mut self, t: &str) {
        if !t.is_empty() && !self.scaled.contains_key(t) {
            self.activations.insert(t.to_string());
        }
    }

    /// The activation a scaled value reads and the product of the gains along the way.
    pub fn scaled_base(&self, y: &str) -> Option<(String, f32)> {
        let (mut t, mut gain) = (y.to_string(), 1.0f32);
        while let Some((base, k)) = self.scaled.get(&t) {
            t = base.clone();
            gain *= k;
        }
        self.activations.contains(&t).then_some((t, gain))
    }

    /// Drop the scaled values whose activation is no longer marked (kept float after
    /// calibration), with the int32 biases that would take their scale.
    pub fn settle_scaled(&mut self) {
        let gone: Vec<String> = self
            .scaled
            .keys()
            .filter(|y| self.scaled_base(y).is_none())
            .cloned()
            .collect();
        self.scaled.retain(|y, _| !gone.contains(y));
        self.biases.retain(|_, mark| !gone.contains(&mark.input));
    }

    /// Quantization parameters of every marked activation: each sharing group takes the union
    /// of its members' observed ranges.
    pub fn activation_params(
        &self,
        observed: &IndexMap<String, Observed>,
        scheme: ActScheme,
    ) -> Result<IndexMap<String, QParams>> {
        let mut group_range: IndexMap<String, (f32, f32)> = IndexMap::new();
        for t in &self.activations {
            let o = observed
                .get(t)
                .with_context(|| format!("no observation for '{t}'"))?;
            let e = group_range
                .entry(self.group(t))
                .or_insert((f32::INFINITY, f32::NEG_INFINITY));
            *e = (e.0.min(o.lo), e.1.max(o.hi));
        }
        Ok(self
            .activations
            .iter()
            .map(|t| {
                let (lo, hi) = group_range[&self.group(t)];
                (t.clone(), params::activation_params(lo, hi, scheme))
            })
            .collect())
    }

    /// Whether `t` shares its group with a fused Relu/Clip output.
    fn in_fused_group(&self, t: &str) -> bool {
        let g = self.group(t);
        self.fused.iter().any(|f| self.group(f) == g)
    }

    /// The representative of `t`'s sharing group.
    pub fn group(&self, t: &str) -> String {
        let mut cur = t.to_string();
        while let Some(p) = self.parent.get(&cur) {
            if *p == cur {
                break;
            }
            cur = p.clone();
        }
        cur
    }

    fn share(&mut self, a: &str, b: &str) {
        let (ra, rb) = (self.group(a), self.group(b));
        if ra != rb {
            self.parent.insert(rb, ra);
        }
    }

    fn mark_weight(
        &mut self,
        g: &Graph,
        w: &str,
        axis: Option<usize>,
        zero_point: bool,
        node: &str,
    ) -> bool {
        if let Some(prev) = self.weights.get(w) {
            if prev.axis != axis {
                self.notes.push(format!(
                    "weight '{w}' is read by '{}' and '{node}' with different channel axes; quantized for '{}' only",
                    prev.node, prev.node
                ));
                return false;
            }
            return true;
        }
        let Some(t) = g.constant(w) else { return false };
        if tensor::data_type(t).ok() != Some(crate::onnx::proto::tensor_proto::DataType::Float) {
            return false;
        }
        self.weights.insert(
            w.to_string(),
            WeightMark {
                axis,
                node: node.to_string(),
                zero_point,
            },
        );
        true
    }

    fn mark_bias(&mut self, g: &Graph, b: &str, input: &str, weight: &str, node: &str) {
        let Some(t) = g.constant(b) else { return };
        if tensor::data_type(t).ok() != Some(crate::onnx::proto::tensor_proto::DataType::Float) {
            return;
        }
        let mark = BiasMark {
            input: input.to_string(),
            weight: weight.to_string(),
            node: node.to_string(),
        };
        match self.biases.get(b) {
            Some(prev) if *prev != mark => self.notes.push(format!(
                "bias '{b}' is shared by '{}' and '{node}' with different input/weight scales; left float for '{node}'",
                prev.node
            )),
            Some(_) => {}
            None => {
                self.biases.insert(b.to_string(), mark);
            }
        }
    }
}

/// Name / op filters from the options, and the caller's node selection.
struct Filter<'a> {
    /// Mark heavy-op outputs ([`crate::passes::target::Policy::int8_outputs`]).
    outputs: bool,
    exclude_ops: Vec<String>,
    exclude: Vec<Regex>,
    include: Vec<Regex>,
    selection: &'a NodeSelection,
}

fn anchored(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .or_else(|_| Regex::new(&format!("^{}$", regex::escape(pattern))))
        .with_context(|| format!("node pattern '{pattern}'"))
}

impl<'a> Filter<'a> {
    fn new(
        opts: &QuantizeOptions,
        policy: &Policy,
        selection: &'a NodeSelection,
    ) -> Result<Filter<'a>> {
        Ok(Filter {
            outputs: policy.int8_outputs,
            exclude_ops: opts.exclude_ops.clone(),
            exclude: opts
                .exclude_nodes
                .iter()
                .map(|p| anchored(p))
                .collect::<Result<_>>()?,
            include: opts
                .include_nodes
                .iter()
                .map(|p| anchored(p))
                .collect::<Result<_>>()?,
            selection,
        })
    }

    /// Whether node `ix` may be quantized (the node selection, then the op and name filters).
    /// Patterns match the node's [`node_label`] (its name, or its first output when unnamed),
    /// the name every report gives it.
    fn allows(&self, ix: NodeIndex, node: &NodeProto) -> bool {
        let (name, op) = (node_label(node), node.op_type());
        if let NodeSelection::Only(nodes) = self.selection {
            if !nodes.contains(&ix) {
                return false;
            }
        }
        if self.exclude_ops.iter().any(|o| o == op) {
            return false;
        }
        if self.exclude.iter().any(|r| r.is_match(name)) {
            return false;
        }
        self.include.is_empty() || self.include.iter().any(|r| r.is_match(name))
    }
}

const PASS_THROUGH: &[&str] = &[
    "MaxPool",
    "GlobalMaxPool",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];
const OWN_RANGE: &[&str] = &["AveragePool", "GlobalAveragePool", "Relu", "Clip"];

/// The single value of a one-element float constant of rank 0 or 1 (a scalar operand: the
/// result keeps the other operand's shape).
fn scalar_value(g: &Graph, value: &str) -> Option<f32> {
    let t = g.constant(value)?;
    if tensor::data_type(t).ok() != Some(crate::onnx::proto::tensor_proto::DataType::Float) {
        return None;
    }
    if tensor::shape(t).ok()?.len() > 1 {
        return None;
    }
    let a = tensor::to_f32(t).ok()?;
    (a.len() == 1).then(|| a.iter().copied().next())?
}

/// The Relu/Clip reading `value` as its only reader, if it may be fused with the producer.
fn fused_activation(g: &Graph, value: &str, filter: &Filter) -> Option<NodeIndex> {
    if g.is_graph_output(value) {
        return None;
    }
    let [(ix, crate::ir::InSlot::Arg(0))] = g.consumers(value) else {
        return None;
    };
    let n = g.node(*ix);
    let is_act = matches!(n.op_type(), "Relu" | "Clip")
        && crate::ir::op::is_standard_domain(n.domain())
        && filter.allows(*ix, n);
    is_act.then_some(*ix)
}

/// Whether `value` is read only by `Mul` nodes that may be quantized: a sigmoid used as a gate
/// (SiLU `x * sigmoid(x)`, squeeze-excitation `x * sigmoid(fc(pool(x)))`). Its output lies in
/// [0, 1], which uint8 covers at a step of 1/255, and the gated product is linear in it.
fn gates_only_muls(g: &Graph, value: &str, filter: &Filter) -> bool {
    if value.is_empty() || g.is_graph_output(value) {
        return false;
    }
    let readers = g.consumers(value);
    !readers.is_empty()
        && readers.iter().all(|&(ix, slot)| {
            let n = g.node(ix);
            matches!(slot, crate::ir::InSlot::Arg(0 | 1))
                && n.op_type() == "Mul"
                && crate::ir::op::is_standard_domain(n.domain())
                && filter.allows(ix, n)
        })
}

/// Mark the output of a compute node, or of its fused activation.
fn mark_output(g: &Graph, plan: &mut Plan, ix: NodeIndex, filter: &Filter) {
    if !filter.outputs {
        return;
    }
    let Some(y) = g.node(ix).output.first().filter(|y| !y.is_empty()) else {
        return;
    };
    match fused_activation(g, y, filter) {
        Some(act) => {
            let n = g.node(act);
            plan.nodes
                .push((node_label(n).to_string(), n.op_type().to_string()));
            if let Some(out) = n.output.first() {
                plan.mark(out);
                plan.fused.insert(out.clone());
            }
        }
        None => plan.mark(y),
    }
}

/// Build the plan for the whole graph, quantizing only nodes in `selection` (no value shapes:
/// the target's speed rule does not apply).
pub fn plan(g: &Graph, opts: &QuantizeOptions, selection: &NodeSelection) -> Result<Plan> {
    plan_with_shapes(g, opts, selection, None)
}

/// [`plan`] with value shapes, which the target's speed rule
/// ([`crate::passes::target::Policy::min_macs_per_value`]) needs.
pub fn plan_with_shapes(
    g: &Graph,
    opts: &QuantizeOptions,
    selection: &NodeSelection,
    shapes: Option<&std::collections::HashMap<String, Vec<usize>>>,
) -> Result<Plan> {
    let policy = opts.policy();
    // `--w4a8` asks for int4 weights on every layer (size): the speed rule would keep the thin
    // layers float, with float weights.
    let cost = policy.boundary_cost.filter(|_| opts.w4a8.is_none());
    plan_seeded(g, opts, selection, shapes, cost, &policy, &HashSet::new())
}

/// [`plan_with_shapes`] under `policy` (the target's, or a variant of it the fidelity guard
/// compares with, [`super::guard`]) with the nodes in `float` left float from the start; `cost`
/// `None` places without the boundary rule.
pub(crate) fn plan_seeded(
    g: &Graph,
    opts: &QuantizeOptions,
    selection: &NodeSelection,
    shapes: Option<&std::collections::HashMap<String, Vec<usize>>>,
    cost: Option<crate::passes::target::BoundaryCost>,
    policy: &Policy,
    float: &HashSet<NodeIndex>,
) -> Result<Plan> {
    // The layers the target keeps float one by one leave the placement first, so the regions
    // (and what their boundaries cost) are formed without them.
    let (mut slow, mut kept_float) = float_layers(g, policy, shapes);
    slow.extend(float.iter().copied());
    let (Some(cost), Some(shapes)) = (cost, shapes) else {
        let mut plan = plan_once(g, opts, policy, selection, &slow)?;
        plan.kept_float = kept_float;
        return Ok(plan);
    };
    // Drop the heavy ops whose saving does not pay for their region boundaries, re-plan, and
    // repeat: a dropped layer turns its neighbours' shared tensors into boundaries, so a
    // region either pays for itself as a whole or goes float. Each round only adds to `slow`,
    // so this ends after at most one round per heavy op.
    loop {
        let mut plan = plan_once(g, opts, policy, selection, &slow)?;
        let dropped = unprofitable(g, &plan, policy.shape_reads_int8, cost, shapes);
        if dropped.is_empty() {
            plan.kept_float = kept_float;
            return Ok(plan);
        }
        for (ix, k) in dropped {
            slow.insert(ix);
            kept_float.push(k);
        }
    }
}

/// Whether `n`'s output, or that of the Relu/Clip that alone reads it, is read only by
/// Conv/ConvTranspose/Gemm/MatMul nodes that stay int8 (not in `float`), and is no graph
/// output.
fn feeds_only_int8_heavy_ops(g: &Graph, n: &NodeProto, float: &HashSet<NodeIndex>) -> bool {
    let Some(mut y) = n.output.first().filter(|y| !y.is_empty()) else {
        return false;
    };
    if let [(ix, _)] = g.consumers(y) {
        let act = g.node(*ix);
        if matches!(act.op_type(), "Relu" | "Clip")
            && crate::ir::op::is_standard_domain(act.domain())
        {
            match act.output.first() {
                Some(o) => y = o,
                None => return false,
            }
        }
    }
    let readers = g.consumers(y);
    !g.is_graph_output(y)
        && !readers.is_empty()
        && readers.iter().all(|&(ix, _)| {
            let r = g.node(ix);
            crate::ir::op::is_standard_domain(r.domain())
                && matches!(r.op_type(), "Conv" | "ConvTranspose" | "Gemm" | "MatMul")
                && !float.contains(&ix)
        })
}

/// The heavy ops the target keeps float one by one ([`Policy::float_layers`]), in graph order:
/// depthwise convolutions, convolutions below the MAC floor (needs `shapes`; without them the
/// MAC rule does not apply) and linear layers with a small constant weight.
fn float_layers(
    g: &Graph,
    policy: &Policy,
    shapes: Option<&std::collections::HashMap<String, Vec<usize>>>,
) -> (HashSet<NodeIndex>, Vec<KeptFloat>) {
    let mut slow = HashSet::new();
    let mut kept = Vec::new();
    let Some(rule) = policy.float_layers else {
        return (slow, kept);
    };
    let weight_shape = |n: &NodeProto| {
        n.input
            .get(1)
            .and_then(|w| g.constant(w))
            .and_then(|t| tensor::shape(t).ok())
    };
    let depthwise = |n: &NodeProto| {
        n.op_type() == "Conv"
            && n.attr_int("group").ok().flatten().unwrap_or(1) > 1
            && weight_shape(n).is_some_and(|w| w.get(1) == Some(&1))
    };
    // Two rounds: the other layers first, then the depthwise convs, which depend on them.
    let mut rows = Vec::new();
    for dw_round in [false, true] {
        for ix in g.node_indices() {
            let n = g.node(ix);
            if !crate::ir::op::is_standard_domain(n.domain()) || depthwise(n) != dw_round {
                continue;
            }
            // A depthwise conv whose output (through a Relu/Clip) only feeds heavy ops that
            // stay int8 sits inside an int8 chain (MobileNetV2's inverted residual): float
            // there costs a layout reorder at each end and doubles the bytes of the expanded
            // tensors (MobileNetV2 1.31x -> 1.18x measured), so it stays int8 whatever its
            // MACs. Where those readers are float themselves (PP-OCR cls), it follows them.
            if dw_round && feeds_only_int8_heavy_ops(g, n, &slow) {
                continue;
            }
            if let Some(row) = float_layer(g, n, ix, rule, shapes, dw_round, &weight_shape) {
                slow.insert(ix);
                rows.push((ix, row));
            }
        }
    }
    // Report in graph (index) order.
    rows.sort_by_key(|(ix, _)| *ix);
    kept.extend(rows.into_iter().map(|(_, k)| k));
    (slow, kept)
}

/// Why node `n` stays float under the per-layer rule, if it does.
fn float_layer(
    g: &Graph,
    n: &NodeProto,
    _ix: NodeIndex,
    rule: crate::passes::target::FloatLayers,
    shapes: Option<&std::collections::HashMap<String, Vec<usize>>>,
    depthwise: bool,
    weight_shape: &dyn Fn(&NodeProto) -> Option<Vec<usize>>,
) -> Option<KeptFloat> {
    {
        let macs = shapes.and_then(|s| crate::ir::facts::node_macs(n, s));
        // An image stem: a Conv straight from a graph input of fewer than 4 channels.
        let stem = n.op_type() == "Conv"
            && n.input.first().is_some_and(|x| g.is_graph_input(x))
            && weight_shape(n).is_some_and(|w| {
                let group = n.attr_int("group").ok().flatten().unwrap_or(1).max(1) as usize;
                w.get(1).is_some_and(|c| c * group < 4)
            });
        let why = match n.op_type() {
            "Conv" if rule.depthwise && depthwise => Some("depthwise"),
            "Conv" if stem && macs.is_some_and(|m| m < rule.stem_max_macs) => Some("stem"),
            "Conv" | "ConvTranspose" if macs.is_some_and(|m| m < rule.conv_min_macs) => {
                Some("few MACs")
            }
            "Gemm" | "MatMul"
                if weight_shape(n).is_some_and(|w| {
                    (w.iter().product::<usize>() as u64) < rule.linear_min_weights
                }) =>
            {
                Some("few weights")
            }
            _ => None,
        };
        why.map(|why| KeptFloat {
            node: node_label(n).to_string(),
            op: n.op_type().to_string(),
            macs: macs.unwrap_or(0),
            region_macs: macs.unwrap_or(0),
            values: 0,
            boundary_macs: 0,
            rule: why,
        })
    }
}

/// The heavy ops of the int8 regions of `plan` that do not pay for their boundaries. A region
/// is a connected set of quantized nodes (joined where one reads what another writes); its
/// boundaries are the tensors that enter it from outside (graph inputs, float producers: a
/// QuantizeLinear each) and those it hands to float readers or graph outputs (a
/// DequantizeLinear each). Each boundary costs `fixed_macs + macs_per_value * values`, in MACs
/// the region's int8 kernels must save to break even; a region whose heavy ops do fewer MACs
/// than that goes float as a whole. Deciding per region, not per layer, keeps a cheap layer
/// inside a long int8 chain (it adds no boundary) and drops isolated islands together.
fn unprofitable(
    g: &Graph,
    plan: &Plan,
    plan_shape_reads_int8: bool,
    cost: crate::passes::target::BoundaryCost,
    shapes: &std::collections::HashMap<String, Vec<usize>>,
) -> Vec<(NodeIndex, KeptFloat)> {
    let int8: HashSet<&str> = plan.nodes.iter().map(|(n, _)| n.as_str()).collect();
    let members: Vec<NodeIndex> = g
        .node_indices()
        .filter(|&ix| int8.contains(node_label(g.node(ix))))
        .collect();
    let member_set: HashSet<NodeIndex> = members.iter().copied().collect();
    let shape_free = plan_shape_reads_int8;
    // Union-find over the region's nodes, joined through the tensors they share.
    let mut parent: std::collections::HashMap<NodeIndex, NodeIndex> =
        members.iter().map(|&ix| (ix, ix)).collect();
    fn root(
        parent: &mut std::collections::HashMap<NodeIndex, NodeIndex>,
        ix: NodeIndex,
    ) -> NodeIndex {
        let mut r = ix;
        while parent[&r] != r {
            r = parent[&r];
        }
        parent.insert(ix, r);
        r
    }
    for &ix in &members {
        for y in &g.node(ix).output {
            for &(c, _) in g.consumers(y) {
                if member_set.contains(&c) {
                    let (a, b) = (root(&mut parent, ix), root(&mut parent, c));
                    if a != b {
                        parent.insert(b.max(a), a.min(b));
                    }
                }
            }
        }
    }
    let count = |v: &str| {
        shapes
            .get(v)
            .map(|s| s.iter().product::<usize>() as u64)
            .unwrap_or(0)
    };
    // Per region: MACs of its heavy ops, boundary tensors (each counted once).
    let mut macs: IndexMap<NodeIndex, u64> = IndexMap::new();
    let mut boundaries: IndexMap<NodeIndex, IndexSet<String>> = IndexMap::new();
    for &ix in &members {
        let r = root(&mut parent, ix);
        let n = g.node(ix);
        *macs.entry(r).or_default() += crate::ir::facts::node_macs(n, shapes).unwrap_or(0);
        let b = boundaries.entry(r).or_default();
        for x in n.input.iter().filter(|x| plan.is_marked(x)) {
            if g.producer_node(x).is_none_or(|p| !member_set.contains(&p)) {
                b.insert(x.clone());
            }
        }
        for y in n.output.iter().filter(|y| plan.is_marked(y)) {
            // A Shape reading the value needs no DequantizeLinear where the target lets it
            // read the int8 tensor.
            let outside = g.consumers(y).iter().any(|&(c, _)| {
                let free_shape = shape_free && g.node(c).op_type() == "Shape";
                !(member_set.contains(&c) || free_shape)
            });
            if g.is_graph_output(y) || outside {
                b.insert(y.clone());
            }
        }
    }
    let mut out = Vec::new();
    for &ix in &members {
        let n = g.node(ix);
        if !matches!(n.op_type(), "Conv" | "ConvTranspose" | "Gemm" | "MatMul") {
            continue;
        }
        let r = root(&mut parent, ix);
        let values: u64 = boundaries[&r].iter().map(|t| count(t)).sum();
        let boundary_macs = (boundaries[&r].len() as u64)
            .saturating_mul(cost.fixed_macs)
            .saturating_add(cost.macs_per_value.saturating_mul(values));
        if macs[&r] < boundary_macs {
            out.push((
                ix,
                KeptFloat {
                    node: node_label(n).to_string(),
                    op: n.op_type().to_string(),
                    macs: crate::ir::facts::node_macs(n, shapes).unwrap_or(0),
                    region_macs: macs[&r],
                    values,
                    boundary_macs,
                    rule: "region",
                },
            ));
        }
    }
    out
}

/// One placement round; the heavy ops in `slow` stay float.
fn plan_once(
    g: &Graph,
    opts: &QuantizeOptions,
    policy: &Policy,
    selection: &NodeSelection,
    slow: &HashSet<NodeIndex>,
) -> Result<Plan> {
    let filter = Filter::new(opts, policy, selection)?;
    let mut plan = Plan::default();
    let dynamic = |v: &str| !v.is_empty() && g.constant(v).is_none();
    let structure = super::transformer::Structure::find(g);
    if structure.is_transformer() {
        plan.transformer = true;
        plan.notes.push(structure.describe());
    }
    for ix in g.topo_order()? {
        let n = g.node(ix);
        let (name, op) = (node_label(n).to_string(), n.op_type().to_string());
        if !crate::ir::op::is_standard_domain(n.domain()) || !filter.allows(ix, n) {
            continue;
        }
        let input = |k: usize| n.input.get(k).map(String::as_str).unwrap_or("");
        let output = n.output.first().map(String::as_str).unwrap_or("");
        let per_channel = |axis: usize| opts.per_channel.then_some(axis);
        if slow.contains(&ix) {
            continue;
        }
        let conv = matches!(op.as_str(), "Conv" | "ConvTranspose");
        // W4A8 asks for int4 Conv weights with int8 activations whatever the target.
        let cnn_convs = policy.convs_in_transformers || opts.w4a8.is_some();
        // A conv backbone's elementwise ops (activations, scalar gains, pools, residual Adds) in
        // a transformer graph take the CNN rules too where the target quantizes scalar
        // operands; its layout ops and linear layers keep the transformer table.
        let backbone_op = policy.scalar_operands
            && cnn_convs
            && !matches!(op.as_str(), "MatMul" | "Gemm")
            && !PASS_THROUGH.contains(&op.as_str())
            && !policy.pass_through.contains(&op.as_str());
        if plan.transformer && !(conv && cnn_convs) && !backbone_op {
            if transformer_rule(g, ix, &structure, opts, &mut plan)? {
                plan.nodes.push((name, op));
            }
            continue;
        }
        // `(constant input slot, value)` of an Add/Mul of a marked value and a scalar constant.
        let scalar_operand = if policy.scalar_operands && n.input.len() == 2 {
            (0..2)
                .find(|&k| g.constant(input(k)).is_some())
                .filter(|&k| plan.is_marked(input(1 - k)))
                .and_then(|k| scalar_value(g, input(k)).map(|v| (k, v)))
                .filter(|(_, v)| v.is_finite())
        } else {
            None
        };
        let quantized = match op.as_str() {
            "Mul" if !output.is_empty() && scalar_operand.is_some_and(|(_, v)| v > 0.0) => {
                let (k, v) = scalar_operand.expect("checked");
                plan.scaled
                    .insert(output.to_string(), (input(1 - k).to_string(), v));
                true
            }
            "Add" | "Mul" if scalar_operand.is_some() => {
                let (k, _) = scalar_operand.expect("checked");
                plan.constants.insert(input(k).to_string());
                mark_output(g, &mut plan, ix, &filter);
                true
            }
            "Conv" | "ConvTranspose" => {
                let (x, w, b) = (input(0), input(1), input(2));
                if !dynamic(x) || g.constant(w).is_none() {
                    false
                } else {
                    let group = n.attr_int("group")?.unwrap_or(1);
                    let axis = match (op.as_str(), group) {
                        ("Conv", _) => per_channel(0),
                        (_, 1) => per_channel(1),
                        _ => None,
                    };
                    if plan.mark_weight(g, w, axis, op != "Conv", &name) {
                        plan.mark(x);
                        if !b.is_empty() {
                            plan.mark_bias(g, b, x, w, &name);
                        }
                        mark_output(g, &mut plan, ix, &filter);
                        true
                    } else {
                        false
                    }
                }
            }
            "Gemm" => {
                let (a, b, c) = (input(0), input(1), input(2));
                let trans_b = n.attr_int("transB")?.unwrap_or(0) == 1;
                let unit = n.attr_float("alpha")?.unwrap_or(1.0) == 1.0
                    && n.attr_float("beta")?.unwrap_or(1.0) == 1.0;
                if !dynamic(a) {
                    false
                } else if dynamic(b) {
                    plan.mark(a);
                    plan.mark(b);
                    mark_output(g, &mut plan, ix, &filter);
                    true
                } else if plan.mark_weight(
                    g,
                    b,
                    per_channel(if trans_b { 0 } else { 1 }),
                    true,
                    &name,
                ) {
                    plan.mark(a);
                    let n_out = g
                        .constant(b)
                        .and_then(|t| tensor::shape(t).ok())
                        .and_then(|s| s.get(if trans_b { 0 } else { 1 }).copied());
                    let c_len = g
                        .constant(c)
                        .and_then(|t| tensor::shape(t).ok())
                        .filter(|s| s.len() == 1)
                        .map(|s| s[0]);
                    if unit && c_len.is_some() && c_len == n_out {
                        plan.mark_bias(g, c, a, b, &name);
                    }
                    mark_output(g, &mut plan, ix, &filter);
                    true
                } else {
                    false
                }
            }
            "MatMul" => {
                let (a, b) = (input(0), input(1));
                if !dynamic(a) {
                    false
                } else if dynamic(b) {
                    plan.mark(a);
                    plan.mark(b);
                    mark_output(g, &mut plan, ix, &filter);
                    true
                } else {
                    let rank = g
                        .constant(b)
                        .and_then(|t| tensor::shape(t).ok())
                        .map(|s| s.len())
                        .unwrap_or(0);
                    let axis = if rank >= 1 {
                        per_channel(rank - 1)
                    } else {
                        None
                    };
                    if plan.mark_weight(g, b, axis, true, &name) {
                        plan.mark(a);
                        mark_output(g, &mut plan, ix, &filter);
                        true
                    } else {
                        false
                    }
                }
            }
            "Add" | "Mul" if plan.is_marked(input(0)) && plan.is_marked(input(1)) => {
                mark_output(g, &mut plan, ix, &filter);
                true
            }
            "Concat" if !n.input.is_empty() && n.input.iter().all(|i| plan.is_marked(i)) => {
                plan.mark(output);
                let fused: Vec<bool> = n.input.iter().map(|i| plan.in_fused_group(i)).collect();
                let mixed = fused.iter().any(|&f| f) && !fused.iter().all(|&f| f);
                for (i, fused) in n.input.iter().zip(fused) {
                    if mixed && fused {
                        continue;
                    }
                    plan.share(output, i);
                }
                true
            }
            o if (PASS_THROUGH.contains(&o) || policy.pass_through.contains(&o))
                && plan.is_marked(input(0))
                && !output.is_empty() =>
            {
                plan.mark(output);
                plan.share(input(0), output);
                true
            }
            "Sigmoid" if plan.is_marked(input(0)) && gates_only_muls(g, output, &filter) => {
                plan.mark(output);
                true
            }
            // A fused Relu/Clip's input is never marked, so this only sees free ones.
            o if OWN_RANGE.contains(&o) && plan.is_marked(input(0)) && !output.is_empty() => {
                plan.mark(output);
                true
            }
            _ => false,
        };
        if quantized {
            plan.nodes.push((name, op));
        }
    }
    Ok(plan)
}

/// The transformer table ([`super::transformer::RULES`]) for node `ix`: marks its tensors and
/// says whether it is quantized.
fn transformer_rule(
    g: &Graph,
    ix: NodeIndex,
    structure: &super::transformer::Structure,
    opts: &QuantizeOptions,
    plan: &mut Plan,
) -> Result<bool> {
    let n = g.node(ix);
    let name = node_label(n).to_string();
    let input = |k: usize| n.input.get(k).map(String::as_str).unwrap_or("");
    let dynamic = |v: &str| !v.is_empty() && g.constant(v).is_none();
    let rank = |v: &str| {
        g.constant(v)
            .and_then(|t| tensor::shape(t).ok())
            .map(|s| s.len())
    };
    let per_channel = |axis: usize| opts.per_channel.then_some(axis);
    let (a, b) = (input(0), input(1));
    if !dynamic(a) {
        return Ok(false);
    }
    Ok(match n.op_type() {
        // Linear layer: int8 input and per-channel weight (output channels on the last axis).
        "MatMul" if rank(b) == Some(2) => {
            let marked = plan.mark_weight(g, b, per_channel(1), true, &name);
            if marked {
                plan.mark(a);
            }
            marked
        }
        "Gemm" if rank(b) == Some(2) => {
            let trans_b = n.attr_int("transB")?.unwrap_or(0) == 1;
            let axis = per_channel(if trans_b { 0 } else { 1 });
            let marked = plan.mark_weight(g, b, axis, true, &name);
            if marked {
                plan.mark(a);
            }
            marked
        }
        // Attention products: only when measured to be harmless.
        "MatMul"
            if dynamic(b) && opts.attention_int8 && structure.attention_matmuls.contains(&ix) =>
        {
            plan.mark(a);
            plan.mark(b);
            true
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Model;

    /// conv_a -> relu_a -> conv_b.
    const CHAIN: &str = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y)
<
   float[2,2,1,1] wa = {-0.25, -0.82, 0.32, 0.86},
   float[2] ba = {-0.12, 0.05},
   float[2,2,1,1] wb = {-1.21, 1.45, 1.33, -1.69},
   float[2] bb = {0.13, 0.06}
>
{
   [conv_a] a0 = Conv (x, wa, ba)
   [relu_a] a = Relu (a0)
   [conv_b] y = Conv (a, wb, bb)
}"#;

    fn graph() -> Graph {
        let proto = crate::onnx::text::parse_model(CHAIN).unwrap();
        Model::from_proto(proto).unwrap().graph
    }

    fn index(g: &Graph, name: &str) -> NodeIndex {
        g.node_indices()
            .find(|&ix| g.node(ix).name() == name)
            .unwrap()
    }

    fn sorted(items: impl IntoIterator<Item = impl ToString>) -> Vec<String> {
        let mut v: Vec<String> = items.into_iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn node_selection_quantizes_only_the_listed_nodes() {
        let g = graph();
        let opts = QuantizeOptions::default();
        let all = plan(&g, &opts, &NodeSelection::All).unwrap();
        let all_nodes = all.nodes.iter().map(|n| &n.0);
        assert_eq!(sorted(all_nodes), ["conv_a", "conv_b", "relu_a"]);
        // The fused unit conv_a + relu_a: no Q/DQ on a0.
        assert_eq!(sorted(&all.activations), ["a", "x", "y"]);

        let only_b = NodeSelection::Only([index(&g, "conv_b")].into());
        let b = plan(&g, &opts, &only_b).unwrap();
        assert_eq!(sorted(b.nodes.iter().map(|n| &n.0)), ["conv_b"]);
        assert_eq!(sorted(&b.activations), ["a", "y"]);
        assert_eq!(sorted(b.weights.keys()), ["wb"]);
        assert_eq!(sorted(b.biases.keys()), ["bb"]);

        // conv_a listed without relu_a: the Relu is not fused, conv_a's own output is marked.
        let only_a = NodeSelection::Only([index(&g, "conv_a")].into());
        let a = plan(&g, &opts, &only_a).unwrap();
        assert_eq!(sorted(a.nodes.iter().map(|n| &n.0)), ["conv_a"]);
        assert_eq!(sorted(&a.activations), ["a0", "x"]);
    }

    /// x -> conv_a -> relu_a -> HardSwish -> conv_b -> y: conv_a's output region ends at the
    /// HardSwish (no integer kernel), conv_b reads it and writes the graph output.
    const ISLAND: &str = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y)
<
   float[4,2,1,1] wa = {-0.25, -0.82, 0.32, 0.86, 0.5, -0.4, 0.3, 0.2},
   float[2,4,1,1] wb = {-1.21, 1.45, 1.33, -1.69, 0.3, 0.2, -0.1, 0.4}
>
{
   [conv_a] a0 = Conv (x, wa)
   [relu_a] a = Relu (a0)
   [hs] h = HardSwish (a)
   [conv_b] y = Conv (h, wb)
}"#;

    #[test]
    fn boundary_cost_keeps_float_the_layers_that_do_not_pay_for_their_qdq() {
        use crate::passes::target::BoundaryCost;
        let g = Model::from_proto(crate::onnx::text::parse_model(ISLAND).unwrap())
            .unwrap()
            .graph;
        let shapes: std::collections::HashMap<String, Vec<usize>> = [
            ("x", vec![1, 2, 4, 4]),
            ("a0", vec![1, 4, 4, 4]),
            ("a", vec![1, 4, 4, 4]),
            ("h", vec![1, 4, 4, 4]),
            ("y", vec![1, 2, 4, 4]),
            ("wa", vec![4, 2, 1, 1]),
            ("wb", vec![2, 4, 1, 1]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let opts = QuantizeOptions::default();
        let plan_at = |fixed_macs, macs_per_value| {
            let cost = BoundaryCost {
                fixed_macs,
                macs_per_value,
            };
            plan_seeded(
                &g,
                &opts,
                &NodeSelection::All,
                Some(&shapes),
                Some(cost),
                opts.target.policy(),
                &HashSet::new(),
            )
            .unwrap()
        };
        // Two regions split by the HardSwish: {conv_a, relu_a} and {conv_b}, 128 MACs each
        // (4 x 2 x 16 and 2 x 4 x 16), each with two boundaries of 32 + 64 = 96 values.
        let free = plan_at(0, 1);
        assert_eq!(
            sorted(free.nodes.iter().map(|n| &n.0)),
            ["conv_a", "conv_b", "relu_a"]
        );
        assert!(free.kept_float.is_empty());
        // 2 per value: 192 > 128 MACs, both stay float, and the report says why.
        let dear = plan_at(0, 2);
        assert!(dear.nodes.is_empty(), "{:?}", dear.nodes);
        assert!(dear.activations.is_empty());
        let kept: Vec<(&str, u64, u64, u64)> = dear
            .kept_float
            .iter()
            .map(|k| (k.node.as_str(), k.region_macs, k.values, k.boundary_macs))
            .collect();
        assert_eq!(kept, [("conv_a", 128, 96, 192), ("conv_b", 128, 96, 192)]);
        // A fixed cost alone: 2 x 65 = 130 > 128.
        assert!(plan_at(65, 0).nodes.is_empty());
        assert_eq!(plan_at(64, 0).nodes.len(), 3);
        // Without shapes the rule cannot judge and the generic placement stands.
        let cost = Some(BoundaryCost {
            fixed_macs: u64::MAX,
            macs_per_value: 0,
        });
        let unknown = plan_seeded(
            &g,
            &opts,
            &NodeSelection::All,
            None,
            cost,
            opts.target.policy(),
            &HashSet::new(),
        )
        .unwrap();
        assert_eq!(unknown.nodes, free.nodes);
    }

    /// conv_a -> HardSwish as the `ort` target decomposes it -> Slice -> conv_b.
    const GATED: &str = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y)
<
   float[4,2,1,1] wa = {-0.25, -0.82, 0.32, 0.86, 0.5, -0.4, 0.3, 0.2},
   float[2,4,1,1] wb = {-1.21, 1.45, 1.33, -1.69, 0.3, 0.2, -0.1, 0.4},
   float three = {3.0}, float zero = {0.0}, float six = {6.0}, float sixth = {0.16666667},
   int64[1] s0 = {0}, int64[1] s1 = {4}, int64[1] ax = {1}
>
{
   [conv_a] a = Conv (x, wa)
   [shift] s = Add (a, three)
   [clip] c = Clip (s, zero, six)
   [gain] gate = Mul (c, sixth)
   [gated] h = Mul (a, gate)
   [slice] hs = Slice (h, s0, s1, ax)
   [conv_b] y = Conv (hs, wb)
}"#;

    #[test]
    fn ort_quantizes_scalar_operands_and_absorbs_positive_gains() {
        use crate::passes::target::Target;
        let g = Model::from_proto(crate::onnx::text::parse_model(GATED).unwrap())
            .unwrap()
            .graph;
        let ort = QuantizeOptions {
            target: Target::Ort,
            ..QuantizeOptions::default()
        };
        // The ORT policy with its scalar-operand rows switched on (they are measured but off in
        // `ort`, see target.rs); no boundary cost: the rules alone.
        let int8_everywhere = Policy {
            scalar_operands: true,
            ..*Target::Ort.policy()
        };
        let p = plan_seeded(
            &g,
            &ort,
            &NodeSelection::All,
            None,
            None,
            &int8_everywhere,
            &HashSet::new(),
        )
        .unwrap();
        assert_eq!(
            sorted(p.nodes.iter().map(|n| &n.0)),
            ["clip", "conv_a", "conv_b", "gain", "gated", "shift", "slice"]
        );
        // The Clip is fused into the Add's output range; the gain is no Q/DQ pair of its own.
        assert_eq!(sorted(&p.activations), ["a", "c", "h", "hs", "x", "y"]);
        assert_eq!(p.scaled.get("gate"), Some(&("c".to_string(), 0.16666667)));
        assert_eq!(p.scaled_base("gate"), Some(("c".to_string(), 0.16666667)));
        assert_eq!(sorted(&p.constants), ["three"]);
        assert!(p.is_marked("gate"));
        // The Slice carries its input's grid.
        assert_eq!(p.group("hs"), p.group("h"));

        // `generic` keeps today's placement: no scalar operands, the Slice float.
        let defaults = QuantizeOptions::default();
        let generic = plan_seeded(
            &g,
            &defaults,
            &NodeSelection::All,
            None,
            None,
            defaults.target.policy(),
            &HashSet::new(),
        )
        .unwrap();
        assert_eq!(
            sorted(generic.nodes.iter().map(|n| &n.0)),
            ["conv_a", "conv_b"]
        );
        assert!(generic.scaled.is_empty() && generic.constants.is_empty());

        // A gain whose activation calibration left float goes, with nothing reading its scale.
        let mut settled = p.clone();
        settled.activations.shift_remove("c");
        settled.settle_scaled();
        assert!(settled.scaled.is_empty());
    }

    #[test]
    fn node_selection_equals_the_exact_name_filter() {
        let g = graph();
        let by_name = QuantizeOptions {
            include_nodes: vec!["conv_b".into()],
            ..QuantizeOptions::default()
        };
        let named = plan(&g, &by_name, &NodeSelection::All).unwrap();
        let only_b = NodeSelection::Only([index(&g, "conv_b")].into());
        let typed = plan(&g, &QuantizeOptions::default(), &only_b).unwrap();
        assert_eq!(named.activations, typed.activations);
        assert_eq!(named.weights, typed.weights);
        assert_eq!(named.biases, typed.biases);
        assert_eq!(named.nodes, typed.nodes);
    }
}
