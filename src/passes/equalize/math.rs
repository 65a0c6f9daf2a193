//! The numbers behind equalization, on plain ndarrays: which weight element belongs to which
//! output / input channel ([`ChannelMap`]), per-channel ranges, the equalizing scales, and
//! simulated symmetric int8 weight quantization with its SQNR.
//!
//! Everything here is independent of the graph so it can be tested against brute force.

use crate::ir::layer::LayerKind;
use anyhow::{ensure, Result};
use ndarray::ArrayD;

/// Where each element of a layer's weight sits: its output channel and input channel.
///
/// Layouts (see `ir::layer`): Conv `[Cout, Cin/g, k...]`, ConvTranspose `[Cin, Cout/g, k...]`,
/// Gemm `[K, N]` (`transB = 0`) or `[N, K]` (`transB = 1`), MatMul `[K, N]`. For a grouped
/// Conv, element `(o, j, ...)` reads input channel `(o / (Cout/g)) * (Cin/g) + j`; a depthwise
/// Conv (`Cin/g = 1`) thus maps row `i` to input channel `i` (times the depth multiplier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelMap {
    kind: MapKind,
    d0: usize,
    d1: usize,
    /// Product of the dims after the first two (kernel elements; 1 for 2-D weights).
    rest: usize,
    /// `d0 / group` for Conv and ConvTranspose.
    rows_per_group: usize,
    pub n_out: usize,
    pub n_in: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapKind {
    Conv,
    ConvTranspose,
    /// `[in, out]`: Gemm transB = 0, MatMul.
    InOut,
    /// `[out, in]`: Gemm transB = 1.
    OutIn,
}

impl ChannelMap {
    pub fn new(kind: LayerKind, shape: &[usize]) -> Result<ChannelMap> {
        ensure!(
            shape.len() >= 2,
            "weight of rank {} has no channels",
            shape.len()
        );
        let (d0, d1) = (shape[0], shape[1]);
        let rest: usize = shape[2..].iter().product();
        let (mk, group) = match kind {
            LayerKind::Conv { group } => (MapKind::Conv, group),
            LayerKind::ConvTranspose { group } => (MapKind::ConvTranspose, group),
            LayerKind::Gemm { trans_b: false } | LayerKind::MatMul => (MapKind::InOut, 1),
            LayerKind::Gemm { trans_b: true } => (MapKind::OutIn, 1),
        };
        ensure!(
            group >= 1 && d0 % group == 0,
            "weight dim 0 ({d0}) is not a multiple of group {group}"
        );
        let (n_out, n_in) = match mk {
            MapKind::Conv => (d0, d1 * group),
            MapKind::ConvTranspose => (d1 * group, d0),
            MapKind::InOut => (d1, d0),
            MapKind::OutIn => (d0, d1),
        };
        Ok(ChannelMap {
            kind: mk,
            d0,
            d1,
            rest,
            rows_per_group: d0 / group,
            n_out,
            n_in,
        })
    }

