//! The validator against small models built here with the prost types.

mod common;

use ndarray::{ArrayD, IxDyn};
use onnx_compress::onnx::proto::attribute_proto::AttributeType;
use onnx_compress::onnx::proto::tensor_proto::DataType;
use onnx_compress::onnx::proto::tensor_shape_proto::{dimension, Dimension};
use onnx_compress::onnx::proto::type_proto::{Tensor as TT, Value};
use onnx_compress::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use onnx_compress::runtime::{infer_value_shapes, run_model, simulation_graph, Runner};
use onnx_compress::validate::{validate, EarlyStop, Method, Status, ValidateOptions};

// ---------------------------------------------------------------- builder

fn f32_init(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(
            v.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    }
}

fn raw_init(name: &str, dt: DataType, dims: &[i64], bytes: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dt as i32),
        raw_data: Some(bytes.into()),
        ..Default::default()
    }
}

fn i8_init(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
    raw_init(
        name,
        DataType::Int8,
        dims,
        v.iter().map(|&x| x as u8).collect(),
    )
}

/// int4 packed two per byte, first element in the low nibble.
fn i4_init(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
    let bytes = v
        .chunks(2)
        .map(|c| (c[0] as u8 & 0xF) | ((*c.get(1).unwrap_or(&0) as u8 & 0xF) << 4))
        .collect();
    raw_init(name, DataType::Int4, dims, bytes)
}

fn bool_init(name: &str, v: bool) -> TensorProto {
    raw_init(name, DataType::Bool, &[], vec![v as u8])
}

