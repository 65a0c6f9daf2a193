//! Range observers: one streaming pass over the calibration data, bounded memory.
//!
//! Every tensor that needs a range gets an [`Observer`] that keeps exact min/max, an optional
//! moving-average min/max, and (for the histogram methods) a [`Histogram`]; tensors are never
//! kept. [`observe_model`] requests all of them as extra outputs of the same tract run, piece
//! by piece: each calibration batch runs as pieces of [`PIECE_ROWS`] rows, as many side by side
//! as there are threads, and each group of pieces is observed (in row order) and dropped before
//! the next group runs. Peak memory is one piece's activations per thread, not a whole batch's
//! (EfficientNet-B0, 32-row batches: 3.1 GiB -> 0.5 GiB for the whole default run). The
//! statistics a method reads are per batch (min/max of the moving average, the mean square) or
//! over everything (the histogram, exact whatever the cut, see [`super::histogram`]), so the
//! pieces only change which values tract computes: a fixed cut keeps them the same with 1 or N
//! threads.
//!
//! The histogram and the range math of the histogram methods live in [`super::histogram`].
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

use super::histogram::{abs_quantile, with_scratch, BinnedPiece, SPLIT_COUNTS_FROM, STRIDE, WAYS};
pub use super::histogram::{entropy_threshold, mse_range, Histogram, FINE_BINS};
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::params::ActScheme;
use crate::calibrate::reference::OutputCapture;
use crate::onnx::proto::ModelProto;
use crate::runtime::{F32Value, Runner};
use anyhow::{Context, Result};
use indexmap::IndexMap;
use ndarray::ArrayD;
use rayon::prelude::*;
use serde::Serialize;
use std::borrow::Cow;

/// How a range is chosen from the observed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub enum Method {
    #[default]
    MinMax,
    /// Two-sided percentile, e.g. 99.999.
    Percentile(f64),
    Entropy,
    Mse,
    /// Chosen per tensor among the fixed methods by the error each choice causes at the
    /// model's outputs (`passes::quantize::auto`). Where no choice can be scored, [`Observer::
    /// finish`] falls back to [`Method::DEFAULT_FIXED`].
    Auto,
}

impl Method {
    /// The fixed method `auto` starts from and falls back to.
    pub const DEFAULT_FIXED: Method = Method::Percentile(99.999);

    pub fn needs_histogram(&self) -> bool {
        !matches!(self, Method::MinMax)
    }

    pub fn label(&self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile(p) => format!("percentile {p}"),
            Method::Entropy => "entropy".into(),
            Method::Mse => "mse".into(),
            Method::Auto => "auto".into(),
        }
    }

    /// Parse `minmax`, `percentile`, `percentile:99.99`, `entropy`, `mse`.
    pub fn parse(s: &str) -> Result<Method> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "minmax" | "min-max" => Method::MinMax,
            "entropy" | "kl" => Method::Entropy,
            "mse" => Method::Mse,
            "auto" => Method::Auto,
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
                        "unknown calibration method '{s}'; use auto, minmax, percentile[:P], entropy or mse"
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

/// Everything kept about one tensor.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    pub min: f32,
    pub max: f32,
    pub count: u64,
    ema: Option<(f32, f32)>,
    pub hist: Option<Histogram>,
    /// Mean square of each observed batch, in order (see [`Observed::quiet_mean_square`]).
    batch_mean_squares: Vec<f64>,
    /// The batch being observed piece by piece, until [`Observer::end_batch`].
    open: Option<OpenBatch>,
}

/// What is kept of a batch observed in pieces: its min/max, sums of squares and how many values
/// it has had so far (the histogram takes each piece's values at once).
#[derive(Debug, Clone, Copy)]
struct OpenBatch {
    min: f32,
    max: f32,
    squares: SquareSum,
    len: u64,
}

/// The chosen range of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Observed {
    pub min: f32,
    pub max: f32,
    /// The range the method chose (before widening to include 0).
    pub lo: f32,
    pub hi: f32,
    /// The 10th percentile over calibration batches of each batch's mean square (0 when
    /// nothing was observed): how loud the quiet tenth of the data is. A grid whose step is
    /// large against it loses those batches entirely (audio silence under a speech-sized
    /// scale), which the whole-tensor range cannot show. One batch is one feed when the model
    /// fixes its batch size, else `batch_size` samples together.
    #[serde(skip)]
    pub quiet_mean_square: f64,
}

impl Observer {
    pub fn new(with_histogram: bool) -> Self {
        Observer {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            ema: None,
            hist: with_histogram.then(Histogram::default),
            batch_mean_squares: Vec::new(),
            open: None,
        }
    }

    /// Observe one whole batch.
    pub fn update(&mut self, data: &[f32], moving_average: Option<f32>) {
        self.update_parts(&[data], moving_average);
    }

    /// Observe one batch given as consecutive `parts`: [`Observer::add_piece`] of each, then
    /// [`Observer::end_batch`].
    pub fn update_parts(&mut self, parts: &[&[f32]], moving_average: Option<f32>) {
        for p in parts {
            self.add_piece(p);
        }
        self.end_batch(moving_average);
    }

    /// Observe the next piece (consecutive rows) of the current batch. The histogram counts, the
    /// batch's sums of squares ([`scan_from`]) and its min and max are those of the whole batch
    /// however it is cut (see [`super::histogram`]), except which zero an extreme of 0 carries
    /// when both signed zeros occur (each piece's is its sequential fold's; the cut is fixed,
    /// [`PIECE_ROWS`], so it does not depend on the thread count). Nothing of the values is
    /// kept.
    pub fn add_piece(&mut self, data: &[f32]) {
        if data.is_empty() {
            return;
        }
        let open = self.open.unwrap_or(OpenBatch {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            squares: SquareSum::default(),
            len: 0,
        });
        // A large piece on an established grid: min, max, squares and the bins in one read of
        // the values (binned on the current grid; binned again only if the piece widens it).
        let grid = self
            .hist
            .as_ref()
            .and_then(Histogram::grid)
            .filter(|_| (SPLIT_COUNTS_FROM..1 << 30).contains(&data.len()));
        let (bmin, bmax, squares, binned) = match (grid, &mut self.hist) {
            (Some(inv_w), Some(h)) => with_scratch(|scratch| {
                let (bmin, bmax, squares, piece) =
                    scan_binned(data, open.squares, open.len as usize, inv_w, scratch);
                let taken = h.take_binned(scratch, &piece, bmin, bmax);
                (bmin, bmax, squares, taken)
            }),
            _ => {
                let (bmin, bmax, squares) = scan_from(&[data], open.squares, open.len as usize);
                (bmin, bmax, squares, false)
            }
        };
        if bmin <= bmax && !binned {
            if let Some(h) = &mut self.hist {
                // max |x| over the non-NaN values, which min and max already bound.
                h.add_parts_within(&[data], 0f32.max(bmax).max(-bmin));
            }
        }
        self.open = Some(OpenBatch {
            min: open.min.min(bmin),
            max: open.max.max(bmax),
            squares,
            len: open.len + data.len() as u64,
        });
    }

