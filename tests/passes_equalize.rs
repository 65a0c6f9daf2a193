//! The `equalize` pass: scaling math against brute force, convergence and high-bias absorption
//! on the `tests/fixtures/equalize` cases (the harness in `tests/fixtures.rs` checks their
//! snapshots, idempotence and unchanged outputs), BN-folded real models, and the int8
//! weight-quantization effect on the trained digits classifier.

mod common;

use ndarray::{Array1, ArrayD, Axis, IxDyn};
use onnx_compress::ir::layer::{Layer, LayerKind};
use onnx_compress::ir::{Model, Patch};
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::onnx::tensor;
use onnx_compress::onnx::text::parse_model;
use onnx_compress::passes::equalize::{
    self, empirical_bias_correction, equalizing_scales, fake_quant_int8, int8_sqnr_db, ChannelMap,
    EqualizeOptions,
};
use onnx_compress::passes::{run_passes, PassContext, PassStats};
use onnx_compress::runtime::run_model;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::Arc;

/// One calibration batch: every model input by name.
type Batch = Vec<(String, ArrayD<f32>)>;

/// Float batches as the typed batches the passes take.
fn feeds(batches: &[Batch]) -> Vec<onnx_compress::calibrate::NamedBatch> {
    batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|(n, a)| (n.clone(), a.clone().into()))
                .collect()
        })
        .collect()
}

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(shape: &[usize], r: &mut rand_chacha::ChaCha8Rng) -> ArrayD<f64> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| r.random::<f64>() * 2.0 - 1.0)
}

/// For random W1 (Gemm transB=1, 8 x 5, channel ranges spread over 4 decades), W2 (3 x 8):
/// after scaling, r1'_i == r2'_i and W2·relu(W1 x + b1) is unchanged for random x.
#[test]
fn scaling_preserves_the_function_and_balances_ranges() {
    let mut r = rng(7);
    let m1 = ChannelMap::new(LayerKind::Gemm { trans_b: true }, &[8, 5]).unwrap();
    let m2 = ChannelMap::new(LayerKind::Gemm { trans_b: true }, &[3, 8]).unwrap();
    let mut w1 = uniform(&[8, 5], &mut r);
    let spread: Vec<f64> = (0..8).map(|i| 10f64.powf(i as f64 / 2.0 - 2.0)).collect();
    m1.scale_out(&mut w1, &spread).unwrap();
    let mut b1: Vec<f64> = (0..8).map(|_| r.random::<f64>() - 0.5).collect();
    let mut w2 = uniform(&[3, 8], &mut r);
    let xs: Vec<Array1<f64>> = (0..20)
        .map(|_| Array1::from_shape_fn(5, |_| r.random::<f64>() * 4.0 - 2.0))
        .collect();
    let f = |w1: &ArrayD<f64>, b1: &[f64], w2: &ArrayD<f64>, x: &Array1<f64>| {
        let w1 = w1.view().into_dimensionality::<ndarray::Ix2>().unwrap();
        let w2 = w2.view().into_dimensionality::<ndarray::Ix2>().unwrap();
        let h = w1.dot(x) + Array1::from(b1.to_vec());
        w2.dot(&h.mapv(|v| v.max(0.0)))
    };
    let before: Vec<Array1<f64>> = xs.iter().map(|x| f(&w1, &b1, &w2, x)).collect();

    let s = equalizing_scales(&m1.out_ranges(&w1).unwrap(), &m2.in_ranges(&w2).unwrap());
    // Brute force: s_i = sqrt(r1_i r2_i) / r2_i from explicit loops.
    for i in 0..8 {
        let r1 = (0..5).map(|j| w1[[i, j]].abs()).fold(0.0, f64::max);
        let r2 = (0..3).map(|o| w2[[o, i]].abs()).fold(0.0, f64::max);
        assert!((s[i] - (r1 * r2).sqrt() / r2).abs() < 1e-12 * s[i]);
    }
    let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
    m1.scale_out(&mut w1, &inv).unwrap();
    b1.iter_mut().zip(&inv).for_each(|(b, f)| *b *= f);
    m2.scale_in(&mut w2, &s).unwrap();
    for i in 0..8 {
        let r1 = (0..5).map(|j| w1[[i, j]].abs()).fold(0.0, f64::max);
        let r2 = (0..3).map(|o| w2[[o, i]].abs()).fold(0.0, f64::max);
        assert!((r1 - r2).abs() <= 1e-12 * r1, "channel {i}: {r1} vs {r2}");
    }
    for (x, y0) in xs.iter().zip(&before) {
        let y = f(&w1, &b1, &w2, x);
        let err = (&y - y0).mapv(f64::abs).fold(0.0, |a: f64, &b| a.max(b));
        assert!(err < 1e-12, "output changed by {err}");
    }
}

