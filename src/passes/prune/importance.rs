//! Channel importance of a dependency group.
//!
//! Each member that says something about a channel gives a score vector over the group's
//! channels; every vector is divided by its mean (so members of different scale weigh the
//! same) and the group score is their average. A group's scores therefore average about 1,
//! which makes a global ranking compare *relative* importance across layers.
//!
//! Member scores:
//! - filter norm (L1 or L2) of the producer's output filters and of depthwise filters;
//! - `|gamma|` of a BatchNormalization on the group (when one follows);
//! - data-aware (with calibration data): for each consumer reading the channels,
//!   `sqrt(sum_k var(a_k) * ||W[:, k]||^2)` over the consumer-weight slices `k` of channel `c`:
//!   the RMS output change the consumer sees when the channel is replaced by its mean (what the
//!   bias compensation does), ignoring correlations between channels. Without compensation
//!   (`Reconstruct::None`) the second moment `E[a_k^2]` replaces the variance.
//!
//! Scale across groups: with calibration data each group's normalized scores are multiplied by
//! the group's mean *relative* data score, `score_c / E||y||^2` summed over consumers (the
//! fraction of the consumers' output energy one channel carries). That makes a global ranking
//! (and the greedy MAC planner) compare how much output a channel moves in absolute terms,
//! not just its rank inside its own layer. Without data every group has mean 1.

use super::groups::{Group, Member};
use crate::ir::Graph;
use crate::onnx::tensor;
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis};
use std::collections::HashMap;

/// Which scores make up a channel's importance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Criterion {
    /// L1 norm of the producer (and depthwise) filters.
    L1,
    /// L2 norm of the producer (and depthwise) filters.
    L2,
    /// `|gamma|` of the BatchNormalization(s) on the group (L2 when there is none).
    BnGamma,
    /// Data-aware consumer-output score (L2 without calibration data).
    Activation,
    /// L2 + BN gamma + data-aware, each normalized.
    Combined,
    /// Second-order cost of removal with optimal least-squares refit of the consumers
    /// (per-group cost curves, see `obs`); `Combined` without calibration data and for groups
    /// whose consumers have no second-order model.
    #[default]
    Loss,
}

/// Per-index first and second moments of an activation along its channel axis.
#[derive(Debug, Clone)]
pub struct AxisStats {
    pub mean: Vec<f64>,
    pub mean_sq: Vec<f64>,
}

impl AxisStats {
    /// Moments over every axis but `axis` (counted from the front).
    pub fn of(a: &ArrayD<f32>, axis: usize) -> AxisStats {
        let n = a.shape().get(axis).copied().unwrap_or(0);
        let mut mean = vec![0.0; n];
        let mut mean_sq = vec![0.0; n];
        for (i, lane) in a.axis_iter(Axis(axis)).enumerate() {
            let count = lane.len().max(1) as f64;
            let (s, s2) = lane.iter().fold((0.0f64, 0.0f64), |(s, s2), &v| {
                let v = f64::from(v);
                (s + v, s2 + v * v)
            });
            mean[i] = s / count;
            mean_sq[i] = s2 / count;
        }
        AxisStats { mean, mean_sq }
    }

    pub fn var(&self, i: usize) -> f64 {
        (self.mean_sq[i] - self.mean[i] * self.mean[i]).max(0.0)
    }
}

/// Norm (`p` = 1 or 2) of each slice of `w` along `axis`.
pub fn slice_norms(w: &ArrayD<f32>, axis: usize, p: u8) -> Vec<f64> {
    w.axis_iter(Axis(axis))
        .map(|s| {
            if p == 1 {
                s.iter().map(|v| f64::from(v.abs())).sum()
            } else {
                s.iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt()
            }
        })
        .collect()
}

fn normalized(v: Vec<f64>) -> Option<Vec<f64>> {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean > 0.0 && mean.is_finite()).then(|| v.iter().map(|x| x / mean).collect())
}

fn weight(graph: &Graph, name: &str) -> Result<ArrayD<f32>> {
    let t = graph
        .constant(name)
        .with_context(|| format!("'{name}' is not a constant"))?;
    tensor::to_f32(t)
}