    /// Number of weight elements.
    pub fn len(&self) -> usize {
        self.d0 * self.d1 * self.rest
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(output channel, input channel)` of the weight element at row-major index `e`.
    pub fn out_in(&self, e: usize) -> (usize, usize) {
        let a = e / (self.d1 * self.rest);
        let b = (e / self.rest) % self.d1;
        match self.kind {
            MapKind::Conv => (a, (a / self.rows_per_group) * self.d1 + b),
            MapKind::ConvTranspose => ((a / self.rows_per_group) * self.d1 + b, a),
            MapKind::InOut => (b, a),
            MapKind::OutIn => (a, b),
        }
    }

    fn check(&self, w: &ArrayD<f64>) -> Result<()> {
        ensure!(
            w.len() == self.len(),
            "weight has {} values, its channel map expects {}",
            w.len(),
            self.len()
        );
        Ok(())
    }

    /// `max |W|` over each output channel's elements.
    pub fn out_ranges(&self, w: &ArrayD<f64>) -> Result<Vec<f64>> {
        self.check(w)?;
        let mut r = vec![0.0f64; self.n_out];
        for (e, v) in w.iter().enumerate() {
            let o = self.out_in(e).0;
            r[o] = r[o].max(v.abs());
        }
        Ok(r)
    }

    /// `max |W|` over each input channel's elements.
    pub fn in_ranges(&self, w: &ArrayD<f64>) -> Result<Vec<f64>> {
        self.check(w)?;
        let mut r = vec![0.0f64; self.n_in];
        for (e, v) in w.iter().enumerate() {
            let i = self.out_in(e).1;
            r[i] = r[i].max(v.abs());
        }
        Ok(r)
    }

    /// `W[e] *= f[out(e)]`.
    pub fn scale_out(&self, w: &mut ArrayD<f64>, f: &[f64]) -> Result<()> {
        self.check(w)?;
        ensure!(
            f.len() == self.n_out,
            "{} factors for {} output channels",
            f.len(),
            self.n_out
        );
        for (e, v) in w.iter_mut().enumerate() {
            *v *= f[self.out_in(e).0];
        }
        Ok(())
    }

    /// `W[e] *= f[in(e)]`.
    pub fn scale_in(&self, w: &mut ArrayD<f64>, f: &[f64]) -> Result<()> {
        self.check(w)?;
        ensure!(
            f.len() == self.n_in,
            "{} factors for {} input channels",
            f.len(),
            self.n_in
        );
        for (e, v) in w.iter_mut().enumerate() {
            *v *= f[self.out_in(e).1];
        }
        Ok(())
    }

    /// `y[o] = sum_{e: out(e)=o} W[e] * x[in(e)]`: the layer's response to a spatially constant
    /// input (away from padding), i.e. the weight summed over the kernel times the input.
    pub fn apply_constant(&self, w: &ArrayD<f64>, x: &[f64]) -> Result<Vec<f64>> {
        self.check(w)?;
        ensure!(
            x.len() == self.n_in,
            "{} values for {} input channels",
            x.len(),
            self.n_in
        );
        let mut y = vec![0.0f64; self.n_out];
        for (e, v) in w.iter().enumerate() {
            let (o, i) = self.out_in(e);
            y[o] += v * x[i];
        }
        Ok(y)
    }
}

/// The equalizing scale of each channel: `s_i = sqrt(r1_i * r2_i) / r2_i` so that
/// `r1_i / s_i == r2_i * s_i == sqrt(r1_i * r2_i)`. 1 where either range is zero or the result
/// is not a finite positive number.
pub fn equalizing_scales(r1: &[f64], r2: &[f64]) -> Vec<f64> {
    r1.iter()
        .zip(r2)
        .map(|(&a, &b)| {
            if a > 0.0 && b > 0.0 {
                let s = (a * b).sqrt() / b;
                if s.is_finite() && s > 0.0 {
                    s
                } else {
                    1.0
                }
            } else {
                1.0
            }
        })
        .collect()
}

/// `max r / min r` over the channels with a non-zero range (1 when none).
pub fn range_ratio(r: &[f64]) -> f64 {
    let nz = r.iter().copied().filter(|&v| v > 0.0);
    let (lo, hi) = nz.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if hi > 0.0 {
        hi / lo
    } else {
        1.0
    }
}

/// Symmetric int8 fake quantization: `q(w) = clamp(round(w / d), -127, 127) * d` with
/// `d = max|w| / 127` over the whole tensor (`map = None`) or per output channel.
pub fn fake_quant_int8(w: &ArrayD<f64>, map: Option<&ChannelMap>) -> Result<ArrayD<f64>> {
    let steps: Vec<f64> = match map {
        None => vec![w.iter().fold(0.0f64, |m, v| m.max(v.abs())) / 127.0],
        Some(m) => m.out_ranges(w)?.iter().map(|r| r / 127.0).collect(),
    };
    let mut out = w.clone();
    for (e, v) in out.iter_mut().enumerate() {
        let d = match map {
            None => steps[0],
            Some(m) => steps[m.out_in(e).0],
        };
        if d > 0.0 {
            *v = (*v / d).round().clamp(-127.0, 127.0) * d;
        }
    }
    Ok(out)
}

/// `10 log10(sum w^2 / sum (w - q(w))^2)` for per-tensor symmetric int8 (+inf when exact).
pub fn int8_sqnr_db(w: &ArrayD<f64>) -> f64 {
    let q = fake_quant_int8(w, None).expect("per-tensor quantization needs no map");
    let sig: f64 = w.iter().map(|v| v * v).sum();
    let err: f64 = w.iter().zip(q.iter()).map(|(a, b)| (a - b) * (a - b)).sum();
    if err == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sig / err).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn arr(shape: &[usize], seed: u64) -> ArrayD<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ArrayD::from_shape_fn(IxDyn(shape), |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
    }

    #[test]
    fn conv_map_matches_brute_force_for_groups() {
        // Conv: 6 out, 4 in, group 2 -> W [6, 2, 3]
        let m = ChannelMap::new(LayerKind::Conv { group: 2 }, &[6, 2, 3]).unwrap();
        assert_eq!((m.n_out, m.n_in), (6, 4));
        for o in 0..6 {
            for j in 0..2 {
                for k in 0..3 {
                    let e = (o * 2 + j) * 3 + k;
                    let g = o / 3;
                    assert_eq!(m.out_in(e), (o, g * 2 + j));
                }
            }
        }
        // ConvTranspose: 4 in, 6 out, group 2 -> W [4, 3, 1]
        let t = ChannelMap::new(LayerKind::ConvTranspose { group: 2 }, &[4, 3, 1]).unwrap();
        assert_eq!((t.n_out, t.n_in), (6, 4));
        assert_eq!(t.out_in(3 * 3 + 2), (3 + 2, 3));
        let g = ChannelMap::new(LayerKind::Gemm { trans_b: true }, &[5, 7]).unwrap();
        assert_eq!(g.out_in(7 + 2), (1, 2));
        let mm = ChannelMap::new(LayerKind::MatMul, &[5, 7]).unwrap();
        assert_eq!(mm.out_in(7 + 2), (2, 1));
    }

    #[test]
    fn scales_equalize_ranges() {
        let m1 = ChannelMap::new(LayerKind::Conv { group: 1 }, &[8, 3, 3, 3]).unwrap();
        let m2 = ChannelMap::new(LayerKind::Conv { group: 1 }, &[5, 8, 1, 1]).unwrap();
        let mut w1 = arr(&[8, 3, 3, 3], 1);
        // Spread the channel ranges over three orders of magnitude.
        let spread: Vec<f64> = (0..8).map(|i| 10f64.powf(i as f64 / 2.0 - 2.0)).collect();
        m1.scale_out(&mut w1, &spread).unwrap();
        let mut w2 = arr(&[5, 8, 1, 1], 2);
        let s = equalizing_scales(&m1.out_ranges(&w1).unwrap(), &m2.in_ranges(&w2).unwrap());
        let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
        m1.scale_out(&mut w1, &inv).unwrap();
        m2.scale_in(&mut w2, &s).unwrap();
        let (r1, r2) = (m1.out_ranges(&w1).unwrap(), m2.in_ranges(&w2).unwrap());
        for (a, b) in r1.iter().zip(&r2) {
            assert!((a - b).abs() <= 1e-12 * a.max(*b), "{a} vs {b}");
        }
    }

    #[test]
    fn zero_ranges_keep_scale_one() {
        assert_eq!(
            equalizing_scales(&[0.0, 4.0, 1.0], &[2.0, 0.0, 4.0]),
            vec![1.0, 1.0, 0.5]
        );
        assert_eq!(range_ratio(&[0.0, 2.0, 8.0]), 4.0);
    }

    #[test]
    fn per_tensor_quantization_loses_small_channels_per_channel_keeps_them() {
        let m = ChannelMap::new(LayerKind::Conv { group: 1 }, &[4, 4, 1, 1]).unwrap();
        let mut w = arr(&[4, 4, 1, 1], 3);
        m.scale_out(&mut w, &[100.0, 1.0, 0.01, 1.0]).unwrap();
        let small = |q: &ArrayD<f64>| (0..4).map(|j| q[[2, j, 0, 0]].abs()).fold(0.0, f64::max);
        // Per-tensor: step 100/127 wipes out channel 2 (values below 0.01).
        assert_eq!(small(&fake_quant_int8(&w, None).unwrap()), 0.0);
        // Per-channel: channel 2 keeps its values to within half a step of its own range.
        let pc = fake_quant_int8(&w, Some(&m)).unwrap();
        for j in 0..4 {
            let (a, b) = (w[[2, j, 0, 0]], pc[[2, j, 0, 0]]);
            assert!(
                (a - b).abs() <= 0.5 * small(&w) / 127.0 + 1e-15,
                "{a} vs {b}"
            );
        }
        assert!(int8_sqnr_db(&w).is_finite());
    }
}
