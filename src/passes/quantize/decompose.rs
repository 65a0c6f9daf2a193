//! Target decompositions: before placement, ops that have no integer kernel on the target are
//! rewritten into ops that have one, so that the int8 region runs through them instead of
//! ending at them (a DequantizeLinear, a float op, a QuantizeLinear and, in ONNX Runtime, the
//! NHWC<->NCHW Transposes around its int8 kernels). Which rules run is the target's
//! [`crate::passes::target::Policy::decompose`] list; none under `generic` (outputs unchanged).
//!
//! | rule | before | after |
//! |---|---|---|
//! | `hard-sigmoid` | `y = HardSigmoid(x; alpha, beta)` | `y = Mul(Clip(Add(x, beta/alpha), 0, 1/alpha), alpha)` |
//! | `hard-swish` | `y = HardSwish(x)` | `y = Mul(x, Mul(Clip(Add(x, 3), 0, 6), 1/6))` |
//! | `conv-affine` | `y = Add(Mul(Conv(x, W, B), k), b)` (`k`, `b` scalars; the Add optional) | `y = Conv(x, k W, k B + b)` |
//! | `hard-swish-div` | `y = Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)` (exporters' HardSwish) | `y = Mul(x, Mul(Clip(Add(x, 3), 0, 6), 1/6))` |
//!
//! Identities: `HardSigmoid(x) = max(0, min(1, alpha x + beta)) = alpha clip(x + beta/alpha,
//! 0, 1/alpha)` for `alpha > 0`, and `HardSwish(x) = x HardSigmoid(x; 1/6, 1/2)`. The placement
//! rules then quantize each piece (see [`super::placement`]): `Add(x, constant)` with a uint8
//! constant (QLinearAdd in ONNX Runtime), the Clip fused into that Add's output range (a Q whose
//! range lies within [0, 6] saturates exactly as the Clip does, and ONNX Runtime drops the Clip),
//! the `Mul` by a positive constant absorbed into the scale of the DequantizeLinear that reads
//! the Clip's int8 value (no op at all), and `Mul(x, gate)` with both inputs int8 (QLinearMul).
//!
//! Conditions: standard domain; `alpha > 0` and finite (the rewrite of other HardSigmoids would
//! not be a clip of an Add); Clip bounds given as constant inputs (opset >= 11, which the
//! `quantize` pass's opset upgrade guarantees before these rules run); in `hard-swish-div` the
//! Mul and the Clip are read only inside the pattern and the constants are exactly 3, 0, 6, 6.
//!
//! Invariants: float values equal up to rounding (the HardSwish division by 6 becomes a
//! multiplication by 1/6: at most one float ulp apart); graph input and output names kept;
//! running twice equals running once (no rule matches its own output).

use crate::ir::op::{self, Attrs};
use crate::ir::{Graph, Patch};
use crate::onnx::tensor;
use crate::passes::rewrite::Rule;
use anyhow::Result;
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;

/// The [`crate::passes::target::Policy::decompose`] entry that folds shape arithmetic under a
/// dynamic batch ([`super::batch_shapes`]; it needs tract's shape analysis, so it is no
/// [`Rule`] of [`RULES`]).
pub const BATCH_SHAPES: &str = "batch-shapes";

/// Every decomposition, by the name a [`crate::passes::target::Policy::decompose`] list uses.
pub const RULES: &[(&str, Rule)] = &[
    ("hard-sigmoid", hard_sigmoid),
    ("hard-swish", hard_swish),
    ("hard-swish-div", hard_swish_div),
    ("conv-affine", conv_affine),
];

/// The rules named in `names`, in [`RULES`] order.
pub fn rules(names: &[&str]) -> Vec<(&'static str, Rule)> {
    RULES
        .iter()
        .filter(|(n, _)| names.contains(n))
        .copied()
        .collect()
}

/// The single value of a one-element float constant.
fn scalar(g: &Graph, value: &str) -> Option<f32> {
    let t = g.constant(value)?;
    let a = tensor::to_f32(t).ok()?;
    (a.len() == 1).then(|| a.iter().copied().next().unwrap_or(f32::NAN))
}

fn scalar_tensor(name: &str, v: f32) -> crate::onnx::proto::TensorProto {
    tensor::from_f32(name, &ArrayD::from_elem(ndarray::IxDyn(&[]), v))
}

