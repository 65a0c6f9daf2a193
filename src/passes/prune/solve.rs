//! Dense symmetric positive definite solves for pruning, blocked so that the bulk of the work is
//! matrix products (`general_mat_mul`) instead of scalar loops.
//!
//! The pass factors one Gram matrix per consumer for the cost curves (`obs`: `H = G⁻¹`, `d`
//! up to 1200) and one per refit consumer (`reconstruct`: ridge normal equations, `d` up to
//! 2304). Column-by-column Cholesky ([`cholesky`]) spends `d³/6` multiply-adds in a
//! scalar loop; here the matrix is cut into panels of [`NB`] columns:
//!
//! ```text
//! G = [G11  .  ]   G11 = L11 L11ᵀ            (unblocked, NB x NB)
//!     [G21 G22 ]   L21 = G21 L11⁻ᵀ           (row by row, rows in parallel)
//!                  G22 -= L21 L21ᵀ           (one matrix product), then the next panel
//! ```
//!
//! and the triangular solves `L Z = B`, `Lᵀ X = Z` likewise (one small substitution per panel,
//! the rest as products). Same mathematics as the unblocked routines; sums are grouped by
//! panels, so results differ from them in the last bits. Deterministic, and the same with any
//! thread count: each element is computed by the same operations whatever the thread count
//! (rows are split over threads, never a sum).

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut1, Axis};
use rayon::prelude::*;

/// Panel width.
const NB: usize = 96;

/// Below this size the unblocked routine is used as is.
const SMALL: usize = 2 * NB;

/// Lower Cholesky factor `L` of a symmetric positive definite `G = L Lᵀ` (zeros above the
/// diagonal; only the lower triangle of `G` is read), `None` when `G` is not numerically
/// positive definite.
pub fn cholesky_blocked(mut g: Array2<f64>) -> Option<Array2<f64>> {
    let n = g.nrows();
    if n <= SMALL {
        return cholesky(g);
    }
    let mut k = 0;
    while k < n {
        let b = NB.min(n - k);
        let l11 = cholesky(g.slice(s![k..k + b, k..k + b]).to_owned())?;
        g.slice_mut(s![k..k + b, k..k + b]).assign(&l11);
        if k + b == n {
            break;
        }
        // L21 = G21 L11⁻ᵀ: each row by forward substitution against L11.
        {
            let mut below = g.slice_mut(s![k + b.., k..k + b]);
            let rows: Vec<ArrayViewMut1<f64>> = below.outer_iter_mut().collect();
            rows.into_par_iter().for_each(|mut row| {
                for j in 0..b {
                    let mut v = row[j];
                    for t in 0..j {
                        v -= row[t] * l11[[j, t]];
                    }
                    row[j] = v / l11[[j, j]];
                }
            });
        }
        // G22 -= L21 L21ᵀ on the lower block triangle (the upper one is never read).
        let panel = g.slice(s![k + b.., k..k + b]).to_owned();
        let m = panel.nrows();
        let mut j = 0;
        while j < m {
            let w = NB.min(m - j);
            general_mat_mul(
                -1.0,
                &panel.slice(s![j.., ..]),
                &panel.slice(s![j..j + w, ..]).t(),
                1.0,
                &mut g.slice_mut(s![k + b + j.., k + b + j..k + b + j + w]),
            );
            j += w;
        }
        k += b;
    }
    for i in 0..n {
        g.row_mut(i).slice_mut(s![i + 1..]).fill(0.0);
    }
    g.iter().all(|v| v.is_finite()).then_some(g)
}

/// Solve `L Z = B` in place (`L` lower triangular with a nonzero diagonal).
pub fn forward_blocked(l: &Array2<f64>, b: &mut Array2<f64>) {
    forward_cols(l, b, false);
}

