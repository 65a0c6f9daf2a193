//! The calibration histogram and the range math of the histogram methods (which method uses
//! what is in [`super::observe`]).
//!
//! Histogram range: adaptive re-binning, so the data is read once, in pieces of any size. The
//! histogram covers `[-r, r]` with `2 * FINE_BINS` bins of width `w = r / FINE_BINS`; `r` is a
//! power of two, the smallest one `> max|x|` seen so far (at least [`MIN_RANGE`]), and doubles
//! whenever a piece exceeds it, merging pairs of bins. The data therefore covers at least half
//! the bins (>= 4096 of width < max|x|/4096 per side), fine enough that the methods' own
//! binnings (2048 bins for entropy) are resampled from it with sub-bin error.
//!
//! The counts do not depend on how the values are cut into pieces, nor on their order: since `w`
//! is a power of two, `x / w` is exact in f32 and the bin `floor(x / w) + FINE_BINS` (clamped to
//! the bins) is exact; doubling maps bin `FINE_BINS + k` to `FINE_BINS + floor(k / 2)`, which is
//! `floor(x / 2w)`, the bin the value would have had on the wider grid. So calibration can
//! stream a batch row by row (bounded memory) and get the histogram of the whole batch.
//!
//! - [`Histogram::quantile`]: the `q` quantile of the signed distribution, interpolated
//!   linearly inside a bin.
//! - [`entropy_threshold`]: the TensorRT / MXNet KL threshold over an |x| histogram;
//!   `abs_quantile` bounds how much of the distribution it may clip.
//! - [`mse_range`]: the range `t * [min, max]`, `t` in (0, 1] (200 steps), minimizing the
//!   expected squared error of fake-quantizing the bin centres on the activation scheme's grid.

use crate::calibrate::params::{activation_params, ActScheme};
use std::borrow::Cow;

/// Bins per sign in the fine histogram.
pub const FINE_BINS: usize = 8192;

/// Values from which one batch's counts are split over four sets of counters (below it,
/// zeroing them costs more than it saves).
pub(super) const SPLIT_COUNTS_FROM: usize = 1 << 15;

/// Smallest histogram range: a piece whose max |x| is below it (but not 0) gets this range, so
/// that `w` stays a normal power of two and `x / w` exact.
pub const MIN_RANGE: f32 = 1.0 / (1u64 << 62) as f32 / (1u64 << 38) as f32;

/// The smallest power of two `> amax` (at least [`MIN_RANGE`]); `amax` itself when it is not
/// finite. Strictly above, so that no finite value is clamped into an end bin (where doubling
/// would not map it to its bin on the wider grid).
fn pow2_above(amax: f32) -> f32 {
    if !amax.is_finite() {
        return amax;
    }
    let mut r = MIN_RANGE;
    while r <= amax {
        r *= 2.0;
    }
    r
}

/// The bins of eight values (as [`Histogram::add_parts_within`]'s `bin`: `floor(v * inv_w)`
/// clamped to `[-FINE_BINS, FINE_BINS - 1]`, plus `FINE_BINS`, NaN to `discard`) and how many
/// are exact zeros, four at a time in SSE2 registers: `mulps` by a power of two is exact as
/// `mulss` is, `maxps`/`minps` clamp as `f32::max`/`min` do on a non-NaN value, the floor is a
/// truncation corrected by one where it rounded up (negative non-integers), and the NaN lanes
/// are replaced by `discard`, so the bins are those of the scalar code.
#[cfg(target_arch = "x86_64")]
fn block_bins(b: &[f32; 8], inv_w: f32, discard: usize) -> ([u32; 8], u64) {
    use std::arch::x86_64::*;
    let mut at = [0u32; 8];
    let mut zeros = 0u64;
    // SAFETY: SSE2 is part of the x86_64 baseline; loads and stores are unaligned ones on
    // arrays of exactly 4 lanes per step.
    unsafe {
        let vi = _mm_set1_ps(inv_w);
        let (low, top) = (
            _mm_set1_ps(-(FINE_BINS as f32)),
            _mm_set1_ps((FINE_BINS - 1) as f32),
        );
        let (zero, offset) = (_mm_setzero_ps(), _mm_set1_epi32(FINE_BINS as i32));
        let nan_bin = _mm_set1_epi32(discard as i32);
        for h in 0..2 {
            let v = _mm_loadu_ps(b.as_ptr().add(4 * h));
            let x = _mm_mul_ps(v, vi);
            let nan = _mm_castps_si128(_mm_cmpunord_ps(x, x));
            let x = _mm_min_ps(_mm_max_ps(x, low), top);
            let t = _mm_cvttps_epi32(x);
            // -1 where the truncation is above x.
            let up = _mm_castps_si128(_mm_cmpgt_ps(_mm_cvtepi32_ps(t), x));
            let i = _mm_add_epi32(_mm_add_epi32(t, up), offset);
            let i = _mm_or_si128(_mm_and_si128(nan, nan_bin), _mm_andnot_si128(nan, i));
            _mm_storeu_si128(at.as_mut_ptr().add(4 * h) as *mut __m128i, i);
            zeros += _mm_movemask_ps(_mm_cmpeq_ps(v, zero)).count_ones() as u64;
        }
    }
    (at, zeros)
}

