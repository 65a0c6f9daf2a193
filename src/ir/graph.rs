//! The graph IR: ONNX nodes on a `petgraph::StableDiGraph`.
//!
//! ONNX wires values by name; the IR keeps each node's `NodeProto` verbatim (names, attributes,
//! doc strings, metadata, unknown domains all survive untouched) and derives the dataflow edges
//! from the names. An edge `a -> b` carries `(from_slot, to)`: output `from_slot` of `a` feeds
//! input slot `to` of `b` (or is captured by one of `b`'s subgraphs). Graph inputs and
//! initializers are values without a producing node. Node indices are stable across removals,
//! but hold none across a [`Patch`]: [`Graph::apply`] re-derives edges and lookups.
//!
//! Node order on export: every node carries an order key; export emits a topological order that
//! prefers the smallest key, so an untouched graph comes back in its original order and new
//! nodes land next to the node they were anchored to.

use crate::ir::op;
use crate::onnx::proto::{
    attribute_proto::AttributeType, GraphProto, NodeProto, TensorProto, ValueInfoProto,
};
use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

/// Where an edge enters its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InSlot {
    /// The node's positional input.
    Arg(usize),
    /// Read by name inside one of the node's subgraphs (If/Loop/Scan bodies).
    Capture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub from_slot: usize,
    pub to: InSlot,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub proto: NodeProto,
    /// Export order preference: (original position or anchor's, insertion sequence).
    order: (u64, u64),
}

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Op(NodeIndex, usize),
    Input,
    Initializer,
    /// Defined in an enclosing graph (only inside subgraphs).
    Outer,
}

#[derive(Debug, Clone)]
pub struct Graph {
    dag: StableDiGraph<Node, Wire>,
    producers: HashMap<String, (NodeIndex, usize)>,
    consumers: HashMap<String, Vec<(NodeIndex, InSlot)>>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    pub value_info: Vec<ValueInfoProto>,
    pub initializers: IndexMap<String, TensorProto>,
    /// Everything else of the GraphProto (name, doc string, sparse initializers, quantization
    /// annotations, metadata), kept verbatim; its node/initializer/io lists are empty.
    pub shell: GraphProto,
    /// Names visible from enclosing graphs (empty for the main graph).
    outer: HashSet<String>,
    /// Values removed by passes: their stale value_info is dropped on export.
    dropped_values: HashSet<String>,
    next_seq: u64,
}

/// A rewrite, applied atomically by [`Graph::apply`]: add nodes, remove nodes, redirect every
/// use of one value to another ("shunt"), and add or replace initializers.
#[derive(Debug, Default, Clone)]
pub struct Patch {
    pub add: Vec<NodeProto>,
    pub remove: Vec<NodeIndex>,
    /// `(old, new)`: every consumer of `old` (and a graph output named `old`) reads `new`.
    pub shunts: Vec<(String, String)>,
    pub initializers: Vec<TensorProto>,
    /// New nodes are placed in export order right after this node (default: first removed).
    pub anchor: Option<NodeIndex>,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.remove.is_empty()
            && self.shunts.is_empty()
            && self.initializers.is_empty()
    }
}

/// Names a graph reads from enclosing scopes, i.e. used inside it (or its own subgraphs) but
/// defined nowhere in it.
pub fn free_names(g: &GraphProto) -> BTreeSet<String> {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.input.iter().map(|v| v.name()));
    defined.extend(g.initializer.iter().map(|t| t.name()));
    defined.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name())),
    );
    defined.extend(
        g.node
            .iter()
            .flat_map(|n| n.output.iter().map(|s| s.as_str())),
    );
    let mut free = BTreeSet::new();
    for n in &g.node {
        for i in &n.input {
            if !i.is_empty() && !defined.contains(i.as_str()) {
                free.insert(i.clone());
            }
        }
        for sub in subgraphs(n) {
            for name in free_names(sub) {
                if !defined.contains(name.as_str()) {
                    free.insert(name);
                }
            }
        }
    }
    free
}

/// The subgraphs held in a node's attributes.
pub fn subgraphs(n: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    n.attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
}

