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

/// The original's outputs kept from the calibration run stand in for running the original on
/// those rows: the same report figures to the bit, a note saying so, and never for another
/// model or for rows they were not computed on.
#[test]
fn outputs_kept_from_calibration_give_the_same_report_and_only_for_their_model_and_rows() {
    use onnx_compress::calibrate::{CalibrationSet, DataOptions};
    use onnx_compress::validate::{validate, ValidateOptions};

    let t = testdata();
    let Kept {
        original,
        candidate,
        calib,
        request,
        model,
    } = quantized_digits_keeping(40);
    let kept = request.kept().expect("the calibration run kept outputs");
    assert_eq!(kept.len(), 40, "at most the rows asked for");

    let on_rows = |rows: usize, reference| ValidateOptions {
        inputs: Some(calib.rebatched(rows).unwrap()),
        in_sample: true,
        row_axes: calib.row_axes(),
        reference,
        ..Default::default()
    };
    let note = "came from the calibration run";
    let has_note =
        |r: &onnx_compress::validate::ValidationReport| r.notes.iter().any(|n| n.contains(note));
    // 64 rows: the first 40 from the kept outputs, the others run.
    let plain = validate(&original, &candidate, &on_rows(64, None)).unwrap();
    let reused = validate(&original, &candidate, &on_rows(64, Some(kept.clone()))).unwrap();
    assert_eq!(plain.samples, 64);
    assert!(!has_note(&plain));
    assert!(
        reused
            .notes
            .iter()
            .any(|n| n.contains(note) && n.contains("for 40 of 64 rows")),
        "{:?}",
        reused.notes
    );
    assert_eq!(plain.samples, reused.samples);
    assert_eq!(
        plain.outputs, reused.outputs,
        "the same figures, bit for bit"
    );
    assert!(plain.outputs[0].sqnr_db.is_finite() && plain.outputs[0].sqnr_db > 20.0);

    // Another original (one weight value changed): the kept outputs are not its outputs.
    let mut other = (*original).clone();
    let w = other
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|i| i.dims.len() == 4)
        .unwrap();
    if let Some(v) = w.float_data.first_mut() {
        *v += 1.0;
    } else {
        let mut bytes = w.raw_data.take().unwrap().to_vec();
        bytes[0] ^= 0x40;
        w.raw_data = Some(bytes.into());
    }
    let for_other = validate(&other, &candidate, &on_rows(64, Some(kept.clone()))).unwrap();
    assert!(!has_note(&for_other), "{:?}", for_other.notes);
    assert_ne!(for_other.outputs, plain.outputs);

    // Held-out rows (the test images): no kept row matches their feeds.
    let test = CalibrationSet::load(
        &t.join("digits_test_x.npy"),
        &model,
        &DataOptions::default(),
    )
    .unwrap();
    let held_out = ValidateOptions {
        inputs: Some(test.rebatched(16).unwrap()),
        row_axes: test.row_axes(),
        reference: Some(kept),
        ..Default::default()
    };
    let r = validate(&original, &candidate, &held_out).unwrap();
    assert!(!has_note(&r), "{:?}", r.notes);
    assert_eq!(r.samples, 16);
}

/// A model validated one at a time (above the size bound; here a bound of 0 bytes) runs the
/// original only up to the first early-stop checkpoint, builds it again only when the
/// checkpoint is not stable, and not at all when calibration kept every row: the same figures
/// every way.
#[test]
fn one_model_at_a_time_runs_the_original_only_on_rows_it_needs() {
    use onnx_compress::validate::{validate, EarlyStop, ValidateOptions};

    let Kept {
        original,
        candidate,
        calib,
        request,
        ..
    } = quantized_digits_keeping(64);
    let opts = |above: u64, stop: Option<EarlyStop>, kept: bool| ValidateOptions {
        inputs: Some(calib.rebatched(16).unwrap()),
        in_sample: true,
        row_axes: calib.row_axes(),
        early_stop: stop,
        reference: if kept { request.kept() } else { None },
        one_at_a_time_above: above,
        ..Default::default()
    };
    let has = |r: &onnx_compress::validate::ValidationReport, s: &str| {
        r.notes.iter().any(|n| n.contains(s))
    };
    let both = validate(&original, &candidate, &opts(u64::MAX, None, false)).unwrap();
    assert_eq!(both.samples, 16);
    // Halves that must agree to 0 dB never do: every checkpoint goes on, to all 16 rows.
    let never_stable = Some(EarlyStop {
        first_rows: 4,
        tolerance_db: 0.0,
    });
    let apart = validate(&original, &candidate, &opts(0, never_stable, false)).unwrap();
    assert!(has(&apart, "one model at a time"), "{:?}", apart.notes);
    assert!(has(&apart, "ran again from row 5"), "{:?}", apart.notes);
    assert_eq!(apart.samples, 16);
    assert_eq!(apart.outputs, both.outputs);
    let kept = validate(&original, &candidate, &opts(0, never_stable, true)).unwrap();
    assert!(
        has(&kept, "came from the calibration run for 16 of 16 rows"),
        "{:?}",
        kept.notes
    );
    assert!(!has(&kept, "ran again"), "{:?}", kept.notes);
    assert_eq!(kept.outputs, both.outputs);
}

