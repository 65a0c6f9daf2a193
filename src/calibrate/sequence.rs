//! Decoders with a KV cache: which inputs are state fed back from which outputs, and the
//! calibration driver that runs the decoder the way it is used (a prefill, then decode steps of
//! one token each, every step's `present` fed back as the next step's `past`).
//!
//! ```text
//! step 0 (prefill):  input_ids [B, P]  past_key_values.i.* [B, H, 0, D]     -> present.i.* [B, H, P, D]
//! step s (decode):   input_ids [B, 1]  past_key_values.i.* [B, H, P+s-1, D] -> present.i.* [B, H, P+s, D]
//! ```
//!
//! ## State pairs
//! A pair is a graph input the caller feeds with a graph output of the previous step. Found by
//! name among the inputs whose name starts with `past`: the output named like the input with
//! `past_key_values` replaced by `present` (`past_key_values.0.key` <-> `present.0.key`, the
//! Hugging Face / optimum export), else with `past` replaced by `present`
//! (`past_key_values.0.key` <-> `present_key_values.0.key`, `past_key.0` <-> `present_key.0`,
//! `past.0` <-> `present.0`). `--state IN=OUT[:AXIS]` declares any other pair (it wins over the
//! names). A pair must be able to thread: a float input, the same element type, the same rank,
//! and every dim both declare fixed equal, except on the growing (sequence) axis; otherwise the
//! run stops with one line naming both tensors. At run time every present is checked again
//! against the past it replaces.
//!
//! The growing axis of a pair is `AXIS` when given; else the one symbolic dim of the input that
//! is not its batch axis (the batch axis follows [`super::inputs`]: `batch` is shared with
//! `input_ids`); with several, the one whose symbolic name differs between input and output
//! (`past_sequence` vs `total_sequence`). None (all other dims fixed): a state of constant shape.
//!
//! ## The other inputs
//! `attention_mask` (by name) is built as ones over past + new positions, `position_ids` as
//! `past .. past + new`; every other input is read from the data (token ids) and sliced along
//! its own sequence axis (its one symbolic dim besides the batch axis).
//!
//! ## Calibration ([`Decoder::expand`])
//! Each calibration window of `L` tokens runs as a prefill of its first `P` tokens (default
//! `L - S`) followed by `S` decode steps (default [`DEFAULT_DECODE_STEPS`]), each feeding the
//! window's own next token (teacher forcing), so every position of the window is observed once,
//! the last `S` as decode steps attending over a long past. The result is an ordinary
//! [`CalibrationSet`] whose batches are complete feeds (tokens and states), step-major (all
//! prefills, then every window's first decode step, ...), so every observer runs on it
//! unchanged and rebuilds its tract plan once per step, not per window. The driver runs the
//! float model `S` times per window batch (the last step's state is never needed); observing
//! runs it `1 + S` times more. The feeds are held in memory, checked against `--max-memory`.
//!
//! tract 0.23.9 runs the zero-length past of the first step as it is (a `[B, H, 0, D]` input
//! concatenated with the new keys), so the prefill needs no special case.

use super::data::CalibrationSet;
pub use super::data::SequenceFacts;
use super::inputs::{model_inputs_with, InputDim, InputSpec};
use crate::ir::Model;
use crate::limits::MemoryBudget;
use crate::onnx::proto::{
    tensor_proto::DataType, tensor_shape_proto::dimension::Value as Dim, type_proto, ModelProto,
    ValueInfoProto,
};
use crate::runtime::{Feed, Runner};
use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};
use serde::Serialize;
use std::collections::HashMap;

/// Decode steps per calibration window when not given: enough to see the decode-time shapes
/// (one query row against a long past) on every window while the held feeds stay small.
pub const DEFAULT_DECODE_STEPS: usize = 4;

/// `--state IN=OUT[:AXIS]`: a pair declared by the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDecl {
    pub input: String,
    pub output: String,
    pub axis: Option<usize>,
}

