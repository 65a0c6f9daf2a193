//! Dynamic activation quantization: each linear layer's input is quantized at run time, per
//! tensor, by `DynamicQuantizeLinear`; the weight is int8 per output channel; the product runs
//! as `MatMulInteger`. No calibration range is involved.
//!
//! ```text
//! before: x -> MatMul(W[K, N]) -> y
//! after:  x -> DynamicQuantizeLinear -> (x_q uint8, s_x, z_x)
//!         s = Mul(s_x, s_w[N])
//!         y = Mul(Cast<to = float>(MatMulInteger(x_q, W_q int8 [K, N], z_x, z_w int8 [N])), s)
//! ```
//! This is the form ONNX Runtime's `quantize_dynamic` emits and its graph optimizer fuses into
//! `com.microsoft::DynamicQuantizeMatMul` (integer kernels); tract 0.23.9 loads
//! DynamicQuantizeLinear and MatMulInteger as they are (tract-onnx `ops/quant.rs`,
//! `ops/math/mat_mul_integer.rs`), so validation runs the written model directly.
//!
//! Formula: `y[., n] = s_x s_w[n] Σ_k (x_q[., k] - z_x) W_q[k, n]` with
//! `s_x = (max(x, 0) - min(x, 0)) / 255`, `z_x = round(-min(x, 0) / s_x)` (ONNX
//! DynamicQuantizeLinear) and `s_w[n] = max_k |W[k, n]| / 127` (127 -> 63 with reduce_range).
//!
//! Which layers: the plan's linear layers (`MatMul` with a constant 2-D weight; `Gemm` with a
//! constant 2-D weight, alpha = beta = 1, whose `C` becomes a float Add after the product). One
//! DynamicQuantizeLinear per distinct input, shared by every layer reading it (q, k and v of
//! one LayerNorm output). Other marks of the plan (activation x activation products) are
//! ignored: they stay float.
//!
//! Invariants: a graph already holding Q/DQ or DynamicQuantizeLinear is left alone (checked
//! by the caller); deterministic names from the run's [`Namer`].

use super::insert::{self, Namer, WeightReport};
use super::placement::Plan;
use super::QuantizeOptions;
use crate::ir::op::{self, attr_int, node_label, Attrs};
use crate::ir::{Graph, Patch};
use crate::onnx::tensor;
use anyhow::{Context, Result};
use std::collections::HashMap;

/// One rewritten layer, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DynamicLayer {
    pub node: String,
    pub input: String,
    pub weight: WeightReport,
}

