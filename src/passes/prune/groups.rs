//! Dependency groups: sets of channels that must be removed together.
//!
//! A group is rooted at the output channels of a prunable producer (Conv / ConvTranspose with
//! `group = 1`, Gemm, MatMul with a constant weight). Walking the graph in topological order,
//! every value carries a *channel layout*: which axis holds channels (counted from the end, so
//! broadcasting keeps it), how many elements one channel spans on that axis (`block`: 1, or
//! `H*W` after `Flatten`), and the list of segments the axis is made of, each a whole group or a
//! run of fixed (unprunable) channels. The layout flows through:
//!
//! | op | rule |
//! |---|---|
//! | Relu, Clip, LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Tanh, Elu, Selu, Softplus, Gelu, Mish, Identity, Dropout, Cast | output = input layout |
//! | BatchNormalization, InstanceNormalization | output = input; constant scale/bias/mean/var are members (sliced) |
//! | MaxPool, AveragePool, LpPool, GlobalAveragePool, GlobalMaxPool | output = input |
//! | Pad | output = input when the channel axis gets no padding (constant pads) |
//! | Resize | output = input when a constant `scales` keeps the channel axis (not `sizes`) |
//! | Add, Sub, Mul, Div, Max, Min, Sum, Mean, PRelu | all inputs carrying channels are **tied** (their groups merge); constants of size C on the channel axis are members (sliced); inputs broadcasting over channels are ignored; any other input makes the groups unprunable |
//! | Concat on the channel axis | output segments = the inputs' segments in order (a consumer reads group channel `c` at `offset + c`); inputs without layout become fixed segments |
//! | Concat on another axis, Split/Slice not touching the channel axis, Softmax over another axis | tie inputs, output = input |
//! | Flatten(axis 1) of `[N, C, H, W]` | `block *= H*W`: channel `c` is features `[c*H*W, (c+1)*H*W)` |
//! | Conv depthwise (`group = C`, one filter per channel) | the output channels are the input channels: the conv's filters join the same groups and the layout continues |
//! | Conv/ConvTranspose (`group = 1`), Gemm, MatMul (constant weight) | consumer: input-channel slices of the weight (at the segment's offset, `block` rows per channel) are members; the output starts a new group |
//!
//! Anything else that reads a value with a layout makes its groups **unprunable** and records
//! why: grouped convs with `1 < group < C` (only whole groups could go), Split/Slice on the
//! channel axis (they take fixed channel ranges of a group; handling them needs partial groups),
//! Reshape, Transpose, Softmax over channels, unknown or custom ops, subgraph captures, and
//! graph outputs (the interface keeps its shapes). Weights that are not plain float
//! initializers (already quantized, computed at run time) also make a group unprunable.
//!
//! Invariant: every channel of a prunable group maps to exactly one index on every member's
//! axis, so removing group channel `c` from every member keeps the graph shape-consistent.

use crate::ir::layer::{Layer, LayerKind};
use crate::ir::op::Attrs;
use crate::ir::Graph;
use crate::onnx::tensor;
use crate::onnx::proto::tensor_proto::DataType;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;
use std::fmt::Write;

/// Fully known shapes of values by name (activations and initializers).
pub type Shapes = HashMap<String, Vec<usize>>;

/// A run of channels on a channel axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// All channels of a group, in group order.
    Group(usize),
    /// Channels that cannot be pruned (graph input, unknown producer...).
    Fixed(usize),
}

/// One place where a group's channels live.
#[derive(Debug, Clone, PartialEq)]
pub enum Member {
    /// The root: output channels of a Conv/ConvTranspose/Gemm/MatMul (weight `axis`, bias).
    Producer {
        node: NodeIndex,
        weight: String,
        axis: usize,
        bias: Option<String>,
    },
    /// A depthwise conv carrying the channels through (filters at `offset + c`, bias, `group`).
    Depthwise {
        node: NodeIndex,
        weight: String,
        bias: Option<String>,
        offset: usize,
    },
    /// A layer reading the channels: weight input-axis indices `(offset + c) * block + k`.
    Consumer {
        node: NodeIndex,
        input: String,
        weight: String,
        axis: usize,
        offset: usize,
        block: usize,
    },
    /// A per-channel constant input of a node (BN params, per-channel Mul/Add constants).
    Param {
        node: NodeIndex,
        slot: usize,
        tensor: String,
        axis: usize,
        offset: usize,
        block: usize,
    },
    /// An activation whose channel axis shrinks (its value_info is fixed on apply).
    Value {
        name: String,
        axis_from_end: usize,
        offset: usize,
        block: usize,
    },
}

