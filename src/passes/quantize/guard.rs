//! The fidelity guard: which of the layers a target's optional rules add to the int8 region are
//! worth their output error, measured in tract on calibration samples
//! ([`crate::passes::target::Policy::guard`]).
//!
//! A target's optional rules (today `scalar_operands`, with the `decompose` rewrites before
//! them: HardSwish and HardSigmoid pieces, learnable scalar gains and shifts) join int8
//! regions across ops that otherwise end them, so more Conv/Gemm/MatMul layers pay for their
//! Q/DQ and go int8. On some models that costs little (MobileNet-style blocks); on PP-OCRv4's
//! recognizer it costs 10 dB of output SQNR, concentrated in a few early blocks (BENCHMARKS.md
//! "Fidelity guard"). The guard keeps, per model, the layers whose int8 placement costs least
//! per MAC moved to an integer kernel:
//! ```text
//! before (all optional layers int8):  x -> Q/DQ -> Conv_a -> Q/DQ -> [HardSwish pieces int8] -> Conv_b -> ...
//! after (Conv_a measured harmful):    x -> Conv_a -> HardSwish pieces (float) -> Q/DQ -> Conv_b -> ...
//! ```
//!
//! Groups: each heavy op (Conv/ConvTranspose/Gemm/MatMul) int8 under the target's policy but
//! float under its conservative form (`scalar_operands` off), with the optional elementwise
//! nodes that follow it in graph order (its HardSwish pieces, scalar gains and shifts);
//! optional elementwise nodes after a conservative heavy op form a group of their own (no
//! MACs). With more than [`MAX_GROUPS`], consecutive ones form one group. Every measurement is the placement with a
//! set of groups allowed int8 (the others float, no boundary rule), its Q/DQ inserted exactly
//! as the pass does, run in tract on the first `samples` calibration samples; its error is
//! `e = Σ (y - ŷ)² / Σ y²` over all outputs and samples against the float model (SQNR =
//! -10 log10 e).
//!
//! Selection: `e_c` = the conservative placement (the pass's plan under the conservative
//! policy), `e_0` = the target's rules with no group allowed (on the decomposed graph; the
//! conservative placement up to the decompositions' float rewrites), `e_g` = only group `g` allowed; its
//! cost is `c_g = max(0, e_g - e_0)` and its saving `m_g` = its MACs. Groups are taken in
//! increasing `c_g / m_g` (ties: graph order) while `e_0 + Σ c_g <= e_c 10^(margin/10)` (a
//! group that does not fit is skipped, later cheaper ones still tried). When none is kept the
//! pass places by the conservative policy on the graph as given (no decomposition): today's
//! output for the target, byte for byte. The chosen set is
//! then placed with the boundary rule (a region that does not pay for its Q/DQ goes float,
//! which only removes error) and measured; if it misses `e_c 10^(margin/10)` (the errors did
//! not add up), the last half of the chosen groups is dropped and it is measured again, at most
//! [`MAX_VERIFICATIONS`] times, then none is kept.
//!
//! Cost: `3 + groups + at most MAX_VERIFICATIONS` tract plans (the float reference, the
//! conservative placement, `e_0`, one per group, the checks; 2 when the conservative output is
//! all float, which no int8 layer can match within a relative margin), each run on `samples` samples (in parallel, summed in sample order:
//! the choice does not depend on the thread count). Ranges are those the pass observed on the
//! whole calibration set; the measurement is in sample (the calibration data).

use super::insert::{self, Namer};
use super::materialize::{self, ActivationRanges};
use super::placement::{self, NodeSelection, Plan};
use super::QuantizeOptions;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::observe::Observed;
use crate::ir::op::node_label;
use crate::ir::Model;
use crate::passes::target::{FidelityGuard, Policy};
use crate::runtime::{Feed, Runner};
use anyhow::{Context, Result};
use indexmap::IndexMap;
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Most groups measured one by one (more optional layers are grouped in graph order).
pub const MAX_GROUPS: usize = 32;

