//! Dims inferred over node outputs, for [`super::ranks`]' walk through every graph.
//!
//! ONNX shape inference rejects a declared dim that differs from the inferred one ("Inferred
//! shape and existing shape differ in dimension 1: (1) vs (17)"); ONNX Runtime loads the same
//! model with a warning ("Error merging shape info ... Falling back to lenient merge"). Inside
//! `If` branches fed by symbolic values tract cannot type, nothing else sees such a dim, so
//! the tool would re-emit a declaration the checker rejects:
//!
//! ```text
//! else_branch () => (float[?, 17, 1] c) {            # declared
//!     c = Conv(x, W)                                  # x: [?, 64, 1], W: float[1, 64, 1]
//! }                                                   # -> inferred [?, 1, 1]
//! ```
//!
//! A rule gives a dim only where ONNX's own inference for that op gives the same value for
//! every valid input, so a dim found here is never a false contradiction; anything else is
//! unknown (`None`), which is never an error. Rules (standard domain):
//! - same shape as input 0: unary math and activations, Cast, Identity, Softmax, Clip,
//!   normalizations, Q/DQ, CumSum, Trilu, Scatter*, ReverseSequence (output 0 of Dropout and
//!   BatchNormalization / LayerNormalization too);
//! - broadcasting ops (Add, Mul, Where, comparisons, ...): per axis, the one known dim other than
//!   1, or 1 when every input has 1 there;
//! - GlobalAveragePool / GlobalMaxPool / GlobalLpPool: `[N, C, 1, ...]`;
//! - Conv: `[N, M, out...]` with `out = floor((in + pads - ((k - 1) * d + 1)) / s) + 1` (`SAME_*`:
//!   `ceil(in / s)`), `N` from the input, `M` from the weight;
//! - MatMul (batch dims broadcast), Gemm (`transA`/`transB` read as ONNX does: the low 32 bits);
//! - Gather (`data[..axis] ++ indices ++ data[axis + 1..]`), Concat (sum along the axis),
//!   Unsqueeze / Squeeze / Reduce* with constant axes, Transpose, Flatten, Shape (with
//!   `start`/`end`), Size, Reshape and ConstantOfShape and Expand from a constant shape, Split,
//!   Slice and Pad from constant inputs, LSTM/GRU/RNN (`layout` 0), Constant.
//!
//! `If` is [`super::ranks`]' (it merges the branches' results).

use crate::ir::op::Attrs;
use crate::onnx::proto::{NodeProto, TensorProto};
use std::collections::HashMap;

/// A value's shape: its rank, and each dim where known.
pub(super) type Dims = Vec<Option<i64>>;

/// Ops whose output 0 has input 0's shape, whatever the attributes (ONNX shape inference
/// copies it): shared by the dims rules and the rank rules ([`super::ranks`]).
pub(super) const SAME_SHAPE_OPS: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Sqrt",
    "Neg",
    "Abs",
    "Erf",
    "Cast",
    "CastLike",
    "Identity",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Not",
    "Floor",
    "Ceil",
    "Round",
    "Reciprocal",
    "Sin",
    "Cos",
    "Tan",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "Sign",
    "IsNaN",
    "IsInf",
    "InstanceNormalization",
    "LRN",
    "QuantizeLinear",
    "DequantizeLinear",
    "CumSum",
    "Mish",
    "Celu",
    "ThresholdedRelu",
    "Shrink",
    "BitwiseNot",
    "Trilu",
    "ScatterND",
    "ScatterElements",
    "ReverseSequence",
];

