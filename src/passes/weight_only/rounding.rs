//! int4 block rounding of one linear layer, chosen by its measured output error.
//!
//! The weight is seen as `W[N, K]` (one row per output, `K` inputs), cut along `K` into blocks of
//! `B` values, one scale per (row, block); codes `q ∈ [-8, 7]` and `Ŵ = q · s` (symmetric: the
//! zero point is MatMulNBits' default 8, what tract's Q4_0 kernels bake in). Scales are rounded to
//! f16 before the codes are chosen, since tract stores them as f16: both runtimes then compute with
//! the same weight.
//!
//! The objective is the layer's output error on the calibration rows, `E(Ŵ) = Σ_n (Ŵ_n − W_n) G
//! (Ŵ_n − W_n)ᵀ` with `G = XᵀX` ([`crate::calibrate::gram`]); without data `G = I` (weight MSE).
//! Three roundings, the one with the lowest `E` wins (ties go to the simpler, in this order):
//! - `nearest`: ONNX Runtime's round-to-nearest, `s = m / −8` with `m` the block's value of
//!   largest magnitude (so `m` lands exactly on −8);
//! - `clip`: per block, the scale among `r · m / −8` and `r · m / 7`, `r ∈ {1, 0.975, …, 0.5}`
//!   ([`RATIOS`]), minimizing the block's share of `E`, `d G_bb dᵀ` with `d` the block's error and
//!   `G_bb` the block's diagonal block of `G` (the cross-block terms are what GPTQ handles);
//! - `gptq`: GPTQ (Frantar et al. 2023) without act-order (a column permutation would need
//!   `g_idx`, which tract refuses): columns quantized left to right, each one's error spread over
//!   the columns not yet quantized through the Cholesky factor `U` of `(G + λI)⁻¹`
//!   (`λ = 1%` of the mean diagonal), `W[:, j] −= (w_k − ŵ_k) / U_kk · U_kj`; each block's scales are
//!   chosen by the `clip` search on the updated weights when the block is entered.
//!
//! Deterministic: plain loops in a fixed order, no threads here (layers run in parallel, each
//! on one thread).

use crate::passes::prune::solve::cholesky;
use ndarray::{s, Array2, ArrayView1, ArrayView2};
use serde::Serialize;

/// Smallest and largest int4 code.
pub const QMIN: f64 = -8.0;
pub const QMAX: f64 = 7.0;

/// Clipping ratios tried by the `clip` search (1 = the block's full range).
pub const RATIOS: [f64; 21] = [
    1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.725, 0.7, 0.675, 0.65,
    0.625, 0.6, 0.575, 0.55, 0.525, 0.5,
];

/// GPTQ's damping, as a fraction of the mean diagonal of `G`.
pub const DAMP: f64 = 0.01;

/// A rounding method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Nearest,
    Clip,
    Gptq,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Nearest, Method::Clip, Method::Gptq];

    pub fn label(self) -> &'static str {
        match self {
            Method::Nearest => "nearest",
            Method::Clip => "clip",
            Method::Gptq => "gptq",
        }
    }
}

/// A weight rounded to int4 in blocks along `K`.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    pub n: usize,
    pub k: usize,
    pub block: usize,
    /// `[N, K]` row-major, each in `[-8, 7]`.
    pub codes: Vec<i8>,
    /// `[N, ⌈K/B⌉]` row-major, f16-representable.
    pub scales: Vec<f32>,
}

impl Blocked {
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// `Ŵ[N, K]`.
    pub fn dequantized(&self) -> Array2<f64> {
        let nb = self.blocks();
        Array2::from_shape_fn((self.n, self.k), |(r, c)| {
            f64::from(self.codes[r * self.k + c]) * f64::from(self.scales[r * nb + c / self.block])
        })
    }
}

/// `s` as the runtimes will read it: rounded to f16 (tract's Q4_0 keeps f16 scales), back in f64.
pub fn f16_scale(s: f64) -> f64 {
    f64::from(half::f16::from_f64(s).to_f32())
}

