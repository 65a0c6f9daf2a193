//! `--fix-input NAME=VALUE`: specialize a model for one value of an input (a sample rate, a
//! mode flag, a fixed token prefix), on the `ModelProto` before the IR is built.
//!
//! ```text
//! before:  graph (float[?, ?] input, int64 sr) {
//!            c = Equal(sr, k16000)              k16000 = Constant 16000
//!            out = If(c) then {...16 kHz net...} else {...8 kHz net...}
//!          }
//! after (--fix-input sr=16000):
//!          graph (float[?, ?] input) {           initializer sr = 16000 (int64, rank 0)
//!            ...16 kHz net, names prefixed "If_0/then/"...
//!            out = Identity(If_0/then/<branch output>)
//!          }
//! ```
//!
//! Steps:
//! 1. Each fixed input leaves `graph.input` and becomes an initializer of the same name. The
//!    values are typed by the input's declared element type (integers must be whole and in
//!    range; bool takes 0/1 or true/false) and shaped by its declared shape: one value for a
//!    rank-0 input, the declared element count for a fully fixed shape, any count for a rank-1
//!    input with a symbolic length. Anything else is an error naming the input, the expected
//!    and the given shape/type.
//! 2. Until nothing changes: comparison and logic nodes whose inputs are all constant (`Equal`,
//!    `Greater`, `Less`, `GreaterOrEqual`, `LessOrEqual`, `Not`, `And`, `Or`, `Xor`, on scalars
//!    or small tensors, with ONNX broadcasting of a scalar) are replaced by initializers, and
//!    every `If` whose condition is then constant is replaced by its taken branch, inlined
//!    with fresh names (see `runtime::simulate`, which validation already uses).
//!
//! The rest (the `Shape`/`Gather`/arithmetic chains that became constant, the `Identity`s left
//! by inlining) is folded by the `cleanup` pass's constant folding as for any model.
//!
//! Invariants: the specialized model computes what the original computes when fed the fixed
//! values (the validator compares the output against this specialized original); running it
//! again with the same fixes changes nothing (the inputs are no longer inputs: a second fix of
//! the same name is an error naming it); models without `--fix-input` never reach this code.

use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::onnx::proto::{type_proto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::onnx::tensor::{from_f32, from_i32, from_i64, raw_tensor, to_f64};
use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};

/// What specialization did, for the report and the terminal.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Specialized {
    /// `name = value (type)` per fixed input.
    pub fixed: Vec<String>,
    /// Comparison/logic nodes folded to constants.
    pub folded_nodes: usize,
    /// One line per `If` replaced by its taken branch.
    pub collapsed_ifs: Vec<String>,
    /// Nodes in the top-level graph before and after.
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// Fix `fixes` (input name, values) in `model` and fold what becomes constant (module docs).
pub fn fix_inputs(model: &mut ModelProto, fixes: &[(String, Vec<f64>)]) -> Result<Specialized> {
    let graph = model.graph.as_mut().context("model has no graph")?;
    let mut out = Specialized {
        nodes_before: graph.node.len(),
        ..Default::default()
    };
    for (name, values) in fixes {
        let pos = graph
            .input
            .iter()
            .position(|i| i.name() == name)
            .filter(|_| !graph.initializer.iter().any(|t| t.name() == name))
            .with_context(|| {
                let inputs: Vec<&str> = graph.input.iter().map(|i| i.name()).collect();
                format!(
                    "--fix-input names '{name}', which is not a graph input (inputs: {inputs:?})"
                )
            })?;
        let input = graph.input.remove(pos);
        let Some(type_proto::Value::TensorType(tt)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            bail!("--fix-input {name}: the input is not a tensor");
        };
        let dt = DataType::try_from(tt.elem_type()).unwrap_or(DataType::Undefined);
        let declared: Option<Vec<Option<usize>>> = tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v > 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        });
        let shape = fixed_shape(name, declared.as_deref(), values.len())?;
        let tensor = encode(name, dt, &shape, values)?;
        out.fixed.push(format!(
            "{name} = {} ({})",
            values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(","),
            dt.as_str_name().to_ascii_lowercase()
        ));
        graph.initializer.push(tensor);
    }
    loop {
        let folded = fold_logic(graph)?;
        out.folded_nodes += folded;
        let collapsed = crate::runtime::simulate::fold_constant_ifs(graph)?;
        if folded == 0 && collapsed.is_empty() {
            break;
        }
        out.collapsed_ifs.extend(collapsed);
    }
    out.nodes_after = graph.node.len();
    Ok(out)
}

