//! Proof by execution: run the original and the candidate model in tract 0.23.9 on the same
//! inputs and compare every output.
//!
//! The validator never compares against a run it cannot trust:
//! 1. Both models go through [`crate::runtime::simulation_graph`]: constant `If`s are inlined, constant weight
//!    `DequantizeLinear`s (int8/uint8/int4/uint4/int2/uint2/int16/uint16/int32, per-tensor,
//!    per-axis, block-wise) become float initializers computed here with the ONNX formula, and
//!    f16 weights feeding `Cast(to=float)` are widened ahead of time. These rewrites are exact;
//!    the candidate's per-tensor activation `QuantizeLinear`s then become float ops and a
//!    `Cast` tract vectorizes ([`crate::runtime::fake_quant_as_float_ops`]: the same integers
//!    as tract's scalar kernel for finite inputs; undone when tract refuses the result), and
//!    the `DequantizeLinear`s after them a float `Mul` where tract keeps that apart (the same
//!    product), else tract's own. Above
//!    [`ONE_MODEL_AT_A_TIME_ABOVE`], the 8- and 32-bit weight `DequantizeLinear`s tract can load
//!    are left to tract, which folds them with the same formula: no float copy of the weights
//!    on our side beside tract's.
//! 2. What is left is scanned for anything tract 0.23.9 would misread or cannot load
//!    (see `support.rs`): non-standard domains, missing ops (`Loop`, sequences), element types
//!    without a tract `DatumType`, block-wise / f16-scale / 16-bit / `output_dtype` Q/DQ on
//!    activations, sparse initializers. Any hit gives `status: not_checked` with the reason.
//! 3. Both are loaded with value_info ignored, inputs pinned, optimized once and run on
//!    `samples` seeded standard-normal batches (or the user's inputs).
//!
//! In-sample rows whose outputs the calibration run of this very original kept
//! ([`crate::calibrate::reference`]: matched by the digest of each row's feeds, and only when the
//! original needs no simulation rewrite) are not run in the original again; with every row kept
//! and no latency to time, the original's plan is not built at all. A note counts those rows.
//! When calibration ran a rewrite of the original (the passes before quantization changed the
//! graph), its kept outputs are taken only after the original's own run of the first kept row
//! gave the same bits; else the original runs on every row (a note says which).
//!
//! In-sample rows stop early with [`EarlyStop`] (the default run without `--eval`): rows run
//! in order up to checkpoints `k = first, 2 first, 4 first, ...`; at each, the SQNR of every
//! output on rows `[0, k/2)` and on `[k/2, k)` is compared, and when all agree within
//! `tolerance_db` the rest is not run (`samples` says how many rows were compared, of
//! `samples_given`). The decision only reads sums in row order: the same rows whatever the
//! thread count. Measured (BENCHMARKS.md, issue 17 session 12): 16 or 32 rows give the 64-row
//! SQNR within 1 dB on resnet18, mobilenet_v2, efficientnet_b0, ppocr_rec, vit_small, resnet50
//! and digits_cnn; near-identical outputs (SQNR above ~100 dB, float noise) may run all rows.
//!
//! `method` is `direct` when neither model needed a rewrite, `simulation` otherwise; `rewrites`
//! lists each one, prefixed by the model it applies to.
//!
//! Metrics per output, over all samples (f64 math), defined once in [`Acc`]:
//! - **non-finite values first.** An element that is finite in one model and NaN/inf in the
//!   other (or inf of the other sign, or NaN against inf) is a *non-finite mismatch*. Any
//!   mismatch makes the report's status [`Status::Failed`] (the comparison ran and the output is
//!   wrong where the original is not), and every gate bound fails on it. Elements non-finite
//!   in both models the same way are counted (`nonfinite_original`) and are not errors.
//! - over the elements finite in both (`compared` of `elements`): max and mean absolute error,
//!   cosine similarity of the flattened tensors (1 when both are all-zero), SQNR in dB
//!   `10 log10(sum ref^2 / sum (ref - out)^2)` (+inf when identical); with no finite element
//!   compared, SQNR, cosine and the errors are NaN (never "identical"). Non-finite numbers
//!   serialize as JSON `null`.
//! - for 2-D `[N, C]` outputs with `C > 1`, the fraction of rows whose argmax agrees.
//! - for logits `[batch, seq, vocab]` of token windows (one integer input `[batch, seq]`):
//!   next-token agreement, KL and perplexity on the windows' own next tokens ([`language`]).

pub mod generate;
pub mod language;
pub mod latency;

use anyhow::{bail, Context, Result};
use ndarray::ArrayD;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Serialize, Serializer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::calibrate::reference::ReferenceOutputs;

use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::ModelProto;

use crate::runtime::{
    fake_quant_as_float_ops, refusal, resolve_input_shapes, simulation_graph_with, Feed, InputSpec,
    Runner, WeightFolding, RUNTIME,
};

#[derive(Debug, Clone)]
pub struct ValidateOptions {
    /// User inputs: batches of typed values by input name (shapes taken from the first
    /// batch; later ones must match it). `None`: synthetic inputs.
    pub inputs: Option<Vec<crate::calibrate::NamedBatch>>,
    /// Seed of the synthetic inputs (ChaCha8).
    pub seed: u64,
    /// Concrete shapes for inputs with symbolic dims (full shapes, by input name).
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Number of synthetic batches.
    pub samples: usize,
    /// Class labels of the user inputs' rows: with them, classifier-like outputs (`[N, C]`)
    /// also report the accuracy of both models.
    pub labels: Option<Vec<i64>>,
    /// The given `inputs` are the calibration data the output was fitted on (in-sample), not
    /// held-out data: reported as [`InputSource::Calibration`].
    pub in_sample: bool,
    /// Each user input's batch axis (`None`: given whole to every row), when the given batches
    /// may be cut into single rows: both models then run one row at a time, rows on all cores,
    /// and latency is timed at batch 1. `None` (the model fixes its batch size, KV-cache
    /// steps): each given batch runs as it is.
    pub row_axes: Option<Vec<(String, Option<usize>)>>,
    /// Stop comparing user rows early once the SQNR is stable ([`EarlyStop`]); `None`: every
    /// given row (and every synthetic batch) is compared.
    pub early_stop: Option<EarlyStop>,
    /// When both models are timed ([`latency::LatencyTiming`]).
    pub latency: latency::LatencyTiming,
    /// The original's outputs on calibration rows, kept from the calibration run
    /// ([`crate::calibrate::reference`]): rows whose feeds they match are not run in the
    /// original again. Used only when the original needs no simulation rewrite.
    pub reference: Option<Arc<ReferenceOutputs>>,
    /// Models larger than this (encoded bytes) are validated one at a time
    /// ([`ONE_MODEL_AT_A_TIME_ABOVE`] unless a test asks otherwise).
    pub one_at_a_time_above: u64,
}

