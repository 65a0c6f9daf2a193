//! Calibration data: loading, checking against the model's inputs, batching.
//!
//! Accepted sources (`--calib PATH`, and `--eval PATH` the same way):
//! - a directory of `.npy` files. A one-input model reads every `.npy` file (sorted by name);
//!   a model with several inputs reads `<input>_NNN.npy` (input name as is, or with every
//!   character outside `[A-Za-z0-9_.-]` replaced by `_`);
//! - a directory of `.npz` files, whose keys are the input names (a one-input model also
//!   accepts an archive holding exactly one array under any key): one file = one feed;
//! - a single `.npy` file (one-input models) or a single `.npz` file (stacked feeds).
//!
//! Every input has a batch axis or none ([`super::inputs`] gives the rules: `--batch-axis`, a
//! symbolic dim the inputs share such as silero-vad's `batch` in `input [batch, sequence]` and
//! `state [2, batch, 128]`, else the first symbolic dim, else axis 0; scalars have none). An
//! array holds one sample (the declared rank less one: the batch axis is inserted) or a batch
//! of the declared rank, split and joined along the batch axis. Dimensions the model fixes
//! must match; symbolic ones may be anything but must agree across samples. Values keep their
//! type ([`Feed`]): data is converted to the declared element type when exact (int32 ids for
//! an int64 input, float64 narrowed to float32 with a note) and refused otherwise, naming the
//! input, the expected and the found type. An input without a batch axis (e.g. a sample rate
//! `sr`) takes one value in every file; files that disagree are an error pointing at
//! `--fix-input`.
//!
//! Counting and batching: an input whose batch dim is fixed to `B` counts feeds of `B` rows
//! (silero's openvino export fixes `input [1, 576]` and `state [2, 1, 128]`: a file matching
//! that is one feed); every input must give the same count, else the error suggests
//! `--batch-axis`. With any fixed batch dim each batch is one feed; otherwise batches hold
//! `batch_size` samples.
//!
//! A single-input model with an image input (`[N, C, H, W]` or `[N, H, W, C]`, `C` 1 or 3) also
//! reads a directory of `.png` / `.jpg` files or one image file, one sample per image, resized
//! and normalised as [`DataOptions::image`] says (see [`super::image`] for every step). A
//! directory holds either images or arrays, not both.
//!
//! Everything is read and checked before any inference starts, so a bad file fails the run
//! early with the file's path and what was expected.
//!
//! Without data, [`CalibrationSet::synthetic`] makes seeded standard-normal float inputs and
//! says loudly that the ranges are then meaningless for real inputs; integer and bool inputs
//! with a batch axis get zeros (said in a note), and an integer scalar without data (a sample
//! rate) is an error asking for `--fix-input` or `--calib`.

pub use super::files::DataOptions;
use super::files::{read_dir, read_file, Sample};
pub use super::inputs::{model_inputs, InputDim, InputSpec};
use super::inputs::{model_inputs_with, with_shapes};
use super::reference::ReferenceRequest;
use super::NamedBatch;
use crate::ir::Model;
use crate::limits::{check_synthetic, element_count};
use crate::onnx::proto::tensor_proto::DataType;
use crate::runtime::Feed;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_lite::standard_normal;
use std::path::Path;
use std::sync::Arc;

/// What calibration did with a KV-cache decoder ([`super::sequence`]; for the report).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SequenceFacts {
    pub windows: usize,
    pub window_tokens: usize,
    pub prefill_tokens: usize,
    pub decode_steps: usize,
    /// Forward passes calibration observes: `windows * (1 + decode_steps)` sequences.
    pub steps_observed: usize,
    /// Batches per step in [`CalibrationSet::batches`] (step-major, the prefills first).
    #[serde(skip)]
    pub batches_per_step: usize,
    /// The token windows as read (the first data input joined along its batch axis): prompts
    /// for the generation check.
    #[serde(skip)]
    pub tokens: Option<Feed>,
}

/// Calibration inputs, checked against the model and cut into batches.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    /// Graph input names, in the order of each batch's arrays.
    pub input_names: Vec<String>,
    /// Each input's batch axis (`None`: the same whole value in every batch).
    pub batch_axes: Vec<Option<usize>>,
    /// Each batch holds one feed per input, in its declared element type.
    pub batches: Vec<Vec<Feed>>,
    pub samples: usize,
    /// Where the data came from (path or "synthetic").
    pub source: String,
    /// True for generated data.
    pub synthetic: bool,
    /// The model fixes a batch size: each batch is one feed of that size.
    pub fixed_batch: bool,
    /// Remarks for the report (narrowed float64, truncated sample count, synthetic data...).
    pub notes: Vec<String>,
    /// Set when the batches are a KV-cache decoder's steps ([`super::sequence`]): step-major
    /// complete feeds, the prefills first.
    pub sequence: Option<SequenceFacts>,
    /// Set when validation will compare on these rows: the observation run of the model it
    /// compares against keeps that model's outputs ([`super::reference`]).
    pub reference: Option<Arc<ReferenceRequest>>,
}

