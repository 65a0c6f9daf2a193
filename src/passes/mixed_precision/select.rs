//! Selection in `mixed-precision`: from each layer's Hessian trace (and, for the joint
//! selection, its output responses) to one precision per layer under the budget, and the report
//! of what was chosen and why. The model is not changed here.
//!
//! Per layer `l` with `n` weights, trace `T = Tr(G)` and allowed precision `b`:
//! `Ω_b = (T / n) · ‖Q_b(W) − W‖²` ([`super::weights`] gives `Q_b`), with its size in true bytes
//! (or payload bits for an `AvgBits` budget). [`Selection::Trace`] takes the exact knapsack
//! solution on `Ω` ([`super::knapsack`]); [`Selection::Joint`] starts the joint local search
//! ([`super::joint`]) from it and from the knapsack on the per-layer terms `½‖ũ_{l,b}‖²`.
//! The chosen sizes are re-summed in the budget's unit and checked against it; the report also
//! holds the size-vs-ΣΩ frontier (with the joint model's predicted loss at each point).

use super::knapsack::{pareto, solve};
use super::precision::allowed_precisions;
use super::weights::{blocked_int4_bytes, int4_block, round_trip_in, weight_bytes};
use super::{joint, Budget, MixedPrecisionOptions, Precision, Selection};
use crate::hessian::{self, LayerSensitivity};
use crate::ir::Model;
use crate::onnx::tensor;
use anyhow::{ensure, Context, Result};
use ndarray::ArrayD;
use regex::Regex;
use serde::Serialize;
use std::collections::BTreeMap;

