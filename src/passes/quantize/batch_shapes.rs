//! Static shape arithmetic under a dynamic batch: a model exported with a symbolic batch
//! dimension (`float[batch, 3, 224, 224]`) often recomputes its reshape targets and slice
//! bounds from `Shape` at every run, although every dim but the batch is fixed. This target
//! rewrite (the `batch-shapes` entry of [`crate::passes::target::Policy::decompose`]) replaces
//! those computations with constants, keeping the batch as Reshape's "copy this dim" `0`:
//!
//! ```text
//! before: s = Shape(x)                          # x: float[batch, 232, 14, 14]
//!         n = Unsqueeze(Gather(s, 0), [0])      # batch
//!         c = Unsqueeze(Div(Gather(s, 1), 2), [0])
//!         t = Concat(n, [2], c, h, w)           # [batch, 2, 116, 14, 14]
//!         y = Reshape(x, t)
//! after:  y = Reshape(x, [0, 2, 116, 14, 14])   # allowzero = 0: 0 copies x's dim 0
//! ```
//! and a Slice whose starts/ends/axes/steps are computed from fixed dims only gets them as
//! constants (ShuffleNetV2's channel split). The shape chains left unread are removed.
//!
//! Why (ONNX Runtime 1.32, ShuffleNetV2 with dynamic batch, BENCHMARKS.md "effspeed"): the
//! int8 output ran 80 Unsqueeze, 80 Gather, 29 Shape, 29 Div, 32 Concat on int64 scalars per
//! inference, each a kernel dispatch (~20% of its profile); folded: 1.61x -> 1.74x fp32 in
//! one interleaved run, same SQNR (the float values are untouched).
//!
//! How the dims are known: tract's shape analysis of the model with the batch pinned to 2 and
//! then to 3 (every other input dim as declared). A dim equal in both runs is fixed; one equal
//! to the batch in both (2, then 3) is the batch. The shape integers are then evaluated
//! symbolically over {fixed value, batch} through `Shape` (with `start`/`end`), `Gather` on
//! axis 0 with constant indices, `Unsqueeze`/`Squeeze` between scalar and 1-D, `Concat` on axis
//! 0, integer `Cast`, `Identity` and integer `Add`/`Sub`/`Mul`/`Div` of fixed values.
//!
//! Conditions: every real graph input declares its shape, with a symbolic dim 0 and fixed dims
//! elsewhere (otherwise nothing is done: a model with a dynamic height, as PP-OCR's, keeps its
//! shape arithmetic); a Reshape target may hold the batch only at position 0, where its data
//! input's dim 0 is the batch, and only with `allowzero` 0; a Slice's inputs must be fixed
//! values. Nothing else is touched, and a model without a computed reshape target or slice
//! bound is not analysed at all (no tract run).
//!
//! Invariants: float values unchanged (same reshapes, same slices, for every batch size whose
//! dims follow the two analysed ones); graph inputs and outputs unchanged; running twice
//! equals running once (the second run finds no computed target).

use crate::ir::op::{self, Attrs};
use crate::ir::{Graph, Model, Patch};
use crate::onnx::proto::tensor_shape_proto::dimension::Value as DimValue;
use crate::onnx::proto::{type_proto, NodeProto, TensorProto};
use crate::onnx::tensor;
use anyhow::Result;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

/// One integer of a shape computation: a fixed value or the batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sym {
    Fixed(i64),
    Batch,
}

/// Full shapes of the graph inputs, by name (what tract's analysis pins).
type InputShapes = Vec<(String, Vec<usize>)>;

/// A shape integer tensor: its elements and whether it is a scalar (rank 0) or 1-D.
type Ints = (Vec<Sym>, bool);

/// The batch sizes tract analyses the model at (two, so that a fixed dim and the batch differ).
const BATCHES: [usize; 2] = [2, 3];

/// Chains longer than this are not followed (shape arithmetic is a few nodes deep).
const MAX_DEPTH: usize = 24;

