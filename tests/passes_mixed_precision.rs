//! Pass `mixed-precision`: knapsack exactness, Hessian ranking vs brute force, the digits
//! benchmark at 4.5 bits per weight, and emission checked in tract and onnxruntime.
mod common;

use ndarray::{ArrayD, Axis};
use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::hessian::{self, HessianOptions, LayerSensitivity};
use onnx_compress::ir::op::Attrs;
use onnx_compress::ir::Model;
use onnx_compress::onnx::tensor;
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::passes::mixed_precision::{
    apply_assignment, joint, mixed_precision, pareto, round_trip, select, sensitivities, solve,
    Budget, MixedPrecisionOptions, Precision, Selection,
};
use onnx_compress::passes::{run_passes, PassContext};
use onnx_compress::runtime::{simulation_graph, Runner};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

// ---- knapsack ----

fn brute(classes: &[Vec<(u64, f64)>], budget: u64) -> Option<f64> {
    let mut best: Option<f64> = None;
    let total: usize = classes.iter().map(|c| c.len()).product();
    for mut code in 0..total {
        let (mut cost, mut value) = (0u64, 0f64);
        for c in classes {
            let k = code % c.len();
            code /= c.len();
            cost += c[k].0;
            value += c[k].1;
        }
        if cost <= budget && best.is_none_or(|b| value < b) {
            best = Some(value);
        }
    }
    best
}

fn random_instance(rng: &mut rand_chacha::ChaCha8Rng) -> Vec<Vec<(u64, f64)>> {
    let layers = rng.random_range(1..=6);
    (0..layers)
        .map(|_| {
            let k = rng.random_range(1..=4);
            (0..k)
                .map(|_| (rng.random_range(1..200u64) * 3, rng.random::<f64>()))
                .collect()
        })
        .collect()
}

#[test]
fn knapsack_is_exact_against_brute_force() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for _ in 0..500 {
        let classes = random_instance(&mut rng);
        let max: u64 = classes
            .iter()
            .map(|c| c.iter().map(|o| o.0).max().unwrap())
            .sum();
        let budget = rng.random_range(0..=max + 10);
        let got = solve(&classes, budget, 1 << 20);
        let want = brute(&classes, budget);
        match (got, want) {
            (None, None) => {}
            (Some(s), Some(w)) => {
                assert!(s.exact);
                assert!(s.cost <= budget);
                assert!(
                    (s.value - w).abs() < 1e-9,
                    "{classes:?} budget {budget}: {} vs {w}",
                    s.value
                );
                let recomputed: f64 = s.choice.iter().zip(&classes).map(|(&k, c)| c[k].1).sum();
                assert!((recomputed - s.value).abs() < 1e-9);
            }
            (g, w) => panic!("{classes:?} budget {budget}: {g:?} vs {w:?}"),
        }
    }
}

#[test]
fn coarse_knapsack_stays_feasible_and_near_optimal() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    for _ in 0..300 {
        let classes = random_instance(&mut rng);
        let max: u64 = classes
            .iter()
            .map(|c| c.iter().map(|o| o.0).max().unwrap())
            .sum();
        let budget = rng.random_range(0..=max);
        // 16 buckets: costs rounded up; any answer must fit the true budget.
        if let Some(s) = solve(&classes, budget, 16) {
            assert!(
                s.cost <= budget,
                "{classes:?} budget {budget}: cost {}",
                s.cost
            );
            assert!(s.value >= brute(&classes, budget).unwrap() - 1e-9);
        }
    }
}

#[test]
fn pareto_frontier_is_monotone_and_matches_solve() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..50 {
        let classes = random_instance(&mut rng);
        let f = pareto(&classes, 1000, 1 << 20);
        for w in f.windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 > w[1].1, "{f:?}");
        }
        for &(cost, value) in &f {
            let s = solve(&classes, cost, 1 << 20).unwrap();
            assert!((s.value - value).abs() < 1e-9);
        }
    }
}

// ---- digits ----

fn digits() -> Option<(Model, CalibrationSet)> {
    digits_model("digits_cnn.onnx")
}

/// A trained digits model from testdata, BN folded, with the first 128 calibration samples (the
/// torch reference's; `HESSIAN_CALIB` overrides).
fn digits_model(file: &str) -> Option<(Model, CalibrationSet)> {
    digits_model_with(file, 128)
}

fn digits_model_with(file: &str, samples: usize) -> Option<(Model, CalibrationSet)> {
    let path = root().join(file);
    if !path.exists() {
        eprintln!("testdata/{file} missing: skipping");
        return None;
    }
    let mut m = onnx_compress::ir::Model::load(&path).unwrap();
    run_passes(&mut m, &["fuse", "cleanup"], &PassContext::default()).unwrap();
    let calib = CalibrationSet::load(
        &root().join("digits_calib_x.npy"),
        &m,
        &DataOptions {
            batch_size: 64,
            max_samples: Some(
                std::env::var("HESSIAN_CALIB")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(samples),
            ),
            ..Default::default()
        },
    )
    .unwrap();
    Some((m, calib))
}