/// `y = Mul(Clip(Add(x, shift), 0, hi), gain)` (and, when `times` is given, `Mul(times, that)`
/// as `y`), as the nodes and constants of a patch replacing `remove`.
fn clip_of_shift(
    g: &Graph,
    base: &str,
    x: &str,
    (shift, hi, gain): (f32, f32, f32),
    times: Option<&str>,
    y: &str,
    remove: Vec<NodeIndex>,
) -> Patch {
    let stems: Vec<String> = [
        "shift", "shifted", "zero", "hi", "clipped", "gain", "gate", "add", "clip", "mul",
        "gate_mul",
    ]
    .iter()
    .map(|s| format!("{base}_{s}"))
    .collect();
    let n = g.fresh_names(&stems);
    let gate_out = if times.is_some() { n[6].as_str() } else { y };
    let mut add = vec![
        op::node("Add", &n[7], &[x, &n[0]], &[&n[1]]),
        op::node("Clip", &n[8], &[&n[1], &n[2], &n[3]], &[&n[4]]),
        op::node("Mul", &n[9], &[&n[4], &n[5]], &[gate_out]),
    ];
    if let Some(t) = times {
        add.push(op::node("Mul", &n[10], &[t, gate_out], &[y]));
    }
    Patch {
        add,
        remove: remove.clone(),
        initializers: vec![
            scalar_tensor(&n[0], shift),
            scalar_tensor(&n[2], 0.0),
            scalar_tensor(&n[3], hi),
            scalar_tensor(&n[5], gain),
        ],
        anchor: remove.first().copied(),
        ..Default::default()
    }
}

fn standard(g: &Graph, ix: NodeIndex, op_type: &str) -> bool {
    let n = g.node(ix);
    n.op_type() == op_type && op::is_standard_domain(n.domain())
}

/// `HardSigmoid(x; alpha, beta) -> Mul(Clip(Add(x, beta/alpha), 0, 1/alpha), alpha)`.
fn hard_sigmoid(g: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    if !standard(g, ix, "HardSigmoid") {
        return Ok(None);
    }
    let n = g.node(ix);
    let alpha = n.attr_float("alpha")?.unwrap_or(0.2);
    let beta = n.attr_float("beta")?.unwrap_or(0.5);
    let (Some(x), Some(y)) = (n.input.first(), n.output.first()) else {
        return Ok(None);
    };
    if !(alpha > 0.0 && alpha.is_finite() && beta.is_finite()) {
        return Ok(None);
    }
    let base = op::node_label(n).to_string();
    Ok(Some(clip_of_shift(
        g,
        &base,
        x,
        (beta / alpha, 1.0 / alpha, alpha),
        None,
        y,
        vec![ix],
    )))
}

/// `HardSwish(x) -> Mul(x, Mul(Clip(Add(x, 3), 0, 6), 1/6))`.
fn hard_swish(g: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    if !standard(g, ix, "HardSwish") {
        return Ok(None);
    }
    let n = g.node(ix);
    let (Some(x), Some(y)) = (n.input.first(), n.output.first()) else {
        return Ok(None);
    };
    let base = op::node_label(n).to_string();
    Ok(Some(clip_of_shift(
        g,
        &base,
        x,
        (3.0, 6.0, 1.0 / 6.0),
        Some(x),
        y,
        vec![ix],
    )))
}

/// The only reader of `value` (not a graph output), if it is a standard `op_type` node.
fn only_reader(g: &Graph, value: &str, op_type: &str) -> Option<NodeIndex> {
    if g.is_graph_output(value) {
        return None;
    }
    match g.consumers(value) {
        [(ix, _)] if standard(g, *ix, op_type) => Some(*ix),
        _ => None,
    }
}

