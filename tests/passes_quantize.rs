//! Placement and insertion of the `quantize` pass on small models built in code, the wiring
//! each `tests/fixtures/quantize` case's intent states (the harness in `tests/fixtures.rs`
//! checks their snapshots, idempotence and tolerance), the digits classifier's accuracy in
//! tract and onnxruntime, and the onnx checker / onnxruntime on quantized models (a failure
//! under CI when python lacks onnx/onnxruntime, see `common::python`).

mod common;

use common::builder::{self as builder, conv, Builder};
use ndarray::{arr0, ArrayD};
use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::ir::{op, Model};
use onnx_compress::onnx::proto::{ModelProto, NodeProto};
use onnx_compress::onnx::tensor;
use onnx_compress::passes::quantize::{quantize, QuantizeOptions};
use onnx_compress::passes::PassStats;
use std::process::Command;

fn run(m: &Model, opts: &QuantizeOptions) -> (Model, PassStats) {
    let mut q = m.clone();
    let stats = quantize(&mut q, opts, None).expect("quantize");
    q.graph.check().unwrap();
    (q, stats)
}

fn proto(m: &Model) -> ModelProto {
    m.to_proto().unwrap()
}

fn nodes(m: &Model) -> Vec<NodeProto> {
    proto(m).graph.unwrap().node
}

fn producer(m: &Model, value: &str) -> Option<NodeProto> {
    nodes(m)
        .into_iter()
        .find(|n| n.output.iter().any(|o| o == value))
}

fn count(m: &Model, op_type: &str) -> usize {
    nodes(m).iter().filter(|n| n.op_type() == op_type).count()
}

fn f32s(m: &Model, name: &str) -> Vec<f32> {
    let t = m
        .graph
        .initializers
        .get(name)
        .unwrap_or_else(|| panic!("no initializer {name}"));
    tensor::to_f32(t).unwrap().iter().copied().collect()
}

/// The DQ producing `value` and its (int tensor, scale, zero point) initializer names; the
/// zero point is "" when the DQ has none (0 by definition).
fn dq_of(m: &Model, value: &str) -> (NodeProto, String, String, String) {
    let dq = producer(m, value).unwrap_or_else(|| panic!("nothing produces {value}"));
    assert_eq!(
        dq.op_type(),
        "DequantizeLinear",
        "{value} is not dequantized"
    );
    (
        dq.clone(),
        dq.input[0].clone(),
        dq.input[1].clone(),
        dq.input.get(2).cloned().unwrap_or_default(),
    )
}

/// The node computing `value` in float: its producer, or the producer behind its Q/DQ pair.
fn float_producer(m: &Model, value: &str) -> NodeProto {
    let p = producer(m, value).unwrap_or_else(|| panic!("nothing produces {value}"));
    if p.op_type() != "DequantizeLinear" {
        return p.clone();
    }
    let q = producer(m, &p.input[0]).expect("Q before DQ");
    producer(m, &q.input[0]).expect("producer before Q").clone()
}

/// Whether `value` is the output of a Q -> DQ pair on an activation.
fn is_qdq(m: &Model, value: &str) -> bool {
    match producer(m, value) {
        Some(dq) if dq.op_type() == "DequantizeLinear" => {
            producer(m, &dq.input[0]).is_some_and(|q| q.op_type() == "QuantizeLinear")
        }
        _ => false,
    }
}

fn conv_relu_model(clip: bool) -> Model {
    let mut b = Builder::new(13);
    b.input("x", &[1, 3, 8, 8]).output("y", &[1, 4, 8, 8]);
    conv(&mut b, "conv", "x", "c", 3, 4, 3);
    if clip {
        b.init("six", arr0(6.0f32).into_dyn())
            .init("zero", arr0(0.0f32).into_dyn());
        b.node("Clip", "act", &["c", "zero", "six"], &["y"], vec![]);
    } else {
        b.node("Relu", "act", &["c"], &["y"], vec![]);
    }
    b.model()
}

#[test]
fn conv_relu_is_one_unit_with_int32_bias() {
    let m = conv_relu_model(false);
    let (q, stats) = run(&m, &QuantizeOptions::default());
    // Intent: no Q/DQ between Conv and Relu; Q/DQ on x and on the Relu output.
    let conv = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "Conv")
        .unwrap();
    let relu = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "Relu")
        .unwrap();
    assert_eq!(
        relu.input[0], conv.output[0],
        "Relu reads the Conv directly"
    );
    assert!(is_qdq(&q, &conv.input[0]), "conv input is quantized");
    assert!(is_qdq(&q, "y"), "relu output quantized under its own name");
    assert_eq!(count(&q, "QuantizeLinear"), 2);
    assert_eq!(q.opset(""), Some(13));

    // Weight: int8 per-channel on axis 0, scale = max|w_c| / 127.
    let w = f32s(&m, "conv.w");
    let (wdq, wq, ws, wzp) = dq_of(&q, "conv.w");
    assert!(wzp.is_empty(), "Conv weight DQ has no zero point input");
    assert_eq!(
        wdq.attribute
            .iter()
            .find(|a| a.name() == "axis")
            .unwrap()
            .i(),
        0
    );
    let s_w = f32s(&q, &ws);
    assert_eq!(s_w.len(), 4);
    for (c, s) in s_w.iter().enumerate() {
        let amax = w[c * 27..(c + 1) * 27]
            .iter()
            .fold(0f32, |a, v| a.max(v.abs()));
        assert!((s - amax / 127.0).abs() <= 1e-7 * amax, "channel {c}");
    }
    let wq_t = &q.graph.initializers[&wq];
    assert_eq!(tensor::type_name(tensor::data_type(wq_t).unwrap()), "int8");

    // Bias: int32 = round(b / (s_x * s_w[c])), scale s_x * s_w[c].
    let b = f32s(&m, "conv.b");
    let (_, bq, bs, bzp) = dq_of(&q, "conv.b");
    let x_dq = dq_of(&q, &conv.input[0]);
    let s_x = f32s(&q, &x_dq.2)[0];
    let bq_t = &q.graph.initializers[&bq];
    assert_eq!(tensor::type_name(tensor::data_type(bq_t).unwrap()), "int32");
    let bq_v = f32s(&q, &bq);
    let bs_v = f32s(&q, &bs);
    for c in 0..4 {
        let scale = s_x * s_w[c];
        assert!((bs_v[c] - scale).abs() <= 1e-6 * scale);
        assert_eq!(bq_v[c], (b[c] / scale).round(), "bias channel {c}");
    }
    assert!(bzp.is_empty(), "int32 bias DQ has no zero point input");
    // Report has per-layer SQNR and per-tensor ranges.
    let d = &stats.details;
    assert!(d["weights"][0]["sqnr_db"].as_f64().unwrap() > 30.0);
    assert_eq!(d["activations"].as_array().unwrap().len(), 2);
    assert!(stats.notes.iter().any(|n| n.contains("WARNING")));
}

