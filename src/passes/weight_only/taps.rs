//! Per-(output channel, tap) int8 scales for convolution weights whose one-scale-per-channel
//! grid is too coarse: reparameterized (RepVGG-style) kernels, where a 1x1 branch folded into
//! the centre tap makes it several times larger than the other taps, so the centre sets each
//! channel's step and the outer taps keep few levels.
//!
//! ```text
//! before: x -> Conv(W[C_out, C_in, k...]) -> y
//! after:  W = Mul(Cast<to=FLOAT>(W_int8[C_out, C_in, k...]), S[C_out, 1, k...])
//!         x -> Conv(W) -> y          (float compute; ORT and tract fold the Cast·Mul at load)
//! ```
//! `S[c, 1, t] = max_i |W[c, i, t]| / 127`, `W_int8 = round(W / S)`: one scale per output
//! channel and kernel position, shared along the input channels. Opset-13 DequantizeLinear has
//! one scale axis, so the two-axis scale is written as a broadcast `Mul` (opset-21 block-wise
//! DequantizeLinear would say the same, but tract does not load it).
//!
//! When ([`judge`]): a float weight of rank >= 3 with at least [`MIN_INPUT_CHANNELS`] input
//! channels (the scales then cost at most a sixteenth of the int8 bytes), whose per-channel
//! int8 SQNR is below [`MAX_PER_CHANNEL_SQNR_DB`] and which per-tap scales raise by at least
//! [`MIN_GAIN_DB`]. Measured (BENCHMARKS.md, silero-vad): its `encoder.3` weight sits at
//! 32.3 dB per channel (37.7 per tap) and `encoder.2` at 34.5 (38.7); these two weights
//! per channel cost 0.4 point of speech F1, per tap none of it (F1 0.9947 -> 0.9960 with every
//! weight int8). The conv weights of resnet18, mobilenet_v2, efficientnet_b0, convnext_tiny
//! and densenet121 sit at 41 dB or more: none qualifies, their outputs are unchanged.
//!
//! `quantize` leaves such a Conv float (an integer kernel needs one scale per channel), and
//! `weight-only` stores its weight this way.

use crate::ir::{op, Graph};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::tensor;
use anyhow::{Context, Result};
use ndarray::ArrayD;

/// A weight at or above this per-channel SQNR keeps per-channel scales.
pub const MAX_PER_CHANNEL_SQNR_DB: f64 = 36.0;
/// Per-tap scales must raise the SQNR by at least this much to be worth a float layer.
pub const MIN_GAIN_DB: f64 = 3.0;
/// Fewer input channels than this: per-tap scales would cost too much next to the codes.
pub const MIN_INPUT_CHANNELS: usize = 16;

/// The two SQNRs of a weight that qualifies (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TapGain {
    pub per_channel_db: f64,
    pub per_tap_db: f64,
}

/// Round `a` to the int8 grid whose scales come from the max |value| over `group`, a function
/// from the flat index to the scale's index; returns (codes, scales, dequantized).
fn grid(
    a: &ArrayD<f32>,
    groups: usize,
    group: impl Fn(usize) -> usize,
) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let mut max = vec![0f32; groups];
    for (i, v) in a.iter().enumerate() {
        let m = &mut max[group(i)];
        *m = m.max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let mut codes = Vec::with_capacity(a.len());
    let mut deq = Vec::with_capacity(a.len());
    for (i, v) in a.iter().enumerate() {
        let s = scales[group(i)];
        let q = (v / s).round().clamp(-127.0, 127.0) as i8;
        codes.push(q);
        deq.push(q as f32 * s);
    }
    (codes, scales, deq)
}

fn sqnr_db(a: &ArrayD<f32>, deq: &[f32]) -> f64 {
    let (mut sig, mut noise) = (0f64, 0f64);
    for (v, d) in a.iter().zip(deq) {
        sig += (*v as f64).powi(2);
        noise += (*v as f64 - *d as f64).powi(2);
    }
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (sig / noise).log10()
}

/// `(C_out, C_in, taps)` of a conv-like weight.
fn dims(a: &ArrayD<f32>) -> Option<(usize, usize, usize)> {
    let s = a.shape();
    (s.len() >= 3).then(|| (s[0], s[1], s[2..].iter().product()))
}

/// Whether weight `a` needs per-(channel, tap) scales (module docs), with its two SQNRs.
pub fn judge(a: &ArrayD<f32>) -> Option<TapGain> {
    let (cout, cin, taps) = dims(a)?;
    if cin < MIN_INPUT_CHANNELS || taps < 2 || a.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let per = cin * taps;
    let (_, _, deq_c) = grid(a, cout, |i| i / per);
    let per_channel_db = sqnr_db(a, &deq_c);
    if per_channel_db >= MAX_PER_CHANNEL_SQNR_DB {
        return None;
    }
    let (_, _, deq_t) = grid(a, cout * taps, |i| (i / per) * taps + i % taps);
    let per_tap_db = sqnr_db(a, &deq_t);
    (per_tap_db - per_channel_db >= MIN_GAIN_DB).then_some(TapGain {
        per_channel_db,
        per_tap_db,
    })
}

