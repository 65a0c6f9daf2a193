//! Activation-aware input-channel scaling (AWQ-class) for the int4 layers fed by a
//! LayerNormalization, folded into the LayerNorm so that no op is added.
//!
//! ```text
//! before: y = LayerNormalization(x, γ, β) ; z_c = MatMulNBits(y, Q(W_c))          for each reader c
//! after:  y' = LayerNormalization(x, γ/s, β/s) ; z_c = MatMulNBits(y', Q(diag(s) W_c))
//! ```
//! `y' = y / s` per channel and `y' · diag(s) W = y · W` exactly in float: only the rounding
//! changes. Channels with large activations get finer weight levels (their rows of `W` grow by
//! `s_k`), the others coarser ones. Candidates (Lin et al. 2024): `s_k = rms_k^α`, `rms_k =
//! sqrt(G_kk / rows)`, normalized by `sqrt(max s · min s)`, `α ∈` [`ALPHAS`]. The output error of
//! the scaled layer is the same quadratic form with `W_s = diag(s) W` and `G_s = diag(1/s) G
//! diag(1/s)` (`ΔW_s/s` is the weight error in the original space), so every candidate is
//! scored exactly, on the calibration rows, by round-to-nearest summed over the LayerNorm's
//! readers (AWQ's own proxy); `α = 0` (no scaling) is among them, so the search never loses on these rows. The
//! winning `α` then goes through the full per-layer choice of [`super::rounding`].
//!
//! Conditions: a standard-domain LayerNormalization over the last axis (`axis` -1 or rank-1 not
//! checked beyond: `γ` is 1-D with `K` values), `γ` (and `β` if given) float initializers read by
//! this node only, its mean / inv-std outputs unused, and every reader of `y` an int4 site (the
//! LM head after the final LayerNorm, the qkv and MLP-in projections of a pre-LN block).

use super::rounding::{self, Method};
use crate::ir::op::node_label;
use crate::ir::{Graph, InSlot};
use crate::onnx::tensor;
use ndarray::{Array1, Array2, ArrayD, IxDyn};

/// Exponents tried (0 = no scaling).
pub const ALPHAS: [f64; 9] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8];

/// A LayerNormalization whose output only int4 sites read.
#[derive(Debug, Clone)]
pub struct Group {
    pub node: String,
    pub gamma: String,
    pub beta: Option<String>,
    /// The LayerNorm output (the sites' input).
    pub input: String,
    /// Indices into the site list.
    pub sites: Vec<usize>,
}

/// The groups among `sites` (`(site input, K)` per site).
pub fn groups(g: &Graph, sites: &[(String, usize)]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for (input, k) in sites {
        if out.iter().any(|gr| gr.input == *input) {
            continue;
        }
        let Some(ix) = g.producer_node(input) else {
            continue;
        };
        let n = g.node(ix);
        if n.op_type() != "LayerNormalization" || !crate::ir::op::is_standard_domain(n.domain()) {
            continue;
        }
        if n.output.first() != Some(input)
            || n.output
                .iter()
                .skip(1)
                .any(|o| !o.is_empty() && g.use_count(o) > 0)
            || g.is_graph_output(input)
        {
            continue;
        }
        let own_const = |name: &str| {
            g.constant(name)
                .and_then(|t| tensor::to_f32(t).ok())
                .is_some_and(|a| a.ndim() == 1 && a.len() == *k)
                && g.consumers(name).len() == 1
                && !g.is_graph_output(name)
        };
        let Some(gamma) = n.input.get(1).filter(|s| own_const(s)) else {
            continue;
        };
        let beta = match n.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) if own_const(b) => Some(b.clone()),
            Some(_) => continue,
            None => None,
        };
        let readers: Vec<usize> = sites
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| s == input)
            .map(|(j, _)| j)
            .collect();
        let all_sites = g.consumers(input).len() == readers.len()
            && g.consumers(input)
                .iter()
                .all(|(_, slot)| *slot == InSlot::Arg(0));
        if !all_sites {
            continue;
        }
        out.push(Group {
            node: node_label(n).to_string(),
            gamma: gamma.clone(),
            beta,
            input: input.clone(),
            sites: readers,
        });
    }
    out
}

