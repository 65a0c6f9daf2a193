//! SmoothQuant-style migration (Xiao et al. 2023): per input channel, divide the activation by
//! `s_j` and multiply the following weight's row by `s_j`, with the division folded into the
//! LayerNorm that produces the activation. The float function is unchanged; the quantized
//! one sees flatter activations (LayerNorm gamma makes a few channels 10-50x larger than the
//! rest, and a per-tensor activation grid is sized by them) and slightly rougher weights.
//!
//! ```text
//! before: h -> LayerNormalization(gamma, beta) -> x -> MatMul(W[C, N]) ...
//! after:  h -> LayerNormalization(gamma / s, beta / s) -> x / s -> MatMul(diag(s) W) ...
//! ```
//! `s_j = max|x_j|^alpha / max_n |W[j, n]|^(1 - alpha)` over the calibration data and every
//! weight reading `x` (q, k and v share one LayerNorm), clamped to `[1e-4, 1e4]`; a channel
//! whose activation or weight is all zero keeps `s_j = 1`.
//!
//! Where it applies (a [`Site`]): a `LayerNormalization` over the last axis with constant
//! scale (and bias) read by no other node, whose output is read only by `MatMul`s at input 0
//! with constant 2-D weights read by nothing else, and is not a graph output. Other linear
//! layers (attention output, MLP down projection) have no producer to fold into and are left
//! as they are.
//!
//! Invariants: exact in real arithmetic (float rounding aside); deterministic; `alpha = 0`
//! with unit weight maxima changes nothing.

use crate::calibrate::data::CalibrationSet;
use crate::ir::op::Attrs;
use crate::ir::{Graph, InSlot, Model, Patch};
use crate::onnx::tensor;
use crate::runtime::Runner;
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis};

/// A LayerNorm whose output feeds only linear layers.
#[derive(Debug, Clone)]
pub struct Site {
    pub output: String,
    pub gamma: String,
    pub beta: Option<String>,
    pub weights: Vec<String>,
}

