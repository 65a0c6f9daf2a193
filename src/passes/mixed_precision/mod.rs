//! Pass `mixed-precision`: one weight precision per layer (fp32, fp16, int8, int4), chosen from
//! the Hessian of a label-free loss to minimize the predicted loss increase under a size budget.
//!
//! ```text
//! before: x -> Conv(W, B) -> y
//! int8:   x -> Q -> DQ -> Conv(DQ(W_int8, s[c], axis 0), DQ(B_int32)) -> ...   (opset >= 13)
//! int4:   same with W_int4 packed two per byte, DequantizeLinear at opset 21
//! int4, --block-size B: DQ(W_int4, s[o, ⌈i/B⌉, kh, kw], axis = in axis, block_size = B)
//! fp16:   x -> Conv(Cast(W_fp16, to=float), B) -> y
//! ```
//!
//! **Selection.** For layer `l` with `n` weights, trace `T = Tr(G)` ([`crate::hessian`]) and
//! precision `b`: `Ω_b = (T / n) · ‖Q_b(W) − W‖²`, the Hutchinson-averaged diagonal times the
//! quantization error energy (`½ Ω` predicts the loss increase). `Q_b`: int8 / int4 symmetric
//! per channel on the output-channel axis (`scale = max|w| / 127` or `/ 7`, round half to even),
//! fp16 round to nearest. Sizes (bytes written): fp32 `4n`, fp16 `2n`, int8 `n + 4C + C`, int4
//! `⌈n/2⌉ + 4C + ⌈C/2⌉` (f32 scales and zero points per channel, `C` channels); block-wise
//! int4 (`block_size`, only where the input axis holds at least one block, [`int4_block`]):
//! one scale per `B` consecutive input channels at every other index, `⌈n/2⌉ + 4·#scales`, no
//! zero point. One precision
//! per layer minimizing `Σ Ω` under the budget is a multiple-choice knapsack, solved by dynamic
//! programming ([`solve`]): costs shifted by each layer's cheapest option and divided by their
//! gcd make the DP exact; when that axis would exceed `max_buckets`, costs are rounded *up* to
//! a coarser unit (the answer then always fits the true budget, and is optimal up to that
//! rounding; the report says `exact: false`). The chosen sizes are re-summed in true bytes and
//! checked against the budget.
//!
//! **Joint selection** (default, [`Selection::Joint`]). `Ω` assumes each layer's error is
//! isotropic and that layers' errors add up independently. [`joint`] instead evaluates the same
//! Gauss–Newton quadratic form on the *actual* errors, cross-layer terms included:
//! `L(a) ≈ ½ ‖Σ_l ũ_{l,a_l}‖²`, with `ũ` each layer's whitened output response to its quantized
//! weight (one run of the layer's downstream part per candidate precision,
//! [`hessian::sensitivity_with`]). The exact knapsack solutions on `Ω` and on the per-layer terms
//! `½‖ũ_{l,b}‖²` start a local search (one- and two-layer moves within the budget) on `L(a)`.
//! The traces and `Ω` are still estimated and reported. [`Selection::Trace`] is HAWQ-v2 as is.
//!
//! Budgets: `Bytes` / `Ratio` count true bytes (scales included) against fp32 weight bytes;
//! `AvgBits` counts payload bits per weight (32/16/8/4), the usual "bits per weight".
//!
//! **Emission.** fp32 layers are untouched. fp16: a FLOAT16 initializer and `Cast(to=FLOAT)`
//! producing the weight's name. int8/int4: int initializer, per-channel scale and zero point, and
//! `DequantizeLinear(axis = out axis)` producing the weight's name (block-wise int4: `axis` = in
//! axis and `block_size`, no zero point; its bias stays float, since ORT runs blocked weights as
//! DequantizeLinear + float op anyway). With
//! `quantize_activations` (default), the `quantize` pass's placement rules, calibration and
//! central Q/DQ insertion quantize the activations around int8/int4 layers (uint8) and their
//! biases (int32, scale `s_in · s_w[c]`); otherwise weights only. The default opset is raised to
//! 13 when anything is quantized, to 21 (IR version 10) only when int4 is used; nodes whose
//! form changed by 21 are converted (Reduce* `axes` attribute to input, Split `num_outputs`) and
//! ops whose semantics changed (GroupNormalization < 21, anything affected in a subgraph) are
//! refused with the node named.
//!
//! Invariants: with no budget the model is unchanged; a model already holding
//! QuantizeLinear/DequantizeLinear is left unchanged (idempotent); the result computes the same
//! function up to the chosen quantization.

pub mod joint;

