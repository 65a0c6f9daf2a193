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

use super::Runner;
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

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = |v: &[u64]| v.iter().map(|&x| Duration::from_millis(x)).collect();
        assert_eq!(median_ms(ms(&[5, 1, 3])), 3.0);
        assert_eq!(median_ms(ms(&[4, 1, 3, 2])), 2.5);
    }
}
