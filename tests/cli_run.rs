//! The main command end to end: round trip validated in tract, JSON report keys, inspect.

mod common;
use common::*;

#[test]
fn round_trip_of_every_testdata_model_validates_with_zero_error() {
    let dir = tempfile::tempdir().unwrap();
    for model in testdata_models() {
        let out = dir.path().join("out.onnx");
        let report = dir.path().join("report.json");
        let (code, stdout, err) = run(&[
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--passes",
            "none",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{}: {err}", model.display());
        assert!(stdout.contains("validated in tract"), "{stdout}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        for key in [
            "tool",
            "version",
            "input",
            "output",
            "passes",
            "validation",
            "size_ratio",
        ] {
            assert!(json.get(key).is_some(), "report lacks '{key}'");
        }
        let v = &json["validation"];
        assert_eq!(v["status"], "checked", "{}", model.display());
        assert_eq!(v["method"], "direct");
        for o in v["outputs"].as_array().unwrap() {
            assert_eq!(o["max_abs_err"], 0.0, "{}", model.display());
            assert!(
                o["sqnr_db"].is_null(),
                "identical outputs have infinite SQNR"
            );
        }
        let (orig, _) = onnx_compress::onnx::load::read_model(&model).unwrap();
        let (back, _) = onnx_compress::onnx::load::read_model(&out).unwrap();
        assert!(
            orig == back,
            "{}: output differs from input",
            model.display()
        );
    }
}

#[test]
fn inspect_reports_ops_params_and_macs() {
    let m = testdata().join("digits_cnn.onnx");
    let (code, stdout, err) = run(&["inspect", m.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["stats"]["op_histogram"]["BatchNormalization"], 5);
    assert!(json["stats"]["parameters"].as_u64().unwrap() > 1000);
    assert!(json["stats"]["bytes_by_dtype"]["float"].as_u64().unwrap() > 4000);
    assert_eq!(json["inputs"][0]["name"], "input");
    let (code, stdout, _) = run(&["inspect", m.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("Conv") && stdout.contains("MACs"),
        "{stdout}"
    );
}

#[test]
fn help_and_version() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("inspect") && stdout.contains("--passes"),
        "{stdout}"
    );
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("onnx-compress "), "{stdout}");
}
