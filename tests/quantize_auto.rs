//! `--method auto` (opt-in range method): on trained testdata models and held-out data it
//! is never meaningfully worse than the best fixed method, every sample is scored with ranges
//! estimated without it, its report accounts for every tensor, and its choice does not depend
//! on the thread count. Its cheaper observation (issue 14 part 3) is checked here too.

mod common;

use common::digits_mp::{digits_model_with, fidelity, logits};
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use onnx_compress::calibrate::observe::{
    observers_by_fold, observers_merged_from_folds, Method, ObserveOptions, Observer,
};
use onnx_compress::calibrate::params::ActScheme;
use onnx_compress::ir::Model;
use onnx_compress::passes::quantize::auto::AutoOptions;
use onnx_compress::passes::quantize::{quantize, QuantizeOptions};
use std::path::PathBuf;

fn testdata(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file)
}

fn held_out() -> (ArrayD<f32>, Vec<i64>) {
    let x = ArrayD::<f32>::read_npy(std::fs::File::open(testdata("digits_test_x.npy")).unwrap())
        .unwrap();
    let y = ArrayD::<i64>::read_npy(std::fs::File::open(testdata("digits_test_y.npy")).unwrap())
        .unwrap();
    (x, y.iter().copied().collect())
}

fn quantized_with(file: &str, method: Method) -> (Model, Model, serde_json::Value) {
    quantized_on(file, method, 200)
}

fn quantized_on(file: &str, method: Method, samples: usize) -> (Model, Model, serde_json::Value) {
    quantized_by(file, method, samples, AutoOptions::default())
}

fn quantized_by(
    file: &str,
    method: Method,
    samples: usize,
    auto: AutoOptions,
) -> (Model, Model, serde_json::Value) {
    let (float, calib) = digits_model_with(file, samples);
    let mut q = float.clone();
    let opts = QuantizeOptions {
        method,
        auto,
        ..Default::default()
    };
    let stats = quantize(&mut q, &opts, Some(&calib)).unwrap();
    (float, q, stats.details)
}

/// (SQNR dB, accuracy %) of the quantized model's logits on the held-out digits.
fn held_out_fidelity(float: &Model, q: &Model) -> (f64, f64) {
    let (x, y) = held_out();
    let reference = logits(&float.to_proto().unwrap(), &x);
    let out = logits(&q.to_proto().unwrap(), &x);
    let (_, sqnr, acc) = fidelity(&reference, &out, Some(&y));
    (sqnr, 100.0 * acc)
}

#[test]
fn auto_holds_the_best_fixed_method_on_held_out_digits() {
    for file in ["digits_cnn.onnx", "digits_deep.onnx", "digits_smooth.onnx"] {
        let mut fixed = Vec::new();
        for method in [
            Method::MinMax,
            Method::Percentile(99.999),
            Method::Mse,
            Method::Entropy,
        ] {
            let (float, q, _) = quantized_with(file, method);
            fixed.push((method.label(), held_out_fidelity(&float, &q)));
        }
        let (float, q, _) = quantized_with(file, Method::Auto);
        let (sqnr, acc) = held_out_fidelity(&float, &q);
        let best_sqnr = fixed.iter().map(|f| f.1 .0).fold(f64::MIN, f64::max);
        let best_acc = fixed.iter().map(|f| f.1 .1).fold(f64::MIN, f64::max);
        assert!(
            sqnr >= best_sqnr - 0.3,
            "{file}: auto {sqnr:.2} dB vs fixed {fixed:?}"
        );
        // 360 test digits: one sample is 0.28 points.
        assert!(
            acc >= best_acc - 0.3,
            "{file}: auto accuracy {acc:.2}% vs fixed {fixed:?}"
        );
    }
}

/// The checks every `auto` report passes, with or without blocks: a method per tensor, the
/// final loss never above the uniform start's, every candidate's width per tensor, and each
/// tensor's distance from the default method's range. Returns (start, uniform losses).
fn check_auto_report(details: &serde_json::Value) -> (String, Vec<(String, f64)>) {
    assert_eq!(details["method"], "auto");
    let auto = &details["auto"];
    let tensors = auto["tensors"].as_array().unwrap();
    let activations = details["activations"].as_array().unwrap();
    assert_eq!(tensors.len(), activations.len());
    let uniform: Vec<(String, f64)> = auto["uniform"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u[0].as_str().unwrap().to_string(), u[1].as_f64().unwrap()))
        .collect();
    assert_eq!(uniform.len(), 3);
    let default = &uniform[0].0;
    // The search starts from a uniform assignment and only accepts improvements.
    let start = auto["start"].as_str().unwrap().to_string();
    let start_loss = uniform.iter().find(|u| u.0 == start).unwrap().1;
    let loss = auto["loss"].as_f64().unwrap();
    assert!(
        loss <= start_loss,
        "final loss {loss} above its start's {start_loss}"
    );
    let choices = auto["choices"].as_array().unwrap();
    assert_eq!(choices.len(), tensors.len());
    for (c, t) in choices.iter().zip(tensors) {
        assert_eq!(c["tensor"], t[0]);
        assert_eq!(c["method"], t[1]);
        assert_eq!(c["widths"].as_array().unwrap().len(), 3);
        let moved = c["moved"].as_f64().unwrap();
        assert!(
            moved >= 0.0 && (c["method"] != default.as_str() || moved == 0.0),
            "{c}"
        );
    }
    (start, uniform)
}

