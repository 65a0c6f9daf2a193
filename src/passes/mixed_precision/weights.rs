//! Weight quantization numerics of `mixed-precision`: what a weight becomes at each precision
//! and how many bytes it then takes. No graph changes here ([`super::emit`] writes them).
//!
//! Symmetric integer quantization, one scale per slot (a channel, or a block of a channel):
//! ```text
//! s = max|w| / qmax over the slot (qmax = 127 for int8, 7 for int4; s = 1 for an all-zero slot)
//! q = clamp(round_half_even(w / s), -qmax, qmax),   dequantized w' = q · s
//! ```
//! Per channel: slots along the output-channel axis. Block-wise int4 ([`int4_block`]): blocks of
//! `B` consecutive values along the input axis, the scale laid out as ONNX's block-wise
//! DequantizeLinear reads it (`w`'s shape with that axis divided by `B`, rounded up).
//! fp16: round to nearest even.
//!
//! Bytes written: fp32 `4n`, fp16 `2n`, int8 `n + 4C + C`, int4 `⌈n/2⌉ + 4C + ⌈C/2⌉` (f32 scale
//! and zero point per channel, `C` channels); block-wise int4 `⌈n/2⌉ + 4·#scales` (no zero
//! point).

use super::Precision;
use ndarray::{ArrayD, IxDyn};

/// Symmetric quantization to `bits` with one scale (`max|w| / qmax`) per slot, `slot_of` giving
/// each element's slot: integer values, scales, and the dequantized tensor.
fn quantize_slots(
    w: &ArrayD<f32>,
    slots: usize,
    slot_of: impl Fn(&IxDyn) -> usize,
    bits: u32,
) -> (Vec<i8>, Vec<f32>, ArrayD<f32>) {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let mut scales = vec![0f32; slots];
    for (idx, &v) in w.indexed_iter() {
        let s = &mut scales[slot_of(&idx)];
        *s = s.max(v.abs());
    }
    for s in scales.iter_mut() {
        *s /= qmax;
        if !(s.is_finite() && *s > 0.0) {
            *s = 1.0;
        }
    }
    let mut q = Vec::with_capacity(w.len());
    let mut deq = ArrayD::<f32>::zeros(w.raw_dim());
    for ((idx, &v), d) in w.indexed_iter().zip(deq.iter_mut()) {
        let s = scales[slot_of(&idx)];
        let r = (v / s).round_ties_even().clamp(-qmax, qmax);
        q.push(r as i8);
        *d = r * s;
    }
    (q, scales, deq)
}

/// Symmetric per-channel quantization along `axis` to `bits` (8 or 4): integer values, scales,
/// and the dequantized tensor.
pub fn quantize_weight(
    w: &ArrayD<f32>,
    axis: usize,
    bits: u32,
) -> (Vec<i8>, Vec<f32>, ArrayD<f32>) {
    quantize_slots(w, w.shape()[axis], |idx| idx[axis], bits)
}

/// The int4 block size that applies to a weight of `shape`: `block` when the input axis holds at
/// least `block` values, else `None` (per output channel).
pub fn int4_block(shape: &[usize], in_axis: usize, block: Option<usize>) -> Option<usize> {
    block.filter(|&b| b > 0 && shape.get(in_axis).is_some_and(|&d| d >= b))
}

/// Symmetric block-wise quantization to `bits`: blocks of `block` consecutive values along
/// `axis`, one scale (`max|w| / qmax`) each, in the layout of ONNX block-wise DequantizeLinear
/// (the scale has `w`'s shape with `axis` divided by `block`, rounded up). Integer values,
/// scales, and the dequantized tensor.
pub fn quantize_blocked(
    w: &ArrayD<f32>,
    axis: usize,
    block: usize,
    bits: u32,
) -> (Vec<i8>, ArrayD<f32>, ArrayD<f32>) {
    let mut sshape = w.shape().to_vec();
    sshape[axis] = sshape[axis].div_ceil(block);
    let mut sstride = vec![1usize; sshape.len()];
    for k in (0..sshape.len().saturating_sub(1)).rev() {
        sstride[k] = sstride[k + 1] * sshape[k + 1];
    }
    let slot_of = |idx: &IxDyn| -> usize {
        (0..sshape.len())
            .map(|k| (if k == axis { idx[k] / block } else { idx[k] }) * sstride[k])
            .sum()
    };
    let (q, scales, deq) = quantize_slots(w, sshape.iter().product(), slot_of, bits);
    let scales = ArrayD::from_shape_vec(IxDyn(&sshape), scales).expect("scale shape");
    (q, scales, deq)
}

