//! `equalize`: cross-layer equalization (CLE, Nagel et al. 2019, "Data-Free Quantization") with
//! optional high-bias absorption, plus the bias-correction math the quantize pass uses.
//!
//! # What it does
//! For two weighted layers in a row, L1 (output channel `i`) and L2 (input channel `i`), with
//! only positively homogeneous, channel-preserving ops between them (`f(s·x) = s·f(x)` for
//! `s > 0`), scaling L1's output channel `i` by `1/s_i` and L2's input channel `i` by `s_i`
//! leaves the network function unchanged. Choosing `s_i` to give both sides the same range
//! makes per-tensor int8 weight quantization much less lossy on layers whose channel ranges
//! differ by orders of magnitude (typical after BN folding, worst on depthwise convs).
//!
//! ```text
//! before:  h = Conv(x, W1, b1)            after:  h = Conv(x, W1', b1')
//!          a = Relu(h)                            a = Relu(h)
//!          y = Conv(a, W2, b2)                    y = Conv(a, W2', b2)
//!
//!   W1'[i, ...] = W1[i, ...] / s_i     b1'[i] = b1[i] / s_i     W2'[:, i, ...] = W2[:, i, ...] * s_i
//!   r1_i = max |W1[i, ...]|,  r2_i = max |W2[:, i, ...]|,  s_i = sqrt(r1_i * r2_i) / r2_i
//! ```
//! so that afterwards `max |W1'[i]| = max |W2'[:, i]| = sqrt(r1_i r2_i)`. A zero range on either
//! side gives `s_i = 1`. Arithmetic is in f64, stored as f32.
//!
//! # When it fires
//! - L1, L2: `Conv` (any group, depthwise included), `ConvTranspose`, `Gemm` (alpha = 1,
//!   transA = 0, bias beta = 1) or `MatMul` with a constant 2-D weight (see `ir::layer`), float32
//!   weight and bias. L2 reads the chain as its data input. For a grouped / depthwise L2 input
//!   channel `i` is column `i % (Cin/g)` of the rows of group `i / (Cin/g)` (see
//!   [`ChannelMap`]), so a depthwise conv is a valid L2 (its row `i` scales by `s_i`) and a
//!   valid L1 (its row `i` scales by `1/s_i`).
//! - Between them, each value has exactly one reader and is not a graph output, and each op is
//!   one of: `Relu`, `LeakyRelu`, `PRelu` (any slope: both are linear on each half-line),
//!   `Clip(0, inf)` / `Clip(-inf, inf)`, `Identity`, `Dropout`, `MaxPool`, `AveragePool`,
//!   `GlobalAveragePool`, `GlobalMaxPool`, constant-mode zero `Pad` on spatial axes, and
//!   `Flatten(axis = 1)` after a global pool (or on a value with all-1 spatial dims).
//! - L1's output channel count equals L2's input channel count.
//!
//! Excluded, with the reason in `notes` and `details.excluded`: a bounded `Clip` such as
//! `Clip(0, 6)` (`min(s·x, 6) != s·min(x, 6)`: it could only be kept exact with all `s_i = 1`;
//! it is never replaced by a Relu), residual `Add`, `Concat` and other channel-coupling or
//! unknown ops, values with several readers (branches).
//!
//! # Chains of three or more layers
//! A layer can be L2 of one pair and L1 of the next. The pass sweeps all pairs in topological
//! order, recomputing ranges from the current weights, until a sweep's largest `|ln s_i|` is
//! below `tolerance` (default 1e-3) or after `iterations` sweeps (default 100).
//!
//! # High-bias absorption (`absorb_high_bias`, off by default)
//! Where a ReLU sits between L1 and L2, moves `c_i >= 0` from L1's bias into L2's bias (see
//! [`bias`]): `c_i = max(0, beta_i - 3 gamma_i) / S_i` from the BN folded into L1 (`bn_stats`,
//! from the `fuse` record, `S_i` = L1's total CLE scale), else `max(0, min h_i)` over
//! `calibration` batches. Exact only while pre-activations stay above `c_i` and away from zero
//! padding; pairs with padding are listed in `border_effects`. Not for ConvTranspose / MatMul
//! L2 (or MatMul L1).
//!
//! # Bias correction
//! Needs the quantized weights, so it runs inside the quantize pass: it calls
//! [`empirical_bias_correction`] (or [`bias_correction_delta`] with [`relu_normal_mean`] for
//! `analytic`) according to `EqualizeOptions::bias_correction`.
//!
//! # Measured gate (`measured`, with calibration data and a `quantize` pass after)
//! Every pair, every absorption and (with [`BiasCorrection::Measured`]) every layer's bias
//! correction is kept only where it lowers the quantized model's output error on the
//! calibration data, judged by quantizing candidates exactly as the run's `quantize` pass will
//! ([`gate`]: start from none unless all is reliably better, then toggle graph-order groups of
//! at most [`gate::MAX_GROUPS`]). Before per-channel weights only a measured bias correction
//! runs, unless `with_per_channel`. Each pair's `gate` (`kept`, `loss_change`: the relative
//! output-loss change its group brought when tried) is in the report, the totals in
//! `details.gate`; the terminal names the groups whose verdict changed the loss most.
//!
//! # Report
//! `details.pairs[]`: `l1`, `l2`, `via` (op types between), `channels`, `range_ratio_before` /
//! `range_ratio_after` (max/min of L1's output channel ranges), `scale_min` / `scale_max` (of
//! the total `S_i`), `sqnr_db` `{l1_before, l1_after, l2_before, l2_after}` (per-tensor symmetric
//! int8 weight SQNR, `10 log10(sum w^2 / sum (w - q(w))^2)`, null = exact), `absorbed` (when
//! high-bias absorption moved something). `details.excluded[]`: `from`, `to`, `reason`.
//! `details.sweeps`, `details.converged`, `details.last_max_log_scale`.
//!
//! # Invariants
//! - The float function is unchanged up to f32 rounding (without high-bias absorption).
//! - Idempotent: when the first sweep finds every `|ln s_i| < tolerance` the graph is not
//!   touched and `changes = 0`; a run ends only once a sweep is below tolerance, so a second run
//!   changes nothing.
//! - Node names, value names, graph inputs/outputs unchanged; an initializer that other nodes
//!   also read is not modified in place (the layer gets a fresh copy).
//! - `changes` counts pairs rescaled (some `|ln S_i| >= tolerance`) plus pairs whose high bias
//!   was absorbed.