/// A grouped L2 (group 2, 4 in -> 4 out, 2 input channels per group): input channel i lives in
/// column i % 2 of group i / 2's rows; equalized ranges match brute force.
#[test]
fn grouped_l2_ranges_use_the_group_rows() {
    let mut r = rng(3);
    let m2 = ChannelMap::new(LayerKind::Conv { group: 2 }, &[4, 2, 3, 3]).unwrap();
    let w2 = uniform(&[4, 2, 3, 3], &mut r);
    let got = m2.in_ranges(&w2).unwrap();
    for (i, &got_i) in got.iter().enumerate() {
        let (g, j) = (i / 2, i % 2);
        let mut m = 0.0f64;
        for o in g * 2..g * 2 + 2 {
            for k in 0..9 {
                m = m.max(w2[[o, j, k / 3, k % 3]].abs());
            }
        }
        assert_eq!(got_i, m, "input channel {i}");
    }
}

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/equalize")
}

fn run_equalize(proto: &ModelProto, opts: &EqualizeOptions) -> (ModelProto, PassStats) {
    let mut model = Model::from_proto(proto.clone()).unwrap();
    let stats = equalize::run(&mut model, opts).unwrap();
    model.graph.check().unwrap();
    (model.to_proto().unwrap(), stats)
}

/// Random inputs for every graph input (declared static shapes).
fn random_inputs(m: &ModelProto, seed: u64, batch: Option<usize>) -> Vec<(String, ArrayD<f32>)> {
    let mut r = rng(seed);
    let (specs, _) = onnx_compress::runtime::resolve_input_shapes(m, &[]).unwrap();
    specs
        .iter()
        .map(|s| {
            let mut shape = s.shape.clone();
            if let Some(b) = batch {
                shape[0] = b;
            }
            let a = ArrayD::from_shape_fn(IxDyn(&shape), |_| r.random::<f32>() * 2.0 - 1.0);
            (s.name.clone(), a)
        })
        .collect()
}

/// Max |a - b| / max |a| over all outputs; a value finite on one side only fails the test
/// (`common::compare`).
fn rel_err(a: &[(String, ArrayD<f32>)], b: &[(String, ArrayD<f32>)]) -> f64 {
    common::compare::max_rel_diff(a, b).unwrap_or_else(|m| panic!("{m}"))
}

fn assert_same_function(
    orig: &ModelProto,
    cand: &ModelProto,
    inputs: &[(String, ArrayD<f32>)],
    tol: f64,
) -> f64 {
    let a = run_model(orig, inputs, &[]).unwrap();
    let b = run_model(cand, inputs, &[]).unwrap();
    let e = rel_err(&a, &b);
    assert!(e <= tol, "outputs differ: relative error {e:e} > {tol:e}");
    e
}