#[test]
fn auto_reports_every_tensor_and_never_scores_above_its_start() {
    // Default: one method for every tensor, three evaluations, each tensor's margin the
    // uniform choice's.
    let (_, _, details) = quantized_with("digits_deep.onnx", Method::Auto);
    let (start, uniform) = check_auto_report(&details);
    let auto = &details["auto"];
    assert_eq!(auto["evaluations"].as_u64().unwrap(), 3);
    assert!(auto["blocks"].as_array().unwrap().is_empty());
    let chosen = uniform.iter().find(|u| u.0 == start).unwrap().1;
    let other = uniform
        .iter()
        .filter(|u| u.0 != start)
        .map(|u| u.1)
        .fold(f64::INFINITY, f64::min);
    for c in auto["choices"].as_array().unwrap() {
        assert_eq!(c["method"], start.as_str());
        assert!(c["block"].is_null(), "{c}");
        let margin = c["loss_margin"].as_f64().unwrap();
        assert!((margin - (other - chosen) / chosen).abs() < 1e-12, "{c}");
    }

    // Blocks on request: two trials per block, every tensor in one block, a block's margin
    // positive where it changed.
    let blocks4 = AutoOptions {
        blocks: 4,
        ..AutoOptions::default()
    };
    let (_, _, details) = quantized_by("digits_deep.onnx", Method::Auto, 200, blocks4);
    check_auto_report(&details);
    let auto = &details["auto"];
    let blocks = auto["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 4);
    assert_eq!(auto["evaluations"].as_u64().unwrap(), 3 + 4 * 2);
    let tensors = auto["tensors"].as_array().unwrap();
    let covered: u64 = blocks.iter().map(|b| b["tensors"].as_u64().unwrap()).sum();
    assert_eq!(covered as usize, tensors.len());
    for c in auto["choices"].as_array().unwrap() {
        let block = &blocks[c["block"].as_u64().unwrap() as usize];
        assert_eq!(block["chosen"], c["method"]);
        if block["gain"].as_f64().unwrap() > 0.0 {
            assert!(c["loss_margin"].as_f64().unwrap() > 0.0, "{c}");
        }
    }
}

#[test]
fn auto_cross_fits_even_a_single_calibration_batch() {
    // 200 samples in batches of 64: four batches, two folds. 40 samples: one batch, cut in two.
    for samples in [200, 40] {
        let (_, _, details) = quantized_on("digits_cnn.onnx", Method::Auto, samples);
        let auto = &details["auto"];
        assert_eq!(auto["cross_fitted"], true, "{samples} samples");
        // A tiny model: the scoring budget affords every calibration sample.
        assert_eq!(auto["samples"].as_u64().unwrap(), samples.min(256) as u64);
        assert!(auto["elements_per_sample"].as_f64().unwrap() > 64.0);
    }
    // One sample cannot be split: scored in sample, and said so.
    let (_, _, details) = quantized_on("digits_cnn.onnx", Method::Auto, 1);
    assert_eq!(details["auto"]["cross_fitted"], false);
}

#[test]
fn auto_output_does_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (_, q, _) = pool.install(|| quantized_with("digits_cnn.onnx", Method::Auto));
        q.to_proto().unwrap()
    };
    assert_eq!(run(1), run(3));
}

