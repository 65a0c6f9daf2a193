//! The multiple-choice knapsack behind `mixed-precision`: one option `(cost, value)` per class
//! (a layer's precisions: bytes or payload bits, and `Ω`), minimizing the value sum with the
//! cost sum within a budget. Exact by dynamic programming over the cost axis:
//!
//! ```text
//! base   = Σ_l min_k cost[l][k]                 every class pays its cheapest option
//! unit   = gcd over l, k of (cost[l][k] - min_k cost[l][k])
//! best_l[b] = min_k (best_{l-1}[b - c[l][k]] + value[l][k]),  c = shifted cost / unit
//! ```
//! When the size axis `(budget - base) / unit` exceeds `max_buckets`, shifted costs are rounded
//! *up* to a coarser unit: the answer then always fits the true budget and is optimal up to that
//! rounding ([`Solution::exact`] is false). Options with a NaN value are never taken.
//! [`pareto`] runs the same sweep without a budget and reads the whole size-vs-value frontier.

/// A multiple-choice knapsack solution.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Chosen option per class.
    pub choice: Vec<usize>,
    pub cost: u64,
    pub value: f64,
    /// False when costs were rounded up to fit `max_buckets` (still feasible).
    pub exact: bool,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

struct Scaled {
    base: u64,
    unit: u64,
    costs: Vec<Vec<u64>>,
    exact: bool,
}

/// Costs shifted by each class's cheapest option and expressed in DP units for a range `span`.
fn scale(classes: &[Vec<(u64, f64)>], span: u64, max_buckets: usize) -> Scaled {
    let base: u64 = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).min().unwrap_or(0))
        .sum();
    let mins: Vec<u64> = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).min().unwrap_or(0))
        .collect();
    let g = classes
        .iter()
        .zip(&mins)
        .flat_map(|(c, &m)| c.iter().map(move |o| o.0 - m))
        .fold(0, gcd)
        .max(1);
    let limit = (max_buckets.max(1) as u64).saturating_sub(1).max(1);
    let (unit, exact) = if span / g <= limit {
        (g, true)
    } else {
        (span.div_ceil(limit).max(g), false)
    };
    let costs = classes
        .iter()
        .zip(&mins)
        .map(|(c, &m)| c.iter().map(|o| (o.0 - m).div_ceil(unit)).collect())
        .collect();
    Scaled {
        base,
        unit,
        costs,
        exact,
    }
}

/// One DP sweep: `best[b]` = min total value with shifted cost ≤ `b` units; with `keep`, the
/// choice table for reconstruction. Options with NaN value are never taken.
fn dp(
    classes: &[Vec<(u64, f64)>],
    costs: &[Vec<u64>],
    cap: usize,
    keep: bool,
) -> (Vec<f64>, Vec<Vec<u8>>) {
    let mut best = vec![0f64; cap + 1];
    let mut table = Vec::new();
    for (class, cost) in classes.iter().zip(costs) {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = if keep { vec![u8::MAX; cap + 1] } else { vec![] };
        for b in 0..=cap {
            for (k, (&c, o)) in cost.iter().zip(class).enumerate() {
                let c = c as usize;
                if c > b {
                    continue;
                }
                let v = best[b - c] + o.1;
                if v < next[b] {
                    next[b] = v;
                    if keep {
                        pick[b] = k as u8;
                    }
                }
            }
        }
        best = next;
        if keep {
            table.push(pick);
        }
    }
    (best, table)
}

/// Exact multiple-choice knapsack: one option `(cost, value)` per class minimizing the value sum
/// with cost sum ≤ `budget` (see the module docs for the discretization). `None`: infeasible.
pub fn solve(classes: &[Vec<(u64, f64)>], budget: u64, max_buckets: usize) -> Option<Solution> {
    if classes
        .iter()
        .any(|c| c.is_empty() || c.len() >= u8::MAX as usize)
    {
        return None;
    }
    let s0 = scale(classes, 0, 1);
    if budget < s0.base {
        return None;
    }
    let max_total: u64 = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).max().unwrap_or(0))
        .sum();
    let span = budget.min(max_total) - s0.base;
    let cells = (1usize << 26) / classes.len().max(1);
    let s = scale(classes, span, max_buckets.min(cells));
    let cap = (span / s.unit) as usize;
    let (best, table) = dp(classes, &s.costs, cap, true);
    if !best[cap].is_finite() {
        return None;
    }
    let mut b = cap;
    let mut choice = vec![0; classes.len()];
    for i in (0..classes.len()).rev() {
        let k = table[i][b] as usize;
        choice[i] = k;
        b -= s.costs[i][k] as usize;
    }
    let cost: u64 = choice.iter().zip(classes).map(|(&k, c)| c[k].0).sum();
    let value: f64 = choice.iter().zip(classes).map(|(&k, c)| c[k].1).sum();
    debug_assert!(cost <= budget);
    Some(Solution {
        choice,
        cost,
        value,
        exact: s.exact,
    })
}

/// The size-vs-value frontier `(cost, min value)` over all budgets, thinned to `points`.
pub fn pareto(classes: &[Vec<(u64, f64)>], points: usize, max_buckets: usize) -> Vec<(u64, f64)> {
    let s0 = scale(classes, 0, 1);
    let max_total: u64 = classes
        .iter()
        .map(|c| c.iter().map(|o| o.0).max().unwrap_or(0))
        .sum();
    let span = max_total - s0.base;
    let s = scale(classes, span, max_buckets);
    let cap = (span / s.unit) as usize;
    let (best, _) = dp(classes, &s.costs, cap, false);
    let mut frontier = Vec::new();
    for b in 0..=cap {
        if best[b].is_finite() && (b == 0 || best[b] < best[b - 1]) {
            frontier.push((s.base + b as u64 * s.unit, best[b]));
        }
    }
    if frontier.len() > points.max(2) {
        let m = points.max(2);
        let last = frontier.len() - 1;
        frontier = (0..m).map(|i| frontier[i * last / (m - 1)]).collect();
    }
    frontier
}
