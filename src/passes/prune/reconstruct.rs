//! Reconstruction without training: refit the consumers that lost input channels.
//!
//! For a consumer `y = W x + b` (Conv via im2col patches, Gemm, MatMul) whose inputs lost
//! channels, with calibration inputs run through the **original** model (targets `Y`, the
//! original consumer outputs on the kept output channels) and through the **pruned** model
//! (design rows `A`, the consumer's actual new inputs, so upstream changes are accounted for):
//!
//! `[W' b'] = argmin ||[A 1] [W' b']^T - Y||^2 + lambda ||.||^2`, `lambda = 1e-3 trace(G)/d`
//! with `G = [A 1]^T [A 1]` (ridge, He et al. 2017 / ThiNet style, solved by blocked Cholesky in
//! f64, `solve`).
//!
//! Candidates, judged on held-out rows (every 5th row is kept out of the fit):
//! - `plain`: the sliced weights as they are;
//! - `bias`: removed channels replaced by their mean, folded into the bias:
//!   `b'_o = b_o + sum_{c removed} mean(a_c) * sum_k W[o, c, k]` (for a conv the sum runs
//!   over the kernel; exact except at borders where zero padding means the removed channel
//!   contributed 0, not its mean: an approximation);
//! - `least_squares`: the ridge fit.
//!
//! `Reconstruct::LeastSquares` keeps whichever of `bias` and `least_squares` has the lower
//! held-out error (so an ill-conditioned or over-fitted system falls back, and the report says
//! so); `Reconstruct::Bias` uses `bias`. MatMul has no bias: no intercept, no `bias` fold.
//! Consumers with more unknowns than `max_ls_unknowns` fall back to `bias`; non-2-D convs,
//! `auto_pad = SAME_*` and ConvTranspose consumers are not reconstructed (plain removal, noted).
//! Reconstruction is sequential in topological order; each consumer's input comes from
//! `segments::Forward`, which runs every node of the pruned model once over the whole refit.

pub use super::batches::run_batched;
use super::groups::{Group, Member};
use super::importance::AxisStats;
use super::segments::Forward;
use super::{Applied, PruneOptions, Reconstruct};
use crate::calibrate::gram::{conv_patches, positions, ConvWindow};
use crate::ir::layer::{Layer, LayerKind};
use crate::ir::op::{self, Attrs};
use crate::ir::{Graph, Model, Patch};
use crate::onnx::proto::ModelProto;
use crate::onnx::tensor;
use crate::runtime::Feed;
use anyhow::{bail, Context, Result};
use ndarray::{s, Array1, Array2, ArrayD, Axis, IxDyn};
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Original-model activations on the calibration batch.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub inputs: Vec<(String, Feed)>,
    /// Moments along the channel axis of every consumer input, by value name.
    pub stats: HashMap<String, AxisStats>,
    /// Consumer inputs and outputs, by value name.
    pub acts: HashMap<String, ArrayD<f32>>,
    /// Mean over positions of `sum_o y_o^2` for every consumer output, by value name.
    pub out_energy: HashMap<String, f64>,
    /// The graph outputs, by name (the sensitivity runs' reference).
    pub outputs: Vec<(String, ArrayD<f32>)>,
}

/// Channel axis of a consumer's input (Conv: 1, Gemm/MatMul: last).
fn in_channel_axis(op: &str, rank: usize) -> usize {
    match op {
        "Conv" | "ConvTranspose" => 1,
        _ => rank.saturating_sub(1),
    }
}