fn a_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn a_graph(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

fn a_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A float tensor value info; negative dims are symbolic (`N`).
fn vi(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(if d < 0 {
                dimension::Value::DimParam("N".into())
            } else {
                dimension::Value::DimValue(d)
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(Value::TensorType(TT {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn graph(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
) -> GraphProto {
    GraphProto {
        name: Some("g".into()),
        node: nodes,
        initializer: inits,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

fn model(g: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(g),
        ..Default::default()
    }
}

fn arr(shape: &[usize], v: Vec<f32>) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

/// y = x[2,4] @ W[4,3]
fn matmul_model(w: &[f32]) -> ModelProto {
    model(
        graph(
            vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
            vec![f32_init("W", &[4, 3], w)],
            vec![vi("x", &[2, 4])],
            vec![vi("y", &[2, 3])],
        ),
        17,
    )
}

const W: [f32; 12] = [
    0.5, -1.0, 0.25, 1.5, 0.0, -0.75, -0.5, 2.0, 1.0, 0.125, -0.25, 0.5,
];

fn matmul_ref(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f64> {
    let m = x.len() / k;
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|p| f64::from(x[i * k + p]) * f64::from(w[p * n + j]))
                .sum();
        }
    }
    y
}

// ---------------------------------------------------------------- direct runs

#[test]
fn identical_models_check_direct_with_zero_error() {
    let m = matmul_model(&W);
    let r = validate(&m, &m, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Checked, "{r:?}");
    assert_eq!(r.method, Method::Direct);
    assert_eq!(r.samples, 4);
    assert!(r.rewrites.is_empty());
    let o = &r.outputs[0];
    assert_eq!(o.name, "y");
    assert_eq!(o.shape, vec![2, 3]);
    assert_eq!(o.max_abs_err, 0.0);
    assert_eq!(o.mean_abs_err, 0.0);
    assert!((o.cosine - 1.0).abs() < 1e-12);
    assert!(o.sqnr_db.is_infinite());
    assert_eq!(o.top1_agreement, Some(1.0));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["status"], "checked");
    assert_eq!(json["method"], "direct");
    assert!(json["outputs"][0]["sqnr_db"].is_null());
}

#[test]
fn perturbed_copy_metrics_match_hand_computation() {
    let mut w2 = W;
    w2[0] += 0.5; // W[0][0]
    w2[4] -= 0.25; // W[1][1]
    let (a, b) = (matmul_model(&W), matmul_model(&w2));
    let x = vec![1.0, -2.0, 0.5, 3.0, -1.5, 0.25, 2.0, -0.5];
    let opts = ValidateOptions {
        inputs: Some(vec![vec![("x".into(), arr(&[2, 4], x.clone()).into())]]),
        ..Default::default()
    };
    let r = validate(&a, &b, &opts).unwrap();
    assert_eq!(r.status, Status::Checked);
    assert_eq!(r.samples, 1);
    let (yr, yc) = (matmul_ref(&x, &W, 4, 3), matmul_ref(&x, &w2, 4, 3));
    let err: Vec<f64> = yr.iter().zip(&yc).map(|(a, b)| (a - b).abs()).collect();
    let max = err.iter().cloned().fold(0.0, f64::max);
    let mean = err.iter().sum::<f64>() / err.len() as f64;
    let dot: f64 = yr.iter().zip(&yc).map(|(a, b)| a * b).sum();
    let nr: f64 = yr.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nc: f64 = yc.iter().map(|a| a * a).sum::<f64>().sqrt();
    let sqnr = 10.0 * (nr * nr / err.iter().map(|e| e * e).sum::<f64>()).log10();
    let argmax = |v: &[f64]| {
        v.iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
    };
    let agree = (0..2)
        .filter(|&i| argmax(&yr[i * 3..i * 3 + 3]) == argmax(&yc[i * 3..i * 3 + 3]))
        .count();
    let o = &r.outputs[0];
    assert!(max > 0.1, "the perturbation must show: {max}");
    assert!(
        (o.max_abs_err - max).abs() < 1e-5,
        "{} vs {max}",
        o.max_abs_err
    );
    assert!((o.mean_abs_err - mean).abs() < 1e-5);
    assert!((o.cosine - dot / (nr * nc)).abs() < 1e-6);
    assert!((o.sqnr_db - sqnr).abs() < 1e-3, "{} vs {sqnr}", o.sqnr_db);
    assert_eq!(o.top1_agreement, Some(agree as f64 / 2.0));
}

#[test]
fn symbolic_batch_runs_at_one_with_a_note_or_at_the_given_shape() {
    let mut m = matmul_model(&W);
    let g = m.graph.as_mut().unwrap();
    g.input[0] = vi("x", &[-1, 4]);
    g.output[0] = vi("y", &[-1, 3]);
    // A stale value_info with a clashing symbol must not matter (ignored on load).
    g.value_info.push(vi("y", &[-1, 7]));
    let r = validate(&m, &m, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Checked, "{r:?}");
    assert_eq!(r.inputs[0].shape, vec![1, 4]);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("'x'") && n.contains("symbolic")),
        "{:?}",
        r.notes
    );
    let opts = ValidateOptions {
        input_shapes: vec![("x".into(), vec![5, 4])],
        ..Default::default()
    };
    let r = validate(&m, &m, &opts).unwrap();
    assert_eq!(r.outputs[0].shape, vec![5, 3]);
    assert!(r.notes.is_empty());
    let bad = ValidateOptions {
        input_shapes: vec![("x".into(), vec![5, 3])],
        ..Default::default()
    };
    let e = validate(&m, &m, &bad).unwrap_err();
    assert!(format!("{e:#}").contains("dim 1 is fixed to 4"), "{e:#}");
}

#[test]
fn extra_outputs_expose_intermediate_values() {
    // h = x @ W ; y = Relu(h)
    let m = model(
        graph(
            vec![
                node("MatMul", "mm", &["x", "W"], &["h"], vec![]),
                node("Relu", "relu", &["h"], &["y"], vec![]),
            ],
            vec![f32_init("W", &[4, 3], &W)],
            vec![vi("x", &[2, 4])],
            vec![vi("y", &[2, 3])],
        ),
        17,
    );
    let x = vec![1.0, -2.0, 0.5, 3.0, -1.5, 0.25, 2.0, -0.5];
    let out = run_model(&m, &[("x".into(), arr(&[2, 4], x.clone()))], &["h".into()]).unwrap();
    assert_eq!(
        out.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["y", "h"]
    );
    let h = matmul_ref(&x, &W, 4, 3);
    assert!(
        h.iter().any(|&v| v < 0.0),
        "the test needs negative pre-activations"
    );
    for (i, &v) in h.iter().enumerate() {
        assert!((f64::from(out[1].1.as_slice().unwrap()[i]) - v).abs() < 1e-5);
        assert!((f64::from(out[0].1.as_slice().unwrap()[i]) - v.max(0.0)).abs() < 1e-5);
    }
    // A Runner is reusable over batches.
    let runner = Runner::new(&m, &[], &["h".into(), "x".into()]).unwrap();
    assert_eq!(runner.output_names(), ["y", "h", "x"]);
    for s in [1.0f32, -1.0] {
        let xs = arr(&[2, 4], x.iter().map(|v| v * s).collect());
        let o = runner.run(std::slice::from_ref(&xs)).unwrap();
        assert_eq!(o[2], xs);
    }
    assert!(Runner::new(&m, &[], &["nope".into()]).is_err());
    let shapes = infer_value_shapes(&m, &[]).unwrap();
    let h = shapes.iter().find(|s| s.name == "h").unwrap();
    assert_eq!(h.shape, Some(vec![Some(2), Some(3)]));
    assert_eq!(h.elem_type, Some(DataType::Float));
}

// ---------------------------------------------------------------- quantized weights

/// Conv with 2 output channels, 1 input channel, 2x2 kernel, on x[1,1,3,3].
fn conv_model(w_node: Vec<NodeProto>, inits: Vec<TensorProto>, opset: i64) -> ModelProto {
    let mut nodes = w_node;
    nodes.push(node("Conv", "conv", &["x", "Wf"], &["y"], vec![]));
    model(
        graph(
            nodes,
            inits,
            vec![vi("x", &[1, 1, 3, 3])],
            vec![vi("y", &[1, 2, 2, 2])],
        ),
        opset,
    )
}

#[test]
fn per_axis_int8_weight_dq_is_dequantized_ahead_of_time() {
    let q: [i8; 8] = [-128, -3, 0, 127, 10, 20, -30, 5];
    let (scale, zp) = ([0.01f32, 0.5], [2i8, -1]);
    let wf: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &v)| (i32::from(v) - i32::from(zp[i / 4])) as f32 * scale[i / 4])
        .collect();
    let float = conv_model(vec![], vec![f32_init("Wf", &[2, 1, 2, 2], &wf)], 13);
    let qdq = conv_model(
        vec![node(
            "DequantizeLinear",
            "dq_w",
            &["Wq", "s", "z"],
            &["Wf"],
            vec![a_int("axis", 0)],
        )],
        vec![
            i8_init("Wq", &[2, 1, 2, 2], &q),
            f32_init("s", &[2], &scale),
            i8_init("z", &[2], &zp),
        ],
        13,
    );
    let (sim, notes) = simulation_graph(&qdq).unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("dequantized 1 weight initializer")),
        "{notes:?}"
    );
    let g = sim.graph.as_ref().unwrap();
    assert!(g.node.iter().all(|n| n.op_type() != "DequantizeLinear"));
    assert_eq!(g.initializer.len(), 1, "Wq, s, z are dropped once unused");
    // Idempotent.
    assert!(simulation_graph(&sim).unwrap().1.is_empty());

    let x = arr(&[1, 1, 3, 3], (0..9).map(|i| i as f32 - 4.0).collect());
    let inputs = [("x".to_string(), x)];
    let a = run_model(&float, &inputs, &[]).unwrap();
    let b = run_model(&sim, &inputs, &[]).unwrap();
    assert_eq!(
        a[0].1, b[0].1,
        "simulation equals the float model with dequantized weights"
    );
    // Measured: tract 0.23.9 also runs this per-axis DQ itself and agrees.
    let c = run_model(&qdq, &inputs, &[]).unwrap();
    assert_eq!(a[0].1, c[0].1);

    let r = validate(&float, &qdq, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Checked, "{r:?}");
    assert_eq!(r.method, Method::Simulation);
    assert!(
        r.rewrites[0].starts_with("candidate: dequantized 1 weight"),
        "{:?}",
        r.rewrites
    );
    assert_eq!(r.outputs[0].max_abs_err, 0.0);
}