/// The migration sites of `g`.
pub fn sites(g: &Graph) -> Result<Vec<Site>> {
    let mut out = Vec::new();
    for ix in g.topo_order()? {
        let n = g.node(ix);
        if n.op_type() != "LayerNormalization" || !crate::ir::op::is_standard_domain(n.domain()) {
            continue;
        }
        let axis = n.attr_int("axis")?.unwrap_or(-1);
        let Some(x) = n.output.first().filter(|x| !x.is_empty()) else {
            continue;
        };
        let only_here = |v: &str| g.constant(v).is_some() && g.consumers(v).len() == 1;
        let gamma = n.input.get(1).cloned().unwrap_or_default();
        let beta = n.input.get(2).filter(|b| !b.is_empty()).cloned();
        let rank1 = |v: &str| {
            g.constant(v)
                .and_then(|t| tensor::shape(t).ok())
                .is_some_and(|s| s.len() == 1)
        };
        if !only_here(&gamma)
            || !rank1(&gamma)
            || beta.as_deref().is_some_and(|b| !only_here(b) || !rank1(b))
        {
            continue;
        }
        let rank = g
            .declared(&n.input[0])
            .and_then(|v| v.r#type.as_ref())
            .and_then(|t| match &t.value {
                Some(crate::onnx::proto::type_proto::Value::TensorType(tt)) => {
                    tt.shape.as_ref().map(|s| s.dim.len() as i64)
                }
                _ => None,
            });
        if axis != -1 && Some(axis + 1) != rank {
            continue;
        }
        if g.is_graph_output(x) || n.output.iter().skip(1).any(|o| !o.is_empty()) {
            continue;
        }
        let readers = g.consumers(x);
        let mut weights = Vec::new();
        let linear = !readers.is_empty()
            && readers.iter().all(|&(c, slot)| {
                let m = g.node(c);
                let w = m.input.get(1).map(String::as_str).unwrap_or("");
                let ok = m.op_type() == "MatMul"
                    && slot == InSlot::Arg(0)
                    && m.input[0] == *x
                    && only_here(w)
                    && g.constant(w)
                        .and_then(|t| tensor::shape(t).ok())
                        .is_some_and(|s| s.len() == 2);
                if ok {
                    weights.push(w.to_string());
                }
                ok
            });
        if linear {
            out.push(Site {
                output: x.clone(),
                gamma,
                beta,
                weights,
            });
        }
    }
    Ok(out)
}

/// Input shapes by name, as tract plans are pinned.
type Shapes = Vec<(String, Vec<usize>)>;

/// Per-channel `max |x_j|` of every site's activation over the calibration batches.
pub fn channel_maxima(
    model: &Model,
    sites: &[Site],
    calib: &CalibrationSet,
) -> Result<Vec<Vec<f32>>> {
    let proto = model.to_proto()?;
    let extra: Vec<String> = sites.iter().map(|s| s.output.clone()).collect();
    let mut maxima: Vec<Vec<f32>> = vec![Vec::new(); sites.len()];
    // One tract plan per distinct batch shape (windows of one length share one).
    let mut runners: Vec<(Shapes, Runner)> = Vec::new();
    for batch in &calib.batches {
        let shapes: Shapes = calib
            .input_names
            .iter()
            .zip(batch)
            .map(|(n, f)| (n.clone(), f.shape().to_vec()))
            .collect();
        let k = match runners.iter().position(|(s, _)| *s == shapes) {
            Some(k) => k,
            None => {
                let r = Runner::new(&proto, &shapes, &extra)?;
                runners.push((shapes, r));
                runners.len() - 1
            }
        };
        let outs = runners[k].1.run(batch)?;
        let n_out = outs.len() - extra.len();
        for (k, a) in outs[n_out..].iter().enumerate() {
            let c = *a.shape().last().unwrap_or(&1);
            let m = &mut maxima[k];
            if m.is_empty() {
                m.resize(c, 0.0);
            }
            for lane in a.lanes(Axis(a.ndim() - 1)) {
                for (j, &v) in lane.iter().enumerate() {
                    m[j] = m[j].max(v.abs());
                }
            }
        }
    }
    Ok(maxima)
}

/// The migration scales of one site.
pub fn scales(act_max: &[f32], weights: &[ArrayD<f32>], alpha: f32) -> Vec<f32> {
    act_max
        .iter()
        .enumerate()
        .map(|(j, &a)| {
            let w = weights
                .iter()
                .map(|w| {
                    w.index_axis(Axis(0), j)
                        .iter()
                        .fold(0f32, |m, v| m.max(v.abs()))
                })
                .fold(0f32, f32::max);
            if a <= 0.0 || w <= 0.0 {
                1.0
            } else {
                (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-4, 1e4)
            }
        })
        .collect()
}

/// Migrate every site with `alpha`; returns the number of sites changed.
pub fn apply(g: &mut Graph, sites: &[Site], maxima: &[Vec<f32>], alpha: f32) -> Result<usize> {
    let mut changed = 0;
    for (site, act_max) in sites.iter().zip(maxima) {
        let ws: Vec<ArrayD<f32>> = site
            .weights
            .iter()
            .map(|w| tensor::to_f32(g.constant(w).context("weight")?))
            .collect::<Result<_>>()?;
        if ws.iter().any(|w| w.shape()[0] != act_max.len()) {
            continue;
        }
        let s = scales(act_max, &ws, alpha);
        let mut inits = Vec::new();
        for (name, mut w) in site.weights.iter().zip(ws) {
            for (j, mut row) in w.axis_iter_mut(Axis(0)).enumerate() {
                row.mapv_inplace(|v| v * s[j]);
            }
            inits.push(tensor::from_f32(name, &w));
        }
        for v in std::iter::once(&site.gamma).chain(site.beta.iter()) {
            let mut a = tensor::to_f32(g.constant(v).context("layer norm parameter")?)?;
            if a.len() != s.len() {
                continue;
            }
            for (x, sj) in a.iter_mut().zip(&s) {
                *x /= sj;
            }
            inits.push(tensor::from_f32(v, &a));
        }
        g.apply(Patch {
            initializers: inits,
            ..Default::default()
        })
        .with_context(|| format!("smoothing the readers of '{}'", site.output))?;
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn scales_follow_the_formula() {
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0.5f32, -2.0, 0.0, 0.0]).unwrap();
        let s = scales(&[8.0, 3.0], &[w], 0.5);
        assert!((s[0] - (8f32.sqrt() / 2f32.sqrt())).abs() < 1e-6);
        // A zero weight row keeps its channel as it is.
        assert_eq!(s[1], 1.0);
    }
}