#[cfg(not(target_arch = "x86_64"))]
fn block_bins(b: &[f32; 8], inv_w: f32, discard: usize) -> ([u32; 8], u64) {
    let mut at = [0u32; 8];
    let mut zeros = 0u64;
    for k in 0..8 {
        at[k] = scalar_bin(b[k], inv_w, discard) as u32;
        zeros += (b[k] == 0.0) as u64;
    }
    (at, zeros)
}

/// The bin of one value (see [`block_bins`]).
fn scalar_bin(v: f32, inv_w: f32, discard: usize) -> usize {
    let x = v * inv_w;
    if x.is_nan() {
        return discard;
    }
    let x = x.max(-(FINE_BINS as f32)).min((FINE_BINS - 1) as f32);
    let t = x as i32;
    let floor = if (t as f32) > x { t - 1 } else { t };
    (floor + FINE_BINS as i32) as usize
}

/// Sets of counters ([`Histogram::add_parts_within`]'s large-piece path and [`BinnedPiece`]):
/// consecutive values go to set `k % WAYS`, so values landing in one bin one after the other
/// do not wait on each other's increment.
pub(super) const WAYS: usize = 4;
/// Counters per set: the bins and a discard slot for NaN.
pub(super) const STRIDE: usize = 2 * FINE_BINS + 1;

thread_local! {
    /// One thread's [`WAYS`] sets of counters, all zero between uses ([`BinnedPiece`]): kept
    /// instead of allocated and zeroed whole for every piece.
    static SCRATCH: std::cell::RefCell<Vec<u32>> = std::cell::RefCell::new(vec![0; WAYS * STRIDE]);
}

/// A piece binned on the histogram's current grid before its max |x| was known (the observers'
/// single pass, `observe::scan_binned`): the counts wait in this thread's scratch counters
/// until [`Histogram::take_binned`] adds them (the grid was wide enough) or drops them (it was
/// not; the piece is then binned again after the doubling).
pub(super) struct BinnedPiece {
    /// `1 / w` of the grid the values were binned on.
    pub inv_w: f32,
    /// Exact zeros among the values.
    pub zeros: u64,
}

impl BinnedPiece {
    /// The bin of `v` on this grid (NaN: the discard slot), as [`block_bins`].
    pub fn bin(&self, v: f32) -> usize {
        scalar_bin(v, self.inv_w, 2 * FINE_BINS)
    }

    /// The bins of a block of eight values and how many are exact zeros, as [`block_bins`].
    #[inline]
    pub fn block(&self, b: &[f32; 8]) -> ([u32; 8], u64) {
        block_bins(b, self.inv_w, 2 * FINE_BINS)
    }
}

