//! How much a relative error at a consumer's output costs the model's output (criterion `loss`).
//!
//! The second-order cost curves (`obs`) measure each group's damage as the relative squared
//! error `r` of its consumers' outputs. Layers differ in how such an error propagates: an error
//! in an early conv can grow several-fold through later layers, one at the logits is final. For
//! each consumer `k` the pass measures the ratio once, with a random perturbation of its weight:
//!
//! `W' = W + sigma * rms(W) * R` (`R` Rademacher, seeded from the weight name, `sigma = 0.05`),
//! `s_k = L(f(W'), f(W)) / r_k`, `r_k = ||y'_k - y_k||^2 / ||y_k||^2`,
//!
//! with `L` the label-free loss of the Hessian machinery (`hessian::loss_sum`: KL per row for
//! `[N, C>1]` outputs, half squared error otherwise), averaged over the rows. A predicted
//! consumer error `r` then costs `s_k * r` of output loss, comparable across layers.
//!
//! Cost: per consumer, one run of the part of the model downstream of its weight (the hessian
//! machinery's sub-model: the consumer and what follows it, fed with the values the
//! calibration run already computed) on at most `SAMPLES` calibration samples; consumers side
//! by side (rayon), each run in the pass's fixed chunks (`batches`), so the figures do not
//! depend on the thread count. A consumer whose sub-model cannot be built or run falls back to a
//! run of the whole perturbed model. Measured on
//! digits_cnn (fused, 32 samples): `Conv 'features.2' s = 0.22`, `Conv 'features.4' s = 0.019`,
//! `Gemm 'fc' s = 0.43`: the same relative error costs ten times more at the first pointwise
//! conv than at the second.

use super::batches::run_chunked;
use super::groups::{label, Group, Member};
use super::reconstruct::{run_batched, Calibration};
use crate::hessian::{loss_sum, sub_model, SubModel};
use crate::ir::layer::Layer;
use crate::ir::{Model, Patch};
use crate::onnx::tensor;
use crate::runtime::Feed;
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis, Slice};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Calibration samples used per sensitivity run, at most.
pub const SAMPLES: usize = 64;
/// The sensitivity runs together may cost this many runs of the whole model over the
/// calibration batch; beyond, fewer samples are used (never below [`MIN_SAMPLES`]). Was 8:
/// on ResNet-18 (26-28 of 32 samples) the sensitivities then came out ~1.6x those on 16 or 8
/// samples, uniformly across layers (so the allocation hardly moved: 30% of MACs, logits cosine
/// 0.9731 with 28 samples, 0.9735 with 16, 0.9727 with 8), at a third of the pass's time.
const WORK_BUDGET: f64 = 5.0;
const MIN_SAMPLES: usize = 8;
const SIGMA: f64 = 0.05;

fn fnv(name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h | 1
}

fn rows(a: &ArrayD<f32>, n: usize) -> ArrayD<f32> {
    let n = n.min(a.shape().first().copied().unwrap_or(0));
    a.slice_axis(Axis(0), Slice::from(0..n)).to_owned()
}

/// The consumer nodes of the prunable groups, in index order.
fn consumers(groups: &[Group]) -> BTreeSet<NodeIndex> {
    groups
        .iter()
        .filter(|g| g.prunable())
        .flat_map(|g| g.members.iter())
        .filter_map(|m| match m {
            Member::Consumer { node, .. } => Some(*node),
            _ => None,
        })
        .collect()
}

/// The downstream sub-model of each consumer (where one can be built), planned before the
/// calibration run so that it exposes their boundary values ([`Downstream::boundaries`]).
pub struct Downstream {
    subs: BTreeMap<NodeIndex, SubModel>,
    /// Sum over the consumers of their downstream part's share of the model's MACs (a
    /// consumer without a sub-model counts as a whole model).
    work: f64,
}

