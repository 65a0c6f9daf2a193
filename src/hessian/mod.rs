//! Per-layer Hessian traces of a label-free loss, by Hutchinson's estimator over forward passes.
//!
//! **Loss.** At the fp32 weights `w0` the model is compared with *itself*: for calibration inputs
//! `x`, `L(w) = mean_x ℓ(f(w0; x), f(w; x))` with, per output,
//! - `Kl`: `KL(softmax(f(w0)) || softmax(f(w)))` per row of an `[N, C]` logits output,
//! - `Mse`: `½ ‖f(w) − f(w0)‖²` per row (leading dimension),
//!
//! summed over outputs (`Auto`: KL for `[N, C>1]` outputs not produced by a Softmax/LogSoftmax,
//! MSE otherwise). `L(w0) = 0` and `∇L(w0) = 0`, so the Hessian at `w0` is the generalized
//! Gauss–Newton matrix `G = Jᵀ F J` (`F = I` for MSE, `F = diag(p) − ppᵀ` for KL).
//!
//! **Second difference.** Expanding along a direction `v`: `L(w0 ± εv) = ½ ε² vᵀGv ± O(ε³)`,
//! so `vᵀGv = (L(w0 + εv) + L(w0 − εv)) / ε² + O(ε²)` (the odd terms cancel). KL is evaluated as
//! `log Σ p0 e^{δz} − Σ p0 δz` with `δz = z − z0` in f64 (`ln_1p`/`exp_m1`), so the O(ε²)
//! value is not lost to cancellation. `ε = rel_eps · ‖w0‖ / √n`: the step is the same fraction
//! of the layer's RMS weight for every layer.
//!
//! **Hutchinson.** `Tr(G) = E[vᵀGv]` for Rademacher `v` (ChaCha8 seeded from `seed` and the
//! weight name: deterministic, independent of layer order and threads). Samples are drawn until
//! the standard error of the mean is at most `rel_tol · |mean|` (after `min_samples`) or
//! `max_samples` is reached.
//!
//! **Cost.** One run of the full model (all calibration batches) computes every layer's inputs.
//! Each layer then gets a sub-model: the nodes downstream of its weight, with the values they
//! read from upstream (layer input, residual branches, ...) and the weight itself as graph
//! inputs. tract optimizes that plan once; every probe feeds a perturbed weight and costs one
//! run of the downstream part only.
//!
//! **Responses.** [`sensitivity_with`] also runs each layer's sub-model with given candidate
//! weights (e.g. the weight quantized to int8 and int4) and keeps, per candidate, the output
//! change `δz` whitened by the loss's output Hessian `F`: `ũ = F^½ δz / √N` over all `N` rows
//! (KL rows: `ũ_j = √p0_j (δz_j − Σ_k p0_k δz_k)`, since `F = diag(p0) − p0p0ᵀ`; MSE: `ũ = δz`).
//! Then `½‖ũ‖²` is the second-order loss of that one change, and `½‖Σ_l ũ_l‖²` the loss of
//! several layers changed together, cross-layer terms `ũ_lᵀũ_m` included (the network's
//! response linearized per layer, the loss kept to second order). Responses longer than
//! [`response_dim`] values are count-sketched to that length (one fixed hash and sign per
//! position, the same for every layer and candidate), which keeps inner products unbiased with a
//! relative error of about `√(2 / dim)`; the length shrinks with the layer count (32768 up to
//! ~180 layers, never below 4096) so the selection's Gram matrix stays cheap.

use crate::ir::graph::{free_names, subgraphs};
use crate::ir::layer::Layer;
use crate::ir::{Graph, Model};
use crate::onnx::proto::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, GraphProto, ModelProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::runtime::{infer_value_shapes, Runner};
use anyhow::{bail, ensure, Context, Result};
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

/// How outputs are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// KL for `[N, C>1]` logits (not produced by Softmax/LogSoftmax), MSE otherwise.
    #[default]
    Auto,
    Kl,
    Mse,
}