/// When in-sample validation may stop before the last given row (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStop {
    /// The first checkpoint, in rows (then doubled at each checkpoint).
    pub first_rows: usize,
    /// Largest difference in dB between the SQNRs of a checkpoint's two halves, per output.
    pub tolerance_db: f64,
}

impl Default for EarlyStop {
    /// 16 rows, 1 dB. Session 12 chose 1.5 dB (at 1 dB resnet50 ran all 64 rows: its 32-row
    /// halves differ by 1.04 dB, for a 32-row SQNR 0.2 dB from the 64-row one); at 1.5 dB
    /// RegNetX-400MF stopped at 32 rows (halves 1.28 dB apart) on 21.15 dB against 19.95 on all
    /// 64 and 17.36 held out, outside issue 20's 3 dB (BENCHMARKS.md, issue 20 session 13:
    /// "early stop"). Truth before cost: 1 dB, which costs resnet50 32 more rows.
    fn default() -> Self {
        EarlyStop {
            first_rows: 16,
            tolerance_db: 1.0,
        }
    }
}

impl EarlyStop {
    /// Whether the SQNRs of two halves agree: both non-finite the same way (identical outputs,
    /// nothing compared), or finite within `tolerance_db`.
    fn agree(&self, a: f64, b: f64) -> bool {
        if a.is_finite() && b.is_finite() {
            (a - b).abs() <= self.tolerance_db
        } else {
            (a.is_nan() && b.is_nan()) || a == b
        }
    }
}

/// Largest over median output energy of the compared rows above which the validation says that
/// its SQNR is carried by a few rows. The SQNR pools every row's error, so rows with far more
/// output energy than the rest decide it, and held-out inputs can land far beyond them: on the
/// zoo's EfficientNet-B0 the calibration rows span a factor 1113 and one held-out crop, 12.6x
/// the largest calibration row, carries 98.9% of the held-out error (10.3 dB in-sample, 2.6
/// held-out). The other ten zoo image models span 1.0-45 (BENCHMARKS.md, issue 20 session 13).
pub const ENERGY_SPREAD_NOTE_ABOVE: f64 = 100.0;