#[test]
fn conv_clip6_range_is_non_negative_and_bounded() {
    let m = conv_relu_model(true);
    let (q, stats) = run(&m, &QuantizeOptions::default());
    let clip = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "Clip")
        .unwrap();
    assert_eq!(producer(&q, &clip.input[0]).unwrap().op_type(), "Conv");
    let (_, _, s, zp) = dq_of(&q, "y");
    assert_eq!(
        f32s(&q, &zp),
        vec![0.0],
        "post-Clip range starts at 0: zp 0"
    );
    assert!(f32s(&q, &s)[0] <= 6.0 / 255.0 + 1e-7);
    let act = &stats.details["activations"];
    let y = act
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["tensor"] == "y")
        .unwrap();
    assert!(y["range"][0].as_f64().unwrap() >= 0.0);
}

#[test]
fn residual_add_quantizes_both_branches_and_output() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 4, 8, 8]).output("out", &[1, 4, 8, 8]);
    conv(&mut b, "c1", "x", "c1o", 4, 4, 3);
    b.node("Relu", "r1", &["c1o"], &["a"], vec![]);
    conv(&mut b, "c2", "a", "bo", 4, 4, 3);
    b.node("Add", "add", &["a", "bo"], &["s"], vec![]);
    b.node("Relu", "r2", &["s"], &["out"], vec![]);
    let (q, _) = run(&b.model(), &QuantizeOptions::default());
    for v in ["a", "bo", "out"] {
        assert!(is_qdq(&q, v), "{v} should be quantized");
    }
    // Add -> Relu is one unit too: no Q/DQ between them.
    assert!(!is_qdq(&q, "s"));
    // `a` is read by c2 and the Add through one Q/DQ pair.
    let qs = nodes(&q)
        .into_iter()
        .filter(|n| n.op_type() == "QuantizeLinear")
        .count();
    assert_eq!(qs, 4, "x, a, bo, out");
}

#[test]
fn concat_inputs_share_the_output_scale() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 3, 8, 8]).output("y", &[1, 4, 8, 8]);
    conv(&mut b, "ca", "x", "a", 3, 2, 1);
    conv(&mut b, "cb", "x", "b", 3, 2, 3);
    b.node(
        "Concat",
        "cat",
        &["a", "b"],
        &["y"],
        vec![op::attr_int("axis", 1)],
    );
    let (q, _) = run(&b.model(), &QuantizeOptions::default());
    let params = |v: &str| {
        let (_, _, s, zp) = dq_of(&q, v);
        (f32s(&q, &s), f32s(&q, &zp))
    };
    assert_eq!(params("a"), params("y"));
    assert_eq!(params("b"), params("y"));
}

#[test]
fn maxpool_and_reshape_pass_through_the_input_scale() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 3, 8, 8]).output("y", &[1, 10]);
    conv(&mut b, "c", "x", "co", 3, 4, 3);
    b.node("Relu", "r", &["co"], &["a"], vec![]);
    b.node(
        "MaxPool",
        "mp",
        &["a"],
        &["p"],
        vec![
            op::attr_ints("kernel_shape", &[2, 2]),
            op::attr_ints("strides", &[2, 2]),
        ],
    );
    b.init_i64("shape", &[1, -1]);
    b.node("Reshape", "rs", &["p", "shape"], &["f"], vec![]);
    b.randn("fc.w", &[64, 10], 0.3);
    b.node("MatMul", "fc", &["f", "fc.w"], &["y"], vec![]);
    let (q, _) = run(&b.model(), &QuantizeOptions::default());
    let scale = |v: &str| f32s(&q, &dq_of(&q, v).2);
    assert_eq!(scale("p"), scale("a"));
    assert_eq!(scale("f"), scale("a"));
    // MatMul constant weight: per-channel on the last axis (10 columns).
    let (wdq, _, ws, _) = dq_of(&q, "fc.w");
    assert_eq!(f32s(&q, &ws).len(), 10);
    assert_eq!(
        wdq.attribute
            .iter()
            .find(|a| a.name() == "axis")
            .unwrap()
            .i(),
        1
    );
    assert!(is_qdq(&q, "y"));
}

#[test]
fn gemm_weight_axis_follows_trans_b() {
    for trans_b in [0, 1] {
        let mut b = Builder::new(13);
        b.input("x", &[2, 6]).output("y", &[2, 5]);
        let shape = if trans_b == 1 { [5, 6] } else { [6, 5] };
        b.randn("w", &shape, 0.5);
        b.randn("bias", &[5], 0.5);
        b.node(
            "Gemm",
            "fc",
            &["x", "w", "bias"],
            &["y"],
            vec![op::attr_int("transB", trans_b)],
        );
        let (q, _) = run(&b.model(), &QuantizeOptions::default());
        let (wdq, _, ws, wzp) = dq_of(&q, "w");
        // ORT's QGemm fusion wants the zero-point input (all zeros).
        assert_eq!(f32s(&q, &wzp), vec![0.0; f32s(&q, &ws).len()]);
        let axis = wdq
            .attribute
            .iter()
            .find(|a| a.name() == "axis")
            .unwrap()
            .i();
        assert_eq!(axis, if trans_b == 1 { 0 } else { 1 });
        assert_eq!(f32s(&q, &ws).len(), 5);
        let (bdq, bq, _, _) = dq_of(&q, "bias");
        assert_eq!(
            bdq.attribute
                .iter()
                .find(|a| a.name() == "axis")
                .unwrap()
                .i(),
            0
        );
        assert_eq!(f32s(&q, &bq).len(), 5);
    }
}