impl Calibration {
    /// Run the original model once, exposing every consumer input and output of the
    /// prunable groups, and the values named in `also` (kept in `acts`).
    pub fn collect(
        original: &ModelProto,
        graph: &Graph,
        groups: &[Group],
        inputs: &[(String, Feed)],
        also: &BTreeSet<String>,
    ) -> Result<Calibration> {
        let input_names: std::collections::HashSet<&str> =
            inputs.iter().map(|(n, _)| n.as_str()).collect();
        let mut names: BTreeSet<String> = also
            .iter()
            .filter(|n| !input_names.contains(n.as_str()))
            .cloned()
            .collect();
        let mut consumer_inputs = BTreeMap::new();
        let mut consumer_outputs = BTreeMap::new();
        for g in groups.iter().filter(|g| g.prunable()) {
            for m in &g.members {
                if let Member::Consumer { node, input, .. } = m {
                    names.insert(input.clone());
                    consumer_inputs.insert(input.clone(), graph.node(*node).op_type().to_string());
                    if let Some(o) = graph.node(*node).output.first() {
                        names.insert(o.clone());
                        consumer_outputs.insert(o.clone(), graph.node(*node).op_type().to_string());
                    }
                }
            }
        }
        let outputs: std::collections::HashSet<&str> =
            graph.outputs.iter().map(|o| o.name()).collect();
        let extra: Vec<String> = names
            .iter()
            .filter(|n| !outputs.contains(n.as_str()))
            .cloned()
            .collect();
        let run = run_batched(original, inputs, &extra)
            .context("running the original model on the calibration data")?;
        let graph_outputs: Vec<(String, ArrayD<f32>)> = run
            .iter()
            .filter(|(n, _)| outputs.contains(n.as_str()))
            .cloned()
            .collect();
        let acts: HashMap<String, ArrayD<f32>> =
            run.into_iter().filter(|(n, _)| names.contains(n)).collect();
        let mut stats = HashMap::new();
        let mut out_energy = HashMap::new();
        for (name, op) in &consumer_outputs {
            if let Some(a) = acts.get(name) {
                let axis = in_channel_axis(op, a.ndim());
                let c = a.shape().get(axis).copied().unwrap_or(1).max(1);
                let positions = (a.len() / c).max(1) as f64;
                let e: f64 = a.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
                out_energy.insert(name.clone(), e / positions);
            }
        }
        for (name, op) in &consumer_inputs {
            if let Some(a) = acts.get(name) {
                let axis = in_channel_axis(op, a.ndim());
                // Gemm/MatMul inputs: moments per feature over the leading axes.
                stats.insert(name.clone(), AxisStats::of(a, axis));
            }
        }
        Ok(Calibration {
            inputs: inputs.to_vec(),
            stats,
            acts,
            out_energy,
            outputs: graph_outputs,
        })
    }
}

/// What happened to one consumer.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub method: &'static str,
    /// Held-out relative output error `||y' - y|| / ||y||` of the chosen weights.
    pub rel_error: f64,
    /// Same for plain removal.
    pub rel_error_plain: f64,
}

/// `(AᵀA, AᵀY)` accumulated over blocks of rows computed in parallel and summed in block
/// order (the same sums whatever the thread count).
fn normal_equations(a: &Array2<f64>, y: &Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    use rayon::prelude::*;
    const ROWS: usize = 1024;
    let m = a.nrows();
    let blocks: Vec<(Array2<f64>, Array2<f64>)> = (0..m.div_ceil(ROWS))
        .into_par_iter()
        .map(|b| {
            let r = b * ROWS..((b + 1) * ROWS).min(m);
            let ab = a.slice(s![r.clone(), ..]);
            let yb = y.slice(s![r, ..]);
            // The lower block triangle only (half the work), mirrored after the sum.
            let mut gb = Array2::<f64>::zeros((a.ncols(), a.ncols()));
            super::solve::add_gram_lower(ab, &mut gb);
            (gb, ab.t().dot(&yb))
        })
        .collect();
    let mut g = Array2::<f64>::zeros((a.ncols(), a.ncols()));
    let mut rhs = Array2::<f64>::zeros((a.ncols(), y.ncols()));
    for (gb, rb) in blocks {
        g += &gb;
        rhs += &rb;
    }
    super::solve::mirror_lower(&mut g);
    (g, rhs)
}

/// Ridge least squares with optional intercept: returns `(W [d x o], b [o])`.
pub fn ridge(
    a: &Array2<f64>,
    y: &Array2<f64>,
    intercept: bool,
) -> Option<(Array2<f64>, Array1<f64>)> {
    let (m, d) = a.dim();
    let cols = d + usize::from(intercept);
    let mut aa = Array2::<f64>::ones((m, cols));
    aa.slice_mut(s![.., ..d]).assign(a);
    let (mut g, rhs) = normal_equations(&aa, y);
    let trace: f64 = (0..cols).map(|i| g[[i, i]]).sum();
    let lambda = 1e-3 * trace / cols as f64 + 1e-12;
    for i in 0..cols {
        g[[i, i]] += lambda;
    }
    let x = super::solve::cholesky_solve_blocked(g, rhs)?;
    let w = x.slice(s![..d, ..]).to_owned();
    let b = if intercept {
        x.row(d).to_owned()
    } else {
        Array1::zeros(y.ncols())
    };
    Some((w, b))
}