/// The note for one output whose rows' energies spread beyond [`ENERGY_SPREAD_NOTE_ABOVE`].
fn energy_spread_note(output: &str, energies: &[f64]) -> Option<String> {
    let mut sorted: Vec<f64> = energies.iter().copied().filter(|e| e.is_finite()).collect();
    if sorted.len() < 4 {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let max = sorted[sorted.len() - 1];
    let spread = max / median;
    let share = max / sorted.iter().sum::<f64>();
    (median > 0.0 && spread > ENERGY_SPREAD_NOTE_ABOVE).then(|| {
        format!(
            "output '{output}': its energy spans a factor {spread:.0} over the {} rows compared (largest / median row; the largest holds {:.0}% of it): the SQNR is carried by a few rows, and other inputs can differ from it by far more than the rows suggest",
            sorted.len(),
            100.0 * share
        )
    })
}

/// SQNR in dB of signal power `rr` over error power `err2` ([`OutputMetrics::sqnr_db`]).
fn sqnr_db(rr: f64, err2: f64) -> f64 {
    if err2 == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (rr / err2).log10()
    }
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            inputs: None,
            seed: 0,
            input_shapes: Vec::new(),
            samples: 4,
            labels: None,
            in_sample: false,
            row_axes: None,
            early_stop: None,
            latency: latency::LatencyTiming::default(),
            reference: None,
            one_at_a_time_above: ONE_MODEL_AT_A_TIME_ABOVE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Both models ran; `outputs` holds the metrics (judging them is the caller's business).
    Checked,
    /// The comparison was not made; `reason` says why.
    NotChecked,
    /// Both loaded but their interfaces disagree (missing output, different shapes, ...):
    /// a definite failure; `reason` says what.
    Mismatch,
    /// Both models ran, and an output holds NaN/inf where the original's is finite (or the
    /// reverse): a definite failure; `reason` names the outputs and counts, `outputs` holds the
    /// metrics over the remaining elements.
    Failed,
}

impl Status {
    /// Whether both models ran and `outputs` holds metrics.
    pub fn ran(self) -> bool {
        matches!(self, Status::Checked | Status::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Both models ran in tract as given.
    Direct,
    /// At least one model ran as its simulation graph (see `rewrites`).
    Simulation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSource {
    /// Held-out inputs the user gave (`--eval`).
    User,
    /// The calibration inputs (`--calib` without `--eval`): in-sample, the data the ranges
    /// were fitted on; a fidelity measure, optimistic for held-out data.
    Calibration,
    /// Seeded standard-normal inputs: a smoke test that the output runs and matches in
    /// structure, not a fidelity measure (a calibrated model is not meant for noise).
    Synthetic,
}

impl InputSource {
    /// How the summary names the data on each metrics line.
    pub fn tag(self) -> &'static str {
        match self {
            InputSource::User => "on held-out data",
            InputSource::Calibration => "in-sample, on calibration data",
            InputSource::Synthetic => "on synthetic noise: smoke test only",
        }
    }
}

/// Serialize a float as JSON `null` when it is not finite (JSON has no inf/NaN).
pub fn finite_or_null<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputMetrics {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(serialize_with = "finite_or_null")]
    pub max_abs_err: f64,
    #[serde(serialize_with = "finite_or_null")]
    pub mean_abs_err: f64,
    #[serde(serialize_with = "finite_or_null")]
    pub cosine: f64,
    /// +inf when the outputs are identical (JSON `null`).
    #[serde(serialize_with = "finite_or_null")]
    pub sqnr_db: f64,
    /// For `[N, C]` outputs with `C > 1`: fraction of rows with the same argmax.
    pub top1_agreement: Option<f64>,
    /// Elements where either side is NaN/inf and the two differ (excluded from the sums above;
    /// any makes the status `failed`).
    pub nonfinite_mismatches: usize,
    /// Elements non-finite in the original and the same in the candidate (excluded, not errors).
    pub nonfinite_original: usize,
    /// Elements compared (finite in both) out of all elements of this output.
    pub compared: usize,
    pub elements: usize,
    /// With labels: fraction of rows whose argmax is the label, for each model.
    pub accuracy_original: Option<f64>,
    pub accuracy_candidate: Option<f64>,
    /// Language-model logits of token windows: next-token agreement and perplexity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<language::LanguageMetrics>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub status: Status,
    pub method: Method,
    pub reason: Option<String>,
    pub runtime: &'static str,
    /// Rewrites applied to build the simulation graphs, prefixed `original:` / `candidate:`.
    pub rewrites: Vec<String>,
    /// Assumptions made (symbolic dims set to 1, ...).
    pub notes: Vec<String>,
    pub input_source: InputSource,
    pub inputs: Vec<InputSpec>,
    /// Batches (rows, when cut into rows) compared.
    pub samples: usize,
    /// Batches (rows) given or generated; more than `samples` when validation stopped early.
    pub samples_given: usize,
    pub seed: u64,
    pub outputs: Vec<OutputMetrics>,
    /// Both models timed in tract on the first batch ([`latency`]); `None` when the
    /// comparison did not run, timing failed, or [`latency::LatencyTiming`] left it out (a
    /// note says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<latency::Latency>,
}

impl ValidationReport {
    /// A report for a validation that could not start (e.g. inputs that cannot be synthesised).
    pub fn not_checked(reason: String) -> Self {
        ValidationReport {
            status: Status::NotChecked,
            method: Method::Direct,
            reason: Some(reason),
            runtime: RUNTIME,
            rewrites: Vec::new(),
            notes: Vec::new(),
            input_source: InputSource::Synthetic,
            inputs: Vec::new(),
            samples: 0,
            samples_given: 0,
            seed: 0,
            outputs: Vec::new(),
            latency: None,
        }
    }
}

/// The rewrite note for `n` activation `QuantizeLinear`s run as float ops.
fn fake_quant_note(n: usize) -> String {
    format!(
        "ran {n} activation QuantizeLinear{} as float ops (and a Cast, or their \
         DequantizeLinears as a float Mul: the same numbers as tract's QuantizeLinear and \
         DequantizeLinear for finite inputs)",
        if n == 1 { "" } else { "s" }
    )
}

/// Compares `candidate` against `original` in tract (see the module docs). `Err` only for bad
/// options (unknown input names, non-float inputs without user values, wrong shapes) or a model
/// without a graph; everything tract cannot do is a `not_checked` report.
/// Inputs larger than this (encoded bytes) are validated one model at a time, without latency.
pub const ONE_MODEL_AT_A_TIME_ABOVE: u64 = 256 << 20;

pub fn validate(
    original: &ModelProto,
    candidate: &ModelProto,
    opts: &ValidateOptions,
) -> Result<ValidationReport> {
    // A large model is run one at a time: the original's outputs first, then its weights
    // are dropped before the candidate's are loaded (tract holds a copy of each). Its int8
    // weights are dequantized by tract at load, not by us ahead of time: the same numbers
    // without a float copy of the model on our side next to tract's.
    let one_at_a_time = prost::Message::encoded_len(original) as u64 > opts.one_at_a_time_above;
    let folding = if one_at_a_time {
        WeightFolding::OnlyWhatTractCannotLoad
    } else {
        WeightFolding::AheadOfTime
    };
    let (sim_o, rw_o) = simulation_graph_with(original, folding)
        .context("building the original's simulation graph")?;
    let (mut sim_c, rw_c) = simulation_graph_with(candidate, folding)
        .context("building the candidate's simulation graph")?;
    // Activation QuantizeLinears as float ops (bit-exact, see `runtime::simulate`); undone if
    // tract refuses the result.
    // An exact speed-up, not a rewrite the candidate needs: a note, `method` stays.
    let mut fake_quant = fake_quant_as_float_ops(&mut sim_c)?;
    let fake_quant_notes: Vec<String> = fake_quant
        .iter()
        .map(|(n, _)| format!("candidate: {}", fake_quant_note(*n)))
        .collect();
    let timed_as = |method: Method| {
        if fake_quant_notes.is_empty() {
            method
        } else {
            Method::Simulation
        }
    };
    let mut rewrites: Vec<String> = rw_o.iter().map(|r| format!("original: {r}")).collect();
    rewrites.extend(rw_c.iter().map(|r| format!("candidate: {r}")));
    let method = if rewrites.is_empty() {
        Method::Direct
    } else {
        Method::Simulation
    };
    let input_source = match (&opts.inputs, opts.in_sample) {
        (Some(_), false) => InputSource::User,
        (Some(_), true) => InputSource::Calibration,
        (None, _) => InputSource::Synthetic,
    };
    let user_batches = match (&opts.inputs, &opts.row_axes) {
        (Some(given), Some(axes)) => given.iter().flat_map(|b| rows_of(b, axes)).collect(),
        (Some(given), None) => given.clone(),
        (None, _) => Vec::new(),
    };
    let shapes: Vec<(String, Vec<usize>)> = match user_batches.first() {
        Some(first) => first
            .iter()
            .map(|(n, a)| (n.clone(), a.shape().to_vec()))
            .collect(),
        None => opts.input_shapes.clone(),
    };
    let (specs, mut notes) = resolve_input_shapes(original, &shapes)?;
    notes.extend(fake_quant_notes.iter().cloned());
    let mut report = ValidationReport {
        status: Status::NotChecked,
        method,
        reason: None,
        runtime: RUNTIME,
        rewrites,
        notes,
        input_source,
        inputs: specs.clone(),
        samples: 0,
        samples_given: 0,
        seed: opts.seed,
        outputs: Vec::new(),
        latency: None,
    };
    let not_checked = |mut r: ValidationReport, status: Status, reason: String| {
        r.status = status;
        r.reason = Some(reason);
        Ok(r)
    };
    for (which, m) in [("original", &sim_o), ("candidate", &sim_c)] {
        if let Some(reason) = refusal(m) {
            return not_checked(report, Status::NotChecked, format!("{which}: {reason}"));
        }
    }
    let (cand_specs, _) = match resolve_input_shapes(candidate, &shapes) {
        Ok(x) => x,
        Err(e) => return not_checked(report, Status::Mismatch, format!("candidate inputs: {e:#}")),
    };
    if cand_specs != specs {
        let names = |s: &[InputSpec]| {
            s.iter()
                .map(|i| format!("{}{:?}", i.name, i.shape))
                .collect::<Vec<_>>()
        };
        return not_checked(
            report,
            Status::Mismatch,
            format!(
                "inputs differ: original {:?}, candidate {:?}",
                names(&specs),
                names(&cand_specs)
            ),
        );
    }
    let batches = if opts.inputs.is_some() {
        user_batches
            .iter()
            .map(|b| order_user_inputs(&specs, b))
            .collect::<Result<Vec<_>>>()?
    } else {
        synthetic_batches(&specs, opts.seed, opts.samples, &mut report.notes)?
    };
    // Unless the model is run one at a time (above), both plans are built side by side
    // (tract's analysis of one model runs on one core), and the original, usually built first,
    // runs the first rows while the candidate's plan is still being built (EfficientNet-B0's
    // simulation graph takes 1.8 s to optimize, its original 0.3 s): those outputs are kept
    // for the comparison below. The same outputs whenever they are computed.
    let first_rows = opts
        .early_stop
        .filter(|_| opts.inputs.is_some())
        .map_or(batches.len(), |s| s.first_rows.max(2))
        .min(batches.len());
    // The original's outputs the calibration run kept, on the rows they were computed on.
    let kept = match (&opts.reference, opts.inputs.is_some() && rw_o.is_empty()) {
        (Some(reference), true) if reference.are_of(original) => {
            kept_outputs(&sim_o, reference, &specs, &batches)
        }
        _ => None,
    };
    // Outputs of a rewrite of the original: taken below only once the original's own run of
    // the first kept row gives the same bits (nothing is copied before).
    let rewrite_kept = match (&opts.reference, opts.inputs.is_some() && rw_o.is_empty()) {
        (Some(reference), true) if reference.are_of_a_rewrite_of(original) => Some(reference),
        _ => None,
    };
    let kept_rows = kept
        .as_ref()
        .map_or(0, |(_, rows)| rows.iter().flatten().count());
    // With every row's outputs kept and no latency to time, the original is not built at all.
    let timing_asked = opts.latency.applies(candidate);
    let skip_original = kept_rows == batches.len() && !batches.is_empty() && timing_asked.is_err();
    let candidate_built = AtomicBool::new(false);
    let kept_ahead = kept
        .as_ref()
        .is_some_and(|(_, rows)| rows[..first_rows].iter().all(Option::is_some));
    let (built_o, built_c, ahead) = if skip_original {
        let c = (!one_at_a_time).then(|| Runner::new(&sim_c, &shapes, &[]));
        (None, c, Vec::new())
    } else if one_at_a_time {
        (Some(Runner::new(&sim_o, &shapes, &[])), None, Vec::new())
    } else {
        let ((o, ahead), c) = rayon::join(
            || {
                let o = Runner::new(&sim_o, &shapes, &[]);
                let ahead = match &o {
                    Ok(r) if !kept_ahead => run_ahead(r, &batches[..first_rows], &candidate_built),
                    _ => Vec::new(),
                };
                (o, ahead)
            },
            || {
                let c = Runner::new(&sim_c, &shapes, &[]);
                candidate_built.store(true, Ordering::Release);
                c
            },
        );
        (Some(o), Some(c), ahead)
    };
    let runner_o = match built_o.transpose() {
        Ok(r) => r,
        Err(e) => return not_checked(report, Status::NotChecked, format!("original: {e:#}")),
    };
    let (names_o, mut stored_o) = match (&runner_o, kept) {
        (_, Some((names, rows))) => {
            // Kept rows first; a row the calibration run did not keep may have run ahead.
            let mut ahead = ahead;
            let rows = rows
                .into_iter()
                .enumerate()
                .map(|(b, k)| k.or_else(|| ahead.get_mut(b).and_then(Option::take)))
                .collect();
            (names, rows)
        }
        (Some(r), None) => {
            let mut rows = ahead;
            rows.resize(batches.len(), None);
            (r.output_names().to_vec(), rows)
        }
        (None, None) => {
            return not_checked(report, Status::NotChecked, "original: not built".into())
        }
    };
    if kept_rows > 0 {
        report.notes.push(format!(
            "the original's outputs came from the calibration run for {kept_rows} of {} rows \
             (the same model in tract on the same rows, with the observed tensors as extra \
             outputs): not run again",
            batches.len()
        ));
    }
    if let (Some(reference), Some(r)) = (rewrite_kept, &runner_o) {
        match take_rewrite_outputs(r, reference, &specs, &batches, &mut stored_o, &names_o) {
            Ok(note) => report.notes.push(note),
            Err(e) => return not_checked(report, Status::NotChecked, format!("original: {e:#}")),
        }
    }
    let mut runner_o = runner_o;
    if one_at_a_time {
        // The rows not kept, up to the first early-stop checkpoint, run now on all cores; the
        // original's plan is dropped before the candidate's is built (rows past the checkpoint
        // build it again, below, only when the checkpoint is not stable).
        if let Some(r) = runner_o.take() {
            let missing: Vec<usize> = (0..first_rows).filter(|&b| stored_o[b].is_none()).collect();
            let outs: Vec<Result<Vec<ArrayD<f32>>>> =
                missing.par_iter().map(|&b| r.run(&batches[b])).collect();
            for (b, out) in missing.into_iter().zip(outs) {
                match out {
                    Ok(o) => stored_o[b] = Some(o),
                    Err(e) => {
                        return not_checked(report, Status::NotChecked, format!("original: {e:#}"))
                    }
                }
            }
        }
        report.notes.push(format!(
            "validated one model at a time (the input is above {} MiB): latency not timed",
            ONE_MODEL_AT_A_TIME_ABOVE >> 20
        ));
    }
    let built_c = built_c.unwrap_or_else(|| Runner::new(&sim_c, &shapes, &[]));
    let built_c = match (built_c, fake_quant.take()) {
        (Err(_), Some((n, undo))) => {
            undo.undo(&mut sim_c);
            let note = format!("candidate: {}", fake_quant_note(n));
            report.notes.retain(|r| *r != note);
            report.notes.push(
                "tract refused the activation QuantizeLinears as float ops: the candidate \
                 ran with tract's own QuantizeLinear"
                    .into(),
            );
            Runner::new(&sim_c, &shapes, &[])
        }
        (built, _) => built,
    };
    let runner_c = match built_c {
        Ok(r) => r,
        Err(e) => return not_checked(report, Status::NotChecked, format!("candidate: {e:#}")),
    };
    // Candidate output index for each original output, by name.
    let mut pairs = Vec::new();
    for (i, name) in names_o.iter().enumerate() {
        match runner_c.output_names().iter().position(|n| n == name) {
            Some(j) => pairs.push((i, j)),
            None => {
                return not_checked(
                    report,
                    Status::Mismatch,
                    format!("candidate has no output '{name}'"),
                )
            }
        }
    }
    // The candidate as written, for latency, is built beside the comparison rows (tract's
    // analysis runs on one core; the rows use all of them): the same plan, built sooner.
    let latency_method = timed_as(method);
    let timed = match timing_asked {
        Ok(()) => runner_o.is_some(),
        Err(note) => {
            report.notes.push(note);
            false
        }
    };
    let as_written = (timed
        && runner_o.is_some()
        && !batches.is_empty()
        && latency_method == Method::Simulation)
        .then(|| {
            let (candidate, shapes) = (candidate.clone(), shapes.clone());
            std::thread::spawn(move || Runner::new(&candidate, &shapes, &[]).ok())
        });
    let labels = opts.labels.as_deref().filter(|_| opts.inputs.is_some());
    let mut label_at = 0usize;
    let mut accs: Vec<Acc> = pairs.iter().map(|_| Acc::default()).collect();
    let mut shapes_out: Vec<Vec<usize>> = vec![Vec::new(); pairs.len()];
    let progress = crate::progress::Progress::bar("validating", batches.len() as u64);
    // Batches run side by side (the original and the candidate too), a window at a time so
    // that only a window's outputs are held; metrics are summed in batch order, so they are
    // the same whatever the thread count.
    let window = 4 * rayon::current_num_threads().max(1);
    report.samples_given = batches.len();
    // In-sample rows stop at the first checkpoint whose two halves agree (module docs); windows
    // end at the checkpoints and their midpoints, so the rows run do not depend on threads.
    let early_stop = opts.early_stop.filter(|_| opts.inputs.is_some());
    let mut checkpoint = early_stop
        .map(|s| s.first_rows.max(2))
        .filter(|&k| k < batches.len());
    let mut first_half: Vec<(f64, f64)> = Vec::new();
    // Each compared row's output energy, per output (for the spread note below).
    let mut row_energy: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    let mut last = batches.len();
    let mut start = 0;
    while start < last {
        let mut end = (start + window).min(last);
        if let Some(k) = checkpoint {
            end = end.min(if start < k / 2 { k / 2 } else { k });
        }
        let stored: Vec<Option<Vec<ArrayD<f32>>>> = (start..end)
            .map(|b| stored_o.get_mut(b).and_then(Option::take))
            .collect();
        if runner_o.is_none() && stored.iter().any(Option::is_none) {
            // Past the first checkpoint of a model validated one at a time: both plans held.
            match Runner::new(&sim_o, &shapes, &[]) {
                Ok(r) => runner_o = Some(r),
                Err(e) => {
                    return not_checked(report, Status::NotChecked, format!("original: {e:#}"))
                }
            }
            report.notes.push(format!(
                "the original ran again from row {}: its plan was built beside the candidate's",
                start + 1
            ));
        }
        let outputs: Vec<std::result::Result<RunPair, String>> = (start..end)
            .into_par_iter()
            .zip(stored)
            .map(|(b, stored)| run_pair(runner_o.as_ref(), &runner_c, &batches[b], stored))
            .collect();
        for (b, result) in (start..end).zip(outputs) {
            progress.inc(1);
            let batch = &batches[b];
            let (out_o, out_c) = match result {
                Ok(pair) => pair,
                Err(reason) => return not_checked(report, Status::NotChecked, reason),
            };
            for (k, &(i, j)) in pairs.iter().enumerate() {
                let (r, c) = (&out_o[i], &out_c[j]);
                if r.shape() != c.shape() {
                    let name = &names_o[i];
                    return not_checked(
                        report,
                        Status::Mismatch,
                        format!(
                            "output '{name}': original shape {:?}, candidate {:?}",
                            r.shape(),
                            c.shape()
                        ),
                    );
                }
                shapes_out[k] = r.shape().to_vec();
                let before = accs[k].rr;
                accs[k].add(r, c);
                row_energy[k].push(accs[k].rr - before);
                if let [Feed::I64(tokens)] = batch.as_slice() {
                    if language::applies(tokens.shape(), r.shape()) {
                        accs[k]
                            .language
                            .get_or_insert_with(Default::default)
                            .add(tokens, r, c);
                    }
                }
                if let Some(labels) = labels {
                    accs[k].add_labels(r, c, labels.get(label_at..).unwrap_or(&[]));
                }
            }
            label_at += out_o
                .first()
                .and_then(|o| o.shape().first().copied())
                .unwrap_or(0);
        }
        start = end;
        if let (Some(k), Some(stop)) = (checkpoint, early_stop) {
            if end == k {
                let stable = accs.iter().zip(&first_half).all(|(a, &(rr, err2))| {
                    stop.agree(sqnr_db(rr, err2), sqnr_db(a.rr - rr, a.err2 - err2))
                });
                if stable {
                    last = k;
                    report.notes.push(format!(
                        "compared the first {k} of {} rows: the SQNR on rows 1-{} and {}-{k} agreed \
                         within {} dB on every output (--validate-samples N compares N rows)",
                        batches.len(),
                        k / 2,
                        k / 2 + 1,
                        stop.tolerance_db
                    ));
                }
                checkpoint = Some(2 * k).filter(|&k2| !stable && k2 < batches.len());
            }
        }
        // The sums at a checkpoint's midpoint (the previous checkpoint, after the first).
        if checkpoint.is_some_and(|k| end == k / 2) {
            first_half = accs.iter().map(|a| (a.rr, a.err2)).collect();
        }
    }
    report.samples = last;
    for (k, &(i, _)) in pairs.iter().enumerate() {
        if let Some(note) = energy_spread_note(&names_o[i], &row_energy[k]) {
            report.notes.push(note);
        }
    }
    report.outputs = pairs
        .iter()
        .zip(accs)
        .zip(shapes_out)
        .map(|((&(i, _), acc), shape)| acc.finish(names_o[i].clone(), shape))
        .collect();
    let failures: Vec<String> = report
        .outputs
        .iter()
        .filter(|o| o.nonfinite_mismatches > 0)
        .map(|o| {
            format!(
                "output '{}' has {} non-finite value(s) where the original's are finite (or the reverse), of {} elements",
                o.name, o.nonfinite_mismatches, o.elements
            )
        })
        .collect();
    if let (true, Some(batch), Some(runner_o)) = (timed, batches.first(), &runner_o) {
        // The candidate is timed as written when the float QuantizeLinears were used.
        let as_written = as_written.and_then(|h| h.join().ok().flatten());
        report.latency = time_models(as_written, runner_o, &runner_c, batch, latency_method);
    }
    if failures.is_empty() {
        report.status = Status::Checked;
    } else {
        report.status = Status::Failed;
        report.reason = Some(failures.join("; "));
    }
    Ok(report)
}

/// Most bytes of the original's outputs [`run_ahead`] keeps.
const RUN_AHEAD_BYTES: usize = 64 << 20;

/// The original's outputs on the first of `batches`, in order, until `candidate_built` is set,
/// a run fails (the comparison runs that row again and reports it) or [`RUN_AHEAD_BYTES`] are
/// held. With one thread the candidate's plan is built afterwards: every row of `batches`
/// (the rows up to the first early-stop checkpoint, compared in any case) runs here.
fn run_ahead(
    original: &Runner,
    batches: &[Vec<Feed>],
    candidate_built: &AtomicBool,
) -> Vec<Option<Vec<ArrayD<f32>>>> {
    let mut kept = Vec::new();
    let mut bytes = 0usize;
    for batch in batches {
        if candidate_built.load(Ordering::Acquire) || bytes > RUN_AHEAD_BYTES {
            break;
        }
        let Ok(out) = original.run(batch) else { break };
        bytes += out.iter().map(|o| o.len() * 4).sum::<usize>();
        kept.push(Some(out));
    }
    kept
}

/// Fill `stored` (the original's outputs per batch) from the outputs calibration kept for a
/// rewrite of the original, when the original's own run of the first kept row gives exactly
/// those bits (that row's outputs are stored either way). Returns the report's note.
fn take_rewrite_outputs(
    original: &Runner,
    reference: &ReferenceOutputs,
    specs: &[InputSpec],
    batches: &[Vec<Feed>],
    stored: &mut [Option<Vec<ArrayD<f32>>>],
    names_o: &[String],
) -> Result<String> {
    if reference.output_names != names_o {
        return Ok("the rewritten model calibration ran has other outputs: not used".into());
    }
    let kept_for = |batch: &Vec<Feed>| kept_row(reference, specs, batch);
    let Some(first) = batches.iter().position(|b| kept_for(b).is_some()) else {
        return Ok("calibration kept no row of the rewritten model's outputs".into());
    };
    let own = match stored[first].take() {
        Some(o) => o,
        None => original.run(&batches[first])?,
    };
    let same_bits = kept_for(&batches[first]).is_some_and(|kept| {
        kept.len() == own.len()
            && kept.iter().zip(&own).all(|(k, o)| {
                k.shape() == o.shape() && k.iter().zip(o).all(|(a, b)| a.to_bits() == b.to_bits())
            })
    });
    stored[first] = Some(own);
    if !same_bits {
        return Ok(format!(
            "calibration ran the model after the passes' rewrites, whose outputs on row {} differ \
             from the original's in some bit: the original ran on every row",
            first + 1
        ));
    }
    let mut taken = 0;
    for (slot, batch) in stored.iter_mut().zip(batches) {
        if slot.is_none() {
            if let Some(kept) = kept_for(batch) {
                *slot = Some(kept.to_vec());
                taken += 1;
            }
        }
    }
    Ok(format!(
        "the original's outputs came from the calibration run for {taken} of {} rows: it ran the \
         model after the passes' rewrites, whose outputs on row {} are the original's bit for bit \
         (run here)",
        batches.len(),
        first + 1
    ))
}

/// The outputs `reference` kept for the row whose feeds are `batch` (matched by digest).
fn kept_row<'a>(
    reference: &'a ReferenceOutputs,
    specs: &[InputSpec],
    batch: &[Feed],
) -> Option<&'a [ArrayD<f32>]> {
    reference.outputs_for(specs.iter().map(|s| s.name.as_str()).zip(batch))
}

