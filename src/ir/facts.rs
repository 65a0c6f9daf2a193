//! Static facts about values and nodes, in one home: declared shapes, ranks and element types
//! ([`static_shape`], [`static_rank`], [`declared_rank`], [`declared_elem_type`]), the shapes a
//! model states ([`known_shapes`]; [`crate::runtime::value_shapes`] completes them with tract's
//! shape analysis), the MACs of the heavy ops ([`node_macs`]) and whole-model statistics
//! ([`model_stats`]: op histogram, parameters, bytes by element type, MACs).
//!
//! Everything here reads the graph only; nothing runs a model.

use crate::ir::op::{self, Attrs};
use crate::ir::{Graph, Model};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{type_proto, NodeProto, TensorProto, ValueInfoProto};
use crate::onnx::tensor;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// A dimension as declared: fixed, symbolic (`N`), or unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(d) => write!(f, "{d}"),
            Dim::Symbol(s) => write!(f, "{s}"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ValueSummary {
    pub name: String,
    pub elem_type: String,
    /// `None` when the rank is unknown.
    pub shape: Option<Vec<Dim>>,
}

impl ValueSummary {
    pub fn describe(&self) -> String {
        match &self.shape {
            Some(dims) => format!(
                "{}[{}]",
                self.elem_type,
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => format!("{}[?]", self.elem_type),
        }
    }

    /// Fixed dims, with symbolic ones taken from `fixed` or else `None`.
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.shape
            .as_ref()?
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => Some(*v),
                Dim::Symbol(_) => None,
            })
            .collect()
    }
}

/// Summarise a ValueInfoProto's tensor type.
pub fn value_summary(v: &ValueInfoProto) -> ValueSummary {
    let mut elem_type = "?".to_string();
    let mut shape = None;
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        if let Ok(dt) = crate::onnx::proto::tensor_proto::DataType::try_from(t.elem_type()) {
            elem_type = tensor::type_name(dt).to_string();
        }
        shape =
            t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(
                            crate::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(v),
                        ) if *v >= 0 => Dim::Fixed(*v as usize),
                        Some(
                            crate::onnx::proto::tensor_shape_proto::dimension::Value::DimParam(p),
                        ) => Dim::Symbol(p.clone()),
                        _ => Dim::Symbol("?".into()),
                    })
                    .collect()
            });
    } else if v.r#type.is_some() {
        elem_type = "non-tensor".into();
    }
    ValueSummary {
        name: v.name().to_string(),
        elem_type,
        shape,
    }
}

/// The statically known shape of a tensor value: initializer dims, or the declared tensor
/// type's shape (`Some(d)` per fixed dimension, `None` per symbolic or unknown one).
/// `None` when the rank is unknown.
pub fn static_shape(graph: &Graph, value: &str) -> Option<Vec<Option<i64>>> {
    use crate::onnx::proto::{tensor_shape_proto::dimension, type_proto};
    if let Some(t) = graph.constant(value) {
        return Some(t.dims.iter().map(|&d| Some(d)).collect());
    }
    let ty = graph.declared(value)?.r#type.as_ref()?;
    let Some(type_proto::Value::TensorType(tt)) = &ty.value else {
        return None;
    };
    let shape = tt.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(dimension::Value::DimValue(v)) if v >= 0 => Some(v),
                _ => None,
            })
            .collect(),
    )
}

/// The element type a value is declared with (graph input/output, value_info).
pub fn declared_elem_type(graph: &Graph, value: &str) -> Option<DataType> {
    if let Some(t) = graph.constant(value) {
        return tensor::data_type(t).ok();
    }
    let ty = graph.declared(value)?.r#type.as_ref()?;
    match &ty.value {
        Some(type_proto::Value::TensorType(tt)) => DataType::try_from(tt.elem_type?).ok(),
        _ => None,
    }
}