#[derive(Debug, Clone)]
pub struct HessianOptions {
    pub loss: Loss,
    /// Probe step as a fraction of the layer's RMS weight.
    pub rel_eps: f64,
    /// Stop when the standard error is at most this fraction of |mean|.
    pub rel_tol: f64,
    pub min_samples: usize,
    pub max_samples: usize,
    pub seed: u64,
    /// Estimate layers in parallel (rayon).
    pub parallel: bool,
}

impl Default for HessianOptions {
    fn default() -> Self {
        HessianOptions {
            loss: Loss::Auto,
            rel_eps: 1e-3,
            rel_tol: 1e-2,
            min_samples: 4,
            max_samples: 64,
            seed: 0,
            parallel: true,
        }
    }
}

/// A Hutchinson estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TraceEstimate {
    pub mean: f64,
    pub stderr: f64,
    pub samples: usize,
}

/// The sensitivity of one weighted layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSensitivity {
    pub node: String,
    pub op_type: String,
    pub weight: String,
    pub weight_shape: Vec<usize>,
    /// Weight output-channel axis (per-channel quantization axis).
    pub out_axis: usize,
    /// Weight input-channel axis (the block axis of block-wise quantization).
    pub in_axis: usize,
    pub params: usize,
    /// `Tr(G)` of the label-free loss w.r.t. this weight.
    pub hessian_trace: f64,
    pub hessian_trace_stderr: f64,
    /// `Tr(G) / params`.
    pub trace_per_param: f64,
    pub samples: usize,
    /// Absolute probe step used.
    pub eps: f64,
    pub seconds: f64,
    /// Whitened output responses `ũ`, one per candidate weight (see the module docs).
    #[serde(skip)]
    pub responses: Vec<Vec<f32>>,
}

/// Longest response kept exactly for a model with `layers` weighted layers (longer ones are
/// count-sketched to this length): at most 2^30 multiply-adds for a Gram matrix over three
/// candidates per layer, within 4096..=32768.
pub fn response_dim(layers: usize) -> usize {
    let pairs = (3 * layers.max(1)).pow(2);
    ((1usize << 30) / pairs).clamp(1 << 12, 1 << 15)
}

/// Candidate weights whose output responses [`sensitivity_with`] records, per layer.
pub type Candidates<'a> = dyn Fn(&Layer, &ArrayD<f32>) -> Vec<ArrayD<f32>> + Sync + 'a;

/// Position and sign of element `i` of a response in its count sketch.
fn sketch_slot(i: u64, dim: usize) -> (usize, f32) {
    // splitmix64: a fixed function of the position, so every response shares the sketch.
    let mut z = i.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    ((z >> 1) as usize % dim, if z & 1 == 0 { 1.0 } else { -1.0 })
}

/// Where each (batch, graph output) starts in a response, so that every layer's response lives
/// in the same space even when a layer reaches only some outputs; and the rows `N`.
struct ResponseLayout {
    offsets: Vec<Vec<usize>>,
    total: usize,
    rows: usize,
    /// Sketch length ([`response_dim`]).
    dim: usize,
}

impl ResponseLayout {
    /// From the full model's outputs per batch (graph outputs, in order).
    fn new(outputs: &[Vec<&ArrayD<f32>>], dim: usize) -> ResponseLayout {
        let mut offsets = Vec::with_capacity(outputs.len());
        let (mut total, mut rows_total) = (0, 0);
        for batch in outputs {
            let mut at = Vec::with_capacity(batch.len());
            for a in batch {
                at.push(total);
                total += a.len();
            }
            offsets.push(at);
            rows_total += batch.first().map_or(1, |a| rows(a));
        }
        ResponseLayout {
            offsets,
            total,
            rows: rows_total,
            dim,
        }
    }
}