/// The output names and, per batch, the outputs `reference` kept for that batch's feeds (in
/// the order of `original`'s graph outputs), when `original` is the model they were kept for:
/// the same graph outputs, in order. `None` when no batch was kept.
#[allow(clippy::type_complexity)]
fn kept_outputs(
    original: &ModelProto,
    reference: &ReferenceOutputs,
    specs: &[InputSpec],
    batches: &[Vec<Feed>],
) -> Option<(Vec<String>, Vec<Option<Vec<ArrayD<f32>>>>)> {
    let names: Vec<String> = original
        .graph
        .as_ref()?
        .output
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    if names != reference.output_names {
        return None;
    }
    let rows: Vec<Option<Vec<ArrayD<f32>>>> = batches
        .iter()
        .map(|batch| kept_row(reference, specs, batch).map(<[_]>::to_vec))
        .collect();
    rows.iter().any(Option::is_some).then_some((names, rows))
}

/// The original's and the candidate's outputs on one batch.
type RunPair = (Vec<ArrayD<f32>>, Vec<ArrayD<f32>>);

/// Run both models on `batch` side by side (the original's outputs may be `stored` already);
/// an error names the model that failed.
fn run_pair(
    original: Option<&Runner>,
    candidate: &Runner,
    batch: &[Feed],
    stored: Option<Vec<ArrayD<f32>>>,
) -> std::result::Result<RunPair, String> {
    let (out_o, out_c) = rayon::join(
        || match (stored, original) {
            (Some(o), _) => Ok(o),
            (None, Some(r)) => r.run(batch),
            (None, None) => Err(anyhow::anyhow!("no outputs")),
        },
        || candidate.run(batch),
    );
    let out_o = out_o.map_err(|e| format!("original: {e:#}"))?;
    let out_c = out_c.map_err(|e| format!("candidate: {e:#}"))?;
    Ok((out_o, out_c))
}

