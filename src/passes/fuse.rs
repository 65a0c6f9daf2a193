//! `fuse`: fold inference-mode BatchNormalization into the layer that feeds it, turn the BNs
//! that cannot be folded into a per-channel `Mul` + `Add`, and tell later passes which
//! activation belongs to which layer.
//!
//! # BN folding
//!
//! ```text
//! before:  t = Conv(x, W, b)                        after:  y = Conv(x, W', b')
//!          y = BatchNormalization(t, g, beta, m, v)
//! ```
//!
//! With `s[c] = g[c] / sqrt(v[c] + eps)` per output channel `c`:
//! `W'[c, ...] = W[c, ...] * s[c]` and `b'[c] = (b[c] - m[c]) * s[c] + beta[c]` (`b = 0` when
//! the layer has no bias). Where channel `c` lives in the weight depends on the layer:
//!
//! - `Conv` (1D/2D/3D, any `group`, depthwise included): `W` is `[Cout, Cin/group, k...]`,
//!   channel `c` is the slice `W[c]`.
//! - `ConvTranspose`: `W` is `[Cin, Cout/group, k...]`; output channel `o` of group
//!   `g = o / (Cout/group)` is `W[g*Cin/group .. (g+1)*Cin/group, o % (Cout/group)]`.
//! - `Gemm` (`Y = alpha * A' * B' + beta * C`): channel `n` is column `n` of `B'` (a column of
//!   `B` when `transB = 0`, a row when `transB = 1`). `alpha` needs nothing (it multiplies the
//!   scaled `B`); `beta` is folded into the new bias, `C' = beta * C * s + (beta_bn - m * s)`,
//!   and the node gets `beta = 1`. `C` is broadcast to `[N]` or `[rows, N]` as needed.
//! - `MatMul(x, W)` with a constant 2-D `W` and `x` of known rank 2 becomes
//!   `Gemm(x, W', b')` (BN's channel axis 1 is the MatMul's last axis only at rank 2).
//!
//! It fires when: the BN is in inference mode (no `training_mode = 1`, no `spatial = 0`, the
//! mean/var outputs absent or unused), its four parameters are constants (initializers that
//! are not also graph inputs), the producer's output has exactly one reader (the BN) and is
//! not a graph output, and the producer's weight (and bias, if any) are constant float tensors
//! (float, float16 or double) whose channel count matches the BN. The folded node keeps the
//! producer's node name and takes over the BN's output name, so downstream names (and graph
//! outputs) do not change. A weight or bias read by other nodes too is never modified: the
//! folded values go into a new initializer. Arithmetic is in f64, stored in the tensor's type.
//!
//! # BN that cannot be folded
//!
//! ```text
//! before:  y = BatchNormalization(x, g, beta, m, v)
//! after:   t = Mul(x, scale)     scale = s reshaped [C, 1, ..., 1]
//!          y = Add(t, shift)     shift = beta - m * s, same shape
//! ```
//!
//! Used when the BN is inference-mode with constant parameters but has no foldable producer
//! (first op on a graph input, producer with other readers, ...). It needs the rank of `x`
//! (declared type, or the producer's weight rank) and its element type; without them the BN
//! stays. A BN with non-constant parameters or in training mode is never touched.
//!
//! # Folded BN statistics
//!
//! High-bias absorption (equalization) needs each folded BN's `gamma` and `beta`. They are in
//! the typed fact [`crate::passes::Fact::FoldedBn`] (also shown in `details["folded"]`), keyed
//! by the name of the node the BN was folded into (the pass gives a nameless producer a fresh
//! name); the runner hands it to later passes as `PassContext.facts.folded_bn`. Before `fuse`
//! runs, [`bn_statistics`] reads them straight from the graph.
//!
//! # Activation fusion
//!
//! Nothing is rewritten: [`fused_activation`] tells the QDQ placement that an activation
//! (Relu, Clip, LeakyRelu, HardSwish, HardSigmoid) directly follows a Conv/ConvTranspose/
//! Gemm/MatMul as its only reader, so no Q/DQ pair goes between them; [`activation_info`]
//! gives its output range (`[0, 6]` for Clip(0, 6), `[0, inf)` for Relu). Clip keeps its
//! exact bounds in the emitted model.
//!
//! `Constant` nodes feeding a BN parameter or a layer's weight/bias are first turned into
//! initializers of the same name, and `Identity` nodes of an initializer feeding one are
//! bypassed (rule `constant-parameter`): exporters that skip constant folding emit BN
//! statistics and deduplicated weights that way.
//!
//! # Invariants
//!
//! Running twice equals running once: after a run no inference-mode BN with constant
//! parameters remains that either rule accepts. Output names, graph inputs and outputs are
//! unchanged. `changes` counts applied patches (one per folded or converted BN, one per
//! Constant parameter made an initializer).

