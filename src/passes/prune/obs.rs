//! Criterion `loss` (the default): per-group cost curves from the consumers' input Gram
//! matrices, Optimal Brain Surgeon / ThiNet / ZipLM style.
//!
//! For a consumer `y = W^T a + b` (Conv via im2col rows, Gemm, MatMul) with calibration design
//! rows `A` (plus a column of ones for the bias when the layer has one) and `G = A^T A + lambda I`
//! (`lambda = 1e-4 trace(G) / d`), removing the input columns `S` of a channel and refitting the
//! kept ones by least squares raises the squared output error by exactly
//!
//! `cost(S) = tr(W_S^T ((G^-1)_SS)^-1 W_S)`,
//!
//! and the optimal refit is `W_K -= (G^-1)_KS ((G^-1)_SS)^-1 W_S`, after which `G^-1` on the kept
//! columns is the Schur update `H_KK - H_KS H_SS^-1 H_SK` (`H = G^-1`). Greedy removal (the
//! cheapest channel of the group next, summed over the group's consumers) gives each group an
//! order and a marginal cost per removed channel: its cost curve.
//!
//! Costs are made comparable across layers by dividing by the consumer's output energy
//! (`n_rows * E sum_o y_o^2`), which makes a cost the relative squared output error of that
//! consumer, and multiplying by the consumer's measured sensitivity (`sensitivity`: output loss
//! per unit of relative squared error there). A cost is then a predicted output loss; the
//! planner spends the MAC budget on the cheapest predicted loss per MAC saved.
//!
//! Before / after (the shape of a curve, illustrative numbers: a group of 4 channels read by one
//! Conv; the last channel is never offered, every group keeps at least one):
//! ```text
//! y = Conv (r[.,4,.,.], w[8,4,3,3])   =>  order [2, 0, 3], step costs [0.001, 0.004, 0.09]
//! ```
//!
//! Limits: consumers with more than `max_obs_unknowns` design columns (e.g. a 3x3 conv over 512
//! channels), or more than 2 columns per calibration row (a Gemm after global pooling reading
//! 256 channels from 32 samples: any refit would be over-fitted), use the block-diagonal part
//! of `G` only (removal with the channel's mean folded
//! into the bias, no cross-channel refit): the cost is then an upper bound. Consumers that are
//! not 2-D Conv (`group = 1`, explicit pads) / Gemm / MatMul, or whose activations are missing,
//! make the group fall back to the `combined` criterion (noted).

use super::groups::{Group, Member};
use super::reconstruct::{conv2d_attrs, im2col, Calibration};
use crate::calibrate::gram::positions;
use crate::ir::layer::{Layer, LayerKind};
use crate::ir::Graph;
use anyhow::{bail, Context, Result};
use ndarray::{s, Array2, Axis};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// A group's removal order and the marginal (normalized) cost of each step.
#[derive(Debug, Clone, Default)]
pub struct Curve {
    pub order: Vec<usize>,
    pub step_cost: Vec<f64>,
}

/// A consumer gets the no-refit (block-diagonal) model when its design has more than this
/// many columns per calibration row.
const MAX_UNKNOWNS_PER_ROW: usize = 2;

/// One consumer's second-order model.
struct Consumer {
    /// `H = G^-1` (full), or `None` when only the block diagonal of `G` is kept.
    hinv: Option<Array2<f64>>,
    /// Without `hinv`: the cost of removing each weight input channel alone,
    /// `tr(W_c^T G_cc W_c)` with the centered block-diagonal Gram block `G_cc`. Without a
    /// refit a removal does not change the other channels' costs, so they are computed once
    /// per consumer instead of at every greedy step of every group that reads it.
    diag_cost: Vec<f64>,
    /// `[d (+1)] x o` weights (bias row last when present).
    w: Array2<f64>,
    /// Design columns per weight input channel.
    q: usize,
    /// `1 / (rows * output energy)`.
    norm: f64,
}

/// Cholesky inverse of a symmetric positive definite matrix (`None` when not SPD), blocked
/// for large matrices (`solve`); small ones (the greedy steps' `b x b` blocks) go through the
/// unblocked routine.
fn spd_inverse(g: &Array2<f64>) -> Option<Array2<f64>> {
    super::solve::spd_inverse_blocked(g)
}

