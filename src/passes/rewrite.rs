//! Driving local rewrite rules to a fixpoint.

use crate::ir::{Graph, Patch};
use anyhow::{Context, Result};
use petgraph::stable_graph::NodeIndex;

/// A local rewrite: inspect one node, return the patch that rewrites it, or `None`.
pub type Rule = fn(&Graph, NodeIndex) -> Result<Option<Patch>>;

/// Apply `rules` (name, rule) over the graph in topological order until none matches or
/// `max_patches` patches were applied. Returns the count per rule name. On error the graph is
/// as it was before the call (one copy per call, not one per patch).
pub fn rewrite(
    graph: &mut Graph,
    rules: &[(&'static str, Rule)],
    max_patches: Option<usize>,
) -> Result<Vec<(&'static str, usize)>> {
    let backup = graph.clone();
    let result = rewrite_unbacked(graph, rules, max_patches);
    if result.is_err() {
        *graph = backup;
    }
    result
}

fn rewrite_unbacked(
    graph: &mut Graph,
    rules: &[(&'static str, Rule)],
    max_patches: Option<usize>,
) -> Result<Vec<(&'static str, usize)>> {
    let mut counts: Vec<(&'static str, usize)> = rules.iter().map(|(n, _)| (*n, 0)).collect();
    let mut total = 0usize;
    loop {
        let mut changed = false;
        for ix in graph.topo_order()? {
            for (k, (name, rule)) in rules.iter().enumerate() {
                if !graph.contains(ix) {
                    break;
                }
                if max_patches.is_some_and(|m| total >= m) {
                    return Ok(counts);
                }
                let node_name = graph.node(ix).name().to_string();
                let op = graph.node(ix).op_type().to_string();
                let patch = rule(graph, ix)
                    .with_context(|| format!("rule {name} on node '{node_name}' ({op})"))?;
                if let Some(patch) = patch {
                    graph
                        .apply_unbacked(patch)
                        .with_context(|| format!("rule {name} on node '{node_name}' ({op})"))?;
                    counts[k].1 += 1;
                    total += 1;
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(counts);
        }
    }
}
