//! Constant folding for `cleanup`: evaluate a node whose inputs are all constants and store its
//! output as an initializer of the same name.
//!
//! ```text
//! before:  s = Shape(x)            x: float[1,3,8,8]
//!          d = Gather<axis=0>(s, i1)       i1 = [1]
//! after:   initializer d = [3]   (s folded first, then d; s becomes unused and is dropped)
//! ```
//!
//! Folded ops: `Constant` (value, value_float(s), value_int(s)); `Shape` of a value with a
//! fully static declared shape (start/end honoured); and, on constant float/double/int64/int32
//! tensors: `Gather`, `Slice`, `Unsqueeze`, `Squeeze`, `Concat`, `Reshape`, `Cast` (between
//! those four types), `Add`, `Sub`, `Mul`, `Div`. `Slice` and `Concat` also fold the gate
//! reordering PyTorch writes in front of an exported LSTM/GRU (`W[0:128]`, `W[384:512]`, ...
//! joined again), so that the recurrent weights reach the weight-only pass as initializers. Inputs and output are limited to
//! [`MAX_FOLD_ELEMENTS`] elements: this is for shape computations, not for duplicating weights.
//!
//! Numerics match a float32 runtime exactly: `+ − × ÷` are computed in f64 and rounded once
//! to f32, which is the correctly rounded f32 result (f64 has more than 2·24+2 bits). Integer
//! arithmetic is checked (overflow or division by zero leaves the node alone); integer
//! division truncates toward zero, as ONNX Runtime does. Casting float to int truncates and
//! refuses NaN and out-of-range values.

use crate::ir::op::Attrs;
use crate::ir::{op, Graph, Patch};
use crate::onnx::proto::{attribute_proto::AttributeType, tensor_proto::DataType, TensorProto};
use crate::onnx::tensor::{self, from_f32, from_i32, from_i64, raw_tensor};
use anyhow::Result;
use ndarray::{ArrayD, Axis, IxDyn};
use petgraph::stable_graph::NodeIndex;

/// Largest tensor (input or output) constant folding touches.
pub const MAX_FOLD_ELEMENTS: usize = 1 << 16;

/// A decoded constant: floats (f32 values held exactly in f64, or f64) or integers.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    F(ArrayD<f64>, DataType),
    I(ArrayD<i64>, DataType),
}

/// Apply an expression (returning `Option<ArrayD<_>>`) to either variant's array.
macro_rules! map_val {
    ($v:expr, $a:ident => $e:expr) => {
        match $v {
            Val::F($a, dt) => Val::F($e?, dt),
            Val::I($a, dt) => Val::I($e?, dt),
        }
    };
}

impl Val {
    fn shape(&self) -> &[usize] {
        match self {
            Val::F(a, _) => a.shape(),
            Val::I(a, _) => a.shape(),
        }
    }

    fn encode(&self, name: &str) -> TensorProto {
        match self {
            Val::F(a, DataType::Double) => raw_tensor(
                name,
                DataType::Double,
                a.shape(),
                a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Val::F(a, _) => from_f32(name, &a.mapv(|v| v as f32)),
            Val::I(a, DataType::Int32) => from_i32(
                name,
                a.shape(),
                &a.iter().map(|&v| v as i32).collect::<Vec<_>>(),
            ),
            Val::I(a, _) => from_i64(name, a.shape(), &a.iter().copied().collect::<Vec<_>>()),
        }
    }
}

fn read(t: &TensorProto) -> Option<Val> {
    if tensor::element_count(t).ok()? > MAX_FOLD_ELEMENTS {
        return None;
    }
    match tensor::data_type(t).ok()? {
        dt @ (DataType::Float | DataType::Double) => Some(Val::F(tensor::to_f64(t).ok()?, dt)),
        dt @ (DataType::Int64 | DataType::Int32) => {
            let shape = tensor::shape(t).ok()?;
            let v = tensor::to_i64(t).ok()?;
            Some(Val::I(ArrayD::from_shape_vec(IxDyn(&shape), v).ok()?, dt))
        }
        _ => None,
    }
}

/// Round to the storage type so later folds see exactly what a runtime would.
fn round_f(a: ArrayD<f64>, dt: DataType) -> ArrayD<f64> {
    if dt == DataType::Float {
        a.mapv(|v| v as f32 as f64)
    } else {
        a
    }
}

fn fits(v: i64, dt: DataType) -> bool {
    dt != DataType::Int32 || i32::try_from(v).is_ok()
}

/// An axis in `[-rank, rank)` as an index.
fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

fn reshape<T: Clone>(a: &ArrayD<T>, shape: &[usize]) -> Option<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(shape), a.iter().cloned().collect()).ok()
}

