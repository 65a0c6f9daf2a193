//! Pass `quantize`: calibrated int8 QDQ insertion.
//!
//! ```text
//! before: x -> Conv(W, B) -> Relu -> y
//! after:  x -> Q -> DQ -> Conv(DQ(W_int8, s_w[c], axis 0), DQ(B_int32, s_x * s_w[c])) -> Relu
//!           -> Q -> DQ -> y
//! ```
//! Steps: (1) raise the opset to 13, converting nodes whose attributes became inputs
//! ([`opset`]); (2) per-op rules mark tensors ([`placement`]); (3) one streaming tract run over
//! the calibration data observes every marked activation ([`materialize::calibrate`]);
//! (4) tensors that share a scale (Concat, pass-through ops) take the union of their ranges;
//! an activation whose int8 step leaves the quietest tenth of the calibration batches below
//! [`QUIET_MIN_SQNR_DB`] stays float ([`keep_quiet_float`]: audio around silence);
//! (5) [`insert::weight`] adds a DQ per weight (int8 symmetric, per-channel on the
//! output-channel axis), then [`materialize::insert()`] one Q/DQ pair per activation and a DQ
//! per bias (int32, scale `s_in * s_w[c]`). Steps 3-5 are shared with `mixed-precision`.
//!
//! Invariants: the result reads and computes the same values up to quantization error; each
//! tensor is quantized once; running the pass on its own output changes nothing (a graph that
//! already holds QuantizeLinear/DequantizeLinear is left alone with a note).
//!
//! Changes counted: inserted QuantizeLinear/DequantizeLinear pairs plus weight and bias
//! DequantizeLinear nodes.
//!
//! Note for the validator: tract runs DequantizeLinear -> Conv -> QuantizeLinear in float, so
//! its numbers are a simulation of the int8 kernels; ONNX Runtime fuses them into QLinearConv.

pub mod adaround;
pub mod auto;
pub mod batch_shapes;
pub mod bodies;
pub mod choose;
pub mod decompose;
pub mod dynamic;
pub mod guard;
pub mod insert;
pub mod materialize;
pub mod opset;
pub mod placement;
pub mod scalar;
pub mod smooth;
pub mod specialized;
pub mod transformer;

use crate::calibrate::data::CalibrationSet;
use crate::calibrate::observe::{Method, Observed};
use crate::calibrate::params::ActScheme;
use crate::ir::Model;
use crate::onnx::tensor;
use crate::passes::{Pass, PassContext, PassStats};
use anyhow::{Context, Result};
pub use choose::{ActivationMode, Smooth};
use indexmap::IndexMap;
pub use insert::{Naming, Rounding};
use serde_json::json;
use std::collections::BTreeMap;

/// Options of the `quantize` pass.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    /// How much scoring `Method::Auto` does.
    pub auto: auto::AutoOptions,
    /// Moving-average min/max averaging constant (minmax only).
    pub moving_average: Option<f32>,
    pub activation_scheme: ActScheme,
    /// Per-channel weights (default); false = per-tensor.
    pub per_channel: bool,
    /// 7-bit weights ([-63, 63]).
    pub reduce_range: bool,
    pub rounding: Rounding,
    /// Learned weight rounding of Conv/Gemm/MatMul weights ([`adaround`]); `None` = `rounding`.
    pub adaround: Option<adaround::AdaRoundOptions>,
    /// int4 Conv/Gemm/MatMul weights with int8 activations ([`adaround::W4a8`]).
    pub w4a8: Option<adaround::W4a8>,
    /// Op types left float, on top of the ops no rule covers.
    pub exclude_ops: Vec<String>,
    /// Node names or regexes (full match) left float.
    pub exclude_nodes: Vec<String>,
    /// When non-empty, only nodes matching one of these names / regexes are quantized.
    pub include_nodes: Vec<String>,
    /// Tensors never given a Q/DQ pair whatever the placement marks (a KV-cache decoder's
    /// logits, and its state unless `--quantize-cache`).
    pub keep_float: Vec<String>,
    /// Tensors quantized (own range) even where no placement rule marks them: a KV-cache
    /// decoder's present outputs under `--quantize-cache` (static mode only).
    pub force_activations: Vec<String>,
    /// Synthetic samples when no calibration data is given.
    pub synthetic_samples: usize,
    pub seed: u64,
    /// Correct each quantized layer's float bias for the mean shift its weight error causes.
    pub bias_correction: crate::passes::equalize::BiasCorrection,
    /// BN statistics of the layers `fuse` folded (for analytic bias correction), by the folded
    /// node's name; the runner fills it and drops layers a later pass rescaled.
    pub bn_stats: BTreeMap<String, crate::passes::fuse::FoldedBn>,
    /// Full input shapes for symbolic dims (`--input-shape`), for shape analysis.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Names of the added Q/DQ tensors and nodes.
    pub naming: Naming,
    /// In a transformer: also quantize the attention products (Q x K^T, attention x V).
    pub attention_int8: bool,
    /// Static (calibrated Q/DQ), dynamic (run-time ranges) or auto ([`choose`]).
    pub activations: ActivationMode,
    /// SmoothQuant migration on transformers ([`smooth`]).
    pub smooth: Smooth,
    /// The runtime the placement is for ([`crate::passes::target::Policy`]).
    pub target: crate::passes::target::Target,
    /// Activation Q/DQ inside the `If` branches the calibration data takes ([`bodies`]). Off
    /// by default: on silero_vad_op18_ifless it costs 0.19 point of speech F1 (0.9960 ->
    /// 0.9941, past the 0.5-point bar; see [`bodies`]).
    pub body_activations: bool,
    /// Place by the target's conservative form (its optional rules and decompositions off,
    /// [`guard::conservative`]): the fidelity guard's fallback when it keeps no optional layer.
    pub conservative: bool,
}

