//! The Hutchinson estimator against exact Gauss–Newton traces.
mod common;

use common::{f32_tensor, model, node, value_info};
use ndarray::{Array2, ArrayD, Axis, IxDyn};
use onnx_compress::hessian::{
    self, hutchinson, sensitivity, sensitivity_with, HessianOptions, Loss,
};
use onnx_compress::ir::{op, Model};
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::onnx::tensor;
use onnx_compress::runtime::Runner;

const N: usize = 32;
const D_IN: usize = 8;
const D_H: usize = 16;
const D_OUT: usize = 5;

/// x[N,8] -> Gemm(W1[16,8], transB) -> Relu -> Gemm(W2[5,16], transB) -> y[N,5]
fn mlp() -> ModelProto {
    let mut g1 = node("Gemm", "fc1", &["x", "w1", "b1"], &["a"]);
    g1.attribute.push(op::attr_int("transB", 1));
    let mut g2 = node("Gemm", "fc2", &["h", "w2", "b2"], &["y"]);
    g2.attribute.push(op::attr_int("transB", 1));
    model(
        vec![g1, node("Relu", "relu", &["a"], &["h"]), g2],
        vec![value_info("x", &[N as i64, D_IN as i64])],
        vec![value_info("y", &[N as i64, D_OUT as i64])],
        vec![
            f32_tensor("w1", &[D_H, D_IN], 11),
            f32_tensor("b1", &[D_H], 12),
            f32_tensor("w2", &[D_OUT, D_H], 13),
            f32_tensor("b2", &[D_OUT], 14),
        ],
    )
}

fn input() -> ArrayD<f32> {
    let t = f32_tensor("x", &[N, D_IN], 99);
    tensor::to_f32(&t).unwrap()
}

fn weight(m: &ModelProto, name: &str) -> Array2<f64> {
    let t = m
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap();
    tensor::to_f64(t).unwrap().into_dimensionality().unwrap()
}

/// Exact GGN traces (w1, w2) of the mean per-row loss, analytically.
fn exact_traces(m: &ModelProto, kl: bool) -> (f64, f64) {
    let (w1, w2) = (weight(m, "w1"), weight(m, "w2"));
    let b1 = tensor::to_f64(
        m.graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name() == "b1")
            .unwrap(),
    )
    .unwrap();
    let b2 = tensor::to_f64(
        m.graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name() == "b2")
            .unwrap(),
    )
    .unwrap();
    let x = input()
        .mapv(|v| v as f64)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let (mut t1, mut t2) = (0.0, 0.0);
    for row in x.axis_iter(Axis(0)) {
        let a: Vec<f64> = (0..D_H).map(|j| w1.row(j).dot(&row) + b1[[j]]).collect();
        let h: Vec<f64> = a.iter().map(|&v| v.max(0.0)).collect();
        let y: Vec<f64> = (0..D_OUT)
            .map(|c| (0..D_H).map(|j| w2[[c, j]] * h[j]).sum::<f64>() + b2[[c]])
            .collect();
        // F = I (MSE, L = ½‖δ‖²) or diag(p) - ppᵀ (KL).
        let f = |c: usize, d: usize| -> f64 {
            if !kl {
                return if c == d { 1.0 } else { 0.0 };
            }
            let m = y.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = y.iter().map(|v| (v - m).exp()).sum();
            let p = |i: usize| (y[i] - m).exp() / s;
            if c == d {
                p(c) - p(c) * p(c)
            } else {
                -p(c) * p(d)
            }
        };
        let x2: f64 = row.iter().map(|v| v * v).sum();
        for j in 0..D_H {
            if a[j] > 0.0 {
                let mut gfg = 0.0;
                for c in 0..D_OUT {
                    for d in 0..D_OUT {
                        gfg += w2[[c, j]] * f(c, d) * w2[[d, j]];
                    }
                }
                t1 += gfg * x2;
            }
        }
        let h2: f64 = h.iter().map(|v| v * v).sum();
        t2 += (0..D_OUT).map(|c| f(c, c)).sum::<f64>() * h2;
    }
    (t1 / N as f64, t2 / N as f64)
}

fn estimate(m: &ModelProto, opts: &HessianOptions) -> Vec<(String, f64, f64)> {
    let model = Model::from_proto(m.clone()).unwrap();
    sensitivity(&model, &[vec![input().into()]], opts)
        .unwrap()
        .into_iter()
        .map(|s| (s.weight, s.hessian_trace, s.hessian_trace_stderr))
        .collect()
}