/// `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) -> Mul(x, Mul(Clip(Add(x, 3), 0, 6), 1/6))`: the
/// Add and Clip stay, the division moves onto the gate, where quantization absorbs it.
fn hard_swish_div(g: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    if !standard(g, ix, "Add") {
        return Ok(None);
    }
    let add = g.node(ix);
    let [x, three] = add.input.as_slice() else {
        return Ok(None);
    };
    if scalar(g, three) != Some(3.0) || g.constant(x).is_some() {
        return Ok(None);
    }
    let Some(shifted) = add.output.first() else {
        return Ok(None);
    };
    let Some(clip_ix) = only_reader(g, shifted, "Clip") else {
        return Ok(None);
    };
    let clip = g.node(clip_ix);
    let bounds = (
        clip.input.get(1).and_then(|v| scalar(g, v)),
        clip.input.get(2).and_then(|v| scalar(g, v)),
    );
    if bounds != (Some(0.0), Some(6.0)) {
        return Ok(None);
    }
    let Some(clipped) = clip.output.first() else {
        return Ok(None);
    };
    let Some(mul_ix) = only_reader(g, clipped, "Mul") else {
        return Ok(None);
    };
    let mul = g.node(mul_ix);
    let other = match mul.input.as_slice() {
        [a, b] if a == clipped => b,
        [a, b] if b == clipped => a,
        _ => return Ok(None),
    };
    if other != x {
        return Ok(None);
    }
    let Some(product) = mul.output.first() else {
        return Ok(None);
    };
    let Some(div_ix) = only_reader(g, product, "Div") else {
        return Ok(None);
    };
    let div = g.node(div_ix);
    if div.input.first() != Some(product)
        || div.input.get(1).and_then(|v| scalar(g, v)) != Some(6.0)
    {
        return Ok(None);
    }
    let Some(y) = div.output.first() else {
        return Ok(None);
    };
    let n = g.fresh_names(&[
        format!("{}_gain", op::node_label(div)),
        format!("{}_gate", op::node_label(div)),
        format!("{}_gate_mul", op::node_label(div)),
    ]);
    Ok(Some(Patch {
        add: vec![
            op::node("Mul", &n[2], &[clipped, &n[0]], &[&n[1]]),
            op::node("Mul", op::node_label(mul), &[x, &n[1]], &[y]),
        ],
        remove: vec![mul_ix, div_ix],
        initializers: vec![scalar_tensor(&n[0], 1.0 / 6.0)],
        anchor: Some(mul_ix),
        ..Default::default()
    }))
}