impl QuantizeOptions {
    /// The placement policy this run follows: the target's, or its conservative form.
    pub fn policy(&self) -> crate::passes::target::Policy {
        let p = *self.target.policy();
        if self.conservative {
            guard::conservative(&p)
        } else {
            p
        }
    }
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            // Same default as the CLI: robust to the rare outliers min-max would chase. `Auto`
            // is opt-in until it holds the best fixed method everywhere (BENCHMARKS.md).
            method: Method::Percentile(99.999),
            auto: auto::AutoOptions::default(),
            moving_average: None,
            activation_scheme: ActScheme::U8Asymmetric,
            per_channel: true,
            reduce_range: false,
            rounding: Rounding::Nearest,
            adaround: None,
            w4a8: None,
            exclude_ops: vec![],
            exclude_nodes: vec![],
            include_nodes: vec![],
            keep_float: vec![],
            force_activations: vec![],
            synthetic_samples: 16,
            seed: 0,
            bias_correction: Default::default(),
            bn_stats: BTreeMap::new(),
            input_shapes: Vec::new(),
            naming: Naming::Compact,
            attention_int8: false,
            activations: ActivationMode::Auto,
            smooth: Smooth::Auto,
            target: Default::default(),
            body_activations: false,
            conservative: false,
        }
    }
}

pub struct Quantize;

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn summary(&self) -> &'static str {
        "calibrated int8 QDQ: per-channel int8 weights, uint8 activations, int32 biases"
    }

    /// Off when the target's policy keeps activations float (`--target tract`).
    fn is_enabled(&self, ctx: &PassContext) -> Result<(), crate::passes::Skip> {
        let policy = ctx.target.policy();
        if ctx.weight_only.bits == 4 {
            return Err(crate::passes::Skip {
                note: "--weight-bits 4: int4 weight-only, activations stay float",
                details: serde_json::Value::Null,
            });
        }
        if policy.int8_activations {
            return Ok(());
        }
        Err(crate::passes::Skip {
            note: policy.float_activations_because,
            details: serde_json::Value::Null,
        })
    }

    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        let mut opts = ctx.quantize.clone();
        opts.target = ctx.target;
        // Analytic bias correction reads the BN statistics `fuse` folded in this run.
        if opts.bn_stats.is_empty() {
            opts.bn_stats = match &ctx.facts.folded_bn {
                Some(folded) => folded.clone(),
                None => ctx.equalize.bn_stats.clone(),
            };
        }
        quantize(model, &opts, ctx.calibration.as_deref())
    }
}

/// What the target's policy changed in the placement, for the report: the heavy ops its speed
/// rule kept float (with their MACs and the values a Q/DQ pair would touch).
fn target_section(opts: &QuantizeOptions, plan: &placement::Plan) -> serde_json::Value {
    let policy = opts.target.policy();
    json!({
        "name": policy.name,
        "int8_outputs": policy.int8_outputs,
        "boundary_cost": policy.boundary_cost,
        "kept_float": plan.kept_float.iter().map(|k| json!({
            "node": k.node,
            "op": k.op,
            "macs": k.macs,
            "region_macs": k.region_macs,
            "boundary_values": k.values,
            "rule": k.rule,
            "why": match k.rule {
                "region" => format!(
                    "its int8 region does {} MACs, below the {} its boundaries ({} values through Q/DQ) cost on target {}",
                    k.region_macs, k.boundary_macs, k.values, policy.name
                ),
                "depthwise" => format!("a depthwise convolution: its float kernel is faster than the integer one on target {}", policy.name),
                "stem" => format!("the stem: {} MACs on an image input, below the {} MACs from which its integer kernel pays for the input's quantization on target {}", k.macs, policy.float_layers.map_or(0, |f| f.stem_max_macs), policy.name),
                "few MACs" => format!("{} MACs, below the {} MACs from which an integer kernel is faster on target {}", k.macs, policy.float_layers.map_or(0, |f| f.conv_min_macs), policy.name),
                _ => format!("its weight holds fewer than {} values: an integer kernel saves nothing on target {}", policy.float_layers.map_or(0, |f| f.linear_min_weights), policy.name),
            },
        })).collect::<Vec<_>>(),
    })
}