/// x[1,4] -> QuantizeLinear -> DequantizeLinear -> y with the given Q attributes and zero point.
fn act_qdq_model(q_attrs: Vec<AttributeProto>, zp: TensorProto, opset: i64) -> ModelProto {
    model(
        graph(
            vec![
                node(
                    "QuantizeLinear",
                    "q_act",
                    &["x", "s", "z"],
                    &["xq"],
                    q_attrs,
                ),
                node(
                    "DequantizeLinear",
                    "dq_act",
                    &["xq", "s", "z"],
                    &["y"],
                    vec![],
                ),
            ],
            vec![f32_init("s", &[], &[0.1]), zp],
            vec![vi("x", &[1, 4])],
            vec![vi("y", &[1, 4])],
        ),
        opset,
    )
}

#[test]
fn activation_qdq_runs_in_tract_but_misread_variants_are_refused() {
    let x = arr(&[1, 4], vec![0.04, -0.26, 13.0, -20.0]);
    let ok = act_qdq_model(vec![], i8_init("z", &[], &[3]), 13);
    let y = run_model(&ok, &[("x".into(), x.clone())], &[]).unwrap();
    // round(x/0.1)+3 saturated to int8, then back: [0, -0.3, 12.4, -13.1]
    let want = [0.0f32, -0.3, 12.4, -13.1];
    for (a, b) in y[0].1.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{:?}", y[0].1);
    }
    let r = validate(&ok, &ok, &ValidateOptions::default()).unwrap();
    assert_eq!((r.status, r.method), (Status::Checked, Method::Direct));

    // tract ignores `output_dtype` on QuantizeLinear: refused rather than run wrong.
    let bad = act_qdq_model(
        vec![a_int("output_dtype", DataType::Int8 as i64)],
        i8_init("z", &[], &[0]),
        21,
    );
    let r = validate(&ok, &bad, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::NotChecked);
    let reason = r.reason.unwrap();
    assert!(
        reason.starts_with("candidate: ")
            && reason.contains("'q_act'")
            && reason.contains("output_dtype"),
        "{reason}"
    );

    // 16-bit activation Q/DQ.
    let z16 = raw_init("z", DataType::Int16, &[], vec![0, 0]);
    let r = validate(
        &ok,
        &act_qdq_model(vec![], z16, 21),
        &ValidateOptions::default(),
    )
    .unwrap();
    assert_eq!(r.status, Status::NotChecked);
    assert!(
        r.reason.as_deref().unwrap().contains("int16"),
        "{:?}",
        r.reason
    );

    // Block-wise activation quantization.
    let blocked = act_qdq_model(vec![a_int("block_size", 2)], i8_init("z", &[], &[0]), 21);
    let r = validate(&ok, &blocked, &ValidateOptions::default()).unwrap();
    assert!(
        r.reason.as_deref().unwrap().contains("block_size"),
        "{:?}",
        r.reason
    );
}

