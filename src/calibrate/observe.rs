//! Range observers: one streaming pass over the calibration data, bounded memory.
//!
//! Every tensor that needs a range gets an [`Observer`] that keeps exact min/max, an optional
//! moving-average min/max, and (for the histogram methods) a [`Histogram`]; tensors are never
//! kept. [`observe_model`] requests all of them as extra outputs of the same tract run, batch
//! by batch.
//!
//! Histogram range: adaptive re-binning, so the data is read once. The histogram covers
//! `[-r, r]` with `2 * FINE_BINS` bins; `r` starts at the first batch's max |x| and doubles
//! whenever a batch exceeds it, merging pairs of bins (exact: bin edges stay aligned and 0 stays
//! an edge). The data therefore covers at least half the bins (>= 8192 of width <= max|x|/4096
//! per side), fine enough that the methods' own binnings (2048 bins for entropy) are resampled
//! from it with sub-bin error.
//!
//! Methods (all return a range; `params` then widens it to include 0):
//! - `minmax`: exact running min / max (or moving average of per-batch min/max, ORT-style, with
//!   `moving_average = Some(c)`: `m <- m + c (batch_m - m)`).
//! - `percentile p` (two-sided): `[q(1 - p/100), q(p/100)]` of the signed distribution,
//!   interpolated linearly inside a bin; clamped to the exact min/max.
//! - `entropy` (TensorRT / MXNet KL calibration): histogram of |x| over [0, max|x|] with
//!   16 L bins for L levels (TensorRT: L = 128, 2048 bins; here L = 256 for a non-negative
//!   tensor stored as uint8, which has 255 steps on [0, T]); for every threshold bin i in
//!   L..=16L the reference distribution is the first i bins with the tail folded into bin i-1,
//!   the candidate is those i bins merged into L levels and expanded back over the non-empty
//!   bins; the threshold minimizing KL(ref || candidate) wins. Range:
//!   `[max(min, -T), min(max, T)]`. Two guards against KL's known failure modes: exact zeros
//!   (half of a ReLU output) are left out of the histogram, since 0 is exact on every grid and
//!   their spike otherwise pulls T deep into the tail (digits_cnn: 8x clipping, 83% accuracy);
//!   and T never clips more than 0.1% of the values (discrete inputs such as 17-level pixels
//!   make KL pick a single spike).
//! - `mse`: candidate ranges `t * [min, max]` for t in (0, 1] (200 steps); each is scored by the
//!   expected squared error of fake-quantizing the histogram's bin centres with the activation
//!   scheme's actual grid (clipping error included); the best wins.

use crate::calibrate::data::CalibrationSet;
use crate::calibrate::params::{activation_params, ActScheme};
use crate::onnx::proto::ModelProto;
use crate::runtime::Runner;
use anyhow::{Context, Result};
use indexmap::IndexMap;
use ndarray::ArrayD;
use serde::Serialize;

/// Bins per sign in the fine histogram.
pub const FINE_BINS: usize = 8192;

/// How a range is chosen from the observed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub enum Method {
    #[default]
    MinMax,
    /// Two-sided percentile, e.g. 99.999.
    Percentile(f64),
    Entropy,
    Mse,
}

impl Method {
    pub fn needs_histogram(&self) -> bool {
        !matches!(self, Method::MinMax)
    }

    pub fn label(&self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile(p) => format!("percentile {p}"),
            Method::Entropy => "entropy".into(),
            Method::Mse => "mse".into(),
        }
    }

    /// Parse `minmax`, `percentile`, `percentile:99.99`, `entropy`, `mse`.
    pub fn parse(s: &str) -> Result<Method> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "minmax" | "min-max" => Method::MinMax,
            "entropy" | "kl" => Method::Entropy,
            "mse" => Method::Mse,
            "percentile" => Method::Percentile(99.999),
            _ => {
                if let Some(p) = s
                    .strip_prefix("percentile:")
                    .or(s.strip_prefix("percentile="))
                {
                    let p: f64 = p
                        .parse()
                        .with_context(|| format!("calibration method '{s}': bad percentile"))?;
                    anyhow::ensure!(
                        p > 50.0 && p <= 100.0,
                        "calibration percentile {p} must be in (50, 100]"
                    );
                    Method::Percentile(p)
                } else {
                    anyhow::bail!(
                        "unknown calibration method '{s}'; use minmax, percentile[:P], entropy or mse"
                    )
                }
            }
        })
    }
}