/// The rank of a value when it is known statically.
pub fn static_rank(graph: &Graph, value: &str) -> Option<usize> {
    let mut value = value;
    loop {
        if let Some(s) = static_shape(graph, value) {
            return Some(s.len());
        }
        let p = graph.node(graph.producer_node(value)?);
        if !op::is_standard_domain(p.domain()) {
            return None;
        }
        match p.op_type() {
            "Flatten" | "Gemm" => return Some(2),
            "Conv" | "ConvTranspose" => return Some(graph.constant(p.input.get(1)?)?.dims.len()),
            // Unary elementwise ops and Concat keep their (first) input's rank.
            "Relu" | "LeakyRelu" | "Clip" | "Sigmoid" | "Tanh" | "HardSwish" | "HardSigmoid"
            | "Identity" | "Dropout" | "Erf" | "Gelu" | "Elu" | "Selu" | "Softplus" | "Neg"
            | "Abs" | "Exp" | "Sqrt" | "Concat" => value = p.input.first()?,
            _ => return None,
        }
    }
}

/// The rank of a value from graph io / value_info / constant initializers.
pub fn declared_rank(g: &Graph, name: &str) -> Option<usize> {
    if let Some(t) = g.initializers.get(name) {
        return Some(t.dims.len());
    }
    g.inputs
        .iter()
        .chain(&g.outputs)
        .chain(&g.value_info)
        .find(|v| v.name() == name)
        .and_then(|v| match v.r#type.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => t.shape.as_ref().map(|s| s.dim.len()),
            _ => None,
        })
}

/// The constant a value holds: an initializer (not overridable by a graph input) or the
/// output of a standard-domain `Constant` node's `value` tensor.
pub fn const_tensor<'a>(graph: &'a Graph, name: &str) -> Option<&'a TensorProto> {
    if let Some(t) = graph.constant(name) {
        return Some(t);
    }
    let n = graph.node(graph.producer_node(name)?);
    (n.op_type() == "Constant" && op::is_standard_domain(n.domain()))
        .then(|| n.attr("value").and_then(|a| a.t.as_ref()))
        .flatten()
}

/// The one value of a constant scalar (or one-element tensor).
pub fn const_scalar(graph: &Graph, name: &str) -> Option<f64> {
    let v = tensor::to_f64(const_tensor(graph, name)?).ok()?;
    (v.len() == 1).then(|| v.iter().copied().next().unwrap_or(0.0))
}

