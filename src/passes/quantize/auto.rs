//! `--method auto`: each activation's range chosen by the error it causes at the model's
//! outputs, not by the tensor's own error.
//!
//! No fixed range method wins everywhere: percentile clips the few large values a ResNet's
//! residual stream needs, min-max wastes levels on EfficientNet's outliers, MSE minimizes each
//! tensor's own error and collapses a CTC recognizer. So `auto` observes every marked tensor
//! once (exact min/max and a histogram, [`observers`]), derives one candidate range per fixed
//! method from that observation ([`CANDIDATES`]), and scores assignments of candidates to
//! tensors by the output error on calibration samples.
//!
//! The scoring graph is the float model with every marked weight replaced by its int8
//! fake-quantized values and, after every marked activation `t`, a fake quantizer whose scale
//! and bounds are graph inputs, so one tract plan scores any assignment:
//! ```text
//! before: a -> Conv(W) -> t -> Relu -> ...
//! after:  a -> Conv(fq(W)) -> t -> Div(s_t) -> Round -> Max(lo_t) -> Min(hi_t)
//!           -> Mul(s_t) -> t' -> Relu -> ...   (s_t, lo_t = qmin - z_t, hi_t = qmax - z_t:
//!                                               scalar graph inputs)
//! ```
//! That is `dq(q(t)) = s (clamp(round(t / s) + z, qmin, qmax) - z)` of ONNX's QuantizeLinear /
//! DequantizeLinear in float (Round's tie rule may differ from QuantizeLinear's half-to-even:
//! one level on exact ties only). Biases stay float (their int32 rounding is far below the
//! activation error).
//!
//! Loss: per output, KL(reference || quantized) averaged over rows when the float output is a
//! probability distribution over its last axis (every row non-negative, summing to 1), else
//! the normalized squared error `Σ(y - ŷ)² / Σ y²` (what SQNR reports). Both are unitless;
//! several outputs add up.
//!
//! The reference outputs come from the same plan with the identity quantizer (scale 2^-20,
//! zero point 0, bounds ±f32::MAX: `dq(q(x))` then equals `x` up to 2^-21 absolute), so one tract
//! plan is built, and the comparison sees the same float schedule on both sides.
//!
//! Cross-fitting: the calibration batches are split into two folds (batch `b` in fold `b % 2`;
//! a single batch is cut in two), each fold observed on its own in the same run, and every
//! scored sample is scored with the candidate ranges estimated on the *other* fold. Scoring in
//! sample rewards ranges that fit only the data they came from (percentile 99.99 won
//! SqueezeNet 1.1's calibration crops and lost 4.8 dB on held-out photos; 16 scored samples
//! chose 99.99 there); out of sample, a range pays for what it misses on new data. The final
//! ranges come from the whole calibration set with the chosen method per tensor.
//!
//! Search (deterministic: samples are scored in parallel, one per task, and summed in order):
//! 1. every candidate applied to all tensors (one evaluation each); the choice is the default
//!    method ([`CANDIDATES`]`[0]`) unless another's cross-fitted loss is lower by more than
//!    [`UNIFORM_MIN_GAIN`];
//! 2. only when asked (`--auto-blocks N`, [`AutoOptions::blocks`]): the marked tensors, in
//!    topological order, are cut into N contiguous blocks; for each block in order, the
//!    next-best uniform candidates ([`AutoOptions::alternatives`]) are tried on that block
//!    alone with the rest at the current choice, and kept when it is reliably better.
//!
//! Why the blocks are off by default: with the guard below, no block trial was kept on ten zoo
//! models (ResNet-18/50, RegNetX, MobileNetV2, SqueezeNet, EfficientNet-B0, ViT-small,
//! ConvNeXt-tiny, PP-OCRv4 rec, ddddocr), and on the eleventh (the digits net deep) the block
//! it kept scored 0.1 dB lower on the held-out digits than the uniform choice; the eight block
//! trials were 40-45% of `auto`'s CPU (BENCHMARKS.md, "`auto`'s cost vs ORT").
//!
//! "Reliably better" guards the block choices (more trials, more chances to fit noise): lower
//! by more than [`MIN_GAIN`] (relative) and by more than [`RELIABLE_SIGMAS`] standard errors
//! of the paired per-sample differences. (On 8 digits samples, unguarded block choices gained
//! 9% there and lost 0.5 dB on held-out data.)
//!
//! Samples scored: as many as [`SCORING_ELEMENT_BUDGET`] affords (all of them on small models,
//! 16 on ResNet-18), taken in turn from every batch so both folds are scored alike.
//!
//! The result is never worse on the scoring samples than its start (the default method unless
//! another was reliably better). Tensors in a scale-sharing group still take the union of their
//! members' ranges (see `Plan`). Where it wins and where it does not yet: BENCHMARKS.md, "Range
//! methods on real architectures".