/// Empirical bias correction (Nagel et al. 2019, sec. 4.2): add `-(dq(q(W)) - W)·E[x]` to each
/// quantized layer's float bias, `E[x]` measured on the calibration data in the float model,
/// before the bias itself is quantized. Layers without a bias are left as they are.
fn correct_biases(
    work: &mut Model,
    plan: &placement::Plan,
    opts: &QuantizeOptions,
    calib: &CalibrationSet,
) -> Result<String> {
    use crate::passes::equalize::{
        bias_correction_delta, empirical_bias_correction, BiasCorrection, ChannelMap,
    };
    let mut quantized = Vec::new();
    for (w, mark) in &plan.weights {
        let wq = insert::fake_quant(&work.graph, w, mark.axis, opts.reduce_range, opts.rounding)?;
        quantized.push((mark.node.clone(), wq));
    }
    let (deltas, how) = if opts.bias_correction == BiasCorrection::Empirical {
        let named: Vec<crate::calibrate::NamedBatch> = calib.named_batches();
        let deltas = empirical_bias_correction(work, &quantized, &named)
            .context("empirical bias correction")?;
        (
            deltas,
            format!("from {} calibration sample(s)", calib.samples),
        )
    } else {
        // Analytic (data-free): a layer whose input is a folded BN's output (through ReLU,
        // ReLU6 or nothing) sees per channel N(beta, gamma^2) before the activation, so
        // E[x] = beta, E[relu(y)] = m(beta, gamma), E[clip(y, 0, 6)] = m(beta) - m(beta - 6).
        let g = &work.graph;
        let mut deltas = Vec::new();
        for (node, wq) in &quantized {
            let Some(ix) = g.node_indices().find(|&ix| g.node(ix).name() == node) else {
                continue;
            };
            let Some(means) = analytic_input_means(g, ix, &opts.bn_stats) else {
                continue;
            };
            let Some(layer) = crate::ir::layer::Layer::of(g, ix) else {
                continue;
            };
            let map = ChannelMap::new(layer.kind, &layer.weight_shape)
                .with_context(|| format!("node '{node}'"))?;
            let w = layer.weight_f32(g)?.mapv(f64::from);
            if let Ok(delta) = bias_correction_delta(&map, &w, &wq.mapv(f64::from), &means) {
                deltas.push((node.clone(), delta));
            }
        }
        let how = format!(
            "analytic, from folded BN statistics ({} of {} quantized layer(s) have BN-described inputs)",
            deltas.len(),
            quantized.len()
        );
        (deltas, how)
    };
    let mut corrected = 0;
    for (node, delta) in deltas {
        let Some((bias, _)) = plan.biases.iter().find(|(_, m)| m.node == node) else {
            continue;
        };
        let t = work
            .graph
            .constant(bias)
            .with_context(|| format!("bias '{bias}' is not a constant"))?;
        let mut b = tensor::to_f32(t)?;
        anyhow::ensure!(
            b.len() == delta.len(),
            "bias '{bias}' has {} values, correction has {}",
            b.len(),
            delta.len()
        );
        for (v, d) in b.iter_mut().zip(&delta) {
            *v += *d as f32;
        }
        work.graph.apply(crate::ir::Patch {
            initializers: vec![tensor::from_f32(bias, &b)],
            ..Default::default()
        })?;
        corrected += 1;
    }
    Ok(format!("bias correction on {corrected} layer(s), {how}"))
}

/// Per-input-channel means of a layer's input when it is (an activation of) a folded BN's
/// output whose statistics are still valid.
fn analytic_input_means(
    g: &crate::ir::Graph,
    ix: petgraph::stable_graph::NodeIndex,
    bn_stats: &BTreeMap<String, crate::passes::fuse::FoldedBn>,
) -> Option<Vec<f64>> {
    use crate::passes::equalize::relu_normal_mean as m;
    let input = g.node(ix).input.first()?;
    let (pre, act) = match g.producer_node(input) {
        Some(p) if matches!(g.node(p).op_type(), "Relu" | "Clip") => {
            let bounds = crate::passes::fuse::activation_range(g, p)?;
            (g.node(p).input.first()?.clone(), Some((bounds.1, bounds.2)))
        }
        _ => (input.clone(), None),
    };
    let stats = bn_stats.values().find(|s| s.output == pre)?;
    Some(
        stats
            .beta
            .iter()
            .zip(&stats.gamma)
            .map(|(&b, &gm)| match act {
                None => b,
                Some((lo, hi)) if lo == 0.0 && hi.is_infinite() => m(b, gm),
                Some((0.0, hi)) => m(b, gm) - m(b - hi, gm),
                Some(_) => b,
            })
            .collect(),
    )
}

