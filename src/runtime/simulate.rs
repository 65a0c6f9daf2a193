//! The simulation graph: a rewritten copy of a model that tract 0.23.9 can run and that computes
//! the same numbers as the model under ONNX semantics.
//!
//! Rewrites (top-level graph only; each is exact, no approximation is introduced):
//! 1. `If` whose condition is an initializer or a `Constant` node output: the taken branch is
//!    inlined. Every name the branch defines (node outputs, branch initializers, node names) gets
//!    the prefix `<if-name>/<then|else>/`; each branch output `o_j` becomes
//!    `Identity(o_j) -> if.output[j]`. Repeated until no constant `If` is left, so nested constant
//!    `If`s fold too.
//! 2. `DequantizeLinear(x, scale[, zp])` with all three inputs constant: replaced by an initializer
//!    holding `y = f32(x - zp) * scale` (the ONNX formula, computed in f32), per-tensor, per-axis
//!    (`axis`, default 1) or block-wise (`block_size`). Sub-byte ints are unpacked low nibble
//!    first. The result has the scale's element type (f32, or f16/bf16 rounded from the f32
//!    product), or `output_dtype` when set.
//! 3. `Cast(to = FLOAT)` of a constant float16/bfloat16/double tensor: replaced by the f32
//!    initializer (f16 and bf16 widen exactly).
//! 4. Initializers and `Constant` nodes nobody reads any more are dropped (tract would still try
//!    to load an unused int4 initializer and fail).
//!
//! Invariant: running `simulation_graph` on its own output applies no rewrite (idempotent).
//! Activation `QuantizeLinear`/`DequantizeLinear` pairs are left alone: tract runs them in f32.
//!
//! Opt-in, for the graphs that are only run ([`fake_quant_as_float_ops`]; validation): a
//! per-tensor 8-bit `QuantizeLinear` with constant scale and zero point becomes float ops tract
//! vectorizes (and fuses into one pass, or into the producing convolution's kernel) and a
//! `Cast`, where tract's own `QuantizeLinear` is a scalar loop (half of efficientnet_b0's
//! validation CPU). Before / after (`r = 1 / s` in f32, as tract's `QuantizeLinear` takes it;
//! `M = 1.5 * 2^23`; `[lo, hi]` the integer type's range):
//! ```text
//! q = QuantizeLinear(x, s, zp)             v = Mul(x, r)
//!                                          c = Min(Max(v, lo - zp), hi - zp)
//!                                          n = Sub(Add(c, M), M - zp)
//!                                          q = Cast<to = uint8|int8>(n)
//! ```
//! tract computes `q = clamp(i32(round_half_even(x * r)) + zp, lo, hi)`. For `x * r` finite
//! and below `2^31 - 256` in magnitude both give the same integer: rounding commutes with a
//! clamp to integer bounds; `c + M` lies in `[2^23, 2^24)` where the f32 spacing is 1, so the sum
//! rounds `c` half to even (`M` is even); `- (M - zp)` is exact. Outside that domain they
//! differ on purpose: NaN gives `lo` (f32 `max` drops NaN) where tract gives `zp`, and
//! `|x * r| >= 2^31 - zp` saturates (as the ONNX spec says) where tract's `i32 + zp` wraps
//! around.
//!
//! The `Cast` and tract's `DequantizeLinear` after it are scalar loops too (a fifth of
//! efficientnet_b0's candidate run). Where `q` is read only by per-tensor `DequantizeLinear`s
//! with the same zero point, the pair becomes one float `Mul`:
//! ```text
//! q = QuantizeLinear(x, s, zp)             v = Mul(x, r)
//! y = DequantizeLinear(q, s2, zp)          c = Min(Max(v, lo - zp), hi - zp)
//!                                          d = Sub(Add(c, M), M)
//!                                          y = Mul(d, s2)
//! ```
//! `d` is the integer `q - zp` exactly, and tract's `DequantizeLinear` computes
//! `f32(q - zp) * s2`: the same product, rounded once. That holds only while the `Mul` stays
//! where it is; tract merges a scalar `Mul` into a following constant multiplication (a
//! `BatchNormalization`, a `Mul` by a constant: `s2 * a` rounds differently, seen on
//! testdata/external_data.onnx), so the pair is rewritten only when every reader of `y` is an op
//! that keeps it apart (`Conv`, `MatMul`, `Add`, pooling, ...: checked bit for bit on the
//! testdata models and seven zoo models); otherwise tract's `DequantizeLinear` stays.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, ensure, Context, Result};

use super::tensor::{data_type, decode_floats, decode_ints, dtype_name, encode_floats, numel};
use crate::onnx::proto::attribute_proto::AttributeType;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};

/// Which constant `DequantizeLinear`s rewrite 2 folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFolding {
    /// Every one: the graph holds float weights only.
    AheadOfTime,
    /// Only those tract 0.23.9 cannot load (sub-byte or 16-bit integers, block-wise, f16/bf16
    /// scales, an `output_dtype`). tract folds the rest at load with the same formula
    /// (`f32(x) - f32(zp)` then `* scale`, exact for these integers), so the numbers are the
    /// same, and no float copy of the weights exists on our side beside tract's own: on a large
    /// model that copy was a whole model's worth of memory.
    OnlyWhatTractCannotLoad,
}

/// Builds the simulation graph of `model` (see the module docs) and returns it with one note per
/// kind of rewrite applied (empty when the model is returned unchanged).
pub fn simulation_graph(model: &ModelProto) -> Result<(ModelProto, Vec<String>)> {
    simulation_graph_with(model, WeightFolding::AheadOfTime)
}