/// [`round_trip`], with int4 block-wise along `in_axis` where [`int4_block`] applies.
pub fn round_trip_in(
    w: &ArrayD<f32>,
    out_axis: usize,
    in_axis: usize,
    p: Precision,
    block: Option<usize>,
) -> ArrayD<f32> {
    match (p, int4_block(w.shape(), in_axis, block)) {
        (Precision::Int4, Some(b)) => quantize_blocked(w, in_axis, b, 4).2,
        _ => round_trip(w, out_axis, p),
    }
}

/// `W` after a round trip through precision `p` (int8/int4 per output channel).
pub fn round_trip(w: &ArrayD<f32>, axis: usize, p: Precision) -> ArrayD<f32> {
    match p {
        Precision::Fp32 => w.clone(),
        Precision::Fp16 => w.mapv(|v| half::f16::from_f32(v).to_f32()),
        Precision::Int8 => quantize_weight(w, axis, 8).2,
        Precision::Int4 => quantize_weight(w, axis, 4).2,
    }
}

/// Bytes written for an int4 weight of `shape` in blocks of `block` along `in_axis` (scales
/// only, no zero point).
pub fn blocked_int4_bytes(shape: &[usize], in_axis: usize, block: usize) -> u64 {
    let n: usize = shape.iter().product();
    let d = shape[in_axis].max(1);
    (n.div_ceil(2) + 4 * (n / d) * d.div_ceil(block)) as u64
}

/// Bytes written for a weight of `n` values and `channels` output channels at precision `p`.
pub fn weight_bytes(n: usize, channels: usize, p: Precision) -> u64 {
    let (n, c) = (n as u64, channels as u64);
    match p {
        Precision::Fp32 => 4 * n,
        Precision::Fp16 => 2 * n,
        Precision::Int8 => n + 5 * c,
        Precision::Int4 => n.div_ceil(2) + 4 * c + c.div_ceil(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_int4_matches_the_onnx_block_wise_dequantize_formula() {
        // Conv-like [O=3, I=5, 2, 1], blocks of 2 along axis 1: 3 blocks (the last holds one
        // input channel), so the scale is [3, 3, 2, 1].
        let shape = [3usize, 5, 2, 1];
        let n: usize = shape.iter().product();
        let w = ArrayD::from_shape_vec(
            IxDyn(&shape),
            (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
                .collect(),
        )
        .unwrap();
        let (q, scales, deq) = quantize_blocked(&w, 1, 2, 4);
        assert_eq!(scales.shape(), &[3, 3, 2, 1]);
        assert!(q.iter().all(|&v| (-7..=7).contains(&v)));
        let q64: Vec<i64> = q.iter().map(|&v| v as i64).collect();
        let s: Vec<f32> = scales.iter().copied().collect();
        let reference =
            crate::runtime::simulate::dequantize(&q64, &shape, &s, scales.shape(), None, 1, 2)
                .unwrap();
        assert_eq!(deq.iter().copied().collect::<Vec<_>>(), reference);
        // Each block's largest |w| lands on ±7 exactly.
        for o in 0..3 {
            for b in 0..3 {
                for k in 0..2 {
                    let block: Vec<f32> = (2 * b..(2 * b + 2).min(5))
                        .map(|i| w[[o, i, k, 0]])
                        .collect();
                    let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let want = if m > 0.0 { m / 7.0 } else { 1.0 };
                    assert!((scales[[o, b, k, 0]] - want).abs() <= 1e-7 * m.max(1.0));
                }
            }
        }
        // Bytes: ⌈30/2⌉ values + 4 per scale (18 scales).
        assert_eq!(blocked_int4_bytes(&shape, 1, 2), 15 + 4 * 18);
        // Blocks apply only where the input axis holds a whole block.
        assert_eq!(int4_block(&shape, 1, Some(8)), None);
        assert_eq!(int4_block(&shape, 1, Some(5)), Some(5));
        // Finer scales: never a larger error than per output channel.
        let per_channel = round_trip(&w, 0, Precision::Int4);
        let err = |d: &ArrayD<f32>| -> f32 { w.iter().zip(d).map(|(a, b)| (a - b).powi(2)).sum() };
        assert!(err(&deq) <= err(&per_channel));
    }
}
