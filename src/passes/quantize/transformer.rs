//! Transformer structure: recognises the units a transformer export is made of (attention,
//! layer norms in their fused or decomposed form, GELU) and says, as a rules table, which
//! tensors of such a graph int8 may touch.
//!
//! Why a separate placement: the CNN rules (see [`super::placement`]) quantize every tensor
//! between quantized ops, which on a GPT puts uint8 grids on the residual stream (a few
//! channels carry values 10-100x the rest, so one per-tensor grid leaves the others a handful
//! of levels), on attention scores before a Softmax, and on LayerNorm inputs: ONNX Runtime's
//! default `quantize_static` does this and takes a 4-block GPT from perplexity 2.88 to 94.
//!
//! ```text
//! before: h -> LayerNormalization -> x -> MatMul(W) -> Add(b) -> ... -> Softmax -> MatMul(V)
//! after:  h -> LayerNormalization -> x -> Q -> DQ -> MatMul(DQ(W_int8, s_w[n])) -> Add(b) ->
//!         ... -> Softmax -> MatMul(V)      (only the linear layer's input and weight are int8)
//! ```
//!
//! A graph is a transformer when it holds at least one layer-norm unit (a
//! `LayerNormalization`, or the decomposition torch exports: `Sqrt(Add(ReduceMean(..), eps))`
//! feeding a `Div`/`Reciprocal`, which also covers RMSNorm) or an attention unit (a `Softmax`
//! whose input comes, through elementwise scaling and masking, from a `MatMul` of two
//! activations). CNNs have neither (a classifier's final Softmax reads a Gemm/Conv of a
//! constant weight, not an activation x activation product), so their placement, and their
//! bytes, are unchanged.
//!
//! In a transformer, [`RULES`] applies: only linear layers (MatMul/Gemm with a constant 2-D
//! weight, the LM head included) get int8, on their activation input and per-channel weight;
//! their output stays float (it feeds a bias Add and the residual stream). Activation x
//! activation products are quantized only when the caller measured that the output allows it
//! (see `choose.rs`); everything else stays float.

use crate::ir::Graph;
use petgraph::stable_graph::NodeIndex;
use std::collections::BTreeSet;

/// How a transformer unit is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// int8 activation input + per-channel int8 weight; float output.
    Int8Linear,
    /// int8 on both inputs only where the measured output error allows it.
    Measured,
    /// Left float.
    Float,
}

/// One row of the rules table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub unit: &'static str,
    pub treatment: Treatment,
    pub why: &'static str,
}

/// The transformer rules table: what int8 may touch, and the evidence.
pub const RULES: &[Rule] = &[
    Rule {
        unit: "MatMul/Gemm with a constant 2-D weight (q/k/v, projections, MLP, LM head)",
        treatment: Treatment::Int8Linear,
        why: "the weights are most of the bytes and MACs; per-channel int8 keeps >40 dB weight \
              SQNR and the input (a LayerNorm or GELU output, no residual outliers) fits uint8; \
              ONNX Runtime runs DQ->MatMul as MatMulIntegerToFloat / DynamicQuantizeMatMul",
    },
    Rule {
        unit: "MatMul of two activations (Q x K^T, attention x V)",
        treatment: Treatment::Measured,
        why: "scores before Softmax span a wide range and softmax outputs are peaked; a uint8 \
              grid on them is where most of the static recipes' error comes from",
    },
    Rule {
        unit: "Softmax, and the scaling/masking between the score MatMul and it (Mul/Div by \
               1/sqrt(d), Add/Where with large negative constants)",
        treatment: Treatment::Float,
        why: "a -1e9 or -inf mask constant makes any uint8 grid over the scores useless",
    },
    Rule {
        unit: "LayerNormalization, and its decomposition (ReduceMean, Sub, Pow, Add, Sqrt, Div)",
        treatment: Treatment::Float,
        why: "reads the residual stream (outlier channels) and divides by a data-dependent norm",
    },
    Rule {
        unit: "GELU (Div, Erf, Add, Mul) and other activations",
        treatment: Treatment::Float,
        why: "cheap elementwise math; the following linear layer quantizes its output",
    },
    Rule {
        unit: "residual Add, bias Add, embeddings (Gather), positions (Range), shapes",
        treatment: Treatment::Float,
        why: "residual-stream outliers; index and shape tensors are not float values",
    },
];

/// The transformer units found in a graph.
#[derive(Debug, Clone, Default)]
pub struct Structure {
    /// LayerNormalization nodes plus decomposed layer-norm units (counted by their Sqrt).
    pub layer_norms: usize,
    /// Softmax nodes recognised as attention.
    pub attention: usize,
    /// Erf nodes (GELU).
    pub gelus: usize,
    /// Activation x activation MatMuls of the attention units (score and value products).
    pub attention_matmuls: BTreeSet<NodeIndex>,
}

