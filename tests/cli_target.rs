//! `--target` and the `weight-only` pass end to end: what the output holds, that tract loads it
//! as written, its size, and the latency the report carries.

mod common;
use common::*;
use serde_json::Value;

fn compress(model: &str, extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("report.json");
    let src = testdata().join(model);
    let mut args = vec![
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{model} {extra:?}: {err}");
    let json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (dir, out, json, stdout)
}

fn op_types(path: &std::path::Path) -> Vec<String> {
    let (m, _) = onnx_compress::onnx::load::read_model(path).unwrap();
    m.graph
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type().to_string())
        .collect()
}

fn pass<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no '{name}' record"))
}

#[test]
fn target_tract_stores_weights_int8_keeps_activations_float_and_loads_in_tract() {
    let (_dir, out, report, stdout) = compress("digits_deep.onnx", &["--target", "tract"]);
    let ratio = report["size_ratio"].as_f64().unwrap();
    assert!(ratio < 0.30, "output is {:.1}% of the input", 100.0 * ratio);
    let ops = op_types(&out);
    assert!(!ops.iter().any(|o| o == "QuantizeLinear"), "{ops:?}");
    let weights = pass(&report, "weight-only")["details"]["weights"]
        .as_array()
        .unwrap()
        .len();
    // 11 Conv/Gemm layers; the stem's 216 values are below weight-only's 256-value minimum.
    assert_eq!(weights, 10, "every other Conv/Gemm weight of digits_deep");
    assert_eq!(
        ops.iter().filter(|o| *o == "DequantizeLinear").count(),
        weights
    );
    let q = pass(&report, "quantize");
    assert_eq!(q["changes"], 0);
    assert!(q["notes"][0].as_str().unwrap().contains("target tract"));
    // tract loads the file as it is (not only the validator's simulation graph).
    let (proto, _) = onnx_compress::onnx::load::read_model(&out).unwrap();
    onnx_compress::runtime::Runner::new(&proto, &[("input".into(), vec![1, 1, 8, 8])], &[])
        .expect("tract loads the --target tract output as written");
    let v = &report["validation"];
    assert_eq!(v["status"], "checked");
    assert_eq!(v["latency"]["timed"], "output as written");
    assert!(v["latency"]["speedup"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("latency in tract"), "{stdout}");
    for o in v["outputs"].as_array().unwrap() {
        assert!(o["sqnr_db"].as_f64().unwrap() > 25.0, "{o}");
    }
}

#[test]
fn latency_is_timed_only_for_float_activations_unless_asked() {
    // int8 activations: tract runs their Q/DQ in float, so no tract latency, and a note says why.
    let calib = testdata().join("digits_calib_x.npy");
    let calib = calib.to_str().unwrap();
    let int8 = ["--target", "generic", "--calib", calib];
    let (_d, out, report, stdout) = compress("digits_cnn.onnx", &int8);
    assert!(op_types(&out).iter().any(|o| o == "QuantizeLinear"));
    let v = &report["validation"];
    assert_eq!(v["status"], "checked", "{v}");
    assert!(v.get("latency").is_none(), "{v}");
    let notes = v["notes"].to_string();
    assert!(notes.contains("latency not timed"), "{notes}");
    assert!(!stdout.contains("latency in tract"), "{stdout}");
    // --latency times the same output anyway; the output bytes do not depend on it.
    let asked = [&int8[..], &["--latency"]].concat();
    let (_d2, out2, report2, stdout2) = compress("digits_cnn.onnx", &asked);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    let v2 = &report2["validation"];
    assert!(v2["latency"]["speedup"].as_f64().unwrap() > 0.0, "{v2}");
    assert!(!v2["notes"].to_string().contains("latency not timed"));
    assert!(stdout2.contains("latency in tract"), "{stdout2}");
    // Float activations (weight-only int8 for tract) are timed by default.
    let (_d3, _, report3, _) = compress("digits_cnn.onnx", &["--target", "tract"]);
    assert!(
        report3["validation"]["latency"]["speedup"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn default_pipeline_stores_recurrent_weights_int8_and_keeps_state_float() {
    let (_dir, out, report, _) = compress("recurrent.onnx", &[]);
    let details = &pass(&report, "weight-only")["details"];
    let mut nodes: Vec<&str> = details["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            assert_eq!(w["axis"], 1, "per gate row: {w}");
            assert!(w["sqnr_db"].as_f64().unwrap() > 35.0, "{w}");
            w["node"].as_str().unwrap()
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["/gru/GRU", "/gru/GRU", "/lstm/LSTM", "/lstm/LSTM"]);
    // The recurrent ops read their W and R from DequantizeLinear; the state input and output
    // stay float tensors of the graph.
    let (m, _) = onnx_compress::onnx::load::read_model(&out).unwrap();
    let g = m.graph.unwrap();
    let producer = |v: &str| {
        g.node
            .iter()
            .find(|n| n.output.iter().any(|o| o == v))
            .map(|n| n.op_type().to_string())
    };
    for n in g
        .node
        .iter()
        .filter(|n| matches!(n.op_type(), "LSTM" | "GRU"))
    {
        for k in [1, 2] {
            assert_eq!(
                producer(&n.input[k]).as_deref(),
                Some("DequantizeLinear"),
                "{}",
                n.name()
            );
        }
    }
    let float = onnx_compress::onnx::proto::tensor_proto::DataType::Float as i32;
    for v in g.input.iter().chain(&g.output) {
        let elem = match &v.r#type.as_ref().unwrap().value {
            Some(onnx_compress::onnx::proto::type_proto::Value::TensorType(t)) => t.elem_type(),
            _ => panic!("{} is not a tensor", v.name()),
        };
        assert_eq!(elem, float, "{} stays float", v.name());
    }
    assert!(!g
        .node
        .iter()
        .any(|n| n.op_type() == "QuantizeLinear" && n.input[0] == "h0"));
    let v = &report["validation"];
    assert_eq!(v["status"], "checked");
    for o in v["outputs"].as_array().unwrap() {
        assert!(o["sqnr_db"].as_f64().unwrap() > 30.0, "{o}");
    }
}

#[test]
fn weight_only_leaves_what_a_budgeted_mixed_precision_chose() {
    // With a size budget mixed-precision decides every layer's precision (fp32 included):
    // weight-only must not overrule it. features.4 (1024 weights, above weight-only's minimum)
    // is kept fp32 on purpose.
    let (_dir, _out, report, _) = compress(
        "digits_cnn.onnx",
        &[
            "--avg-bits",
            "16",
            "--hessian-samples",
            "4",
            "--keep-fp32",
            ".*features\\.4.*",
        ],
    );
    let wo = pass(&report, "weight-only");
    assert_eq!(wo["changes"], 0, "{wo}");
}

#[test]
fn default_target_is_ort_and_the_report_says_what_it_kept_float() {
    // digits_cnn's layers are far too small for ONNX Runtime's int8 kernels to pay for their
    // Q/DQ: under the default target (ort) every int8 region goes float, and the report lists
    // why.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("report.json");
    let src = testdata().join("digits_cnn.onnx");
    let (code, _, err) = run_as_is(&[
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let target = &pass(&report, "quantize")["details"]["target"];
    assert_eq!(target["name"], "ort", "{target}");
    let kept = target["kept_float"].as_array().unwrap();
    assert!(!kept.is_empty(), "{target}");
    for k in kept {
        assert!(k["region_macs"].as_u64().unwrap() > 0, "{k}");
        assert!(k["why"].as_str().unwrap().contains("target ort"), "{k}");
    }
    assert!(!op_types(&out).iter().any(|o| o == "QuantizeLinear"));
    // The same run under --target generic quantizes.
    let (_d, generic, _, _) = compress("digits_cnn.onnx", &["--target", "generic"]);
    assert!(op_types(&generic).iter().any(|o| o == "QuantizeLinear"));
}

#[test]
fn target_openvino_calibrates_ranges_by_mse_unless_the_user_names_a_method() {
    // Under `openvino` the heavy ops' inputs are quantized without their outputs, and the
    // 99.999th-percentile range cost PP-OCRv4 rec 8 dB there (10.3 vs 18.1 dB by MSE ranges,
    // BENCHMARKS.md "openvino fidelity"): the target's default method is `mse`; an explicit
    // --method or --percentile still wins, and the other targets keep the percentile.
    let calib = testdata().join("digits_calib_x.npy");
    let calib = calib.to_str().unwrap();
    let method = |extra: &[&str]| {
        // No validation: tract is not what this test is about (and its QuantizeLinear overflows
        // in debug builds on some ranges).
        let mut args = vec!["--calib", calib, "--no-validate"];
        args.extend_from_slice(extra);
        let (_d, out, report, _) = compress("digits_vgg.onnx", &args);
        let q = pass(&report, "quantize");
        let int8 = op_types(&out).iter().any(|o| o == "QuantizeLinear");
        (q["details"]["method"].as_str().unwrap().to_string(), int8)
    };
    // fc1 (32768 weights, above the linear floor of openvino) is quantized: the range matters.
    let (m, int8) = method(&["--target", "openvino"]);
    assert_eq!(m, "mse");
    assert!(int8, "openvino quantizes digits_vgg's fc1");
    let method = |extra: &[&str]| method(extra).0;
    assert_eq!(
        method(&["--target", "openvino", "--method", "percentile"]),
        "percentile 99.999"
    );
    assert_eq!(
        method(&["--target", "openvino", "--percentile", "99.9"]),
        "percentile 99.9"
    );
    assert_eq!(method(&["--target", "generic"]), "percentile 99.999");
    assert_eq!(method(&["--target", "ort"]), "percentile 99.999");
}

/// A dynamic-batch CNN whose flatten target is recomputed from `Shape` at every run (torch's
/// `x.view(x.size(0), -1)`), with convs heavy enough to stay int8 under `ort`.
fn dynamic_batch_flatten(dir: &std::path::Path) -> std::path::PathBuf {
    use common::builder::{conv, Builder};
    let mut b = Builder::new(17);
    b.input("x", &[-1, 32, 16, 16])
        .output("y", &[-1, 64 * 16 * 16]);
    conv(&mut b, "c1", "x", "c1", 32, 64, 3);
    b.node("Relu", "r1", &["c1"], &["r1"], vec![]);
    conv(&mut b, "c2", "r1", "c2", 64, 64, 3);
    b.node("Relu", "r2", &["c2"], &["r2"], vec![]);
    b.init_i64("ax", &[0]).init_i64("rest", &[-1]);
    b.inits
        .push(onnx_compress::onnx::tensor::from_i64("i0", &[], &[0]));
    b.node("Shape", "shape", &["r2"], &["s"], vec![]);
    b.node("Gather", "batch", &["s", "i0"], &["n"], vec![]);
    b.node("Unsqueeze", "unsqueeze", &["n", "ax"], &["nu"], vec![]);
    let axis0 = onnx_compress::ir::op::attr_int("axis", 0);
    b.node("Concat", "target", &["nu", "rest"], &["t"], vec![axis0]);
    b.node("Reshape", "flatten", &["r2", "t"], &["y"], vec![]);
    write(dir, "flatten.onnx", &b.proto())
}

#[test]
fn ort_target_makes_a_dynamic_batch_reshape_target_constant() {
    let dir = tempfile::tempdir().unwrap();
    let src = dynamic_batch_flatten(dir.path());
    let out = |target: &str| {
        let out = dir.path().join(format!("{target}.onnx"));
        let (code, _, err) = run(&[
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--target",
            target,
            "--no-validate",
        ]);
        assert_eq!(code, 0, "{target}: {err}");
        out
    };
    let ort = out("ort");
    let ops = op_types(&ort);
    assert!(ops.contains(&"QuantizeLinear".to_string()), "{ops:?}");
    for gone in ["Shape", "Gather", "Unsqueeze", "Concat"] {
        assert!(!ops.contains(&gone.to_string()), "{gone} left: {ops:?}");
    }
    let (m, _) = onnx_compress::onnx::load::read_model(&ort).unwrap();
    let g = m.graph.unwrap();
    let reshape = g.node.iter().find(|n| n.op_type() == "Reshape").unwrap();
    let target = g
        .initializer
        .iter()
        .find(|t| t.name() == reshape.input[1])
        .expect("a constant reshape target");
    // 0 copies the batch, whatever it is at run time.
    assert_eq!(
        onnx_compress::onnx::tensor::to_i64(target).unwrap(),
        [0, -1]
    );
    // generic keeps today's bytes: the shape arithmetic stays.
    assert!(op_types(&out("generic")).contains(&"Shape".to_string()));
}

/// What each target places on two testdata models, as one snapshot per model: the output's op
/// counts and the layers the target kept float, with the rule that kept each. A change to a
/// policy row (`passes/target.rs`) shows up here as a reviewed diff.
fn placement_by_target(model: &str) -> String {
    let mut text = String::new();
    for target in ["generic", "ort", "openvino", "tract"] {
        let (_dir, out, report, _) = compress(model, &["--target", target, "--no-validate"]);
        let mut counts = std::collections::BTreeMap::new();
        for op in op_types(&out) {
            *counts.entry(op).or_insert(0usize) += 1;
        }
        text.push_str(&format!("{target}:\n  ops:"));
        for (op, n) in &counts {
            text.push_str(&format!(" {op} {n},"));
        }
        text.push('\n');
        let kept = report["passes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "quantize")
            .and_then(|p| p["details"]["target"]["kept_float"].as_array().cloned())
            .unwrap_or_default();
        for k in kept {
            text.push_str(&format!(
                "  kept float: {} ({}, {})\n",
                k["node"], k["op"], k["rule"]
            ));
        }
    }
    text
}

#[test]
fn placement_per_target_on_testdata_models() {
    insta::assert_snapshot!(
        "placement_per_target_mobilenet_like",
        placement_by_target("mobilenet_like.onnx")
    );
    insta::assert_snapshot!(
        "placement_per_target_digits_vgg",
        placement_by_target("digits_vgg.onnx")
    );
}