/// Most checks of the chosen set (each drops the last half of what the one before kept).
pub const MAX_VERIFICATIONS: usize = 3;

/// Heavy ops whose placement the guard decides.
const HEAVY: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];

/// One group as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// Its heavy ops, by node label, in graph order.
    pub nodes: Vec<String>,
    /// MACs it moves to integer kernels (per sample).
    pub macs: u64,
    /// Output SQNR with only this group added to the conservative placement, dB.
    pub sqnr_alone_db: f64,
    /// What it costs on its own against the conservative placement, dB.
    pub cost_db: f64,
    pub kept: bool,
}

/// What the guard measured and chose.
#[derive(Debug, Clone, Serialize)]
pub struct GuardReport {
    pub margin_db: f64,
    pub samples: usize,
    /// Output SQNR of the conservative placement (no optional layer int8), dB.
    pub conservative_sqnr_db: f64,
    /// Output SQNR with the optional rules on but no optional layer int8 (what each group's
    /// cost is measured against), dB.
    pub optional_rules_sqnr_db: f64,
    /// Output SQNR of the chosen placement, dB (measured; the conservative one's when none is
    /// kept).
    pub chosen_sqnr_db: f64,
    pub tract_plans: usize,
    pub groups: Vec<GroupReport>,
}

impl GuardReport {
    /// One line for the terminal: the trade made.
    pub fn summary(&self) -> String {
        let kept: Vec<&GroupReport> = self.groups.iter().filter(|g| g.kept).collect();
        let reverted: Vec<&GroupReport> = self.groups.iter().filter(|g| !g.kept).collect();
        let macs = |gs: &[&GroupReport]| gs.iter().map(|g| g.macs).sum::<u64>() as f64 / 1e6;
        let worst = reverted
            .iter()
            .filter(|g| g.cost_db.is_finite())
            .max_by(|a, b| a.cost_db.total_cmp(&b.cost_db))
            .map(|g| format!(" (costliest: '{}' {:.2} dB)", g.nodes[0], g.cost_db))
            .unwrap_or_default();
        format!(
            "fidelity guard: {} of {} optional int8 layer group(s) kept ({:.1} M MACs to integer kernels), {} reverted to float ({:.1} M MACs){worst}; output SQNR on {} calibration sample(s) {:.2} dB vs {:.2} dB for the conservative placement (margin {:.2} dB; {} tract plans; report: quantize details.guard)",
            kept.len(),
            self.groups.len(),
            macs(&kept),
            reverted.len(),
            macs(&reverted),
            self.samples,
            self.chosen_sqnr_db,
            self.conservative_sqnr_db,
            self.margin_db,
            self.tract_plans
        )
    }
}

/// The heavy ops `plan` quantizes, as node indices of `g`.
fn heavy_int8(g: &crate::ir::Graph, plan: &Plan) -> HashSet<NodeIndex> {
    let names: HashSet<&str> = plan
        .nodes
        .iter()
        .filter(|(_, op)| HEAVY.contains(&op.as_str()))
        .map(|(n, _)| n.as_str())
        .collect();
    g.node_indices()
        .filter(|&ix| names.contains(node_label(g.node(ix))))
        .collect()
}

/// Every node `plan` quantizes, as node indices of `g`.
fn plan_nodes(g: &crate::ir::Graph, plan: &Plan) -> HashSet<NodeIndex> {
    let names: HashSet<&str> = plan.nodes.iter().map(|(n, _)| n.as_str()).collect();
    g.node_indices()
        .filter(|&ix| names.contains(node_label(g.node(ix))))
        .collect()
}

/// Pick the groups by cost per saving within `budget` (see the module docs): indices into
/// `costs`/`savings`, in the order taken. Pure and deterministic.
pub fn select(costs: &[f64], savings: &[u64], budget: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    let ratio = |i: usize| costs[i].max(0.0) / (savings[i].max(1) as f64);
    order.sort_by(|&a, &b| ratio(a).total_cmp(&ratio(b)).then(a.cmp(&b)));
    let mut spent = 0.0;
    let mut kept = Vec::new();
    for i in order {
        let c = costs[i].max(0.0);
        if spent + c <= budget {
            spent += c;
            kept.push(i);
        }
    }
    kept
}