/// The dims of `node`'s outputs where a rule fixes them (see the module docs).
pub(super) fn node_dims(
    node: &NodeProto,
    shapes: &HashMap<String, Dims>,
    constants: &HashMap<&str, &TensorProto>,
) -> Vec<Option<Dims>> {
    let n_out = node.output.len();
    let mut out = vec![None; n_out];
    if !(node.domain().is_empty() || node.domain() == "ai.onnx") {
        return out;
    }
    let input = |k: usize| -> Option<&Dims> {
        let name = node.input.get(k).filter(|i| !i.is_empty())?;
        shapes.get(name.as_str())
    };
    let ints = |k: usize| -> Option<Vec<i64>> {
        let name = node.input.get(k).filter(|i| !i.is_empty())?;
        crate::onnx::tensor::to_i64(constants.get(name.as_str())?).ok()
    };
    let attr_int = |name: &str| node.attr_int(name).ok().flatten();
    let attr_ints = |name: &str| node.attr_ints(name).ok().flatten();
    let first = rules(node, &input, &ints, &attr_int, &attr_ints);
    match first {
        Rule::One(d) => {
            if n_out > 0 {
                out[0] = d;
            }
        }
        Rule::Each(v) => {
            for (slot, d) in v.into_iter().enumerate().take(n_out) {
                out[slot] = d;
            }
        }
    }
    out
}

enum Rule {
    /// Output 0's dims (other outputs unknown).
    One(Option<Dims>),
    /// Every output's.
    Each(Vec<Option<Dims>>),
}

/// `axis` (may be negative) as an index into `rank` axes.
fn normal_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// Right-aligned broadcasting of `shapes` (all ranks known).
fn broadcast(shapes: &[&Dims]) -> Option<Dims> {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut known_other: Option<i64> = None;
        let mut all_one = true;
        for s in shapes {
            let Some(k) = (i + s.len()).checked_sub(rank) else {
                continue; // an implicit 1
            };
            match s[k] {
                Some(1) => {}
                Some(v) => {
                    all_one = false;
                    match known_other {
                        Some(o) if o != v => return None, // incompatible: not ours to judge
                        _ => known_other = Some(v),
                    }
                }
                None => all_one = false,
            }
        }
        out.push(match known_other {
            Some(v) => Some(v),
            None if all_one => Some(1),
            None => None,
        });
    }
    Some(out)
}

/// Ops whose inputs broadcast multidirectionally (numpy rules): ONNX shape inference rejects
/// two known dims on one right-aligned axis that differ and are both other than 1.
pub(super) const BROADCASTING_OPS: [&str; 23] = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Where",
    "Mod",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
];

/// The first right-aligned axis (counted from the right, 1 = the last) where two of `shapes` have
/// known dims that differ and are both other than 1: (axis, dim, other dim, shape, other shape).
fn broadcast_mismatch<'d>(shapes: &[&'d Dims]) -> Option<(usize, i64, i64, &'d Dims, &'d Dims)> {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    for from_right in 1..=rank {
        let mut first: Option<(i64, &Dims)> = None;
        for s in shapes {
            let Some(k) = s.len().checked_sub(from_right) else {
                continue; // an implicit 1
            };
            match (s[k], first) {
                (Some(v), None) if v != 1 => first = Some((v, s)),
                (Some(v), Some((f, other))) if v != 1 && v != f => {
                    return Some((from_right, f, v, other, s))
                }
                _ => {}
            }
        }
    }
    None
}

fn product(dims: &[Option<i64>]) -> Option<i64> {
    dims.iter()
        .try_fold(1i64, |acc, d| d.and_then(|d| acc.checked_mul(d)))
}