pub mod bias;
mod chain;
pub mod gate;
pub mod math;

pub use bias::{
    bias_correction_delta, channel_stats, empirical_bias_correction, input_channel_means,
    relu_normal_mean, BiasCorrection, ChannelAxis, Reduce,
};
pub use chain::{walk, Pair, Walk};
pub use math::{equalizing_scales, fake_quant_int8, int8_sqnr_db, range_ratio, ChannelMap};

use crate::ir::layer::{Layer, LayerKind};
use crate::ir::op::Attrs;
use crate::ir::{Graph, Model, Patch};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::tensor;
use crate::passes::fuse::FoldedBn;
use crate::passes::{Fact, Pass, PassContext, PassStats, Skip};
use anyhow::{Context, Result};
use ndarray::{ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Calibration batches: each batch gives every model input by name.
pub type Calibration = Arc<Vec<crate::calibrate::NamedBatch>>;

/// Options of the `equalize` pass (and of bias correction in `quantize`).
#[derive(Debug, Clone)]
pub struct EqualizeOptions {
    /// Most sweeps over all pairs.
    pub iterations: usize,
    /// Stop when a sweep's largest `|ln s_i|` is below this.
    pub tolerance: f64,
    pub absorb_high_bias: bool,
    /// Read by the quantize pass.
    pub bias_correction: BiasCorrection,
    /// Folded BN statistics by the name of the node each BN went into (in a pipeline: the
    /// `fuse` pass's [`crate::passes::Fact::FoldedBn`] of the same run, which replaces these).
    pub bn_stats: BTreeMap<String, FoldedBn>,
    /// Calibration batches for high-bias absorption / empirical bias correction.
    pub calibration: Option<Calibration>,
    /// Also run when per-channel quantization follows (the pipeline skips it then, see
    /// [`EQUALIZE_SKIPPED`]).
    pub with_per_channel: bool,
    /// Rescale pairs at all (`--equalize off`: no; the pass then only runs for a measured bias
    /// correction).
    pub rescale: bool,
    /// Keep each pair (and each absorption) only where it lowers the quantized model's output
    /// error on the calibration data ([`gate`]); needs calibration data and a `quantize` pass
    /// later in the run, else every pair is applied as without it.
    pub measured: bool,
}

impl Default for EqualizeOptions {
    fn default() -> Self {
        EqualizeOptions {
            iterations: 100,
            tolerance: 1e-3,
            absorb_high_bias: false,
            bias_correction: BiasCorrection::Off,
            bn_stats: BTreeMap::new(),
            calibration: None,
            with_per_channel: false,
            rescale: true,
            measured: false,
        }
    }
}

pub struct Equalize;

impl Pass for Equalize {
    fn name(&self) -> &'static str {
        "equalize"
    }

    fn summary(&self) -> &'static str {
        "cross-layer equalization of Conv/Gemm pairs (per-channel rescaling), optional high-bias absorption"
    }

    /// Before per-channel int8 weights, equalization steps aside unless asked for
    /// ([`EQUALIZE_SKIPPED`] says why); a measured bias correction still runs then (alone).
    fn is_enabled(&self, ctx: &PassContext) -> Result<(), Skip> {
        let bias_gate =
            gating(ctx).is_some() && ctx.quantize.bias_correction == BiasCorrection::Measured;
        if !ctx.equalize.rescale && !bias_gate {
            return Err(Skip {
                note: "skipped: --equalize off",
                details: json!({ "skipped": "off" }),
            });
        }
        if ctx.selected.contains(&"quantize")
            && ctx.quantize.per_channel
            && !ctx.equalize.with_per_channel
            && !bias_gate
        {
            return Err(Skip {
                note: EQUALIZE_SKIPPED,
                details: json!({ "skipped": "per-channel weights" }),
            });
        }
        Ok(())
    }

    /// High-bias absorption reads the BN statistics `fuse` folded in this run (when it ran).
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        let mut opts = ctx.equalize.clone();
        if opts.calibration.is_none() {
            opts.calibration = ctx
                .shared_calibration()
                .map(|c| Arc::new(c.named_batches()));
        }
        if let Some(folded) = &ctx.facts.folded_bn {
            opts.bn_stats = folded.clone();
        }
        let rescale = opts.rescale
            && !(ctx.selected.contains(&"quantize")
                && ctx.quantize.per_channel
                && !opts.with_per_channel);
        match gating(ctx) {
            Some((calib, quantize)) => {
                let gate = Gating {
                    calib,
                    quantize,
                    rescale,
                    pairs: opts.measured,
                };
                run_gated(model, &opts, Some(&gate))
            }
            None => run(model, &opts),
        }
    }
}