/// The code of `v` on scale `s` (round half to even, clamped to `[-8, 7]`).
pub fn code(v: f64, s: f64) -> f64 {
    if s == 0.0 {
        return 0.0;
    }
    (v / s).round_ties_even().clamp(QMIN, QMAX)
}

/// The block's value of largest magnitude (the first, on ties).
fn signed_max(v: ArrayView1<f64>) -> f64 {
    v.iter()
        .fold(0.0f64, |m, &x| if x.abs() > m.abs() { x } else { m })
}

/// `d G dᵀ` (`g = None`: `‖d‖²`).
fn quad(d: &[f64], g: Option<ArrayView2<f64>>) -> f64 {
    match g {
        None => d.iter().map(|x| x * x).sum(),
        Some(g) => {
            let mut e = 0.0;
            for (i, di) in d.iter().enumerate() {
                if *di == 0.0 {
                    continue;
                }
                let row = g.row(i);
                let mut t = 0.0;
                for (j, dj) in d.iter().enumerate() {
                    t += row[j] * dj;
                }
                e += di * t;
            }
            e
        }
    }
}

/// The block error of scale `s`.
fn block_error(v: ArrayView1<f64>, s: f64, g: Option<ArrayView2<f64>>, d: &mut Vec<f64>) -> f64 {
    d.clear();
    d.extend(v.iter().map(|&x| code(x, s) * s - x));
    quad(d, g)
}

/// ONNX Runtime's round-to-nearest scale, f16-rounded.
pub fn nearest_scale(v: ArrayView1<f64>) -> f64 {
    f16_scale(signed_max(v) / QMIN)
}

/// The `clip` search: the candidate scale with the lowest block error (first on ties).
pub fn clip_scale(v: ArrayView1<f64>, g: Option<ArrayView2<f64>>) -> f64 {
    let m = signed_max(v);
    if m == 0.0 {
        return 0.0;
    }
    let mut d = Vec::with_capacity(v.len());
    let mut best = (f64::INFINITY, 0.0);
    for r in RATIOS {
        for base in [m / QMIN, m / QMAX] {
            let s = f16_scale(r * base);
            if s == 0.0 || !s.is_finite() {
                continue;
            }
            let e = block_error(v, s, g, &mut d);
            if e < best.0 {
                best = (e, s);
            }
        }
    }
    best.1
}

fn block_range(j: usize, block: usize, k: usize) -> std::ops::Range<usize> {
    j * block..((j + 1) * block).min(k)
}

/// Round with per-block scales from `scale(row block values, G_bb)`, no error feedback.
fn blockwise(
    w: &Array2<f64>,
    g: Option<&Array2<f64>>,
    block: usize,
    scale: impl Fn(ArrayView1<f64>, Option<ArrayView2<f64>>) -> f64,
) -> Blocked {
    let (n, k) = w.dim();
    let nb = k.div_ceil(block);
    let mut codes = vec![0i8; n * k];
    let mut scales = vec![0f32; n * nb];
    for j in 0..nb {
        let cols = block_range(j, block, k);
        let gbb = g.map(|g| g.slice(s![cols.clone(), cols.clone()]));
        for r in 0..n {
            let v = w.slice(s![r, cols.clone()]);
            let sc = scale(v, gbb);
            scales[r * nb + j] = sc as f32;
            for c in cols.clone() {
                codes[r * k + c] = code(w[[r, c]], sc) as i8;
            }
        }
    }
    Blocked {
        n,
        k,
        block,
        codes,
        scales,
    }
}