use crate::ir::facts::{clip_bounds, declared_elem_type, static_rank};
use crate::ir::op::{self, Attrs};
use crate::onnx::tensor::{self, from_f16, from_f32, raw_tensor, to_f64};
use crate::ir::{Graph, InSlot, Model, Patch};
use crate::onnx::proto::{tensor_proto::DataType, NodeProto, TensorProto};
use crate::passes::rewrite::{rewrite, Rule};
use crate::passes::{Fact, Pass, PassContext, PassStats};
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis, IxDyn};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub struct Fuse;

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn summary(&self) -> &'static str {
        "fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul; other BNs become Mul+Add"
    }

    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassStats> {
        let graph = &mut model.graph;
        let before = bn_statistics(graph)?;
        let rules: [(&'static str, Rule); 3] = [
            ("constant-parameter", rule_constant_parameter),
            ("fold-bn", rule_fold_bn),
            ("bn-to-mul-add", rule_bn_to_mul_add),
        ];
        let counts = rewrite(graph, &rules, ctx.max_patches)?;

        // Classify every BN of the input by what now produces its output value.
        let mut folded = BTreeMap::new();
        let mut mul_add = Vec::new();
        let mut notes = Vec::new();
        for (output, stats) in before {
            let Some(ix) = graph.producer_node(&output) else {
                continue;
            };
            let node = graph.node(ix);
            match node.op_type() {
                "BatchNormalization" => {
                    let reason = match fold_plan(graph, ix)? {
                        Err(why) => why,
                        Ok(_) => "max-patches reached".to_string(),
                    };
                    notes.push(format!("kept BatchNormalization '{}': {reason}", stats.bn));
                }
                "Add" => mul_add.push(stats.bn.clone()),
                op => {
                    folded.insert(
                        node.name().to_string(),
                        FoldedBn {
                            op: op.to_string(),
                            ..stats
                        },
                    );
                }
            }
        }
        for bn in &mul_add {
            notes.push(format!(
                "BatchNormalization '{bn}' has no foldable producer: replaced by Mul+Add"
            ));
        }
        // BNs in training mode or with non-constant parameters were not in `before`.
        for ix in graph.topo_order()? {
            let n = graph.node(ix);
            if is_bn(n) {
                if let Err(why) = bn_affine(graph, ix)? {
                    notes.push(format!("kept BatchNormalization '{}': {why}", n.name()));
                }
            }
        }
        let activations: Vec<serde_json::Value> = graph
            .topo_order()?
            .into_iter()
            .filter_map(|ix| {
                let act = activation_info(graph, ix)?;
                Some(serde_json::json!({
                    "node": graph.node(ix).name(),
                    "activation": graph.node(act.node).op_type(),
                    "min": finite(act.min),
                    "max": finite(act.max),
                }))
            })
            .collect();
        Ok(PassStats {
            changes: counts.iter().map(|(_, c)| c).sum(),
            notes,
            table: vec![],
            facts: vec![Fact::FoldedBn(folded.clone())],
            details: serde_json::json!({
                "folded": folded,
                "mul_add": mul_add,
                "fused_activations": activations,
            }),
        })
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// One folded BN, as recorded in `details["folded"][<node name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoldedBn {
    /// The BatchNormalization node's name.
    pub bn: String,
    /// The op it was folded into (`Conv`, `ConvTranspose`, `Gemm`; MatMul becomes `Gemm`).
    pub op: String,
    /// The value the folded node produces (the BN's output name).
    pub output: String,
    /// Per output channel: the BN's scale and shift, i.e. the std and mean the BN gave the
    /// channel's pre-activation values.
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
}

/// `gamma`/`beta` of every inference-mode BN with constant parameters, keyed by the BN's
/// output value name (`op` is the producer's op type, or empty without producer).
pub fn bn_statistics(graph: &Graph) -> Result<BTreeMap<String, FoldedBn>> {
    let mut out = BTreeMap::new();
    for ix in graph.node_indices() {
        let node = graph.node(ix);
        if !is_bn(node) {
            continue;
        }
        if let Ok(a) = bn_affine(graph, ix)? {
            let producer = graph
                .producer_node(&node.input[0])
                .map(|p| graph.node(p).op_type().to_string())
                .unwrap_or_default();
            out.insert(
                node.output[0].clone(),
                FoldedBn {
                    bn: node.name().to_string(),
                    op: producer,
                    output: node.output[0].clone(),
                    gamma: a.gamma,
                    beta: a.beta,
                },
            );
        }
    }
    Ok(out)
}

fn is_bn(node: &NodeProto) -> bool {
    node.op_type() == "BatchNormalization"
        && op::is_standard_domain(node.domain())
        && !node.output.is_empty()
        && node.input.len() == 5
}

/// An inference-mode BN as a per-channel affine map `y = x * scale + shift`.
struct BnAffine {
    scale: Vec<f64>,
    shift: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    mean: Vec<f64>,
}

/// The BN's affine form, or why it has none (`Ok(Err(reason))`).
fn bn_affine(graph: &Graph, bn: NodeIndex) -> Result<Result<BnAffine, String>> {
    let node = graph.node(bn);
    if !is_bn(node) {
        return Ok(Err("not a BatchNormalization with 5 inputs".into()));
    }
    if node.attr_int("training_mode")?.unwrap_or(0) != 0 {
        return Ok(Err("training_mode = 1".into()));
    }
    if node.attr_int("spatial")?.unwrap_or(1) == 0 {
        return Ok(Err("spatial = 0 (per-activation statistics)".into()));
    }
    if node.attr_int("is_test")? == Some(0) {
        return Ok(Err("is_test = 0 (training mode)".into()));
    }
    if let Some(o) = node.output[1..]
        .iter()
        .find(|o| !o.is_empty() && graph.use_count(o) > 0)
    {
        return Ok(Err(format!("its training output '{o}' is used")));
    }
    let mut params = Vec::with_capacity(4);
    for (slot, what) in [(1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")] {
        let name = &node.input[slot];
        let Some(t) = graph.constant(name) else {
            return Ok(Err(format!(
                "{what} '{name}' is not a constant (not an initializer, or overridable as a graph input)"
            )));
        };
        let v = to_f64(t).with_context(|| format!("BatchNormalization '{}'", node.name()))?;
        params.push(v.iter().copied().collect::<Vec<f64>>());
    }
    let c = params[0].len();
    if params.iter().any(|p| p.len() != c) {
        anyhow::bail!(
            "BatchNormalization '{}': scale/B/mean/var have {:?} values, expected equal counts",
            node.name(),
            params.iter().map(|p| p.len()).collect::<Vec<_>>()
        );
    }
    let eps = node.attr_float("epsilon")?.unwrap_or(1e-5) as f64;
    let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
    let mut scale = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    for i in 0..c {
        let denom = (var[i] + eps).sqrt();
        if !(denom.is_finite() && denom > 0.0) {
            return Ok(Err(format!(
                "channel {i}: var + epsilon = {} is not positive",
                var[i] + eps
            )));
        }
        let s = gamma[i] / denom;
        scale.push(s);
        shift.push(beta[i] - mean[i] * s);
    }
    Ok(Ok(BnAffine {
        scale,
        shift,
        gamma: gamma.clone(),
        beta: beta.clone(),
        mean: mean.clone(),
    }))
}

/// Encode f64 values in a float element type (float, float16, double); `None` for others.
pub(crate) fn encode_float(name: &str, dt: DataType, a: &ArrayD<f64>) -> Option<TensorProto> {
    match dt {
        DataType::Float => Some(from_f32(name, &a.mapv(|v| v as f32))),
        DataType::Float16 => Some(from_f16(name, &a.mapv(|v| v as f32))),
        DataType::Double => Some(raw_tensor(
            name,
            DataType::Double,
            a.shape(),
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )),
        _ => None,
    }
}

fn is_float(dt: DataType) -> bool {
    matches!(dt, DataType::Float | DataType::Float16 | DataType::Double)
}


/// Whether `value` is read only by `reader` (once) and is not a graph output.
fn single_reader(graph: &Graph, value: &str, reader: NodeIndex) -> bool {
    matches!(graph.consumers(value), [(ix, InSlot::Arg(_))] if *ix == reader)
        && !graph.is_graph_output(value)
}


/// The patch folding BN `bn` into its producer, or why it cannot be folded.
fn fold_plan(graph: &Graph, bn: NodeIndex) -> Result<Result<Patch, String>> {
    let affine = match bn_affine(graph, bn)? {
        Ok(a) => a,
        Err(why) => return Ok(Err(why)),
    };
    let bn_node = graph.node(bn);
    let x = &bn_node.input[0];
    let y = &bn_node.output[0];
    let Some((p, 0)) = graph.producer(x) else {
        return Ok(Err(format!("its input '{x}' is not produced by a node")));
    };
    let prod = graph.node(p);
    let op_type = prod.op_type();
    if !op::is_standard_domain(prod.domain())
        || !matches!(op_type, "Conv" | "ConvTranspose" | "Gemm" | "MatMul")
    {
        return Ok(Err(format!(
            "its producer '{}' is a {op_type}, not Conv/ConvTranspose/Gemm/MatMul",
            prod.name()
        )));
    }
    if !single_reader(graph, x, bn) {
        return Ok(Err(format!(
            "the producer's output '{x}' has other readers or is a graph output"
        )));
    }
    let w_name = &prod.input[1];
    let Some(w) = graph.constant(w_name) else {
        return Ok(Err(format!(
            "the producer's weight '{w_name}' is not a constant"
        )));
    };
    let dt = tensor::data_type(w)?;
    if !is_float(dt) {
        return Ok(Err(format!(
            "the producer's weight '{w_name}' is {}, not a float type",
            tensor::type_name(dt)
        )));
    }
    let ctx = || {
        format!(
            "folding BatchNormalization '{}' into '{}'",
            bn_node.name(),
            prod.name()
        )
    };
    let mut wv = to_f64(w).with_context(ctx)?;
    let c = affine.scale.len();
    let bias_name = prod.input.get(2).filter(|s| !s.is_empty());
    let bias = match bias_name {
        None => None,
        Some(b) => match graph.constant(b) {
            Some(t) if tensor::data_type(t)? == dt => Some(to_f64(t).with_context(ctx)?),
            Some(_) => {
                return Ok(Err(format!(
                    "bias '{b}' has a different type than the weight"
                )))
            }
            None => return Ok(Err(format!("bias '{b}' is not a constant"))),
        },
    };
    let s = &affine.scale;
    let mut new_node = prod.clone();
    let new_bias: ArrayD<f64>;
    match op_type {
        "Conv" => {
            if wv.ndim() < 3 || wv.shape()[0] != c {
                return Ok(Err(format!(
                    "weight shape {:?} does not have {c} output channels",
                    wv.shape()
                )));
            }
            for (o, mut sub) in wv.axis_iter_mut(Axis(0)).enumerate() {
                sub.mapv_inplace(|v| v * s[o]);
            }
            new_bias = channel_bias(bias.as_ref(), &affine, c)?;
        }
        "ConvTranspose" => {
            let group = prod.attr_int("group")?.unwrap_or(1);
            let cin = wv.shape().first().copied().unwrap_or(0);
            if group < 1 || wv.ndim() < 3 || cin % group as usize != 0 {
                return Ok(Err(format!(
                    "weight shape {:?} / group {group}",
                    wv.shape()
                )));
            }
            let group = group as usize;
            let per_out = wv.shape()[1];
            if per_out * group != c {
                return Ok(Err(format!(
                    "weight shape {:?} with group {group} gives {} output channels, BN has {c}",
                    wv.shape(),
                    per_out * group
                )));
            }
            let per_in = cin / group;
            for (i, mut row) in wv.axis_iter_mut(Axis(0)).enumerate() {
                let g = i / per_in;
                for (j, mut sub) in row.axis_iter_mut(Axis(0)).enumerate() {
                    let o = g * per_out + j;
                    sub.mapv_inplace(|v| v * s[o]);
                }
            }
            new_bias = channel_bias(bias.as_ref(), &affine, c)?;
        }
        "Gemm" | "MatMul" => {
            let trans_b = op_type == "Gemm" && prod.attr_int("transB")?.unwrap_or(0) != 0;
            if wv.ndim() != 2 {
                return Ok(Err(format!("weight '{w_name}' is not 2-D")));
            }
            let n_axis = if trans_b { 0 } else { 1 };
            if wv.shape()[n_axis] != c {
                return Ok(Err(format!(
                    "weight shape {:?} (transB={}) does not have {c} output columns",
                    wv.shape(),
                    trans_b as i32
                )));
            }
            for (n, mut sub) in wv.axis_iter_mut(Axis(n_axis)).enumerate() {
                sub.mapv_inplace(|v| v * s[n]);
            }
            if op_type == "MatMul" {
                if static_rank(graph, &prod.input[0]) != Some(2) {
                    return Ok(Err(format!(
                        "MatMul input '{}' is not known to be 2-D",
                        prod.input[0]
                    )));
                }
                new_node = NodeProto {
                    op_type: Some("Gemm".into()),
                    name: prod.name.clone(),
                    input: prod.input.clone(),
                    output: prod.output.clone(),
                    doc_string: prod.doc_string.clone(),
                    metadata_props: prod.metadata_props.clone(),
                    ..Default::default()
                };
                new_bias = channel_bias(None, &affine, c)?;
            } else {
                let beta = prod.attr_float("beta")?.unwrap_or(1.0) as f64;
                new_bias = match &bias {
                    None => channel_bias(None, &affine, c)?,
                    Some(cv) => match gemm_bias(cv, beta, &affine) {
                        Some(b) => b,
                        None => {
                            return Ok(Err(format!(
                                "Gemm C shape {:?} does not broadcast to [M, {c}]",
                                cv.shape()
                            )))
                        }
                    },
                };
                if beta != 1.0 {
                    op::set_attr(&mut new_node, op::attr_float("beta", 1.0));
                }
            }
        }
        _ => unreachable!("op type checked above"),
    }

    // Names: rewrite unshared initializers in place, else write new ones.
    let base = if prod.name().is_empty() {
        format!("{op_type}_{y}")
    } else {
        prod.name().to_string()
    };
    let mut wanted = Vec::new();
    let w_out = if graph.consumers(w_name).len() == 1 {
        w_name.clone()
    } else {
        wanted.push(format!("{w_name}_bnfold"));
        String::new()
    };
    let b_out = match bias_name {
        Some(b) if graph.consumers(b).len() == 1 && !graph.is_graph_output(b) => b.clone(),
        Some(b) => {
            wanted.push(format!("{b}_bnfold"));
            String::new()
        }
        None => {
            wanted.push(format!("{base}_bias"));
            String::new()
        }
    };
    if prod.name().is_empty() {
        wanted.push(base.clone());
    }
    let mut fresh = graph.fresh_names(&wanted).into_iter();
    let w_out = if w_out.is_empty() {
        fresh.next().expect("asked for it")
    } else {
        w_out
    };
    let b_out = if b_out.is_empty() {
        fresh.next().expect("asked for it")
    } else {
        b_out
    };
    if prod.name().is_empty() {
        new_node.name = fresh.next();
    }
    new_node.input.resize(3, String::new());
    new_node.input[1] = w_out.clone();
    new_node.input[2] = b_out.clone();
    new_node.output = vec![y.clone()];
    let (Some(w_t), Some(b_t)) = (
        encode_float(&w_out, dt, &wv),
        encode_float(&b_out, dt, &new_bias),
    ) else {
        return Ok(Err("unsupported weight type".into()));
    };
    Ok(Ok(Patch {
        add: vec![new_node],
        remove: vec![p, bn],
        shunts: vec![],
        initializers: vec![w_t, b_t],
        anchor: Some(p),
    }))
}

/// `b'[c] = b[c] * s[c] + shift[c]`, with `shift = beta - mean * s` (so `(b - m) * s + beta`).
fn channel_bias(bias: Option<&ArrayD<f64>>, a: &BnAffine, c: usize) -> Result<ArrayD<f64>> {
    let values: Vec<f64> = match bias {
        None => a.shift.clone(),
        Some(b) => {
            anyhow::ensure!(
                b.len() == c,
                "bias has {} values, the layer has {c} output channels",
                b.len()
            );
            b.iter()
                .enumerate()
                .map(|(i, &bv)| (bv - a.mean[i]) * a.scale[i] + a.beta[i])
                .collect()
        }
    };
    Ok(ArrayD::from_shape_vec(IxDyn(&[c]), values).expect("1-D of c values"))
}

/// `C'[r, n] = beta * C[r, n] * s[n] + shift[n]`, C broadcast to `[N]` or `[rows, N]`.
fn gemm_bias(cv: &ArrayD<f64>, beta: f64, a: &BnAffine) -> Option<ArrayD<f64>> {
    let n = a.scale.len();
    let (rows, cols, out_shape): (usize, usize, Vec<usize>) = match cv.shape() {
        [] => (1, 1, vec![n]),
        [k] => (1, *k, vec![n]),
        [r, k] => (*r, *k, vec![*r, n]),
        _ => return None,
    };
    if cols != 1 && cols != n {
        return None;
    }
    let flat: Vec<f64> = cv.iter().copied().collect();
    let mut out = Vec::with_capacity(rows * n);
    for r in 0..rows {
        for j in 0..n {
            let c = flat[r * cols + if cols == 1 { 0 } else { j }];
            let scaled = if beta == 0.0 {
                0.0
            } else {
                beta * c * a.scale[j]
            };
            out.push(scaled + a.shift[j]);
        }
    }
    ArrayD::from_shape_vec(IxDyn(&out_shape), out).ok()
}

/// A `Constant` node (or an `Identity` of an initializer) feeding a BN parameter or a layer's
/// weight/bias is that initializer (exporters emit BN statistics and shared weights this way).
fn rule_constant_parameter(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let n = graph.node(ix);
    let is_const_identity =
        n.op_type() == "Identity" && n.input.len() == 1 && graph.constant(&n.input[0]).is_some();
    if !(n.op_type() == "Constant" || is_const_identity)
        || n.output.len() != 1
        || !op::is_standard_domain(n.domain())
        || graph.is_graph_output(&n.output[0])
    {
        return Ok(None);
    }
    let feeds_parameter = graph.consumers(&n.output[0]).iter().any(|&(c, slot)| {
        let cn = graph.node(c);
        matches!(slot, InSlot::Arg(s) if s >= 1)
            && op::is_standard_domain(cn.domain())
            && matches!(
                cn.op_type(),
                "BatchNormalization" | "Conv" | "ConvTranspose" | "Gemm" | "MatMul"
            )
    });
    if !feeds_parameter {
        return Ok(None);
    }
    if is_const_identity {
        // Identity(w) = w: readers read the initializer itself.
        return Ok(Some(Patch {
            remove: vec![ix],
            shunts: vec![(n.output[0].clone(), n.input[0].clone())],
            ..Default::default()
        }));
    }
    crate::passes::constant_fold::rule_constant_fold(graph, ix)
}

/// bn(x) = W'x + b' with W' = W·s, b' = (b − mean)·s + beta (see the module docs).
fn rule_fold_bn(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    if !is_bn(graph.node(ix)) {
        return Ok(None);
    }
    Ok(fold_plan(graph, ix)?.ok())
}

/// bn(x) = x·s + (beta − mean·s), s = gamma/√(var+eps), constants shaped [C,1,…,1].
fn rule_bn_to_mul_add(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let node = graph.node(ix);
    if !is_bn(node) || fold_plan(graph, ix)?.is_ok() {
        return Ok(None);
    }
    let Ok(a) = bn_affine(graph, ix)? else {
        return Ok(None);
    };
    let x = &node.input[0];
    let y = &node.output[0];
    let Some(rank) = static_rank(graph, x).or_else(|| static_rank(graph, y)) else {
        return Ok(None);
    };
    if rank < 2 {
        return Ok(None);
    }
    let producer_weight_type = graph
        .producer_node(x)
        .and_then(|p| graph.constant(graph.node(p).input.get(1)?))
        .and_then(|t| tensor::data_type(t).ok());
    let dt = declared_elem_type(graph, x)
        .or_else(|| declared_elem_type(graph, y))
        .or(producer_weight_type)
        .or_else(|| tensor::data_type(graph.constant(&node.input[1])?).ok());
    let Some(dt) = dt.filter(|&d| is_float(d)) else {
        return Ok(None);
    };
    let c = a.scale.len();
    let mut shape = vec![1usize; rank - 1];
    shape[0] = c;
    let scale = ArrayD::from_shape_vec(IxDyn(&shape), a.scale.clone()).expect("c values");
    let shift = ArrayD::from_shape_vec(IxDyn(&shape), a.shift.clone()).expect("c values");
    let bn_name = if node.name().is_empty() {
        format!("bn_{y}")
    } else {
        node.name().to_string()
    };
    let names = graph.fresh_names(&[
        format!("{bn_name}_scale"),
        format!("{bn_name}_shift"),
        format!("{y}_scaled"),
        format!("{bn_name}_mul"),
        format!("{bn_name}_add"),
    ]);
    let (Some(scale_t), Some(shift_t)) = (
        encode_float(&names[0], dt, &scale),
        encode_float(&names[1], dt, &shift),
    ) else {
        return Ok(None);
    };
    let mul = op::node("Mul", &names[3], &[x, &names[0]], &[&names[2]]);
    let add = op::node("Add", &names[4], &[&names[2], &names[1]], &[y]);
    Ok(Some(Patch {
        add: vec![mul, add],
        remove: vec![ix],
        shunts: vec![],
        initializers: vec![scale_t, shift_t],
        anchor: Some(ix),
    }))
}

/// The activations that may share a quantized layer's output (no Q/DQ between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActivationKind {
    Relu,
    Clip,
    LeakyRelu,
    HardSwish,
    HardSigmoid,
}

/// An activation fused with the layer before it, with the range of its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedActivation {
    pub node: NodeIndex,
    pub kind: ActivationKind,
    /// Output range: `[0, 6]` for Clip(0, 6), `[0, inf)` for Relu, `(-inf, inf)` for LeakyRelu.
    pub min: f64,
    pub max: f64,
}