impl StateDecl {
    /// Parse `IN=OUT` or `IN=OUT:AXIS`.
    pub fn parse(s: &str) -> Result<StateDecl> {
        let (input, rest) = s
            .split_once('=')
            .with_context(|| format!("--state {s}: expected IN=OUT or IN=OUT:AXIS"))?;
        let (output, axis) = match rest.rsplit_once(':') {
            Some((o, a)) if !a.is_empty() && a.chars().all(|c| c.is_ascii_digit()) => {
                (o, Some(a.parse::<usize>().context("axis")?))
            }
            _ => (rest, None),
        };
        ensure!(
            !input.is_empty() && !output.is_empty(),
            "--state {s}: expected IN=OUT or IN=OUT:AXIS"
        );
        Ok(StateDecl {
            input: input.to_string(),
            output: output.to_string(),
            axis,
        })
    }
}

/// How a pair was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairSource {
    /// The past/present naming conventions.
    Name,
    /// `--state`.
    Flag,
}

/// A graph input fed with a graph output of the previous step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatePair {
    pub input: String,
    pub output: String,
    /// The axis that grows by the step's tokens; `None`: the state keeps its shape.
    pub seq_axis: Option<usize>,
    pub batch_axis: Option<usize>,
    pub found_by: PairSource,
    #[serde(skip)]
    pub elem_type: DataType,
    #[serde(skip)]
    pub dims: Vec<InputDim>,
}

impl StatePair {
    /// `past <- present`, for messages and the summary.
    pub fn describe(&self) -> String {
        format!("{} <- {}", self.input, self.output)
    }
}

/// How the driver builds one model input.
#[derive(Debug, Clone, PartialEq)]
enum Role {
    /// From the data (token ids): sliced `[t0, t1)` along `seq_axis`.
    Data { seq_axis: usize },
    /// Pair `k`'s state.
    State(usize),
    /// `attention_mask`: ones over `past + new` positions along `seq_axis`.
    Mask { seq_axis: usize },
    /// `position_ids`: `past .. past + new` along `seq_axis`.
    Positions { seq_axis: usize },
}

/// Options of the calibration driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceOptions {
    /// Decode steps after the prefill (`--decode-steps`).
    pub decode_steps: usize,
    /// Prefill length (`--prefill`); default: the window length less `decode_steps`.
    pub prefill: Option<usize>,
    /// Tokens at the end of every window never run (an evaluation window's target).
    pub held_out: usize,
}

impl Default for SequenceOptions {
    fn default() -> Self {
        SequenceOptions {
            decode_steps: DEFAULT_DECODE_STEPS,
            prefill: None,
            held_out: 0,
        }
    }
}

/// A decoder's interface as the driver sees it: the state pairs and the role of every input.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub pairs: Vec<StatePair>,
    inputs: Vec<(InputSpec, Role)>,
    /// Sizes of symbolic state dims from `--input-shape` (full shapes by input name).
    input_shapes: Vec<(String, Vec<usize>)>,
    /// The graph output read for the next token (the first output that is not a state).
    pub logits: Option<String>,
}

fn tensor_dims(v: &ValueInfoProto) -> Option<(DataType, Option<Vec<InputDim>>)> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return None;
    };
    let dt = DataType::try_from(t.elem_type()).unwrap_or(DataType::Undefined);
    let dims = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(Dim::DimValue(v)) if *v > 0 => InputDim::Fixed(*v as usize),
                Some(Dim::DimParam(p)) => InputDim::Symbolic(p.clone()),
                _ => InputDim::Symbolic(String::new()),
            })
            .collect()
    });
    Some((dt, dims))
}

fn show_dims(dims: &[InputDim]) -> String {
    let v: Vec<String> = dims
        .iter()
        .map(|d| match d {
            InputDim::Fixed(v) => v.to_string(),
            InputDim::Symbolic(s) if s.is_empty() => "?".into(),
            InputDim::Symbolic(s) => s.clone(),
        })
        .collect();
    format!("[{}]", v.join(", "))
}

