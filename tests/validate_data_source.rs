//! Validation tells the truth about its data: with `--calib` and no `--eval` it runs on the
//! calibration data (labelled in-sample), never on noise; noise only without any data, and then
//! the summary says it is a smoke test. Every metrics line names its data source.

mod common;
use common::*;

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn calib_only_validates_on_the_calibration_data_and_says_so() {
    let t = testdata();
    let dir = tempfile::tempdir().unwrap();
    let (out, rep) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    let (m, calib, x, y) = (
        t.join("digits_cnn.onnx"),
        t.join("digits_calib_x.npy"),
        t.join("digits_test_x.npy"),
        t.join("digits_test_y.npy"),
    );
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (code, stdout, stderr) = run(&[
        &s(&m),
        "-o",
        &s(&out),
        "--calib",
        &s(&calib),
        "--report",
        &s(&rep),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let r = report(&rep);
    let v = &r["validation"];
    assert_eq!(v["input_source"], "calibration", "{v}");
    assert_eq!(v["status"], "checked");
    // At most the first 64 calibration samples, run row by row (the batch dim is symbolic),
    // from 16 until the SQNR is stable; the summary says how many.
    assert_eq!(v["samples_given"], 64, "{v}");
    let rows = v["samples"].as_u64().unwrap();
    assert!([16, 32, 64].contains(&rows), "{v}");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 10]));
    assert_eq!(v["outputs"][0]["elements"], 10 * rows, "{v}");
    assert!(stdout.contains("in-sample"), "{stdout}");
    // The in-sample line says what it cannot see (held-out inputs past the ranges: BENCHMARKS.md,
    // issue 20 session 13, EfficientNet-B0 10.3 dB in-sample vs 2.6 held-out).
    assert!(
        stdout.contains("optimistic: held-out inputs past the calibrated ranges are clipped"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("{rows} ")), "{stdout}");
    assert!(
        stdout.contains("(in-sample, on calibration data)"),
        "{stdout}"
    );
    assert!(!stdout.contains("synthetic"), "{stdout}");
    let in_sample = v["outputs"][0]["sqnr_db"].as_f64().unwrap();

    // --validate-samples N: exactly the first N, no early stop.
    let (code, stdout, stderr) = run(&[
        &s(&m),
        "-o",
        &s(&out),
        "--calib",
        &s(&calib),
        "--validate-samples",
        "100",
        "--report",
        &s(&rep),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v = &report(&rep)["validation"];
    assert_eq!(
        (&v["samples"], &v["samples_given"]),
        (&100.into(), &100.into()),
        "{v}"
    );
    assert!(stdout.contains("100 calibration sample(s)"), "{stdout}");
    let (code, _, stderr) = run(&[
        &s(&m),
        "-o",
        &s(&out),
        "--calib",
        &s(&calib),
        "--validate-samples",
        "0",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--validate-samples must be at least 1"),
        "{stderr}"
    );

    // The same output measured on held-out data: the in-sample figure is within 3 dB.
    let (code, stdout, stderr) = run(&[
        &s(&m),
        "-o",
        &s(&out),
        "--calib",
        &s(&calib),
        "--eval",
        &s(&x),
        "--eval-labels",
        &s(&y),
        "--report",
        &s(&rep),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(on held-out data)"), "{stdout}");
    let held_out = report(&rep)["validation"]["outputs"][0]["sqnr_db"]
        .as_f64()
        .unwrap();
    assert!(
        (in_sample - held_out).abs() <= 3.0,
        "in-sample {in_sample:.1} dB vs held-out {held_out:.1} dB"
    );
}

#[test]
fn without_data_the_verdict_is_a_smoke_test() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.onnx", &conv_relu());
    let out = dir.path().join("q.onnx");
    let (code, stdout, stderr) = run(&[m.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("a smoke test, not a fidelity measure"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(on synthetic noise: smoke test only)"),
        "{stdout}"
    );
}
