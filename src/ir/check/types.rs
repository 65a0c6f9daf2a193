//! Element-type inference over a graph's nodes, as ONNX type inference does it, so a model
//! whose types contradict themselves is refused at load instead of passing through to an
//! output `onnx.checker` (and every runtime) rejects.
//!
//! [`ValueTypes`] starts from what a graph states: values of enclosing graphs, graph inputs,
//! initializers, `Constant` outputs, then the element types `value_info` and graph outputs
//! declare. Walking the nodes in order, each node's output types follow from its schema
//! ([`output_types`]):
//! - an output bound to a type parameter an input fixes (`T` of `Add`'s `C`, `T2` of
//!   `DequantizeLinear`'s `y` from `x_scale`) has that input's type;
//! - an output whose parameter allows one type (`Shape` -> int64) has it;
//! - attributes and optional inputs set the rest: `Cast`'s `to`, `Constant`'s value,
//!   `ConstantOfShape`'s `value`, `QuantizeLinear`'s zero point or `output_dtype` (else uint8),
//!   the `dtype` of `EyeLike`/`Random*`;
//! - `If` outputs are its branches' outputs (both branches must agree, and give as many
//!   outputs as the node has), `Loop` and `Scan` outputs their body's.
//!
//! Invariants enforced: a declared element type is one ONNX defines; a constant (initializer
//! or `Constant`) has the type its declaration states; an inferred output type
//! equals the type declared for that value (`value_info`, graph outputs, subgraph outputs), as
//! ONNX's "Inferred elem type differs from existing elem type" demands. Unknown stays unknown:
//! custom domains, model-local functions and ops the rules do not cover infer nothing.

use super::who;
use crate::ir::op::Attrs;
use crate::onnx::proto::{
    tensor_proto::DataType, type_proto, GraphProto, NodeProto, ValueInfoProto,
};
use crate::onnx::schema::{OpSchema, Param};
use anyhow::{bail, ensure, Result};
use std::collections::HashMap;

/// Element type code -> readable name (`float`, `int64`, `type 999`).
pub(super) fn type_text(e: i32) -> String {
    DataType::try_from(e).map_or(format!("type {e}"), |d| {
        crate::onnx::tensor::type_name(d).to_string()
    })
}

fn declared_elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(tt)) => tt.elem_type.filter(|&e| e != 0),
        _ => None,
    }
}

/// Element types known so far in one graph (and its enclosing graphs).
pub(super) struct ValueTypes {
    pub(super) known: HashMap<String, i32>,
    /// Types this graph's `value_info` and outputs declare, for the comparison with inference.
    declared: HashMap<String, (&'static str, i32)>,
}

impl ValueTypes {
    /// What `g` states (see the module docs), on top of `outer`. Refuses declared element
    /// types ONNX does not define.
    pub(super) fn new(g: &GraphProto, outer: &HashMap<String, i32>) -> Result<ValueTypes> {
        let mut known = outer.clone();
        let mut declared = HashMap::new();
        // Every declaration of one value, whatever its kind, names one element type (ONNX
        // merges them and rejects a disagreement).
        let mut first: HashMap<&str, (&str, i32)> = HashMap::new();
        for (kind, values) in [
            ("graph input", &g.input),
            ("graph output", &g.output),
            ("value_info", &g.value_info),
        ] {
            for v in values {
                let Some(e) = declared_elem_type(v) else {
                    continue;
                };
                ensure!(
                    matches!(DataType::try_from(e), Ok(d) if d != DataType::Undefined),
                    "{kind} '{}' declares element type {e}, which ONNX does not define",
                    v.name()
                );
                if let Some(&(other, e0)) = first.get(v.name()) {
                    ensure!(
                        e0 == e,
                        "'{}' is declared {} by its {other} and {} by its {kind}",
                        v.name(),
                        type_text(e0),
                        type_text(e)
                    );
                }
                first.entry(v.name()).or_insert((kind, e));
                known.insert(v.name().to_string(), e);
                if kind != "graph input" {
                    declared.insert(v.name().to_string(), (kind, e));
                }
            }
        }
        // Graph inputs, initializers and constants state their types outright; a declaration
        // of the same value must agree.
        for (name, elem) in super::declared::stated_types(g) {
            if let Some(&(kind, declared)) = declared.get(&name) {
                ensure!(
                    declared == elem,
                    "'{name}' is a {} constant, but its {kind} declares {}",
                    type_text(elem),
                    type_text(declared)
                );
            }
            known.insert(name, elem);
        }
        Ok(ValueTypes { known, declared })
    }

    /// Record the types of `node`'s outputs (`schema`: its op's, `None` for ops without one),
    /// refusing one that contradicts its declaration. `subgraph_outputs` holds each graph
    /// attribute's output types, by attribute name.
    pub(super) fn add_node(
        &mut self,
        node: &NodeProto,
        schema: Option<&OpSchema>,
        subgraph_outputs: &HashMap<String, Vec<Option<i32>>>,
    ) -> Result<()> {
        let inferred = match schema {
            Some(schema) => output_types(node, schema, &self.known, subgraph_outputs)?,
            None => return Ok(()),
        };
        for (out, elem) in node.output.iter().zip(inferred) {
            let Some(elem) = elem else { continue };
            if out.is_empty() {
                continue;
            }
            if let Some(&(kind, declared)) = self.declared.get(out) {
                ensure!(
                    declared == elem,
                    "{}: output '{out}' is {}, but its {kind} declares {}",
                    who(node),
                    type_text(elem),
                    type_text(declared)
                );
            }
            self.known.insert(out.clone(), elem);
        }
        Ok(())
    }