#[test]
fn per_tensor_option_gives_scalar_scales() {
    let m = conv_relu_model(false);
    let opts = QuantizeOptions {
        per_channel: false,
        ..Default::default()
    };
    let (q, _) = run(&m, &opts);
    let (wdq, _, ws, _) = dq_of(&q, "conv.w");
    assert!(wdq.attribute.iter().all(|a| a.name() != "axis"));
    assert_eq!(q.graph.initializers[&ws].dims.len(), 0);
    let (_, _, bs, _) = dq_of(&q, "conv.b");
    assert_eq!(q.graph.initializers[&bs].dims.len(), 0);
}

#[test]
fn matmul_with_two_dynamic_inputs_quantizes_both() {
    let mut b = Builder::new(13);
    b.input("a", &[2, 3, 4])
        .input("b", &[2, 4, 5])
        .output("y", &[2, 3, 5]);
    b.node("MatMul", "mm", &["a", "b"], &["y"], vec![]);
    let (q, _) = run(&b.model(), &QuantizeOptions::default());
    let mm = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "MatMul")
        .unwrap();
    assert!(is_qdq(&q, &mm.input[0]) && is_qdq(&q, &mm.input[1]));
    assert!(is_qdq(&q, "y"));
    // Graph inputs keep their names; the MatMul reads the dequantized copies.
    assert_ne!(mm.input[0], "a");
}

#[test]
fn softmax_stays_float_and_reads_the_dequantized_value() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 6]).output("y", &[1, 4]);
    b.randn("w", &[6, 4], 0.5);
    b.node("MatMul", "fc", &["x", "w"], &["l"], vec![]);
    b.node(
        "Softmax",
        "sm",
        &["l"],
        &["y"],
        vec![op::attr_int("axis", -1)],
    );
    let (q, _) = run(&b.model(), &QuantizeOptions::default());
    assert!(is_qdq(&q, "l"));
    assert!(!is_qdq(&q, "y"), "softmax output must stay float");
    assert_eq!(producer(&q, "y").unwrap().op_type(), "Softmax");
    // Excluding the MatMul by name leaves the model float.
    let opts = QuantizeOptions {
        exclude_nodes: vec!["f.*".into()],
        ..Default::default()
    };
    let (q2, stats) = run(&b.model(), &opts);
    assert_eq!(count(&q2, "QuantizeLinear"), 0, "{:?}", stats.notes);
    // include_nodes restricts to matching nodes.
    let opts = QuantizeOptions {
        include_nodes: vec!["nothing".into()],
        ..Default::default()
    };
    assert_eq!(count(&run(&b.model(), &opts).0, "DequantizeLinear"), 0);
}

#[test]
fn zero_weight_channel_gets_a_finite_scale() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 2, 4, 4]).output("y", &[1, 3, 4, 4]);
    let mut w = ArrayD::<f32>::zeros(ndarray::IxDyn(&[3, 2, 1, 1]));
    w[[1, 0, 0, 0]] = 0.5;
    b.init("w", w);
    b.init("b", ndarray::arr1(&[0.0f32, 0.1, 0.2]).into_dyn());
    b.node("Conv", "c", &["x", "w", "b"], &["y"], vec![]);
    let (q, stats) = run(&b.model(), &QuantizeOptions::default());
    let (_, _, ws, _) = dq_of(&q, "w");
    let s = f32s(&q, &ws);
    assert!(s.iter().all(|v| v.is_finite() && *v > 0.0), "{s:?}");
    assert_eq!(s[0], 1.0);
    let (_, bq, bs, _) = dq_of(&q, "b");
    assert!(f32s(&q, &bs).iter().all(|v| v.is_finite() && *v > 0.0));
    assert!(f32s(&q, &bq).iter().all(|v| v.is_finite()));
    assert_eq!(stats.details["weights"][0]["zero_channels"], 2);
}

#[test]
fn running_twice_equals_running_once() {
    let (q1, _) = run(&conv_relu_model(false), &QuantizeOptions::default());
    let (q2, stats) = run(&q1, &QuantizeOptions::default());
    assert_eq!(proto(&q1), proto(&q2));
    assert_eq!(stats.changes, 0);
}

