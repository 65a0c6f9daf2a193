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
pub mod specialize;
pub mod target;
pub mod weight_only;

use crate::ir::Model;
use anyhow::{bail, Context, Result};
use fuse::FoldedBn;
use serde::Serialize;
use std::collections::BTreeMap;
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
    /// What later passes of the same run may rely on (see [`Facts`]).
    #[serde(skip)]
    pub facts: Vec<Fact>,
}

impl PassStats {
    /// The BN statistics this pass folded (a `fuse` run), when it reports them.
    pub fn folded_bn(&self) -> Option<&BTreeMap<String, FoldedBn>> {
        folded_bn_of(&self.facts)
    }
}

fn folded_bn_of(facts: &[Fact]) -> Option<&BTreeMap<String, FoldedBn>> {
    facts.iter().find_map(|f| match f {
        Fact::FoldedBn(m) => Some(m),
        _ => None,
    })
}

/// One fact a pass establishes about the current weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// `fuse` folded these BatchNormalizations, keyed by the node each went into.
    FoldedBn(BTreeMap<String, FoldedBn>),
    /// `equalize` rescaled (and may have shifted) these nodes' outputs.
    Rescaled(Vec<String>),
    /// `prune` planned channels and precisions under one size budget (`--prune auto`): this is
    /// the budget in weight bytes of the *unpruned* layers' fraction, which `mixed-precision`
    /// then spends on the pruned model (a ratio would otherwise apply to the smaller model).
    WeightBudget(u64),
}

/// Typed facts handed from pass to pass within one run (and only that run: they describe
/// these weights).
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// BN statistics of the layers BNs were folded into; `None` until `fuse` runs. Layers that
    /// equalization rescaled are dropped: their BN statistics no longer describe them.
    pub folded_bn: Option<BTreeMap<String, FoldedBn>>,
    /// The weight-byte budget `prune`'s size plan fixed for `mixed-precision` (see
    /// [`Fact::WeightBudget`]).
    pub weight_budget_bytes: Option<u64>,
}

impl Facts {
    pub fn record(&mut self, fact: &Fact) {
        match fact {
            Fact::FoldedBn(m) => self.folded_bn = Some(m.clone()),
            Fact::Rescaled(nodes) => {
                if let Some(m) = &mut self.folded_bn {
                    m.retain(|node, _| !nodes.contains(node));
                }
            }
            Fact::WeightBudget(b) => self.weight_budget_bytes = Some(*b),
        }
    }
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
    /// `equalize` and `prune` take [`Self::calibration`] (when not synthetic) where their own
    /// options carry no calibration batches (the command line's `--calib`). Their batches are
    /// then made only when the pass runs, not held beside the set for the whole run.
    pub calibration_for_all_passes: bool,
    /// Options of `mixed-precision` (no budget: does nothing).
    pub mixed: mixed_precision::MixedPrecisionOptions,
    /// The passes selected for this run (set by [`run_passes`]).
    pub selected: Vec<&'static str>,
    /// What earlier passes of this run established (filled by [`run_passes`]).
    pub facts: Facts,
    /// Options of `weight-only` (`--weight-bits 4`: int4 linear layers).
    pub weight_only: weight_only::WeightOnlyOptions,
    /// The runtime the output is placed for: its [`target::Policy`] decides which ops get int8
    /// activations (`quantize`) and which weights go weight-only.
    pub target: target::Target,
}

impl PassContext {
    /// The run's calibration set where `equalize` and `prune` take it
    /// ([`Self::calibration_for_all_passes`], real data only).
    pub fn shared_calibration(&self) -> Option<&crate::calibrate::CalibrationSet> {
        self.calibration
            .as_deref()
            .filter(|c| self.calibration_for_all_passes && !c.synthetic)
    }
}

/// Why a selected pass does not run in this pipeline: the note and details it records.
#[derive(Debug, Clone)]
pub struct Skip {
    pub note: &'static str,
    pub details: serde_json::Value,
}

pub trait Pass {
    /// The user-facing name (`--passes`), stable across releases.
    fn name(&self) -> &'static str;
    /// One line for `--help` and listings.
    fn summary(&self) -> &'static str;
    /// Whether the pass runs in this pipeline (`ctx.selected`, options, facts); a skip is
    /// recorded with its note instead of running the pass.
    fn is_enabled(&self, _ctx: &PassContext) -> Result<(), Skip> {
        Ok(())
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
        // After quantize: stores as int8 the float weights left (LSTM/GRU/RNN, Gather tables,
        // and under `--target tract` every weight, quantize being off there); the weights
        // quantize took are DequantizeLinear outputs by then, no longer constants.
        Box::new(weight_only::WeightOnly),
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
    #[serde(skip)]
    pub facts: Vec<Fact>,
}

impl PassRecord {
    /// The BN statistics this pass folded (a `fuse` record), when it reports them.
    pub fn folded_bn(&self) -> Option<&BTreeMap<String, FoldedBn>> {
        folded_bn_of(&self.facts)
    }
}

/// Run the named passes in pipeline order, checking the graph after each; each pass sees the
/// facts the earlier ones recorded.
pub fn run_passes(model: &mut Model, names: &[&str], ctx: &PassContext) -> Result<Vec<PassRecord>> {
    let mut records = Vec::new();
    let mut ctx = ctx.clone();
    let all = pipeline();
    ctx.selected = all
        .iter()
        .map(|p| p.name())
        .filter(|n| names.contains(n))
        .collect();
    for pass in all.into_iter().filter(|p| names.contains(&p.name())) {
        let nodes_before = model.graph.node_count();
        let start = Instant::now();
        if let Err(skip) = pass.is_enabled(&ctx) {
            records.push(PassRecord {
                name: pass.name().to_string(),
                changes: 0,
                seconds: 0.0,
                nodes_before,
                nodes_after: nodes_before,
                notes: vec![skip.note.into()],
                details: skip.details,
                table: vec![],
                facts: vec![],
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
        for fact in &stats.facts {
            ctx.facts.record(fact);
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
            facts: stats.facts,
        });
    }
    Ok(records)
}
