//! `--activations auto` (the default): static (calibrated Q/DQ) or dynamic (run-time
//! `DynamicQuantizeLinear` + `MatMulInteger`) activations, chosen per model by the error each
//! causes at the model's outputs on calibration samples.
//!
//! Only transformers are scored (see [`super::transformer`]); any other graph takes the static
//! path (or the forced mode) unchanged, so CNN outputs keep their bytes. On a transformer every
//! candidate is built from the same placement (linear layers only): each activation mode the
//! option allows (both under auto), each without and with SmoothQuant migration
//! ([`super::smooth`], strengths [`AUTO_ALPHAS`] under `--smooth auto`). Each runs in tract
//! next to the float model on the first calibration batches (at least [`SCORED_SAMPLES`]
//! rows) and is scored by
//! - language-model logits (an integer input, an output `[batch, seq, vocab]`): mean
//!   `KL(softmax(y) || softmax(ŷ))` over positions, the quantity perplexity is sensitive to;
//! - any other output: normalized squared error `Σ(y - ŷ)² / Σ y²`.
//!
//! Dynamic is preferred: ONNX Runtime runs it as DynamicQuantizeMatMul, about 4% faster than
//! the static form (QuantizeLinear + MatMulIntegerToFloat) on the 4-block GPT of BENCHMARKS.md,
//! and it needs no ranges fitted to the calibration windows (nothing to overfit). The best
//! static candidate wins only when
//! - on language-model logits, the best dynamic candidate's KL is above [`LM_KL_BUDGET`]
//!   (for a calibrated model the perplexity increase is about `exp(KL) - 1`, so the budget is
//!   +0.05% perplexity, half of issue 19's bar) and static is lower by more than
//!   [`STATIC_MARGIN`] (relative);
//! - on any other output, static is lower by more than [`STATIC_MARGIN`].
//!
//! The attention products (Q x K^T, attention x V) are scored the same way when the graph has
//! them and static activations are allowed: one more candidate quantizes them too, and is kept
//! only when its loss is within [`ATTENTION_TOLERANCE`] of the chosen linear-only candidate
//! (always with `--int8-attention`).
//!
//! With a single candidate (a forced mode, `--smooth off` or a fixed strength) nothing is
//! scored. The chosen candidate's stats carry a note and `details.activation_mode` (chosen,
//! why, every candidate's loss) for the report.

use super::{quantize_dynamic, quantize_static, QuantizeOptions};
use crate::calibrate::data::CalibrationSet;
use crate::ir::Model;
use crate::passes::PassStats;
use crate::runtime::{simulation_graph, Feed, Runner};
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis};
use serde_json::json;

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationMode {
    /// Calibrated QuantizeLinear/DequantizeLinear pairs.
    Static,
    /// DynamicQuantizeLinear + MatMulInteger on linear layers (ranges taken at run time).
    Dynamic,
    /// Transformers: the better of the two on calibration samples; other graphs: static.
    #[default]
    Auto,
}

/// Calibration samples each candidate is scored on.
pub const SCORED_SAMPLES: usize = 16;
/// Relative loss margin static must beat dynamic by.
pub const STATIC_MARGIN: f64 = 0.05;
/// Mean next-token KL (nats per position) under which dynamic is kept on language models.
pub const LM_KL_BUDGET: f64 = 5e-4;
/// Relative loss increase allowed for quantizing the attention products.
pub const ATTENTION_TOLERANCE: f64 = 0.02;

/// One scored candidate, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Candidate {
    pub name: String,
    pub loss: f64,
}

/// SmoothQuant migration ([`super::smooth`]) before quantization, on transformers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Smooth {
    Off,
    /// Without, and with each of [`AUTO_ALPHAS`]: the lowest output loss wins.
    #[default]
    Auto,
    /// This migration strength.
    Alpha(f32),
}

/// Migration strengths `--smooth auto` scores besides no migration.
pub const AUTO_ALPHAS: [f32; 2] = [0.5, 0.75];

struct Built {
    name: String,
    dynamic: bool,
    alpha: Option<f32>,
    model: Model,
    stats: PassStats,
    loss: f64,
}