/// `Add(Mul(Conv(x, W, B), k), b) -> Conv(x, k W, k B + b)` for scalar constants `k`, `b`
/// (PP-OCRv4's learnable affine after each conv): one int8 tensor instead of three, so one
/// rounding instead of three.
fn conv_affine(g: &Graph, ix: NodeIndex) -> Result<Option<Patch>> {
    if !standard(g, ix, "Conv") {
        return Ok(None);
    }
    let conv = g.node(ix);
    let (Some(y), Some(w)) = (conv.output.first(), conv.input.get(1)) else {
        return Ok(None);
    };
    let Some(wt) = g.constant(w) else {
        return Ok(None);
    };
    let Some(mul_ix) = only_reader(g, y, "Mul") else {
        return Ok(None);
    };
    let mul = g.node(mul_ix);
    let k = match mul.input.as_slice() {
        [a, b] if a == y => scalar(g, b),
        [a, b] if b == y => scalar(g, a),
        _ => None,
    };
    let (Some(k), Some(scaled)) = (k, mul.output.first()) else {
        return Ok(None);
    };
    let add = only_reader(g, scaled, "Add").and_then(|a| {
        let n = g.node(a);
        let b = match n.input.as_slice() {
            [p, q] if p == scaled => scalar(g, q),
            [p, q] if q == scaled => scalar(g, p),
            _ => None,
        }?;
        Some((a, b, n.output.first()?.clone()))
    });
    let (shift, out) = match &add {
        Some((_, b, out)) => (*b, out.clone()),
        None => (0.0, scaled.clone()),
    };
    if !k.is_finite() || !shift.is_finite() {
        return Ok(None);
    }
    let w_new = tensor::to_f32(wt)?.mapv(|v| v * k);
    let c_out = w_new.shape().first().copied().unwrap_or(0);
    let b_old = match conv.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => match g.constant(b) {
            Some(t) => tensor::to_f32(t)?.iter().copied().collect::<Vec<f32>>(),
            None => return Ok(None),
        },
        None => vec![0.0; c_out],
    };
    if b_old.len() != c_out {
        return Ok(None);
    }
    let b_new: Vec<f32> = b_old.iter().map(|v| v * k + shift).collect();
    let label = op::node_label(conv).to_string();
    let n = g.fresh_names(&[format!("{label}_affine_w"), format!("{label}_affine_b")]);
    let mut node = conv.clone();
    node.input.truncate(2);
    node.input[1] = n[0].clone();
    node.input.push(n[1].clone());
    node.output[0] = out;
    let mut remove = vec![ix, mul_ix];
    if let Some((a, _, _)) = add {
        remove.push(a);
    }
    Ok(Some(Patch {
        add: vec![node],
        remove,
        initializers: vec![
            tensor::from_f32(&n[0], &w_new),
            tensor::from_f32(
                &n[1],
                &ArrayD::from_shape_vec(ndarray::IxDyn(&[c_out]), b_new)?,
            ),
        ],
        anchor: Some(ix),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Model;

    fn apply(text: &str, names: &[&str]) -> Graph {
        let mut g = Model::from_proto(crate::onnx::text::parse_model(text).unwrap())
            .unwrap()
            .graph;
        crate::passes::rewrite::rewrite(&mut g, &rules(names), None).unwrap();
        g
    }

    fn ops(g: &Graph) -> Vec<String> {
        g.topo_order()
            .unwrap()
            .into_iter()
            .map(|ix| g.node(ix).op_type().to_string())
            .collect()
    }

    #[test]
    fn exporters_hard_swish_becomes_a_gate_with_the_division_on_it() {
        let g = apply(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2] x) => (float[1,2] y)
<float three = {3.0}, float zero = {0.0}, float six = {6.0}>
{
   a = Add (x, three)
   c = Clip (a, zero, six)
   m = Mul (x, c)
   y = Div (m, six)
}"#,
            &["hard-swish-div"],
        );
        assert_eq!(ops(&g), ["Add", "Clip", "Mul", "Mul"]);
        // Idempotent: the result no longer holds the pattern.
        let mut again = g.clone();
        let counts =
            crate::passes::rewrite::rewrite(&mut again, &rules(&["hard-swish-div"]), None).unwrap();
        assert_eq!(counts, [("hard-swish-div", 0)]);
    }

    #[test]
    fn conv_affine_folds_the_scalar_gain_and_shift_into_the_conv() {
        let g = apply(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,1,2,2] x) => (float[1,2,2,2] y)
<float[2,1,1,1] w = {1.0, -2.0}, float[2] b = {0.5, 0.25}, float k = {3.0}, float s = {-1.0}>
{
   [conv] c = Conv (x, w, b)
   m = Mul (k, c)
   y = Add (m, s)
}"#,
            &["conv-affine"],
        );
        assert_eq!(ops(&g), ["Conv"]);
        let conv = g.node(g.node_indices().next().unwrap());
        assert_eq!(conv.output[0], "y");
        let w = tensor::to_f32(g.constant(&conv.input[1]).unwrap()).unwrap();
        let b = tensor::to_f32(g.constant(&conv.input[2]).unwrap()).unwrap();
        assert_eq!(w.iter().copied().collect::<Vec<_>>(), [3.0, -6.0]);
        // 3 * 0.5 - 1 and 3 * 0.25 - 1.
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), [0.5, -0.25]);
    }

    #[test]
    fn hard_sigmoid_and_hard_swish_expand_only_when_listed() {
        let text = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2] x) => (float[1,2] y)
{
   h = HardSigmoid <alpha = 0.2, beta = 0.5> (x)
   y = HardSwish (h)
}"#;
        assert_eq!(ops(&apply(text, &[])), ["HardSigmoid", "HardSwish"]);
        let g = apply(text, &["hard-sigmoid", "hard-swish"]);
        assert_eq!(ops(&g), ["Add", "Clip", "Mul", "Add", "Clip", "Mul", "Mul"]);
        let shifts: Vec<f32> = g
            .node_indices()
            .filter(|&ix| g.node(ix).op_type() == "Add")
            .map(|ix| scalar(&g, &g.node(ix).input[1]).unwrap())
            .collect();
        let mut shifts = shifts;
        shifts.sort_by(f32::total_cmp);
        assert_eq!(shifts, [2.5, 3.0]);
    }
}