/// The shape the values take: rank 0 for a scalar, the declared shape when fully fixed, `[n]`
/// for a rank-1 input of symbolic length.
fn fixed_shape(name: &str, declared: Option<&[Option<usize>]>, n: usize) -> Result<Vec<usize>> {
    let declared = declared.with_context(|| {
        format!("--fix-input {name}: the input declares no shape, so the value's shape is unknown")
    })?;
    let shown = || {
        declared
            .iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if declared.is_empty() {
        ensure!(
            n == 1,
            "--fix-input {name}: the input is a scalar, {n} values given"
        );
        return Ok(vec![]);
    }
    if declared.iter().all(Option::is_some) {
        let shape: Vec<usize> = declared.iter().map(|d| d.unwrap_or(1)).collect();
        let want: usize = shape.iter().product();
        ensure!(
            n == want,
            "--fix-input {name}: the input has shape [{}] ({want} values), {n} given",
            shown()
        );
        return Ok(shape);
    }
    ensure!(
        declared.len() == 1,
        "--fix-input {name}: the input has shape [{}] with symbolic dims; only scalars, fixed shapes and rank-1 inputs can be fixed (give --input-shape too, or fix another input)",
        shown()
    );
    Ok(vec![n])
}

/// The values as a tensor of element type `dt`.
fn encode(name: &str, dt: DataType, shape: &[usize], values: &[f64]) -> Result<TensorProto> {
    let ints = || -> Result<Vec<i64>> {
        values
            .iter()
            .map(|&v| {
                ensure!(
                    v.fract() == 0.0 && v.abs() < 9.0e15,
                    "--fix-input {name}: {v} is not a whole number, and the input is {}",
                    dt.as_str_name().to_ascii_lowercase()
                );
                Ok(v as i64)
            })
            .collect()
    };
    let in_range = |v: &[i64], lo: i64, hi: i64| -> Result<()> {
        if let Some(bad) = v.iter().find(|&&x| x < lo || x > hi) {
            bail!(
                "--fix-input {name}: {bad} is out of range for {}",
                dt.as_str_name().to_ascii_lowercase()
            );
        }
        Ok(())
    };
    let bytes = |v: Vec<i64>, width: usize| -> Vec<u8> {
        v.iter()
            .flat_map(|x| x.to_le_bytes()[..width].to_vec())
            .collect()
    };
    Ok(match dt {
        DataType::Float => {
            let a =
                ArrayD::from_shape_vec(IxDyn(shape), values.iter().map(|&v| v as f32).collect())?;
            from_f32(name, &a)
        }
        DataType::Double => raw_tensor(
            name,
            dt,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DataType::Float16 => raw_tensor(
            name,
            dt,
            shape,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                .collect(),
        ),
        DataType::Int64 => from_i64(name, shape, &ints()?),
        DataType::Int32 => {
            let v = ints()?;
            in_range(&v, i32::MIN.into(), i32::MAX.into())?;
            from_i32(
                name,
                shape,
                &v.iter().map(|&x| x as i32).collect::<Vec<_>>(),
            )
        }
        DataType::Int16
        | DataType::Uint16
        | DataType::Int8
        | DataType::Uint8
        | DataType::Bool
        | DataType::Uint32 => {
            let v = ints()?;
            let (lo, hi, width) = match dt {
                DataType::Int16 => (i16::MIN.into(), i16::MAX.into(), 2),
                DataType::Uint16 => (0, u16::MAX.into(), 2),
                DataType::Int8 => (i8::MIN.into(), i8::MAX.into(), 1),
                DataType::Uint8 => (0, u8::MAX.into(), 1),
                DataType::Uint32 => (0, u32::MAX.into(), 4),
                _ => (0, 1, 1),
            };
            in_range(&v, lo, hi)?;
            raw_tensor(name, dt, shape, bytes(v, width))
        }
        other => bail!(
            "--fix-input {name}: inputs of type {} cannot be fixed",
            other.as_str_name().to_ascii_lowercase()
        ),
    })
}

/// Small constants by name: initializers and `Constant` nodes with a `value` tensor.
fn constants(graph: &GraphProto) -> std::collections::HashMap<String, TensorProto> {
    let mut map: std::collections::HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.iter().product::<i64>() <= 4096)
        .map(|t| (t.name().to_string(), t.clone()))
        .collect();
    for i in &graph.input {
        map.remove(i.name());
    }
    for n in &graph.node {
        if n.op_type() == "Constant" && n.domain().is_empty() {
            let value = n
                .attribute
                .iter()
                .find(|a| a.name() == "value")
                .and_then(|a| a.t.as_ref());
            if let (Some(out), Some(t)) = (n.output.first(), value) {
                map.insert(out.clone(), t.clone());
            }
        }
    }
    map
}

/// One sweep folding comparison/logic nodes on constant inputs into bool initializers.
fn fold_logic(graph: &mut GraphProto) -> Result<usize> {
    let consts = constants(graph);
    let mut folded = 0;
    let mut kept: Vec<NodeProto> = Vec::with_capacity(graph.node.len());
    let mut new_inits = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        match eval_logic(&node, &consts) {
            Some(t) => {
                new_inits.push(t);
                folded += 1;
            }
            None => kept.push(node),
        }
    }
    graph.node = kept;
    graph.initializer.extend(new_inits);
    Ok(folded)
}