use super::insert;
use super::placement::Plan;
use super::QuantizeOptions;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::observe::{
    observers_by_fold, observers_merged_from_folds, Method, ObserveOptions, Observed, Observer,
};
use crate::calibrate::params::{ActScheme, QParams};
use crate::ir::Model;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{
    type_proto, AttributeProto, ModelProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::onnx::tensor;
use crate::runtime::{Feed, Runner};
use anyhow::{Context, Result};
use indexmap::IndexMap;
use ndarray::{ArrayD, Axis};
use rayon::prelude::*;
use serde::Serialize;

/// The fixed methods `auto` chooses among. The first is the tie-break winner and the
/// normalizer of multi-output losses.
///
/// Not candidates: entropy (never the best on the benchmark zoo, and its KL search costs more
/// than the rest together) and percentile 99.99 (on SqueezeNet 1.1 it won on the calibration
/// crops and lost 4.8 dB on held-out photos: a tighter clip than the data supports).
pub const CANDIDATES: [Method; 3] = [Method::Percentile(99.999), Method::MinMax, Method::Mse];

/// Smallest relative loss reduction that changes a block's choice.
pub const MIN_GAIN: f64 = 0.005;

/// Smallest relative loss reduction that moves the uniform start away from the default method.
/// Set on testdata's digits CNN, so not an untuned figure: there mse's cross-fitted loss is
/// 10.6% lower than percentile's on 200 samples, and its SQNR 0.45 dB lower on the 360
/// held-out digits; PP-OCR cls, where mse is 3.6 dB better on held-out lines, shows 47%.
/// Predicted gains this small are within the noise of the scored samples and of the
/// calibration / held-out shift.
pub const UNIFORM_MIN_GAIN: f64 = 0.15;

/// Bounds of the derived number of scored samples (see [`AutoOptions::samples`]).
pub const MIN_SAMPLES: usize = 16;
pub const MAX_SAMPLES: usize = 256;

/// Marked activation elements one evaluation may fake-quantize (scored samples x elements per
/// sample): a cost proxy known before any scoring run and the same on every machine (a
/// wall-time budget would make the output depend on the load). About 16 samples on ResNet-18
/// at 224x224 (4.5M elements per sample), every calibration sample on small OCR and digits
/// models, where 16 samples overfit (PP-OCR cls: -3 dB). Set when the search made 11
/// evaluations within 8e8 elements; per evaluation, so that dropping the blocks kept the
/// scored samples, and asking for blocks costs their evaluations on the same samples.
pub const SCORING_ELEMENT_BUDGET: f64 = 8e8 / 11.0;

impl AutoOptions {
    /// Assignments scored: every candidate alone, then the alternatives per block.
    pub fn evaluations(&self) -> usize {
        CANDIDATES.len() + self.blocks * self.alternatives.max(1)
    }

    /// Samples each assignment is scored on, given the calibration set's size and the marked
    /// activation elements per sample: as many as [`SCORING_ELEMENT_BUDGET`] affords, within
    /// [`MIN_SAMPLES`]..=[`MAX_SAMPLES`] and the calibration set.
    pub fn scored_samples(&self, calibration_samples: usize, elements_per_sample: f64) -> usize {
        self.samples.unwrap_or_else(|| {
            let affordable = SCORING_ELEMENT_BUDGET / elements_per_sample.max(1.0);
            (affordable as usize)
                .clamp(MIN_SAMPLES, MAX_SAMPLES)
                .min(calibration_samples.max(1))
        })
    }
}

/// How much scoring `auto` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoOptions {
    /// Calibration samples every assignment is scored on (taken in turn from each batch);
    /// None: as many as [`SCORING_ELEMENT_BUDGET`] affords (see
    /// [`AutoOptions::scored_samples`]).
    pub samples: Option<usize>,
    /// Contiguous blocks of tensors refined one after the other (0, the default: one method
    /// for every tensor).
    pub blocks: usize,
    /// Candidates tried on each block besides its current one: the best-scoring uniform
    /// assignments after the start (1..=2).
    pub alternatives: usize,
}

impl Default for AutoOptions {
    fn default() -> Self {
        AutoOptions {
            samples: None,
            // Off: see the module doc ("Why the blocks are off by default").
            blocks: 0,
            // Every other candidate: on PP-OCRv4 rec the block that mattered (-40% loss) took
            // mse, which was not the runner-up of the uniform assignments.
            alternatives: 2,
        }
    }
}

/// What `auto` chose and what each choice cost, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct AutoReport {
    /// Samples each assignment was scored on, and how many assignments were scored.
    pub samples: usize,
    /// Whether each sample was scored with ranges estimated without it (two folds of the
    /// calibration batches); false when there is a single batch.
    pub cross_fitted: bool,
    /// Marked activation elements per calibration sample (the scoring budget's unit).
    pub elements_per_sample: f64,
    pub evaluations: usize,
    /// Evaluations that ran the scoring plan (the others had the parameters of one scored
    /// before and took its score).
    pub runs: usize,
    /// `kl` / `nmse` per output.
    pub losses: Vec<String>,
    /// Loss of each fixed method applied to every tensor.
    pub uniform: Vec<(String, f64)>,
    /// The best of those (the starting point).
    pub start: String,
    pub blocks: Vec<BlockChoice>,
    /// Loss of the final assignment.
    pub loss: f64,
    /// Per tensor: the method whose range it got.
    pub tensors: Vec<(String, String)>,
    /// Per tensor: what won, by how much, and how far its range moved ([`TensorChoice`]).
    pub choices: Vec<TensorChoice>,
    /// Where the time went ([`AutoSeconds`]).
    pub seconds: AutoSeconds,
}

/// One tensor's choice. Choices are scored per assignment, not per tensor: outside the blocks
/// (all tensors by default) a tensor's margin is the uniform choice's, the loss of the best
/// other uniform assignment relative to the chosen one's; inside a block it is the block's
/// (positive: the chosen one won by that much; negative: a lower loss was not reliably lower,
/// or not lower by [`UNIFORM_MIN_GAIN`], so the default method stayed).
#[derive(Debug, Clone, Serialize)]
pub struct TensorChoice {
    pub tensor: String,
    pub method: String,
    /// Index into [`AutoReport::blocks`].
    pub block: Option<usize>,
    pub loss_margin: f64,
    /// Width `hi - lo` of the range each candidate gives this tensor (whole calibration set).
    pub widths: Vec<(String, f32)>,
    /// `|ln(chosen width / default width)|`: how far the choice moved this tensor's range from
    /// the default method's ([`CANDIDATES`]`[0]`).
    pub moved: f64,
    /// `moved` times the relative loss gain of the step that gave the tensor its method (its
    /// block's, else the uniform choice's over the default method): ranks the tensors where
    /// the choice mattered most (the terminal names the first few).
    pub mattered: f64,
}

/// Where `auto`'s time goes (wall seconds). The observation and the building of the scoring
/// plan run side by side, so `observe` and `build` overlap.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AutoSeconds {
    /// The calibration run observing every marked tensor (whole set and folds).
    pub observe: f64,
    /// Optimizing the scoring graph into a tract plan (alongside `observe`).
    pub build: f64,
    /// Deriving every candidate range from the observers (after both).
    pub candidates: f64,
    /// The reference outputs (identity quantizers).
    pub reference: f64,
    /// Scoring the uniform assignments.
    pub uniform: f64,
    /// Scoring the block refinement's trials.
    pub blocks: f64,
    /// `uniform + blocks`.
    pub scoring: f64,
    /// The whole of [`choose`].
    pub total: f64,
}