/// Give every Conv/ConvTranspose/Gemm its own bias initializer. Exporters deduplicate equal
/// constants (torch turns identical biases into one initializer read through Identity nodes,
/// which cleanup folds), but an int32 bias is tied to its layer's `s_in * s_w`: one shared
/// DequantizeLinear would carry the first layer's scale, and ORT would keep the others float.
pub(crate) fn unshare_biases(g: &mut crate::ir::Graph) -> Result<usize> {
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut copies = 0;
    for ix in g.topo_order()? {
        let n = g.node(ix);
        if !matches!(n.op_type(), "Conv" | "ConvTranspose" | "Gemm") {
            continue;
        }
        let Some(b) = n.input.get(2).filter(|b| !b.is_empty()).cloned() else {
            continue;
        };
        let Some(t) = g.constant(&b) else { continue };
        if seen.insert(b.clone()) {
            continue;
        }
        let copy_name = g.fresh_name(&format!("{b}_{}", n.name()));
        let mut copy = t.clone();
        copy.name = Some(copy_name.clone());
        let mut node = n.clone();
        node.input[2] = copy_name;
        g.apply(crate::ir::Patch {
            remove: vec![ix],
            add: vec![node],
            initializers: vec![copy],
            anchor: Some(ix),
            ..Default::default()
        })
        .with_context(|| {
            format!(
                "giving node '{}' its own copy of bias '{b}'",
                g.node(ix).name()
            )
        })?;
        copies += 1;
    }
    Ok(copies)
}

/// Unmark `names` (and the int32 biases whose input scale they would give: those stay float).
fn keep_float(plan: &mut placement::Plan, names: &[String], notes: &mut Vec<String>) {
    let kept: Vec<&String> = names.iter().filter(|t| plan.is_marked(t)).collect();
    if kept.is_empty() {
        return;
    }
    plan.activations.retain(|t| !names.contains(t));
    plan.biases.retain(|_, mark| !names.contains(&mark.input));
    notes.push(format!(
        "{} tensor(s) kept float, a KV-cache decoder's logits and state ({}); --quantize-cache quantizes the state",
        kept.len(),
        kept.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
    ));
}

/// Smallest SQNR an activation's int8 grid may leave on the quiet tenth of the calibration
/// batches. Measured on silero-vad (BENCHMARKS.md): the waveform, its STFT and the magnitude
/// sit at 2-10 dB there (silence under a speech-sized step) and cost most of the speech-F1 loss;
/// every other activation of that model, and of the image models, sits above 27 dB.
pub const QUIET_MIN_SQNR_DB: f64 = 20.0;

/// An activation [`keep_quiet_float`] left float.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuietTensor {
    pub tensor: String,
    pub scale: f32,
    /// `10 log10(ms_quiet / (s^2 / 12))`: uniform rounding noise of step `s` against the mean
    /// square of the quiet tenth of the batches ([`Observed::quiet_mean_square`]).
    pub quiet_sqnr_db: f64,
}

/// Unmark the activations whose grid is too coarse for the quiet part of the data (below
/// [`QUIET_MIN_SQNR_DB`]), with the int32 biases that would take their scale. Exact zeros are
/// exact on every grid, so a tensor whose quiet batches are all zero is left quantized.
pub(crate) fn keep_quiet_float(
    plan: &mut placement::Plan,
    ranges: &materialize::ActivationRanges,
) -> Result<Vec<QuietTensor>> {
    let mut quiet = Vec::new();
    for t in &plan.activations {
        let Some(o) = ranges.observed.get(t) else {
            continue;
        };
        let scale = ranges.params_of(t)?.scale;
        let noise = (scale as f64).powi(2) / 12.0;
        if o.quiet_mean_square <= 0.0 || noise <= 0.0 {
            continue;
        }
        let db = 10.0 * (o.quiet_mean_square / noise).log10();
        if db < QUIET_MIN_SQNR_DB {
            quiet.push(QuietTensor {
                tensor: t.clone(),
                scale,
                quiet_sqnr_db: db,
            });
        }
    }
    let names: Vec<&String> = quiet.iter().map(|q| &q.tensor).collect();
    plan.activations.retain(|t| !names.contains(&t));
    plan.biases.retain(|_, mark| !names.contains(&&mark.input));
    Ok(quiet)
}

/// Quantize `model` in place (all or nothing), with the activation mode of the options.
pub fn quantize(
    model: &mut Model,
    opts: &QuantizeOptions,
    calibration: Option<&CalibrationSet>,
) -> Result<PassStats> {
    if already_quantized(model) {
        let mut stats = PassStats::default();
        stats.notes.push(
            "the model already holds QuantizeLinear/DequantizeLinear nodes; left unchanged".into(),
        );
        return Ok(stats);
    }
    // Transformers go through the chooser (smoothing strengths, and static vs dynamic under
    // auto); other graphs take the forced or static path unchanged.
    choose::quantize(model, opts, calibration)
}

