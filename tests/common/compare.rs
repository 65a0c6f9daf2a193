//! Output comparison that sees NaN and Inf.
//!
//! `f64::max` returns the other operand when one is NaN, so a running `max` over errors
//! silently drops the very elements that went wrong (an int8 model whose output turned
//! `+inf` scores a perfect error). Here a value that is finite on one side and not on the
//! other is a mismatch reported with its position; two non-finite values match only when
//! they are the same (`+inf`/`+inf`, `-inf`/`-inf`, NaN/NaN). The error over the finite pairs
//! is accumulated with explicit comparisons, never `f64::max`.
#![allow(dead_code)]

use ndarray::ArrayD;

/// The first disagreement between two outputs that no tolerance can excuse.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub output: String,
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "output '{}': {}", self.output, self.what)
    }
}

/// Largest `|a - b|` over all elements of all outputs (paired by position), or the first
/// shape or finiteness mismatch.
pub fn max_abs_diff(
    original: &[(String, ArrayD<f32>)],
    candidate: &[(String, ArrayD<f32>)],
) -> Result<f64, Mismatch> {
    if original.len() != candidate.len() {
        return Err(Mismatch {
            output: "*".into(),
            what: format!("{} outputs vs {}", original.len(), candidate.len()),
        });
    }
    let mut worst = 0.0f64;
    for ((name, a), (_, b)) in original.iter().zip(candidate) {
        if a.shape() != b.shape() {
            return Err(Mismatch {
                output: name.clone(),
                what: format!("shape {:?} vs {:?}", a.shape(), b.shape()),
            });
        }
        for (i, (&x, &y)) in a.iter().zip(b.iter()).enumerate() {
            match (x.is_finite(), y.is_finite()) {
                (true, true) => {
                    let e = (f64::from(x) - f64::from(y)).abs();
                    if e > worst {
                        worst = e;
                    }
                }
                (false, false) if x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()) => {}
                _ => {
                    return Err(Mismatch {
                        output: name.clone(),
                        what: format!("element {i}: {x} vs {y} (non-finite on one side)"),
                    })
                }
            }
        }
    }
    Ok(worst)
}

/// Largest `|a - b|` divided by the largest finite `|a|` (relative error for O(1)-scaled
/// outputs), with the same NaN/Inf rules as [`max_abs_diff`].
pub fn max_rel_diff(
    original: &[(String, ArrayD<f32>)],
    candidate: &[(String, ArrayD<f32>)],
) -> Result<f64, Mismatch> {
    let num = max_abs_diff(original, candidate)?;
    let mut den = 0.0f64;
    for (_, a) in original {
        for &x in a.iter().filter(|x| x.is_finite()) {
            if f64::from(x.abs()) > den {
                den = f64::from(x.abs());
            }
        }
    }
    Ok(num / if den > 1e-30 { den } else { 1e-30 })
}

/// Per output (by position): the sum of `|a - b|` and the element count, with the same
/// NaN/Inf rules as [`max_abs_diff`] (accumulate over batches, then divide for a mean).
pub fn abs_diff_sums(
    original: &[(String, ArrayD<f32>)],
    candidate: &[(String, ArrayD<f32>)],
) -> Result<Vec<(f64, usize)>, Mismatch> {
    max_abs_diff(original, candidate)?;
    Ok(original
        .iter()
        .zip(candidate)
        .map(|((_, a), (_, b))| {
            let sum = a
                .iter()
                .zip(b.iter())
                .filter(|(x, _)| x.is_finite())
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
                .sum();
            (sum, a.len())
        })
        .collect())
}
