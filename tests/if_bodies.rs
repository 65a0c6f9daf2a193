//! Activation Q/DQ inside `If` branches (`passes/quantize/bodies.rs`, `--body-activations on`):
//! the branch the calibration data takes gets Q/DQ with the main graph's rules, the other stays
//! float, the output runs in ONNX Runtime, and no added name is defined twice across scopes.
mod common;
use common::*;
use onnx_compress::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, type_proto, AttributeProto, GraphProto,
    ModelProto, TensorProto, TypeProto, ValueInfoProto,
};
use std::path::{Path, PathBuf};

fn typed_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/models")
        .join(name)
}

/// Calibration feeds for a model with inputs `x` [1,3,8,8] and `mode` = 1 (int64 scalar).
fn mode_one_feeds(dir: &Path) -> PathBuf {
    use ndarray::{ArrayD, IxDyn};
    let calib = dir.join("calib");
    std::fs::create_dir(&calib).unwrap();
    for k in 0..6 {
        let f = std::fs::File::create(calib.join(format!("feed_{k}.npz"))).unwrap();
        let mut z = ndarray_npy::NpzWriter::new(f);
        let x = ArrayD::from_shape_fn(IxDyn(&[1, 3, 8, 8]), |i| {
            ((k * 5 + i[1] * 7 + i[2] * 3 + i[3]) % 13) as f32 / 6.0 - 1.0
        });
        z.add_array("x", &x).unwrap();
        z.add_array("mode", &ndarray::arr0(1i64)).unwrap();
        z.finish().unwrap();
    }
    calib
}

fn body<'a>(m: &'a ModelProto, attr: &str) -> &'a GraphProto {
    let g = m.graph.as_ref().unwrap();
    let n = g.node.iter().find(|n| n.op_type() == "If").unwrap();
    n.attribute
        .iter()
        .find(|a| a.name() == attr)
        .unwrap()
        .g
        .as_ref()
        .unwrap()
}

fn ops(g: &GraphProto) -> Vec<&str> {
    g.node.iter().map(|n| n.op_type()).collect()
}

fn producer<'a>(g: &'a GraphProto, v: &str) -> Option<&'a str> {
    g.node
        .iter()
        .find(|n| n.output.iter().any(|o| o == v))
        .map(|n| n.op_type())
}