fn logits(model: &ModelProto, x: &ArrayD<f32>) -> ArrayD<f32> {
    let (sim, _) = simulation_graph(model).unwrap();
    let r = Runner::new(&sim, &[("input".into(), x.shape().to_vec())], &[]).unwrap();
    r.run(std::slice::from_ref(x)).unwrap().remove(0)
}

/// Mean KL(softmax(a) || softmax(b)) over rows, SQNR in dB, accuracy of b.
fn fidelity(a: &ArrayD<f32>, b: &ArrayD<f32>, labels: Option<&[i64]>) -> (f64, f64, f64) {
    let kl = hessian::loss_sum(a, b, true) / a.shape()[0] as f64;
    let sig: f64 = a.iter().map(|&v| (v as f64).powi(2)).sum();
    let err: f64 = a
        .iter()
        .zip(b.iter())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let acc = labels.map_or(f64::NAN, |l| {
        b.axis_iter(Axis(0))
            .zip(l)
            .filter(|(row, &y)| {
                let am = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
                    .0;
                am as i64 == y
            })
            .count() as f64
            / l.len() as f64
    });
    (kl, 10.0 * (sig / err).log10(), acc)
}

fn calib_x(calib: &CalibrationSet) -> ArrayD<f32> {
    let views: Vec<_> = calib.batches.iter().map(|b| b[0].view()).collect();
    ndarray::concatenate(Axis(0), &views).unwrap()
}

fn sens(m: &Model, calib: &CalibrationSet) -> Vec<LayerSensitivity> {
    hessian::sensitivity(m, &calib.batches, &HessianOptions::default()).unwrap()
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let rank = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        for (pos, &i) in idx.iter().enumerate() {
            r[i] = pos as f64;
        }
        r
    };
    let (ra, rb) = (rank(a), rank(b));
    let n = a.len() as f64;
    let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

const BRUTE: Precision = Precision::Int4;

#[test]
fn digits_ranking_agrees_with_brute_force_int4_sensitivity() {
    let Some((m, calib)) = digits() else { return };
    let s = sens(&m, &calib);
    assert!(s.len() >= 5, "{} layers", s.len());
    let x = calib_x(&calib);
    let base = m.to_proto().unwrap();
    let reference = logits(&base, &x);
    let mut predicted = Vec::new();
    let mut measured = Vec::new();
    for l in &s {
        // Brute force: this layer alone int4 (fake-quantized in f32), loss measured directly.
        let mut q = m.clone();
        let w = tensor::to_f32(q.graph.constant(&l.weight).unwrap()).unwrap();
        let d = round_trip(&w, l.out_axis, BRUTE);
        let err2: f64 = w
            .iter()
            .zip(d.iter())
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum();
        q.graph
            .initializers
            .insert(l.weight.clone(), tensor::from_f32(&l.weight, &d));
        let out = logits(&q.to_proto().unwrap(), &x);
        let (kl, _, _) = fidelity(&reference, &out, None);
        // ½ Ω predicts the loss increase.
        let omega = l.trace_per_param * err2;
        eprintln!(
            "{:>12} n={:>5} Tr={:>10.4} ±{:>8.4} ({:>2} samples) ½Ω_int4={:.3e} measured KL={:.3e}",
            l.node,
            l.params,
            l.hessian_trace,
            l.hessian_trace_stderr,
            l.samples,
            0.5 * omega,
            kl
        );
        predicted.push(omega);
        measured.push(kl);
    }
    // Measured only: ½Ω assumes the quantization error is isotropic in the Hessian's eyes; on
    // digits it ranks the layers' int4 loss increase with Spearman ≈ 0.83.
    let rho = spearman(&predicted, &measured);
    eprintln!("Spearman(Ω_int4, brute-force int4 KL) = {rho:.3}");
    assert!(rho > 0.5, "Spearman {rho}");
}

/// Against exact traces from torch autograd (`testdata/hessian_reference.py`, committed JSON):
/// same model (BN unfused), same 128 calibration samples, same KL loss.
#[test]
fn digits_traces_agree_with_torch_autograd_reference() {
    let path = root().join("hessian_reference.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return eprintln!("testdata/hessian_reference.json missing: skipping");
    };
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = onnx_compress::ir::Model::load(&root().join("digits_cnn.onnx")).unwrap();
    let calib = CalibrationSet::load(
        &root().join("digits_calib_x.npy"),
        &m,
        &DataOptions {
            batch_size: 64,
            max_samples: Some(128),
            ..Default::default()
        },
    )
    .unwrap();
    let s = sens(&m, &calib);
    let (mut ours, mut exact) = (Vec::new(), Vec::new());
    for r in reference["layers"].as_array().unwrap() {
        let l = s
            .iter()
            .find(|l| l.weight == r["weight"].as_str().unwrap())
            .unwrap();
        let t = r["trace"].as_f64().unwrap();
        let rel = (l.hessian_trace - t).abs() / t;
        eprintln!(
            "{:>20} Hutchinson {:>9.4} ± {:.4}  exact {:>9.4}  rel err {rel:.3}",
            l.weight, l.hessian_trace, l.hessian_trace_stderr, t
        );
        assert!(rel < 0.15, "{}: {} vs {t}", l.weight, l.hessian_trace);
        ours.push(l.trace_per_param);
        exact.push(r["trace_per_param"].as_f64().unwrap());
    }
    let rho = spearman(&ours, &exact);
    eprintln!("Spearman(Tr/n Hutchinson, Tr/n autograd) = {rho:.3}");
    assert!(rho >= 0.9, "Spearman {rho}");
}