/// [`simulation_graph`], folding the constant `DequantizeLinear`s `folding` says.
pub fn simulation_graph_with(
    model: &ModelProto,
    folding: WeightFolding,
) -> Result<(ModelProto, Vec<String>)> {
    let mut model = model.clone();
    let mut notes = Vec::new();
    let Some(graph) = model.graph.as_mut() else {
        bail!("model has no graph");
    };
    for _ in 0..64 {
        let folded = fold_constant_ifs(graph)?;
        if folded.is_empty() {
            break;
        }
        notes.extend(folded);
    }
    let (dq, casts) = fold_constant_weights(graph, folding)?;
    if dq > 0 {
        notes.push(format!(
            "dequantized {dq} weight initializer{} ahead of time (DequantizeLinear of constants \
             replaced by float initializers)",
            plural(dq)
        ));
    }
    if casts > 0 {
        notes.push(format!(
            "converted {casts} float16/bfloat16/double initializer{} feeding Cast(to=float) to float32 ahead of time",
            plural(casts)
        ));
    }
    let dropped = drop_unused_constants(graph);
    if dropped > 0 {
        notes.push(format!(
            "dropped {dropped} unused constant{} (initializers / Constant nodes)",
            plural(dropped)
        ));
    }
    Ok((model, notes))
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

pub(crate) fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

pub(crate) fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    attr(node, name).and_then(|a| a.i)
}

pub(crate) fn node_label(node: &NodeProto) -> String {
    let name = if node.name().is_empty() {
        node.output.first().map(String::as_str).unwrap_or("")
    } else {
        node.name()
    };
    let domain = node.domain();
    if domain.is_empty() {
        format!("'{name}' ({})", node.op_type())
    } else {
        format!("'{name}' ({domain}::{})", node.op_type())
    }
}

/// Constant tensors visible in the top-level graph: initializers and `Constant` nodes with a
/// `value` tensor attribute.
fn constants(graph: &GraphProto) -> HashMap<String, TensorProto> {
    constant_refs(graph)
        .into_iter()
        .map(|(name, t)| (name.to_string(), t.clone()))
        .collect()
}

/// [`constants`] by reference (no copy of the weights).
fn constant_refs(graph: &GraphProto) -> HashMap<&str, &TensorProto> {
    let mut map: HashMap<&str, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name(), t)).collect();
    // An initializer that is also a graph input can be overridden by the caller: not a constant.
    for i in &graph.input {
        map.remove(i.name());
    }
    for node in &graph.node {
        if node.op_type() == "Constant" && node.domain().is_empty() {
            if let (Some(out), Some(t)) = (
                node.output.first(),
                attr(node, "value").and_then(|a| a.t.as_ref()),
            ) {
                map.insert(out.as_str(), t);
            }
        }
    }
    map
}

/// Every name defined anywhere in the model (to keep inlined names unique).
fn all_names(graph: &GraphProto, out: &mut HashSet<String>) {
    out.extend(graph.input.iter().map(|v| v.name().to_string()));
    out.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    for n in &graph.node {
        out.extend(n.output.iter().cloned());
        if !n.name().is_empty() {
            out.insert(n.name().to_string());
        }
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                all_names(g, out);
            }
        }
    }
}

fn rename_in_graph(graph: &mut GraphProto, map: &HashMap<String, String>) {
    let rn = |s: &mut String| {
        if let Some(n) = map.get(s.as_str()) {
            *s = n.clone();
        }
    };
    for v in graph
        .input
        .iter_mut()
        .chain(graph.output.iter_mut())
        .chain(graph.value_info.iter_mut())
    {
        if let Some(n) = v.name.as_mut() {
            rn(n);
        }
    }
    for t in &mut graph.initializer {
        if let Some(n) = t.name.as_mut() {
            rn(n);
        }
    }
    for node in &mut graph.node {
        node.input.iter_mut().for_each(rn);
        node.output.iter_mut().for_each(rn);
        if let Some(n) = node.name.as_mut() {
            rn(n);
        }
        for a in &mut node.attribute {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_in_graph(g, map);
            }
        }
    }
}

fn scalar_bool(t: &TensorProto) -> Result<bool> {
    let n = numel(t)?;
    ensure!(
        n == 1,
        "condition '{}' has {n} elements, expected 1",
        t.name()
    );
    let v = match data_type(t) {
        DataType::Float | DataType::Float16 | DataType::Double | DataType::Bfloat16 => {
            decode_floats(t)?[0] != 0.0
        }
        _ => decode_ints(t)?[0] != 0,
    };
    Ok(v)
}