impl Downstream {
    /// `elem` holds the model's value types (sub-model inputs are declared with them).
    /// `shapes` (value shapes) weigh each part by its MACs.
    pub fn plan(
        model: &Model,
        groups: &[Group],
        elem: &HashMap<String, i32>,
        shapes: &HashMap<String, Vec<usize>>,
    ) -> Downstream {
        let no_kl = vec![false; model.graph.outputs.len()];
        let all = consumers(groups);
        let subs: BTreeMap<NodeIndex, SubModel> = all
            .iter()
            .filter_map(|&ix| {
                let layer = Layer::of(&model.graph, ix)?;
                let sub = sub_model(model, &layer, elem, &no_kl).ok()??;
                Some((ix, sub))
            })
            .collect();
        let macs = |nodes: &mut dyn Iterator<Item = &crate::onnx::proto::NodeProto>| -> f64 {
            nodes
                .map(|n| crate::ir::facts::node_macs(n, shapes).unwrap_or(0) as f64)
                .sum()
        };
        let total = macs(&mut model.graph.node_indices().map(|ix| model.graph.node(ix)));
        let work = all
            .iter()
            .map(|ix| match (subs.get(ix), total > 0.0) {
                (Some(s), true) => {
                    let nodes = s
                        .proto
                        .graph
                        .as_ref()
                        .map(|g| g.node.as_slice())
                        .unwrap_or(&[]);
                    macs(&mut nodes.iter()) / total
                }
                _ => 1.0,
            })
            .sum();
        Downstream { subs, work }
    }

    /// Samples of a `total`-sample batch the sensitivity runs use: at most [`SAMPLES`], and
    /// fewer when the runs would cost more than [`WORK_BUDGET`] whole-model runs over the
    /// batch, then rounded down to whole `chunk`s (a remainder would cost a tract plan of its
    /// own per consumer), never below [`MIN_SAMPLES`] (ResNet-18: 16 of 32; DenseNet-121, 120
    /// consumers: 8).
    pub fn samples(&self, total: usize, chunk: usize) -> usize {
        let n = total.min(SAMPLES);
        if self.work * n as f64 <= WORK_BUDGET * total as f64 {
            return n;
        }
        let affordable = (WORK_BUDGET * total as f64 / self.work).floor() as usize;
        let whole = if chunk > 0 && affordable >= chunk {
            affordable - affordable % chunk
        } else {
            affordable
        };
        whole.max(MIN_SAMPLES).min(n)
    }

    /// No sub-model (criterion other than `loss`).
    pub fn none() -> Downstream {
        Downstream {
            subs: BTreeMap::new(),
            work: 0.0,
        }
    }

    /// Every value a sub-model reads from upstream.
    pub fn boundaries(&self) -> BTreeSet<String> {
        self.subs
            .values()
            .flat_map(|s| s.boundary.iter().cloned())
            .collect()
    }
}

/// A weight perturbed by `SIGMA * rms(W) * R`, `R` Rademacher seeded from the weight name.
fn perturbed(wname: &str, w: &ArrayD<f32>) -> ArrayD<f32> {
    let rms = (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / w.len().max(1) as f64).sqrt();
    let mut state = fnv(wname);
    w.mapv(|v| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let r = if state & 1 == 0 { 1.0 } else { -1.0 };
        (f64::from(v) + SIGMA * rms * r) as f32
    })
}

