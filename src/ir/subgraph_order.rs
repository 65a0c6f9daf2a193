//! Put the nodes of every subgraph (If branches, Loop/Scan bodies) in topological order.
//!
//! ONNX requires each graph's nodes to be topologically sorted; runtimes sort for themselves,
//! so a model with an unsorted subgraph still runs, but `onnx.checker` rejects it, and the
//! tool passes subgraphs through as they are (the main graph is re-sorted on export by
//! [`crate::ir::graph::Graph::to_proto`]). Sorting at load keeps the output valid.
//!
//! Order: Kahn's algorithm taking the lowest original position among ready nodes, so a sorted
//! subgraph keeps its order exactly (its bytes do not change). A node depends on the nodes of
//! the same graph producing its inputs or any name its own subgraphs read (an If branch reads
//! values of the graph around it). Names no node of the graph produces come from outside
//! (graph inputs, initializers, enclosing graphs). A cycle is an error naming a node on it.

use crate::ir::op::node_label;
use crate::onnx::proto::{GraphProto, NodeProto};
use anyhow::{bail, Result};
use std::collections::{BTreeSet, HashMap};

/// Sort the subgraphs inside `g`'s nodes (recursively); `g`'s own order is left alone.
pub fn sort_subgraphs(g: &mut GraphProto) -> Result<()> {
    for node in &mut g.node {
        for a in &mut node.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                sort_graph(sub)?;
                sort_subgraphs(sub)?;
            }
        }
    }
    Ok(())
}

/// Every value name `node` reads: its inputs and the names its subgraphs' nodes read.
fn reads(node: &NodeProto, out: &mut Vec<String>) {
    out.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
    for a in &node.attribute {
        for sub in a.g.iter().chain(&a.graphs) {
            for n in &sub.node {
                reads(n, out);
            }
            out.extend(sub.output.iter().map(|o| o.name().to_string()));
        }
    }
}

fn sort_graph(g: &mut GraphProto) -> Result<()> {
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (o.as_str(), i))
        })
        .collect();
    let n = g.node.len();
    let mut waiting_on = vec![0usize; n];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.node.iter().enumerate() {
        let mut names = Vec::new();
        reads(node, &mut names);
        let mut deps: Vec<usize> = names
            .iter()
            .filter_map(|name| producer.get(name.as_str()).copied())
            .filter(|&p| p != i)
            .collect();
        deps.sort_unstable();
        deps.dedup();
        waiting_on[i] = deps.len();
        for p in deps {
            consumers[p].push(i);
        }
        if names
            .iter()
            .any(|name| producer.get(name.as_str()) == Some(&i))
        {
            bail!(
                "node '{}' ({}) in subgraph '{}' reads its own output",
                node_label(node),
                node.op_type(),
                g.name()
            );
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting_on[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &c in &consumers[i] {
            waiting_on[c] -= 1;
            if waiting_on[c] == 0 {
                ready.insert(c);
            }
        }
    }
    if order.len() < n {
        let stuck = (0..n).find(|&i| waiting_on[i] > 0).unwrap_or(0);
        let node = &g.node[stuck];
        bail!(
            "node '{}' ({}) in subgraph '{}' is on a cycle",
            node_label(node),
            node.op_type(),
            g.name()
        );
    }
    if order.iter().enumerate().any(|(k, &i)| k != i) {
        let mut nodes: Vec<Option<NodeProto>> =
            std::mem::take(&mut g.node).into_iter().map(Some).collect();
        g.node = order.iter().filter_map(|&i| nodes[i].take()).collect();
    }
    Ok(())
}
