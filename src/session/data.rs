//! The run's data: calibration inputs handed to the passes, held-out evaluation inputs and
//! labels for validation. Read and checked against the model before any pass runs, so a bad
//! file fails the run early with its path.

use crate::calibrate::sequence::{Decoder, SequenceOptions, StateDecl};
use crate::calibrate::{CalibrationSet, DataOptions, NamedBatch};
use crate::ir::Model;
use crate::limits::MemoryBudget;
use crate::passes::PassContext;
use crate::runtime::Feed;
use crate::validate::generate::Prompts;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the run's data comes from.
#[derive(Debug, Clone, Default)]
pub struct DataSources {
    /// `--calib`: calibration inputs (see [`CalibrationSet::load`] for the formats).
    pub calib: Option<PathBuf>,
    /// `--calib-samples`: use at most this many calibration samples.
    pub calib_samples: Option<usize>,
    /// Preprocessing of png/jpg calibration and evaluation inputs.
    pub image: crate::calibrate::ImageOptions,
    /// `--eval`: held-out validation inputs (same formats).
    pub eval: Option<PathBuf>,
    /// `--eval-labels`: class labels of the `--eval` samples.
    pub eval_labels: Option<PathBuf>,
    /// `--batch-axis NAME=AXIS|none`: batch axes of `--calib` and `--eval` data.
    pub batch_axes: Vec<(String, Option<usize>)>,
    /// `--state IN=OUT[:AXIS]`: KV-cache state pairs besides those found by name.
    pub states: Vec<StateDecl>,
    /// `--prefill`, `--decode-steps`: how a KV-cache decoder's calibration windows are run.
    pub sequence: SequenceOptions,
    /// `--prompts`: token ids `[N, p]` a KV-cache decoder's generation check starts from.
    pub prompts: Option<PathBuf>,
}

/// Held-out inputs as validation batches (one joined batch, or whole feeds where the model
/// fixes its batch size), and their labels.
#[derive(Debug, Clone)]
pub struct EvalData {
    pub batches: Vec<NamedBatch>,
    pub labels: Option<Vec<i64>>,
    /// Each input's batch axis, when the batches may be cut into rows ([`CalibrationSet::row_axes`]).
    pub row_axes: Option<Vec<(String, Option<usize>)>>,
    /// A KV-cache decoder's token windows (prompts for the generation check).
    pub tokens: Option<Feed>,
}

