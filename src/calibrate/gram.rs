//! Gram matrices of layer inputs over the calibration set, in one streaming run.
//!
//! For a linear layer `y = x W` (MatMul / Gemm, `x` with `K` features on its last axis), the
//! output error of a perturbed weight `W + ΔW` summed over the calibration positions is
//! `Σ_rows ‖x ΔW‖² = tr(ΔWᵀ G ΔW)` with `G = Xᵀ X`, `X` every calibration row of `x` stacked
//! (`[rows, K]`). `G` is all the int4 rounding search of `weight-only` needs from the data
//! (GPTQ's Hessian is `2G`); it is accumulated batch by batch ([`super::observe::stream`]: one
//! tract run, the activations never kept), in f64, in batch order, so it does not depend on the
//! thread count (tensors are accumulated in parallel, each by one thread).
//!
//! A tensor that is a graph input is read from the data; integer tensors are refused by name.

use super::data::CalibrationSet;
use crate::onnx::proto::ModelProto;
use anyhow::{bail, ensure, Result};
use indexmap::IndexMap;
use ndarray::{Array2, ArrayD, ArrayView4};
use rayon::prelude::*;

/// How a conv reads its input: kernel (H, W), strides, begin pads and dilations (H, W).
#[derive(Debug, Clone, Copy)]
pub struct ConvWindow {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub pads: [usize; 2],
    pub dil: [usize; 2],
}

/// Sampled rows: `(n, oy, ox)` positions, at most `max`, spread over samples and the image
/// (sorted). Not evenly spaced: a step that is a multiple of the width would sample one image
/// column only (e.g. step 8 on 8x8 maps, all at `ox = 0`, the background of a digit). The
/// positions are `i * P mod total` for a prime `P` not dividing `total`: distinct, deterministic
/// and without such aliasing.
pub fn positions(n: usize, oh: usize, ow: usize, max: usize) -> Vec<(usize, usize, usize)> {
    let total = n * oh * ow;
    let take = total.min(max.max(1));
    let p: Vec<usize> = if take == total {
        (0..total).collect()
    } else {
        let prime = [1_000_003usize, 998_244_353, 1_000_000_007]
            .into_iter()
            .find(|q| !total.is_multiple_of(*q))
            .unwrap_or(1);
        let mut v: Vec<usize> = (0..take).map(|i| (i * prime) % total).collect();
        v.sort_unstable();
        v
    };
    p.into_iter()
        .map(|p| (p / (oh * ow), (p / ow) % oh, p % ow))
        .collect()
}

/// The im2col rows of a conv's input `x` (NCHW) at the output positions `pos` (sample, y, x),
/// over the input channels `channels` (one group): row `r` holds, for each channel, kernel row
/// and kernel column in that order, the input value the kernel tap reads (0 in the padding).
/// The Gram matrix of a conv layer is that of these rows.
pub fn conv_patches(
    x: ArrayView4<f32>,
    c: &ConvWindow,
    channels: std::ops::Range<usize>,
    pos: &[(usize, usize, usize)],
) -> Array2<f64> {
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let [kh, kw] = c.kernel;
    let mut a = Array2::<f64>::zeros((pos.len(), channels.len() * kh * kw));
    for (r, &(n, oy, ox)) in pos.iter().enumerate() {
        for (ci, channel) in channels.clone().enumerate() {
            for ky in 0..kh {
                let iy = (oy * c.strides[0] + ky * c.dil[0]) as isize - c.pads[0] as isize;
                if iy < 0 || iy as usize >= h {
                    continue;
                }
                for kx in 0..kw {
                    let ix = (ox * c.strides[1] + kx * c.dil[1]) as isize - c.pads[1] as isize;
                    if ix < 0 || ix as usize >= w {
                        continue;
                    }
                    a[[r, (ci * kh + ky) * kw + kx]] =
                        f64::from(x[[n, channel, iy as usize, ix as usize]]);
                }
            }
        }
    }
    a
}

