//! Validation by generation for KV-cache decoders: the original and the candidate each
//! continue the same prompts greedily in tract, threading their own `present` back as `past`
//! (see [`crate::calibrate::sequence`]), and the continuations are compared token by token.
//!
//! ```text
//! prompt [N, p] -> prefill -> argmax(logits[:, -1]) = token 1 -> decode step -> token 2 -> ... token `steps`
//! ```
//!
//! Each model runs free: after a first difference the two continue from different texts, as a
//! user of either would see them. The measures:
//! - `agreement`: the fraction of (prompt, position) pairs where both chose the same token
//!   (what `benches/gpt_eval.py --kv-candidate` prints, there in ONNX Runtime);
//! - `by_position`: that fraction at each generated position;
//! - `identical`: prompts whose whole continuation is the same;
//! - `mean_first_divergence`: the mean index of the first different token (`steps` when none).
//!
//! Prompts: `--prompts FILE` (token ids `[N, p]`), else the held-out `--eval` windows, else the
//! calibration windows (in-sample), at most [`MAX_PROMPTS`] of them. Prompts cut from windows of
//! `L` tokens keep the generation inside what the windows fed the model: `p + steps = L - 1`
//! (so every position fed is one the windows fed, whatever the model's context), with at
//! least one prompt token.
//!
//! Both models run as their simulation graphs (as in [`super::validate`]); tract plans are
//! rebuilt each step, since the past grows.

use crate::calibrate::sequence::{Decoder, SequenceFacts, StatePair};
use crate::onnx::proto::ModelProto;
use crate::runtime::{refusal, simulation_graph, Feed, Runner};
use anyhow::{ensure, Context, Result};
use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;

use super::Status;

/// Greedy tokens generated per prompt when not given (`--generate-steps`).
pub const DEFAULT_GENERATE_STEPS: usize = 16;

/// Most prompts generated from (one batch per model and step).
pub const MAX_PROMPTS: usize = 16;

/// Token agreement of the two models' greedy continuations.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    pub status: Status,
    pub reason: Option<String>,
    /// Where the prompts come from.
    pub source: String,
    pub prompts: usize,
    pub prompt_tokens: usize,
    /// Tokens generated per prompt.
    pub steps: usize,
    /// Fraction of (prompt, position) pairs with the same token.
    pub agreement: f64,
    /// The same fraction at each generated position.
    pub by_position: Vec<f64>,
    /// Prompts whose continuations are identical.
    pub identical: usize,
    /// Mean index of the first different token (`steps` when none differs).
    pub mean_first_divergence: f64,
}

impl GenerationReport {
    pub fn not_checked(reason: String) -> Self {
        GenerationReport {
            status: Status::NotChecked,
            reason: Some(reason),
            source: String::new(),
            prompts: 0,
            prompt_tokens: 0,
            steps: 0,
            agreement: f64::NAN,
            by_position: Vec::new(),
            identical: 0,
            mean_first_divergence: f64::NAN,
        }
    }
}

/// What the run knows about a KV-cache decoder: its state pairs, how calibration ran it, and
/// the generation check.
#[derive(Debug, Clone, Serialize)]
pub struct DecoderReport {
    pub state_pairs: Vec<StatePair>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<SequenceFacts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationReport>,
}

/// Prompts and how far to continue them.
#[derive(Debug, Clone)]
pub struct Prompts {
    /// Token ids `[N, p]` in the token input's element type.
    pub tokens: Feed,
    pub steps: usize,
    pub source: String,
}

impl Prompts {
    /// At most [`MAX_PROMPTS`] prompts cut from token windows `[N, L]` so that prompt and
    /// continuation stay inside `L - 1` positions (see the module docs).
    pub fn from_windows(windows: &Feed, steps: usize, source: &str) -> Result<Prompts> {
        ensure!(
            windows.ndim() == 2,
            "token windows of shape {:?}: [windows, tokens] expected",
            windows.shape()
        );
        let (n, len) = (windows.shape()[0], windows.shape()[1]);
        ensure!(
            len >= 3,
            "token windows of {len} tokens are too short to prompt and continue"
        );
        let steps = steps.min(len - 2);
        let p = len - 1 - steps;
        Ok(Prompts {
            tokens: windows
                .slice_axis(0, 0..n.min(MAX_PROMPTS))
                .slice_axis(1, 0..p),
            steps,
            source: source.to_string(),
        })
    }