/// Fold the computed reshape targets and slice bounds of `model` (see the module docs); the
/// number of Reshape/Slice nodes rewritten.
pub fn fold(model: &mut Model) -> Result<usize> {
    let g = &model.graph;
    let targets: Vec<NodeIndex> = g
        .node_indices()
        .filter(|&ix| computed_operands(g, ix).is_some())
        .collect();
    if targets.is_empty() {
        return Ok(0);
    }
    let Some(pins) = batch_pins(g) else {
        return Ok(0);
    };
    let proto = model.to_proto()?;
    let mut runs = Vec::new();
    for pin in &pins {
        match crate::runtime::infer_value_shapes(&proto, pin) {
            Ok(v) => runs.push(v),
            Err(_) => return Ok(0),
        }
    }
    let dims = symbolic_dims(&runs);
    let g = &mut model.graph;
    let mut folded = 0;
    for ix in targets {
        let Some((node, inits)) = fold_node(g, ix, &dims) else {
            continue;
        };
        let names: Vec<String> = inits.iter().map(|t| t.name().to_string()).collect();
        for t in inits {
            g.initializers.insert(t.name().to_string(), t);
        }
        if g.replace_node(ix, node).is_ok() {
            folded += 1;
        } else {
            for n in names {
                g.initializers.shift_remove(&n);
            }
        }
    }
    if folded > 0 {
        remove_dead(g)?;
    }
    Ok(folded)
}

/// The operand slots of a standard Reshape (1) or Slice (1..) that are neither constants nor
/// absent: `None` when there is none.
fn computed_operands(g: &Graph, ix: NodeIndex) -> Option<Vec<usize>> {
    let n = g.node(ix);
    if !op::is_standard_domain(n.domain()) {
        return None;
    }
    let slots: Vec<usize> = match n.op_type() {
        "Reshape" if n.input.len() == 2 => vec![1],
        "Slice" if n.input.len() >= 3 => (1..n.input.len()).collect(),
        _ => return None,
    };
    let computed: Vec<usize> = slots
        .into_iter()
        .filter(|&i| !n.input[i].is_empty() && g.constant(&n.input[i]).is_none())
        .collect();
    (!computed.is_empty()).then_some(computed)
}

/// Input shapes for each of [`BATCHES`], or `None` unless every real input declares a shape
/// with a symbolic dim 0 and fixed dims elsewhere.
fn batch_pins(g: &Graph) -> Option<Vec<InputShapes>> {
    let mut fixed: Vec<(String, Vec<usize>)> = Vec::new();
    for input in g
        .inputs
        .iter()
        .filter(|i| !g.initializers.contains_key(i.name()))
    {
        let Some(type_proto::Value::TensorType(tt)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return None;
        };
        let dims = &tt.shape.as_ref()?.dim;
        let mut rest = Vec::new();
        for (i, d) in dims.iter().enumerate() {
            match (i, &d.value) {
                (0, Some(DimValue::DimValue(_))) => return None,
                (0, _) => rest.push(0),
                (_, Some(DimValue::DimValue(v))) if *v > 0 => rest.push(*v as usize),
                _ => return None,
            }
        }
        if rest.is_empty() {
            return None;
        }
        fixed.push((input.name().to_string(), rest));
    }
    if fixed.is_empty() {
        return None;
    }
    Some(
        BATCHES
            .iter()
            .map(|&b| {
                fixed
                    .iter()
                    .map(|(n, s)| {
                        let mut s = s.clone();
                        s[0] = b;
                        (n.clone(), s)
                    })
                    .collect()
            })
            .collect(),
    )
}