/// Options for turning observations into ranges.
#[derive(Debug, Clone, Default)]
pub struct ObserveOptions {
    pub method: Method,
    /// ORT-style moving-average min/max with this averaging constant (minmax only).
    pub moving_average: Option<f32>,
    /// The activation scheme (used by `mse` to score candidates on the real grid).
    pub scheme: ActScheme,
}

/// Signed histogram over `[-r, r]` with adaptive doubling.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// `counts[i]` covers `[-r + i w, -r + (i+1) w)`, `w = r / FINE_BINS`.
    counts: Vec<u64>,
    r: f32,
    /// Values seen while `r` was still 0 (all exactly 0).
    pending_zeros: u64,
    /// Values exactly 0 (also counted in their bin): a ReLU output is half zeros.
    exact_zeros: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; 2 * FINE_BINS],
            r: 0.0,
            pending_zeros: 0,
            exact_zeros: 0,
        }
    }
}

impl Histogram {
    pub fn add(&mut self, data: &[f32]) {
        let amax = data.iter().fold(0f32, |m, &v| m.max(v.abs()));
        if amax == 0.0 && self.r == 0.0 {
            self.pending_zeros += data.len() as u64;
            self.exact_zeros += data.len() as u64;
            return;
        }
        if self.r == 0.0 {
            self.r = amax;
            self.counts[FINE_BINS] += std::mem::take(&mut self.pending_zeros);
        }
        while amax > self.r {
            self.double();
        }
        let w = self.r / FINE_BINS as f32;
        let top = 2 * FINE_BINS - 1;
        for &v in data {
            self.exact_zeros += (v == 0.0) as u64;
            let i = ((v + self.r) / w).floor();
            let i = if i.is_nan() {
                continue;
            } else {
                (i.max(0.0) as usize).min(top)
            };
            self.counts[i] += 1;
        }
    }

    /// Double the range, merging pairs of bins on each side of 0.
    fn double(&mut self) {
        let n = FINE_BINS;
        // Distance-from-zero order: pos[k] = counts[n + k], neg[k] = counts[n - 1 - k].
        let mut next = vec![0u64; 2 * n];
        for k in 0..n {
            next[n + k / 2] += self.counts[n + k];
            next[n - 1 - k / 2] += self.counts[n - 1 - k];
        }
        self.counts = next;
        self.r *= 2.0;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.pending_zeros
    }

    pub fn bin_width(&self) -> f32 {
        self.r / FINE_BINS as f32
    }

    /// (centre, count) of non-empty bins.
    fn centres(&self) -> Vec<(f32, f64)> {
        let w = self.bin_width();
        let mut v: Vec<(f32, f64)> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (-self.r + (i as f32 + 0.5) * w, c as f64))
            .collect();
        if self.pending_zeros > 0 {
            v.push((0.0, self.pending_zeros as f64));
        }
        v
    }

    /// The `q`-quantile (0..=1), linear inside a bin.
    pub fn quantile(&self, q: f64) -> f32 {
        let total = self.total() as f64;
        if total == 0.0 || self.r == 0.0 {
            return 0.0;
        }
        let target = q.clamp(0.0, 1.0) * total;
        let w = self.bin_width() as f64;
        let mut acc = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            let c = c as f64;
            if c > 0.0 && acc + c >= target {
                let frac = ((target - acc) / c).clamp(0.0, 1.0);
                return (-self.r as f64 + (i as f64 + frac) * w) as f32;
            }
            acc += c;
        }
        self.r
    }

    /// Histogram of |x| with `bins` bins over `[0, amax]`, resampled from the fine bins
    /// (counts spread uniformly inside each fine bin).
    pub fn abs_histogram(&self, bins: usize, amax: f32) -> Vec<f64> {
        let mut out = vec![0.0f64; bins];
        if amax <= 0.0 {
            return out;
        }
        let n = FINE_BINS;
        let w = self.bin_width() as f64;
        let step = amax as f64 / bins as f64;
        for k in 0..n {
            let c = (self.counts[n + k] + self.counts[n - 1 - k]) as f64;
            if c == 0.0 {
                continue;
            }
            let (a, b) = (k as f64 * w, (k as f64 + 1.0) * w);
            // Overlap of [a, b) with the output bins, clipping anything past amax into the last.
            let mut lo = a;
            while lo < b {
                let j = ((lo / step).floor() as usize).min(bins - 1);
                let edge = if j == bins - 1 {
                    b
                } else {
                    ((j + 1) as f64 * step).min(b)
                };
                out[j] += c * (edge - lo) / w;
                if edge <= lo {
                    break;
                }
                lo = edge;
            }
        }
        out[0] += self.pending_zeros as f64;
        out
    }
}