use crate::calibrate::data::{CalibrationSet, DataOptions};
use crate::calibrate::observe::{observe_model, ObserveOptions};
use crate::hessian::{self, HessianOptions, LayerSensitivity};
use crate::ir::op::{self, attr_int, Attrs};
use crate::ir::{Graph, Model, Patch};
use crate::onnx::tensor;
use crate::onnx::proto::TensorProto;
use crate::passes::quantize::{self, insert, placement, QuantizeOptions};
use crate::passes::{Pass, PassContext, PassStats};
use anyhow::{bail, ensure, Context, Result};
use indexmap::IndexMap;
use ndarray::{ArrayD, IxDyn};
use regex::Regex;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
    Int4,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Int8,
        Precision::Int4,
    ];

    /// Payload bits per weight.
    pub fn bits(self) -> u64 {
        match self {
            Precision::Fp32 => 32,
            Precision::Fp16 => 16,
            Precision::Int8 => 8,
            Precision::Int4 => 4,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Total weight bytes (scales included) of the selected layers.
    Bytes(u64),
    /// Fraction of the layers' fp32 weight bytes.
    Ratio(f64),
    /// Average payload bits per weight.
    AvgBits(f64),
}

/// How the per-layer precisions are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Minimize the joint second-order loss of the actual quantization errors, cross-layer
    /// terms included ([`joint`]); the exact knapsack solutions on `Ω` and on the per-layer
    /// terms are its starting points.
    #[default]
    Joint,
    /// HAWQ-v2: minimize `Σ Ω` exactly (per-layer additive; no extra model runs).
    Trace,
}

/// Options of the `mixed-precision` pass.
#[derive(Debug, Clone)]
pub struct MixedPrecisionOptions {
    /// No budget: the pass does nothing.
    pub budget: Option<Budget>,
    /// Node or weight names / regexes (full match) kept fp32.
    pub keep_fp32: Vec<String>,
    pub allow_int4: bool,
    pub allow_fp16: bool,
    pub selection: Selection,
    /// int4 weights in blocks of this many values along the input axis (see [`int4_block`]);
    /// `None`: per output channel.
    pub block_size: Option<usize>,
    /// Quantize activations around int8/int4 layers with the `quantize` pass's machinery.
    pub quantize_activations: bool,
    pub hessian: HessianOptions,
    /// Points of the reported size-vs-ΣΩ frontier.
    pub pareto_points: usize,
    /// Also print the frontier in the terminal table.
    pub print_pareto: bool,
    /// Largest DP size axis before costs are rounded to a coarser unit.
    pub max_buckets: usize,
    /// Synthetic calibration samples when no data is given.
    pub synthetic_samples: usize,
}

impl Default for MixedPrecisionOptions {
    fn default() -> Self {
        MixedPrecisionOptions {
            budget: None,
            keep_fp32: vec![],
            allow_int4: true,
            allow_fp16: true,
            selection: Selection::Joint,
            block_size: None,
            quantize_activations: true,
            hessian: HessianOptions::default(),
            pareto_points: 16,
            print_pareto: false,
            max_buckets: 1 << 20,
            synthetic_samples: 16,
        }
    }
}

/// Symmetric quantization to `bits` with one scale (`max|w| / qmax`) per slot, `slot_of` giving
/// each element's slot: integer values, scales, and the dequantized tensor.
fn quantize_slots(
    w: &ArrayD<f32>,
    slots: usize,
    slot_of: impl Fn(&IxDyn) -> usize,
    bits: u32,
) -> (Vec<i8>, Vec<f32>, ArrayD<f32>) {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let mut scales = vec![0f32; slots];
    for (idx, &v) in w.indexed_iter() {
        let s = &mut scales[slot_of(&idx)];
        *s = s.max(v.abs());
    }
    for s in scales.iter_mut() {
        *s /= qmax;
        if !(s.is_finite() && *s > 0.0) {
            *s = 1.0;
        }
    }
    let mut q = Vec::with_capacity(w.len());
    let mut deq = ArrayD::<f32>::zeros(w.raw_dim());
    for ((idx, &v), d) in w.indexed_iter().zip(deq.iter_mut()) {
        let s = scales[slot_of(&idx)];
        let r = (v / s).round_ties_even().clamp(-qmax, qmax);
        q.push(r as i8);
        *d = r * s;
    }
    (q, scales, deq)
}

/// Symmetric per-channel quantization along `axis` to `bits` (8 or 4): integer values, scales,
/// and the dequantized tensor.
pub fn quantize_weight(
    w: &ArrayD<f32>,
    axis: usize,
    bits: u32,
) -> (Vec<i8>, Vec<f32>, ArrayD<f32>) {
    quantize_slots(w, w.shape()[axis], |idx| idx[axis], bits)
}

/// The int4 block size that applies to a weight of `shape`: `block` when the input axis holds at
/// least `block` values, else `None` (per output channel).
pub fn int4_block(shape: &[usize], in_axis: usize, block: Option<usize>) -> Option<usize> {
    block.filter(|&b| b > 0 && shape.get(in_axis).is_some_and(|&d| d >= b))
}

