//! What the IR knows about operators: input/output arity of standard ONNX ops (for load-time
//! checks) and typed access to node attributes. Ops not listed here are carried opaquely.

use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use anyhow::{bail, Result};

/// Allowed input count range `(min, max)` of a standard-domain op; `None` = unknown op or
/// variadic without a useful bound.
pub fn input_arity(op_type: &str) -> Option<(usize, usize)> {
    const MANY: usize = usize::MAX;
    Some(match op_type {
        "Relu" | "Sigmoid" | "Tanh" | "Exp" | "Log" | "Sqrt" | "Neg" | "Abs" | "Reciprocal"
        | "Identity" | "Flatten" | "GlobalAveragePool" | "GlobalMaxPool" | "MaxPool"
        | "AveragePool" | "Softmax" | "LogSoftmax" | "Transpose" | "Shape" | "Erf" | "Floor"
        | "Ceil" | "HardSigmoid" | "HardSwish" | "LeakyRelu" | "Elu" | "Selu" | "Softplus"
        | "Cast" | "Not" | "Sign" | "Round" | "LRN" | "Size" | "Gelu" | "Mish" => (1, 1),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "MatMul" | "PRelu" | "Equal" | "Greater"
        | "Less" | "And" | "Or" | "Xor" | "Reshape" | "Expand" | "Tile" | "GreaterOrEqual"
        | "LessOrEqual" | "Mod" => (2, 2),
        "Gather" | "GatherElements" | "GatherND" => (2, 2),
        "Conv" | "ConvTranspose" | "Gemm" => (2, 3),
        "BatchNormalization" => (5, 5),
        "InstanceNormalization" => (3, 3),
        "LayerNormalization" => (2, 3),
        "Clip" => (1, 3),
        "Dropout" => (1, 3),
        "QuantizeLinear" | "DequantizeLinear" => (2, 3),
        "QLinearConv" => (8, 9),
        "QLinearMatMul" => (8, 8),
        "MatMulInteger" => (2, 4),
        "ConvInteger" => (2, 4),
        "Pad" => (1, 4),
        "Slice" => (1, 5),
        "Resize" => (1, 4),
        "Split" => (1, 2),
        "Squeeze" | "Unsqueeze" => (1, 2),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2" => {
            (1, 2)
        }
        "Where" => (3, 3),
        "If" => (1, 1),
        "Concat" | "Sum" | "Max" | "Min" | "Mean" => (1, MANY),
        "Constant" => (0, 0),
        "ConstantOfShape" => (1, 1),
        "Range" => (3, 3),
        "TopK" => (2, 2),
        "LSTM" | "GRU" | "RNN" => (3, 8),
        _ => return None,
    })
}

/// The standard ONNX domain: `""` or its alias `"ai.onnx"`.
/// How the tool names a node to the user, in a form options such as `--exclude-node` accept
/// back: its name, or for an unnamed node its first output tensor (unique in a valid graph).
pub fn node_label(node: &NodeProto) -> &str {
    if !node.name().is_empty() {
        return node.name();
    }
    node.output
        .iter()
        .find(|o| !o.is_empty())
        .map(String::as_str)
        .unwrap_or("")
}

pub fn is_standard_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// Typed attribute accessors on a node.
pub trait Attrs {
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    fn attr_int(&self, name: &str) -> Result<Option<i64>>;
    fn attr_float(&self, name: &str) -> Result<Option<f32>>;
    fn attr_ints(&self, name: &str) -> Result<Option<Vec<i64>>>;
    fn attr_string(&self, name: &str) -> Result<Option<String>>;
}

fn kind_mismatch(node: &NodeProto, a: &AttributeProto, want: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "node '{}' ({}): attribute '{}' is {:?}, expected {want}",
        node.name(),
        node.op_type(),
        a.name(),
        a.r#type()
    )
}

impl Attrs for NodeProto {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name() == name)
    }
    fn attr_int(&self, name: &str) -> Result<Option<i64>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::Int || a.i.is_some() => Ok(Some(a.i())),
            Some(a) => Err(kind_mismatch(self, a, "an int")),
        }
    }
    fn attr_float(&self, name: &str) -> Result<Option<f32>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::Float || a.f.is_some() => Ok(Some(a.f())),
            Some(a) => Err(kind_mismatch(self, a, "a float")),
        }
    }
    fn attr_ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::Ints || !a.ints.is_empty() => {
                Ok(Some(a.ints.clone()))
            }
            Some(a) => Err(kind_mismatch(self, a, "ints")),
        }
    }
    fn attr_string(&self, name: &str) -> Result<Option<String>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::String || a.s.is_some() => {
                Ok(Some(String::from_utf8_lossy(a.s()).into_owned()))
            }
            Some(a) => Err(kind_mismatch(self, a, "a string")),
        }
    }
}

/// Attribute constructors for nodes that passes create.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// Set (replace or append) an attribute on a node.
pub fn set_attr(node: &mut NodeProto, attr: AttributeProto) {
    match node.attribute.iter_mut().find(|a| a.name == attr.name) {
        Some(slot) => *slot = attr,
        None => node.attribute.push(attr),
    }
}

/// A new node in the standard domain.
pub fn node(op_type: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op_type.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Check a node's input count against the op's arity, if known.
pub fn check_arity(node: &NodeProto) -> Result<()> {
    if !is_standard_domain(node.domain()) {
        return Ok(());
    }
    if let Some((lo, hi)) = input_arity(node.op_type()) {
        // Trailing empty names are absent optional inputs.
        let n = node.input.len();
        if n < lo || n > hi {
            let range = if lo == hi {
                format!("{lo}")
            } else if hi == usize::MAX {
                format!("at least {lo}")
            } else {
                format!("{lo} to {hi}")
            };
            bail!(
                "node '{}' ({}) has {n} input(s); {} takes {range}",
                node.name(),
                node.op_type(),
                node.op_type()
            );
        }
    }
    Ok(())
}