/// Greedy int4 -> int8 upgrades in `order` while the bit budget allows.
fn greedy(s: &[LayerSensitivity], order: &[usize], budget_bits: u64) -> Vec<Precision> {
    let mut p = vec![Precision::Int4; s.len()];
    let mut used: u64 = s.iter().map(|l| 4 * l.params as u64).sum();
    for &i in order {
        if used + 4 * s[i].params as u64 <= budget_bits {
            used += 4 * s[i].params as u64;
            p[i] = Precision::Int8;
        }
    }
    p
}

/// Weight-only fidelity of one assignment on the 360 test samples.
#[derive(Debug, Clone, Copy)]
struct Score {
    bits: f64,
    kl: f64,
    sqnr: f64,
    acc: f64,
}

/// A model, its sensitivities and the test set, with a cache of evaluated assignments.
struct Bench {
    m: Model,
    calib: CalibrationSet,
    s: Vec<LayerSensitivity>,
    x: ArrayD<f32>,
    y: Vec<i64>,
    reference: ArrayD<f32>,
    cache: std::collections::HashMap<Vec<Precision>, Score>,
}

impl Bench {
    /// All 200 calibration samples (`HESSIAN_CALIB` overrides), as the CLI would use them.
    fn new(file: &str) -> Option<Bench> {
        let (m, calib) = digits_model_with(file, 200)?;
        let mut o = HessianOptions::default();
        if let Some(v) = std::env::var("HESSIAN_PROBES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            o.max_samples = v;
            o.rel_tol = 1e-3;
        }
        if let Some(v) = std::env::var("HESSIAN_EPS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            o.rel_eps = v;
        }
        let mo = MixedPrecisionOptions {
            hessian: o,
            ..Default::default()
        };
        let s = sensitivities(&m, &calib.batches, &mo).unwrap();
        let x: ArrayD<f32> = ndarray_npy::read_npy(root().join("digits_test_x.npy")).unwrap();
        let y: ndarray::Array1<i64> =
            ndarray_npy::read_npy(root().join("digits_test_y.npy")).unwrap();
        let reference = logits(&m.to_proto().unwrap(), &x);
        Some(Bench {
            m,
            calib,
            s,
            x,
            y: y.to_vec(),
            reference,
            cache: Default::default(),
        })
    }

    fn total(&self) -> u64 {
        self.s.iter().map(|l| l.params as u64).sum()
    }

    /// Emit the assignment (weights only) with the pass's own code and run it in tract.
    fn score(&mut self, p: &[Precision]) -> Score {
        if let Some(&sc) = self.cache.get(p) {
            return sc;
        }
        let assign: Vec<(String, Precision)> = self
            .s
            .iter()
            .zip(p)
            .map(|(l, &p)| (l.weight.clone(), p))
            .collect();
        let mut q = self.m.clone();
        let o = MixedPrecisionOptions {
            quantize_activations: false,
            ..Default::default()
        };
        apply_assignment(&mut q, &assign, &o, &self.calib).unwrap();
        let out = logits(&q.to_proto().unwrap(), &self.x);
        let (kl, sqnr, acc) = fidelity(&self.reference, &out, Some(&self.y));
        let bits: u64 = p
            .iter()
            .zip(&self.s)
            .map(|(p, l)| p.bits() * l.params as u64)
            .sum();
        let sc = Score {
            bits: bits as f64 / self.total() as f64,
            kl,
            sqnr,
            acc,
        };
        self.cache.insert(p.to_vec(), sc);
        sc
    }

    fn names(&self, p: &[Precision], which: Precision) -> String {
        let v: Vec<String> = p
            .iter()
            .zip(&self.s)
            .filter(|(&q, _)| q == which)
            .map(|(_, l)| short(&l.node))
            .collect();
        if v.is_empty() {
            "-".into()
        } else {
            v.join(", ")
        }
    }
}

/// A node name without the exporter's path: `/res1_a/res1_a.0/Conv` -> `res1_a`,
/// `/features/features.0/features.0.0/Conv` -> `features.0`, `/fc2/Gemm` -> `fc2`.
fn short(node: &str) -> String {
    let parts: Vec<&str> = node.trim_start_matches('/').split('/').collect();
    match parts.len() {
        0 | 1 => node.to_string(),
        2 => parts[0].to_string(),
        k => parts[k - 2]
            .strip_suffix(".0")
            .unwrap_or(parts[k - 2])
            .to_string(),
    }
}

