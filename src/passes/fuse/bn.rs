//! BatchNormalization as arithmetic: the inference-mode BN as a per-channel affine map, the
//! statistics later passes need, and the new biases a fold produces.
//!
//! Inference-mode BN: `y[c] = gamma[c] * (x[c] - mean[c]) / sqrt(var[c] + eps) + beta[c]`,
//! i.e. `y = x * s + shift` with `s = gamma / sqrt(var + eps)` and `shift = beta - mean * s`.
//! [`bn_affine`] refuses (with the reason) a BN in training mode, with `spatial = 0`, with a
//! used training output, with non-constant parameters, or with `var + eps <= 0`.
//!
//! Folded biases: `b'[c] = (b[c] - mean[c]) * s[c] + beta[c]` for Conv/ConvTranspose (`b = 0`
//! without bias), and for Gemm `C'[r, n] = beta * C[r, n] * s[n] + shift[n]` with `C`
//! broadcast to `[N]` or `[rows, N]`. All arithmetic is in f64; [`encode_float`] stores the
//! result in the weight's own float type.

use crate::ir::op::{self, Attrs};
use crate::ir::Graph;
use crate::onnx::proto::{tensor_proto::DataType, NodeProto, TensorProto};
use crate::onnx::tensor::{from_f16, from_f32, raw_tensor, to_f64};
use anyhow::{Context, Result};
use ndarray::{ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

pub(super) fn is_bn(node: &NodeProto) -> bool {
    node.op_type() == "BatchNormalization"
        && op::is_standard_domain(node.domain())
        && !node.output.is_empty()
        && node.input.len() == 5
}

/// An inference-mode BN as a per-channel affine map `y = x * scale + shift`.
pub(super) struct BnAffine {
    pub(super) scale: Vec<f64>,
    pub(super) shift: Vec<f64>,
    pub(super) gamma: Vec<f64>,
    pub(super) beta: Vec<f64>,
    pub(super) mean: Vec<f64>,
}

/// The BN's affine form, or why it has none (`Ok(Err(reason))`).
pub(super) fn bn_affine(graph: &Graph, bn: NodeIndex) -> Result<Result<BnAffine, String>> {
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

pub(super) fn is_float(dt: DataType) -> bool {
    matches!(dt, DataType::Float | DataType::Float16 | DataType::Double)
}

/// `b'[c] = b[c] * s[c] + shift[c]`, with `shift = beta - mean * s` (so `(b - m) * s + beta`).
pub(super) fn channel_bias(
    bias: Option<&ArrayD<f64>>,
    a: &BnAffine,
    c: usize,
) -> Result<ArrayD<f64>> {
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
pub(super) fn gemm_bias(cv: &ArrayD<f64>, beta: f64, a: &BnAffine) -> Option<ArrayD<f64>> {
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
