//! Pass `prune`: structured channel pruning without retraining.
//!
//! 1. **Groups** ([`groups`]): channels that must go together (a producer's filters, the BN
//!    parameters and per-channel constants on the way, depthwise filters, every consumer's
//!    input slices, residual Adds merging groups, Concat offsets, Flatten->Gemm blocks).
//!    Groups touching anything the pass cannot rewrite exactly are unprunable, with reasons.
//! 2. **Importance** ([`importance`]): normalized filter norms, BN `|gamma|`, and (with
//!    calibration data) a consumer-output score per channel.
//! 3. **Plan**: remove the least important channels until the target is met: a fraction of
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

pub mod groups;
pub mod importance;
pub mod reconstruct;

pub use groups::{analyze, dependency_groups, describe_groups, Group, Member, Seg, Shapes};
pub use importance::Criterion;

use crate::ir::op;
use crate::ir::{Graph, Model, Patch};
use crate::onnx::tensor;
use crate::onnx::proto::tensor_shape_proto::dimension::Value as DimValue;
use crate::onnx::proto::type_proto;
use crate::passes::{Pass, PassContext, PassStats};
use crate::ir::facts::node_macs;
use anyhow::{bail, Context, Result};
use importance::AxisStats;
use ndarray::{ArrayD, Axis};
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
    pub calibration: Option<Vec<(String, ArrayD<f32>)>>,
    /// Concrete shapes for inputs with symbolic dims (shape inference and MAC counts).
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Least-squares problems with more unknowns per output than this fall back to `Bias`.
    pub max_ls_unknowns: usize,
    /// Rows (samples x positions) used per least-squares fit.
    pub max_ls_rows: usize,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            ratio: 0.0,
            flops: 0.0,
            ranking: Ranking::Global,
            criterion: Criterion::Combined,
            max_fraction: 0.9,
            round_to: 1,
            reconstruct: Reconstruct::LeastSquares,
            calibration: None,
            input_shapes: Vec::new(),
            max_ls_unknowns: 2304,
            max_ls_rows: 16384,
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
        prune(model, &ctx.prune)
    }
}

/// Channels to remove, per group id (sorted group-channel indices).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub remove: Vec<Vec<usize>>,
    pub macs_before: u64,
    /// MACs after, as modeled (Conv/Gemm/MatMul scaled by kept channels).
    pub macs_after: u64,
}

struct MacModel {
    /// (node MACs, segments in, segments out, depthwise)
    heavy: Vec<(f64, Vec<Seg>, Vec<Seg>, bool)>,
    other: f64,
}

impl MacModel {
    fn new(model: &Model, analysis: &groups::Analysis, shapes: &Shapes) -> MacModel {
        let g = &model.graph;
        let mut heavy = Vec::new();
        let mut counted = std::collections::HashSet::new();
        for h in &analysis.heavy {
            if let Some(m) = node_macs(g.node(h.node), shapes) {
                heavy.push((m as f64, h.inputs.clone(), h.outputs.clone(), h.depthwise));
                counted.insert(h.node);
            }
        }
        let other = g
            .node_indices()
            .filter(|ix| !counted.contains(ix))
            .filter_map(|ix| node_macs(g.node(ix), shapes))
            .map(|m| m as f64)
            .sum();
        MacModel { heavy, other }
    }

    fn width(segs: &[Seg], kept: &[usize], orig: &[usize]) -> (f64, f64) {
        segs.iter().fold((0.0, 0.0), |(k, o), s| match *s {
            Seg::Group(g) => (k + kept[g] as f64, o + orig[g] as f64),
            Seg::Fixed(n) => (k + n as f64, o + n as f64),
        })
    }

    fn total(&self, kept: &[usize], orig: &[usize]) -> f64 {
        self.other
            + self
                .heavy
                .iter()
                .map(|(m, i, o, dw)| {
                    let (ki, oi) = Self::width(i, kept, orig);
                    let (ko, oo) = Self::width(o, kept, orig);
                    let fi = if oi > 0.0 { ki / oi } else { 1.0 };
                    let fo = if oo > 0.0 { ko / oo } else { 1.0 };
                    if *dw {
                        m * fi
                    } else {
                        m * fi * fo
                    }
                })
                .sum::<f64>()
    }
}

/// Smallest kept count allowed for a group of `c` channels.
fn min_keep(c: usize, opts: &PruneOptions) -> usize {
    let frac = opts.max_fraction.clamp(0.0, 1.0);
    (((1.0 - frac) * c as f64).ceil() as usize).clamp(1, c)
}