    /// Close the batch [`Observer::add_piece`] observed: its min/max enter the running ones
    /// (and the moving average), its mean square the per-batch list. A batch with no non-NaN
    /// value leaves no trace.
    pub fn end_batch(&mut self, moving_average: Option<f32>) {
        let Some(OpenBatch {
            min: bmin,
            max: bmax,
            squares,
            len,
        }) = self.open.take()
        else {
            return;
        };
        if bmin > bmax {
            return;
        }
        self.min = self.min.min(bmin);
        self.max = self.max.max(bmax);
        self.count += len;
        self.batch_mean_squares.push(squares.mean());
        if let Some(c) = moving_average {
            self.ema = Some(match self.ema {
                None => (bmin, bmax),
                Some((a, b)) => (a + c * (bmin - a), b + c * (bmax - b)),
            });
        }
    }

    /// The observer that saw every batch, from what each batch left when it closed (in batch
    /// order; `None` for a batch with no value) and the histograms of observers that saw the
    /// batches between them (merged, [`Histogram::merge`]): the same min, max, count, moving
    /// average, per-batch mean squares and histogram as one observer fed all the pieces.
    /// `None` when a histogram cannot be merged exactly (an infinite value).
    fn from_batches(
        closed: &[Option<OpenBatch>],
        hists: &[Option<&Histogram>],
        moving_average: Option<f32>,
    ) -> Option<Observer> {
        let mut o = Observer::new(false);
        for c in closed {
            o.open = *c;
            o.end_batch(moving_average);
        }
        let mut merged: Option<Histogram> = None;
        for h in hists.iter().flatten() {
            match &mut merged {
                None => {
                    if !h.range_is_finite() {
                        return None;
                    }
                    merged = Some((*h).clone());
                }
                Some(m) => {
                    if !m.merge(h) {
                        return None;
                    }
                }
            }
        }
        o.hist = merged;
        Some(o)
    }

    pub fn finish(&self, opts: &ObserveOptions) -> Observed {
        let (min, max) = if self.count == 0 {
            (0.0, 0.0)
        } else {
            (self.min, self.max)
        };
        let method = match opts.method {
            Method::Auto => Method::DEFAULT_FIXED,
            fixed => fixed,
        };
        let (lo, hi) = match (method, &self.hist) {
            // `Auto` was resolved just above.
            (Method::MinMax | Method::Auto, _) | (_, None) => match (opts.moving_average, self.ema)
            {
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
        Observed {
            min,
            max,
            lo,
            hi,
            quiet_mean_square: quiet_mean_square(&self.batch_mean_squares),
        }
    }
}

/// Min and max of the non-NaN values of `parts` ((inf, -inf) when there are none), equal to
/// the sequential fold `(a.min(v), b.max(v))` over the values in order, and the mean square of
/// the finite values, in one pass. Eight running lanes instead of one chain, so the compiler
/// vectorizes it:
/// - min and max are exact whatever the order, except that `f32::min` may pick either of +0
///   and -0: when an extreme is 0 and both zeros occur, the extreme is taken again from the
///   sequential fold;
/// - the squares (f64) go to eight running sums, value `i` of the batch (counted across the
///   parts) to sum `i % 8`, added in lane order at the end: the same figure however the batch
///   is cut into parts, and no chain of one add per value (a single running sum waits an
///   add's latency on every value).
#[cfg(test)]
fn scan(parts: &[&[f32]]) -> (f32, f32, SquareSum) {
    scan_from(parts, SquareSum::default(), 0)
}

/// [`scan`] of the values that follow `seen` values of the same batch whose sums of squares are
/// `sum`: the squares go on into the same lanes (value `seen + i` to lane `(seen + i) % 8`), so
/// a batch scanned piece by piece sums its squares exactly as one scan of the whole batch;
/// min and max are those of the new values only.
fn scan_from(parts: &[&[f32]], sum: SquareSum, seen: usize) -> (f32, f32, SquareSum) {
    const LANES: usize = 8;
    let (mut lo, mut hi) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES]);
    let mut sum = sum;
    let mut seen = seen;
    for part in parts {
        // One at a time up to the next multiple of 8, so that whole blocks start on lane 0.
        let head = ((LANES - seen % LANES) % LANES).min(part.len());
        let (first, rest) = part.split_at(head);
        for &v in first {
            lo[0] = lo[0].min(v);
            hi[0] = hi[0].max(v);
            sum.add(seen % LANES, v);
            seen += 1;
        }
        let chunks = rest.chunks_exact(LANES);
        let tail = chunks.remainder();
        let (squares, finite) = blocks(chunks, &mut lo, &mut hi, sum.squares);
        sum.squares = squares;
        sum.finite += finite;
        seen += rest.len() - tail.len();
        for &v in tail {
            lo[0] = lo[0].min(v);
            hi[0] = hi[0].max(v);
            sum.add(seen % LANES, v);
            seen += 1;
        }
    }
    let squares = sum;
    let bmin = lo.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let bmax = hi.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let (mut pos_zero, mut neg_zero) = (false, false);
    if bmin == 0.0 || bmax == 0.0 {
        for part in parts {
            for &v in *part {
                pos_zero |= v.to_bits() == 0;
                neg_zero |= v.to_bits() == 0x8000_0000;
            }
        }
    }
    if pos_zero && neg_zero {
        let (a, b) = parts
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |acc, p| {
                p.iter()
                    .filter(|v| !v.is_nan())
                    .fold(acc, |(a, b), &v| (a.min(v), b.max(v)))
            });
        return (a, b, squares);
    }
    (bmin, bmax, squares)
}
/// [`scan_from`] of one piece, binning its values on the grid `inv_w` into the `scratch`
/// counters at the same time ([`super::histogram::BinnedPiece`]): one read of the values
/// instead of two (three for an extreme of 0). Min, max and squares are [`scan_from`]'s, bit
/// for bit (the same lanes; the signed-zero check reads flags gathered in the pass).
fn scan_binned(
    data: &[f32],
    sum: SquareSum,
    seen: usize,
    inv_w: f32,
    scratch: &mut [u32],
) -> (f32, f32, SquareSum, BinnedPiece) {
    const LANES: usize = 8;
    /// Everything the pass keeps, for the values taken one at a time.
    struct State<'a> {
        lo: [f32; LANES],
        hi: [f32; LANES],
        sum: SquareSum,
        pos_zero: bool,
        neg_zero: bool,
        piece: BinnedPiece,
        scratch: &'a mut [u32],
    }
    impl State<'_> {
        /// Values `seen..` of the batch, one at a time (as [`scan_from`]'s head and tail).
        fn singles(&mut self, values: &[f32], seen: usize) {
            for (n, &v) in values.iter().enumerate() {
                self.lo[0] = self.lo[0].min(v);
                self.hi[0] = self.hi[0].max(v);
                self.sum.add((seen + n) % LANES, v);
                self.pos_zero |= v.to_bits() == 0;
                self.neg_zero |= v.to_bits() == 0x8000_0000;
                self.piece.zeros += (v == 0.0) as u64;
                self.scratch[self.piece.bin(v)] += 1;
            }
        }
    }
    let mut st = State {
        lo: [f32::INFINITY; LANES],
        hi: [f32::NEG_INFINITY; LANES],
        sum,
        pos_zero: false,
        neg_zero: false,
        piece: BinnedPiece { inv_w, zeros: 0 },
        scratch,
    };
    // One at a time up to the next multiple of 8, so that whole blocks start on lane 0.
    let head = ((LANES - seen % LANES) % LANES).min(data.len());
    let (first, rest) = data.split_at(head);
    let tail = &rest[rest.len() - rest.len() % LANES..];
    let whole = &rest[..rest.len() - tail.len()];
    st.singles(first, seen);
    let (squares, finite, (pos, neg, zeros)) = blocks_binned(
        whole,
        &mut st.lo,
        &mut st.hi,
        st.sum.squares,
        &st.piece,
        st.scratch,
    );
    st.sum.squares = squares;
    st.sum.finite += finite;
    st.pos_zero |= pos;
    st.neg_zero |= neg;
    st.piece.zeros += zeros;
    st.singles(tail, seen + head + whole.len());
    let bmin = st.lo.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let bmax = st.hi.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if st.pos_zero && st.neg_zero && (bmin == 0.0 || bmax == 0.0) {
        let (a, b) = data
            .iter()
            .filter(|v| !v.is_nan())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        return (a, b, st.sum, st.piece);
    }
    (bmin, bmax, st.sum, st.piece)
}