fn rules<'s>(
    node: &NodeProto,
    input: &dyn Fn(usize) -> Option<&'s Dims>,
    ints: &dyn Fn(usize) -> Option<Vec<i64>>,
    attr_int: &dyn Fn(&str) -> Option<i64>,
    attr_ints: &dyn Fn(&str) -> Option<Vec<i64>>,
) -> Rule {
    let same = || Rule::One(input(0).cloned());
    let inputs: Option<Vec<&'s Dims>> = node
        .input
        .iter()
        .enumerate()
        .filter(|(_, i)| !i.is_empty())
        .map(|(k, _)| input(k))
        .collect();
    match node.op_type() {
        op if SAME_SHAPE_OPS.contains(&op)
            || matches!(op, "Dropout" | "BatchNormalization" | "LayerNormalization") =>
        {
            same()
        }
        op if BROADCASTING_OPS.contains(&op) => Rule::One(inputs.and_then(|s| broadcast(&s))),
        "Conv" => Rule::One(conv(node, input(0), input(1), attr_ints)),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            Rule::One(input(0).filter(|x| x.len() >= 2).map(|x| {
                let mut d = x[..2].to_vec();
                d.resize(x.len(), Some(1));
                d
            }))
        }
        "MatMul" | "MatMulInteger" => Rule::One(matmul(input(0), input(1))),
        "Gemm" => Rule::One(match (input(0), input(1)) {
            (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
                let (ta, tb) = (gemm_flag(node, "transA"), gemm_flag(node, "transB"));
                Some(vec![
                    if ta { a[1] } else { a[0] },
                    if tb { b[0] } else { b[1] },
                ])
            }
            _ => None,
        }),
        "Gather" => Rule::One(input(0).zip(input(1)).and_then(|(data, idx)| {
            let axis = normal_axis(attr_int("axis").unwrap_or(0), data.len())?;
            let mut d = data[..axis].to_vec();
            d.extend(idx.iter().copied());
            d.extend(data[axis + 1..].iter().copied());
            Some(d)
        })),
        "Concat" => Rule::One(inputs.and_then(|s| {
            let rank = s.first()?.len();
            if s.iter().any(|x| x.len() != rank) {
                return None;
            }
            let axis = normal_axis(attr_int("axis")?, rank)?;
            Some(
                (0..rank)
                    .map(|i| {
                        if i == axis {
                            s.iter()
                                .try_fold(0i64, |acc, x| x[i].and_then(|v| acc.checked_add(v)))
                        } else {
                            s.iter().find_map(|x| x[i])
                        }
                    })
                    .collect(),
            )
        })),
        "Unsqueeze" => Rule::One(input(0).and_then(|x| {
            let axes = attr_ints("axes").or_else(|| ints(1))?;
            let rank = x.len() + axes.len();
            let mut axes: Vec<usize> = axes
                .iter()
                .map(|&a| normal_axis(a, rank))
                .collect::<Option<_>>()?;
            axes.sort_unstable();
            let mut rest = x.iter();
            (0..rank)
                .map(|i| {
                    if axes.binary_search(&i).is_ok() {
                        Some(Some(1))
                    } else {
                        rest.next().copied()
                    }
                })
                .collect()
        })),
        "Squeeze" => Rule::One(input(0).and_then(|x| {
            let axes = match attr_ints("axes").or_else(|| ints(1)) {
                Some(a) => a
                    .iter()
                    .map(|&a| normal_axis(a, x.len()))
                    .collect::<Option<Vec<_>>>()?,
                // Without axes, every dim of 1 goes: known only when every dim is.
                None if x.iter().all(|d| d.is_some()) => {
                    (0..x.len()).filter(|&i| x[i] == Some(1)).collect()
                }
                None => return None,
            };
            Some(
                (0..x.len())
                    .filter(|i| !axes.contains(i))
                    .map(|i| x[i])
                    .collect(),
            )
        })),
        op if op.starts_with("Reduce") => Rule::One(input(0).and_then(|x| {
            let keepdims = attr_int("keepdims").unwrap_or(1) != 0;
            let axes = match attr_ints("axes").or_else(|| ints(1)) {
                Some(a) if !a.is_empty() => a
                    .iter()
                    .map(|&a| normal_axis(a, x.len()))
                    .collect::<Option<Vec<_>>>()?,
                _ if attr_int("noop_with_empty_axes") == Some(1) => return Some(x.clone()),
                _ if node.input.get(1).is_some_and(|i| !i.is_empty()) => return None,
                _ => (0..x.len()).collect(),
            };
            Some(
                (0..x.len())
                    .filter_map(|i| match (axes.contains(&i), keepdims) {
                        (true, true) => Some(Some(1)),
                        (true, false) => None,
                        (false, _) => Some(x[i]),
                    })
                    .collect(),
            )
        })),
        "Transpose" => Rule::One(input(0).and_then(|x| {
            let perm = attr_ints("perm").unwrap_or_else(|| (0..x.len() as i64).rev().collect());
            perm.iter()
                .map(|&p| usize::try_from(p).ok().and_then(|p| x.get(p).copied()))
                .collect()
        })),
        "Flatten" => Rule::One(input(0).and_then(|x| {
            let a = attr_int("axis").unwrap_or(1);
            let a = if a < 0 { a + x.len() as i64 } else { a };
            let a = usize::try_from(a).ok().filter(|&a| a <= x.len())?;
            Some(vec![product(&x[..a]), product(&x[a..])])
        })),
        "Shape" => Rule::One(input(0).map(|x| {
            let r = x.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r);
            let start = clamp(attr_int("start").unwrap_or(0));
            let end = clamp(attr_int("end").unwrap_or(r));
            vec![Some((end - start).max(0))]
        })),
        "Size" => Rule::One(Some(vec![])),
        "Reshape" => Rule::One(input(0).zip(ints(1)).and_then(|(x, shape)| {
            let allowzero = attr_int("allowzero").unwrap_or(0) != 0;
            let mut d: Dims = shape
                .iter()
                .enumerate()
                .map(|(i, &s)| match s {
                    0 if !allowzero => x.get(i).copied().flatten(),
                    -1 => None,
                    s if s >= 0 => Some(s),
                    _ => None,
                })
                .collect();
            let minus = shape.iter().filter(|&&s| s == -1).count();
            if minus == 1 {
                let k = shape.iter().position(|&s| s == -1)?;
                let rest: Option<i64> = product(
                    &d.iter()
                        .enumerate()
                        .filter(|&(i, _)| i != k)
                        .map(|(_, v)| *v)
                        .collect::<Vec<_>>(),
                );
                if let (Some(total), Some(rest)) = (product(x), rest) {
                    if rest > 0 && total % rest == 0 {
                        d[k] = Some(total / rest);
                    }
                }
            }
            Some(d)
        })),
        "ConstantOfShape" => {
            Rule::One(ints(0).map(|s| s.into_iter().map(|v| (v >= 0).then_some(v)).collect()))
        }
        "Expand" => Rule::One(input(0).zip(ints(1)).and_then(|(x, s)| {
            let shape: Dims = s.into_iter().map(|v| (v >= 0).then_some(v)).collect();
            broadcast(&[x, &shape])
        })),
        "Split" => {
            let Some(x) = input(0) else {
                return Rule::One(None);
            };
            let Some(axis) = normal_axis(attr_int("axis").unwrap_or(0), x.len()) else {
                return Rule::One(None);
            };
            let n = node.output.len() as i64;
            let sizes: Option<Vec<i64>> = attr_ints("split").or_else(|| ints(1)).or_else(|| {
                // Equal parts (the last smaller, opset 18) only when the dim is known.
                let d = x[axis]?;
                if n == 0 {
                    return None;
                }
                let part = (d + n - 1) / n;
                Some((0..n).map(|k| part.min(d - part * k).max(0)).collect())
            });
            match sizes {
                Some(sizes) if sizes.len() == node.output.len() => Rule::Each(
                    sizes
                        .iter()
                        .map(|&s| {
                            let mut d = x.clone();
                            d[axis] = Some(s);
                            Some(d)
                        })
                        .collect(),
                ),
                _ => Rule::One(None),
            }
        }
        "Slice" => Rule::One(input(0).and_then(|x| {
            let starts = ints(1)?;
            let ends = ints(2)?;
            let axes = match node.input.get(3).filter(|i| !i.is_empty()) {
                Some(_) => ints(3)?,
                None => (0..starts.len() as i64).collect(),
            };
            let steps = match node.input.get(4).filter(|i| !i.is_empty()) {
                Some(_) => ints(4)?,
                None => vec![1; starts.len()],
            };
            if ends.len() != starts.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return None;
            }
            let mut d = x.clone();
            for k in 0..starts.len() {
                let a = normal_axis(axes[k], x.len())?;
                d[a] = x[a].and_then(|n| slice_len(n, starts[k], ends[k], steps[k]));
            }
            Some(d)
        })),
        "Pad" => Rule::One(input(0).and_then(|x| {
            if node.input.get(3).is_some_and(|i| !i.is_empty()) {
                return None; // explicit axes (opset 18): not needed here
            }
            let pads = attr_ints("pads").or_else(|| ints(1))?;
            if pads.len() != 2 * x.len() {
                return None;
            }
            Some(
                (0..x.len())
                    .map(|i| {
                        x[i].and_then(|v| v.checked_add(pads[i])?.checked_add(pads[i + x.len()]))
                    })
                    .collect(),
            )
        })),
        "LSTM" | "GRU" | "RNN" => {
            let (Some(x), Some(hidden)) = (input(0), attr_int("hidden_size")) else {
                return Rule::One(None);
            };
            if attr_int("layout").unwrap_or(0) != 0 || x.len() != 3 {
                return Rule::One(None);
            }
            let dirs = match node.attr_string("direction").ok().flatten().as_deref() {
                Some("bidirectional") => 2,
                _ => 1,
            };
            let (seq, batch) = (x[0], x[1]);
            let mut v = vec![Some(vec![Some(dirs), batch, Some(hidden)]); node.output.len()];
            if let Some(y) = v.first_mut() {
                *y = Some(vec![seq, Some(dirs), batch, Some(hidden)]);
            }
            Rule::Each(v)
        }
        "Constant" => Rule::One(
            node.attribute
                .iter()
                .find(|a| a.name() == "value")
                .and_then(|a| a.t.as_ref())
                .map(|t| t.dims.iter().map(|&d| Some(d)).collect()),
        ),
        _ => Rule::One(None),
    }
}

