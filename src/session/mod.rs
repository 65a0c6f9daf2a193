//! One run of the tool as a library function: [`compress`] loads the model and its data,
//! runs the pass pipeline, writes the output atomically, validates it side by side in tract,
//! checks the fidelity gate (blaming layers when it fails) and returns the [`RunReport`].
//!
//! ```text
//! load -> preflight (memory budget, finite weights) -> data (calib, eval) -> passes -> save -> validate -> gate [-> save] -> RunReport
//! ```
//!
//! The command line (`src/cli/`, not part of the library) only turns arguments into
//! [`CompressOptions`] and prints what comes back; [`crate::report`] renders the report.
//!
//! Invariants: the input file is never overwritten unless `force`; nothing is written when
//! a step before saving fails; with `no_write_on_fail` and a failed gate nothing is written.

mod branch_shapes;
pub mod data;
pub mod gate;
pub mod inspect;
pub mod preflight;
pub mod report;
pub mod specialized_validation;
pub mod timings;
pub mod write;

pub use data::{DataSources, EvalData};
pub use report::{ModelSide, RunReport};

use crate::calibrate::reference::{ReferenceRequest, KEPT_OUTPUT_BYTES};
use crate::ir::facts::model_stats;
use crate::ir::Model;
use crate::limits::MemoryBudget;
use crate::onnx::{load, save};
use crate::passes::PassContext;
use crate::runtime::{value_shapes, value_shapes_given};
use crate::validate::{self, generate, ValidateOptions, ValidationReport};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// At most this many calibration samples validate a run without `--eval` (the first ones),
/// fewer when the SQNR is stable sooner ([`validate::EarlyStop`]: from 16 rows, doubling until
/// two halves agree within 1 dB); `--validate-samples N` compares exactly the first N.
pub const VALIDATION_CALIBRATION_SAMPLES: usize = 64;

/// Everything one run needs, already parsed and checked for consistency.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Allow `output` to name the input file (it is replaced atomically).
    pub force: bool,
    /// Pass names, resolved by [`crate::passes::select`] (run in pipeline order).
    pub passes: Vec<&'static str>,
    /// Options of every pass; calibration data is attached from `data` by the run.
    pub ctx: PassContext,
    pub data: DataSources,
    /// Full shapes for inputs with symbolic dims (`--input-shape`), by input name.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// `--fix-input`: inputs made constants (values typed by the input's element type), then
    /// folded; the specialized model is what the output is validated against.
    pub fix_inputs: Vec<(String, Vec<f64>)>,
    /// Store tensors in `<output>.data` (also when the input used external data).
    pub external_data: bool,
    /// Run the side-by-side check in tract.
    pub validate: bool,
    /// Seed of synthetic validation and calibration inputs.
    pub seed: u64,
    /// Synthetic validation batches (without eval data).
    pub samples: usize,
    /// `--validate-samples`: compare exactly the first N calibration rows in-sample (without
    /// `--eval`); `None`: at most [`VALIDATION_CALIBRATION_SAMPLES`], stopping early when stable.
    pub validate_samples: Option<usize>,
    /// `--latency`: time both models in tract whatever the output holds
    /// ([`validate::latency::LatencyTiming`]).
    pub latency: validate::latency::LatencyTiming,
    /// The fidelity gate's bounds (inactive when none is set).
    pub gate: gate::Bounds,
    /// Most quantized layers measured when blaming a failed gate.
    pub blame_layers: usize,
    /// Write nothing when the gate fails.
    pub no_write_on_fail: bool,
    /// Every buffer sized from the model must fit (`--max-memory`).
    pub memory: MemoryBudget,
    /// Go on when float initializers hold NaN/inf, keeping the nodes reading them float.
    pub allow_nonfinite: bool,
    /// KV-cache decoders: greedy tokens each model generates per prompt to validate (0: none).
    pub generate_steps: usize,
    /// KV-cache decoders: let `quantize` give the state tensors Q/DQ too (float by default).
    pub quantize_cache: bool,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    pub report: RunReport,
    /// False when `no_write_on_fail` kept a failing output from being written.
    pub written: bool,
}

impl Outcome {
    /// The gate's failure as one line, when it failed.
    pub fn gate_failure(&self) -> Option<String> {
        let g = self.report.gate.as_ref().filter(|g| !g.passed)?;
        let mut line = gate::error_line(g);
        if !self.written {
            line += &format!(
                "; {} not written (--no-write-on-fail)",
                self.report.output.path
            );
        }
        Some(line)
    }
}