/// Scores of a group's channels (length `group.channels`). `stats` holds the calibration
/// moments of consumer inputs by value name (empty: no data-aware score); `compensated` says
/// whether removed channels get replaced by their mean.
pub fn group_scores(
    graph: &Graph,
    group: &Group,
    criterion: Criterion,
    stats: &HashMap<String, AxisStats>,
    out_energy: &HashMap<String, f64>,
    compensated: bool,
) -> Result<Vec<f64>> {
    let c = group.channels;
    let mut norms1 = Vec::new();
    let mut norms2 = Vec::new();
    let mut gammas = Vec::new();
    let mut data = Vec::new();
    let mut rel = vec![0.0f64; c];
    let mut has_rel = false;
    for m in &group.members {
        match m {
            Member::Producer {
                weight: w, axis, ..
            } => {
                let w = weight(graph, w)?;
                norms1.push(slice_norms(&w, *axis, 1));
                norms2.push(slice_norms(&w, *axis, 2));
            }
            Member::Depthwise {
                weight: w, offset, ..
            } => {
                let w = weight(graph, w)?;
                let n1 = slice_norms(&w, 0, 1);
                let n2 = slice_norms(&w, 0, 2);
                norms1.push(
                    n1.get(*offset..offset + c)
                        .context("depthwise range")?
                        .to_vec(),
                );
                norms2.push(
                    n2.get(*offset..offset + c)
                        .context("depthwise range")?
                        .to_vec(),
                );
            }
            Member::Param {
                node,
                slot: 1,
                tensor: t,
                offset,
                ..
            } if graph.node(*node).op_type() == "BatchNormalization" => {
                let g = weight(graph, t)?;
                let g: Vec<f64> = g.iter().map(|v| f64::from(v.abs())).collect();
                gammas.push(g.get(*offset..offset + c).context("BN range")?.to_vec());
            }
            Member::Consumer {
                node,
                input,
                weight: w,
                axis,
                offset,
                block,
                ..
            } => {
                let Some(st) = stats.get(input) else { continue };
                let w = weight(graph, w)?;
                let col = slice_norms(&w, *axis, 2);
                let mut v = Vec::with_capacity(c);
                for ch in 0..c {
                    let mut e = 0.0;
                    for k in 0..*block {
                        let i = (offset + ch) * block + k;
                        let (Some(n), Some(_)) = (col.get(i), st.mean.get(i)) else {
                            continue;
                        };
                        let m2 = if compensated {
                            st.var(i)
                        } else {
                            st.mean_sq[i]
                        };
                        e += m2 * n * n;
                    }
                    v.push(e.sqrt());
                }
                let energy = graph
                    .node(*node)
                    .output
                    .first()
                    .and_then(|o| out_energy.get(o))
                    .copied()
                    .unwrap_or(0.0);
                if energy > 0.0 {
                    has_rel = true;
                    for (r, x) in rel.iter_mut().zip(&v) {
                        *r += x * x / energy;
                    }
                }
                data.push(v);
            }
            _ => {}
        }
    }
    let mut parts: Vec<Vec<f64>> = Vec::new();
    let norms = match criterion {
        Criterion::L1 => norms1,
        _ => norms2,
    };
    match criterion {
        Criterion::L1 | Criterion::L2 => parts.extend(norms),
        Criterion::BnGamma => {
            if gammas.is_empty() {
                parts.extend(norms)
            } else {
                parts.extend(gammas)
            }
        }
        Criterion::Activation => {
            if data.is_empty() {
                parts.extend(norms)
            } else {
                parts.extend(data)
            }
        }
        Criterion::Combined | Criterion::Loss => {
            parts.extend(norms);
            parts.extend(gammas);
            parts.extend(data);
        }
    }
    let parts: Vec<Vec<f64>> = parts
        .into_iter()
        .filter(|p| p.len() == c)
        .filter_map(normalized)
        .collect();
    if parts.is_empty() {
        return Ok(vec![1.0; c]);
    }
    let k = parts.len() as f64;
    let scale = if has_rel {
        rel.iter().sum::<f64>() / c.max(1) as f64
    } else {
        1.0
    };
    Ok((0..c)
        .map(|i| scale * parts.iter().map(|p| p[i]).sum::<f64>() / k)
        .collect())
}