/// Everything kept about one tensor.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    pub min: f32,
    pub max: f32,
    pub count: u64,
    ema: Option<(f32, f32)>,
    pub hist: Option<Histogram>,
}

/// The chosen range of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Observed {
    pub min: f32,
    pub max: f32,
    /// The range the method chose (before widening to include 0).
    pub lo: f32,
    pub hi: f32,
}

impl Observer {
    pub fn new(with_histogram: bool) -> Self {
        Observer {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            ema: None,
            hist: with_histogram.then(Histogram::default),
        }
    }

    pub fn update(&mut self, data: &[f32], moving_average: Option<f32>) {
        if data.is_empty() {
            return;
        }
        let (bmin, bmax) = data
            .iter()
            .filter(|v| !v.is_nan())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if bmin > bmax {
            return;
        }
        self.min = self.min.min(bmin);
        self.max = self.max.max(bmax);
        self.count += data.len() as u64;
        if let Some(c) = moving_average {
            self.ema = Some(match self.ema {
                None => (bmin, bmax),
                Some((a, b)) => (a + c * (bmin - a), b + c * (bmax - b)),
            });
        }
        if let Some(h) = &mut self.hist {
            h.add(data);
        }
    }

    pub fn finish(&self, opts: &ObserveOptions) -> Observed {
        let (min, max) = if self.count == 0 {
            (0.0, 0.0)
        } else {
            (self.min, self.max)
        };
        let (lo, hi) = match (opts.method, &self.hist) {
            (Method::MinMax, _) | (_, None) => match (opts.moving_average, self.ema) {
                (Some(_), Some(e)) => e,
                _ => (min, max),
            },
            (Method::Percentile(p), Some(h)) => {
                let tail = 1.0 - p / 100.0;
                (
                    h.quantile(tail).clamp(min, max),
                    h.quantile(1.0 - tail).clamp(min, max),
                )
            }
            (Method::Entropy, Some(h)) => {
                let amax = min.abs().max(max.abs());
                // int8 symmetric has 127 levels per side (TensorRT's 128); a non-negative
                // tensor stored as uint8 has 255 levels on [0, T].
                let levels = if min >= 0.0 && opts.scheme == ActScheme::U8Asymmetric {
                    256
                } else {
                    128
                };
                // Exact zeros sit on every candidate grid (the zero point is exact), so they
                // cost nothing at any threshold; left in, the ReLU spike at 0 dominates the
                // first bin and drags the KL optimum far into the tail (digits: 8x clipping,
                // 99.7% -> 83% accuracy).
                let mut hist = h.abs_histogram(16 * levels, amax);
                let floor = abs_quantile(&hist, amax, 1.0 - ENTROPY_MAX_CLIPPED);
                hist[0] = (hist[0] - h.exact_zeros as f64).max(0.0);
                let t = entropy_threshold(&hist, amax, levels).max(floor);
                (min.max(-t), max.min(t))
            }
            (Method::Mse, Some(h)) => mse_range(h, min, max, opts.scheme),
        };
        Observed { min, max, lo, hi }
    }
}

/// Largest fraction of values the entropy threshold may clip. KL degenerates on discrete,
/// spiky distributions (pixel inputs with 17 grey levels: it picked T = 1/16 on [0, 1] and the
/// digits net fell to 10%); on smooth ones its threshold clips far less than this.
const ENTROPY_MAX_CLIPPED: f64 = 1e-3;

