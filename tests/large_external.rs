//! Large models with external data (issue 17): the payloads are views of the mapped input
//! file, never materialized twice. A 96 MB model is copied through the CLI (`--passes none
//! --no-validate`) and the tool's own peak resident memory (the report's `timings`, Linux
//! VmHWM) must stay below 1.4x the model's bytes: one private copy of the weights would put
//! it above 2x. The output's tensors must equal the input's.
//!
//! A 303 MB model (above the size where validation runs one model at a time) goes through the
//! default int8 run with calibration and validation: peak RSS below 2x its bytes (issue 17's
//! bar). Each of these held the whole model once more and put it above 2x: encoding the weights
//! to compare them in `cleanup`, mapped pages left resident beside tract's copy, and our float
//! copy of the dequantized weights beside tract's at validation.

mod common;
use common::builder::Builder;
use onnx_compress::onnx::{load, save};
use std::process::Command;

/// `b` saved as `dir/big.onnx` with its weights in `big.onnx.data`; the path and the bytes of
/// both files.
fn save_external(b: Builder, dir: &std::path::Path) -> (std::path::PathBuf, u64) {
    let input = dir.join("big.onnx");
    save::save_proto(
        b.proto(),
        &input,
        &save::SaveOptions {
            external_data: true,
            ..Default::default()
        },
    )
    .unwrap();
    drop(b);
    let bytes = std::fs::metadata(&input).unwrap().len()
        + std::fs::metadata(dir.join("big.onnx.data")).unwrap().len();
    (input, bytes)
}

#[test]
fn external_data_copy_never_holds_the_weights_twice() {
    let d = tempfile::tempdir().unwrap();
    let k = 4896; // 4896^2 float32 = 96 MB
    let mut b = Builder::new(17);
    b.input("x", &[1, k as i64]).output("y", &[1, k as i64]);
    b.randn("w", &[k, k], 0.01);
    b.node("MatMul", "mm", &["x", "w"], &["y"], vec![]);
    let (input, model_bytes) = save_external(b, d.path());
    assert!(model_bytes > 90_000_000);

    let output = d.path().join("out.onnx");
    let report = d.path().join("r.json");
    let run = Command::new(env!("CARGO_BIN_EXE_onnx-compress"))
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--passes", "none", "--no-validate", "-q", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let phases = r["timings"].as_array().expect("timings in the report");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "load",
            "preflight",
            "data",
            "passes",
            "save",
            "validate",
            "gate",
            "report"
        ]
    );
    let peak = phases.last().unwrap()["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        (peak as f64) < 1.4 * model_bytes as f64,
        "peak RSS {peak} bytes for a {model_bytes}-byte model: a payload was copied"
    );
    assert_eq!(
        r["input"]["file_bytes"].as_u64().unwrap(),
        model_bytes,
        "the input side counts the external data"
    );

    let (a, _) = load::read_model(&input).unwrap();
    let (b, info) = load::read_model(&output).unwrap();
    assert!(
        info.had_external_data,
        "the output keeps the external layout"
    );
    assert!(a == b, "the copy holds the same model");
}

#[test]
fn external_data_int8_run_stays_below_twice_the_model() {
    let d = tempfile::tempdir().unwrap();
    let k = 4352; // 4 x 4352^2 float32 = 303 MB, above the one-model-at-a-time size
    let mut b = Builder::new(17);
    b.input("x", &[-1, k as i64]).output("y", &[-1, k as i64]);
    let mut prev = "x".to_string();
    for i in 0..4 {
        b.randn(&format!("w{i}"), &[k, k], 0.03);
        let out = if i == 3 {
            "y".to_string()
        } else {
            format!("r{i}")
        };
        let mm = format!("m{i}");
        b.node(
            "MatMul",
            &format!("mm{i}"),
            &[&prev, &format!("w{i}")],
            &[&mm],
            vec![],
        );
        b.node("Relu", &format!("relu{i}"), &[&mm], &[&out], vec![]);
        prev = out;
    }
    let (input, model_bytes) = save_external(b, d.path());
    assert!(model_bytes > 300_000_000);
    let calib = d.path().join("calib.npy");
    let x = ndarray::Array2::from_shape_fn((8, k), |(i, j)| ((i * 31 + j * 7) % 17) as f32 - 8.0);
    ndarray_npy::write_npy(&calib, &x).unwrap();

    let output = d.path().join("out.onnx");
    let report = d.path().join("r.json");
    let run = Command::new(env!("CARGO_BIN_EXE_onnx-compress"))
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("--calib")
        .arg(&calib)
        .args(["-q", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["validation"]["status"], "checked", "{}", r["validation"]);
    let phases = r["timings"].as_array().expect("timings in the report");
    let peak = phases.last().unwrap()["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        (peak as f64) < 2.0 * model_bytes as f64,
        "peak RSS {peak} bytes for a {model_bytes}-byte model: more than twice the model"
    );
    let out_bytes = std::fs::metadata(&output).unwrap().len()
        + std::fs::metadata(d.path().join("out.onnx.data")).map_or(0, |m| m.len());
    assert!(
        (out_bytes as f64) < 0.3 * model_bytes as f64,
        "int8 output is {out_bytes} bytes"
    );
}