/// The length ONNX's Slice gives along a dim of `n` (starts and ends clamped as the spec says).
fn slice_len(n: i64, start: i64, end: i64, step: i64) -> Option<i64> {
    if step == 0 {
        return None;
    }
    let fix = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (s, e) = (fix(start), fix(end));
    let len = if step > 0 {
        let (s, e) = (s.clamp(0, n), e.clamp(0, n));
        (e - s + step - 1).div_euclid(step)
    } else {
        let (s, e) = (s.clamp(0, n - 1), e.clamp(-1, n - 1));
        (s - e + (-step) - 1).div_euclid(-step)
    };
    Some(len.max(0))
}

/// Gemm's `transA`/`transB`, read as ONNX does: through an `int` cast, only the low 32 bits count.
fn gemm_flag(node: &NodeProto, name: &str) -> bool {
    node.attr_int(name)
        .ok()
        .flatten()
        .is_some_and(|v| v as i32 != 0)
}

/// Where `node`'s operands disagree on a dim they must share, as ONNX shape inference
/// checks it (the reduction dim of MatMul and Gemm, Conv's input channels against the
/// weight's times `group`): what is wrong, for a one-line refusal. Only dims known on both
/// sides are compared. ONNX Runtime and `onnx.checker` reject such a model; inside an `If`
/// branch tract never sees it, so it would otherwise be re-emitted.
pub(super) fn operand_mismatch(node: &NodeProto, shapes: &HashMap<String, Dims>) -> Option<String> {
    if !(node.domain().is_empty() || node.domain() == "ai.onnx") {
        return None;
    }
    let input = |k: usize| -> Option<&Dims> {
        let name = node.input.get(k).filter(|i| !i.is_empty())?;
        shapes.get(name.as_str())
    };
    let show = |d: &Dims| {
        d.iter()
            .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if BROADCASTING_OPS.contains(&node.op_type()) {
        let known: Vec<&Dims> = (0..node.input.len()).filter_map(input).collect();
        return broadcast_mismatch(&known).map(|(axis, x, y, a, b)| {
            format!(
                "its operands do not broadcast: {x} vs {y} on axis -{axis} (input shapes [{}] \
                 and [{}])",
                show(a),
                show(b)
            )
        });
    }
    let (a, b) = (input(0)?, input(1)?);
    let differ = |x: Option<i64>, y: Option<i64>| matches!((x, y), (Some(x), Some(y)) if x != y);
    let (what, x, y) = match node.op_type() {
        "MatMul" | "MatMulInteger" if !a.is_empty() && !b.is_empty() => {
            let k_a = a[a.len() - 1];
            let k_b = if b.len() == 1 { b[0] } else { b[b.len() - 2] };
            ("reduction dim", k_a, k_b)
        }
        "Gemm" if a.len() == 2 && b.len() == 2 => {
            let (ta, tb) = (gemm_flag(node, "transA"), gemm_flag(node, "transB"));
            let k_a = if ta { a[0] } else { a[1] };
            let k_b = if tb { b[1] } else { b[0] };
            ("reduction dim", k_a, k_b)
        }
        "Conv" if b.len() >= 3 && kernel_disagrees(node, b) => {
            let kernel = node
                .attr_ints("kernel_shape")
                .ok()
                .flatten()
                .unwrap_or_default();
            return Some(format!(
                "attribute 'kernel_shape' {kernel:?} disagrees with the weight's spatial dims \
                 (weight shape [{}])",
                show(b)
            ));
        }
        "Conv" if a.len() >= 3 && b.len() == a.len() => {
            let group = node.attr_int("group").ok().flatten().unwrap_or(1);
            (
                "input channels (weight's times group)",
                a[1],
                b[1].map(|c| c * group),
            )
        }
        _ => return None,
    };
    differ(x, y).then(|| {
        format!(
            "its operands disagree on the {what}: {} vs {} (input shapes [{}] and [{}])",
            x.unwrap_or_default(),
            y.unwrap_or_default(),
            show(a),
            show(b)
        )
    })
}

/// A Conv's `kernel_shape` that names another window than its weight's known spatial dims
/// (ONNX Runtime: "kernel_shape is not compatible with W shape").
fn kernel_disagrees(node: &NodeProto, weight: &Dims) -> bool {
    let Some(kernel) = node.attr_ints("kernel_shape").ok().flatten() else {
        return false;
    };
    kernel.len() == weight.len() - 2
        && kernel
            .iter()
            .zip(&weight[2..])
            .any(|(k, w)| w.is_some_and(|w| w != *k))
}

/// A Squeeze that removes an axis whose known dim is not 1 (ONNX: "Dimension of input 1 must
/// be 1"), with its axes from the attribute or a constant input.
pub(super) fn squeezed_dim_not_one(
    node: &NodeProto,
    shapes: &HashMap<String, Dims>,
    constants: &HashMap<&str, &TensorProto>,
) -> Option<String> {
    if node.op_type() != "Squeeze" || !(node.domain().is_empty() || node.domain() == "ai.onnx") {
        return None;
    }
    let x = shapes.get(node.input.first()?.as_str())?;
    let axes = match node.attr_ints("axes").ok().flatten() {
        Some(a) => a,
        None => {
            let name = node.input.get(1).filter(|i| !i.is_empty())?;
            crate::onnx::tensor::to_i64(constants.get(name.as_str())?).ok()?
        }
    };
    axes.iter().find_map(|&a| {
        let axis = normal_axis(a, x.len())?;
        let d = x[axis]?;
        (d != 1).then(|| format!("axis {a} to squeeze has dim {d}, must be 1"))
    })
}

fn matmul(a: Option<&Dims>, b: Option<&Dims>) -> Option<Dims> {
    let (a, b) = (a?, b?);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let a2: Dims = if a.len() == 1 {
        vec![Some(1), a[0]]
    } else {
        a.clone()
    };
    let b2: Dims = if b.len() == 1 {
        vec![b[0], Some(1)]
    } else {
        b.clone()
    };
    let batch = broadcast(&[&a2[..a2.len() - 2].to_vec(), &b2[..b2.len() - 2].to_vec()])?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2]);
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1]);
    }
    Some(out)
}