/// Runs placements on calibration samples in tract against the float model.
struct Meter<'a> {
    work: &'a Model,
    opts: &'a QuantizeOptions,
    policy: Policy,
    observed: &'a IndexMap<String, Observed>,
    feeds: Vec<Vec<Feed>>,
    shapes: Vec<(String, Vec<usize>)>,
    reference: Vec<Vec<ArrayD<f32>>>,
    plans: usize,
}

impl<'a> Meter<'a> {
    fn outputs(&mut self, model: &crate::onnx::proto::ModelProto) -> Result<Vec<Vec<ArrayD<f32>>>> {
        self.plans += 1;
        let (sim, _) = crate::runtime::simulation_graph(model)?;
        let runner = Runner::new(&sim, &self.shapes, &[]).context("fidelity guard: tract")?;
        self.feeds.par_iter().map(|f| runner.run(f)).collect()
    }

    /// Normalized output error of `plan` (see the module docs).
    fn error(&mut self, plan: &Plan) -> Result<f64> {
        let model = quantized(self.work, plan, self.observed, self.opts, &self.policy)?;
        let outs = self.outputs(&model)?;
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (r, q) in self.reference.iter().zip(&outs) {
            for (a, b) in r.iter().zip(q) {
                for (x, y) in a.iter().zip(b.iter()) {
                    let (x, y) = (f64::from(*x), f64::from(*y));
                    num += (x - y) * (x - y);
                    den += x * x;
                }
            }
        }
        Ok(if den > 0.0 { num / den } else { num })
    }
}

/// `work` with `plan`'s Q/DQ inserted as the pass inserts them (nearest rounding, no bias
/// correction), ranges from `observed`.
fn quantized(
    work: &Model,
    plan: &Plan,
    observed: &IndexMap<String, Observed>,
    opts: &QuantizeOptions,
    policy: &Policy,
) -> Result<crate::onnx::proto::ModelProto> {
    let mut plan = plan.clone();
    plan.settle_scaled();
    let mut params = plan.activation_params(observed, opts.activation_scheme)?;
    let scaled = super::scalar::scaled_params(&plan, &params);
    params.extend(scaled);
    let ranges = ActivationRanges {
        observed: observed.clone(),
        params,
        auto: None,
    };
    let mut m = work.clone();
    let g = &mut m.graph;
    let mut namer = Namer::new(opts.naming);
    let mut weight_scales: IndexMap<String, Vec<f32>> = IndexMap::new();
    for (w, mark) in &plan.weights {
        let (scales, _) = insert::weight(
            g,
            &mut namer,
            w,
            mark.axis,
            mark.zero_point,
            &mark.node,
            opts.reduce_range,
            opts.rounding,
        )?;
        weight_scales.insert(w.clone(), scales);
    }
    materialize::insert(
        g,
        &mut namer,
        &plan,
        &ranges,
        &weight_scales,
        opts.activation_scheme,
    )?;
    if policy.shape_reads_int8 {
        materialize::shapes_read_int8(g)?;
    }
    g.remove_unused_initializers();
    m.to_proto()
}

/// The conservative form of `policy`: its optional rules off.
pub fn conservative(policy: &Policy) -> Policy {
    Policy {
        decompose: &[],
        scalar_operands: false,
        guard: None,
        ..*policy
    }
}

/// The plans the guard compares: the target's (`full`) and the conservative one, both on the
/// graph the pass quantizes. Observation must cover both ([`observed_tensors`]).
pub struct Candidates {
    pub conservative: Plan,
    /// Optional heavy ops, grouped (graph order).
    groups: Vec<Vec<NodeIndex>>,
    /// Heavy ops int8 in the conservative plan.
    base: HashSet<NodeIndex>,
    /// Every heavy op of the graph, then every optional elementwise node: what a placement
    /// may leave float.
    all_heavy: Vec<NodeIndex>,
}