/// One layer's figures and decision.
#[derive(Debug, Clone, Serialize)]
pub struct LayerChoice {
    pub node: String,
    pub weight: String,
    pub params: usize,
    pub channels: usize,
    pub hessian_trace: f64,
    pub hessian_trace_stderr: f64,
    pub trace_per_param: f64,
    pub samples: usize,
    pub precision: Precision,
    pub bytes: u64,
    /// Ω per allowed precision.
    pub omega: BTreeMap<Precision, f64>,
    /// Joint selection only: the second-order loss with only this layer at each precision.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub loss: BTreeMap<Precision, f64>,
    /// Block size of this layer's int4 option (`None`: per output channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int4_block_size: Option<usize>,
    pub bytes_by_precision: BTreeMap<Precision, u64>,
    pub kept_fp32_by_option: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParetoPoint {
    pub bytes: u64,
    pub sum_omega: f64,
    /// Joint selection: the predicted loss of its choice at this size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_loss: Option<f64>,
}

/// The joint selection's figures (second-order loss model, see [`joint`]).
#[derive(Debug, Clone, Serialize)]
pub struct JointSummary {
    /// Predicted loss increase of the chosen assignment, cross-layer terms included.
    pub predicted_loss: f64,
    /// The same for the exact `Σ Ω` knapsack choice (HAWQ-v2).
    pub omega_choice_loss: f64,
    /// The same for the exact knapsack on the per-layer terms alone.
    pub per_layer_choice_loss: f64,
    /// Improving moves the local search made, and from which knapsack solution.
    pub moves: usize,
    pub started_from: &'static str,
}

/// What the selection decided.
#[derive(Debug, Clone, Serialize)]
pub struct MixedPrecisionReport {
    pub selection: Selection,
    pub layers: Vec<LayerChoice>,
    pub budget: Budget,
    pub fp32_bytes: u64,
    pub total_bytes: u64,
    pub avg_bits: f64,
    /// `Σ Ω` of the chosen assignment.
    pub sum_omega: f64,
    /// The knapsack's size axis was not discretized (see [`solve`]).
    pub exact: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint: Option<JointSummary>,
    /// Size (true bytes) vs ΣΩ frontier.
    pub pareto: Vec<ParetoPoint>,
}

fn full_match(patterns: &[Regex], s: &str) -> bool {
    patterns.iter().any(|r| r.is_match(s))
}

fn keep_patterns(opts: &MixedPrecisionOptions) -> Result<Vec<Regex>> {
    opts.keep_fp32
        .iter()
        .map(|p| {
            Regex::new(&format!("^(?:{p})$")).with_context(|| format!("keep_fp32 pattern '{p}'"))
        })
        .collect()
}

/// The weights whose output responses the joint selection needs: every allowed precision but
/// fp32, in [`allowed_precisions`] order.
fn joint_candidates(
    model: &Model,
    opts: &MixedPrecisionOptions,
    keep: &[Regex],
    layer: &crate::ir::layer::Layer,
    w0: &ArrayD<f32>,
) -> Vec<ArrayD<f32>> {
    if opts.selection != Selection::Joint {
        return Vec::new();
    }
    let node = model.graph.node(layer.node).name();
    let kept = full_match(keep, node) || full_match(keep, &layer.weight);
    allowed_precisions(kept, opts)
        .into_iter()
        .filter(|&p| p != Precision::Fp32)
        .map(|p| round_trip_in(w0, layer.out_axis(), layer.in_axis(), p, opts.block_size))
        .collect()
}

/// Hessian traces, and with the joint selection each layer's output responses to its weight at
/// every allowed precision but fp32 (in cheapest-first order): what [`select`] needs.
pub fn sensitivities(
    model: &Model,
    batches: &[Vec<crate::runtime::Feed>],
    opts: &MixedPrecisionOptions,
) -> Result<Vec<LayerSensitivity>> {
    let keep = keep_patterns(opts)?;
    let candidates =
        |l: &crate::ir::layer::Layer, w0: &ArrayD<f32>| joint_candidates(model, opts, &keep, l, w0);
    hessian::sensitivity_with(model, batches, &opts.hessian, &candidates)
}

/// Choose precisions from sensitivities (selection only; the model is not changed).
pub fn select(
    model: &Model,
    sens: &[LayerSensitivity],
    budget: Budget,
    opts: &MixedPrecisionOptions,
) -> Result<MixedPrecisionReport> {
    let keep = keep_patterns(opts)?;
    let mut layers = Vec::new();
    let mut classes: Vec<Vec<(u64, f64)>> = Vec::new();
    let mut bits_classes: Vec<Vec<(u64, f64)>> = Vec::new();
    let mut options: Vec<Vec<Precision>> = Vec::new();
    for s in sens {
        let w = tensor::to_f32(
            model
                .graph
                .constant(&s.weight)
                .with_context(|| format!("weight '{}' is not a constant", s.weight))?,
        )?;
        let channels = w.shape().get(s.out_axis).copied().unwrap_or(1);
        let kept = full_match(&keep, &s.node) || full_match(&keep, &s.weight);
        let allowed = allowed_precisions(kept, opts);
        let mut omega = BTreeMap::new();
        let mut bytes = BTreeMap::new();
        let block = int4_block(w.shape(), s.in_axis, opts.block_size);
        for &p in &allowed {
            let d = round_trip_in(&w, s.out_axis, s.in_axis, p, opts.block_size);
            let err2: f64 = w
                .iter()
                .zip(d.iter())
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum();
            omega.insert(p, s.trace_per_param.max(0.0) * err2);
            bytes.insert(
                p,
                match (p, block) {
                    (Precision::Int4, Some(b)) => blocked_int4_bytes(w.shape(), s.in_axis, b),
                    _ => weight_bytes(s.params, channels, p),
                },
            );
        }
        classes.push(allowed.iter().map(|p| (bytes[p], omega[p])).collect());
        bits_classes.push(
            allowed
                .iter()
                .map(|p| (p.bits() * s.params as u64, omega[p]))
                .collect(),
        );
        options.push(allowed);
        layers.push(LayerChoice {
            node: s.node.clone(),
            weight: s.weight.clone(),
            params: s.params,
            channels,
            hessian_trace: s.hessian_trace,
            hessian_trace_stderr: s.hessian_trace_stderr,
            trace_per_param: s.trace_per_param,
            samples: s.samples,
            precision: Precision::Fp32,
            bytes: 4 * s.params as u64,
            omega,
            loss: BTreeMap::new(),
            int4_block_size: block,
            bytes_by_precision: bytes,
            kept_fp32_by_option: kept,
        });
    }
    let total_params: u64 = sens.iter().map(|s| s.params as u64).sum();
    let fp32_bytes = 4 * total_params;
    let (cls, limit) = match budget {
        Budget::Bytes(b) => (&classes, b),
        Budget::Ratio(r) => {
            ensure!(r > 0.0, "size ratio must be positive, got {r}");
            (&classes, (r * fp32_bytes as f64).floor() as u64)
        }
        Budget::AvgBits(b) => {
            ensure!(b > 0.0, "average bits must be positive, got {b}");
            (&bits_classes, (b * total_params as f64).floor() as u64)
        }
    };
    let sol = solve(cls, limit, opts.max_buckets).with_context(|| {
        let least: u64 = cls
            .iter()
            .map(|c| c.iter().map(|o| o.0).min().unwrap_or(0))
            .sum();
        format!(
            "budget {budget:?} is below the smallest possible size ({least} in the budget's unit)"
        )
    })?;
    // Joint: every layer has one response per allowed precision but fp32.
    let joint_ready = opts.selection == Selection::Joint
        && sens
            .iter()
            .zip(&options)
            .all(|(s, o)| s.responses.len() + 1 == o.len());
    let mut joint = None;
    let mut choice = sol.choice.clone();
    let mut gram = None;
    if joint_ready {
        let responses: Vec<Vec<Option<&[f32]>>> = sens
            .iter()
            .zip(&options)
            .map(|(s, o)| {
                o.iter()
                    .enumerate()
                    .map(|(k, &p)| (p != Precision::Fp32).then(|| &s.responses[k][..]))
                    .collect()
            })
            .collect();
        let g = joint::Gram::new(&responses);
        for (l, layer) in layers.iter_mut().enumerate() {
            for (k, &p) in options[l].iter().enumerate() {
                layer.loss.insert(p, g.diagonal(l, k));
            }
        }
        let search = joint::search(&g, cls, &sol, limit, opts.max_buckets)?;
        choice = search.best.choice.clone();
        joint = Some(JointSummary {
            predicted_loss: search.best.loss,
            omega_choice_loss: g.loss(&sol.choice),
            per_layer_choice_loss: g.loss(&search.per_layer_choice),
            moves: search.best.moves,
            started_from: search.started_from,
        });
        gram = Some(g);
    }
    let used: u64 = choice.iter().zip(cls.iter()).map(|(&k, c)| c[k].0).sum();
    ensure!(
        used <= limit,
        "internal: selection exceeds the budget ({used} > {limit})"
    );
    for ((l, &k), opts_l) in layers.iter_mut().zip(&choice).zip(&options) {
        l.precision = opts_l[k];
        l.bytes = l.bytes_by_precision[&l.precision];
    }
    let total_bytes = layers.iter().map(|l| l.bytes).sum();
    let bits: u64 = layers
        .iter()
        .map(|l| l.precision.bits() * l.params as u64)
        .sum();
    let mut frontier = Vec::new();
    // Starting points only (the local search works in true bytes): a coarse size axis suffices.
    let coarse = (opts.max_buckets / 64).max(1024);
    for (bytes, sum_omega) in pareto(&classes, opts.pareto_points, opts.max_buckets) {
        // With the joint model: its local optimum at this size, from the same starts.
        let predicted_loss = match (&gram, solve(&classes, bytes, coarse)) {
            (Some(g), Some(at)) => Some(joint::search(g, &classes, &at, bytes, coarse)?.best.loss),
            _ => None,
        };
        frontier.push(ParetoPoint {
            bytes,
            sum_omega,
            predicted_loss,
        });
    }
    let pareto = frontier;
    Ok(MixedPrecisionReport {
        selection: if joint.is_some() {
            Selection::Joint
        } else {
            Selection::Trace
        },
        sum_omega: layers.iter().map(|l| l.omega[&l.precision]).sum(),
        exact: sol.exact,
        joint,
        layers,
        budget,
        fp32_bytes,
        total_bytes,
        avg_bits: bits as f64 / total_params.max(1) as f64,
        pareto,
    })
}

/// One layer's precision options for a plan made elsewhere (e.g. `prune`'s size plan): the
/// predicted loss of the layer alone at each allowed precision, in the units of the Hessian
/// machinery's label-free loss (mean per output row).
#[derive(Debug, Clone)]
pub struct LayerOptions {
    pub node: String,
    pub weight: String,
    pub weight_shape: Vec<usize>,
    pub out_axis: usize,
    pub in_axis: usize,
    /// `(precision, predicted loss)`, cheapest first; fp32 (loss 0) last.
    pub options: Vec<(Precision, f64)>,
}

/// Every layer's [`LayerOptions`]: with responses (joint selection) the per-layer second-order
/// term `½‖ũ_{l,b}‖²`, else HAWQ-v2's `½ Ω_b`.
pub fn layer_options(
    model: &Model,
    sens: &[LayerSensitivity],
    opts: &MixedPrecisionOptions,
) -> Result<Vec<LayerOptions>> {
    let keep = keep_patterns(opts)?;
    let mut out = Vec::with_capacity(sens.len());
    for s in sens {
        let w = tensor::to_f32(
            model
                .graph
                .constant(&s.weight)
                .with_context(|| format!("weight '{}' is not a constant", s.weight))?,
        )?;
        let kept = full_match(&keep, &s.node) || full_match(&keep, &s.weight);
        let allowed = allowed_precisions(kept, opts);
        let with_responses = s.responses.len() + 1 == allowed.len();
        let options = allowed
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                let loss = if p == Precision::Fp32 {
                    0.0
                } else if with_responses {
                    0.5 * s.responses[k]
                        .iter()
                        .map(|&v| f64::from(v).powi(2))
                        .sum::<f64>()
                } else {
                    let d = round_trip_in(&w, s.out_axis, s.in_axis, p, opts.block_size);
                    let err2: f64 = w
                        .iter()
                        .zip(d.iter())
                        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                        .sum();
                    0.5 * s.trace_per_param.max(0.0) * err2
                };
                (p, loss)
            })
            .collect();
        out.push(LayerOptions {
            node: s.node.clone(),
            weight: s.weight.clone(),
            weight_shape: w.shape().to_vec(),
            out_axis: s.out_axis,
            in_axis: s.in_axis,
            options,
        });
    }
    Ok(out)
}

/// Bytes written for a weight of `shape` at precision `p` (block-wise int4 where
/// [`int4_block`] applies), as the selection counts them.
pub fn bytes_at(
    shape: &[usize],
    out_axis: usize,
    in_axis: usize,
    p: Precision,
    block: Option<usize>,
) -> u64 {
    let n: usize = shape.iter().product();
    let channels = shape.get(out_axis).copied().unwrap_or(1);
    match (p, int4_block(shape, in_axis, block)) {
        (Precision::Int4, Some(b)) => blocked_int4_bytes(shape, in_axis, b),
        _ => weight_bytes(n, channels, p),
    }
}
