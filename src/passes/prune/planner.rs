//! Step 3 of `prune`: which channels of which groups to remove.
//!
//! The MAC model: every Conv/ConvTranspose/Gemm/MatMul found by the group analysis costs its
//! MACs scaled by the kept fraction of its input channels times that of its output channels
//! (input fraction only for depthwise convs); other nodes keep their MACs. A group of `c`
//! channels keeps at least `max(1, ceil((1 - max_fraction) * c))` of them, and steps down in
//! multiples of `round_to` when it has at least `2 * round_to` channels.
//!
//! The allocation removes the least important channels first (ties: lower index first) until
//! the target is met: a fraction of the prunable channels (`ratio`) or of the modeled MACs
//! (`flops`, greedy by score per MAC saved); globally, or the same fraction per layer.

use super::groups::{self, Group, Seg, Shapes};
use super::{PruneOptions, Ranking};
use crate::ir::facts::node_macs;
use crate::ir::Model;

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