/// y = x[2,8] @ DQ(Wq int4 [8,4]) with the given DQ attributes and scale.
fn int4_matmul(q: &[i8], scale: TensorProto, attrs: Vec<AttributeProto>) -> ModelProto {
    model(
        graph(
            vec![
                node("DequantizeLinear", "dq_w", &["Wq", "s"], &["Wf"], attrs),
                node("MatMul", "mm", &["x", "Wf"], &["y"], vec![]),
            ],
            vec![i4_init("Wq", &[8, 4], q), scale],
            vec![vi("x", &[2, 8])],
            vec![vi("y", &[2, 4])],
        ),
        21,
    )
}

#[test]
fn int4_weights_per_axis_and_blockwise_are_simulated() {
    let q: Vec<i8> = (0..32).map(|i| ((i * 5) % 16) as i8 - 8).collect();
    // Per-axis on axis 1 (output columns).
    let s = [0.1f32, 0.2, 0.3, 0.4];
    let wf: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &v)| f32::from(v) * s[i % 4])
        .collect();
    let float = matmul4(&wf);
    let m = int4_matmul(&q, f32_init("s", &[4], &s), vec![a_int("axis", 1)]);
    assert!(
        Runner::new(&m, &[], &[])
            .unwrap_err()
            .to_string()
            .contains("int4"),
        "tract alone refuses int4"
    );
    let r = validate(&float, &m, &ValidateOptions::default()).unwrap();
    assert_eq!(
        (r.status, r.method),
        (Status::Checked, Method::Simulation),
        "{r:?}"
    );
    assert!(r.outputs[0].max_abs_err < 1e-5, "{:?}", r.outputs);

    // Block-wise on axis 0, block 4: scale [2, 4].
    let sb = [0.1f32, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0, 4.0];
    let wf: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &v)| f32::from(v) * sb[(i / 4 / 4) * 4 + i % 4])
        .collect();
    let float = matmul4(&wf);
    let m = int4_matmul(
        &q,
        f32_init("s", &[2, 4], &sb),
        vec![a_int("axis", 0), a_int("block_size", 4)],
    );
    let r = validate(&float, &m, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Checked, "{r:?}");
    assert!(r.outputs[0].max_abs_err < 1e-5, "{:?}", r.outputs);
    // A wrong block mapping would show: the rows 4..8 scales are 10x the first ones.
    let wrong = matmul4(
        &q.iter()
            .enumerate()
            .map(|(i, &v)| f32::from(v) * sb[i % 4])
            .collect::<Vec<_>>(),
    );
    let r = validate(&wrong, &m, &ValidateOptions::default()).unwrap();
    assert!(r.outputs[0].max_abs_err > 0.1);
}

fn matmul4(wf: &[f32]) -> ModelProto {
    model(
        graph(
            vec![node("MatMul", "mm", &["x", "Wf"], &["y"], vec![])],
            vec![f32_init("Wf", &[8, 4], wf)],
            vec![vi("x", &[2, 8])],
            vec![vi("y", &[2, 4])],
        ),
        21,
    )
}

#[test]
fn non_constant_int4_dq_is_refused() {
    let ok = act_qdq_model(vec![], i8_init("z", &[], &[0]), 21);
    let z4 = raw_init("z", DataType::Int4, &[], vec![0]);
    let int4_act = act_qdq_model(vec![], z4, 21);
    let r = validate(&ok, &int4_act, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::NotChecked);
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("int4") && reason.contains("QuantizeLinear 'q_act'"),
        "{reason}"
    );
}