/// [`blocks`] over `values` (whole blocks of eight) with every value also binned
/// ([`BinnedPiece::block`]) into `scratch`, value `k` of a block into set `k % WAYS`. Returns
/// [`blocks`]'s lanes and finite count, and whether a +0 and a -0 occurred and how many exact
/// zeros.
#[allow(clippy::type_complexity)]
fn blocks_binned(
    values: &[f32],
    lo: &mut [f32; 8],
    hi: &mut [f32; 8],
    squares: [f64; 8],
    piece: &BinnedPiece,
    scratch: &mut [u32],
) -> ([f64; 8], usize, (bool, bool, u64)) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt")
    {
        assert!(scratch.len() >= WAYS * STRIDE && values.len().is_multiple_of(8));
        // SAFETY: the CPU has AVX2 and POPCNT (checked just above); the slice lengths the
        // kernel relies on are asserted.
        return unsafe { blocks_binned_avx2(values, lo, hi, squares, piece.inv_w, scratch) };
    }
    blocks_binned_portable(values, lo, hi, squares, piece, scratch)
}

/// [`blocks_binned`] without AVX2: [`blocks`], then the bins of the same values.
#[allow(clippy::type_complexity)]
fn blocks_binned_portable(
    values: &[f32],
    lo: &mut [f32; 8],
    hi: &mut [f32; 8],
    squares: [f64; 8],
    piece: &BinnedPiece,
    scratch: &mut [u32],
) -> ([f64; 8], usize, (bool, bool, u64)) {
    let (mut out, mut finite) = (squares, 0usize);
    let (mut pos_zero, mut neg_zero, mut zeros) = (0u32, 0u32, 0u64);
    // Runs of 512 values: the min/max/squares kernel, then the bins of the same values
    // (still in L1), so the values come from memory once.
    for run in values.chunks(512) {
        let (q, f) = blocks(run.chunks_exact(8), lo, hi, out);
        out = q;
        finite += f;
        for b in run.chunks_exact(8) {
            let b: &[f32; 8] = b.try_into().expect("a block");
            let (at, z) = piece.block(b);
            zeros += z;
            for &v in b {
                pos_zero |= (v.to_bits() == 0) as u32;
                neg_zero |= (v.to_bits() == 0x8000_0000) as u32;
            }
            for (k, &i) in at.iter().enumerate() {
                scratch[(k % WAYS) * STRIDE + i as usize] += 1;
            }
        }
    }
    (out, finite, (pos_zero != 0, neg_zero != 0, zeros))
}

/// [`blocks_binned`] in AVX2 registers, eight values at a time: the same operations as the SSE2
/// kernels [`blocks`] and `histogram::block_bins` on twice the width (`vminps`/`vmaxps` skip NaN
/// as `minps`/`maxps` do; f32 lanes 0-3 and 4-7 of a block widen into the f64 sums of lanes
/// 0-3 and 4-7, multiplied then added, never fused), so every lane, count and bin is theirs.
///
/// # Safety
/// The CPU must have AVX2 and POPCNT; `values.len()` must be a multiple of 8 and `scratch`
/// hold at least `WAYS * STRIDE` counters.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[allow(clippy::type_complexity)]
unsafe fn blocks_binned_avx2(
    values: &[f32],
    lo: &mut [f32; 8],
    hi: &mut [f32; 8],
    squares: [f64; 8],
    inv_w: f32,
    scratch: &mut [u32],
) -> ([f64; 8], usize, (bool, bool, u64)) {
    use super::histogram::FINE_BINS;
    use std::arch::x86_64::*;
    let mut out = squares;
    let (mut finite, mut zeros) = (0u64, 0u64);
    let (mut pos_zero, mut neg_zero) = (0i32, 0i32);
    let mut at = [0u32; 8];
    let counters = scratch.as_mut_ptr();
    // SAFETY (whole block): loads and stores are unaligned ones of exactly 8 f32, 4 f64 or 8
    // u32 inside the arrays, `values` (whole blocks) and `at`; every index stored in `at` is a
    // bin in 0..=2 * FINE_BINS (clamped, or the discard slot), so `(k % WAYS) * STRIDE + at[k]`
    // is inside the first `WAYS * STRIDE` counters.
    unsafe {
        let mut l = _mm256_loadu_ps(lo.as_ptr());
        let mut h = _mm256_loadu_ps(hi.as_ptr());
        let mut q0 = _mm256_loadu_pd(out.as_ptr());
        let mut q1 = _mm256_loadu_pd(out.as_ptr().add(4));
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let inf = _mm256_set1_ps(f32::INFINITY);
        let vi = _mm256_set1_ps(inv_w);
        let low = _mm256_set1_ps(-(FINE_BINS as f32));
        let top = _mm256_set1_ps((FINE_BINS - 1) as f32);
        let offset = _mm256_set1_epi32(FINE_BINS as i32);
        let nan_bin = _mm256_set1_epi32(2 * FINE_BINS as i32);
        let zero = _mm256_setzero_ps();
        for c in values.chunks_exact(8) {
            let v = _mm256_loadu_ps(c.as_ptr());
            l = _mm256_min_ps(v, l);
            h = _mm256_max_ps(v, h);
            let ok = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, abs_mask), inf);
            finite += _mm256_movemask_ps(ok).count_ones() as u64;
            let f = _mm256_and_ps(v, ok);
            let a = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
            let b = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f));
            q0 = _mm256_add_pd(q0, _mm256_mul_pd(a, a));
            q1 = _mm256_add_pd(q1, _mm256_mul_pd(b, b));
            // The bins, as `histogram::block_bins`.
            let x = _mm256_mul_ps(v, vi);
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            let x = _mm256_min_ps(_mm256_max_ps(x, low), top);
            let t = _mm256_cvttps_epi32(x);
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_cvtepi32_ps(t), x));
            let i = _mm256_add_epi32(_mm256_add_epi32(t, up), offset);
            let i = _mm256_or_si256(_mm256_and_si256(nan, nan_bin), _mm256_andnot_si256(nan, i));
            _mm256_storeu_si256(at.as_mut_ptr() as *mut __m256i, i);
            let z = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, zero));
            let sign = _mm256_movemask_ps(v);
            zeros += z.count_ones() as u64;
            neg_zero |= z & sign;
            pos_zero |= z & !sign;
            for (k, &bin) in at.iter().enumerate() {
                *counters.add((k % WAYS) * STRIDE + bin as usize) += 1;
            }
        }
        _mm256_storeu_ps(lo.as_mut_ptr(), l);
        _mm256_storeu_ps(hi.as_mut_ptr(), h);
        _mm256_storeu_pd(out.as_mut_ptr(), q0);
        _mm256_storeu_pd(out.as_mut_ptr().add(4), q1);
    }
    (out, finite as usize, (pos_zero != 0, neg_zero != 0, zeros))
}

