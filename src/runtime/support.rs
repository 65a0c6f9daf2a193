//! What tract 0.23.9 would misread or cannot load, found before loading so the refusal names the
//! node and the reason instead of surfacing a tract internal error (or, worse, a wrong run).
//!
//! Refused (all measured or read from the tract-onnx 0.23.9 source):
//! - nodes outside the standard domain: tract looks ops up by `op_type` only, so
//!   `com.example::Relu` would run as ONNX Relu. `ai.onnx.ml` is accepted only for the five ops
//!   tract implements from it (LinearRegressor, LinearClassifier, TreeEnsembleClassifier,
//!   Normalizer, CategoryMapper), and `com.microsoft` only for `MatMulNBits` (4 or 2 bits, no
//!   `g_idx`), which tract implements;
//! - op types tract has no builder for (`Loop`, sequence ops, ...): tract would insert a
//!   placeholder that fails later with a less useful message;
//! - element types tract has no `DatumType` for (bf16, float8, int4/uint4, int2/uint2, float4,
//!   float6, complex) in initializers, `Constant`s, tensor attributes, graph inputs/outputs, and
//!   `Cast`/`CastLike` targets;
//! - `QuantizeLinear`/`DequantizeLinear` left after simulation with: `block_size` (tract bails),
//!   a non-f32 scale (tract requires f32), a 16-bit or sub-byte zero point (tract's per-tensor path
//!   reads it as 8/32-bit and errors), a non-constant scale or zero point (tract requires
//!   constants), or on `QuantizeLinear` an `output_dtype`/`precision` attribute (tract ignores
//!   both and would produce uint8 where ONNX says otherwise: a wrong run);
//! - `sparse_initializer`s (tract ignores them, the tensor would become a dangling input).
//!
//! Not detected here, left to tract's own loader (reported as `not_checked` with tract's
//! message): `If` with a dynamic condition whose branches produce different shapes.

use std::collections::HashSet;

use super::simulate::{attr, attr_int, node_label};
use super::tensor::dtype_name;
use crate::onnx::proto::attribute_proto::AttributeType;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::type_proto::Value;
use crate::onnx::proto::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

const ML_OPS: [&str; 5] = [
    "LinearRegressor",
    "LinearClassifier",
    "TreeEnsembleClassifier",
    "Normalizer",
    "CategoryMapper",
];

/// Element types tract 0.23.9 can represent.
pub(crate) fn tract_can_hold(code: i32) -> bool {
    matches!(
        DataType::try_from(code),
        Ok(DataType::Float
            | DataType::Uint8
            | DataType::Int8
            | DataType::Uint16
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::String
            | DataType::Bool
            | DataType::Float16
            | DataType::Double
            | DataType::Uint32
            | DataType::Uint64)
    )
}

/// The first reason tract 0.23.9 cannot be trusted with `model`, or `None`.
pub fn refusal(model: &ModelProto) -> Option<String> {
    let graph = model.graph.as_ref()?;
    let registered: HashSet<String> = tract_onnx::onnx().op_register.0.keys().cloned().collect();
    let mut scope = Scope {
        registered: &registered,
        consts: Vec::new(),
    };
    scope.graph(graph, "graph")
}

struct Scope<'a> {
    registered: &'a HashSet<String>,
    /// Constant tensors of each enclosing graph (initializers and Constant outputs).
    consts: Vec<std::collections::HashMap<String, &'a TensorProto>>,
}