#[test]
fn three_layer_chain_converges_to_balanced_ranges() {
    let text = std::fs::read_to_string(fixture_dir().join("three_layer_chain.onnxtxt")).unwrap();
    let orig = parse_model(&text).unwrap();
    let (out, stats) = run_equalize(&orig, &EqualizeOptions::default());
    assert_eq!(stats.details["converged"], true);
    let sweeps = stats.details["sweeps"].as_u64().unwrap();
    assert!(sweeps > 1 && sweeps < 100, "sweeps {sweeps}");
    // At the fixed point every pair is balanced to within the tolerance.
    let model = Model::from_proto(out).unwrap();
    let g = &model.graph;
    let layers: Vec<Layer> = g
        .topo_order()
        .unwrap()
        .into_iter()
        .filter_map(|ix| Layer::of(g, ix))
        .collect();
    assert_eq!(layers.len(), 4);
    for pair in layers.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let ma = ChannelMap::new(a.kind, &a.weight_shape).unwrap();
        let mb = ChannelMap::new(b.kind, &b.weight_shape).unwrap();
        let r1 = ma
            .out_ranges(&a.weight_f32(g).unwrap().mapv(f64::from))
            .unwrap();
        let r2 = mb
            .in_ranges(&b.weight_f32(g).unwrap().mapv(f64::from))
            .unwrap();
        for (x, y) in r1.iter().zip(&r2) {
            assert!((x / y).ln().abs() < 2.5e-3, "{x} vs {y}");
        }
    }
}

#[test]
fn absorption_with_calibration_is_exact_on_the_data_and_skips_without_stats() {
    let text = std::fs::read_to_string(fixture_dir().join("relu_chain.onnxtxt")).unwrap();
    let orig = parse_model(&text).unwrap();
    // Inputs in [0, 1) make h = w1·x + b1 mostly positive on some channels.
    let mut r = rng(5);
    let batches: Vec<Vec<(String, ArrayD<f32>)>> = (0..4)
        .map(|_| {
            vec![(
                "x".to_string(),
                ArrayD::from_shape_fn(IxDyn(&[1, 2, 4, 4]), |_| r.random::<f32>()),
            )]
        })
        .collect();
    let opts = EqualizeOptions {
        absorb_high_bias: true,
        calibration: Some(Arc::new(feeds(&batches))),
        ..Default::default()
    };
    let (out, stats) = run_equalize(&orig, &opts);
    let absorbed = &stats.details["pairs"][0]["absorbed"];
    assert_eq!(absorbed["source"], "calibration", "{:?}", stats.details);
    assert!(absorbed["max_shift"].as_f64().unwrap() > 0.0);
    assert_eq!(stats.changes, 2);
    for b in &batches {
        assert_same_function(&orig, &out, b, 1e-5);
    }
    // Without BN statistics or data: skipped with a note, weights still equalized.
    let (_, stats) = run_equalize(
        &orig,
        &EqualizeOptions {
            absorb_high_bias: true,
            ..Default::default()
        },
    );
    assert_eq!(stats.changes, 1);
    assert!(
        stats
            .notes
            .iter()
            .any(|n| n.contains("no BN statistics and no calibration data")),
        "{:?}",
        stats.notes
    );
}

fn load_testdata(name: &str) -> ModelProto {
    let path = common::testdata().join(name);
    let (proto, _) = onnx_compress::onnx::load::read_model(&path).unwrap();
    proto
}

/// fuse + cleanup, as the pipeline runs them before equalize; returns the model and the fuse
/// record's folded BN statistics.
fn folded(
    name: &str,
) -> (
    ModelProto,
    std::collections::BTreeMap<String, onnx_compress::passes::fuse::FoldedBn>,
) {
    let mut model = Model::from_proto(load_testdata(name)).unwrap();
    let records = run_passes(&mut model, &["fuse", "cleanup"], &PassContext::default()).unwrap();
    let stats = records[0].folded_bn().cloned().unwrap();
    (model.to_proto().unwrap(), stats)
}

fn digits(file: &str) -> ArrayD<f32> {
    ndarray_npy::read_npy(common::testdata().join(file)).unwrap()
}