/// Channels that must be removed together.
#[derive(Debug, Clone)]
pub struct Group {
    /// Position in the list returned by [`dependency_groups`].
    pub id: usize,
    pub channels: usize,
    pub members: Vec<Member>,
    /// Why the group cannot be pruned (empty: prunable).
    pub unprunable: Vec<String>,
}

impl Group {
    pub fn prunable(&self) -> bool {
        self.unprunable.is_empty()
    }
}

/// A Conv/ConvTranspose/Gemm/MatMul with the channel segments it reads and writes (for the
/// MAC model of the planner).
#[derive(Debug, Clone)]
pub struct Heavy {
    pub node: NodeIndex,
    pub inputs: Vec<Seg>,
    pub outputs: Vec<Seg>,
    /// Depthwise: one MAC block per channel (inputs == outputs).
    pub depthwise: bool,
}

/// The result of the analysis: groups (final ids) and the heavy nodes.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub groups: Vec<Group>,
    pub heavy: Vec<Heavy>,
}

#[derive(Debug, Clone, PartialEq)]
struct Layout {
    from_end: usize,
    block: usize,
    segs: Vec<Seg>,
}

struct Raw {
    channels: usize,
    members: Vec<Member>,
    reasons: Vec<String>,
}

struct Analyzer<'a> {
    graph: &'a Graph,
    shapes: &'a Shapes,
    raw: Vec<Raw>,
    parent: Vec<usize>,
    layouts: HashMap<String, Layout>,
    heavy: Vec<(NodeIndex, Vec<Seg>, Vec<Seg>, bool)>,
}

/// `op 'name'` for messages (the first output when the node has no name).
pub fn label(graph: &Graph, ix: NodeIndex) -> String {
    let n = graph.node(ix);
    let name = if n.name().is_empty() {
        n.output.first().map(String::as_str).unwrap_or("")
    } else {
        n.name()
    };
    format!("{} '{}'", n.op_type(), name)
}

fn is_float_const(graph: &Graph, name: &str) -> bool {
    graph
        .constant(name)
        .is_some_and(|t| tensor::data_type(t).ok() == Some(DataType::Float))
}

const UNARY: &[&str] = &[
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Gelu",
    "Mish",
    "Identity",
    "Dropout",
    "Cast",
    "Abs",
    "Neg",
];
const POOL: &[&str] = &[
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
];
const BINARY: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu",
];