/// One sweep over the top-level graph folding every `If` with a constant condition.
pub(crate) fn fold_constant_ifs(graph: &mut GraphProto) -> Result<Vec<String>> {
    let consts = constants(graph);
    let mut taken = HashSet::new();
    all_names(graph, &mut taken);
    let mut notes = Vec::new();
    let mut new_nodes = Vec::with_capacity(graph.node.len());
    let mut new_inits = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        let cond = (node.op_type() == "If" && node.domain().is_empty())
            .then(|| node.input.first().and_then(|c| consts.get(c)))
            .flatten();
        let Some(cond) = cond else {
            new_nodes.push(node);
            continue;
        };
        let label = node_label(&node);
        let value = scalar_bool(cond).with_context(|| format!("If {label}"))?;
        let which = if value { "then_branch" } else { "else_branch" };
        let mut branch = attr(&node, which)
            .and_then(|a| a.g.clone())
            .with_context(|| format!("If {label} has no {which} graph"))?;
        ensure!(
            branch.output.len() == node.output.len(),
            "If {label}: {which} has {} outputs, the node {}",
            branch.output.len(),
            node.output.len()
        );
        let base = if node.name().is_empty() {
            node.output.first().cloned().unwrap_or_else(|| "if".into())
        } else {
            node.name().to_string()
        };
        let prefix = format!("{base}/{}/", if value { "then" } else { "else" });
        let mut defined: Vec<String> = branch
            .initializer
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        defined.extend(branch.input.iter().map(|v| v.name().to_string()));
        for n in &branch.node {
            defined.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
            if !n.name().is_empty() {
                defined.push(n.name().to_string());
            }
        }
        let mut map = HashMap::new();
        for d in defined {
            if map.contains_key(&d) {
                continue;
            }
            let mut fresh = format!("{prefix}{d}");
            let mut k = 1;
            while taken.contains(&fresh) {
                fresh = format!("{prefix}{d}_{k}");
                k += 1;
            }
            taken.insert(fresh.clone());
            map.insert(d, fresh);
        }
        rename_in_graph(&mut branch, &map);
        new_inits.append(&mut branch.initializer);
        graph
            .sparse_initializer
            .append(&mut branch.sparse_initializer);
        new_nodes.append(&mut branch.node);
        for (j, (src, dst)) in branch.output.iter().zip(&node.output).enumerate() {
            if dst.is_empty() {
                continue;
            }
            new_nodes.push(NodeProto {
                name: Some(format!("{base}/output{j}")),
                op_type: Some("Identity".into()),
                input: vec![src.name().to_string()],
                output: vec![dst.clone()],
                ..Default::default()
            });
        }
        notes.push(format!(
            "folded If {label} (condition constant {value}): inlined its {which}"
        ));
    }
    graph.node = new_nodes;
    graph.initializer.extend(new_inits);
    Ok(notes)
}

/// `y = f32(q - zp) * scale` over `x` of shape `dims`, per-tensor / per-axis / block-wise.
pub(crate) fn dequantize(
    q: &[i64],
    dims: &[usize],
    scale: &[f32],
    scale_dims: &[usize],
    zp: Option<&[i64]>,
    axis: i64,
    block_size: i64,
) -> Result<Vec<f32>> {
    if let Some(zp) = zp {
        ensure!(
            zp.len() == scale.len(),
            "zero point has {} values, scale {}",
            zp.len(),
            scale.len()
        );
    }
    let zp_at = |i: usize| zp.map_or(0, |z| z[i]);
    if scale.len() == 1 && block_size == 0 {
        let (s, z) = (scale[0], zp_at(0));
        return Ok(q.iter().map(|&v| (v - z) as f32 * s).collect());
    }
    let rank = dims.len() as i64;
    let ax = if axis < 0 { axis + rank } else { axis };
    ensure!(
        (0..rank).contains(&ax),
        "axis {axis} out of range for rank {rank}"
    );
    let ax = ax as usize;
    let d = dims[ax];
    let inner: usize = dims[ax + 1..].iter().product();
    let sd = if block_size == 0 {
        ensure!(
            scale_dims.iter().product::<usize>() == d && scale.len() == d,
            "per-axis scale has {} values, axis {ax} has {d}",
            scale.len()
        );
        d
    } else {
        ensure!(block_size > 0, "block_size {block_size} must be positive");
        let bs = block_size as usize;
        ensure!(
            scale_dims.len() == dims.len()
                && scale_dims.iter().zip(dims).enumerate().all(|(i, (&s, &x))| if i == ax {
                    s == d.div_ceil(bs)
                } else {
                    s == x
                }),
            "block-wise scale shape {scale_dims:?} does not fit input {dims:?} with axis {ax}, block_size {bs}"
        );
        scale_dims[ax]
    };
    let bs = if block_size == 0 {
        1
    } else {
        block_size as usize
    };
    let mut out = Vec::with_capacity(q.len());
    for (i, &v) in q.iter().enumerate() {
        let r = i % inner.max(1);
        let a = (i / inner.max(1)) % d;
        let o = i / (inner.max(1) * d);
        let si = if block_size == 0 {
            a
        } else {
            (o * sd + a / bs) * inner + r
        };
        out.push((v - zp_at(si)) as f32 * scale[si]);
    }
    Ok(out)
}

fn dims_usize(t: &TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .with_context(|| format!("tensor '{}' has negative dim {d}", t.name()))
        })
        .collect()
}

/// Folds constant `DequantizeLinear` and `Cast(to=float)` of constant narrow floats; returns the
/// counts (dequantized, cast).
fn fold_constant_weights(graph: &mut GraphProto, folding: WeightFolding) -> Result<(usize, usize)> {
    let mut consts = constants(graph);
    let (mut dq, mut casts) = (0, 0);
    let mut kept = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let folded = if node.domain().is_empty() && node.op_type() == "DequantizeLinear" {
            if folding == WeightFolding::OnlyWhatTractCannotLoad && tract_loads_dq(&node, &consts) {
                None
            } else {
                fold_dq(&node, &consts)?
            }
        } else if node.domain().is_empty() && node.op_type() == "Cast" {
            fold_cast(&node, &consts)?
        } else {
            None
        };
        match folded {
            Some(t) => {
                if node.op_type() == "Cast" {
                    casts += 1;
                } else {
                    dq += 1;
                }
                consts.insert(t.name().to_string(), t.clone());
                graph.initializer.push(t);
            }
            None => kept.push(node),
        }
    }
    graph.node = kept;
    Ok((dq, casts))
}

/// Whether tract 0.23.9 runs this `DequantizeLinear` itself: 8- or 32-bit integer input, f32
/// scale, per-tensor or per-axis, no `output_dtype` other than float.
fn tract_loads_dq(node: &NodeProto, consts: &HashMap<String, TensorProto>) -> bool {
    let dtype = |i: usize| node.input.get(i).and_then(|s| consts.get(s)).map(data_type);
    matches!(
        dtype(0),
        Some(DataType::Int8 | DataType::Uint8 | DataType::Int32)
    ) && dtype(1) == Some(DataType::Float)
        && attr_int(node, "block_size").unwrap_or(0) == 0
        && attr_int(node, "output_dtype").is_none_or(|v| v == 0 || v == DataType::Float as i64)
}