/// `Xᵀ X` of one tensor's rows (its last axis is the feature axis).
#[derive(Debug, Clone, PartialEq)]
pub struct Gram {
    /// `[K, K]`, symmetric.
    pub xtx: Array2<f64>,
    /// Rows accumulated (calibration positions).
    pub rows: u64,
}

impl Gram {
    pub fn new(k: usize) -> Gram {
        Gram {
            xtx: Array2::zeros((k, k)),
            rows: 0,
        }
    }

    /// Add the rows of `x` (any rank >= 1, features on the last axis).
    pub fn add(&mut self, name: &str, x: &ArrayD<f32>) -> Result<()> {
        let k = self.xtx.nrows();
        ensure!(
            x.ndim() >= 1 && x.shape()[x.ndim() - 1] == k,
            "tensor '{name}' has shape {:?}; expected {k} features on its last axis",
            x.shape()
        );
        let rows = x.len() / k.max(1);
        let flat = x
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((rows, k))?;
        let x64 = flat.mapv(f64::from);
        self.xtx += &x64.t().dot(&x64);
        self.rows += rows as u64;
        Ok(())
    }
}

/// The Gram matrix of each `(tensor, K)` over every calibration batch of `model`.
pub fn gram_matrices(
    model: &ModelProto,
    tensors: &[(String, usize)],
    calib: &CalibrationSet,
) -> Result<IndexMap<String, Gram>> {
    // K x K f64 per layer input, all held at once: checked before any is allocated (a 16384-
    // wide input alone is 2 GiB). The run's `--max-memory` does not reach the passes; the
    // process default (half of RAM) does.
    let bytes = tensors.iter().fold(0u64, |acc, (_, k)| {
        acc.saturating_add((*k as u64).saturating_mul(*k as u64).saturating_mul(8))
    });
    crate::limits::MemoryBudget::default().check(
        "the linear layers' input Gram matrices (K x K f64 each)",
        bytes,
    )?;
    let mut grams: IndexMap<String, Gram> = tensors
        .iter()
        .map(|(t, k)| (t.clone(), Gram::new(*k)))
        .collect();
    let extra: Vec<String> = grams
        .keys()
        .filter(|t| !calib.input_names.contains(t))
        .cloned()
        .collect();
    super::observe::stream(model, &extra, calib, "layer inputs", |_, batch, outs| {
        let mut values: Vec<(&str, &ArrayD<f32>)> = Vec::new();
        for (k, name) in calib.input_names.iter().enumerate() {
            if grams.contains_key(name) {
                match batch[k].as_f32() {
                    Some(a) => values.push((name, a)),
                    None => bail!(
                        "input '{name}' is {}; a linear layer's input must be float",
                        batch[k].type_name()
                    ),
                }
            }
        }
        values.extend(extra.iter().map(String::as_str).zip(outs));
        // Each tensor's matrix is updated by one thread, batches in order: deterministic.
        let updates: Vec<(usize, &ArrayD<f32>)> = values
            .into_iter()
            .filter_map(|(n, a)| grams.get_index_of(n).map(|i| (i, a)))
            .collect();
        let mut slots: Vec<(&String, &mut Gram)> = grams.iter_mut().collect();
        slots
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(i, (name, gram))| {
                for (j, a) in &updates {
                    if *j == i {
                        gram.add(name, a)?;
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
    })?;
    Ok(grams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn gram_adds_rows_over_leading_axes() {
        let x =
            ArrayD::from_shape_vec(IxDyn(&[2, 2, 3]), (0..12).map(|v| v as f32).collect()).unwrap();
        let mut g = Gram::new(3);
        g.add("x", &x).unwrap();
        g.add("x", &x).unwrap();
        let flat = x.into_shape_with_order((4, 3)).unwrap().mapv(f64::from);
        let want = flat.t().dot(&flat) * 2.0;
        assert_eq!(g.xtx, want);
        assert_eq!(g.rows, 8);
        let wrong = ArrayD::<f32>::zeros(IxDyn(&[2, 4]));
        assert!(g.add("y", &wrong).is_err());
    }
}