#[test]
fn stochastic_rounding_is_deterministic_per_seed() {
    let m = conv_relu_model(false);
    let with_seed = |seed| QuantizeOptions {
        rounding: onnx_compress::passes::quantize::Rounding::Stochastic { seed },
        ..Default::default()
    };
    let a = proto(&run(&m, &with_seed(1)).0);
    let b = proto(&run(&m, &with_seed(1)).0);
    let c = proto(&run(&m, &with_seed(2)).0);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn opset11_squeeze_and_opset10_clip_are_converted() {
    let mut b = Builder::new(10);
    b.input("x", &[1, 3, 4, 4]).output("y", &[1, 2]);
    conv(&mut b, "c", "x", "co", 3, 2, 1);
    b.node(
        "Clip",
        "clip",
        &["co"],
        &["a"],
        vec![op::attr_float("min", 0.0), op::attr_float("max", 6.0)],
    );
    b.node("GlobalAveragePool", "gap", &["a"], &["g"], vec![]);
    b.node(
        "Squeeze",
        "sq",
        &["g"],
        &["y"],
        vec![op::attr_ints("axes", &[2, 3])],
    );
    let (q, stats) = run(&b.model(), &QuantizeOptions::default());
    assert_eq!(q.opset(""), Some(13));
    let clip = float_producer(&q, "a");
    assert_eq!(clip.op_type(), "Clip");
    assert_eq!(clip.input.len(), 3);
    assert!(clip.attribute.is_empty());
    let sq = float_producer(&q, "y");
    assert_eq!(sq.op_type(), "Squeeze");
    assert_eq!(sq.input.len(), 2);
    assert!(stats
        .notes
        .iter()
        .any(|n| n.contains("raised the default opset")));
    python_check(&q, &b.model(), "opset10");
}

#[test]
fn opset12_softmax_on_inner_axis_is_refused_by_name() {
    let mut b = Builder::new(12);
    b.input("x", &[1, 3, 4]).output("y", &[1, 3, 4]);
    b.randn("w", &[4, 4], 0.5);
    b.node("MatMul", "fc", &["x", "w"], &["l"], vec![]);
    b.node(
        "Softmax",
        "probs",
        &["l"],
        &["y"],
        vec![op::attr_int("axis", 1)],
    );
    let mut m = b.model();
    m.graph
        .value_info
        .push(builder::value_info("l", Some(&[1, 3, 4])));
    let err = quantize(&mut m, &QuantizeOptions::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Softmax 'probs'") && err.contains("opset >= 13"),
        "{err}"
    );
}

#[test]
fn calibration_data_sets_the_ranges() {
    let m = conv_relu_model(false);
    let x = ArrayD::<f32>::from_elem(ndarray::IxDyn(&[4, 3, 8, 8]), 0.25);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("calib.npy");
    ndarray_npy::write_npy(&p, &x).unwrap();
    let calib = CalibrationSet::load(&p, &m, &DataOptions::default()).unwrap();
    let mut q = m.clone();
    let stats = quantize(&mut q, &QuantizeOptions::default(), Some(&calib)).unwrap();
    assert!(!stats.notes.iter().any(|n| n.contains("WARNING")));
    // Input range [0, 0.25] (widened to include 0): uint8 scale 0.25/255, zp 0.
    let x_in = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "Conv")
        .unwrap()
        .input[0]
        .clone();
    let (_, _, s, zp) = dq_of(&q, &x_in);
    assert!((f32s(&q, &s)[0] - 0.25 / 255.0).abs() < 1e-9);
    assert_eq!(f32s(&q, &zp), vec![0.0]);
    assert_eq!(stats.details["calibration"]["samples"], 4);
}

/// Check a quantized model with onnx's full checker and compare it with the float model in
/// onnxruntime; not run when python, onnx or onnxruntime is missing (a failure under CI).
fn python_check(q: &Model, float: &Model, tag: &str) {
    if !common::python::require_python(&["onnx", "onnxruntime", "numpy"], tag) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qp = dir.path().join(format!("{tag}_q.onnx"));
    let fp = dir.path().join(format!("{tag}_f.onnx"));
    let opts = onnx_compress::onnx::save::SaveOptions::default();
    onnx_compress::ir::Model::save(q, &qp, &opts).unwrap();
    onnx_compress::ir::Model::save(float, &fp, &opts).unwrap();
    let script = r#"
import sys
import onnx, onnxruntime as ort, numpy as np
q, f = sys.argv[1], sys.argv[2]
onnx.checker.check_model(onnx.load(q), full_check=True)
def session(p, level):
    so = ort.SessionOptions(); so.log_severity_level = 3
    so.graph_optimization_level = level
    return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
# QDQ semantics exactly (no fusion), then fused kernels (must load and run).
sq = session(q, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
sf = session(f, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
rng = np.random.default_rng(0)
feed = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32) for i in sq.get_inputs()}
a = sq.run(None, feed)[0]; b = sf.run(None, feed)[0]
session(q, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, feed)
# finite on one side only is a mismatch whatever the tolerance
rel = float("inf") if (np.isfinite(a) != np.isfinite(b)).any() else float(np.abs(a - b).max() / (np.abs(b).max() + 1e-9))
print("REL", rel)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&qp)
        .arg(&fp)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{tag}: onnx checker / ORT failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REL "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Synthetic calibration on a random input: int8 error stays within a few percent.
    assert!(
        rel < 0.1,
        "{tag}: ORT quantized vs float relative error {rel}"
    );
}

#[test]
fn quantized_models_pass_the_onnx_checker_and_run_in_ort() {
    python_check(
        &run(&conv_relu_model(false), &QuantizeOptions::default()).0,
        &conv_relu_model(false),
        "conv_relu",
    );
    python_check(
        &run(&conv_relu_model(true), &QuantizeOptions::default()).0,
        &conv_relu_model(true),
        "conv_clip",
    );
    let mut b = Builder::new(13);
    b.input("a", &[2, 3, 4])
        .input("b", &[2, 4, 5])
        .output("y", &[2, 3, 5]);
    b.node("MatMul", "mm", &["a", "b"], &["y"], vec![]);
    python_check(
        &run(&b.model(), &QuantizeOptions::default()).0,
        &b.model(),
        "matmul",
    );
}

/// Top-1 predictions of `model` on `x` in tract (quantized models via the simulation graph).
fn tract_top1(model: &ModelProto, x: &ArrayD<f32>) -> Vec<usize> {
    let (sim, _) = onnx_compress::runtime::simulation_graph(model).unwrap();
    let n = x.shape()[0];
    let runner =
        onnx_compress::runtime::Runner::new(&sim, &[("input".into(), x.shape().to_vec())], &[])
            .unwrap();
    let out = runner.run(std::slice::from_ref(x)).unwrap().remove(0);
    (0..n)
        .map(|i| {
            let row = out.index_axis(ndarray::Axis(0), i);
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (k, &v)| if v > b.1 { (k, v) } else { b },
                )
                .0
        })
        .collect()
}

