//! Validation sees NaN/inf: an int8 output that turns a few finite values into -inf fails the
//! gate and the summary names them; the gate's advice for an unnamed node, passed back, works.
//!
//! The model: x[N,1,4,4] -> Conv 1x1 (weight 1, unnamed) -> Log (unnamed) -> y. Inputs are
//! mostly 1..3 with a few values near 1e-3: uint8 activations at a step of ~3/255 round those
//! to exactly 0, and log(0) = -inf where fp32 gives log(1e-3) ≈ -6.9.

mod common;
use common::*;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::WriteNpyExt;
use onnx_compress::onnx::tensor;
use std::path::Path;

fn log_model() -> onnx_compress::onnx::proto::ModelProto {
    let w = tensor::from_f32("w", &ArrayD::from_elem(IxDyn(&[1, 1, 1, 1]), 1.0f32));
    let b = tensor::from_f32("b", &ArrayD::from_elem(IxDyn(&[1]), 0.0f32));
    model(
        vec![
            node("Conv", "", &["x", "w", "b"], &["c"]),
            node("Log", "", &["c"], &["y"]),
        ],
        vec![value_info("x", &[8, 1, 4, 4])],
        vec![value_info("y", &[8, 1, 4, 4])],
        vec![w, b],
    )
}

/// 8 samples of 16 values in 1..3, with 2 values per sample near 1e-3.
fn inputs(seed: u32) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
    let mut v: Vec<f32> = (0..8 * 16)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            1.0 + 2.0 * (s as f32 / u32::MAX as f32)
        })
        .collect();
    for k in 0..8 {
        v[k * 16 + 3] = 1e-3;
        v[k * 16 + 11] = 2e-3;
    }
    ArrayD::from_shape_vec(IxDyn(&[8, 1, 4, 4]), v).unwrap()
}

fn write_npy(path: &Path, a: &ArrayD<f32>) {
    a.write_npy(std::fs::File::create(path).unwrap()).unwrap();
}

#[test]
fn nonfinite_values_fail_the_gate_and_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "log.onnx", &log_model());
    let (calib, eval) = (dir.path().join("calib.npy"), dir.path().join("eval.npy"));
    write_npy(&calib, &inputs(1));
    write_npy(&eval, &inputs(2));
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let args = [
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--eval",
        eval.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    // Without a bound the run succeeds but says FAILED and names the values.
    let (code, stdout, _) = run(&args);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("NON-FINITE 16 of 128"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["validation"]["status"], "failed");
    assert_eq!(r["validation"]["outputs"][0]["nonfinite_mismatches"], 16);
    assert_eq!(r["validation"]["outputs"][0]["compared"], 112);

    // With --min-sqnr 20 the gate fails on the non-finite values, although the SQNR over the
    // finite elements is above 20 dB.
    let sqnr_finite = r["validation"]["outputs"][0]["sqnr_db"].as_f64().unwrap();
    assert!(sqnr_finite > 20.0, "{sqnr_finite}");
    let mut gated: Vec<&str> = args.to_vec();
    gated.extend(["--min-sqnr", "20"]);
    let (code, stdout, stderr) = run(&gated);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("non-finite"), "{stderr}");
    assert!(stdout.contains("gate   FAILED"), "{stdout}");

    // The advice names the unnamed Conv by its output tensor, and passing it back passes.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let advice = &r["gate"]["with_advice"];
    assert_eq!(advice["passed"], true, "{}", r["gate"]);
    let excluded: Vec<&str> = advice["exclude_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(excluded, ["c"], "{}", r["gate"]);
    assert!(!stdout.contains("--exclude-node ''"), "{stdout}");
    let mut again = gated.clone();
    for e in &excluded {
        again.extend(["--exclude-node", e]);
    }
    let (code, stdout, stderr) = run(&again);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("gate   passed"), "{stdout}");
}

#[test]
fn an_all_nan_candidate_never_scores_as_identical() {
    use onnx_compress::validate::{validate, Status, ValidateOptions};
    // The candidate adds NaN to every output value.
    let original = log_model();
    let mut candidate = original.clone();
    let g = candidate.graph.as_mut().unwrap();
    g.node[1].output[0] = "l".into();
    g.node.push(node("Add", "nan", &["l", "nan_c"], &["y"]));
    g.initializer.push(tensor::from_f32(
        "nan_c",
        &ArrayD::from_elem(IxDyn(&[1]), f32::NAN),
    ));
    let opts = ValidateOptions {
        inputs: Some(vec![vec![(
            "x".into(),
            inputs(3).mapv(|v| v.max(0.5)).into(),
        )]]),
        ..Default::default()
    };
    let r = validate(&original, &candidate, &opts).unwrap();
    assert_eq!(r.status, Status::Failed, "{r:?}");
    let o = &r.outputs[0];
    assert_eq!(
        (o.nonfinite_mismatches, o.compared, o.elements),
        (128, 0, 128)
    );
    assert!(o.sqnr_db.is_nan() && o.cosine.is_nan(), "{o:?}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["outputs"][0]["sqnr_db"], serde_json::Value::Null);
}