// `auto`'s cheaper observation (issue 14 part 3): the whole calibration set's observers
// rebuilt from the two cross-fitting folds' (`observers_merged_from_folds`) are those of the
// run that feeds every value to a third set of observers (`observers_by_fold`), bit for bit,
// on a trained model run in tract, with 1 or 3 threads; so `auto`'s candidate ranges, and its
// output, are unchanged by the cut.
/// Everything a method reads of an observer, as text (f32 as bits where `{:?}` could hide a
/// sign of zero).
fn fingerprint(o: &Observer) -> String {
    let mut s = format!(
        "min {:08x} max {:08x} count {} hist {:?}",
        o.min.to_bits(),
        o.max.to_bits(),
        o.count,
        o.hist
            .as_ref()
            .map(|h| (h.total(), h.bin_width().to_bits()))
    );
    for method in [
        Method::MinMax,
        Method::Percentile(99.999),
        Method::Mse,
        Method::Entropy,
    ] {
        let opts = ObserveOptions {
            method,
            moving_average: None,
            scheme: ActScheme::U8Asymmetric,
        };
        let r = o.finish(&opts);
        s += &format!(
            " | {method:?} {:08x} {:08x} {:016x}",
            r.lo.to_bits(),
            r.hi.to_bits(),
            r.quiet_mean_square.to_bits()
        );
    }
    s
}

#[test]
fn whole_set_observers_merged_from_the_folds_are_a_third_observation() {
    // 200 digits in batches of 64: four batches, the last one short, two folds of two.
    let (float, calib) = digits_model_with("digits_cnn.onnx", 200);
    assert_eq!(calib.batches.len(), 4);
    let proto = float.to_proto().unwrap();
    let graph = proto.graph.as_ref().unwrap();
    // The graph input and every float activation of the net.
    let mut tensors: Vec<String> = graph.input.iter().map(|i| i.name().to_string()).collect();
    for node in &graph.node {
        if matches!(
            node.op_type(),
            "Conv" | "Relu" | "MaxPool" | "Gemm" | "MatMul" | "Add" | "Flatten"
        ) {
            tensors.extend(node.output.iter().cloned());
        }
    }
    assert!(tensors.len() > 5, "{tensors:?}");
    let opts = ObserveOptions {
        method: Method::Auto,
        moving_average: None,
        scheme: ActScheme::U8Asymmetric,
    };
    let run = |threads: usize, merged: bool| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            if merged {
                observers_merged_from_folds(&proto, &tensors, &calib, &opts, 2).unwrap()
            } else {
                observers_by_fold(&proto, &tensors, &calib, &opts, 2).unwrap()
            }
        })
    };
    let (whole, folds) = run(2, false);
    for (threads, merged) in [(1, true), (3, true), (1, false)] {
        let (w, f) = run(threads, merged);
        assert_eq!(w.len(), tensors.len());
        for t in &tensors {
            assert_eq!(
                fingerprint(&w[t]),
                fingerprint(&whole[t]),
                "whole set, '{t}', {threads} thread(s), merged {merged}"
            );
            for k in 0..2 {
                assert_eq!(
                    fingerprint(&f[k][t]),
                    fingerprint(&folds[k][t]),
                    "fold {k}, '{t}'"
                );
            }
        }
    }
    // The folds are not the whole set (the comparison can fail).
    let t = &tensors[1];
    assert_ne!(whole[t].count, folds[0][t].count);
}

/// An assignment whose parameters were scored before takes that score instead of a run (on
/// the digits net deep, the last block's min-max ranges are its percentile ones), and the
/// output, which scores every step's assignments in one parallel pass, is the same with 1 or 3
/// threads.
#[test]
fn repeated_assignments_are_not_run_again_and_threads_do_not_matter() {
    use onnx_compress::passes::quantize::{quantize, QuantizeOptions};
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (float, calib) = digits_model_with("digits_deep.onnx", 200);
            let mut q = float.clone();
            let opts = QuantizeOptions {
                method: Method::Auto,
                auto: AutoOptions {
                    blocks: 4,
                    ..AutoOptions::default()
                },
                ..Default::default()
            };
            let stats = quantize(&mut q, &opts, Some(&calib)).unwrap();
            (q.to_proto().unwrap(), stats.details["auto"].clone())
        })
    };
    let (one, report) = run(1);
    let (runs, evaluations) = (
        report["runs"].as_u64().unwrap(),
        report["evaluations"].as_u64().unwrap(),
    );
    assert!(
        runs < evaluations,
        "{runs} runs for {evaluations} evaluations"
    );
    // A repeated assignment reports the loss of its first evaluation, bit for bit: here a
    // block trial whose parameters are the block's current ones.
    let repeated = report["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|block| {
            let tried = block["tried"].as_array().unwrap();
            let current = tried[0][1].as_f64().unwrap();
            tried[1..]
                .iter()
                .any(|t| t[1].as_f64().unwrap().to_bits() == current.to_bits())
        })
        .count() as u64;
    assert!(repeated >= evaluations - runs, "{repeated} repeated trials");
    let (three, report3) = run(3);
    assert_eq!(one, three);
    assert_eq!(report["uniform"], report3["uniform"]);
    assert_eq!(report["blocks"], report3["blocks"]);
}