/// The output a `past...` input pairs with by name (see the module docs).
pub fn conventional_output<'a>(input: &str, outputs: &[&'a str]) -> Option<&'a str> {
    if !input.starts_with("past") {
        return None;
    }
    [
        input.replacen("past_key_values", "present", 1),
        input.replacen("past", "present", 1),
    ]
    .into_iter()
    .filter(|c| c != input)
    .find_map(|c| outputs.iter().copied().find(|o| *o == c))
}

fn quoted_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The state pairs of `model`: `declared` first (checked), then the naming conventions; in
/// model input order.
pub fn detect_pairs(
    model: &Model,
    declared: &[StateDecl],
    batch_axes: &[(String, Option<usize>)],
) -> Result<Vec<StatePair>> {
    let specs = model_inputs_with(model, batch_axes)?;
    let outputs: Vec<&str> = model.graph.outputs.iter().map(|o| o.name()).collect();
    let mut wanted: Vec<(String, String, Option<usize>, PairSource)> = Vec::new();
    for d in declared {
        let flag = format!("--state {}={}", d.input, d.output);
        ensure!(
            specs.iter().any(|s| s.name == d.input),
            "{flag}: '{}' is not a model input (inputs: {})",
            d.input,
            quoted_list(specs.iter().map(|s| s.name.as_str()))
        );
        ensure!(
            outputs.contains(&d.output.as_str()),
            "{flag}: '{}' is not a model output (outputs: {})",
            d.output,
            quoted_list(outputs.iter().copied())
        );
        ensure!(
            !wanted
                .iter()
                .any(|(i, o, ..)| *i == d.input || *o == d.output),
            "{flag}: '{}' or '{}' is already in another --state pair",
            d.input,
            d.output
        );
        wanted.push((d.input.clone(), d.output.clone(), d.axis, PairSource::Flag));
    }
    for s in &specs {
        if wanted.iter().any(|(i, ..)| *i == s.name) {
            continue;
        }
        if let Some(o) = conventional_output(&s.name, &outputs) {
            if !wanted.iter().any(|(_, w, ..)| w == o) {
                wanted.push((s.name.clone(), o.to_string(), None, PairSource::Name));
            }
        }
    }
    let mut pairs = Vec::new();
    for (input, output, axis, found_by) in wanted {
        let spec = specs
            .iter()
            .find(|s| s.name == input)
            .expect("checked above");
        let out = model
            .graph
            .outputs
            .iter()
            .find(|o| o.name() == output)
            .expect("checked above");
        pairs.push(check_pair(spec, out, axis, found_by)?);
    }
    // Model input order: deterministic whatever the order of the flags.
    pairs.sort_by_key(|p| specs.iter().position(|s| s.name == p.input));
    Ok(pairs)
}