/// Evaluate `ix` if all its inputs are constant and the op is supported: the patch replacing
/// it by an initializer holding its output.
pub(crate) fn rule_constant_fold(graph: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    let n = graph.node(ix);
    if !op::is_standard_domain(n.domain()) || n.output.len() != 1 {
        return Ok(None);
    }
    let out = &n.output[0];
    if out.is_empty() || graph.is_graph_output(out) {
        return Ok(None);
    }
    let Some(t) = fold(graph, ix, out) else {
        return Ok(None);
    };
    Ok(Some(Patch {
        remove: vec![ix],
        initializers: vec![t],
        ..Default::default()
    }))
}

fn fold(graph: &Graph, ix: NodeIndex, out: &str) -> Option<TensorProto> {
    let n = graph.node(ix);
    match n.op_type() {
        "Constant" => return constant(n, out),
        "Shape" => {
            let dims: Option<Vec<i64>> = crate::ir::facts::static_shape(graph, n.input.first()?)?
                .into_iter()
                .collect();
            let dims = dims?;
            let r = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(n.attr_int("start").ok()?.unwrap_or(0));
            let end = clamp(n.attr_int("end").ok()?.unwrap_or(r));
            let s = dims.get(start..end.max(start))?;
            return Some(from_i64(out, &[s.len()], s));
        }
        _ => {}
    }
    // Every other op: all present inputs constant.
    let inputs: Option<Vec<Option<Val>>> = n
        .input
        .iter()
        .map(|name| {
            if name.is_empty() {
                Some(None)
            } else {
                read(graph.constant(name)?).map(Some)
            }
        })
        .collect();
    let inputs = inputs?;
    let arg = |i: usize| inputs.get(i).cloned().flatten();
    let ints = |i: usize| match arg(i) {
        Some(Val::I(a, _)) => Some(a.iter().copied().collect::<Vec<i64>>()),
        _ => None,
    };
    let result = match n.op_type() {
        "Gather" => {
            let data = arg(0)?;
            let Val::I(idx, _) = arg(1)? else {
                return None;
            };
            let axis = norm_axis(n.attr_int("axis").ok()?.unwrap_or(0), data.shape().len())?;
            let dim = data.shape()[axis] as i64;
            let picks: Option<Vec<usize>> = idx
                .iter()
                .map(|&i| {
                    let i = if i < 0 { i + dim } else { i };
                    (0..dim).contains(&i).then_some(i as usize)
                })
                .collect();
            let picks = picks?;
            let mut shape = data.shape()[..axis].to_vec();
            shape.extend_from_slice(idx.shape());
            shape.extend_from_slice(&data.shape()[axis + 1..]);
            map_val!(data, a => reshape(&a.select(Axis(axis), &picks), &shape))
        }
        "Unsqueeze" => {
            let data = arg(0)?;
            let axes = match arg(1) {
                Some(_) => ints(1)?,
                None => n.attr_ints("axes").ok()??,
            };
            let rank = data.shape().len() + axes.len();
            let mut axes: Vec<usize> = axes
                .iter()
                .map(|&a| norm_axis(a, rank))
                .collect::<Option<_>>()?;
            axes.sort_unstable();
            if axes.windows(2).any(|w| w[0] == w[1]) {
                return None;
            }
            let mut shape = data.shape().to_vec();
            for a in axes {
                shape.insert(a, 1);
            }
            map_val!(data, a => reshape(&a, &shape))
        }
        "Squeeze" => {
            let data = arg(0)?;
            let axes = match arg(1) {
                Some(_) => Some(ints(1)?),
                None => n.attr_ints("axes").ok()?,
            };
            let rank = data.shape().len();
            let drop: Vec<usize> = match axes {
                Some(axes) => axes
                    .iter()
                    .map(|&a| norm_axis(a, rank))
                    .collect::<Option<_>>()?,
                None => (0..rank).filter(|&i| data.shape()[i] == 1).collect(),
            };
            if drop.iter().any(|&a| data.shape()[a] != 1) {
                return None;
            }
            let shape: Vec<usize> = (0..rank)
                .filter(|i| !drop.contains(i))
                .map(|i| data.shape()[i])
                .collect();
            map_val!(data, a => reshape(&a, &shape))
        }
        "Reshape" => {
            let data = arg(0)?;
            let spec = ints(1)?;
            let allow_zero = n.attr_int("allowzero").ok()?.unwrap_or(0) != 0;
            let total: usize = data.shape().iter().product();
            let mut shape = Vec::with_capacity(spec.len());
            let mut infer = None;
            for (i, &d) in spec.iter().enumerate() {
                match d {
                    0 if !allow_zero => shape.push(*data.shape().get(i)?),
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        shape.push(1);
                    }
                    d if d >= 0 => shape.push(d as usize),
                    _ => return None,
                }
            }
            if let Some(i) = infer {
                let known: usize = shape.iter().product();
                if known == 0 || !total.is_multiple_of(known) {
                    return None;
                }
                shape[i] = total / known;
            }
            if shape.iter().product::<usize>() != total {
                return None;
            }
            map_val!(data, a => reshape(&a, &shape))
        }
        "Concat" => {
            let parts: Vec<Val> = inputs.iter().cloned().collect::<Option<_>>()?;
            let first = parts.first()?.clone();
            let axis = norm_axis(n.attr_int("axis").ok()??, first.shape().len())?;
            match first {
                Val::F(_, dt) => {
                    let arrays: Vec<ArrayD<f64>> = parts
                        .into_iter()
                        .map(|p| match p {
                            Val::F(a, d) if d == dt => Some(a),
                            _ => None,
                        })
                        .collect::<Option<_>>()?;
                    let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
                    Val::F(ndarray::concatenate(Axis(axis), &views).ok()?, dt)
                }
                Val::I(_, dt) => {
                    let arrays: Vec<ArrayD<i64>> = parts
                        .into_iter()
                        .map(|p| match p {
                            Val::I(a, d) if d == dt => Some(a),
                            _ => None,
                        })
                        .collect::<Option<_>>()?;
                    let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
                    Val::I(ndarray::concatenate(Axis(axis), &views).ok()?, dt)
                }
            }
        }
        "Slice" => slice(n, arg(0)?, &|i| match arg(i) {
            Some(Val::I(a, _)) => Some(Some(a.iter().copied().collect())),
            Some(Val::F(..)) => None,
            None => Some(None),
        })?,
        "Cast" => {
            let to = DataType::try_from(i32::try_from(n.attr_int("to").ok()??).ok()?).ok()?;
            cast(arg(0)?, to)?
        }
        op @ ("Add" | "Sub" | "Mul" | "Div") => arith(op, arg(0)?, arg(1)?)?,
        _ => return None,
    };
    if result.shape().iter().product::<usize>() > MAX_FOLD_ELEMENTS {
        return None;
    }
    Some(result.encode(out))
}

