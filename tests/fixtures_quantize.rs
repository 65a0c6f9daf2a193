//! `.onnxtxt` fixtures for the `quantize` pass (`tests/fixtures/quantize/<case>.onnxtxt`): QDQ
//! placement per op rule, run through the shared harness (consistent graph, header
//! expectations, idempotence, tract within the header's tolerance) with a before/after
//! snapshot in `tests/fixtures/quantize/snapshots`. Each test also checks the structure the
//! header's intent states (what reads what, weight axes, shared scales) on the output model,
//! and bounds the mean abs error (the max is dominated by calibration tail clipping).

mod common;

use common::fixtures::{check_fixture, read_fixture};
use onnx_compress::ir::Model;
use onnx_compress::onnx::tensor;
use onnx_compress::onnx::proto::{ModelProto, NodeProto};
use onnx_compress::onnx::text::parse_model;
use onnx_compress::passes::{run_passes, select, PassContext};
use onnx_compress::validate::{validate, ValidateOptions};
use std::path::PathBuf;

fn path(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/quantize/{case}.onnxtxt"))
}

/// Run the harness and snapshot; return the quantized model for structural checks.
fn run(case: &str, max_mean_abs_err: f64) -> ModelProto {
    let ctx = PassContext::default();
    let snap = check_fixture(&path(case), &ctx);
    insta::with_settings!({snapshot_path => "fixtures/quantize/snapshots"}, {
        insta::assert_snapshot!(case, snap);
    });
    let fx = read_fixture(&path(case));
    let original = parse_model(&fx.text).unwrap();
    let mut model = Model::from_proto(original.clone()).unwrap();
    run_passes(&mut model, &select(&fx.passes).unwrap(), &ctx).unwrap();
    let out = model.to_proto().unwrap();
    let report = validate(&original, &out, &ValidateOptions::default()).unwrap();
    for o in &report.outputs {
        assert!(
            o.mean_abs_err <= max_mean_abs_err,
            "{case}: output '{}' mean abs error {} above {max_mean_abs_err}",
            o.name,
            o.mean_abs_err
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