/// When the passes before quantization rewrote the graph, calibration's outputs are the
/// rewrite's: validation takes them only after the original's own run of the first row gave
/// the same bits (a weight renamed: tract computes the same values), and runs the original on
/// every row when it did not (one weight changed by a few ulps). The figures are
/// those of a validation that runs the original on every row, both ways.
#[test]
fn outputs_kept_from_a_rewrite_are_taken_only_after_the_first_row_matches_bit_for_bit() {
    use onnx_compress::onnx::proto::ModelProto;
    use onnx_compress::validate::{validate, ValidateOptions};

    let first_conv_weight = |g: &onnx_compress::onnx::proto::GraphProto| -> usize {
        g.initializer
            .iter()
            .position(|t| t.dims.len() == 4)
            .expect("a conv weight")
    };
    // A rename the outputs cannot see: the first conv weight under another name.
    let renamed = |m: &mut ModelProto| {
        let g = m.graph.as_mut().unwrap();
        let k = first_conv_weight(g);
        let w = &mut g.initializer[k];
        let old = w.name().to_string();
        let new = format!("{old}_renamed");
        w.name = Some(new.clone());
        for n in g.node.iter_mut() {
            for i in n.input.iter_mut().filter(|i| **i == old) {
                *i = new.clone();
            }
        }
    };
    let nudged = |m: &mut ModelProto| {
        let g = m.graph.as_mut().unwrap();
        let k = first_conv_weight(g);
        let raw = g.initializer[k].raw_data.as_mut().expect("raw weights");
        let mut bytes = raw.to_vec();
        let v = f32::from_le_bytes(bytes[..4].try_into().unwrap()) * (1.0 + 1e-5);
        bytes[..4].copy_from_slice(&v.to_le_bytes());
        *raw = bytes.into();
    };
    let has = |r: &onnx_compress::validate::ValidationReport, s: &str| {
        r.notes.iter().any(|n| n.contains(s))
    };
    for (rewrite, bit_for_bit) in [
        (&renamed as &dyn Fn(&mut ModelProto), true),
        (&nudged, false),
    ] {
        let Kept {
            original,
            candidate,
            calib,
            request,
            ..
        } = quantized_digits_keeping_from(64, rewrite);
        let kept = request
            .kept()
            .expect("calibration kept the rewrite's outputs");
        assert!(!kept.are_of(&original) && kept.are_of_a_rewrite_of(&original));
        let opts = |reference| ValidateOptions {
            inputs: Some(calib.rebatched(16).unwrap()),
            in_sample: true,
            row_axes: calib.row_axes(),
            reference,
            ..Default::default()
        };
        let plain = validate(&original, &candidate, &opts(None)).unwrap();
        let with = validate(&original, &candidate, &opts(Some(kept))).unwrap();
        assert_eq!(with.outputs, plain.outputs, "bit for bit: {bit_for_bit}");
        assert_eq!(with.samples, plain.samples);
        if bit_for_bit {
            assert!(
                has(
                    &with,
                    "whose outputs on row 1 are the original's bit for bit"
                ),
                "{:?}",
                with.notes
            );
        } else {
            assert!(
                has(&with, "differ from the original's in some bit"),
                "{:?}",
                with.notes
            );
        }
    }
}

/// The trained digits CNN, quantized for the generic target (ONNX Runtime's keeps this small
/// net float) on its calibration data, with calibration asked to keep the original's outputs
/// on at most `rows` rows.
struct Kept {
    original: std::sync::Arc<onnx_compress::onnx::proto::ModelProto>,
    candidate: onnx_compress::onnx::proto::ModelProto,
    calib: onnx_compress::calibrate::CalibrationSet,
    request: std::sync::Arc<onnx_compress::calibrate::reference::ReferenceRequest>,
    model: onnx_compress::ir::Model,
}

fn quantized_digits_keeping(rows: usize) -> Kept {
    quantized_digits_keeping_from(rows, |_| {})
}

/// [`quantized_digits_keeping`] where the model calibration observes (and quantize rewrites) is
/// `rewrite` applied to the original, as the passes before quantization would.
fn quantized_digits_keeping_from(
    rows: usize,
    rewrite: impl Fn(&mut onnx_compress::onnx::proto::ModelProto),
) -> Kept {
    use onnx_compress::calibrate::reference::{ReferenceRequest, KEPT_OUTPUT_BYTES};
    use onnx_compress::calibrate::{CalibrationSet, DataOptions};
    use onnx_compress::passes::quantize::{quantize, QuantizeOptions};
    use onnx_compress::passes::target::Target;
    use std::sync::Arc;

    let t = testdata();
    let original = Arc::new(
        onnx_compress::onnx::load::read_model(&t.join("digits_cnn.onnx"))
            .unwrap()
            .0,
    );
    let mut observed = (*original).clone();
    rewrite(&mut observed);
    let mut model = onnx_compress::ir::Model::from_proto(observed).unwrap();
    let mut calib = CalibrationSet::load(
        &t.join("digits_calib_x.npy"),
        &model,
        &DataOptions::default(),
    )
    .unwrap();
    let request = Arc::new(ReferenceRequest::new(
        original.clone(),
        rows,
        KEPT_OUTPUT_BYTES,
    ));
    calib.reference = Some(request.clone());
    let opts = QuantizeOptions {
        target: Target::Generic,
        ..Default::default()
    };
    let stats = quantize(&mut model, &opts, Some(&calib)).unwrap();
    assert!(stats.changes > 0, "{:?}", stats.notes);
    let candidate = model.to_proto().unwrap();
    Kept {
        original,
        candidate,
        calib,
        request,
        model,
    }
}
