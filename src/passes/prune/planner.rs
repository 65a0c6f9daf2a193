//! Step 3 of `prune`: which channels of which groups to remove.
//!
//! The MAC model: every Conv/ConvTranspose/Gemm/MatMul found by the group analysis costs its
//! MACs scaled by the kept fraction of its input channels times that of its output channels
//! (input fraction only for depthwise convs); other nodes keep their MACs. A group of `c`
//! channels keeps at least `max(1, ceil((1 - max_fraction) * c))` of them, and steps down in
//! multiples of `round_to` when it has at least `2 * round_to` channels.
//!
//! Each group comes with a removal order and the cost of each step along it: the channel
//! scores sorted ascending (ties: lower index first) for the importance criteria, or the
//! second-order cost curve of criterion `loss` (see `obs`). The allocation removes channels
//! until the target is met: a fraction of the prunable channels (`ratio`) or of the modeled
//! MACs (`flops`); globally (greedy by cost per channel or per MAC saved, looking up to
//! `LOOKAHEAD` steps ahead in each group so a curve that is cheap after one expensive step is
//! not passed over), or the same fraction per layer.

use super::groups::{self, Group, Seg, Shapes};
use super::{PruneOptions, Ranking};
use crate::ir::facts::node_macs;
use crate::ir::Model;
use petgraph::stable_graph::NodeIndex;

/// Channels to remove, per group id (sorted group-channel indices).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub remove: Vec<Vec<usize>>,
    pub macs_before: u64,
    /// MACs after, as modeled (Conv/Gemm/MatMul scaled by kept channels).
    pub macs_after: u64,
}

/// Steps a group's cost curve is looked ahead by the global allocation.
const LOOKAHEAD: usize = 4;

struct MacModel {
    /// (node MACs, segments in, segments out, depthwise)
    heavy: Vec<(f64, Vec<Seg>, Vec<Seg>, bool)>,
    /// The node of each `heavy` entry.
    nodes: Vec<NodeIndex>,
    other: f64,
    /// Heavy nodes touching each group id.
    touching: std::collections::HashMap<usize, Vec<usize>>,
}

impl MacModel {
    /// `cost` of a node: its MACs, or (for a size target) its weight's element count.
    fn new(
        model: &Model,
        analysis: &groups::Analysis,
        cost: &dyn Fn(NodeIndex) -> Option<u64>,
    ) -> MacModel {
        let g = &model.graph;
        let mut heavy = Vec::new();
        let mut nodes = Vec::new();
        let mut counted = std::collections::HashSet::new();
        for h in &analysis.heavy {
            if let Some(m) = cost(h.node) {
                heavy.push((m as f64, h.inputs.clone(), h.outputs.clone(), h.depthwise));
                nodes.push(h.node);
                counted.insert(h.node);
            }
        }
        let other = g
            .node_indices()
            .filter(|ix| !counted.contains(ix))
            .filter_map(cost)
            .map(|m| m as f64)
            .sum();
        let mut touching: std::collections::HashMap<usize, Vec<usize>> = Default::default();
        for (i, (_, ins, outs, _)) in heavy.iter().enumerate() {
            let mut gs: Vec<usize> = ins
                .iter()
                .chain(outs)
                .filter_map(|s| match s {
                    Seg::Group(g) => Some(*g),
                    Seg::Fixed(_) => None,
                })
                .collect();
            gs.sort_unstable();
            gs.dedup();
            for g in gs {
                touching.entry(g).or_default().push(i);
            }
        }
        MacModel {
            heavy,
            nodes,
            other,
            touching,
        }
    }

    fn node_macs(&self, i: usize, kept: &[usize], orig: &[usize]) -> f64 {
        let (m, ins, outs, dw) = &self.heavy[i];
        let (ki, oi) = Self::width(ins, kept, orig);
        let (ko, oo) = Self::width(outs, kept, orig);
        let fi = if oi > 0.0 { ki / oi } else { 1.0 };
        let fo = if oo > 0.0 { ko / oo } else { 1.0 };
        if *dw {
            m * fi
        } else {
            m * fi * fo
        }
    }

    /// MACs saved by changing group `g` to `next` kept channels (only its nodes change).
    fn gain(&self, kept: &mut [usize], orig: &[usize], g: usize, next: usize) -> f64 {
        let Some(nodes) = self.touching.get(&g) else {
            return 0.0;
        };
        let before: f64 = nodes.iter().map(|&i| self.node_macs(i, kept, orig)).sum();
        let old = kept[g];
        kept[g] = next;
        let after: f64 = nodes.iter().map(|&i| self.node_macs(i, kept, orig)).sum();
        kept[g] = old;
        before - after
    }

    fn width(segs: &[Seg], kept: &[usize], orig: &[usize]) -> (f64, f64) {
        segs.iter().fold((0.0, 0.0), |(k, o), s| match *s {
            Seg::Group(g) => (k + kept[g] as f64, o + orig[g] as f64),
            Seg::Fixed(n) => (k + n as f64, o + n as f64),
        })
    }