/// The target's decompositions ([`crate::passes::target::Policy::decompose`]) applied to a
/// copy of `model` (opset raised first: the rules write Clip bounds as inputs), with a note
/// counting them; `None` when the target lists none or none matches.
fn decompose(model: &Model, opts: &QuantizeOptions) -> Result<Option<(Model, String)>> {
    let names = opts.policy().decompose;
    let rules = decompose::rules(names);
    let batch_shapes = names.contains(&decompose::BATCH_SHAPES);
    if rules.is_empty() && !batch_shapes {
        return Ok(None);
    }
    let mut m = model.clone();
    let mut applied: Vec<String> = Vec::new();
    if batch_shapes {
        // Best effort: each rewrite is applied atomically, so a failure leaves a valid graph
        // with the folds made so far.
        let n = batch_shapes::fold(&mut m).unwrap_or(0);
        if n > 0 {
            applied.push(format!("{} x{n}", decompose::BATCH_SHAPES));
        }
    }
    if !rules.is_empty() {
        opset::upgrade(&mut m, opset::PER_CHANNEL, &opts.input_shapes)?;
        let counts = crate::passes::rewrite::rewrite(&mut m.graph, &rules, None)
            .context("target decompositions")?;
        applied.extend(
            counts
                .iter()
                .filter(|(_, c)| *c > 0)
                .map(|(n, c)| format!("{n} x{c}")),
        );
    }
    if applied.is_empty() {
        return Ok(None);
    }
    Ok(Some((
        m,
        format!(
            "target {}: graph rewritten before placement (ops without an integer kernel into ops with one, shape arithmetic under a dynamic batch into constants: {})",
            opts.target.policy().name,
            applied.join(", ")
        ),
    )))
}

/// Whether the main graph holds an `If` (the only reason tract refuses a model it otherwise
/// runs that specializing can remove).
fn has_if(proto: &crate::onnx::proto::ModelProto) -> bool {
    proto
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type() == "If"))
}

fn already_quantized(model: &Model) -> bool {
    model.graph.node_indices().any(|ix| {
        matches!(
            model.graph.node(ix).op_type(),
            "QuantizeLinear" | "DequantizeLinear" | "DynamicQuantizeLinear" | "MatMulInteger"
        )
    })
}

/// Dynamic activations on the plan's linear layers ([`dynamic`]); no calibration.
pub fn quantize_dynamic(model: &mut Model, opts: &QuantizeOptions) -> Result<PassStats> {
    let mut stats = PassStats::default();
    let mut work = model.clone();
    stats.notes.extend(opset::upgrade(
        &mut work,
        opset::PER_CHANNEL,
        &opts.input_shapes,
    )?);
    let plan = placement::plan(&work.graph, opts, &placement::NodeSelection::All)?;
    stats.notes.extend(plan.notes.iter().cloned());
    let mut namer = insert::Namer::new(opts.naming);
    let layers = dynamic::rewrite(&mut work.graph, &plan, opts, &mut namer)?;
    if layers.is_empty() {
        stats
            .notes
            .push("no linear layer (MatMul/Gemm with a constant 2-D weight) to quantize dynamically; model unchanged".into());
        return Ok(stats);
    }
    stats.changes = layers.len();
    let worst = layers
        .iter()
        .min_by(|a, b| a.weight.sqnr_db.total_cmp(&b.weight.sqnr_db));
    stats.notes.push(format!(
        "dynamic activations on {} linear layer(s): DynamicQuantizeLinear + MatMulInteger, per-channel int8 weights{}",
        layers.len(),
        worst
            .map(|w| format!("; lowest weight SQNR {:.1} dB ('{}')", w.weight.sqnr_db, w.weight.tensor))
            .unwrap_or_default()
    ));
    stats.details = json!({
        "activations": "dynamic",
        "per_channel": opts.per_channel,
        "reduce_range": opts.reduce_range,
        "naming": opts.naming,
        "layers": layers,
    });
    *model = work;
    Ok(stats)
}

/// Conv nodes (labels) whose constant weight needs per-(channel, tap) scales.
fn tap_scaled_convs(
    g: &crate::ir::Graph,
) -> Vec<(String, crate::passes::weight_only::taps::TapGain)> {
    g.node_indices()
        .filter(|&ix| g.node(ix).op_type() == "Conv")
        .filter_map(|ix| {
            let n = g.node(ix);
            let gain = crate::passes::weight_only::taps::judge_constant(g, n.input.get(1)?)?;
            Some((crate::ir::op::node_label(n).to_string(), gain))
        })
        .collect()
}

