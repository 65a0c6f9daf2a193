//! The pass framework: a small [`Pass`] trait, the one [`pipeline`] list, and a runner that
//! checks the graph after every pass and names the pass in every error.
//!
//! Passes that rewrite locally are written as rules, `fn(&Graph, NodeIndex) ->
//! Result<Option<Patch>>` (`Ok(None)` = no match), driven to a fixpoint by [`rewrite`].

pub mod cleanup;
pub mod constant_fold;
pub mod equalize;
pub mod fuse;
pub mod mixed_precision;
pub mod prune;
pub mod quantize;
pub mod rewrite;

use crate::ir::Model;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// What one pass did, for the run summary and the JSON report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassStats {
    /// Rewrites applied (patches, folded nodes, inserted pairs...: each pass says in its doc).
    pub changes: usize,
    /// Human-readable remarks: what was skipped and why, what was assumed.
    pub notes: Vec<String>,
    /// Pass-specific details for the report (tables, per-layer figures).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// Lines of a table for the terminal summary (the same figures are in `details`).
    #[serde(skip)]
    pub table: Vec<String>,
}

/// Options and data shared by the passes of one run.
#[derive(Debug, Clone, Default)]
pub struct PassContext {
    /// Stop each rule-driven pass after this many patches (bisection aid).
    pub max_patches: Option<usize>,
    /// `equalize` options (and `quantize`'s bias correction).
    pub equalize: equalize::EqualizeOptions,
    /// Options of the `prune` pass (default: no pruning).
    pub prune: prune::PruneOptions,
    /// Options of the `quantize` pass.
    pub quantize: quantize::QuantizeOptions,
    /// Calibration inputs for `quantize` (None = synthetic data with a warning).
    pub calibration: Option<Arc<crate::calibrate::CalibrationSet>>,
    pub mixed: mixed_precision::MixedPrecisionOptions, // options of `mixed-precision` (no budget: does nothing)
}

pub trait Pass {
    /// The user-facing name (`--passes`), stable across releases.
    fn name(&self) -> &'static str;
    /// One line for `--help` and listings.
    fn summary(&self) -> &'static str;
    /// True when later passes rely on this one for correctness, not just quality.
    fn required_by_later_passes(&self) -> bool {
        false
    }
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats>;
}

/// Every pass in pipeline order. A run executes the selected ones in this order.
pub fn pipeline() -> Vec<Box<dyn Pass>> {
    vec![
        // First: folding BN into its producer gives later passes plain Conv/Gemm weights.
        Box::new(fuse::Fuse),
        // After fuse: drops what fuse left unused and simplifies shape chains.
        Box::new(cleanup::Cleanup),
        // After fuse/cleanup, before equalize/quantize: pruning slices float weights and must
        // compose with the scales and quantization parameters computed later, not invalidate them.
        Box::new(prune::Prune),
        // After fuse/cleanup (needs BN-folded weights), before quantize (it shapes weight ranges).
        Box::new(equalize::Equalize),
        // With a size budget, Hessian-guided per-layer precision quantizes the model itself
        // (fp32/fp16/int8/int4 weights, int8 activations around quantized layers); before
        // quantize, which then leaves the already-quantized model alone.
        Box::new(mixed_precision::MixedPrecision),
        // Last: uniform int8 observes the final float graph (after fusion/equalization).
        Box::new(quantize::Quantize),
    ]
}

/// The passes a run gets when `--passes` is not given.
pub fn default_pass_names() -> Vec<&'static str> {
    pipeline().iter().map(|p| p.name()).collect()
}

/// Resolve `--passes a,b,c` (or `none`) to pass names in pipeline order.
pub fn select(spec: &str) -> Result<Vec<&'static str>> {
    let all = pipeline();
    let valid: Vec<&'static str> = all.iter().map(|p| p.name()).collect();
    let spec = spec.trim();
    if spec == "none" || spec.is_empty() {
        return Ok(vec![]);
    }
    let mut wanted = Vec::new();
    for name in spec.split(',').map(str::trim) {
        if !valid.contains(&name) {
            bail!(
                "unknown pass '{name}'; valid passes: {} (or 'none' for a plain round trip)",
                if valid.is_empty() {
                    "none yet".to_string()
                } else {
                    valid.join(", ")
                }
            );
        }
        wanted.push(name);
    }
    Ok(valid.into_iter().filter(|v| wanted.contains(v)).collect())
}

/// One executed pass, for the run summary.
#[derive(Debug, Clone, Serialize)]
pub struct PassRecord {
    pub name: String,
    pub changes: usize,
    pub seconds: f64,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    #[serde(skip)]
    pub table: Vec<String>,
}

/// Why the default pipeline leaves equalization out before per-channel quantization.
pub const EQUALIZE_SKIPPED: &str = "skipped: per-channel int8 weights follow, which already give every output channel its own scale; rescaling channels then mostly moves range between activations, and measured against no equalization it cost 0.4 dB output SQNR on ResNet-18 and EfficientNet-B0 while gaining 0.6 dB on MobileNetV2 (BENCHMARKS.md). Run it anyway with --equalize always (or name it in --passes)";

/// Run the named passes in pipeline order, checking the graph after each.
pub fn run_passes(model: &mut Model, names: &[&str], ctx: &PassContext) -> Result<Vec<PassRecord>> {
    let mut records = Vec::new();
    // Passes can hand facts to later ones: fuse's folded BN statistics feed equalize's
    // high-bias absorption in the same run (and only that run: they describe these weights).
    let mut ctx = ctx.clone();
    for pass in pipeline().into_iter().filter(|p| names.contains(&p.name())) {
        let nodes_before = model.graph.node_count();
        let start = Instant::now();
        if pass.name() == "equalize"
            && names.contains(&"quantize")
            && ctx.quantize.per_channel
            && !ctx.equalize.with_per_channel
        {
            records.push(PassRecord {
                name: pass.name().to_string(),
                changes: 0,
                seconds: 0.0,
                nodes_before,
                nodes_after: nodes_before,
                notes: vec![EQUALIZE_SKIPPED.into()],
                details: serde_json::json!({ "skipped": "per-channel weights" }),
                table: vec![],
            });
            continue;
        }
        let stats = pass
            .run(model, &ctx)
            .with_context(|| format!("pass {}", pass.name()))?;
        model
            .graph
            .check()
            .with_context(|| format!("pass {} left an inconsistent graph", pass.name()))?;
        if pass.name() == "fuse" {
            ctx.equalize.bn_stats = fuse::folded_bn_stats(&stats.details)
                .context("reading the BN statistics folded by fuse")?;
        }
        if pass.name() == "equalize" {
            // Equalization rescaled (and may have shifted) its first layers' outputs: their BN
            // statistics no longer describe them.
            let rescaled: Vec<&str> = stats.details["pairs"]
                .as_array()
                .map(|pairs| pairs.iter().filter_map(|p| p["l1"].as_str()).collect())
                .unwrap_or_default();
            ctx.equalize
                .bn_stats
                .retain(|node, _| !rescaled.contains(&node.as_str()));
        }
        records.push(PassRecord {
            name: pass.name().to_string(),
            changes: stats.changes,
            seconds: start.elapsed().as_secs_f64(),
            nodes_before,
            nodes_after: model.graph.node_count(),
            notes: stats.notes,
            details: stats.details,
            table: stats.table,
        });
    }
    Ok(records)
}