    /// The types of `g`'s outputs, where known.
    pub(super) fn outputs(&self, g: &GraphProto) -> Vec<Option<i32>> {
        g.output
            .iter()
            .map(|o| self.known.get(o.name()).copied())
            .collect()
    }
}

/// The formal parameter value `k` of `names` fills: the last one covers a variadic tail.
fn param_at(params: &[Param], k: usize) -> Option<usize> {
    if k < params.len() {
        Some(k)
    } else if params.last() == Some(&Param::Variadic) {
        Some(params.len() - 1)
    } else {
        None
    }
}

/// The element type of each output of `node` (see the module docs).
fn output_types(
    node: &NodeProto,
    schema: &OpSchema,
    types: &HashMap<String, i32>,
    subgraph_outputs: &HashMap<String, Vec<Option<i32>>>,
) -> Result<Vec<Option<i32>>> {
    let mut bound: HashMap<&str, i32> = HashMap::new();
    for (k, input) in node.input.iter().enumerate() {
        let (Some(p), Some(&elem)) = (param_at(&schema.input_params, k), types.get(input)) else {
            continue;
        };
        if let Some(t) = schema.input_types.get(p).and_then(|p| p.type_param) {
            bound.entry(t).or_insert(elem);
        }
    }
    let input_type = |k: usize| {
        node.input
            .get(k)
            .filter(|n| !n.is_empty())
            .and_then(|n| types.get(n))
            .copied()
    };
    let dtype_attr = |name: &str| -> Result<Option<i32>> {
        Ok(node
            .attr_int(name)?
            .filter(|&d| d != 0)
            .map(|d| i32::try_from(d).unwrap_or(-1)))
    };
    let op = node.op_type();
    let mut out = Vec::with_capacity(node.output.len());
    for k in 0..node.output.len() {
        let param = param_at(&schema.output_params, k).and_then(|p| schema.output_types.get(p));
        let from_schema = param.and_then(|p| {
            p.type_param
                .and_then(|t| bound.get(t).copied())
                .or(match p.allowed.as_deref() {
                    Some([only]) => Some(*only),
                    _ => None,
                })
        });
        let elem = match (from_schema, op) {
            (Some(e), _) => Some(e),
            (None, "Cast") => dtype_attr("to")?,
            (None, "Constant") => constant_type(node),
            (None, "ConstantOfShape") => Some(
                node.attribute
                    .iter()
                    .find(|a| a.name() == "value")
                    .and_then(|a| a.t.as_ref())
                    .map_or(DataType::Float as i32, |t| t.data_type()),
            ),
            (None, "QuantizeLinear") if k == 0 => match node.input.get(2).filter(|n| !n.is_empty())
            {
                Some(_) => input_type(2),
                None => Some(dtype_attr("output_dtype")?.unwrap_or(DataType::Uint8 as i32)),
            },
            (None, "EyeLike" | "RandomNormalLike" | "RandomUniformLike" | "Bernoulli") => {
                dtype_attr("dtype")?.or_else(|| input_type(0))
            }
            (None, "RandomNormal" | "RandomUniform") => {
                Some(dtype_attr("dtype")?.unwrap_or(DataType::Float as i32))
            }
            (None, "If") if k == 0 => {
                let counts = ["then_branch", "else_branch"]
                    .map(|b| subgraph_outputs.get(b).map(|o| o.len()));
                for (branch, count) in ["then_branch", "else_branch"].iter().zip(counts) {
                    ensure!(
                        count.is_none_or(|c| c == node.output.len()),
                        "{}: {branch} has {} output(s), the node {}",
                        who(node),
                        count.unwrap_or(0),
                        node.output.len()
                    );
                }
                if_output(node, k, subgraph_outputs)?
            }
            (None, "If") => if_output(node, k, subgraph_outputs)?,
            // Loop's body outputs: condition, then carried values and scan outputs.
            (None, "Loop") => subgraph_outputs
                .get("body")
                .and_then(|o| o.get(k + 1).copied().flatten()),
            (None, "Scan") => subgraph_outputs
                .get("body")
                .and_then(|o| o.get(k).copied().flatten()),
            (None, _) => None,
        };
        out.push(elem);
    }
    Ok(out)
}

/// The element type of a `Constant`'s value attribute.
fn constant_type(node: &NodeProto) -> Option<i32> {
    let a = node.attribute.first()?;
    Some(match a.name() {
        "value" => a.t.as_ref()?.data_type(),
        "value_float" | "value_floats" => DataType::Float as i32,
        "value_int" | "value_ints" => DataType::Int64 as i32,
        "value_string" | "value_strings" => DataType::String as i32,
        _ => return None,
    })
}

/// The element type of `If` output `k`: its branches' (which must agree).
fn if_output(
    node: &NodeProto,
    k: usize,
    subgraph_outputs: &HashMap<String, Vec<Option<i32>>>,
) -> Result<Option<i32>> {
    let branch = |name: &str| {
        subgraph_outputs
            .get(name)
            .and_then(|o| o.get(k).copied().flatten())
    };
    Ok(match (branch("then_branch"), branch("else_branch")) {
        (Some(a), Some(b)) if a != b => bail!(
            "{}: output {k} is {} in then_branch but {} in else_branch",
            who(node),
            type_text(a),
            type_text(b)
        ),
        (a, b) => a.or(b),
    })
}
