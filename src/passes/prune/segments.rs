//! The pruned model's activations for reconstruction, computed part by part: every node runs
//! once over the whole refit, instead of one run of the whole model per refit consumer.
//!
//! Reconstruction refits consumers in topological order, each on its input as the pruned model
//! computes it *after* the consumers upstream were refit. [`Forward::value`] returns such a value:
//! it runs only the nodes that produce it and have not run yet (a *segment*: a small model whose
//! inputs are values computed earlier, the graph inputs, and whose constants are the current,
//! refit weights), keeps the float values later nodes still read, and drops the rest. A node
//! runs after every consumer upstream of it was refit (topological order), so no value is ever
//! stale.
//!
//! Before / after (ResNet-style chain of refit consumers `c1 -> c2 -> c3`):
//! ```text
//! x2 = run(whole model, refit c1)      =>  x2 = run(segment [c1, bn, relu] from x1)
//! x3 = run(whole model, refit c1, c2)  =>  x3 = run(segment [c2, ...] from x2)
//! ```
//!
//! Only float values cross a segment boundary (the runner hands outputs back as f32): an integer
//! value (a `Shape` result) is recomputed inside the segment that needs it, from its own inputs.
//! Segments run in the whole model's chunks (`batches`), so on every core.

use super::batches::run_chunked;
use crate::hessian::value_info;
use crate::ir::graph::{free_names, subgraphs};
use crate::ir::Model;
use crate::onnx::proto::{tensor_proto::DataType, GraphProto};
use crate::runtime::Feed;
use anyhow::{bail, Context, Result};
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Values of the pruned model computed so far (see the module docs).
pub struct Forward {
    /// Computed values still read by a node that has not run, and the graph inputs.
    store: HashMap<String, Feed>,
    ran: HashSet<NodeIndex>,
    /// Element types of the model's values (ONNX `DataType` numbers).
    elem: HashMap<String, i32>,
    chunk: usize,
}

/// Every name a node reads: its inputs and what its subgraphs capture.
fn reads(node: &crate::onnx::proto::NodeProto) -> BTreeSet<String> {
    let mut r: BTreeSet<String> = node
        .input
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    for sub in subgraphs(node) {
        r.extend(free_names(sub));
    }
    r
}

impl Forward {
    /// Start from the graph inputs; `elem` gives value types, `chunk` the run's chunk size.
    pub fn new(inputs: &[(String, Feed)], elem: HashMap<String, i32>, chunk: usize) -> Forward {
        Forward {
            store: inputs.iter().cloned().collect(),
            ran: HashSet::new(),
            elem,
            chunk,
        }
    }

    fn is_float(&self, name: &str) -> bool {
        self.elem.get(name) == Some(&(DataType::Float as i32))
    }

    /// The value `name` of `model` as it is now, running the nodes it needs that have not run.
    pub fn value(&mut self, model: &Model, name: &str) -> Result<ArrayD<f32>> {
        if !self.store.contains_key(name) {
            self.run_segment(model, name)?;
        }
        match self.store.get(name) {
            Some(Feed::F32(a)) => Ok(a.clone()),
            Some(f) => bail!("value '{name}' is {}, not float", f.type_name()),
            None => bail!("value '{name}' was not computed"),
        }
    }

    fn run_segment(&mut self, model: &Model, name: &str) -> Result<()> {
        let g = &model.graph;
        ensure_float(self.is_float(name), name)?;
        let start = g
            .producer_node(name)
            .with_context(|| format!("value '{name}' has no producer"))?;
        // The nodes to run: back from `start` until stored values, constants or graph inputs.
        let mut seg: HashSet<NodeIndex> = HashSet::new();
        let mut stack = vec![start];
        while let Some(ix) = stack.pop() {
            if !seg.insert(ix) {
                continue;
            }
            for v in reads(g.node(ix)) {
                if g.constant(&v).is_some() || self.store.contains_key(&v) {
                    continue;
                }
                match g.producer_node(&v) {
                    Some(p) => stack.push(p),
                    None => bail!("value '{v}' read by the segment has no source"),
                }
            }
        }
        let order: Vec<NodeIndex> = g
            .topo_order()?
            .into_iter()
            .filter(|ix| seg.contains(ix))
            .collect();
        let produced: HashSet<&str> = order
            .iter()
            .flat_map(|&ix| g.node(ix).output.iter().map(String::as_str))
            .collect();
        let mut boundary: BTreeSet<String> = BTreeSet::new();
        let mut constants: BTreeSet<String> = BTreeSet::new();
        for &ix in &order {
            for v in reads(g.node(ix)) {
                if produced.contains(v.as_str()) {
                    continue;
                }
                if g.constant(&v).is_some() {
                    constants.insert(v);
                } else {
                    boundary.insert(v);
                }
            }
        }
        // Keep: float values a node outside the segment that has not run reads, and `name`.
        let mut keep: Vec<String> = Vec::new();
        for &ix in &order {
            for o in &g.node(ix).output {
                if o.is_empty() || !self.is_float(o) {
                    continue;
                }
                let later = g
                    .consumers(o)
                    .iter()
                    .any(|(c, _)| !seg.contains(c) && !self.ran.contains(c));
                if o == name || later {
                    keep.push(o.clone());
                }
            }
        }
        let feeds: Vec<(String, Feed)> = boundary
            .iter()
            .map(|b| {
                let f = self.store.get(b).context("boundary value not stored")?;
                Ok((b.clone(), f.clone()))
            })
            .collect::<Result<_>>()?;
        let gp = GraphProto {
            name: Some(format!("segment to {name}")),
            node: order.iter().map(|&ix| g.node(ix).clone()).collect(),
            initializer: constants
                .iter()
                .filter_map(|c| g.constant(c).cloned())
                .collect(),
            input: feeds
                .iter()
                .map(|(n, f)| value_info(n, f.data_type() as i32, None))
                .collect(),
            output: keep
                .iter()
                .map(|k| value_info(k, DataType::Float as i32, None))
                .collect(),
            ..Default::default()
        };
        let mut proto = model.shell.clone();
        proto.graph = Some(gp);
        let outs = run_chunked(&proto, &feeds, &[], self.chunk)
            .with_context(|| format!("running the part of the pruned model up to '{name}'"))?;
        self.ran.extend(order.iter().copied());
        for (n, v) in outs {
            self.store.insert(n, Feed::F32(v));
        }
        // Forget values no node that has yet to run reads (graph inputs stay).
        let ran = &self.ran;
        self.store.retain(|k, _| {
            k == name || g.is_graph_input(k) || g.consumers(k).iter().any(|(c, _)| !ran.contains(c))
        });
        Ok(())
    }
}

fn ensure_float(ok: bool, name: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("value '{name}' is not known to be float")
    }
}
