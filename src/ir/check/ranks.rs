//! Ranks (and dims, [`super::dims`]) inferred over node outputs, through subgraphs, against
//! the shapes the model declares.
//!
//! ONNX shape inference (run by `onnx.checker` with `full_check` and by every runtime at load)
//! rejects a model whose declared shape of a value has another rank than the value's inferred
//! one: "Inferred shape and existing shape differ in rank". tract's analysis (preflight,
//! [`crate::session`]'s branch checks) catches that where tract can type the graph; inside `If`
//! branches fed by symbolic values it cannot, and such a model would pass through the tool and
//! come out as invalid as it went in. This check needs no dims, only ranks:
//!
//! ```text
//! If(cond) { then: LSTM(...) -> Y_h[2 dims declared nowhere] -> Concat(...) -> s }   (rank 3)
//! graph output: s declared float[2, 128]                                             (rank 2)
//! -> refused: "value 's' (output of node 'If_0' (If)) is declared with rank 2, but its
//!    producer gives rank 3"
//! ```
//!
//! Rules (standard-domain ops only; anything else gives an unknown rank, which is never an
//! error): same rank as input 0 (unary math, activations, normalizations, Conv/pools, Slice,
//! Pad, Tile, Transpose, Split, TopK, Q/DQ, Cast, ...); the largest input rank (broadcasting
//! ops: Add, Mul, Where, ...); MatMul's `max(ra, rb)` with 1-D operands dropping their axis;
//! Gemm and Flatten 2; Shape 1, Size 0; Gather `r_data - 1 + r_indices`; Unsqueeze /
//! Squeeze / Reduce* / ArgMax / ArgMin by their (attribute or constant input) axes and
//! `keepdims`; Reshape, Expand and ConstantOfShape by the length of a constant shape input;
//! Concat and Split keep their rank; LSTM/GRU/RNN give Y rank 4 and the states rank 3;
//! Constant its tensor's rank; If the rank both branches' outputs agree on.
//!
//! **Dims** ride along: where [`super::dims`] knows an output's dims (and agrees on the rank),
//! the value carries them downstream; a declared dim that differs from a known inferred one is
//! returned as a [`DimContradiction`], never an error, for the session to declare unknown
//! (ONNX Runtime loads such a model, only `onnx.checker` rejects it).
//!
//! A value's rank, once inferred, is compared with every declaration of it in the graph
//! (graph outputs, value_info, a subgraph's own outputs); declared-only values (graph inputs,
//! values whose producer has no rule) carry their declared rank downstream, as ONNX merges
//! them. The main graph's outputs are the exception: public models ship contradicting output
//! declarations that every runtime loads (ddddocr's `common.onnx` declares [1, ?] and computes
//! [1, 1, 8210]), so those are returned ([`RankContradiction`]) for the session to correct,
//! not refused.

use super::declared::graph_constants;
use super::dims::{
    node_dims, operand_mismatch, squeezed_dim_not_one, Dims, BROADCASTING_OPS, SAME_SHAPE_OPS,
};
use super::who;
use crate::ir::op::Attrs;
use crate::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::onnx::proto::{type_proto, GraphProto, NodeProto, TensorProto};
use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};

/// A main-graph output declared with another rank than its producer gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankContradiction {
    pub output: String,
    pub declared: usize,
    pub inferred: usize,
}

/// A declared dim (graph output or value_info, in any graph) that differs from the dim its
/// producer gives ([`super::dims`]). ONNX Runtime loads such a model ("lenient merge"),
/// `onnx.checker` does not: the session declares the dim unknown instead of refusing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimContradiction {
    pub value: String,
    /// The producing node, as errors name it: `node 'c1' (Conv)`.
    pub node: String,
    pub axis: usize,
    pub declared: i64,
    pub inferred: i64,
}

/// What [`check_model_ranks`] found that the session corrects rather than refuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contradictions {
    pub ranks: Vec<RankContradiction>,
    pub dims: Vec<DimContradiction>,
}

