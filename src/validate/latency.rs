//! Latency in tract, measured where the validator already has both models loaded: the median
//! of a few single-batch runs of the original and of the output, interleaved (o, c, o, c, ...)
//! so that a slow phase of the machine hits both alike, after one warm-up run of each plan
//! that has not run yet (the validator's comparison rows already warmed the original, and the
//! simulation graph when that is what is timed).
//!
//! `speedup = median(original) / median(output)`: above 1 the output is faster. The output is
//! timed as written when tract loads it as it is (the file a tract user ships; tract folds
//! DequantizeLinear of constants at load), otherwise as the validator's simulation graph, and
//! [`Latency::timed`] says which. A measurement, never a verdict: nothing fails on it.
//!
//! When ([`LatencyTiming`]): by default only when the output's activations run float in tract
//! (no activation `QuantizeLinear` / `DynamicQuantizeLinear` anywhere in it: `--target tract`,
//! weight-only, pruned or float outputs). tract runs activation Q/DQ in float, about 2x slower
//! than fp32, so its time for an int8-activation output says nothing about the integer kernels
//! of ONNX Runtime or OpenVINO the output is placed for, and timing it cost 1.1-1.6 s of a
//! 3.6-10.5 s default run (its as-written plan and ten timed runs on one core; BENCHMARKS.md,
//! issue 17 session 14). `--latency` times it anyway.

use super::Runner;
use crate::ir::graph::subgraphs;
use crate::onnx::proto::{GraphProto, ModelProto};
use crate::runtime::Feed;
use anyhow::Result;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Timed runs per model after the warm-up (fewer when [`BUDGET`] runs out first). 5, not 7:
/// the latency loop was a third of a default run's validation on resnet18 and efficientnet_b0
/// once validation compared 16 rows (BENCHMARKS.md, issue 17 session 12).
pub const RUNS: usize = 5;
/// Fewest timed runs per model, whatever the budget.
const MIN_RUNS: usize = 3;
/// Wall-clock budget for the timed runs of both models together.
const BUDGET: Duration = Duration::from_secs(2);

/// When validation times the two models (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatencyTiming {
    /// Only when the output quantizes no activation ([`quantizes_activations`] is false).
    #[default]
    WhenActivationsRunFloat,
    /// Whatever the output holds (`--latency`).
    Always,
}

impl LatencyTiming {
    /// Whether `candidate` is timed; `Err` holds the note saying why not.
    pub fn applies(self, candidate: &ModelProto) -> std::result::Result<(), String> {
        match self {
            LatencyTiming::Always => Ok(()),
            LatencyTiming::WhenActivationsRunFloat => match quantizes_activations(candidate) {
                None => Ok(()),
                Some(op) => Err(format!(
                    "latency not timed: the output quantizes activations ({op}), which tract runs \
                     in float, not on the integer kernels of the runtime the output is placed \
                     for (--latency times it in tract anyway)"
                )),
            },
        }
    }
}

/// The op type of the first `QuantizeLinear` / `DynamicQuantizeLinear` of `model` (subgraphs
/// included) whose input is not an initializer of its graph: an activation quantized at run
/// time. `None` when every quantized tensor is a constant weight.
pub fn quantizes_activations(model: &ModelProto) -> Option<&'static str> {
    fn walk(g: &GraphProto) -> Option<&'static str> {
        for n in &g.node {
            let op = match n.op_type() {
                "QuantizeLinear" => "QuantizeLinear",
                "DynamicQuantizeLinear" => "DynamicQuantizeLinear",
                _ => "",
            };
            let constant = |x: &String| g.initializer.iter().any(|t| t.name() == x);
            if !op.is_empty() && n.input.first().is_some_and(|x| !constant(x)) {
                return Some(op);
            }
            if let Some(found) = subgraphs(n).find_map(walk) {
                return Some(found);
            }
        }
        None
    }
    model.graph.as_ref().and_then(walk)
}