/// `Slice` on a constant: starts/ends/axes/steps from inputs 1..=4 (opset 10+) or from the
/// attributes (opset 1-9). ONNX clamping: a negative index counts from the end; with a positive
/// step start and end clamp to `[0, dim]`, with a negative step to `[0, dim-1]` and `[-1, dim-1]`.
fn slice(
    n: &crate::onnx::proto::NodeProto,
    data: Val,
    ints: &dyn Fn(usize) -> Option<Option<Vec<i64>>>,
) -> Option<Val> {
    let rank = data.shape().len();
    let (starts, ends, axes, steps) = if n.input.len() > 1 {
        (ints(1)??, ints(2)??, ints(3)?, ints(4)?)
    } else {
        (
            n.attr_ints("starts").ok()??,
            n.attr_ints("ends").ok()??,
            n.attr_ints("axes").ok()?,
            None,
        )
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return None;
    }
    let mut picks: Vec<Option<Vec<usize>>> = vec![None; rank];
    for k in 0..starts.len() {
        let axis = norm_axis(axes[k], rank)?;
        let (step, dim) = (steps[k], data.shape()[axis] as i64);
        if step == 0 || picks[axis].is_some() {
            return None;
        }
        let from_end = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (start, end) = if step > 0 {
            (
                from_end(starts[k]).clamp(0, dim),
                from_end(ends[k]).clamp(0, dim),
            )
        } else {
            (
                from_end(starts[k]).clamp(0, dim - 1),
                from_end(ends[k]).clamp(-1, dim - 1),
            )
        };
        let mut idx = Vec::new();
        let mut i = start;
        while (step > 0 && i < end) || (step < 0 && i > end) {
            idx.push(i as usize);
            i = i.checked_add(step)?;
        }
        picks[axis] = Some(idx);
    }
    let mut out = data;
    for (axis, idx) in picks.iter().enumerate() {
        if let Some(idx) = idx {
            out = map_val!(out, a => Some(a.select(Axis(axis), idx)));
        }
    }
    Some(out)
}