fn subgraphs_mut(n: &mut NodeProto) -> impl Iterator<Item = &mut GraphProto> {
    n.attribute
        .iter_mut()
        .flat_map(|a| a.g.iter_mut().chain(a.graphs.iter_mut()))
}

/// Rename uses of a free (outer-scope) name inside a subgraph, respecting shadowing.
fn rename_free_uses(g: &mut GraphProto, old: &str, new: &str) {
    let shadowed = g.input.iter().any(|v| v.name() == old)
        || g.initializer.iter().any(|t| t.name() == old)
        || g.node.iter().any(|n| n.output.iter().any(|o| o == old));
    if shadowed {
        return;
    }
    for n in &mut g.node {
        for i in n.input.iter_mut() {
            if i == old {
                *i = new.to_string();
            }
        }
        for sub in subgraphs_mut(n) {
            rename_free_uses(sub, old, new);
        }
    }
}

impl Graph {
    /// Build the IR of a graph. `outer` holds names defined in enclosing graphs.
    pub fn from_proto(mut gp: GraphProto, outer: HashSet<String>) -> Result<Graph> {
        let nodes = std::mem::take(&mut gp.node);
        let mut initializers = IndexMap::new();
        for t in std::mem::take(&mut gp.initializer) {
            let name = t.name().to_string();
            if name.is_empty() {
                bail!("an initializer has no name");
            }
            if initializers.insert(name.clone(), t).is_some() {
                bail!("initializer '{name}' is defined twice");
            }
        }
        let mut g = Graph {
            dag: StableDiGraph::with_capacity(nodes.len(), nodes.len() * 2),
            producers: HashMap::new(),
            consumers: HashMap::new(),
            inputs: std::mem::take(&mut gp.input),
            outputs: std::mem::take(&mut gp.output),
            value_info: std::mem::take(&mut gp.value_info),
            initializers,
            shell: gp,
            outer,
            dropped_values: HashSet::new(),
            next_seq: 1,
        };
        for (i, proto) in nodes.into_iter().enumerate() {
            g.dag.add_node(Node {
                proto,
                order: (i as u64, 0),
            });
        }
        g.reindex()?;
        g.check()?;
        Ok(g)
    }

    /// Export as a GraphProto in a stable topological order.
    pub fn to_proto(&self) -> Result<GraphProto> {
        let mut gp = self.shell.clone();
        gp.node = self
            .topo_order()?
            .into_iter()
            .map(|i| self.dag[i].proto.clone())
            .collect();
        gp.initializer = self.initializers.values().cloned().collect();
        gp.input = self.inputs.clone();
        gp.output = self.outputs.clone();
        gp.value_info = self
            .value_info
            .iter()
            .filter(|v| !self.dropped_values.contains(v.name()) || self.is_defined(v.name()))
            .cloned()
            .collect();
        Ok(gp)
    }