impl Candidates {
    /// `None` when the target's plan adds no heavy op to the conservative one.
    pub fn find(
        g: &crate::ir::Graph,
        opts: &QuantizeOptions,
        full: &Plan,
        shapes: Option<&HashMap<String, Vec<usize>>>,
    ) -> Result<Option<Candidates>> {
        let cons_policy = conservative(&opts.policy());
        let conservative = placement::plan_seeded(
            g,
            opts,
            &NodeSelection::All,
            shapes,
            cons_policy.boundary_cost,
            &cons_policy,
            &HashSet::new(),
        )?;
        let base = heavy_int8(g, &conservative);
        let full_heavy = heavy_int8(g, full);
        let (full_nodes, cons_nodes) = (plan_nodes(g, full), plan_nodes(g, &conservative));
        let order = g.topo_order()?;
        // Units in graph order: an optional heavy op with the optional elementwise nodes after
        // it (its HardSwish pieces, scalar gains and shifts), or such nodes after a heavy op
        // that is not optional (a unit of their own, no MACs).
        let mut units: Vec<Vec<NodeIndex>> = Vec::new();
        let mut current: Option<usize> = None;
        for &ix in &order {
            if HEAVY.contains(&g.node(ix).op_type()) {
                current = None;
                if full_heavy.contains(&ix) && !base.contains(&ix) {
                    units.push(vec![ix]);
                    current = Some(units.len() - 1);
                }
            } else if full_nodes.contains(&ix) && !cons_nodes.contains(&ix) {
                match current {
                    Some(u) => units[u].push(ix),
                    None => {
                        units.push(vec![ix]);
                        current = Some(units.len() - 1);
                    }
                }
            }
        }
        let heavy_units = units
            .iter()
            .filter(|u| u.iter().any(|&ix| HEAVY.contains(&g.node(ix).op_type())))
            .count();
        if heavy_units == 0 {
            return Ok(None);
        }
        let optional: Vec<NodeIndex> = units.iter().flatten().copied().collect();
        let per = units.len().div_ceil(MAX_GROUPS);
        let groups = units.chunks(per).map(|c| c.concat()).collect();
        let all_heavy = order
            .into_iter()
            .filter(|&ix| HEAVY.contains(&g.node(ix).op_type()))
            .chain(optional)
            .collect();
        Ok(Some(Candidates {
            conservative,
            groups,
            base,
            all_heavy,
        }))
    }

    /// Activations to observe: the conservative plan's marks on top of `full`'s.
    pub fn observed_tensors(&self, full: &Plan) -> Plan {
        let mut p = full.clone();
        for t in &self.conservative.activations {
            p.activations.insert(t.clone());
        }
        p
    }

    /// The heavy ops to keep float when `allowed` groups may be int8.
    fn float_set(&self, allowed: &[usize]) -> HashSet<NodeIndex> {
        let on: HashSet<NodeIndex> = allowed
            .iter()
            .flat_map(|&i| self.groups[i].iter().copied())
            .chain(self.base.iter().copied())
            .collect();
        self.all_heavy
            .iter()
            .copied()
            .filter(|ix| !on.contains(ix))
            .collect()
    }
}

