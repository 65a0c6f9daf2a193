//! The label-free loss and Hutchinson's trace estimator (see the `hessian` module docs).
//!
//! Per row: KL as `log Σ p0 e^{δz} − Σ p0 δz` with `δz = z − z0`, in f64 with
//! `ln_1p`/`exp_m1` so the O(ε²) value survives; MSE as `½ ‖z − z0‖²`.
//! Hutchinson: `Tr(H) = E[vᵀHv]` over Rademacher `v` (ChaCha8 from `seed`); the mean's
//! standard error is `sqrt((Σq² − k·mean²) / (k − 1) / k)`, and sampling stops once it is at
//! most `rel_tol · |mean|` (after `max(min_samples, 2)` probes) or at `max_samples`.

use super::{HessianOptions, TraceEstimate};
use anyhow::{ensure, Result};
use ndarray::ArrayD;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `softmax(z)` in f64.
pub(super) fn softmax<'a>(z: impl Iterator<Item = &'a f32> + Clone) -> Vec<f64> {
    let m = z.clone().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = z.map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Hutchinson's estimator: `quad(v)` returns `vᵀHv` for a Rademacher `v` of length `n`.
pub fn hutchinson<F>(
    n: usize,
    seed: u64,
    opts: &HessianOptions,
    mut quad: F,
) -> Result<TraceEstimate>
where
    F: FnMut(&[f32]) -> Result<f64>,
{
    ensure!(opts.max_samples >= 1, "max_samples must be at least 1");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut sum, mut sum2) = (0f64, 0f64);
    let mut v = vec![0f32; n];
    let mut k = 0usize;
    loop {
        for x in v.iter_mut() {
            *x = if rng.random::<bool>() { 1.0 } else { -1.0 };
        }
        let q = quad(&v)?;
        ensure!(
            q.is_finite(),
            "a Hutchinson probe gave a non-finite value ({q})"
        );
        k += 1;
        sum += q;
        sum2 += q * q;
        let mean = sum / k as f64;
        let stderr = if k > 1 {
            ((sum2 - k as f64 * mean * mean).max(0.0) / (k - 1) as f64 / k as f64).sqrt()
        } else {
            f64::INFINITY
        };
        let done = k >= opts.max_samples
            || (k >= opts.min_samples.max(2) && stderr <= opts.rel_tol * mean.abs());
        if done {
            return Ok(TraceEstimate {
                mean,
                stderr: if stderr.is_finite() { stderr } else { 0.0 },
                samples: k,
            });
        }
    }
}

/// Sum over the rows of one output of the per-row loss between `reference` and `out`.
pub fn loss_sum(reference: &ArrayD<f32>, out: &ArrayD<f32>, kl: bool) -> f64 {
    if kl && reference.ndim() == 2 {
        let mut total = 0f64;
        for (r, o) in reference.outer_iter().zip(out.outer_iter()) {
            // KL(p0 || p) = log Σ p0 e^{δz} − Σ p0 δz, δz = z − z0.
            let (mut a, mut b) = (0f64, 0f64);
            for ((&z0, &z), &p0) in r.iter().zip(o.iter()).zip(&softmax(r.iter())) {
                let dz = z as f64 - z0 as f64;
                a += p0 * dz.exp_m1();
                b += p0 * dz;
            }
            total += a.ln_1p() - b;
        }
        total
    } else {
        0.5 * reference
            .iter()
            .zip(out.iter())
            .map(|(&a, &b)| (b as f64 - a as f64).powi(2))
            .sum::<f64>()
    }
}
