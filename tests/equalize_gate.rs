//! The measured gate of `equalize` (issue 14): with calibration data and per-tensor int8
//! weights, a pair is kept only where it lowers the quantized model's output error on the
//! calibration data; the report says per pair kept or dropped with the loss change; the result
//! is never below no equalization on held-out digits and does not depend on the thread count.

mod common;

use common::digits_mp::{digits_model_with, fidelity, logits};
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use onnx_compress::calibrate::CalibrationSet;
use onnx_compress::ir::Model;
use onnx_compress::passes::equalize::{BiasCorrection, EqualizeOptions};
use onnx_compress::passes::quantize::QuantizeOptions;
use onnx_compress::Pipeline;
use std::path::PathBuf;

fn testdata(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file)
}

/// Per-tensor int8 (percentile) of a BN-folded digits model, with equalization as `eq` (None:
/// no equalize pass); the quantized model and the equalize pass's details.
fn per_tensor(
    float: &Model,
    calib: &CalibrationSet,
    eq: Option<EqualizeOptions>,
    bias: BiasCorrection,
) -> (Model, serde_json::Value) {
    let mut q = float.clone();
    let mut p = Pipeline::new()
        .quantize(QuantizeOptions {
            per_channel: false,
            bias_correction: bias,
            ..Default::default()
        })
        .calibration(calib.clone());
    if let Some(o) = eq {
        p = p.equalize_with(o);
    }
    let records = p.run(&mut q).unwrap();
    let details = records
        .iter()
        .find(|r| r.name == "equalize")
        .map(|r| r.details.clone())
        .unwrap_or_default();
    (q, details)
}

fn measured() -> EqualizeOptions {
    EqualizeOptions {
        measured: true,
        ..Default::default()
    }
}

/// SQNR (dB) of the quantized logits on the 360 held-out digits.
fn held_out_sqnr(float: &Model, q: &Model) -> f64 {
    let x = ArrayD::<f32>::read_npy(std::fs::File::open(testdata("digits_test_x.npy")).unwrap())
        .unwrap();
    let reference = logits(&float.to_proto().unwrap(), &x);
    let out = logits(&q.to_proto().unwrap(), &x);
    fidelity(&reference, &out, None).1
}

#[test]
fn gate_keeps_pairs_that_help_and_drops_pairs_that_hurt() {
    let mut kept_helping = 0;
    let mut dropped_hurting = 0;
    for file in ["digits_cnn.onnx", "digits_vgg.onnx", "digits_deep.onnx"] {
        let (float, calib) = digits_model_with(file, 200);
        let (q_off, _) = per_tensor(&float, &calib, None, BiasCorrection::Off);
        let (q_all, _) = per_tensor(
            &float,
            &calib,
            Some(Default::default()),
            BiasCorrection::Off,
        );
        let (q_gate, details) = per_tensor(&float, &calib, Some(measured()), BiasCorrection::Off);
        let gate = &details["gate"]["pairs"];
        let pairs = details["pairs"].as_array().unwrap();
        assert!(!pairs.is_empty(), "{file}: no equalization pair");
        // Every pair has a verdict. From no equalization, a pair is only added because it
        // lowered the loss; from every pair, one is only removed because that lowered it.
        let start = gate["start"].as_str().unwrap();
        for p in pairs {
            let v = &p["gate"];
            let change = v["loss_change"].as_f64().unwrap();
            let kept = v["kept"].as_bool().unwrap();
            match (start, kept) {
                ("none", true) => assert!(change < 0.0, "{file}: added {} at {change}", p["l1"]),
                ("all", false) => assert!(change > 0.0, "{file}: removed {} at {change}", p["l1"]),
                _ => {}
            }
            if kept && change < 0.0 {
                kept_helping += 1;
            }
            if !kept && change > 0.0 {
                dropped_hurting += 1;
            }
            if kept {
                assert!(
                    p["scale_max"].as_f64().unwrap() > 1.0
                        || p["scale_min"].as_f64().unwrap() < 1.0
                );
            } else {
                assert_eq!(
                    p["scale_min"].as_f64(),
                    Some(1.0),
                    "{file}: dropped but rescaled"
                );
                assert_eq!(
                    p["scale_max"].as_f64(),
                    Some(1.0),
                    "{file}: dropped but rescaled"
                );
            }
        }
        let (none, loss) = (
            gate["loss_none"].as_f64().unwrap(),
            gate["loss"].as_f64().unwrap(),
        );
        assert!(
            loss <= none,
            "{file}: gated loss {loss} above no equalization {none}"
        );
        // Held out: never below no equalization (noise allowance 0.1 dB).
        let (s_off, s_all, s_gate) = (
            held_out_sqnr(&float, &q_off),
            held_out_sqnr(&float, &q_all),
            held_out_sqnr(&float, &q_gate),
        );
        eprintln!(
            "{file}: held-out SQNR off {s_off:.2} all {s_all:.2} gated {s_gate:.2} dB; {gate}"
        );
        assert!(
            s_gate >= s_off - 0.1,
            "{file}: gated {s_gate:.2} dB below no equalization {s_off:.2} dB"
        );
    }
    assert!(kept_helping > 0, "no pair kept on any model");
    assert!(dropped_hurting > 0, "no hurting pair dropped on any model");
}

#[test]
fn measured_bias_correction_reports_every_layer_and_never_raises_the_loss() {
    let (float, calib) = digits_model_with("digits_cnn.onnx", 200);
    let (q_off, _) = per_tensor(&float, &calib, None, BiasCorrection::Off);
    let (q, details) = per_tensor(
        &float,
        &calib,
        Some(EqualizeOptions {
            rescale: false,
            ..measured()
        }),
        BiasCorrection::Measured,
    );
    let bc = &details["gate"]["bias_correction"];
    let layers = bc["layers"].as_array().unwrap();
    // Every Conv/Gemm of digits_cnn has a bias after BN folding.
    assert_eq!(layers.len(), 6, "{bc}");
    for l in layers {
        let change = l["loss_change"].as_f64().unwrap();
        if l["kept"].as_bool().unwrap() {
            assert!(change < 0.0, "{l}");
        }
    }
    assert!(bc["loss"].as_f64().unwrap() <= bc["loss_none"].as_f64().unwrap());
    assert!(details["pairs"].is_null(), "no rescaling asked: {details}");
    assert!(held_out_sqnr(&float, &q) >= held_out_sqnr(&float, &q_off) - 0.1);
}

#[test]
fn gate_does_not_depend_on_the_thread_count() {
    let (float, calib) = digits_model_with("digits_vgg.onnx", 200);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (q, details) = pool.install(|| {
            per_tensor(
                &float,
                &calib,
                Some(EqualizeOptions {
                    absorb_high_bias: true,
                    ..measured()
                }),
                BiasCorrection::Measured,
            )
        });
        (q.to_proto().unwrap(), details)
    };
    let (a, da) = run(1);
    let (b, db) = run(2);
    assert_eq!(da, db);
    assert!(
        a == b,
        "the quantized model differs between 1 and 2 threads"
    );
}
