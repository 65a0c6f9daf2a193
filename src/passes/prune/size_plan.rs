//! `--prune auto`: channels and bits under one size budget (`--target-size`).
//!
//! A plan is a pruning level (a fraction `p` of the heavy layers' weights removed, allocated
//! over groups by the criterion-`loss` cost curves, cheapest predicted loss per weight removed)
//! together with one precision per layer. Both halves are scored in the same units, the
//! label-free output loss of the Hessian machinery (mean per output row):
//!
//! ```text
//! predicted(p, a) = Σ_g Σ_{i < removed_g(p)} step_cost[g][i]          pruning (obs curves)
//!                 + Σ_l (n_l(p) / n_l) · ΔL_l(a_l)                     quantization
//! bytes(p, a)     = Σ_l bytes(shape_l(p), a_l)                         scales included
//! ```
//!
//! `ΔL_l(b)` is layer `l`'s second-order loss alone at precision `b` (`½‖ũ_{l,b}‖²`, or
//! `½ Ω_b` with `--selection trace`), measured once on the unpruned model; a pruned layer keeps
//! `n_l(p)` of its `n_l` weights, and its quantization error energy shrinks with them (same
//! error per weight, same curvature per weight). For each level the precisions are the exact
//! multiple-choice knapsack on `ΔL` under the byte budget ([`crate::passes::mixed_precision::solve`]).
//! Levels at which no precision assignment fits are infeasible.
//!
//! Each candidate is then *measured*: the level's pruned model (sliced and reconstructed as the
//! pass emits it) with its weights rounded to the planned precisions (activations float) is run
//! on all calibration batches and compared with the original by the same loss. The least
//! measured loss is emitted ([`choose`]; the predicted loss when nothing could be measured).
//! Why measured: on the digits models the pruning half of the prediction (greedy per-group
//! curves, summed) underestimates the loss of the reconstructed model by 10-100x beyond a few
//! percent of the weights, while the precision half is within 2x; the level 0 candidate is
//! precision alone, so the choice is never worse than it on the calibration data. The report
//! holds every candidate at the budget and the frontier over sizes (with pruning vs precision
//! only), both predicted and measured. Cost: one model build per level and one run of the
//! calibration batches per distinct (level, precisions) pair.
//!
//! The `mixed-precision` pass then re-selects precisions on the pruned model under the same
//! budget in bytes (it sees the pruned weights' own responses and cross-layer terms).

use super::groups::Analysis;
use super::planner::{plan_curves, MacModelHandle, Plan};
use super::reconstruct::{self, run_batched, Calibration};
use super::{slicer, Group, PruneOptions, Reconstruct, SizeRequest};
use crate::hessian::loss_sum;
use crate::ir::{Model, Patch};
use crate::onnx::tensor;
use crate::passes::mixed_precision::{
    bytes_at, layer_options, round_trip_in, sensitivities, solve, Budget, LayerOptions, Precision,
};
use anyhow::{bail, Context, Result};
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;
use std::collections::HashMap;

/// Pruning levels tried: fractions of the heavy layers' weights removed.
pub const LEVELS: [f64; 13] = [
    0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
];

/// Sizes of the reported frontier, as fractions of the fp32 weight bytes (the budget is added).
pub const FRONTIER: [f64; 8] = [0.08, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3];

/// Planned precision per weight name.
pub type Precisions = Vec<(String, Precision)>;

/// Measures plan `level index` with the given precisions: the loss, `None` when it cannot run.
pub type Measure<'a> = dyn FnMut(usize, &[(String, Precision)]) -> Result<Option<f64>> + 'a;

/// One pruning level's plan under one byte budget.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Fraction of the heavy layers' weights the allocation was asked to remove.
    pub level: f64,
    pub channels_removed: usize,
    pub macs_after: u64,
    /// Predicted output loss of the pruning alone (the removed steps' costs).
    pub predicted_prune: f64,
    /// Predicted output loss of the precisions (`None`: nothing fits the budget).
    pub predicted_quant: Option<f64>,
    pub predicted: Option<f64>,
    /// Weight bytes of the planned precisions on the pruned layers.
    pub bytes: Option<u64>,
    /// Measured loss of the pruned, weight-rounded model on the calibration samples.
    pub measured: Option<f64>,
    /// Planned precision per weight (layers in graph order).
    #[serde(skip)]
    pub precisions: Vec<(String, Precision)>,
}