/// Check the main graph and its subgraphs (see the module docs); contradicting main-graph
/// output ranks and every contradicting declared dim are returned, every other rank
/// contradiction is an error.
pub fn check_model_ranks(g: &GraphProto) -> Result<Contradictions> {
    let mut found = Contradictions::default();
    check_ranks(g, &HashMap::new(), &HashMap::new(), &mut found, true)?;
    Ok(found)
}

/// Check `g` and its subgraphs; `outer` holds the shapes of values visible from enclosing
/// graphs; `main` says whether contradicting graph-output ranks are collected (main graph)
/// instead of refused. Returns the shapes of `g`'s outputs (for an enclosing `If`).
fn check_ranks<'a>(
    g: &'a GraphProto,
    outer: &HashMap<String, Dims>,
    outer_constants: &HashMap<&'a str, &'a TensorProto>,
    found: &mut Contradictions,
    main: bool,
) -> Result<Vec<Option<Dims>>> {
    let declared = declared_shapes(g);
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(|o| o.as_str()))
        .collect();
    let mut resolved: HashSet<String> = HashSet::new();
    // Constants of enclosing graphs are visible here too (axes read from an outer Constant).
    let mut constants = outer_constants.clone();
    constants.extend(graph_constants(g));
    let mut shapes = outer.clone();
    for (name, t) in &constants {
        shapes.insert(name.to_string(), t.dims.iter().map(|&d| Some(d)).collect());
    }
    for v in &g.input {
        if let Some((_, d)) = declared.get(v.name()).and_then(|d| d.first()) {
            shapes.insert(v.name().to_string(), d.clone());
        }
    }
    // Nodes in any order (subgraphs are sorted later at load): repeat until nothing changes.
    let mut done = vec![false; g.node.len()];
    loop {
        let mut progress = false;
        for (k, node) in g.node.iter().enumerate() {
            if done[k] {
                continue;
            }
            let ready = node
                .input
                .iter()
                .all(|i| i.is_empty() || !produced.contains(i.as_str()) || resolved.contains(i));
            if !ready {
                continue;
            }
            done[k] = true;
            progress = true;
            let ranks = node_ranks(node, &shapes, &constants, found)?;
            if let Some(wrong) = operand_mismatch(node, &shapes)
                .or_else(|| squeezed_dim_not_one(node, &shapes, &constants))
            {
                bail!("{}: {wrong}", who(node));
            }
            // Axes and windows against the ranks inferred here, where nothing declares them.
            if node.domain().is_empty() || node.domain() == "ai.onnx" {
                super::check_values(node, &|n| shapes.get(n).map(Vec::len))?;
            }
            let dims = node_dims(node, &shapes, &constants);
            for (slot, out) in node.output.iter().enumerate() {
                if out.is_empty() {
                    continue;
                }
                resolved.insert(out.clone());
                // The rank rule decides the rank; the dims rule refines it when they agree.
                let got: Option<Dims> = match (
                    ranks.get(slot).cloned().flatten(),
                    dims.get(slot).cloned().flatten(),
                ) {
                    (Some(r), Some(d)) if r.len() == d.len() => Some(merge(&r, &d)),
                    (Some(r), _) => Some(r),
                    (None, _) => None,
                };
                let decls = declared.get(out.as_str()).map(Vec::as_slice).unwrap_or(&[]);
                let Some(mut r) = got else {
                    // Declared-only values carry their declaration downstream, as ONNX merges.
                    if let Some((_, d)) = decls.first() {
                        shapes.insert(out.clone(), d.clone());
                    }
                    continue;
                };
                for (is_output, d) in decls {
                    if r.len() != d.len() {
                        match (is_output, main) {
                            (true, true) => {
                                found.ranks.push(RankContradiction {
                                    output: out.clone(),
                                    declared: d.len(),
                                    inferred: r.len(),
                                });
                                continue;
                            }
                            (true, false) => bail!(
                                "subgraph output '{out}' (of {}) is declared with rank {}, but its producer gives rank {}",
                                who(node),
                                d.len(),
                                r.len()
                            ),
                            (false, _) => bail!(
                                "value '{out}' (output of {}) is declared with rank {}, but its producer gives rank {}",
                                who(node),
                                d.len(),
                                r.len()
                            ),
                        }
                    }
                    for (axis, (i, dd)) in r.iter().zip(d).enumerate() {
                        if let (Some(i), Some(dd)) = (i, dd) {
                            if i != dd {
                                found.dims.push(DimContradiction {
                                    value: out.clone(),
                                    node: who(node),
                                    axis,
                                    declared: *dd,
                                    inferred: *i,
                                });
                            }
                        }
                    }
                    // As ONNX merges: inferred dims first, declared ones fill the gaps.
                    r = merge(&r, d);
                }
                shapes.insert(out.clone(), r);
            }
        }
        if !progress {
            break;
        }
    }
    Ok(g.output
        .iter()
        .map(|o| shapes.get(o.name()).cloned())
        .collect())
}