/// Measure and choose (see the module docs): the plan to insert (`None`: no optional group
/// kept, the caller places conservatively) and the report.
#[allow(clippy::too_many_arguments)]
pub fn choose(
    work: &Model,
    opts: &QuantizeOptions,
    settings: FidelityGuard,
    candidates: &Candidates,
    shapes: Option<&HashMap<String, Vec<usize>>>,
    observed: &IndexMap<String, Observed>,
    calib: &CalibrationSet,
) -> Result<(Option<Plan>, GuardReport)> {
    let g = &work.graph;
    let policy = opts.policy();
    let (feeds, _, samples) = super::auto::scored_feeds(calib, settings.samples);
    anyhow::ensure!(!feeds.is_empty(), "fidelity guard: no calibration samples");
    let input_shapes: Vec<(String, Vec<usize>)> = calib
        .input_names
        .iter()
        .cloned()
        .zip(feeds[0].iter().map(|a| a.shape().to_vec()))
        .collect();
    let mut meter = Meter {
        work,
        opts,
        policy,
        observed,
        feeds,
        shapes: input_shapes,
        reference: Vec::new(),
        plans: 0,
    };
    meter.reference = meter.outputs(&work.to_proto()?)?;
    let sel = NodeSelection::All;
    let variant = |allowed: &[usize], cost| {
        placement::plan_seeded(
            g,
            opts,
            &sel,
            shapes,
            cost,
            &policy,
            &candidates.float_set(allowed),
        )
    };
    let e_cons = meter.error(&candidates.conservative)?;
    let db = |e: f64| {
        if e > 0.0 {
            -10.0 * e.log10()
        } else {
            f64::INFINITY
        }
    };
    if e_cons <= 0.0 {
        // The conservative output is exact (all float): any int8 layer is past a relative
        // margin, nothing to measure.
        let groups = candidates
            .groups
            .iter()
            .map(|grp| GroupReport {
                nodes: grp
                    .iter()
                    .map(|&ix| node_label(g.node(ix)).to_string())
                    .collect(),
                macs: 0,
                sqnr_alone_db: f64::NAN,
                cost_db: f64::NAN,
                kept: false,
            })
            .collect();
        let report = GuardReport {
            margin_db: f64::from(settings.margin_centi_db) / 100.0,
            samples,
            conservative_sqnr_db: f64::INFINITY,
            optional_rules_sqnr_db: f64::NAN,
            chosen_sqnr_db: f64::INFINITY,
            tract_plans: meter.plans,
            groups,
        };
        return Ok((None, report));
    }
    let e0 = meter.error(&variant(&[], None)?)?;
    let mut costs = Vec::new();
    let mut alone = Vec::new();
    let savings: Vec<u64> = candidates
        .groups
        .iter()
        .map(|grp| {
            grp.iter()
                .filter(|&&ix| HEAVY.contains(&g.node(ix).op_type()))
                .map(|&ix| {
                    shapes
                        .and_then(|s| crate::ir::facts::node_macs(g.node(ix), s))
                        .unwrap_or(1)
                })
                .sum()
        })
        .collect();
    for i in 0..candidates.groups.len() {
        let e = meter.error(&variant(&[i], None)?)?;
        alone.push(e);
        costs.push(e - e0);
    }
    let margin = 10f64.powf(f64::from(settings.margin_centi_db) / 1000.0);
    let limit = e_cons * margin;
    let mut kept = if limit > e0 {
        select(&costs, &savings, limit - e0)
    } else {
        Vec::new()
    };
    let mut chosen = None;
    for _ in 0..MAX_VERIFICATIONS {
        if kept.is_empty() {
            break;
        }
        let plan = variant(&kept, policy.boundary_cost)?;
        let e = meter.error(&plan)?;
        if e <= limit {
            chosen = Some((plan, e));
            break;
        }
        kept.truncate(kept.len() / 2);
    }
    let (plan, e_chosen) = match chosen {
        Some((p, e)) => (Some(p), e),
        None => {
            kept.clear();
            (None, e_cons)
        }
    };
    let groups = candidates
        .groups
        .iter()
        .enumerate()
        .map(|(i, grp)| GroupReport {
            nodes: grp
                .iter()
                .map(|&ix| node_label(g.node(ix)).to_string())
                .collect(),
            macs: savings[i],
            sqnr_alone_db: db(alone[i]),
            cost_db: db(e0) - db(alone[i].max(e0)),
            kept: kept.contains(&i),
        })
        .collect();
    Ok((
        plan,
        GuardReport {
            margin_db: f64::from(settings.margin_centi_db) / 100.0,
            samples,
            conservative_sqnr_db: db(e_cons),
            optional_rules_sqnr_db: db(e0),
            chosen_sqnr_db: db(e_chosen),
            tract_plans: meter.plans,
            groups,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::calibrate::files::DataOptions;
    use crate::passes::target::DEFAULT_GUARD;

    /// x -> conv_c -> conv_a -> conv_b -> y. conv_c zeroes channel 0 and passes channel 1;
    /// conv_a's first row reads channel 1 at weight 0.001 beside a 1000 (per-channel int8
    /// rounds the 0.001 to 0, so y = 1000 a[0] = x[1] becomes 0: harmful); conv_b's int8 input,
    /// weight and output sit on grids proportional to conv_c's (harmless).
    const CHAIN: &str = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,4,4] x) => (float[1,1,4,4] y)
<
   float[2,2,1,1] wc = {0.0, 0.0, 0.0, 1.0},
   float[2,2,1,1] wa = {1000.0, 0.001, 0.0, 0.001},
   float[1,2,1,1] wb = {1000.0, 0.0}
>
{
   [conv_c] c = Conv (x, wc)
   [conv_a] a = Conv (c, wa)
   [conv_b] y = Conv (a, wb)
}"#;

    #[test]
    fn guard_reverts_the_harmful_layer_and_keeps_the_harmless_one() {
        let model = Model::from_proto(crate::onnx::text::parse_model(CHAIN).unwrap()).unwrap();
        let g = &model.graph;
        let ix = |name: &str| {
            g.node_indices()
                .find(|&i| node_label(g.node(i)) == name)
                .unwrap()
        };
        let (c, a, b) = (ix("conv_c"), ix("conv_a"), ix("conv_b"));
        let opts = QuantizeOptions::default();
        let policy = opts.policy();
        let full = placement::plan(g, &opts, &NodeSelection::All).unwrap();
        let conservative = placement::plan_seeded(
            g,
            &opts,
            &NodeSelection::All,
            None,
            None,
            &policy,
            &[a, b].into_iter().collect(),
        )
        .unwrap();
        let candidates = Candidates {
            conservative,
            groups: vec![vec![a], vec![b]],
            base: [c].into_iter().collect(),
            all_heavy: vec![c, a, b],
        };
        let calib = CalibrationSet::synthetic(&model, 16, 7, &DataOptions::default()).unwrap();
        let observe = candidates.observed_tensors(&full);
        let proto = model.to_proto().unwrap();
        let ranges = materialize::calibrate(&observe, &model, &proto, &calib, &opts).unwrap();
        let run = || {
            choose(
                &model,
                &opts,
                DEFAULT_GUARD,
                &candidates,
                None,
                &ranges.observed,
                &calib,
            )
            .unwrap()
        };
        let (plan, report) = run();
        let plan = plan.expect("conv_b is kept");
        let int8: Vec<&str> = plan.nodes.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            int8.contains(&"conv_b") && int8.contains(&"conv_c"),
            "{int8:?}"
        );
        assert!(!int8.contains(&"conv_a"), "{int8:?}");
        let kept: Vec<bool> = report.groups.iter().map(|g| g.kept).collect();
        assert_eq!(kept, [false, true]);
        assert!(report.groups[0].cost_db > 10.0, "{report:?}");
        assert!(report.groups[1].cost_db < 0.5, "{report:?}");
        assert!(report.chosen_sqnr_db >= report.conservative_sqnr_db - 0.5);
        // 2 + 1 + 2 groups + 1 check.
        assert_eq!(report.tract_plans, 6);
        // Same choice and numbers with one thread (samples are summed in order).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (_, again) = pool.install(run);
        assert_eq!(
            serde_json::to_string(&again).unwrap(),
            serde_json::to_string(&report).unwrap()
        );
    }

    #[test]
    fn select_takes_cheapest_per_mac_within_budget() {
        // Group 1 costs nothing, group 0 little per MAC, group 2 too much for the budget.
        let kept = select(&[0.01, -0.002, 0.5], &[1000, 10, 1000], 0.1);
        assert_eq!(kept, vec![1, 0]);
        // A group that does not fit is skipped, a cheaper one later still taken.
        let kept = select(&[0.08, 0.05, 0.04], &[100, 1000, 10], 0.1);
        assert_eq!(kept, vec![1, 2]);
        assert!(select(&[0.2], &[5], 0.1).is_empty());
    }
}