/// One point of the size frontier: the best plan at `bytes` with and without pruning.
#[derive(Debug, Clone, Serialize)]
pub struct FrontierPoint {
    pub bytes: u64,
    pub fraction: f64,
    /// Level of the best joint plan (`None`: nothing fits).
    pub level: Option<f64>,
    pub predicted: Option<f64>,
    pub measured: Option<f64>,
    /// Precision only (no pruning).
    pub predicted_precision_only: Option<f64>,
    pub measured_precision_only: Option<f64>,
}

/// What the size plan decided, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct SizePlanReport {
    pub budget_bytes: u64,
    pub fp32_bytes: u64,
    /// Level of the emitted plan.
    pub chosen_level: f64,
    pub candidates: Vec<Candidate>,
    pub frontier: Vec<FrontierPoint>,
}

/// The pruning plans of every level (one allocation each, independent of the budget).
pub struct Levels {
    pub plans: Vec<(f64, Plan, f64)>,
    /// Per plan: the kept fractions of each layer's weight shape, by weight name.
    shapes: Vec<HashMap<String, Vec<usize>>>,
}

/// Plan every level of [`LEVELS`] along the cost curves, by cost per weight removed.
pub fn levels(
    groups: &[Group],
    order: &[Vec<usize>],
    cost: &[Vec<f64>],
    params: &MacModelHandle,
    weights: &HashMap<NodeIndex, String>,
    layers: &[LayerOptions],
    opts: &PruneOptions,
) -> Levels {
    let mut plans = Vec::new();
    let mut shapes = Vec::new();
    for &level in &LEVELS {
        let o = PruneOptions {
            flops: level,
            ratio: 0.0,
            ..opts.clone()
        };
        let plan = if level > 0.0 {
            plan_curves(groups, order.to_vec(), cost.to_vec(), params, &o)
        } else {
            Plan {
                remove: vec![Vec::new(); groups.len()],
                ..Default::default()
            }
        };
        let predicted: f64 = groups
            .iter()
            .map(|g| cost[g.id].iter().take(plan.remove[g.id].len()).sum::<f64>())
            .sum();
        let fractions: HashMap<&str, (f64, f64, bool)> = params
            .kept_fractions(groups, &plan)
            .into_iter()
            .filter_map(|(ix, fi, fo, dw)| Some((weights.get(&ix)?.as_str(), (fi, fo, dw))))
            .collect();
        let by_weight = layers
            .iter()
            .map(|l| {
                let mut s = l.weight_shape.clone();
                if let Some(&(fi, fo, dw)) = fractions.get(l.weight.as_str()) {
                    let scale = |d: usize, f: f64| ((d as f64 * f).round() as usize).clamp(1, d);
                    if let Some(d) = s.get_mut(l.out_axis) {
                        *d = scale(*d, fo);
                    }
                    if !dw {
                        if let Some(d) = s.get_mut(l.in_axis) {
                            *d = scale(*d, fi);
                        }
                    }
                }
                (l.weight.clone(), s)
            })
            .collect();
        plans.push((level, plan, predicted));
        shapes.push(by_weight);
    }
    Levels { plans, shapes }
}

impl Levels {
    /// The best precisions for plan `i` under `budget` bytes: (bytes, predicted loss, choice).
    fn precisions(
        &self,
        i: usize,
        layers: &[LayerOptions],
        budget: u64,
        block: Option<usize>,
    ) -> Option<(u64, f64, Precisions)> {
        let classes: Vec<Vec<(u64, f64)>> = layers
            .iter()
            .map(|l| {
                let shape = &self.shapes[i][&l.weight];
                let n0: usize = l.weight_shape.iter().product();
                let n: usize = shape.iter().product();
                let frac = n as f64 / n0.max(1) as f64;
                l.options
                    .iter()
                    .map(|&(p, loss)| {
                        (
                            bytes_at(shape, l.out_axis, l.in_axis, p, block),
                            frac * loss,
                        )
                    })
                    .collect()
            })
            .collect();
        let sol = solve(&classes, budget, 1 << 20)?;
        let choice = layers
            .iter()
            .zip(&sol.choice)
            .map(|(l, &k)| (l.weight.clone(), l.options[k].0))
            .collect();
        Some((sol.cost, sol.value, choice))
    }

