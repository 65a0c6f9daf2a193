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
pub mod math;

pub use bias::{
    bias_correction_delta, channel_stats, empirical_bias_correction, input_channel_means,
    relu_normal_mean, BiasCorrection, Reduce,
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
    /// ([`EQUALIZE_SKIPPED`] says why).
    fn is_enabled(&self, ctx: &PassContext) -> Result<(), Skip> {
        if ctx.selected.contains(&"quantize")
            && ctx.quantize.per_channel
            && !ctx.equalize.with_per_channel
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
        match &ctx.facts.folded_bn {
            Some(folded) => {
                let mut opts = ctx.equalize.clone();
                opts.bn_stats = folded.clone();
                run(model, &opts)
            }
            None => run(model, &ctx.equalize),
        }
    }
}

/// Why the default pipeline leaves equalization out before per-channel quantization.
pub const EQUALIZE_SKIPPED: &str = "skipped: per-channel int8 weights follow, which already give every output channel its own scale; rescaling channels then mostly moves range between activations, and measured against no equalization it cost 0.4 dB output SQNR on ResNet-18 and EfficientNet-B0 while gaining 0.6 dB on MobileNetV2 (BENCHMARKS.md). Run it anyway with --equalize always (or name it in --passes)";

/// One layer's working copy.
struct State {
    layer: Layer,
    map: ChannelMap,
    name: String,
    w0: ArrayD<f64>,
    w: ArrayD<f64>,
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

/// Run the pass on `model` (what [`Equalize::run`] does).
pub fn run(model: &mut Model, opts: &EqualizeOptions) -> Result<PassStats> {
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
    let rescaled: Vec<bool> = total
        .iter()
        .map(|t| !already_equal && t.iter().any(|v| v.ln().abs() >= opts.tolerance))
        .collect();
    if !already_equal {
        write_back(&mut model.graph, &mut states)?;
    }

    // High-bias absorption.
    let mut absorbed: Vec<Option<serde_json::Value>> = vec![None; pairs.len()];
    if opts.absorb_high_bias {
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
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let changes =
        rescaled.iter().filter(|&&r| r).count() + absorbed.iter().filter(|a| a.is_some()).count();
    // Their BN statistics no longer describe the rescaled (and maybe shifted) outputs.
    let rescaled_nodes = pairs.iter().map(|p| states[&p.l1].name.clone()).collect();
    Ok(PassStats {
        changes,
        notes,
        table: vec![],
        facts: vec![Fact::Rescaled(rescaled_nodes)],
        details: json!({
            "pairs": report,
            "excluded": excluded,
            "sweeps": if pairs.is_empty() { 0 } else { sweeps },
            "converged": converged,
            "last_max_log_scale": last_max,
        }),
    })
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
) -> Result<()> {
    let graph = &model.graph;
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
                let values: Vec<String> = need_data
                    .iter()
                    .map(|&k| graph.node(pairs[k].l1).output[0].clone())
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
    }
    Ok(())
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