impl Structure {
    pub fn is_transformer(&self) -> bool {
        self.layer_norms > 0 || self.attention > 0
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "transformer placement: {} layer norm(s), {} attention unit(s) ({} activation x activation MatMul(s)), {} GELU(s) recognised; only linear layers are int8, their outputs, residual stream, norms, softmax and masks stay float",
            self.layer_norms,
            self.attention,
            self.attention_matmuls.len(),
            self.gelus
        )
    }

    /// Recognise the units of `g`.
    pub fn find(g: &Graph) -> Structure {
        let mut s = Structure::default();
        let std = |ix: NodeIndex| crate::ir::op::is_standard_domain(g.node(ix).domain());
        for ix in g.node_indices() {
            if !std(ix) {
                continue;
            }
            match g.node(ix).op_type() {
                "LayerNormalization" | "SimplifiedLayerNormalization" | "RMSNormalization" => {
                    s.layer_norms += 1
                }
                "Sqrt" if is_decomposed_norm(g, ix) => s.layer_norms += 1,
                "Erf" => s.gelus += 1,
                "Softmax" => {
                    let scores = score_matmul(g, ix);
                    let values = value_matmuls(g, ix);
                    if scores.is_some() || !values.is_empty() {
                        s.attention += 1;
                        s.attention_matmuls.extend(scores);
                        s.attention_matmuls.extend(values);
                    }
                }
                _ => {}
            }
        }
        s
    }
}

/// Both inputs of `ix` are produced at run time.
fn two_activations(g: &Graph, ix: NodeIndex) -> bool {
    let n = g.node(ix);
    n.input.len() >= 2
        && n.input[..2]
            .iter()
            .all(|i| !i.is_empty() && g.constant(i).is_none())
}

/// `Sqrt(Add(ReduceMean(..), eps))` (or `Sqrt(ReduceMean(..))`) read by a `Div` or a
/// `Reciprocal`: the normaliser of a decomposed LayerNorm or RMSNorm.
fn is_decomposed_norm(g: &Graph, sqrt: NodeIndex) -> bool {
    let producer_op = |v: &str| g.producer_node(v).map(|p| (p, g.node(p).op_type()));
    let Some(x) = g.node(sqrt).input.first() else {
        return false;
    };
    let mean = match producer_op(x) {
        Some((p, "Add")) => g
            .node(p)
            .input
            .iter()
            .any(|i| matches!(producer_op(i), Some((_, "ReduceMean")))),
        Some((_, "ReduceMean")) => true,
        _ => false,
    };
    let out = g
        .node(sqrt)
        .output
        .first()
        .map(String::as_str)
        .unwrap_or("");
    mean && g
        .consumers(out)
        .iter()
        .any(|&(c, _)| matches!(g.node(c).op_type(), "Div" | "Reciprocal"))
}

/// The activation x activation MatMul whose product reaches Softmax `sm` through elementwise
/// scaling and masking (Mul, Div, Add, Sub, Where, Cast), at most 6 nodes up.
fn score_matmul(g: &Graph, sm: NodeIndex) -> Option<NodeIndex> {
    let mut frontier = vec![sm];
    for _ in 0..6 {
        let mut next = Vec::new();
        for ix in frontier {
            for i in &g.node(ix).input {
                let Some(p) = g.producer_node(i) else {
                    continue;
                };
                match g.node(p).op_type() {
                    "MatMul" if two_activations(g, p) => return Some(p),
                    "Mul" | "Div" | "Add" | "Sub" | "Where" | "Cast" => next.push(p),
                    _ => {}
                }
            }
        }
        frontier = next;
    }
    None
}

/// The activation x activation MatMuls reading Softmax `sm`'s output as their first input
/// (directly or through Dropout/Cast).
fn value_matmuls(g: &Graph, sm: NodeIndex) -> Vec<NodeIndex> {
    let mut out = Vec::new();
    let mut values: Vec<String> = g.node(sm).output.iter().take(1).cloned().collect();
    for _ in 0..3 {
        let mut next = Vec::new();
        for v in &values {
            for &(c, slot) in g.consumers(v) {
                let n = g.node(c);
                match n.op_type() {
                    "MatMul" if slot == crate::ir::InSlot::Arg(0) && two_activations(g, c) => {
                        out.push(c)
                    }
                    "Dropout" | "Cast" | "Identity" => {
                        next.extend(n.output.iter().take(1).cloned())
                    }
                    _ => {}
                }
            }
        }
        values = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Model;

    fn graph(text: &str) -> Graph {
        Model::from_proto(crate::onnx::text::parse_model(text).unwrap())
            .unwrap()
            .graph
    }

    #[test]
    fn decomposed_layer_norm_and_attention_are_recognised() {
        let g = graph(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8] x, float[1,4,8] k) => (float[1,4,8] y)
<float eps = {1e-5}, float two = {2.0}, float[1] scale = {0.35}>
{
   m = ReduceMean <axes = [-1]> (x)
   d = Sub (x, m)
   p = Pow (d, two)
   v = ReduceMean <axes = [-1]> (p)
   ve = Add (v, eps)
   s = Sqrt (ve)
   n = Div (d, s)
   kt = Transpose <perm = [0, 2, 1]> (k)
   sc = MatMul (n, kt)
   scs = Mul (sc, scale)
   pr = Softmax <axis = -1> (scs)
   y = MatMul (pr, k)
}"#,
        );
        let s = Structure::find(&g);
        assert_eq!((s.layer_norms, s.attention), (1, 1));
        assert_eq!(s.attention_matmuls.len(), 2);
        assert!(s.is_transformer());
    }

    #[test]
    fn a_classifier_softmax_is_not_attention() {
        let g = graph(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,2] y)
<float[4,2] w = {1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0}>
{
   z = MatMul (x, w)
   y = Softmax <axis = -1> (z)
}"#,
        );
        assert!(!Structure::find(&g).is_transformer());
    }
}
