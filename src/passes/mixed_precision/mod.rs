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
//! [`crate::hessian::sensitivity_with`]). The exact knapsack solutions on `Ω` and on the per-layer terms
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
//!
//! Files: `precision.rs` (precisions, budget, options), `weights.rs` (quantization numerics and
//! byte counts), `knapsack.rs`, [`joint`] (the joint loss and its local search), `select.rs`
//! (sensitivities, selection, report), `table.rs` (terminal table), `emit.rs` (the rewrite);
//! this file holds the pass and its flow: estimate, select, emit. Their public items are
//! re-exported here.

mod emit;
pub mod joint;
mod knapsack;
mod precision;
mod select;
mod table;
mod weights;

pub use emit::apply_assignment;
pub use knapsack::{pareto, solve, Solution};
pub use precision::{Budget, MixedPrecisionOptions, Precision, Selection};
pub use select::{
    bytes_at, layer_options, select, sensitivities, JointSummary, LayerChoice, LayerOptions,
    MixedPrecisionReport, ParetoPoint,
};
pub use table::table;
pub use weights::{
    blocked_int4_bytes, int4_block, quantize_blocked, quantize_weight, round_trip, round_trip_in,
    weight_bytes,
};

use crate::calibrate::data::CalibrationSet;
use crate::ir::Model;
use crate::passes::{Pass, PassContext, PassStats};
use anyhow::{Context, Result};
use indexmap::IndexMap;
use serde_json::json;

pub struct MixedPrecision;

impl Pass for MixedPrecision {
    fn name(&self) -> &'static str {
        "mixed-precision"
    }

    fn summary(&self) -> &'static str {
        "Hessian-guided per-layer weight precision (fp32/fp16/int8/int4) under a size budget"
    }

    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        match ctx.facts.weight_budget_bytes {
            // `prune --prune auto` planned for this budget in bytes of the unpruned model.
            Some(bytes) if ctx.mixed.budget.is_some() => {
                let opts = MixedPrecisionOptions {
                    budget: Some(Budget::Bytes(bytes)),
                    ..ctx.mixed.clone()
                };
                mixed_precision(model, &opts, ctx.calibration.as_deref())
            }
            _ => mixed_precision(model, &ctx.mixed, ctx.calibration.as_deref()),
        }
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
    let calib = CalibrationSet::given_or_synthetic(
        calibration,
        model,
        opts.synthetic_samples,
        opts.hessian.seed,
    )?;
    let calib = &*calib;
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