/// Run `f` with this thread's scratch counters (see [`BinnedPiece`]); `f` leaves them zero.
pub(super) fn with_scratch<T>(f: impl FnOnce(&mut [u32]) -> T) -> T {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
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
    pub(super) exact_zeros: u64,
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
        self.add_parts(&[data]);
    }

    /// [`Histogram::add`] of the concatenation of `parts` (one batch observed in pieces): the
    /// same counts and the same range, without joining them.
    pub fn add_parts(&mut self, parts: &[&[f32]]) {
        let amax = parts
            .iter()
            .fold(0f32, |m, p| p.iter().fold(m, |m, &v| m.max(v.abs())));
        self.add_parts_within(parts, amax);
    }

    /// [`Histogram::add_parts`] when the largest |x| of the parts (NaN ignored) is known
    /// already.
    pub(super) fn add_parts_within(&mut self, parts: &[&[f32]], amax: f32) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if amax == 0.0 && self.r == 0.0 {
            self.pending_zeros += len as u64;
            self.exact_zeros += len as u64;
            return;
        }
        if self.r == 0.0 {
            self.r = pow2_above(amax);
            self.counts[FINE_BINS] += std::mem::take(&mut self.pending_zeros);
        }
        while amax >= self.r && self.r.is_finite() {
            self.double();
        }
        let inv_w = FINE_BINS as f32 / self.r;
        // The bin of x is floor(x / w) + FINE_BINS clamped to the bins (exact: w is a power of
        // two). NaN goes to a discard slot past the last bin. Exact zeros fall in the bin of 0
        // like any value and are also counted apart, without a branch (a ReLU output's zeros
        // come in no predictable order).
        let discard = 2 * FINE_BINS;
        let top = 2 * FINE_BINS - 1;
        let bin = |v: f32| scalar_bin(v, inv_w, discard);
        let mut zeros = 0u64;
        if len < SPLIT_COUNTS_FROM {
            for part in parts {
                for &v in *part {
                    zeros += (v == 0.0) as u64;
                    let i = bin(v);
                    if i != discard {
                        self.counts[i] += 1;
                    }
                }
            }
        } else {
            // Four sets of counters taking consecutive values in turn, summed at the end
            // (integer counts: exact in any order): values falling in one bin one after the
            // other (the zeros of a ReLU, a saturated tail) no longer wait on each other's
            // increment of the same counter.
            const BLOCK: usize = 8;
            let stride = STRIDE;
            let mut ways = vec![0u32; WAYS * stride];
            let flush = |ways: &mut Vec<u32>, counts: &mut Vec<u64>| {
                for k in 0..WAYS {
                    for (c, &x) in counts
                        .iter_mut()
                        .zip(&ways[k * stride..k * stride + top + 1])
                    {
                        *c += x as u64;
                    }
                }
                ways.iter_mut().for_each(|x| *x = 0);
            };
            for part in parts {
                // At most u32::MAX values per counter between flushes.
                for chunk in part.chunks(1 << 30) {
                    let blocks = chunk.chunks_exact(BLOCK);
                    let rest = blocks.remainder();
                    for b in blocks {
                        let (at, z) = block_bins(b.try_into().expect("a block"), inv_w, discard);
                        zeros += z;
                        for (k, &i) in at.iter().enumerate() {
                            ways[(k % WAYS) * stride + i as usize] += 1;
                        }
                    }
                    for &v in rest {
                        zeros += (v == 0.0) as u64;
                        ways[bin(v)] += 1;
                    }
                    flush(&mut ways, &mut self.counts);
                }
            }
        }
        self.exact_zeros += zeros;
    }

    /// The `1 / w` to bin a piece with before its max |x| is known: the current grid's, once
    /// the histogram has a finite range.
    pub(super) fn grid(&self) -> Option<f32> {
        (self.r > 0.0 && self.r.is_finite()).then(|| FINE_BINS as f32 / self.r)
    }

    /// Take a piece binned into `scratch` ([`BinnedPiece`], values of non-NaN extremes `min`
    /// and `max`, `min <= max` unless every value was NaN): when `max |x| < r` its counts are
    /// exactly those [`Histogram::add_parts_within`] would add (same grid, no doubling), and
    /// they are added; otherwise nothing is, and `false` says to bin the piece again. Either
    /// way the scratch counters are left zero (only the bins between those of `min` and `max`
    /// and the discard slots can be non-zero).
    pub(super) fn take_binned(
        &mut self,
        scratch: &mut [u32],
        piece: &BinnedPiece,
        min: f32,
        max: f32,
    ) -> bool {
        let discard = 2 * FINE_BINS;
        for k in 0..WAYS {
            scratch[k * STRIDE + discard] = 0;
        }
        if min > max {
            // Only NaN: nothing was counted, nothing changes (as `add_parts_within` is not
            // called for such a piece).
            return true;
        }
        let (lo, hi) = (piece.bin(min), piece.bin(max));
        let fits = 0f32.max(max).max(-min) < self.r && piece.inv_w == FINE_BINS as f32 / self.r;
        for k in 0..WAYS {
            let set = &mut scratch[k * STRIDE + lo..=k * STRIDE + hi];
            if fits {
                for (c, x) in self.counts[lo..=hi].iter_mut().zip(set.iter()) {
                    *c += *x as u64;
                }
            }
            set.iter_mut().for_each(|x| *x = 0);
        }
        if fits {
            self.exact_zeros += piece.zeros;
        }
        fits
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

    /// Whether the range is finite (no infinite value seen), so that [`Histogram::merge`] is
    /// exact.
    pub fn range_is_finite(&self) -> bool {
        self.r.is_finite()
    }

    /// Add `other`'s counts, as if its values had been added to this histogram: the range
    /// becomes the wider of the two and the narrower side's counts are doubled up to it. Exact
    /// (the counts, range and zeros of one histogram fed both sets of values, in any order and
    /// cut), since a histogram's range is the smallest power of two above every |x| it saw
    /// and a doubled bin is the bin its values have on the wider grid (module docs). Not exact
    /// when either range is infinite (an infinite value was seen: what was binned before it
    /// collapses, what comes after goes to the middle bins, so the counts depend on the
    /// order): then nothing is added and `false` is returned.
    pub fn merge(&mut self, other: &Histogram) -> bool {
        if !self.range_is_finite() || !other.range_is_finite() {
            return false;
        }
        self.exact_zeros += other.exact_zeros;
        if other.r == 0.0 {
            // Only zeros so far on the other side: they wait with ours, or go to the bin of 0.
            if self.r == 0.0 {
                self.pending_zeros += other.pending_zeros;
            } else {
                self.counts[FINE_BINS] += other.pending_zeros;
            }
            return true;
        }
        if self.r == 0.0 {
            self.r = other.r;
            self.counts[FINE_BINS] += std::mem::take(&mut self.pending_zeros);
        }
        while self.r < other.r {
            self.double();
        }
        let mut o = Cow::Borrowed(other);
        while o.r < self.r {
            o.to_mut().double();
        }
        for (c, &x) in self.counts.iter_mut().zip(&o.counts) {
            *c += x;
        }
        true
    }

    /// The same range, counts and zeros as `other` (tests).
    #[cfg(test)]
    pub(super) fn same_counts(&self, other: &Histogram) -> bool {
        (self.r, &self.counts, self.pending_zeros, self.exact_zeros)
            == (
                other.r,
                &other.counts,
                other.pending_zeros,
                other.exact_zeros,
            )
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

/// The `q` quantile of |x| from an |x| histogram over `[0, amax]` (upper bin edge).
pub(super) fn abs_quantile(hist: &[f64], amax: f32, q: f64) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_bins_are_the_floor_of_x_over_w() {
        let (r, discard) = (4.0f32, 2 * FINE_BINS);
        let w = r / FINE_BINS as f32;
        let inv_w = 1.0 / w;
        // The bin in f64 (exact here): floor(v / w) + FINE_BINS, clamped.
        let exact = |v: f32| -> usize {
            if v.is_nan() {
                return discard;
            }
            let f = (v as f64 / w as f64).floor();
            (f.clamp(-(FINE_BINS as f64), (FINE_BINS - 1) as f64) as i64 + FINE_BINS as i64)
                as usize
        };
        let mut values = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            r,
            -r,
            2.0 * r,
            -2.0 * r,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            -1e-30,
        ];
        // Values on and next to bin edges, where rounding decides.
        for k in [-8192i32, -4097, -1, 1, 17, 4095, 8191] {
            let edge = k as f32 * w;
            values.extend([
                edge,
                f32::from_bits(edge.to_bits() + 1),
                f32::from_bits(edge.to_bits() - 1),
                edge * 0.999_999_9,
            ]);
        }
        values.extend((0..400).map(|i| ((i as f32) * 0.37).sin() * 4.5));
        while values.len() % 8 != 0 {
            values.push(1.0);
        }
        for b in values.chunks_exact(8) {
            let (at, zeros) = block_bins(b.try_into().unwrap(), inv_w, discard);
            for (k, &v) in b.iter().enumerate() {
                assert_eq!(at[k] as usize, exact(v), "value {v}");
                assert_eq!(scalar_bin(v, inv_w, discard), exact(v), "value {v}");
            }
            assert_eq!(zeros, b.iter().filter(|&&v| v == 0.0).count() as u64);
        }
    }

    #[test]
    fn counts_do_not_depend_on_pieces_or_their_order() {
        // Growing magnitudes (several doublings), both zeros, values on bin edges of the first
        // grids, and more than SPLIT_COUNTS_FROM values in one piece (the vector path).
        let mut v: Vec<f32> = (0..90_000)
            .map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i / 10_000) as f32 * 3.0))
            .collect();
        v.extend([
            0.0,
            -0.0,
            0.25,
            -0.25,
            1.0 / 4096.0,
            -1.0 / 8192.0,
            1.0,
            -1.0,
            2.0,
            64.0,
        ]);
        let mut whole = Histogram::default();
        whole.add(&v);
        for size in [1usize, 7, 4096, 40_000] {
            let mut h = Histogram::default();
            for piece in v.chunks(size) {
                h.add(piece);
            }
            assert_eq!(
                (h.r, &h.counts),
                (whole.r, &whole.counts),
                "pieces of {size}"
            );
            assert_eq!(h.exact_zeros, whole.exact_zeros);
            let mut rev = Histogram::default();
            for piece in v.chunks(size).rev() {
                rev.add(piece);
            }
            assert_eq!(
                (rev.r, &rev.counts),
                (whole.r, &whole.counts),
                "reversed {size}"
            );
        }
        // r is the smallest power of two above max |x|.
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(whole.r > amax && whole.r / 2.0 <= amax);
        assert_eq!(whole.r.to_bits() & 0x007f_ffff, 0);
    }

    /// Histograms of interleaved pieces, merged, are the histogram of all the values: same
    /// range, counts and zeros, whichever side is wider, holds only zeros or nothing.
    #[test]
    fn merged_histograms_are_the_histogram_of_both() {
        let v: Vec<f32> = (0..120_000)
            .map(|i| ((i as f32) * 0.377).sin() * (0.5 + (i / 20_000) as f32 * 7.0))
            .map(|x| if (x * 100.0) as i32 % 5 == 0 { 0.0 } else { x })
            .collect();
        let zeros = vec![0.0f32, -0.0, 0.0];
        let cases: Vec<(&str, Vec<&[f32]>)> = vec![
            ("interleaved", v.chunks(7_000).collect()),
            ("small pieces", v.chunks(333).collect()),
            (
                "zeros first",
                std::iter::once(&zeros[..])
                    .chain(v.chunks(50_000))
                    .collect(),
            ),
            (
                "only zeros on one side",
                vec![&zeros[..], &v[..60_000], &zeros[..]],
            ),
            ("one side empty", vec![&v[..]]),
        ];
        for (name, pieces) in cases {
            let mut whole = Histogram::default();
            let mut folds = [Histogram::default(), Histogram::default()];
            for (k, p) in pieces.iter().enumerate() {
                whole.add(p);
                folds[k % 2].add(p);
            }
            // Either way round.
            for order in [[0, 1], [1, 0]] {
                let mut merged = folds[order[0]].clone();
                assert!(merged.merge(&folds[order[1]]), "{name}");
                assert!(merged.same_counts(&whole), "{name} {order:?}");
                assert_eq!(merged.total(), whole.total(), "{name}");
            }
        }
        // Only zeros on both sides: they stay pending.
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.add(&zeros);
        b.add(&zeros[..1]);
        let mut whole = a.clone();
        whole.add(&zeros[..1]);
        assert!(a.merge(&b));
        assert!(a.same_counts(&whole));
        // An infinite range is refused, and nothing changes.
        let mut inf = Histogram::default();
        inf.add(&[1.0, f32::INFINITY]);
        let mut h = Histogram::default();
        h.add(&v[..1000]);
        let before = h.clone();
        assert!(!h.merge(&inf));
        assert!(h.same_counts(&before));
    }

    #[test]
    fn histogram_doubling_keeps_every_count() {
        let mut h = Histogram::default();
        h.add(&[0.0, 0.0]);
        h.add(&[0.1, -0.1]);
        h.add(&[100.0, -3.0, 0.05]);
        assert_eq!(h.total(), 7);
        assert_eq!(h.r, 128.0);
        let abs = h.abs_histogram(2048, 100.0);
        assert!((abs.iter().sum::<f64>() - 7.0).abs() < 1e-9);
    }
}
