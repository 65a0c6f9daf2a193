//! Quantization parameters: ranges to (scale, zero point), and the quantize / dequantize maps.
//!
//! Activations, asymmetric uint8 (default): the range is first widened to contain 0, then
//! `scale = (hi - lo) / 255`, `zp = round(-lo / scale)` clamped to [0, 255]. Because zp is an
//! integer, 0.0 quantizes to exactly `zp` and dequantizes to exactly 0.0 (needed for zero
//! padding and ReLU). Symmetric int8: `scale = max(|lo|, |hi|) / 127`, zp 0.
//! Weights: symmetric int8, `scale = max|w| / 127` (or `/ 63` with reduce_range), zp 0.
//! A zero range gives scale 1.0 (any positive scale represents an all-zero tensor exactly), so
//! nothing ever divides by zero.
//! Bias: int32, `scale = s_in * s_w[c]`, zp 0, `q = clamp(round(b / scale))`.

use serde::Serialize;

/// How activations are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum ActScheme {
    /// uint8 with a zero point (ONNX Runtime's default for QDQ activations).
    #[default]
    U8Asymmetric,
    /// int8 with zero point 0.
    I8Symmetric,
}

/// Scale and zero point of one tensor (or one channel).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl QParams {
    /// Quantize with round-half-to-even (the ONNX QuantizeLinear rounding).
    pub fn quantize(&self, x: f32) -> i32 {
        let q = (x / self.scale).round_ties_even() as i64 + self.zero_point as i64;
        q.clamp(self.qmin as i64, self.qmax as i64) as i32
    }

    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    pub fn fake_quant(&self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// The float range this tensor can represent.
    pub fn representable(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

fn safe_scale(s: f32) -> f32 {
    if s.is_finite() && s > 0.0 {
        s
    } else {
        1.0
    }
}

/// Activation parameters for an observed range `[lo, hi]`.
pub fn activation_params(lo: f32, hi: f32, scheme: ActScheme) -> QParams {
    let lo = lo.min(0.0);
    let hi = hi.max(0.0);
    match scheme {
        ActScheme::U8Asymmetric => {
            let scale = safe_scale((hi - lo) / 255.0);
            let zp = (-lo / scale).round().clamp(0.0, 255.0) as i32;
            QParams {
                scale,
                zero_point: zp,
                qmin: 0,
                qmax: 255,
            }
        }
        ActScheme::I8Symmetric => {
            let scale = safe_scale(lo.abs().max(hi) / 127.0);
            QParams {
                scale,
                zero_point: 0,
                qmin: -127,
                qmax: 127,
            }
        }
    }
}

/// Symmetric int8 weight parameters for values whose largest magnitude is `amax`.
/// `reduce_range` uses 7 bits ([-63, 63]) for kernels that accumulate in 16 bits.
pub fn weight_params(amax: f32, reduce_range: bool) -> QParams {
    let q = if reduce_range { 63 } else { 127 };
    QParams {
        scale: safe_scale(amax / q as f32),
        zero_point: 0,
        qmin: -q,
        qmax: q,
    }
}

/// int32 bias value for bias `b` with scale `s_in * s_w`.
pub fn quantize_bias(b: f32, scale: f32) -> i32 {
    let q = (b as f64 / scale as f64).round();
    q.clamp(i32::MIN as f64, i32::MAX as f64) as i32
}

/// The int32 bias scale, kept strictly positive even for zero scales.
pub fn bias_scale(s_in: f32, s_w: f32) -> f32 {
    let s = s_in * s_w;
    if s.is_finite() && s > 0.0 {
        s
    } else {
        f32::MIN_POSITIVE
    }
}

/// Signal-to-quantization-noise ratio in dB, `10 log10(sum x^2 / sum (x - x_q)^2)`;
/// `f64::INFINITY` when the quantization is exact.
pub fn sqnr_db(x: &[f32], xq: &[f32]) -> f64 {
    let signal: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = x
        .iter()
        .zip(xq)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_exact_and_range_contains_zero() {
        for (lo, hi) in [(-1.3f32, 4.7), (0.5, 3.0), (-2.0, -0.5), (0.0, 6.0)] {
            let p = activation_params(lo, hi, ActScheme::U8Asymmetric);
            assert_eq!(p.fake_quant(0.0), 0.0, "{lo} {hi}");
            let (a, b) = p.representable();
            assert!(a <= lo.min(0.0) + p.scale && b >= hi.max(0.0) - p.scale);
        }
        let relu = activation_params(0.0, 6.0, ActScheme::U8Asymmetric);
        assert_eq!(relu.zero_point, 0);
        assert!((relu.scale - 6.0 / 255.0).abs() < 1e-9);
    }

    #[test]
    fn zero_ranges_do_not_divide_by_zero() {
        let p = activation_params(0.0, 0.0, ActScheme::U8Asymmetric);
        assert_eq!(p.scale, 1.0);
        assert_eq!(p.quantize(0.0), p.zero_point);
        assert_eq!(weight_params(0.0, false).scale, 1.0);
        assert!(bias_scale(0.0, 1.0) > 0.0);
    }

    #[test]
    fn bias_rounds_to_nearest_and_clamps() {
        assert_eq!(quantize_bias(0.26, 0.1), 3);
        assert_eq!(quantize_bias(-0.26, 0.1), -3);
        assert_eq!(quantize_bias(1e30, 1e-10), i32::MAX);
    }

    #[test]
    fn weight_scale_uses_127_or_63() {
        assert!((weight_params(2.54, false).scale - 0.02).abs() < 1e-7);
        assert!((weight_params(1.26, true).scale - 0.02).abs() < 1e-7);
    }
}