/// `tests/models/if_weights.onnx`: Conv -> If(mode == 1) { then: Conv(h, Constant Wt) -> Relu;
/// else: Conv(h, We) -> MaxPool }. Calibration has mode = 1 in every feed.
#[test]
fn the_taken_branch_gets_activation_qdq_and_the_other_stays_float() {
    let dir = tempfile::tempdir().unwrap();
    let calib = mode_one_feeds(dir.path());
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let (code, stdout, err) = run(&[
        typed_model("if_weights.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--body-activations",
        "on",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("If bodies, observed on the copy specialized to the calibration data (mode = 1 (int64), x: 1x3x8x8): If 'branch' then_branch: 2 activation Q/DQ pair(s), 1 weight(s), 0 bias(es)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("If 'branch' else_branch: float, no calibration feed takes it"),
        "{stdout}"
    );
    let m = onnx_compress::onnx::load::read_model(&out).unwrap().0;
    let then_b = body(&m, "then_branch");
    let else_b = body(&m, "else_branch");
    // then: Q/DQ of the outer activation h inside the body, the weight's DQ inside the body
    // (from a body initializer), Relu's output through Q/DQ under its own name.
    let conv = then_b.node.iter().find(|n| n.op_type() == "Conv").unwrap();
    assert_eq!(producer(then_b, &conv.input[0]), Some("DequantizeLinear"));
    assert_eq!(producer(then_b, &conv.input[1]), Some("DequantizeLinear"));
    assert_eq!(producer(then_b, "t_out"), Some("DequantizeLinear"));
    assert_eq!(
        ops(then_b)
            .iter()
            .filter(|o| **o == "QuantizeLinear")
            .count(),
        2,
        "{:?}",
        ops(then_b)
    );
    assert!(then_b
        .initializer
        .iter()
        .any(|t| t.data_type() == DataType::Int8 as i32));
    assert!(!ops(then_b).contains(&"Constant"));
    // else: float activations, its weight read from the main graph's DequantizeLinear.
    assert!(
        !ops(else_b).contains(&"QuantizeLinear") && !ops(else_b).contains(&"DequantizeLinear"),
        "{:?}",
        ops(else_b)
    );
    let g = m.graph.as_ref().unwrap();
    assert_eq!(producer(g, "We"), Some("DequantizeLinear"));
    assert_eq!(producer(g, "Wt"), None);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["validation"]["status"], "checked", "{json}");
    let first_note = json["validation"]["notes"][0].as_str().unwrap();
    assert!(
        first_note
            .contains("the copies hold If 'branch' then_branch with 2 activation Q/DQ pair(s)"),
        "{first_note}"
    );
    let quantize = json["passes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "quantize")
        .unwrap();
    let bodies = &quantize["details"]["bodies"]["bodies"];
    assert_eq!(bodies.as_array().unwrap().len(), 2, "{bodies}");

    if common::python::require_python(&["onnx", "onnxruntime", "numpy"], "if_bodies ORT") {
        // The checker accepts it, both branches run in ONNX Runtime near the original's, and the
        // taken branch's Conv runs as an integer kernel (ORT fuses the QDQ unit inside the If).
        let opt = dir.path().join("opt.onnx");
        let script = format!(
            r#"
import numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(r"{out}"), full_check=True)
a = ort.InferenceSession(r"{src}", providers=["CPUExecutionProvider"])
so = ort.SessionOptions()
so.optimized_model_filepath = r"{opt}"
b = ort.InferenceSession(r"{out}", so, providers=["CPUExecutionProvider"])
x = np.load(r"{feed}")["x"]
for mode, shape in ((1, (1, 16, 8, 8)), (0, (1, 16, 4, 4))):
    ya = a.run(None, {{"x": x, "mode": np.array(mode, np.int64)}})[0]
    yb = b.run(None, {{"x": x, "mode": np.array(mode, np.int64)}})[0]
    assert yb.shape == shape, yb.shape
    err = float(np.abs(ya - yb).max() / np.abs(ya).max())
    assert err < 0.1, (mode, err)
m = onnx.load(r"{opt}")
iff = [n for n in m.graph.node if n.op_type == "If"][0]
then = [a.g for a in iff.attribute if a.name == "then_branch"][0]
ops = [n.op_type for n in then.node]
assert "QLinearConv" in ops, ops
print("ok")
"#,
            src = typed_model("if_weights.onnx").display(),
            out = out.display(),
            opt = opt.display(),
            feed = calib.join("feed_3.npz").display()
        );
        let o = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    // By default (--body-activations off) the bodies keep float activations and every weight
    // is stored by weight-only in the main graph, as before this stage existed.
    let off = dir.path().join("off.onnx");
    let (code, stdout, err) = run(&[
        typed_model("if_weights.onnx").to_str().unwrap(),
        "-o",
        off.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("activations inside If/Loop/Scan bodies left float"),
        "{stdout}"
    );
    let m = onnx_compress::onnx::load::read_model(&off).unwrap().0;
    for attr in ["then_branch", "else_branch"] {
        assert!(!ops(body(&m, attr)).contains(&"QuantizeLinear"), "{attr}");
    }
    assert_eq!(
        producer(m.graph.as_ref().unwrap(), "Wt"),
        Some("DequantizeLinear")
    );
}

fn int64_scalar(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Int64 as i32),
                shape: Some(Default::default()),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

fn constant(name: &str, t: TensorProto) -> onnx_compress::onnx::proto::NodeProto {
    let mut n = node("Constant", name, &[], &[t.name()]);
    n.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    });
    n
}

/// A model whose bodies already use the names the quantizers' compact naming would pick
/// (`a0_q`, `w0_s`, ...): main graph Conv -> Relu -> If(mode == 1), then-branch Conv on a
/// Constant weight followed by Identity nodes named and producing such names, else-branch an
/// Identity chain over more of them.
fn clashing_model() -> ModelProto {
    let names = |from: usize, to: usize| -> Vec<String> {
        (from..to)
            .flat_map(|k| {
                ["f", "q", "s", "z", "dq", "Q", "DQ"]
                    .iter()
                    .flat_map(move |p| ['a', 'w', 'b'].map(|c| format!("{c}{k}_{p}")))
            })
            .collect()
    };
    let chain = |start: &str, names: &[String]| {
        let mut nodes = Vec::new();
        let mut prev = start.to_string();
        for n in names {
            nodes.push(node("Identity", &format!("{n}_node"), &[&prev], &[n]));
            prev = n.clone();
        }
        (nodes, prev)
    };
    let mut conv_t = node("Conv", "conv_then", &["h", "Wt"], &["t_conv"]);
    conv_t
        .attribute
        .push(onnx_compress::ir::op::attr_ints("pads", &[1, 1, 1, 1]));
    let mut then_nodes = vec![
        constant("wt_const", f32_tensor("Wt", &[8, 8, 3, 3], 7)),
        conv_t,
        node("Relu", "relu_then", &["t_conv"], &["t_relu"]),
    ];
    let then_names = names(0, 3);
    let (more, t_last) = chain("t_relu", &then_names);
    then_nodes.extend(more);
    let else_names = names(3, 12);
    let (else_nodes, e_last) = chain("h", &else_names);
    let then_g = GraphProto {
        name: Some("then".into()),
        node: then_nodes,
        output: vec![value_info(&t_last, &[1, 8, 8, 8])],
        ..Default::default()
    };
    let else_g = GraphProto {
        name: Some("else".into()),
        node: else_nodes,
        output: vec![value_info(&e_last, &[1, 8, 8, 8])],
        ..Default::default()
    };
    let mut conv0 = node("Conv", "conv0", &["x", "W0", "B0"], &["c0"]);
    conv0
        .attribute
        .push(onnx_compress::ir::op::attr_ints("pads", &[1, 1, 1, 1]));
    let mut iff = node("If", "branch", &["cond"], &["y"]);
    iff.attribute.push(graph_attr("then_branch", then_g));
    iff.attribute.push(graph_attr("else_branch", else_g));
    let one = onnx_compress::onnx::tensor::from_i64("one", &[], &[1]);
    model(
        vec![
            conv0,
            node("Relu", "relu0", &["c0"], &["h"]),
            node("Equal", "is_one", &["mode", "one"], &["cond"]),
            iff,
        ],
        vec![value_info("x", &[1, 3, 8, 8]), int64_scalar("mode")],
        vec![value_info("y", &[1, 8, 8, 8])],
        vec![
            f32_tensor("W0", &[8, 3, 3, 3], 3),
            f32_tensor("B0", &[8], 4),
            one,
        ],
    )
}

#[test]
fn added_names_are_unique_across_the_main_graph_and_every_body() {
    let dir = tempfile::tempdir().unwrap();
    let calib = mode_one_feeds(dir.path());
    let src = write(dir.path(), "clash.onnx", &clashing_model());
    let out = dir.path().join("out.onnx");
    let (code, stdout, err) = run(&[
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--body-activations",
        "on",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("If 'branch' then_branch: "),
        "the then-branch was not quantized: {stdout}"
    );
    let m = onnx_compress::ir::Model::load(&out).unwrap();
    // No name is defined twice anywhere (the input had none).
    let defs = onnx_compress::passes::quantize::bodies::definitions(&m.graph);
    let mut twice: Vec<_> = defs.iter().filter(|(_, c)| **c > 1).collect();
    twice.sort();
    assert!(twice.is_empty(), "{twice:?}");
    // The quantizers did add names in both scopes.
    let g = m.to_proto().unwrap().graph.unwrap();
    assert!(g.node.iter().any(|n| n.op_type() == "QuantizeLinear"));
    let iff = g.node.iter().find(|n| n.op_type() == "If").unwrap();
    let then_b = iff.attribute[0].g.as_ref().unwrap();
    assert!(then_b.node.iter().any(|n| n.op_type() == "QuantizeLinear"));
    if common::python::require_python(&["onnx", "onnxruntime", "numpy"], "if_bodies names") {
        let script = format!(
            r#"
import numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(r"{out}"), full_check=True)
s = ort.InferenceSession(r"{out}", providers=["CPUExecutionProvider"])
x = np.load(r"{feed}")["x"]
for mode in (0, 1):
    s.run(None, {{"x": x, "mode": np.array(mode, np.int64)}})
print("ok")
"#,
            out = out.display(),
            feed = calib.join("feed_0.npz").display()
        );
        let o = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}