/// [`scan`]'s blocks of eight: lane `k` of `lo`/`hi` folds value `k` of every block with
/// `f32::min`/`max`, lane `k` of `squares` adds its square in f64 when it is finite. Returns the
/// lanes and how many values were finite.
#[cfg(target_arch = "x86_64")]
fn blocks(
    chunks: std::slice::ChunksExact<'_, f32>,
    lo: &mut [f32; 8],
    hi: &mut [f32; 8],
    squares: [f64; 8],
) -> ([f64; 8], usize) {
    use std::arch::x86_64::*;
    let mut finite = 0usize;
    let mut out = squares;
    // SAFETY: SSE2 is part of the x86_64 baseline; every load and store is an unaligned one
    // of exactly 4 f32 or 2 f64 lanes inside an array or a chunk of 8.
    // `minps(v, m)`/`maxps(v, m)` return `m` when `v` is NaN, as `f32::min`/`max` skip NaN;
    // a non-finite value is zeroed before squaring (it adds +0, which changes no sum of
    // squares), so every lane holds the same sum as the scalar fold.
    unsafe {
        let mut l = [_mm_loadu_ps(lo.as_ptr()), _mm_loadu_ps(lo.as_ptr().add(4))];
        let mut h = [_mm_loadu_ps(hi.as_ptr()), _mm_loadu_ps(hi.as_ptr().add(4))];
        let mut q = [
            _mm_loadu_pd(out.as_ptr()),
            _mm_loadu_pd(out.as_ptr().add(2)),
            _mm_loadu_pd(out.as_ptr().add(4)),
            _mm_loadu_pd(out.as_ptr().add(6)),
        ];
        let abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fff_ffff));
        let inf = _mm_set1_ps(f32::INFINITY);
        for c in chunks {
            for half in 0..2 {
                let v = _mm_loadu_ps(c.as_ptr().add(4 * half));
                l[half] = _mm_min_ps(v, l[half]);
                h[half] = _mm_max_ps(v, h[half]);
                let ok = _mm_cmplt_ps(_mm_and_ps(v, abs_mask), inf);
                finite += _mm_movemask_ps(ok).count_ones() as usize;
                let v = _mm_and_ps(v, ok);
                let low = _mm_cvtps_pd(v);
                let high = _mm_cvtps_pd(_mm_movehl_ps(v, v));
                q[2 * half] = _mm_add_pd(q[2 * half], _mm_mul_pd(low, low));
                q[2 * half + 1] = _mm_add_pd(q[2 * half + 1], _mm_mul_pd(high, high));
            }
        }
        _mm_storeu_ps(lo.as_mut_ptr(), l[0]);
        _mm_storeu_ps(lo.as_mut_ptr().add(4), l[1]);
        _mm_storeu_ps(hi.as_mut_ptr(), h[0]);
        _mm_storeu_ps(hi.as_mut_ptr().add(4), h[1]);
        for (k, lanes) in q.iter().enumerate() {
            _mm_storeu_pd(out.as_mut_ptr().add(2 * k), *lanes);
        }
    }
    (out, finite)
}

#[cfg(not(target_arch = "x86_64"))]
fn blocks(
    chunks: std::slice::ChunksExact<'_, f32>,
    lo: &mut [f32; 8],
    hi: &mut [f32; 8],
    squares: [f64; 8],
) -> ([f64; 8], usize) {
    let (mut out, mut finite) = (squares, 0usize);
    for c in chunks {
        for k in 0..8 {
            lo[k] = lo[k].min(c[k]);
            hi[k] = hi[k].max(c[k]);
            // A non-finite value adds +0 (a sum of squares is never -0): no branch.
            let ok = c[k].is_finite();
            out[k] += if ok {
                (c[k] as f64) * (c[k] as f64)
            } else {
                0.0
            };
            finite += ok as usize;
        }
    }
    (out, finite)
}

/// Running sums of squares (f64) of a batch's finite values in eight lanes, and their count
/// (see [`scan`]).
#[derive(Debug, Clone, Copy, Default)]
struct SquareSum {
    squares: [f64; 8],
    finite: usize,
}

impl SquareSum {
    fn add(&mut self, lane: usize, v: f32) {
        if v.is_finite() {
            self.squares[lane] += (v as f64) * (v as f64);
            self.finite += 1;
        }
    }

    /// Mean square of the finite values (0 when there is none): the lanes added in order.
    fn mean(&self) -> f64 {
        self.squares.iter().fold(0.0, |a, &s| a + s) / self.finite.max(1) as f64
    }
}

/// The 10th percentile (nearest rank, rounding down) of the per-batch mean squares.
fn quiet_mean_square(per_batch: &[f64]) -> f64 {
    let mut v: Vec<f64> = per_batch.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 10).copied().unwrap_or(0.0)
}

/// Largest fraction of values the entropy threshold may clip. KL degenerates on discrete,
/// spiky distributions (pixel inputs with 17 grey levels: it picked T = 1/16 on [0, 1] and the
/// digits net fell to 10%); on smooth ones its threshold clips far less than this.
const ENTROPY_MAX_CLIPPED: f64 = 1e-3;

/// Run the model over the calibration set once, observing `tensors` (graph inputs are read
/// straight from the data, everything else is an extra output of the tract run).
pub fn observe_model(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
) -> Result<IndexMap<String, Observed>> {
    observe_model_keeping(model, tensors, calib, opts, None)
}

/// [`observe_model`], also offering the graph's outputs of each row run to `capture` (the
/// original's outputs for validation, [`super::reference`]).
pub fn observe_model_keeping(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
    capture: Option<&mut OutputCapture>,
) -> Result<IndexMap<String, Observed>> {
    Ok(observe_run(model, tensors, calib, opts, 0, capture)?
        .0
        .into_iter()
        .map(|(k, o)| (k, o.finish(opts)))
        .collect())
}