/// GPTQ with per-block `clip` scales; `None` when `G + λI` is not positive definite.
fn gptq(w: &Array2<f64>, g: &Array2<f64>, block: usize) -> Option<Blocked> {
    let (n, k) = w.dim();
    let nb = k.div_ceil(block);
    let mut h = g.clone();
    let mean_diag = (0..k).map(|i| h[[i, i]]).sum::<f64>() / k as f64;
    for i in 0..k {
        // A feature that is always 0 on the data: any weight is exact there.
        if h[[i, i]] == 0.0 {
            h[[i, i]] = 1.0;
        }
        h[[i, i]] += DAMP * mean_diag.max(f64::MIN_POSITIVE);
    }
    // (G + λI)⁻¹ = L⁻ᵀ L⁻¹, then its upper factor U (Hinv = Uᵀ U) as the lower factor's transpose.
    let l = cholesky(h)?;
    let linv = lower_inverse(&l);
    let hinv = linv.t().dot(&linv);
    let u = cholesky(hinv)?.reversed_axes();
    let mut work = w.clone();
    let mut codes = vec![0i8; n * k];
    let mut scales = vec![0f32; n * nb];
    for j in 0..nb {
        let cols = block_range(j, block, k);
        let gbb = g.slice(s![cols.clone(), cols.clone()]);
        for r in 0..n {
            scales[r * nb + j] = clip_scale(work.slice(s![r, cols.clone()]), Some(gbb)) as f32;
        }
        for c in cols {
            let ucc = u[[c, c]];
            for r in 0..n {
                let sc = f64::from(scales[r * nb + j]);
                let q = code(work[[r, c]], sc);
                codes[r * k + c] = q as i8;
                let err = (work[[r, c]] - q * sc) / ucc;
                if err != 0.0 {
                    let mut row = work.row_mut(r);
                    for cc in c + 1..k {
                        row[cc] -= err * u[[c, cc]];
                    }
                }
            }
        }
    }
    Some(Blocked {
        n,
        k,
        block,
        codes,
        scales,
    })
}

/// Inverse of a lower-triangular matrix with a positive diagonal (forward substitution).
fn lower_inverse(l: &Array2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut inv = Array2::<f64>::zeros((n, n));
    for c in 0..n {
        inv[[c, c]] = 1.0 / l[[c, c]];
        for r in c + 1..n {
            let mut v = 0.0;
            for t in c..r {
                v += l[[r, t]] * inv[[t, c]];
            }
            inv[[r, c]] = -v / l[[r, r]];
        }
    }
    inv
}

/// `E(Ŵ) = Σ_n (Ŵ_n − W_n) G (Ŵ_n − W_n)ᵀ` (`g = None`: `‖Ŵ − W‖²`).
pub fn output_error(w: &Array2<f64>, q: &Blocked, g: Option<&Array2<f64>>) -> f64 {
    let d = q.dequantized() - w;
    match g {
        None => d.iter().map(|x| x * x).sum(),
        Some(g) => (d.dot(g) * &d).sum(),
    }
}

/// One candidate rounding and its output error.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub method: Method,
    pub blocked: Blocked,
    pub error: f64,
}

/// Every method in `methods` (GPTQ only with data), each with its output error, in order.
pub fn candidates(
    w: &Array2<f64>,
    g: Option<&Array2<f64>>,
    block: usize,
    methods: &[Method],
) -> Vec<Candidate> {
    methods
        .iter()
        .filter_map(|&m| {
            let blocked = match (m, g) {
                (Method::Nearest, _) => blockwise(w, g, block, |v, _| nearest_scale(v)),
                (Method::Clip, _) => blockwise(w, g, block, clip_scale),
                (Method::Gptq, Some(g)) => gptq(w, g, block)?,
                (Method::Gptq, None) => return None,
            };
            let error = output_error(w, &blocked, g);
            Some(Candidate {
                method: m,
                blocked,
                error,
            })
        })
        .collect()
}