/// One block of the refinement.
#[derive(Debug, Clone, Serialize)]
pub struct BlockChoice {
    pub first: String,
    pub last: String,
    pub tensors: usize,
    /// Loss with each candidate on this block (the rest at the choice so far).
    pub tried: Vec<(String, f64)>,
    pub chosen: String,
    /// Relative loss reduction of the chosen candidate over the one the block had before.
    pub gain: f64,
}

/// Observe `plan`'s activations on `observe_on` and choose each one's range (see the module
/// docs). `float` is the model the plan was made on (weights by the plan's names).
pub fn choose(
    plan: &Plan,
    float: &Model,
    observe_on: &ModelProto,
    calib: &CalibrationSet,
    opts: &QuantizeOptions,
) -> Result<(IndexMap<String, Observed>, AutoReport)> {
    let tensors: Vec<String> = plan.activations.iter().cloned().collect();
    let obs_opts = |method| ObserveOptions {
        method,
        moving_average: None,
        scheme: opts.activation_scheme,
    };
    let clock = std::time::Instant::now();
    let calib = &two_folds(calib);
    let folds = if calib.batches.len() >= 2 { FOLDS } else { 0 };
    // The scoring plan needs only the scored samples' input shapes, not the observation: it is
    // built while the calibration runs (tract's plan optimization is one long task on one
    // core, the calibration spreads over the rest; ResNet-18: 0.9 s).
    let (seen, plan_built) = rayon::join(
        || {
            let seen = if folds == 0 {
                observers_by_fold(observe_on, &tensors, calib, &obs_opts(Method::Auto), 0)
            } else {
                // The whole set's observers merged from the folds' (exact): two histogram sets
                // instead of three.
                observers_merged_from_folds(
                    observe_on,
                    &tensors,
                    calib,
                    &obs_opts(Method::Auto),
                    folds,
                )
            };
            (seen, clock.elapsed().as_secs_f64())
        },
        || {
            let started = std::time::Instant::now();
            let runner = Scorer::plan(plan, float, calib, opts, &tensors);
            (runner, started.elapsed().as_secs_f64())
        },
    );
    let ((seen, seen_by_fold), observed_at) = match seen {
        (Ok(s), at) => (s, at),
        (Err(e), _) => return Err(e.context("observing activation ranges")),
    };
    let (runner, build_seconds) = plan_built;
    let runner = runner?;
    let candidates_of = |seen: &IndexMap<String, Observer>| -> Vec<IndexMap<String, Observed>> {
        // Every (candidate, tensor) range side by side (mse's search is per tensor), collected
        // in order.
        let pairs: Vec<(usize, &String, &Observer)> = (0..CANDIDATES.len())
            .flat_map(|c| seen.iter().map(move |(t, o)| (c, t, o)))
            .collect();
        let ranges: Vec<Observed> = pairs
            .par_iter()
            .map(|&(c, _, o)| o.finish(&obs_opts(CANDIDATES[c])))
            .collect();
        let mut out: Vec<IndexMap<String, Observed>> = vec![IndexMap::new(); CANDIDATES.len()];
        for ((c, t, _), r) in pairs.into_iter().zip(ranges) {
            out[c].insert(t.clone(), r);
        }
        out
    };
    let candidates = candidates_of(&seen);
    let fold_candidates: Vec<Vec<IndexMap<String, Observed>>> =
        seen_by_fold.iter().map(candidates_of).collect();
    let elements_per_sample =
        seen.values().map(|o| o.count as f64).sum::<f64>() / calib.samples.max(1) as f64;
    let candidates_at = clock.elapsed().as_secs_f64();
    let scorer = Scorer::new(runner, calib, opts, &tensors, elements_per_sample)?;
    let built_at = clock.elapsed().as_secs_f64();
    let assign_from = |candidates: &[IndexMap<String, Observed>],
                       choice: &[usize]|
     -> IndexMap<String, Observed> {
        tensors
            .iter()
            .zip(choice)
            .map(|(t, &c)| (t.clone(), candidates[c][t]))
            .collect()
    };
    // Cross-fitting: a sample of fold f is scored with the ranges estimated on the other fold,
    // so a range that only fits the data it was estimated on (a tight percentile, an MSE
    // optimum of a few samples) pays for it; without folds, in-sample.
    // An assignment whose parameters were all scored before (every tensor of a block with the
    // same range under two candidates, e.g. a saturated ReLU6 under min-max and percentile)
    // takes that score instead of running again: the runs are deterministic, so the score is
    // the one running would give.
    let scored: std::cell::RefCell<std::collections::HashMap<Vec<u32>, Score>> = Default::default();
    let runs = std::cell::Cell::new(0usize);
    // The assignments of one step (the uniform ones, or one block's trials) run in one
    // parallel pass over (assignment, sample) pairs, so no core waits at the end of each
    // assignment for the other's last sample.
    let score_all = |choices: &[Vec<usize>]| -> Result<Vec<Score>> {
        let mut keyed = Vec::with_capacity(choices.len());
        for c in choices {
            let params = if folds == 0 {
                vec![plan.activation_params(&assign_from(&candidates, c), opts.activation_scheme)?]
            } else {
                (0..folds)
                    .map(|f| {
                        let other = &fold_candidates[(f + 1) % folds];
                        plan.activation_params(&assign_from(other, c), opts.activation_scheme)
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let flat = scorer.flat(&params)?;
            let key: Vec<u32> = flat
                .iter()
                .flatten()
                .flat_map(|&(s, z)| [s.to_bits(), z.to_bits()])
                .collect();
            keyed.push((key, flat));
        }
        let mut to_run: Vec<usize> = Vec::new();
        for (i, (key, _)) in keyed.iter().enumerate() {
            let known = scored.borrow().contains_key(key);
            if !known && !to_run.iter().any(|&j| keyed[j].0 == *key) {
                to_run.push(i);
            }
        }
        let flats: Vec<&[Vec<(f32, f32)>]> =
            to_run.iter().map(|&i| keyed[i].1.as_slice()).collect();
        let fresh = scorer.score_many(&flats)?;
        runs.set(runs.get() + fresh.len());
        for (&i, score) in to_run.iter().zip(fresh) {
            scored.borrow_mut().insert(keyed[i].0.clone(), score);
        }
        let scored = scored.borrow();
        Ok(keyed.iter().map(|(key, _)| scored[key].clone()).collect())
    };

    // 1. Uniform assignments: the default method unless another is reliably better.
    let n = tensors.len();
    let uniform: Vec<Vec<usize>> = (0..CANDIDATES.len()).map(|c| vec![c; n]).collect();
    let uniform_scores = score_all(&uniform)?;
    let uniform_at = clock.elapsed().as_secs_f64();
    let mut evaluations = uniform.len();
    let mut by_uniform_loss: Vec<usize> = (0..CANDIDATES.len()).collect();
    by_uniform_loss.sort_by(|&a, &b| {
        uniform_scores[a]
            .loss()
            .total_cmp(&uniform_scores[b].loss())
    });
    // Three candidates leave little to overfit and their scores are out of sample, so the
    // lowest loss wins unless within UNIFORM_MIN_GAIN of the default; no standard-error guard
    // (with a 2-sigma guard on in-sample scores, PP-OCR cls kept percentile, 3.6 dB under mse
    // on held-out lines).
    let mut best = 0;
    if let Some(&lowest) = by_uniform_loss.first() {
        if uniform_scores[lowest].loss() < uniform_scores[best].loss() * (1.0 - UNIFORM_MIN_GAIN) {
            best = lowest;
        }
    }
    let mut choice = uniform[best].clone();
    let mut current_score = uniform_scores[best].clone();

    // 2. Block refinement.
    let mut blocks = Vec::new();
    let count = opts.auto.blocks.min(n);
    for b in 0..count {
        let range = (b * n / count)..((b + 1) * n / count);
        if range.is_empty() {
            continue;
        }
        let current = choice[range.start];
        let others: Vec<usize> = by_uniform_loss
            .iter()
            .copied()
            .filter(|&c| c != current)
            .take(opts.auto.alternatives.max(1))
            .collect();
        let trials: Vec<Vec<usize>> = others
            .iter()
            .map(|&c| {
                let mut t = choice.clone();
                t[range.clone()].iter_mut().for_each(|x| *x = c);
                t
            })
            .collect();
        let scores = score_all(&trials)?;
        evaluations += trials.len();
        let before = current_score.loss();
        let mut tried: Vec<(String, f64)> = vec![(CANDIDATES[current].label(), before)];
        tried.extend(
            others
                .iter()
                .zip(&scores)
                .map(|(&c, s)| (CANDIDATES[c].label(), s.loss())),
        );
        let mut chosen = current;
        for (k, score) in scores.iter().enumerate() {
            if score.reliably_below(&current_score, RELIABLE_SIGMAS) {
                chosen = others[k];
                choice = trials[k].clone();
                current_score = score.clone();
            }
        }
        blocks.push(BlockChoice {
            first: tensors[range.start].clone(),
            last: tensors[range.end - 1].clone(),
            tensors: range.len(),
            tried,
            chosen: CANDIDATES[chosen].label(),
            gain: if before > 0.0 {
                (before - current_score.loss()) / before
            } else {
                0.0
            },
        });
    }
    let loss = current_score.loss();
    let uniform_losses: Vec<f64> = uniform_scores.iter().map(Score::loss).collect();
    let relative = |from: f64, to: f64| if from > 0.0 { (from - to) / from } else { 0.0 };
    // Outside the blocks a tensor's method is the uniform choice: it won by the margin of the
    // best other uniform assignment, and it brought the start's gain over the default method.
    let uniform_margin = margin_over(
        uniform_losses[best],
        (0..CANDIDATES.len())
            .filter(|&c| c != best)
            .map(|c| uniform_losses[c]),
    );
    let start_gain = relative(uniform_losses[0], uniform_losses[best]);
    let choices: Vec<TensorChoice> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let block = (0..blocks.len()).find(|&b| {
                let range = (b * n / count)..((b + 1) * n / count);
                range.contains(&i)
            });
            let c = choice[i];
            let width = |k: usize| candidates[k][t].hi - candidates[k][t].lo;
            let (loss_margin, gain) = match block.map(|b| &blocks[b]) {
                Some(b) => {
                    let chosen = b
                        .tried
                        .iter()
                        .find(|(m, _)| *m == b.chosen)
                        .map(|x| x.1)
                        .unwrap_or(f64::NAN);
                    let others = b.tried.iter().filter(|(m, _)| *m != b.chosen);
                    let margin = margin_over(chosen, others.map(|x| x.1));
                    (margin, if b.gain > 0.0 { b.gain } else { start_gain })
                }
                None => (uniform_margin, start_gain),
            };
            let (w, w0) = (width(c) as f64, width(0) as f64);
            let moved = if w > 0.0 && w0 > 0.0 {
                (w / w0).ln().abs()
            } else {
                0.0
            };
            TensorChoice {
                tensor: t.clone(),
                method: CANDIDATES[c].label(),
                block,
                loss_margin,
                widths: CANDIDATES
                    .iter()
                    .enumerate()
                    .map(|(k, m)| (m.label(), width(k)))
                    .collect(),
                moved,
                mattered: moved * gain,
            }
        })
        .collect();

    let done_at = clock.elapsed().as_secs_f64();
    let seconds = AutoSeconds {
        observe: observed_at,
        build: build_seconds,
        candidates: candidates_at - observed_at.max(build_seconds),
        reference: built_at - candidates_at,
        uniform: uniform_at - built_at,
        blocks: done_at - uniform_at,
        scoring: done_at - built_at,
        total: done_at,
    };
    let report = AutoReport {
        seconds,
        samples: scorer.samples,
        cross_fitted: folds > 0,
        elements_per_sample,
        evaluations,
        runs: runs.get(),
        losses: scorer.kinds.iter().map(|k| k.label().to_string()).collect(),
        uniform: CANDIDATES
            .iter()
            .zip(&uniform_losses)
            .map(|(m, &l)| (m.label(), l))
            .collect(),
        start: CANDIDATES[best].label(),
        blocks,
        loss,
        tensors: tensors
            .iter()
            .zip(&choice)
            .map(|(t, &c)| (t.clone(), CANDIDATES[c].label()))
            .collect(),
        choices,
    };
    Ok((assign_from(&candidates, &choice), report))
}

/// How much lower the chosen loss is than the best other one, relative to the chosen (0 when
/// there is no other or the chosen loss is not positive).
fn margin_over(chosen: f64, others: impl Iterator<Item = f64>) -> f64 {
    let other = others.fold(f64::INFINITY, f64::min);
    if chosen > 0.0 && other.is_finite() {
        (other - chosen) / chosen
    } else {
        0.0
    }
}

/// One assignment's loss, split by scored feed (each feed's share of the normalized loss), so
/// two assignments can be compared sample by sample.
#[derive(Debug, Clone)]
pub(crate) struct Score {
    pub(crate) per_feed: Vec<f64>,
}

impl Score {
    /// The number of feeds times the geometric mean of the per-feed losses (equal to their sum
    /// when every feed has the same loss, below it otherwise). Per-sample losses are
    /// heavy-tailed: summed, the one or two calibration samples whose rare large activation a
    /// range from the other fold clips decide the choice (ResNet-18, MobileNetV3-small: the
    /// cross-fitted sum preferred min-max 3x, which lost 1.5 and 1.0 dB on the held-out
    /// photos); the geometric mean asks which range serves the typical sample.
    fn loss(&self) -> f64 {
        let n = self.per_feed.len();
        if n == 0 {
            return 0.0;
        }
        let mean_log = self.per_feed.iter().map(|&l| log_loss(l)).sum::<f64>() / n as f64;
        n as f64 * mean_log.exp()
    }

    /// Lower by more than [`MIN_GAIN`] and by more than `sigmas` standard errors of the paired
    /// per-feed log-ratios (a one-feed score has no spread: the gain alone decides).
    fn reliably_below(&self, other: &Score, sigmas: f64) -> bool {
        let (a, b) = (self.loss(), other.loss());
        // NaN never gains.
        let gains = a < b * (1.0 - MIN_GAIN);
        if !gains {
            return false;
        }
        let n = self.per_feed.len().min(other.per_feed.len());
        if n < 2 {
            return true;
        }
        let d: Vec<f64> = (0..n)
            .map(|i| log_loss(self.per_feed[i]) - log_loss(other.per_feed[i]))
            .collect();
        let mean = d.iter().sum::<f64>() / n as f64;
        let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        mean < -sigmas * (var / n as f64).sqrt()
    }
}

/// `ln` of one feed's loss, floored so an exact output (loss 0) stays finite.
fn log_loss(l: f64) -> f64 {
    l.max(1e-30).ln()
}

/// How many standard errors a paired improvement must clear to change a block's choice.
pub const RELIABLE_SIGMAS: f64 = 2.0;

/// Folds of the calibration batches for cross-fitting (batch `b` is in fold `b % FOLDS`).
const FOLDS: usize = 2;

/// The calibration set with at least two batches where it can have them: a single batch of
/// several samples (32 samples or fewer at the default batch size) is cut into two halves
/// along each input's batch axis, so cross-fitting has two folds. A model that fixes its batch
/// size, a KV-cache decoder's steps or a one-sample batch stay as they are.
fn two_folds(calib: &CalibrationSet) -> std::borrow::Cow<'_, CalibrationSet> {
    use std::borrow::Cow;
    if calib.batches.len() != 1 || calib.fixed_batch || calib.sequence.is_some() {
        return Cow::Borrowed(calib);
    }
    let rows = calib.rows(0);
    if rows < 2 {
        return Cow::Borrowed(calib);
    }
    let half = rows / 2;
    let cut = |range: std::ops::Range<usize>| -> Vec<Feed> {
        calib.batches[0]
            .iter()
            .zip(&calib.batch_axes)
            .map(|(f, axis)| match axis {
                Some(a) => f.slice_axis(*a, range.clone()),
                None => f.clone(),
            })
            .collect()
    };
    let mut split = calib.clone();
    split.batches = vec![cut(0..half), cut(half..rows)];
    Cow::Owned(split)
}