/// The kept count after one more pruning step from `kept` (multiples of `round_to`).
fn next_keep(kept: usize, c: usize, opts: &PruneOptions) -> Option<usize> {
    let n = opts.round_to.max(1);
    let lo = min_keep(c, opts);
    let next = if n > 1 && c >= 2 * n {
        // down to the next multiple of n below `kept`
        ((kept - 1) / n) * n
    } else {
        kept.saturating_sub(1)
    };
    (next >= lo && next >= 1 && next < kept).then_some(next)
}

/// Plan the removal: which channels of which groups (see the module docs).
pub fn plan(
    groups: &[Group],
    scores: &[Vec<f64>],
    macs: &MacModelHandle,
    opts: &PruneOptions,
) -> Plan {
    let orig: Vec<usize> = groups.iter().map(|g| g.channels).collect();
    // Channels of each prunable group, least important first (ties: lower index first).
    let order: Vec<Vec<usize>> = groups
        .iter()
        .map(|g| {
            let mut idx: Vec<usize> = (0..g.channels).collect();
            if g.prunable() {
                idx.sort_by(|&a, &b| scores[g.id][a].total_cmp(&scores[g.id][b]).then(a.cmp(&b)));
            }
            idx
        })
        .collect();
    let mm = &macs.0;
    let macs_before = mm.total(&orig, &orig);
    let mut kept = orig.clone();
    let by_flops = opts.flops > 0.0;
    let prunable_channels: usize = groups
        .iter()
        .filter(|g| g.prunable())
        .map(|g| g.channels)
        .sum();
    let target_removed = (opts.ratio.clamp(0.0, 1.0) * prunable_channels as f64).round() as usize;
    let target_macs = (1.0 - opts.flops.clamp(0.0, 1.0)) * macs_before;
    let removed_count = |kept: &[usize]| -> usize {
        groups
            .iter()
            .filter(|g| g.prunable())
            .map(|g| g.channels - kept[g.id])
            .sum()
    };
    let done = |kept: &[usize]| {
        if by_flops {
            mm.total(kept, &orig) <= target_macs
        } else {
            removed_count(kept) >= target_removed
        }
    };
    match opts.ranking {
        Ranking::Global => {
            while !done(&kept) {
                let now = if by_flops {
                    mm.total(&kept, &orig)
                } else {
                    0.0
                };
                let mut best: Option<(f64, usize, usize)> = None;
                for g in groups.iter().filter(|g| g.prunable()) {
                    let Some(next) = next_keep(kept[g.id], g.channels, opts) else {
                        continue;
                    };
                    let k = kept[g.id] - next;
                    let removed_before = g.channels - kept[g.id];
                    let cost: f64 = order[g.id][removed_before..removed_before + k]
                        .iter()
                        .map(|&c| scores[g.id][c])
                        .sum();
                    let gain = if by_flops {
                        let mut trial = kept.clone();
                        trial[g.id] = next;
                        now - mm.total(&trial, &orig)
                    } else {
                        k as f64
                    };
                    if gain <= 0.0 {
                        continue;
                    }
                    let prio = cost / gain;
                    if best.is_none_or(|(p, _, _)| prio < p) {
                        best = Some((prio, g.id, next));
                    }
                }
                match best {
                    Some((_, g, next)) => kept[g] = next,
                    None => break,
                }
            }
        }
        Ranking::PerLayer => {
            let keep_at = |r: f64| -> Vec<usize> {
                groups
                    .iter()
                    .map(|g| {
                        if !g.prunable() {
                            return g.channels;
                        }
                        let want = g.channels - (r * g.channels as f64).floor() as usize;
                        let mut k = g.channels;
                        while let Some(n) = next_keep(k, g.channels, opts) {
                            if k <= want {
                                break;
                            }
                            k = n;
                        }
                        k
                    })
                    .collect()
            };
            if by_flops {
                let (mut lo, mut hi) = (0.0f64, 1.0f64);
                for _ in 0..40 {
                    let mid = 0.5 * (lo + hi);
                    if mm.total(&keep_at(mid), &orig) <= target_macs {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                kept = keep_at(hi);
            } else {
                kept = keep_at(opts.ratio.clamp(0.0, 1.0));
            }
        }
    }
    let remove = groups
        .iter()
        .map(|g| {
            let mut r: Vec<usize> = order[g.id][..g.channels - kept[g.id]].to_vec();
            r.sort_unstable();
            r
        })
        .collect();
    Plan {
        remove,
        macs_before: macs_before.round() as u64,
        macs_after: mm.total(&kept, &orig).round() as u64,
    }
}

/// Opaque MAC model for [`plan`].
pub struct MacModelHandle(MacModel);

impl MacModelHandle {
    pub fn new(model: &Model, analysis: &groups::Analysis, shapes: &Shapes) -> Self {
        MacModelHandle(MacModel::new(model, analysis, shapes))
    }
}

/// Remove `idx` along `axis` of `a`.
fn drop_indices(a: &ArrayD<f32>, axis: usize, idx: &[usize]) -> Result<ArrayD<f32>> {
    let n = *a
        .shape()
        .get(axis)
        .with_context(|| format!("axis {axis} out of range for shape {:?}", a.shape()))?;
    if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
        bail!("channel {bad} out of range (axis {axis} has {n})");
    }
    let keep: Vec<usize> = (0..n).filter(|i| idx.binary_search(i).is_err()).collect();
    Ok(a.select(Axis(axis), &keep))
}

/// What apply changed, for reconstruction.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Consumer node -> (weight in-axis, removed indices on that axis, sorted).
    pub consumers: BTreeMap<NodeIndex, (usize, Vec<usize>)>,
    /// Node -> (weight out-axis, removed output channels), for nodes whose outputs shrank.
    pub producers: BTreeMap<NodeIndex, (usize, Vec<usize>)>,
}

