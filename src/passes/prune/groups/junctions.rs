//! Where channel layouts meet, end and begin in the dependency-group walk.
//!
//! - Elementwise n-ary ops (Add, Sub, Mul, Div, Max, Min, Sum, Mean, PRelu) **tie** the
//!   layouts of their channel-carrying inputs (their groups merge); a constant of size C on the
//!   channel axis becomes a sliced member, an input broadcasting over channels is ignored.
//! - Concat on the channel axis lays its inputs' segments end to end (a consumer reads group
//!   channel `c` at `offset + c`); on another axis it ties the inputs.
//! - A layer (Conv/ConvTranspose with `group = 1`, Gemm, MatMul with a constant weight)
//!   consumes the input layout (input-channel slices of its weight, `block` rows per channel,
//!   are members) and starts a new group at its output; a depthwise conv carries the groups
//!   through; a grouped conv with `1 < group < C` makes them unprunable.

use super::walk::{is_float_const, Analyzer, Layout};
use super::{label, Member, Seg};
use crate::ir::layer::{Layer, LayerKind};
use crate::ir::op::Attrs;
use petgraph::stable_graph::NodeIndex;

impl Analyzer<'_> {
    /// Elementwise n-ary ops and Concat.
    pub(super) fn nary(&mut self, ix: NodeIndex) {
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

    pub(super) fn layer(&mut self, ix: NodeIndex, layer: &Layer, lay0: Option<Layout>) {
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