/// Whether two paths name the same file (the output must never clobber the input).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `<output>.data`, where external tensors go.
fn data_file(output: &Path) -> PathBuf {
    output.with_file_name(format!(
        "{}.data",
        output.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// Check that every `--input-shape` names a graph input.
fn check_input_shapes(model: &Model, shapes: &[(String, Vec<usize>)]) -> Result<()> {
    for (name, _) in shapes {
        if !model.graph.is_graph_input(name) {
            let inputs: Vec<&str> = model.graph.inputs.iter().map(|i| i.name()).collect();
            bail!("--input-shape names '{name}', which is not a graph input (inputs: {inputs:?})");
        }
    }
    Ok(())
}

/// What the run will size from the model's inputs: synthetic validation batches without
/// `--eval`, synthetic calibration samples without `--calib` when a pass calibrates.
fn memory_plan(opts: &CompressOptions) -> preflight::MemoryPlan<'_> {
    let runs = |pass: &str| opts.passes.contains(&pass);
    let calibrating = [
        runs("quantize").then_some(opts.ctx.quantize.synthetic_samples),
        (runs("mixed-precision") && opts.ctx.mixed.budget.is_some())
            .then_some(opts.ctx.mixed.synthetic_samples),
    ];
    preflight::MemoryPlan {
        budget: opts.memory,
        input_shapes: &opts.input_shapes,
        validation_samples: (opts.validate && opts.data.eval.is_none()).then_some(opts.samples),
        calibration_samples: calibrating
            .into_iter()
            .flatten()
            .max()
            .filter(|_| opts.data.calib.is_none()),
    }
}

/// Whether the main graph holds an `If`.
fn has_if(proto: &crate::onnx::proto::ModelProto) -> bool {
    proto
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type() == "If"))
}

/// Load a model for a run: the original proto (validation compares against it) and the IR.
pub fn load_model(path: &Path) -> Result<(crate::onnx::proto::ModelProto, load::LoadInfo, Model)> {
    let (original, info) = load::read_model(path)?;
    let model = Model::from_proto(original.clone())
        .with_context(|| format!("{}: invalid model", path.display()))?;
    Ok((original, info, model))
}