/// `first`'s known dims, `second`'s where `first` has none (same rank).
fn merge(first: &Dims, second: &Dims) -> Dims {
    first.iter().zip(second).map(|(a, b)| a.or(*b)).collect()
}

/// Shapes declared for values of `g` (graph inputs and outputs, value_info; a value may be
/// declared more than once), each marked whether it is a graph output's; `-1` and symbolic
/// dims are unknown.
fn declared_shapes(g: &GraphProto) -> HashMap<&str, Vec<(bool, Dims)>> {
    let mut out: HashMap<&str, Vec<(bool, Dims)>> = HashMap::new();
    let outputs = g.output.iter().map(|v| (true, v));
    let others = g.input.iter().chain(&g.value_info).map(|v| (false, v));
    for (is_output, v) in outputs.chain(others) {
        let shape = v.r#type.as_ref().and_then(|t| match &t.value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        });
        if let Some(s) = shape {
            let dims = s
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v >= 0 => Some(v),
                    _ => None,
                })
                .collect();
            out.entry(v.name()).or_default().push((is_output, dims));
        }
    }
    out
}

/// The shapes of `node`'s outputs where its rule and its inputs' ranks fix the rank: unknown
/// dims, except `If`, whose outputs take the dims both branches agree on.
fn node_ranks<'a>(
    node: &'a NodeProto,
    shapes: &HashMap<String, Dims>,
    constants: &HashMap<&'a str, &'a TensorProto>,
    found: &mut Contradictions,
) -> Result<Vec<Option<Dims>>> {
    let n_out = node.output.len();
    if !(node.domain().is_empty() || node.domain() == "ai.onnx") {
        return Ok(vec![None; n_out]);
    }
    // Subgraph bodies are checked whatever the op; `If` also gives its outputs' shapes.
    let mut branches = Vec::new();
    for a in &node.attribute {
        for sub in a.g.iter().chain(&a.graphs) {
            branches.push((
                a.name().to_string(),
                check_ranks(sub, shapes, constants, found, false)?,
            ));
        }
    }
    if node.op_type() == "If" {
        let of = |name: &str| {
            branches
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, r)| r.clone())
        };
        return Ok(match (of("then_branch"), of("else_branch")) {
            (Some(t), Some(e)) => (0..n_out)
                .map(
                    |k| match (t.get(k).cloned().flatten(), e.get(k).cloned().flatten()) {
                        // Dims the branches disagree on are unknown (ONNX's union of shapes).
                        (Some(a), Some(b)) if a.len() == b.len() => Some(
                            a.iter()
                                .zip(&b)
                                .map(|(x, y)| if x == y { *x } else { None })
                                .collect(),
                        ),
                        _ => None,
                    },
                )
                .collect(),
            _ => vec![None; n_out],
        });
    }
    let ranks: HashMap<&str, usize> = node
        .input
        .iter()
        .filter_map(|i| shapes.get(i.as_str()).map(|s| (i.as_str(), s.len())))
        .collect();
    Ok(input_ranks_to_outputs(node, &ranks, constants)?
        .into_iter()
        .map(|r| r.map(|r| vec![None; r]))
        .collect())
}

