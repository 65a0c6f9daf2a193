//! Weighted layers (Conv, ConvTranspose, Gemm, MatMul with a constant weight) seen uniformly:
//! where the weight and bias live and which weight axes are the output and input channels.
//!
//! Weight layouts:
//! - Conv `W[Cout, Cin/group, k...]`: out axis 0, in axis 1.
//! - ConvTranspose `W[Cin, Cout/group, k...]`: out axis 1, in axis 0 (with group > 1, output
//!   channel `g*Cout/group + j` is column `j` of the rows of group `g`).
//! - Gemm `Y = A·B (+C)`: B is `[K, N]` (transB=0: out axis 1) or `[N, K]` (transB=1: out axis 0).
//! - MatMul `Y = X·W` with constant 2-D `W[K, N]`: out axis 1, in axis 0.

use crate::ir::op::Attrs;
use crate::ir::Graph;
use crate::onnx::proto::NodeProto;
use crate::onnx::tensor;
use anyhow::{Context, Result};
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Conv { group: usize },
    ConvTranspose { group: usize },
    Gemm { trans_b: bool },
    MatMul,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub node: NodeIndex,
    pub kind: LayerKind,
    /// Name of the constant weight initializer.
    pub weight: String,
    /// Name of the constant bias initializer, if any (Gemm's C only when it is 1-D).
    pub bias: Option<String>,
    pub weight_shape: Vec<usize>,
}

impl Layer {
    /// The layer at `ix`, when it is a Conv/ConvTranspose/Gemm/MatMul whose weight is a
    /// constant initializer (and whose bias, if present, is constant too).
    pub fn of(graph: &Graph, ix: NodeIndex) -> Option<Layer> {
        let node = graph.node(ix);
        if !crate::ir::op::is_standard_domain(node.domain()) {
            return None;
        }
        let kind = match node.op_type() {
            "Conv" => LayerKind::Conv {
                group: group(node)?,
            },
            "ConvTranspose" => LayerKind::ConvTranspose {
                group: group(node)?,
            },
            "Gemm" => {
                // Only the plain form: alpha = 1, no transposed A.
                let alpha = node.attr_float("alpha").ok()?.unwrap_or(1.0);
                let trans_a = node.attr_int("transA").ok()?.unwrap_or(0);
                if alpha != 1.0 || trans_a != 0 {
                    return None;
                }
                LayerKind::Gemm {
                    trans_b: node.attr_int("transB").ok()?.unwrap_or(0) != 0,
                }
            }
            "MatMul" => LayerKind::MatMul,
            _ => return None,
        };
        let weight = node.input.get(1)?.clone();
        let w = graph.constant(&weight)?;
        let weight_shape = tensor::shape(w).ok()?;
        let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
            None => None,
            Some(b) => {
                let t = graph.constant(b)?;
                let beta = node.attr_float("beta").ok()?.unwrap_or(1.0);
                if tensor::shape(t).ok()?.len() != 1 || beta != 1.0 {
                    return None;
                }
                Some(b.clone())
            }
        };
        let rank_ok = match kind {
            LayerKind::Conv { .. } | LayerKind::ConvTranspose { .. } => weight_shape.len() >= 3,
            LayerKind::Gemm { .. } | LayerKind::MatMul => weight_shape.len() == 2,
        };
        rank_ok.then_some(Layer {
            node: ix,
            kind,
            weight,
            bias,
            weight_shape,
        })
    }

    /// The weight axis holding output channels.
    pub fn out_axis(&self) -> usize {
        match self.kind {
            LayerKind::Conv { .. } => 0,
            LayerKind::ConvTranspose { .. } => 1,
            LayerKind::Gemm { trans_b } => usize::from(!trans_b),
            LayerKind::MatMul => 1,
        }
    }

    /// The weight axis holding input channels.
    pub fn in_axis(&self) -> usize {
        match self.kind {
            LayerKind::Conv { .. } => 1,
            LayerKind::ConvTranspose { .. } => 0,
            LayerKind::Gemm { trans_b } => usize::from(trans_b),
            LayerKind::MatMul => 0,
        }
    }

    pub fn group(&self) -> usize {
        match self.kind {
            LayerKind::Conv { group } | LayerKind::ConvTranspose { group } => group,
            _ => 1,
        }
    }

    /// Output channels of the layer's result.
    pub fn out_channels(&self) -> usize {
        match self.kind {
            LayerKind::ConvTranspose { group } => self.weight_shape[1] * group,
            _ => self.weight_shape[self.out_axis()],
        }
    }

    /// Input channels the layer reads.
    pub fn in_channels(&self) -> usize {
        match self.kind {
            LayerKind::Conv { group } => self.weight_shape[1] * group,
            _ => self.weight_shape[self.in_axis()],
        }
    }

    /// True for a depthwise conv (one input channel per group, group = channels).
    pub fn is_depthwise(&self) -> bool {
        matches!(self.kind, LayerKind::Conv { group } if group > 1 && self.weight_shape[1] == 1)
    }

    pub fn weight_f32(&self, graph: &Graph) -> Result<ArrayD<f32>> {
        let t = graph
            .constant(&self.weight)
            .with_context(|| format!("weight '{}' is not a constant", self.weight))?;
        tensor::to_f32(t)
    }

    pub fn bias_f32(&self, graph: &Graph) -> Result<Option<ArrayD<f32>>> {
        self.bias
            .as_ref()
            .map(|b| {
                let t = graph
                    .constant(b)
                    .with_context(|| format!("bias '{b}' is not a constant"))?;
                tensor::to_f32(t)
            })
            .transpose()
    }
}

fn group(node: &NodeProto) -> Option<usize> {
    let g = node.attr_int("group").ok()?.unwrap_or(1);
    usize::try_from(g).ok().filter(|&g| g >= 1)
}