/// The KV-cache decoder behind `model` (state pairs by name or `--state`), if any.
pub fn decoder(
    sources: &DataSources,
    model: &Model,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Option<Decoder>> {
    Decoder::from_model(model, &sources.states, &sources.batch_axes, input_shapes)
}

/// Prompts for a KV-cache decoder's generation check: `--prompts`, else the `--eval` windows,
/// else the (real) calibration windows.
pub fn prompts(
    sources: &DataSources,
    decoder: &Decoder,
    eval: Option<&EvalData>,
    calib: Option<&CalibrationSet>,
    steps: usize,
) -> Result<Prompts> {
    if let Some(path) = &sources.prompts {
        let what = format!("--prompts {}", path.display());
        let opts = DataOptions {
            batch_size: usize::MAX,
            ..Default::default()
        };
        let set = CalibrationSet::load_inputs(path, vec![decoder.token_input().0.clone()], &opts)
            .with_context(|| what.clone())?;
        let batch = set.rebatched(usize::MAX).with_context(|| what.clone())?;
        let tokens = batch
            .into_iter()
            .next()
            .and_then(|b| b.into_iter().next())
            .with_context(|| format!("{what}: no prompt"))?
            .1;
        return Prompts::given(tokens, steps, &what).with_context(|| what.clone());
    }
    if let Some(t) = eval.and_then(|e| e.tokens.as_ref()) {
        return Prompts::from_windows(t, steps, "held-out --eval windows");
    }
    let calib_tokens = calib
        .filter(|c| !c.synthetic)
        .and_then(|c| c.sequence.as_ref())
        .and_then(|s| s.tokens.as_ref());
    if let Some(t) = calib_tokens {
        return Prompts::from_windows(t, steps, "calibration windows (in-sample)");
    }
    bail!("no prompts to generate from: give --prompts, --eval or --calib token windows")
}

/// Read data for `model`: as is, or for a KV-cache decoder its token windows run step by step
/// ([`Decoder::expand`]).
fn load_set(
    path: &Path,
    model: &Model,
    opts: &DataOptions,
    decoder: Option<&Decoder>,
    sequence: &SequenceOptions,
) -> Result<CalibrationSet> {
    match decoder {
        None => CalibrationSet::load(path, model, opts),
        Some(d) => {
            let tokens = CalibrationSet::load_inputs(path, d.data_inputs(), opts)?;
            d.expand(tokens, &model.to_proto()?, sequence, opts.memory)
        }
    }
}

/// Read `--eval` (and its labels), with the batch axes `--batch-axis` gives.
///
/// A KV-cache decoder's windows are validated as prefills of all but their last token (the
/// target of next-token evaluation).
pub fn load_eval(
    sources: &DataSources,
    model: &Model,
    decoder: Option<&Decoder>,
    memory: MemoryBudget,
) -> Result<Option<EvalData>> {
    let Some(path) = &sources.eval else {
        ensure!(sources.eval_labels.is_none(), "--eval-labels needs --eval");
        return Ok(None);
    };
    let opts = DataOptions {
        batch_size: usize::MAX,
        batch_axes: sources.batch_axes.clone(),
        image: sources.image.clone(),
        memory,
        ..Default::default()
    };
    // The last token of an evaluation window is its target: not run.
    let sequence = SequenceOptions {
        decode_steps: 0,
        prefill: None,
        held_out: 1,
    };
    let set = load_set(path, model, &opts, decoder, &sequence)
        .with_context(|| format!("--eval {}", path.display()))?;
    let batches = set
        .rebatched(usize::MAX)
        .with_context(|| format!("--eval {}", path.display()))?;
    let labels = match &sources.eval_labels {
        None => None,
        Some(p) => {
            let labels = read_labels(p)?;
            ensure!(
                labels.len() == set.samples,
                "--eval-labels {}: {} labels for {} --eval samples",
                p.display(),
                labels.len(),
                set.samples
            );
            Some(labels)
        }
    };
    let tokens = set.sequence.as_ref().and_then(|s| s.tokens.clone());
    Ok(Some(EvalData {
        batches,
        labels,
        row_axes: set.row_axes(),
        tokens,
    }))
}

/// Integer class labels from a 1-D .npy (int64, int32 or uint8).
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    use ndarray_npy::ReadNpyExt;
    let open = || {
        std::fs::File::open(path).with_context(|| format!("cannot read labels {}", path.display()))
    };
    if let Ok(a) = ndarray::Array1::<i64>::read_npy(open()?) {
        return Ok(a.to_vec());
    }
    if let Ok(a) = ndarray::Array1::<i32>::read_npy(open()?) {
        return Ok(a.iter().map(|&v| v as i64).collect());
    }
    if let Ok(a) = ndarray::Array1::<u8>::read_npy(open()?) {
        return Ok(a.iter().map(|&v| v as i64).collect());
    }
    bail!(
        "labels {}: expected a 1-D .npy of int64, int32 or uint8 class indices",
        path.display()
    )
}

/// Load `--calib` and hand it to the passes that observe activations: quantize and mixed
/// precision get the whole set, equalization every batch by name, pruning the first batch.
/// Without `--calib` but with `--input-shape`, quantize and mixed precision calibrate on
/// synthetic data (they say so loudly); made here so that the given shapes fix symbolic dims.
/// Prune and equalize get no synthetic data.
pub fn attach_calibration(
    ctx: &mut PassContext,
    sources: &DataSources,
    model: &Model,
    input_shapes: &[(String, Vec<usize>)],
    decoder: Option<&Decoder>,
    seed: u64,
    memory: MemoryBudget,
) -> Result<()> {
    let data_opts = DataOptions {
        max_samples: sources.calib_samples,
        input_shapes: input_shapes.to_vec(),
        batch_axes: sources.batch_axes.clone(),
        image: sources.image.clone(),
        memory,
        ..Default::default()
    };
    let calibration = match &sources.calib {
        Some(path) => Some(Arc::new(
            load_set(path, model, &data_opts, decoder, &sources.sequence)
                .with_context(|| format!("--calib {}", path.display()))?,
        )),
        None => None,
    };
    // equalize and prune make their named batches from the set only if they run.
    ctx.calibration_for_all_passes = calibration.is_some();
    ctx.quantize.input_shapes = input_shapes.to_vec();
    ctx.prune.input_shapes = input_shapes.to_vec();
    ctx.calibration = match calibration {
        Some(c) => Some(c),
        None if !input_shapes.is_empty() => Some(Arc::new(CalibrationSet::synthetic(
            model,
            ctx.quantize.synthetic_samples,
            seed,
            &data_opts,
        )?)),
        None => None,
    };
    Ok(())
}