/// Quantize `model` with the better activation mode (see the module docs). A forced mode
/// (`Static`, `Dynamic`) only scores smoothing strengths; on a graph that is not a transformer
/// it runs that mode as it is.
pub fn quantize(
    model: &mut Model,
    opts: &QuantizeOptions,
    calibration: Option<&CalibrationSet>,
) -> Result<PassStats> {
    let structure = super::transformer::Structure::find(&model.graph);
    if !structure.is_transformer() {
        return match opts.activations {
            ActivationMode::Dynamic => quantize_dynamic(model, opts),
            _ => quantize_static(model, opts, calibration),
        };
    }
    let calib =
        CalibrationSet::given_or_synthetic(calibration, model, opts.synthetic_samples, opts.seed)?;
    let calib = &*calib;
    // A target without dynamic activations, or a conv backbone under a transformer neck (PP-OCRv4 rec) that the target quantizes by the
    // CNN rules needs calibrated ranges: dynamic activations only cover linear layers.
    // Learned rounding and W4A8 need calibrated int8 activations (static).
    let policy = opts.target.policy();
    let static_only = !policy.dynamic_activations
        || opts.adaround.is_some()
        || opts.w4a8.is_some()
        || policy.convs_in_transformers
            && model.graph.node_indices().any(|ix| {
                let n = model.graph.node(ix);
                n.op_type() == "Conv"
                    && n.input
                        .get(1)
                        .is_some_and(|w| model.graph.constant(w).is_some())
            });
    let modes: &[bool] = match opts.activations {
        ActivationMode::Auto if static_only => &[false],
        ActivationMode::Static => &[false],
        ActivationMode::Dynamic => &[true],
        ActivationMode::Auto => &[false, true],
    };
    let sites = super::smooth::sites(&model.graph)?;
    let alphas: Vec<Option<f32>> = match opts.smooth {
        _ if sites.is_empty() => vec![None],
        Smooth::Off => vec![None],
        Smooth::Auto => std::iter::once(None)
            .chain(AUTO_ALPHAS.iter().map(|&a| Some(a)))
            .collect(),
        Smooth::Alpha(a) => vec![Some(a)],
    };
    let maxima = if alphas.iter().any(Option::is_some) {
        super::smooth::channel_maxima(model, &sites, calib)
            .context("observing the activations to smooth")?
    } else {
        Vec::new()
    };
    let single = modes.len() * alphas.len() == 1 && !opts.attention_int8;
    // Candidates are compared with nearest rounding; learned rounding runs once, on the pick.
    let linear_only = QuantizeOptions {
        attention_int8: false,
        adaround: if single { opts.adaround.clone() } else { None },
        ..opts.clone()
    };
    let build = |alpha: Option<f32>,
                 dynamic: bool,
                 o: &QuantizeOptions|
     -> Result<(Model, PassStats)> {
        let mut m = model.clone();
        let mut notes = Vec::new();
        if let Some(a) = alpha {
            let n = super::smooth::apply(&mut m.graph, &sites, &maxima, a)?;
            notes.push(format!(
                "SmoothQuant migration, alpha {a}: {n} LayerNorm(s) folded into the linear layers they feed"
            ));
        }
        let mut stats = if dynamic {
            quantize_dynamic(&mut m, o)?
        } else {
            quantize_static(&mut m, o, Some(calib))?
        };
        stats.notes.splice(0..0, notes);
        Ok((m, stats))
    };
    let scorer = if single {
        None
    } else {
        Some(Scorer::new(&model.to_proto()?, calib)?)
    };
    let mut built: Vec<Built> = Vec::new();
    for &alpha in &alphas {
        for &dynamic in modes {
            let (m, stats) = build(alpha, dynamic, &linear_only)?;
            let loss = match &scorer {
                Some(s) => s.loss(&m.to_proto()?).context("scoring a candidate")?,
                None => f64::NAN,
            };
            built.push(Built {
                name: format!(
                    "{}{}",
                    if dynamic { "dynamic" } else { "static" },
                    alpha.map(|a| format!(" + smooth {a}")).unwrap_or_default()
                ),
                dynamic,
                alpha,
                model: m,
                stats,
                loss,
            });
        }
    }
    let Some(scorer) = scorer else {
        let b = built.pop().expect("one candidate");
        *model = b.model;
        return Ok(b.stats);
    };
    let best_of = |dynamic: bool| {
        built
            .iter()
            .enumerate()
            .filter(|(_, b)| b.dynamic == dynamic)
            .min_by(|a, b| a.1.loss.total_cmp(&b.1.loss))
            .map(|(i, _)| i)
    };
    let within_budget = |d: usize| scorer.lm && built[d].loss <= LM_KL_BUDGET;
    let mut pick = match (best_of(false), best_of(true)) {
        (Some(s), Some(d))
            if !within_budget(d) && built[s].loss < built[d].loss * (1.0 - STATIC_MARGIN) =>
        {
            s
        }
        (_, Some(d)) => d,
        (Some(s), None) => s,
        (None, None) => unreachable!("at least one candidate"),
    };
    let others: Vec<String> = built
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != pick)
        .map(|(_, b)| format!("{} {:.3e}", b.name, b.loss))
        .collect();
    let mut why = format!(
        "{} activations: output {} {:.3e} on {} calibration sample(s), against {}",
        built[pick].name,
        scorer.loss_label(),
        built[pick].loss,
        scorer.rows,
        others.join(", ")
    );
    if let (Some(s), true) = (best_of(false), built[pick].dynamic) {
        if built[s].loss < built[pick].loss {
            why.push_str(&if within_budget(pick) {
                format!(
                    " (static is lower, but dynamic is within the KL budget of {LM_KL_BUDGET:.0e}, about +0.05% perplexity, and ONNX Runtime runs it faster as DynamicQuantizeMatMul)"
                )
            } else {
                format!(
                    " (static is lower by less than {:.0}%: dynamic kept, it needs no fitted ranges and ONNX Runtime runs it faster as DynamicQuantizeMatMul)",
                    STATIC_MARGIN * 100.0
                )
            });
        }
    }
    // Static only (dynamic Q x K^T would need run-time quantization of both operands).
    let attention = opts.attention_int8 || !structure.attention_matmuls.is_empty();
    if attention && opts.activations != ActivationMode::Dynamic {
        let with_attention = QuantizeOptions {
            attention_int8: true,
            adaround: None,
            ..opts.clone()
        };
        let alpha = built[pick].alpha;
        let (m, stats) = build(alpha, false, &with_attention)?;
        let loss = scorer
            .loss(&m.to_proto()?)
            .context("scoring int8 attention products")?;
        let best = built[pick].loss;
        let keep = opts.attention_int8 || loss <= best * (1.0 + ATTENTION_TOLERANCE);
        why.push_str(&format!(
            "; attention products (Q x K^T, attention x V) int8: {:.3e}, {}",
            loss,
            if keep {
                "kept"
            } else {
                "left float (more than 2% above the best linear-only candidate)"
            }
        ));
        built.push(Built {
            name: format!(
                "static + int8 attention{}",
                alpha.map(|a| format!(" + smooth {a}")).unwrap_or_default()
            ),
            dynamic: false,
            alpha,
            model: m,
            stats,
            loss,
        });
        if keep {
            pick = built.len() - 1;
        }
    }
    let candidates: Vec<Candidate> = built
        .iter()
        .map(|b| Candidate {
            name: b.name.clone(),
            loss: b.loss,
        })
        .collect();
    let chosen = built.swap_remove(pick);
    let (chosen_model, mut stats) = match &opts.adaround {
        Some(_) => build(
            chosen.alpha,
            chosen.dynamic,
            &QuantizeOptions {
                attention_int8: chosen.name.contains("int8 attention"),
                ..opts.clone()
            },
        )?,
        None => (chosen.model, chosen.stats),
    };
    stats.notes.push(why.clone());
    if let serde_json::Value::Object(map) = &mut stats.details {
        map.insert(
            "activation_mode".into(),
            json!({
                "chosen": chosen.name,
                "why": why,
                "loss": scorer.loss_label(),
                "samples": scorer.rows,
                "candidates": candidates,
            }),
        );
    }
    *model = chosen_model;
    Ok(stats)
}

