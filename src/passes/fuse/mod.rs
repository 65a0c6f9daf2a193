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
//!
//! # Files
//!
//! This file holds the pass and its three rules; `bn` the BN's affine form, its statistics
//! and the bias formulas; `fold` the patch that folds a BN into its producer (where channel
//! `c` lives in each op's weight); `activation` the fused-activation classification.

mod activation;
mod bn;
mod fold;

use crate::ir::facts::{declared_elem_type, static_rank};
use crate::ir::op;
use crate::ir::{Graph, InSlot, Model, Patch};
use crate::onnx::tensor;
use crate::passes::rewrite::{rewrite, Rule};
use crate::passes::{Fact, Pass, PassContext, PassStats};
use anyhow::Result;
use ndarray::{ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use std::collections::BTreeMap;

pub use activation::{
    activation_info, activation_range, fused_activation, ActivationKind, FusedActivation,
};
use bn::{bn_affine, encode_float, is_bn, is_float};
pub use bn::{bn_statistics, FoldedBn};
use fold::fold_plan;

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