impl CalibrationSet {
    /// `shapes` (one per input, in input order) paired with the input names: what a tract plan
    /// for one batch shape is built with.
    pub fn named_shapes(&self, shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        self.input_names
            .iter()
            .cloned()
            .zip(shapes.iter().cloned())
            .collect()
    }

    /// The batches with each feed paired with its input name (equalization and pruning).
    pub fn named_batches(&self) -> Vec<crate::calibrate::NamedBatch> {
        (0..self.batches.len())
            .filter_map(|b| self.named_batch(b))
            .collect()
    }

    /// Batch `b` with each feed paired with its input name (a copy of that batch only).
    pub fn named_batch(&self, b: usize) -> Option<crate::calibrate::NamedBatch> {
        self.batches.get(b).map(|batch| {
            self.input_names
                .iter()
                .cloned()
                .zip(batch.iter().cloned())
                .collect()
        })
    }

    /// Each input's batch axis by name, when a batch may be cut into single rows (the model does
    /// not fix its batch size and the batches are not KV-cache steps): what validation runs
    /// row by row.
    pub fn row_axes(&self) -> Option<Vec<(String, Option<usize>)>> {
        (!self.fixed_batch && self.sequence.is_none()).then(|| {
            self.input_names
                .iter()
                .cloned()
                .zip(self.batch_axes.iter().copied())
                .collect()
        })
    }

    /// Rows of batch `b`: its size along the first batch axis (1 when no input has one).
    pub fn rows(&self, b: usize) -> usize {
        self.batch_axes
            .iter()
            .zip(&self.batches[b])
            .find_map(|(axis, f)| axis.map(|a| f.shape()[a]))
            .unwrap_or(1)
    }

    /// The first `max_samples` samples as validation batches: one batch joined along each
    /// input's batch axis, or, where the model fixes its batch size, the first whole feeds.
    ///
    /// For a KV-cache decoder's steps, the prefills only (one shape: a zero-length past).
    pub fn rebatched(&self, max_samples: usize) -> Result<Vec<NamedBatch>> {
        if let Some(seq) = &self.sequence {
            let mut prefills = self.clone();
            prefills.batches.truncate(seq.batches_per_step);
            prefills.sequence = None;
            return prefills.rebatched(max_samples);
        }
        if self.fixed_batch {
            let mut rows = 0;
            let mut out = Vec::new();
            for (b, batch) in self.named_batches().into_iter().enumerate() {
                rows += self.rows(b);
                if !out.is_empty() && rows > max_samples {
                    break;
                }
                out.push(batch);
            }
            return Ok(out);
        }
        let mut joined = Vec::new();
        for (i, name) in self.input_names.iter().enumerate() {
            let value = match self.batch_axes[i] {
                Some(axis) => {
                    let parts: Vec<&Feed> = self.batches.iter().map(|b| &b[i]).collect();
                    let all = Feed::concatenate(axis, &parts)
                        .with_context(|| format!("joining calibration batches of '{name}'"))?;
                    let n = all.shape()[axis].min(max_samples);
                    all.slice_axis(axis, 0..n)
                }
                None => self.batches[0][i].clone(),
            };
            joined.push((name.clone(), value));
        }
        Ok(vec![joined])
    }

    /// Read calibration data from a file or directory and check it against `model`.
    pub fn load(path: &Path, model: &Model, opts: &DataOptions) -> Result<CalibrationSet> {
        Self::load_inputs(path, specs_for(model, opts)?, opts)
    }

    /// [`CalibrationSet::load`] for some of the model's inputs only (`specs`, e.g. the token
    /// ids of a KV-cache decoder whose other inputs the driver builds).
    pub fn load_inputs(
        path: &Path,
        specs: Vec<InputSpec>,
        opts: &DataOptions,
    ) -> Result<CalibrationSet> {
        let specs = with_shapes(specs, &opts.input_shapes);
        let mut notes = Vec::new();
        let per_input: Vec<Vec<Sample>> = if path.is_dir() {
            read_dir(path, &specs, opts, &mut notes)?
        } else if path.is_file() {
            read_file(path, &specs, opts, &mut notes)?
        } else {
            bail!(
                "calibration data '{}' does not exist (expected a directory of .npy/.npz or .png/.jpg files, or one such file)",
                path.display()
            );
        };
        Self::assemble(specs, per_input, opts, path.display().to_string(), notes)
    }