impl<'a> Analyzer<'a> {
    fn find(&mut self, mut g: usize) -> usize {
        while self.parent[g] != g {
            self.parent[g] = self.parent[self.parent[g]];
            g = self.parent[g];
        }
        g
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            // Keep the older root so ids follow creation order.
            let (lo, hi) = (a.min(b), a.max(b));
            self.parent[hi] = lo;
        }
    }

    fn new_group(&mut self, channels: usize) -> usize {
        self.raw.push(Raw {
            channels,
            members: Vec::new(),
            reasons: Vec::new(),
        });
        self.parent.push(self.raw.len() - 1);
        self.raw.len() - 1
    }

    fn seg_size(&self, s: &Seg) -> usize {
        match *s {
            Seg::Group(g) => self.raw[g].channels,
            Seg::Fixed(n) => n,
        }
    }

    fn width(&self, segs: &[Seg]) -> usize {
        segs.iter().map(|s| self.seg_size(s)).sum()
    }

    /// `(group, offset)` for each group segment.
    fn group_offsets(&self, segs: &[Seg]) -> Vec<(usize, usize)> {
        let mut off = 0;
        let mut out = Vec::new();
        for s in segs {
            if let Seg::Group(g) = *s {
                out.push((g, off));
            }
            off += self.seg_size(s);
        }
        out
    }

    fn block_layout(&mut self, layout: &Layout, reason: &str) {
        for (g, _) in self.group_offsets(&layout.segs) {
            if !self.raw[g].reasons.iter().any(|r| r == reason) {
                self.raw[g].reasons.push(reason.to_string());
            }
        }
    }

    fn block_value(&mut self, value: &str, reason: &str) {
        if let Some(l) = self.layouts.get(value).cloned() {
            self.block_layout(&l, reason);
        }
    }

    fn set_layout(&mut self, value: &str, layout: Layout) {
        if value.is_empty() {
            return;
        }
        for (g, offset) in self.group_offsets(&layout.segs) {
            self.raw[g].members.push(Member::Value {
                name: value.to_string(),
                axis_from_end: layout.from_end,
                offset,
                block: layout.block,
            });
        }
        self.layouts.insert(value.to_string(), layout);
    }

    fn rank(&self, value: &str) -> Option<usize> {
        self.shapes.get(value).map(Vec::len)
    }

    /// Tie several layouts: same axis and segment structure, groups merged pairwise.
    fn tie(&mut self, layouts: &[Layout], what: &str) -> bool {
        let first = &layouts[0];
        let mut ok = true;
        for l in &layouts[1..] {
            if l.from_end != first.from_end
                || l.block != first.block
                || l.segs.len() != first.segs.len()
            {
                ok = false;
                break;
            }
            for (a, b) in first.segs.iter().zip(&l.segs) {
                if self.seg_size(a) != self.seg_size(b) {
                    ok = false;
                }
            }
        }
        if !ok {
            let reason =
                format!("{what} ties channels laid out differently (concat/axis mismatch)");
            for l in layouts {
                self.block_layout(l, &reason);
            }
            return false;
        }
        for l in &layouts[1..] {
            for (a, b) in first.segs.clone().iter().zip(&l.segs) {
                match (*a, *b) {
                    (Seg::Group(x), Seg::Group(y)) => self.union(x, y),
                    (Seg::Group(x), Seg::Fixed(_)) | (Seg::Fixed(_), Seg::Group(x)) => {
                        let r = format!("{what} ties them to fixed channels");
                        if !self.raw[x].reasons.contains(&r) {
                            self.raw[x].reasons.push(r);
                        }
                    }
                    _ => {}
                }
            }
        }
        true
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let graph = self.graph;
        for ix in graph.topo_order()? {
            self.node(ix);
            // Subgraph captures of channel-carrying values.
            let captured: Vec<String> = crate::ir::graph::subgraphs(graph.node(ix))
                .flat_map(crate::ir::graph::free_names)
                .collect();
            for name in captured {
                let reason = format!("captured by the subgraph of {}", label(graph, ix));
                self.block_value(&name, &reason);
            }
        }
        for o in &graph.outputs {
            let reason = format!("reaches graph output '{}'", o.name());
            self.block_value(o.name(), &reason);
        }
        Ok(())
    }

    fn unknown(&mut self, ix: NodeIndex, why: &str) {
        let node = self.graph.node(ix);
        let reason = if why.is_empty() {
            format!("read by {}", label(self.graph, ix))
        } else {
            format!("read by {}: {why}", label(self.graph, ix))
        };
        for i in node.input.clone() {
            self.block_value(&i, &reason);
        }
    }

    fn node(&mut self, ix: NodeIndex) {
        let graph = self.graph;
        let node = graph.node(ix);
        let op = node.op_type();
        let std = crate::ir::op::is_standard_domain(node.domain());
        let in0 = node.input.first().cloned().unwrap_or_default();
        let lay0 = self.layouts.get(&in0).cloned();
        if !std {
            self.unknown(ix, "custom op");
            return;
        }
        if let Some(layer) = Layer::of(graph, ix) {
            self.layer(ix, &layer, lay0);
            return;
        }
        if matches!(op, "Conv" | "ConvTranspose" | "Gemm" | "MatMul") {
            self.unknown(ix, "weight is not a constant (or unsupported attributes)");
            return;
        }
        let Some(lay0) = lay0 else {
            // Channel layouts enter only through input 0 for the ops below, except the
            // n-ary ones.
            if BINARY.contains(&op) || op == "Concat" {
                self.nary(ix);
            } else {
                self.unknown(ix, "");
            }
            return;
        };
        let out0 = node.output.first().cloned().unwrap_or_default();
        if UNARY.contains(&op) {
            for o in node.output.clone() {
                self.set_layout(&o, lay0.clone());
            }
            return;
        }
        match op {
            "BatchNormalization" | "InstanceNormalization" => {
                let nparams = if op == "BatchNormalization" { 4 } else { 2 };
                let rank = self.rank(&in0).unwrap_or(lay0.from_end + 2);
                let params_ok = (1..=nparams)
                    .all(|s| node.input.get(s).is_some_and(|p| is_float_const(graph, p)));
                if lay0.from_end + 2 != rank || lay0.block != 1 {
                    self.unknown(ix, "channel axis is not axis 1");
                } else if !params_ok {
                    self.unknown(ix, "parameters are not float constants");
                } else if node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()) {
                    self.unknown(ix, "training-mode outputs");
                } else {
                    for (g, offset) in self.group_offsets(&lay0.segs) {
                        for slot in 1..=nparams {
                            self.raw[g].members.push(Member::Param {
                                node: ix,
                                slot,
                                tensor: node.input[slot].clone(),
                                axis: 0,
                                offset,
                                block: 1,
                            });
                        }
                    }
                    self.set_layout(&out0, lay0);
                }
            }
            _ if POOL.contains(&op) => {
                if node.output.get(1).is_some_and(|o| !o.is_empty()) {
                    self.unknown(ix, "MaxPool indices output");
                } else {
                    self.set_layout(&out0, lay0);
                }
            }
            "Pad" => {
                let pads: Option<Vec<i64>> = match node.input.get(1).filter(|s| !s.is_empty()) {
                    Some(p) => graph.constant(p).and_then(|t| tensor::to_i64(t).ok()),
                    None => node.attr_ints("pads").ok().flatten(),
                };
                let has_axes = node.input.get(3).is_some_and(|s| !s.is_empty());
                let ok = match pads {
                    Some(p) if !has_axes && p.len() % 2 == 0 && p.len() / 2 > lay0.from_end => {
                        let rank = p.len() / 2;
                        let axis = rank - 1 - lay0.from_end;
                        p[axis] == 0 && p[axis + rank] == 0
                    }
                    _ => false,
                };
                if ok {
                    self.set_layout(&out0, lay0);
                } else {
                    self.unknown(ix, "channel padding or non-constant pads");
                }
            }
            "Resize" => {
                let scales = node
                    .input
                    .get(2)
                    .filter(|s| !s.is_empty())
                    .and_then(|s| graph.constant(s))
                    .and_then(|t| tensor::to_f32(t).ok());
                let has_sizes = node.input.get(3).is_some_and(|s| !s.is_empty());
                let ok = match scales {
                    Some(s) if !has_sizes && s.len() > lay0.from_end => s
                        .as_slice()
                        .map(|v| v[v.len() - 1 - lay0.from_end] == 1.0)
                        .unwrap_or(false),
                    _ => false,
                };
                if ok {
                    self.set_layout(&out0, lay0);
                } else {
                    self.unknown(ix, "not a constant-scales resize keeping channels");
                }
            }
            "Flatten" => {
                let axis = node.attr_int("axis").ok().flatten().unwrap_or(1);
                let shape = self.shapes.get(&in0).cloned();
                match shape {
                    Some(s) if axis == 1 && lay0.from_end + 2 == s.len() => {
                        let spatial: usize = s[2..].iter().product();
                        self.set_layout(
                            &out0,
                            Layout {
                                from_end: 0,
                                block: lay0.block * spatial,
                                segs: lay0.segs,
                            },
                        );
                    }
                    _ => self.unknown(
                        ix,
                        "not a Flatten(axis=1) with known shape after the channel axis",
                    ),
                }
            }
            "Split" | "Slice" | "Softmax" | "LogSoftmax" => self.axis_op(ix, lay0),
            _ if BINARY.contains(&op) || op == "Concat" => self.nary(ix),
            _ => self.unknown(ix, ""),
        }
    }

    /// Split/Slice/Softmax: fine when they do not touch the channel axis.
    fn axis_op(&mut self, ix: NodeIndex, lay0: Layout) {
        let graph = self.graph;
        let node = graph.node(ix);
        let op = node.op_type();
        let rank = node.input.first().and_then(|i| self.rank(i));
        let Some(rank) = rank else {
            self.unknown(ix, "unknown rank");
            return;
        };
        let chan = (rank - 1 - lay0.from_end.min(rank - 1)) as i64;
        let norm = |a: i64| if a < 0 { a + rank as i64 } else { a };
        let axes: Option<Vec<i64>> = match op {
            "Split" => Some(vec![node.attr_int("axis").ok().flatten().unwrap_or(0)]),
            "Softmax" | "LogSoftmax" => {
                Some(vec![node.attr_int("axis").ok().flatten().unwrap_or(-1)])
            }
            _ => match node.input.get(3).filter(|s| !s.is_empty()) {
                Some(a) => graph.constant(a).and_then(|t| tensor::to_i64(t).ok()),
                None => Some((0..rank as i64).collect()),
            },
        };
        match axes {
            Some(axes) if !axes.iter().any(|&a| norm(a) == chan) => {
                for o in node.output.clone() {
                    self.set_layout(&o, lay0.clone());
                }
            }
            Some(_) => {
                let why = match op {
                    "Split" | "Slice" => {
                        "takes fixed channel ranges on the channel axis (partial groups not handled)"
                    }
                    _ => "normalizes over the channel axis",
                };
                self.unknown(ix, why)
            }
            None => self.unknown(ix, "non-constant axes"),
        }
    }

    /// Elementwise n-ary ops and Concat.
    fn nary(&mut self, ix: NodeIndex) {
        let graph = self.graph;
        let node = graph.node(ix);
        let op = node.op_type();
        let what = label(graph, ix);
        let inputs: Vec<String> = node.input.clone();
        let layouts: Vec<(usize, Layout)> = inputs
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.layouts.get(n).cloned().map(|l| (i, l)))
            .collect();
        let out0 = node.output.first().cloned().unwrap_or_default();
        let Some((_, first)) = layouts.first().cloned() else {
            return; // no channel layout involved
        };
        if op == "Concat" {
            let rank = self
                .rank(&out0)
                .or_else(|| self.rank(&inputs[layouts[0].0]));
            let axis = node.attr_int("axis").ok().flatten().unwrap_or(0);
            let from_end = rank.and_then(|r| {
                let a = if axis < 0 { axis + r as i64 } else { axis };
                (a >= 0 && (a as usize) < r).then(|| r - 1 - a as usize)
            });
            if from_end == Some(first.from_end) {
                let mut segs = Vec::new();
                for name in &inputs {
                    match self.layouts.get(name) {
                        Some(l) if l.block == 1 && l.from_end == first.from_end => {
                            segs.extend(l.segs.iter().copied())
                        }
                        Some(_) => {
                            self.unknown(ix, "inputs with different channel layouts");
                            return;
                        }
                        None => match self.shapes.get(name) {
                            Some(s) if s.len() > first.from_end => {
                                segs.push(Seg::Fixed(s[s.len() - 1 - first.from_end]))
                            }
                            _ => {
                                self.unknown(ix, "an input of unknown shape");
                                return;
                            }
                        },
                    }
                }
                if first.block != 1 {
                    self.unknown(ix, "concat of flattened channels");
                    return;
                }
                self.set_layout(
                    &out0,
                    Layout {
                        from_end: first.from_end,
                        block: 1,
                        segs,
                    },
                );
                return;
            }
            if from_end.is_none() {
                self.unknown(ix, "unknown rank");
                return;
            }
            // Concat along another axis: inputs tie like an elementwise op.
        }
        // Check the inputs without a layout.
        let width = self.width(&first.segs) * first.block;
        for (i, name) in inputs.iter().enumerate() {
            if name.is_empty() || layouts.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let shape = self.shapes.get(name).cloned();
            let chan_dim = shape.as_ref().map(|s| {
                if s.len() > first.from_end {
                    s[s.len() - 1 - first.from_end]
                } else {
                    1
                }
            });
            match chan_dim {
                Some(1) if op != "Concat" => {}
                Some(d) if d == width && op != "Concat" && is_float_const(graph, name) => {
                    let s = shape.unwrap_or_default();
                    for (g, offset) in self.group_offsets(&first.segs) {
                        self.raw[g].members.push(Member::Param {
                            node: ix,
                            slot: i,
                            tensor: name.clone(),
                            axis: s.len() - 1 - first.from_end,
                            offset,
                            block: first.block,
                        });
                    }
                }
                _ => {
                    let reason = format!(
                        "{what} ties them to '{name}' (not a per-channel constant, no channel layout)"
                    );
                    for (_, l) in &layouts {
                        self.block_layout(l, &reason);
                    }
                }
            }
        }
        let ls: Vec<Layout> = layouts.iter().map(|(_, l)| l.clone()).collect();
        self.tie(&ls, &what);
        for o in node.output.clone() {
            self.set_layout(&o, first.clone());
        }
    }

    fn layer(&mut self, ix: NodeIndex, layer: &Layer, lay0: Option<Layout>) {
        let graph = self.graph;
        let node = graph.node(ix);
        let in0 = node.input[0].clone();
        let out0 = node.output.first().cloned().unwrap_or_default();
        let float_ok = is_float_const(graph, &layer.weight)
            && layer.bias.as_ref().is_none_or(|b| is_float_const(graph, b));
        let wrank = layer.weight_shape.len();
        let (in_from_end, out_from_end) = match layer.kind {
            LayerKind::Conv { .. } | LayerKind::ConvTranspose { .. } => (wrank - 2, wrank - 2),
            _ => (0, 0),
        };
        let in_segs = lay0
            .as_ref()
            .map(|l| l.segs.clone())
            .unwrap_or_else(|| vec![Seg::Fixed(layer.in_channels())]);
        let group = layer.group();
        let depthwise = layer.is_depthwise() && layer.out_channels() == layer.in_channels();
        if depthwise {
            self.heavy.push((ix, in_segs.clone(), in_segs, true));
            let Some(l) = lay0 else { return };
            if l.from_end != in_from_end || l.block != 1 {
                self.block_layout(
                    &l,
                    &format!("read by {}: channel axis mismatch", label(graph, ix)),
                );
                return;
            }
            if !float_ok {
                self.block_layout(&l, &format!("{} has non-float weights", label(graph, ix)));
            }
            for (g, offset) in self.group_offsets(&l.segs) {
                self.raw[g].members.push(Member::Depthwise {
                    node: ix,
                    weight: layer.weight.clone(),
                    bias: layer.bias.clone(),
                    offset,
                });
            }
            self.set_layout(&out0, l);
            return;
        }
        let g = self.new_group(layer.out_channels());
        self.heavy.push((ix, in_segs, vec![Seg::Group(g)], false));
        self.raw[g].members.push(Member::Producer {
            node: ix,
            weight: layer.weight.clone(),
            axis: layer.out_axis(),
            bias: layer.bias.clone(),
        });
        if group > 1 {
            self.raw[g].reasons.push(format!(
                "produced by grouped {} (group={group}; only whole groups could be removed)",
                label(graph, ix)
            ));
        }
        if !float_ok {
            self.raw[g]
                .reasons
                .push(format!("{} has non-float weights", label(graph, ix)));
        }
        if let Some(l) = lay0 {
            if group > 1 {
                self.block_layout(
                    &l,
                    &format!(
                        "read by grouped {} (group={group}; only whole groups could be removed)",
                        label(graph, ix)
                    ),
                );
            } else if l.from_end != in_from_end || (in_from_end > 0 && l.block != 1) {
                self.block_layout(
                    &l,
                    &format!("read by {}: channel axis mismatch", label(graph, ix)),
                );
            } else {
                if !float_ok {
                    self.block_layout(&l, &format!("{} has non-float weights", label(graph, ix)));
                }
                for (gr, offset) in self.group_offsets(&l.segs) {
                    self.raw[gr].members.push(Member::Consumer {
                        node: ix,
                        input: in0.clone(),
                        weight: layer.weight.clone(),
                        axis: layer.in_axis(),
                        offset,
                        block: l.block,
                    });
                }
            }
        }
        self.set_layout(
            &out0,
            Layout {
                from_end: out_from_end,
                block: 1,
                segs: vec![Seg::Group(g)],
            },
        );
    }
}