    fn total(&self, kept: &[usize], orig: &[usize]) -> f64 {
        self.other
            + (0..self.heavy.len())
                .map(|i| self.node_macs(i, kept, orig))
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

/// Most channels group `g` may lose (0 for unprunable groups).
pub fn max_removable(g: &Group, opts: &PruneOptions) -> usize {
    if g.prunable() {
        g.channels - min_keep(g.channels, opts)
    } else {
        0
    }
}

/// Plan the removal by channel scores: each group's channels least important first (ties:
/// lower index first), a step costs the removed channels' scores (see the module docs).
pub fn plan(
    groups: &[Group],
    scores: &[Vec<f64>],
    macs: &MacModelHandle,
    opts: &PruneOptions,
) -> Plan {
    let mut order = Vec::with_capacity(groups.len());
    let mut cost = Vec::with_capacity(groups.len());
    for g in groups {
        let mut idx: Vec<usize> = (0..g.channels).collect();
        if g.prunable() {
            idx.sort_by(|&a, &b| scores[g.id][a].total_cmp(&scores[g.id][b]).then(a.cmp(&b)));
        }
        cost.push(idx.iter().map(|&c| scores[g.id][c]).collect());
        order.push(idx);
    }
    allocate(groups, order, cost, macs, opts, 1)
}

/// Plan the removal along given orders: `order[g]` lists (a prefix of) group `g`'s channels
/// in removal order, `step_cost[g][i]` is the cost of removing `order[g][i]` after the ones
/// before it. Channels missing from `order[g]` are never removed.
pub fn plan_curves(
    groups: &[Group],
    order: Vec<Vec<usize>>,
    step_cost: Vec<Vec<f64>>,
    macs: &MacModelHandle,
    opts: &PruneOptions,
) -> Plan {
    allocate(groups, order, step_cost, macs, opts, LOOKAHEAD)
}

fn allocate(
    groups: &[Group],
    order: Vec<Vec<usize>>,
    step_cost: Vec<Vec<f64>>,
    macs: &MacModelHandle,
    opts: &PruneOptions,
    lookahead: usize,
) -> Plan {
    let orig: Vec<usize> = groups.iter().map(|g| g.channels).collect();
    // Never past the end of a curve.
    let floor: Vec<usize> = groups
        .iter()
        .map(|g| g.channels - order[g.id].len().min(g.channels))
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
                let mut best: Option<(f64, usize, usize)> = None;
                for g in groups.iter().filter(|g| g.prunable()) {
                    // Up to LOOKAHEAD steps: the best average cost per unit gained.
                    let mut k_now = kept[g.id];
                    let mut cost = 0.0;
                    for _ in 0..lookahead {
                        let Some(next) = next_keep(k_now, g.channels, opts) else {
                            break;
                        };
                        if next < floor[g.id] {
                            break;
                        }
                        let removed_before = g.channels - k_now;
                        cost += step_cost[g.id][removed_before..g.channels - next]
                            .iter()
                            .sum::<f64>();
                        // Cumulative, from the current kept count.
                        let gain = if by_flops {
                            mm.gain(&mut kept, &orig, g.id, next)
                        } else {
                            (kept[g.id] - next) as f64
                        };
                        k_now = next;
                        if gain <= 0.0 {
                            continue;
                        }
                        let prio = cost / gain;
                        if best.is_none_or(|(p, _, _)| prio < p) {
                            best = Some((prio, g.id, next));
                        }
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
                            if k <= want || n < floor[g.id] {
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
        let g = &model.graph;
        MacModelHandle(MacModel::new(model, analysis, &|ix| {
            node_macs(g.node(ix), shapes)
        }))
    }

    /// The same model counting weight elements instead of MACs (a node's weight shrinks by the
    /// same fractions as its MACs): with it, `flops` in [`plan_curves`] is a fraction of the
    /// weights of the heavy nodes, and the allocation is by cost per weight removed.
    pub fn params(model: &Model, analysis: &groups::Analysis) -> Self {
        let g = &model.graph;
        MacModelHandle(MacModel::new(model, analysis, &|ix| {
            let w = g.node(ix).input.get(1)?;
            let t = g.constant(w)?;
            crate::onnx::tensor::element_count(t).ok().map(|n| n as u64)
        }))
    }

    /// Per heavy node: the kept fraction of its input and of its output channels under `kept`
    /// (depthwise nodes: the output fraction is the input's), for the plan `plan`'s groups.
    pub fn kept_fractions(
        &self,
        groups: &[Group],
        plan: &Plan,
    ) -> Vec<(NodeIndex, f64, f64, bool)> {
        let mm = &self.0;
        let orig: Vec<usize> = groups.iter().map(|g| g.channels).collect();
        let kept: Vec<usize> = groups
            .iter()
            .map(|g| g.channels - plan.remove[g.id].len())
            .collect();
        mm.heavy
            .iter()
            .zip(&mm.nodes)
            .map(|((_, ins, outs, dw), &ix)| {
                let (ki, oi) = MacModel::width(ins, &kept, &orig);
                let (ko, oo) = MacModel::width(outs, &kept, &orig);
                let fi = if oi > 0.0 { ki / oi } else { 1.0 };
                let fo = if *dw {
                    fi
                } else if oo > 0.0 {
                    ko / oo
                } else {
                    1.0
                };
                (ix, fi, fo, *dw)
            })
            .collect()
    }
}