/// `batch` cut into single rows along each input's axis (inputs without one are given whole to
/// every row). A batch whose inputs disagree on their row count stays whole.
fn rows_of(
    batch: &crate::calibrate::NamedBatch,
    axes: &[(String, Option<usize>)],
) -> Vec<crate::calibrate::NamedBatch> {
    let axis_of = |name: &str| axes.iter().find(|(n, _)| n == name).and_then(|(_, a)| *a);
    let counts: Vec<usize> = batch
        .iter()
        .filter_map(|(n, f)| axis_of(n).and_then(|a| f.shape().get(a).copied()))
        .collect();
    let Some(&rows) = counts.first() else {
        return vec![batch.clone()];
    };
    if rows <= 1 || counts.iter().any(|&c| c != rows) {
        return vec![batch.clone()];
    }
    (0..rows)
        .map(|r| {
            batch
                .iter()
                .map(|(n, f)| {
                    let feed = match axis_of(n) {
                        Some(a) => f.slice_axis(a, r..r + 1),
                        None => f.clone(),
                    };
                    (n.clone(), feed)
                })
                .collect()
        })
        .collect()
}

/// Latency of both models on `batch` ([`latency`]): the candidate as written (`as_written`,
/// built when `method` is `Simulation`) when tract loads it as it is, else its simulation graph
/// (`runner_c`). Timing is best effort: `None` on error.
fn time_models(
    as_written: Option<Runner>,
    runner_o: &Runner,
    runner_c: &Runner,
    batch: &[Feed],
    method: Method,
) -> Option<latency::Latency> {
    match &as_written {
        // The comparison rows ran `runner_o` and `runner_c` already.
        Some(direct) => {
            latency::measure(runner_o, direct, batch, "output as written", [true, false])
        }
        None if method == Method::Direct => {
            latency::measure(runner_o, runner_c, batch, "output as written", [true, true])
        }
        None => latency::measure(runner_o, runner_c, batch, "simulation graph", [true, true]),
    }
    .ok()
}