    /// Re-derive producers, consumers and edges from node input/output names.
    fn reindex(&mut self) -> Result<()> {
        self.dag.clear_edges();
        self.producers.clear();
        self.consumers.clear();
        let indices: Vec<NodeIndex> = self.dag.node_indices().collect();
        for &ix in &indices {
            for (slot, out) in self.dag[ix].proto.output.iter().enumerate() {
                if out.is_empty() {
                    continue;
                }
                if let Some((other, _)) = self.producers.insert(out.clone(), (ix, slot)) {
                    let (a, b) = (&self.dag[other].proto, &self.dag[ix].proto);
                    bail!(
                        "value '{out}' is produced twice, by node '{}' ({}) and by node '{}' ({})",
                        op::node_label(a),
                        a.op_type(),
                        op::node_label(b),
                        b.op_type()
                    );
                }
            }
        }
        let mut edges = Vec::new();
        for &ix in &indices {
            let node = &self.dag[ix].proto;
            let args = node
                .input
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.is_empty())
                .map(|(slot, n)| (n.clone(), InSlot::Arg(slot)));
            let captures: Vec<(String, InSlot)> = subgraphs(node)
                .flat_map(free_names)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|n| (n, InSlot::Capture))
                .collect();
            for (name, to) in args.chain(captures) {
                self.consumers
                    .entry(name.clone())
                    .or_default()
                    .push((ix, to));
                if let Some(&(from, from_slot)) = self.producers.get(&name) {
                    edges.push((from, ix, Wire { from_slot, to }));
                }
            }
        }
        for (a, b, w) in edges {
            self.dag.add_edge(a, b, w);
        }
        Ok(())
    }

    // ---- lookups ----

    pub fn node(&self, ix: NodeIndex) -> &NodeProto {
        &self.dag[ix].proto
    }

    pub fn contains(&self, ix: NodeIndex) -> bool {
        self.dag.contains_node(ix)
    }

    pub fn node_count(&self) -> usize {
        self.dag.node_count()
    }

    /// The underlying petgraph, for algorithms (read-only: edits go through [`Patch`]).
    pub fn dag(&self) -> &StableDiGraph<Node, Wire> {
        &self.dag
    }

    pub fn node_indices(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.dag.node_indices()
    }

    pub fn producer(&self, value: &str) -> Option<(NodeIndex, usize)> {
        self.producers.get(value).copied()
    }

    /// The producing node of a value, if it is an op output.
    pub fn producer_node(&self, value: &str) -> Option<NodeIndex> {
        self.producer(value).map(|(ix, _)| ix)
    }

    /// Every reader of a value: node inputs and subgraph captures (not graph outputs).
    pub fn consumers(&self, value: &str) -> &[(NodeIndex, InSlot)] {
        self.consumers
            .get(value)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    pub fn is_graph_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o.name() == value)
    }

    pub fn is_graph_input(&self, value: &str) -> bool {
        self.inputs.iter().any(|o| o.name() == value)
    }

    /// Nodes reading `value`, each once, plus whether a graph output exposes it.
    pub fn use_count(&self, value: &str) -> usize {
        self.consumers(value).len() + usize::from(self.is_graph_output(value))
    }

    pub fn source(&self, value: &str) -> Option<Source> {
        if let Some((ix, slot)) = self.producer(value) {
            Some(Source::Op(ix, slot))
        } else if self.is_graph_input(value) {
            Some(Source::Input)
        } else if self.initializers.contains_key(value) {
            Some(Source::Initializer)
        } else if self.outer.contains(value) {
            Some(Source::Outer)
        } else {
            None
        }
    }

    pub fn is_defined(&self, value: &str) -> bool {
        self.source(value).is_some()
    }

    /// A constant tensor: an initializer that is not overridable as a graph input.
    pub fn constant(&self, value: &str) -> Option<&TensorProto> {
        if self.is_graph_input(value) {
            return None;
        }
        self.initializers.get(value)
    }

    /// The declared type of a value: its graph input, graph output or value_info entry.
    pub fn declared(&self, value: &str) -> Option<&ValueInfoProto> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .chain(&self.value_info)
            .find(|v| v.name() == value)
    }

    /// Every name in use (values, node names, initializers), for fresh-name generation.
    /// Every name the graph uses (values, nodes, initializers, captures).
    pub fn all_names(&self) -> HashSet<&str> {
        let mut names: HashSet<&str> = HashSet::new();
        names.extend(self.inputs.iter().map(|v| v.name()));
        names.extend(self.outputs.iter().map(|v| v.name()));
        names.extend(self.initializers.keys().map(|s| s.as_str()));
        names.extend(self.outer.iter().map(|s| s.as_str()));
        for ix in self.dag.node_indices() {
            let n = &self.dag[ix].proto;
            names.insert(n.name());
            names.extend(n.output.iter().map(|s| s.as_str()));
            names.extend(n.input.iter().map(|s| s.as_str()));
        }
        names
    }

    /// A name not used anywhere in the graph, derived from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        let names = self.all_names();
        if !names.contains(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !names.contains(n.as_str()))
            .expect("an unused suffix exists")
    }

    /// `n` distinct fresh names derived from `bases`, also distinct from each other.
    pub fn fresh_names(&self, bases: &[String]) -> Vec<String> {
        let mut names: HashSet<String> = self.all_names().into_iter().map(String::from).collect();
        bases
            .iter()
            .map(|base| {
                let name = if names.contains(base) {
                    (1..)
                        .map(|i| format!("{base}_{i}"))
                        .find(|n| !names.contains(n))
                        .expect("an unused suffix exists")
                } else {
                    base.clone()
                };
                names.insert(name.clone());
                name
            })
            .collect()
    }

    /// Nodes in export order: topological, preferring original order.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        let mut indegree: HashMap<NodeIndex, usize> = HashMap::new();
        for e in (&self.dag).edge_references() {
            *indegree.entry(e.target()).or_default() += 1;
        }
        let mut ready: BinaryHeap<Reverse<((u64, u64), NodeIndex)>> = self
            .dag
            .node_indices()
            .filter(|ix| !indegree.contains_key(ix))
            .map(|ix| Reverse((self.dag[ix].order, ix)))
            .collect();
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(Reverse((_, ix))) = ready.pop() {
            order.push(ix);
            for e in self.dag.edges_directed(ix, Direction::Outgoing) {
                let d = indegree.get_mut(&e.target()).expect("target has indegree");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse((self.dag[e.target()].order, e.target())));
                }
            }
        }
        if order.len() != self.dag.node_count() {
            let stuck: Vec<&str> = self
                .dag
                .node_indices()
                .filter(|ix| !order.contains(ix))
                .map(|ix| self.dag[ix].proto.name())
                .take(5)
                .collect();
            bail!("graph has a cycle through node(s) {stuck:?}");
        }
        Ok(order)
    }

    // ---- rewriting ----

    /// Apply a patch atomically: on error the graph is left unchanged.
    pub fn apply(&mut self, patch: Patch) -> Result<()> {
        let backup = self.clone();
        let result = self.apply_unchecked(patch).and_then(|_| self.check());
        if result.is_err() {
            *self = backup;
        }
        result
    }

    /// [`Graph::apply`] without the copy it keeps to roll back: on error the graph is left
    /// half-patched, and the caller must restore a copy of its own (the rewrite driver keeps
    /// one per run instead of one per patch: a graph clone per patch was half of `cleanup`'s
    /// time on a 1000-node transformer).
    pub fn apply_unbacked(&mut self, patch: Patch) -> Result<()> {
        self.apply_unchecked(patch).and_then(|_| self.check())
    }

    fn apply_unchecked(&mut self, patch: Patch) -> Result<()> {
        let anchor_key = patch
            .anchor
            .or_else(|| patch.remove.first().copied())
            .and_then(|ix| self.dag.node_weight(ix))
            .map(|n| n.order.0)
            .unwrap_or(u64::MAX);
        for t in patch.initializers {
            let name = t.name().to_string();
            self.initializers.insert(name, t);
        }
        for ix in patch.remove {
            let node = self
                .dag
                .remove_node(ix)
                .with_context(|| format!("patch removes node {ix:?} twice or a missing node"))?;
            self.dropped_values.extend(node.proto.output);
        }
        for proto in patch.add {
            let order = (anchor_key, self.next_seq);
            self.next_seq += 1;
            self.dag.add_node(Node { proto, order });
        }
        for (old, new) in patch.shunts {
            self.shunt(&old, &new);
        }
        self.reindex()
    }

    /// Redirect every use of `old` to `new`. A graph output named `old` keeps its name: the
    /// node producing `new` is renamed to produce `old` when that is safe, else an Identity
    /// bridges the two.
    fn shunt(&mut self, old: &str, new: &str) {
        let indices: Vec<NodeIndex> = self.dag.node_indices().collect();
        for &ix in &indices {
            let node = &mut self.dag[ix].proto;
            for i in node.input.iter_mut() {
                if i == old {
                    *i = new.to_string();
                }
            }
            for sub in subgraphs_mut(node) {
                rename_free_uses(sub, old, new);
            }
        }
        if !self.is_graph_output(old) {
            return;
        }
        let new_is_plain_op_output = !self.is_graph_output(new)
            && !self.is_graph_input(new)
            && !self.initializers.contains_key(new)
            && !self.outer.contains(new)
            && indices
                .iter()
                .any(|&ix| self.dag[ix].proto.output.iter().any(|o| o == new));
        if new_is_plain_op_output {
            for &ix in &indices {
                let node = &mut self.dag[ix].proto;
                for o in node.output.iter_mut().chain(node.input.iter_mut()) {
                    if o == new {
                        *o = old.to_string();
                    }
                }
                for sub in subgraphs_mut(node) {
                    rename_free_uses(sub, new, old);
                }
            }
            self.dropped_values.insert(new.to_string());
        } else {
            let name = self.fresh_name(&format!("{old}_identity"));
            let order = (u64::MAX, self.next_seq);
            self.next_seq += 1;
            self.dag.add_node(Node {
                proto: op::node("Identity", &name, &[new], &[old]),
                order,
            });
        }
    }

    /// Replace a node's proto in place (same position), e.g. to change attributes or inputs.
    pub fn replace_node(&mut self, ix: NodeIndex, proto: NodeProto) -> Result<()> {
        let backup = self.clone();
        let node = self
            .dag
            .node_weight_mut(ix)
            .with_context(|| format!("no node {ix:?} to replace"))?;
        node.proto = proto;
        let result = self.reindex().and_then(|_| self.check());
        if result.is_err() {
            *self = backup;
        }
        result
    }

    /// Remove initializers no node, subgraph or graph output reads (and not graph inputs).
    pub fn remove_unused_initializers(&mut self) -> usize {
        let unused: Vec<String> = self
            .initializers
            .keys()
            .filter(|k| {
                self.consumers(k).is_empty() && !self.is_graph_output(k) && !self.is_graph_input(k)
            })
            .cloned()
            .collect();
        for k in &unused {
            self.initializers.shift_remove(k);
            self.dropped_values.insert(k.clone());
        }
        unused.len()
    }

    /// Names visible to this graph's subgraphs: everything defined here plus our outer scope.
    pub fn scope_names(&self) -> HashSet<String> {
        let mut names = self.outer.clone();
        names.extend(self.inputs.iter().map(|v| v.name().to_string()));
        names.extend(self.initializers.keys().cloned());
        names.extend(self.producers.keys().cloned());
        names
    }

    /// Check consistency: arity of known ops, every read value defined, every value produced
    /// once, outputs defined, acyclic, edges matching names.
    pub fn check(&self) -> Result<()> {
        for ix in self.dag.node_indices() {
            let node = &self.dag[ix].proto;
            op::check_arity(node)?;
            for (slot, input) in node.input.iter().enumerate() {
                if !input.is_empty() && !self.is_defined(input) {
                    bail!(
                        "node '{}' ({}) input {slot} reads '{input}', which is not a graph input, an initializer or any node's output",
                        node.name(),
                        node.op_type()
                    );
                }
            }
            for sub in subgraphs(node) {
                for name in free_names(sub) {
                    if !self.is_defined(&name) {
                        bail!(
                            "a subgraph of node '{}' ({}) reads '{name}', which is defined nowhere",
                            node.name(),
                            node.op_type()
                        );
                    }
                }
            }
            for out in &node.output {
                if out.is_empty() {
                    continue;
                }
                let other = if self.is_graph_input(out) {
                    "graph input"
                } else if self.initializers.contains_key(out) {
                    "initializer"
                } else {
                    continue;
                };
                bail!(
                    "value '{out}' is produced twice, by {other} '{out}' and by node '{}' ({})",
                    op::node_label(node),
                    node.op_type()
                );
            }
            for e in self.dag.edges_directed(ix, Direction::Incoming) {
                let w = e.weight();
                let from = &self.dag[e.source()].proto;
                let value = from.output.get(w.from_slot);
                let ok = match (value, w.to) {
                    (Some(v), InSlot::Arg(s)) => node.input.get(s) == Some(v),
                    (Some(_), InSlot::Capture) => true,
                    (None, _) => false,
                };
                if !ok {
                    bail!(
                        "internal: edge into node '{}' does not match its inputs",
                        node.name()
                    );
                }
            }
        }
        for o in &self.outputs {
            if !self.is_defined(o.name()) {
                bail!("graph output '{}' is not produced by any node", o.name());
            }
        }
        self.topo_order()?;
        Ok(())
    }
}

/// Whether a node holds subgraphs (If/Loop/Scan and custom ops with graph attributes).
pub fn has_subgraphs(n: &NodeProto) -> bool {
    n.attribute.iter().any(|a| {
        matches!(a.r#type(), AttributeType::Graph | AttributeType::Graphs)
            || a.g.is_some()
            || !a.graphs.is_empty()
    })
}
