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