fn constant(n: &crate::onnx::proto::NodeProto, out: &str) -> Option<TensorProto> {
    let a = n.attribute.first()?;
    if n.attribute.len() != 1 || a.ref_attr_name.as_deref().is_some_and(|r| !r.is_empty()) {
        return None;
    }
    match a.name() {
        "value" => {
            let mut t = a.t.clone()?;
            if tensor::is_external(&t) {
                return None;
            }
            t.name = Some(out.to_string());
            Some(t)
        }
        "value_float" => Some(from_f32(
            out,
            &ArrayD::from_elem(IxDyn(&[]), n.attr_float("value_float").ok()??),
        )),
        "value_floats" if a.r#type() == AttributeType::Floats => Some(from_f32(
            out,
            &ArrayD::from_shape_vec(IxDyn(&[a.floats.len()]), a.floats.clone()).ok()?,
        )),
        "value_int" => Some(from_i64(out, &[], &[n.attr_int("value_int").ok()??])),
        "value_ints" => {
            let v = n.attr_ints("value_ints").ok()??;
            Some(from_i64(out, &[v.len()], &v))
        }
        _ => None,
    }
}

fn cast(v: Val, to: DataType) -> Option<Val> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    Some(match (v, to) {
        (Val::F(a, _), DataType::Float | DataType::Double) => Val::F(round_f(a, to), to),
        (Val::I(a, _), DataType::Float | DataType::Double) => {
            if a.iter().any(|&x| (x as f64).abs() > EXACT) {
                return None;
            }
            Val::F(round_f(a.mapv(|x| x as f64), to), to)
        }
        (Val::F(a, _), DataType::Int64 | DataType::Int32) => {
            let lim = if to == DataType::Int32 {
                2_147_483_648.0
            } else {
                EXACT
            };
            if a.iter().any(|x| !x.is_finite() || x.trunc().abs() >= lim) {
                return None;
            }
            Val::I(a.mapv(|x| x.trunc() as i64), to)
        }
        (Val::I(a, _), DataType::Int64 | DataType::Int32) => {
            if a.iter().any(|&x| !fits(x, to)) {
                return None;
            }
            Val::I(a, to)
        }
        _ => return None,
    })
}

/// Numpy-style broadcast shape.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

fn zip_with<T: Clone, U>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: impl Fn(&T, &T) -> Option<U>,
) -> Option<ArrayD<U>> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let av = a.broadcast(IxDyn(&shape))?;
    let bv = b.broadcast(IxDyn(&shape))?;
    let values: Option<Vec<U>> = av.iter().zip(bv.iter()).map(|(x, y)| f(x, y)).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), values?).ok()
}

