//! Helpers shared by the integration tests: small model builders, the fixture harness
//! ([`fixtures`]), NaN-aware output comparison ([`compare`]), Python interop gating
//! ([`python`]), structure-aware model mutations for fuzzing ([`mutate`]), testdata paths and the
//! built binary.
#![allow(dead_code)]

use onnx_compress::ir::op;
use onnx_compress::onnx::proto::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use onnx_compress::onnx::tensor;
use prost::Message;
use std::path::{Path, PathBuf};

pub fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
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

pub fn f32_tensor(name: &str, dims: &[usize], seed: u32) -> TensorProto {
    let n: usize = dims.iter().product();
    // Deterministic pseudo-random values in [-1, 1).
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect();
    tensor::from_f32(
        name,
        &ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(dims), values).unwrap(),
    )
}

pub fn node(op_type: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    op::node(op_type, name, inputs, outputs)
}

pub fn model(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        producer_name: Some("onnx-compress-tests".into()),
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: initializers,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// x[1,3,8,8] -> Conv(4x3x3x3, pads 1) -> Relu -> y[1,4,8,8]
pub fn conv_relu() -> ModelProto {
    let mut conv = node("Conv", "conv", &["x", "w", "b"], &["c"]);
    conv.attribute.push(op::attr_ints("pads", &[1, 1, 1, 1]));
    model(
        vec![conv, node("Relu", "relu", &["c"], &["y"])],
        vec![value_info("x", &[1, 3, 8, 8])],
        vec![value_info("y", &[1, 4, 8, 8])],
        vec![f32_tensor("w", &[4, 3, 3, 3], 1), f32_tensor("b", &[4], 2)],
    )
}

pub fn write(dir: &Path, name: &str, m: &ModelProto) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// Every `.onnx` file under `testdata/`.
pub fn testdata_models() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![testdata()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "onnx") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Run the built binary; (exit code, stdout, stderr).
/// Run the CLI. A main-command run that names no `--target` gets `--target generic`: the
/// default `ort` leaves testdata's tiny models float (their int8 regions are too small to pay
/// for their Q/DQ in ONNX Runtime), and these tests are about the int8 placement itself.
/// `run_as_is` runs exactly what it is given (the default-target tests use it).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let main_command = args.iter().any(|a| *a == "-o" || *a == "--output");
    let mut args = args.to_vec();
    if main_command && !args.iter().any(|a| a.starts_with("--target")) {
        args.extend(["--target", "generic"]);
    }
    run_as_is(&args)
}

/// Run the CLI with exactly `args`.
pub fn run_as_is(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-compress"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
pub mod builder;
pub mod compare;
pub mod digits_mp;
pub mod fixtures;
pub mod fuse_builder;
pub mod mutate;
pub mod prune_trial;
pub mod python;