    /// Given prompts `[N, p]` (or one `[p]`), at most [`MAX_PROMPTS`] of them, continued
    /// `steps` tokens.
    pub fn given(tokens: Feed, steps: usize, source: &str) -> Result<Prompts> {
        let tokens = if tokens.ndim() == 1 {
            tokens.insert_axis(0)
        } else {
            tokens
        };
        ensure!(
            tokens.ndim() == 2 && tokens.shape()[1] > 0,
            "prompts of shape {:?}: [prompts, tokens] expected",
            tokens.shape()
        );
        let n = tokens.shape()[0].min(MAX_PROMPTS);
        Ok(Prompts {
            tokens: tokens.slice_axis(0, 0..n),
            steps,
            source: source.to_string(),
        })
    }
}

/// Greedy continuations of `prompts` by `model` (one row of tokens per prompt).
pub fn greedy(model: &ModelProto, decoder: &Decoder, prompts: &Prompts) -> Result<Vec<Vec<i64>>> {
    let (spec, seq_axis) = decoder.token_input();
    ensure!(
        decoder.data_inputs().len() == 1 && spec.batch_axis == Some(0) && seq_axis == 1,
        "generation drives one token input [batch, sequence]; the model's data inputs are {}",
        decoder
            .data_inputs()
            .iter()
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let logits_name = decoder
        .logits
        .as_ref()
        .context("the model has no output besides its state to read tokens from")?;
    let rows = prompts.tokens.shape()[0];
    let mut states = decoder.initial_states(rows)?;
    let mut tokens = prompts.tokens.clone().convert(spec.elem_type)?;
    let mut past = 0;
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); rows];
    for step in 0..prompts.steps {
        let len = tokens.shape()[1];
        let feeds = decoder.step_feeds(std::slice::from_ref(&tokens), 0, len, past, &states)?;
        let named: Vec<(String, Vec<usize>)> = decoder
            .input_names()
            .into_iter()
            .zip(feeds.iter().map(|f| f.shape().to_vec()))
            .collect();
        let runner = Runner::new(model, &named, &[])
            .with_context(|| format!("generation step {step} (past {past}) in tract"))?;
        let outputs = runner
            .run(&feeds)
            .with_context(|| format!("generation step {step} (past {past})"))?;
        let k = runner
            .output_names()
            .iter()
            .position(|n| n == logits_name)
            .with_context(|| format!("the run returned no output '{logits_name}'"))?;
        let next =
            last_argmax(&outputs[k], rows).with_context(|| format!("output '{logits_name}'"))?;
        for (row, t) in out.iter_mut().zip(&next) {
            row.push(*t);
        }
        states = decoder.next_states(runner.output_names(), &outputs, &states)?;
        past += len;
        tokens =
            Feed::I64(ArrayD::from_shape_vec(IxDyn(&[rows, 1]), next)?).convert(spec.elem_type)?;
    }
    Ok(out)
}

/// The argmax over the last axis at the last position, per row: logits `[N, S, V]` or `[N, V]`.
fn last_argmax(logits: &ArrayD<f32>, rows: usize) -> Result<Vec<i64>> {
    ensure!(
        matches!(logits.ndim(), 2 | 3) && logits.shape()[0] == rows,
        "logits of shape {:?}: [batch, sequence, vocabulary] or [batch, vocabulary] expected",
        logits.shape()
    );
    let last = if logits.ndim() == 3 {
        let s = logits.shape()[1];
        ensure!(s > 0, "logits hold no position");
        logits.index_axis(Axis(1), s - 1).to_owned()
    } else {
        logits.clone()
    };
    Ok(last
        .outer_iter()
        .map(|row| {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (i, &v) in row.iter().enumerate() {
                // Ties and NaN: the first maximum, as numpy's argmax.
                if v > best.1 || i == 0 {
                    best = (i, v);
                }
            }
            best.0 as i64
        })
        .collect())
}