/// The `q` quantile of |x| from an |x| histogram over `[0, amax]` (upper bin edge).
fn abs_quantile(hist: &[f64], amax: f32, q: f64) -> f32 {
    let total: f64 = hist.iter().sum();
    if total <= 0.0 || hist.is_empty() {
        return 0.0;
    }
    let width = amax as f64 / hist.len() as f64;
    let mut above = 0.0;
    for i in (0..hist.len()).rev() {
        above += hist[i];
        if above > (1.0 - q) * total {
            return ((i + 1) as f64 * width) as f32;
        }
    }
    0.0
}

/// TensorRT-style KL threshold over an |x| histogram with `hist.len()` bins spanning
/// `[0, amax]`, `levels` quantized levels (TensorRT: 128).
pub fn entropy_threshold(hist: &[f64], amax: f32, levels: usize) -> f32 {
    #[allow(non_snake_case)]
    let LEVELS = levels;
    let n = hist.len();
    if n <= LEVELS || amax <= 0.0 {
        return amax;
    }
    let width = amax as f64 / n as f64;
    let mut best = (f64::INFINITY, n);
    let suffix: Vec<f64> = {
        let mut s = vec![0.0; n + 1];
        for i in (0..n).rev() {
            s[i] = s[i + 1] + hist[i];
        }
        s
    };
    for i in LEVELS..=n {
        let mut p: Vec<f64> = hist[..i].to_vec();
        p[i - 1] += suffix[i];
        // Merge the i bins into LEVELS chunks, then expand each chunk's mass evenly over its
        // non-empty bins.
        let merged = i / LEVELS;
        let mut q = vec![0.0f64; i];
        for j in 0..LEVELS {
            let start = j * merged;
            let end = if j == LEVELS - 1 { i } else { start + merged };
            let chunk = &hist[start..end];
            let sum: f64 = chunk.iter().sum();
            let nonzero = chunk.iter().filter(|&&c| c > 0.0).count();
            if nonzero > 0 {
                for k in start..end {
                    if hist[k] > 0.0 {
                        q[k] = sum / nonzero as f64;
                    }
                }
            }
        }
        let kl = kl_divergence(&p, &q);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    (best.1 as f64 * width) as f32
}

/// KL(p || q) of unnormalized histograms, with MXNet-style smoothing of empty bins.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    fn smooth(h: &[f64]) -> Option<Vec<f64>> {
        const EPS: f64 = 1e-4;
        let total: f64 = h.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let zeros = h.iter().filter(|&&v| v == 0.0).count();
        let nonzeros = h.len() - zeros;
        if nonzeros == 0 {
            return None;
        }
        let eps1 = EPS * zeros as f64 / nonzeros as f64;
        Some(
            h.iter()
                .map(|&v| {
                    let v = v / total;
                    if v == 0.0 {
                        EPS
                    } else {
                        (v - eps1).max(EPS * 1e-3)
                    }
                })
                .collect(),
        )
    }
    let (Some(p), Some(q)) = (smooth(p), smooth(q)) else {
        return f64::INFINITY;
    };
    p.iter()
        .zip(&q)
        .map(|(&a, &b)| if a > 0.0 { a * (a / b).ln() } else { 0.0 })
        .sum()
}

/// The range `t * [min, max]` minimizing the expected fake-quantization MSE.
pub fn mse_range(h: &Histogram, min: f32, max: f32, scheme: ActScheme) -> (f32, f32) {
    let centres = h.centres();
    let mut best = (f64::INFINITY, (min, max));
    const STEPS: usize = 200;
    for k in 1..=STEPS {
        let t = k as f32 / STEPS as f32;
        let (lo, hi) = (min.min(0.0) * t, max.max(0.0) * t);
        let p = activation_params(lo, hi, scheme);
        let err: f64 = centres
            .iter()
            .map(|&(x, c)| c * ((x - p.fake_quant(x)) as f64).powi(2))
            .sum();
        // `<=`: on ties prefer the wider range (later, larger t).
        if err <= best.0 {
            best = (err, (min.max(lo), max.min(hi)));
        }
    }
    best.1
}