/// Whether the float constant `w` of `g` qualifies.
pub fn judge_constant(g: &Graph, w: &str) -> Option<TapGain> {
    let t = g.constant(w)?;
    if tensor::data_type(t).ok() != Some(DataType::Float) {
        return None;
    }
    judge(&tensor::to_f32(t).ok()?)
}

/// Replace the float initializer `w` by `Mul(Cast(W_int8), S)` producing `w` (module docs);
/// returns the report row (axis `None`, `channels` = number of scales).
pub fn insert(g: &mut Graph, w: &str, node: &str) -> Result<super::WeightReport> {
    let t = g
        .constant(w)
        .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
    let (cout, cin, taps) = dims(&a).with_context(|| format!("weight '{w}' has rank < 3"))?;
    let per = cin * taps;
    let (codes, scales, deq) = grid(&a, cout * taps, |i| (i / per) * taps + i % taps);
    let mut scale_shape = a.shape().to_vec();
    scale_shape[1] = 1;
    let scale = ArrayD::from_shape_vec(scale_shape, scales.clone())?;
    let names = g.fresh_names(&[
        format!("{w}_quantized"),
        format!("{w}_tap_scale"),
        format!("{w}_Cast"),
        format!("{w}_cast"),
        format!("{w}_Mul"),
    ]);
    let mut cast = op::node("Cast", &names[2], &[&names[0]], &[&names[3]]);
    op::set_attr(&mut cast, op::attr_int("to", DataType::Float as i64));
    let mul = op::node("Mul", &names[4], &[&names[3], &names[1]], &[w]);
    let initializers = vec![
        tensor::from_i8(&names[0], a.shape(), &codes),
        tensor::from_f32(&names[1], &scale),
    ];
    let anchor = g.consumers(w).first().map(|&(ix, _)| ix);
    let backup = g.clone();
    g.initializers.shift_remove(w);
    g.apply(crate::ir::Patch {
        add: vec![cast, mul],
        initializers,
        anchor,
        ..Default::default()
    })
    .inspect_err(|_| *g = backup)
    .with_context(|| format!("per-tap int8 of weight '{w}' (node '{node}')"))?;
    Ok(super::WeightReport {
        tensor: w.to_string(),
        node: node.to_string(),
        axis: None,
        channels: scales.len(),
        min_scale: scales.iter().copied().fold(f32::INFINITY, f32::min),
        max_scale: scales.iter().copied().fold(0.0, f32::max),
        zero_channels: 0,
        sqnr_db: sqnr_db(&a, &deq),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reparameterized kernel: small 3-tap weights plus an identity branch folded into the
    /// centre tap (one large value per output channel, on its own input channel).
    fn reparam(cout: usize, cin: usize) -> ArrayD<f32> {
        ArrayD::from_shape_fn(vec![cout, cin, 3], |ix| {
            let (c, i, t) = (ix[0], ix[1], ix[2]);
            let v = (((c * 31 + i * 17 + t * 7) % 23) as f32 - 11.0) / 110.0;
            if t == 1 && i == c % cin {
                v + 2.0
            } else {
                v
            }
        })
    }

    #[test]
    fn a_dominant_centre_tap_qualifies_and_an_even_kernel_does_not() {
        let g = judge(&reparam(8, 32)).expect("centre-heavy kernel qualifies");
        assert!(g.per_channel_db < MAX_PER_CHANNEL_SQNR_DB);
        assert!(g.per_tap_db - g.per_channel_db >= MIN_GAIN_DB);
        let even = ArrayD::from_shape_fn(vec![8, 32, 3], |ix| {
            (((ix[0] * 31 + ix[1] * 17 + ix[2] * 7) % 23) as f32 - 11.0) / 11.0
        });
        assert_eq!(judge(&even), None);
        // Too few input channels: per-tap scales would cost too much.
        assert_eq!(judge(&reparam(8, 4)), None);
    }

    #[test]
    fn per_tap_scales_follow_the_max_over_input_channels() {
        let a = reparam(4, 16);
        let (codes, scales, deq) = grid(&a, 4 * 3, |i| (i / 48) * 3 + i % 3);
        for c in 0..4 {
            for t in 0..3 {
                let m = (0..16).map(|i| a[[c, i, t]].abs()).fold(0f32, f32::max);
                assert!((scales[c * 3 + t] - m / 127.0).abs() < 1e-7);
            }
        }
        assert!(codes.iter().any(|&q| q == 127 || q == -127));
        assert!(sqnr_db(&a, &deq) > 40.0);
    }
}