/// [`forward_blocked`]; with `lower_rhs` (B lower triangular, e.g. the identity, so that Z
/// is too) the columns right of each panel are skipped: they hold zeros and stay zero.
fn forward_cols(l: &Array2<f64>, b: &mut Array2<f64>, lower_rhs: bool) {
    let n = l.nrows();
    let o = b.ncols();
    let mut k = 0;
    while k < n {
        let w = NB.min(n - k);
        let cols = if lower_rhs { (k + w).min(o) } else { o };
        // Substitution inside the panel, on whole rows of B.
        for i in k..k + w {
            let (done, mut rest) = b.view_mut().split_at(Axis(0), i);
            let mut row = rest.row_mut(0);
            let mut row = row.slice_mut(s![..cols]);
            for t in k..i {
                row.scaled_add(-l[[i, t]], &done.row(t).slice(s![..cols]));
            }
            row.mapv_inplace(|v| v / l[[i, i]]);
        }
        if k + w < n {
            let (top, mut bottom) = b.view_mut().split_at(Axis(0), k + w);
            general_mat_mul(
                -1.0,
                &l.slice(s![k + w.., k..k + w]),
                &top.slice(s![k.., ..cols]),
                1.0,
                &mut bottom.slice_mut(s![.., ..cols]),
            );
        }
        k += w;
    }
}

/// Solve `Lᵀ X = Z` in place.
pub fn backward_blocked(l: &Array2<f64>, z: &mut Array2<f64>) {
    let n = l.nrows();
    let mut end = n;
    while end > 0 {
        let k = end.saturating_sub(NB);
        // Rows k..end need the already solved rows end..n: Z_k -= L[end.., k..end]ᵀ X[end..].
        if end < n {
            let (mut top, done) = z.view_mut().split_at(Axis(0), end);
            general_mat_mul(
                -1.0,
                &l.slice(s![end.., k..end]).t(),
                &done,
                1.0,
                &mut top.slice_mut(s![k.., ..]),
            );
        }
        for i in (k..end).rev() {
            let (mut upto, below) = z.view_mut().split_at(Axis(0), i + 1);
            let mut row = upto.row_mut(i);
            for t in i + 1..end {
                row.scaled_add(-l[[t, i]], &below.row(t - i - 1));
            }
            row.mapv_inplace(|v| v / l[[i, i]]);
        }
        end = k;
    }
}

/// `G X = B` for a symmetric positive definite `G` (`None` when `G` is not, or the solution is
/// not finite).
pub fn cholesky_solve_blocked(g: Array2<f64>, mut b: Array2<f64>) -> Option<Array2<f64>> {
    let l = cholesky_blocked(g)?;
    forward_blocked(&l, &mut b);
    backward_blocked(&l, &mut b);
    b.iter().all(|v| v.is_finite()).then_some(b)
}

/// `G⁻¹ = L⁻ᵀ L⁻¹` of a symmetric positive definite `G` (`None` when not SPD), exactly
/// symmetric.
pub fn spd_inverse_blocked(g: &Array2<f64>) -> Option<Array2<f64>> {
    let n = g.nrows();
    let l = cholesky_blocked(g.clone())?;
    let mut li = Array2::<f64>::eye(n);
    forward_cols(&l, &mut li, true);
    // H = L⁻ᵀL⁻¹ is the Gram matrix of L⁻¹: its lower half, mirrored.
    let mut h = Array2::<f64>::zeros((n, n));
    add_gram_lower(li.view(), &mut h);
    mirror_lower(&mut h);
    h.iter().all(|v| v.is_finite()).then_some(h)
}

/// `G += AᵀA` on the lower block triangle of `G` only (panels of [`NB`] columns; blocks above
/// the diagonal panels are left as they are): half the multiply-adds of the full product. Each
/// element is the same sum, in the same order, as in the full product `AᵀA` (the product's
/// reduction over rows is cut the same way whatever the size of the output block), so after
/// [`mirror_lower`] `G` is bit-identical to `G += AᵀA`.
pub fn add_gram_lower(a: ArrayView2<f64>, g: &mut Array2<f64>) {
    let n = a.ncols();
    let mut j = 0;
    while j < n {
        let w = NB.min(n - j);
        general_mat_mul(
            1.0,
            &a.slice(s![.., j..]).t(),
            &a.slice(s![.., j..j + w]),
            1.0,
            &mut g.slice_mut(s![j.., j..j + w]),
        );
        j += w;
    }
}

/// Copy the strict lower triangle of a square matrix onto its upper triangle.
pub fn mirror_lower(g: &mut Array2<f64>) {
    let n = g.nrows();
    for i in 0..n {
        for j in i + 1..n {
            g[[i, j]] = g[[j, i]];
        }
    }
}