/// Per value, its dims as [`Sym`]s where every run knows them: fixed when equal in all runs,
/// the batch when equal to the batch in each; values with any other dim are left out.
fn symbolic_dims(runs: &[Vec<crate::runtime::ValueShape>]) -> HashMap<String, Vec<Sym>> {
    let mut per: HashMap<&str, Vec<Vec<usize>>> = HashMap::new();
    for run in runs {
        for v in run {
            if let Some(s) = v
                .shape
                .as_ref()
                .and_then(|s| s.iter().copied().collect::<Option<Vec<usize>>>())
            {
                per.entry(v.name.as_str()).or_default().push(s);
            }
        }
    }
    per.into_iter()
        .filter(|(_, shapes)| shapes.len() == runs.len())
        .filter_map(|(name, shapes)| {
            let rank = shapes[0].len();
            if shapes.iter().any(|s| s.len() != rank) {
                return None;
            }
            let dims: Option<Vec<Sym>> = (0..rank)
                .map(|i| {
                    let vals: Vec<usize> = shapes.iter().map(|s| s[i]).collect();
                    if vals.iter().all(|&v| v == vals[0]) {
                        Some(Sym::Fixed(vals[0] as i64))
                    } else if vals.iter().zip(BATCHES).all(|(&v, b)| v == b) {
                        Some(Sym::Batch)
                    } else {
                        None
                    }
                })
                .collect();
            Some((name.to_string(), dims?))
        })
        .collect()
}

/// `ix` reading its computed operands from new constants (returned with it), when they all
/// evaluate.
fn fold_node(
    g: &Graph,
    ix: NodeIndex,
    dims: &HashMap<String, Vec<Sym>>,
) -> Option<(NodeProto, Vec<TensorProto>)> {
    let slots = computed_operands(g, ix)?;
    let n = g.node(ix);
    let mut node = n.clone();
    let mut inits = Vec::new();
    for slot in slots {
        let (vals, scalar) = eval(g, &n.input[slot], dims, 0)?;
        let mut out = Vec::with_capacity(vals.len());
        for (i, v) in vals.iter().enumerate() {
            out.push(match v {
                Sym::Fixed(x) => *x,
                // Reshape's 0 copies the data input's dim: only where that dim is the batch.
                Sym::Batch
                    if n.op_type() == "Reshape"
                        && i == 0
                        && n.attr_int("allowzero").ok()?.unwrap_or(0) == 0
                        && dims.get(&n.input[0])?.first() == Some(&Sym::Batch) =>
                {
                    0
                }
                Sym::Batch => return None,
            });
        }
        if n.op_type() == "Reshape" && out.iter().any(|&v| v < -1) {
            return None;
        }
        let name = g.fresh_name(&format!("{}_static", n.input[slot]));
        let shape: Vec<usize> = if scalar { vec![] } else { vec![out.len()] };
        inits.push(tensor::from_i64(&name, &shape, &out));
        node.input[slot] = name;
    }
    Some((node, inits))
}