/// How one output's error is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LossKind {
    Kl,
    Nmse,
}

impl LossKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            LossKind::Kl => "kl",
            LossKind::Nmse => "nmse",
        }
    }

    /// (numerator, denominator) of this output's loss on one feed.
    pub(crate) fn partial(self, r: &ArrayD<f32>, q: &ArrayD<f32>) -> (f64, f64) {
        match self {
            LossKind::Nmse => r.iter().zip(q.iter()).fold((0.0, 0.0), |(n, d), (&a, &b)| {
                (n + (a as f64 - b as f64).powi(2), d + (a as f64).powi(2))
            }),
            LossKind::Kl => {
                let axis = Axis(r.ndim().saturating_sub(1));
                r.lanes(axis)
                    .into_iter()
                    .zip(q.lanes(axis))
                    .fold((0.0, 0.0), |(n, d), (pr, pq)| {
                        (n + kl(pr.iter().copied(), pq.iter().copied()), d + 1.0)
                    })
            }
        }
    }

    /// KL where the reference is a distribution over its last axis.
    pub(crate) fn of(reference: &[ArrayD<f32>]) -> LossKind {
        let is_distribution = reference.iter().all(|a| {
            let Some(&last) = a.shape().last() else {
                return false;
            };
            last >= 2
                && a.iter().all(|&v| (0.0..=1.0 + 1e-6).contains(&v))
                && a.lanes(Axis(a.ndim() - 1))
                    .into_iter()
                    .all(|row| (row.sum() - 1.0).abs() < 1e-3)
        });
        if is_distribution {
            LossKind::Kl
        } else {
            LossKind::Nmse
        }
    }
}