/// `s_k = rms_k^α / sqrt(max s · min s)` (a channel never active counts as `rms^α = 1`).
pub fn scales(gram: &Array2<f64>, rows: u64, alpha: f64) -> Array1<f64> {
    let k = gram.nrows();
    let rms: Vec<f64> = (0..k)
        .map(|i| (gram[[i, i]] / rows.max(1) as f64).sqrt())
        .collect();
    let mut s: Vec<f64> = rms
        .iter()
        .map(|&r| if r > 0.0 { r.powf(alpha) } else { 1.0 })
        .collect();
    let (lo, hi) = s.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let norm = (lo * hi).sqrt();
    if norm.is_finite() && norm > 0.0 {
        for v in &mut s {
            *v /= norm;
        }
    }
    Array1::from(s)
}

/// `diag(s) W` for `W[N, K]` (column k scaled by `s_k`).
pub fn scale_rows(w: &Array2<f64>, s: &Array1<f64>) -> Array2<f64> {
    w * &s.view().insert_axis(ndarray::Axis(0))
}

/// `diag(1/s) G diag(1/s)`.
pub fn scale_gram(g: &Array2<f64>, s: &Array1<f64>) -> Array2<f64> {
    let inv = s.mapv(|v| 1.0 / v);
    let col = inv.view().insert_axis(ndarray::Axis(1));
    let row = inv.view().insert_axis(ndarray::Axis(0));
    g * &col * row
}

/// The `α` with the lowest summed round-to-nearest output error over the group's weights (first
/// on ties): the cheap proxy AWQ itself searches with (exact error, O(N K²) per candidate, where
/// the clip search would cost 40x more).
pub fn search(weights: &[&Array2<f64>], gram: &Array2<f64>, rows: u64, block: usize) -> f64 {
    let mut best = (f64::INFINITY, 0.0);
    for alpha in ALPHAS {
        let s = scales(gram, rows, alpha);
        let gs = scale_gram(gram, &s);
        let err: f64 = weights
            .iter()
            .map(|w| {
                let ws = scale_rows(w, &s);
                rounding::candidates(&ws, Some(&gs), block, &[Method::Nearest])
                    .first()
                    .map_or(f64::INFINITY, |c| c.error)
            })
            .sum();
        if err < best.0 {
            best = (err, alpha);
        }
    }
    best.1
}

/// Divide the LayerNorm's `γ` (and `β`) by `s`, in place.
pub fn fold(g: &mut Graph, group: &Group, s: &Array1<f64>) -> anyhow::Result<()> {
    for name in std::iter::once(&group.gamma).chain(group.beta.as_ref()) {
        let t = g
            .constant(name)
            .ok_or_else(|| anyhow::anyhow!("'{name}' is no longer a constant"))?;
        let a = tensor::to_f32(t)?;
        let v: Vec<f32> = a
            .iter()
            .zip(s.iter())
            .map(|(&x, &sk)| (f64::from(x) / sk) as f32)
            .collect();
        let scaled = ArrayD::from_shape_vec(IxDyn(a.shape()), v)?;
        g.initializers
            .insert(name.clone(), tensor::from_f32(name, &scaled));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_is_exact_in_float_and_scores_the_same_error() {
        let w = Array2::from_shape_fn((3, 4), |(r, c)| (r as f64 + 1.0) * (c as f64 - 1.5));
        let x = Array2::from_shape_fn((5, 4), |(r, c)| ((r * 7 + c * 3) % 5) as f64 - 2.0);
        let g = x.t().dot(&x);
        let s = Array1::from(vec![2.0, 0.5, 1.0, 4.0]);
        let ws = scale_rows(&w, &s);
        let xs = &x / &s.view().insert_axis(ndarray::Axis(0));
        let direct = x.dot(&w.t());
        let scaled = xs.dot(&ws.t());
        assert!((direct - &scaled).iter().all(|v| v.abs() < 1e-12));
        // The quadratic form in the scaled space is the one of the scaled inputs.
        let gs = scale_gram(&g, &s);
        let want = xs.t().dot(&xs);
        assert!((gs - want).iter().all(|v| v.abs() < 1e-9));
    }

    #[test]
    fn scales_are_normalized_and_alpha_zero_is_identity() {
        let g = Array2::from_diag(&Array1::from(vec![4.0, 16.0, 0.0, 1.0]));
        let s0 = scales(&g, 1, 0.0);
        assert!(s0.iter().all(|&v| v == 1.0));
        let s = scales(&g, 1, 1.0);
        // rms 2, 4, (never active: 1), 1 -> normalized by sqrt(4 * 1) = 2.
        assert_eq!(s.to_vec(), vec![1.0, 2.0, 0.5, 0.5]);
    }
}