/// The candidate with the lowest output error (the earliest on ties); `None` when `methods`
/// gave none (GPTQ alone without data).
pub fn best(cands: Vec<Candidate>) -> Option<Candidate> {
    cands
        .into_iter()
        .reduce(|a, b| if b.error < a.error { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(rng: &mut ChaCha8Rng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Correlated inputs with a few large channels, as in transformer activations.
    fn data(rows: usize, mix: &Array2<f64>, rng: &mut ChaCha8Rng) -> Array2<f64> {
        let k = mix.ncols();
        let base = Array2::from_shape_fn((rows, mix.nrows()), |_| normal(rng));
        let mut x = base.dot(mix) + Array2::from_shape_fn((rows, k), |_| 0.3 * normal(rng));
        for r in 0..rows {
            x[[r, 3]] *= 8.0;
            x[[r, 17]] *= 5.0;
        }
        x
    }

    #[test]
    fn nearest_puts_the_largest_magnitude_on_minus_eight_and_matches_brute_force() {
        let w = Array2::from_shape_vec((1, 4), vec![0.5, -2.0, 1.0, 0.25]).unwrap();
        let b = blockwise(&w, None, 4, |v, _| nearest_scale(v));
        assert_eq!(b.scales, [0.25]);
        assert_eq!(b.codes, [2, -8, 4, 1]);
        // Positive maximum: s = -m/8 < 0, the maximum still maps to -8.
        let w = Array2::from_shape_vec((1, 2), vec![4.0, -1.0]).unwrap();
        let b = blockwise(&w, None, 2, |v, _| nearest_scale(v));
        assert_eq!(b.scales, [-0.5]);
        assert_eq!(b.codes, [-8, 2]);
    }

    #[test]
    fn output_error_equals_the_error_of_the_outputs() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mix = Array2::from_shape_fn((4, 40), |_| normal(&mut rng));
        let x = data(64, &mix, &mut rng);
        let w = Array2::from_shape_fn((6, 40), |_| normal(&mut rng));
        let g = x.t().dot(&x);
        let q = blockwise(&w, Some(&g), 16, |v, _| nearest_scale(v));
        let direct: f64 = (x.dot(&q.dequantized().t()) - x.dot(&w.t()))
            .iter()
            .map(|v| v * v)
            .sum();
        let e = output_error(&w, &q, Some(&g));
        assert!((e - direct).abs() <= 1e-9 * direct, "{e} vs {direct}");
    }

    #[test]
    fn clip_and_gptq_beat_nearest_on_held_out_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let k = 64;
        let mix = Array2::from_shape_fn((4, k), |_| normal(&mut rng));
        let x = data(512, &mix, &mut rng);
        let held = data(512, &mix, &mut rng);
        let w = Array2::from_shape_fn((32, k), |_| normal(&mut rng) * 0.1);
        let g = x.t().dot(&x);
        let gh = held.t().dot(&held);
        let c = candidates(&w, Some(&g), 32, &Method::ALL);
        assert_eq!(c.len(), 3);
        let held_err: Vec<f64> = c
            .iter()
            .map(|c| output_error(&w, &c.blocked, Some(&gh)))
            .collect();
        assert!(
            c[1].error < c[0].error,
            "clip {} vs nearest {}",
            c[1].error,
            c[0].error
        );
        assert!(
            c[2].error < c[1].error,
            "gptq {} vs clip {}",
            c[2].error,
            c[1].error
        );
        assert!(held_err[2] < 0.8 * held_err[0], "held-out {held_err:?}");
        for cand in &c {
            assert!(cand.blocked.codes.iter().all(|&q| (-8..=7).contains(&q)));
            assert!(cand
                .blocked
                .scales
                .iter()
                .all(|&s| f64::from(s) == f16_scale(f64::from(s))));
        }
        assert_eq!(best(c).unwrap().method, Method::Gptq);
    }

    #[test]
    fn partial_last_block_and_zero_rows() {
        let w = Array2::from_shape_fn((3, 10), |(r, c)| if r == 1 { 0.0 } else { c as f64 - 4.5 });
        let c = candidates(&w, None, 4, &[Method::Nearest, Method::Clip]);
        for cand in &c {
            assert_eq!(cand.blocked.scales.len(), 3 * 3);
            assert!(cand.blocked.codes[10..20].iter().all(|&q| q == 0));
        }
        assert!(c[1].error <= c[0].error);
    }

    #[test]
    fn lower_inverse_is_the_inverse() {
        let l = Array2::from_shape_vec((3, 3), vec![2.0, 0.0, 0.0, 1.0, 3.0, 0.0, -1.0, 0.5, 1.5])
            .unwrap();
        let p = l.dot(&lower_inverse(&l));
        for ((r, c), v) in p.indexed_iter() {
            let want = if r == c { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 1e-12);
        }
    }
}