#[test]
fn f16_weights_cast_to_float_are_widened_ahead_of_time() {
    let w16: Vec<u8> = W
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let m = model(
        graph(
            vec![
                node(
                    "Cast",
                    "cast_w",
                    &["W16"],
                    &["W"],
                    vec![a_int("to", DataType::Float as i64)],
                ),
                node("MatMul", "mm", &["x", "W"], &["y"], vec![]),
            ],
            vec![raw_init("W16", DataType::Float16, &[4, 3], w16)],
            vec![vi("x", &[2, 4])],
            vec![vi("y", &[2, 3])],
        ),
        17,
    );
    let r = validate(&matmul_model(&W), &m, &ValidateOptions::default()).unwrap();
    assert_eq!((r.status, r.method), (Status::Checked, Method::Simulation));
    assert!(
        r.rewrites.iter().any(|n| n.contains("Cast(to=float)")),
        "{:?}",
        r.rewrites
    );
    assert_eq!(r.outputs[0].max_abs_err, 0.0, "W is exact in f16");
}

// ---------------------------------------------------------------- control flow and domains

fn branch(op: &str, out: &str) -> GraphProto {
    graph(
        vec![node(op, &format!("{op}_n"), &["x"], &[out], vec![])],
        vec![],
        vec![],
        vec![vi(out, &[2, 4])],
    )
}

fn if_model(cond_nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> ModelProto {
    let mut nodes = cond_nodes;
    nodes.push(node(
        "If",
        "if0",
        &["c"],
        &["y"],
        vec![
            a_graph("then_branch", branch("Relu", "t")),
            a_graph("else_branch", branch("Neg", "e")),
        ],
    ));
    model(
        graph(nodes, inits, vec![vi("x", &[2, 4])], vec![vi("y", &[2, 4])]),
        17,
    )
}

fn unary_model(op: &str) -> ModelProto {
    model(
        graph(
            vec![node(op, "u", &["x"], &["y"], vec![])],
            vec![],
            vec![vi("x", &[2, 4])],
            vec![vi("y", &[2, 4])],
        ),
        17,
    )
}

#[test]
fn constant_if_is_folded_to_the_taken_branch() {
    for (cond, op) in [(true, "Relu"), (false, "Neg")] {
        let m = if_model(vec![], vec![bool_init("c", cond)]);
        let (sim, notes) = simulation_graph(&m).unwrap();
        assert_eq!(
            notes[0],
            format!(
                "folded If 'if0' (If) (condition constant {cond}): inlined its {}",
                if cond { "then_branch" } else { "else_branch" }
            )
        );
        let ops: Vec<&str> = sim
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type())
            .collect();
        assert_eq!(ops, [op, "Identity"]);
        assert!(
            sim.graph.as_ref().unwrap().initializer.is_empty(),
            "the condition is dropped"
        );
        let r = validate(&unary_model(op), &m, &ValidateOptions::default()).unwrap();
        assert_eq!(
            (r.status, r.method),
            (Status::Checked, Method::Simulation),
            "{r:?}"
        );
        assert_eq!(r.outputs[0].max_abs_err, 0.0);
    }
    // Condition from a Constant node.
    let c = node(
        "Constant",
        "cst",
        &[],
        &["c"],
        vec![a_tensor("value", bool_init("", true))],
    );
    let m = if_model(vec![c], vec![]);
    let r = validate(&unary_model("Relu"), &m, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Checked);
    assert!(
        r.rewrites.iter().any(|n| n.contains("folded If 'if0'")),
        "{:?}",
        r.rewrites
    );
    assert_eq!(r.outputs[0].max_abs_err, 0.0);
}

#[test]
fn dynamic_if_with_same_shapes_runs_directly() {
    // c = ReduceSum(x) > 0 ; y = c ? Relu(x) : Neg(x)
    let m = if_model(
        vec![
            node(
                "ReduceSum",
                "rs",
                &["x"],
                &["sum"],
                vec![a_int("keepdims", 0)],
            ),
            node("Greater", "gt", &["sum", "zero"], &["c"], vec![]),
        ],
        vec![f32_init("zero", &[], &[0.0])],
    );
    let r = validate(&m, &m, &ValidateOptions::default()).unwrap();
    assert_eq!(
        (r.status, r.method),
        (Status::Checked, Method::Direct),
        "{r:?}"
    );
    for (x, want) in [
        (
            vec![1.0, -2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0],
            vec![1.0, 0.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0],
        ),
        (
            vec![-1.0, 2.0, -3.0, 0.5, 0.0, 0.0, 0.0, 0.0],
            vec![1.0, -2.0, 3.0, -0.5, 0.0, 0.0, 0.0, 0.0],
        ),
    ] {
        let y = run_model(&m, &[("x".into(), arr(&[2, 4], x))], &[]).unwrap();
        assert_eq!(y[0].1.iter().copied().collect::<Vec<_>>(), want);
    }
}

