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
//! 2. Until nothing changes: small nodes whose inputs are all constant (`Equal`, `Greater`,
//!    `Less`, `GreaterOrEqual`, `LessOrEqual`, `Not`, `And`, `Or`, `Xor` with a scalar
//!    broadcast; `Gather` on axis 0, `Cast`, `Identity`, `Size`, `Reshape`, `Squeeze`,
//!    `Unsqueeze`; at most 4096 elements) are replaced by initializers, and every `If` whose
//!    condition is then constant is replaced by its taken branch, inlined with fresh names (see
//!    `runtime::simulate`, which validation already uses).
//! 3. When every remaining input has a fixed shape (declared, or given with `--input-shape`,
//!    which is then written into the declared shape), `Shape` and `Size` of values whose shape
//!    tract infers become constants too, and step 2 runs again: silero-vad's `If`s on
//!    `Shape(x)[0] == 1` (squeeze the batch of one) collapse this way.
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
    /// Nodes folded to constants (comparisons, logic, small index math, `Shape`/`Size`).
    pub folded_nodes: usize,
    /// One line per `If` replaced by its taken branch.
    pub collapsed_ifs: Vec<String>,
    /// Nodes in the top-level graph before and after.
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// Fix `fixes` (input name, values) in `model` and fold what becomes constant (module docs).
pub fn fix_inputs(
    model: &mut ModelProto,
    fixes: &[(String, Vec<f64>)],
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Specialized> {
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
    let shapes_fixed = pin_shapes(graph, input_shapes);
    loop {
        let graph = model.graph.as_mut().context("model has no graph")?;
        let folded = fold_logic(graph)?;
        out.folded_nodes += folded;
        let collapsed = crate::runtime::simulate::fold_constant_ifs(graph)?;
        let progress = folded > 0 || !collapsed.is_empty();
        out.collapsed_ifs.extend(collapsed);
        if progress {
            continue;
        }
        let shaped = if shapes_fixed {
            fold_shapes(model, input_shapes)?
        } else {
            0
        };
        out.folded_nodes += shaped;
        if shaped == 0 {
            break;
        }
    }
    out.nodes_after = model.graph.as_ref().map_or(0, |g| g.node.len());
    Ok(out)
}

/// Writes `--input-shape` into the declared input shapes; true when every remaining input's
/// shape is then fully fixed (only then may `Shape` nodes fold: the sizes hold for every run).
fn pin_shapes(graph: &mut GraphProto, input_shapes: &[(String, Vec<usize>)]) -> bool {
    use crate::onnx::proto::tensor_shape_proto::Dimension;
    let inits: std::collections::HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    let mut all_fixed = true;
    for input in graph.input.iter_mut().filter(|i| !inits.contains(i.name())) {
        let given = input_shapes
            .iter()
            .find(|(n, _)| n == input.name())
            .map(|(_, s)| s);
        let Some(type_proto::Value::TensorType(tt)) =
            input.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            all_fixed = false;
            continue;
        };
        let Some(shape) = tt.shape.as_mut() else {
            all_fixed = false;
            continue;
        };
        if let Some(g) = given.filter(|g| g.len() == shape.dim.len()) {
            shape.dim = g
                .iter()
                .map(|&d| Dimension {
                    value: Some(Dim::DimValue(d as i64)),
                    ..Default::default()
                })
                .collect();
        }
        all_fixed &= shape
            .dim
            .iter()
            .all(|d| matches!(d.value, Some(Dim::DimValue(v)) if v > 0));
    }
    all_fixed
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

/// The tensor a small constant-input node computes: comparisons and logic (bool), `Gather`,
/// `Cast`, `Identity`, `Size`, `Squeeze`/`Unsqueeze` (axes as an input), on small tensors.
fn eval_logic(
    node: &NodeProto,
    consts: &std::collections::HashMap<String, TensorProto>,
) -> Option<TensorProto> {
    if !node.domain().is_empty() || node.output.len() != 1 {
        return None;
    }
    let op = node.op_type();
    let known = [
        "Not",
        "Equal",
        "Greater",
        "Less",
        "GreaterOrEqual",
        "LessOrEqual",
        "And",
        "Or",
        "Xor",
        "Gather",
        "Cast",
        "Identity",
        "Size",
        "Squeeze",
        "Unsqueeze",
        "Reshape",
    ];
    if !known.contains(&op) || node.input.is_empty() {
        return None;
    }
    let tensors: Vec<&TensorProto> = node
        .input
        .iter()
        .map(|i| consts.get(i))
        .collect::<Option<_>>()?;
    let args: Vec<ArrayD<f64>> = tensors
        .iter()
        .map(|t| to_f64(t).ok())
        .collect::<Option<_>>()?;
    let in_type = DataType::try_from(tensors[0].data_type()).ok()?;
    let int_attr = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name() == name)
            .and_then(|a| a.i)
    };
    let axes = |a: &ArrayD<f64>, rank: usize| -> Option<Vec<usize>> {
        let mut v: Vec<usize> = a
            .iter()
            .map(|&x| {
                let x = x as i64;
                let r = rank as i64;
                let k = if x < 0 { x + r } else { x };
                (0..r).contains(&k).then_some(k as usize)
            })
            .collect::<Option<_>>()?;
        v.sort_unstable();
        Some(v)
    };
    let (values, dt): (ArrayD<f64>, DataType) = match op {
        "Identity" => (args[0].clone(), in_type),
        "Size" => (
            ndarray::arr0(args[0].len() as f64).into_dyn(),
            DataType::Int64,
        ),
        "Cast" => {
            let to = DataType::try_from(int_attr("to")? as i32).ok()?;
            let v = match to {
                DataType::Bool => args[0].mapv(|x| f64::from(u8::from(x != 0.0))),
                DataType::Float | DataType::Double => args[0].clone(),
                DataType::Int64 | DataType::Int32 => args[0].mapv(f64::trunc),
                _ => return None,
            };
            (v, to)
        }
        "Gather" => {
            let data = &args[0];
            let idx = args.get(1)?;
            let axis = axes(
                &ndarray::arr1(&[int_attr("axis").unwrap_or(0) as f64]).into_dyn(),
                data.ndim(),
            )?[0];
            let n = data.shape()[axis] as i64;
            let picks: Vec<usize> = idx
                .iter()
                .map(|&x| {
                    let k = if (x as i64) < 0 {
                        x as i64 + n
                    } else {
                        x as i64
                    };
                    (0..n).contains(&k).then_some(k as usize)
                })
                .collect::<Option<_>>()?;
            let taken = data.select(ndarray::Axis(axis), &picks);
            // Output shape: data[:axis] + indices.shape + data[axis+1:].
            let mut shape = data.shape()[..axis].to_vec();
            shape.extend_from_slice(idx.shape());
            shape.extend_from_slice(&data.shape()[axis + 1..]);
            let flat: Vec<f64> = if axis == 0 {
                taken.iter().copied().collect()
            } else {
                return None;
            };
            (ArrayD::from_shape_vec(IxDyn(&shape), flat).ok()?, in_type)
        }
        "Reshape" => {
            let data = &args[0];
            let spec = args.get(1)?;
            let mut shape: Vec<i64> = spec.iter().map(|&x| x as i64).collect();
            for (k, d) in shape.iter_mut().enumerate() {
                if *d == 0 && int_attr("allowzero").unwrap_or(0) == 0 {
                    *d = *data.shape().get(k)? as i64;
                }
            }
            let known: i64 = shape.iter().filter(|&&d| d >= 0).product();
            if let Some(free) = shape.iter_mut().find(|d| **d == -1) {
                *free = (data.len() as i64).checked_div(known)?;
            }
            let shape: Vec<usize> = shape
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<_>>()?;
            (
                data.clone().into_shape_with_order(IxDyn(&shape)).ok()?,
                in_type,
            )
        }
        "Squeeze" | "Unsqueeze" => {
            let data = &args[0];
            let ax = args.get(1)?;
            let mut shape = data.shape().to_vec();
            if op == "Squeeze" {
                for &k in axes(ax, shape.len())?.iter().rev() {
                    if shape[k] != 1 {
                        return None;
                    }
                    shape.remove(k);
                }
            } else {
                for k in axes(ax, shape.len() + ax.len())? {
                    shape.insert(k, 1);
                }
            }
            (
                data.clone().into_shape_with_order(IxDyn(&shape)).ok()?,
                in_type,
            )
        }
        _ => (logic(op, &args)?, DataType::Bool),
    };
    if values.len() > 4096 {
        return None;
    }
    let flat: Vec<f64> = values.iter().copied().collect();
    encode(&node.output[0], dt, values.shape(), &flat).ok()
}