/// `tr(W_B^T M^-1 W_B)` for a small SPD `M` (b x b) and `W_B` (b x o); `None` if singular.
fn quad_inv(m: &Array2<f64>, wb: &Array2<f64>) -> Option<f64> {
    let mi = spd_inverse(m)?;
    let t = mi.dot(wb);
    Some((&t * wb).sum())
}

impl Consumer {
    /// Design columns of weight input channels `chans`.
    fn cols(&self, chans: &[usize]) -> Vec<usize> {
        chans
            .iter()
            .flat_map(|&ch| ch * self.q..(ch + 1) * self.q)
            .collect()
    }

    /// Normalized cost of removing the weight input channels `chans` (one group channel) now.
    fn cost(&self, chans: &[usize]) -> f64 {
        let c = match &self.hinv {
            Some(h) => {
                // Only the `b x b` block of H is read (not `b` whole rows of it): this runs for
                // every alive channel of every consumer at every greedy step.
                let cols = self.cols(chans);
                let wb = self.w.select(Axis(0), &cols);
                let hb =
                    Array2::from_shape_fn((cols.len(), cols.len()), |(i, j)| h[[cols[i], cols[j]]]);
                quad_inv(&hb, &wb).unwrap_or(f64::INFINITY)
            }
            None => chans.iter().map(|&ch| self.diag_cost[ch]).sum(),
        };
        c.max(0.0) * self.norm
    }

    /// Remove the weight input channels `chans` with the optimal refit of the kept columns.
    fn remove(&mut self, chans: &[usize]) {
        let cols = self.cols(chans);
        let Some(h) = &mut self.hinv else { return };
        let hb = h.select(Axis(0), &cols).select(Axis(1), &cols);
        if let Some(hbi) = spd_inverse(&hb) {
            let h_b = h.select(Axis(1), &cols); // d x b
            let wb = self.w.select(Axis(0), &cols); // b x o
            let k = h_b.dot(&hbi); // d x b
            self.w -= &k.dot(&wb);
            *h -= &k.dot(&h_b.t());
        }
        for &c in &cols {
            h.row_mut(c).fill(0.0);
            h.column_mut(c).fill(0.0);
            self.w.row_mut(c).fill(0.0);
        }
    }
}

