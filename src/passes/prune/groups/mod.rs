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
//!
//! # Files
//!
//! This file holds the result types and assembles the groups: `walk` carries the channel
//! layouts through the graph in topological order (union-find over raw groups, the per-op
//! rules above), `junctions` handles the ops where layouts meet (elementwise n-ary ops,
//! Concat) and where they end and begin (layers), `describe` prints groups for snapshots.

mod describe;
mod junctions;
mod walk;

use crate::ir::Graph;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

pub use describe::describe_groups;
use walk::Analyzer;

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