#[test]
fn custom_domain_and_missing_ops_are_refused_by_name() {
    let mut custom = unary_model("Relu");
    custom.graph.as_mut().unwrap().node[0].domain = Some("com.example".into());
    custom.opset_import.push(OperatorSetIdProto {
        domain: Some("com.example".into()),
        version: Some(1),
    });
    let r = validate(&unary_model("Relu"), &custom, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::NotChecked);
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("'u' (com.example::Relu)") && reason.contains("ignoring the domain"),
        "{reason}"
    );
    assert_eq!(serde_json::to_value(r.status).unwrap(), "not_checked");

    let looped = unary_model("Loop");
    let r = validate(&looped, &looped, &ValidateOptions::default()).unwrap();
    assert!(r.reason.unwrap().contains("no 'Loop' operator"));

    // Custom op hidden inside an If branch that cannot be folded.
    let mut m = if_model(
        vec![
            node(
                "ReduceSum",
                "rs",
                &["x"],
                &["sum"],
                vec![a_int("keepdims", 0)],
            ),
            node("Greater", "gt", &["sum", "zero"], &["c"], vec![]),
        ],
        vec![f32_init("zero", &[], &[0.0])],
    );
    let ifn = m.graph.as_mut().unwrap().node.last_mut().unwrap();
    ifn.attribute[1].g.as_mut().unwrap().node[0].domain = Some("com.example".into());
    let r = validate(&m, &m, &ValidateOptions::default()).unwrap();
    assert!(r.reason.unwrap().contains("'Neg_n' (com.example::Neg)"));
}

#[test]
fn interface_differences_are_mismatches() {
    let a = matmul_model(&W);
    let mut b = matmul_model(&W);
    b.graph.as_mut().unwrap().output[0].name = Some("z".into());
    b.graph.as_mut().unwrap().node[0].output[0] = "z".into();
    let r = validate(&a, &b, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Mismatch);
    assert!(r.reason.unwrap().contains("no output 'y'"));
}

// ---------------------------------------------------------------- tract 0.23.9 facts
//
// What tract does on its own with the constructs the validator refuses or rewrites. If a tract
// upgrade changes one of these, the matching refusal in `support.rs` can be revisited.

fn tract_alone(m: &ModelProto, x: ArrayD<f32>) -> Result<Vec<f32>, String> {
    use prost::Message;
    use tract_onnx::prelude::*;
    let run = || -> TractResult<Vec<f32>> {
        let bytes = m.encode_to_vec();
        let mut im = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_read(&mut &bytes[..])?;
        im.set_input_fact(
            0,
            InferenceFact::dt_shape(f32::datum_type(), x.shape().to_vec()),
        )?;
        let plan = im.into_optimized()?.into_runnable()?;
        let out = plan.run(tvec![Tensor::from(x.clone()).into()])?;
        let t = out[0].clone().into_tensor().cast_to::<f32>()?.into_owned();
        Ok(t.into_plain_array::<f32>()?.iter().copied().collect())
    };
    run().map_err(|e| format!("{e:#}"))
}

#[test]
fn tract_alone_ignores_the_domain() {
    let mut custom = unary_model("Relu");
    custom.graph.as_mut().unwrap().node[0].domain = Some("com.example".into());
    let y = tract_alone(&custom, arr(&[2, 4], vec![-1.0; 8])).unwrap();
    assert_eq!(y, vec![0.0; 8], "com.example::Relu ran as ONNX Relu");
}

#[test]
fn tract_alone_ignores_quantize_output_dtype() {
    // ONNX: no zero point + output_dtype = int8 -> int8 output, so -1.0 / 0.1 -> -10 -> -1.0.
    let m = model(
        graph(
            vec![
                node(
                    "QuantizeLinear",
                    "q",
                    &["x", "s"],
                    &["xq"],
                    vec![a_int("output_dtype", DataType::Int8 as i64)],
                ),
                node("DequantizeLinear", "dq", &["xq", "s"], &["y"], vec![]),
            ],
            vec![f32_init("s", &[], &[0.1])],
            vec![vi("x", &[1, 4])],
            vec![vi("y", &[1, 4])],
        ),
        21,
    );
    let y = tract_alone(&m, arr(&[1, 4], vec![-1.0, 1.0, -0.5, 0.5])).unwrap();
    assert_eq!(
        y[0], 0.0,
        "tract quantized to uint8 (clamped at 0): a wrong run"
    );
}