fn digits_quantized(fuse_first: bool, opts: &QuantizeOptions) -> (Model, Model, PassStats) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let path = root.join("digits_cnn.onnx");
    let float = onnx_compress::ir::Model::load(&path).unwrap();
    let mut m = float.clone();
    if fuse_first {
        let ctx = onnx_compress::passes::PassContext::default();
        onnx_compress::passes::run_passes(&mut m, &["fuse", "cleanup"], &ctx).unwrap();
    }
    let calib = CalibrationSet::load(
        &root.join("digits_calib_x.npy"),
        &m,
        &DataOptions::default(),
    )
    .unwrap();
    let stats = quantize(&mut m, opts, Some(&calib)).unwrap();
    (float, m, stats)
}

#[test]
fn digits_cnn_int8_keeps_accuracy_in_tract() {
    use onnx_compress::calibrate::Method;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let x: ArrayD<f32> = ndarray_npy::read_npy(root.join("digits_test_x.npy")).unwrap();
    let y: ndarray::Array1<i64> = ndarray_npy::read_npy(root.join("digits_test_y.npy")).unwrap();
    let n = y.len() as f64;
    let acc = |p: &[usize]| {
        p.iter().zip(&y).filter(|(a, b)| **a as i64 == **b).count() as f64 / n * 100.0
    };
    for method in [
        Method::MinMax,
        Method::Percentile(99.999),
        Method::Entropy,
        Method::Mse,
    ] {
        let opts = QuantizeOptions {
            method,
            ..Default::default()
        };
        let (float, q, stats) = digits_quantized(true, &opts);
        let pf = tract_top1(&float.to_proto().unwrap(), &x);
        let pq = tract_top1(&q.to_proto().unwrap(), &x);
        let disagree = pf.iter().zip(&pq).filter(|(a, b)| a != b).count() as f64 / n * 100.0;
        let summary = stats
            .notes
            .iter()
            .find(|s| s.starts_with("quantized"))
            .unwrap();
        eprintln!(
            "digits tract [{}]: fp32 {:.2}%  int8 {:.2}%  top-1 disagreement {:.2}%  ({summary})",
            method.label(),
            acc(&pf),
            acc(&pq),
            disagree,
        );
        assert_eq!(count(&q, "BatchNormalization"), 0, "fuse ran first");
        assert!(count(&q, "QuantizeLinear") >= 6);
        if method == Method::Entropy {
            // KL without its guards clipped the post-ReLU tensors to 1/8 of their max (83%)
            // and, once zeros were left out, the 17-level pixel input to 1/16 (10%).
            for a in stats.details["activations"].as_array().unwrap() {
                let (max, hi) = (
                    a["observed_max"].as_f64().unwrap(),
                    a["range"][1].as_f64().unwrap(),
                );
                assert!(
                    hi >= 0.5 * max,
                    "entropy clipped {} to {hi} of {max}",
                    a["tensor"]
                );
            }
        }
        assert!(
            (acc(&pf) - acc(&pq)).abs() <= 0.5,
            "{method:?}: accuracy drop"
        );
        assert!(
            disagree <= 0.2 + 1e-9,
            "{method:?}: top-1 disagreement {disagree}%"
        );
    }
}

const ORT_DIGITS: &str = r#"
import sys, json, collections
import onnx, onnxruntime as ort, numpy as np
f, q, root, opt_path = sys.argv[1:5]
onnx.checker.check_model(onnx.load(q), full_check=True)
x = np.load(root + "/digits_test_x.npy"); y = np.load(root + "/digits_test_y.npy")
def preds(p, level, save=None):
    so = ort.SessionOptions(); so.log_severity_level = 3; so.graph_optimization_level = level
    if save: so.optimized_model_filepath = save
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0].argmax(1)
L = ort.GraphOptimizationLevel
pf = preds(f, L.ORT_ENABLE_ALL)
out = {"fp32": float((pf == y).mean() * 100)}
for name, level in [("qdq", L.ORT_DISABLE_ALL), ("fused", L.ORT_ENABLE_ALL)]:
    pq = preds(q, level, opt_path if name == "fused" else None)
    out[name] = float((pq == y).mean() * 100)
    out[name + "_disagree"] = float((pq != pf).mean() * 100)