#[test]
fn digits_cnn_after_bn_folding_keeps_its_outputs() {
    let (orig, _) = folded("digits_cnn.onnx");
    let (out, stats) = run_equalize(&orig, &EqualizeOptions::default());
    let pairs = stats.details["pairs"].as_array().unwrap();
    // conv0 -> dw1, pw2 -> dw3, dw3 -> pw4, pw4 -> fc (via Relu, GAP, Flatten).
    assert_eq!(
        pairs.len(),
        4,
        "{}",
        serde_json::to_string_pretty(&stats.details).unwrap()
    );
    assert!(
        stats.notes.iter().any(|n| n.contains("Clip(0,6)")),
        "{:?}",
        stats.notes
    );
    for p in pairs {
        assert!(
            p["range_ratio_after"].as_f64().unwrap()
                <= p["range_ratio_before"].as_f64().unwrap() + 1e-9
        );
    }
    let x = digits("digits_test_x.npy");
    let inputs = vec![("input".to_string(), x)];
    let e = assert_same_function(&orig, &out, &inputs, 1e-4);
    eprintln!("digits_cnn: relative output error after CLE {e:e}");
    let (_, again) = run_equalize(&out, &EqualizeOptions::default());
    assert_eq!(again.changes, 0);
}

/// mobilenet_like has no equalizable pair: every layer pair is separated by Clip(0, 6), a
/// residual Add or a Concat. The pass must say so for each and leave the model alone.
#[test]
fn mobilenet_like_after_bn_folding_is_left_alone_with_reasons() {
    let (orig, _) = folded("mobilenet_like.onnx");
    let (out, stats) = run_equalize(&orig, &EqualizeOptions::default());
    assert_eq!(stats.changes, 0, "{:?}", stats.notes);
    assert_eq!(out, orig);
    for why in [
        "Clip(0,6) is not positively homogeneous between",
        "Add '/ir1/Add' couples",
        "Concat '/Concat' couples",
        "has 2 readers",
    ] {
        assert!(
            stats.notes.iter().any(|n| n.contains(why)),
            "no note with '{why}': {:?}",
            stats.notes
        );
    }
    let inputs = random_inputs(&orig, 9, None);
    assert_same_function(&orig, &out, &inputs, 0.0);
}

// ---- int8 weight quantization on the trained digits classifier ----

#[derive(Clone, Copy, PartialEq)]
enum Scheme {
    PerTensor,
    PerChannel,
}

/// Replace every Conv/Gemm weight by its int8 fake-quantized value; with `bias_correction`,
/// also shift biases by the empirical correction measured on `calib`.
fn fake_quantize(proto: &ModelProto, scheme: Scheme, calib: Option<&[Batch]>) -> ModelProto {
    let mut model = Model::from_proto(proto.clone()).unwrap();
    let g = &model.graph;
    let mut quantized = Vec::new();
    for ix in g.topo_order().unwrap() {
        let Some(layer) = Layer::of(g, ix) else {
            continue;
        };
        let map = ChannelMap::new(layer.kind, &layer.weight_shape).unwrap();
        let w = layer.weight_f32(g).unwrap().mapv(f64::from);
        let q = fake_quant_int8(&w, (scheme == Scheme::PerChannel).then_some(&map)).unwrap();
        quantized.push((ix, layer, q.mapv(|v| v as f32)));
    }
    let deltas = calib.map(|c| {
        let named: Vec<(String, ArrayD<f32>)> = quantized
            .iter()
            .map(|(ix, _, q)| (g.node(*ix).name().to_string(), q.clone()))
            .collect();
        empirical_bias_correction(&model, &named, &feeds(c)).unwrap()
    });
    let mut inits = Vec::new();
    for (k, (_, layer, q)) in quantized.iter().enumerate() {
        inits.push(tensor::from_f32(&layer.weight, q));
        if let Some(d) = &deltas {
            let bias = layer
                .bias
                .as_ref()
                .expect("BN-folded digits layers all have a bias");
            let b = layer.bias_f32(g).unwrap().unwrap();
            let nb: ArrayD<f32> = b
                .iter()
                .zip(&d[k].1)
                .map(|(&b, &dv)| (f64::from(b) + dv) as f32)
                .collect::<Array1<f32>>()
                .into_dyn();
            inits.push(tensor::from_f32(bias, &nb));
        }
    }
    model
        .graph
        .apply(Patch {
            initializers: inits,
            ..Default::default()
        })
        .unwrap();
    model.to_proto().unwrap()
}