/// Build the second-order model of one consumer (`None`: unsupported layer form).
fn consumer_model(
    graph: &Graph,
    ix: NodeIndex,
    cal: &Calibration,
    max_rows: usize,
    max_unknowns: usize,
) -> Result<Option<Consumer>> {
    let Some(layer) = Layer::of(graph, ix) else {
        return Ok(None);
    };
    let node = graph.node(ix);
    let x_name = &node.input[0];
    let y_name = node.output.first().context("no output")?;
    let (Some(x), Some(y)) = (cal.acts.get(x_name), cal.acts.get(y_name)) else {
        return Ok(None);
    };
    let energy = cal.out_energy.get(y_name).copied().unwrap_or(0.0);

    let w = layer.weight_f32(graph)?;
    let bias = layer.bias_f32(graph)?;
    let intercept = !matches!(layer.kind, LayerKind::MatMul);
    // Design rows (chunked) and the weight as [d x o].
    #[allow(clippy::type_complexity)]
    let (rows_of, d, wmat, cin, n_rows): (
        Box<dyn Fn(usize, usize) -> Array2<f64>>,
        usize,
        Array2<f64>,
        usize,
        usize,
    ) = match layer.kind {
        LayerKind::Conv { group: 1 } => {
            let Some(c) = conv2d_attrs(node, &layer.weight_shape) else {
                return Ok(None);
            };
            if x.ndim() != 4 || y.ndim() != 4 {
                return Ok(None);
            }
            let (n, oh, ow) = (y.shape()[0], y.shape()[2], y.shape()[3]);
            let cin = x.shape()[1];
            let d = cin * c.kh * c.kw;
            let o = layer.weight_shape[0];
            let rows = super::reconstruct::design_rows(d, max_rows);
            let pos = positions(n, oh, ow, rows);
            let n_rows = pos.len();
            let wm = w
                .to_shape((o, d))
                .context("conv weight")?
                .t()
                .mapv(f64::from);
            let x = x.clone();
            (
                Box::new(move |lo, hi| {
                    if lo >= pos.len() {
                        return Array2::zeros((0, d));
                    }
                    im2col(&x, &c, &pos[lo..hi.min(pos.len())])
                }),
                d,
                wm,
                cin,
                n_rows,
            )
        }
        LayerKind::Gemm { trans_b } => {
            let k = *x.shape().last().context("scalar input")?;
            let rows_x = x.len() / k.max(1);
            let a = x.to_shape((rows_x, k))?.mapv(f64::from);
            let w2 = w.view().into_dimensionality::<ndarray::Ix2>()?;
            let wm = if trans_b {
                w2.t().mapv(f64::from)
            } else {
                w2.mapv(f64::from)
            };
            (
                Box::new(move |lo, hi| a.slice(s![lo.min(rows_x)..hi.min(rows_x), ..]).to_owned()),
                k,
                wm,
                k,
                rows_x,
            )
        }
        LayerKind::MatMul if w.ndim() == 2 => {
            let k = *x.shape().last().context("scalar input")?;
            let rows_x = x.len() / k.max(1);
            let a = x.to_shape((rows_x, k))?.mapv(f64::from);
            let wm = w
                .view()
                .into_dimensionality::<ndarray::Ix2>()?
                .mapv(f64::from);
            (
                Box::new(move |lo, hi| a.slice(s![lo.min(rows_x)..hi.min(rows_x), ..]).to_owned()),
                k,
                wm,
                k,
                rows_x,
            )
        }
        _ => return Ok(None),
    };
    if wmat.nrows() != d || d == 0 {
        bail!(
            "internal: weight rows {} vs design columns {d}",
            wmat.nrows()
        );
    }
    let o = wmat.ncols();
    let dd = d + usize::from(intercept);
    let mut wfull = Array2::<f64>::zeros((dd, o));
    wfull.slice_mut(s![..d, ..]).assign(&wmat);
    if intercept {
        if let Some(b) = &bias {
            for (j, v) in b.iter().enumerate().take(o) {
                wfull[[d, j]] = f64::from(*v);
            }
        }
    }
    let q = d / cin.max(1);
    // The refit only generalizes with enough rows per unknown (a Gemm after global pooling has
    // one row per calibration sample): with far fewer rows than unknowns the in-sample cost of
    // removal with refit is ~0 for almost any set, so the no-refit model is the honest one.
    // (Mildly under-determined systems keep the refit model: the ridge term and the held-out
    // choice in `reconstruct` keep such refits useful, e.g. digits_cnn's Gemm, 33 unknowns
    // from 32 rows.)
    let full = dd <= max_unknowns && dd <= MAX_UNKNOWNS_PER_ROW * n_rows;
    let chunk = 2048;
    let mut rows = 0usize;
    let mut g = if full {
        Array2::<f64>::zeros((dd, dd))
    } else {
        Array2::zeros((0, 0))
    };
    let mut diag: Vec<Array2<f64>> = if full {
        Vec::new()
    } else {
        vec![Array2::zeros((q, q)); cin]
    };
    let mut sums = vec![0.0f64; d];
    let mut lo = 0;
    loop {
        let a = rows_of(lo, lo + chunk);
        if a.nrows() == 0 {
            break;
        }
        rows += a.nrows();
        if full {
            let mut aa = Array2::<f64>::ones((a.nrows(), dd));
            aa.slice_mut(s![.., ..d]).assign(&a);
            super::solve::add_gram_lower(aa.view(), &mut g);
        } else {
            for (ch, dg) in diag.iter_mut().enumerate() {
                let blk = a.slice(s![.., ch * q..(ch + 1) * q]);
                *dg += &blk.t().dot(&blk);
            }
            for (j, col) in a.columns().into_iter().enumerate() {
                sums[j] += col.sum();
            }
        }
        lo += chunk;
    }
    if rows == 0 || energy <= 0.0 {
        return Ok(None);
    }
    let norm = 1.0 / (rows as f64 * energy);
    if full {
        super::solve::mirror_lower(&mut g);
        let trace: f64 = (0..dd).map(|i| g[[i, i]]).sum();
        let lambda = 1e-4 * trace / dd as f64 + 1e-12;
        for i in 0..dd {
            g[[i, i]] += lambda;
        }
        let Some(hinv) = spd_inverse(&g) else {
            bail!("input Gram matrix is not positive definite");
        };
        Ok(Some(Consumer {
            hinv: Some(hinv),
            diag_cost: Vec::new(),
            w: wfull,
            q,
            norm,
        }))
    } else {
        // Centered blocks: the bias fold absorbs a removed channel's mean (when there is a bias).
        let n = rows as f64;
        for (ch, blk) in diag.iter_mut().enumerate() {
            if intercept {
                for i in 0..q {
                    for j in 0..q {
                        blk[[i, j]] -= sums[ch * q + i] * sums[ch * q + j] / n;
                    }
                }
            }
        }
        let diag_cost = diag
            .iter()
            .enumerate()
            .map(|(ch, blk)| {
                let wb = wfull.slice(s![ch * q..(ch + 1) * q, ..]);
                (&blk.dot(&wb) * &wb).sum()
            })
            .collect();
        Ok(Some(Consumer {
            hinv: None,
            diag_cost,
            w: wfull,
            q,
            norm,
        }))
    }
}