/// A comparison or logic op on constant values (ONNX broadcasting of a single value).
fn logic(op: &str, args: &[ArrayD<f64>]) -> Option<ArrayD<f64>> {
    let b01 = |v: bool| f64::from(u8::from(v));
    if op == "Not" {
        return Some(args[0].mapv(|v| b01(v == 0.0)));
    }
    let (a, b) = (args.first()?, args.get(1)?);
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
    Some(
        ndarray::Zip::from(&a)
            .and(&b)
            .map_collect(|&x, &y| b01(f(x, y))),
    )
}

/// `Shape` and `Size` of values whose shape tract infers completely (best effort: its partial
/// analysis still types what precedes an `If` it cannot analyse) become int64 initializers.
/// Only called when every input shape is fixed, so the shapes hold for every run.
fn fold_shapes(model: &mut ModelProto, shapes: &[(String, Vec<usize>)]) -> Result<usize> {
    let inferred = match crate::runtime::infer_value_shapes(model, shapes) {
        Ok(v) => v,
        Err(_) => return Ok(0),
    };
    let known: std::collections::HashMap<String, Vec<usize>> = inferred
        .into_iter()
        .filter_map(|v| {
            let s: Option<Vec<usize>> = v.shape?.into_iter().collect();
            Some((v.name, s?))
        })
        .collect();
    let graph = model.graph.as_mut().context("model has no graph")?;
    let mut folded = 0;
    let mut kept = Vec::with_capacity(graph.node.len());
    let mut new_inits = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        let shape = node.input.first().and_then(|i| known.get(i));
        let out = match (node.op_type(), shape, node.output.first()) {
            ("Shape", Some(s), Some(o)) if node.domain().is_empty() => {
                let r = s.len() as i64;
                let attr = |n: &str| {
                    node.attribute
                        .iter()
                        .find(|a| a.name() == n)
                        .and_then(|a| a.i)
                };
                let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clamp(attr("start").unwrap_or(0));
                let end = clamp(attr("end").unwrap_or(r)).max(start);
                let dims: Vec<i64> = s[start..end].iter().map(|&d| d as i64).collect();
                Some(from_i64(o, &[dims.len()], &dims))
            }
            ("Size", Some(s), Some(o)) if node.domain().is_empty() => {
                Some(from_i64(o, &[], &[s.iter().product::<usize>() as i64]))
            }
            _ => None,
        };
        match out {
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

    #[test]
    fn a_reshaped_gathered_sample_rate_folds_to_a_constant_condition() {
        // silero_vad_op18_ifless: c = Equal(Gather(Reshape(sr, [1]), 0), 16000).
        let node = |op: &str, ins: &[&str], out: &str| NodeProto {
            op_type: Some(op.into()),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            ..Default::default()
        };
        let mut graph = GraphProto {
            node: vec![
                node("Reshape", &["sr", "one"], "r"),
                node("Gather", &["r", "zero"], "g"),
                node("Equal", &["g", "k"], "c"),
            ],
            initializer: vec![
                from_i64("sr", &[], &[16000]),
                from_i64("one", &[1], &[1]),
                from_i64("zero", &[], &[0]),
                from_i64("k", &[], &[16000]),
            ],
            ..Default::default()
        };
        let mut total = 0;
        loop {
            let n = fold_logic(&mut graph).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 3);
        assert!(graph.node.is_empty());
        let c = graph.initializer.iter().find(|t| t.name() == "c").unwrap();
        assert_eq!(c.data_type(), DataType::Bool as i32);
        assert!(c.dims.is_empty(), "a scalar condition");
        assert_eq!(
            to_f64(c).unwrap().iter().copied().collect::<Vec<_>>(),
            vec![1.0]
        );
    }
}