/// What [`measure`] found.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median milliseconds per run of the original.
    pub original_ms: f64,
    /// Median milliseconds per run of the output.
    pub candidate_ms: f64,
    /// `original_ms / candidate_ms`.
    pub speedup: f64,
    /// Timed runs per model.
    pub runs: usize,
    /// Rows in the timed batch (leading dim of its first input).
    pub batch_rows: usize,
    /// `"output as written"` or `"simulation graph"`.
    pub timed: &'static str,
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    let n = v.len();
    let mid = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    mid.as_secs_f64() * 1e3
}

/// Time `original` and `candidate` on `batch` (see the module docs); `warm`: whether each has
/// run already (no warm-up run then).
pub fn measure(
    original: &Runner,
    candidate: &Runner,
    batch: &[Feed],
    timed: &'static str,
    warm: [bool; 2],
) -> Result<Latency> {
    if !warm[0] {
        original.run(batch)?;
    }
    if !warm[1] {
        candidate.run(batch)?;
    }
    let (mut o, mut c) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while o.len() < RUNS && (o.len() < MIN_RUNS || start.elapsed() < BUDGET) {
        let t = Instant::now();
        original.run(batch)?;
        o.push(t.elapsed());
        let t = Instant::now();
        candidate.run(batch)?;
        c.push(t.elapsed());
    }
    let (original_ms, candidate_ms) = (median_ms(o.clone()), median_ms(c));
    Ok(Latency {
        original_ms,
        candidate_ms,
        speedup: if candidate_ms > 0.0 {
            original_ms / candidate_ms
        } else {
            f64::NAN
        },
        runs: o.len(),
        batch_rows: batch
            .first()
            .and_then(|a| a.shape().first().copied())
            .unwrap_or(0),
        timed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantized(body: &str) -> Option<&'static str> {
        let text = format!(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,2] y)
<float[4,2] w = {{0.5, -1.0, 0.25, 2.0, -0.75, 0.1, 1.5, -0.3}}, float s = {{0.1}},
 uint8 z = {{128}}, int8[4,2] wq = {{5, -10, 2, 20, -7, 1, 15, -3}}, int8 wz = {{0}}>
{{
{body}
}}"#
        );
        quantizes_activations(&crate::onnx::text::parse_model(&text).unwrap())
    }

    #[test]
    fn only_activations_quantized_at_run_time_count() {
        assert_eq!(quantized("   y = MatMul (x, w)"), None);
        // Weight-only: a DequantizeLinear of a constant, and a QuantizeLinear of an initializer.
        assert_eq!(
            quantized(
                "   wf = DequantizeLinear (wq, s, wz)\n   q = QuantizeLinear (w, s, z)\n   y = MatMul (x, wf)"
            ),
            None
        );
        assert_eq!(
            quantized(
                "   q = QuantizeLinear (x, s, z)\n   d = DequantizeLinear (q, s, z)\n   y = MatMul (d, w)"
            ),
            Some("QuantizeLinear")
        );
        assert_eq!(
            quantized("   q, qs, qz = DynamicQuantizeLinear (x)\n   y = MatMul (x, w)"),
            Some("DynamicQuantizeLinear")
        );
        let asked = crate::onnx::text::parse_model(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y)
<float s = {0.1}, uint8 z = {128}>
{
   q = QuantizeLinear (x, s, z)
   y = DequantizeLinear (q, s, z)
}"#,
        )
        .unwrap();
        assert!(LatencyTiming::default().applies(&asked).is_err());
        assert!(LatencyTiming::Always.applies(&asked).is_ok());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = |v: &[u64]| v.iter().map(|&x| Duration::from_millis(x)).collect();
        assert_eq!(median_ms(ms(&[5, 1, 3])), 3.0);
        assert_eq!(median_ms(ms(&[4, 1, 3, 2])), 2.5);
    }
}