/// The same run as [`observe_model`], returning the observers themselves, so that several
/// methods can turn one observation into ranges (`auto` scores each).
pub fn observers(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
) -> Result<IndexMap<String, Observer>> {
    Ok(observers_by_fold(model, tensors, calib, opts, 0)?.0)
}

/// The same run as [`observers`], also keeping `folds` observers per tensor that each see only
/// the calibration batches `b` with `b % folds == fold` (none when `folds` is 0), so that a
/// range estimated on one fold can be scored on the others' data (`auto`'s cross-fitting).
/// One model run per batch, whatever `folds`.
#[allow(clippy::type_complexity)]
pub fn observers_by_fold(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
    folds: usize,
) -> Result<(IndexMap<String, Observer>, Vec<IndexMap<String, Observer>>)> {
    observe_run(model, tensors, calib, opts, folds, None)
}

/// The one observation run behind [`observers_by_fold`] and [`observe_model_keeping`].
#[allow(clippy::type_complexity)]
fn observe_run(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
    folds: usize,
    capture: Option<&mut OutputCapture>,
) -> Result<(IndexMap<String, Observer>, Vec<IndexMap<String, Observer>>)> {
    let fresh = || -> IndexMap<String, Observer> {
        tensors
            .iter()
            .map(|t| (t.clone(), Observer::new(opts.method.needs_histogram())))
            .collect()
    };
    let mut observers = fresh();
    let mut by_fold: Vec<IndexMap<String, Observer>> = (0..folds).map(|_| fresh()).collect();
    let inputs: Vec<&String> = tensors
        .iter()
        .filter(|t| calib.input_names.contains(t))
        .collect();
    let extra: Vec<String> = tensors
        .iter()
        .filter(|t| !calib.input_names.contains(t))
        .cloned()
        .collect();
    let whole = calib.fixed_batch || calib.sequence.is_some();
    run_batches(
        model,
        &extra,
        calib,
        "calibrating",
        whole,
        capture,
        |b, batch, group, parts| {
            let seen = pieces_of(&inputs, &extra, calib, batch, group.first, parts);
            // Each observer sees its tensor's pieces in order whatever the thread count; only
            // different tensors' updates run side by side (the histogram work is most of a
            // calibration's CPU time on models with many large activations).
            let values: std::collections::HashMap<&str, &Vec<Cow<[f32]>>> =
                seen.iter().map(|(n, v)| (*n, v)).collect();
            let fold = (folds > 0).then(|| &mut by_fold[b % folds]);
            let mut work: Vec<(&mut Observer, Option<&Vec<Cow<[f32]>>>)> = observers
                .iter_mut()
                .chain(fold.into_iter().flat_map(|f| f.iter_mut()))
                .map(|(name, o)| (o, values.get(name.as_str()).copied()))
                .collect();
            work.par_iter_mut().for_each(|(o, a)| {
                for piece in a.iter().flat_map(|a| a.iter()) {
                    o.add_piece(piece);
                }
                if group.last {
                    o.end_batch(opts.moving_average);
                }
            });
            Ok(())
        },
    )?;
    Ok((observers, by_fold))
}

/// Each observed tensor's values in one group of a batch's pieces, in row order: the graph
/// `inputs` whole with the batch's first group (float ones only: integer and bool inputs pass
/// through), the `extra` outputs per piece (`parts`, in `extra`'s order).
fn pieces_of<'a>(
    inputs: &[&'a String],
    extra: &'a [String],
    calib: &CalibrationSet,
    batch: &'a [crate::runtime::Feed],
    first: bool,
    parts: &'a [Vec<F32Value>],
) -> Vec<(&'a str, Vec<Cow<'a, [f32]>>)> {
    let mut seen: Vec<(&str, Vec<Cow<[f32]>>)> = Vec::with_capacity(inputs.len() + extra.len());
    if first {
        for name in inputs {
            let Some(k) = calib.input_names.iter().position(|n| n == *name) else {
                continue;
            };
            if let Some(a) = batch[k].as_f32() {
                // A feed not in standard layout is copied first.
                let values = match a.as_slice() {
                    Some(s) => Cow::Borrowed(s),
                    None => Cow::Owned(a.iter().copied().collect()),
                };
                seen.push((name.as_str(), vec![values]));
            }
        }
    }
    for (t, name) in extra.iter().enumerate() {
        seen.push((
            name.as_str(),
            parts
                .iter()
                .map(|p| Cow::Borrowed(p[t].as_slice()))
                .collect(),
        ));
    }
    seen
}

/// [`observers_by_fold`] (`folds >= 1`) with the whole-set observers rebuilt from the folds'
/// instead of fed every value a third time: each batch's min, max, sums of squares and length
/// are taken from its fold's observer when the batch closes and closed again, in batch order,
/// on the whole-set observer (the same [`OpenBatch`] the whole-set observer would have
/// computed from the same pieces: the single-pass and two-pass scans give the same bits); the
/// histograms are merged ([`Histogram::merge`], exact). So the result is the same as
/// [`observers_by_fold`]'s, bit for bit, at two thirds of its histogram work (`auto` on
/// ResNet-18: the histograms are about half of the observation's CPU). If a fold's histogram
/// saw an infinite value (no exact merge), the observation runs again as
/// [`observers_by_fold`].
#[allow(clippy::type_complexity)]
pub fn observers_merged_from_folds(
    model: &ModelProto,
    tensors: &[String],
    calib: &CalibrationSet,
    opts: &ObserveOptions,
    folds: usize,
) -> Result<(IndexMap<String, Observer>, Vec<IndexMap<String, Observer>>)> {
    anyhow::ensure!(folds >= 1, "observers_merged_from_folds: no fold");
    let with_histogram = opts.method.needs_histogram();
    let mut by_fold: Vec<IndexMap<String, Observer>> = (0..folds)
        .map(|_| {
            tensors
                .iter()
                .map(|t| (t.clone(), Observer::new(with_histogram)))
                .collect()
        })
        .collect();
    // Per tensor, per batch: what the batch left in its fold's observer.
    let mut closed: Vec<Vec<Option<OpenBatch>>> =
        vec![vec![None; calib.batches.len()]; tensors.len()];
    let inputs: Vec<&String> = tensors
        .iter()
        .filter(|t| calib.input_names.contains(t))
        .collect();
    let extra: Vec<String> = tensors
        .iter()
        .filter(|t| !calib.input_names.contains(t))
        .cloned()
        .collect();
    stream_in_parts(
        model,
        &extra,
        calib,
        "calibrating",
        |b, batch, group, parts| {
            let seen = pieces_of(&inputs, &extra, calib, batch, group.first, parts);
            let values: std::collections::HashMap<&str, &Vec<Cow<[f32]>>> =
                seen.iter().map(|(n, v)| (*n, v)).collect();
            let mut work: Vec<(
                &mut Observer,
                Option<&Vec<Cow<[f32]>>>,
                &mut Option<OpenBatch>,
            )> = by_fold[b % folds]
                .iter_mut()
                .zip(closed.iter_mut())
                .map(|((name, o), c)| (o, values.get(name.as_str()).copied(), &mut c[b]))
                .collect();
            work.par_iter_mut().for_each(|(o, a, c)| {
                for piece in a.iter().flat_map(|a| a.iter()) {
                    o.add_piece(piece);
                }
                if group.last {
                    **c = o.open;
                    o.end_batch(opts.moving_average);
                }
            });
            Ok(())
        },
    )?;
    let mut whole = IndexMap::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let fold_hists: Vec<Option<&Histogram>> =
            by_fold.iter().map(|f| f[t].hist.as_ref()).collect();
        let Some(o) = Observer::from_batches(&closed[i], &fold_hists, opts.moving_average) else {
            return observers_by_fold(model, tensors, calib, opts, folds);
        };
        whole.insert(t.clone(), o);
    }
    Ok((whole, by_fold))
}