#[test]
fn tract_alone_cannot_load_these() {
    let x = || arr(&[2, 8], vec![0.5; 16]);
    let q: Vec<i8> = vec![1; 32];
    // int4 initializer
    let e = tract_alone(&int4_matmul(&q, f32_init("s", &[], &[0.1]), vec![]), x()).unwrap_err();
    assert!(e.contains("Int4"), "{e}");
    // block-wise DQ (int8 weights)
    let m = model(
        graph(
            vec![
                node(
                    "DequantizeLinear",
                    "dq_w",
                    &["Wq", "s"],
                    &["Wf"],
                    vec![a_int("axis", 0), a_int("block_size", 4)],
                ),
                node("MatMul", "mm", &["x", "Wf"], &["y"], vec![]),
            ],
            vec![
                i8_init("Wq", &[8, 4], &[1; 32]),
                f32_init("s", &[2, 4], &[0.1; 8]),
            ],
            vec![vi("x", &[2, 8])],
            vec![vi("y", &[2, 4])],
        ),
        21,
    );
    assert!(tract_alone(&m, x())
        .unwrap_err()
        .contains("blocked quantization"));
    let r = validate(&matmul4(&[0.1; 32]), &m, &ValidateOptions::default()).unwrap();
    assert_eq!(r.status, Status::Checked, "simulation handles it: {r:?}");
    assert!(r.outputs[0].max_abs_err < 1e-6);
    // f16 activation scale
    let s16 = raw_init(
        "s",
        DataType::Float16,
        &[],
        half::f16::from_f32(0.1).to_le_bytes().to_vec(),
    );
    let mut m = act_qdq_model(vec![], i8_init("z", &[], &[0]), 21);
    m.graph.as_mut().unwrap().initializer[0] = s16;
    let e = tract_alone(&m, arr(&[1, 4], vec![0.5; 4])).unwrap_err();
    assert!(!e.is_empty());
    let r = validate(&m, &m, &ValidateOptions::default()).unwrap();
    assert!(r
        .reason
        .unwrap()
        .contains("float16; tract 0.23.9 only runs float32 scales"));
    // If with a dynamic condition and branches of different shapes
    let mut m = if_model(
        vec![
            node(
                "ReduceSum",
                "rs",
                &["x"],
                &["sum"],
                vec![a_int("keepdims", 0)],
            ),
            node("Greater", "gt", &["sum", "zero"], &["c"], vec![]),
        ],
        vec![f32_init("zero", &[], &[0.0])],
    );
    let ifn = m.graph.as_mut().unwrap().node.last_mut().unwrap();
    let g = ifn.attribute[1].g.as_mut().unwrap();
    g.node[0] = node(
        "ReduceSum",
        "rs_e",
        &["x"],
        &["e"],
        vec![a_int("keepdims", 1)],
    );
    g.output[0] = vi("e", &[1, 1]);
    let e = tract_alone(&m, arr(&[2, 4], vec![1.0; 8]));
    eprintln!("If with different branch shapes, tract alone: {e:?}");
    let r = validate(&m, &m, &ValidateOptions::default()).unwrap();
    eprintln!("validate: {:?} {:?}", r.status, r.reason);
    assert_eq!(r.status, Status::NotChecked);
}

// ---------------------------------------------------------------- cross-check with onnxruntime

/// Runs `m` on `x` in onnxruntime through python; `None` when python/onnxruntime is missing
/// (a failure under CI, see `common::python`).
fn onnxruntime(m: &ModelProto, x: &ArrayD<f32>) -> Option<Vec<f32>> {
    use prost::Message;
    if !common::python::require_python(&["onnxruntime", "numpy"], "tract vs onnxruntime") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let script = "import sys, json, numpy as np, onnxruntime as ort\n\
        s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
        x = np.array(json.loads(sys.argv[2]), dtype=np.float32).reshape(json.loads(sys.argv[3]))\n\
        print(json.dumps([float(v) for v in s.run(None, {'x': x})[0].ravel()]))";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .arg(serde_json::to_string(&x.iter().collect::<Vec<_>>()).unwrap())
        .arg(serde_json::to_string(x.shape()).unwrap())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "onnxruntime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("onnxruntime printed a JSON list"))
}