#[test]
fn hutchinson_matches_exact_gauss_newton_trace_on_mlp() {
    let m = mlp();
    for (loss, kl) in [(Loss::Mse, false), (Loss::Kl, true), (Loss::Auto, true)] {
        let (e1, e2) = exact_traces(&m, kl);
        let opts = HessianOptions {
            loss,
            max_samples: 128,
            ..Default::default()
        };
        let est = estimate(&m, &opts);
        assert_eq!(est.len(), 2);
        for ((name, t, se), exact) in est.iter().zip([e1, e2]) {
            let rel = (t - exact).abs() / exact;
            eprintln!(
                "{loss:?} {name}: estimate {t:.6} ± {se:.6}, exact {exact:.6}, rel err {rel:.4}"
            );
            assert!(rel < 0.05, "{loss:?} {name}: estimate {t} vs exact {exact}");
        }
    }
}

#[test]
fn step_size_does_not_bias_the_estimate() {
    let m = mlp();
    let at = |rel_eps: f64| {
        let opts = HessianOptions {
            rel_eps,
            loss: Loss::Kl,
            min_samples: 8,
            max_samples: 8,
            ..Default::default()
        };
        estimate(&m, &opts)
    };
    let (base, half, double) = (at(1e-3), at(5e-4), at(2e-3));
    for ((b, h), d) in base.iter().zip(&half).zip(&double) {
        for other in [h.1, d.1] {
            let rel = (other - b.1).abs() / b.1;
            assert!(
                rel < 0.02,
                "{}: eps change moved the estimate by {rel}",
                b.0
            );
        }
    }
}

#[test]
fn hutchinson_is_exact_for_diagonal_and_converges_for_dense() {
    // Diagonal H: vᵀHv = Tr(H) for every Rademacher v: stops at min_samples with zero error.
    let d = [1.0, 2.0, 3.0, 4.0];
    let opts = HessianOptions::default();
    let est = hutchinson(4, 7, &opts, |v| {
        Ok(v.iter().zip(&d).map(|(x, h)| (x * x) as f64 * h).sum())
    })
    .unwrap();
    assert_eq!(est.samples, opts.min_samples);
    assert!((est.mean - 10.0).abs() < 1e-12 && est.stderr == 0.0);
    // Dense H = 1 1ᵀ + I (n = 20): Tr = 40; the estimate is within 3 standard errors.
    let n = 20;
    let est = hutchinson(
        n,
        3,
        &HessianOptions {
            max_samples: 2000,
            ..opts
        },
        |v| {
            let s: f64 = v.iter().map(|&x| x as f64).sum();
            Ok(s * s + n as f64)
        },
    )
    .unwrap();
    assert!((est.mean - 40.0).abs() < 3.0 * est.stderr + 1e-9, "{est:?}");
    assert!(est.stderr <= 0.01 * est.mean || est.samples == 2000);
    // Deterministic.
    let again = hutchinson(
        n,
        3,
        &HessianOptions {
            max_samples: 2000,
            ..opts
        },
        |v| {
            let s: f64 = v.iter().map(|&x| x as f64).sum();
            Ok(s * s + n as f64)
        },
    )
    .unwrap();
    assert_eq!(est, again);
}