/// `(node, input slot)` -> `[(axis, removed indices)]`.
type Cuts = BTreeMap<(NodeIndex, usize), Vec<(usize, Vec<usize>)>>;

/// Apply a plan to the graph (all or nothing).
pub fn apply(graph: &mut Graph, groups: &[Group], plan: &Plan) -> Result<Applied> {
    // (node, slot) -> [(axis, removed indices)]
    let mut cuts: Cuts = BTreeMap::new();
    let mut value_cuts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut depthwise = std::collections::BTreeSet::new();
    let mut applied = Applied::default();
    let mut add = |key: (NodeIndex, usize), axis: usize, idx: Vec<usize>| {
        let e = cuts.entry(key).or_default();
        match e.iter_mut().find(|(a, _)| *a == axis) {
            Some((_, v)) => v.extend(idx),
            None => e.push((axis, idx)),
        }
    };
    for g in groups {
        let r = &plan.remove[g.id];
        if r.is_empty() {
            continue;
        }
        if !g.prunable() {
            bail!(
                "internal: plan removes channels of unprunable group {}",
                g.id
            );
        }
        for m in &g.members {
            match m {
                Member::Producer {
                    node, axis, bias, ..
                } => {
                    add((*node, 1), *axis, r.clone());
                    if bias.is_some() {
                        add((*node, 2), 0, r.clone());
                    }
                    let e = applied.producers.entry(*node).or_insert((*axis, vec![]));
                    e.1.extend(r.iter().copied());
                }
                Member::Depthwise {
                    node, bias, offset, ..
                } => {
                    let idx: Vec<usize> = r.iter().map(|c| c + offset).collect();
                    add((*node, 1), 0, idx.clone());
                    if bias.is_some() {
                        add((*node, 2), 0, idx.clone());
                    }
                    depthwise.insert(*node);
                    let e = applied.producers.entry(*node).or_insert((0, vec![]));
                    e.1.extend(idx);
                }
                Member::Consumer {
                    node,
                    axis,
                    offset,
                    block,
                    ..
                } => {
                    let idx: Vec<usize> = r
                        .iter()
                        .flat_map(|c| ((c + offset) * block)..((c + offset + 1) * block))
                        .collect();
                    add((*node, 1), *axis, idx.clone());
                    let e = applied.consumers.entry(*node).or_insert((*axis, vec![]));
                    e.1.extend(idx);
                }
                Member::Param {
                    node,
                    slot,
                    axis,
                    offset,
                    block,
                    ..
                } => {
                    let idx: Vec<usize> = r
                        .iter()
                        .flat_map(|c| ((c + offset) * block)..((c + offset + 1) * block))
                        .collect();
                    add((*node, *slot), *axis, idx);
                }
                Member::Value {
                    name,
                    axis_from_end,
                    block,
                    ..
                } => {
                    let e = value_cuts
                        .entry(name.clone())
                        .or_insert((*axis_from_end, 0));
                    e.1 += r.len() * block;
                }
            }
        }
    }
    for v in applied
        .consumers
        .values_mut()
        .chain(applied.producers.values_mut())
    {
        v.1.sort_unstable();
        v.1.dedup();
    }
    let mut g2 = graph.clone();
    let mut new_inits = Vec::new();
    let mut node_edits: BTreeMap<NodeIndex, crate::onnx::proto::NodeProto> = BTreeMap::new();
    let mut replaced_names = Vec::new();
    for ((node, slot), axes) in &cuts {
        let proto = graph.node(*node);
        let name = proto
            .input
            .get(*slot)
            .with_context(|| format!("{} has no input {slot}", groups::label(graph, *node)))?;
        let t = graph
            .constant(name)
            .with_context(|| format!("'{name}' is not a constant"))?;
        let mut a = tensor::to_f32(t).with_context(|| format!("reading '{name}'"))?;
        for (axis, idx) in axes {
            let mut idx = idx.clone();
            idx.sort_unstable();
            idx.dedup();
            a = drop_indices(&a, *axis, &idx).with_context(|| {
                format!(
                    "slicing '{name}' (input {slot} of {})",
                    groups::label(graph, *node)
                )
            })?;
        }
        let sole = graph.consumers(name).len() == 1 && !graph.is_graph_output(name);
        let new_name = if sole {
            name.clone()
        } else {
            let n = g2.fresh_name(&format!("{name}_pruned"));
            replaced_names.push(name.clone());
            let edit = node_edits.entry(*node).or_insert_with(|| proto.clone());
            edit.input[*slot] = n.clone();
            n
        };
        // Reserve the name so later fresh names differ.
        g2.initializers
            .insert(new_name.clone(), tensor::from_f32(&new_name, &a));
        new_inits.push(tensor::from_f32(&new_name, &a));
    }
    for node in &depthwise {
        let channels = cuts
            .get(&(*node, 1))
            .and_then(|_| {
                new_inits.iter().find(|t| {
                    let n = node_edits
                        .get(node)
                        .map(|p| p.input[1].clone())
                        .unwrap_or_else(|| graph.node(*node).input[1].clone());
                    t.name() == n
                })
            })
            .and_then(|t| t.dims.first().copied())
            .context("depthwise weight was not sliced")?;
        let edit = node_edits
            .entry(*node)
            .or_insert_with(|| graph.node(*node).clone());
        op::set_attr(edit, op::attr_int("group", channels));
    }
    let mut out = graph.clone();
    out.apply(Patch {
        initializers: new_inits,
        ..Default::default()
    })?;
    for (ix, proto) in node_edits {
        out.replace_node(ix, proto)?;
    }
    for name in replaced_names {
        if out.consumers(&name).is_empty()
            && !out.is_graph_output(&name)
            && !out.is_graph_input(&name)
        {
            out.initializers.shift_remove(&name);
        }
    }
    // value_info: shrink the channel dim of every touched value.
    for vi in out.value_info.iter_mut() {
        let Some(&(from_end, removed)) = value_cuts.get(vi.name()) else {
            continue;
        };
        if let Some(type_proto::Value::TensorType(t)) =
            vi.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if let Some(shape) = t.shape.as_mut() {
                let rank = shape.dim.len();
                if rank > from_end {
                    let d = &mut shape.dim[rank - 1 - from_end];
                    match d.value {
                        Some(DimValue::DimValue(v)) if v as usize >= removed => {
                            d.value = Some(DimValue::DimValue(v - removed as i64))
                        }
                        _ => d.value = None,
                    }
                }
            }
        }
    }
    out.check().context("pruned graph is inconsistent")?;
    *graph = out;
    Ok(applied)
}