fn fold_dq(node: &NodeProto, consts: &HashMap<String, TensorProto>) -> Result<Option<TensorProto>> {
    let get = |i: usize| {
        node.input
            .get(i)
            .filter(|s| !s.is_empty())
            .and_then(|s| consts.get(s))
    };
    let (Some(x), Some(scale)) = (get(0), get(1)) else {
        return Ok(None);
    };
    let has_zp = node.input.get(2).is_some_and(|s| !s.is_empty());
    let zp = get(2);
    if has_zp && zp.is_none() {
        return Ok(None);
    }
    let Some(out_name) = node.output.first() else {
        return Ok(None);
    };
    let label = node_label(node);
    let q = decode_ints(x).with_context(|| format!("DequantizeLinear {label}: input"))?;
    let s = decode_floats(scale).with_context(|| format!("DequantizeLinear {label}: scale"))?;
    let z = zp
        .map(decode_ints)
        .transpose()
        .with_context(|| format!("DequantizeLinear {label}: zero point"))?;
    if let Some(zp) = zp {
        ensure!(
            zp.data_type() == x.data_type(),
            "DequantizeLinear {label}: zero point is {}, input is {}",
            dtype_name(zp.data_type()),
            dtype_name(x.data_type())
        );
    }
    let dims = dims_usize(x)?;
    let values = dequantize(
        &q,
        &dims,
        &s,
        &dims_usize(scale)?,
        z.as_deref(),
        attr_int(node, "axis").unwrap_or(1),
        attr_int(node, "block_size").unwrap_or(0),
    )
    .with_context(|| format!("DequantizeLinear {label}"))?;
    let out_dt = match attr_int(node, "output_dtype").filter(|&v| v != 0) {
        Some(v) => DataType::try_from(v as i32).unwrap_or(DataType::Undefined),
        None => data_type(scale),
    };
    let t = encode_floats(out_name, &x.dims, &values, out_dt)
        .with_context(|| format!("DequantizeLinear {label}"))?;
    Ok(Some(t))
}

fn fold_cast(
    node: &NodeProto,
    consts: &HashMap<String, TensorProto>,
) -> Result<Option<TensorProto>> {
    let Some(x) = node.input.first().and_then(|s| consts.get(s)) else {
        return Ok(None);
    };
    let to = attr(node, "to")
        .filter(|a| a.r#type() == AttributeType::Int)
        .and_then(|a| a.i);
    if to != Some(DataType::Float as i64)
        || !matches!(
            data_type(x),
            DataType::Float16 | DataType::Bfloat16 | DataType::Double
        )
    {
        return Ok(None);
    }
    let Some(out) = node.output.first() else {
        return Ok(None);
    };
    let v = decode_floats(x).with_context(|| format!("Cast {}", node_label(node)))?;
    Ok(Some(encode_floats(out, &x.dims, &v, DataType::Float)?))
}

/// Names read anywhere: node inputs at every depth and graph outputs at every depth.
fn used_names(graph: &GraphProto, out: &mut HashSet<String>) {
    out.extend(graph.output.iter().map(|v| v.name().to_string()));
    for n in &graph.node {
        out.extend(n.input.iter().cloned());
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                used_names(g, out);
            }
        }
    }
}

fn drop_unused_constants(graph: &mut GraphProto) -> usize {
    let mut used = HashSet::new();
    used_names(graph, &mut used);
    let inputs: HashSet<String> = graph.input.iter().map(|v| v.name().to_string()).collect();
    let before = graph.initializer.len() + graph.node.len();
    graph
        .initializer
        .retain(|t| used.contains(t.name()) || inputs.contains(t.name()));
    graph.node.retain(|n| {
        !(n.op_type() == "Constant"
            && n.domain().is_empty()
            && n.output.iter().all(|o| !used.contains(o)))
    });
    before - graph.initializer.len() - graph.node.len()
}

/// `M = 1.5 * 2^23`: `c + M - M` rounds `c` to an integer, half to even, for `|c| <= 2^22`.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// What [`fake_quant_as_float_ops`] replaced, to put back (when tract refuses the rewritten
/// graph, e.g. a `QuantizeLinear` reading float16 or int32 values, whose element type is not
/// known here).
pub struct FakeQuantUndo {
    nodes: Vec<NodeProto>,
    initializers: usize,
    value_info: Vec<crate::onnx::proto::ValueInfoProto>,
}

impl FakeQuantUndo {
    /// Restores the graph [`fake_quant_as_float_ops`] rewrote.
    pub fn undo(self, model: &mut ModelProto) {
        if let Some(graph) = model.graph.as_mut() {
            graph.node = self.nodes;
            graph.initializer.truncate(self.initializers);
            graph.value_info = self.value_info;
        }
    }
}

