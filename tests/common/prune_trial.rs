//! Pruning trials shared by `tests/passes_prune.rs` (asserting) and `benches/prune_curve.rs`
//! (the digits accuracy curve and real models, printed): accuracy on the trained digits
//! classifier, MACs and tract latency, and a prune-and-validate trial on any model file.
#![allow(dead_code)]

use ndarray::{ArrayD, Axis};
use onnx_compress::ir::Model;
use onnx_compress::passes::prune::{self, PruneOptions, Reconstruct};
use onnx_compress::validate;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn testdata(name: &str) -> PathBuf {
    root().join("testdata").join(name)
}

pub fn read_f32(path: &Path) -> ArrayD<f32> {
    ndarray_npy::read_npy(path).unwrap()
}

pub fn accuracy(model: &Model, x: &ArrayD<f32>, y: &[i64]) -> f64 {
    let proto = model.to_proto().unwrap();
    let out = onnx_compress::runtime::run_model(&proto, &[("input".to_string(), x.clone())], &[])
        .unwrap();
    let logits = &out[0].1;
    let correct = logits
        .axis_iter(Axis(0))
        .zip(y)
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as i64);
            best == Some(label)
        })
        .count();
    100.0 * correct as f64 / y.len() as f64
}

pub fn digits() -> (Model, ArrayD<f32>, Vec<i64>, ArrayD<f32>) {
    let model = onnx_compress::ir::Model::load(&testdata("digits_cnn.onnx")).unwrap();
    let x = read_f32(&testdata("digits_test_x.npy"));
    let y: ndarray::ArrayD<i64> = ndarray_npy::read_npy(testdata("digits_test_y.npy")).unwrap();
    let calib = read_f32(&testdata("digits_calib_x.npy"));
    (model, x, y.iter().copied().collect(), calib)
}

pub fn prune_digits(flops: f64, reconstruct: Reconstruct) -> (f64, serde_json::Value) {
    let (mut model, x, y, calib) = digits();
    let opts = PruneOptions {
        flops,
        reconstruct,
        calibration: Some(vec![("input".to_string(), calib.into())]),
        ..Default::default()
    };
    let st = prune::prune(&mut model, &opts).unwrap();
    model.graph.check().unwrap();
    (accuracy(&model, &x, &y), st.details)
}

/// MACs (from inferred shapes) and median tract latency of a model at the given input shapes.
pub fn macs_and_latency(model: &Model, shapes: &[(String, Vec<usize>)], runs: usize) -> (u64, f64) {
    let s = onnx_compress::runtime::value_shapes(model, &model.to_proto().unwrap(), shapes);
    let macs = onnx_compress::ir::facts::model_stats(model, &s).macs;
    let proto = model.to_proto().unwrap();
    let runner = onnx_compress::runtime::Runner::new(&proto, shapes, &[]).unwrap();
    let inputs: Vec<ArrayD<f32>> = runner
        .inputs()
        .iter()
        .map(|i| ArrayD::from_elem(i.shape.clone(), 0.1f32))
        .collect();
    runner.run(&inputs).unwrap();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = std::time::Instant::now();
            runner.run(&inputs).unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (macs, t[t.len() / 2])
}

pub fn gaussian(shape: &[usize], seed: u64) -> ArrayD<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        shape.to_vec(),
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect(),
    )
    .unwrap()
}

/// Prune a model file at `flops`, check validity, compare against the original in tract, and
/// print groups, MACs and latency. Returns the validation cosine of output 0.
pub fn trial(
    path: &Path,
    input: &str,
    shape: &[usize],
    batch: usize,
    flops: f64,
    runs: usize,
) -> f64 {
    let mut model = onnx_compress::ir::Model::load(path).unwrap();
    let original = model.to_proto().unwrap();
    let shapes = vec![(input.to_string(), shape.to_vec())];
    let mut cshape = shape.to_vec();
    cshape[0] = batch;
    let opts = PruneOptions {
        flops,
        calibration: Some(vec![(input.to_string(), gaussian(&cshape, 1).into())]),
        input_shapes: shapes.clone(),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let st = prune::prune(&mut model, &opts).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    model.graph.check().unwrap();
    let groups = st.details["groups"].as_array().unwrap();
    let prunable = groups.iter().filter(|g| g["prunable"] == true).count();
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for g in groups.iter().filter(|g| g["prunable"] == false) {
        let r = g["unprunable_reasons"][0]
            .as_str()
            .unwrap_or("")
            .to_string();
        let key: String = r.split('\'').next().unwrap_or("").to_string();
        *reasons.entry(key).or_default() += 1;
    }
    let (m0, l0) = macs_and_latency(&Model::from_proto(original.clone()).unwrap(), &shapes, runs);
    let (m1, l1) = macs_and_latency(&model, &shapes, runs);
    let report = validate::validate(
        &original,
        &model.to_proto().unwrap(),
        &validate::ValidateOptions {
            input_shapes: shapes.clone(),
            samples: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let cos = report.outputs.first().map(|o| o.cosine).unwrap_or(f64::NAN);
    eprintln!(
        "{}: {} groups, {prunable} prunable; unprunable reasons {reasons:?}\n  MACs {m0} -> {m1} ({:.1}%), params {} -> {}, tract median {l0:.2} ms -> {l1:.2} ms, pass {secs:.1}s, status {:?}, cosine {cos:.4}",
        path.display(),
        groups.len(),
        100.0 * m1 as f64 / m0 as f64,
        st.details["params_before"],
        st.details["params_after"],
        report.status,
    );
    let methods: Vec<&str> = st.details["reconstruction"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["method"].as_str())
        .collect();
    eprintln!("  reconstruction methods: {methods:?}");
    cos
}

/// Digits accuracy after pruning 10..50% of the MACs with each reconstruction.
pub fn digits_accuracy_curve() {
    let (model, x, y, _) = digits();
    eprintln!("base {:.2}%", accuracy(&model, &x, &y));
    for pct in [10, 20, 30, 40, 50] {
        let f = pct as f64 / 100.0;
        let (ls, d) = prune_digits(f, Reconstruct::LeastSquares);
        let (bias, _) = prune_digits(f, Reconstruct::Bias);
        let (plain, _) = prune_digits(f, Reconstruct::None);
        eprintln!(
            "{pct}% MACs: least squares {ls:.2}%, bias {bias:.2}%, plain {plain:.2}%  (MACs {} -> {}, params {} -> {})",
            d["macs_before"], d["macs_after"], d["params_before"], d["params_after"]
        );
    }
}
