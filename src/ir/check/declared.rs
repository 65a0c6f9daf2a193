//! Load-time checks of what a graph states about its tensors, which ONNX shape and type
//! inference (and so every runtime) would reject: initializer payloads (a defined element type,
//! no negative dims, values in exactly one field, raw bytes matching dims x type), declared graph
//! input/output dims (none 0 or negative but -1, which some exporters write for an unknown dim;
//! a declared constant has its dims), and the element
//! types the graph states for its values ([`stated_types`]) against each op's type
//! constraints ([`check_input_types`]).

use super::who;
use crate::onnx::proto::{tensor_proto::DataType, type_proto, GraphProto, NodeProto, TensorProto};
use crate::onnx::schema::{OpSchema, Param};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;

/// Every initializer's payload is well formed: no negative dims, its values in exactly one
/// field (raw bytes or one typed field, or external data), as many values as its dims hold.
pub(super) fn check_initializers(g: &GraphProto) -> Result<()> {
    for t in &g.initializer {
        let name = t.name();
        ensure!(
            matches!(DataType::try_from(t.data_type()), Ok(dt) if dt != DataType::Undefined),
            "initializer '{name}' has element type {}, which ONNX does not define",
            t.data_type()
        );
        ensure!(
            t.dims.iter().all(|&d| d >= 0),
            "initializer '{name}' has a negative dim in {:?}",
            t.dims
        );
        let fields = [
            t.raw_data.is_some(),
            !t.float_data.is_empty(),
            !t.int32_data.is_empty(),
            !t.string_data.is_empty(),
            !t.int64_data.is_empty(),
            !t.double_data.is_empty(),
            !t.uint64_data.is_empty(),
        ]
        .iter()
        .filter(|&&f| f)
        .count();
        ensure!(
            fields <= 1,
            "initializer '{name}' holds its values in {fields} fields (raw_data and a typed field); ONNX allows one"
        );
        if crate::onnx::tensor::is_external(t) || t.data_type() == DataType::String as i32 {
            continue;
        }
        let count = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .with_context(|| format!("initializer '{name}' dims {:?} overflow", t.dims))?;
        if let Some(raw) = &t.raw_data {
            let bits = DataType::try_from(t.data_type())
                .map(crate::onnx::tensor::bits_per_element)
                .unwrap_or(0) as u64;
            if bits > 0 {
                let need = count.checked_mul(bits).map(|b| b.div_ceil(8));
                ensure!(
                    need == Some(raw.len() as u64),
                    "initializer '{name}' has {} raw bytes, but dims {:?} of its type need {}",
                    raw.len(),
                    t.dims,
                    need.map_or("more than 2^64".to_string(), |n| n.to_string())
                );
            }
        }
    }
    Ok(())
}

/// The tensors a graph fixes by name: initializers and standard `Constant` nodes' `value`.
pub(super) fn graph_constants(g: &GraphProto) -> HashMap<&str, &TensorProto> {
    let mut constants: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (t.name(), t)).collect();
    for n in &g.node {
        if n.op_type() == "Constant" && (n.domain().is_empty() || n.domain() == "ai.onnx") {
            let value = n.attribute.iter().find(|a| a.name() == "value");
            if let (Some(out), Some(t)) = (n.output.first(), value.and_then(|a| a.t.as_ref())) {
                constants.insert(out.as_str(), t);
            }
        }
    }
    constants
}

