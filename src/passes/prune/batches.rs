//! Running a model (or a part of one) on the pruning pass's calibration batch, on every core.
//!
//! The batch is cut along axis 0 into chunks of a fixed size, the chunks run side by side
//! (rayon, one tract plan per distinct chunk shape, shared by the threads) and the outputs are
//! joined in chunk order. The chunk size depends only on the model and the batch (a smaller
//! fixed batch dim the model declares, else [`CHUNK`] samples), never on the thread count, so the
//! values are the same with 1 or N threads.
//!
//! Splitting is only done where it is plainly per sample: every input and every output must
//! have the chunk's length on axis 0; otherwise the batch runs whole (as before), in one plan.
//!
//! Before / after (32 samples, 2 threads):
//! ```text
//! run(x[32,3,224,224])                  =>  run(x[0..8]) | run(x[8..16])     thread 1
//!                                           run(x[16..24]) | run(x[24..32])  thread 2
//!                                           joined along axis 0
//! ```

use crate::onnx::proto::ModelProto;
use crate::runtime::{Feed, Runner};
use anyhow::{Context, Result};
use ndarray::{ArrayD, Axis};
use rayon::prelude::*;

/// Samples per chunk when the model does not fix its batch size.
pub const CHUNK: usize = 8;

/// The chunk size of `model` for a batch of `total` samples: the smallest fixed batch dim
/// its inputs declare when that divides `total`, [`CHUNK`] when the batch dim is free, `total`
/// when a declared size does not allow cutting.
pub fn chunk_size(model: &ModelProto, inputs: &[(String, Feed)]) -> usize {
    use crate::onnx::proto::{tensor_shape_proto::dimension::Value as D, type_proto::Value};
    let total = batch_len(inputs).unwrap_or(1);
    let Some(graph) = model.graph.as_ref() else {
        return total;
    };
    let declared = |name: &str| -> Option<Option<usize>> {
        let vi = graph.input.iter().find(|i| i.name() == name)?;
        let Some(Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
            return Some(None);
        };
        match t
            .shape
            .as_ref()
            .and_then(|s| s.dim.first())
            .and_then(|d| d.value.as_ref())
        {
            Some(D::DimValue(v)) if *v > 0 => Some(Some(*v as usize)),
            _ => Some(None),
        }
    };
    let fixed = inputs
        .iter()
        .filter_map(|(n, _)| declared(n).flatten())
        .min();
    match fixed {
        Some(b) if b < total && total.is_multiple_of(b) => b,
        Some(_) => total,
        None => CHUNK.min(total).max(1),
    }
}

/// Axis-0 length shared by every input (`None`: no input, or they differ).
fn batch_len(inputs: &[(String, Feed)]) -> Option<usize> {
    let first = *inputs.first()?.1.shape().first()?;
    inputs
        .iter()
        .all(|(_, a)| a.shape().first() == Some(&first))
        .then_some(first)
}

/// Run `model` on `inputs` (by name) with `extra` values as extra outputs, in chunks of
/// [`chunk_size`]: `(name, value)` for the graph outputs then `extra`.
pub fn run_batched(
    model: &ModelProto,
    inputs: &[(String, Feed)],
    extra: &[String],
) -> Result<Vec<(String, ArrayD<f32>)>> {
    run_chunked(model, inputs, extra, chunk_size(model, inputs))
}

/// [`run_batched`] with a given chunk size (a part of a model, whose inputs declare no batch,
/// runs in the chunks of the whole model).
pub fn run_chunked(
    model: &ModelProto,
    inputs: &[(String, Feed)],
    extra: &[String],
    chunk: usize,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let Some(total) = batch_len(inputs) else {
        return crate::runtime::run_model(model, inputs, extra);
    };
    if chunk == 0 || chunk >= total {
        return crate::runtime::run_model(model, inputs, extra);
    }
    let ranges: Vec<std::ops::Range<usize>> = (0..total)
        .step_by(chunk)
        .map(|s| s..(s + chunk).min(total))
        .collect();
    // One plan per distinct chunk length (the last chunk may be shorter).
    let mut lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
    lens.dedup();
    lens.sort_unstable();
    lens.dedup();
    let runners: Vec<(usize, Runner)> = lens
        .iter()
        .map(|&len| {
            let shapes: Vec<(String, Vec<usize>)> = inputs
                .iter()
                .map(|(n, a)| {
                    let mut s = a.shape().to_vec();
                    s[0] = len;
                    (n.clone(), s)
                })
                .collect();
            Ok((len, Runner::new(model, &shapes, extra)?))
        })
        .collect::<Result<_>>()?;
    let names = runners[0].1.output_names().to_vec();
    let parts: Vec<Vec<ArrayD<f32>>> = ranges
        .par_iter()
        .map(|r| {
            let runner = &runners
                .iter()
                .find(|(len, _)| *len == r.len())
                .expect("a runner per chunk length")
                .1;
            let ordered = runner
                .inputs()
                .iter()
                .map(|spec| {
                    inputs
                        .iter()
                        .find(|(n, _)| n == &spec.name)
                        .map(|(_, a)| a.slice_axis(0, r.clone()))
                        .with_context(|| format!("no value given for input '{}'", spec.name))
                })
                .collect::<Result<Vec<_>>>()?;
            runner.run(&ordered)
        })
        .collect::<Result<_>>()?;
    // Per sample only if every output carries the chunk on axis 0; else run the batch whole.
    let per_sample = parts
        .iter()
        .zip(&ranges)
        .all(|(outs, r)| outs.iter().all(|o| o.ndim() > 0 && o.shape()[0] == r.len()));
    if !per_sample {
        return crate::runtime::run_model(model, inputs, extra);
    }
    (0..names.len())
        .map(|i| {
            let views: Vec<_> = parts.iter().map(|p| p[i].view()).collect();
            let joined = ndarray::concatenate(Axis(0), &views)
                .with_context(|| format!("joining the chunks of '{}'", names[i]))?;
            Ok((names[i].clone(), joined))
        })
        .collect()
}