ops = collections.Counter(n.op_type for n in onnx.load(opt_path).graph.node)
out["ops"] = {k: ops[k] for k in ["QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "Conv", "FusedConv", "Gemm", "QuantizeLinear", "DequantizeLinear"] if ops[k]}
print("JSON", json.dumps(out))
"#;

/// ORT accuracy of the quantized digits model, as QDQ semantics (no fusion) and with ORT's
/// fused int8 kernels, plus the fused-op counts. `None` when python/onnxruntime is missing
/// (a failure under CI).
fn ort_digits(float: &Model, q: &Model) -> Option<serde_json::Value> {
    if !common::python::require_python(&["onnx", "onnxruntime", "numpy"], "digits in onnxruntime") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (fp, qp, op) = (
        dir.path().join("f.onnx"),
        dir.path().join("q.onnx"),
        dir.path().join("q_ort_opt.onnx"),
    );
    let o = onnx_compress::onnx::save::SaveOptions::default();
    onnx_compress::ir::Model::save(float, &fp, &o).unwrap();
    onnx_compress::ir::Model::save(q, &qp, &o).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let out = Command::new("python3")
        .arg("-c")
        .arg(ORT_DIGITS)
        .arg(&fp)
        .arg(&qp)
        .arg(&root)
        .arg(&op)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("JSON "))
        .unwrap_or_else(|| panic!("no JSON line from the ORT script: {stdout}"));
    Some(serde_json::from_str(line).unwrap())
}

#[test]
fn digits_cnn_int8_in_onnxruntime() {
    for (label, fuse_first, reduce_range) in [
        ("fused BN, 8-bit weights", true, false),
        ("fused BN, reduce_range", true, true),
        ("BN left float", false, false),
    ] {
        let opts = QuantizeOptions {
            reduce_range,
            ..Default::default()
        };
        let (float, q, _) = digits_quantized(fuse_first, &opts);
        let Some(r) = ort_digits(&float, &q) else {
            return;
        };
        eprintln!("digits ORT [{label}]: {r}");
        let fp32 = r["fp32"].as_f64().unwrap();
        // QDQ semantics (what the model means) must hold the accuracy.
        assert!(
            (fp32 - r["qdq"].as_f64().unwrap()).abs() <= 0.5,
            "{label}: {r}"
        );
        assert!(
            r["qdq_disagree"].as_f64().unwrap() <= 0.2 + 1e-9,
            "{label}: {r}"
        );
        if fuse_first {
            // Every Conv, the Gemm and the pooling run as ORT int8 kernels.
            assert!(
                r["ops"]["QLinearConv"].as_u64().unwrap_or(0) == 5,
                "{label}: {r}"
            );
            assert!(r["ops"]["QGemm"].as_u64().unwrap_or(0) == 1, "{label}: {r}");
        }
        if reduce_range {
            // 7-bit weights cannot saturate ORT's u8 x s8 int16 pair sums (AVX2 without VNNI),
            // so the fused kernels keep the accuracy too. With 8-bit weights they may not,
            // depending on the CPU: measured only.
            assert!(
                (fp32 - r["fused"].as_f64().unwrap()).abs() <= 0.5,
                "{label}: {r}"
            );
            assert!(
                r["fused_disagree"].as_f64().unwrap() <= 0.2 + 1e-9,
                "{label}: {r}"
            );
        }
    }
}

#[test]
fn testdata_models_quantize_check_and_run_in_ort() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    for name in [
        "conv_bn_relu",
        "residual",
        "mobilenet_like",
        "mlp",
        "if_model",
        "external_data",
    ] {
        let path = root.join(format!("{name}.onnx"));
        let float = onnx_compress::ir::Model::load(&path).unwrap();
        let mut m = float.clone();
        let ctx = onnx_compress::passes::PassContext::default();
        let records =
            onnx_compress::passes::run_passes(&mut m, &["fuse", "cleanup", "quantize"], &ctx)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let q = records.last().unwrap();
        eprintln!(
            "{name}: {} changes; {:?}",
            q.changes, q.details["quantized_nodes"]
        );
        if name == "if_model" {
            // Its Convs live inside If branches on a data-dependent condition: no copy
            // specialized to the data holds a branch, so their activations stay float.
            assert_eq!(q.changes, 0);
            continue;
        }
        assert!(q.changes > 0, "{name}");
        python_check(&m, &float, name);
    }
}

#[test]
fn a_bias_shared_by_two_convs_becomes_one_int32_bias_per_layer() {
    // torch's exporter deduplicates equal initializers (EfficientNet's SE biases): one float
    // bias read by two convs whose input and weight scales differ.
    let mut b = Builder::new(13);
    b.input("x", &[1, 3, 4, 4])
        .output("y1", &[1, 4, 4, 4])
        .output("y2", &[1, 4, 4, 4]);
    b.randn("w1", &[4, 3, 1, 1], 0.2);
    b.randn("w2", &[4, 3, 1, 1], 2.0);
    b.randn("shared_b", &[4], 0.1);
    b.node("Conv", "c1", &["x", "w1", "shared_b"], &["y1"], vec![]);
    b.node("Conv", "c2", &["x", "w2", "shared_b"], &["y2"], vec![]);
    let (q, stats) = run(&b.model(), &QuantizeOptions::default());
    let bias_of = |conv: &str| {
        let n = nodes(&q).into_iter().find(|n| n.name() == conv).unwrap();
        dq_of(&q, &n.input[2])
    };
    let ((_, q1, s1, _), (_, q2, s2, _)) = (bias_of("c1"), bias_of("c2"));
    assert_ne!(q1, q2, "each conv reads its own int32 bias");
    assert_ne!(f32s(&q, &s1), f32s(&q, &s2), "with its own s_in * s_w");
    let b0 = f32s(&b.model(), "shared_b");
    for (bq, bs) in [(&q1, &s1), (&q2, &s2)] {
        let (v, s) = (f32s(&q, bq), f32s(&q, bs));
        for c in 0..4 {
            assert!((v[c] * s[c] - b0[c]).abs() <= s[c], "bias channel {c}");
        }
    }
    assert!(stats
        .notes
        .iter()
        .any(|n| n.contains("1 bias initializer(s) shared")));
}

/// The wiring each `tests/fixtures/quantize` case's intent states (what reads what, weight
/// axes, shared scales), and a bound on the mean abs error in tract (the harness bounds the
/// max, which tail clipping of the synthetic calibration dominates).
mod fixture_wiring {
    use super::common::compare::abs_diff_sums;
    use super::common::fixtures::{case_path, run_fixture, run_in_tract, synthetic_inputs};
    use onnx_compress::onnx::proto::{ModelProto, NodeProto};
    use onnx_compress::onnx::tensor;

    /// Run the fixture; bound its mean abs error on the harness inputs; return the result.
    fn run(case: &str, max_mean_abs_err: f64) -> ModelProto {
        let run = run_fixture(&case_path("quantize", case));
        let out = run.after_proto();
        let mut totals: Vec<(f64, usize)> = Vec::new();
        for batch in synthetic_inputs(&run.original, 0, 4) {
            let a = run_in_tract(&run.original, &batch).unwrap();
            let b = run_in_tract(&out, &batch).unwrap();
            let sums = abs_diff_sums(&a, &b).unwrap_or_else(|m| panic!("{case}: {m}"));
            totals.resize(sums.len(), (0.0, 0));
            for (t, s) in totals.iter_mut().zip(sums) {
                t.0 += s.0;
                t.1 += s.1;
            }
        }
        for (k, (sum, n)) in totals.into_iter().enumerate() {
            let e = sum / n.max(1) as f64;
            assert!(
                e <= max_mean_abs_err,
                "{case}: output {k} mean abs error {e} above {max_mean_abs_err}"
            );
        }
        out
    }