/// Run the model over every calibration batch once with `extra` tensors as extra outputs, and
/// hand each batch (its feeds, then the `extra` values in order) to `f`. Batches run whole (the
/// Gram matrices of [`super::gram`] sum rows in batch order); with no `extra` tensor nothing
/// runs (`outs` is empty).
pub fn stream(
    model: &ModelProto,
    extra: &[String],
    calib: &CalibrationSet,
    label: &str,
    mut f: impl FnMut(usize, &[crate::runtime::Feed], &[ArrayD<f32>]) -> Result<()>,
) -> Result<()> {
    run_batches(
        model,
        extra,
        calib,
        label,
        true,
        None,
        |b, batch, _, parts| {
            let outs = match parts.first() {
                Some(values) => values
                    .iter()
                    .map(F32Value::to_array)
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            f(b, batch, &outs)
        },
    )
}

/// Rows of one calibration piece: a batch's rows are run through tract this many at a time, and
/// each piece's activations are observed and dropped before the next pieces run, so that the
/// extra outputs held at once are those of [`PIECE_ROWS`] rows per thread, not of the whole
/// batch (EfficientNet-B0: about 90 MB of activations per row). A fixed number, not one derived
/// from the thread count, so that every tract run, and so every observed value, is the same
/// with 1 or N threads.
pub const PIECE_ROWS: usize = 1;

/// Row ranges of a batch of `rows` rows: consecutive pieces of [`PIECE_ROWS`] rows, the last
/// one shorter when they do not divide.
fn pieces(rows: usize) -> Vec<std::ops::Range<usize>> {
    let rows = rows.max(1);
    (0..rows)
        .step_by(PIECE_ROWS)
        .map(|start| start..(start + PIECE_ROWS).min(rows))
        .collect()
}

/// Where a group of pieces handed to a [`stream_in_parts`] callback sits in its batch.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    /// The batch's first group.
    pub first: bool,
    /// The batch's last group.
    pub last: bool,
}

/// [`stream`], with each batch's rows run as consecutive pieces ([`pieces`]), as many side by
/// side as there are threads; `f` gets the batch, where this group of pieces sits in it, and
/// per piece of the group in row order the `extra` values. Groups of a batch come in row order,
/// and a group's values are dropped once `f` returns: a result that folds the pieces in order
/// does not depend on the thread count. A batch is run whole (one group of one piece) when the
/// model fixes its batch size or the batches are KV-cache steps. One tract plan per piece shape
/// (usually one), shared by the threads.
pub fn stream_in_parts(
    model: &ModelProto,
    extra: &[String],
    calib: &CalibrationSet,
    label: &str,
    f: impl FnMut(usize, &[crate::runtime::Feed], Group, &[Vec<F32Value>]) -> Result<()>,
) -> Result<()> {
    let whole = calib.fixed_batch || calib.sequence.is_some();
    run_batches(model, extra, calib, label, whole, None, f)
}