/// Run the whole job; see the module docs for the steps.
pub fn compress(opts: &CompressOptions) -> Result<Outcome> {
    let start = Instant::now();
    let (input, output) = (opts.input.as_path(), opts.output.as_path());
    if same_file(input, output) && !opts.force {
        bail!(
            "refusing to overwrite the input model {}: choose another -o, or pass --force",
            input.display()
        );
    }
    let bounds = &opts.gate;
    // Temp files a killed run left for this output (never a live writer's).
    save::remove_stale_temp_files(output);
    save::remove_stale_temp_files(&data_file(output));
    let mut phases = timings::Phases::start();
    let (mut original, info, mut model) = load_model(input)?;
    phases.mark("load");
    let specialized = if opts.fix_inputs.is_empty() {
        // Without --fix-input, --input-shape alone may still settle `If`s on shapes (silero's
        // `Shape(x)[0] == 1`, squeezing a batch of one): the same specialization with nothing
        // fixed, kept only when it collapsed an `If`, so other models stay byte-identical.
        let mut shaped = original.clone();
        let has_if = original
            .graph
            .as_ref()
            .is_some_and(|g| g.node.iter().any(|n| n.op_type() == "If"));
        match (has_if && !opts.input_shapes.is_empty())
            .then(|| crate::passes::specialize::fix_inputs(&mut shaped, &[], &opts.input_shapes))
        {
            Some(Ok(s)) if !s.collapsed_ifs.is_empty() => {
                model = Model::from_proto(shaped.clone()).with_context(|| {
                    format!(
                        "{}: the shape-specialized model is invalid",
                        input.display()
                    )
                })?;
                original = shaped;
                Some(s)
            }
            _ => None,
        }
    } else {
        let s = crate::passes::specialize::fix_inputs(
            &mut original,
            &opts.fix_inputs,
            &opts.input_shapes,
        )
        .with_context(|| format!("{}: --fix-input", input.display()))?;
        model = Model::from_proto(original.clone())
            .with_context(|| format!("{}: the specialized model is invalid", input.display()))?;
        Some(s)
    };
    check_input_shapes(&model, &opts.input_shapes)?;
    let nonfinite = preflight::nonfinite_initializers(&model);
    if !opts.allow_nonfinite {
        preflight::refuse_nonfinite(&nonfinite)?;
    }
    let mixed_runs = opts.passes.contains(&"mixed-precision") && opts.ctx.mixed.budget.is_some();
    preflight::refuse_nonfinite_for_mixed_precision(&nonfinite, mixed_runs)?;
    // Nothing sized from the model is allocated before it is known to fit.
    preflight::check_inputs(&model, &memory_plan(opts))?;
    // One analysis of the input in tract serves the checks and the shapes.
    let inferred = crate::runtime::infer_value_shapes(&original, &opts.input_shapes).ok();
    let corrected_outputs = preflight::correct_declared_outputs(
        &mut model,
        &original,
        inferred.as_deref(),
        &opts.input_shapes,
    )?;
    preflight::check_declared_outputs(&model, &original, inferred.as_deref(), &opts.input_shapes)?;
    let shapes_before = value_shapes_given(&model, &original, &opts.input_shapes, inferred);
    preflight::check_values(&model, &shapes_before, &opts.memory)?;
    let stats_before = model_stats(&model, &shapes_before);
    phases.mark("preflight");

    // Data problems surface before any work starts.
    let decoder = data::decoder(&opts.data, &model, &opts.input_shapes)?;
    let eval_data = data::load_eval(&opts.data, &model, decoder.as_ref(), opts.memory)?;
    let mut ctx = opts.ctx.clone();
    preflight::keep_float(&mut ctx, &model, &nonfinite);
    if let Some(d) = &decoder {
        // The next token is read off the logits by argmax: a uint8 grid there turns near ties
        // into ties and flips tokens, for no integer kernel (ORT still runs the LM head as
        // MatMulIntegerToFloat). gpt_kv: greedy agreement 83.8% -> 90.6% (BENCHMARKS.md).
        ctx.quantize.keep_float.extend(d.logits.clone());
        if !opts.quantize_cache {
            for p in &d.pairs {
                ctx.quantize.keep_float.push(p.input.clone());
                ctx.quantize.keep_float.push(p.output.clone());
            }
        } else {
            // Transformer placement leaves the cache float; asked for, it gets its own range.
            for p in &d.pairs {
                ctx.quantize.force_activations.push(p.output.clone());
            }
        }
    }
    data::attach_calibration(
        &mut ctx,
        &opts.data,
        &model,
        &opts.input_shapes,
        decoder.as_ref(),
        opts.seed,
        opts.memory,
    )?;
    // In-sample validation compares on the calibration rows: the calibration run of the model
    // as given keeps its outputs there, so validation need not run the original on them again.
    let original = Arc::new(original);
    let reference = match (&eval_data, ctx.calibration.as_mut()) {
        (None, Some(c)) if opts.validate && !c.synthetic && c.sequence.is_none() => {
            // Only a set nothing else holds yet is given the request (never copied for it).
            Arc::get_mut(c).map(|set| {
                let request = Arc::new(ReferenceRequest::new(
                    original.clone(),
                    opts.validate_samples
                        .unwrap_or(VALIDATION_CALIBRATION_SAMPLES)
                        .max(1),
                    KEPT_OUTPUT_BYTES,
                ));
                set.reference = Some(request.clone());
                request
            })
        }
        _ => None,
    };
    phases.mark("data");
    let records =
        crate::pipeline::Pipeline::from_parts(opts.passes.clone(), ctx.clone()).run(&mut model)?;
    phases.mark("passes");

    let out_proto = model.to_proto()?;
    let save_opts = save::SaveOptions {
        external_data: opts.external_data || info.had_external_data,
        sources: info.mapped.clone(),
        ..Default::default()
    };
    // With no_write_on_fail the file is written only once the gate has passed.
    let defer_write = opts.no_write_on_fail && bounds.is_active();
    if !defer_write {
        save::save_proto(out_proto.clone(), output, &save_opts)?;
    }
    phases.mark("save");
    // The output's shapes for the report's statistics (tract's analysis of it, one core) are
    // worked out beside validation when there is a second core; the figures are the same.
    let out_shapes = (rayon::current_num_threads() > 1).then(|| {
        let (proto, shapes) = (out_proto.clone(), opts.input_shapes.clone());
        std::thread::spawn(move || crate::runtime::infer_value_shapes(&proto, &shapes).ok())
    });
    // Validation never judges a calibrated model on noise when real data was given: held-out
    // `--eval` data first, else (in-sample) the calibration data, else synthetic inputs as a
    // smoke test.
    let calibration_inputs = match (&eval_data, &ctx.calibration) {
        (None, Some(c)) if !c.synthetic => Some(
            c.rebatched(
                opts.validate_samples
                    .unwrap_or(VALIDATION_CALIBRATION_SAMPLES)
                    .max(1),
            )?,
        ),
        _ => None,
    };
    let early_stop = (calibration_inputs.is_some() && opts.validate_samples.is_none())
        .then(validate::EarlyStop::default);
    let validate_opts = ValidateOptions {
        seed: opts.seed,
        samples: opts.samples,
        input_shapes: opts.input_shapes.clone(),
        in_sample: calibration_inputs.is_some(),
        inputs: eval_data
            .as_ref()
            .map(|e| e.batches.clone())
            .or(calibration_inputs),
        labels: eval_data.as_ref().and_then(|e| e.labels.clone()),
        row_axes: match (&eval_data, &ctx.calibration) {
            (Some(e), _) => e.row_axes.clone(),
            (None, Some(c)) if !c.synthetic => c.row_axes(),
            _ => None,
        },
        early_stop,
        latency: opts.latency,
        reference: reference.as_ref().and_then(|r| r.kept()),
        one_at_a_time_above: validate::ONE_MODEL_AT_A_TIME_ABOVE,
    };
    let validation = opts.validate.then(|| {
        // The output is written: a validation that cannot run is reported, not a failure.
        let direct = validate::validate(&original, &out_proto, &validate_opts)
            .unwrap_or_else(|e| ValidationReport::not_checked(format!("{e:#}")));
        // tract cannot analyse the `If`s: compare both specialized to the calibration data.
        match (&direct.status, &ctx.calibration) {
            (validate::Status::NotChecked, Some(c))
                if !c.synthetic && eval_data.is_none() && has_if(&original) =>
            {
                specialized_validation::validate(&original, &out_proto, c, &validate_opts)
                    .unwrap_or_else(|e| {
                        let mut r = direct.clone();
                        r.notes.push(format!(
                            "validation on copies specialized to the calibration data failed too: {e:#}"
                        ));
                        r
                    })
            }
            _ => direct,
        }
    });
    let kv_cache = decoder.as_ref().map(|d| generate::DecoderReport {
        state_pairs: d.pairs.clone(),
        calibration: ctx.calibration.as_ref().and_then(|c| c.sequence.clone()),
        generation: (opts.validate && opts.generate_steps > 0).then(|| {
            match data::prompts(
                &opts.data,
                d,
                eval_data.as_ref(),
                ctx.calibration.as_deref(),
                opts.generate_steps,
            ) {
                Ok(p) => generate::compare(&original, &out_proto, d, &p),
                Err(e) => generate::GenerationReport::not_checked(format!("{e:#}")),
            }
        }),
    });
    phases.mark("validate");
    let gate = bounds
        .is_active()
        .then(|| -> Result<gate::GateReport> {
            let input = Model::from_proto((*original).clone())
                .context("re-reading the input model for the gate")?;
            let layers = gate::quantized_layers(&records, &model);
            // The blame re-runs compare exactly the rows the validation compared.
            let mut same_rows = validate_opts.clone();
            same_rows.early_stop = None;
            if let (Some(v), Some(c)) = (&validation, &ctx.calibration) {
                if validate_opts.early_stop.is_some() && v.samples < v.samples_given {
                    same_rows.inputs = match &validate_opts.row_axes {
                        Some(_) => Some(c.rebatched(v.samples)?),
                        None => validate_opts
                            .inputs
                            .as_ref()
                            .map(|b| b.iter().take(v.samples).cloned().collect()),
                    };
                }
            }
            let rerun = gate::Rerun {
                input: &input,
                output: &model,
                original: &original,
                passes: &opts.passes,
                ctx: &ctx,
                validate: &same_rows,
            };
            Ok(gate::evaluate(
                bounds,
                validation.as_ref(),
                &layers,
                &rerun,
                opts.blame_layers,
                5,
            ))
        })
        .transpose()?;
    phases.mark("gate");
    let gate_failed = gate.as_ref().is_some_and(|g| !g.passed);
    if defer_write && !gate_failed {
        save::save_proto(out_proto.clone(), output, &save_opts)?;
    }
    let written = !(defer_write && gate_failed);
    let out_bytes = if !written {
        prost::Message::encoded_len(&out_proto) as u64
    } else {
        std::fs::metadata(output)?.len()
            + if save_opts.external_data {
                std::fs::metadata(data_file(output))
                    .map(|m| m.len())
                    .unwrap_or(0)
            } else {
                0
            }
    };
    let out_shapes = match out_shapes {
        Some(analysis) => value_shapes_given(
            &model,
            &out_proto,
            &opts.input_shapes,
            analysis.join().ok().flatten(),
        ),
        None => value_shapes(&model, &out_proto, &opts.input_shapes),
    };
    let stats_after = model_stats(&model, &out_shapes);
    phases.mark("report");
    let report = RunReport {
        tool: "onnx-compress".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        size_ratio: out_bytes as f64 / info.file_bytes.max(1) as f64,
        input: ModelSide {
            path: input.display().to_string(),
            file_bytes: info.file_bytes,
            stats: stats_before,
        },
        output: ModelSide {
            path: output.display().to_string(),
            file_bytes: out_bytes,
            stats: stats_after,
        },
        passes: records,
        nonfinite_initializers: nonfinite,
        specialized,
        corrected_outputs,
        validation,
        kv_cache,
        gate,
        seconds_total: start.elapsed().as_secs_f64(),
        threads: rayon::current_num_threads(),
        timings: phases.done,
    };
    Ok(Outcome { report, written })
}
