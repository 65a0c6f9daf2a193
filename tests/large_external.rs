//! Large models with external data (issue 17): the payloads are views of the mapped input
//! file, never materialized twice. A 96 MB model is copied through the CLI (`--passes none
//! --no-validate`) and the tool's own peak resident memory (the report's `timings`, Linux
//! VmHWM) must stay below 1.4x the model's bytes: one private copy of the weights would put
//! it above 2x. The output's tensors must equal the input's.

mod common;
use common::builder::Builder;
use onnx_compress::onnx::{load, save};
use std::process::Command;

#[test]
fn external_data_copy_never_holds_the_weights_twice() {
    let d = tempfile::tempdir().unwrap();
    let k = 4896; // 4896^2 float32 = 96 MB
    let mut b = Builder::new(17);
    b.input("x", &[1, k as i64]).output("y", &[1, k as i64]);
    b.randn("w", &[k, k], 0.01);
    b.node("MatMul", "mm", &["x", "w"], &["y"], vec![]);
    let input = d.path().join("big.onnx");
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
    let model_bytes = std::fs::metadata(&input).unwrap().len()
        + std::fs::metadata(d.path().join("big.onnx.data"))
            .unwrap()
            .len();
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