/// Static (calibrated Q/DQ) quantization of `model` in place (all or nothing): the main graph,
/// then the `If` branches the calibration data takes ([`bodies`], only for models with a body
/// holding a Conv/Gemm/MatMul).
pub fn quantize_static(
    model: &mut Model,
    opts: &QuantizeOptions,
    calibration: Option<&CalibrationSet>,
) -> Result<PassStats> {
    // Names in every scope before, to check that no name this pass adds is defined twice.
    let names_before = bodies::has_bodies(&model.graph).then(|| bodies::model_names(&model.graph));
    let heavy_bodies = bodies::has_heavy_bodies(&model.graph) && !already_quantized(model);
    let before = if heavy_bodies && opts.body_activations {
        Some(model.to_proto()?)
    } else {
        None
    };
    let mut stats = quantize_main_graph(model, opts, calibration)?;
    if let Some(original) = before {
        bodies::quantize(model, &original, opts, calibration, &mut stats)?;
    } else if heavy_bodies {
        stats.notes.push(bodies::LEFT_FLOAT.into());
    }
    if let Some(before) = names_before {
        bodies::check_new_names(&model.graph, &before)?;
    }
    Ok(stats)
}

fn quantize_main_graph(
    model: &mut Model,
    opts: &QuantizeOptions,
    calibration: Option<&CalibrationSet>,
) -> Result<PassStats> {
    let mut stats = PassStats::default();
    if already_quantized(model) {
        stats.notes.push(
            "the model already holds QuantizeLinear/DequantizeLinear nodes; left unchanged".into(),
        );
        return Ok(stats);
    }
    // The target's decompositions (HardSwish, HardSigmoid into ops with integer kernels) come
    // first: calibration observes the decomposed graph, whose pieces the placement quantizes.
    let decomposed;
    let model_in: &Model = match decompose(model, opts)? {
        Some((m, note)) => {
            stats.notes.push(note);
            decomposed = m;
            &decomposed
        }
        None => model,
    };
    let original = model_in.to_proto()?;
    let mut work = model_in.clone();
    stats.notes.extend(opset::upgrade(
        &mut work,
        opset::PER_CHANNEL,
        &opts.input_shapes,
    )?);
    let copies = unshare_biases(&mut work.graph)?;
    if copies > 0 {
        stats.notes.push(format!(
            "{copies} bias initializer(s) shared between layers were copied so that each layer gets its own int32 bias (scale s_in * s_w differs per layer)"
        ));
    }
    // Conv weights one scale per channel serves badly (a dominant kernel tap) stay float here;
    // `weight-only` stores them with per-(channel, tap) scales (see `weight_only::taps`).
    let tap_convs = tap_scaled_convs(&work.graph);
    let with_taps_excluded;
    let opts = if tap_convs.is_empty() {
        opts
    } else {
        stats.notes.push(format!(
            "{} Conv layer(s) left float: one scale per output channel leaves their weights below {} dB SQNR (a dominant kernel tap, e.g. a reparameterized kernel); weight-only stores them int8 with one scale per (channel, tap) where the target allows: {}",
            tap_convs.len(),
            crate::passes::weight_only::taps::MAX_PER_CHANNEL_SQNR_DB,
            tap_convs
                .iter()
                .map(|(n, g)| format!("'{n}' {:.1} -> {:.1} dB", g.per_channel_db, g.per_tap_db))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut o = opts.clone();
        o.exclude_nodes
            .extend(tap_convs.iter().map(|(n, _)| regex::escape(n)));
        with_taps_excluded = o;
        &with_taps_excluded
    };
    if opts.w4a8.is_some() {
        // int4 DequantizeLinear needs opset 21 (after the bias copies, as mixed-precision).
        stats
            .notes
            .extend(opset::upgrade(&mut work, opset::INT4, &opts.input_shapes)?);
    }
    // The target's speed rule needs activation shapes (MACs per value of each heavy op).
    let policy = opts.policy();
    let shapes = match policy.boundary_cost.is_some() || policy.float_layers.is_some() {
        true => Some(crate::runtime::shapes::value_shapes(
            &work,
            &work.to_proto()?,
            &opts.input_shapes,
        )),
        false => None,
    };
    let mut plan = placement::plan_with_shapes(
        &work.graph,
        opts,
        &placement::NodeSelection::All,
        shapes.as_ref(),
    )?;
    keep_float(&mut plan, &opts.keep_float, &mut stats.notes);
    let forced: Vec<&String> = opts
        .force_activations
        .iter()
        .filter(|t| !plan.is_marked(t) && work.graph.producer_node(t).is_some())
        .collect();
    if !forced.is_empty() {
        stats.notes.push(format!(
            "{} tensor(s) quantized on request although no rule marks them ({})",
            forced.len(),
            forced
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for t in forced {
            plan.activations.insert(t.clone());
        }
    }
    stats.notes.extend(plan.notes.iter().cloned());
    // The fidelity guard compares the plan with its conservative form: both are observed.
    let guarded = match opts.policy().guard {
        Some(settings) => guard::Candidates::find(&work.graph, opts, &plan, shapes.as_ref())?
            .map(|c| (settings, c)),
        None => None,
    };
    if !plan.kept_float.is_empty() {
        let macs: u64 = plan.kept_float.iter().map(|k| k.macs).sum();
        stats.notes.push(format!(
            "target {}: {} layer(s) ({:.1} M MACs) kept float, where their integer kernels would not pay (report: quantize details.target)",
            opts.target.policy().name,
            plan.kept_float.len(),
            macs as f64 / 1e6
        ));
    }
    if plan.activations.is_empty() && plan.weights.is_empty() {
        stats
            .notes
            .push("no node matched a quantization rule; model unchanged".into());
        if !plan.kept_float.is_empty() {
            stats.details = json!({ "target": target_section(opts, &plan) });
        }
        return Ok(stats);
    }

    // Calibration.
    let calib =
        CalibrationSet::given_or_synthetic(calibration, model, opts.synthetic_samples, opts.seed)?;
    let calib = &*calib;
    stats.notes.extend(calib.notes.iter().cloned());
    let mut observed_on: Option<String> = None;
    // Observed on the model as given: the opset upgrade changes no value.
    let observe_plan = guarded.as_ref().map(|(_, c)| c.observed_tensors(&plan));
    let observe = observe_plan.as_ref().unwrap_or(&plan);
    let mut ranges = match materialize::calibrate(observe, &work, &original, calib, opts) {
        Ok(r) => r,
        // tract cannot run the model as given (its `If`s): observe on a copy specialized to
        // the calibration data instead ([`specialized`]); the output keeps every input.
        Err(e) if has_if(&original) => {
            let s = specialized::for_observation(&original, calib).with_context(|| {
                format!("observing on the model failed ({e:#}); on a copy specialized to the calibration data")
            })?;
            let present = specialized::main_graph_names(&s.proto);
            let missing: Vec<String> = plan
                .activations
                .iter()
                .filter(|t| !present.contains(*t))
                .cloned()
                .collect();
            plan.activations.retain(|t| !missing.contains(t));
            plan.biases.retain(|_, mark| !missing.contains(&mark.input));
            stats.notes.push(format!(
                "activation ranges observed on a copy specialized to the calibration data ({}; {} If(s) collapsed), one sample per run: tract cannot analyse the model's If(s) as given; the output keeps every input and branch{}",
                s.describe(),
                s.collapsed_ifs,
                if missing.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} tensor(s) that are constants there stay float",
                        missing.len()
                    )
                }
            ));
            observed_on = Some(s.describe());
            materialize::calibrate(&plan, &work, &s.proto, &s.calib, opts)
                .context("observing on the specialized copy")?
        }
        Err(e) => return Err(e),
    };
    if let Some(auto) = &ranges.auto {
        stats.notes.push(auto::summary(auto));
    }
    let mut guard_report = None;
    if let Some((settings, candidates)) = &guarded {
        let chosen = guard::choose(
            &work,
            opts,
            *settings,
            candidates,
            shapes.as_ref(),
            &ranges.observed,
            calib,
        );
        let (chosen, note) = match chosen {
            Ok((p, report)) => {
                let note = report.summary();
                guard_report = Some(report);
                (p, note)
            }
            Err(e) => (
                None,
                format!(
                    "fidelity guard could not measure ({e:#}); the conservative placement is kept"
                ),
            ),
        };
        let Some(mut chosen) = chosen else {
            // No optional layer kept: the conservative placement on the graph as given (no
            // decomposition), which is today's placement for the target.
            let mut conservative = opts.clone();
            conservative.conservative = true;
            let mut fallback = quantize_main_graph(model, &conservative, calibration)?;
            fallback.notes.insert(0, note);
            if let Some(r) = guard_report {
                fallback.details["guard"] = json!(r);
            }
            return Ok(fallback);
        };
        keep_float(&mut chosen, &opts.keep_float, &mut Vec::new());
        for t in &opts.force_activations {
            if plan.activations.contains(t) {
                chosen.activations.insert(t.clone());
            }
        }
        stats.notes.push(note);
        plan = chosen;
        ranges.params = plan.activation_params(&ranges.observed, opts.activation_scheme)?;
    }
    let quiet = keep_quiet_float(&mut plan, &ranges)?;
    plan.settle_scaled();
    let scaled = scalar::scaled_params(&plan, &ranges.params);
    ranges.params.extend(scaled);
    if !quiet.is_empty() {
        stats.notes.push(format!(
            "{} activation(s) kept float: on the quietest tenth of the calibration batches their int8 step leaves less than {QUIET_MIN_SQNR_DB} dB SQNR (a wide dynamic range, e.g. audio and its spectrum around silence): {}; the layers reading them keep int8 weights",
            quiet.len(),
            quiet
                .iter()
                .map(|q| format!("'{}' {:.1} dB", q.tensor, q.quiet_sqnr_db))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if plan.activations.is_empty() && plan.weights.is_empty() {
        stats
            .notes
            .push("no node matched a quantization rule; model unchanged".into());
        return Ok(stats);
    }

    // `Measured` is applied per layer by `equalize`'s gate before this pass.
    if matches!(
        opts.bias_correction,
        crate::passes::equalize::BiasCorrection::Empirical
            | crate::passes::equalize::BiasCorrection::Analytic
    ) {
        stats
            .notes
            .push(correct_biases(&mut work, &plan, opts, calib)?);
    }

    // int4 weights and learned rounding decide the codes before insertion (None: the default
    // per-weight rounding of `insert::weight`).
    let decided = adaround::decide(&work, &plan, &ranges, calib, opts)?;
    if let Some(d) = &decided {
        stats.notes.extend(d.notes.iter().cloned());
    }

    // Insertion: weights, then activations, then biases (which need both scales).
    let g = &mut work.graph;
    let mut namer = insert::Namer::new(opts.naming);
    let mut weight_scales: IndexMap<String, Vec<f32>> = IndexMap::new();
    let mut weight_reports = Vec::new();
    for (w, mark) in &plan.weights {
        let (scales, report) = match decided.as_ref().and_then(|d| d.codes.get(w)) {
            Some(codes) => adaround::insert_weight(g, &mut namer, w, mark, codes),
            None => insert::weight(
                g,
                &mut namer,
                w,
                mark.axis,
                mark.zero_point,
                &mark.node,
                opts.reduce_range,
                opts.rounding,
            )
            .map(|(scales, report)| (Some(scales), report)),
        }
        .with_context(|| format!("node '{}'", mark.node))?;
        if let Some(scales) = scales {
            weight_scales.insert(w.clone(), scales);
        }
        weight_reports.push(report);
        stats.changes += 1;
    }
    let bias_reports = materialize::insert(
        g,
        &mut namer,
        &plan,
        &ranges,
        &weight_scales,
        opts.activation_scheme,
    )?;
    if opts.policy().shape_reads_int8 {
        materialize::shapes_read_int8(g)?;
    }
    stats.changes += plan.activations.len() + bias_reports.len();
    g.remove_unused_initializers();
    let act_reports = plan
        .activations
        .iter()
        .map(|t| {
            let p = ranges.params_of(t)?;
            let o: &Observed = ranges
                .observed
                .get(t)
                .with_context(|| format!("no observation for '{t}'"))?;
            let group = plan.group(t);
            Ok(json!({
                "tensor": t,
                "observed_min": o.min,
                "observed_max": o.max,
                "range": [o.lo, o.hi],
                "scale": p.scale,
                "zero_point": p.zero_point,
                "shared_with": if group != *t { Some(group) } else { None },
                "method": ranges.auto.as_ref().and_then(|a| a.tensors.iter().find(|(n, _)| n == t)).map(|(_, m)| m.clone()),
            }))
        })
        .collect::<Result<Vec<_>>>()?;

    let mut per_op: BTreeMap<String, usize> = BTreeMap::new();
    for (_, op) in &plan.nodes {
        *per_op.entry(op.clone()).or_default() += 1;
    }
    stats.details = json!({
        "target": target_section(opts, &plan),
        "method": opts.method.label(),
        "auto": ranges.auto,
        "moving_average": opts.moving_average,
        "activation_scheme": opts.activation_scheme,
        "per_channel": opts.per_channel,
        "reduce_range": opts.reduce_range,
        "rounding": format!("{:?}", opts.rounding),
        "naming": opts.naming,
        "calibration": {
            "source": calib.source,
            "samples": calib.samples,
            "batches": calib.batches.len(),
            "synthetic": calib.synthetic,
        },
        "quantized_nodes": per_op,
        "kept_float_quiet": quiet,
        "activations": act_reports,
        "weights": weight_reports,
        "biases": bias_reports,
    });
    if let Some(r) = guard_report {
        stats.details["guard"] = json!(r);
    }
    if let Some(o) = observed_on {
        stats.details["calibration"]["observed_on_specialized_copy"] = json!(o);
    }
    if let Some(d) = decided {
        stats.details["weight_codes"] = d.details;
    }
    let worst = weight_reports
        .iter()
        .min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db));
    stats.notes.push(format!(
        "quantized {} node(s): {} activation Q/DQ pairs, {} weights, {} biases ({}){}",
        plan.nodes.len(),
        act_reports.len(),
        weight_reports.len(),
        bias_reports.len(),
        opts.method.label(),
        worst
            .map(|w| format!("; lowest weight SQNR {:.1} dB ('{}')", w.sqnr_db, w.tensor))
            .unwrap_or_default()
    ));
    if !opts.reduce_range && opts.activation_scheme == ActScheme::U8Asymmetric {
        stats.notes.push(
            "uint8 activations x 8-bit weights: ONNX Runtime's fused int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) add u8*s8 pairs in saturating int16 and can lose accuracy there; use reduce_range (7-bit weights) for such targets".into(),
        );
    }
    *model = work;
    Ok(stats)
}