/// The activation node directly after `producer` (a Conv, ConvTranspose, Gemm or MatMul whose
/// output it alone reads), if any: QDQ placement puts no Q/DQ between the two.
pub fn fused_activation(graph: &Graph, producer: NodeIndex) -> Option<NodeIndex> {
    activation_info(graph, producer).map(|a| a.node)
}

/// Like [`fused_activation`], with the activation's kind and output range.
pub fn activation_info(graph: &Graph, producer: NodeIndex) -> Option<FusedActivation> {
    if !graph.contains(producer) {
        return None;
    }
    let p = graph.node(producer);
    if !op::is_standard_domain(p.domain())
        || !matches!(p.op_type(), "Conv" | "ConvTranspose" | "Gemm" | "MatMul")
    {
        return None;
    }
    let out = p.output.first()?;
    let [(act, InSlot::Arg(0))] = graph.consumers(out) else {
        return None;
    };
    if graph.is_graph_output(out) {
        return None;
    }
    let (kind, min, max) = activation_range(graph, *act)?;
    Some(FusedActivation {
        node: *act,
        kind,
        min,
        max,
    })
}

/// The kind and output range of an activation node; `None` for other nodes and for a Clip
/// whose bounds are not constant.
pub fn activation_range(graph: &Graph, ix: NodeIndex) -> Option<(ActivationKind, f64, f64)> {
    let n = graph.node(ix);
    if !op::is_standard_domain(n.domain()) {
        return None;
    }
    let inf = f64::INFINITY;
    Some(match n.op_type() {
        "Relu" => (ActivationKind::Relu, 0.0, inf),
        "LeakyRelu" => (ActivationKind::LeakyRelu, -inf, inf),
        // x·relu6(x+3)/6 has its minimum −3/8 at x = −3/2.
        "HardSwish" => (ActivationKind::HardSwish, -0.375, inf),
        "HardSigmoid" => (ActivationKind::HardSigmoid, 0.0, 1.0),
        "Clip" => {
            let (min, max) = clip_bounds(graph, n)?;
            (ActivationKind::Clip, min, max)
        }
        _ => return None,
    })
}