/// Run the model over the calibration set once, observing `tensors` (graph inputs are read
/// straight from the data, everything else is an extra output of the tract run).
pub fn observe_model(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
) -> Result<IndexMap<String, Observed>> {
    let mut observers: IndexMap<String, Observer> = tensors
        .iter()
        .map(|t| (t.clone(), Observer::new(opts.method.needs_histogram())))
        .collect();
    let inputs: Vec<&String> = tensors
        .iter()
        .filter(|t| calib.input_names.contains(t))
        .collect();
    let extra: Vec<String> = tensors
        .iter()
        .filter(|t| !calib.input_names.contains(t))
        .cloned()
        .collect();
    let mut runner: Option<(Vec<Vec<usize>>, Runner)> = None;
    let progress =
        crate::progress::Progress::bar("calibrating", calib.batches.len() as u64);
    for (b, batch) in calib.batches.iter().enumerate() {
        progress.inc(1);
        for name in &inputs {
            let k = calib
                .input_names
                .iter()
                .position(|n| n == *name)
                .expect("filtered above");
            update(&mut observers, name, &batch[k], opts.moving_average);
        }
        if extra.is_empty() {
            continue;
        }
        let shapes: Vec<Vec<usize>> = batch.iter().map(|a| a.shape().to_vec()).collect();
        if runner.as_ref().is_none_or(|(s, _)| *s != shapes) {
            let named: Vec<(String, Vec<usize>)> = calib
                .input_names
                .iter()
                .cloned()
                .zip(shapes.iter().cloned())
                .collect();
            let r = Runner::new(model, &named, &extra)
                .context("preparing the calibration run in tract")?;
            runner = Some((shapes, r));
        }
        let (_, r) = runner.as_ref().expect("set above");
        let outs = r
            .run(batch)
            .with_context(|| format!("calibration batch {b}"))?;
        let skip = outs.len() - extra.len();
        for (name, out) in extra.iter().zip(&outs[skip..]) {
            update(&mut observers, name, out, opts.moving_average);
        }
    }
    Ok(observers
        .into_iter()
        .map(|(k, o)| (k, o.finish(opts)))
        .collect())
}