/// Clip bounds from inputs (opset >= 11) or attributes (opset < 11); an absent bound is
/// unbounded; `None` when a given bound is not a constant scalar.
pub fn clip_bounds(graph: &Graph, n: &NodeProto) -> Option<(f64, f64)> {
    let bound =
        |slot: usize, attr: &str, default: f64| match n.input.get(slot).filter(|s| !s.is_empty()) {
            Some(name) => const_scalar(graph, name),
            None => Some(n.attr_float(attr).ok()?.map_or(default, f64::from)),
        };
    Some((
        bound(1, "min", f64::NEG_INFINITY)?,
        bound(2, "max", f64::INFINITY)?,
    ))
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelStats {
    pub nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
    /// Elements in initializers (weights, biases, constants).
    pub parameters: usize,
    /// Initializer payload bytes by element type.
    pub bytes_by_dtype: BTreeMap<String, usize>,
    pub initializer_bytes: usize,
    /// Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul whose shapes are known.
    pub macs: u64,
    /// Heavy ops whose MACs could not be counted (unknown shapes).
    pub macs_unknown_nodes: usize,
    pub opsets: BTreeMap<String, i64>,
}

/// Shapes known for values: declared graph io and value_info, initializers, plus `extra`.
pub fn known_shapes(model: &Model) -> HashMap<String, Vec<usize>> {
    let g = &model.graph;
    let mut shapes = HashMap::new();
    for v in g.inputs.iter().chain(&g.outputs).chain(&g.value_info) {
        if let Some(s) = value_summary(v).fixed_shape() {
            shapes.insert(v.name().to_string(), s);
        }
    }
    for (name, t) in &g.initializers {
        if let Ok(s) = tensor::shape(t) {
            shapes.insert(name.clone(), s);
        }
    }
    // Quantized or fp16 weights reach their layer through DequantizeLinear / Cast, which keep
    // the stored tensor's shape (also where tract cannot analyse the model, e.g. int4).
    for ix in g.node_indices() {
        let n = g.node(ix);
        if matches!(n.op_type(), "DequantizeLinear" | "Cast") {
            let dims = n.input.first().and_then(|i| shapes.get(i)).cloned();
            if let (Some(dims), Some(out)) = (dims, n.output.first()) {
                shapes.entry(out.clone()).or_insert(dims);
            }
        }
    }
    shapes
}

/// MACs of one node given value shapes, when it is a heavy op with known shapes.
pub fn node_macs(
    node: &crate::onnx::proto::NodeProto,
    shapes: &HashMap<String, Vec<usize>>,
) -> Option<u64> {
    let shape = |i: usize| node.input.get(i).and_then(|n| shapes.get(n));
    let out = node.output.first().and_then(|n| shapes.get(n));
    // Saturating: a corrupt shape must not overflow (or panic) a statistic.
    let prod = |s: &[usize]| s.iter().fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
    match node.op_type() {
        "Conv" => {
            // out elements x (Cin/group x kernel) per output element
            let w = shape(1)?;
            Some(prod(out?).saturating_mul(prod(w.get(1..)?)))
        }
        "ConvTranspose" => {
            // every input element is scattered through Cout/group x kernel weights
            let w = shape(1)?;
            Some(prod(shape(0)?).saturating_mul(prod(w.get(1..)?)))
        }
        "Gemm" => {
            let a = shape(0)?;
            let trans_a = node.attr_int("transA").ok().flatten().unwrap_or(0) != 0;
            let k = if trans_a { a.first()? } else { a.get(1)? };
            Some(prod(out?).saturating_mul(*k as u64))
        }
        "MatMul" => {
            let a = shape(0)?;
            Some(prod(out?).saturating_mul(*a.last()? as u64))
        }
        _ => None,
    }
}

pub fn model_stats(model: &Model, shapes: &HashMap<String, Vec<usize>>) -> ModelStats {
    let g = &model.graph;
    let mut op_histogram = BTreeMap::new();
    let mut macs = 0u64;
    let mut macs_unknown_nodes = 0;
    for ix in g.node_indices() {
        let n = g.node(ix);
        let key = if crate::ir::op::is_standard_domain(n.domain()) {
            n.op_type().to_string()
        } else {
            format!("{}::{}", n.domain(), n.op_type())
        };
        *op_histogram.entry(key).or_insert(0) += 1;
        if matches!(n.op_type(), "Conv" | "ConvTranspose" | "Gemm" | "MatMul") {
            match node_macs(n, shapes) {
                Some(m) => macs = macs.saturating_add(m),
                None => macs_unknown_nodes += 1,
            }
        }
    }
    let mut bytes_by_dtype = BTreeMap::new();
    let mut parameters = 0;
    let mut initializer_bytes = 0;
    for t in g.initializers.values() {
        let name = tensor::data_type(t)
            .map(tensor::type_name)
            .unwrap_or("unknown");
        let bytes = tensor::payload_bytes(t).unwrap_or(0);
        *bytes_by_dtype.entry(name.to_string()).or_insert(0) += bytes;
        initializer_bytes += bytes;
        parameters += tensor::element_count(t).unwrap_or(0);
    }
    let opsets = model
        .shell
        .opset_import
        .iter()
        .map(|o| {
            let d = if o.domain().is_empty() {
                "ai.onnx"
            } else {
                o.domain()
            };
            (d.to_string(), o.version())
        })
        .collect();
    ModelStats {
        nodes: g.node_count(),
        op_histogram,
        parameters,
        bytes_by_dtype,
        initializer_bytes,
        macs,
        macs_unknown_nodes,
        opsets,
    }
}