fn order_user_inputs(specs: &[InputSpec], given: &[(String, Feed)]) -> Result<Vec<Feed>> {
    for (name, _) in given {
        if !specs.iter().any(|s| &s.name == name) {
            bail!("input '{name}' is not an input of the model");
        }
    }
    specs
        .iter()
        .map(|s| {
            given
                .iter()
                .find(|(n, _)| n == &s.name)
                .map(|(_, a)| a.clone())
                .with_context(|| format!("no value given for input '{}'", s.name))
        })
        .collect()
}

/// `samples` batches of standard-normal values (Box–Muller over ChaCha8 seeded with `seed`)
/// for float inputs; integer and bool inputs get zeros (one note each in `notes`), except a
/// rank-0 integer (a sample rate, a mode), which needs real values.
fn synthetic_batches(
    specs: &[InputSpec],
    seed: u64,
    samples: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<Vec<Feed>>> {
    let is_float = |s: &InputSpec| {
        matches!(
            DataType::try_from(s.elem_type),
            Ok(DataType::Float | DataType::Float16 | DataType::Double)
        )
    };
    for s in specs.iter().filter(|s| !is_float(s)) {
        if s.shape.is_empty() {
            bail!(
                "input '{}' is a {} scalar; synthetic inputs cannot guess it: fix it with --fix-input {}=VALUE or pass --eval/--calib data",
                s.name,
                s.elem_type_name,
                s.name
            );
        }
        notes.push(format!(
            "input '{}' ({}) is fed zeros in the synthetic validation inputs",
            s.name, s.elem_type_name
        ));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    (0..samples.max(1))
        .map(|_| {
            specs
                .iter()
                .map(|s| {
                    if !is_float(s) {
                        let dt = DataType::try_from(s.elem_type).unwrap_or(DataType::Int64);
                        return Feed::zeros(dt, &s.shape)
                            .with_context(|| format!("synthetic input '{}'", s.name));
                    }
                    let n: usize = s.shape.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| normal()).collect();
                    ArrayD::from_shape_vec(s.shape.clone(), v)
                        .map(Feed::F32)
                        .with_context(|| format!("synthetic input '{}'", s.name))
                })
                .collect()
        })
        .collect()
}

#[derive(Default)]
struct Acc {
    labelled: usize,
    correct_o: usize,
    correct_c: usize,
    n: usize,
    sum_abs: f64,
    max_abs: f64,
    dot: f64,
    rr: f64,
    oo: f64,
    err2: f64,
    rows: usize,
    agree: usize,
    nonfinite: usize,
    nonfinite_original: usize,
    elements: usize,
    language: Option<language::LanguageAcc>,
}

fn argmax(row: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in row.enumerate() {
        if v > best.1 || i == 0 {
            best = (i, v);
        }
    }
    best.0
}

impl Acc {
    /// Accuracy against labels for `[N, C]` outputs (rows beyond the labels are ignored).
    fn add_labels(&mut self, r: &ArrayD<f32>, c: &ArrayD<f32>, labels: &[i64]) {
        if r.ndim() != 2 || r.shape()[1] < 2 {
            return;
        }
        for ((ra, ca), &label) in r.outer_iter().zip(c.outer_iter()).zip(labels) {
            self.labelled += 1;
            self.correct_o += usize::from(argmax(ra.iter().copied()) as i64 == label);
            self.correct_c += usize::from(argmax(ca.iter().copied()) as i64 == label);
        }
    }

    fn add(&mut self, r: &ArrayD<f32>, c: &ArrayD<f32>) {
        for (&a, &b) in r.iter().zip(c.iter()) {
            self.elements += 1;
            if !(a.is_finite() && b.is_finite()) {
                if a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()) {
                    self.nonfinite += 1;
                } else {
                    self.nonfinite_original += 1;
                }
                continue;
            }
            let (a, b) = (f64::from(a), f64::from(b));
            let e = (a - b).abs();
            self.n += 1;
            self.sum_abs += e;
            self.max_abs = self.max_abs.max(e);
            self.dot += a * b;
            self.rr += a * a;
            self.oo += b * b;
            self.err2 += e * e;
        }
        if r.ndim() == 2 && r.shape()[1] > 1 {
            for (ra, ca) in r.outer_iter().zip(c.outer_iter()) {
                self.rows += 1;
                if argmax(ra.iter().copied()) == argmax(ca.iter().copied()) {
                    self.agree += 1;
                }
            }
        }
    }

    fn finish(self, name: String, shape: Vec<usize>) -> OutputMetrics {
        let nothing_compared = self.n == 0 && self.elements > 0;
        let cosine = if nothing_compared {
            f64::NAN
        } else if self.rr == 0.0 && self.oo == 0.0 {
            1.0
        } else if self.rr == 0.0 || self.oo == 0.0 {
            0.0
        } else {
            self.dot / (self.rr.sqrt() * self.oo.sqrt())
        };
        let sqnr_db = if nothing_compared {
            f64::NAN
        } else if self.err2 == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.rr / self.err2).log10()
        };
        OutputMetrics {
            name,
            shape,
            max_abs_err: if nothing_compared {
                f64::NAN
            } else {
                self.max_abs
            },
            mean_abs_err: if nothing_compared {
                f64::NAN
            } else if self.n == 0 {
                0.0
            } else {
                self.sum_abs / self.n as f64
            },
            cosine,
            sqnr_db,
            top1_agreement: (self.rows > 0).then(|| self.agree as f64 / self.rows as f64),
            nonfinite_mismatches: self.nonfinite,
            nonfinite_original: self.nonfinite_original,
            compared: self.n,
            elements: self.elements,
            accuracy_original: (self.labelled > 0)
                .then(|| self.correct_o as f64 / self.labelled as f64),
            accuracy_candidate: (self.labelled > 0)
                .then(|| self.correct_c as f64 / self.labelled as f64),
            language: self.language.as_ref().map(language::LanguageAcc::finish),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    #[test]
    fn rows_whose_energy_spans_more_than_the_bound_get_a_note() {
        let even = [1.0, 2.0, 1.5, 3.0, 2.5, 1.0];
        assert_eq!(energy_spread_note("y", &even), None);
        let heavy = [1.0, 2.0, 1.5, 3.0, 2.5, 1000.0];
        let note = energy_spread_note("y", &heavy).expect("a note");
        assert!(
            note.contains("output 'y'") && note.contains("factor 400"),
            "{note}"
        );
        assert!(note.contains("holds 99%"), "{note}");
        assert_eq!(
            energy_spread_note("y", &[1.0, 1e6]),
            None,
            "too few rows to say"
        );
        assert_eq!(
            energy_spread_note("y", &[0.0, 0.0, 0.0, 5.0]),
            None,
            "zero median"
        );
    }

    #[test]
    fn halves_agree_within_the_tolerance_or_non_finite_alike() {
        let stop = EarlyStop::default();
        assert!(stop.agree(20.0, 20.9));
        assert!(!stop.agree(20.0, 21.1));
        assert!(stop.agree(f64::INFINITY, f64::INFINITY));
        assert!(stop.agree(f64::NAN, f64::NAN));
        assert!(!stop.agree(f64::INFINITY, 120.0));
        assert!(!stop.agree(f64::NAN, 20.0));
        assert_eq!(sqnr_db(100.0, 1.0), 20.0);
        assert_eq!(sqnr_db(1.0, 0.0), f64::INFINITY);
    }

    #[test]
    fn a_batch_is_cut_into_rows_along_each_inputs_axis() {
        let x = Feed::F32(Array::from_shape_fn((3, 2), |(i, j)| (10 * i + j) as f32).into_dyn());
        // `state [2, batch]`: its batch axis is 1; `sr` is given whole.
        let state =
            Feed::F32(Array::from_shape_fn((2, 3), |(i, j)| (i + 100 * j) as f32).into_dyn());
        let sr = Feed::I64(ndarray::arr0(16000i64).into_dyn());
        let batch = vec![
            ("x".to_string(), x),
            ("state".to_string(), state),
            ("sr".to_string(), sr),
        ];
        let axes = vec![
            ("x".to_string(), Some(0)),
            ("state".to_string(), Some(1)),
            ("sr".to_string(), None),
        ];
        let rows = rows_of(&batch, &axes);
        assert_eq!(rows.len(), 3);
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(row[0].1.shape(), &[1, 2]);
            assert_eq!(row[0].1.as_f32().unwrap()[[0, 1]], (10 * r + 1) as f32);
            assert_eq!(row[1].1.shape(), &[2, 1]);
            assert_eq!(row[1].1.as_f32().unwrap()[[1, 0]], (1 + 100 * r) as f32);
            assert_eq!(row[2].1.shape(), &[] as &[usize]);
        }
        // Inputs that disagree on their row count: the batch stays whole.
        let short = vec![("x".to_string(), Some(0)), ("state".to_string(), Some(0))];
        assert_eq!(rows_of(&batch, &short).len(), 1);
    }
}