/// Test accuracy and the logits' SQNR against `reference` logits (dB).
fn accuracy(
    m: &ModelProto,
    x: &ArrayD<f32>,
    y: &[i64],
    reference: Option<&ArrayD<f32>>,
) -> (f64, f64, ArrayD<f32>) {
    let out = run_model(m, &[("input".to_string(), x.clone())], &[]).unwrap();
    let sqnr = reference.map_or(f64::INFINITY, |r| {
        let sig: f64 = r.iter().map(|&v| f64::from(v).powi(2)).sum();
        let err: f64 = r
            .iter()
            .zip(out[0].1.iter())
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        10.0 * (sig / err).log10()
    });
    let logits = out[0]
        .1
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let hits = logits
        .axis_iter(Axis(0))
        .zip(y)
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 as i64 == label
        })
        .count();
    (hits as f64 / y.len() as f64, sqnr, out[0].1.clone())
}

fn weight_sqnrs(m: &ModelProto) -> Vec<(String, f64)> {
    let model = Model::from_proto(m.clone()).unwrap();
    let g = &model.graph;
    g.topo_order()
        .unwrap()
        .into_iter()
        .filter_map(|ix| {
            Layer::of(g, ix).map(|l| {
                (
                    g.node(ix).name().to_string(),
                    int8_sqnr_db(&l.weight_f32(g).unwrap().mapv(f64::from)),
                )
            })
        })
        .collect()
}

/// Int8 weights (activations float) on digits_cnn, per-tensor and per-channel, with and
/// without CLE and empirical bias correction: accuracy never drops below fp32's by more than
/// a sample; CLE raises every layer's per-tensor weight SQNR and the logits SQNR (measured
/// 32.6 -> 37.0 dB); bias correction raises the logits SQNR with and without CLE (measured
/// +3.3 and +3.7 dB); per-channel + CLE keeps per-channel's accuracy.
#[test]
fn digits_int8_weights_cle_and_bias_correction_raise_logits_sqnr() {
    let (fp32, _) = folded("digits_cnn.onnx");
    let (cle, _) = run_equalize(&fp32, &EqualizeOptions::default());
    let x = digits("digits_test_x.npy");
    let y: ndarray::Array1<i64> =
        ndarray_npy::read_npy(common::testdata().join("digits_test_y.npy")).unwrap();
    let y = y.to_vec();
    let calib_x = digits("digits_calib_x.npy");
    let calib: Vec<Vec<(String, ArrayD<f32>)>> = vec![vec![("input".to_string(), calib_x)]];

    let (acc_fp32, _, reference) = accuracy(&fp32, &x, &y, None);
    let r = Some(&reference);
    let variants = [
        ("per-tensor", fake_quantize(&fp32, Scheme::PerTensor, None)),
        (
            "per-tensor + BC",
            fake_quantize(&fp32, Scheme::PerTensor, Some(&calib)),
        ),
        (
            "per-tensor + CLE",
            fake_quantize(&cle, Scheme::PerTensor, None),
        ),
        (
            "per-tensor + CLE + BC",
            fake_quantize(&cle, Scheme::PerTensor, Some(&calib)),
        ),
        (
            "per-channel",
            fake_quantize(&fp32, Scheme::PerChannel, None),
        ),
        (
            "per-channel + CLE",
            fake_quantize(&cle, Scheme::PerChannel, None),
        ),
    ];
    eprintln!("digits_cnn, 360 test samples, int8 weights (activations float): accuracy, logits SQNR vs fp32");
    eprintln!("  {:<24} {:.2}%", "fp32", 100.0 * acc_fp32);
    let mut res = std::collections::HashMap::new();
    for (k, m) in &variants {
        let (a, q, _) = accuracy(m, &x, &y, r);
        eprintln!("  {k:<24} {:.2}%  {q:.1} dB", 100.0 * a);
        res.insert(*k, (a, q));
    }
    let (w_fp32, w_cle) = (weight_sqnrs(&fp32), weight_sqnrs(&cle));
    assert_eq!(w_fp32.len(), 6, "5 convs and the fc");
    for ((name, a), (_, b)) in w_fp32.iter().zip(&w_cle) {
        eprintln!("  per-tensor int8 weight SQNR {name}: {a:.1} dB -> {b:.1} dB");
        assert!(
            b > a,
            "{name}: CLE lowered the per-tensor weight SQNR {a} -> {b} dB"
        );
    }
    assert!(acc_fp32 > 0.99);
    for (k, (a, _)) in &res {
        assert!(
            *a >= acc_fp32 - 1.0 / 360.0 - 1e-9,
            "{k}: accuracy {a} vs fp32 {acc_fp32}"
        );
    }
    let (pt, pt_bc, pt_cle, pt_cle_bc) = (
        res["per-tensor"],
        res["per-tensor + BC"],
        res["per-tensor + CLE"],
        res["per-tensor + CLE + BC"],
    );
    assert!(
        pt_bc.1 > pt.1 + 1.0,
        "bias correction should raise the per-tensor logits SQNR: {pt:?} -> {pt_bc:?}"
    );
    assert!(
        pt_cle.0 >= pt.0,
        "CLE lowered per-tensor accuracy: {pt:?} -> {pt_cle:?}"
    );
    assert!(
        pt_cle.1 > pt.1 + 1.0,
        "CLE should raise the per-tensor logits SQNR: {pt:?} -> {pt_cle:?}"
    );
    assert!(
        pt_cle_bc.1 > pt_cle.1 + 1.0,
        "bias correction should raise the logits SQNR after CLE too: {pt_cle:?} -> {pt_cle_bc:?}"
    );
    assert!(res["per-channel + CLE"].0 >= res["per-channel"].0 - 0.01);
}