    /// `given`, or (when the user gave no data) [`Self::synthetic`] feeds with the default
    /// data options: what a pass that needs some calibration data runs on.
    pub fn given_or_synthetic<'a>(
        given: Option<&'a CalibrationSet>,
        model: &Model,
        samples: usize,
        seed: u64,
    ) -> Result<std::borrow::Cow<'a, CalibrationSet>> {
        Ok(match given {
            Some(c) => std::borrow::Cow::Borrowed(c),
            None => std::borrow::Cow::Owned(Self::synthetic(
                model,
                samples,
                seed,
                &DataOptions::default(),
            )?),
        })
    }

    /// Seeded standard-normal float inputs, zeros for integer and bool inputs: `samples`
    /// samples; symbolic dims other than the batch axis are refused, and so is an integer
    /// input without a batch axis (a sample rate: it needs `--fix-input` or real data).
    pub fn synthetic(model: &Model, samples: usize, seed: u64, opts: &DataOptions) -> Result<Self> {
        let specs = specs_for(model, opts)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut per_input = Vec::new();
        let mut notes = Vec::new();
        for spec in &specs {
            let float = matches!(
                spec.elem_type,
                DataType::Float | DataType::Double | DataType::Float16
            );
            ensure!(
                float || spec.batch_axis.is_some(),
                "model input {} is a {} value with no batch axis and no data: fix it with --fix-input {}=VALUE or give --calib data",
                spec.describe(),
                spec.type_name(),
                spec.name
            );
            let mut shape = Vec::new();
            for (i, d) in spec.dims.iter().enumerate() {
                if Some(i) == spec.batch_axis {
                    continue;
                }
                match d {
                    InputDim::Fixed(v) => shape.push(*v),
                    InputDim::Symbolic(s) => bail!(
                        "model input {} has symbolic dimension {i} ('{s}'): synthetic calibration data needs fixed sizes; pass --calib with real data",
                        spec.describe()
                    ),
                }
            }
            // Generation is O(elements): bounded in work first, then in memory.
            let what = format!(
                "synthetic calibration data for model input {}",
                spec.describe()
            );
            let n = element_count(&what, &shape)?;
            let values = (n as u64).saturating_mul(samples as u64);
            // Twice: the samples, then their stack (see `assemble`).
            opts.memory.check_elements(
                &format!("{what} ({samples} samples, held twice while batched)"),
                values.saturating_mul(2),
                4,
            )?;
            check_synthetic(&format!("{what} ({samples} samples)"), values)?;
            if !float {
                notes.push(format!(
                    "model input {} is fed zeros in the synthetic calibration data: give --calib with real values",
                    spec.describe()
                ));
            }
            let mut list = Vec::new();
            for k in 0..samples {
                let data = if float {
                    let v: Vec<f32> = (0..n).map(|_| standard_normal(&mut rng)).collect();
                    let a = ArrayD::from_shape_vec(IxDyn(&shape), v).context("synthetic sample")?;
                    Feed::F32(a).convert(spec.elem_type)?
                } else {
                    Feed::zeros(spec.elem_type, &shape)?
                };
                list.push(Sample {
                    data: match spec.batch_axis {
                        Some(axis) => data.insert_axis(axis),
                        None => data,
                    },
                    origin: format!("synthetic #{k}"),
                });
            }
            per_input.push(list);
        }
        notes.insert(0, format!(
            "WARNING: no calibration data given; ranges come from {samples} synthetic standard-normal samples (seed {seed}) and will not match real inputs: pass --calib DIR for a usable int8 model"
        ));
        let mut set = Self::assemble(specs, per_input, opts, "synthetic".into(), notes)?;
        set.synthetic = true;
        Ok(set)
    }

    fn assemble(
        specs: Vec<InputSpec>,
        per_input: Vec<Vec<Sample>>,
        opts: &DataOptions,
        source: String,
        mut notes: Vec<String>,
    ) -> Result<CalibrationSet> {
        // Join each input's samples along its batch axis, dropping the samples as each input is
        // joined and the joined array once cut into batches: at most twice the data is held at
        // once (what the synthetic data's budget check charges).
        let mut stacked = Vec::new();
        for (spec, samples) in specs.iter().zip(per_input) {
            ensure!(
                !samples.is_empty(),
                "calibration data '{source}' holds no sample for model input {}",
                spec.describe()
            );
            let first = &samples[0];
            let Some(axis) = spec.batch_axis else {
                for s in &samples {
                    ensure!(
                        s.data == first.data,
                        "model input {} has no batch axis, so every feed must hold the same value, but {} holds {} and {} holds {}: calibrate one value per run, fix it with --fix-input {}=VALUE, or give it a batch axis with --batch-axis {}=AXIS",
                        spec.describe(),
                        first.origin,
                        first.data.describe_values(),
                        s.origin,
                        s.data.describe_values(),
                        spec.name,
                        spec.name
                    );
                }
                stacked.push(first.data.clone());
                continue;
            };
            let others = |shape: &[usize]| -> Vec<usize> {
                shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != axis)
                    .map(|(_, &d)| d)
                    .collect()
            };
            for s in &samples {
                ensure!(
                    others(s.data.shape()) == others(first.data.shape()),
                    "calibration sample {} has shape {:?} but {} has {:?}: samples of input '{}' must share a shape outside the batch axis {axis}",
                    s.origin,
                    s.data.shape(),
                    first.origin,
                    first.data.shape(),
                    spec.name
                );
            }
            let parts: Vec<&Feed> = samples.iter().map(|s| &s.data).collect();
            let all = Feed::concatenate(axis, &parts)
                .with_context(|| format!("stacking samples of input '{}'", spec.name))?;
            drop(parts);
            drop(samples);
            stacked.push(all);
        }
        // Count feeds: rows along the batch axis, in units of a fixed batch size.
        let unit = |spec: &InputSpec| spec.fixed_batch().unwrap_or(1).max(1);
        let counted: Vec<(&InputSpec, usize, usize)> = specs
            .iter()
            .zip(&stacked)
            .filter_map(|(spec, a)| {
                spec.batch_axis
                    .map(|axis| (spec, a.shape()[axis], unit(spec)))
            })
            .collect();
        let fixed_batch = specs.iter().any(|s| s.fixed_batch().is_some());
        let feeds = |rows: usize, unit: usize| if fixed_batch { rows / unit } else { rows };
        let mut total = counted.first().map(|&(_, r, u)| feeds(r, u)).unwrap_or(1);
        if let Some(&(first, ..)) = counted.first() {
            for &(spec, rows, u) in &counted {
                ensure!(
                    feeds(rows, u) == total,
                    "calibration data '{source}': input {} has {} {} along its batch axis {} but {} has {total}; every input needs the same count: if a batch axis is wrong, pass --batch-axis NAME=AXIS",
                    spec.describe(),
                    feeds(rows, u),
                    if fixed_batch { "feed(s)" } else { "samples" },
                    spec.batch_axis.unwrap_or(0),
                    first.describe(),
                );
            }
        }
        if let Some(max) = opts.max_samples {
            if total > max {
                notes.push(format!(
                    "using the first {max} of {total} calibration samples"
                ));
                total = max;
            }
        }
        if fixed_batch && total == 0 {
            if let Some(&(spec, rows, u)) = counted.first() {
                bail!(
                    "calibration data '{source}' has {rows} samples of input '{}', fewer than the model's fixed batch size {u}",
                    spec.name
                );
            }
        }
        ensure!(total > 0, "calibration data '{source}' holds no samples");
        // Leftover rows that do not fill a fixed batch.
        if fixed_batch {
            if let Some(&(_, rows, u)) = counted.first() {
                let left = rows - (rows / u) * u;
                if left > 0 && opts.max_samples.is_none_or(|m| m >= rows / u) {
                    notes.push(format!(
                        "the model fixes batch size {u}: the last {left} calibration sample(s) are not used"
                    ));
                }
            }
        }
        let per_batch = if fixed_batch {
            1
        } else {
            opts.batch_size.max(1)
        };
        let mut batches: Vec<Vec<Feed>> = Vec::new();
        let mut start = 0;
        while start < total {
            let end = start.saturating_add(per_batch).min(total);
            batches.push(
                specs
                    .iter()
                    .zip(&stacked)
                    .map(|(spec, a)| match spec.batch_axis {
                        Some(axis) => {
                            let u = if fixed_batch { unit(spec) } else { 1 };
                            a.slice_axis(axis, start * u..end * u)
                        }
                        None => a.clone(),
                    })
                    .collect(),
            );
            start = end;
        }
        drop(stacked);
        let batch_axes: Vec<Option<usize>> = specs.iter().map(|s| s.batch_axis).collect();
        let mut set = CalibrationSet {
            input_names: specs.into_iter().map(|s| s.name).collect(),
            batch_axes,
            samples: 0,
            batches,
            source,
            synthetic: false,
            fixed_batch,
            notes,
            sequence: None,
            reference: None,
        };
        set.samples = (0..set.batches.len()).map(|b| set.rows(b)).sum();
        Ok(set)
    }
}

/// The model's inputs with `--batch-axis` applied, then `--input-shape`.
fn specs_for(model: &Model, opts: &DataOptions) -> Result<Vec<InputSpec>> {
    let specs = model_inputs_with(model, &opts.batch_axes)?;
    let specs = with_shapes(specs, &opts.input_shapes);
    ensure!(!specs.is_empty(), "the model has no inputs to calibrate");
    Ok(specs)
}

/// A tiny standard-normal sampler (Box-Muller) so the crate needs no `rand_distr`.
mod rand_distr_lite {
    use rand::Rng;
    pub fn standard_normal<R: Rng>(rng: &mut R) -> f32 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}