/// Check that `output` can feed `input` next step and find the growing axis.
fn check_pair(
    input: &InputSpec,
    output: &ValueInfoProto,
    axis: Option<usize>,
    found_by: PairSource,
) -> Result<StatePair> {
    let what = format!("state pair {}={}", input.name, output.name());
    let rank = input.dims.len();
    if let Some(a) = axis {
        ensure!(
            a < rank,
            "{what}: axis {a} is out of range for input {}",
            input.describe()
        );
    }
    let (out_type, out_dims) = tensor_dims(output).with_context(|| {
        format!(
            "{what} cannot thread: output '{}' is not a tensor",
            output.name()
        )
    })?;
    ensure!(
        matches!(
            input.elem_type,
            DataType::Float | DataType::Float16 | DataType::Double
        ),
        "{what} cannot thread: input {} is not a float tensor",
        input.describe()
    );
    ensure!(
        out_type == DataType::Undefined || out_type == input.elem_type,
        "{what} cannot thread: output '{}' is {}, input '{}' is {}",
        output.name(),
        out_type.as_str_name().to_ascii_lowercase(),
        input.name,
        input.type_name()
    );
    if let Some(dims) = &out_dims {
        ensure!(
            dims.len() == rank,
            "{what} cannot thread: output '{}' {} has rank {}, input {} has rank {rank}",
            output.name(),
            show_dims(dims),
            dims.len(),
            input.describe()
        );
    }
    let symbolic_non_batch: Vec<usize> = (0..rank)
        .filter(|&i| Some(i) != input.batch_axis)
        .filter(|&i| matches!(input.dims[i], InputDim::Symbolic(_)))
        .collect();
    let seq_axis = match (axis, symbolic_non_batch.as_slice()) {
        (Some(a), _) => Some(a),
        (None, []) => None,
        (None, [one]) => Some(*one),
        (None, several) => {
            let differ: Vec<usize> = several
                .iter()
                .copied()
                .filter(|&i| {
                    out_dims
                        .as_ref()
                        .and_then(|d| d.get(i))
                        .is_some_and(|d| *d != input.dims[i])
                })
                .collect();
            match differ.as_slice() {
                [one] => Some(*one),
                _ => bail!(
                    "{what}: cannot tell which axis of input {} grows step by step; give it with --state {}={}:AXIS",
                    input.describe(),
                    input.name,
                    output.name()
                ),
            }
        }
    };
    if let Some(dims) = &out_dims {
        for (i, (a, b)) in input.dims.iter().zip(dims).enumerate() {
            if Some(i) == seq_axis {
                continue;
            }
            if let (InputDim::Fixed(x), InputDim::Fixed(y)) = (a, b) {
                ensure!(
                    x == y,
                    "{what} cannot thread: output '{}' {} does not fit input {} (dimension {i}: {y} vs {x})",
                    output.name(),
                    show_dims(dims),
                    input.describe()
                );
            }
        }
    }
    Ok(StatePair {
        input: input.name.clone(),
        output: output.name().to_string(),
        seq_axis,
        batch_axis: input.batch_axis,
        found_by,
        elem_type: input.elem_type,
        dims: input.dims.clone(),
    })
}

/// The one symbolic dim of `spec` besides its batch axis.
fn sequence_axis(spec: &InputSpec) -> Result<usize> {
    let axes: Vec<usize> = (0..spec.dims.len())
        .filter(|&i| Some(i) != spec.batch_axis)
        .filter(|&i| matches!(spec.dims[i], InputDim::Symbolic(_)))
        .collect();
    match axes.as_slice() {
        [one] => Ok(*one),
        _ => bail!(
            "model input {} is fed step by step beside a KV cache, but its sequence axis is unclear (one symbolic dim besides the batch axis expected): fix it with --fix-input or --batch-axis",
            spec.describe()
        ),
    }
}