fn arith(op: &str, a: Val, b: Val) -> Option<Val> {
    Some(match (a, b) {
        (Val::F(a, da), Val::F(b, db)) if da == db => {
            let r = zip_with(&a, &b, |x, y| {
                Some(match op {
                    "Add" => x + y,
                    "Sub" => x - y,
                    "Mul" => x * y,
                    _ => x / y,
                })
            })?;
            Val::F(round_f(r, da), da)
        }
        (Val::I(a, da), Val::I(b, db)) if da == db => {
            let r = zip_with(&a, &b, |&x, &y| {
                let v = match op {
                    "Add" => x.checked_add(y),
                    "Sub" => x.checked_sub(y),
                    "Mul" => x.checked_mul(y),
                    _ => x.checked_div(y),
                }?;
                fits(v, da).then_some(v)
            })?;
            Val::I(r, da)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(broadcast_shape(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
        assert_eq!(broadcast_shape(&[], &[5]), Some(vec![5]));
        assert_eq!(broadcast_shape(&[2], &[3]), None);
    }

    #[test]
    fn integer_division_truncates_and_refuses_zero() {
        let a = Val::I(ndarray::arr1(&[-7i64, 7]).into_dyn(), DataType::Int64);
        let b = Val::I(ndarray::arr1(&[2i64, 2]).into_dyn(), DataType::Int64);
        let Val::I(r, _) = arith("Div", a.clone(), b).unwrap() else {
            panic!("int result expected")
        };
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![-3, 3]);
        let z = Val::I(ndarray::arr1(&[0i64]).into_dyn(), DataType::Int64);
        assert!(arith("Div", a, z).is_none());
    }

    #[test]
    fn float32_arithmetic_rounds_once_to_f32() {
        let a = Val::F(ndarray::arr1(&[0.1f32 as f64]).into_dyn(), DataType::Float);
        let b = Val::F(ndarray::arr1(&[0.2f32 as f64]).into_dyn(), DataType::Float);
        let Val::F(r, _) = arith("Add", a, b).unwrap() else {
            panic!("float result expected")
        };
        assert_eq!(r[[0]], (0.1f32 + 0.2f32) as f64);
    }

    #[test]
    fn cast_float_to_int_truncates_and_refuses_nan() {
        let a = Val::F(ndarray::arr1(&[-2.7, 2.7]).into_dyn(), DataType::Float);
        let Val::I(r, _) = cast(a, DataType::Int64).unwrap() else {
            panic!("int result expected")
        };
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![-2, 2]);
        let nan = Val::F(ndarray::arr1(&[f64::NAN]).into_dyn(), DataType::Float);
        assert!(cast(nan, DataType::Int32).is_none());
    }

    #[test]
    fn slice_clamps_like_numpy() {
        // Expected values are numpy's: x = arange(10); x[-3:100], x[8:1:-3], x[5:-100:-2].
        let x = Val::I(
            ndarray::Array1::from_iter(0..10i64).into_dyn(),
            DataType::Int64,
        );
        let node = crate::onnx::proto::NodeProto {
            input: vec!["x".into(), "s".into(), "e".into(), "a".into(), "p".into()],
            ..Default::default()
        };
        let run = |start: i64, end: i64, step: i64| -> Vec<i64> {
            let ints = |i: usize| Some(Some(vec![[0, start, end, 0, step][i]]));
            match slice(&node, x.clone(), &ints).unwrap() {
                Val::I(a, _) => a.iter().copied().collect(),
                Val::F(..) => panic!("int result expected"),
            }
        };
        assert_eq!(run(-3, 100, 1), vec![7, 8, 9]);
        assert_eq!(run(8, 1, -3), vec![8, 5, 2]);
        assert_eq!(run(5, -100, -2), vec![5, 3, 1]);
        assert_eq!(run(i64::MIN, i64::MAX, 4), vec![0, 4, 8]);
    }
}