/// The ranks of `node`'s outputs, where its rule and its inputs' ranks fix them.
fn input_ranks_to_outputs<'a>(
    node: &'a NodeProto,
    ranks: &HashMap<&str, usize>,
    constants: &HashMap<&'a str, &'a TensorProto>,
) -> Result<Vec<Option<usize>>> {
    let n_out = node.output.len();
    let rank = |k: usize| -> Option<usize> {
        node.input
            .get(k)
            .filter(|i| !i.is_empty())
            .and_then(|i| ranks.get(i.as_str()).copied())
    };
    let ints = |k: usize| -> Option<Vec<i64>> {
        let name = node.input.get(k).filter(|i| !i.is_empty())?;
        crate::onnx::tensor::to_i64(constants.get(name.as_str())?).ok()
    };
    // A 1-D constant's length: the rank a shape input asks for.
    let shape_len = |k: usize| -> Option<usize> {
        let name = node.input.get(k).filter(|i| !i.is_empty())?;
        let t = constants.get(name.as_str())?;
        (t.dims.len() == 1).then(|| t.dims[0] as usize)
    };
    let axes_list = |k: usize| -> Option<Vec<i64>> {
        match node.attr_ints("axes").ok().flatten() {
            Some(a) => Some(a),
            None => ints(k),
        }
    };
    let axes = |k: usize| axes_list(k).map(|a| a.len());
    // Axes name each axis once (ONNX: "Axis 0 is referred to more than once"); negative ones
    // count from the end of the rank they index (the output's for Unsqueeze).
    if matches!(node.op_type(), "Unsqueeze" | "Squeeze") || node.op_type().starts_with("Reduce") {
        if let Some(list) = axes_list(1) {
            let indexed = match node.op_type() {
                "Unsqueeze" => rank(0).map(|r| r + list.len()),
                _ => rank(0),
            };
            let normal: Vec<i64> = list
                .iter()
                .map(|&a| match indexed {
                    Some(r) if a < 0 => a + r as i64,
                    _ => a,
                })
                .collect();
            if dedup_len(&normal) != normal.len() {
                bail!("{}: axes {list:?} name an axis more than once", who(node));
            }
        }
    }
    // Slice's constant starts, ends, axes and steps give one value per sliced axis (ONNX:
    // "Incorrect or missing input value for starts and ends").
    if node.op_type() == "Slice" {
        let lengths: Vec<(&str, usize)> = ["starts", "ends", "axes", "steps"]
            .iter()
            .enumerate()
            .filter_map(|(k, name)| ints(k + 1).map(|v| (*name, v.len())))
            .collect();
        if let Some(((a, la), (b, lb))) = lengths
            .iter()
            .flat_map(|x| lengths.iter().map(move |y| (*x, *y)))
            .find(|((_, la), (_, lb))| la != lb)
        {
            bail!(
                "{}: constant input '{a}' has {la} value(s) but '{b}' has {lb}: they must have one per sliced axis",
                who(node)
            );
        }
    }
    let keepdims = node.attr_int("keepdims").ok().flatten().unwrap_or(1) != 0;
    let same = |r: Option<usize>| vec![r; n_out];
    let one = |r: Option<usize>| {
        let mut v = vec![None; n_out];
        if n_out > 0 {
            v[0] = r;
        }
        v
    };
    let inputs_known: Option<Vec<usize>> = (0..node.input.len())
        .filter(|&k| !node.input[k].is_empty())
        .map(rank)
        .collect();
    Ok(match node.op_type() {
        // Rank-preserving: the same-shape ops, and ops that keep the rank but change dims.
        op if SAME_SHAPE_OPS.contains(&op)
            || matches!(
                op,
                "Conv"
                    | "ConvTranspose"
                    | "ConvInteger"
                    | "AveragePool"
                    | "LpPool"
                    | "GlobalAveragePool"
                    | "GlobalMaxPool"
                    | "GlobalLpPool"
                    | "Slice"
                    | "Pad"
                    | "Tile"
                    | "Transpose"
                    | "DepthToSpace"
                    | "SpaceToDepth"
                    | "Resize"
                    | "Upsample"
                    | "GatherElements"
                    | "Compress"
            ) =>
        {
            if node.op_type() == "Compress" && node.attr_int("axis").ok().flatten().is_none() {
                one(Some(1))
            } else {
                one(rank(0))
            }
        }
        "Dropout" | "BatchNormalization" | "LayerNormalization" => one(rank(0)),
        "MaxPool" => same(rank(0)),
        "Split" | "TopK" => same(rank(0)),
        op if BROADCASTING_OPS.contains(&op) => one(inputs_known.and_then(|r| r.into_iter().max())),
        "MatMul" | "MatMulInteger" => one(match (rank(0), rank(1)) {
            (Some(1), Some(1)) => Some(0),
            (Some(1), Some(b)) if b >= 2 => Some(b - 1),
            (Some(a), Some(1)) if a >= 2 => Some(a - 1),
            (Some(a), Some(b)) if a >= 2 && b >= 2 => Some(a.max(b)),
            _ => None,
        }),
        "Gemm" | "Flatten" => one(Some(2)),
        "Shape" => one(Some(1)),
        "Size" => one(Some(0)),
        "NonZero" => one(Some(2)),
        "Range" => one(Some(1)),
        "Gather" => one(match (rank(0), rank(1)) {
            (Some(d), Some(i)) if d >= 1 => Some(d - 1 + i),
            _ => None,
        }),
        "Unsqueeze" => one(rank(0).zip(axes(1)).map(|(r, a)| r + a)),
        "Squeeze" => one(rank(0).zip(axes(1)).and_then(|(r, a)| r.checked_sub(a))),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => {
            let noop = node.attr_int("noop_with_empty_axes").ok().flatten() == Some(1);
            let axes_given = node.attr_ints("axes").ok().flatten().is_some()
                || node.input.get(1).is_some_and(|i| !i.is_empty());
            one(match (rank(0), keepdims) {
                (Some(r), true) => Some(r),
                (Some(r), false) if axes_given => axes(1).and_then(|a| r.checked_sub(a)),
                (Some(r), false) if noop => Some(r),
                (Some(_), false) => Some(0),
                (None, _) => None,
            })
        }
        "ArgMax" | "ArgMin" => {
            one(rank(0).and_then(|r| if keepdims { Some(r) } else { r.checked_sub(1) }))
        }
        "Reshape" | "ConstantOfShape" => {
            one(shape_len(if node.op_type() == "Reshape" { 1 } else { 0 }))
        }
        "Expand" => one(rank(0).zip(shape_len(1)).map(|(r, s)| r.max(s))),
        "Concat" => one(inputs_known.and_then(|r| r.first().copied())),
        "LSTM" | "GRU" | "RNN" => {
            let mut v = vec![Some(3); n_out];
            if n_out > 0 {
                v[0] = Some(4);
            }
            v
        }
        "Constant" => one(node
            .attribute
            .iter()
            .find(|a| a.name() == "value")
            .and_then(|a| a.t.as_ref())
            .map(|t| t.dims.len())),
        _ => vec![None; n_out],
    })
}

