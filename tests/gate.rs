//! The fidelity gate end to end on the digits CNN: a deliberately damaged quantization fails
//! with named layers, the printed advice makes it pass, a good run passes, bad option
//! combinations fail before any work.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn digits() -> (String, String, String, String) {
    let t = testdata();
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    (
        s(t.join("digits_cnn.onnx")),
        s(t.join("digits_calib_x.npy")),
        s(t.join("digits_test_x.npy")),
        s(t.join("digits_test_y.npy")),
    )
}

/// Runs the main command on digits with calibration and labelled eval data plus `extra`.
fn run_digits(out: &Path, report: &Path, extra: &[&str]) -> (i32, String, String) {
    let (model, calib, x, y) = digits();
    let mut args = vec![
        model.as_str(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.as_str(),
        "--eval",
        x.as_str(),
        "--eval-labels",
        y.as_str(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn one_bad_layer_is_named_and_the_advice_passes() {
    // Min-max ranges from a single calibration sample: the logits' range is far too narrow,
    // so the final Gemm's output is clipped (SQNR ~11 dB) while every conv stays above 30 dB.
    let dir = tempfile::tempdir().unwrap();
    let (out, rep) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    // Equalization on: it keeps every conv far above the bound, so the Gemm is the only culprit.
    let bad = [
        "--method",
        "minmax",
        "--calib-samples",
        "1",
        "--min-sqnr",
        "20",
        "--equalize",
        "always",
    ];
    let (code, stdout, err) = run_digits(&out, &rep, &bad);
    assert_ne!(code, 0, "{stdout}");
    assert!(err.contains("fidelity gate failed"), "{err}");
    assert!(err.contains("below --min-sqnr 20"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert!(stdout.contains("gate   FAILED"), "{stdout}");
    assert!(
        stdout.contains("keep float: --exclude-node '/fc/Gemm'"),
        "{stdout}"
    );
    assert!(
        out.exists(),
        "the output is written by default even when the gate fails"
    );
    let g = &read_json(&rep)["gate"];
    assert_eq!(g["passed"], false);
    assert_eq!(g["misses"][0]["bound"], "--min-sqnr");
    assert!(g["misses"][0]["actual"].as_f64().unwrap() < 20.0);
    let blame = g["blame"].as_array().unwrap();
    assert!(blame.len() >= 3, "{g}");
    assert_eq!(blame[0]["node"], "/fc/Gemm");
    assert!(blame[0]["sqnr_db_alone"].as_f64().unwrap() < 20.0);
    assert!(blame[1]["sqnr_db_alone"].as_f64().unwrap() > 20.0);
    assert_eq!(g["with_advice"]["passed"], true);
    assert_eq!(
        g["with_advice"]["exclude_nodes"],
        serde_json::json!(["/fc/Gemm"])
    );

    // Applying the advice passes the gate with the same damaged settings.
    let mut fixed = bad.to_vec();
    fixed.extend(["--exclude-node", "/fc/Gemm"]);
    let (code, stdout, err) = run_digits(&out, &rep, &fixed);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("gate   passed"), "{stdout}");
    let v = read_json(&rep);
    assert_eq!(v["gate"]["passed"], true);
    assert!(v["validation"]["outputs"][0]["sqnr_db"].as_f64().unwrap() >= 20.0);
}

#[test]
fn over_compressed_fails_on_accuracy_and_no_write_on_fail_leaves_nothing() {
    // Ranges at the 90th percentile clip every activation: accuracy falls by ~58 points.
    let dir = tempfile::tempdir().unwrap();
    let (out, rep) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    let bad = [
        "--percentile",
        "90",
        "--per-tensor",
        "--max-drop",
        "2",
        "--min-agreement",
        "0.95",
        "--no-write-on-fail",
    ];
    let (code, stdout, err) = run_digits(&out, &rep, &bad);
    assert_ne!(code, 0, "{stdout}");
    assert!(err.contains("over --max-drop 2"), "{err}");
    assert!(err.contains("below --min-agreement 0.95"), "{err}");
    assert!(err.contains("not written (--no-write-on-fail)"), "{err}");
    assert!(!out.exists(), "--no-write-on-fail must leave no output");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "r.json")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let g = &read_json(&rep)["gate"];
    assert_eq!(g["passed"], false);
    let blame = g["blame"].as_array().unwrap();
    assert!(blame.len() >= 3);
    for b in blame {
        let advice = b["advice"].as_str().unwrap();
        assert!(advice.starts_with("--exclude-node '"), "{advice}");
        assert!(stdout.contains(advice), "{stdout}");
    }
    // The ranking puts the layer that hurts most alone first.
    let drops: Vec<f64> = blame
        .iter()
        .map(|b| b["drop_points_alone"].as_f64().unwrap())
        .collect();
    assert!(drops.windows(2).all(|w| w[0] >= w[1]), "{drops:?}");
    assert!(drops[0] > 2.0, "{drops:?}");

    // The advice the gate checked, applied by hand, passes and writes the output.
    let advice = &g["with_advice"];
    assert_eq!(advice["passed"], true, "{g}");
    let mut fixed: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
    for n in advice["exclude_nodes"].as_array().unwrap() {
        fixed.push("--exclude-node".into());
        fixed.push(n.as_str().unwrap().into());
    }
    let fixed: Vec<&str> = fixed.iter().map(String::as_str).collect();
    let (code, stdout, err) = run_digits(&out, &rep, &fixed);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(out.exists());
}

#[test]
fn good_quantization_passes_every_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rep) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    let (code, stdout, err) = run_digits(
        &out,
        &rep,
        &[
            "--max-drop",
            "1",
            "--min-sqnr",
            "20",
            "--min-agreement",
            "0.98",
            "--no-write-on-fail",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("gate   passed"), "{stdout}");
    assert!(out.exists());
    let g = &read_json(&rep)["gate"];
    assert_eq!(g["passed"], true);
    assert!(g["blame"].as_array().unwrap().is_empty());
}

#[test]
fn bad_gate_options_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let (model, _, x, _) = digits();
    let o = out.to_str().unwrap();
    for (args, expect) in [
        (
            vec![model.as_str(), "-o", o, "--max-drop", "1"],
            "--max-drop needs",
        ),
        (
            vec![
                model.as_str(),
                "-o",
                o,
                "--max-drop",
                "1",
                "--eval",
                x.as_str(),
            ],
            "--max-drop needs",
        ),
        (
            vec![model.as_str(), "-o", o, "--min-sqnr", "20", "--no-validate"],
            "drop --no-validate",
        ),
        (
            vec![model.as_str(), "-o", o, "--min-agreement", "1.5"],
            "--min-agreement 1.5",
        ),
        (
            vec![model.as_str(), "-o", o, "--no-write-on-fail"],
            "--no-write-on-fail needs a bound",
        ),
    ] {
        let (code, stdout, err) = run(&args);
        assert_ne!(code, 0, "{args:?}: {stdout}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(stdout.is_empty(), "{args:?}: work started: {stdout}");
        assert!(!out.exists(), "{args:?}: output written");
    }
}

#[test]
fn a_bound_that_cannot_be_checked_fails() {
    // external_data has a [1, 8, 8, 8] output, not [N, C]: top-1 agreement cannot be measured.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let m = testdata().join("external_data.onnx");
    let (code, stdout, err) = run(&[
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "none",
        "--min-agreement",
        "0.9",
    ]);
    assert_ne!(code, 0, "{stdout}");
    assert!(err.contains("could not be checked"), "{err}");
}

#[test]
fn quiet_prints_nothing_and_verbose_prints_pass_details() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rep) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    let (code, stdout, err) = run_digits(&out, &rep, &["-q"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(err.is_empty(), "{err}");
    let (code, stdout, err) = run_digits(&out, &rep, &["-v"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("calibration: "), "{stdout}");
    assert!(stdout.contains("method: percentile"), "{stdout}");
    let (code, _, err) = run_digits(&out, &rep, &["-v", "-q"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be used with"), "{err}");
}