#[test]
fn simulation_of_int4_blockwise_and_per_axis_int8_matches_onnxruntime() {
    let q: Vec<i8> = (0..32).map(|i| ((i * 7) % 16) as i8 - 8).collect();
    let sb = [0.1f32, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0, 4.0];
    let int4 = int4_matmul(
        &q,
        f32_init("s", &[2, 4], &sb),
        vec![a_int("axis", 0), a_int("block_size", 4)],
    );
    let x = arr(&[2, 8], (0..16).map(|i| (i as f32 - 7.5) / 4.0).collect());
    let Some(want) = onnxruntime(&int4, &x) else {
        return;
    };
    let (sim, _) = simulation_graph(&int4).unwrap();
    let got = run_model(&sim, &[("x".into(), x.clone())], &[]).unwrap();
    for (a, b) in got[0].1.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "tract(sim) {:?} vs ort {want:?}",
            got[0].1
        );
    }

    let qc: [i8; 8] = [-128, -3, 0, 127, 10, 20, -30, 5];
    let qdq = conv_model(
        vec![node(
            "DequantizeLinear",
            "dq_w",
            &["Wq", "s", "z"],
            &["Wf"],
            vec![a_int("axis", 0)],
        )],
        vec![
            i8_init("Wq", &[2, 1, 2, 2], &qc),
            f32_init("s", &[2], &[0.01, 0.5]),
            i8_init("z", &[2], &[2, -1]),
        ],
        13,
    );
    let xc = arr(
        &[1, 1, 3, 3],
        (0..9).map(|i| i as f32 * 0.3 - 1.0).collect(),
    );
    let want = onnxruntime(&qdq, &xc).unwrap();
    let (sim, _) = simulation_graph(&qdq).unwrap();
    let got = run_model(&sim, &[("x".into(), xc)], &[]).unwrap();
    for (a, b) in got[0].1.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "tract(sim) {:?} vs ort {want:?}",
            got[0].1
        );
    }
}

#[test]
fn in_sample_rows_stop_once_both_halves_agree_whatever_the_thread_count() {
    // y = x @ W against a copy with W[0][0] and W[1][1] perturbed: a row [1, 0, 0, 0] has an
    // error, a row [0, 0, 1, 0] none (SQNR +inf).
    let mut w2 = W;
    w2[0] += 0.5;
    w2[4] -= 0.25;
    let batch_of = |m: &mut ModelProto| {
        let g = m.graph.as_mut().unwrap();
        g.input[0] = vi("x", &[-1, 4]);
        g.output[0] = vi("y", &[-1, 3]);
    };
    let (mut a, mut b) = (matmul_model(&W), matmul_model(&w2));
    batch_of(&mut a);
    batch_of(&mut b);
    let rows = |pattern: &dyn Fn(usize) -> [f32; 4]| {
        let v: Vec<f32> = (0..64).flat_map(pattern).collect();
        vec![vec![("x".to_string(), arr(&[64, 4], v).into())]]
    };
    let opts = |inputs, early_stop| ValidateOptions {
        inputs: Some(inputs),
        in_sample: true,
        row_axes: Some(vec![("x".to_string(), Some(0))]),
        early_stop,
        ..Default::default()
    };
    let (x0, x1) = ([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]);
    // Every row alike: rows 1-8 and 9-16 agree, 16 rows compared.
    let same = rows(&|_| x0);
    // Rows 9-16 differ from rows 1-8 (finite vs +inf SQNR), rows 17-32 repeat rows 1-16: 32.
    let two_blocks = rows(&|r| if r % 16 < 8 { x0 } else { x1 });
    // Only rows 1-8 have an error: rows 1-16 differ from rows 17-32 too, all 64.
    let late = rows(&|r| if r < 8 { x0 } else { x1 });
    let all = validate(&a, &b, &opts(same.clone(), None)).unwrap();
    assert_eq!((all.samples, all.samples_given), (64, 64));
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for (inputs, want) in [(&same, 16), (&two_blocks, 32), (&late, 64)] {
            let r = pool
                .install(|| validate(&a, &b, &opts(inputs.clone(), Some(EarlyStop::default()))))
                .unwrap();
            assert_eq!(r.status, Status::Checked, "{r:?}");
            assert_eq!(
                (r.samples, r.samples_given),
                (want, 64),
                "{threads} threads"
            );
            assert_eq!(r.outputs[0].elements, want * 3);
            let noted = r
                .notes
                .iter()
                .any(|n| n.contains(&format!("first {want} of 64")));
            assert_eq!(noted, want < 64, "{:?}", r.notes);
        }
    }
    // Stopped at 16 on identical rows: the same SQNR as all 64.
    let r = validate(&a, &b, &opts(same, Some(EarlyStop::default()))).unwrap();
    assert!((r.outputs[0].sqnr_db - all.outputs[0].sqnr_db).abs() < 1e-9);
}