/// High-bias absorption from the fuse record's BN statistics on digits_cnn: every Relu pair
/// finds its L1's statistics (keys = folded node names); the shift `c_i = max(0, beta_i -
/// 3 |gamma_i|)` computed here from those statistics is zero on every channel of this trained
/// model, so the pass must absorb nothing, report no skip, and give exactly the model plain
/// CLE gives. (The absorption arithmetic itself is checked against W2·c in
/// `high_bias_absorption_from_bn_stats_moves_the_shift`.)
#[test]
fn digits_bn_stats_reach_every_relu_pair_and_nothing_is_absorbed() {
    let (fp32, bn_stats) = folded("digits_cnn.onnx");
    assert!(!bn_stats.is_empty());
    let opts = EqualizeOptions {
        absorb_high_bias: true,
        bn_stats,
        ..Default::default()
    };
    let (out, stats) = run_equalize(&fp32, &opts);
    let pairs = stats.details["pairs"].as_array().unwrap();
    let relu_pairs: Vec<&serde_json::Value> =
        pairs.iter().filter(|p| p["via"][0] == "Relu").collect();
    assert!(!relu_pairs.is_empty(), "{pairs:?}");
    for p in &relu_pairs {
        let l1 = p["l1"].as_str().unwrap();
        let bn = opts
            .bn_stats
            .get(l1)
            .unwrap_or_else(|| panic!("no BN statistics for relu pair {p}"));
        let shifted = bn
            .beta
            .iter()
            .zip(&bn.gamma)
            .filter(|(b, g)| **b - 3.0 * g.abs() > 0.0)
            .count();
        assert_eq!(
            shifted, 0,
            "{l1}: {shifted} channels have beta > 3|gamma|; this test assumes none (write one that checks their shift)"
        );
    }
    let absorbed: Vec<&serde_json::Value> =
        pairs.iter().filter_map(|p| p.get("absorbed")).collect();
    assert!(absorbed.is_empty(), "{absorbed:?}");
    assert!(
        !stats
            .notes
            .iter()
            .any(|n| n.contains("high-bias absorption skipped")),
        "{:?}",
        stats.notes
    );
    let (plain, _) = run_equalize(&fp32, &EqualizeOptions::default());
    assert!(
        out == plain,
        "absorption with nothing to absorb changed the model"
    );
}