fn rel_err(a: &Array2<f64>, w: &Array2<f64>, b: &Array1<f64>, y: &Array2<f64>) -> f64 {
    let pred = a.dot(w) + b;
    let e: f64 = (&pred - y).iter().map(|v| v * v).sum();
    let n: f64 = y.iter().map(|v| v * v).sum();
    if n > 0.0 {
        (e / n).sqrt()
    } else {
        e.sqrt()
    }
}

pub(super) struct Conv2d {
    pub(super) kh: usize,
    pub(super) kw: usize,
    strides: [usize; 2],
    pads: [usize; 2],
    dil: [usize; 2],
}

pub(super) fn conv2d_attrs(
    node: &crate::onnx::proto::NodeProto,
    wshape: &[usize],
) -> Option<Conv2d> {
    if wshape.len() != 4 {
        return None;
    }
    let auto = node
        .attr_string("auto_pad")
        .ok()
        .flatten()
        .unwrap_or_default();
    if !(auto.is_empty() || auto == "NOTSET" || auto == "VALID") {
        return None;
    }
    let ints = |n: &str, d: Vec<i64>| node.attr_ints(n).ok().flatten().unwrap_or(d);
    let st = ints("strides", vec![1, 1]);
    let pd = ints("pads", vec![0, 0, 0, 0]);
    let dl = ints("dilations", vec![1, 1]);
    if st.len() != 2
        || pd.len() != 4
        || dl.len() != 2
        || pd.iter().chain(&st).chain(&dl).any(|&v| v < 0)
    {
        return None;
    }
    Some(Conv2d {
        kh: wshape[2],
        kw: wshape[3],
        strides: [st[0] as usize, st[1] as usize],
        pads: [pd[0] as usize, pd[1] as usize],
        dil: [dl[0] as usize, dl[1] as usize],
    })
}

pub(super) fn im2col(x: &ArrayD<f32>, c: &Conv2d, pos: &[(usize, usize, usize)]) -> Array2<f64> {
    let x4 = x
        .view()
        .into_dimensionality::<ndarray::Ix4>()
        .expect("conv2d_attrs admits rank-4 weights only, so inputs are NCHW");
    let window = ConvWindow {
        kernel: [c.kh, c.kw],
        strides: c.strides,
        pads: c.pads,
        dil: c.dil,
    };
    conv_patches(x4, &window, 0..x.shape()[1], pos)
}

/// Sampled rows for a conv consumer with `d` design columns: 8 per unknown up to 4096 rows,
/// then 4 per unknown (at least 4096), at most `max_rows`, at least 256. The Gram matrix costs
/// `rows · d²`: wide consumers (DenseNet's 1x1 convs over 1000 channels, ResNet's 3x3 convs over
/// 128-256) would otherwise dominate the pass, and 4 rows per unknown with the ridge term and
/// the held-out check still fit well.
pub(super) fn design_rows(d: usize, max_rows: usize) -> usize {
    max_rows
        .min(8 * (d + 1))
        .min((4 * (d + 1)).max(4096))
        .max(256)
}

fn complement(n: usize, removed: &[usize]) -> Vec<usize> {
    (0..n)
        .filter(|i| removed.binary_search(i).is_err())
        .collect()
}

/// Write a node's constant input (in place when only this node reads it, else under a fresh
/// name), or add it as a new input at `slot`.
fn set_input_tensor(
    graph: &mut Graph,
    ix: NodeIndex,
    slot: usize,
    base: &str,
    a: &ArrayD<f32>,
) -> Result<()> {
    let node = graph.node(ix).clone();
    let current = node.input.get(slot).filter(|s| !s.is_empty()).cloned();
    if let Some(name) = &current {
        if graph.consumers(name).len() == 1
            && !graph.is_graph_output(name)
            && !graph.is_graph_input(name)
        {
            return graph.apply(Patch {
                initializers: vec![tensor::from_f32(name, a)],
                ..Default::default()
            });
        }
    }
    let name = graph.fresh_name(base);
    graph.apply(Patch {
        initializers: vec![tensor::from_f32(&name, a)],
        ..Default::default()
    })?;
    let mut proto = node;
    while proto.input.len() <= slot {
        proto.input.push(String::new());
    }
    proto.input[slot] = name;
    graph.replace_node(ix, proto)
}