impl Decoder {
    /// The decoder behind `model`, or `None` when no state pair is found or declared.
    pub fn from_model(
        model: &Model,
        declared: &[StateDecl],
        batch_axes: &[(String, Option<usize>)],
        input_shapes: &[(String, Vec<usize>)],
    ) -> Result<Option<Decoder>> {
        let pairs = detect_pairs(model, declared, batch_axes)?;
        if pairs.is_empty() {
            return Ok(None);
        }
        let specs = model_inputs_with(model, batch_axes)?;
        let mut inputs = Vec::new();
        for spec in specs {
            let lower = spec.name.to_ascii_lowercase();
            let role = if let Some(k) = pairs.iter().position(|p| p.input == spec.name) {
                Role::State(k)
            } else if lower.contains("attention_mask") {
                Role::Mask {
                    seq_axis: sequence_axis(&spec)?,
                }
            } else if lower.contains("position_ids") {
                Role::Positions {
                    seq_axis: sequence_axis(&spec)?,
                }
            } else {
                Role::Data {
                    seq_axis: sequence_axis(&spec)?,
                }
            };
            inputs.push((spec, role));
        }
        ensure!(
            inputs.iter().any(|(_, r)| matches!(r, Role::Data { .. })),
            "every model input is KV-cache state or built by the driver ({}): nothing to feed tokens through",
            pairs
                .iter()
                .map(StatePair::describe)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let logits = model
            .graph
            .outputs
            .iter()
            .map(|o| o.name().to_string())
            .find(|o| !pairs.iter().any(|p| p.output == *o));
        Ok(Some(Decoder {
            pairs,
            inputs,
            input_shapes: input_shapes.to_vec(),
            logits,
        }))
    }

    /// The inputs calibration and evaluation files hold (token ids): the rest is built.
    pub fn data_inputs(&self) -> Vec<InputSpec> {
        self.inputs
            .iter()
            .filter(|(_, r)| matches!(r, Role::Data { .. }))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// The first data input (the token ids) and its sequence axis.
    pub fn token_input(&self) -> (&InputSpec, usize) {
        self.inputs
            .iter()
            .find_map(|(s, r)| match r {
                Role::Data { seq_axis } => Some((s, *seq_axis)),
                _ => None,
            })
            .expect("a decoder has a data input")
    }

    /// The names of every model input, in order.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|(s, _)| s.name.clone()).collect()
    }

    /// Zero-length states (zeros of the declared shape for a state without a growing axis)
    /// for `rows` sequences.
    pub fn initial_states(&self, rows: usize) -> Result<Vec<Feed>> {
        self.pairs
            .iter()
            .map(|p| {
                let given = self
                    .input_shapes
                    .iter()
                    .find(|(n, _)| *n == p.input)
                    .map(|(_, s)| s);
                let mut shape = Vec::new();
                for (i, d) in p.dims.iter().enumerate() {
                    shape.push(if Some(i) == p.seq_axis {
                        0
                    } else if Some(i) == p.batch_axis {
                        rows
                    } else {
                        match (d, given.and_then(|g| g.get(i))) {
                            (InputDim::Fixed(v), _) => *v,
                            (InputDim::Symbolic(_), Some(&v)) => v,
                            (InputDim::Symbolic(s), None) => bail!(
                                "KV-cache input '{}' {} has symbolic dimension {i} ('{s}'): give its size with --input-shape {}:DIMS",
                                p.input,
                                show_dims(&p.dims),
                                p.input
                            ),
                        }
                    });
                }
                Feed::F32(ArrayD::zeros(IxDyn(&shape))).convert(p.elem_type)
            })
            .collect()
    }

    /// Every model input for one step: the data inputs (`data`, whole windows, in the order of
    /// [`Decoder::data_inputs`]) cut to positions `t0..t1`, after `past` positions whose state
    /// `states` holds.
    pub fn step_feeds(
        &self,
        data: &[Feed],
        t0: usize,
        t1: usize,
        past: usize,
        states: &[Feed],
    ) -> Result<Vec<Feed>> {
        let rows = self
            .inputs
            .iter()
            .filter(|(_, r)| matches!(r, Role::Data { .. }))
            .zip(data)
            .find_map(|((s, _), f)| s.batch_axis.map(|a| f.shape()[a]))
            .unwrap_or(1);
        let mut data_iter = data.iter();
        let mut out = Vec::new();
        for (spec, role) in &self.inputs {
            // An integer input `[.., len, ..]` (batch axis = rows) holding `value(position)`.
            let build = |len: usize, seq_axis: usize, value: &dyn Fn(usize) -> i64| {
                let mut shape: Vec<usize> = spec
                    .dims
                    .iter()
                    .map(|d| match d {
                        InputDim::Fixed(v) => *v,
                        InputDim::Symbolic(_) => 1,
                    })
                    .collect();
                if let Some(b) = spec.batch_axis {
                    shape[b] = rows;
                }
                shape[seq_axis] = len;
                let a = ArrayD::from_shape_fn(IxDyn(&shape), |ix| value(ix[seq_axis]));
                Feed::I64(a)
                    .convert(spec.elem_type)
                    .with_context(|| format!("building model input {}", spec.describe()))
            };
            out.push(match role {
                Role::Data { seq_axis } => {
                    let f = data_iter.next().context("a data input is missing")?;
                    ensure!(
                        f.shape()[*seq_axis] >= t1,
                        "model input '{}': a window holds {} positions, {t1} needed",
                        spec.name,
                        f.shape()[*seq_axis]
                    );
                    f.slice_axis(*seq_axis, t0..t1)
                }
                Role::State(k) => states[*k].clone(),
                Role::Mask { seq_axis } => build(past + (t1 - t0), *seq_axis, &|_| 1)?,
                Role::Positions { seq_axis } => build(t1 - t0, *seq_axis, &|i| (past + i) as i64)?,
            });
        }
        Ok(out)
    }

    /// The next step's states from a run's outputs (`names` in the order of `outputs`), each
    /// checked to fit the input it feeds.
    pub fn next_states(
        &self,
        names: &[String],
        outputs: &[ArrayD<f32>],
        past: &[Feed],
    ) -> Result<Vec<Feed>> {
        self.pairs
            .iter()
            .zip(past)
            .map(|(p, prev)| {
                let k = names
                    .iter()
                    .position(|n| *n == p.output)
                    .with_context(|| format!("the run returned no output '{}'", p.output))?;
                let a = &outputs[k];
                let fits = a.ndim() == prev.ndim()
                    && (0..a.ndim())
                        .filter(|&i| Some(i) != p.seq_axis)
                        .all(|i| a.shape()[i] == prev.shape()[i]);
                ensure!(
                    fits,
                    "state pair {}={} cannot thread: output '{}' has shape {:?}, input '{}' was fed {:?} (every dim but the sequence axis {} must agree)",
                    p.input,
                    p.output,
                    p.output,
                    a.shape(),
                    p.input,
                    prev.shape(),
                    p.seq_axis.map_or("(none)".to_string(), |a| a.to_string())
                );
                Feed::F32(a.clone()).convert(p.elem_type)
            })
            .collect()
    }

    /// A calibration set of complete feeds from a set of token windows (see the module docs).
    pub fn expand(
        &self,
        tokens: CalibrationSet,
        model: &ModelProto,
        opts: &SequenceOptions,
        memory: MemoryBudget,
    ) -> Result<CalibrationSet> {
        let data_specs = self.data_inputs();
        let (first_spec, first_axis) = self.token_input();
        let data: Vec<Vec<Feed>> = tokens
            .batches
            .iter()
            .map(|b| {
                data_specs
                    .iter()
                    .map(|s| {
                        let k = tokens
                            .input_names
                            .iter()
                            .position(|n| *n == s.name)
                            .with_context(|| {
                                format!("the token data lacks model input '{}'", s.name)
                            })?;
                        Ok(b[k].clone())
                    })
                    .collect::<Result<Vec<Feed>>>()
            })
            .collect::<Result<_>>()?;
        let window = data
            .first()
            .context("no calibration windows")?
            .first()
            .context("no token input")?
            .shape()[first_axis]
            .saturating_sub(opts.held_out);
        let prefill = opts
            .prefill
            .unwrap_or(window.saturating_sub(opts.decode_steps).max(1));
        ensure!(
            (1..=window).contains(&prefill),
            "--prefill {prefill}: the windows of model input '{}' hold {window} tokens; the prefill takes 1 to {window}",
            first_spec.name
        );
        let steps = opts.decode_steps.min(window - prefill);
        let mut notes = tokens.notes.clone();
        if steps < opts.decode_steps {
            notes.push(format!(
                "{steps} decode step(s) per window, not {}: the windows hold {window} tokens and the prefill takes {prefill}",
                opts.decode_steps
            ));
        }
        let rows: Vec<usize> = (0..tokens.batches.len()).map(|b| tokens.rows(b)).collect();
        let mut states: Vec<Vec<Feed>> = rows
            .iter()
            .map(|&r| self.initial_states(r))
            .collect::<Result<_>>()?;
        let mut batches: Vec<Vec<Feed>> = Vec::new();
        let mut held: u64 = 0;
        let progress = crate::progress::Progress::bar(
            "running the decoder step by step",
            (steps * data.len()) as u64,
        );
        for step in 0..=steps {
            let (t0, t1) = if step == 0 {
                (0, prefill)
            } else {
                (prefill + step - 1, prefill + step)
            };
            // Every window batch of a step has the same shapes but maybe the last: one plan each.
            let mut runners: HashMap<Vec<Vec<usize>>, Runner> = HashMap::new();
            for (b, d) in data.iter().enumerate() {
                let feeds = self.step_feeds(d, t0, t1, t0, &states[b])?;
                held += feeds
                    .iter()
                    .map(|f| f.shape().iter().product::<usize>() as u64)
                    .sum::<u64>();
                memory.check_elements(
                    &format!(
                        "KV-cache calibration feeds ({} windows, prefill {prefill} + {steps} decode steps)",
                        tokens.samples
                    ),
                    held,
                    4,
                )?;
                if step < steps {
                    progress.inc(1);
                    let shapes: Vec<Vec<usize>> =
                        feeds.iter().map(|f| f.shape().to_vec()).collect();
                    if !runners.contains_key(&shapes) {
                        let named: Vec<(String, Vec<usize>)> =
                            self.input_names().into_iter().zip(shapes.clone()).collect();
                        let r = Runner::new(model, &named, &[]).with_context(|| {
                            format!(
                                "preparing decode step {step} (past {t0}, {} new token(s)) in tract",
                                t1 - t0
                            )
                        })?;
                        runners.insert(shapes.clone(), r);
                    }
                    let r = &runners[&shapes];
                    let out = r.run(&feeds).with_context(|| {
                        format!("calibration window batch {b}, decode step {step}")
                    })?;
                    states[b] = self.next_states(r.output_names(), &out, &states[b])?;
                }
                batches.push(feeds);
            }
        }
        let tokens_joined = match first_spec.batch_axis {
            Some(a) => {
                let parts: Vec<&Feed> = data.iter().map(|d| &d[0]).collect();
                Some(Feed::concatenate(a, &parts)?)
            }
            None => None,
        };
        let windows = tokens.samples;
        notes.push(format!(
            "KV-cache decoder: each of the {windows} calibration windows ({window} tokens) ran as a prefill of {prefill} token(s) then {steps} decode step(s) feeding present back as past ({} state pairs): {} forward passes observed",
            self.pairs.len(),
            windows * (1 + steps)
        ));
        let mut set = CalibrationSet {
            input_names: self.input_names(),
            batch_axes: self.inputs.iter().map(|(s, _)| s.batch_axis).collect(),
            batches,
            samples: 0,
            source: tokens.source.clone(),
            synthetic: tokens.synthetic,
            fixed_batch: tokens.fixed_batch,
            notes,
            sequence: Some(SequenceFacts {
                windows,
                window_tokens: window,
                prefill_tokens: prefill,
                decode_steps: steps,
                steps_observed: windows * (1 + steps),
                batches_per_step: data.len(),
                tokens: tokens_joined,
            }),
            reference: None,
        };
        set.samples = (0..set.batches.len()).map(|b| set.rows(b)).sum();
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pair_by_the_common_conventions() {
        let outs = [
            "logits",
            "present.0.key",
            "present.0.value",
            "present_key.1",
            "present_value_1",
            "present.3",
        ];
        assert_eq!(
            conventional_output("past_key_values.0.key", &outs),
            Some("present.0.key")
        );
        assert_eq!(
            conventional_output("past_key_values.0.value", &outs),
            Some("present.0.value")
        );
        assert_eq!(
            conventional_output("past_key.1", &outs),
            Some("present_key.1")
        );
        assert_eq!(
            conventional_output("past_value_1", &outs),
            Some("present_value_1")
        );
        assert_eq!(conventional_output("past.3", &outs), Some("present.3"));
        // No partner, or not a past input at all.
        assert_eq!(conventional_output("past_key_values.1.key", &outs), None);
        assert_eq!(conventional_output("input_ids", &outs), None);
        assert_eq!(conventional_output("state", &["stateN"]), None);
        assert_eq!(
            conventional_output("past_key_values.0.key", &["present_key_values.0.key"]),
            Some("present_key_values.0.key")
        );
    }

    #[test]
    fn state_flag_parses_an_optional_axis() {
        assert_eq!(
            StateDecl::parse("cache_in=cache_out:2").unwrap(),
            StateDecl {
                input: "cache_in".into(),
                output: "cache_out".into(),
                axis: Some(2)
            }
        );
        assert_eq!(StateDecl::parse("a=b:c").unwrap().output, "b:c");
        assert!(StateDecl::parse("a").is_err());
        assert!(StateDecl::parse("=b").is_err());
    }
}
