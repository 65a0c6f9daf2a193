//! Bias arithmetic around equalization and quantization: high-bias absorption and bias
//! correction.
//!
//! # High-bias absorption
//! With `h = W1 x + b1`, `a = relu(h)`, `y = W2 a + b2` and a per-channel `c_i >= 0` such that
//! `h_i >= c_i` on the data: `relu(h_i - c_i) = relu(h_i) - c_i`, so moving `c` out of `b1`
//! (`b1' = b1 - c`) and into `b2' = b2 + W2·c` (for a conv: `W2` summed over its kernel, see
//! [`ChannelMap::apply_constant`]) leaves `y` unchanged. `c_i = max(0, beta_i - 3 gamma_i)`
//! from the folded BN (pre-activation mean `beta`, std `gamma`: 99.87% of a normal channel
//! lies above), or `c_i = max(0, min over calibration data of h_i)` (then exact on that data).
//! Near zero padding (in L2 or a `Pad` between) padded positions read `0`, not `-c_i`: outputs
//! whose window touches the border change by `W2·c` over the padded taps. Nagel et al. apply it
//! anyway; the pass reports such pairs (`border_effects`).
//!
//! # Bias correction
//! Quantizing a weight `W` to `W_q` shifts the layer's expected output by `(W_q - W)·E[x]`
//! (per output channel, summed over the kernel: away from padding a conv sees the channel mean
//! at every tap). Adding `delta = -(W_q - W)·E[x]` to the bias removes that shift.
//! `E[x]` per input channel comes from calibration data ([`input_channel_means`], empirical) or,
//! for `x = relu(h)` with `h_i ~ N(beta_i, gamma_i^2)` from a folded BN, from the closed form
//! [`relu_normal_mean`] (analytic).

use super::math::ChannelMap;
use crate::ir::layer::Layer;
use crate::ir::Model;
use crate::onnx::proto::ModelProto;
use crate::runtime::Runner;
use anyhow::{ensure, Context, Result};
use ndarray::{ArrayD, Axis};

/// How the quantize pass corrects biases for weight quantization error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasCorrection {
    #[default]
    Off,
    /// `E[x]` from calibration data.
    Empirical,
    /// `E[x]` from folded BN statistics (ReLU of a normal), where known.
    Analytic,
    /// Empirical, kept per layer only where it lowers the quantized model's output error on
    /// the calibration data (applied by the `equalize` pass's measured gate, see
    /// [`super::gate`], not by `quantize`).
    Measured,
}

impl std::str::FromStr for BiasCorrection {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => BiasCorrection::Off,
            "empirical" => BiasCorrection::Empirical,
            "analytic" => BiasCorrection::Analytic,
            "measured" => BiasCorrection::Measured,
            other => anyhow::bail!(
                "unknown bias correction '{other}' (empirical, analytic, measured, off)"
            ),
        })
    }
}

/// `delta[o] = -sum_{e: out(e)=o} (W_q[e] - W[e]) * mean_input[in(e)]`: add it to the bias
/// of the layer whose float weight is `w` and quantized (dequantized) weight is `w_q`.
pub fn bias_correction_delta(
    map: &ChannelMap,
    w: &ArrayD<f64>,
    w_q: &ArrayD<f64>,
    mean_input: &[f64],
) -> Result<Vec<f64>> {
    ensure!(
        w.shape() == w_q.shape(),
        "float weight {:?} and quantized weight {:?} differ in shape",
        w.shape(),
        w_q.shape()
    );
    let err = w_q - w;
    Ok(map
        .apply_constant(&err, mean_input)?
        .into_iter()
        .map(|v| -v)
        .collect())
}

/// `E[max(0, h)]` for `h ~ N(mu, sigma^2)`: `sigma·phi(mu/sigma) + mu·Phi(mu/sigma)`.
pub fn relu_normal_mean(mu: f64, sigma: f64) -> f64 {
    let sigma = sigma.abs();
    if sigma == 0.0 {
        return mu.max(0.0);
    }
    let z = mu / sigma;
    let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let cdf = 0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2));
    sigma * pdf + mu * cdf
}

/// erf with |error| < 1.2e-7 (Numerical Recipes `erfc` Chebyshev fit).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let ans = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - ans
    } else {
        ans - 1.0
    }
}

/// Per-channel statistic of every requested value over calibration batches (rank >= 2).
/// `reduce` is `mean` or `min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Mean,
    Min,
}

