//! Non-finite weights: a NaN or inf in a float initializer makes every output non-finite
//! already. The default refuses, naming the tensor and the counts; `--allow-nonfinite` goes
//! on, keeps the nodes reading such tensors float (quantize and mixed precision alike) and
//! names them in the report.

mod common;
use common::*;
use onnx_compress::onnx::proto::{tensor_proto::DataType, ModelProto};
use onnx_compress::onnx::tensor;
use prost::Message;

/// x[1,3,8,8] -> Conv a (finite) -> Relu -> Conv b (weight with `nan` NaNs and `inf` infs) -> y
fn poisoned(nan: usize, inf: usize) -> ModelProto {
    let mut wb = f32_tensor("wb", &[4, 4, 1, 1], 2);
    let mut values = tensor::to_f32(&wb).unwrap();
    for (k, v) in values.iter_mut().enumerate().take(nan + inf) {
        *v = if k < nan { f32::NAN } else { f32::NEG_INFINITY };
    }
    wb = tensor::from_f32("wb", &values);
    model(
        vec![
            node("Conv", "a", &["x", "wa"], &["ya"]),
            node("Relu", "relu", &["ya"], &["r"]),
            node("Conv", "b", &["r", "wb"], &["y"]),
        ],
        vec![value_info("x", &[1, 3, 8, 8])],
        vec![value_info("y", &[1, 4, 8, 8])],
        vec![f32_tensor("wa", &[4, 3, 1, 1], 1), wb],
    )
}

#[test]
fn nonfinite_weights_are_refused_by_default_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", &poisoned(3, 1));
    let out = dir.path().join("out.onnx");
    let (code, _, err) = run(&[input.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for needle in [
        "initializer 'wb' has 3 NaN and 1 inf values",
        "--allow-nonfinite",
    ] {
        assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
    }
    assert!(!out.exists());
    // Even a plain round trip: the refusal is about the model, not about a pass.
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "none",
    ]);
    assert_eq!(code, 1, "{err}");
}

/// Run with `--allow-nonfinite` and `extra`; the output and the JSON report.
fn allowed(extra: &[&str]) -> (ModelProto, serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", &poisoned(1, 0));
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let mut args = vec![
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--allow-nonfinite",
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let proto = ModelProto::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    onnx_compress::ir::Model::from_proto(proto.clone()).expect("the output loads");
    let report = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (proto, report, stdout)
}

fn initializer_type(m: &ModelProto, name: &str) -> Option<DataType> {
    let t = m
        .graph
        .as_ref()?
        .initializer
        .iter()
        .find(|t| t.name() == name)?;
    tensor::data_type(t).ok()
}

/// Whether some DequantizeLinear produces the input `slot` of node `name`.
fn dequantized_input(m: &ModelProto, name: &str, slot: usize) -> bool {
    let g = m.graph.as_ref().unwrap();
    let node = g.node.iter().find(|n| n.name() == name).unwrap();
    let value = &node.input[slot];
    g.node
        .iter()
        .any(|n| n.op_type() == "DequantizeLinear" && n.output.contains(value))
}

#[test]
fn allow_nonfinite_keeps_the_poisoned_layer_float_and_quantizes_the_rest() {
    let (m, report, stdout) = allowed(&[]);
    assert_eq!(initializer_type(&m, "wb"), Some(DataType::Float));
    // Its weight is not quantized (its input may be: it is 'a's quantized output).
    assert!(!dequantized_input(&m, "b", 1));
    // The finite layer is still quantized.
    assert!(
        dequantized_input(&m, "a", 1),
        "conv 'a' weight not quantized"
    );
    assert_eq!(
        report["nonfinite_initializers"],
        serde_json::json!([{"tensor": "wb", "nan": 1, "inf": 0}])
    );
    assert!(
        stdout.contains("initializer 'wb' has 1 NaN value"),
        "{stdout}"
    );
}

/// Mixed precision measures each layer through the model's outputs, which the poisoned
/// weight makes NaN: the run says so up front instead of failing inside the Hessian estimate.
#[test]
fn allow_nonfinite_refuses_mixed_precision_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", &poisoned(1, 0));
    let out = dir.path().join("out.onnx");
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--allow-nonfinite",
        "--avg-bits",
        "6",
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for needle in ["mixed precision", "initializer 'wb'", "--avg-bits"] {
        assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
    }
    assert!(!out.exists());
}

#[test]
fn finite_models_report_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", &conv_relu());
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(report.get("nonfinite_initializers").is_none(), "{report}");
}