/// `s_k` per consumer node of the prunable groups (missing: the run failed; noted).
pub fn consumer_sensitivity(
    model: &Model,
    groups: &[Group],
    cal: &Calibration,
    downstream: &Downstream,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<NodeIndex, f64>> {
    let consumers: Vec<NodeIndex> = consumers(groups).into_iter().collect();
    let mut out = BTreeMap::new();
    if consumers.is_empty() {
        return Ok(out);
    }
    let total = cal
        .inputs
        .first()
        .map(|(_, a)| a.shape().first().copied().unwrap_or(1))
        .unwrap_or(1);
    let proto = model.to_proto()?;
    let n = downstream.samples(total, super::batches::chunk_size(&proto, &cal.inputs));
    if n < total.min(SAMPLES) {
        notes.push(format!(
            "sensitivity: {n} of {total} calibration samples (the downstream runs would cost {:.1} whole-model runs per sample)",
            downstream.work
        ));
    }
    let sub: Vec<(String, Feed)> = cal
        .inputs
        .iter()
        .map(|(k, a)| (k.clone(), a.slice_axis(0, 0..n)))
        .collect();
    let chunk = super::batches::chunk_size(&proto, &sub);
    let reference: Vec<(String, ArrayD<f32>)> = if cal.outputs.is_empty() {
        run_batched(&proto, &sub, &[]).context("sensitivity: reference run")?
    } else {
        cal.outputs
            .iter()
            .map(|(k, a)| (k.clone(), rows(a, n)))
            .collect()
    };
    let progress = crate::progress::Progress::bar("sensitivity", consumers.len() as u64);
    let measured: Vec<Result<Option<f64>>> = consumers
        .par_iter()
        .map(|&ix| {
            let r = one_consumer(model, ix, cal, downstream, &sub, &reference, n, chunk);
            progress.inc(1);
            r
        })
        .collect();
    for (ix, r) in consumers.into_iter().zip(measured) {
        match r {
            Ok(Some(s)) => {
                out.insert(ix, s);
            }
            Ok(None) => {}
            Err(e) => notes.push(format!(
                "sensitivity of {}: run failed: {e:#}",
                label(&model.graph, ix)
            )),
        }
    }
    Ok(out)
}

/// `s_k` of one consumer (`None`: nothing to measure).
#[allow(clippy::too_many_arguments)]
fn one_consumer(
    model: &Model,
    ix: NodeIndex,
    cal: &Calibration,
    downstream: &Downstream,
    sub: &[(String, Feed)],
    reference: &[(String, ArrayD<f32>)],
    n: usize,
    chunk: usize,
) -> Result<Option<f64>> {
    let node = model.graph.node(ix);
    let (Some(wname), Some(y_name)) = (node.input.get(1), node.output.first()) else {
        return Ok(None);
    };
    let Some(y0) = cal.acts.get(y_name).map(|a| rows(a, n)) else {
        return Ok(None);
    };
    let Some(w) = model
        .graph
        .constant(wname)
        .and_then(|t| tensor::to_f32(t).ok())
    else {
        return Ok(None);
    };
    let wp = perturbed(wname, &w);
    let run = match downstream.subs.get(&ix) {
        Some(s) => match run_downstream(s, wname, &wp, y_name, cal, sub, n, chunk) {
            Ok(r) => r,
            Err(_) => run_whole(model, wname, &wp, y_name, sub)?,
        },
        None => run_whole(model, wname, &wp, y_name, sub)?,
    };
    let y1 = run.iter().find(|(k, _)| k == y_name).map(|(_, a)| a);
    let Some(y1) = y1 else { return Ok(None) };
    let num: f64 = y1
        .iter()
        .zip(y0.iter())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let den: f64 = y0.iter().map(|&b| f64::from(b).powi(2)).sum();
    if !(num > 0.0 && den > 0.0) {
        return Ok(None);
    }
    let r = num / den;
    let mut loss = 0.0;
    for (name, a0) in reference {
        // Outputs the sub-model does not reach are unchanged: no loss.
        let Some((_, a1)) = run.iter().find(|(k, _)| k == name) else {
            continue;
        };
        let kl = a0.ndim() == 2 && a0.shape()[1] > 1;
        let rows_out = a0.shape().first().copied().unwrap_or(1).max(1);
        loss += loss_sum(a0, a1, kl) / rows_out as f64;
    }
    Ok((loss.is_finite() && loss > 0.0).then(|| loss / r))
}

/// The consumer's downstream part with the perturbed weight as a constant: its graph
/// outputs and the consumer's output `y_name`.
#[allow(clippy::too_many_arguments)]
fn run_downstream(
    s: &SubModel,
    wname: &str,
    wp: &ArrayD<f32>,
    y_name: &str,
    cal: &Calibration,
    sub: &[(String, Feed)],
    n: usize,
    chunk: usize,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let mut proto = s.proto.clone();
    let g = proto.graph.as_mut().context("sub-model has no graph")?;
    g.input.retain(|i| i.name() != wname);
    g.initializer.push(tensor::from_f32(wname, wp));
    let feeds: Vec<(String, Feed)> = s
        .boundary
        .iter()
        .map(|b| {
            if let Some((_, f)) = sub.iter().find(|(k, _)| k == b) {
                return Ok((b.clone(), f.clone()));
            }
            let a = cal
                .acts
                .get(b)
                .with_context(|| format!("value '{b}' was not kept by the calibration run"))?;
            Ok((b.clone(), Feed::F32(rows(a, n))))
        })
        .collect::<Result<_>>()?;
    let is_output = g.output.iter().any(|o| o.name() == y_name);
    let extra: Vec<String> = if is_output {
        vec![]
    } else {
        vec![y_name.to_string()]
    };
    run_chunked(&proto, &feeds, &extra, chunk)
}

/// The whole model with the perturbed weight (the fallback).
fn run_whole(
    model: &Model,
    wname: &str,
    wp: &ArrayD<f32>,
    y_name: &str,
    sub: &[(String, Feed)],
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let mut m = model.clone();
    m.graph.apply(Patch {
        initializers: vec![tensor::from_f32(wname, wp)],
        ..Default::default()
    })?;
    let extra: Vec<String> = if m.graph.is_graph_output(y_name) {
        vec![]
    } else {
        vec![y_name.to_string()]
    };
    run_batched(&m.to_proto()?, sub, &extra)
}