/// What [`compare`] measured at one budget.
struct Comparison {
    hessian: Score,
    /// Deterministic baselines, labelled.
    baselines: Vec<(&'static str, Score)>,
    random: Vec<Score>,
}

impl Comparison {
    fn random_mean_kl(&self) -> f64 {
        self.random.iter().map(|r| r.kl).sum::<f64>() / self.random.len() as f64
    }
}

fn budget_from_env() -> f64 {
    std::env::var("DIGITS_AVG_BITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.5)
}

/// The Hessian assignment (`select`, as the pass makes it; and the same knapsack restricted to
/// int4/int8) against greedy int4 -> int8 fills in fixed orders and in `n_random` seeded random
/// orders, all at `avg_bits` payload bits per weight, weights only. Prints the tables.
fn compare(b: &mut Bench, avg_bits: f64, n_random: usize) -> Comparison {
    let n = b.s.len();
    let total = b.total();
    let budget_bits = (avg_bits * total as f64) as u64;
    let opts = MixedPrecisionOptions {
        budget: Some(Budget::AvgBits(avg_bits)),
        ..Default::default()
    };
    let report = select(&b.m, &b.s, Budget::AvgBits(avg_bits), &opts).unwrap();
    assert!(report.exact && report.avg_bits <= avg_bits);
    assert_eq!(report.selection, Selection::Joint);
    let hess: Vec<Precision> = report.layers.iter().map(|l| l.precision).collect();
    let trace_opts = MixedPrecisionOptions {
        selection: Selection::Trace,
        ..opts.clone()
    };
    let trace_report = select(&b.m, &b.s, Budget::AvgBits(avg_bits), &trace_opts).unwrap();
    let trace: Vec<Precision> = trace_report.layers.iter().map(|l| l.precision).collect();

    let order: Vec<usize> = (0..n).collect();
    let reverse: Vec<usize> = order.iter().rev().copied().collect();
    let mut small_first = order.clone();
    small_first.sort_by_key(|&i| (b.s[i].params, i));
    let large_first: Vec<usize> = small_first.iter().rev().copied().collect();
    let fixed: Vec<(&'static str, Vec<Precision>)> = vec![
        (
            "hessian (int4/int8 only)",
            joint_int4_int8_choice(&b.s, budget_bits),
        ),
        ("HAWQ-v2 ΣΩ", trace),
        (
            "HAWQ-v2 ΣΩ (int4/int8 only)",
            int4_int8_choice(&trace_report, budget_bits),
        ),
        ("layer order", greedy(&b.s, &order, budget_bits)),
        ("reverse layer order", greedy(&b.s, &reverse, budget_bits)),
        (
            "param count, smallest first",
            greedy(&b.s, &small_first, budget_bits),
        ),
        (
            "param count, largest first",
            greedy(&b.s, &large_first, budget_bits),
        ),
        ("uniform int4", vec![Precision::Int4; n]),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let randoms: Vec<Vec<Precision>> = (0..n_random)
        .map(|_| {
            let mut perm = order.clone();
            for i in (1..n).rev() {
                perm.swap(i, rng.random_range(0..=i));
            }
            greedy(&b.s, &perm, budget_bits)
        })
        .collect();

    let fp32 = fidelity(&b.reference, &b.reference, Some(&b.y)).2;
    eprintln!(
        "\n{avg_bits} bits/weight, {} layers, {total} weights; fp32 test accuracy {:.2}%",
        n,
        100.0 * fp32
    );
    eprintln!("| assignment | bits/weight | int8 layers (rest int4) | KL vs fp32 | logits SQNR | test accuracy |");
    eprintln!("|---|---|---|---|---|---|");
    let h = b.score(&hess);
    let mut extra = String::new();
    for p in [Precision::Fp32, Precision::Fp16] {
        if hess.contains(&p) {
            extra += &format!("; {}: {}", p.label(), b.names(&hess, p));
        }
    }
    eprintln!(
        "| **hessian** | {:.2} | {}{extra} | {:.2e} | {:.1} dB | {:.2}% |",
        h.bits,
        b.names(&hess, Precision::Int8),
        h.kl,
        h.sqnr,
        100.0 * h.acc
    );
    let mut baselines = Vec::new();
    for (label, p) in &fixed {
        let sc = b.score(p);
        assert!(sc.bits <= avg_bits);
        eprintln!(
            "| {label} | {:.2} | {} | {:.2e} | {:.1} dB | {:.2}% |",
            sc.bits,
            b.names(p, Precision::Int8),
            sc.kl,
            sc.sqnr,
            100.0 * sc.acc
        );
        baselines.push((*label, sc));
    }
    let random: Vec<Score> = randoms.iter().map(|p| b.score(p)).collect();
    let distinct: std::collections::HashSet<&Vec<Precision>> = randoms.iter().collect();
    let mean = |f: &dyn Fn(&Score) -> f64| random.iter().map(f).sum::<f64>() / random.len() as f64;
    let best = random.iter().min_by(|a, c| a.kl.total_cmp(&c.kl)).unwrap();
    eprintln!(
        "| random order, mean of {n_random} | {:.2} | ({} distinct assignments) | {:.2e} | {:.1} dB | {:.2}% |",
        mean(&|r| r.bits),
        distinct.len(),
        mean(&|r| r.kl),
        mean(&|r| r.sqnr),
        100.0 * mean(&|r| r.acc)
    );
    eprintln!(
        "| random order, best of {n_random} (by KL) | {:.2} | | {:.2e} | {:.1} dB | {:.2}% |",
        best.bits,
        best.kl,
        best.sqnr,
        100.0 * best.acc
    );
    let beaten = random.iter().filter(|r| r.kl < h.kl * 0.9999).count();
    let tied = random
        .iter()
        .filter(|r| (r.kl - h.kl).abs() <= h.kl * 1e-4)
        .count();
    eprintln!(
        "hessian vs {n_random} random orders: {beaten} lower KL, {tied} tie, {} higher; \
         random acc range {:.2}%..{:.2}%",
        n_random - beaten - tied,
        100.0 * random.iter().map(|r| r.acc).fold(f64::INFINITY, f64::min),
        100.0 * random.iter().map(|r| r.acc).fold(0.0, f64::max),
    );
    Comparison {
        hessian: h,
        baselines,
        random,
    }
}

/// Other budgets: `DIGITS_AVG_BITS=5.0 cargo test --test passes_mixed_precision digits_ -- --nocapture`.
#[test]
fn digits_hessian_assignment_beats_uniform_mixes_at_4_5_bits() {
    let Some(mut b) = Bench::new("digits_cnn.onnx") else {
        return;
    };
    let c = compare(&mut b, budget_from_env(), 32);
    // Six layers and little slack: several baselines land on the Hessian's choice, so the claim
    // here is only "never worse".
    let h = c.hessian.kl;
    for (label, sc) in &c.baselines {
        assert!(
            h <= sc.kl * 1.0001,
            "hessian KL {h} worse than {label} {}",
            sc.kl
        );
    }
    assert!(h <= c.random_mean_kl(), "{h} vs {}", c.random_mean_kl());
}

/// A labelled row of a [`Comparison`].
fn row(c: &Comparison, label: &str) -> Score {
    c.baselines.iter().find(|x| x.0 == label).unwrap().1
}

/// `digits_smooth` (the 11-layer network trained with label smoothing, so the KL is spread over
/// many samples): at 4.5 bits the joint Hessian choice has lower test KL than every fixed order
/// (layer order, reverse, parameter count both ways), uniform int4, HAWQ-v2's ΣΩ knapsack and
/// each of 32 random orders. Other budgets (BENCHMARKS.md): `DIGITS_AVG_BITS=5.0 ...`.
#[test]
fn digits_smooth_hessian_assignment_beats_orders_and_random() {
    let Some(mut b) = Bench::new("digits_smooth.onnx") else {
        return;
    };
    let avg_bits = budget_from_env();
    let c = compare(&mut b, avg_bits, 32);
    if avg_bits != 4.5 {
        return eprintln!("assertions are for 4.5 bits only; {avg_bits} bits: table printed");
    }
    let h = c.hessian.kl;
    for label in [
        "layer order",
        "reverse layer order",
        "param count, smallest first",
        "param count, largest first",
        "uniform int4",
        "HAWQ-v2 ΣΩ",
    ] {
        let other = row(&c, label).kl;
        assert!(h < other, "hessian KL {h} not below {label} {other}");
    }
    // int4/int8 only, like for like: never worse than the fixed orders.
    let h44 = row(&c, "hessian (int4/int8 only)").kl;
    for label in [
        "layer order",
        "reverse layer order",
        "param count, smallest first",
    ] {
        let other = row(&c, label).kl;
        assert!(
            h44 <= other * 1.0001,
            "int4/int8 KL {h44} vs {label} {other}"
        );
    }
    let best_random = c.random.iter().map(|r| r.kl).fold(f64::INFINITY, f64::min);
    assert!(
        h < best_random,
        "hessian KL {h} vs best random order {best_random}"
    );
}

/// `digits_deep` (same network, no label smoothing: very confident, a handful of samples carry
/// most of the KL, so rankings between good assignments are noise-level; see BENCHMARKS.md). At
/// 4.5 bits the joint choice beats uniform int4, largest-first and the random mean with a
/// margin; plain layer order has lower test KL here. Only what holds with a margin is asserted.
#[test]
fn digits_deep_hessian_assignment_vs_orders_and_random() {
    let Some(mut b) = Bench::new("digits_deep.onnx") else {
        return;
    };
    assert!(b.s.len() >= 10, "{} layers", b.s.len());
    let avg_bits = budget_from_env();
    let c = compare(&mut b, avg_bits, 32);
    if avg_bits != 4.5 {
        return eprintln!("assertions are for 4.5 bits only; {avg_bits} bits: table printed");
    }
    let h = c.hessian.kl;
    for label in ["uniform int4", "param count, largest first"] {
        let other = row(&c, label).kl;
        assert!(h * 1.5 < other, "hessian KL {h} vs {label} {other}");
    }
    let mean = c.random_mean_kl();
    assert!(h * 1.2 < mean, "hessian KL {h} vs the random mean {mean}");
}

/// Diagnostic behind BENCHMARKS.md (prints only): per layer, ½Ω_int4 and the joint model's
/// per-layer term vs the measured KL of that layer alone at int4, and the KL gained by upgrading
/// it alone to int8 from all-int4; the KL of the selections on the calibration samples; every
/// feasible int4/int8 assignment ranked by test KL, with the predicted joint loss.
/// `DIGITS_MODEL=digits_smooth.onnx cargo test --test passes_mixed_precision digits_diagnostics -- --ignored --nocapture`
#[test]
#[ignore]
fn digits_diagnostics() {
    let file = std::env::var("DIGITS_MODEL").unwrap_or_else(|_| "digits_deep.onnx".into());
    let Some(mut b) = Bench::new(&file) else {
        return;
    };
    let n = b.s.len();
    let avg = budget_from_env();
    let budget_bits = (avg * b.total() as f64) as u64;
    let all4 = vec![Precision::Int4; n];
    let base = b.score(&all4);
    eprintln!("all int4: test KL {:.3e}", base.kl);
    eprintln!("| layer | params | ½Ω int4 | joint model, alone int4 | KL, this layer alone int4 | KL gained by int4 -> int8 from all-int4 |");
    eprintln!("|---|---|---|---|---|---|");
    let (mut pred, mut alone, mut gains, mut sum_alone) = (vec![], vec![], vec![], 0.0);
    for i in 0..n {
        let l = b.s[i].clone();
        let w = tensor::to_f32(b.m.graph.constant(&l.weight).unwrap()).unwrap();
        let d = round_trip(&w, l.out_axis, Precision::Int4);
        let err2: f64 = w
            .iter()
            .zip(d.iter())
            .map(|(&a, &c)| (a as f64 - c as f64).powi(2))
            .sum();
        let mut q = b.m.clone();
        q.graph
            .initializers
            .insert(l.weight.clone(), tensor::from_f32(&l.weight, &d));
        let kl_alone = fidelity(&b.reference, &logits(&q.to_proto().unwrap(), &b.x), None).0;
        let mut p = all4.clone();
        p[i] = Precision::Int8;
        let gain = base.kl - b.score(&p).kl;
        let joint_alone = 0.5
            * l.responses[0]
                .iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>();
        eprintln!(
            "| {} | {} | {:.2e} | {joint_alone:.2e} | {kl_alone:.2e} | {gain:.2e} |",
            short(&l.node),
            l.params,
            0.5 * l.trace_per_param * err2
        );
        pred.push(l.trace_per_param * err2);
        alone.push(kl_alone);
        gains.push(gain);
        sum_alone += kl_alone;
    }
    // The best any additive per-layer criterion could do: a knapsack on the measured gains.
    let classes: Vec<Vec<(u64, f64)>> = (0..n)
        .map(|i| {
            let p = b.s[i].params as u64;
            vec![(4 * p, gains[i]), (8 * p, 0.0)]
        })
        .collect();
    let sol = solve(&classes, budget_bits, 1 << 20).unwrap();
    let p: Vec<Precision> = sol
        .choice
        .iter()
        .map(|&k| [Precision::Int4, Precision::Int8][k])
        .collect();
    eprintln!(
        "knapsack on the measured single-layer gains: {} -> test KL {:.3e}",
        b.names(&p, Precision::Int8),
        b.score(&p).kl
    );
    eprintln!(
        "Spearman(Ω int4, KL alone) {:.2}; sum of single-layer KLs {sum_alone:.3e} vs all-int4 {:.3e}",
        spearman(&pred, &alone),
        base.kl
    );
    // In-sample: the calibration samples the selection was made on.
    let cx = calib_x(&b.calib);
    let cref = logits(&b.m.to_proto().unwrap(), &cx);
    let report = select(
        &b.m,
        &b.s,
        Budget::AvgBits(avg),
        &MixedPrecisionOptions::default(),
    )
    .unwrap();
    let hess: Vec<Precision> = report.layers.iter().map(|l| l.precision).collect();
    let order: Vec<usize> = (0..n).collect();
    let trace_int = {
        let o = MixedPrecisionOptions {
            selection: Selection::Trace,
            ..Default::default()
        };
        int4_int8_choice(
            &select(&b.m, &b.s, Budget::AvgBits(avg), &o).unwrap(),
            budget_bits,
        )
    };
    let joint_int = joint_int4_int8_choice(&b.s, budget_bits);
    for (label, p) in [
        ("hessian (joint)", hess),
        ("hessian (joint, int4/int8 only)", joint_int.clone()),
        ("HAWQ-v2 ΣΩ (int4/int8 only)", trace_int.clone()),
        ("layer order", greedy(&b.s, &order, budget_bits)),
    ] {
        let assign: Vec<(String, Precision)> =
            b.s.iter()
                .zip(&p)
                .map(|(l, &p)| (l.weight.clone(), p))
                .collect();
        let mut q = b.m.clone();
        let o = MixedPrecisionOptions {
            quantize_activations: false,
            ..Default::default()
        };
        apply_assignment(&mut q, &assign, &o, &b.calib).unwrap();
        let out = logits(&q.to_proto().unwrap(), &cx);
        let mut per: Vec<f64> = (0..out.shape()[0])
            .map(|i| {
                let r = |a: &ArrayD<f32>| a.slice_axis(Axis(0), (i..i + 1).into()).to_owned();
                hessian::loss_sum(&r(&cref), &r(&out), true)
            })
            .collect();
        let total: f64 = per.iter().sum();
        per.sort_by(|a, c| c.total_cmp(a));
        eprintln!(
            "{label}: KL on the {} calibration samples {:.3e} (top 5 samples: {:.0}% of it)",
            per.len(),
            total / per.len() as f64,
            100.0 * per[..5].iter().sum::<f64>() / total
        );
    }
    let mut feasible: Vec<(f64, String)> = (0u32..1 << n)
        .map(|code| {
            (0..n)
                .map(|i| {
                    if code >> i & 1 == 1 {
                        Precision::Int8
                    } else {
                        Precision::Int4
                    }
                })
                .collect::<Vec<_>>()
        })
        .filter(|p| {
            p.iter()
                .zip(&b.s)
                .map(|(p, l)| p.bits() * l.params as u64)
                .sum::<u64>()
                <= budget_bits
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|p| (b.score(&p).kl, b.names(&p, Precision::Int8)))
        .collect();
    feasible.sort_by(|a, c| a.0.total_cmp(&c.0));
    let rank = |p: &[Precision]| {
        let name = b.names(p, Precision::Int8);
        feasible.iter().position(|f| f.1 == name).unwrap() + 1
    };
    eprintln!(
        "{} feasible int4/int8 assignments; best by test KL {:.3e} ({}); by test KL the joint \
         choice (int4/int8 only) ranks {}, HAWQ-v2 ΣΩ (int4/int8 only) {}",
        feasible.len(),
        feasible[0].0,
        feasible[0].1,
        rank(&joint_int),
        rank(&trace_int)
    );
}

// ---- the pass ----

fn python_check(q: &Model, float: &Model, tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (qp, fp) = (dir.path().join("q.onnx"), dir.path().join("f.onnx"));
    let o = onnx_compress::onnx::save::SaveOptions::default();
    onnx_compress::ir::Model::save(q, &qp, &o).unwrap();
    onnx_compress::ir::Model::save(float, &fp, &o).unwrap();
    let script = r#"
import sys
try:
    import onnx, onnxruntime as ort, numpy as np
except Exception:
    print("SKIP"); sys.exit(0)
q, f, xp = sys.argv[1], sys.argv[2], sys.argv[3]
onnx.checker.check_model(onnx.load(q), full_check=True)
so = ort.SessionOptions(); so.log_severity_level = 3
x = np.load(xp)[:64]
a = ort.InferenceSession(q, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
b = ort.InferenceSession(f, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
print("AGREE", float((a.argmax(1) == b.argmax(1)).mean()))
"#;
    let Ok(out) = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&qp)
        .arg(&fp)
        .arg(root().join("digits_test_x.npy"))
        .output()
    else {
        return eprintln!("python3 not available: skipping the onnxruntime check");
    };
    assert!(
        out.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("SKIP") {
        return eprintln!("onnx/onnxruntime missing: skipping");
    }
    let agree: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("AGREE "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("{tag}: ORT top-1 agreement with fp32 {agree}");
    assert!(agree >= 0.9, "{tag}: {agree}");
}

fn ops(m: &Model, op: &str) -> usize {
    m.graph
        .node_indices()
        .filter(|&ix| m.graph.node(ix).op_type() == op)
        .count()
}

#[test]
fn no_budget_leaves_the_model_unchanged() {
    let Some((m, calib)) = digits() else { return };
    let mut q = m.clone();
    let stats = mixed_precision(&mut q, &MixedPrecisionOptions::default(), Some(&calib)).unwrap();
    assert_eq!(stats.changes, 0);
    assert!(stats.notes[0].contains("no size budget"));
    assert_eq!(q.to_proto().unwrap(), m.to_proto().unwrap());
}

#[test]
fn pass_emits_mixed_weights_that_run_in_tract_and_onnxruntime() {
    let Some((m, calib)) = digits() else { return };
    let fp32_size = onnx_compress::onnx::save::encode(&m.to_proto().unwrap())
        .unwrap()
        .len();
    for (budget, acts, block_size) in [
        (Budget::Ratio(0.2), false, None),
        (Budget::AvgBits(4.5), true, None),
        (Budget::Ratio(0.45), true, None),
        // int4 in blocks of 16 input channels where a layer has that many (pw convs, fc).
        (Budget::Ratio(0.3), true, Some(16)),
    ] {
        let mut q = m.clone();
        let opts = MixedPrecisionOptions {
            budget: Some(budget),
            quantize_activations: acts,
            block_size,
            ..Default::default()
        };
        let stats = mixed_precision(&mut q, &opts, Some(&calib)).unwrap();
        eprintln!("{budget:?}: {:?}", stats.notes);
        let sel = &stats.details["selection"];
        let layers = sel["layers"].as_array().unwrap();
        let has = |p: &str| layers.iter().any(|l| l["precision"] == p);
        for l in layers {
            for key in [
                "node",
                "weight",
                "hessian_trace",
                "hessian_trace_stderr",
                "params",
                "precision",
                "bytes",
                "omega",
            ] {
                assert!(!l[key].is_null(), "{key} missing in {l}");
            }
        }
        assert!(!sel["pareto"].as_array().unwrap().is_empty());
        // Opset 21 only with int4.
        let opset = q.opset("").unwrap();
        assert_eq!(opset >= 21, has("int4"), "opset {opset}");
        assert_eq!(ops(&q, "Cast") > 0, has("fp16"));
        let blocked = layers
            .iter()
            .filter(|l| l["precision"] == "int4" && !l["int4_block_size"].is_null())
            .count();
        let block_dqs = q
            .graph
            .node_indices()
            .filter(|&ix| {
                let n = q.graph.node(ix);
                n.op_type() == "DequantizeLinear" && n.attr_int("block_size").unwrap() == Some(16)
            })
            .count();
        assert_eq!(blocked, block_dqs, "{budget:?}");
        if block_size.is_some() {
            assert!(blocked > 0, "no block-wise int4 layer chosen");
        }
        // The reported bytes are the bytes written for each weight.
        for l in layers {
            let w = l["weight"].as_str().unwrap();
            // The weight itself (fp32), or the initializers its DequantizeLinear / Cast reads.
            let written: usize = match q.graph.initializers.get(w) {
                Some(t) => tensor::payload_bytes(t).unwrap(),
                None => {
                    let (ix, _) = q.graph.producer(w).unwrap();
                    q.graph
                        .node(ix)
                        .input
                        .iter()
                        .filter_map(|i| q.graph.initializers.get(i))
                        .map(|t| tensor::payload_bytes(t).unwrap())
                        .sum()
                }
            };
            assert_eq!(written as u64, l["bytes"].as_u64().unwrap(), "{w}");
        }
        let size = onnx_compress::onnx::save::encode(&q.to_proto().unwrap())
            .unwrap()
            .len();
        let chosen = sel["total_bytes"].as_u64().unwrap() as usize;
        let fp32_w = sel["fp32_bytes"].as_u64().unwrap() as usize;
        eprintln!("file {fp32_size} -> {size} bytes (weights {fp32_w} -> {chosen})");
        if !acts {
            // Weight-only: the file shrinks by the weight savings, up to names and nodes.
            assert!(
                size + fp32_w - chosen <= fp32_size + 512 * layers.len(),
                "{size} vs {fp32_size}"
            );
        }
        if let Budget::Ratio(r) = budget {
            assert!(chosen as f64 <= r * fp32_w as f64);
        }
        // tract: validator on the simulation graph.
        let v = onnx_compress::validate::validate(
            &m.to_proto().unwrap(),
            &q.to_proto().unwrap(),
            &onnx_compress::validate::ValidateOptions {
                input_shapes: vec![("input".into(), vec![8, 1, 8, 8])],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(v.status, onnx_compress::validate::Status::Checked, "{v:?}");
        python_check(&q, &m, &format!("{budget:?}"));
        // Idempotent: a second run leaves the result alone.
        let mut again = q.clone();
        let s2 = mixed_precision(&mut again, &opts, Some(&calib)).unwrap();
        assert_eq!(s2.changes, 0);
        assert_eq!(again.to_proto().unwrap(), q.to_proto().unwrap());
    }
}

#[test]
fn keep_fp32_and_forbid_int4_are_respected() {
    let Some((m, calib)) = digits() else { return };
    let s = sens(&m, &calib);
    let first = s[0].node.clone();
    let opts = MixedPrecisionOptions {
        keep_fp32: vec![regex_escape(&first)],
        allow_int4: false,
        ..Default::default()
    };
    let r = select(&m, &s, Budget::Ratio(0.4), &opts).unwrap();
    assert_eq!(r.layers[0].precision, Precision::Fp32);
    assert!(r.layers.iter().all(|l| l.precision != Precision::Int4));
    assert!(r.total_bytes as f64 <= 0.4 * r.fp32_bytes as f64);
    // Infeasible budget: a clear error.
    let err = select(&m, &s, Budget::Ratio(0.01), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("budget"), "{err}");
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// The pass's joint selection with only int4/int8 offered: exact knapsack on the per-layer terms,
/// then the same local search, from the responses `sensitivities` recorded (int4 first).
fn joint_int4_int8_choice(s: &[LayerSensitivity], budget_bits: u64) -> Vec<Precision> {
    let responses: Vec<Vec<Option<&[f32]>>> = s
        .iter()
        .map(|l| vec![Some(&l.responses[0][..]), Some(&l.responses[1][..])])
        .collect();
    let gram = joint::Gram::new(&responses);
    let costs: Vec<Vec<u64>> = s
        .iter()
        .map(|l| vec![4 * l.params as u64, 8 * l.params as u64])
        .collect();
    let diagonal: Vec<Vec<(u64, f64)>> = (0..s.len())
        .map(|l| (0..2).map(|k| (costs[l][k], gram.diagonal(l, k))).collect())
        .collect();
    let start = solve(&diagonal, budget_bits, 1 << 20).unwrap();
    let r = joint::refine(&gram, &costs, budget_bits, &start.choice);
    r.choice
        .iter()
        .map(|&k| [Precision::Int4, Precision::Int8][k])
        .collect()
}

/// The pass's Omega and exact knapsack with only int4/int8 offered: the like-for-like
/// counterpart of the greedy int4/int8 fills.
fn int4_int8_choice(
    report: &onnx_compress::passes::mixed_precision::MixedPrecisionReport,
    budget_bits: u64,
) -> Vec<Precision> {
    const CHOICES: [Precision; 2] = [Precision::Int4, Precision::Int8];
    let classes: Vec<Vec<(u64, f64)>> = report
        .layers
        .iter()
        .map(|l| {
            CHOICES
                .iter()
                .map(|p| (p.bits() * l.params as u64, l.omega[p]))
                .collect()
        })
        .collect();
    let sol = solve(&classes, budget_bits, 1 << 20).unwrap();
    assert!(sol.exact);
    sol.choice.iter().map(|&k| CHOICES[k]).collect()
}