/// What the measured gate needs from the run: its calibration data and the options of the
/// `quantize` pass that follows.
pub struct Gating<'a> {
    pub calib: &'a crate::calibrate::CalibrationSet,
    pub quantize: crate::passes::quantize::QuantizeOptions,
    /// Whether pairs may be rescaled at all (not before per-channel weights unless asked).
    pub rescale: bool,
    /// Gate the pairs (and absorption); else apply them all as without the gate.
    pub pairs: bool,
}

/// The calibration data and quantize options when this run can measure (calibration data, a
/// `quantize` pass that runs and sees the whole model: no size budget) and something asks for
/// a measurement (`measured` pairs or a measured bias correction).
fn gating(
    ctx: &PassContext,
) -> Option<(
    &crate::calibrate::CalibrationSet,
    crate::passes::quantize::QuantizeOptions,
)> {
    let asked = ctx.equalize.measured || ctx.quantize.bias_correction == BiasCorrection::Measured;
    let calib = ctx.calibration.as_deref()?;
    if !asked
        || calib.synthetic
        || !ctx.selected.contains(&"quantize")
        || ctx.mixed.budget.is_some()
        || !ctx.target.policy().int8_activations
        || ctx.weight_only.bits == 4
    {
        return None;
    }
    let mut q = ctx.quantize.clone();
    q.target = ctx.target;
    if q.bn_stats.is_empty() {
        if let Some(folded) = &ctx.facts.folded_bn {
            q.bn_stats = folded.clone();
        }
    }
    Some((calib, q))
}

/// Why the default pipeline leaves equalization out before per-channel quantization.
pub const EQUALIZE_SKIPPED: &str = "skipped: per-channel int8 weights follow, which already give every output channel its own scale; rescaling channels then mostly moves range between activations, and measured against no equalization it cost 0.4 dB output SQNR on ResNet-18 and EfficientNet-B0 while gaining 0.6 dB on MobileNetV2 (BENCHMARKS.md). Run it anyway with --equalize always (or name it in --passes)";

/// One layer's working copy.
#[derive(Clone)]
struct State {
    layer: Layer,
    map: ChannelMap,
    name: String,
    w0: ArrayD<f64>,
    w: ArrayD<f64>,
    b0: Option<Vec<f64>>,
    b: Option<Vec<f64>>,
}

/// The node as reports name it ([`crate::ir::op::node_label`]: its name, or its first output).
fn display_name(graph: &Graph, ix: NodeIndex) -> String {
    crate::ir::op::node_label(graph.node(ix)).to_string()
}

fn is_f32(graph: &Graph, name: &str) -> bool {
    graph
        .constant(name)
        .is_some_and(|t| t.data_type() == DataType::Float as i32)
}

/// Load a layer for equalization, or say why not.
fn load(graph: &Graph, ix: NodeIndex) -> std::result::Result<State, String> {
    let name = display_name(graph, ix);
    let layer = Layer::of(graph, ix).ok_or_else(|| format!("'{name}' has no constant weight"))?;
    if !is_f32(graph, &layer.weight) || layer.bias.as_ref().is_some_and(|b| !is_f32(graph, b)) {
        return Err(format!("'{name}' has a non-float32 weight or bias"));
    }
    let map =
        ChannelMap::new(layer.kind, &layer.weight_shape).map_err(|e| format!("'{name}': {e}"))?;
    let w = layer
        .weight_f32(graph)
        .map_err(|e| format!("'{name}': {e:#}"))?
        .mapv(f64::from);
    let b = match layer
        .bias_f32(graph)
        .map_err(|e| format!("'{name}': {e:#}"))?
    {
        Some(b) if b.len() == map.n_out => Some(b.iter().map(|&v| f64::from(v)).collect()),
        Some(b) => {
            return Err(format!(
                "'{name}': bias has {} values for {} channels",
                b.len(),
                map.n_out
            ))
        }
        None => None,
    };
    Ok(State {
        layer,
        map,
        name,
        w0: w.clone(),
        w,
        b0: b.clone(),
        b,
    })
}