/// Full analysis: groups (in order of their first producer) and heavy nodes.
pub fn analyze(graph: &Graph, shapes: &Shapes) -> anyhow::Result<Analysis> {
    let mut a = Analyzer {
        graph,
        shapes,
        raw: Vec::new(),
        parent: Vec::new(),
        layouts: HashMap::new(),
        heavy: Vec::new(),
    };
    a.run()?;
    let n = a.raw.len();
    let mut final_id: HashMap<usize, usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    for r in 0..n {
        let root = a.find(r);
        let id = *final_id.entry(root).or_insert_with(|| {
            groups.push(Group {
                id: groups.len(),
                channels: a.raw[root].channels,
                members: Vec::new(),
                unprunable: Vec::new(),
            });
            groups.len() - 1
        });
        let raw = &mut a.raw[r];
        groups[id].members.append(&mut raw.members);
        for reason in raw.reasons.drain(..) {
            if !groups[id].unprunable.contains(&reason) {
                groups[id].unprunable.push(reason);
            }
        }
    }
    let map_seg = |s: &Seg, a: &mut Analyzer| match *s {
        Seg::Group(g) => Seg::Group(final_id[&a.find(g)]),
        f => f,
    };
    let heavy = std::mem::take(&mut a.heavy)
        .into_iter()
        .map(|(node, i, o, depthwise)| Heavy {
            node,
            inputs: i.iter().map(|s| map_seg(s, &mut a)).collect(),
            outputs: o.iter().map(|s| map_seg(s, &mut a)).collect(),
            depthwise,
        })
        .collect();
    // Members may repeat when a value is tied to itself (Mul(x, Sigmoid(x))).
    for g in &mut groups {
        let mut seen: Vec<Member> = Vec::new();
        for m in g.members.drain(..) {
            if !seen.contains(&m) {
                seen.push(m);
            }
        }
        g.members = seen;
    }
    Ok(Analysis { groups, heavy })
}