/// The scoring graph in tract, its feeds and the reference outputs it is compared with.
struct Scorer {
    runner: Runner,
    /// Model inputs of each scored sample (or batch, when the model fixes its batch size).
    feeds: Vec<Vec<Feed>>,
    /// The calibration batch each feed comes from (its fold is `batch % FOLDS`).
    batch_of: Vec<usize>,
    /// Reference outputs of each feed.
    reference: Vec<Vec<ArrayD<f32>>>,
    kinds: Vec<LossKind>,
    /// Marked tensors, in the order of the scale / zero-point inputs.
    tensors: Vec<String>,
    /// Samples in `feeds`.
    samples: usize,
    /// The scheme's integer bounds.
    bounds: (f32, f32),
}

/// Scale of the identity quantizer (exact powers of two keep `x / s * s == x`).
const IDENTITY_SCALE: f32 = 1.0 / (1u32 << 20) as f32;

impl Scorer {
    /// The scoring graph's tract plan, for the input shapes of the scored samples (those of
    /// the first, which every scored sample shares: [`scored_feeds`]).
    fn plan(
        plan: &Plan,
        float: &Model,
        calib: &CalibrationSet,
        opts: &QuantizeOptions,
        tensors: &[String],
    ) -> Result<Runner> {
        let (first, _, _) = scored_feeds(calib, 1);
        let first = first
            .first()
            .context("auto: no calibration samples to score on")?;
        let mut shapes: Vec<(String, Vec<usize>)> = calib
            .input_names
            .iter()
            .cloned()
            .zip(first.iter().map(|a| a.shape().to_vec()))
            .collect();
        for t in tensors {
            shapes.push((scale_input(t), vec![]));
            shapes.push((bound_input(t, "lo"), vec![]));
            shapes.push((bound_input(t, "hi"), vec![]));
        }
        let (scoring, _) =
            crate::runtime::simulation_graph(&scoring_graph(plan, float, opts, tensors)?)?;
        Runner::new(&scoring, &shapes, &[]).context("auto: the scoring graph in tract")
    }