/// `value` as shape integers, if it is computable from fixed dims and the batch.
fn eval(g: &Graph, value: &str, dims: &HashMap<String, Vec<Sym>>, depth: usize) -> Option<Ints> {
    if depth > MAX_DEPTH {
        return None;
    }
    if let Some(t) = g.constant(value) {
        let v = tensor::to_i64(t).ok()?;
        let rank = tensor::shape(t).ok()?.len();
        if rank > 1 {
            return None;
        }
        return Some((v.into_iter().map(Sym::Fixed).collect(), rank == 0));
    }
    let ix = g.producer_node(value)?;
    let n = g.node(ix);
    if !op::is_standard_domain(n.domain()) || n.output.first().map(|s| s.as_str()) != Some(value) {
        return None;
    }
    let arg = |i: usize| -> Option<Ints> { eval(g, n.input.get(i)?, dims, depth + 1) };
    match n.op_type() {
        "Shape" => {
            let s = dims.get(n.input.first()?)?;
            let r = s.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(n.attr_int("start").ok()?.unwrap_or(0));
            let end = clamp(n.attr_int("end").ok()?.unwrap_or(r)).max(start);
            Some((s[start..end].to_vec(), false))
        }
        "Identity" => arg(0),
        "Cast" => {
            let to = n.attr_int("to").ok()??;
            // int32 (6) or int64 (7): the integers pass unchanged.
            matches!(to, 6 | 7).then_some(())?;
            arg(0)
        }
        "Gather" => {
            if n.attr_int("axis").ok()?.unwrap_or(0) != 0 {
                return None;
            }
            let (data, scalar) = arg(0)?;
            if scalar {
                return None;
            }
            let (idx, idx_scalar) = arg(1)?;
            let len = data.len() as i64;
            let picked: Option<Vec<Sym>> = idx
                .iter()
                .map(|i| match i {
                    Sym::Fixed(i) => {
                        let i = if *i < 0 { i + len } else { *i };
                        (0..len).contains(&i).then(|| data[i as usize])
                    }
                    Sym::Batch => None,
                })
                .collect();
            Some((picked?, idx_scalar))
        }
        "Unsqueeze" => {
            let axes = match n.input.get(1) {
                Some(a) if !a.is_empty() => tensor::to_i64(g.constant(a)?).ok()?,
                _ => n.attr_ints("axes").ok()??,
            };
            let (v, scalar) = arg(0)?;
            (scalar && matches!(axes.as_slice(), [0] | [-1])).then_some((v, false))
        }
        "Squeeze" => {
            let (v, scalar) = arg(0)?;
            (!scalar && v.len() == 1).then_some((v, true))
        }
        "Concat" => {
            if n.attr_int("axis").ok()?.unwrap_or(0) != 0 && n.attr_int("axis").ok()? != Some(-1) {
                return None;
            }
            let mut all = Vec::new();
            for i in 0..n.input.len() {
                let (v, scalar) = arg(i)?;
                if scalar {
                    return None;
                }
                all.extend(v);
            }
            Some((all, false))
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let (a, sa) = arg(0)?;
            let (b, sb) = arg(1)?;
            let len = a.len().max(b.len());
            if (a.len() != len && a.len() != 1) || (b.len() != len && b.len() != 1) {
                return None;
            }
            let at = |v: &[Sym], i: usize| v[if v.len() == 1 { 0 } else { i }];
            let out: Option<Vec<Sym>> = (0..len)
                .map(|i| match (at(&a, i), at(&b, i)) {
                    (Sym::Fixed(x), Sym::Fixed(y)) => match n.op_type() {
                        "Add" => x.checked_add(y),
                        "Sub" => x.checked_sub(y),
                        "Mul" => x.checked_mul(y),
                        // ONNX integer division truncates toward zero, as Rust's does.
                        _ => (y != 0).then(|| x.checked_div(y)).flatten(),
                    }
                    .map(Sym::Fixed),
                    _ => None,
                })
                .collect();
            Some((out?, sa && sb))
        }
        _ => None,
    }
}