/// Distinct values among `axes`.
fn dedup_len(axes: &[i64]) -> usize {
    let mut a = axes.to_vec();
    a.sort_unstable();
    a.dedup();
    a.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{
        tensor_shape_proto::{dimension::Value, Dimension},
        TensorShapeProto, TypeProto, ValueInfoProto,
    };

    fn vi(name: &str, rank: usize) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: (0..rank)
                            .map(|_| Dimension {
                                value: Some(Value::DimValue(2)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("{op}_0")),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn graph(
        nodes: Vec<NodeProto>,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
    ) -> GraphProto {
        GraphProto {
            node: nodes,
            input: inputs,
            output: outputs,
            ..Default::default()
        }
    }

    #[test]
    fn matmul_and_broadcast_ranks_flow_to_the_declared_output() {
        let g = graph(
            vec![
                node("MatMul", &["a", "b"], &["m"]),
                node("Add", &["m", "c"], &["y"]),
            ],
            vec![vi("a", 3), vi("b", 2), vi("c", 1)],
            vec![vi("y", 3)],
        );
        assert_eq!(
            check_ranks(
                &g,
                &HashMap::new(),
                &HashMap::new(),
                &mut Contradictions::default(),
                false
            )
            .unwrap(),
            vec![Some(vec![Some(2); 3])]
        );
        // A value_info contradiction is refused; a main-graph output's is returned.
        let mut bad = graph(g.node.clone(), g.input.clone(), vec![vi("y", 3)]);
        bad.value_info.push(vi("m", 2));
        let e = check_model_ranks(&bad).unwrap_err().to_string();
        assert!(
            e.contains("'m'") && e.contains("rank 2") && e.contains("rank 3"),
            "{e}"
        );
        let out = graph(g.node.clone(), g.input.clone(), vec![vi("y", 2)]);
        assert_eq!(
            check_model_ranks(&out).unwrap().ranks,
            vec![RankContradiction {
                output: "y".into(),
                declared: 2,
                inferred: 3
            }]
        );
    }

    #[test]
    fn if_outputs_take_the_rank_both_branches_agree_on() {
        let branch = |op: &str| {
            graph(
                vec![node(op, &["x"], &["t"])],
                vec![],
                vec![ValueInfoProto {
                    name: Some("t".into()),
                    ..Default::default()
                }],
            )
        };
        let mut iff = node("If", &["cond"], &["s"]);
        for (name, op) in [("then_branch", "Relu"), ("else_branch", "Sigmoid")] {
            iff.attribute.push(crate::onnx::proto::AttributeProto {
                name: Some(name.into()),
                r#type: Some(5),
                g: Some(branch(op)),
                ..Default::default()
            });
        }
        let g = graph(
            vec![iff.clone()],
            vec![vi("x", 3), vi("cond", 0)],
            vec![vi("s", 2)],
        );
        let e = check_ranks(
            &g,
            &HashMap::new(),
            &HashMap::new(),
            &mut Contradictions::default(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'s'") && e.contains("(If)"), "{e}");
        let ok = graph(
            vec![iff.clone()],
            vec![vi("x", 3), vi("cond", 0)],
            vec![vi("s", 3)],
        );
        assert!(check_ranks(
            &ok,
            &HashMap::new(),
            &HashMap::new(),
            &mut Contradictions::default(),
            false
        )
        .is_ok());
        // Declared inside a branch: always refused.
        let mut inner = iff;
        if let Some(g) = inner.attribute[0].g.as_mut() {
            g.output[0] = vi("t", 1);
        }
        let nested = graph(vec![inner], vec![vi("x", 3), vi("cond", 0)], vec![]);
        let e = check_model_ranks(&nested).unwrap_err().to_string();
        assert!(e.contains("'t'") && e.contains("Relu"), "{e}");
    }

    #[test]
    fn unknown_ops_and_unknown_inputs_are_never_errors() {
        let mut custom = node("Frobnicate", &["a"], &["y"]);
        custom.domain = Some("com.example".into());
        let g = graph(
            vec![custom, node("Relu", &["q"], &["z"])],
            vec![vi("a", 3)],
            vec![vi("y", 1), vi("z", 4)],
        );
        assert!(check_ranks(
            &g,
            &HashMap::new(),
            &HashMap::new(),
            &mut Contradictions::default(),
            false
        )
        .is_ok());
    }
}