impl<'a> Scope<'a> {
    fn constant(&self, name: &str) -> Option<&'a TensorProto> {
        self.consts.iter().rev().find_map(|m| m.get(name).copied())
    }

    fn graph(&mut self, g: &'a GraphProto, what: &str) -> Option<String> {
        if let Some(s) = g.sparse_initializer.first() {
            let name = s.values.as_ref().map(|v| v.name()).unwrap_or("");
            return Some(format!(
                "{what} has sparse initializer '{name}'; tract 0.23.9 ignores sparse initializers"
            ));
        }
        let mut consts: std::collections::HashMap<String, &'a TensorProto> = g
            .initializer
            .iter()
            .map(|t| (t.name().to_string(), t))
            .collect();
        for n in &g.node {
            if n.op_type() == "Constant" {
                if let (Some(o), Some(t)) = (
                    n.output.first(),
                    attr(n, "value").and_then(|a| a.t.as_ref()),
                ) {
                    consts.insert(o.clone(), t);
                }
            }
        }
        self.consts.push(consts);
        // Nodes first: their reasons are the most specific ("DequantizeLinear 'dq3': ...").
        let r = g.node.iter().find_map(|n| self.node(n));
        self.consts.pop();
        if r.is_some() {
            return r;
        }
        for t in &g.initializer {
            if !tract_can_hold(t.data_type()) {
                return Some(format!(
                    "initializer '{}' is {}; tract 0.23.9 cannot load that element type",
                    t.name(),
                    dtype_name(t.data_type())
                ));
            }
        }
        for (v, kind) in g
            .input
            .iter()
            .map(|v| (v, "input"))
            .chain(g.output.iter().map(|v| (v, "output")))
        {
            if let Some(code) = elem_type(v) {
                if !tract_can_hold(code) {
                    return Some(format!(
                        "{what} {kind} '{}' is {}; tract 0.23.9 cannot hold that element type",
                        v.name(),
                        dtype_name(code)
                    ));
                }
            }
        }
        None
    }

    fn node(&mut self, n: &'a NodeProto) -> Option<String> {
        let label = node_label(n);
        let domain = n.domain();
        let op = n.op_type();
        match domain {
            "" | "ai.onnx" => {}
            "ai.onnx.ml" if ML_OPS.contains(&op) => {}
            // tract-onnx 0.23.9 implements MatMulNBits (4- and 2-bit, constant B/scales/zero
            // points, no g_idx; block 32 runs on its Q4_0 kernels): `weight-only --weight-bits 4`.
            "com.microsoft" if op == "MatMulNBits" => {
                let bits = attr_int(n, "bits").unwrap_or(4);
                if bits != 4 && bits != 2 {
                    return Some(format!(
                        "node {label}: MatMulNBits with bits = {bits}; tract 0.23.9 runs 4 and 2 only"
                    ));
                }
                if n.input.get(4).is_some_and(|g| !g.is_empty()) {
                    return Some(format!(
                        "node {label}: MatMulNBits with g_idx (act-order); tract 0.23.9 refuses it"
                    ));
                }
                return None;
            }
            _ => {
                let how = if self.registered.contains(op) {
                    format!("would run it as its own '{op}', ignoring the domain")
                } else {
                    "does not implement it".to_string()
                };
                return Some(format!(
                    "node {label} is in domain '{domain}'; tract 0.23.9 looks ops up by name only and {how}"
                ));
            }
        }
        if !self.registered.contains(op) {
            return Some(format!("node {label}: tract 0.23.9 has no '{op}' operator"));
        }
        for a in &n.attribute {
            if let Some(t) = &a.t {
                if !tract_can_hold(t.data_type()) {
                    return Some(format!(
                        "node {label}: attribute '{}' holds a {} tensor; tract 0.23.9 cannot load it",
                        a.name(),
                        dtype_name(t.data_type())
                    ));
                }
            }
        }
        if matches!(op, "Cast" | "CastLike") {
            if let Some(to) = attr(n, "to")
                .filter(|a| a.r#type() == AttributeType::Int)
                .and_then(|a| a.i)
            {
                if !tract_can_hold(to as i32) {
                    return Some(format!(
                        "node {label} casts to {}; tract 0.23.9 has no such element type",
                        dtype_name(to as i32)
                    ));
                }
            }
        }
        if matches!(op, "QuantizeLinear" | "DequantizeLinear") {
            if let Some(r) = self.qdq(n, &label) {
                return Some(r);
            }
        }
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                let what = format!("subgraph '{}' of node {label}", a.name());
                if let Some(r) = self.graph(g, &what) {
                    return Some(r);
                }
            }
        }
        None
    }

    fn qdq(&self, n: &NodeProto, label: &str) -> Option<String> {
        let op = n.op_type();
        if attr_int(n, "block_size").unwrap_or(0) != 0 {
            return Some(format!(
                "{op} {label} is block-wise (block_size = {}) on a non-constant input; tract 0.23.9 \
                 cannot run blocked quantization",
                attr_int(n, "block_size").unwrap_or(0)
            ));
        }
        if op == "QuantizeLinear" {
            for a in ["output_dtype", "precision"] {
                if attr_int(n, a).unwrap_or(0) != 0 {
                    return Some(format!(
                        "QuantizeLinear {label} sets '{a}'; tract 0.23.9 ignores that attribute and \
                         would compute a different result"
                    ));
                }
            }
        }
        let input = |i: usize| n.input.get(i).filter(|s| !s.is_empty());
        let Some(scale_name) = input(1) else {
            return Some(format!("{op} {label} has no scale input"));
        };
        let Some(scale) = self.constant(scale_name) else {
            return Some(format!(
                "{op} {label}: scale '{scale_name}' is not a constant; tract 0.23.9 requires a constant scale"
            ));
        };
        if scale.data_type() != DataType::Float as i32 {
            return Some(format!(
                "{op} {label}: scale '{scale_name}' is {}; tract 0.23.9 only runs float32 scales",
                dtype_name(scale.data_type())
            ));
        }
        if let Some(zp_name) = input(2) {
            let Some(zp) = self.constant(zp_name) else {
                return Some(format!(
                    "{op} {label}: zero point '{zp_name}' is not a constant; tract 0.23.9 requires a constant"
                ));
            };
            let ok = match op {
                "QuantizeLinear" => matches!(
                    DataType::try_from(zp.data_type()),
                    Ok(DataType::Int8 | DataType::Uint8)
                ),
                _ => matches!(
                    DataType::try_from(zp.data_type()),
                    Ok(DataType::Int8 | DataType::Uint8 | DataType::Int32)
                ),
            };
            if !ok {
                return Some(format!(
                    "{op} {label}: zero point '{zp_name}' is {}; tract 0.23.9 only runs 8-bit Q/DQ \
                     (and int32 for DequantizeLinear) on non-constant tensors",
                    dtype_name(zp.data_type())
                ));
            }
        }
        if op == "DequantizeLinear" {
            if let Some(x) = input(0).and_then(|x| self.constant(x)) {
                if !tract_can_hold(x.data_type()) {
                    return Some(format!(
                        "DequantizeLinear {label}: input is {}; tract 0.23.9 cannot load it",
                        dtype_name(x.data_type())
                    ));
                }
            }
        }
        None
    }
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}