/// Where a value's channels are: axis 1 for what a Conv reads or writes (`[N, C, ...]`), the
/// last axis for what a MatMul reads (`[..., T, K]`: a 3-D MatMul input's axis 1 is its
/// sequence, not its channels). A Gemm's 2-D operands have both at axis 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelAxis {
    Second,
    Last,
}

impl ChannelAxis {
    /// The channel axis of the data input of a layer of `kind`.
    pub fn of_input(kind: crate::ir::layer::LayerKind) -> ChannelAxis {
        match kind {
            crate::ir::layer::LayerKind::MatMul => ChannelAxis::Last,
            _ => ChannelAxis::Second,
        }
    }
}

/// Runs `model` on each calibration batch (inputs by name) with `values` as extra outputs and
/// reduces each value per channel (on its [`ChannelAxis`]) over everything else.
pub fn channel_stats(
    model: &ModelProto,
    values: &[(String, ChannelAxis)],
    calibration: &[crate::calibrate::NamedBatch],
    reduce: Reduce,
) -> Result<Vec<Vec<f64>>> {
    let names: Vec<String> = values.iter().map(|(n, _)| n.clone()).collect();
    ensure!(!calibration.is_empty(), "no calibration batches");
    let mut acc: Vec<Vec<f64>> = Vec::new();
    let mut counts = vec![0usize; values.len()];
    let mut runner: Option<(Vec<Vec<usize>>, Runner)> = None;
    for (b, batch) in calibration.iter().enumerate() {
        let shapes: Vec<(String, Vec<usize>)> = batch
            .iter()
            .map(|(n, a)| (n.clone(), a.shape().to_vec()))
            .collect();
        let key: Vec<Vec<usize>> = shapes.iter().map(|s| s.1.clone()).collect();
        if runner.as_ref().is_none_or(|(k, _)| *k != key) {
            let r = Runner::new(model, &shapes, &names)
                .context("running the model on calibration data")?;
            runner = Some((key, r));
        }
        let (_, r) = runner.as_ref().context("runner")?;
        let ordered = r
            .inputs()
            .iter()
            .map(|spec| {
                batch
                    .iter()
                    .find(|(n, _)| n == &spec.name)
                    .map(|(_, a)| a.clone())
                    .with_context(|| format!("calibration batch {b} has no input '{}'", spec.name))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = r.run(&ordered)?;
        let n_graph = out.len() - values.len();
        for (k, ((name, axis), a)) in values.iter().zip(&out[n_graph..]).enumerate() {
            ensure!(
                a.ndim() >= 2,
                "value '{name}' has rank {}, no channel axis",
                a.ndim()
            );
            let axis = match axis {
                ChannelAxis::Second => 1,
                ChannelAxis::Last => a.ndim() - 1,
            };
            let c = a.shape()[axis];
            let per: Vec<f64> = (0..c)
                .map(|ch| {
                    let lane = a.index_axis(Axis(axis), ch);
                    match reduce {
                        Reduce::Mean => lane.iter().map(|&v| f64::from(v)).sum::<f64>(),
                        Reduce::Min => lane.iter().fold(f64::INFINITY, |m, &v| m.min(f64::from(v))),
                    }
                })
                .collect();
            if acc.len() <= k {
                acc.push(match reduce {
                    Reduce::Mean => vec![0.0; c],
                    Reduce::Min => vec![f64::INFINITY; c],
                });
            }
            ensure!(
                acc[k].len() == c,
                "value '{name}' changed channel count between batches"
            );
            for (s, v) in acc[k].iter_mut().zip(per) {
                match reduce {
                    Reduce::Mean => *s += v,
                    Reduce::Min => *s = s.min(v),
                }
            }
            counts[k] += a.len() / c.max(1);
        }
    }
    if reduce == Reduce::Mean {
        for (a, &n) in acc.iter_mut().zip(&counts) {
            for v in a.iter_mut() {
                *v /= n.max(1) as f64;
            }
        }
    }
    Ok(acc)
}

/// Per input channel mean of the data input of each named layer node, over calibration data.
pub fn input_channel_means(
    model: &Model,
    nodes: &[String],
    calibration: &[crate::calibrate::NamedBatch],
) -> Result<Vec<Vec<f64>>> {
    let g = &model.graph;
    let values = nodes
        .iter()
        .map(|name| {
            let ix = g
                .node_indices()
                .find(|&ix| g.node(ix).name() == name)
                .with_context(|| format!("no node named '{name}'"))?;
            let axis =
                Layer::of(g, ix).map_or(ChannelAxis::Second, |l| ChannelAxis::of_input(l.kind));
            Ok((g.node(ix).input[0].clone(), axis))
        })
        .collect::<Result<Vec<_>>>()?;
    channel_stats(&model.to_proto()?, &values, calibration, Reduce::Mean)
}

/// Empirical bias correction for quantized weights: for each `(node name, dequantized weight)`
/// gives the delta to add to that layer's float bias (before the bias is itself quantized),
/// `-(W_q - W)·E[x]` with `E[x]` measured on `calibration` (batches of named inputs) in the
/// float `model`.
///
/// Meant to be called by the quantize pass right after it has chosen the weight scales: it
/// passes the dequantized weights `dq(q(W))`, then adds the deltas to the biases (creating a
/// zero bias where a Conv/Gemm has none).
pub fn empirical_bias_correction(
    model: &Model,
    quantized: &[(String, ArrayD<f32>)],
    calibration: &[crate::calibrate::NamedBatch],
) -> Result<Vec<(String, Vec<f64>)>> {
    let names: Vec<String> = quantized.iter().map(|(n, _)| n.clone()).collect();
    let means = input_channel_means(model, &names, calibration)?;
    let g = &model.graph;
    quantized
        .iter()
        .zip(means)
        .map(|((name, wq), mean)| {
            let ix = g
                .node_indices()
                .find(|&ix| g.node(ix).name() == name)
                .with_context(|| format!("no node named '{name}'"))?;
            let layer = Layer::of(g, ix).with_context(|| {
                format!("node '{name}' is not a Conv/Gemm/MatMul with a constant weight")
            })?;
            let map = ChannelMap::new(layer.kind, &layer.weight_shape)
                .with_context(|| format!("node '{name}'"))?;
            let w = layer.weight_f32(g)?.mapv(f64::from);
            let delta = bias_correction_delta(&map, &w, &wq.mapv(f64::from), &mean)
                .with_context(|| format!("bias correction of node '{name}'"))?;
            Ok((name.clone(), delta))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::layer::LayerKind;
    use ndarray::IxDyn;

    #[test]
    fn relu_normal_mean_matches_monte_carlo() {
        // Deterministic quasi-normal samples via the inverse CDF on a grid (midpoints).
        let n = 200_000;
        for &(mu, sigma) in &[(0.0, 1.0), (1.5, 0.5), (-1.0, 2.0)] {
            let mut s = 0.0;
            for k in 0..n {
                let u = (k as f64 + 0.5) / n as f64;
                // Bisection on the CDF built from erf.
                let (mut lo, mut hi) = (-10.0f64, 10.0f64);
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if 0.5 * (1.0 + erf(mid / std::f64::consts::SQRT_2)) < u {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                s += (mu + sigma * 0.5 * (lo + hi)).max(0.0);
            }
            let mc = s / n as f64;
            let cf = relu_normal_mean(mu, sigma);
            assert!(
                (mc - cf).abs() < 2e-3 * sigma,
                "mu {mu} sigma {sigma}: {mc} vs {cf}"
            );
        }
        assert!((erf(1.0) - 0.842_700_792_9).abs() < 2e-7);
    }

    #[test]
    fn bias_correction_cancels_mean_shift_brute_force() {
        // Gemm-like layer y = W x, W [out=3, in=4] (transB = 1); x with non-zero means.
        let map = ChannelMap::new(LayerKind::Gemm { trans_b: true }, &[3, 4]).unwrap();
        let w = ArrayD::from_shape_fn(IxDyn(&[3, 4]), |i| {
            (i[0] as f64 - 1.0) * 0.3 + i[1] as f64 * 0.07
        });
        let wq = super::super::math::fake_quant_int8(&w, None).unwrap();
        let xs: Vec<[f64; 4]> = (0..50)
            .map(|k| {
                let t = k as f64 / 7.0;
                [1.0 + t.sin(), 2.0 + t.cos(), 0.5, 3.0 - (t * 0.3).sin()]
            })
            .collect();
        let mean: Vec<f64> = (0..4)
            .map(|i| xs.iter().map(|x| x[i]).sum::<f64>() / 50.0)
            .collect();
        let delta = bias_correction_delta(&map, &w, &wq, &mean).unwrap();
        for o in 0..3 {
            let avg = |m: &ArrayD<f64>| {
                xs.iter()
                    .map(|x| (0..4).map(|i| m[[o, i]] * x[i]).sum::<f64>())
                    .sum::<f64>()
                    / 50.0
            };
            let shift = avg(&wq) + delta[o] - avg(&w);
            assert!(
                shift.abs() < 1e-12,
                "channel {o}: mean output still shifted by {shift}"
            );
        }
    }
}