/// Run the `prune` pass on a model.
pub fn prune(model: &mut Model, opts: &PruneOptions) -> Result<PassStats> {
    let mut st = PassStats::default();
    if opts.ratio <= 0.0 && opts.flops <= 0.0 {
        st.notes
            .push("no pruning target (ratio 0, flops 0): nothing done".to_string());
        return Ok(st);
    }
    let shapes = crate::runtime::value_shapes(model, &model.to_proto()?, &opts.input_shapes);
    let analysis = analyze(&model.graph, &shapes)?;
    let groups = &analysis.groups;
    // Calibration run on the original: consumer inputs (moments, reconstruction inputs) and
    // consumer outputs (reconstruction targets).
    let original = model.to_proto()?;
    let calib = match &opts.calibration {
        Some(c)
            if opts.criterion != Criterion::L1 && opts.criterion != Criterion::L2
                || opts.reconstruct != Reconstruct::None =>
        {
            match reconstruct::Calibration::collect(&original, &model.graph, groups, c) {
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
    let plan = plan(groups, &scores, &mm, opts);
    let params_before: usize = model
        .graph
        .initializers
        .values()
        .map(|t| tensor::element_count(t).unwrap_or(0))
        .sum();
    let removed: usize = plan.remove.iter().map(Vec::len).sum();
    let before_graph = model.graph.clone();
    let applied = apply(&mut model.graph, groups, &plan)?;
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
        "macs_before": plan.macs_before,
        "macs_after": plan.macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "channels_removed": removed,
    });
    Ok(st)
}