/// `ũ` of one candidate (see the module docs): `refs` and `outs` per batch, per output of `sub`.
fn response(
    layout: &ResponseLayout,
    sub: &SubModel,
    refs: &[Vec<ArrayD<f32>>],
    outs: &[Vec<ArrayD<f32>>],
) -> Vec<f32> {
    let sketched = layout.total > layout.dim;
    let mut u = vec![0f64; layout.total.min(layout.dim)];
    let norm = 1.0 / (layout.rows.max(1) as f64).sqrt();
    let mut put = |i: usize, v: f64| {
        if sketched {
            let (slot, sign) = sketch_slot(i as u64, layout.dim);
            u[slot] += sign as f64 * v;
        } else {
            u[i] = v;
        }
    };
    for ((r, o), offsets) in refs.iter().zip(outs).zip(&layout.offsets) {
        for (k, (a, b)) in r.iter().zip(o).enumerate() {
            let mut i = offsets[sub.outputs[k]];
            if sub.kl[k] && a.ndim() == 2 {
                for (ra, rb) in a.outer_iter().zip(b.outer_iter()) {
                    let p0 = softmax(ra.iter());
                    let dz: Vec<f64> = ra
                        .iter()
                        .zip(rb.iter())
                        .map(|(&z0, &z)| z as f64 - z0 as f64)
                        .collect();
                    let mean: f64 = p0.iter().zip(&dz).map(|(p, d)| p * d).sum();
                    for (p, d) in p0.iter().zip(&dz) {
                        put(i, p.sqrt() * (d - mean) * norm);
                        i += 1;
                    }
                }
            } else {
                for (&z0, &z) in a.iter().zip(b.iter()) {
                    put(i, (z as f64 - z0 as f64) * norm);
                    i += 1;
                }
            }
        }
    }
    u.into_iter().map(|v| v as f32).collect()
}

/// `softmax(z)` in f64.
fn softmax<'a>(z: impl Iterator<Item = &'a f32> + Clone) -> Vec<f64> {
    let m = z.clone().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = z.map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Hutchinson's estimator: `quad(v)` returns `vᵀHv` for a Rademacher `v` of length `n`.
pub fn hutchinson<F>(
    n: usize,
    seed: u64,
    opts: &HessianOptions,
    mut quad: F,
) -> Result<TraceEstimate>
where
    F: FnMut(&[f32]) -> Result<f64>,
{
    ensure!(opts.max_samples >= 1, "max_samples must be at least 1");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut sum, mut sum2) = (0f64, 0f64);
    let mut v = vec![0f32; n];
    let mut k = 0usize;
    loop {
        for x in v.iter_mut() {
            *x = if rng.random::<bool>() { 1.0 } else { -1.0 };
        }
        let q = quad(&v)?;
        ensure!(
            q.is_finite(),
            "a Hutchinson probe gave a non-finite value ({q})"
        );
        k += 1;
        sum += q;
        sum2 += q * q;
        let mean = sum / k as f64;
        let stderr = if k > 1 {
            ((sum2 - k as f64 * mean * mean).max(0.0) / (k - 1) as f64 / k as f64).sqrt()
        } else {
            f64::INFINITY
        };
        let done = k >= opts.max_samples
            || (k >= opts.min_samples.max(2) && stderr <= opts.rel_tol * mean.abs());
        if done {
            return Ok(TraceEstimate {
                mean,
                stderr: if stderr.is_finite() { stderr } else { 0.0 },
                samples: k,
            });
        }
    }
}

/// Sum over the rows of one output of the per-row loss between `reference` and `out`.
pub fn loss_sum(reference: &ArrayD<f32>, out: &ArrayD<f32>, kl: bool) -> f64 {
    if kl && reference.ndim() == 2 {
        let mut total = 0f64;
        for (r, o) in reference.outer_iter().zip(out.outer_iter()) {
            // KL(p0 || p) = log Σ p0 e^{δz} − Σ p0 δz, δz = z − z0.
            let (mut a, mut b) = (0f64, 0f64);
            for ((&z0, &z), &p0) in r.iter().zip(o.iter()).zip(&softmax(r.iter())) {
                let dz = z as f64 - z0 as f64;
                a += p0 * dz.exp_m1();
                b += p0 * dz;
            }
            total += a.ln_1p() - b;
        }
        total
    } else {
        0.5 * reference
            .iter()
            .zip(out.iter())
            .map(|(&a, &b)| (b as f64 - a as f64).powi(2))
            .sum::<f64>()
    }
}

