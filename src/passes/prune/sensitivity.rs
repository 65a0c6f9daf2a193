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
//! Cost: one model run per consumer on at most `SAMPLES` calibration samples. Measured on
//! digits_cnn (fused, 32 samples): `Conv 'features.2' s = 0.22`, `Conv 'features.4' s = 0.019`,
//! `Gemm 'fc' s = 0.43`: the same relative error costs ten times more at the first pointwise
//! conv than at the second.

use super::groups::{label, Group, Member};
use super::reconstruct::{run_batched, Calibration};
use crate::hessian::loss_sum;
use crate::ir::{Model, Patch};
use crate::onnx::tensor;
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis, Slice};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet};

/// Calibration samples used per sensitivity run.
pub const SAMPLES: usize = 64;
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

/// `s_k` per consumer node of the prunable groups (missing: the run failed; noted).
pub fn consumer_sensitivity(
    model: &Model,
    groups: &[Group],
    cal: &Calibration,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<NodeIndex, f64>> {
    let consumers: BTreeSet<NodeIndex> = groups
        .iter()
        .filter(|g| g.prunable())
        .flat_map(|g| g.members.iter())
        .filter_map(|m| match m {
            Member::Consumer { node, .. } => Some(*node),
            _ => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    if consumers.is_empty() {
        return Ok(out);
    }
    let total = cal
        .inputs
        .first()
        .map(|(_, a)| a.shape().first().copied().unwrap_or(1))
        .unwrap_or(1);
    let n = total.min(SAMPLES);
    let sub: Vec<(String, crate::runtime::Feed)> = cal
        .inputs
        .iter()
        .map(|(k, a)| (k.clone(), a.slice_axis(0, 0..n)))
        .collect();
    let proto = model.to_proto()?;
    let reference = run_batched(&proto, &sub, &[]).context("sensitivity: reference run")?;
    for ix in consumers {
        let node = model.graph.node(ix);
        let (Some(wname), Some(y_name)) = (node.input.get(1), node.output.first()) else {
            continue;
        };
        let Some(y0) = cal.acts.get(y_name).map(|a| rows(a, n)) else {
            continue;
        };
        let Some(w) = model
            .graph
            .constant(wname)
            .and_then(|t| tensor::to_f32(t).ok())
        else {
            continue;
        };
        let rms =
            (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / w.len().max(1) as f64).sqrt();
        let mut state = fnv(wname);
        let wp = w.mapv(|v| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let r = if state & 1 == 0 { 1.0 } else { -1.0 };
            (f64::from(v) + SIGMA * rms * r) as f32
        });
        let mut m = model.clone();
        m.graph.apply(Patch {
            initializers: vec![tensor::from_f32(wname, &wp)],
            ..Default::default()
        })?;
        let extra: Vec<String> = if m.graph.is_graph_output(y_name) {
            vec![]
        } else {
            vec![y_name.clone()]
        };
        let run = match run_batched(&m.to_proto()?, &sub, &extra) {
            Ok(r) => r,
            Err(e) => {
                notes.push(format!(
                    "sensitivity of {}: run failed: {e:#}",
                    label(&model.graph, ix)
                ));
                continue;
            }
        };
        let y1 = run.iter().find(|(k, _)| k == y_name).map(|(_, a)| a);
        let Some(y1) = y1 else { continue };
        let num: f64 = y1
            .iter()
            .zip(y0.iter())
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum();
        let den: f64 = y0.iter().map(|&b| f64::from(b).powi(2)).sum();
        if !(num > 0.0 && den > 0.0) {
            continue;
        }
        let r = num / den;
        let mut loss = 0.0;
        for (name, a0) in &reference {
            let Some((_, a1)) = run.iter().find(|(k, _)| k == name) else {
                continue;
            };
            let kl = a0.ndim() == 2 && a0.shape()[1] > 1;
            let rows_out = a0.shape().first().copied().unwrap_or(1).max(1);
            loss += loss_sum(a0, a1, kl) / rows_out as f64;
        }
        if loss.is_finite() && loss > 0.0 {
            out.insert(ix, loss / r);
        }
    }
    Ok(out)
}