/// Symmetric block-wise quantization to `bits`: blocks of `block` consecutive values along
/// `axis`, one scale (`max|w| / qmax`) each, in the layout of ONNX block-wise DequantizeLinear
/// (the scale has `w`'s shape with `axis` divided by `block`, rounded up). Integer values,
/// scales, and the dequantized tensor.
pub fn quantize_blocked(
    w: &ArrayD<f32>,
    axis: usize,
    block: usize,
    bits: u32,
) -> (Vec<i8>, ArrayD<f32>, ArrayD<f32>) {
    let mut sshape = w.shape().to_vec();
    sshape[axis] = sshape[axis].div_ceil(block);
    let mut sstride = vec![1usize; sshape.len()];
    for k in (0..sshape.len().saturating_sub(1)).rev() {
        sstride[k] = sstride[k + 1] * sshape[k + 1];
    }
    let slot_of = |idx: &IxDyn| -> usize {
        (0..sshape.len())
            .map(|k| (if k == axis { idx[k] / block } else { idx[k] }) * sstride[k])
            .sum()
    };
    let (q, scales, deq) = quantize_slots(w, sshape.iter().product(), slot_of, bits);
    let scales = ArrayD::from_shape_vec(IxDyn(&sshape), scales).expect("scale shape");
    (q, scales, deq)
}

/// [`round_trip`], with int4 block-wise along `in_axis` where [`int4_block`] applies.
pub fn round_trip_in(
    w: &ArrayD<f32>,
    out_axis: usize,
    in_axis: usize,
    p: Precision,
    block: Option<usize>,
) -> ArrayD<f32> {
    match (p, int4_block(w.shape(), in_axis, block)) {
        (Precision::Int4, Some(b)) => quantize_blocked(w, in_axis, b, 4).2,
        _ => round_trip(w, out_axis, p),
    }
}

/// `W` after a round trip through precision `p` (int8/int4 per output channel).
pub fn round_trip(w: &ArrayD<f32>, axis: usize, p: Precision) -> ArrayD<f32> {
    match p {
        Precision::Fp32 => w.clone(),
        Precision::Fp16 => w.mapv(|v| half::f16::from_f32(v).to_f32()),
        Precision::Int8 => quantize_weight(w, axis, 8).2,
        Precision::Int4 => quantize_weight(w, axis, 4).2,
    }
}

/// Bytes written for an int4 weight of `shape` in blocks of `block` along `in_axis` (scales
/// only, no zero point).
pub fn blocked_int4_bytes(shape: &[usize], in_axis: usize, block: usize) -> u64 {
    let n: usize = shape.iter().product();
    let d = shape[in_axis].max(1);
    (n.div_ceil(2) + 4 * (n / d) * d.div_ceil(block)) as u64
}

/// Bytes written for a weight of `n` values and `channels` output channels at precision `p`.
pub fn weight_bytes(n: usize, channels: usize, p: Precision) -> u64 {
    let (n, c) = (n as u64, channels as u64);
    match p {
        Precision::Fp32 => 4 * n,
        Precision::Fp16 => 2 * n,
        Precision::Int8 => n + 5 * c,
        Precision::Int4 => n.div_ceil(2) + 4 * c + c.div_ceil(2),
    }
}

/// A multiple-choice knapsack solution.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Chosen option per class.
    pub choice: Vec<usize>,
    pub cost: u64,
    pub value: f64,
    /// False when costs were rounded up to fit `max_buckets` (still feasible).
    pub exact: bool,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

struct Scaled {
    base: u64,
    unit: u64,
    costs: Vec<Vec<u64>>,
    exact: bool,
}

/// Costs shifted by each class's cheapest option and expressed in DP units for a range `span`.
fn scale(classes: &[Vec<(u64, f64)>], span: u64, max_buckets: usize) -> Scaled {
    let base: u64 = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).min().unwrap_or(0))
        .sum();
    let mins: Vec<u64> = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).min().unwrap_or(0))
        .collect();
    let g = classes
        .iter()
        .zip(&mins)
        .flat_map(|(c, &m)| c.iter().map(move |o| o.0 - m))
        .fold(0, gcd)
        .max(1);
    let limit = (max_buckets.max(1) as u64).saturating_sub(1).max(1);
    let (unit, exact) = if span / g <= limit {
        (g, true)
    } else {
        (span.div_ceil(limit).max(g), false)
    };
    let costs = classes
        .iter()
        .zip(&mins)
        .map(|(c, &m)| c.iter().map(|o| (o.0 - m).div_ceil(unit)).collect())
        .collect();
    Scaled {
        base,
        unit,
        costs,
        exact,
    }
}

/// One DP sweep: `best[b]` = min total value with shifted cost ≤ `b` units; with `keep`, the
/// choice table for reconstruction. Options with NaN value are never taken.
fn dp(
    classes: &[Vec<(u64, f64)>],
    costs: &[Vec<u64>],
    cap: usize,
    keep: bool,
) -> (Vec<f64>, Vec<Vec<u8>>) {
    let mut best = vec![0f64; cap + 1];
    let mut table = Vec::new();
    for (class, cost) in classes.iter().zip(costs) {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = if keep { vec![u8::MAX; cap + 1] } else { vec![] };
        for b in 0..=cap {
            for (k, (&c, o)) in cost.iter().zip(class).enumerate() {
                let c = c as usize;
                if c > b {
                    continue;
                }
                let v = best[b - c] + o.1;
                if v < next[b] {
                    next[b] = v;
                    if keep {
                        pick[b] = k as u8;
                    }
                }
            }
        }
        best = next;
        if keep {
            table.push(pick);
        }
    }
    (best, table)
}