fn rows(a: &ArrayD<f32>) -> usize {
    a.shape().first().copied().unwrap_or(1).max(1)
}

fn fnv(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9e3779b97f4a7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Every Conv/ConvTranspose/Gemm/MatMul with a constant weight, in topological order (each
/// weight once: a weight shared by several nodes is one layer, named after its first reader).
pub fn layers(graph: &Graph) -> Result<Vec<Layer>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for ix in graph.topo_order()? {
        if let Some(l) = Layer::of(graph, ix) {
            if seen.insert(l.weight.clone()) {
                out.push(l);
            }
        }
    }
    Ok(out)
}

/// The part of a model downstream of one weight, with upstream values as inputs.
struct SubModel {
    proto: ModelProto,
    /// Upstream values fed as inputs (in input order), before the weight (last input).
    boundary: Vec<String>,
    kl: Vec<bool>,
    /// The graph outputs it computes (indices into the model's outputs), in its output order.
    outputs: Vec<usize>,
}

fn value_info(name: &str, elem: i32, shape: Option<&[usize]>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: shape.map(|s| TensorShapeProto {
                    dim: s
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Which outputs use KL under `loss`.
fn kl_outputs(model: &Model, loss: Loss, shapes: &[Vec<usize>]) -> Vec<bool> {
    model
        .graph
        .outputs
        .iter()
        .zip(shapes)
        .map(|(o, s)| match loss {
            Loss::Kl => s.len() == 2,
            Loss::Mse => false,
            Loss::Auto => {
                let probs = model.graph.producer_node(o.name()).is_some_and(|ix| {
                    matches!(model.graph.node(ix).op_type(), "Softmax" | "LogSoftmax")
                });
                s.len() == 2 && s[1] > 1 && !probs
            }
        })
        .collect()
}

fn sub_model(
    model: &Model,
    layer: &Layer,
    elem_types: &HashMap<String, i32>,
    kl: &[bool],
) -> Result<Option<SubModel>> {
    let g = &model.graph;
    // Downstream closure of the weight's readers.
    let mut down: HashSet<NodeIndex> = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.consumers(&layer.weight).iter().map(|c| c.0).collect();
    while let Some(ix) = stack.pop() {
        if down.insert(ix) {
            stack.extend(g.dag().neighbors_directed(ix, Direction::Outgoing));
        }
    }
    let order: Vec<NodeIndex> = g
        .topo_order()?
        .into_iter()
        .filter(|ix| down.contains(ix))
        .collect();
    let produced: HashSet<&str> = order
        .iter()
        .flat_map(|&ix| g.node(ix).output.iter().map(String::as_str))
        .collect();
    let mut reads: BTreeSet<String> = BTreeSet::new();
    for &ix in &order {
        let n = g.node(ix);
        reads.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        for sub in subgraphs(n) {
            reads.extend(free_names(sub));
        }
    }
    let mut boundary = Vec::new();
    let mut initializers = Vec::new();
    for name in &reads {
        if produced.contains(name.as_str()) || name == &layer.weight {
            continue;
        }
        if let Some(t) = g.constant(name) {
            initializers.push(t.clone());
        } else {
            boundary.push(name.clone());
        }
    }
    let outputs: Vec<usize> = g
        .outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| produced.contains(o.name()))
        .map(|(i, _)| i)
        .collect();
    if outputs.is_empty() {
        return Ok(None);
    }
    let mut inputs: Vec<ValueInfoProto> = boundary
        .iter()
        .map(|b| {
            value_info(
                b,
                *elem_types.get(b).unwrap_or(&(DataType::Float as i32)),
                None,
            )
        })
        .collect();
    inputs.push(value_info(
        &layer.weight,
        DataType::Float as i32,
        Some(&layer.weight_shape),
    ));
    let gp = GraphProto {
        name: Some(format!("downstream of {}", layer.weight)),
        node: order.iter().map(|&ix| g.node(ix).clone()).collect(),
        initializer: initializers,
        input: inputs,
        output: outputs.iter().map(|&i| g.outputs[i].clone()).collect(),
        ..Default::default()
    };
    let mut proto = model.shell.clone();
    proto.graph = Some(gp);
    Ok(Some(SubModel {
        proto,
        boundary,
        kl: outputs.iter().map(|&i| kl[i]).collect(),
        outputs,
    }))
}

/// Per-layer Hessian traces of the label-free loss (see the module docs). `calib` holds batches,
/// each one array per model input (graph input order, initializer-backed inputs excluded).
pub fn sensitivity(
    model: &Model,
    calib: &[Vec<ArrayD<f32>>],
    opts: &HessianOptions,
) -> Result<Vec<LayerSensitivity>> {
    sensitivity_with(model, calib, opts, &|_, _| Vec::new())
}

/// [`sensitivity`], plus each layer's whitened output responses to the weights `candidates`
/// returns for it (in that order; see the module docs).
pub fn sensitivity_with(
    model: &Model,
    calib: &[Vec<ArrayD<f32>>],
    opts: &HessianOptions,
    candidates: &Candidates,
) -> Result<Vec<LayerSensitivity>> {
    ensure!(!calib.is_empty(), "no calibration batches given");
    let layers = layers(&model.graph)?;
    if layers.is_empty() {
        return Ok(vec![]);
    }
    let proto = model.to_proto()?;
    let input_names: Vec<String> = model
        .graph
        .inputs
        .iter()
        .filter(|v| !model.graph.initializers.contains_key(v.name()))
        .map(|v| v.name().to_string())
        .collect();
    ensure!(
        calib.iter().all(|b| b.len() == input_names.len()),
        "each calibration batch must hold {} array(s), one per model input ({})",
        input_names.len(),
        input_names.join(", ")
    );
    let shapes0: Vec<(String, Vec<usize>)> = input_names
        .iter()
        .cloned()
        .zip(calib[0].iter().map(|a| a.shape().to_vec()))
        .collect();
    let elem_types: HashMap<String, i32> = infer_value_shapes(&proto, &shapes0)
        .context("inferring value types")?
        .into_iter()
        .filter_map(|v| v.elem_type.map(|t| (v.name, t as i32)))
        .collect();

    // Pass 1: the full model once per batch, exposing every layer's upstream values.
    let probe = Runner::new(&proto, &shapes0, &[]).context("loading the model in tract")?;
    let first_out = probe.run(&calib[0]).context("running the model")?;
    let out_shapes: Vec<Vec<usize>> = first_out.iter().map(|a| a.shape().to_vec()).collect();
    let kl = kl_outputs(model, opts.loss, &out_shapes);
    let mut subs = Vec::new();
    for l in &layers {
        let name = model.graph.node(l.node).name().to_string();
        subs.push(
            sub_model(model, l, &elem_types, &kl)
                .with_context(|| format!("building the downstream model of layer '{name}'"))?,
        );
    }
    let extra: Vec<String> = subs
        .iter()
        .flatten()
        .flat_map(|s| s.boundary.iter())
        .filter(|b| !input_names.contains(b))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut values: Vec<HashMap<String, ArrayD<f32>>> = Vec::new();
    let mut runners: Vec<(Vec<Vec<usize>>, Runner)> = Vec::new();
    for (b, batch) in calib.iter().enumerate() {
        let key: Vec<Vec<usize>> = batch.iter().map(|a| a.shape().to_vec()).collect();
        if !runners.iter().any(|(k, _)| *k == key) {
            let shapes: Vec<(String, Vec<usize>)> = input_names
                .iter()
                .cloned()
                .zip(key.iter().cloned())
                .collect();
            let r = Runner::new(&proto, &shapes, &extra)
                .context("loading the model in tract with layer inputs exposed")?;
            runners.push((key.clone(), r));
        }
        let runner = &runners.iter().find(|(k, _)| *k == key).expect("inserted").1;
        let out = runner
            .run(batch)
            .with_context(|| format!("running calibration batch {b}"))?;
        let mut map: HashMap<String, ArrayD<f32>> = input_names
            .iter()
            .cloned()
            .zip(batch.iter().cloned())
            .collect();
        for (name, v) in runner.output_names().iter().zip(out) {
            map.entry(name.clone()).or_insert(v);
        }
        values.push(map);
    }
    drop(runners);
    let layout = ResponseLayout::new(
        &values
            .iter()
            .map(|v| {
                model
                    .graph
                    .outputs
                    .iter()
                    .map(|o| v.get(o.name()).context("a graph output was not computed"))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?,
        response_dim(layers.len()),
    );

    let run_layer = |(l, sub): (&Layer, &Option<SubModel>)| -> Result<LayerSensitivity> {
        let start = Instant::now();
        let node = model.graph.node(l.node);
        let w0 = l.weight_f32(&model.graph)?;
        let n = w0.len();
        let mut result = LayerSensitivity {
            node: node.name().to_string(),
            op_type: node.op_type().to_string(),
            weight: l.weight.clone(),
            weight_shape: l.weight_shape.clone(),
            out_axis: l.out_axis(),
            in_axis: l.in_axis(),
            params: n,
            hessian_trace: 0.0,
            hessian_trace_stderr: 0.0,
            trace_per_param: 0.0,
            samples: 0,
            eps: 0.0,
            seconds: 0.0,
            responses: Vec::new(),
        };
        let wanted = candidates(l, &w0);
        let Some(sub) = sub else {
            // No graph output depends on this weight: every change has zero response.
            result.responses = vec![Vec::new(); wanted.len()];
            return Ok(result);
        };
        let rms = (w0.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt();
        let eps = opts.rel_eps * if rms > 0.0 { rms } else { 1.0 };
        // One runner per distinct set of input shapes.
        let mut runners: Vec<(Vec<Vec<usize>>, Runner)> = Vec::new();
        let mut feeds: Vec<(usize, Vec<ArrayD<f32>>)> = Vec::new();
        for vals in &values {
            let mut feed = Vec::with_capacity(sub.boundary.len() + 1);
            for b in &sub.boundary {
                feed.push(
                    vals.get(b)
                        .with_context(|| format!("value '{b}' was not computed"))?
                        .clone(),
                );
            }
            feed.push(w0.clone());
            let key: Vec<Vec<usize>> = feed.iter().map(|a| a.shape().to_vec()).collect();
            let pos = match runners.iter().position(|(k, _)| *k == key) {
                Some(p) => p,
                None => {
                    let mut names: Vec<String> = sub.boundary.clone();
                    names.push(l.weight.clone());
                    let shapes: Vec<(String, Vec<usize>)> =
                        names.into_iter().zip(key.iter().cloned()).collect();
                    runners.push((key, Runner::new(&sub.proto, &shapes, &[])?));
                    runners.len() - 1
                }
            };
            feeds.push((pos, feed));
        }
        let mut refs = Vec::new();
        let mut total_rows = 0usize;
        for (pos, feed) in &feeds {
            let out = runners[*pos].1.run(feed)?;
            total_rows += rows(&out[0]);
            refs.push(out);
        }
        let loss_at = |w: ArrayD<f32>, feeds: &mut Vec<(usize, Vec<ArrayD<f32>>)>| -> Result<f64> {
            let mut total = 0f64;
            for ((pos, feed), r) in feeds.iter_mut().zip(&refs) {
                *feed.last_mut().expect("weight input") = w.clone();
                let out = runners[*pos].1.run(feed)?;
                for (k, (a, b)) in r.iter().zip(&out).enumerate() {
                    total += loss_sum(a, b, sub.kl[k]);
                }
            }
            Ok(total / total_rows as f64)
        };
        for w in wanted {
            ensure!(
                w.shape() == w0.shape(),
                "candidate weight shape {:?} differs from {:?}",
                w.shape(),
                w0.shape()
            );
            let mut outs = Vec::with_capacity(feeds.len());
            for (pos, feed) in feeds.iter_mut() {
                *feed.last_mut().expect("weight input") = w.clone();
                outs.push(runners[*pos].1.run(feed)?);
            }
            result.responses.push(response(&layout, sub, &refs, &outs));
        }
        let w0_flat: Vec<f32> = w0.iter().copied().collect();
        let shape = w0.shape().to_vec();
        let est = hutchinson(n, fnv(opts.seed, &l.weight), opts, |v| {
            let step = |sign: f32| -> Result<ArrayD<f32>> {
                let w: Vec<f32> = w0_flat
                    .iter()
                    .zip(v)
                    .map(|(&w, &d)| w + sign * eps as f32 * d)
                    .collect();
                Ok(ArrayD::from_shape_vec(shape.clone(), w)?)
            };
            let plus = loss_at(step(1.0)?, &mut feeds)?;
            let minus = loss_at(step(-1.0)?, &mut feeds)?;
            Ok((plus + minus) / (eps * eps))
        })
        .with_context(|| format!("Hutchinson estimate for weight '{}'", l.weight))?;
        result.hessian_trace = est.mean;
        result.hessian_trace_stderr = est.stderr;
        result.trace_per_param = est.mean / n.max(1) as f64;
        result.samples = est.samples;
        result.eps = eps;
        result.seconds = start.elapsed().as_secs_f64();
        Ok(result)
    };
    let pairs: Vec<(&Layer, &Option<SubModel>)> = layers.iter().zip(&subs).collect();
    let results: Vec<Result<LayerSensitivity>> = if opts.parallel {
        pairs.into_par_iter().map(run_layer).collect()
    } else {
        pairs.into_iter().map(run_layer).collect()
    };
    let mut out = Vec::new();
    for (r, l) in results.into_iter().zip(&layers) {
        let name = model.graph.node(l.node).name().to_string();
        out.push(r.with_context(|| format!("layer '{name}' (weight '{}')", l.weight))?);
    }
    if out.iter().all(|s| s.samples == 0) {
        bail!("no weighted layer feeds a graph output");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_dim_shrinks_with_layers_within_bounds() {
        assert_eq!(response_dim(21), 1 << 15);
        assert_eq!(response_dim(5000), 1 << 12);
        let dims: Vec<usize> = [1, 50, 150, 200, 400, 800].map(response_dim).to_vec();
        assert!(dims.windows(2).all(|w| w[1] <= w[0]), "{dims:?}");
    }

    #[test]
    fn count_sketch_keeps_inner_products() {
        // Two long correlated vectors: the sketch's inner products match the exact ones within
        // a few times √(2 / dim).
        let n = 200_000;
        let a: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.731).sin()).collect();
        let b: Vec<f64> = (0..n)
            .map(|i| a[i] * 0.6 + ((i as f64) * 1.913).cos() * 0.8)
            .collect();
        let dim = 1 << 15;
        let sketch = |v: &[f64]| {
            let mut s = vec![0f64; dim];
            for (i, &x) in v.iter().enumerate() {
                let (slot, sign) = sketch_slot(i as u64, dim);
                s[slot] += sign as f64 * x;
            }
            s
        };
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
        let (sa, sb) = (sketch(&a), sketch(&b));
        let tol = 4.0 * (2.0 / dim as f64).sqrt();
        for (exact, approx, scale) in [
            (dot(&a, &a), dot(&sa, &sa), dot(&a, &a)),
            (
                dot(&a, &b),
                dot(&sa, &sb),
                (dot(&a, &a) * dot(&b, &b)).sqrt(),
            ),
        ] {
            assert!(
                (exact - approx).abs() <= tol * scale,
                "{exact} vs {approx} (tolerance {})",
                tol * scale
            );
        }
    }
}