fn conv(
    node: &NodeProto,
    x: Option<&Dims>,
    w: Option<&Dims>,
    attr_ints: &dyn Fn(&str) -> Option<Vec<i64>>,
) -> Option<Dims> {
    let (x, w) = (x?, w?);
    if x.len() < 2 || w.len() != x.len() {
        return None;
    }
    let spatial = x.len() - 2;
    let kernel: Dims = match attr_ints("kernel_shape") {
        Some(k) if k.len() == spatial => k.into_iter().map(Some).collect(),
        Some(_) => return None,
        None => w[2..].to_vec(),
    };
    let ones = vec![1; spatial];
    let strides = attr_ints("strides").unwrap_or_else(|| ones.clone());
    let dilations = attr_ints("dilations").unwrap_or_else(|| ones.clone());
    let pads = attr_ints("pads").unwrap_or_else(|| vec![0; 2 * spatial]);
    if strides.len() != spatial || dilations.len() != spatial || pads.len() != 2 * spatial {
        return None;
    }
    if strides.iter().chain(&dilations).any(|&v| v < 1) {
        return None;
    }
    let auto_pad = node
        .attr_string("auto_pad")
        .ok()
        .flatten()
        .unwrap_or_else(|| "NOTSET".into());
    let mut out = vec![x[0], w[0]];
    for i in 0..spatial {
        let d = x[i + 2].zip(kernel[i]).and_then(|(n, k)| {
            let (s, dl) = (strides[i], dilations[i]);
            let extent = k.checked_sub(1)?.checked_mul(dl)?.checked_add(1)?;
            match auto_pad.as_str() {
                "SAME_UPPER" | "SAME_LOWER" => Some((n + s - 1) / s),
                "VALID" => Some(((n - extent).div_euclid(s) + 1).max(0)),
                "NOTSET" => {
                    let padded = n.checked_add(pads[i])?.checked_add(pads[i + spatial])?;
                    let v = (padded - extent).div_euclid(s) + 1;
                    (v >= 0).then_some(v)
                }
                _ => None,
            }
        });
        out.push(d);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_takes_the_known_dim_other_than_one() {
        let a: Dims = vec![None, Some(128)];
        let b: Dims = vec![Some(1)];
        assert_eq!(broadcast(&[&a, &b]), Some(vec![None, Some(128)]));
        let c: Dims = vec![Some(1), Some(1)];
        assert_eq!(broadcast(&[&c, &b]), Some(vec![Some(1), Some(1)]));
        assert_eq!(broadcast(&[&c, &a]), Some(vec![None, Some(128)]));
    }

    #[test]
    fn operands_that_disagree_on_a_shared_dim_are_named() {
        let node = |op: &str, attrs: Vec<crate::onnx::proto::AttributeProto>| NodeProto {
            op_type: Some(op.into()),
            input: vec!["a".into(), "b".into()],
            output: vec!["y".into()],
            attribute: attrs,
            ..Default::default()
        };
        let int = |name: &str, v: i64| crate::onnx::proto::AttributeProto {
            name: Some(name.into()),
            i: Some(v),
            r#type: Some(crate::onnx::proto::attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        };
        let shapes = |a: Dims, b: Dims| HashMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        // Gemm with transB: B [N, K].
        let gemm = node("Gemm", vec![int("transB", 1)]);
        let wrong = shapes(vec![None, Some(64)], vec![Some(512), Some(128)]);
        let msg = operand_mismatch(&gemm, &wrong).expect("64 vs 128");
        assert!(msg.contains("64 vs 128"), "{msg}");
        let right = shapes(vec![None, Some(128)], vec![Some(512), Some(128)]);
        assert_eq!(operand_mismatch(&gemm, &right), None);
        // MatMul: unknown dims are never a contradiction.
        let mm = node("MatMul", vec![]);
        assert!(
            operand_mismatch(&mm, &shapes(vec![None, Some(3)], vec![Some(4), Some(2)])).is_some()
        );
        assert_eq!(
            operand_mismatch(&mm, &shapes(vec![None, None], vec![Some(4), Some(2)])),
            None
        );
        assert_eq!(
            operand_mismatch(&mm, &shapes(vec![Some(4)], vec![Some(4)])),
            None
        );
        // Conv: input channels = weight's channels times group.
        let conv = node("Conv", vec![int("group", 4)]);
        let ok = shapes(
            vec![None, Some(8), Some(5)],
            vec![Some(8), Some(2), Some(3)],
        );
        assert_eq!(operand_mismatch(&conv, &ok), None);
        let bad = shapes(
            vec![None, Some(6), Some(5)],
            vec![Some(8), Some(2), Some(3)],
        );
        assert!(operand_mismatch(&conv, &bad).is_some());
    }

    #[test]
    fn broadcasting_operands_with_two_known_dims_other_than_one_are_named() {
        let node = |op: &str, inputs: &[&str]| NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|i| i.to_string()).collect(),
            output: vec!["y".into()],
            ..Default::default()
        };
        let shapes = |named: &[(&str, Dims)]| -> HashMap<String, Dims> {
            named
                .iter()
                .map(|(n, d)| (n.to_string(), d.clone()))
                .collect()
        };
        let mul = node("Mul", &["a", "b"]);
        // mobilenet_v3_small with a rewired input (fuzz_external seed 30 case 7).
        let wrong = shapes(&[
            ("a", vec![None, Some(120), Some(6), Some(6)]),
            ("b", vec![None, Some(144), Some(6), Some(6)]),
        ]);
        let msg = operand_mismatch(&mul, &wrong).expect("120 vs 144");
        assert!(msg.contains("120 vs 144 on axis -3"), "{msg}");
        // 1s, unknown dims and missing leading axes broadcast.
        for ok in [
            shapes(&[
                ("a", vec![None, Some(120), Some(6), Some(6)]),
                ("b", vec![Some(120), Some(1), Some(1)]),
            ]),
            shapes(&[
                ("a", vec![Some(1), Some(120), None, Some(6)]),
                ("b", vec![Some(7), Some(1), Some(5), None]),
            ]),
            shapes(&[("a", vec![Some(6)]), ("b", vec![])]),
        ] {
            assert_eq!(operand_mismatch(&mul, &ok), None, "{ok:?}");
        }
        // Every input of a variadic or three-input op counts; an unknown one is skipped.
        let sum = node("Sum", &["a", "b", "c"]);
        let three = shapes(&[("a", vec![Some(1), Some(4)]), ("c", vec![Some(3), Some(5)])]);
        assert!(operand_mismatch(&sum, &three)
            .unwrap()
            .contains("4 vs 5 on axis -1"));
        let cond = node("Where", &["a", "b", "c"]);
        let fine = shapes(&[
            ("a", vec![Some(3), Some(1)]),
            ("b", vec![Some(4)]),
            ("c", vec![Some(1), Some(4)]),
        ]);
        assert_eq!(operand_mismatch(&cond, &fine), None);
        // Another domain's Add is not ONNX's.
        let mut custom = node("Add", &["a", "b"]);
        custom.domain = Some("com.example".into());
        assert_eq!(operand_mismatch(&custom, &wrong), None);
    }

    #[test]
    fn conv_gives_batch_weight_channels_and_window_extents() {
        // Fuzz seed 4 case 5 (silero-vad op18): a 1-D Conv [?, 64, 1] * [1, 64, 1] -> [?, 1, 1].
        let mut conv = NodeProto {
            op_type: Some("Conv".into()),
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        let shapes = HashMap::from([
            ("x".to_string(), vec![None, Some(64), Some(1)]),
            ("w".to_string(), vec![Some(1), Some(64), Some(1)]),
        ]);
        let dims = |n: &NodeProto| node_dims(n, &shapes, &HashMap::new());
        assert_eq!(dims(&conv), vec![Some(vec![None, Some(1), Some(1)])]);
        // floor((1 + 2 + 2 - 3) / 2) + 1 = 2 with a kernel of 2 dilated by 2 (extent 3).
        conv.attribute = vec![
            crate::ir::op::attr_ints("pads", &[2, 2]),
            crate::ir::op::attr_ints("strides", &[2]),
            crate::ir::op::attr_ints("kernel_shape", &[2]),
            crate::ir::op::attr_ints("dilations", &[2]),
        ];
        assert_eq!(dims(&conv), vec![Some(vec![None, Some(1), Some(2)])]);
    }

    #[test]
    fn slice_lengths_follow_the_spec_clamping() {
        assert_eq!(slice_len(10, 0, i64::MAX, 1), Some(10));
        assert_eq!(slice_len(10, -3, i64::MAX, 1), Some(3));
        assert_eq!(slice_len(10, 1, 9, 3), Some(3));
        assert_eq!(slice_len(10, -1, i64::MIN, -1), Some(10));
        assert_eq!(slice_len(10, 5, 2, 1), Some(0));
    }
}
