//! `auto`'s cheaper observation (issue 14 part 3): the whole calibration set's observers
//! rebuilt from the two cross-fitting folds' (`observers_merged_from_folds`) are those of the
//! run that feeds every value to a third set of observers (`observers_by_fold`), bit for bit,
//! on a trained model run in tract, with 1 or 3 threads; so `auto`'s candidate ranges, and its
//! output, are unchanged by the cut.

mod common;

use common::digits_mp::digits_model_with;
use onnx_compress::calibrate::observe::{
    observers_by_fold, observers_merged_from_folds, Method, ObserveOptions, Observer,
};
use onnx_compress::calibrate::params::ActScheme;

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