/// Lower Cholesky factor `L` of a symmetric positive definite `G = L Lᵀ` (zeros above the
/// diagonal), `None` when `G` is not numerically positive definite. Also used by the int4
/// rounding of `weight-only` (GPTQ's inverse-Hessian factor).
///
/// Column by column; the rows below the diagonal of one column are independent and are
/// computed in parallel for large matrices (each element by the same sequence of operations
/// whatever the thread count).
pub fn cholesky(mut g: Array2<f64>) -> Option<Array2<f64>> {
    use rayon::prelude::*;
    let n = g.nrows();
    for j in 0..n {
        let mut d = g[[j, j]];
        for k in 0..j {
            d -= g[[j, k]] * g[[j, k]];
        }
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        g[[j, j]] = d;
        let (head, mut tail) = g.view_mut().split_at(Axis(0), j + 1);
        let gj = head.row(j);
        let update = |mut row: ndarray::ArrayViewMut1<f64>| {
            let mut v = row[j];
            for k in 0..j {
                v -= row[k] * gj[k];
            }
            row[j] = v / d;
        };
        if (n - j) * j >= CHOLESKY_PARALLEL_WORK {
            let rows: Vec<_> = tail.outer_iter_mut().collect();
            rows.into_par_iter().for_each(update);
        } else {
            tail.outer_iter_mut().for_each(update);
        }
        for i in 0..j {
            g[[i, j]] = 0.0;
        }
    }
    Some(g)
}

/// Multiply-adds above which a Cholesky column is split over threads (below, rayon's
/// overhead dominates).
const CHOLESKY_PARALLEL_WORK: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Array2<f64> {
        let a = Array2::from_shape_fn((n + 7, n), |(i, j)| {
            (((i * 7919 + j * 104729) % 1000) as f64 / 500.0 - 1.0) + 0.01 * (i == j) as u8 as f64
        });
        let mut g = a.t().dot(&a);
        for i in 0..n {
            g[[i, i]] += 0.5;
        }
        g
    }

    /// The blocked factor and solve agree with the unblocked ones (to rounding) across several
    /// panel boundaries, and `G X = B` holds.
    #[test]
    fn blocked_matches_unblocked() {
        let n = 2 * NB + NB / 2 + 3;
        let g = spd(n);
        let l = cholesky_blocked(g.clone()).unwrap();
        let l0 = cholesky(g.clone()).unwrap();
        let scale = l0.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!((&l - &l0).iter().all(|d| d.abs() < 1e-9 * scale));
        let b = Array2::from_shape_fn((n, 5), |(i, j)| ((i * 3 + j * 11) % 13) as f64 - 6.0);
        let x = cholesky_solve_blocked(g.clone(), b.clone()).unwrap();
        let r = g.dot(&x) - &b;
        assert!(r.iter().all(|v| v.abs() < 1e-6), "residual");
        let h = spd_inverse_blocked(&g).unwrap();
        let id = g.dot(&h);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((id[[i, j]] - want).abs() < 1e-6, "G H != I at {i},{j}");
            }
        }
    }

    /// The half Gram matrix, mirrored, is the full product bit for bit, also when accumulated.
    #[test]
    fn half_gram_is_the_full_product() {
        let a = Array2::from_shape_fn((700, 2 * NB + 17), |(i, j)| {
            ((i * 31 + j * 17) % 101) as f64 / 7.0 - 6.0
        });
        let b = a.mapv(|v| v * 0.37 + 1.0);
        let mut full = Array2::<f64>::zeros((a.ncols(), a.ncols()));
        general_mat_mul(1.0, &a.t(), &a, 1.0, &mut full);
        general_mat_mul(1.0, &b.t(), &b, 1.0, &mut full);
        let mut half = Array2::<f64>::zeros((a.ncols(), a.ncols()));
        add_gram_lower(a.view(), &mut half);
        add_gram_lower(b.view(), &mut half);
        mirror_lower(&mut half);
        assert!(half == full);
    }

    #[test]
    fn not_positive_definite_is_none() {
        let mut g = spd(3 * NB);
        g[[2 * NB + 5, 2 * NB + 5]] = -1.0;
        assert!(cholesky_blocked(g.clone()).is_none());
        assert!(cholesky_solve_blocked(g, Array2::zeros((3 * NB, 1))).is_none());
    }
}
