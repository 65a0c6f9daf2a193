//! The walk of the dependency-group analysis: every value gets a channel layout (the axis
//! counted from the end, the `block` of elements per channel, the segments the axis is made
//! of), propagated in topological order by the per-op rules of the module docs.
//!
//! Raw groups are created at producers and merged by union-find when ops tie their channels
//! together (`find` with path halving; `union` keeps the older root, so final ids follow
//! creation order). A value whose layout reaches an op with no rule, a graph output or a
//! subgraph capture makes its groups unprunable with the reason recorded.

use super::{label, Member, Seg, Shapes};
use crate::ir::layer::Layer;
use crate::ir::op::Attrs;
use crate::ir::Graph;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::tensor;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Layout {
    pub(super) from_end: usize,
    pub(super) block: usize,
    pub(super) segs: Vec<Seg>,
}

pub(super) struct Raw {
    pub(super) channels: usize,
    pub(super) members: Vec<Member>,
    pub(super) reasons: Vec<String>,
}

pub(super) struct Analyzer<'a> {
    pub(super) graph: &'a Graph,
    pub(super) shapes: &'a Shapes,
    pub(super) raw: Vec<Raw>,
    pub(super) parent: Vec<usize>,
    pub(super) layouts: HashMap<String, Layout>,
    pub(super) heavy: Vec<(NodeIndex, Vec<Seg>, Vec<Seg>, bool)>,
}

pub(super) fn is_float_const(graph: &Graph, name: &str) -> bool {
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
    pub(super) fn find(&mut self, mut g: usize) -> usize {
        while self.parent[g] != g {
            self.parent[g] = self.parent[self.parent[g]];
            g = self.parent[g];
        }
        g
    }

    pub(super) fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            // Keep the older root so ids follow creation order.
            let (lo, hi) = (a.min(b), a.max(b));
            self.parent[hi] = lo;
        }
    }

    pub(super) fn new_group(&mut self, channels: usize) -> usize {
        self.raw.push(Raw {
            channels,
            members: Vec::new(),
            reasons: Vec::new(),
        });
        self.parent.push(self.raw.len() - 1);
        self.raw.len() - 1
    }

    pub(super) fn seg_size(&self, s: &Seg) -> usize {
        match *s {
            Seg::Group(g) => self.raw[g].channels,
            Seg::Fixed(n) => n,
        }
    }

    pub(super) fn width(&self, segs: &[Seg]) -> usize {
        segs.iter().map(|s| self.seg_size(s)).sum()
    }

    /// `(group, offset)` for each group segment.
    pub(super) fn group_offsets(&self, segs: &[Seg]) -> Vec<(usize, usize)> {
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

    pub(super) fn block_layout(&mut self, layout: &Layout, reason: &str) {
        for (g, _) in self.group_offsets(&layout.segs) {
            if !self.raw[g].reasons.iter().any(|r| r == reason) {
                self.raw[g].reasons.push(reason.to_string());
            }
        }
    }

    pub(super) fn block_value(&mut self, value: &str, reason: &str) {
        if let Some(l) = self.layouts.get(value).cloned() {
            self.block_layout(&l, reason);
        }
    }

    pub(super) fn set_layout(&mut self, value: &str, layout: Layout) {
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

    pub(super) fn rank(&self, value: &str) -> Option<usize> {
        self.shapes.get(value).map(Vec::len)
    }

    /// Tie several layouts: same axis and segment structure, groups merged pairwise.
    pub(super) fn tie(&mut self, layouts: &[Layout], what: &str) -> bool {
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

    pub(super) fn run(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn unknown(&mut self, ix: NodeIndex, why: &str) {
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

    pub(super) fn node(&mut self, ix: NodeIndex) {
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
    pub(super) fn axis_op(&mut self, ix: NodeIndex, lay0: Layout) {
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
}