/// The BN path of high-bias absorption: `c_i = max(0, beta_i - 3 gamma_i) / S_i` leaves L1's
/// bias and reappears in L2's bias through W2.
#[test]
fn high_bias_absorption_from_bn_stats_moves_the_shift() {
    let text = std::fs::read_to_string(fixture_dir().join("relu_chain.onnxtxt"))
        .unwrap()
        .replace("h = Conv", "[conv1] h = Conv");
    let orig = parse_model(&text).unwrap();
    let bn = onnx_compress::passes::fuse::FoldedBn {
        bn: "bn1".into(),
        op: "Conv".into(),
        output: "h".into(),
        gamma: vec![0.1, 0.1, -0.1, 0.1],
        beta: vec![1.0, 0.0, 2.0, 0.5],
    };
    let opts = EqualizeOptions {
        absorb_high_bias: true,
        bn_stats: [("conv1".to_string(), bn)].into_iter().collect(),
        ..Default::default()
    };
    let (cle, _) = run_equalize(&orig, &EqualizeOptions::default());
    let (out, stats) = run_equalize(&orig, &opts);
    let a = &stats.details["pairs"][0]["absorbed"];
    assert_eq!(a["source"], "bn");
    assert_eq!(a["channels"], 3);
    let get = |m: &ModelProto, name: &str| -> Vec<f64> {
        let t = m
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .unwrap();
        tensor::to_f64(t).unwrap().iter().copied().collect()
    };
    let (b1c, b1a) = (get(&cle, "b1"), get(&out, "b1"));
    let c: Vec<f64> = b1c.iter().zip(&b1a).map(|(x, y)| x - y).collect();
    assert!(c[1].abs() < 1e-7 && c.iter().all(|&v| v >= -1e-7), "{c:?}");
    // b2 gains W2·c.
    let w2 = get(&out, "w2");
    let (b2c, b2a) = (get(&cle, "b2"), get(&out, "b2"));
    for o in 0..3 {
        let want: f64 = (0..4).map(|i| w2[o * 4 + i] * c[i]).sum();
        assert!((b2a[o] - b2c[o] - want).abs() < 1e-5, "channel {o}");
    }
}

/// A MatMul reading a 3-D `[batch, tokens, channels]` activation (PP-OCRv4 rec's neck): the
/// correction needs the mean of each of its 3 input channels (the last axis), not of its 5
/// tokens (axis 1, a Conv's channel axis), and equals `-(Wq - W)^T E[x]`.
#[test]
fn bias_correction_of_a_matmul_on_tokens_reads_the_last_axis() {
    let text = r#"
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,5,3] x) => (float[1,5,2] y)
<
   float[3,2] w = {0.5, -1.0, 0.25, 2.0, -0.75, 0.125}
>
{
   y = MatMul (x, w)
}
"#;
    let model = Model::from_proto(parse_model(text).unwrap()).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 5, 3]), |i| (i[1] as f32) * 0.1 + i[2] as f32);
    let batches = vec![vec![("x".to_string(), x.clone())]];
    let w = ndarray::arr2(&[[0.5f32, -1.0], [0.25, 2.0], [-0.75, 0.125]]);
    let wq = w.mapv(|v| v + 0.01 * v.signum());
    let node = model
        .graph
        .node(model.graph.topo_order().unwrap()[0])
        .name()
        .to_string();
    let deltas =
        empirical_bias_correction(&model, &[(node, wq.clone().into_dyn())], &feeds(&batches))
            .unwrap();
    let mean: Vec<f64> = (0..3)
        .map(|k| f64::from(x.index_axis(Axis(2), k).mean().unwrap()))
        .collect();
    let expected: Vec<f64> = (0..2)
        .map(|o| {
            -(0..3)
                .map(|k| f64::from(wq[[k, o]] - w[[k, o]]) * mean[k])
                .sum::<f64>()
        })
        .collect();
    assert_eq!(deltas[0].1.len(), 2);
    for (d, e) in deltas[0].1.iter().zip(&expected) {
        assert!((d - e).abs() < 1e-6, "{:?} vs {expected:?}", deltas[0].1);
    }
}
