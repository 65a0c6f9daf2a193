//! The patch folding a BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul that
//! feeds it (see the module docs of `fuse` for the conditions), or the reason it cannot.
//!
//! `W'` scales output channel `c` of the weight by `s[c]`; where that channel lives depends on
//! the op: `W[c]` for Conv (`[Cout, Cin/group, k...]`); for ConvTranspose
//! (`[Cin, Cout/group, k...]`) output channel `o = g * Cout/group + j` is `W[i, j]` for the rows
//! `i` of group `g`; column `n` of `B` for Gemm (row `n` when `transB = 1`) and for MatMul,
//! which becomes a Gemm. Unshared initializers are rewritten in place; a weight or bias other
//! nodes also read gets a fresh `<name>_bnfold` initializer instead. The folded node keeps the
//! producer's name and takes over the BN's output name.

use super::bn::{bn_affine, channel_bias, encode_float, gemm_bias, is_float};
use crate::ir::facts::static_rank;
use crate::ir::op::{self, Attrs};
use crate::ir::{Graph, InSlot, Patch};
use crate::onnx::proto::NodeProto;
use crate::onnx::tensor::{self, to_f64};
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis};
use petgraph::stable_graph::NodeIndex;

/// Whether `value` is read only by `reader` (once) and is not a graph output.
fn single_reader(graph: &Graph, value: &str, reader: NodeIndex) -> bool {
    matches!(graph.consumers(value), [(ix, InSlot::Arg(_))] if *ix == reader)
        && !graph.is_graph_output(value)
}

/// The patch folding BN `bn` into its producer, or why it cannot be folded.
pub(super) fn fold_plan(graph: &Graph, bn: NodeIndex) -> Result<Result<Patch, String>> {
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
