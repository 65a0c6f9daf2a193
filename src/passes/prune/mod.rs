//! Pass `prune`: structured channel pruning without retraining.
//!
//! 1. **Groups** ([`groups`]): channels that must go together (a producer's filters, the BN
//!    parameters and per-channel constants on the way, depthwise filters, every consumer's
//!    input slices, residual Adds merging groups, Concat offsets, Flatten->Gemm blocks).
//!    Groups touching anything the pass cannot rewrite exactly are unprunable, with reasons.
//! 2. **Importance** ([`importance`]): normalized filter norms, BN `|gamma|`, and (with
//!    calibration data) a consumer-output score per channel. The default criterion `loss`
//!    instead gives each group a removal order and a cost per step (`obs`): the exact
//!    least-squares cost of removing the channel at its consumers with the kept inputs refit
//!    (greedy, Schur-complement updates of the inverse input Gram matrix), as relative squared
//!    consumer error times the consumer's measured output sensitivity (`sensitivity`).
//! 3. **Plan**: remove the least important (cheapest) channels until the target is met: a fraction of
//!    the channels of prunable groups (`ratio`) or of the model's MACs (`flops`; greedy by
//!    score per MAC saved). Ranking is global (scores are comparable across groups, see
//!    `importance`) or per layer (the same fraction everywhere). Every group keeps at least
//!    one channel and at least `1 - max_fraction` of them; kept counts are multiples of
//!    `round_to` when the group allows it.
//! 4. **Apply**: slice weights, biases, BN parameters and per-channel constants; consumers
//!    lose the matching input slices (at Concat offsets, `H*W` rows per channel after
//!    Flatten); depthwise `group` attributes shrink; value_info shapes are fixed.
//! 5. **Reconstruct** ([`reconstruct`]): with calibration data, each consumer that lost
//!    inputs is refit by ridge least squares so its output matches the unpruned model, with
//!    a fallback to bias compensation (removed channels replaced by their mean).
//!
//! Before / after (one Conv pair, 2 of 4 channels removed):
//! ```text
//! a = Conv (x, w1[4,3,3,3], b1[4])      a = Conv (x, w1[2,3,3,3], b1[2])
//! r = Relu (a)                      =>  r = Relu (a)
//! y = Conv (r, w2[8,4,3,3], b2[8])      y = Conv (r, w2'[8,2,3,3], b2'[8])
//! ```
//!
//! Invariants: graph inputs and outputs keep their shapes; with no target (`ratio = 0` and
//! `flops = 0`, the default) the pass changes nothing and says so; the pass is deterministic.
//! It is not idempotent (a second run prunes again from the smaller model). It runs before
//! quantization: slicing float weights is exact, slicing quantized ones is not supported.
//!
//! `changes` counts removed channels.
//!
//! # Files
//!
//! This file holds the options, the pass and its driver [`prune`]; [`groups`] step 1,
//! [`importance`] step 2 (`obs` and `sensitivity` for criterion `loss`), `planner` step 3 (the MAC model and the greedy allocation),
//! `slicer` step 4, [`reconstruct`] step 5 (`segments`: the pruned model's values, each node
//! run once). `batches` runs a model on the calibration batch in fixed chunks on every core;
//! `solve` holds the blocked dense solves.
//!
//! # Cost
//!
//! One run of the original model (consumer inputs and outputs kept), one run per consumer of
//! the part downstream of it (sensitivity, on a sample budget of 5 whole-model runs), one
//! Gram matrix per consumer (cost curves, consumers and groups in parallel), and for
//! reconstruction one run of the pruned model by parts plus one ridge fit per consumer. Gram
//! matrices are built on their lower half and the Cholesky factors, solves and inverses are
//! blocked (`solve`), so the dense algebra runs as matrix products. `details.timings` gives
//! the wall and CPU seconds of each phase.

mod batches;
pub mod groups;
pub mod importance;
mod obs;
mod planner;
pub mod reconstruct;
mod segments;
mod sensitivity;
pub mod size_plan;
mod slicer;
pub mod solve;