fn finite_or_null(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// Run the pass on `model` with every pair applied (what [`Equalize::run`] does without
/// calibration data).
pub fn run(model: &mut Model, opts: &EqualizeOptions) -> Result<PassStats> {
    run_gated(model, opts, None)
}

/// Run the pass on `model`; with `gate`, pairs (when `gate.pairs`), absorptions and a
/// [`BiasCorrection::Measured`] bias correction are kept only where they measurably lower the
/// quantized model's output error ([`gate`]).
pub fn run_gated(
    model: &mut Model,
    opts: &EqualizeOptions,
    gate: Option<&Gating>,
) -> Result<PassStats> {
    if let Some(g) = gate {
        if !g.rescale {
            let judge = gate::Judge::new(model, g.calib, &g.quantize)?;
            let mut notes = Vec::new();
            let (corrected, details) = measured_bias_correction(model, g, &judge, &mut notes)?;
            return Ok(PassStats {
                changes: corrected,
                notes,
                table: vec![],
                facts: vec![],
                details: json!({ "rescaled": false, "gate": details }),
            });
        }
    }
    let graph = &model.graph;
    let mut states: BTreeMap<NodeIndex, State> = BTreeMap::new();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut excluded = Vec::new();
    let mut notes = Vec::new();
    for ix in graph.topo_order()? {
        if Layer::of(graph, ix).is_none() {
            continue;
        }
        let from = display_name(graph, ix);
        let p = match walk(graph, ix) {
            Walk::End => continue,
            Walk::Excluded { reason, to } => {
                let to = to.map(|t| display_name(graph, t));
                let between = match &to {
                    Some(t) => format!("between '{from}' and '{t}'"),
                    None => format!("after '{from}'"),
                };
                notes.push(format!("excluded: {reason} {between}"));
                excluded.push(json!({"from": from, "to": to, "reason": reason}));
                continue;
            }
            Walk::Pair(p) => p,
        };
        let mut ok = true;
        for l in [p.l1, p.l2] {
            if let std::collections::btree_map::Entry::Vacant(e) = states.entry(l) {
                match load(graph, l) {
                    Ok(s) => {
                        e.insert(s);
                    }
                    Err(reason) => {
                        ok = false;
                        let to = display_name(graph, p.l2);
                        notes.push(format!("excluded: {reason} (pair '{from}' -> '{to}')"));
                        excluded.push(json!({"from": from, "to": to, "reason": reason}));
                        break;
                    }
                }
            }
        }
        if !ok {
            continue;
        }
        let (n1, n2) = (states[&p.l1].map.n_out, states[&p.l2].map.n_in);
        if n1 != n2 {
            let to = display_name(graph, p.l2);
            let reason = format!("'{from}' has {n1} output channels, '{to}' reads {n2}");
            notes.push(format!("excluded: {reason}"));
            excluded.push(json!({"from": from, "to": to, "reason": reason}));
            continue;
        }
        pairs.push(p);
    }
    states.retain(|ix, _| pairs.iter().any(|p| p.l1 == *ix || p.l2 == *ix));
    // The float outputs every candidate is judged against, measured before anything changes
    // (only when there is something to judge).
    let judge = match gate {
        Some(g) if !pairs.is_empty() || g.quantize.bias_correction == BiasCorrection::Measured => {
            Some(gate::Judge::new(model, g.calib, &g.quantize)?)
        }
        _ => None,
    };

    // Sweeps.
    let mut total: Vec<Vec<f64>> = pairs
        .iter()
        .map(|p| vec![1.0; states[&p.l1].map.n_out])
        .collect();
    let mut sweeps = 0;
    let mut last_max = 0.0f64;
    let mut converged = pairs.is_empty();
    for sweep in 0..opts.iterations.max(1) {
        let mut max_log = 0.0f64;
        for (k, p) in pairs.iter().enumerate() {
            let r1 = states[&p.l1].map.out_ranges(&states[&p.l1].w)?;
            let r2 = states[&p.l2].map.in_ranges(&states[&p.l2].w)?;
            let s = equalizing_scales(&r1, &r2);
            max_log = s.iter().fold(max_log, |m, v| m.max(v.ln().abs()));
            let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
            let st1 = states.get_mut(&p.l1).context("state of L1")?;
            st1.map.scale_out(&mut st1.w, &inv)?;
            if let Some(b) = st1.b.as_mut() {
                b.iter_mut().zip(&inv).for_each(|(b, f)| *b *= f);
            }
            let st2 = states.get_mut(&p.l2).context("state of L2")?;
            st2.map.scale_in(&mut st2.w, &s)?;
            total[k].iter_mut().zip(&s).for_each(|(t, v)| *t *= v);
        }
        sweeps = sweep + 1;
        last_max = max_log;
        if max_log < opts.tolerance {
            converged = true;
            break;
        }
    }
    let already_equal = sweeps == 1 && converged;
    if !converged {
        notes.push(format!(
            "equalization stopped after {sweeps} sweeps with max |ln s| = {last_max:.3e} (tolerance {:.1e})",
            opts.tolerance
        ));
    }
    let mut gate_details = serde_json::Map::new();
    let pair_gate = match (gate, &judge) {
        (Some(g), Some(judge)) if g.pairs => Some(judge),
        _ => None,
    };
    let mut kept = vec![true; pairs.len()];
    let mut cle_decision: Option<gate::Decision> = None;
    if !already_equal {
        match pair_gate {
            Some(judge) if !pairs.is_empty() => {
                let d = {
                    let base: &Model = model;
                    let build = |kept: &[bool]| -> Result<Model> {
                        let mut st = states.clone();
                        apply_pairs(&mut st, &pairs, &total, kept)?;
                        let mut m = base.clone();
                        write_back(&mut m.graph, &mut st)?;
                        Ok(m)
                    };
                    gate::decide(judge, pairs.len(), build).context("measuring equalization")?
                };
                apply_pairs(&mut states, &pairs, &total, &d.kept)?;
                write_back(&mut model.graph, &mut states)?;
                kept = d.kept.clone();
                notes.push(gate_note("equalization", "pair", judge, &d, |k| {
                    format!(
                        "'{}' -> '{}'",
                        states[&pairs[k].l1].name, states[&pairs[k].l2].name
                    )
                }));
                gate_details.insert("pairs".into(), decision_json(&d));
                cle_decision = Some(d);
            }
            _ => write_back(&mut model.graph, &mut states)?,
        }
    }
    // The scales each pair actually got (1 where the gate dropped it).
    let total: Vec<Vec<f64>> = total
        .into_iter()
        .zip(&kept)
        .map(|(t, &k)| if k { t } else { vec![1.0; t.len()] })
        .collect();
    let rescaled: Vec<bool> = total
        .iter()
        .map(|t| !already_equal && t.iter().any(|v| v.ln().abs() >= opts.tolerance))
        .collect();

    // High-bias absorption.
    let mut absorbed: Vec<Option<serde_json::Value>> = vec![None; pairs.len()];
    let mut absorb_verdicts: Vec<Option<serde_json::Value>> = vec![None; pairs.len()];
    if opts.absorb_high_bias {
        match pair_gate {
            Some(judge) => {
                let base = states.clone();
                let mut all = states.clone();
                let mut absorbed_all = vec![None; pairs.len()];
                let shifts = absorb(
                    model,
                    opts,
                    &pairs,
                    &total,
                    &mut all,
                    &mut absorbed_all,
                    &mut notes,
                )?;
                let units: Vec<usize> = (0..pairs.len()).filter(|&k| shifts[k].is_some()).collect();
                if !units.is_empty() {
                    let d = {
                        let base_model: &Model = model;
                        let build = |on: &[bool]| -> Result<Model> {
                            let mut st = base.clone();
                            apply_shifts(&mut st, &pairs, &shifts, &units, on)?;
                            let mut m = base_model.clone();
                            write_back(&mut m.graph, &mut st)?;
                            Ok(m)
                        };
                        gate::decide(judge, units.len(), build)
                            .context("measuring high-bias absorption")?
                    };
                    apply_shifts(&mut states, &pairs, &shifts, &units, &d.kept)?;
                    write_back(&mut model.graph, &mut states)?;
                    for (u, &k) in units.iter().enumerate() {
                        if d.kept[u] {
                            absorbed[k] = absorbed_all[k].take();
                        }
                        absorb_verdicts[k] = Some(verdict_json(&d, u));
                    }
                    notes.push(gate_note("high-bias absorption", "pair", judge, &d, |u| {
                        let k = units[u];
                        format!(
                            "'{}' -> '{}'",
                            states[&pairs[k].l1].name, states[&pairs[k].l2].name
                        )
                    }));
                    gate_details.insert("absorption".into(), decision_json(&d));
                }
            }
            None => {
                absorb(
                    model,
                    opts,
                    &pairs,
                    &total,
                    &mut states,
                    &mut absorbed,
                    &mut notes,
                )?;
                write_back(&mut model.graph, &mut states)?;
            }
        }
    }

    // Measured bias correction (on the equalized, absorbed model).
    let mut corrected = 0;
    if let (Some(g), Some(judge)) = (gate, &judge) {
        if g.quantize.bias_correction == BiasCorrection::Measured {
            let (n, details) = measured_bias_correction(model, g, judge, &mut notes)?;
            corrected = n;
            if let serde_json::Value::Object(m) = details {
                gate_details.extend(m);
            }
        }
        gate_details.insert("samples".into(), json!(judge.samples));
        gate_details.insert("losses".into(), json!(judge.losses()));
    }

    let graph = &model.graph;
    let report: Vec<serde_json::Value> = pairs
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let (s1, s2) = (&states[&p.l1], &states[&p.l2]);
            let before = range_ratio(&s1.map.out_ranges(&s1.w0)?);
            let after = range_ratio(&s1.map.out_ranges(&s1.w)?);
            let smin = total[k].iter().copied().fold(f64::INFINITY, f64::min);
            let smax = total[k].iter().copied().fold(0.0f64, f64::max);
            let via: Vec<&str> = p.via.iter().map(|&v| graph.node(v).op_type()).collect();
            let mut v = json!({
                "l1": s1.name,
                "l2": s2.name,
                "via": via,
                "channels": s1.map.n_out,
                "range_ratio_before": finite_or_null(before),
                "range_ratio_after": finite_or_null(after),
                "scale_min": finite_or_null(smin),
                "scale_max": finite_or_null(smax),
                "sqnr_db": {
                    "l1_before": finite_or_null(int8_sqnr_db(&s1.w0)),
                    "l1_after": finite_or_null(int8_sqnr_db(&s1.w)),
                    "l2_before": finite_or_null(int8_sqnr_db(&s2.w0)),
                    "l2_after": finite_or_null(int8_sqnr_db(&s2.w)),
                },
            });
            if let Some(a) = &absorbed[k] {
                v["absorbed"] = a.clone();
            }
            if let Some(d) = &cle_decision {
                v["gate"] = verdict_json(d, k);
            }
            if let Some(a) = &absorb_verdicts[k] {
                v["absorption_gate"] = a.clone();
            }
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let changes = rescaled.iter().filter(|&&r| r).count()
        + absorbed.iter().filter(|a| a.is_some()).count()
        + corrected;
    // Their BN statistics no longer describe the rescaled (and maybe shifted) outputs.
    let rescaled_nodes = pairs
        .iter()
        .enumerate()
        .filter(|(k, _)| gate.is_none() || rescaled[*k] || absorbed[*k].is_some())
        .map(|(_, p)| states[&p.l1].name.clone())
        .collect();
    let mut details = json!({
        "pairs": report,
        "excluded": excluded,
        "sweeps": if pairs.is_empty() { 0 } else { sweeps },
        "converged": converged,
        "last_max_log_scale": last_max,
    });
    if !gate_details.is_empty() {
        details["gate"] = serde_json::Value::Object(gate_details);
    }
    Ok(PassStats {
        changes,
        notes,
        table: vec![],
        facts: vec![Fact::Rescaled(rescaled_nodes)],
        details,
    })
}

/// Reset every layer to its loaded weights and apply the total scales of the `kept` pairs
/// (each pair is an exact rescaling on its own, so any subset is).
fn apply_pairs(
    states: &mut BTreeMap<NodeIndex, State>,
    pairs: &[Pair],
    total: &[Vec<f64>],
    kept: &[bool],
) -> Result<()> {
    for st in states.values_mut() {
        st.w = st.w0.clone();
        st.b = st.b0.clone();
    }
    for (k, p) in pairs.iter().enumerate() {
        if !kept[k] {
            continue;
        }
        let inv: Vec<f64> = total[k].iter().map(|v| 1.0 / v).collect();
        let st1 = states.get_mut(&p.l1).context("state of L1")?;
        st1.map.scale_out(&mut st1.w, &inv)?;
        if let Some(b) = st1.b.as_mut() {
            b.iter_mut().zip(&inv).for_each(|(b, f)| *b *= f);
        }
        let st2 = states.get_mut(&p.l2).context("state of L2")?;
        st2.map.scale_in(&mut st2.w, &total[k])?;
    }
    Ok(())
}

/// Apply the absorption shifts of the units (`units[u]` is a pair index) that are `on`.
fn apply_shifts(
    states: &mut BTreeMap<NodeIndex, State>,
    pairs: &[Pair],
    shifts: &[Option<Shift>],
    units: &[usize],
    on: &[bool],
) -> Result<()> {
    for (u, &k) in units.iter().enumerate() {
        let (true, Some(shift)) = (on[u], &shifts[k]) else {
            continue;
        };
        let st1 = states.get_mut(&pairs[k].l1).context("state of L1")?;
        let b1 = st1.b.get_or_insert_with(|| vec![0.0; shift.c.len()]);
        b1.iter_mut().zip(&shift.c).for_each(|(b, v)| *b -= v);
        let st2 = states.get_mut(&pairs[k].l2).context("state of L2")?;
        let b2 = st2.b.get_or_insert_with(|| vec![0.0; shift.add.len()]);
        b2.iter_mut().zip(&shift.add).for_each(|(b, v)| *b += v);
    }
    Ok(())
}

/// Bias correction kept per layer where it measurably helps; returns the layers corrected and
/// the report section.
fn measured_bias_correction(
    model: &mut Model,
    g: &Gating,
    judge: &gate::Judge,
    notes: &mut Vec<String>,
) -> Result<(usize, serde_json::Value)> {
    let deltas: Vec<(String, String, Vec<f64>)> = gate::bias_deltas(model, &g.quantize, g.calib)?
        .into_iter()
        .filter(|(_, _, d)| d.iter().any(|&v| v != 0.0))
        .collect();
    if deltas.is_empty() {
        notes.push("measured bias correction: no quantized layer with its own bias".into());
        return Ok((0, json!({ "bias_correction": { "layers": [] } })));
    }
    let selected = |on: &[bool]| -> Vec<(&str, &[f64])> {
        deltas
            .iter()
            .zip(on)
            .filter(|(_, o)| **o)
            .map(|((_, b, d), _)| (b.as_str(), d.as_slice()))
            .collect()
    };
    let d = {
        let base: &Model = model;
        gate::decide(judge, deltas.len(), |on| {
            gate::with_bias_deltas(base, &selected(on))
        })
        .context("measuring bias correction")?
    };
    *model = gate::with_bias_deltas(model, &selected(&d.kept))?;
    notes.push(gate_note("bias correction", "layer", judge, &d, |k| {
        format!("'{}'", deltas[k].0)
    }));
    let mut section = decision_json(&d);
    section["layers"] = deltas
        .iter()
        .enumerate()
        .map(|(k, (node, _, delta))| {
            let mut v = verdict_json(&d, k);
            v["node"] = json!(node);
            v["max_abs_delta"] = json!(delta.iter().fold(0.0f64, |m, x| m.max(x.abs())));
            v
        })
        .collect();
    Ok((
        d.kept.iter().filter(|&&k| k).count(),
        json!({ "bias_correction": section }),
    ))
}

/// A decision's totals for the report.
fn decision_json(d: &gate::Decision) -> serde_json::Value {
    json!({
        "kept": d.kept.iter().filter(|&&k| k).count(),
        "of": d.kept.len(),
        "start": d.start,
        "loss_none": finite_or_null(d.loss_none),
        "loss_all": finite_or_null(d.loss_all),
        "loss": finite_or_null(d.loss),
        "evaluations": d.evaluations,
    })
}

/// Unit `k`'s verdict: kept, and the relative output-loss change its group brought when tried.
fn verdict_json(d: &gate::Decision, k: usize) -> serde_json::Value {
    let g = d.group_of(k);
    json!({
        "kept": d.kept[k],
        "loss_change": g.map(|g| finite_or_null(g.loss_change())),
        "group": g.filter(|g| g.last > g.first).map(|g| [g.first, g.last]),
    })
}

/// One terminal line: how many units were kept, the loss without, with all and chosen, and the
/// units whose verdict mattered most.
fn gate_note(
    what: &str,
    unit: &str,
    judge: &gate::Judge,
    d: &gate::Decision,
    name: impl Fn(usize) -> String,
) -> String {
    let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * (a - b) / b } else { 0.0 };
    let mut groups: Vec<&gate::GroupVerdict> = d.groups.iter().collect();
    groups.sort_by(|a, b| b.loss_change().abs().total_cmp(&a.loss_change().abs()));
    let mattered: Vec<String> = groups
        .iter()
        .take(3)
        .map(|g| {
            let who = if g.last > g.first {
                format!("{}..{}", name(g.first), name(g.last))
            } else {
                name(g.first)
            };
            format!(
                "{who} {} ({:+.1}%)",
                if g.kept { "kept" } else { "dropped" },
                100.0 * g.loss_change()
            )
        })
        .collect();
    format!(
        "measured {what}: kept on {} of {} {unit}(s) by output error on {} calibration sample(s) ({}): loss {:.3e} without, {:.3e} with all, {:.3e} chosen ({:+.1}%){}",
        d.kept.iter().filter(|&&k| k).count(),
        d.kept.len(),
        judge.samples,
        judge.losses().join("+"),
        d.loss_none,
        d.loss_all,
        d.loss,
        pct(d.loss, d.loss_none),
        if mattered.is_empty() {
            String::new()
        } else {
            format!("; {}", mattered.join(", "))
        }
    )
}