/// Agreement of two sets of continuations (see the module docs).
pub fn agreement(reference: &[Vec<i64>], candidate: &[Vec<i64>]) -> (f64, Vec<f64>, usize, f64) {
    let steps = reference.first().map_or(0, Vec::len);
    let n = reference.len().max(1) as f64;
    let by_position: Vec<f64> = (0..steps)
        .map(|t| {
            reference
                .iter()
                .zip(candidate)
                .filter(|(r, c)| r.get(t) == c.get(t))
                .count() as f64
                / n
        })
        .collect();
    let total = if steps == 0 {
        1.0
    } else {
        by_position.iter().sum::<f64>() / steps as f64
    };
    let identical = reference
        .iter()
        .zip(candidate)
        .filter(|(r, c)| r == c)
        .count();
    let first: f64 = reference
        .iter()
        .zip(candidate)
        .map(|(r, c)| r.iter().zip(c).position(|(a, b)| a != b).unwrap_or(steps) as f64)
        .sum::<f64>()
        / n;
    (total, by_position, identical, first)
}

/// Generate from `prompts` with both models and compare (never an error: what cannot run is a
/// `not_checked` report with the reason).
pub fn compare(
    original: &ModelProto,
    candidate: &ModelProto,
    decoder: &Decoder,
    prompts: &Prompts,
) -> GenerationReport {
    let run = || -> Result<GenerationReport> {
        let (sim_o, _) = simulation_graph(original).context("the original's simulation graph")?;
        let (sim_c, _) = simulation_graph(candidate).context("the candidate's simulation graph")?;
        for (which, m) in [("original", &sim_o), ("candidate", &sim_c)] {
            if let Some(reason) = refusal(m) {
                anyhow::bail!("{which}: {reason}");
            }
        }
        let progress = crate::progress::Progress::spinner("generating with both models");
        let reference = greedy(&sim_o, decoder, prompts).context("original")?;
        let got = greedy(&sim_c, decoder, prompts).context("candidate")?;
        drop(progress);
        let (total, by_position, identical, first) = agreement(&reference, &got);
        Ok(GenerationReport {
            status: Status::Checked,
            reason: None,
            source: prompts.source.clone(),
            prompts: reference.len(),
            prompt_tokens: prompts.tokens.shape()[1],
            steps: prompts.steps,
            agreement: total,
            by_position,
            identical,
            mean_first_divergence: first,
        })
    };
    run().unwrap_or_else(|e| GenerationReport::not_checked(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_counts_positions_prompts_and_first_divergence() {
        let r = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]];
        let c = vec![vec![1, 2, 9, 4], vec![5, 6, 7, 8]];
        let (total, by_pos, identical, first) = agreement(&r, &c);
        assert_eq!(by_pos, vec![1.0, 1.0, 0.5, 1.0]);
        assert!((total - 7.0 / 8.0).abs() < 1e-12);
        assert_eq!(identical, 1);
        assert!((first - (2.0 + 4.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn prompts_from_windows_stay_inside_the_window() {
        let w = Feed::I64(ArrayD::from_shape_fn(IxDyn(&[20, 32]), |ix| ix[1] as i64));
        let p = Prompts::from_windows(&w, 16, "calibration").unwrap();
        assert_eq!(p.tokens.shape(), &[MAX_PROMPTS, 15]);
        assert_eq!(p.steps, 16);
        assert_eq!(p.tokens.shape()[1] + p.steps, 31);
        let short = Prompts::from_windows(&w, 100, "calibration").unwrap();
        assert_eq!((short.tokens.shape()[1], short.steps), (1, 30));
    }

    #[test]
    fn last_argmax_reads_the_last_position() {
        let mut l = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 4]));
        l[[0, 2, 3]] = 1.0;
        l[[0, 0, 1]] = 5.0;
        l[[1, 2, 2]] = 1.0;
        assert_eq!(last_argmax(&l, 2).unwrap(), vec![3, 2]);
    }
}