/// The dependency groups of a graph (see the module docs). `shapes` must hold the fully known
/// shapes of activations (Flatten, Concat and broadcast checks need them); a missing shape
/// makes the affected groups unprunable, never wrong.
pub fn dependency_groups(graph: &Graph, shapes: &Shapes) -> anyhow::Result<Vec<Group>> {
    Ok(analyze(graph, shapes)?.groups)
}

/// A deterministic, line-oriented description of groups (for snapshots and reports).
pub fn describe_groups(graph: &Graph, groups: &[Group]) -> String {
    let mut s = String::new();
    for g in groups {
        let status = if g.prunable() {
            "prunable".to_string()
        } else {
            format!("unprunable: {}", g.unprunable.join("; "))
        };
        let _ = writeln!(s, "group {}: {} channels, {status}", g.id, g.channels);
        let mut values = Vec::new();
        for m in &g.members {
            match m {
                Member::Producer {
                    node,
                    weight,
                    axis,
                    bias,
                } => {
                    let _ = writeln!(
                        s,
                        "  producer  {} weight '{weight}' axis {axis}{}",
                        label(graph, *node),
                        bias.as_ref()
                            .map(|b| format!(", bias '{b}'"))
                            .unwrap_or_default()
                    );
                }
                Member::Depthwise {
                    node,
                    weight,
                    offset,
                    ..
                } => {
                    let _ = writeln!(
                        s,
                        "  depthwise {} weight '{weight}' at {offset}",
                        label(graph, *node)
                    );
                }
                Member::Consumer {
                    node,
                    weight,
                    axis,
                    offset,
                    block,
                    ..
                } => {
                    let blk = if *block > 1 {
                        format!(" x{block}")
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        s,
                        "  consumer  {} weight '{weight}' axis {axis} at {offset}{blk}",
                        label(graph, *node)
                    );
                }
                Member::Param {
                    node,
                    slot,
                    tensor,
                    axis,
                    offset,
                    ..
                } => {
                    let _ = writeln!(
                        s,
                        "  param     {} input {slot} '{tensor}' axis {axis} at {offset}",
                        label(graph, *node)
                    );
                }
                Member::Value { name, offset, .. } => values.push(if *offset > 0 {
                    format!("{name}@{offset}")
                } else {
                    name.clone()
                }),
            }
        }
        if !values.is_empty() {
            let _ = writeln!(s, "  values    {}", values.join(", "));
        }
    }
    s
}