/// One pair's high-bias shift: `c` leaves L1's bias, `add = W2·c` joins L2's.
#[derive(Debug, Clone)]
struct Shift {
    c: Vec<f64>,
    add: Vec<f64>,
}

/// Move `c_i` from L1's bias to L2's bias for every ReLU pair with known statistics.
fn absorb(
    model: &mut Model,
    opts: &EqualizeOptions,
    pairs: &[Pair],
    total: &[Vec<f64>],
    states: &mut BTreeMap<NodeIndex, State>,
    absorbed: &mut [Option<serde_json::Value>],
    notes: &mut Vec<String>,
) -> Result<Vec<Option<Shift>>> {
    let graph = &model.graph;
    let mut applied: Vec<Option<Shift>> = vec![None; pairs.len()];
    // Which pairs qualify, and where their shift comes from.
    let mut shifts: Vec<Option<(Vec<f64>, &'static str)>> = vec![None; pairs.len()];
    let mut need_data: Vec<usize> = Vec::new();
    for (k, p) in pairs.iter().enumerate() {
        if !p.relu {
            continue;
        }
        let (s1, s2) = (&states[&p.l1], &states[&p.l2]);
        let l1_ok = matches!(
            s1.layer.kind,
            LayerKind::Conv { .. } | LayerKind::ConvTranspose { .. } | LayerKind::Gemm { .. }
        );
        let l2_ok = matches!(
            s2.layer.kind,
            LayerKind::Conv { .. } | LayerKind::Gemm { .. }
        );
        let gemm_beta_ok = |st: &State| {
            st.b.is_some()
                || !matches!(st.layer.kind, LayerKind::Gemm { .. })
                || graph
                    .node(st.layer.node)
                    .attr_float("beta")
                    .ok()
                    .flatten()
                    .unwrap_or(1.0)
                    == 1.0
        };
        if !(l1_ok && l2_ok && gemm_beta_ok(s1) && gemm_beta_ok(s2)) {
            notes.push(format!(
                "high-bias absorption skipped for '{}' -> '{}': needs Conv/Gemm layers with a bias slot",
                s1.name, s2.name
            ));
            continue;
        }
        match opts.bn_stats.get(&s1.name) {
            Some(bn) if bn.gamma.len() == s1.map.n_out && bn.beta.len() == s1.map.n_out => {
                let c = bn
                    .beta
                    .iter()
                    .zip(&bn.gamma)
                    .zip(&total[k])
                    .map(|((b, g), t)| (b - 3.0 * g.abs()).max(0.0) / t)
                    .collect();
                shifts[k] = Some((c, "bn"));
            }
            _ => need_data.push(k),
        }
    }
    if !need_data.is_empty() {
        match &opts.calibration {
            Some(cal) => {
                // L1 is a Conv/ConvTranspose/Gemm (checked above): channels on axis 1.
                let values: Vec<(String, ChannelAxis)> = need_data
                    .iter()
                    .map(|&k| {
                        (
                            graph.node(pairs[k].l1).output[0].clone(),
                            ChannelAxis::Second,
                        )
                    })
                    .collect();
                let mins = channel_stats(&model.to_proto()?, &values, cal, Reduce::Min)
                    .context("high-bias absorption: measuring pre-activation minima")?;
                for (&k, m) in need_data.iter().zip(mins) {
                    shifts[k] = Some((m.iter().map(|v| v.max(0.0)).collect(), "calibration"));
                }
            }
            None => {
                for &k in &need_data {
                    notes.push(format!(
                        "high-bias absorption skipped for '{}': no BN statistics and no calibration data",
                        states[&pairs[k].l1].name
                    ));
                }
            }
        }
    }
    for (k, p) in pairs.iter().enumerate() {
        let Some((c, source)) = shifts[k].take() else {
            continue;
        };
        if c.len() != states[&p.l1].map.n_out || c.iter().all(|&v| v == 0.0) {
            continue;
        }
        let st1 = states.get_mut(&p.l1).context("state of L1")?;
        let b1 = st1.b.get_or_insert_with(|| vec![0.0; c.len()]);
        b1.iter_mut().zip(&c).for_each(|(b, v)| *b -= v);
        let st2 = states.get_mut(&p.l2).context("state of L2")?;
        let add = st2.map.apply_constant(&st2.w, &c)?;
        let b2 = st2.b.get_or_insert_with(|| vec![0.0; add.len()]);
        b2.iter_mut().zip(&add).for_each(|(b, v)| *b += v);
        absorbed[k] = Some(json!({
            "source": source,
            "channels": c.iter().filter(|&&v| v > 0.0).count(),
            "max_shift": c.iter().copied().fold(0.0f64, f64::max),
            "border_effects": p.border_effects,
        }));
        applied[k] = Some(Shift { c, add });
    }
    Ok(applied)
}

/// Store every layer's working weight and bias as f32 initializers: in place when the layer
/// is the initializer's only reader, else under a fresh name (the other readers keep the old
/// values); a created bias becomes a new input of the node.
fn write_back(graph: &mut Graph, states: &mut BTreeMap<NodeIndex, State>) -> Result<()> {
    // The patches below add and remove no nodes, so the indices stay valid.
    for (&ix, st) in states.iter_mut() {
        let layer =
            Layer::of(graph, ix).with_context(|| format!("layer '{}' vanished", st.name))?;
        let mut values: Vec<(usize, Option<String>, ArrayD<f32>, String)> = vec![(
            1,
            Some(layer.weight.clone()),
            st.w.mapv(|v| v as f32),
            format!("{}_equalized", layer.weight),
        )];
        if let Some(b) = &st.b {
            let a =
                ArrayD::from_shape_vec(IxDyn(&[b.len()]), b.iter().map(|&v| v as f32).collect())?;
            let base = match &layer.bias {
                Some(n) => format!("{n}_equalized"),
                None => format!("{}_bias", st.name),
            };
            values.push((2, layer.bias.clone(), a, base));
        }
        let in_place = |name: &Option<String>| {
            name.as_ref()
                .is_some_and(|n| graph.consumers(n).len() == 1 && !graph.is_graph_output(n))
        };
        let bases: Vec<String> = values
            .iter()
            .filter(|v| !in_place(&v.1))
            .map(|v| v.3.clone())
            .collect();
        let mut fresh = graph.fresh_names(&bases).into_iter();
        let mut node = graph.node(ix).clone();
        let mut rewired = false;
        let mut inits = Vec::new();
        for (slot, current, a, _) in values {
            let name = if in_place(&current) {
                current.unwrap_or_default()
            } else {
                let n = fresh.next().context("fresh name")?;
                while node.input.len() <= slot {
                    node.input.push(String::new());
                }
                node.input[slot] = n.clone();
                rewired = true;
                n
            };
            inits.push(tensor::from_f32(&name, &a));
        }
        graph
            .apply(Patch {
                initializers: inits,
                ..Default::default()
            })
            .with_context(|| format!("storing the equalized weights of '{}'", st.name))?;
        if rewired {
            graph
                .replace_node(ix, node)
                .with_context(|| format!("rewiring '{}' to its equalized weights", st.name))?;
            st.layer =
                Layer::of(graph, ix).with_context(|| format!("layer '{}' vanished", st.name))?;
        }
    }
    Ok(())
}
