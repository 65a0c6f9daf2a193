//! Whitened output responses (see **Responses** in the `hessian` module docs): per candidate
//! weight, `ũ = F^½ δz / √N` laid out over every (batch, graph output) of the full model, so
//! responses of different layers share one space; KL rows give
//! `ũ_j = √p0_j (δz_j − Σ_k p0_k δz_k)`, MSE rows `ũ = δz`. Responses longer than
//! [`response_dim`] are count-sketched: element `i` goes to a fixed slot with a fixed sign
//! (splitmix64 of `i`), which keeps inner products unbiased with relative error ≈ `√(2 / dim)`.

use super::loss::softmax;
use super::submodel::SubModel;
use ndarray::ArrayD;

/// Longest response kept exactly for a model with `layers` weighted layers (longer ones are
/// count-sketched to this length): at most 2^30 multiply-adds for a Gram matrix over three
/// candidates per layer, within 4096..=32768.
pub fn response_dim(layers: usize) -> usize {
    let pairs = (3 * layers.max(1)).pow(2);
    ((1usize << 30) / pairs).clamp(1 << 12, 1 << 15)
}

/// Position and sign of element `i` of a response in its count sketch.
pub(super) fn sketch_slot(i: u64, dim: usize) -> (usize, f32) {
    // splitmix64: a fixed function of the position, so every response shares the sketch.
    let mut z = i.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    ((z >> 1) as usize % dim, if z & 1 == 0 { 1.0 } else { -1.0 })
}

/// Where each (batch, graph output) starts in a response, so that every layer's response lives
/// in the same space even when a layer reaches only some outputs; and the rows `N`.
pub(super) struct ResponseLayout {
    offsets: Vec<Vec<usize>>,
    total: usize,
    rows: usize,
    /// Sketch length ([`response_dim`]).
    dim: usize,
}

impl ResponseLayout {
    /// From the full model's outputs per batch (graph outputs, in order).
    pub(super) fn new(outputs: &[Vec<&ArrayD<f32>>], dim: usize) -> ResponseLayout {
        let mut offsets = Vec::with_capacity(outputs.len());
        let (mut total, mut rows_total) = (0, 0);
        for batch in outputs {
            let mut at = Vec::with_capacity(batch.len());
            for a in batch {
                at.push(total);
                total += a.len();
            }
            offsets.push(at);
            rows_total += batch.first().map_or(1, |a| rows(a));
        }
        ResponseLayout {
            offsets,
            total,
            rows: rows_total,
            dim,
        }
    }
}

/// `ũ` of one candidate (see the module docs): `refs` and `outs` per batch, per output of `sub`.
pub(super) fn response(
    layout: &ResponseLayout,
    sub: &SubModel,
    refs: &[Vec<ArrayD<f32>>],
    outs: &[Vec<ArrayD<f32>>],
) -> Vec<f32> {
    let sketched = layout.total > layout.dim;
    let mut u = vec![0f64; layout.total.min(layout.dim)];
    let norm = 1.0 / (layout.rows.max(1) as f64).sqrt();
    let mut put = |i: usize, v: f64| {
        if sketched {
            let (slot, sign) = sketch_slot(i as u64, layout.dim);
            u[slot] += sign as f64 * v;
        } else {
            u[i] = v;
        }
    };
    for ((r, o), offsets) in refs.iter().zip(outs).zip(&layout.offsets) {
        for (k, (a, b)) in r.iter().zip(o).enumerate() {
            let mut i = offsets[sub.outputs[k]];
            if sub.kl[k] && a.ndim() == 2 {
                for (ra, rb) in a.outer_iter().zip(b.outer_iter()) {
                    let p0 = softmax(ra.iter());
                    let dz: Vec<f64> = ra
                        .iter()
                        .zip(rb.iter())
                        .map(|(&z0, &z)| z as f64 - z0 as f64)
                        .collect();
                    let mean: f64 = p0.iter().zip(&dz).map(|(p, d)| p * d).sum();
                    for (p, d) in p0.iter().zip(&dz) {
                        put(i, p.sqrt() * (d - mean) * norm);
                        i += 1;
                    }
                }
            } else {
                for (&z0, &z) in a.iter().zip(b.iter()) {
                    put(i, (z as f64 - z0 as f64) * norm);
                    i += 1;
                }
            }
        }
    }
    u.into_iter().map(|v| v as f32).collect()
}

pub(super) fn rows(a: &ArrayD<f32>) -> usize {
    a.shape().first().copied().unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_dim_shrinks_with_layers_within_bounds() {
        assert_eq!(response_dim(21), 1 << 15);
        assert_eq!(response_dim(5000), 1 << 12);
        let dims: Vec<usize> = [1, 50, 150, 200, 400, 800].map(response_dim).to_vec();
        assert!(dims.windows(2).all(|w| w[1] <= w[0]), "{dims:?}");
    }

    #[test]
    fn count_sketch_keeps_inner_products() {
        // Two long correlated vectors: the sketch's inner products match the exact ones within
        // a few times √(2 / dim).
        let n = 200_000;
        let a: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.731).sin()).collect();
        let b: Vec<f64> = (0..n)
            .map(|i| a[i] * 0.6 + ((i as f64) * 1.913).cos() * 0.8)
            .collect();
        let dim = 1 << 15;
        let sketch = |v: &[f64]| {
            let mut s = vec![0f64; dim];
            for (i, &x) in v.iter().enumerate() {
                let (slot, sign) = sketch_slot(i as u64, dim);
                s[slot] += sign as f64 * x;
            }
            s
        };
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
        let (sa, sb) = (sketch(&a), sketch(&b));
        let tol = 4.0 * (2.0 / dim as f64).sqrt();
        for (exact, approx, scale) in [
            (dot(&a, &a), dot(&sa, &sa), dot(&a, &a)),
            (
                dot(&a, &b),
                dot(&sa, &sb),
                (dot(&a, &a) * dot(&b, &b)).sqrt(),
            ),
        ] {
            assert!(
                (exact - approx).abs() <= tol * scale,
                "{exact} vs {approx} (tolerance {})",
                tol * scale
            );
        }
    }
}