fn update(obs: &mut IndexMap<String, Observer>, name: &str, a: &ArrayD<f32>, ma: Option<f32>) {
    if let Some(o) = obs.get_mut(name) {
        match a.as_slice() {
            Some(s) => o.update(s, ma),
            None => o.update(&a.iter().copied().collect::<Vec<_>>(), ma),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(rng: &mut ChaCha8Rng) -> f32 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn observe_batches(batches: &[Vec<f32>], opts: &ObserveOptions) -> Observed {
        let mut o = Observer::new(opts.method.needs_histogram());
        for b in batches {
            o.update(b, opts.moving_average);
        }
        o.finish(opts)
    }

    #[test]
    fn minmax_is_exact() {
        let batches = vec![vec![0.5, -1.25, 3.0], vec![7.5, -0.1], vec![2.0]];
        let r = observe_batches(&batches, &ObserveOptions::default());
        assert_eq!((r.lo, r.hi), (-1.25, 7.5));
    }

    #[test]
    fn moving_average_follows_the_ort_formula() {
        let batches = vec![vec![0.0, 1.0], vec![-1.0, 3.0]];
        let opts = ObserveOptions {
            moving_average: Some(0.5),
            ..Default::default()
        };
        let r = observe_batches(&batches, &opts);
        assert_eq!((r.lo, r.hi), (-0.5, 2.0));
        assert_eq!((r.min, r.max), (-1.0, 3.0));
    }

    #[test]
    fn percentile_matches_sorted_array_across_rebinning() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // Growing scale forces several doublings of the histogram range.
        let batches: Vec<Vec<f32>> = (0..5)
            .map(|k| {
                (0..20000)
                    .map(|_| normal(&mut rng) * (1 << k) as f32 + 0.5)
                    .collect()
            })
            .collect();
        let mut all: Vec<f32> = batches.concat();
        all.sort_by(f32::total_cmp);
        let p = 99.9;
        let opts = ObserveOptions {
            method: Method::Percentile(p),
            ..Default::default()
        };
        let mut o = Observer::new(true);
        for b in &batches {
            o.update(b, None);
        }
        let width = o.hist.as_ref().unwrap().bin_width();
        let r = o.finish(&opts);
        let n = all.len() as f64;
        let want_hi = all[((p / 100.0) * n) as usize];
        let want_lo = all[((1.0 - p / 100.0) * n) as usize];
        // Brute force: within two fine bins (and the sample-spacing there).
        assert!(
            (r.hi - want_hi).abs() <= 2.0 * width + 0.05,
            "{} vs {want_hi}",
            r.hi
        );
        assert!(
            (r.lo - want_lo).abs() <= 2.0 * width + 0.05,
            "{} vs {want_lo}",
            r.lo
        );
    }

    #[test]
    fn histogram_doubling_keeps_every_count() {
        let mut h = Histogram::default();
        h.add(&[0.0, 0.0]);
        h.add(&[0.1, -0.1]);
        h.add(&[100.0, -3.0, 0.05]);
        assert_eq!(h.total(), 7);
        assert!(h.r >= 100.0 && h.r < 200.0);
        let abs = h.abs_histogram(2048, 100.0);
        assert!((abs.iter().sum::<f64>() - 7.0).abs() < 1e-9);
    }

    #[test]
    fn entropy_ignores_outliers_on_a_gaussian() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut v: Vec<f32> = (0..200_000).map(|_| normal(&mut rng)).collect();
        v.extend([60.0, -55.0, 80.0]);
        let r = observe_batches(
            &[v],
            &ObserveOptions {
                method: Method::Entropy,
                ..Default::default()
            },
        );
        assert_eq!(r.max, 80.0);
        // TensorRT-style KL on N(0,1) at 8 bits lands a few sigmas out.
        assert!(r.hi > 2.5 && r.hi < 12.0, "threshold {}", r.hi);
        assert!((r.lo + r.hi).abs() < 1e-6, "symmetric: {} {}", r.lo, r.hi);
    }

    #[test]
    fn mse_clips_a_laplace_tail_like_brute_force() {
        // Laplace(b=1): the optimal symmetric 8-bit clip is about 9.9 b (Banner et al.).
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let v: Vec<f32> = (0..300_000)
            .map(|_| {
                let u: f64 = rng.random::<f64>() - 0.5;
                (-u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32
            })
            .collect();
        let opts = ObserveOptions {
            method: Method::Mse,
            scheme: ActScheme::I8Symmetric,
            ..Default::default()
        };
        let r = observe_batches(std::slice::from_ref(&v), &opts);
        let amax = r.min.abs().max(r.max);
        let t = r.lo.abs().max(r.hi);
        assert!(t < amax, "mse should clip the tail: {t} vs max {amax}");
        // Brute-force the error on the raw samples for a few candidates.
        let err = |t: f32| -> f64 {
            let p = activation_params(-t, t, ActScheme::I8Symmetric);
            v.iter()
                .map(|&x| ((x - p.fake_quant(x)) as f64).powi(2))
                .sum::<f64>()
        };
        let chosen = err(t);
        for cand in [amax, 0.5 * amax, 6.0, 14.0] {
            assert!(chosen <= err(cand) * 1.02, "t={t} worse than {cand}");
        }
        assert!(t > 6.0 && t < 14.0, "threshold {t}");
    }

    #[test]
    fn mse_keeps_the_full_range_of_a_uniform() {
        let v: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        let r = observe_batches(
            &[v],
            &ObserveOptions {
                method: Method::Mse,
                ..Default::default()
            },
        );
        assert!(r.hi > 0.97, "{}", r.hi);
    }

    #[test]
    fn method_parsing() {
        assert_eq!(
            Method::parse("percentile").unwrap(),
            Method::Percentile(99.999)
        );
        assert_eq!(
            Method::parse("percentile:99.9").unwrap(),
            Method::Percentile(99.9)
        );
        assert!(Method::parse("median").is_err());
    }
}