/// [`stream_in_parts`], or every batch whole when `whole`. Plans are kept only for the shapes
/// the current batch needs (usually all batches but a shorter last one share them), so a large
/// model never holds tract copies for shapes it is done with. Each piece's graph outputs are
/// offered to `capture`, pieces in order, while it wants them.
#[allow(clippy::too_many_arguments)]
fn run_batches(
    model: &ModelProto,
    extra: &[String],
    calib: &CalibrationSet,
    label: &str,
    whole: bool,
    mut capture: Option<&mut OutputCapture>,
    mut f: impl FnMut(usize, &[crate::runtime::Feed], Group, &[Vec<F32Value>]) -> Result<()>,
) -> Result<()> {
    type Shapes = Vec<Vec<usize>>;
    let mut runners: Vec<(Shapes, Runner)> = Vec::new();
    let progress = crate::progress::Progress::bar(label, calib.batches.len() as u64);
    let side_by_side = rayon::current_num_threads().max(1);
    for (b, batch) in calib.batches.iter().enumerate() {
        progress.inc(1);
        if extra.is_empty() {
            f(
                b,
                batch,
                Group {
                    first: true,
                    last: true,
                },
                &[],
            )?;
            continue;
        }
        let ranges: Vec<std::ops::Range<usize>> = if whole {
            std::iter::once(0..calib.rows(b)).collect()
        } else {
            pieces(calib.rows(b))
        };
        let feeds_of = |r: &std::ops::Range<usize>| -> Vec<crate::runtime::Feed> {
            if ranges.len() == 1 {
                return batch.clone();
            }
            batch
                .iter()
                .zip(&calib.batch_axes)
                .map(|(feed, axis)| match axis {
                    Some(a) => feed.slice_axis(*a, r.clone()),
                    None => feed.clone(),
                })
                .collect()
        };
        // The input shapes of each piece: the batch's own shapes with the sliced axes set to
        // the piece's rows.
        let shapes_of = |r: &std::ops::Range<usize>| -> Shapes {
            batch
                .iter()
                .zip(&calib.batch_axes)
                .map(|(feed, axis)| {
                    let mut s = feed.shape().to_vec();
                    if let (Some(a), true) = (axis, ranges.len() > 1) {
                        s[*a] = r.len();
                    }
                    s
                })
                .collect()
        };
        let mut needed: Vec<Shapes> = Vec::new();
        for r in &ranges {
            let s = shapes_of(r);
            if !needed.contains(&s) {
                needed.push(s);
            }
        }
        runners.retain(|(have, _)| needed.contains(have));
        let missing: Vec<Shapes> = needed
            .into_iter()
            .filter(|s| !runners.iter().any(|(have, _)| have == s))
            .collect();
        let built = missing
            .into_par_iter()
            .map(|shapes| {
                let named = calib.named_shapes(&shapes);
                Runner::new(model, &named, extra)
                    .context("preparing the calibration run in tract")
                    .map(|r| (shapes, r))
            })
            .collect::<Result<Vec<_>>>()?;
        runners.extend(built);
        let runners = &runners;
        let groups: Vec<&[std::ops::Range<usize>]> = ranges.chunks(side_by_side).collect();
        for (g, group) in groups.iter().enumerate() {
            let keep = capture.as_ref().map_or(0, |c| c.wanted(group.len()));
            let runs = group
                .par_iter()
                .enumerate()
                .map(|(i, r)| {
                    let s = shapes_of(r);
                    let (_, runner) = runners
                        .iter()
                        .find(|(have, _)| *have == s)
                        .expect("built above");
                    let feeds = feeds_of(r);
                    let mut outs = runner
                        .run_values(&feeds)
                        .with_context(|| format!("calibration batch {b}"))?;
                    let skip = outs.len() - extra.len();
                    let extras = outs.split_off(skip);
                    let kept = if i < keep {
                        let named = calib.input_names.iter().map(String::as_str).zip(&feeds);
                        let values = outs
                            .iter()
                            .map(F32Value::to_array)
                            .collect::<Result<Vec<_>>>()?;
                        Some((crate::runtime::fingerprint(named), values))
                    } else {
                        None
                    };
                    Ok((extras, kept))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut outs = Vec::with_capacity(runs.len());
            for (extras, kept) in runs {
                if let (Some(c), Some((row, values))) = (capture.as_deref_mut(), kept) {
                    c.offer(row, values);
                }
                outs.push(extras);
            }
            let at = Group {
                first: g == 0,
                last: g + 1 == groups.len(),
            };
            f(b, batch, at, &outs)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::params::activation_params;
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
    fn pieces_of_a_batch_observe_like_the_whole_batch() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut batch: Vec<f32> = (0..1003).map(|_| normal(&mut rng) * 3.0).collect();
        // Exact zeros of both signs, a NaN and an infinity: the values where folds could
        // depend on order or on where a piece starts.
        batch[5] = 0.0;
        batch[17] = -0.0;
        batch[400] = f32::NAN;
        batch[999] = f32::INFINITY;
        let relu: Vec<f32> = batch.iter().map(|v| v.max(0.0)).collect();
        for data in [&batch, &relu] {
            for method in [
                Method::MinMax,
                Method::Percentile(99.9),
                Method::Entropy,
                Method::Mse,
            ] {
                let opts = ObserveOptions {
                    method,
                    moving_average: Some(0.01),
                    ..Default::default()
                };
                let mut whole = Observer::new(method.needs_histogram());
                let mut pieces = whole.clone();
                let mut again = whole.clone();
                // Two batches, the second wider (the histogram doubles its range mid-batch).
                let wider: Vec<f32> = data.iter().map(|v| v * 4.0).collect();
                for d in [data, &wider] {
                    whole.update(d, opts.moving_average);
                    let parts: Vec<&[f32]> = d.chunks(251).collect();
                    pieces.update_parts(&parts, opts.moving_average);
                    again.update_parts(&parts, opts.moving_average);
                }
                let (a, b, c) = (
                    whole.finish(&opts),
                    pieces.finish(&opts),
                    again.finish(&opts),
                );
                // Same cut, same bits.
                assert_eq!(format!("{b:?}"), format!("{c:?}"));
                // Another cut: the same values (only which zero an extreme of 0 carries may
                // differ).
                // (An infinity makes the moving average NaN, in both.)
                let same = |x: f32, y: f32| x == y || (x.is_nan() && y.is_nan());
                for (x, y) in [(a.min, b.min), (a.max, b.max), (a.lo, b.lo), (a.hi, b.hi)] {
                    assert!(same(x, y), "{method:?}: {a:?} vs {b:?}");
                }
                assert_eq!(a.quiet_mean_square.to_bits(), b.quiet_mean_square.to_bits());
                assert_eq!(whole.count, pieces.count);
            }
        }
    }

    /// The single pass (min, max, squares and bins at once, `scan_binned`) against the two
    /// passes it replaces (`scan_from`, then `Histogram::add_parts_within`): the same bits for
    /// min, max, every square lane and every count, on pieces that start mid-lane, carry NaN,
    /// infinities and zeros of both signs, fit the grid or widen it.
    #[test]
    fn one_pass_observation_is_the_two_passes() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let base: Vec<f32> = (0..(SPLIT_COUNTS_FROM + 1001))
            .map(|_| normal(&mut rng) * 2.0)
            .collect();
        let relu: Vec<f32> = base.iter().map(|v| v.max(0.0)).collect();
        let mut specials = base.clone();
        specials[3] = f32::NAN;
        specials[100] = -0.0;
        specials[101] = 0.0;
        specials[5000] = f32::INFINITY;
        let mut neg_zeros = relu.clone();
        neg_zeros[7] = -0.0;
        let all_nan = vec![f32::NAN; SPLIT_COUNTS_FROM + 3];
        let wider: Vec<f32> = base.iter().map(|v| v * 40.0).collect();
        for (name, data) in [
            ("normal", &base),
            ("relu", &relu),
            ("specials", &specials),
            ("relu with a -0", &neg_zeros),
            ("nan", &all_nan),
            ("wider", &wider),
        ] {
            for seen in [0usize, 3, 8, 13] {
                let mut reference = Observer::new(true);
                // An established grid (r = 8) and a batch already `seen` values in.
                reference.add_piece(&base[..SPLIT_COUNTS_FROM + seen]);
                reference.end_batch(None);
                reference.add_piece(&base[..seen]);
                let mut fused = reference.clone();
                let open = reference.open.unwrap_or(OpenBatch {
                    min: f32::INFINITY,
                    max: f32::NEG_INFINITY,
                    squares: SquareSum::default(),
                    len: 0,
                });
                let (a, b, sq) = scan_from(&[data], open.squares, open.len as usize);
                let h = reference.hist.as_mut().unwrap();
                if a <= b {
                    h.add_parts_within(&[data], 0f32.max(b).max(-a));
                }
                fused.add_piece(data);
                let (fo, fh) = (fused.open.unwrap(), fused.hist.as_ref().unwrap());
                let h = reference.hist.as_ref().unwrap();
                let want_min = open.min.min(a);
                let want_max = open.max.max(b);
                assert_eq!(
                    (fo.min.to_bits(), fo.max.to_bits()),
                    (want_min.to_bits(), want_max.to_bits()),
                    "{name} {seen}"
                );
                assert_eq!(
                    fo.squares.squares.map(f64::to_bits),
                    sq.squares.map(f64::to_bits),
                    "{name} {seen}"
                );
                assert_eq!(fo.squares.finite, sq.finite, "{name} {seen}");
                assert_eq!(
                    (fh.bin_width(), fh.exact_zeros, fh.total()),
                    (h.bin_width(), h.exact_zeros, h.total()),
                    "{name} {seen}"
                );
                assert!(fh.same_counts(h), "{name} {seen}");
                let opts = ObserveOptions {
                    method: Method::Percentile(99.9),
                    ..Default::default()
                };
                fused.end_batch(None);
                let mut r = reference.clone();
                r.open = Some(OpenBatch {
                    min: want_min,
                    max: want_max,
                    squares: sq,
                    len: open.len + data.len() as u64,
                });
                r.end_batch(None);
                assert_eq!(
                    format!("{:?}", fused.finish(&opts)),
                    format!("{:?}", r.finish(&opts)),
                    "{name} {seen}"
                );
            }
        }
        // The scratch counters are left zero.
        super::super::histogram::with_scratch(|s| assert!(s.iter().all(|&c| c == 0)));
    }

    /// The whole-set observer rebuilt from two folds' closed batches and merged histograms
    /// (`observers_merged_from_folds`) is the observer fed every piece: same bits of min, max,
    /// count, moving average, per-batch mean squares, histogram, and so of every method's
    /// range. Batches in pieces of both scan paths, growing magnitudes (the folds' grids
    /// differ), zeros of both signs, NaN, an all-NaN and an empty batch.
    #[test]
    fn whole_set_observer_from_folds_is_the_observer_of_everything() {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let mut batches: Vec<Vec<Vec<f32>>> = (0..7)
            .map(|b| {
                let scale = 1.0 + 5.0 * (b % 3) as f32 + b as f32;
                (0..3)
                    .map(|p| {
                        let len = if p == 1 { SPLIT_COUNTS_FROM + 77 } else { 901 };
                        (0..len).map(|_| normal(&mut rng) * scale).collect()
                    })
                    .collect()
            })
            .collect();
        batches[2][0][4] = -0.0;
        batches[2][0][5] = 0.0;
        batches[3][1][9] = f32::NAN;
        batches[4] = vec![vec![f32::NAN; 50]];
        batches[5] = vec![];
        for b in &mut batches[6] {
            b.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        for (with_histogram, moving_average) in [(true, None), (true, Some(0.01)), (false, None)] {
            let mut whole = Observer::new(with_histogram);
            let mut folds = [Observer::new(with_histogram), Observer::new(with_histogram)];
            let mut closed = Vec::new();
            for (b, batch) in batches.iter().enumerate() {
                let fold = &mut folds[b % 2];
                for piece in batch {
                    whole.add_piece(piece);
                    fold.add_piece(piece);
                }
                whole.end_batch(moving_average);
                closed.push(fold.open);
                fold.end_batch(moving_average);
            }
            let hists: Vec<Option<&Histogram>> = folds.iter().map(|f| f.hist.as_ref()).collect();
            let rebuilt = Observer::from_batches(&closed, &hists, moving_average).unwrap();
            assert_eq!(
                (rebuilt.min.to_bits(), rebuilt.max.to_bits(), rebuilt.count),
                (whole.min.to_bits(), whole.max.to_bits(), whole.count)
            );
            assert_eq!(
                rebuilt.ema.map(|(a, b)| (a.to_bits(), b.to_bits())),
                whole.ema.map(|(a, b)| (a.to_bits(), b.to_bits()))
            );
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&rebuilt.batch_mean_squares),
                bits(&whole.batch_mean_squares)
            );
            match (&rebuilt.hist, &whole.hist) {
                (Some(a), Some(b)) => assert!(a.same_counts(b)),
                (None, None) => {}
                _ => panic!("histogram on one side only"),
            }
            for method in [
                Method::MinMax,
                Method::Percentile(99.999),
                Method::Mse,
                Method::Entropy,
            ] {
                let opts = ObserveOptions {
                    method,
                    moving_average,
                    scheme: ActScheme::U8Asymmetric,
                };
                assert_eq!(
                    format!("{:?}", rebuilt.finish(&opts)),
                    format!("{:?}", whole.finish(&opts)),
                    "{method:?}"
                );
            }
        }
        // An infinite value: no exact merge, so no rebuilt observer (the caller observes again).
        let mut inf = Observer::new(true);
        inf.add_piece(&[1.0, f32::INFINITY]);
        let closed = vec![inf.open];
        inf.end_batch(None);
        let other = Observer::new(true);
        let hists = [inf.hist.as_ref(), other.hist.as_ref()];
        assert!(Observer::from_batches(&closed, &hists, None).is_none());
    }

    /// The AVX2 kernel against the portable one (where the CPU has AVX2).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_is_the_portable_one() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt"))
        {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut v: Vec<f32> = (0..4096).map(|_| normal(&mut rng) * 3.0).collect();
        for (i, x) in [
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            8.0,
            -8.0,
            1e-30,
            -1e-30,
        ]
        .into_iter()
        .enumerate()
        {
            v[i * 37] = x;
        }
        let relu: Vec<f32> = v.iter().map(|x| x.max(0.0)).collect();
        for data in [&v, &relu] {
            let piece = BinnedPiece {
                inv_w: FINE_BINS as f32 / 8.0,
                zeros: 0,
            };
            let run = |avx: bool| {
                let (mut lo, mut hi) = ([1.5f32; 8], [-1.5f32; 8]);
                let mut scratch = vec![0u32; WAYS * STRIDE];
                let squares = [0.25f64; 8];
                let r = if avx {
                    // SAFETY: AVX2 and POPCNT checked above; lengths as required.
                    unsafe {
                        blocks_binned_avx2(
                            data,
                            &mut lo,
                            &mut hi,
                            squares,
                            piece.inv_w,
                            &mut scratch,
                        )
                    }
                } else {
                    blocks_binned_portable(data, &mut lo, &mut hi, squares, &piece, &mut scratch)
                };
                // Counts per bin (which set took a value is not part of the result).
                let counts: Vec<u32> = (0..STRIDE)
                    .map(|i| (0..WAYS).map(|k| scratch[k * STRIDE + i]).sum())
                    .collect();
                (
                    lo.map(f32::to_bits),
                    hi.map(f32::to_bits),
                    r.0.map(f64::to_bits),
                    r.1,
                    r.2,
                    counts,
                )
            };
            assert_eq!(run(true), run(false));
        }
    }

    #[test]
    fn min_max_in_lanes_is_the_sequential_fold() {
        let seq = |d: &[f32]| {
            d.iter()
                .filter(|v| !v.is_nan())
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                })
        };
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN; 9],
            vec![0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0, -0.0, 0.0],
            vec![-0.0; 17],
            (0..37).map(|i| (i as f32 - 18.0).max(0.0)).collect(),
            (0..37)
                .map(|i| -(i as f32))
                .chain([-0.0, f32::NAN])
                .collect(),
        ];
        for d in &cases {
            let (lo, hi, _) = scan(&[d.as_slice()]);
            let (a, b) = seq(d);
            assert_eq!(
                (lo.to_bits(), hi.to_bits()),
                (a.to_bits(), b.to_bits()),
                "{d:?}"
            );
        }
    }

    #[test]
    fn pieces_cover_the_rows_in_order() {
        assert_eq!(pieces(1), vec![0..1]);
        for rows in 1..70 {
            let p = pieces(rows);
            assert_eq!(p.len(), rows.div_ceil(PIECE_ROWS));
            assert!(p.iter().all(|r| !r.is_empty() && r.len() <= PIECE_ROWS));
            assert_eq!(p.first().unwrap().start, 0);
            assert_eq!(p.last().unwrap().end, rows);
            assert!(p.windows(2).all(|w| w[0].end == w[1].start));
        }
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