/// The opt-in rewrite of the module docs, in place: every per-tensor 8-bit `QuantizeLinear`
/// with constant parameters becomes `Mul`, `Max`, `Min`, `Add`, `Sub` on floats and a `Cast`
/// to its integer type, writing the same output name; where every reader of that output is a
/// per-tensor `DequantizeLinear` with the same zero point whose own readers tract leaves apart
/// ([`float_dequantize_readers`]), there is no `Cast`: the last `Sub` gives `q - zp` as a float
/// and each `DequantizeLinear` becomes a `Mul` by its scale. Returns how many `QuantizeLinear`s
/// were replaced and how to undo it (`None`: the model is unchanged). New initializers are
/// appended (scalars only).
pub fn fake_quant_as_float_ops(model: &mut ModelProto) -> Result<Option<(usize, FakeQuantUndo)>> {
    let Some(graph) = model.graph.as_mut() else {
        bail!("model has no graph");
    };
    let consts = constant_refs(graph);
    let plans: HashMap<usize, FloatFakeQuant> = graph
        .node
        .iter()
        .enumerate()
        .filter_map(|(i, q)| plan_fake_quant(q, &consts).map(|p| (i, p)))
        .collect();
    if plans.is_empty() {
        return Ok(None);
    }
    let float_readers = float_dequantize_readers(graph, &plans, &consts);
    drop(consts);
    let undo = FakeQuantUndo {
        nodes: graph.node.clone(),
        initializers: graph.initializer.len(),
        value_info: graph.value_info.clone(),
    };
    let mut taken = HashSet::new();
    all_names(graph, &mut taken);
    let mut inits = Vec::new();
    let count = plans.len();
    // Reader node index -> the float tensor of `q - zp` it multiplies instead.
    let mut reads_integers: HashMap<usize, String> = HashMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len() + 5 * count);
    for (i, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if let Some(integers) = reads_integers.remove(&i) {
            // `DequantizeLinear(q, s, zp)` -> `Mul(q - zp, s)`: tract's `(q - zp) as f32 * s`.
            nodes.push(NodeProto {
                name: node.name.clone(),
                op_type: Some("Mul".into()),
                input: vec![integers, node.input[1].clone()],
                output: vec![node.output[0].clone()],
                ..Default::default()
            });
            continue;
        }
        let Some(plan) = plans.get(&i) else {
            nodes.push(node);
            continue;
        };
        let base = if node.name().is_empty() {
            node.output[0].clone()
        } else {
            node.name().to_string()
        };
        let readers = float_readers.get(&i);
        let zp = plan.zero_point as f32;
        // With float readers the zero point is not added back: the last `Sub` gives `q - zp`.
        let added_zp = if readers.is_some() { 0.0 } else { zp };
        let mut operand =
            |what: &str, v: f32| scalar(&mut taken, &mut inits, format!("{base}/fq_{what}"), v);
        let steps = [
            ("Mul", operand("recip_scale", plan.recip_scale)?),
            ("Max", operand("lo", plan.lo as f32 - zp)?),
            ("Min", operand("hi", plan.hi as f32 - zp)?),
            ("Add", operand("magic", ROUNDING_MAGIC)?),
            ("Sub", operand("magic_less_zp", ROUNDING_MAGIC - added_zp)?),
        ];
        let mut prev = node.input[0].clone();
        for (op, operand) in steps {
            let out = fresh_name(&mut taken, format!("{base}/fq_{}", op.to_lowercase()));
            nodes.push(NodeProto {
                name: Some(out.clone()),
                op_type: Some(op.into()),
                input: vec![prev, operand],
                output: vec![out.clone()],
                ..Default::default()
            });
            prev = out;
        }
        if let Some(readers) = readers {
            for &r in readers {
                reads_integers.insert(r, prev.clone());
            }
            continue;
        }
        let (output, to) = (node.output[0].clone(), plan.dtype);
        nodes.push(NodeProto {
            name: node.name.clone(),
            op_type: Some("Cast".into()),
            input: vec![prev],
            output: vec![output],
            attribute: vec![AttributeProto {
                name: Some("to".into()),
                r#type: Some(AttributeType::Int as i32),
                i: Some(to as i64),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    graph.node = nodes;
    graph.initializer.extend(inits);
    Ok(Some((count, undo)))
}

/// For each planned `QuantizeLinear` (by node index) whose output is read only by per-tensor
/// `DequantizeLinear`s with a constant f32 scale and the same zero point, each of whose outputs
/// is read only by ops that keep a scale multiplication apart
/// ([`keeps_a_scale_multiplication_apart`]), and none of which is a graph output or read inside
/// a subgraph: those `DequantizeLinear`s' node indices. Each comes after its `QuantizeLinear`
/// (nodes are in topological order).
fn float_dequantize_readers(
    graph: &GraphProto,
    plans: &HashMap<usize, FloatFakeQuant>,
    consts: &HashMap<&str, &TensorProto>,
) -> HashMap<usize, Vec<usize>> {
    let mut out_of: HashMap<&str, usize> = HashMap::new();
    for &i in plans.keys() {
        out_of.insert(graph.node[i].output[0].as_str(), i);
    }
    let mut excluded: HashSet<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
    for n in &graph.node {
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                used_names(g, &mut excluded);
            }
        }
    }
    // Top-level readers of each value, to check what reads a DequantizeLinear's output.
    let mut read_by: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            read_by.entry(i.as_str()).or_default().push(n);
        }
    }
    let safe_output = |dq: &NodeProto| {
        let out = dq.output[0].as_str();
        !excluded.contains(out)
            && read_by.get(out).is_none_or(|rs| {
                rs.iter()
                    .all(|r| keeps_a_scale_multiplication_apart(r, consts))
            })
    };
    let mut readers: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut refused: HashSet<usize> = HashSet::new();
    for (r, n) in graph.node.iter().enumerate() {
        for (slot, name) in n.input.iter().enumerate() {
            let Some(&q) = out_of.get(name.as_str()) else {
                continue;
            };
            let zp_of = |t: &TensorProto| {
                decode_ints(t)
                    .ok()
                    .map(|v| (v[0], data_type(t)))
                    .filter(|_| matches!(data_type(t), DataType::Uint8 | DataType::Int8))
            };
            let plan = &plans[&q];
            let same_zp = match n.input.get(2).filter(|z| !z.is_empty()) {
                None => plan.zero_point == 0 && plan.dtype == DataType::Uint8,
                Some(_) => one_value(n, 2, consts)
                    .and_then(zp_of)
                    .is_some_and(|(z, dt)| z == plan.zero_point && dt == plan.dtype),
            };
            let dequantizes = slot == 0
                && r > q
                && n.domain().is_empty()
                && n.op_type() == "DequantizeLinear"
                && (2..=3).contains(&n.input.len())
                && n.output.len() == 1
                && attr_int(n, "block_size").unwrap_or(0) == 0
                && attr_int(n, "output_dtype").unwrap_or(0) == 0
                && one_value(n, 1, consts).is_some_and(|t| data_type(t) == DataType::Float)
                && same_zp;
            if dequantizes && !excluded.contains(name) && safe_output(n) {
                readers.entry(q).or_default().push(r);
            } else {
                refused.insert(q);
            }
        }
    }
    readers.retain(|q, _| !refused.contains(q));
    readers
}