/// Declared graph inputs and outputs have no empty (0) or negative dims (but -1, an unknown
/// dim), and a declared value (value_info too) that is an
/// initializer has the initializer's rank and dims: ONNX shape inference (and so every
/// runtime) rejects a model that contradicts itself there.
pub(super) fn check_declared_shapes(g: &GraphProto) -> Result<()> {
    use crate::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
    // Values whose dims the graph fixes.
    let initializers = graph_constants(g);
    for (kind, v) in g
        .input
        .iter()
        .map(|v| ("graph input", v))
        .chain(g.output.iter().map(|v| ("graph output", v)))
        .chain(g.value_info.iter().map(|v| ("value_info", v)))
    {
        let Some(type_proto::Value::TensorType(tt)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        let Some(shape) = &tt.shape else { continue };
        let dims: Vec<Option<i64>> = shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(x)) => Some(x),
                _ => None,
            })
            .collect();
        // -1 is how some exporters (Paddle2ONNX, older tf2onnx) write an unknown dim;
        // onnx.checker and runtimes read it so, and so does the IR (a symbolic dim).
        let dims: Vec<Option<i64>> = dims.into_iter().map(|d| d.filter(|&x| x != -1)).collect();
        let empty_or_negative = dims.iter().position(|d| matches!(d, Some(x) if *x <= 0));
        if let (Some(k), false) = (empty_or_negative, kind == "value_info") {
            bail!(
                "{kind} '{}' declares dim {k} = {}: an empty or negative dimension",
                v.name(),
                dims[k].unwrap_or(0)
            );
        }
        if let Some(t) = initializers.get(v.name()) {
            let matches = dims.len() == t.dims.len()
                && dims
                    .iter()
                    .zip(&t.dims)
                    .all(|(d, &n)| d.is_none_or(|d| d == n));
            ensure!(
                matches,
                "{kind} '{}' is declared with shape {:?}, but it is a constant of dims {:?}",
                v.name(),
                dims.iter()
                    .map(|d| d.map_or("?".to_string(), |x| x.to_string()))
                    .collect::<Vec<_>>(),
                t.dims
            );
        }
    }
    Ok(())
}

/// Element types the graph states: graph inputs (declared), initializers and `Constant` outputs.
pub(super) fn stated_types(g: &GraphProto) -> HashMap<String, i32> {
    let mut types = HashMap::new();
    for v in &g.input {
        if let Some(type_proto::Value::TensorType(tt)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            if let Some(e) = tt.elem_type {
                types.insert(v.name().to_string(), e);
            }
        }
    }
    for (name, t) in graph_constants(g) {
        types.insert(name.to_string(), t.data_type());
    }
    types
}

/// Inputs whose element type the graph states are of a type the op's schema accepts there,
/// and inputs bound to one type parameter (`T` of Add's `A` and `B`) share it.
pub(super) fn check_input_types(
    node: &NodeProto,
    schema: &OpSchema,
    types: &HashMap<String, i32>,
) -> Result<()> {
    let params = &schema.input_types;
    let name = |e: i32| {
        DataType::try_from(e).map_or(format!("type {e}"), |d| {
            crate::onnx::tensor::type_name(d).to_string()
        })
    };
    let mut bound: HashMap<&str, (&str, i32)> = HashMap::new();
    for (k, input) in node.input.iter().enumerate() {
        if input.is_empty() {
            continue;
        }
        let Some(&elem) = types.get(input) else {
            continue;
        };
        // A variadic last parameter covers every input from its position on.
        let Some(p) = params.get(k.min(params.len().saturating_sub(1))) else {
            continue;
        };
        if k >= params.len()
            && !schema
                .input_params
                .last()
                .is_some_and(|q| *q == Param::Variadic)
        {
            continue;
        }
        if let Some(allowed) = &p.allowed {
            if !allowed.contains(&elem) {
                bail!(
                    "{}: input {k} '{input}' is {}, which {} does not accept there (accepted: {})",
                    who(node),
                    name(elem),
                    node.op_type(),
                    allowed
                        .iter()
                        .map(|&e| name(e))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        if let Some(t) = p.type_param {
            match bound.get(t) {
                Some(&(first, e)) if e != elem => bail!(
                    "{}: inputs '{first}' ({}) and '{input}' ({}) must have the same element type",
                    who(node),
                    name(e),
                    name(elem)
                ),
                Some(_) => {}
                None => {
                    bound.insert(t, (input.as_str(), elem));
                }
            }
        }
    }
    Ok(())
}