/// The bool tensor a comparison/logic node computes from constant inputs, if it is one.
fn eval_logic(
    node: &NodeProto,
    consts: &std::collections::HashMap<String, TensorProto>,
) -> Option<TensorProto> {
    if !node.domain().is_empty() || node.output.len() != 1 {
        return None;
    }
    let op = node.op_type();
    let arity = match op {
        "Not" => 1,
        "Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "And" | "Or" | "Xor" => 2,
        _ => return None,
    };
    if node.input.len() != arity {
        return None;
    }
    let args: Vec<ArrayD<f64>> = node
        .input
        .iter()
        .map(|i| consts.get(i).and_then(|t| to_f64(t).ok()))
        .collect::<Option<_>>()?;
    let result: ArrayD<bool> = if arity == 1 {
        args[0].mapv(|v| v == 0.0)
    } else {
        let (a, b) = (&args[0], &args[1]);
        // Equal shapes, or one side a single value (the scalar comparisons `If`s branch on).
        let (a, b) = if a.shape() == b.shape() {
            (a.clone(), b.clone())
        } else if b.len() == 1 && a.ndim() >= b.ndim() {
            (a.clone(), ArrayD::from_elem(a.raw_dim(), *b.iter().next()?))
        } else if a.len() == 1 && b.ndim() >= a.ndim() {
            (ArrayD::from_elem(b.raw_dim(), *a.iter().next()?), b.clone())
        } else {
            return None;
        };
        let f = |x: f64, y: f64| -> bool {
            match op {
                "Equal" => x == y,
                "Greater" => x > y,
                "Less" => x < y,
                "GreaterOrEqual" => x >= y,
                "LessOrEqual" => x <= y,
                "And" => x != 0.0 && y != 0.0,
                "Or" => x != 0.0 || y != 0.0,
                _ => (x != 0.0) != (y != 0.0),
            }
        };
        ndarray::Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y))
    };
    Some(raw_tensor(
        &node.output[0],
        DataType::Bool,
        result.shape(),
        result.iter().map(|&v| u8::from(v)).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_take_the_declared_type_and_shape() {
        assert_eq!(
            fixed_shape("sr", Some(&[]), 1).unwrap(),
            Vec::<usize>::new()
        );
        assert!(fixed_shape("sr", Some(&[]), 2).is_err());
        assert_eq!(fixed_shape("ids", Some(&[None]), 3).unwrap(), vec![3]);
        assert!(fixed_shape("m", Some(&[Some(2), None]), 4).is_err());
        let t = encode("sr", DataType::Int64, &[], &[16000.0]).unwrap();
        assert_eq!(
            to_f64(&t).unwrap().iter().copied().collect::<Vec<_>>(),
            vec![16000.0]
        );
        assert!(encode("sr", DataType::Int64, &[], &[0.5]).is_err());
        assert!(encode("b", DataType::Uint8, &[], &[300.0]).is_err());
    }
}