/// Whether tract 0.23.9 leaves a scalar `Mul` feeding `reader` where it is: no constant
/// multiplication of its own for tract to merge the scale into (a `BatchNormalization`, a `Mul`
/// by a constant, `HardSigmoid`, `Gemm` with `alpha`: the merged constant `s * a` rounds
/// differently), checked bit for bit on the testdata and zoo models. Anything else keeps tract's
/// own `DequantizeLinear`.
fn keeps_a_scale_multiplication_apart(
    reader: &NodeProto,
    consts: &HashMap<&str, &TensorProto>,
) -> bool {
    if !reader.domain().is_empty() {
        return false;
    }
    match reader.op_type() {
        "Conv" | "MatMul" | "Add" | "Concat" | "MaxPool" | "AveragePool" | "GlobalAveragePool"
        | "Sigmoid" | "Flatten" | "Reshape" => true,
        "Gemm" => reader
            .attribute
            .iter()
            .all(|a| a.name() != "alpha" || a.f() == 1.0),
        "Mul" => reader
            .input
            .iter()
            .all(|i| !consts.contains_key(i.as_str())),
        _ => false,
    }
}

/// `base`, or `base_k` with the first `k` that is not taken; marked taken.
fn fresh_name(taken: &mut HashSet<String>, base: String) -> String {
    let mut name = base.clone();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// A new scalar f32 initializer holding `v`, named after `base`; returns its name.
fn scalar(
    taken: &mut HashSet<String>,
    inits: &mut Vec<TensorProto>,
    base: String,
    v: f32,
) -> Result<String> {
    let name = fresh_name(taken, base);
    inits.push(encode_floats(&name, &[], &[v], DataType::Float)?);
    Ok(name)
}

/// What a replaceable `QuantizeLinear` computes: `clamp(round(x * recip_scale) + zero_point,
/// lo, hi)`.
struct FloatFakeQuant {
    recip_scale: f32,
    zero_point: i64,
    lo: i64,
    hi: i64,
    dtype: DataType,
}

/// The constant one-element tensor at input `slot` of `node`.
fn one_value<'a>(
    node: &NodeProto,
    slot: usize,
    consts: &HashMap<&str, &'a TensorProto>,
) -> Option<&'a TensorProto> {
    let t = *consts.get(node.input.get(slot)?.as_str())?;
    (numel(t).ok()? == 1).then_some(t)
}