    /// The scorer of `runner` ([`Scorer::plan`]) on as many samples as the options and
    /// `elements_per_sample` give, with its reference outputs.
    fn new(
        runner: Runner,
        calib: &CalibrationSet,
        opts: &QuantizeOptions,
        tensors: &[String],
        elements_per_sample: f64,
    ) -> Result<Scorer> {
        let n = opts.auto.scored_samples(calib.samples, elements_per_sample);
        let (feeds, batch_of, samples) = scored_feeds(calib, n);
        anyhow::ensure!(
            !feeds.is_empty(),
            "auto: no calibration samples to score on"
        );
        let bounds = match opts.activation_scheme {
            ActScheme::U8Asymmetric => (0.0, 255.0),
            ActScheme::I8Symmetric => (-128.0, 127.0),
        };
        let mut scorer = Scorer {
            runner,
            feeds,
            batch_of,
            reference: Vec::new(),
            kinds: Vec::new(),
            tensors: tensors.to_vec(),
            samples,
            bounds,
        };
        let identity: Vec<(f32, f32)> = vec![(IDENTITY_SCALE, 0.0); tensors.len()];
        scorer.reference = scorer
            .run_all(&identity, (-f32::MAX, f32::MAX))
            .context("auto: reference run")?;
        scorer.kinds = (0..scorer.reference[0].len())
            .map(|o| {
                let outs: Vec<ArrayD<f32>> =
                    scorer.reference.iter().map(|r| r[o].clone()).collect();
                LossKind::of(&outs)
            })
            .collect();
        Ok(scorer)
    }

    /// Outputs of every feed with per-tensor (scale, zero point) and integer bounds.
    fn run_all(&self, params: &[(f32, f32)], bounds: (f32, f32)) -> Result<Vec<Vec<ArrayD<f32>>>> {
        let extra = self.extra_inputs(params, bounds);
        self.feeds
            .par_iter()
            .map(|feed| {
                let mut inputs = feed.clone();
                inputs.extend(extra.iter().cloned());
                self.runner.run(&inputs)
            })
            .collect()
    }

    /// Per tensor its scale and its bounds in the shifted domain, `qmin - z` and `qmax - z`
    /// (the same f32 subtractions the graph did in `Sub` nodes before, so the same values).
    fn extra_inputs(&self, params: &[(f32, f32)], bounds: (f32, f32)) -> Vec<Feed> {
        let scalar = |v: f32| Feed::from(ArrayD::from_elem(vec![], v));
        let mut extra = Vec::with_capacity(3 * params.len());
        for &(s, z) in params {
            extra.push(scalar(s));
            extra.push(scalar(bounds.0 - z));
            extra.push(scalar(bounds.1 - z));
        }
        extra
    }

    /// Each parameter set as the (scale, zero point) of every scored tensor, in input order.
    fn flat(&self, params: &[IndexMap<String, QParams>]) -> Result<Vec<Vec<(f32, f32)>>> {
        params
            .iter()
            .map(|params| {
                self.tensors
                    .iter()
                    .map(|t| {
                        let p = params
                            .get(t)
                            .with_context(|| format!("auto: no parameters for '{t}'"))?;
                        Ok((p.scale, p.zero_point as f32))
                    })
                    .collect()
            })
            .collect()
    }