pub use groups::{analyze, dependency_groups, describe_groups, Group, Member, Seg, Shapes};
pub use importance::Criterion;
pub use planner::{plan, plan_curves, MacModelHandle, Plan};
pub use slicer::{apply, Applied};

use crate::ir::Model;
use crate::onnx::tensor;
use crate::passes::mixed_precision::MixedPrecisionOptions;
use crate::passes::{Pass, PassContext, PassStats};
use anyhow::{ensure, Context, Result};
use importance::AxisStats;
use petgraph::stable_graph::NodeIndex;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};

/// How channels are ranked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ranking {
    /// One ranking over all prunable groups (scores are normalized per group).
    #[default]
    Global,
    /// The same fraction in every group, least important channels first.
    PerLayer,
}

/// What is done for consumers that lose input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reconstruct {
    /// Plain removal.
    None,
    /// Fold the removed channels' mean contribution into the consumer bias.
    Bias,
    /// Ridge least squares refit of the consumer on calibration data (fallback: `Bias`).
    #[default]
    LeastSquares,
}

/// Options of the `prune` pass (no pruning by default).
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Fraction of the channels of prunable groups to remove (0 = off).
    pub ratio: f64,
    /// Fraction of the model's MACs to remove, i.e. keep at most `1 - flops` of them
    /// (0 = off; when set it wins over `ratio`).
    pub flops: f64,
    pub ranking: Ranking,
    pub criterion: Criterion,
    /// Never remove more than this fraction of a group's channels (and always keep one).
    pub max_fraction: f64,
    /// Kept channel counts are multiples of this when the group allows it.
    pub round_to: usize,
    pub reconstruct: Reconstruct,
    /// Calibration inputs by graph-input name, one batch each (data-aware scores and
    /// reconstruction need them).
    pub calibration: Option<crate::calibrate::NamedBatch>,
    /// Concrete shapes for inputs with symbolic dims (shape inference and MAC counts).
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Least-squares problems with more unknowns per output than this fall back to `Bias`.
    pub max_ls_unknowns: usize,
    /// Rows (samples x positions) used per least-squares fit (and per Gram matrix).
    pub max_ls_rows: usize,
    /// Criterion `loss`: consumers with more design columns than this use the block-diagonal
    /// part of their Gram matrix only (no cross-channel refit in the cost).
    pub max_obs_unknowns: usize,
    /// `--prune auto`: how much to prune is planned together with the layers' precisions under
    /// `mixed-precision`'s size budget ([`size_plan`]); `ratio` and `flops` are then unused.
    pub fit_size: bool,
}

impl PruneOptions {
    /// Whether anything asks for pruning: a channel ratio, a MAC fraction, or a size plan.
    pub fn has_target(&self) -> bool {
        self.fit_size || self.ratio > 0.0 || self.flops > 0.0
    }
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            ratio: 0.0,
            flops: 0.0,
            ranking: Ranking::Global,
            criterion: Criterion::Loss,
            max_fraction: 0.9,
            round_to: 1,
            reconstruct: Reconstruct::LeastSquares,
            calibration: None,
            input_shapes: Vec::new(),
            max_ls_unknowns: 2304,
            max_ls_rows: 16384,
            max_obs_unknowns: 1200,
            fit_size: false,
        }
    }
}

pub struct Prune;

impl Pass for Prune {
    fn name(&self) -> &'static str {
        "prune"
    }
    fn summary(&self) -> &'static str {
        "structured channel pruning by dependency groups, with least-squares reconstruction"
    }
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        let shared = ctx.shared_calibration();
        let with_shared;
        let opts = match (&ctx.prune.calibration, shared) {
            (None, Some(c)) if ctx.prune.has_target() => {
                with_shared = PruneOptions {
                    calibration: c.named_batch(0),
                    ..ctx.prune.clone()
                };
                &with_shared
            }
            _ => &ctx.prune,
        };
        if !opts.fit_size {
            return prune(model, opts);
        }
        ensure!(
            ctx.mixed.budget.is_some() && ctx.selected.contains(&"mixed-precision"),
            "--prune auto plans channels and precisions under one size budget: it needs --target-size and the mixed-precision pass"
        );
        let calib = ctx
            .calibration
            .as_deref()
            .filter(|c| !c.synthetic && opts.calibration.is_some())
            .context("--prune auto needs calibration data (--calib): the plan is scored on it")?;
        prune_with(
            model,
            opts,
            Some(SizeRequest {
                mixed: &ctx.mixed,
                batches: &calib.batches,
                named: calib.named_batches(),
            }),
        )
    }
}