    fn nodes(m: &ModelProto) -> &[NodeProto] {
        &m.graph.as_ref().unwrap().node
    }

    /// The node producing `value`.
    fn producer<'a>(m: &'a ModelProto, value: &str) -> &'a NodeProto {
        nodes(m)
            .iter()
            .find(|n| n.output.iter().any(|o| o == value))
            .unwrap_or_else(|| panic!("nothing produces '{value}'"))
    }

    /// The only node of type `op`.
    fn only<'a>(m: &'a ModelProto, op: &str) -> &'a NodeProto {
        let found: Vec<_> = nodes(m).iter().filter(|n| n.op_type() == op).collect();
        assert_eq!(found.len(), 1, "expected exactly one {op}");
        found[0]
    }

    fn init<'a>(m: &'a ModelProto, name: &str) -> &'a onnx_compress::onnx::proto::TensorProto {
        m.graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("no initializer '{name}'"))
    }

    fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
        n.attribute.iter().find(|a| a.name() == name).map(|a| a.i())
    }

    /// Input `k` of `n` is produced by a DequantizeLinear; return it.
    fn dq_input<'a>(m: &'a ModelProto, n: &NodeProto, k: usize) -> &'a NodeProto {
        let p = producer(m, &n.input[k]);
        assert_eq!(
            p.op_type(),
            "DequantizeLinear",
            "input {k} '{}' of {} '{}' is not dequantized",
            n.input[k],
            n.op_type(),
            n.name()
        );
        p
    }

    /// (scale, zero point) of the QuantizeLinear quantizing `value`'s float producer output,
    /// found through the DequantizeLinear that now produces `value`.
    fn act_params(m: &ModelProto, value: &str) -> (Vec<f64>, Vec<f64>) {
        let dq = producer(m, value);
        assert_eq!(
            dq.op_type(),
            "DequantizeLinear",
            "'{value}' is not dequantized"
        );
        let q = producer(m, &dq.input[0]);
        assert_eq!(q.op_type(), "QuantizeLinear");
        let vals = |name: &str| {
            tensor::to_f64(init(m, name))
                .unwrap()
                .iter()
                .copied()
                .collect()
        };
        (vals(&q.input[1]), vals(&q.input[2]))
    }

    /// The weight DequantizeLinear feeding input `k` of `n`: int8 data, `channels` scales, axis.
    fn check_weight(m: &ModelProto, n: &NodeProto, k: usize, channels: usize, axis: i64) {
        let dq = dq_input(m, n, k);
        let data = init(m, &dq.input[0]);
        assert_eq!(
            tensor::data_type(data).unwrap(),
            onnx_compress::onnx::proto::tensor_proto::DataType::Int8
        );
        let scale = init(m, &dq.input[1]);
        assert_eq!(tensor::shape(scale).unwrap(), [channels]);
        assert_eq!(
            attr_i(dq, "axis"),
            Some(axis),
            "weight axis of '{}'",
            n.name()
        );
    }

    fn check_int32_bias(m: &ModelProto, n: &NodeProto, k: usize) {
        let dq = dq_input(m, n, k);
        assert_eq!(
            tensor::data_type(init(m, &dq.input[0])).unwrap(),
            onnx_compress::onnx::proto::tensor_proto::DataType::Int32
        );
        assert_eq!(
            dq.input.len(),
            2,
            "no zero point: 0 by definition for int32 bias"
        );
    }

    #[test]
    fn conv_relu() {
        let m = run("conv_relu", 0.01);
        let relu = only(&m, "Relu");
        assert_eq!(producer(&m, &relu.input[0]).op_type(), "Conv");
        let conv = only(&m, "Conv");
        dq_input(&m, conv, 0);
        check_weight(&m, conv, 1, 3, 0);
        check_int32_bias(&m, conv, 2);
        // Observed after the Relu: a non-negative range, zero point 0.
        assert_eq!(act_params(&m, "y").1, [0.0]);
    }

    #[test]
    fn conv_clip6() {
        let m = run("conv_clip6", 0.02);
        let clip = only(&m, "Clip");
        assert_eq!(producer(&m, &clip.input[0]).op_type(), "Conv");
        let bound = |k: usize| tensor::to_f64(init(&m, &clip.input[k])).unwrap()[[]];
        assert_eq!((bound(1), bound(2)), (0.0, 6.0));
        check_weight(&m, only(&m, "Conv"), 1, 3, 0);
        assert_eq!(act_params(&m, "y").1, [0.0]);
    }

    #[test]
    fn residual_add() {
        let m = run("residual_add", 0.05);
        let add = only(&m, "Add");
        dq_input(&m, add, 0);
        dq_input(&m, add, 1);
        // r has two readers but one Q/DQ pair: conv2 and the Add read the same DequantizeLinear.
        let conv2 = nodes(&m).iter().find(|n| n.name() == "conv2").unwrap();
        assert_eq!(conv2.input[0], add.input[0]);
        assert_eq!(
            producer(&m, "h").op_type(),
            "Conv",
            "conv1 feeds its Relu directly"
        );
    }

    #[test]
    fn concat_shared_scale() {
        let m = run("concat_shared_scale", 0.05);
        let concat = only(&m, "Concat");
        let (a, b, y) = (
            act_params(&m, &concat.input[0]),
            act_params(&m, &concat.input[1]),
            act_params(&m, "y"),
        );
        assert_eq!(a, y, "Concat input a and output share scale / zero point");
        assert_eq!(b, y, "Concat input b and output share scale / zero point");
        // The two branches have different ranges (wb is 3x larger): the shared grid is their union,
        // which is not the same as x's.
        let conv_a = nodes(&m).iter().find(|n| n.name() == "conv_a").unwrap();
        assert_ne!(act_params(&m, &conv_a.input[0]).0, y.0);
    }

    #[test]
    fn concat_relu_and_signed() {
        let m = run("concat_relu_and_signed", 0.05);
        let concat = only(&m, "Concat");
        let (a, b, y) = (
            act_params(&m, &concat.input[0]),
            act_params(&m, &concat.input[1]),
            act_params(&m, "y"),
        );
        assert_eq!(a.1, [0.0], "the fused Relu output keeps zero point 0");
        assert_ne!(
            a, y,
            "the Relu branch does not take the Concat's signed grid"
        );
        assert_eq!(b, y, "the signed branch and the output share one grid");
        assert!(
            y.1[0] > 0.0,
            "the shared grid is signed (zero point above 0)"
        );
        let relu = only(&m, "Relu");
        assert_eq!(producer(&m, &relu.input[0]).op_type(), "Conv");
    }

    #[test]
    fn maxpool_reshape_passthrough() {
        let m = run("maxpool_reshape_passthrough", 0.05);
        let r = act_params(&m, "r");
        assert_eq!(
            act_params(&m, "p"),
            r,
            "MaxPool output shares its input's grid"
        );
        assert_eq!(
            act_params(&m, "f"),
            r,
            "Reshape output shares its input's grid"
        );
        assert_ne!(act_params(&m, "y"), r, "the Gemm output has its own range");
        check_weight(&m, only(&m, "Gemm"), 1, 3, 0);
    }

    #[test]
    fn gemm_transb1() {
        let m = run("gemm_transb1", 0.15);
        let gemm = only(&m, "Gemm");
        check_weight(&m, gemm, 1, 3, 0);
        check_int32_bias(&m, gemm, 2);
    }

    #[test]
    fn gemm_transb0() {
        let m = run("gemm_transb0", 0.05);
        let gemm = only(&m, "Gemm");
        check_weight(&m, gemm, 1, 3, 1);
        check_int32_bias(&m, gemm, 2);
    }

    #[test]
    fn matmul_dynamic() {
        let m = run("matmul_dynamic", 0.2);
        let mm = only(&m, "MatMul");
        // Both inputs are graph inputs: the readers are rewired to the inputs' DequantizeLinear.
        for (k, input) in ["a", "b"].into_iter().enumerate() {
            let dq = dq_input(&m, mm, k);
            let q = producer(&m, &dq.input[0]);
            assert_eq!(
                (q.op_type(), q.input[0].as_str()),
                ("QuantizeLinear", input)
            );
        }
        act_params(&m, "y");
    }

    #[test]
    fn softmax_float() {
        let m = run("softmax_float", 0.05);
        let softmax = only(&m, "Softmax");
        dq_input(&m, softmax, 0);
        assert_eq!(softmax.output[0], "y", "Softmax's output is not quantized");
    }

    #[test]
    fn conv_bn_relu_pipeline() {
        let m = run("conv_bn_relu_pipeline", 0.01);
        let relu = only(&m, "Relu");
        assert_eq!(producer(&m, &relu.input[0]).op_type(), "Conv");
        let conv = only(&m, "Conv");
        check_weight(&m, conv, 1, 3, 0);
        check_int32_bias(&m, conv, 2);
        let inits = &m.graph.as_ref().unwrap().initializer;
        assert!(
            inits.iter().all(|t| !t.name().starts_with("bn_")),
            "BN parameters are gone"
        );
    }
}