/// Scores candidates against the float model on a few calibration samples.
struct Scorer {
    samples: Vec<Vec<Feed>>,
    /// Rows (windows, images) in `samples`.
    rows: usize,
    shapes: Vec<(String, Vec<usize>)>,
    reference: Vec<Vec<ArrayD<f32>>>,
    /// Language-model logits: KL of softmaxes; else normalized squared error.
    lm: bool,
}

impl Scorer {
    fn new(reference: &crate::onnx::proto::ModelProto, calib: &CalibrationSet) -> Result<Scorer> {
        // Whole batches until SCORED_SAMPLES rows (a stacked .npy is one batch of many rows).
        // Batches of the first batch's shapes only: one tract plan scores them all.
        let shape_of = |b: &Vec<Feed>| b.iter().map(|f| f.shape().to_vec()).collect::<Vec<_>>();
        let first_shapes = calib.batches.first().map(shape_of);
        let (mut samples, mut rows) = (Vec::new(), 0);
        for (b, batch) in calib.batches.iter().enumerate() {
            if rows >= SCORED_SAMPLES {
                break;
            }
            if Some(shape_of(batch)) == first_shapes {
                samples.push(batch.clone());
                rows += calib.rows(b);
            }
        }
        let first = samples
            .first()
            .context("no calibration sample to score on")?;
        let shapes: Vec<(String, Vec<usize>)> = calib
            .input_names
            .iter()
            .zip(first)
            .map(|(n, f)| (n.clone(), f.shape().to_vec()))
            .collect();
        let runner = Runner::new(reference, &shapes, &[]).context("running the float model")?;
        let reference: Vec<Vec<ArrayD<f32>>> = samples
            .iter()
            .map(|s| runner.run(s))
            .collect::<Result<_>>()?;
        let integer_input = first.iter().any(|f| !f.is_float());
        let lm = integer_input
            && reference
                .first()
                .is_some_and(|o| o.iter().all(|a| a.ndim() == 3 && a.shape()[2] >= 2));
        Ok(Scorer {
            samples,
            rows,
            shapes,
            reference,
            lm,
        })
    }