#[test]
fn residual_branch_values_come_from_upstream() {
    // x -> Gemm(w1) -> a; y = Gemm(a, w2) + a: w2's downstream model needs `a` as an input twice.
    let mut g1 = node("Gemm", "fc1", &["x", "w1"], &["a"]);
    g1.attribute.push(op::attr_int("transB", 1));
    let mut g2 = node("Gemm", "fc2", &["a", "w2"], &["b"]);
    g2.attribute.push(op::attr_int("transB", 1));
    let m = model(
        vec![g1, g2, node("Add", "add", &["a", "b"], &["y"])],
        vec![value_info("x", &[4, 6])],
        vec![value_info("y", &[4, 6])],
        vec![f32_tensor("w1", &[6, 6], 1), f32_tensor("w2", &[6, 6], 2)],
    );
    let x = ArrayD::from_shape_vec(
        IxDyn(&[4, 6]),
        (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
    )
    .unwrap();
    let model = Model::from_proto(m).unwrap();
    let opts = HessianOptions {
        loss: Loss::Mse,
        ..Default::default()
    };
    let s = sensitivity(&model, &[vec![x.clone().into()]], &opts).unwrap();
    // MSE with a linear map: w2's GGN trace = rows-mean of 6 * ‖a‖² (each output row sees a).
    let w1 = tensor::to_f64(&f32_tensor("w1", &[6, 6], 1))
        .unwrap()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let x64 = x
        .mapv(|v| v as f64)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let a = x64.dot(&w1.t());
    let exact = 6.0 * a.iter().map(|v| v * v).sum::<f64>() / 4.0;
    let t = s[1].hessian_trace;
    assert!((t - exact).abs() / exact < 0.05, "{t} vs {exact}");
}

#[test]
fn responses_share_one_layout_across_outputs_and_predict_the_loss() {
    // x -> Gemm(w1) -> a; y1 = Gemm(a, w2); y2 = Gemm(a, w3): w2 reaches only y1, w3 only y2.
    let gemm = |name: &str, ins: &[&str], out: &str| {
        let mut g = node("Gemm", name, ins, &[out]);
        g.attribute.push(op::attr_int("transB", 1));
        g
    };
    let m = model(
        vec![
            gemm("fc1", &["x", "w1"], "a"),
            gemm("fc2", &["a", "w2"], "y1"),
            gemm("fc3", &["a", "w3"], "y2"),
        ],
        vec![value_info("x", &[4, 6])],
        vec![value_info("y1", &[4, 3]), value_info("y2", &[4, 5])],
        vec![
            f32_tensor("w1", &[6, 6], 1),
            f32_tensor("w2", &[3, 6], 2),
            f32_tensor("w3", &[5, 6], 3),
        ],
    );
    let x = ArrayD::from_shape_vec(
        IxDyn(&[4, 6]),
        (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
    )
    .unwrap();
    let model = Model::from_proto(m.clone()).unwrap();
    let opts = HessianOptions {
        loss: Loss::Mse,
        max_samples: 4,
        ..Default::default()
    };
    // One candidate per layer: every weight scaled by 1.01 (a small change).
    let changed = |w: &ArrayD<f32>| w.mapv(|v| v * 1.01);
    let s = sensitivity_with(&model, &[vec![x.clone().into()]], &opts, &|_, w| {
        vec![changed(w)]
    })
    .unwrap();
    let u: Vec<&Vec<f32>> = s.iter().map(|l| &l.responses[0]).collect();
    let lens: Vec<usize> = u.iter().map(|v| v.len()).collect();
    assert_eq!(lens, vec![4 * 3 + 4 * 5; 3], "one layout for all");
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| p as f64 * q as f64)
            .sum::<f64>()
    };
    // Disjoint outputs: no cross term.
    assert_eq!(dot(u[1], u[2]), 0.0);
    // Measured MSE loss (mean over rows of ½‖δy‖²) with some weights changed.
    let proto = |names: &[&str]| {
        let mut p = m.clone();
        for t in p.graph.as_mut().unwrap().initializer.iter_mut() {
            if names.contains(&t.name()) {
                *t = tensor::from_f32(t.name(), &changed(&tensor::to_f32(t).unwrap()));
            }
        }
        p
    };
    let run = |p: &ModelProto| {
        let r = Runner::new(p, &[("x".into(), vec![4, 6])], &[]).unwrap();
        r.run(std::slice::from_ref(&x)).unwrap()
    };
    let reference = run(&m);
    let loss = |names: &[&str]| -> f64 {
        let out = run(&proto(names));
        reference
            .iter()
            .zip(&out)
            .map(|(a, b)| hessian::loss_sum(a, b, false))
            .sum::<f64>()
            / 4.0
    };
    let predicted = |idx: &[usize]| {
        let sum: Vec<f32> = (0..u[0].len())
            .map(|i| idx.iter().map(|&l| u[l][i]).sum())
            .collect();
        0.5 * dot(&sum, &sum)
    };
    let close = |p: f64, m: f64, tol: f64| (p - m).abs() <= tol * m;
    for (l, name) in ["w1", "w2", "w3"].iter().enumerate() {
        let (p, meas) = (predicted(&[l]), loss(&[name]));
        assert!(
            close(p, meas, 1e-3),
            "{name}: predicted {p} vs measured {meas}"
        );
    }
    // Several layers at once: the cross terms make the sum right (w1 and w2 share y1).
    let (p, meas) = (predicted(&[0, 1, 2]), loss(&["w1", "w2", "w3"]));
    assert!(
        close(p, meas, 0.02),
        "joint: predicted {p} vs measured {meas}"
    );
    let additive: f64 = (0..3).map(|l| predicted(&[l])).sum();
    assert!(
        !close(additive, meas, 0.2),
        "cross terms matter here: {additive} vs {meas}"
    );
}