/// Exact multiple-choice knapsack: one option `(cost, value)` per class minimizing the value sum
/// with cost sum ≤ `budget` (see the module docs for the discretization). `None`: infeasible.
pub fn solve(classes: &[Vec<(u64, f64)>], budget: u64, max_buckets: usize) -> Option<Solution> {
    if classes
        .iter()
        .any(|c| c.is_empty() || c.len() >= u8::MAX as usize)
    {
        return None;
    }
    let s0 = scale(classes, 0, 1);
    if budget < s0.base {
        return None;
    }
    let max_total: u64 = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).max().unwrap_or(0))
        .sum();
    let span = budget.min(max_total) - s0.base;
    let cells = (1usize << 26) / classes.len().max(1);
    let s = scale(classes, span, max_buckets.min(cells));
    let cap = (span / s.unit) as usize;
    let (best, table) = dp(classes, &s.costs, cap, true);
    if !best[cap].is_finite() {
        return None;
    }
    let mut b = cap;
    let mut choice = vec![0; classes.len()];
    for i in (0..classes.len()).rev() {
        let k = table[i][b] as usize;
        choice[i] = k;
        b -= s.costs[i][k] as usize;
    }
    let cost: u64 = choice.iter().zip(classes).map(|(&k, c)| c[k].0).sum();
    let value: f64 = choice.iter().zip(classes).map(|(&k, c)| c[k].1).sum();
    debug_assert!(cost <= budget);
    Some(Solution {
        choice,
        cost,
        value,
        exact: s.exact,
    })
}

/// The size-vs-value frontier `(cost, min value)` over all budgets, thinned to `points`.
pub fn pareto(classes: &[Vec<(u64, f64)>], points: usize, max_buckets: usize) -> Vec<(u64, f64)> {
    let s0 = scale(classes, 0, 1);
    let max_total: u64 = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).max().unwrap_or(0))
        .sum();
    let span = max_total - s0.base;
    let s = scale(classes, span, max_buckets);
    let cap = (span / s.unit) as usize;
    let (best, _) = dp(classes, &s.costs, cap, false);
    let mut frontier = Vec::new();
    for b in 0..=cap {
        if best[b].is_finite() && (b == 0 || best[b] < best[b - 1]) {
            frontier.push((s.base + b as u64 * s.unit, best[b]));
        }
    }
    if frontier.len() > points.max(2) {
        let m = points.max(2);
        let last = frontier.len() - 1;
        frontier = (0..m).map(|i| frontier[i * last / (m - 1)]).collect();
    }
    frontier
}

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

/// The joint selection at one budget: local search on the joint loss from the exact knapsack
/// solutions on `Ω` (`omega`, already solved) and on the per-layer terms.
struct JointSearch {
    best: joint::Refined,
    per_layer_choice: Vec<usize>,
    started_from: &'static str,
}

fn joint_search(
    gram: &joint::Gram,
    classes: &[Vec<(u64, f64)>],
    omega: &Solution,
    limit: u64,
    max_buckets: usize,
) -> Result<JointSearch> {
    let diagonal: Vec<Vec<(u64, f64)>> = classes
        .iter()
        .enumerate()
        .map(|(l, c)| {
            c.iter()
                .enumerate()
                .map(|(k, o)| (o.0, gram.diagonal(l, k)))
                .collect()
        })
        .collect();
    let costs: Vec<Vec<u64>> = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).collect())
        .collect();
    let per_layer = solve(&diagonal, limit, max_buckets)
        .context("internal: the per-layer knapsack found no solution where Ω's did")?;
    let from_per_layer = joint::refine(gram, &costs, limit, &per_layer.choice);
    let from_omega = joint::refine(gram, &costs, limit, &omega.choice);
    let (best, started_from) = if from_omega.loss < from_per_layer.loss {
        (from_omega, "omega")
    } else {
        (from_per_layer, "per_layer")
    };
    Ok(JointSearch {
        best,
        per_layer_choice: per_layer.choice,
        started_from,
    })
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