    fn loss_label(&self) -> &'static str {
        if self.lm {
            "KL(softmax) per position"
        } else {
            "normalized squared error"
        }
    }

    fn loss(&self, candidate: &crate::onnx::proto::ModelProto) -> Result<f64> {
        let (sim, _) = simulation_graph(candidate)?;
        let runner = Runner::new(&sim, &self.shapes, &[])?;
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (s, r) in self.samples.iter().zip(&self.reference) {
            let out = runner.run(s)?;
            for (a, b) in r.iter().zip(&out) {
                if self.lm {
                    let axis = Axis(a.ndim() - 1);
                    for (pa, pb) in a.lanes(axis).into_iter().zip(b.lanes(axis)) {
                        num += kl_logits(pa.as_slice().unwrap_or(&pa.to_vec()), &pb.to_vec());
                        den += 1.0;
                    }
                } else {
                    for (&x, &y) in a.iter().zip(b.iter()) {
                        num += (x as f64 - y as f64).powi(2);
                        den += (x as f64).powi(2);
                    }
                }
            }
        }
        Ok(num / den.max(f64::MIN_POSITIVE))
    }
}

/// `KL(softmax(p) || softmax(q))` of two logit rows, in f64.
pub fn kl_logits(p: &[f32], q: &[f32]) -> f64 {
    let lse = |v: &[f32]| {
        let m = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::kl_logits;

    #[test]
    fn kl_of_logits_matches_the_definition() {
        assert!(kl_logits(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
        // Shifting logits changes nothing.
        assert!(kl_logits(&[1.0, 2.0], &[11.0, 12.0]).abs() < 1e-12);
        // p = (1/2, 1/2), q = (e/(1+e), 1/(1+e)).
        let q1 = 1f64.exp() / (1.0 + 1f64.exp());
        let want = 0.5 * (0.5 / q1).ln() + 0.5 * (0.5 / (1.0 - q1)).ln();
        assert!((kl_logits(&[0.0, 0.0], &[1.0, 0.0]) - want).abs() < 1e-12);
    }
}