/// Remove the nodes (standard domain, no subgraph) none of whose outputs is read, until none
/// is left (the shape chains the folding disconnected), and the initializers only they read.
fn remove_dead(g: &mut Graph) -> Result<()> {
    let mut read_by_dead: Vec<String> = Vec::new();
    loop {
        let dead: Vec<NodeIndex> = g
            .node_indices()
            .filter(|&ix| {
                let n = g.node(ix);
                op::is_standard_domain(n.domain())
                    && !crate::ir::graph::has_subgraphs(n)
                    && !n.output.is_empty()
                    && n.output
                        .iter()
                        .all(|o| o.is_empty() || (g.use_count(o) == 0 && !g.is_graph_output(o)))
            })
            .collect();
        if dead.is_empty() {
            break;
        }
        for &ix in &dead {
            read_by_dead.extend(g.node(ix).input.iter().cloned());
        }
        g.apply(Patch {
            remove: dead,
            ..Default::default()
        })?;
    }
    for name in read_by_dead {
        if g.initializers.contains_key(&name)
            && g.use_count(&name) == 0
            && !g.is_graph_output(&name)
            && !g.is_graph_input(&name)
        {
            g.initializers.shift_remove(&name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    /// ShuffleNetV2's channel shuffle and split as torch exports them with a dynamic batch.
    const SHUFFLE: &str = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,2,2] x) => (float[N,2,2,2] y)
<int64 i0 = {0}, int64 i1 = {1}, int64 i2 = {2}, int64 i3 = {3}, int64[1] ax = {0}, int64[1] ax1 = {1}, int64[1] groups = {2}>
{
   s = Shape (x)
   b = Gather <axis = 0> (s, i0)
   c = Gather <axis = 0> (s, i1)
   h = Gather <axis = 0> (s, i2)
   w = Gather <axis = 0> (s, i3)
   half = Div (c, i2)
   bu = Unsqueeze (b, ax)
   hu = Unsqueeze (half, ax)
   cu = Unsqueeze (c, ax)
   h1 = Unsqueeze (h, ax)
   w1 = Unsqueeze (w, ax)
   t = Concat <axis = 0> (bu, groups, hu, h1, w1)
   r = Reshape (x, t)
   p = Transpose <perm = [0, 2, 1, 3, 4]> (r)
   t2 = Concat <axis = 0> (bu, cu, h1, w1)
   u = Reshape (p, t2)
   end = Cast <to = 7> (cu)
   y = Slice (u, hu, end, ax1)
}"#;

    fn model(text: &str) -> Model {
        Model::from_proto(crate::onnx::text::parse_model(text).unwrap()).unwrap()
    }

    fn run(m: &Model, batch: usize) -> ArrayD<f32> {
        let n = batch * 16;
        let x =
            ArrayD::from_shape_vec(IxDyn(&[batch, 4, 2, 2]), (0..n).map(|v| v as f32).collect())
                .unwrap();
        let out = crate::runtime::run_model(&m.to_proto().unwrap(), &[("x".to_string(), x)], &[])
            .unwrap();
        out.into_iter().next().unwrap().1
    }

    #[test]
    fn shape_arithmetic_under_a_dynamic_batch_becomes_constants() {
        let before = model(SHUFFLE);
        let mut after = before.clone();
        assert_eq!(fold(&mut after).unwrap(), 3);
        let g = &after.graph;
        let ops: Vec<&str> = g
            .topo_order()
            .unwrap()
            .into_iter()
            .map(|ix| g.node(ix).op_type())
            .collect();
        assert_eq!(ops, ["Reshape", "Transpose", "Reshape", "Slice"]);
        let operand = |op: &str, slot: usize| -> Vec<i64> {
            let ix = g
                .node_indices()
                .find(|&ix| g.node(ix).op_type() == op)
                .unwrap();
            tensor::to_i64(g.constant(&g.node(ix).input[slot]).unwrap()).unwrap()
        };
        // The batch stays the batch (Reshape's 0 copies it); every other dim is fixed.
        assert_eq!(operand("Reshape", 1), [0, 2, 2, 2, 2]);
        assert_eq!(operand("Slice", 1), [2]);
        assert_eq!(operand("Slice", 2), [4]);
        // Same values at batch sizes other than the analysed ones.
        for batch in [1, 4] {
            assert_eq!(run(&before, batch), run(&after, batch), "batch {batch}");
        }
        // Idempotent: nothing computed is left.
        let mut again = after.clone();
        assert_eq!(fold(&mut again).unwrap(), 0);
    }

    #[test]
    fn other_dynamic_dims_or_a_batch_elsewhere_keep_the_arithmetic() {
        // A dynamic height: the model is not analysed.
        let mut m = model(&SHUFFLE.replace("float[N,4,2,2] x", "float[N,4,H,2] x"));
        assert_eq!(fold(&mut m).unwrap(), 0);
        // The batch moved to position 1 of a target: Reshape's 0 would copy the wrong dim.
        let text = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[4,N] y)
<int64 i0 = {0}, int64[1] ax = {0}, int64[1] four = {4}>
{
   s = Shape (x)
   b = Gather <axis = 0> (s, i0)
   bu = Unsqueeze (b, ax)
   t = Concat <axis = 0> (four, bu)
   y = Reshape (x, t)
}"#;
        let mut m = model(text);
        assert_eq!(fold(&mut m).unwrap(), 0);
        assert_eq!(m.graph.node_count(), 5);
    }
}