/// The precisions a layer may get, cheapest first (ties go to the smaller option); fp32 last.
fn allowed_precisions(kept: bool, opts: &MixedPrecisionOptions) -> Vec<Precision> {
    Precision::ALL
        .into_iter()
        .rev()
        .filter(|&p| match p {
            Precision::Fp32 => true,
            _ if kept => false,
            Precision::Int4 => opts.allow_int4,
            Precision::Fp16 => opts.allow_fp16,
            Precision::Int8 => true,
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
    batches: &[Vec<ArrayD<f32>>],
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
        let search = joint_search(&g, cls, &sol, limit, opts.max_buckets)?;
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
            (Some(g), Some(at)) => Some(joint_search(g, &classes, &at, bytes, coarse)?.best.loss),
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

/// The per-layer table of a selection, for the terminal: params, trace (± standard error), `Ω`
/// per precision, with the joint selection the per-layer second-order loss `ΔL` per precision,
/// then the choice and its bytes; with `frontier`, the size-vs-sensitivity frontier after it.
pub fn table(report: &MixedPrecisionReport, frontier: bool) -> Vec<String> {
    let precisions: Vec<Precision> = Precision::ALL
        .into_iter()
        .rev()
        .filter(|&p| p != Precision::Fp32 && report.layers.iter().any(|l| l.omega.contains_key(&p)))
        .collect();
    let joint = report.joint.is_some();
    let width = report
        .layers
        .iter()
        .map(|l| l.node.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 40);
    let short = |name: &str| -> String {
        let n = name.chars().count();
        if n <= width {
            name.to_string()
        } else {
            let tail: String = name.chars().skip(n - (width - 1)).collect();
            format!("…{tail}")
        }
    };
    let mut head = format!(
        "{:<width$} {:>8} {:>9} {:>4}",
        "layer", "params", "Tr(H)", "±%"
    );
    for p in &precisions {
        head += &format!(" {:>9}", format!("Ω {}", p.label()));
    }
    if joint {
        for p in &precisions {
            head += &format!(" {:>9}", format!("ΔL {}", p.label()));
        }
    }
    head += &format!(" {:>6} {:>9}", "chosen", "bytes");
    let mut lines = vec![head];
    let cell = |m: &BTreeMap<Precision, f64>, p: &Precision| match m.get(p) {
        Some(v) => format!(" {v:>9.2e}"),
        None => format!(" {:>9}", "-"),
    };
    for l in &report.layers {
        let rel = if l.hessian_trace != 0.0 {
            format!(
                "{:.0}",
                100.0 * l.hessian_trace_stderr / l.hessian_trace.abs()
            )
        } else {
            "-".into()
        };
        let mut line = format!(
            "{:<width$} {:>8} {:>9.2e} {:>4}",
            short(&l.node),
            l.params,
            l.hessian_trace,
            rel
        );
        for p in &precisions {
            line += &cell(&l.omega, p);
        }
        if joint {
            for p in &precisions {
                line += &cell(&l.loss, p);
            }
        }
        line += &format!(" {:>6} {:>9}", l.precision.label(), l.bytes);
        lines.push(line);
    }
    if let Some(j) = &report.joint {
        lines.push(format!(
            "predicted loss increase (second order, cross-layer terms included): chosen {:.3e}; exact ΣΩ knapsack (HAWQ-v2) {:.3e}; exact knapsack on the per-layer ΔL {:.3e}",
            j.predicted_loss, j.omega_choice_loss, j.per_layer_choice_loss
        ));
    }
    if frontier {
        lines.push(format!(
            "size-vs-sensitivity frontier ({} points; weight bytes of the selected layers, fp32 {}):",
            report.pareto.len(),
            report.fp32_bytes
        ));
        lines.push(format!(
            "{:>12} {:>7} {:>10} {:>15}",
            "bytes", "% fp32", "min ΣΩ", "predicted loss"
        ));
        for p in &report.pareto {
            lines.push(format!(
                "{:>12} {:>6.1}% {:>10.3e} {:>15}",
                p.bytes,
                100.0 * p.bytes as f64 / report.fp32_bytes.max(1) as f64,
                p.sum_omega,
                p.predicted_loss
                    .map_or("-".to_string(), |v| format!("{v:.3e}"))
            ));
        }
    }
    lines
}

/// Swap float initializer `name` for `node` (producing `name`) reading new initializers.
fn replace_constant(
    g: &mut Graph,
    name: &str,
    inits: Vec<TensorProto>,
    node: crate::onnx::proto::NodeProto,
) -> Result<()> {
    let anchor = g.consumers(name).first().map(|&(ix, _)| ix);
    let backup = g.clone();
    g.initializers.shift_remove(name);
    let patch = Patch {
        add: vec![node],
        initializers: inits,
        anchor,
        ..Default::default()
    };
    if let Err(e) = g.apply(patch) {
        *g = backup;
        return Err(e).with_context(|| format!("replacing weight '{name}'"));
    }
    Ok(())
}

/// Store weight `w` at precision `p`; returns the per-channel scales for int8/int4 (none for
/// block-wise int4, whose bias then stays float).
fn emit_weight(
    g: &mut Graph,
    namer: &mut insert::Namer,
    w: &str,
    (axis, in_axis): (usize, usize),
    p: Precision,
    block: Option<usize>,
) -> Result<Option<Vec<f32>>> {
    let t = g
        .constant(w)
        .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
    ensure!(
        axis < a.ndim(),
        "weight '{w}' has rank {} but axis {axis}",
        a.ndim()
    );
    let shape = a.shape().to_vec();
    if let (Precision::Int4, Some(b)) = (p, int4_block(&shape, in_axis, block)) {
        let (q, scales, _) = quantize_blocked(&a, in_axis, b, 4);
        let names = namer.take(
            g,
            'w',
            w,
            [
                ("quantized", "q"),
                ("scale", "s"),
                ("DequantizeLinear", "DQ"),
            ],
        );
        let wq = tensor::from_4bit(&names[0], &shape, &q, true);
        let s = tensor::from_f32(&names[1], &scales);
        let mut dq = op::node("DequantizeLinear", &names[2], &[&names[0], &names[1]], &[w]);
        op::set_attr(&mut dq, attr_int("axis", in_axis as i64));
        op::set_attr(&mut dq, attr_int("block_size", b as i64));
        replace_constant(g, w, vec![wq, s], dq)?;
        return Ok(None);
    }
    match p {
        Precision::Fp32 => Ok(None),
        Precision::Fp16 => {
            let names = namer.take(g, 'w', w, [("fp16", "h"), ("Cast", "Cast")]);
            let mut cast = op::node("Cast", &names[1], &[&names[0]], &[w]);
            op::set_attr(&mut cast, attr_int("to", 1));
            replace_constant(g, w, vec![tensor::from_f16(&names[0], &a)], cast)?;
            Ok(None)
        }
        Precision::Int8 | Precision::Int4 => {
            let bits = if p == Precision::Int8 { 8 } else { 4 };
            let (q, scales, _) = quantize_weight(&a, axis, bits);
            let names = namer.take(
                g,
                'w',
                w,
                [
                    ("quantized", "q"),
                    ("scale", "s"),
                    ("zero_point", "z"),
                    ("DequantizeLinear", "DQ"),
                ],
            );
            let c = scales.len();
            let zeros = vec![0i8; c];
            let (wq, zp) = if bits == 8 {
                (
                    tensor::from_i8(&names[0], &shape, &q),
                    tensor::from_i8(&names[2], &[c], &zeros),
                )
            } else {
                (
                    tensor::from_4bit(&names[0], &shape, &q, true),
                    tensor::from_4bit(&names[2], &[c], &zeros, true),
                )
            };
            let s = tensor::from_f32(
                &names[1],
                &ArrayD::from_shape_vec(IxDyn(&[c]), scales.clone())?,
            );
            let mut dq = op::node(
                "DequantizeLinear",
                &names[3],
                &[&names[0], &names[1], &names[2]],
                &[w],
            );
            op::set_attr(&mut dq, attr_int("axis", axis as i64));
            replace_constant(g, w, vec![wq, s, zp], dq)?;
            Ok(Some(scales))
        }
    }
}

const REDUCE_AXES_TO_INPUT_AT_18: &[&str] = &[
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// Raise an opset-13+ model to 21 (int4 DequantizeLinear), converting or refusing the ops whose
/// form or semantics changed in between.
fn upgrade_to_21(model: &mut Model) -> Result<Vec<String>> {
    let from = model.opset("").unwrap_or(1);
    if from >= 21 {
        return Ok(vec![]);
    }
    let affected = |op_type: &str| {
        REDUCE_AXES_TO_INPUT_AT_18.contains(&op_type)
            || matches!(op_type, "Split" | "GroupNormalization")
    };
    let g = &mut model.graph;
    let mut converted = 0;
    for ix in g.topo_order()? {
        let n = g.node(ix).clone();
        for sub in crate::ir::graph::subgraphs(&n) {
            if sub.node.iter().any(|m| affected(m.op_type())) {
                bail!("int4 needs opset 21; node '{}' ({}) has a subgraph with ops whose form changed by opset 21 (Reduce*/Split/GroupNormalization); not converted", n.name(), n.op_type());
            }
        }
        if !op::is_standard_domain(n.domain()) || !affected(n.op_type()) {
            continue;
        }
        let mut node = n.clone();
        let mut inits = Vec::new();
        match n.op_type() {
            "GroupNormalization" => bail!(
                "int4 needs opset 21; node '{}' (GroupNormalization) changed semantics at opset 21 (per-group scale/bias): re-export the model at opset 21 or forbid int4",
                n.name()
            ),
            "Split" => {
                if n.input.get(1).is_none_or(|s| s.is_empty()) && n.attr("num_outputs").is_none() {
                    op::set_attr(&mut node, attr_int("num_outputs", n.output.len() as i64));
                }
            }
            _ => {
                if let Some(axes) = n.attr_ints("axes")? {
                    node.attribute.retain(|a| a.name() != "axes");
                    let name = g.fresh_name(&format!("{}_axes", n.name()));
                    inits.push(tensor::from_i64(&name, &[axes.len()], &axes));
                    node.input.truncate(1);
                    node.input.push(name);
                }
            }
        }
        if node != n {
            g.apply(Patch {
                remove: vec![ix],
                add: vec![node],
                initializers: inits,
                ..Default::default()
            })
            .with_context(|| {
                format!(
                    "converting node '{}' ({}) to opset 21",
                    n.name(),
                    n.op_type()
                )
            })?;
            converted += 1;
        }
    }
    model.require_opset("", 21);
    if model.shell.ir_version.unwrap_or(0) < 10 {
        model.shell.ir_version = Some(10);
    }
    let mut notes = vec![format!(
        "raised the default opset from {from} to 21 and IR version to 10 (int4 DequantizeLinear)"
    )];
    if converted > 0 {
        notes.push(format!(
            "converted {converted} node(s) whose attributes became inputs by opset 21"
        ));
    }
    Ok(notes)
}

/// Rewrite `model` with one precision per weight (`(weight name, precision)`). Returns notes.
pub fn apply_assignment(
    model: &mut Model,
    assignment: &[(String, Precision)],
    opts: &MixedPrecisionOptions,
    calib: &CalibrationSet,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let layers = hessian::layers(&model.graph)?;
    let layer_of = |w: &str| layers.iter().find(|l| l.weight == w);
    let uses = |p: Precision| assignment.iter().any(|a| a.1 == p);
    let quantized = uses(Precision::Int8) || uses(Precision::Int4);
    let mut work = model.clone();
    if quantized {
        notes.extend(quantize::opset::upgrade(&mut work, &[])?);
        if opts.quantize_activations {
            // As in the quantize pass: an int32 bias belongs to one layer's s_in * s_w.
            quantize::unshare_biases(&mut work.graph)?;
        }
    }
    if uses(Precision::Int4) {
        notes.extend(upgrade_to_21(&mut work)?);
    }
    // Activations (and int32 biases) around int8/int4 layers, with the quantize pass's rules.
    let int_nodes: Vec<String> = assignment
        .iter()
        .filter(|a| matches!(a.1, Precision::Int8 | Precision::Int4))
        .filter_map(|a| layer_of(&a.0))
        .flat_map(|l| {
            work.graph
                .consumers(&l.weight)
                .iter()
                .map(|c| work.graph.node(c.0).name().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut plan = None;
    if quantized && opts.quantize_activations {
        if int_nodes.iter().any(String::is_empty) {
            notes.push("some int8/int4 nodes have no name: their activations stay float".into());
        }
        let qopts = QuantizeOptions {
            include_nodes: int_nodes
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| regex::escape(n))
                .collect(),
            ..QuantizeOptions::default()
        };
        if !qopts.include_nodes.is_empty() {
            let p = placement::plan(&work.graph, &qopts)?;
            let original = work.to_proto()?;
            let tensors: Vec<String> = p.activations.iter().cloned().collect();
            let obs_opts = ObserveOptions {
                method: qopts.method,
                moving_average: qopts.moving_average,
                scheme: qopts.activation_scheme,
            };
            let observed = observe_model(&original, &tensors, calib, &obs_opts)
                .context("observing activation ranges")?;
            plan = Some((p, observed, qopts));
        }
    }
    let g = &mut work.graph;
    let mut namer = insert::Namer::default();
    let mut scales: IndexMap<String, Vec<f32>> = IndexMap::new();
    for (w, p) in assignment {
        let l = layer_of(w)
            .with_context(|| format!("'{w}' is not the constant weight of a Conv/Gemm/MatMul"))?;
        let axes = (l.out_axis(), l.in_axis());
        if let Some(s) = emit_weight(g, &mut namer, w, axes, *p, opts.block_size)? {
            scales.insert(w.clone(), s);
        }
    }
    if let Some((p, observed, qopts)) = plan {
        let act_params = p.activation_params(&observed, qopts.activation_scheme)?;
        let params_of = |t: &str| act_params[t];
        for t in &p.activations {
            insert::activation(g, &mut namer, t, &params_of(t), qopts.activation_scheme)?;
        }
        let mut biases = 0;
        for (b, mark) in &p.biases {
            let Some(s_w) = scales.get(&mark.weight) else {
                continue;
            };
            insert::bias(
                g,
                &mut namer,
                b,
                params_of(&mark.input).scale,
                s_w,
                &mark.node,
            )
            .with_context(|| format!("node '{}'", mark.node))?;
            biases += 1;
        }
        notes.push(format!(
            "activations around int8/int4 layers quantized with the quantize pass's rules: {} Q/DQ pairs (uint8, {}), {biases} int32 biases",
            p.activations.len(),
            qopts.method.label()
        ));
    } else if quantized {
        notes.push("weight-only quantization: activations stay float".into());
    }
    g.remove_unused_initializers();
    *model = work;
    Ok(notes)
}

pub struct MixedPrecision;

impl Pass for MixedPrecision {
    fn name(&self) -> &'static str {
        "mixed-precision"
    }

    fn summary(&self) -> &'static str {
        "Hessian-guided per-layer weight precision (fp32/fp16/int8/int4) under a size budget"
    }

    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        mixed_precision(model, &ctx.mixed, ctx.calibration.as_deref())
    }
}

/// Run the pass: estimate, select, emit (all or nothing).
pub fn mixed_precision(
    model: &mut Model,
    opts: &MixedPrecisionOptions,
    calibration: Option<&CalibrationSet>,
) -> Result<PassStats> {
    let mut stats = PassStats::default();
    let Some(budget) = opts.budget else {
        stats
            .notes
            .push("no size budget given (target size or average bits): model unchanged".into());
        return Ok(stats);
    };
    let already = model.graph.node_indices().any(|ix| {
        matches!(
            model.graph.node(ix).op_type(),
            "QuantizeLinear" | "DequantizeLinear"
        )
    });
    if already {
        stats.notes.push(
            "the model already holds QuantizeLinear/DequantizeLinear nodes; left unchanged".into(),
        );
        return Ok(stats);
    }
    let synthetic;
    let calib = match calibration {
        Some(c) => c,
        None => {
            synthetic = CalibrationSet::synthetic(
                model,
                opts.synthetic_samples,
                opts.hessian.seed,
                &DataOptions::default(),
            )?;
            &synthetic
        }
    };
    stats.notes.extend(calib.notes.iter().cloned());
    let sens = sensitivities(model, &calib.batches, opts).context("estimating Hessian traces")?;
    if sens.is_empty() {
        stats
            .notes
            .push("no Conv/Gemm/MatMul with a constant weight: model unchanged".into());
        return Ok(stats);
    }
    let report = select(model, &sens, budget, opts)?;
    let assignment: Vec<(String, Precision)> = report
        .layers
        .iter()
        .map(|l| (l.weight.clone(), l.precision))
        .collect();
    stats
        .notes
        .extend(apply_assignment(model, &assignment, opts, calib)?);
    stats.changes = report
        .layers
        .iter()
        .filter(|l| l.precision != Precision::Fp32)
        .count();
    let mut counts: IndexMap<Precision, usize> = IndexMap::new();
    for l in &report.layers {
        *counts.entry(l.precision).or_default() += 1;
    }
    stats.notes.push(format!(
        "{} layer(s): {}; weights {} -> {} bytes ({:.2} bits/weight), ΣΩ = {:.4e}{}",
        report.layers.len(),
        counts
            .iter()
            .map(|(p, c)| format!("{c} {}", p.label()))
            .collect::<Vec<_>>()
            .join(", "),
        report.fp32_bytes,
        report.total_bytes,
        report.avg_bits,
        report.sum_omega,
        if report.exact {
            ""
        } else {
            " (size axis discretized; budget still met)"
        }
    ));
    stats.table = table(&report, opts.print_pareto);
    stats.details = json!({
        "calibration": { "source": calib.source, "samples": calib.samples, "synthetic": calib.synthetic },
        "hessian": {
            "loss": opts.hessian.loss,
            "rel_eps": opts.hessian.rel_eps,
            "rel_tol": opts.hessian.rel_tol,
            "max_samples": opts.hessian.max_samples,
            "seconds": sens.iter().map(|s| s.seconds).sum::<f64>(),
        },
        "selection": serde_json::to_value(&report)?,
    });
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_int4_matches_the_onnx_block_wise_dequantize_formula() {
        // Conv-like [O=3, I=5, 2, 1], blocks of 2 along axis 1: 3 blocks (the last holds one
        // input channel), so the scale is [3, 3, 2, 1].
        let shape = [3usize, 5, 2, 1];
        let n: usize = shape.iter().product();
        let w = ArrayD::from_shape_vec(
            IxDyn(&shape),
            (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
                .collect(),
        )
        .unwrap();
        let (q, scales, deq) = quantize_blocked(&w, 1, 2, 4);
        assert_eq!(scales.shape(), &[3, 3, 2, 1]);
        assert!(q.iter().all(|&v| (-7..=7).contains(&v)));
        let q64: Vec<i64> = q.iter().map(|&v| v as i64).collect();
        let s: Vec<f32> = scales.iter().copied().collect();
        let reference =
            crate::runtime::simulate::dequantize(&q64, &shape, &s, scales.shape(), None, 1, 2)
                .unwrap();
        assert_eq!(deq.iter().copied().collect::<Vec<_>>(), reference);
        // Each block's largest |w| lands on ±7 exactly.
        for o in 0..3 {
            for b in 0..3 {
                for k in 0..2 {
                    let block: Vec<f32> = (2 * b..(2 * b + 2).min(5))
                        .map(|i| w[[o, i, k, 0]])
                        .collect();
                    let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let want = if m > 0.0 { m / 7.0 } else { 1.0 };
                    assert!((scales[[o, b, k, 0]] - want).abs() <= 1e-7 * m.max(1.0));
                }
            }
        }
        // Bytes: ⌈30/2⌉ values + 4 per scale (18 scales).
        assert_eq!(blocked_int4_bytes(&shape, 1, 2), 15 + 4 * 18);
        // Blocks apply only where the input axis holds a whole block.
        assert_eq!(int4_block(&shape, 1, Some(8)), None);
        assert_eq!(int4_block(&shape, 1, Some(5)), Some(5));
        // Finer scales: never a larger error than per output channel.
        let per_channel = round_trip(&w, 0, Precision::Int4);
        let err = |d: &ArrayD<f32>| -> f32 { w.iter().zip(d).map(|(a, b)| (a - b).powi(2)).sum() };
        assert!(err(&deq) <= err(&per_channel));
    }
}