/// Refit every consumer that lost input channels (see the module docs).
pub fn reconstruct(
    before: &Graph,
    model: &mut Model,
    applied: &Applied,
    cal: &Calibration,
    opts: &PruneOptions,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<NodeIndex, Outcome>> {
    // Sequential, in topological order: each consumer is fit on the inputs the pruned model
    // produces *after* the upstream consumers were refit. `segments::Forward` runs each node
    // once for all of them; where it cannot (a value of unknown type, a part tract refuses),
    // the whole pruned model runs for that consumer, as it used to.
    let order: Vec<NodeIndex> = model
        .graph
        .topo_order()?
        .into_iter()
        .filter(|ix| applied.consumers.contains_key(ix))
        .collect();
    let elem: HashMap<String, i32> = {
        let shapes: Vec<(String, Vec<usize>)> = cal
            .inputs
            .iter()
            .map(|(n, a)| (n.clone(), a.shape().to_vec()))
            .collect();
        crate::runtime::infer_value_shapes(&model.to_proto()?, &shapes)
            .map(|v| {
                v.into_iter()
                    .filter_map(|v| v.elem_type.map(|t| (v.name, t as i32)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let chunk = super::batches::chunk_size(&model.to_proto()?, &cal.inputs);
    let mut forward = Forward::new(&cal.inputs, elem, chunk);
    let mut whole_runs = 0usize;
    let progress = crate::progress::Progress::bar("refitting", order.len() as u64);
    let mut out = BTreeMap::new();
    for ix in order {
        progress.inc(1);
        let (_, removed_in) = &applied.consumers[&ix];
        let label = super::groups::label(before, ix);
        let x_name = model.graph.node(ix).input[0].clone();
        let x = match forward.value(model, &x_name) {
            Ok(x) => x,
            Err(_) => {
                whole_runs += 1;
                let pruned = model.to_proto()?;
                let extra: Vec<String> = if model.graph.is_graph_output(&x_name) {
                    vec![]
                } else {
                    vec![x_name.clone()]
                };
                let run = run_batched(&pruned, &cal.inputs, &extra)
                    .context("running the pruned model on the calibration data")?;
                run.into_iter()
                    .find(|(n, _)| *n == x_name)
                    .map(|(_, a)| a)
                    .context("the pruned model did not compute the consumer input")?
            }
        };
        let xp: HashMap<String, ArrayD<f32>> = HashMap::from([(x_name.clone(), x)]);
        match refit(before, model, ix, removed_in, applied, cal, &xp, opts) {
            Ok(Some(o)) => {
                out.insert(ix, o);
            }
            Ok(None) => notes.push(format!(
                "{label}: not reconstructed (unsupported layer form)"
            )),
            Err(e) => notes.push(format!("{label}: not reconstructed: {e:#}")),
        }
    }
    if whole_runs > 0 {
        notes.push(format!(
            "reconstruction: {whole_runs} consumer input(s) computed by running the whole pruned model (not by parts)"
        ));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn refit(
    before: &Graph,
    model: &mut Model,
    ix: NodeIndex,
    removed_in: &[usize],
    applied: &Applied,
    cal: &Calibration,
    xp: &HashMap<String, ArrayD<f32>>,
    opts: &PruneOptions,
) -> Result<Option<Outcome>> {
    let orig = Layer::of(before, ix).context("original layer")?;
    let now = Layer::of(&model.graph, ix).context("pruned layer")?;
    let node = before.node(ix).clone();
    let x_name = &node.input[0];
    let y_name = node.output.first().context("no output")?;
    let yo = cal
        .acts
        .get(y_name)
        .context("no original output activation")?;
    let xpr = xp.get(x_name).context("no pruned input activation")?;
    let w_orig = orig.weight_f32(before)?;
    let w_now = now.weight_f32(&model.graph)?;
    let b_now = now.bias_f32(&model.graph)?;
    let out_orig = orig.out_channels();
    let removed_out = applied
        .producers
        .get(&ix)
        .map(|(_, r)| r.as_slice())
        .unwrap_or(&[]);
    let kept_out = complement(out_orig, removed_out);
    let o = kept_out.len();
    let stats = cal.stats.get(x_name).context("no input moments")?;
    let intercept = match orig.kind {
        LayerKind::MatMul => false,
        LayerKind::Gemm { .. } => {
            now.bias.is_some() || node.attr_float("beta").ok().flatten().unwrap_or(1.0) == 1.0
        }
        _ => true,
    };
    // Design rows A (pruned inputs), targets Y (original outputs, kept channels), current
    // weights as a [d x o] matrix, and the bias-fold delta.
    let (a, y, w0, delta): (Array2<f64>, Array2<f64>, Array2<f64>, Array1<f64>) = match orig.kind {
        LayerKind::Conv { group: 1 } => {
            let Some(c) = conv2d_attrs(&node, &orig.weight_shape) else {
                return Ok(None);
            };
            if xpr.ndim() != 4 || yo.ndim() != 4 {
                return Ok(None);
            }
            let (n, oh, ow) = (yo.shape()[0], yo.shape()[2], yo.shape()[3]);
            let cin = xpr.shape()[1];
            let d = cin * c.kh * c.kw;
            let rows = design_rows(d, opts.max_ls_rows);
            let pos = positions(n, oh, ow, rows);
            let a = im2col(xpr, &c, &pos);
            let mut y = Array2::<f64>::zeros((pos.len(), o));
            for (r, &(ni, oy, ox)) in pos.iter().enumerate() {
                for (j, &oc) in kept_out.iter().enumerate() {
                    y[[r, j]] = f64::from(yo[[ni, oc, oy, ox]]);
                }
            }
            let w0 = w_now
                .to_shape((o, d))
                .context("conv weight")?
                .t()
                .mapv(f64::from);
            let mut delta = Array1::<f64>::zeros(o);
            for &ci in removed_in {
                let m = stats.mean.get(ci).copied().unwrap_or(0.0);
                for (j, &oc) in kept_out.iter().enumerate() {
                    let s: f64 = w_orig
                        .slice(s![oc, ci, .., ..])
                        .iter()
                        .map(|&v| f64::from(v))
                        .sum();
                    delta[j] += m * s;
                }
            }
            (a, y, w0, delta)
        }
        LayerKind::Gemm { .. } | LayerKind::MatMul => {
            let k = *xpr.shape().last().context("scalar input")?;
            let rows_x = xpr.len() / k.max(1);
            let a = xpr
                .to_shape((rows_x, k))
                .context("flattening input rows")?
                .mapv(f64::from);
            let yo2 = yo
                .to_shape((rows_x, out_orig))
                .context("flattening output rows")?;
            let y = yo2.select(Axis(1), &kept_out).mapv(f64::from);
            let w_now2 = w_now.view().into_dimensionality::<ndarray::Ix2>()?;
            let w_orig2 = w_orig.view().into_dimensionality::<ndarray::Ix2>()?;
            let trans = matches!(orig.kind, LayerKind::Gemm { trans_b: true });
            let w0 = if trans {
                w_now2.t().mapv(f64::from)
            } else {
                w_now2.mapv(f64::from)
            };
            let wo = if trans {
                w_orig2.t().to_owned()
            } else {
                w_orig2.to_owned()
            };
            let mut delta = Array1::<f64>::zeros(o);
            for &ci in removed_in {
                let m = stats.mean.get(ci).copied().unwrap_or(0.0);
                for (j, &oc) in kept_out.iter().enumerate() {
                    delta[j] += m * f64::from(wo[[ci, oc]]);
                }
            }
            (a, y, w0, delta)
        }
        _ => return Ok(None),
    };
    if a.ncols() != w0.nrows() || y.ncols() != o {
        bail!(
            "internal: shapes disagree (design {:?}, weight {:?})",
            a.dim(),
            w0.dim()
        );
    }
    let b0: Array1<f64> = match &b_now {
        Some(b) => b.iter().map(|&v| f64::from(v)).collect(),
        None => Array1::zeros(o),
    };
    // Train / held-out split: every 5th row held out.
    let m = a.nrows();
    let val: Vec<usize> = (0..m).filter(|r| r % 5 == 4).collect();
    let train: Vec<usize> = (0..m).filter(|r| r % 5 != 4).collect();
    let (av, yv) = (a.select(Axis(0), &val), y.select(Axis(0), &val));
    let e_plain = rel_err(&av, &w0, &b0, &yv);
    let b_fold = &b0 + &delta;
    let e_fold = if intercept {
        rel_err(&av, &w0, &b_fold, &yv)
    } else {
        e_plain
    };
    let mut best: (&'static str, Array2<f64>, Array1<f64>, f64) = if intercept {
        ("bias", w0.clone(), b_fold, e_fold)
    } else {
        ("plain", w0.clone(), b0.clone(), e_plain)
    };
    if opts.reconstruct == Reconstruct::LeastSquares {
        if a.ncols() + 1 > opts.max_ls_unknowns {
            best.0 = if intercept {
                "bias (too many unknowns for least squares)"
            } else {
                "plain (too many unknowns)"
            };
        } else if train.len() < 2 {
            best.0 = "bias (too few calibration rows)";
        } else {
            let (at, yt) = (a.select(Axis(0), &train), y.select(Axis(0), &train));
            match ridge(&at, &yt, intercept) {
                Some((w, b)) => {
                    let e = rel_err(&av, &w, &b, &yv);
                    if e < best.3 {
                        best = ("least_squares", w, b, e);
                    } else {
                        best.0 = if intercept {
                            "bias (least squares not better on held-out rows)"
                        } else {
                            "plain (least squares not better on held-out rows)"
                        };
                    }
                }
                None => {
                    best.0 = if intercept {
                        "bias (ill-conditioned)"
                    } else {
                        "plain (ill-conditioned)"
                    }
                }
            }
        }
    }
    let (method, w, b, e) = best;
    // Write back.
    let wt: ArrayD<f32> = match orig.kind {
        LayerKind::Conv { .. } => {
            let shape = w_now.shape().to_vec();
            w.t().mapv(|v| v as f32).into_shape_clone(IxDyn(&shape))?
        }
        LayerKind::Gemm { trans_b: true } => w.t().mapv(|v| v as f32).into_dyn(),
        _ => w.mapv(|v| v as f32).into_dyn(),
    };
    let wname = model.graph.node(ix).input[1].clone();
    set_input_tensor(&mut model.graph, ix, 1, &wname, &wt)?;
    if intercept {
        let bt = b.mapv(|v| v as f32).into_dyn();
        let base = format!("{}_bias", model.graph.node(ix).input[1]);
        if matches!(orig.kind, LayerKind::Gemm { .. }) && now.bias.is_none() {
            let mut p = model.graph.node(ix).clone();
            op::set_attr(&mut p, op::attr_float("beta", 1.0));
            model.graph.replace_node(ix, p)?;
        }
        set_input_tensor(&mut model.graph, ix, 2, &base, &bt)?;
    }
    Ok(Some(Outcome {
        method,
        rel_error: e,
        rel_error_plain: e_plain,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_map() {
        // y = A W + b exactly; the tiny ridge term must not move the solution visibly.
        let a = Array2::from_shape_fn((64, 3), |(i, j)| ((i * 7 + j * 3) % 11) as f64 - 5.0);
        let w = Array2::from_shape_vec((3, 2), vec![1.0, -2.0, 0.5, 0.0, 3.0, 1.5]).unwrap();
        let b = Array1::from(vec![0.25, -1.0]);
        let y = a.dot(&w) + &b;
        let (w2, b2) = ridge(&a, &y, true).unwrap();
        assert!((&w2 - &w).iter().all(|d| d.abs() < 1e-2), "{w2}");
        assert!((&b2 - &b).iter().all(|d| d.abs() < 5e-2), "{b2}");
        // lambda = 1e-3 trace(G)/d shrinks the fit slightly: well under 1% relative error.
        assert!(rel_err(&a, &w2, &b2, &y) < 1e-2);
    }

    #[test]
    fn im2col_matches_a_direct_convolution() {
        let x = ArrayD::from_shape_fn(IxDyn(&[1, 2, 4, 4]), |ix| {
            (ix[1] * 16 + ix[2] * 4 + ix[3]) as f32 * 0.1
        });
        let c = Conv2d {
            kh: 3,
            kw: 3,
            strides: [2, 2],
            pads: [1, 1],
            dil: [1, 1],
        };
        let wt: Vec<f64> = (0..18).map(|i| (i as f64 - 9.0) * 0.05).collect();
        let pos = positions(1, 2, 2, 100);
        let a = im2col(&x, &c, &pos);
        let got = a.dot(&Array1::from(wt.clone()));
        for (r, &(_, oy, ox)) in pos.iter().enumerate() {
            let mut want = 0.0;
            for ci in 0..2 {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let iy = (oy * 2 + ky) as isize - 1;
                        let ix = (ox * 2 + kx) as isize - 1;
                        if (0..4).contains(&iy) && (0..4).contains(&ix) {
                            want += f64::from(x[[0, ci, iy as usize, ix as usize]])
                                * wt[(ci * 3 + ky) * 3 + kx];
                        }
                    }
                }
            }
            assert!((got[r] - want).abs() < 1e-9);
        }
    }
}