/// Calibration batches of one sample each: `quiet` of them at amplitude 1e-3, the others at 1.
fn loud_and_quiet_calibration(m: &Model, quiet: usize) -> CalibrationSet {
    let n = 20;
    let x = ArrayD::<f32>::from_shape_fn(ndarray::IxDyn(&[n, 3, 8, 8]), |ix| {
        let amp = if ix[0] < quiet { 1e-3 } else { 1.0 };
        amp * ((ix[1] * 64 + ix[2] * 8 + ix[3] + 7 * ix[0]) as f32).sin()
    });
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("calib.npy");
    ndarray_npy::write_npy(&p, &x).unwrap();
    let opts = DataOptions {
        batch_size: 1,
        ..Default::default()
    };
    CalibrationSet::load(&p, m, &opts).unwrap()
}

#[test]
fn an_activation_too_coarse_for_the_quiet_batches_stays_float() {
    // Intent: a tenth or more of the batches 60 dB below the rest (silence between speech):
    // the input's int8 step is larger than those batches' values, so x keeps no Q/DQ pair, the
    // Conv keeps its int8 weight and a float bias, and the report names x. With every batch
    // loud, x is quantized as before.
    let m = conv_relu_model(false);
    let calib = loud_and_quiet_calibration(&m, 3);
    let mut q = m.clone();
    let stats = quantize(&mut q, &QuantizeOptions::default(), Some(&calib)).unwrap();
    q.graph.check().unwrap();
    let conv = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "Conv")
        .unwrap();
    assert_eq!(conv.input[0], "x", "x should stay float");
    assert_eq!(
        producer(&q, &conv.input[1]).unwrap().op_type(),
        "DequantizeLinear"
    );
    assert!(
        producer(&q, &conv.input[2]).is_none(),
        "bias stays a float initializer"
    );
    let quiet = stats.details["kept_float_quiet"].as_array().unwrap();
    assert!(quiet.iter().any(|t| t["tensor"] == "x"), "{quiet:?}");
    let db = quiet[0]["quiet_sqnr_db"].as_f64().unwrap();
    // Step 2/255 against values of rms 7e-4: 10 log10(5e-7 / (s^2/12)) is about -10 dB.
    assert!(db < 0.0 && db > -20.0, "{db}");
    assert!(stats
        .notes
        .iter()
        .any(|n| n.contains("kept float") && n.contains("'x'")));

    let calib = loud_and_quiet_calibration(&m, 0);
    let mut q = m.clone();
    let stats = quantize(&mut q, &QuantizeOptions::default(), Some(&calib)).unwrap();
    let conv = nodes(&q)
        .into_iter()
        .find(|n| n.op_type() == "Conv")
        .unwrap();
    assert!(is_qdq(&q, &conv.input[0]), "x should be quantized");
    assert_eq!(
        stats.details["kept_float_quiet"].as_array().unwrap().len(),
        0
    );
}