    /// The loss of each assignment (its parameter sets from [`Scorer::flat`]), per feed:
    /// `Σ_o num_o(feed) / den_o`, where `den_o` sums over every feed (so the per-feed shares
    /// add up to the total normalized loss). A feed of fold `f` runs with the assignment's
    /// `params[f]` (with a single parameter set, every feed runs with it).
    fn score_many(&self, assignments: &[&[Vec<(f32, f32)>]]) -> Result<Vec<Score>> {
        let extras: Vec<Vec<Vec<Feed>>> = assignments
            .iter()
            .map(|params| {
                anyhow::ensure!(!params.is_empty(), "auto: no parameters to score");
                Ok(params
                    .iter()
                    .map(|flat| self.extra_inputs(flat, self.bounds))
                    .collect())
            })
            .collect::<Result<_>>()?;
        // Per (assignment, feed) the (num, den) per output, in parallel; each assignment's
        // feeds summed in feed order afterwards, so the result does not depend on the thread
        // count nor on which assignments run together.
        let feeds = self.feeds.len();
        let parts: Vec<Vec<(f64, f64)>> = (0..assignments.len() * feeds)
            .into_par_iter()
            .map(|k| {
                let (a, i) = (k / feeds, k % feeds);
                let extras = &extras[a];
                let mut inputs = self.feeds[i].clone();
                inputs.extend(
                    extras[(self.batch_of[i] % FOLDS).min(extras.len() - 1)]
                        .iter()
                        .cloned(),
                );
                let outs = self.runner.run(&inputs).context("auto: scoring run")?;
                Ok(self
                    .kinds
                    .iter()
                    .enumerate()
                    .map(|(o, kind)| kind.partial(&self.reference[i][o], &outs[o]))
                    .collect())
            })
            .collect::<Result<_>>()?;
        Ok(parts
            .chunks(feeds.max(1))
            .map(|p| Score::normalized(p, self.kinds.len()))
            .collect())
    }
}

impl Score {
    /// Per feed, `Σ_o num_o(feed) / den_o` from each feed's `(num, den)` per output, where
    /// `den_o` sums over every feed (so the per-feed shares add up to the total normalized
    /// loss).
    pub(crate) fn normalized(parts: &[Vec<(f64, f64)>], outputs: usize) -> Score {
        let mut den = vec![0.0f64; outputs];
        for part in parts {
            for (d, p) in den.iter_mut().zip(part) {
                *d += p.1;
            }
        }
        let per_feed = parts
            .iter()
            .map(|part| {
                part.iter()
                    .zip(&den)
                    .map(|(&(n, _), &d)| if d > 0.0 { n / d } else { n })
                    .map(|l| if l.is_finite() { l } else { f64::INFINITY })
                    .sum()
            })
            .collect();
        Score { per_feed }
    }
}

/// `KL(p || q)` of one row, with `q` floored so a zeroed probability costs a finite amount.
fn kl(p: impl Iterator<Item = f32>, q: impl Iterator<Item = f32>) -> f64 {
    const FLOOR: f64 = 1e-8;
    p.zip(q)
        .filter(|(a, _)| *a > 0.0)
        .map(|(a, b)| {
            let (a, b) = (a as f64, (b as f64).max(FLOOR));
            a * (a / b).ln()
        })
        .sum()
}

/// `n` calibration samples to score on, the batch each comes from, and how many samples they
/// are: one feed per sample (cut along each input's batch axis) when the model lets the batch
/// size vary, taken in turn from each batch (row 0 of every batch, then row 1, ...) so both
/// cross-fitting folds are scored alike; else whole batches of the shape of the first, in
/// order.
pub(crate) fn scored_feeds(
    calib: &CalibrationSet,
    n: usize,
) -> (Vec<Vec<Feed>>, Vec<usize>, usize) {
    let n = n.max(1);
    let (mut out, mut batch_of, mut samples) = (Vec::new(), Vec::new(), 0);
    let shapes = |b: &Vec<Feed>| b.iter().map(|f| f.shape().to_vec()).collect::<Vec<_>>();
    let Some(first_shapes) = calib.batches.first().map(shapes) else {
        return (out, batch_of, 0);
    };
    // One scoring plan: a KV-cache decoder's decode steps (other shapes) are not scored.
    let usable = match &calib.sequence {
        Some(s) => s.batches_per_step.min(calib.batches.len()),
        None => calib.batches.len(),
    };
    let per_sample = !calib.fixed_batch && (0..usable).any(|b| calib.rows(b) > 1);
    if !per_sample {
        for (b, batch) in calib.batches[..usable].iter().enumerate() {
            if samples >= n {
                break;
            }
            if shapes(batch) == first_shapes {
                out.push(batch.clone());
                batch_of.push(b);
                samples += calib.rows(b);
            }
        }
        return (out, batch_of, samples);
    }
    let most_rows = (0..usable).map(|b| calib.rows(b)).max().unwrap_or(0);
    let sample_shapes = |b: usize| -> Vec<Vec<usize>> {
        calib.batches[b]
            .iter()
            .zip(&calib.batch_axes)
            .map(|(f, axis)| {
                let mut s = f.shape().to_vec();
                if let Some(a) = axis {
                    s[*a] = 1;
                }
                s
            })
            .collect()
    };
    let first_sample_shapes = sample_shapes(0);
    for i in 0..most_rows {
        for b in 0..usable {
            if samples >= n {
                return (out, batch_of, samples);
            }
            if i >= calib.rows(b) || sample_shapes(b) != first_sample_shapes {
                continue;
            }
            out.push(
                calib.batches[b]
                    .iter()
                    .zip(&calib.batch_axes)
                    .map(|(f, axis)| match axis {
                        Some(a) => f.slice_axis(*a, i..i + 1),
                        None => f.clone(),
                    })
                    .collect(),
            );
            batch_of.push(b);
            samples += 1;
        }
    }
    (out, batch_of, samples)
}

fn scale_input(t: &str) -> String {
    format!("{t}::auto_scale")
}

/// The input of `t`'s lower (`lo`) or upper (`hi`) bound of `round(t / s)`.
fn bound_input(t: &str, which: &str) -> String {
    format!("{t}::auto_{which}")
}