/// Median of the measured sensitivities (1 when none was measured): for consumers whose
/// sensitivity run failed.
pub fn median(sens: &BTreeMap<NodeIndex, f64>) -> f64 {
    let mut v: Vec<f64> = sens.values().copied().collect();
    if v.is_empty() {
        return 1.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Cost curves of every prunable group (`None`: fall back to the old criterion, with a note).
/// `steps[g]` is how many channels group `g` may lose at most.
#[allow(clippy::too_many_arguments)]
pub fn curves(
    graph: &Graph,
    groups: &[Group],
    cal: &Calibration,
    steps: &[usize],
    max_rows: usize,
    max_unknowns: usize,
    sens: &BTreeMap<NodeIndex, f64>,
    notes: &mut Vec<String>,
) -> Result<Vec<Option<Curve>>> {
    let s_of = |n: NodeIndex| sens.get(&n).copied().unwrap_or_else(|| median(sens));
    let progress = crate::progress::Progress::bar("cost curves", groups.len() as u64);
    // Every consumer's model, built side by side (each from its own activations).
    let mut wanted: Vec<NodeIndex> = Vec::new();
    for g in groups.iter().filter(|g| g.prunable() && steps[g.id] > 0) {
        for m in &g.members {
            if let Member::Consumer { node, .. } = m {
                if !wanted.contains(node) {
                    wanted.push(*node);
                }
            }
        }
    }
    let built: Vec<Result<Option<Consumer>>> = wanted
        .par_iter()
        .map(|&node| {
            consumer_model(graph, node, cal, max_rows, max_unknowns).with_context(|| {
                format!(
                    "second-order model of {}",
                    super::groups::label(graph, node)
                )
            })
        })
        .collect();
    let mut cache: BTreeMap<NodeIndex, Option<Consumer>> = BTreeMap::new();
    for (node, c) in wanted.into_iter().zip(built) {
        cache.insert(node, c?);
    }
    // Each group's greedy removal works on its own copies: groups side by side.
    let per_group: Vec<(Option<Curve>, Option<String>)> = groups
        .par_iter()
        .map(|g| {
            let r = group_curve(g, steps[g.id], &cache, &s_of);
            progress.inc(1);
            r
        })
        .collect();
    let mut out = Vec::with_capacity(groups.len());
    for (curve, note) in per_group {
        notes.extend(note);
        out.push(curve);
    }
    Ok(out)
}

/// One group's cost curve from its consumers' models (`None` with a note when one is missing).
fn group_curve(
    g: &Group,
    steps: usize,
    cache: &BTreeMap<NodeIndex, Option<Consumer>>,
    s_of: &(dyn Fn(NodeIndex) -> f64 + Sync),
) -> (Option<Curve>, Option<String>) {
    if !g.prunable() || steps == 0 {
        return (None, None);
    }
    // (consumer node, offset in weight input channels)
    let mut cons: Vec<(NodeIndex, usize, usize)> = Vec::new();
    let mut ok = true;
    for m in &g.members {
        if let Member::Consumer {
            node,
            offset,
            block,
            ..
        } = m
        {
            if cache.get(node).is_none_or(Option::is_none) {
                ok = false;
            }
            cons.push((*node, *offset, *block));
        }
    }
    if !ok || cons.is_empty() {
        return (
            None,
            Some(format!(
                "group {}: no second-order model for its consumers, ranked by the combined criterion",
                g.id
            )),
        );
    }
    // Per-consumer state, cloned: this group's removals must not leak into other groups'.
    let mut states: Vec<(Consumer, usize, usize)> = cons
        .iter()
        .map(|&(n, off, blk)| {
            let c = cache[&n].as_ref().expect("checked");
            (
                Consumer {
                    hinv: c.hinv.clone(),
                    diag_cost: c.diag_cost.clone(),
                    w: c.w.clone(),
                    q: c.q,
                    norm: c.norm * s_of(n),
                },
                off,
                blk,
            )
        })
        .collect();
    let mut alive = vec![true; g.channels];
    let mut curve = Curve::default();
    // Weight input channels of group channel `c` at one consumer.
    let chans = |off: usize, blk: usize, c: usize| -> Vec<usize> {
        (0..blk).map(|k| (off + c) * blk + k).collect()
    };
    for _ in 0..steps {
        let mut best: Option<(f64, usize)> = None;
        for c in (0..g.channels).filter(|&c| alive[c]) {
            let cost: f64 = states
                .iter()
                .map(|(st, off, blk)| st.cost(&chans(*off, *blk, c)))
                .sum();
            if best.is_none_or(|(b, _)| cost < b) {
                best = Some((cost, c));
            }
        }
        let Some((cost, c)) = best else { break };
        alive[c] = false;
        curve.order.push(c);
        curve.step_cost.push(cost);
        for (st, off, blk) in &mut states {
            st.remove(&chans(*off, *blk, c));
        }
    }
    (Some(curve), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The greedy step's cost equals the least-squares residual of refitting the kept columns
    /// (brute force with the ridge term, through `reconstruct::ridge`-free normal equations).
    #[test]
    fn removal_cost_is_the_refit_residual() {
        let (m, d, o) = (200, 6, 3);
        let a = Array2::from_shape_fn((m, d), |(i, j)| {
            (((i * 7919 + j * 104729) % 1000) as f64 / 500.0 - 1.0)
                + 0.3 * (j as f64) * ((i % 5) as f64)
        });
        let w = Array2::from_shape_fn((d, o), |(i, j)| ((i * 3 + j * 5) % 7) as f64 - 3.0);
        let g = a.t().dot(&a);
        let h = spd_inverse(&g).unwrap();
        let id = g.dot(&h);
        for i in 0..d {
            for j in 0..d {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (id[[i, j]] - want).abs() < 1e-8,
                    "G H != I at {i},{j}: {}",
                    id[[i, j]]
                );
            }
        }
        let mut c = Consumer {
            hinv: Some(h),
            diag_cost: vec![],
            w: w.clone(),
            q: 1,
            norm: 1.0,
        };
        let y = a.dot(&w);
        // Remove column 2, then 4: each step's cost is the increase of the refit residual.
        let resid = |keep: &[usize]| {
            let ak = a.select(Axis(1), keep);
            let gk = ak.t().dot(&ak);
            let x = spd_inverse(&gk).unwrap().dot(&ak.t().dot(&y));
            (&ak.dot(&x) - &y).mapv(|v| v * v).sum()
        };
        let c1 = c.cost(&[2]);
        let r1 = resid(&[0, 1, 3, 4, 5]);
        assert!((c1 - r1).abs() < 1e-6 * r1.max(1.0), "{c1} vs {r1}");
        c.remove(&[2]);
        let c2 = c.cost(&[4]);
        let r2 = resid(&[0, 1, 3, 5]) - r1;
        assert!((c2 - r2).abs() < 1e-6 * r2.max(1.0), "{c2} vs {r2}");
    }
}