/// What `--prune auto` plans against: the size budget and Hessian options of
/// `mixed-precision`, and the calibration batches its sensitivities are measured on.
pub struct SizeRequest<'a> {
    pub mixed: &'a MixedPrecisionOptions,
    pub batches: &'a [Vec<crate::runtime::Feed>],
    /// The same batches with their input names: the candidates are measured on them.
    pub named: Vec<crate::calibrate::NamedBatch>,
}

/// Wall and CPU seconds of the pass's phases, in order, for `details.timings` (where the time
/// goes; CPU seconds are the process's user + system time, the steadier figure on a shared
/// machine).
struct PhaseClock {
    last: std::time::Instant,
    last_cpu: f64,
    done: Vec<serde_json::Value>,
}

/// User + system CPU seconds of this process so far (0 where `getrusage` fails).
fn process_cpu_seconds() -> f64 {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

impl PhaseClock {
    fn start() -> Self {
        PhaseClock {
            last: std::time::Instant::now(),
            last_cpu: process_cpu_seconds(),
            done: Vec::new(),
        }
    }

    /// Close the phase that ran since the previous mark.
    fn mark(&mut self, name: &str) {
        let now = std::time::Instant::now();
        let cpu = process_cpu_seconds();
        self.done.push(json!({
            "phase": name,
            "seconds": (now - self.last).as_secs_f64(),
            "cpu_seconds": cpu - self.last_cpu,
        }));
        self.last = now;
        self.last_cpu = cpu;
    }
}

/// Run the `prune` pass on a model.
pub fn prune(model: &mut Model, opts: &PruneOptions) -> Result<PassStats> {
    prune_with(model, opts, None)
}

/// [`prune`], or with `size` the joint channel and precision plan of [`size_plan`].
pub fn prune_with(
    model: &mut Model,
    opts: &PruneOptions,
    size: Option<SizeRequest>,
) -> Result<PassStats> {
    let mut st = PassStats::default();
    let mut clock = PhaseClock::start();
    if size.is_none() && !opts.has_target() {
        st.notes
            .push("no pruning target (ratio 0, flops 0): nothing done".to_string());
        return Ok(st);
    }
    let shapes = crate::runtime::value_shapes(model, &model.to_proto()?, &opts.input_shapes);
    let analysis = analyze(&model.graph, &shapes)?;
    let groups = &analysis.groups;
    clock.mark("groups");
    // Calibration run on the original: consumer inputs (moments, reconstruction inputs) and
    // consumer outputs (reconstruction targets).
    let original = model.to_proto()?;
    // Criterion `loss`: the consumers' downstream parts, whose inputs the calibration run keeps.
    let downstream = match &opts.calibration {
        Some(c) if opts.criterion == Criterion::Loss => {
            let calib_shapes: Vec<(String, Vec<usize>)> = c
                .iter()
                .map(|(n, a)| (n.clone(), a.shape().to_vec()))
                .collect();
            let elem: HashMap<String, i32> =
                crate::runtime::infer_value_shapes(&original, &calib_shapes)
                    .map(|v| {
                        v.into_iter()
                            .filter_map(|v| v.elem_type.map(|t| (v.name, t as i32)))
                            .collect()
                    })
                    .unwrap_or_default();
            sensitivity::Downstream::plan(model, groups, &elem, &shapes)
        }
        _ => sensitivity::Downstream::none(),
    };
    let calib = match &opts.calibration {
        Some(c)
            if opts.criterion != Criterion::L1 && opts.criterion != Criterion::L2
                || opts.reconstruct != Reconstruct::None =>
        {
            match reconstruct::Calibration::collect(
                &original,
                &model.graph,
                groups,
                c,
                &downstream.boundaries(),
            ) {
                Ok(cal) => Some(cal),
                Err(e) => {
                    st.notes.push(format!(
                        "calibration run failed, no data-aware scores or reconstruction: {e:#}"
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    if opts.calibration.is_none() && opts.reconstruct != Reconstruct::None {
        st.notes.push(
            "no calibration data: no data-aware scores and no reconstruction (plain removal)"
                .to_string(),
        );
    }
    clock.mark("calibration run");
    let empty = HashMap::new();
    let moments: &HashMap<String, AxisStats> = calib.as_ref().map(|c| &c.stats).unwrap_or(&empty);
    let empty_e = HashMap::new();
    let energy: &HashMap<String, f64> = calib.as_ref().map(|c| &c.out_energy).unwrap_or(&empty_e);
    let compensated = opts.reconstruct != Reconstruct::None;
    let scores: Vec<Vec<f64>> = groups
        .iter()
        .map(|g| {
            if g.prunable() {
                importance::group_scores(
                    &model.graph,
                    g,
                    opts.criterion,
                    moments,
                    energy,
                    compensated,
                )
                .with_context(|| format!("importance of group {}", g.id))
            } else {
                Ok(vec![0.0; g.channels])
            }
        })
        .collect::<Result<_>>()?;
    let mm = MacModelHandle::new(model, &analysis, &shapes);
    clock.mark("importance");
    // Criterion `loss`: second-order cost curves where every consumer has a model.
    let mut sens_report: Vec<serde_json::Value> = Vec::new();
    let mut fallback_scale = 1.0;
    let curves: Vec<Option<obs::Curve>> = match (&calib, opts.criterion) {
        (Some(cal), Criterion::Loss) => {
            let sens =
                sensitivity::consumer_sensitivity(model, groups, cal, &downstream, &mut st.notes)?;
            sens_report = sens
                .iter()
                .map(|(ix, s)| json!({"node": groups::label(&model.graph, *ix), "sensitivity": s}))
                .collect();
            fallback_scale = obs::median(&sens);
            clock.mark("sensitivity");
            let steps: Vec<usize> = groups
                .iter()
                .map(|g| planner::max_removable(g, opts))
                .collect();
            obs::curves(
                &model.graph,
                groups,
                cal,
                &steps,
                opts.max_ls_rows,
                opts.max_obs_unknowns,
                &sens,
                &mut st.notes,
            )?
        }
        (None, Criterion::Loss) => {
            st.notes.push(
                "criterion loss needs calibration data: ranked by the combined criterion"
                    .to_string(),
            );
            vec![None; groups.len()]
        }
        _ => vec![None; groups.len()],
    };
    clock.mark("cost curves");
    let mut size_report = None;
    let plan = if curves.iter().any(Option::is_some) {
        let mut order = Vec::with_capacity(groups.len());
        let mut cost = Vec::with_capacity(groups.len());
        for g in groups {
            match &curves[g.id] {
                Some(c) => {
                    order.push(c.order.clone());
                    cost.push(c.step_cost.clone());
                }
                None => {
                    let mut idx: Vec<usize> = (0..g.channels).collect();
                    if g.prunable() {
                        idx.sort_by(|&a, &b| {
                            scores[g.id][a].total_cmp(&scores[g.id][b]).then(a.cmp(&b))
                        });
                    }
                    cost.push(
                        idx.iter()
                            .map(|&c| fallback_scale * scores[g.id][c])
                            .collect(),
                    );
                    order.push(idx);
                }
            }
        }
        match (&size, &calib) {
            (Some(req), Some(cal)) => {
                let (plan, budget, report) =
                    size_plan::plan_for_size(model, &analysis, &order, &cost, cal, opts, req)?;
                st.facts.push(crate::passes::Fact::WeightBudget(budget));
                size_report = Some(report);
                plan
            }
            _ => plan_curves(groups, order, cost, &mm, opts),
        }
    } else if size.is_some() {
        anyhow::bail!(
            "--prune auto needs the loss criterion's cost curves (default --prune-criterion loss, with --calib); none could be computed"
        );
    } else {
        plan(groups, &scores, &mm, opts)
    };
    let params_before: usize = model
        .graph
        .initializers
        .values()
        .map(|t| tensor::element_count(t).unwrap_or(0))
        .sum();
    let removed: usize = plan.remove.iter().map(Vec::len).sum();
    clock.mark("plan");
    let before_graph = model.graph.clone();
    let applied = apply(&mut model.graph, groups, &plan)?;
    clock.mark("slice");
    let mut recon: BTreeMap<NodeIndex, reconstruct::Outcome> = BTreeMap::new();
    if removed > 0 {
        if let Some(cal) = &calib {
            if opts.reconstruct != Reconstruct::None {
                recon = reconstruct::reconstruct(
                    &before_graph,
                    model,
                    &applied,
                    cal,
                    opts,
                    &mut st.notes,
                )?;
            }
        }
    }
    clock.mark("reconstruction");
    let params_after: usize = model
        .graph
        .initializers
        .values()
        .map(|t| tensor::element_count(t).unwrap_or(0))
        .sum();
    // Report.
    let mut rows = Vec::new();
    for g in groups {
        let r = &plan.remove[g.id];
        let members: Vec<String> = g
            .members
            .iter()
            .filter_map(|m| match m {
                Member::Producer { node, .. } | Member::Depthwise { node, .. } => {
                    Some(groups::label(&before_graph, *node))
                }
                Member::Consumer { node, .. } => {
                    Some(format!("-> {}", groups::label(&before_graph, *node)))
                }
                _ => None,
            })
            .collect();
        let total: f64 = scores[g.id].iter().sum();
        let lost: f64 = r.iter().map(|&c| scores[g.id][c]).sum();
        // Predicted output loss (criterion loss): the removed steps' costs, i.e. each
        // consumer's relative squared error times its measured sensitivity, summed.
        let predicted: Option<f64> = curves[g.id]
            .as_ref()
            .map(|c| c.step_cost.iter().take(r.len()).sum());
        let err: Option<f64> = g
            .members
            .iter()
            .filter_map(|m| match m {
                Member::Consumer { node, .. } => recon.get(node).map(|o| o.rel_error),
                _ => None,
            })
            .reduce(f64::max);
        rows.push(json!({
            "group": g.id,
            "members": members,
            "channels_before": g.channels,
            "channels_after": g.channels - r.len(),
            "prunable": g.prunable(),
            "unprunable_reasons": g.unprunable,
            "importance_total": total,
            "importance_removed": lost,
            "predicted_output_loss": predicted,
            "consumer_rel_error": err,
        }));
    }
    let recon_rows: Vec<_> = recon
        .iter()
        .map(|(ix, o)| {
            json!({
                "node": groups::label(&before_graph, *ix),
                "method": o.method,
                "rel_error": o.rel_error,
                "rel_error_plain": o.rel_error_plain,
            })
        })
        .collect();
    let prunable = groups.iter().filter(|g| g.prunable()).count();
    st.notes.push(format!(
        "{} groups ({prunable} prunable); removed {removed} channels; MACs {} -> {} (modeled); parameters {params_before} -> {params_after}",
        groups.len(),
        plan.macs_before,
        plan.macs_after
    ));
    st.changes = removed;
    st.details = json!({
        "groups": rows,
        "reconstruction": recon_rows,
        "consumer_sensitivity": sens_report,
        "macs_before": plan.macs_before,
        "macs_after": plan.macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "channels_removed": removed,
        "timings": clock.done,
    });
    if let Some(r) = size_report {
        st.notes.push(size_plan::size_note(&r));
        st.table = size_plan::size_table(&r);
        st.details["size_plan"] = serde_json::to_value(&r)?;
    }
    Ok(st)
}