    /// Every level's candidate at `budget`, measured where `measure` is given.
    pub fn candidates(
        &self,
        layers: &[LayerOptions],
        budget: u64,
        block: Option<usize>,
        measure: &mut Measure,
    ) -> Result<Vec<Candidate>> {
        let mut out = Vec::new();
        for (i, (level, plan, prune_loss)) in self.plans.iter().enumerate() {
            let q = self.precisions(i, layers, budget, block);
            let measured = match &q {
                Some((_, _, choice)) => measure(i, choice)?,
                None => None,
            };
            out.push(Candidate {
                level: *level,
                channels_removed: plan.remove.iter().map(Vec::len).sum(),
                macs_after: plan.macs_after,
                predicted_prune: *prune_loss,
                predicted_quant: q.as_ref().map(|x| x.1),
                predicted: q.as_ref().map(|x| x.1 + prune_loss),
                bytes: q.as_ref().map(|x| x.0),
                measured,
                precisions: q.map(|x| x.2).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// The size frontier over [`FRONTIER`] (and `budget`): the plan [`choose`] takes at each
    /// size, and precision only (level 0).
    pub fn frontier(
        &self,
        layers: &[LayerOptions],
        fp32_bytes: u64,
        budget: u64,
        block: Option<usize>,
        measure: &mut Measure,
    ) -> Result<Vec<FrontierPoint>> {
        let mut sizes: Vec<u64> = FRONTIER
            .iter()
            .map(|f| (f * fp32_bytes as f64).floor() as u64)
            .chain(std::iter::once(budget))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut out = Vec::new();
        for bytes in sizes {
            let cands = self.candidates(layers, bytes, block, measure)?;
            let best = choose(&cands).map(|i| &cands[i]);
            let only = &cands[0];
            out.push(FrontierPoint {
                bytes,
                fraction: bytes as f64 / fp32_bytes.max(1) as f64,
                level: best.map(|c| c.level),
                predicted: best.and_then(|c| c.predicted),
                measured: best.and_then(|c| c.measured),
                predicted_precision_only: only.predicted,
                measured_precision_only: only.measured,
            });
        }
        Ok(out)
    }
}

/// The candidate to emit: the least measured loss among those that fit, else (nothing could
/// be measured) the least predicted loss; ties go to less pruning.
pub fn choose(candidates: &[Candidate]) -> Option<usize> {
    let by = |f: &dyn Fn(&Candidate) -> Option<f64>| {
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in candidates.iter().enumerate() {
            if let Some(p) = f(c).filter(|_| c.predicted.is_some()) {
                if best.is_none_or(|b| p < b.1) {
                    best = Some((i, p));
                }
            }
        }
        best.map(|b| b.0)
    };
    by(&|c| c.measured).or_else(|| by(&|c| c.predicted))
}

/// Plan channels and precisions together (see the module docs): the chosen level's pruning
/// plan, the budget in weight bytes, and the report.
pub fn plan_for_size(
    model: &Model,
    analysis: &Analysis,
    order: &[Vec<usize>],
    cost: &[Vec<f64>],
    cal: &Calibration,
    opts: &PruneOptions,
    req: &SizeRequest,
) -> Result<(Plan, u64, SizePlanReport)> {
    let groups = &analysis.groups;
    let sens = sensitivities(model, req.batches, req.mixed).context("size plan: Hessian")?;
    let layers = layer_options(model, &sens, req.mixed)?;
    let fp32_bytes: u64 = layers
        .iter()
        .map(|l| 4 * l.weight_shape.iter().product::<usize>() as u64)
        .sum();
    let budget = match req.mixed.budget {
        Some(Budget::Bytes(b)) => b,
        Some(Budget::Ratio(r)) => (r * fp32_bytes as f64).floor() as u64,
        _ => {
            bail!("--prune auto needs a --target-size budget (bytes or a fraction), not --avg-bits")
        }
    };
    let block = req.mixed.block_size;
    let params = MacModelHandle::params(model, analysis);
    let weights: HashMap<NodeIndex, String> = analysis
        .heavy
        .iter()
        .filter_map(|h| Some((h.node, model.graph.node(h.node).input.get(1)?.clone())))
        .collect();
    let lv = levels(groups, order, cost, &params, &weights, &layers, opts);

    // Measurement on the batches the precisions' losses were measured on: each level's model
    // built once (sliced, reconstructed), then rounded per candidate.
    let original = model.to_proto()?;
    // One batch when the batches join along axis 0 (one tract plan per measurement).
    let joined: Option<Vec<crate::calibrate::NamedBatch>> = req.named.first().and_then(|first| {
        first
            .iter()
            .enumerate()
            .map(|(k, (name, _))| {
                let parts: Vec<&crate::runtime::Feed> = req
                    .named
                    .iter()
                    .filter_map(|b| b.get(k).map(|x| &x.1))
                    .collect();
                crate::runtime::Feed::concatenate(0, &parts)
                    .ok()
                    .map(|f| (name.clone(), f))
            })
            .collect::<Option<Vec<_>>>()
            .map(|b| vec![b])
    });
    let named = joined.as_ref().unwrap_or(&req.named);
    let reference: Vec<Vec<(String, ArrayD<f32>)>> = named
        .iter()
        .map(|b| run_batched(&original, b, &[]))
        .collect::<Result<_>>()
        .context("size plan: reference run")?;
    let rows: usize = reference
        .iter()
        .filter_map(|r| r.first())
        .map(|(_, a)| a.shape().first().copied().unwrap_or(1))
        .sum();
    let mut built: HashMap<usize, Option<Model>> = HashMap::new();
    // The same level and precisions recur across the frontier's sizes: measured once.
    let mut seen: HashMap<(usize, Vec<Precision>), Option<f64>> = HashMap::new();
    let mut measure = |i: usize, choice: &[(String, Precision)]| -> Result<Option<f64>> {
        let key = (i, choice.iter().map(|c| c.1).collect::<Vec<_>>());
        if let Some(v) = seen.get(&key) {
            return Ok(*v);
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = built.entry(i) {
            let plan = &lv.plans[i].1;
            let mut m = model.clone();
            let ok = if plan.remove.iter().any(|r| !r.is_empty()) {
                slicer::apply(&mut m.graph, groups, plan).and_then(|applied| {
                    if opts.reconstruct == Reconstruct::None {
                        return Ok(());
                    }
                    reconstruct::reconstruct(
                        &model.graph,
                        &mut m,
                        &applied,
                        cal,
                        opts,
                        &mut Vec::new(),
                    )
                    .map(|_| ())
                })
            } else {
                Ok(())
            };
            slot.insert(ok.ok().map(|_| m));
        }
        let Some(base) = &built[&i] else {
            return Ok(None);
        };
        let mut m = base.clone();
        let mut inits = Vec::new();
        for (w, p) in choice {
            let Some(l) = layers.iter().find(|l| &l.weight == w) else {
                continue;
            };
            if *p == Precision::Fp32 {
                continue;
            }
            let Some(t) = m.graph.constant(w) else {
                continue;
            };
            let d = round_trip_in(&tensor::to_f32(t)?, l.out_axis, l.in_axis, *p, block);
            inits.push(tensor::from_f32(w, &d));
        }
        m.graph.apply(Patch {
            initializers: inits,
            ..Default::default()
        })?;
        let proto = m.to_proto()?;
        let mut loss = 0.0;
        for (batch, refs) in named.iter().zip(&reference) {
            let Ok(run) = run_batched(&proto, batch, &[]) else {
                return Ok(None);
            };
            for (name, a0) in refs {
                let Some((_, a1)) = run.iter().find(|(k, _)| k == name) else {
                    continue;
                };
                loss += loss_sum(a0, a1, a0.ndim() == 2 && a0.shape()[1] > 1);
            }
        }
        let loss = (loss / rows.max(1) as f64)
            .is_finite()
            .then_some(loss / rows.max(1) as f64);
        seen.insert(key, loss);
        Ok(loss)
    };
    let candidates = lv.candidates(&layers, budget, block, &mut measure)?;
    let Some(chosen) = choose(&candidates) else {
        bail!(
            "--target-size: {budget} bytes is below the smallest possible weight size at every pruning level tried (up to {:.0}% of the weights removed)",
            100.0 * LEVELS[LEVELS.len() - 1]
        );
    };
    let frontier = lv.frontier(&layers, fp32_bytes, budget, block, &mut measure)?;
    let report = SizePlanReport {
        budget_bytes: budget,
        fp32_bytes,
        chosen_level: candidates[chosen].level,
        candidates,
        frontier,
    };
    Ok((lv.plans[chosen].1.clone(), budget, report))
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.3e}"))
}

/// One line: what the size plan chose and what it was weighed against.
pub fn size_note(r: &SizePlanReport) -> String {
    let chosen = r.candidates.iter().find(|c| c.level == r.chosen_level);
    let only = r.candidates.first();
    format!(
        "size plan (--prune auto): budget {} weight bytes ({:.1}% of fp32 {}); chose {:.0}% of the weights pruned ({} channels), predicted loss {} (pruning {} + precisions {}), measured {}; precision only: predicted {}, measured {}",
        r.budget_bytes,
        100.0 * r.budget_bytes as f64 / r.fp32_bytes.max(1) as f64,
        r.fp32_bytes,
        100.0 * r.chosen_level,
        chosen.map_or(0, |c| c.channels_removed),
        opt(chosen.and_then(|c| c.predicted)),
        opt(chosen.map(|c| c.predicted_prune)),
        opt(chosen.and_then(|c| c.predicted_quant)),
        opt(chosen.and_then(|c| c.measured)),
        opt(only.and_then(|c| c.predicted)),
        opt(only.and_then(|c| c.measured)),
    )
}

/// The terminal table: the candidates at the budget, then the size frontier.
pub fn size_table(r: &SizePlanReport) -> Vec<String> {
    let mut lines = vec![format!(
        "{:>7} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6}",
        "pruned", "channels", "bytes", "pred.prune", "pred.quant", "predicted", "measured", ""
    )];
    for c in &r.candidates {
        lines.push(format!(
            "{:>6.0}% {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6}",
            100.0 * c.level,
            c.channels_removed,
            c.bytes.map_or("-".into(), |b| b.to_string()),
            opt(Some(c.predicted_prune)),
            opt(c.predicted_quant),
            opt(c.predicted),
            opt(c.measured),
            if c.level == r.chosen_level {
                "chosen"
            } else {
                ""
            }
        ));
    }
    lines.push(
        "size frontier (weight bytes; best plan per size with pruning, and precision only):"
            .to_string(),
    );
    lines.push(format!(
        "{:>10} {:>7} {:>7} {:>10} {:>10} {:>12} {:>12}",
        "bytes", "% fp32", "pruned", "predicted", "measured", "pred. prec.", "meas. prec."
    ));
    for p in &r.frontier {
        lines.push(format!(
            "{:>10} {:>6.1}% {:>7} {:>10} {:>10} {:>12} {:>12}",
            p.bytes,
            100.0 * p.fraction,
            p.level.map_or("-".into(), |l| format!("{:.0}%", 100.0 * l)),
            opt(p.predicted),
            opt(p.measured),
            opt(p.predicted_precision_only),
            opt(p.measured_precision_only),
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(level: f64, predicted: Option<f64>, measured: Option<f64>) -> Candidate {
        Candidate {
            level,
            channels_removed: 0,
            macs_after: 0,
            predicted_prune: 0.0,
            predicted_quant: predicted,
            predicted,
            bytes: predicted.map(|_| 1),
            measured,
            precisions: vec![],
        }
    }

    #[test]
    fn choice_is_the_least_measured_loss_among_plans_that_fit() {
        // Level 0.2 predicts best, but measures worse than level 0.1.
        let c = [
            cand(0.0, Some(5e-4), Some(7e-4)),
            cand(0.1, Some(2e-4), Some(1e-4)),
            cand(0.2, Some(1e-6), Some(4e-4)),
            // Does not fit: never chosen, whatever it measured.
            cand(0.3, None, Some(1e-9)),
        ];
        assert_eq!(choose(&c), Some(1));
        // Nothing measured: the least predicted loss.
        let c: Vec<Candidate> = c.iter().map(|x| cand(x.level, x.predicted, None)).collect();
        assert_eq!(choose(&c), Some(2));
        // Ties go to less pruning; nothing fits: none.
        assert_eq!(
            choose(&[
                cand(0.0, Some(1.0), Some(1.0)),
                cand(0.1, Some(1.0), Some(1.0))
            ]),
            Some(0)
        );
        assert_eq!(choose(&[cand(0.0, None, None)]), None);
    }
}