fn plan_fake_quant(q: &NodeProto, consts: &HashMap<&str, &TensorProto>) -> Option<FloatFakeQuant> {
    if !(q.domain().is_empty() && q.op_type() == "QuantizeLinear") {
        return None;
    }
    if !(2..=3).contains(&q.input.len()) || q.output.len() != 1 || q.output[0].is_empty() {
        return None;
    }
    if attr_int(q, "block_size").unwrap_or(0) != 0 || attr_int(q, "output_dtype").unwrap_or(0) != 0
    {
        return None;
    }
    let scale = one_value(q, 1, consts).filter(|t| data_type(t) == DataType::Float)?;
    let s = decode_floats(scale).ok()?[0];
    let recip_scale = s.recip();
    if !(s.is_normal() && s > 0.0 && recip_scale.is_normal()) {
        return None;
    }
    let (zero_point, dtype) = match q.input.get(2).filter(|z| !z.is_empty()) {
        None => (0, DataType::Uint8),
        Some(_) => {
            let z = one_value(q, 2, consts)?;
            (decode_ints(z).ok()?[0], data_type(z))
        }
    };
    let (lo, hi) = match dtype {
        DataType::Uint8 => (0, 255),
        DataType::Int8 => (-128, 127),
        _ => return None,
    };
    Some(FloatFakeQuant {
        recip_scale,
        zero_point,
        lo,
        hi,
        dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONV_INT8: &str = r#"
<
   ir_version: 8,
   opset_import: ["" : 17]
>
g (float[1,2,4,4] x) => (float[1,3,4,4] y)
<
   int8[3,2,1,1] w0_q = {-127, -81, 127, 34, -127, -20},
   float[3] w0_s = {0.0065354328, 0.0047244094, 0.0063779526},
   int32[3] b3_q = {-66, -1270, 605},
   float[3] b3_s = {0.00015245414, 0.000110207824, 0.00014878056},
   uint8[3,2,1,1] u_q = {1, 200, 7, 255, 0, 3},
   float u_s = {0.01},
   uint8 u_z = {128}
>
{
   [w0_DQ] w = DequantizeLinear <axis: int = 0> (w0_q, w0_s)
   [b3_DQ] b = DequantizeLinear <axis: int = 0> (b3_q, b3_s)
   [u_DQ] u = DequantizeLinear (u_q, u_s, u_z)
   [conv] h = Conv (x, w, b)
   [conv2] y = Conv (x, u)
   [add] z = Add (h, y)
}
"#;

    #[test]
    fn tract_folds_loadable_weights_to_the_same_numbers() {
        let model = crate::onnx::text::parse_model(
            &CONV_INT8.replace("=> (float[1,3,4,4] y)", "=> (float[1,3,4,4] z)"),
        )
        .unwrap();
        let (ahead, _) = simulation_graph_with(&model, WeightFolding::AheadOfTime).unwrap();
        let (left, notes) =
            simulation_graph_with(&model, WeightFolding::OnlyWhatTractCannotLoad).unwrap();
        let dq = |m: &ModelProto| {
            let g = m.graph.as_ref().unwrap();
            g.node
                .iter()
                .filter(|n| n.op_type() == "DequantizeLinear")
                .count()
        };
        assert_eq!((dq(&ahead), dq(&left)), (0, 3));
        assert!(notes.is_empty(), "{notes:?}");
        let x = ndarray::ArrayD::from_shape_fn(vec![1, 2, 4, 4], |i| {
            (i[1] * 16 + i[2] * 4 + i[3]) as f32 * 0.37 - 5.0
        });
        let run = |m: &ModelProto| {
            crate::runtime::run_model(m, &[("x".to_string(), x.clone())], &[]).unwrap()[0]
                .1
                .clone()
        };
        let (a, b) = (run(&ahead), run(&left));
        let bits = |v: &ndarray::ArrayD<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn what_tract_cannot_load_is_still_folded() {
        let text = CONV_INT8
            .replace("ir_version: 8", "ir_version: 10")
            .replace("\"\" : 17", "\"\" : 21")
            .replace(
                "float[3] w0_s = {0.0065354328, 0.0047244094, 0.0063779526}",
                "float[3,1,1,1] w0_s = {0.0065354328, 0.0047244094, 0.0063779526}",
            )
            .replace(
                "DequantizeLinear <axis: int = 0> (w0_q",
                "DequantizeLinear <axis: int = 1, block_size: int = 2> (w0_q",
            );
        let model = crate::onnx::text::parse_model(&text).unwrap();
        let (left, _) =
            simulation_graph_with(&model, WeightFolding::OnlyWhatTractCannotLoad).unwrap();
        let g = left.graph.as_ref().unwrap();
        let kept: Vec<&str> = g
            .node
            .iter()
            .filter(|n| n.op_type() == "DequantizeLinear")
            .map(|n| n.name())
            .collect();
        assert_eq!(kept, ["b3_DQ", "u_DQ"]);
    }

    /// `x -> Q -> DQ` for each (zero point type, value) and scale: the float ops give tract's
    /// bits on ties both ways, small negatives (a -0 rounding), both bounds, far outside them
    /// and the zero point itself.
    #[test]
    fn fake_quant_as_float_ops_gives_tracts_bits() {
        let mut xs: Vec<f32> = vec![
            0.0, -0.0, 0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 0.1, -0.1, 1e-30, -1e-30, 3e6, -3e6,
            1e9, -1e9, 63.75, -64.25, 127.5, -128.5, 255.5, 500.0, -500.0,
        ];
        xs.extend((0..1000).map(|i| (i as f32 - 500.0) * 0.137_25));
        xs.extend((0..1000).map(|i| ((i * 7919) % 2000) as f32 * 0.25 - 250.0));
        let n = xs.len();
        // The DequantizeLinear's output is the graph's (a Cast and tract's DequantizeLinear
        // stay), or read by a Concat (the pair becomes a float Mul).
        let readers = [
            (n, "[d] y = DequantizeLinear (q, sd, zp)", "Cast"),
            (
                2 * n,
                "[d] d = DequantizeLinear (q, sd, zp)\n  [c] y = Concat <axis: int = 0> (d, d)",
                "Mul",
            ),
        ];
        for ((zp, scale), (len, tail, ends_with)) in [
            ("uint8 zp = {0}", "0.5"),
            ("uint8 zp = {128}", "0.5"),
            ("uint8 zp = {3}", "0.0123"),
            ("int8 zp = {0}", "0.5"),
            ("int8 zp = {-7}", "0.75"),
            ("int8 zp = {100}", "0.031"),
        ]
        .into_iter()
        .flat_map(|p| readers.map(|r| (p, r)))
        {
            let text = format!(
                "<ir_version: 8, opset_import: [\"\" : 17]>\n\
                 g (float[{n}] x) => (float[{len}] y) <float s = {{{scale}}}, float sd = {{{scale}}}, {zp}>\n\
                 {{\n  [q] q = QuantizeLinear (x, s, zp)\n  {tail}\n}}"
            );
            let model = crate::onnx::text::parse_model(&text).unwrap();
            let mut fast = model.clone();
            let (count, _) = fake_quant_as_float_ops(&mut fast).unwrap().unwrap();
            assert_eq!(count, 1);
            let g = fast.graph.as_ref().unwrap();
            let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
            assert!(!ops.contains(&"QuantizeLinear"), "{ops:?}");
            assert_eq!(
                ops.contains(&"DequantizeLinear"),
                ends_with == "Cast",
                "{ops:?}"
            );
            assert!(ops.contains(&ends_with), "{ops:?}");
            assert_eq!(ops.contains(&"Cast"), ends_with == "Cast", "{ops:?}");
            let r = 1.0 / scale.parse::<f32>().unwrap();
            let outside = |v: f32| (v * r).abs() >= 2_147_483_648.0 - 256.0;
            let run = |m: &ModelProto, values: &[f32]| {
                let x = ndarray::ArrayD::from_shape_vec(vec![n], values.to_vec()).unwrap();
                crate::runtime::run_model(m, &[("x".to_string(), x)], &[]).unwrap()[0]
                    .1
                    .iter()
                    .map(|f| f.to_bits())
                    .collect::<Vec<_>>()
            };
            // tract's own QuantizeLinear adds the zero point to an i32 that overflows outside
            // the exact domain (a panic in debug builds, a wrap in release): it only sees values
            // inside it (the others replaced by 0); the float ops also get the far-out values.
            let inside: Vec<f32> = xs
                .iter()
                .map(|&v| if outside(v) { 0.0 } else { v })
                .collect();
            let (a, b) = (run(&model, &inside), run(&fast, &inside));
            assert_eq!(a, b, "{zp}, scale {scale}: inside the exact domain");
            let (a, b) = (a, run(&fast, &xs));
            assert_eq!(a.len(), len);
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                let i = i % n;
                if outside(xs[i]) {
                    // Outside the exact domain: tract's `i32 + zp` may wrap; ours saturates.
                    let s = scale.parse::<f32>().unwrap();
                    let bound = if xs[i] > 0.0 { 1 } else { 0 };
                    let z: f32 = zp
                        .split('{')
                        .nth(1)
                        .unwrap()
                        .trim_end_matches('}')
                        .parse()
                        .unwrap();
                    let (lo, hi) = if zp.starts_with("uint8") {
                        (0.0, 255.0)
                    } else {
                        (-128.0, 127.0)
                    };
                    let want = if bound == 1 {
                        (hi - z) * s
                    } else {
                        (lo - z) * s
                    };
                    assert_eq!(f32::from_bits(*b), want, "{zp}, x = {}", xs[i]);
                    continue;
                }
                assert_eq!(
                    a,
                    b,
                    "{zp}, scale {scale}, x = {}: tract {} float ops {}",
                    xs[i],
                    f32::from_bits(*a),
                    f32::from_bits(*b)
                );
            }
        }
    }

    /// What tract's `QuantizeLinear` kernel does not take per tensor stays: per-axis scales,
    /// a scale that is a graph input.
    #[test]
    fn fake_quant_leaves_per_axis_and_computed_scales() {
        let text = "<ir_version: 8, opset_import: [\"\" : 17]>\n\
             g (float[2,4] x, float t) => (float[2,4] y, uint8[2,4] q2) <float[2] s = {0.5, 0.25}, uint8[2] zp = {2, 3}, uint8 z = {1}>\n\
             {\n  [q] q = QuantizeLinear <axis: int = 0> (x, s, zp)\n  [d] y = DequantizeLinear <axis: int = 0> (q, s, zp)\n  [q2] q2 = QuantizeLinear (x, t, z)\n}";
        let mut model = crate::onnx::text::parse_model(text).unwrap();
        assert!(fake_quant_as_float_ops(&mut model).unwrap().is_none());
    }

    #[test]
    fn dequantize_stays_where_tract_would_merge_the_scale() {
        // `d` read by a Mul by a constant (tract would merge `s * k`), `e`'s DequantizeLinear by
        // a Conv-free Add and the graph: only a reader set that keeps the Mul apart is rewritten.
        let text = "<ir_version: 8, opset_import: [\"\" : 17]>\n\
             g (float[4] x) => (float[4] y, float[4] z) <float s = {0.5}, uint8 zp = {3}, float k = {3.0}, float t = {0.25}>\n\
             {\n  [q] q = QuantizeLinear (x, s, zp)\n  [d] d = DequantizeLinear (q, s, zp)\n  [m] y = Mul (d, k)\n\
             [q2] q2 = QuantizeLinear (x, t, zp)\n  [d2] e = DequantizeLinear (q2, t, zp)\n  [a] z = Add (e, x)\n}";
        let mut model = crate::onnx::text::parse_model(text).unwrap();
        let (count, _) = fake_quant_as_float_ops(&mut model).unwrap().unwrap();
        assert_eq!(count, 2);
        let g = model.graph.as_ref().unwrap();
        let dq: Vec<&str> = g
            .node
            .iter()
            .filter(|n| n.op_type() == "DequantizeLinear")
            .map(|n| n.output[0].as_str())
            .collect();
        assert_eq!(dq, ["d"]);
        assert!(g
            .node
            .iter()
            .any(|n| n.op_type() == "Mul" && n.output[0] == "e"));
    }

    #[test]
    fn dequantize_per_axis_and_blocked() {
        // x: [2, 4], axis 0 per-axis.
        let q = [1, 2, 3, 4, -1, -2, -3, -4];
        let y = dequantize(&q, &[2, 4], &[0.5, 2.0], &[2], Some(&[1, 0]), 0, 0).unwrap();
        assert_eq!(y, vec![0.0, 0.5, 1.0, 1.5, -2.0, -4.0, -6.0, -8.0]);
        // axis 1 per-axis: scale per column.
        let y = dequantize(&q, &[2, 4], &[1.0, 2.0, 3.0, 4.0], &[4], None, 1, 0).unwrap();
        assert_eq!(y, vec![1.0, 4.0, 9.0, 16.0, -1.0, -4.0, -9.0, -16.0]);
        // block-wise on axis 1 with block 3: scale [2, 2]; columns 0..3 block 0, column 3 block 1.
        let y = dequantize(&q, &[2, 4], &[1.0, 10.0, 2.0, 20.0], &[2, 2], None, 1, 3).unwrap();
        assert_eq!(y, vec![1.0, 2.0, 3.0, 40.0, -2.0, -4.0, -6.0, -80.0]);
        assert!(dequantize(&q, &[2, 4], &[1.0, 2.0, 3.0], &[3], None, 1, 0).is_err());
    }
}