/// Rewrite the plan's linear layers into the dynamic form; returns one entry per layer.
pub fn rewrite(
    g: &mut Graph,
    plan: &Plan,
    opts: &QuantizeOptions,
    namer: &mut Namer,
) -> Result<Vec<DynamicLayer>> {
    // The layers to rewrite, by name (node indices do not survive patches).
    let mut todo: Vec<String> = Vec::new();
    for ix in g.topo_order()? {
        let n = g.node(ix);
        let label = node_label(n);
        let Some(w) = n.input.get(1) else { continue };
        let is_layer = plan.weights.get(w).is_some_and(|m| m.node == label)
            && plan.is_marked(&n.input[0])
            && match n.op_type() {
                "MatMul" => true,
                "Gemm" => {
                    n.attr_float("alpha")?.unwrap_or(1.0) == 1.0
                        && n.attr_float("beta")?.unwrap_or(1.0) == 1.0
                        && n.attr_int("transA")?.unwrap_or(0) == 0
                }
                _ => false,
            };
        if is_layer && !todo.iter().any(|t| t == label) {
            todo.push(label.to_string());
        }
    }
    let mut quantized_inputs: HashMap<String, [String; 3]> = HashMap::new();
    let mut weights: HashMap<String, (String, String, String, Vec<f32>, WeightReport)> =
        HashMap::new();
    let mut layers = Vec::new();
    for label in todo {
        let ix = g
            .node_indices()
            .find(|&ix| node_label(g.node(ix)) == label)
            .with_context(|| format!("node '{label}' disappeared"))?;
        let n = g.node(ix).clone();
        let (x, w) = (n.input[0].clone(), n.input[1].clone());
        let trans_b = n.op_type() == "Gemm" && n.attr_int("transB")?.unwrap_or(0) == 1;
        let mut initializers = Vec::new();
        let mut add = Vec::new();
        // The weight, once per weight, as int8 [K, N] with per-N scales.
        if !weights.contains_key(&w) {
            let t = g
                .constant(&w)
                .with_context(|| format!("weight '{w}' of node '{label}' is not a constant"))?;
            let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
            let a = if trans_b { a.reversed_axes() } else { a };
            let a = a.as_standard_layout().to_owned();
            let axis = opts.per_channel.then_some(1);
            let (q, scales, report) =
                insert::quantize_reported(&a, axis, &w, &label, opts.reduce_range, opts.rounding);
            let [wq, ws, wz] = namer.take(
                g,
                'w',
                &w,
                [("quantized", "q"), ("scale", "s"), ("zero_point", "z")],
            );
            let qv: Vec<i8> = q.iter().copied().collect();
            initializers.push(tensor::from_i8(&wq, a.shape(), &qv));
            initializers.push(insert::scale_tensor(&ws, &scales, axis.is_some()));
            let zshape: Vec<usize> = if axis.is_some() {
                vec![scales.len()]
            } else {
                vec![]
            };
            initializers.push(tensor::from_i8(
                &wz,
                &zshape,
                &vec![0i8; zshape.iter().product()],
            ));
            weights.insert(w.clone(), (wq, ws, wz, scales, report));
        }
        let (wq, ws, wz, _, report) = weights[&w].clone();
        // The input, once per input.
        if !quantized_inputs.contains_key(&x) {
            let [xq, xs, xz, dql] = namer.take(
                g,
                'a',
                &x,
                [
                    ("quantized", "q"),
                    ("scale", "s"),
                    ("zero_point", "z"),
                    ("DynamicQuantizeLinear", "DQL"),
                ],
            );
            add.push(op::node(
                "DynamicQuantizeLinear",
                &dql,
                &[&x],
                &[&xq, &xs, &xz],
            ));
            quantized_inputs.insert(x.clone(), [xq, xs, xz]);
        }
        let [xq, xs, xz] = quantized_inputs[&x].clone();
        let y = n.output[0].clone();
        let has_bias = n.op_type() == "Gemm" && n.input.get(2).is_some_and(|c| !c.is_empty());
        let [s, mmi, yi, cast, yf, mul, yb, sn] = namer.take(
            g,
            'd',
            &y,
            [
                ("scale", "s"),
                ("MatMulInteger", "MMI"),
                ("int32", "i"),
                ("Cast", "C"),
                ("float", "f"),
                ("Mul", "M"),
                ("unbiased", "u"),
                ("ScaleMul", "SM"),
            ],
        );
        add.push(op::node("Mul", &sn, &[&xs, &ws], &[&s]));
        add.push(op::node(
            "MatMulInteger",
            &mmi,
            &[&xq, &wq, &xz, &wz],
            &[&yi],
        ));
        let mut c = op::node("Cast", &cast, &[&yi], &[&yf]);
        op::set_attr(&mut c, attr_int("to", 1));
        add.push(c);
        if has_bias {
            add.push(op::node("Mul", &mul, &[&yf, &s], &[&yb]));
            add.push(op::node("Add", n.name(), &[&yb, &n.input[2]], &[&y]));
        } else {
            add.push(op::node("Mul", &mul, &[&yf, &s], &[&y]));
        }
        g.apply(Patch {
            remove: vec![ix],
            add,
            initializers,
            anchor: Some(ix),
            ..Default::default()
        })
        .with_context(|| format!("dynamic quantization of node '{label}'"))?;
        layers.push(DynamicLayer {
            node: label,
            input: x,
            weight: report,
        });
    }
    g.remove_unused_initializers();
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, Axis};

    /// The int8 weight of a dynamic layer back as float `[K, N]`.
    fn dequantized(q: &ArrayD<i8>, scales: &[f32]) -> ArrayD<f32> {
        let mut out = q.mapv(f32::from);
        for (mut col, &s) in out.axis_iter_mut(Axis(1)).zip(scales) {
            col.mapv_inplace(|v| v * s);
        }
        out
    }
    use crate::ir::Model;
    use crate::passes::quantize::placement::{plan, NodeSelection};

    const LINEAR: &str = r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,4] h) => (float[1,3,2] y)
<float[4] g1 = {1.0, 1.0, 1.0, 1.0}, float[4] b1 = {0.0, 0.0, 0.0, 0.0},
 float[4,2] w = {0.5, -1.0, 0.25, 2.0, -0.75, 0.1, 1.5, -0.3}>
{
   x = LayerNormalization <axis = -1> (h, g1, b1)
   y = MatMul (x, w)
}"#;

    #[test]
    fn a_linear_layer_becomes_matmulinteger_with_per_column_scales() {
        let mut model = Model::from_proto(crate::onnx::text::parse_model(LINEAR).unwrap()).unwrap();
        let opts = QuantizeOptions::default();
        let p = plan(&model.graph, &opts, &NodeSelection::All).unwrap();
        assert!(p.transformer);
        let mut namer = Namer::new(opts.naming);
        let layers = rewrite(&mut model.graph, &p, &opts, &mut namer).unwrap();
        assert_eq!(layers.len(), 1);
        let g = &model.graph;
        let ops: Vec<&str> = g
            .topo_order()
            .unwrap()
            .into_iter()
            .map(|ix| g.node(ix).op_type())
            .collect();
        assert_eq!(
            ops,
            [
                "LayerNormalization",
                "DynamicQuantizeLinear",
                "Mul",
                "MatMulInteger",
                "Cast",
                "Mul"
            ]
        );
        // Scales: column max |w| / 127.
        let mmi = g
            .node_indices()
            .find(|&ix| g.node(ix).op_type() == "MatMulInteger")
            .unwrap();
        let wq = tensor::to_f32(g.constant(&g.node(mmi).input[1]).unwrap()).unwrap();
        let scales = [1.5 / 127.0, 2.0 / 127.0];
        let back = dequantized(&wq.mapv(|v| v as i8), &scales);
        let w = [0.5f32, -1.0, 0.25, 2.0, -0.75, 0.1, 1.5, -0.3];
        for (b, w) in back.iter().zip(w) {
            assert!((b - w).abs() <= 1.0 / 127.0, "{b} vs {w}");
        }
    }
}