/// The float model with fake-quantized weights and a parametric fake quantizer after every
/// marked activation (see the module docs).
fn scoring_graph(
    plan: &Plan,
    float: &Model,
    opts: &QuantizeOptions,
    tensors: &[String],
) -> Result<ModelProto> {
    let mut work = float.clone();
    let mut initializers = Vec::new();
    for (w, mark) in &plan.weights {
        if work.graph.constant(w).is_none() {
            // Already stored at another precision by the caller (mixed precision).
            continue;
        }
        let fq = insert::fake_quant(&work.graph, w, mark.axis, opts.reduce_range, opts.rounding)
            .with_context(|| format!("auto: fake-quantizing weight '{w}'"))?;
        initializers.push(tensor::from_f32(w, &fq));
    }
    work.graph.apply(crate::ir::Patch {
        initializers,
        ..Default::default()
    })?;
    let mut model = work.to_proto()?;
    let graph = model.graph.as_mut().context("model has no graph")?;
    let mut chains: IndexMap<String, Vec<NodeProto>> = IndexMap::new();
    for t in tensors {
        let (s, lo, hi) = (scale_input(t), bound_input(t, "lo"), bound_input(t, "hi"));
        graph.input.push(scalar_input(&s));
        graph.input.push(scalar_input(&lo));
        graph.input.push(scalar_input(&hi));
        let step = |k: &str| format!("{t}::auto_{k}");
        let out = step("out");
        // Bounds in the shifted domain `round(x / s)`: [qmin - z, qmax - z], computed on the
        // host (graph inputs: five nodes per tensor instead of seven, a smaller plan to
        // optimize), so the tensor itself passes through 5 elementwise ops.
        let chain: [(&str, Vec<String>, String); 5] = [
            ("Div", vec![t.clone(), s.clone()], step("div")),
            ("Round", vec![step("div")], step("round")),
            ("Max", vec![step("round"), lo.clone()], step("max")),
            ("Min", vec![step("max"), hi.clone()], step("min")),
            ("Mul", vec![step("min"), s.clone()], out.clone()),
        ];
        let nodes = chains.entry(t.clone()).or_default();
        for (op, inputs, output) in chain {
            nodes.push(NodeProto {
                op_type: Some(op.into()),
                name: Some(output.clone()),
                input: inputs,
                output: vec![output],
                attribute: Vec::<AttributeProto>::new(),
                ..Default::default()
            });
        }
        // Readers of `t` (not the chain itself) read the fake-quantized value.
        for node in graph.node.iter_mut() {
            for i in node.input.iter_mut() {
                if i == t {
                    *i = out.clone();
                }
            }
        }
        for o in graph.output.iter_mut() {
            if o.name() == t {
                o.name = Some(out.clone());
            }
        }
    }
    // Each chain right after its tensor's producer (graph inputs' chains first), so the node
    // list stays topologically sorted.
    let original = std::mem::take(&mut graph.node);
    let mut placed: std::collections::HashSet<String> = Default::default();
    let mut place = |name: &str, into: &mut Vec<NodeProto>| {
        if let Some(chain) = chains.get(name) {
            if placed.insert(name.to_string()) {
                into.extend(chain.iter().cloned());
            }
        }
    };
    let mut sorted = Vec::with_capacity(original.len() + 5 * tensors.len());
    let produced: std::collections::HashSet<String> = original
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    for t in tensors {
        if !produced.contains(t) {
            place(t, &mut sorted);
        }
    }
    for node in original {
        let outputs = node.output.clone();
        sorted.push(node);
        for o in &outputs {
            place(o, &mut sorted);
        }
    }
    graph.node = sorted;
    Ok(model)
}

fn scalar_input(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim: vec![] }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One line for the terminal: what won, against what, and where the choice mattered most.
pub fn summary(r: &AutoReport) -> String {
    let (best_label, best_fixed) = r
        .uniform
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(m, l)| (m.as_str(), *l))
        .unwrap_or(("-", f64::NAN));
    let worst_fixed = r.uniform.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    let mut counts: IndexMap<&str, usize> = IndexMap::new();
    for (_, m) in &r.tensors {
        *counts.entry(m.as_str()).or_default() += 1;
    }
    let mix: Vec<String> = counts.iter().map(|(m, n)| format!("{m} x{n}")).collect();
    let mut changed: Vec<&BlockChoice> = r.blocks.iter().filter(|b| b.gain > 0.0).collect();
    changed.sort_by(|a, b| b.gain.total_cmp(&a.gain));
    let mattered: Vec<String> = changed
        .iter()
        .take(3)
        .map(|b| {
            format!(
                "'{}'..'{}' -> {} (-{:.0}%)",
                b.first,
                b.last,
                b.chosen,
                100.0 * b.gain
            )
        })
        .collect();
    let default_label = CANDIDATES[0].label();
    let mut ranked: Vec<&TensorChoice> = r.choices.iter().filter(|c| c.mattered > 0.0).collect();
    ranked.sort_by(|a, b| b.mattered.total_cmp(&a.mattered));
    let tensors: Vec<String> = ranked
        .iter()
        .take(3)
        .map(|c| {
            let default = c.widths.first().map(|x| x.1).unwrap_or(f32::NAN);
            let chosen = c
                .widths
                .iter()
                .find(|(m, _)| *m == c.method)
                .map(|x| x.1)
                .unwrap_or(f32::NAN);
            format!(
                "'{}' {} (range x{:.2} of {})",
                c.tensor,
                c.method,
                chosen / default,
                default_label
            )
        })
        .collect();
    format!(
        "ranges chosen by output error (auto, {} on {} sample(s){}, {} assignments scored in {:.1}s + {:.1}s to build the scoring plan): {}; loss {:.3e}, best single method {:.3e} ({}), worst {:.3e}; {} {}{}{}",
        r.losses.join("+"),
        r.samples,
        if r.cross_fitted {
            ", each scored with ranges from the other half of the calibration data"
        } else {
            ""
        },
        r.evaluations,
        r.seconds.scoring,
        r.seconds.build,
        mix.join(", "),
        r.loss,
        best_fixed,
        best_label,
        worst_fixed,
        if r.blocks.is_empty() { "chose" } else { "started from" },
        if r.start == default_label && best_label != default_label {
            format!(
                "{} (the default: no method's loss {:.0}% lower)",
                r.start,
                100.0 * UNIFORM_MIN_GAIN
            )
        } else {
            r.start.clone()
        },
        if mattered.is_empty() {
            String::new()
        } else {
            format!("; mattered most: {}", mattered.join(", "))
        },
        if tensors.is_empty() {
            String::new()
        } else {
            format!("; tensors whose range moved most: {}", tensors.join(", "))
        }
    )
}
