//! Learned weight rounding (`--rounding adaround`) and int4 weights with int8 activations
//! (`--w4a8`) for the `quantize` pass.
//!
//! **AdaRound** (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
//! Quantization"). For each Conv/Gemm/MatMul weight, viewed per group as `W [O, K]` (a Conv's
//! `K = Cin/group · kh · kw`, in im2col order), with the per-channel scale `s` of the usual
//! symmetric grid (`s = max|w| / qmax`, unchanged by this pass):
//! ```text
//! W~ = s · clamp(floor(W / s) + h(V), qmin, qmax),   h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)
//! loss = E_rows ‖W~ x_q - W x_f‖² + λ Σ (1 - |2h(V) - 1|^β)      ζ = 1.1, γ = -0.1
//! ```
//! `x_f` is the layer's input in the float model: the target is the float layer's output. `x_q`
//! is, by default ([`AdaRoundInputs::Float`]), `x_f` itself: each layer's rounding is fitted to
//! its own float input, all layers from one run over the calibration data. With
//! [`AdaRoundInputs::Quantized`] (`--adaround-inputs quantized`) it is the layer's input in the
//! quantized model (int8 activations, upstream weights already rounded: layers are processed in
//! [`AdaRoundOptions::stages`] stages in topological order, by default one layer per stage, and
//! each stage reads its inputs from the model with every earlier stage's learned weights, as
//! AIMET does), so the rounding also corrects upstream error. In 4 stages (the first version)
//! it collapsed PP-OCRv4 rec at W4A8 (0.8% characters) and MobileNetV2 (4.9 dB): within a stage
//! each layer corrected upstream layers that then learned their own rounding. One layer per
//! stage (BENCHMARKS.md, session 16), W4A8 held out, against float inputs: higher output SQNR
//! on all five models measured (digits CNN 26.4 vs 21.3 dB, digits deep 36.8 vs 34.4,
//! MobileNetV2 10.5 vs 8.7, ResNet-18 17.7 vs 16.2, PP-OCRv4 rec blocks of 16 16.5 vs 12.4) but
//! not a better task metric (ResNet-18 top-1 agreement 71.9 vs 87.5%, MobileNetV2 37.5 vs
//! 46.9%, PP-OCRv4 rec 99.77 vs 99.83% characters, digits deep one digit lower) at 2-7x the
//! time: float inputs stay the default.
//!
//! **Block-wise int4** (`--w4a8 --block-size N`): one scale per block of `N` values along the
//! weight's input axis (ONNX opset-21 block-wise `DequantizeLinear`, `axis` = input axis,
//! `block_size` = N), `s_b = max_b |w| / 7`; AdaRound above uses the scale of each element.
//! Blocked layers keep float biases (no single weight scale per output channel for an int32
//! bias). PP-OCRv4 rec at W4A8: per-channel int4 0.2% characters, blocks of 16 96.4% with
//! nearest rounding, 98.7% with learned rounding. The reconstruction term needs only Gram matrices of the rows (`G_qq = E[x_q x_qᵀ]`,
//! `G_fq = E[x_f x_qᵀ]`, `G_ff = E[x_f x_fᵀ]`, accumulated in f64 over every calibration batch,
//! Conv positions subsampled to at most [`AdaRoundOptions::max_rows`] per layer):
//! `E‖W~ x_q - W x_f‖² = tr(W~ G_qq W~ᵀ) - 2 tr(W~ (W G_fq)ᵀ) + tr(W G_ff Wᵀ)`, gradient
//! `2 (W~ G_qq - W G_fq)`. Each output row is an independent problem (its own `V`, Adam state
//! and loss share only `G_qq`), optimized with hand-written gradients: Adam (lr 0.01), no
//! regularizer for the first 20% of the iterations, then `β` annealed 20 -> 2 (cosine) with
//! `λ = 0.01`; `V` starts where `h(V)` equals the fractional part (`W~ = W`). Hardening takes
//! `h = [V >= 0]`. A row keeps round-to-nearest when that gives a lower reconstruction error
//! (so the learned layer is never worse than nearest on the calibration rows). In W8A8 runs
//! (no int4 weight, [`AdaRoundOptions::output_check`]) the whole model keeps nearest unless the
//! learned codes also bring the quantized model's outputs closer to the float model's on the
//! calibration data: at int8 each layer's gain is small, and on PP-OCR cls every layer beat
//! nearest on its own rows while the model lost 3.2 dB at its output on the same data (0.3 dB
//! held out). A per-row check on held-out calibration batches did not catch it (81 of
//! thousands of rows rejected, 0.7 dB lost held out; BENCHMARKS.md, session 14).
//!
//! **Cost.** One iteration costs `O·K²` multiply-adds per layer (the product `ΔW G_qq`) plus an
//! element-wise update per weight. The Grams accumulate in f64 and the hardened rows are
//! compared with nearest in f64, but the optimization runs in f32 on the gradient written around
//! the float weight, `2 (ΔW G_qq + W (G_qq - G_fq))` with `ΔW = W~ - W` (the f32 product then
//! carries the small difference, not two large near-equal terms; the second term is a
//! constant, zero for float inputs). Work units are up to [`CHUNK_ROWS`] rows of one layer
//! group, and the units of every layer of a stage run in one parallel pool, largest first:
//! packing the `K x K` matrix for 8 rows at a time, in f64, one layer after the other, cost
//! ResNet-18 W4A8 over an hour; this form does it in ~10 minutes on two loaded cores
//! (BENCHMARKS.md, session 13).
//!
//! **Wide layers** (`K >` [`AdaRoundOptions::exact_features`], up to
//! [`AdaRoundOptions::max_features`]; wider ones keep nearest): block coordinate descent. The
//! features are cut into blocks of whole input channels (at most
//! [`AdaRoundOptions::block_features`], a conv's `kh·kw` taps per channel kept together), and
//! the blocks are optimized one after the other, each with the full iteration schedule, on its
//! diagonal Gram block `G_bb`, the other blocks held at their current rounding (learned before
//! it, nearest after it) through the constant `Σ_{a≠b} ΔW_a G_ab` added to the gradient's
//! offset. Cost `O·K·B` per iteration instead of `O·K²`; the exact Gram is still kept (for the
//! offsets and the final per-row check). ResNet-18's three `K = 4608` convs in blocks of 576
//! (64 channels): 1.4 G multiply-adds per iteration each instead of 10.9 G; W4A8 held-out SQNR
//! 13.9 -> 16.2 dB (BENCHMARKS.md, session 14).
//!
//! **The activation inside the loss** ([`AdaRoundOptions::activation_loss`],
//! `--adaround-activation-loss`, off by default; the [`rows`] module): a Conv/Gemm whose output only a `Relu` or a constant `Clip(lo, hi)`
//! reads (ReLU6 after BN folding) can be fitted on `E_rows ‖f(W~ x_q + b) - f(W x_f + b)‖²`,
//! `f = clamp(·, lo, hi)`, as AIMET does: errors the activation clips away cost nothing. The
//! clip's mask has no Gram form, so such a layer keeps a seeded subsample of its input rows
//! (at most [`AdaRoundOptions::activation_rows`] rows and
//! [`AdaRoundOptions::activation_floats`] stored values) and runs Adam on mini-batches of
//! [`AdaRoundOptions::activation_batch`] rows (cost `O·K·(2B + 64)` per iteration), with the same
//! schedule and regularizer; a hardened row keeps nearest where nearest has the lower
//! activated error on the stored rows. Measured held out (BENCHMARKS.md, session 15): W8A8
//! +0.30 / +1.29 / +0.02 dB over the Gram form on ppocr_cls / digits_cnn / digits_deep, but
//! W4A8 -0.08 dB on MobileNetV2 (8.60 vs 8.68 dB; 8.63 with full batches), -0.36 dB on
//! ResNet-18 (15.87 vs 16.23 dB), +1.4 dB on mobilenet_v3_small with fewer top-1 matches: it
//! helps only some models, so the Gram form stays the default for every layer.
//!
//! **W4A8**: Conv/Gemm/MatMul weights int4 (symmetric, `qmax = 7`, per channel), int8
//! activations as usual; the first and the last quantized layer (topological order) and the
//! depthwise convs keep int8 weights unless [`W4a8::all_layers`]. int4 weights are written as opset-21
//! `DequantizeLinear` of INT4 (ONNX Runtime runs them; validation in tract goes through the
//! simulation graph, which dequantizes constant weights ahead of time). Works with either
//! rounding.
//!
//! ```text
//! before: x -> Conv(W) -> y
//! after:  x -> Q -> DQ -> Conv(DQ(W_int4 | W_int8, s[c], axis 0), DQ(B_int32)) -> Q -> DQ -> y
//! ```
//!
//! Invariants: only the integer codes change (scales, placement, activation ranges are the
//! quantize pass's); outputs are deterministic whatever the thread count (Gram matrices are
//! accumulated per layer in batch order; rows are optimized in fixed chunks of
//! [`CHUNK_ROWS`], each by one thread; the time budget is turned into an iteration count by a
//! fixed cost model, never by the clock).

mod rows;

use super::insert::{self, Namer, WeightReport};
use super::materialize::{self, ActivationRanges};
use super::placement::{Plan, WeightMark};
use super::QuantizeOptions;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::gram::{conv_patches, ConvWindow};
use crate::calibrate::params;
use crate::ir::layer::{Layer, LayerKind};
use crate::ir::op::{self, attr_int, Attrs};
use crate::ir::{Graph, Model, Patch};
use crate::onnx::tensor;
use crate::runtime::Runner;
use anyhow::{Context, Result};
use indexmap::{IndexMap, IndexSet};
use ndarray::{s, Array1, Array2, ArrayD, Axis, IxDyn};
use rayon::prelude::*;
use rows::{Clip, GroupRows, RowStore};
use std::time::Instant;

/// Most rows of one layer group optimized together by one thread (fixed, so results do not
/// depend on the thread count). The per-iteration product `ΔW G_qq` packs the `K x K` matrix
/// whatever the row count, so a unit needs tens of rows for the product to be a real GEMM.
pub const CHUNK_ROWS: usize = 64;

/// Assumed multiply-add rate (per second, all threads) of the optimization, used only to turn
/// `--adaround-budget` into iteration counts deterministically. The cost of one iteration is
/// `Σ O·K·(K + 64)` over the learned layers (the product `ΔW G_qq` plus the element-wise update
/// counted as 64 multiply-adds per weight). Measured on the f32 path: ~29 G/s per busy core
/// (ResNet-18 W4A8, 8.1 T multiply-adds in ~280 CPU seconds, BENCHMARKS.md), two cores shared.
pub const ASSUMED_MACS_PER_SECOND: f64 = 2.0e10;

/// Options of the learned rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaRoundOptions {
    /// Adam iterations per layer (fewer where the time budget asks).
    pub iterations: usize,
    /// Weight of the rounding regularizer.
    pub lambda: f64,
    /// Adam step size on `V`.
    pub learning_rate: f64,
    /// With quantized inputs, layers are processed in this many stages (topological order; 0:
    /// one layer per stage); each stage reads its inputs from the model quantized with every
    /// earlier stage's learned weights. Each stage costs two runs over the calibration data.
    pub stages: usize,
    /// Most im2col rows (output positions) per layer in the Gram matrices; spread evenly over
    /// the calibration batches.
    pub max_rows: usize,
    /// Most input features `K` (per group) a layer may have to be learned (its Gram matrix
    /// takes `K² · 8` bytes, three times that with quantized inputs); wider layers keep
    /// round-to-nearest.
    pub max_features: usize,
    /// Layers with at most this many input features are optimized on their whole `K x K` Gram;
    /// wider ones (up to [`Self::max_features`]) in blocks of input channels, one after the
    /// other (block coordinate descent, see the module docs).
    pub exact_features: usize,
    /// Most input features per block of a wider layer (whole input channels: a multiple of a
    /// conv's `kh·kw`, at least one channel).
    pub block_features: usize,
    /// W8A8 runs (no int4 weight): keep the learned rounding only if the quantized model's
    /// outputs on the calibration data are closer to the float model's than with nearest
    /// rounding (two more runs of the quantized model over the calibration data).
    pub output_check: bool,
    /// Seconds the optimization should take (all layers), turned into iterations by
    /// [`ASSUMED_MACS_PER_SECOND`]; `None` = [`Self::iterations`] everywhere.
    pub budget_seconds: Option<f64>,
    /// Which input the learned layer is fitted on (`--adaround-inputs`).
    pub inputs: AdaRoundInputs,
    /// Layers whose output only a `Relu` / `Clip` reads are fitted with the activation inside
    /// the loss (`‖f(W~ x + b) - f(W x + b)‖²` on stored rows, the row form of [`rows`]).
    /// Off by default (every layer takes the Gram form): it did not move MobileNetV2 W4A8 held
    /// out (BENCHMARKS.md, session 15).
    pub activation_loss: bool,
    /// Most input rows a row-form layer keeps (seeded subsample over the calibration batches).
    pub activation_rows: usize,
    /// Most stored values (`rows · K · groups`) per row-form layer: wide and depthwise layers
    /// keep fewer rows.
    pub activation_floats: usize,
    /// Rows per Adam step of the row form (mini-batches of the shuffled stored rows).
    pub activation_batch: usize,
}

/// The input `x_q` of the reconstruction `‖W~ x_q - W x_f‖²`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaRoundInputs {
    /// `x_q = x_f`: each layer's rounding fitted to the float model's own input (one run over
    /// the calibration data, no stages). The default: it never let the learned model collapse
    /// (BENCHMARKS.md "Block-wise W4A8").
    #[default]
    Float,
    /// `x_q` from the quantized upstream model (AdaRound's and AIMET's asymmetric
    /// reconstruction: the rounding also corrects upstream error), in
    /// [`AdaRoundOptions::stages`] stages, one layer each by default. Within a stage of several
    /// layers a layer is fitted to inputs computed with the stage's upstream layers still
    /// rounded to nearest; in 4 stages PP-OCRv4 rec at W4A8 collapsed (3.4 dB, 0.8% characters),
    /// one layer per stage keeps 99.77%.
    Quantized,
}

impl Default for AdaRoundOptions {
    fn default() -> Self {
        AdaRoundOptions {
            iterations: 1000,
            lambda: 0.01,
            learning_rate: 0.01,
            stages: 0,
            max_rows: 16384,
            max_features: 8192,
            exact_features: 4096,
            block_features: 576,
            output_check: true,
            budget_seconds: None,
            inputs: AdaRoundInputs::Float,
            activation_loss: false,
            activation_rows: 4096,
            activation_floats: 1 << 22,
            activation_batch: 256,
        }
    }
}

/// int4 weights with int8 activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct W4a8 {
    /// Also the first and the last quantized layer and the depthwise convs (default: they keep
    /// int8 weights).
    pub all_layers: bool,
    /// int4 scales per block of this many values along the input axis (`--block-size`),
    /// instead of one per output channel.
    pub block_size: Option<usize>,
}

/// A weight's integer codes and scales, decided before insertion.
#[derive(Debug, Clone)]
pub struct Codes {
    pub bits: u32,
    pub axis: Option<usize>,
    pub shape: Vec<usize>,
    /// Logical (row-major) order.
    pub values: Vec<i8>,
    /// One per channel along `axis`, or one; block-wise: one per block, row-major over
    /// [`Codes::scale_shape`].
    pub scales: Vec<f32>,
    /// Block-wise scales (`DequantizeLinear` `axis`, `block_size`): one scale per `block`
    /// consecutive values along `axis` at every position of the other axes.
    pub block: Option<Blocking>,
}

/// Block-wise quantization of a weight: blocks of `size` values along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    pub axis: usize,
    pub size: usize,
}

impl Codes {
    /// Round to nearest (half to even) on the symmetric grid of `bits` (int8 as
    /// [`insert::quantize_values`] does it, so W8 with nearest codes is the default output).
    pub fn nearest(a: &ArrayD<f32>, axis: Option<usize>, bits: u32, reduce_range: bool) -> Codes {
        let channels: Vec<f32> = match axis {
            Some(ax) => a
                .axis_iter(Axis(ax))
                .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
                .collect(),
            None => vec![a.iter().fold(0f32, |m, v| m.max(v.abs()))],
        };
        let codes = Codes {
            bits,
            axis,
            shape: a.shape().to_vec(),
            values: Vec::new(),
            scales: Vec::new(),
            block: None,
        };
        codes.rounded(a, &channels, reduce_range)
    }

    /// Round to nearest with one scale per block of `block.size` values along `block.axis`
    /// (int4 weights under `--w4a8 --block-size N`): `s_b = max_{i in b} |w_i| / qmax`.
    pub fn nearest_blocked(a: &ArrayD<f32>, block: Blocking, bits: u32) -> Codes {
        let codes = Codes {
            bits,
            axis: None,
            shape: a.shape().to_vec(),
            values: Vec::new(),
            scales: Vec::new(),
            block: Some(block),
        };
        let mut peaks = vec![0f32; codes.scale_shape().iter().product()];
        for (i, v) in a.iter().enumerate() {
            let b = codes.scale_index(i);
            peaks[b] = peaks[b].max(v.abs());
        }
        codes.rounded(a, &peaks, false)
    }

    /// `self` with scales from the per-scale peaks `|w|max` and the values rounded to them.
    fn rounded(mut self, a: &ArrayD<f32>, peaks: &[f32], reduce_range: bool) -> Codes {
        let bits = self.bits;
        let qmax = qmax(bits, reduce_range);
        self.scales = peaks
            .iter()
            .map(|&m| {
                if bits == 8 {
                    params::weight_params(m, reduce_range).scale
                } else {
                    let s = m / qmax as f32;
                    if s.is_finite() && s > 0.0 {
                        s
                    } else {
                        1.0
                    }
                }
            })
            .collect();
        self.values = a
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                (v / self.scales[self.scale_index(i)])
                    .round_ties_even()
                    .clamp(-qmax as f32, qmax as f32) as i8
            })
            .collect();
        self
    }

    /// The shape of the scale (and zero point) tensor: `[channels]` per axis, `[]` per
    /// tensor, the weight's shape with `ceil(dim / size)` on the blocked axis.
    pub fn scale_shape(&self) -> Vec<usize> {
        match (self.block, self.axis) {
            (Some(b), _) => {
                let mut s = self.shape.clone();
                s[b.axis] = s[b.axis].div_ceil(b.size.max(1));
                s
            }
            (None, Some(_)) => vec![self.scales.len()],
            (None, None) => vec![],
        }
    }

    /// Which scale the value at flat (row-major) index `i` uses.
    pub fn scale_index(&self, i: usize) -> usize {
        match (self.block, self.axis) {
            (Some(b), _) => {
                // Row-major digits of `i` over the weight's shape, the blocked digit divided
                // by the block size, re-joined over the scale shape.
                let (mut rest, mut index, mut stride) = (i, 0usize, 1usize);
                for (d, &n) in self.shape.iter().enumerate().rev() {
                    let digit = rest % n.max(1);
                    rest /= n.max(1);
                    let (digit, n) = if d == b.axis {
                        (digit / b.size.max(1), n.div_ceil(b.size.max(1)))
                    } else {
                        (digit, n)
                    };
                    index += digit * stride;
                    stride *= n;
                }
                index
            }
            (None, Some(ax)) => {
                let inner: usize = self.shape[ax + 1..].iter().product();
                (i / inner.max(1)) % self.scales.len().max(1)
            }
            (None, None) => 0,
        }
    }

    /// The weight scales an int32 bias is quantized with (`s_x · s_w[c]`); none for block-wise
    /// weights (no single scale per output channel: their biases stay float).
    pub fn bias_scales(&self) -> Option<Vec<f32>> {
        self.block.is_none().then(|| self.scales.clone())
    }

    pub fn dequantized(&self) -> ArrayD<f32> {
        let v: Vec<f32> = self
            .values
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.scales[self.scale_index(i)])
            .collect();
        ArrayD::from_shape_vec(IxDyn(&self.shape), v).expect("codes match their shape")
    }
}

fn qmax(bits: u32, reduce_range: bool) -> i32 {
    match (bits, reduce_range) {
        (8, false) => 127,
        (8, true) => 63,
        _ => 7,
    }
}

/// What learning did to one layer, for the report. Errors are `E_rows ‖W~ x_q - W x_f‖²`
/// over the calibration rows the layer was fitted on; SQNR is `tr(W G_ff Wᵀ) / error`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerRounding {
    pub node: String,
    pub weight: String,
    pub bits: u32,
    pub stage: usize,
    /// `learned`, or why not (`nearest: ...`).
    pub status: String,
    pub features: usize,
    /// Feature blocks optimized one after the other (1: the whole Gram).
    pub blocks: usize,
    /// The activation inside the loss (`relu`, `clip(0, 6)`) when the layer took the row form
    /// (then `rows` counts the stored rows and the errors are of the activated outputs).
    pub activation: Option<String>,
    pub rows: u64,
    pub iterations: usize,
    pub nearest_error: f64,
    pub learned_error: f64,
    pub nearest_sqnr_db: f64,
    pub learned_sqnr_db: f64,
    /// Codes that differ from round-to-nearest.
    pub flipped: usize,
    /// Seconds of this layer's preparation and optimization, summed over the threads that ran
    /// its units (layers are optimized in parallel, so these add up to more than the wall time).
    pub seconds: f64,
}

/// The learned rounding's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdaRoundReport {
    /// Which input each layer was fitted on.
    pub inputs: AdaRoundInputs,
    pub iterations: usize,
    pub lambda: f64,
    pub stages: usize,
    pub max_rows: usize,
    pub budget_seconds: Option<f64>,
    /// Wall seconds: data (the runs over the calibration set) and optimization.
    pub data_seconds: f64,
    pub optimize_seconds: f64,
    /// The model-level check of W8A8 runs ([`AdaRoundOptions::output_check`]).
    pub output_check: Option<OutputCheck>,
    pub layers: Vec<LayerRounding>,
}

/// Squared error of the quantized model's outputs against the float model's, summed over the
/// outputs and the calibration data, with the learned and with the nearest codes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutputCheck {
    pub learned_error: f64,
    pub nearest_error: f64,
    /// `learned` or `nearest`: the codes written.
    pub kept: String,
    pub seconds: f64,
}

/// The squared error of the simulated quantized model's outputs against the float model's,
/// summed over every output and calibration batch, for each set of `candidates` codes.
fn output_errors(
    work: &Model,
    plan: &Plan,
    ranges: &ActivationRanges,
    calib: &CalibrationSet,
    opts: &QuantizeOptions,
    candidates: &[&IndexMap<String, Codes>],
) -> Result<Vec<f64>> {
    let float_proto = work.to_proto()?;
    let protos = candidates
        .iter()
        .map(|c| Ok(simulated(work, plan, ranges, c, opts, &[])?.0))
        .collect::<Result<Vec<_>>>()?;
    let mut errors = vec![0f64; candidates.len()];
    let mut runners: Option<(Vec<Vec<usize>>, Runner, Vec<Runner>)> = None;
    for (bi, batch) in calib.batches.iter().enumerate() {
        let shapes: Vec<Vec<usize>> = batch.iter().map(|a| a.shape().to_vec()).collect();
        if runners.as_ref().is_none_or(|(s, _, _)| *s != shapes) {
            let named = calib.named_shapes(&shapes);
            let rf = Runner::new(&float_proto, &named, &[])
                .context("adaround output check: preparing the float run in tract")?;
            let rq = protos
                .iter()
                .map(|p| Runner::new(p, &named, &[]))
                .collect::<Result<Vec<_>>>()
                .context("adaround output check: preparing the quantized run in tract")?;
            runners = Some((shapes, rf, rq));
        }
        let (_, rf, rq) = runners.as_ref().expect("set above");
        let reference = rf
            .run(batch)
            .with_context(|| format!("calibration batch {bi}"))?;
        for (e, r) in errors.iter_mut().zip(rq) {
            let outs = r
                .run(batch)
                .with_context(|| format!("calibration batch {bi}"))?;
            for (a, b) in reference.iter().zip(&outs) {
                *e += a
                    .iter()
                    .zip(b.iter())
                    .map(|(x, y)| f64::from(x - y).powi(2))
                    .sum::<f64>();
            }
        }
    }
    Ok(errors)
}

/// The weights of `plan` that go int4 under W4A8: Conv/Gemm/MatMul weights, without the first
/// and the last such layer in topological order and without depthwise convs, unless
/// `all_layers`.
pub fn int4_weights(g: &Graph, plan: &Plan, w4a8: W4a8) -> Result<IndexSet<String>> {
    let mut ordered = Vec::new();
    for ix in g.topo_order()? {
        let Some(layer) = Layer::of(g, ix) else {
            continue;
        };
        if matches!(layer.kind, LayerKind::ConvTranspose { .. }) {
            continue;
        }
        // Depthwise convs keep int8: a handful of weights per channel (9 or 25) leave int4 no
        // room to average its error out, and they are a small share of the bytes. Measured on
        // PP-OCRv4 rec (BENCHMARKS.md): at int4 their output SQNR sat at -12..+2 dB.
        if layer.is_depthwise() && !w4a8.all_layers {
            continue;
        }
        if plan
            .weights
            .get(&layer.weight)
            .is_some_and(|m| m.node == g.node(ix).name())
            && !ordered.contains(&layer.weight)
        {
            ordered.push(layer.weight.clone());
        }
    }
    let n = ordered.len();
    Ok(ordered
        .into_iter()
        .enumerate()
        .filter(|(i, _)| w4a8.all_layers || (*i != 0 && *i + 1 != n))
        .map(|(_, w)| w)
        .collect())
}

/// Round-to-nearest codes of every weight of `plan` (int4 for the weights in `int4`, in blocks
/// of `block` values along the input axis when given).
pub fn nearest_codes(
    g: &Graph,
    plan: &Plan,
    int4: &IndexSet<String>,
    block: Option<usize>,
    reduce_range: bool,
) -> Result<IndexMap<String, Codes>> {
    plan.weights
        .iter()
        .map(|(w, mark)| {
            let t = g
                .constant(w)
                .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
            let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
            if !int4.contains(w) {
                return Ok((w.clone(), Codes::nearest(&a, mark.axis, 8, reduce_range)));
            }
            // As the mixed-precision pass does it: an input axis shorter than one block keeps
            // one scale per output channel.
            let blocking = block
                .zip(input_axis(a.ndim(), mark.axis))
                .filter(|&(size, axis)| a.shape()[axis] >= size);
            Ok((
                w.clone(),
                match blocking {
                    Some((size, axis)) => Codes::nearest_blocked(&a, Blocking { axis, size }, 4),
                    None => Codes::nearest(&a, mark.axis, 4, reduce_range),
                },
            ))
        })
        .collect()
}

/// The input-feature axis of a Conv (`[O, I/g, k...]`: 1) or Gemm/MatMul (`[K, N]` / `[N, K]`:
/// the axis that is not the output channel's) weight; `None` for a per-tensor weight.
fn input_axis(rank: usize, output_axis: Option<usize>) -> Option<usize> {
    match (rank, output_axis?) {
        (2, out) => Some(1 - out.min(1)),
        (r, 0) if r >= 3 => Some(1),
        _ => None,
    }
}

/// Write weight `w` from its decided codes (int8 or int4 `DequantizeLinear`, the same names and
/// layout as [`insert::weight`]); returns the scales for int32 biases (none for block-wise
/// weights) and the report row.
pub fn insert_weight(
    g: &mut Graph,
    namer: &mut Namer,
    w: &str,
    mark: &WeightMark,
    codes: &Codes,
) -> Result<(Option<Vec<f32>>, WeightReport)> {
    let t = g
        .constant(w)
        .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
    let deq = codes.dequantized();
    let orig: Vec<f32> = a.iter().copied().collect();
    let report = WeightReport {
        tensor: w.to_string(),
        node: mark.node.clone(),
        axis: codes.axis,
        channels: codes.scales.len(),
        min_scale: codes.scales.iter().copied().fold(f32::INFINITY, f32::min),
        max_scale: codes.scales.iter().copied().fold(0.0, f32::max),
        zero_channels: match codes.axis {
            Some(ax) => a
                .axis_iter(Axis(ax))
                .filter(|c| c.iter().all(|&v| v == 0.0))
                .count(),
            None => usize::from(a.iter().all(|&v| v == 0.0)),
        },
        sqnr_db: params::sqnr_db(&orig, deq.as_slice().expect("standard layout")),
    };
    let [wq, s, zp, dqn] = namer.take(
        g,
        'w',
        w,
        [
            ("quantized", "q"),
            ("scale", "s"),
            ("zero_point", "z"),
            ("DequantizeLinear", "DQ"),
        ],
    );
    let zp_shape = codes.scale_shape();
    let zeros = vec![0i8; zp_shape.iter().product()];
    let int = |name: &str, shape: &[usize], v: &[i8]| match codes.bits {
        8 => tensor::from_i8(name, shape, v),
        _ => tensor::from_4bit(name, shape, v, true),
    };
    let scale = ArrayD::from_shape_vec(IxDyn(&zp_shape), codes.scales.clone())
        .context("scale count does not match the scale shape")?;
    let mut initializers = vec![
        int(&wq, &codes.shape, &codes.values),
        tensor::from_f32(&s, &scale),
    ];
    let mut dq = if mark.zero_point {
        initializers.push(int(&zp, &zp_shape, &zeros));
        op::node("DequantizeLinear", &dqn, &[&wq, &s, &zp], &[w])
    } else {
        op::node("DequantizeLinear", &dqn, &[&wq, &s], &[w])
    };
    match (codes.block, codes.axis) {
        (Some(b), _) => {
            op::set_attr(&mut dq, attr_int("axis", b.axis as i64));
            op::set_attr(&mut dq, attr_int("block_size", b.size as i64));
        }
        (None, Some(ax)) => op::set_attr(&mut dq, attr_int("axis", ax as i64)),
        (None, None) => {}
    }
    insert::replace_constant(g, w, initializers, dq)?;
    Ok((codes.bias_scales(), report))
}

/// The float model with every weight of `plan` replaced by its dequantized `codes` and the
/// plan's activations and biases quantized: what the quantized model computes, in a form
/// tract runs (no int4 tensor), and the first input of each of `nodes` in it (a graph input
/// read by a quantized node is renamed to its dequantized copy).
fn simulated(
    work: &Model,
    plan: &Plan,
    ranges: &ActivationRanges,
    codes: &IndexMap<String, Codes>,
    opts: &QuantizeOptions,
    nodes: &[&str],
) -> Result<(crate::onnx::proto::ModelProto, Vec<String>)> {
    let mut m = work.clone();
    let g = &mut m.graph;
    let mut scales = IndexMap::new();
    for (w, c) in codes {
        g.apply(Patch {
            initializers: vec![tensor::from_f32(w, &c.dequantized())],
            ..Default::default()
        })?;
        if let Some(sc) = c.bias_scales() {
            scales.insert(w.clone(), sc);
        }
    }
    let mut namer = Namer::new(insert::Naming::Compact);
    materialize::insert(g, &mut namer, plan, ranges, &scales, opts.activation_scheme)?;
    let inputs = nodes
        .iter()
        .map(|n| {
            let ix = g
                .node_indices()
                .find(|&ix| g.node(ix).name() == *n)
                .with_context(|| format!("node '{n}' not in the quantized model"))?;
            Ok(g.node(ix).input[0].clone())
        })
        .collect::<Result<_>>()?;
    let (proto, _) = crate::runtime::simulation_graph(&m.to_proto()?)?;
    Ok((proto, inputs))
}

/// How a layer's rows are read from its input tensor.
#[derive(Debug, Clone, Copy)]
struct Conv2d {
    kh: usize,
    kw: usize,
    strides: [usize; 2],
    /// Begin pads (H, W).
    pads: [usize; 2],
    /// Begin + end pads (H, W): the output size.
    pad_total: [usize; 2],
    dil: [usize; 2],
}

fn conv2d(node: &crate::onnx::proto::NodeProto, wshape: &[usize]) -> Option<Conv2d> {
    let auto = node
        .attr_string("auto_pad")
        .ok()
        .flatten()
        .unwrap_or_default();
    if !(auto.is_empty() || auto == "NOTSET" || auto == "VALID") {
        return None;
    }
    let ints = |n: &str| node.attr_ints(n).ok().flatten();
    let spatial = wshape.len().checked_sub(2)?;
    let (kh, kw) = match spatial {
        1 => (1, wshape[2]),
        2 => (wshape[2], wshape[3]),
        _ => return None,
    };
    let two = |v: Option<Vec<i64>>, d: i64| -> Option<[usize; 2]> {
        let v = v.unwrap_or(vec![d; spatial]);
        if v.len() != spatial || v.iter().any(|&x| x < 0) {
            return None;
        }
        Some(if spatial == 1 {
            [d as usize, v[0] as usize]
        } else {
            [v[0] as usize, v[1] as usize]
        })
    };
    let pads = ints("pads").unwrap_or(vec![0; 2 * spatial]);
    if pads.len() != 2 * spatial || pads.iter().any(|&p| p < 0) {
        return None;
    }
    let (pads, pad_total) = if spatial == 1 {
        ([0, pads[0] as usize], [0, (pads[0] + pads[1]) as usize])
    } else {
        (
            [pads[0] as usize, pads[1] as usize],
            [(pads[0] + pads[2]) as usize, (pads[1] + pads[3]) as usize],
        )
    };
    Some(Conv2d {
        kh,
        kw,
        strides: two(ints("strides"), 1)?,
        pads,
        pad_total,
        dil: two(ints("dilations"), 1)?,
    })
}

/// One layer to learn: its matrix view and where its rows come from.
struct Task {
    weight: String,
    node: String,
    layer: Layer,
    conv: Option<Conv2d>,
    groups: usize,
    /// Per group: `[rows of the group, K]`.
    features: usize,
    /// The feature ranges optimized one after the other (one range `0..K` up to
    /// [`AdaRoundOptions::exact_features`]).
    blocks: Vec<std::ops::Range<usize>>,
    stage: usize,
    /// Position in topological order among the learned layers (seeds the row subsample).
    index: usize,
    /// The activation the row form puts inside the loss ([`rows`]); `None`: the Gram form.
    clip: Option<Clip>,
}

/// The blocks of a layer's `k` input features: one up to `exact`, else runs of whole input
/// channels (`taps` features each, a conv's `kh·kw`) of at most `block` features (at least one
/// channel).
fn feature_blocks(
    k: usize,
    taps: usize,
    exact: usize,
    block: usize,
) -> Vec<std::ops::Range<usize>> {
    if k <= exact {
        return std::iter::once(0..k).collect();
    }
    let taps = taps.max(1);
    let width = (block / taps).max(1) * taps;
    (0..k)
        .step_by(width)
        .map(|a| a..(a + width).min(k))
        .collect()
}

/// Gram matrices of one layer, per group (each `[K, K]`, f64, divided by the row count at the
/// end). With float inputs the three are one: only `qq` is kept (`fq`, `ff` are `None`).
struct Grams {
    qq: Vec<Array2<f64>>,
    fq: Option<Vec<Array2<f64>>>,
    ff: Option<Vec<Array2<f64>>>,
    rows: u64,
}

impl Grams {
    fn new(groups: usize, k: usize, float_inputs: bool) -> Grams {
        let zeros = || vec![Array2::zeros((k, k)); groups];
        Grams {
            qq: zeros(),
            fq: (!float_inputs).then(zeros),
            ff: (!float_inputs).then(zeros),
            rows: 0,
        }
    }

    /// How many `K x K` f64 matrices a layer keeps.
    fn copies(float_inputs: bool) -> u64 {
        if float_inputs {
            1
        } else {
            3
        }
    }
}

/// `acc += aᵀ b`. Up to `exact` features through a temporary product (the summation order of
/// the layers learned before blocks existed, so their codes stay byte-identical); wider layers
/// accumulate in place (no `K x K` temporary per batch).
fn add_product(acc: &mut Array2<f64>, a: &Array2<f64>, b: &Array2<f64>, exact: usize) {
    if acc.nrows() <= exact {
        *acc += &a.t().dot(b);
    } else {
        ndarray::linalg::general_mat_mul(1.0, &a.t(), b, 1.0, acc);
    }
}

/// The im2col rows of group `gi` of `x` (NCHW or NCL) at the sampled positions.
fn patches(
    x: &ArrayD<f32>,
    c: &Conv2d,
    gi: usize,
    cg: usize,
    pos: &[(usize, usize, usize)],
) -> Array2<f64> {
    let x4 = x
        .view()
        .into_shape_with_order(four(x.shape()))
        .expect("rank 3 or 4")
        .into_dimensionality::<ndarray::Ix4>()
        .expect("four dims");
    let window = ConvWindow {
        kernel: [c.kh, c.kw],
        strides: c.strides,
        pads: c.pads,
        dil: c.dil,
    };
    conv_patches(x4, &window, gi * cg..(gi + 1) * cg, pos)
}

fn four(shape: &[usize]) -> Vec<usize> {
    if shape.len() == 3 {
        vec![shape[0], shape[1], 1, shape[2]]
    } else {
        shape.to_vec()
    }
}

/// Output positions of a conv over `x` (rank 3 or 4), at most `max` of them
/// ([`crate::calibrate::gram::positions`]).
fn positions(x: &[usize], c: &Conv2d, max: usize) -> Vec<(usize, usize, usize)> {
    let s = four(x);
    let out = |i: usize, k: usize, st: usize, p: usize, d: usize| -> usize {
        let span = d * (k - 1) + 1;
        (i + p).saturating_sub(span) / st.max(1) + 1
    };
    let oh = out(s[2], c.kh, c.strides[0], c.pad_total[0], c.dil[0]);
    let ow = out(s[3], c.kw, c.strides[1], c.pad_total[1], c.dil[1]);
    crate::calibrate::gram::positions(s[0], oh, ow, max)
}

impl Task {
    /// Add one batch's rows (`xf` float input, `xq` quantized input) to the Grams, and the
    /// picked ones to the row store of a row-form layer (`batch`: the batch's index).
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        grams: &mut Grams,
        mut store: Option<&mut RowStore>,
        batch: usize,
        xf: &ArrayD<f32>,
        xq: &ArrayD<f32>,
        max: usize,
        exact: usize,
    ) -> Result<()> {
        anyhow::ensure!(
            xf.shape() == xq.shape(),
            "node '{}': float input {:?} and quantized input {:?} differ in shape",
            self.node,
            xf.shape(),
            xq.shape()
        );
        let k = self.features;
        let float = grams.fq.is_none();
        let mut update = |gi: usize, f: &Array2<f64>, q: Option<&Array2<f64>>| match (
            q,
            grams.fq.as_mut(),
            grams.ff.as_mut(),
        ) {
            (Some(q), Some(fq), Some(ff)) => {
                add_product(&mut grams.qq[gi], q, q, exact);
                add_product(&mut fq[gi], f, q, exact);
                add_product(&mut ff[gi], f, f, exact);
            }
            // Float inputs: the three Gram matrices are one.
            _ => add_product(&mut grams.qq[gi], f, f, exact),
        };
        match self.conv {
            Some(c) => {
                anyhow::ensure!(
                    matches!(xf.ndim(), 3 | 4),
                    "node '{}': conv input of rank {}",
                    self.node,
                    xf.ndim()
                );
                let cg = self.layer.weight_shape[1];
                let pos = positions(xf.shape(), &c, max);
                let picked = store.as_ref().map(|r| r.pick(batch, pos.len()));
                for gi in 0..self.groups {
                    let f = patches(xf, &c, gi, cg, &pos);
                    let q = (!float).then(|| patches(xq, &c, gi, cg, &pos));
                    update(gi, &f, q.as_ref());
                    if let (Some(r), Some(idx)) = (store.as_deref_mut(), &picked) {
                        r.push(gi, &f, q.as_ref(), idx);
                    }
                }
                grams.rows += pos.len() as u64;
            }
            None => {
                anyhow::ensure!(
                    xf.ndim() >= 1 && xf.shape()[xf.ndim() - 1] == k,
                    "node '{}': input {:?} has no {k} features on its last axis",
                    self.node,
                    xf.shape()
                );
                let rows = xf.len() / k.max(1);
                let flat = |x: &ArrayD<f32>| -> Result<Array2<f64>> {
                    Ok(x.as_standard_layout()
                        .into_owned()
                        .into_shape_with_order((rows, k))?
                        .mapv(f64::from))
                };
                let (f, q) = (flat(xf)?, if float { None } else { Some(flat(xq)?) });
                // Linear layers: rows subsampled by the same prime stride when too many.
                let take: Vec<usize> = if rows <= max {
                    (0..rows).collect()
                } else {
                    let mut v: Vec<usize> = (0..max).map(|i| (i * 1_000_003) % rows).collect();
                    v.sort_unstable();
                    v
                };
                let (f, q) = if take.len() == rows {
                    (f, q)
                } else {
                    (
                        f.select(Axis(0), &take),
                        q.map(|q| q.select(Axis(0), &take)),
                    )
                };
                update(0, &f, q.as_ref());
                if let Some(r) = store {
                    let idx = r.pick(batch, f.nrows());
                    r.push(0, &f, q.as_ref(), &idx);
                }
                grams.rows += take.len() as u64;
            }
        }
        Ok(())
    }

    /// The weight as `[groups][O/groups, K]` f64 matrices, and each row's output channel.
    fn matrices(&self, w: &ArrayD<f32>) -> Vec<(Array2<f64>, Vec<usize>)> {
        let o = self.layer.out_channels();
        let k = self.features;
        let full: Array2<f64> = match self.layer.kind {
            LayerKind::Conv { .. } => w
                .view()
                .into_shape_with_order((o, k))
                .expect("conv weight [O, K]")
                .mapv(f64::from),
            LayerKind::Gemm { trans_b: true } => w
                .view()
                .into_shape_with_order((o, k))
                .expect("[N, K]")
                .mapv(f64::from),
            _ => w
                .view()
                .into_shape_with_order((k, o))
                .expect("[K, N]")
                .t()
                .mapv(f64::from),
        };
        let og = o / self.groups;
        (0..self.groups)
            .map(|gi| {
                (
                    full.slice(s![gi * og..(gi + 1) * og, ..]).to_owned(),
                    (gi * og..(gi + 1) * og).collect(),
                )
            })
            .collect()
    }

    /// The flat index in the weight tensor of row `o`, feature `j`.
    fn flat_index(&self, o: usize, j: usize) -> usize {
        let k = self.features;
        match self.layer.kind {
            LayerKind::Conv { .. } | LayerKind::Gemm { trans_b: true } => o * k + j,
            _ => j * self.layer.out_channels() + o,
        }
    }
}

const ZETA: f64 = 1.1;
const GAMMA: f64 = -0.1;

#[cfg(test)]
fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

#[cfg(test)]
fn soft(v: f64) -> f64 {
    (sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
}

/// `E‖W~ x_q - W x_f‖²` per row of `wt` (`b = W G_fq`, `c` = per-row `w G_ff wᵀ`).
fn row_errors(wt: &Array2<f64>, qq: &Array2<f64>, b: &Array2<f64>, c: &Array1<f64>) -> Vec<f64> {
    let wg = wt.dot(qq);
    (0..wt.nrows())
        .map(|r| {
            let quad = wt.row(r).dot(&wg.row(r));
            let cross = wt.row(r).dot(&b.row(r));
            (quad - 2.0 * cross + c[r]).max(0.0)
        })
        .collect()
}

/// One chunk of rows (f64 inputs, `b = W G_fq`): learn the rounding; returns the hardened
/// integer codes. A wrapper of [`learn_rows_f32`] for callers that hold the Gram form.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn learn_rows(
    w: &Array2<f64>,
    scale: &Array2<f64>,
    qq: &Array2<f64>,
    b: &Array2<f64>,
    qmin: f64,
    qmax: f64,
    iterations: usize,
    opts: &AdaRoundOptions,
) -> Array2<f64> {
    let offset = (w.dot(qq) - b).mapv(|x| x as f32);
    let offset = offset.iter().any(|&x| x != 0.0).then_some(offset);
    learn_rows_f32(
        w.view(),
        scale.view(),
        &qq.mapv(|x| x as f32),
        offset.as_ref().map(|o| o.view()),
        qmin,
        qmax,
        iterations,
        opts,
    )
}

/// Adam on the rounding variables `V` of one chunk of rows, in f32. The gradient of the
/// reconstruction is written around the float weight, `2 (W~ G_qq - W G_fq) = 2 (ΔW G_qq +
/// offset)` with `ΔW = W~ - W` and the constant `offset = W (G_qq - G_fq)` (none for float
/// inputs), so the f32 product carries the small difference, not two large near-equal terms.
/// Returns the hardened integer codes.
#[allow(clippy::too_many_arguments)]
fn learn_rows_f32(
    w: ndarray::ArrayView2<f64>,
    scale: ndarray::ArrayView2<f64>,
    qq: &Array2<f32>,
    offset: Option<ndarray::ArrayView2<f32>>,
    qmin: f64,
    qmax: f64,
    iterations: usize,
    opts: &AdaRoundOptions,
) -> Array2<f64> {
    adam_rounding(w, scale, qmin, qmax, iterations, opts, |_, dw, grad| {
        // d rec / d W~ = 2 (ΔW G_qq + offset)
        ndarray::linalg::general_mat_mul(1.0, dw, qq, 0.0, grad);
        if let Some(o) = &offset {
            *grad += o;
        }
    })
}

/// Adam on the rounding variables `V` of one chunk of rows (`w`, per-element `scale`, both
/// `[rows, K]`), in f32: `gradient(iteration, ΔW, g)` writes `g`, half the reconstruction's
/// gradient with respect to `W~` (`ΔW = W~ - W` at the current soft rounding); the rounding
/// regularizer, its annealing and the update are the same for every loss. Returns the hardened
/// integer codes.
fn adam_rounding(
    w: ndarray::ArrayView2<f64>,
    scale: ndarray::ArrayView2<f64>,
    qmin: f64,
    qmax: f64,
    iterations: usize,
    opts: &AdaRoundOptions,
    mut gradient: impl FnMut(usize, &Array2<f32>, &mut Array2<f32>),
) -> Array2<f64> {
    let (r, k) = w.dim();
    let n = r * k;
    // Row-major copies (ndarray's `iter` walks the logical order).
    let w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
    let s32: Vec<f32> = scale.iter().map(|&x| x as f32).collect();
    let floor64: Vec<f64> = w
        .iter()
        .zip(scale.iter())
        .map(|(a, s)| (a / s).floor())
        .collect();
    let mut v: Vec<f32> = w
        .iter()
        .zip(scale.iter())
        .zip(&floor64)
        .map(|((a, s), f)| {
            let rest = (a / s - f).clamp(1e-6, 1.0 - 1e-6);
            // h(V) = rest  <=>  σ(V) = (rest - γ) / (ζ - γ)
            let p = (rest - GAMMA) / (ZETA - GAMMA);
            (p / (1.0 - p)).ln() as f32
        })
        .collect();
    let floor: Vec<f32> = floor64.iter().map(|&f| f as f32).collect();
    let (mut m1, mut m2) = (vec![0f32; n], vec![0f32; n]);
    let (mut sg, mut h) = (vec![0f32; n], vec![0f32; n]);
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f32);
    let (zg, g0) = ((ZETA - GAMMA) as f32, GAMMA as f32);
    let (lo, hi) = (qmin as f32, qmax as f32);
    let (lambda, lr) = (opts.lambda as f32, opts.learning_rate as f32);
    let warm = (iterations as f64 * 0.2) as usize;
    let mut dw = Array2::<f32>::zeros((r, k));
    let mut grad = Array2::<f32>::zeros((r, k));
    for it in 0..iterations {
        {
            let d = dw.as_slice_mut().expect("standard layout");
            for i in 0..n {
                let s = 1.0 / (1.0 + (-v[i]).exp());
                sg[i] = s;
                let hv = (s * zg + g0).clamp(0.0, 1.0);
                h[i] = hv;
                d[i] = s32[i] * (floor[i] + hv).clamp(lo, hi) - w32[i];
            }
        }
        gradient(it, &dw, &mut grad);
        let beta = if it >= warm && iterations > warm {
            let t = (it - warm) as f64 / (iterations - warm) as f64;
            2.0 + 0.5 * (20.0 - 2.0) * (1.0 + (t * std::f64::consts::PI).cos())
        } else {
            0.0
        } as f32;
        let t = (it + 1) as i32;
        let (c1, c2) = ((1.0 - beta1.powi(t)) as f32, (1.0 - beta2.powi(t)) as f32);
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let gs = grad.as_slice().expect("standard layout");
        for i in 0..n {
            let x = floor[i] + h[i];
            let s = sg[i];
            let hin = s * zg + g0;
            let dh_dv = if hin > 0.0 && hin < 1.0 {
                zg * s * (1.0 - s)
            } else {
                0.0
            };
            let mut dh = if x > lo && x < hi {
                2.0 * gs[i] * s32[i]
            } else {
                0.0
            };
            if beta > 0.0 {
                // d/dh λ(1 - |2h - 1|^β) = -2λβ |2h - 1|^(β-1) sign(2h - 1)
                let u = 2.0 * h[i] - 1.0;
                dh -= 2.0 * lambda * beta * u.abs().powf(beta - 1.0) * u.signum();
            }
            let gv = dh * dh_dv;
            m1[i] = b1 * m1[i] + (1.0 - b1) * gv;
            m2[i] = b2 * m2[i] + (1.0 - b2) * gv * gv;
            v[i] -= lr * (m1[i] / c1) / ((m2[i] / c2).sqrt() + eps);
        }
    }
    Array2::from_shape_fn((r, k), |(i, j)| {
        let x = i * k + j;
        (floor64[x] + if v[x] >= 0.0 { 1.0 } else { 0.0 }).clamp(qmin, qmax)
    })
}

/// Learn the rounding of the plan's Conv/Gemm/MatMul weights (all of them, int8 or int4 as
/// `int4` says). Returns the codes of every weight of the plan (round-to-nearest where not
/// learned) and the report.
pub fn learn(
    work: &Model,
    plan: &Plan,
    ranges: &ActivationRanges,
    calib: &CalibrationSet,
    opts: &QuantizeOptions,
    ada: &AdaRoundOptions,
    int4: &IndexSet<String>,
) -> Result<(IndexMap<String, Codes>, AdaRoundReport)> {
    let g = &work.graph;
    let block = opts.w4a8.and_then(|w| w.block_size);
    let mut codes = nearest_codes(g, plan, int4, block, opts.reduce_range)?;
    let mut layers_report = Vec::new();
    // Tasks in topological order.
    let mut tasks = Vec::new();
    for ix in g.topo_order()? {
        let Some(layer) = Layer::of(g, ix) else {
            continue;
        };
        let node = g.node(ix).name().to_string();
        let Some(mark) = plan.weights.get(&layer.weight) else {
            continue;
        };
        if mark.node != node || tasks.iter().any(|t: &Task| t.weight == layer.weight) {
            continue;
        }
        let bits = if int4.contains(&layer.weight) { 4 } else { 8 };
        let skip = |why: &str| LayerRounding {
            node: node.clone(),
            weight: layer.weight.clone(),
            bits,
            stage: 0,
            status: format!("nearest: {why}"),
            features: 0,
            blocks: 0,
            activation: None,
            rows: 0,
            iterations: 0,
            nearest_error: f64::NAN,
            learned_error: f64::NAN,
            nearest_sqnr_db: f64::NAN,
            learned_sqnr_db: f64::NAN,
            flipped: 0,
            seconds: 0.0,
        };
        if node.is_empty() {
            layers_report.push(skip("unnamed node"));
            continue;
        }
        let (conv, groups, features) = match layer.kind {
            LayerKind::Conv { group } => match conv2d(g.node(ix), &layer.weight_shape) {
                Some(c) => (Some(c), group, layer.weight_shape[1..].iter().product()),
                None => {
                    layers_report.push(skip("conv form not covered (auto_pad SAME or 3-D)"));
                    continue;
                }
            },
            LayerKind::Gemm { .. } | LayerKind::MatMul => (None, 1, layer.in_channels()),
            LayerKind::ConvTranspose { .. } => {
                layers_report.push(skip("ConvTranspose"));
                continue;
            }
        };
        if features > ada.max_features {
            layers_report.push(skip(&format!(
                "{features} input features per group, above {}",
                ada.max_features
            )));
            continue;
        }
        let taps: usize = match layer.kind {
            LayerKind::Conv { .. } => layer.weight_shape[2..].iter().product(),
            _ => 1,
        };
        let blocks = feature_blocks(features, taps, ada.exact_features, ada.block_features);
        let clip = if ada.activation_loss {
            Clip::after(g, &layer)
        } else {
            None
        };
        tasks.push(Task {
            weight: layer.weight.clone(),
            node,
            layer,
            conv,
            groups,
            features,
            blocks,
            stage: 0,
            index: tasks.len(),
            clip,
        });
    }
    let quantized_inputs = ada.inputs == AdaRoundInputs::Quantized;
    let stages = if quantized_inputs {
        match ada.stages {
            0 => tasks.len().max(1),
            s => s.clamp(1, tasks.len().max(1)),
        }
    } else {
        1
    };
    let n_tasks = tasks.len();
    for (i, t) in tasks.iter_mut().enumerate() {
        t.stage = i * stages / n_tasks.max(1);
    }
    // Iterations: the budget spread in proportion to nothing but cost (one count for all).
    let macs_per_iteration: f64 = tasks
        .iter()
        .map(|t| match t.clip {
            Some(_) => {
                let cap = RowStore::cap(ada, t.groups, t.features);
                rows::macs(
                    t.layer.out_channels(),
                    t.features,
                    ada.activation_batch.min(cap),
                ) as f64
            }
            None => {
                let widest = t.blocks.iter().map(|b| b.len()).max().unwrap_or(0);
                (t.layer.out_channels() * t.features * (widest + 64)) as f64
            }
        })
        .sum();
    let iterations = match ada.budget_seconds {
        Some(s) if macs_per_iteration > 0.0 => {
            ((s * ASSUMED_MACS_PER_SECOND / macs_per_iteration) as usize).clamp(10, ada.iterations)
        }
        _ => ada.iterations,
    };
    let float_proto = work.to_proto()?;
    let (mut data_seconds, mut optimize_seconds) = (0.0, 0.0);
    let max_batch_rows = ada.max_rows.div_ceil(calib.batches.len().max(1)).max(1);
    for stage in 0..stages {
        let stage_tasks: Vec<&Task> = tasks.iter().filter(|t| t.stage == stage).collect();
        if stage_tasks.is_empty() {
            continue;
        }
        let copies = Grams::copies(!quantized_inputs);
        let bytes: u64 = stage_tasks
            .iter()
            .map(|t| {
                let stored = match t.clip {
                    Some(_) => RowStore::bytes(
                        RowStore::cap(ada, t.groups, t.features),
                        t.groups,
                        t.features,
                        !quantized_inputs,
                    ),
                    None => 0,
                };
                copies * 8 * (t.groups * t.features * t.features) as u64 + stored
            })
            .sum();
        crate::limits::MemoryBudget::default().check(
            "adaround's Gram matrices (K x K f64 per layer group, 3 with quantized inputs) and stored rows",
            bytes,
        )?;
        let t0 = Instant::now();
        let names: Vec<&str> = stage_tasks.iter().map(|t| t.node.as_str()).collect();
        let quantized = if quantized_inputs {
            Some(simulated(work, plan, ranges, &codes, opts, &names)?)
        } else {
            None
        };
        let f_inputs: Vec<String> = stage_tasks
            .iter()
            .map(|t| g.node(t.layer.node).input[0].clone())
            .collect();
        // Graph inputs come from the batch, everything else is an extra output of the run.
        let not_input = |n: &&String| !calib.input_names.contains(n);
        let f_extra: Vec<String> = f_inputs.iter().filter(not_input).cloned().collect();
        let q_extra: Vec<String> = quantized
            .as_ref()
            .map(|(_, q_inputs)| q_inputs.iter().filter(not_input).cloned().collect())
            .unwrap_or_default();
        for t in &stage_tasks {
            let elements = (t.features as u64)
                .saturating_mul(t.features as u64)
                .saturating_mul(copies * t.groups as u64);
            crate::limits::MemoryBudget::default().check_elements(
                &format!("adaround: the input Gram matrices of node '{}'", t.node),
                elements,
                8,
            )?;
        }
        let mut grams: Vec<Grams> = stage_tasks
            .iter()
            .map(|t| Grams::new(t.groups, t.features, !quantized_inputs))
            .collect();
        let mut stores: Vec<Option<RowStore>> = stage_tasks
            .iter()
            .map(|t| {
                t.clip.map(|_| {
                    RowStore::new(
                        t.index,
                        opts.seed,
                        (t.groups, t.features),
                        RowStore::cap(ada, t.groups, t.features),
                        calib.batches.len(),
                        !quantized_inputs,
                    )
                })
            })
            .collect();
        let mut runners: Option<(Vec<Vec<usize>>, Runner, Option<Runner>)> = None;
        let progress = crate::progress::Progress::bar(
            &format!("adaround data {}/{stages}", stage + 1),
            calib.batches.len() as u64,
        );
        for (bi, batch) in calib.batches.iter().enumerate() {
            progress.inc(1);
            let shapes: Vec<Vec<usize>> = batch.iter().map(|a| a.shape().to_vec()).collect();
            if runners.as_ref().is_none_or(|(s, _, _)| *s != shapes) {
                let named = calib.named_shapes(&shapes);
                let rf = Runner::new(&float_proto, &named, &f_extra)
                    .context("adaround: preparing the float run in tract")?;
                let rq = match &quantized {
                    Some((quant_proto, _)) => Some(
                        Runner::new(quant_proto, &named, &q_extra)
                            .context("adaround: preparing the quantized run in tract")?,
                    ),
                    None => None,
                };
                runners = Some((shapes, rf, rq));
            }
            let (_, rf, rq) = runners.as_ref().expect("set above");
            let value =
                |r: &Runner, names: &[String], extra: &[String]| -> Result<Vec<ArrayD<f32>>> {
                    let outs = r
                        .run(batch)
                        .with_context(|| format!("calibration batch {bi}"))?;
                    let skip = outs.len() - extra.len();
                    names
                        .iter()
                        .map(|n| match calib.input_names.iter().position(|x| x == n) {
                            Some(k) => batch[k]
                                .as_f32()
                                .cloned()
                                .with_context(|| format!("input '{n}' of a layer is not float")),
                            None => {
                                let i = extra.iter().position(|x| x == n).expect("listed above");
                                Ok(outs[skip + i].clone())
                            }
                        })
                        .collect()
                };
            let xf = value(rf, &f_inputs, &f_extra)?;
            let xq = match (rq, &quantized) {
                (Some(rq), Some((_, q_inputs))) => Some(value(rq, q_inputs, &q_extra)?),
                _ => None,
            };
            let xq = xq.as_ref().unwrap_or(&xf);
            grams
                .par_iter_mut()
                .zip(stores.par_iter_mut())
                .zip(stage_tasks.par_iter())
                .enumerate()
                .try_for_each(|(i, ((gr, st), t))| {
                    t.add(
                        gr,
                        st.as_mut(),
                        bi,
                        &xf[i],
                        &xq[i],
                        max_batch_rows,
                        ada.exact_features,
                    )
                })?;
        }
        drop(progress);
        data_seconds += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let problems: Vec<LayerProblem> = stage_tasks
            .par_iter()
            .zip(grams.into_par_iter())
            .zip(stores.into_par_iter())
            .map(|((t, gr), st)| {
                let bits = if int4.contains(&t.weight) { 4 } else { 8 };
                prepare_layer(t, gr, st, work, &codes[&t.weight], bits)
            })
            .collect::<Result<_>>()?;
        let learned = optimize_layers(&problems, iterations, ada, opts);
        for ((t, p), (q, seconds)) in stage_tasks.iter().zip(&problems).zip(learned) {
            let (mut row, out) = finish_layer(t, p, &q, &codes[&t.weight], iterations);
            row.stage = stage;
            row.seconds = seconds;
            codes.insert(t.weight.clone(), out);
            layers_report.push(row);
        }
        optimize_seconds += t1.elapsed().as_secs_f64();
    }
    // W8A8: the learned rounding must also beat nearest at the model's outputs.
    let output_check = if ada.output_check && int4.is_empty() && !tasks.is_empty() {
        let t0 = Instant::now();
        let nearest = nearest_codes(g, plan, int4, block, opts.reduce_range)?;
        // A check that cannot run (tract refusing the simulation graph) keeps the learned
        // codes, as before the check existed, and says why.
        let (e, kept) = match output_errors(work, plan, ranges, calib, opts, &[&codes, &nearest]) {
            Ok(e) if e[0] < e[1] => (e, "learned".to_string()),
            Ok(e) => {
                codes = nearest;
                (e, "nearest".to_string())
            }
            Err(err) => (
                vec![f64::NAN; 2],
                format!("learned (the check could not run: {err:#})"),
            ),
        };
        Some(OutputCheck {
            learned_error: e[0],
            nearest_error: e[1],
            kept,
            seconds: t0.elapsed().as_secs_f64(),
        })
    } else {
        None
    };
    // Report rows in graph order of the plan's weights.
    let order: Vec<&String> = plan.weights.keys().collect();
    layers_report.sort_by_key(|r| order.iter().position(|w| **w == r.weight));
    Ok((
        codes,
        AdaRoundReport {
            inputs: ada.inputs,
            iterations,
            lambda: ada.lambda,
            stages,
            max_rows: ada.max_rows,
            budget_seconds: ada.budget_seconds,
            data_seconds,
            optimize_seconds,
            output_check,
            layers: layers_report,
        },
    ))
}

/// One group of one layer, ready to optimize: the weight rows `[O/groups, K]`, their output
/// channels, the per-element scales, the Gram form (`b = W G_fq`, `c` = per-row `w G_ff wᵀ`)
/// and the f32 copies the optimization reads.
struct GroupProblem {
    w: Array2<f64>,
    outs: Vec<usize>,
    scales: Array2<f64>,
    /// Round-to-nearest, dequantized, in the same view as `w`.
    near: Array2<f64>,
    qq: Array2<f64>,
    b: Array2<f64>,
    c: Array1<f64>,
    /// Per feature block, the block's diagonal block of `G_qq` in f32 (the whole matrix when
    /// one block).
    qq32: Vec<Array2<f32>>,
    /// `W (G_qq - G_fq)`; `None` when the two are equal (float inputs).
    offset: Option<Array2<f32>>,
    /// The stored rows of a row-form layer (activation inside the loss); `None`: Gram form.
    rows: Option<GroupRows>,
}

/// One layer's groups, its bit width and the row count of its Grams.
struct LayerProblem {
    groups: Vec<GroupProblem>,
    /// The feature blocks ([`Task::blocks`]).
    blocks: Vec<std::ops::Range<usize>>,
    bits: u32,
    rows: u64,
    seconds: f64,
}

/// Normalize one layer's Gram matrices and build its [`GroupProblem`]s.
fn prepare_layer(
    t: &Task,
    mut gr: Grams,
    store: Option<RowStore>,
    work: &Model,
    nearest: &Codes,
    bits: u32,
) -> Result<LayerProblem> {
    let t0 = Instant::now();
    let rows = gr.rows.max(1) as f64;
    for m in gr
        .qq
        .iter_mut()
        .chain(gr.fq.iter_mut().flatten())
        .chain(gr.ff.iter_mut().flatten())
    {
        *m /= rows;
    }
    let w = t.layer.weight_f32(&work.graph)?;
    let stored_rows = store.as_ref().map_or(0, |st| st.rows());
    // Row-form layers with rows: per group the stored rows, the bias and the activation.
    let mut row_groups = match (store, t.clip) {
        (Some(st), Some(clip)) if st.rows() > 0 => {
            let bias: Vec<f64> = match t.layer.bias_f32(&work.graph)? {
                Some(b) => b.iter().map(|&v| f64::from(v)).collect(),
                None => vec![0.0; t.layer.out_channels()],
            };
            anyhow::ensure!(
                bias.len() == t.layer.out_channels(),
                "node '{}': bias of {} values for {} output channels",
                t.node,
                bias.len(),
                t.layer.out_channels()
            );
            Some((st.finish().into_iter(), bias, clip))
        }
        _ => None,
    };
    // The scale of row `o`, feature `j` (per channel, per tensor or per block).
    let scale_of = |o: usize, j: usize| -> f64 {
        f64::from(nearest.scales[nearest.scale_index(t.flat_index(o, j))])
    };
    let mut groups = Vec::new();
    let float = gr.fq.is_none();
    let (fqs, ffs) = (gr.fq.unwrap_or_default(), gr.ff.unwrap_or_default());
    for (gi, ((wg, outs), qq)) in t.matrices(&w).into_iter().zip(gr.qq).enumerate() {
        let (fq, ff) = if float {
            (&qq, &qq)
        } else {
            (&fqs[gi], &ffs[gi])
        };
        let b = wg.dot(fq);
        let c: Array1<f64> = {
            let wf = wg.dot(ff);
            (0..wg.nrows()).map(|r| wg.row(r).dot(&wf.row(r))).collect()
        };
        let offset = (!float && *fq != qq).then(|| (wg.dot(&qq) - &b).mapv(|x| x as f32));
        let scales = Array2::from_shape_fn(wg.dim(), |(r, j)| scale_of(outs[r], j));
        let near = Array2::from_shape_fn(wg.dim(), |(i, j)| {
            nearest.values[t.flat_index(outs[i], j)] as f64 * scale_of(outs[i], j)
        });
        let qq32 = t
            .blocks
            .iter()
            .map(|r| qq.slice(s![r.clone(), r.clone()]).mapv(|x| x as f32))
            .collect();
        let rows = row_groups.as_mut().and_then(|(it, bias, clip)| {
            let (xq, xf) = it.next()?;
            Some(GroupRows {
                xq,
                xf,
                bias: outs.iter().map(|&o| bias[o]).collect(),
                clip: *clip,
            })
        });
        groups.push(GroupProblem {
            qq32,
            w: wg,
            outs,
            scales,
            near,
            qq,
            b,
            c,
            offset,
            rows,
        });
    }
    Ok(LayerProblem {
        groups,
        blocks: t.blocks.clone(),
        bits,
        rows: if row_groups.is_some() {
            stored_rows as u64
        } else {
            gr.rows
        },
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Optimize every layer of `problems` at once: the work is cut into units of at most
/// [`CHUNK_ROWS`] rows of one layer group (fixed, whatever the thread count), the units run in
/// parallel across layers, largest first. Returns per layer and group the learned codes
/// `[O/groups, K]`, and per layer the thread seconds its units took.
fn optimize_layers(
    problems: &[LayerProblem],
    iterations: usize,
    ada: &AdaRoundOptions,
    opts: &QuantizeOptions,
) -> Vec<(Vec<Array2<f64>>, f64)> {
    // (layer, group, first row, end row)
    let mut units: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (li, p) in problems.iter().enumerate() {
        for (gi, gp) in p.groups.iter().enumerate() {
            let rows = gp.w.nrows();
            for r0 in (0..rows).step_by(CHUNK_ROWS) {
                units.push((li, gi, r0, (r0 + CHUNK_ROWS).min(rows)));
            }
        }
    }
    let cost = |&(li, gi, r0, r1): &(usize, usize, usize, usize)| -> usize {
        let k = problems[li].groups[gi].w.ncols();
        if let Some(gr) = &problems[li].groups[gi].rows {
            return rows::macs(r1 - r0, k, ada.activation_batch.min(gr.xq.nrows()));
        }
        let widest = problems[li]
            .blocks
            .iter()
            .map(|b| b.len())
            .max()
            .unwrap_or(k);
        // The product `ΔW G` (per block) plus the element-wise update (~64 multiply-adds).
        (r1 - r0) * k * (widest + 64)
    };
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| std::cmp::Reverse(cost(&units[u])));
    let progress = crate::progress::Progress::bar("adaround", units.len() as u64);
    let learned: Vec<(usize, Array2<f64>, f64)> = order
        .par_iter()
        .with_max_len(1)
        .map(|&u| {
            let t0 = Instant::now();
            let (li, gi, r0, r1) = units[u];
            let p = &problems[li];
            let gp = &p.groups[gi];
            let qmax = qmax(p.bits, opts.reduce_range) as f64;
            let q = if let Some(gr) = &gp.rows {
                rows::learn_rows_clipped(
                    gp.w.slice(s![r0..r1, ..]),
                    gp.scales.slice(s![r0..r1, ..]),
                    gr,
                    r0..r1,
                    qmax,
                    iterations,
                    ada.activation_batch,
                    ada,
                )
            } else if p.blocks.len() == 1 {
                learn_rows_f32(
                    gp.w.slice(s![r0..r1, ..]),
                    gp.scales.slice(s![r0..r1, ..]),
                    &gp.qq32[0],
                    gp.offset.as_ref().map(|o| o.slice(s![r0..r1, ..])),
                    -qmax,
                    qmax,
                    iterations,
                    ada,
                )
            } else {
                learn_blocks(gp, &p.blocks, r0..r1, qmax, iterations, ada)
            };
            progress.inc(1);
            (u, q, t0.elapsed().as_secs_f64())
        })
        .collect();
    let mut by_unit: Vec<Option<(Array2<f64>, f64)>> = vec![None; units.len()];
    for (u, q, sec) in learned {
        by_unit[u] = Some((q, sec));
    }
    let mut out: Vec<(Vec<Array2<f64>>, f64)> = problems
        .iter()
        .map(|p| {
            (
                p.groups
                    .iter()
                    .map(|gp| Array2::zeros(gp.w.dim()))
                    .collect(),
                p.seconds,
            )
        })
        .collect();
    for (&(li, gi, r0, r1), unit) in units.iter().zip(by_unit) {
        let (q, sec) = unit.expect("every unit ran");
        out[li].0[gi].slice_mut(s![r0..r1, ..]).assign(&q);
        out[li].1 += sec;
    }
    out
}

/// Rows `rows` of a layer group wider than [`AdaRoundOptions::exact_features`]: block
/// coordinate descent over the feature blocks, in order. Block `b` is optimized on its own
/// diagonal Gram block with the other blocks held at their current rounding (the learned one
/// for the blocks before it, nearest for those after): its gradient `2 (ΔW G_qq + offset)`
/// restricted to `b`'s columns is `2 (ΔW_b G_bb + Σ_{a≠b} ΔW_a G_ab + offset_b)`, and the sum
/// over the other blocks is a constant of the block's optimization (computed once in f64).
/// Returns the learned integer codes.
fn learn_blocks(
    gp: &GroupProblem,
    blocks: &[std::ops::Range<usize>],
    rows: std::ops::Range<usize>,
    qmax: f64,
    iterations: usize,
    ada: &AdaRoundOptions,
) -> Array2<f64> {
    let w = gp.w.slice(s![rows.clone(), ..]);
    let scale = gp.scales.slice(s![rows.clone(), ..]);
    // ΔW of the current rounding: nearest to begin with.
    let mut dw = &gp.near.slice(s![rows.clone(), ..]) - &w;
    let mut codes = Array2::<f64>::zeros(w.dim());
    for (bi, b) in blocks.iter().enumerate() {
        let mut others = dw.clone();
        others.slice_mut(s![.., b.clone()]).fill(0.0);
        let mut offset = others.dot(&gp.qq.slice(s![.., b.clone()]));
        if let Some(o) = &gp.offset {
            offset += &o.slice(s![rows.clone(), b.clone()]).mapv(f64::from);
        }
        let offset = offset.mapv(|x| x as f32);
        let q = learn_rows_f32(
            w.slice(s![.., b.clone()]),
            scale.slice(s![.., b.clone()]),
            &gp.qq32[bi],
            Some(offset.view()),
            -qmax,
            qmax,
            iterations,
            ada,
        );
        let learned = &q * &scale.slice(s![.., b.clone()]) - w.slice(s![.., b.clone()]);
        dw.slice_mut(s![.., b.clone()]).assign(&learned);
        codes.slice_mut(s![.., b.clone()]).assign(&q);
    }
    codes
}

/// One layer's report row and codes from its learned codes: a row keeps round-to-nearest where
/// that gives the lower reconstruction error (f64, exact Gram form).
fn finish_layer(
    t: &Task,
    p: &LayerProblem,
    learned: &[Array2<f64>],
    nearest: &Codes,
    iterations: usize,
) -> (LayerRounding, Codes) {
    let mut out = nearest.clone();
    let (mut err_near, mut err_learn, mut energy, mut flipped) = (0.0, 0.0, 0.0, 0usize);
    let mut activation = None;
    for (gp, q) in p.groups.iter().zip(learned) {
        let outs = &gp.outs;
        let wt = Array2::from_shape_fn(q.dim(), |(i, j)| q[[i, j]] * gp.scales[[i, j]]);
        // Round-to-nearest as the quantize pass does it, in the same matrix view; row-form
        // layers compare the activated outputs on their stored rows.
        let (energies, e_near, e_learn) = match &gp.rows {
            Some(gr) => {
                activation = Some(gr.clip.name());
                let (energies, mut e) = gr.errors(&gp.w, &[&gp.near, &wt]);
                let e_learn = e.pop().expect("two candidates");
                let e_near = e.pop().expect("two candidates");
                (energies, e_near, e_learn)
            }
            None => (
                gp.c.to_vec(),
                row_errors(&gp.near, &gp.qq, &gp.b, &gp.c),
                row_errors(&wt, &gp.qq, &gp.b, &gp.c),
            ),
        };
        for (i, &o) in outs.iter().enumerate() {
            energy += energies[i];
            err_near += e_near[i];
            if e_learn[i] < e_near[i] {
                err_learn += e_learn[i];
                for j in 0..gp.w.ncols() {
                    let idx = t.flat_index(o, j);
                    let v = q[[i, j]] as i8;
                    if out.values[idx] != v {
                        flipped += 1;
                    }
                    out.values[idx] = v;
                }
            } else {
                err_learn += e_near[i];
            }
        }
    }
    let db = |e: f64| 10.0 * (energy / e.max(1e-300)).log10();
    (
        LayerRounding {
            node: t.node.clone(),
            weight: t.weight.clone(),
            bits: p.bits,
            stage: 0,
            status: "learned".into(),
            features: t.features,
            blocks: if activation.is_some() {
                1
            } else {
                p.blocks.len()
            },
            activation,
            rows: p.rows,
            iterations,
            nearest_error: err_near,
            learned_error: err_learn,
            nearest_sqnr_db: db(err_near),
            learned_sqnr_db: db(err_learn),
            flipped,
            seconds: 0.0,
        },
        out,
    )
}

/// The codes [`decide`] settled on, with the report's notes and details.
pub struct Decided {
    pub codes: IndexMap<String, Codes>,
    pub notes: Vec<String>,
    pub details: serde_json::Value,
}

/// When `--w4a8` or `--rounding adaround` is on: every weight's codes (int4 or int8, learned or
/// nearest) and what the report says about them; `None` otherwise (the default insertion).
pub fn decide(
    work: &Model,
    plan: &Plan,
    ranges: &ActivationRanges,
    calib: &CalibrationSet,
    opts: &QuantizeOptions,
) -> Result<Option<Decided>> {
    if opts.adaround.is_none() && opts.w4a8.is_none() {
        return Ok(None);
    }
    let g = &work.graph;
    let block = opts.w4a8.and_then(|w| w.block_size);
    let int4 = match opts.w4a8 {
        Some(w) => int4_weights(g, plan, w)?,
        None => IndexSet::new(),
    };
    let mut notes = Vec::new();
    if opts.w4a8.is_some() && opts.target.policy().boundary_cost.is_some() {
        notes.push(format!(
            "W4A8: target {}'s speed rule (thin int8 regions kept float) is off: every layer the rules cover is quantized, for size",
            opts.target.policy().name
        ));
    }
    if let Some(w) = opts.w4a8 {
        notes.push(format!(
            "W4A8: {} of {} weight(s) int4 {}{}, int8 activations",
            int4.len(),
            plan.weights.len(),
            match w.block_size {
                Some(b) => format!(
                    "in blocks of {b} along the input axis (their biases stay float: no single weight scale per channel)"
                ),
                None => "per channel".into(),
            },
            if w.all_layers {
                ""
            } else {
                " (first and last layer and depthwise convs kept int8)"
            }
        ));
    }
    let (codes, report) = match &opts.adaround {
        Some(ada) => {
            let (codes, report) = learn(work, plan, ranges, calib, opts, ada, &int4)?;
            notes.push(summary(&report));
            if opts.bias_correction != crate::passes::equalize::BiasCorrection::Off {
                notes.push(
                    "bias correction measured the round-to-nearest weights, before adaround".into(),
                );
            }
            (codes, Some(report))
        }
        None => (
            nearest_codes(g, plan, &int4, block, opts.reduce_range)?,
            None,
        ),
    };
    let details = serde_json::json!({
        "w4a8": opts.w4a8.map(|w| serde_json::json!({
            "all_layers": w.all_layers,
            "block_size": w.block_size,
            "int4_weights": int4.iter().collect::<Vec<_>>(),
        })),
        "adaround": report,
    });
    Ok(Some(Decided {
        codes,
        notes,
        details,
    }))
}

/// One line for the run summary.
pub fn summary(r: &AdaRoundReport) -> String {
    let learned: Vec<&LayerRounding> = r.layers.iter().filter(|l| l.status == "learned").collect();
    let gain = |l: &&LayerRounding| l.learned_sqnr_db - l.nearest_sqnr_db;
    let mean_gain = learned.iter().map(gain).sum::<f64>() / learned.len().max(1) as f64;
    let check = match &r.output_check {
        Some(c) if c.kept == "nearest" => format!(
            "; at the model's outputs on the calibration data it lost to round-to-nearest ({:.3e} vs {:.3e} squared error): nearest kept",
            c.learned_error, c.nearest_error
        ),
        Some(c) if c.kept == "learned" => format!(
            "; model outputs on the calibration data closer than with round-to-nearest ({:.3e} vs {:.3e} squared error)",
            c.learned_error, c.nearest_error
        ),
        Some(c) => format!("; output check: {}", c.kept),
        None => String::new(),
    };
    format!(
        "adaround: {} of {} layer(s) learned on {} inputs ({} iterations, {} stage(s)), layer output SQNR +{:.2} dB on average over round-to-nearest; cost {:.1} s ({:.1} s data, {:.1} s optimization){check}",
        learned.len(),
        r.layers.len(),
        match r.inputs {
            AdaRoundInputs::Float => "float",
            AdaRoundInputs::Quantized => "quantized-upstream",
        },
        r.iterations,
        r.stages,
        mean_gain,
        r.data_seconds + r.optimize_seconds,
        r.data_seconds,
        r.optimize_seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// On a random correlated layer, learned rounding beats nearest on the exact output error,
    /// and the Gram-form error equals the error computed on the rows directly.
    #[test]
    fn learned_rows_beat_nearest_and_the_gram_form_is_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (o, k, n) = (6usize, 12usize, 400usize);
        let base = Array2::from_shape_fn((n, 3), |_| rng.random::<f64>() - 0.5);
        let mix = Array2::from_shape_fn((3, k), |_| rng.random::<f64>() - 0.5);
        let x = base.dot(&mix) + Array2::from_shape_fn((n, k), |_| 0.05 * rng.random::<f64>());
        let w = Array2::from_shape_fn((o, k), |_| rng.random::<f64>() - 0.5);
        let qmax = 7.0;
        let scale: Vec<f64> = (0..o)
            .map(|r| w.row(r).iter().fold(0f64, |m, v| m.max(v.abs())) / qmax)
            .collect();
        let g = x.t().dot(&x) / n as f64;
        let b = w.dot(&g);
        let c: Array1<f64> = (0..o).map(|r| w.row(r).dot(&w.dot(&g).row(r))).collect();
        let near = Array2::from_shape_fn((o, k), |(i, j)| {
            (w[[i, j]] / scale[i]).round_ties_even().clamp(-qmax, qmax) * scale[i]
        });
        let per_element = Array2::from_shape_fn((o, k), |(i, _)| scale[i]);
        let q = learn_rows(
            &w,
            &per_element,
            &g,
            &b,
            -qmax,
            qmax,
            500,
            &AdaRoundOptions::default(),
        );
        let wt = Array2::from_shape_fn((o, k), |(i, j)| q[[i, j]] * scale[i]);
        let direct = |m: &Array2<f64>| -> f64 {
            let d = x.dot(&(m - &w).t());
            d.iter().map(|v| v * v).sum::<f64>() / n as f64
        };
        let gram = |m: &Array2<f64>| -> f64 { row_errors(m, &g, &b, &c).iter().sum() };
        assert!((gram(&near) - direct(&near)).abs() <= 1e-9 * direct(&near).max(1.0));
        assert!(q.iter().all(|v| v.fract() == 0.0 && v.abs() <= qmax));
        assert!(
            direct(&wt) < 0.8 * direct(&near),
            "learned {} vs nearest {}",
            direct(&wt),
            direct(&near)
        );
    }

    /// The f64 optimization as it was before the f32 path (session 12): the reference the f32
    /// path is checked against.
    #[allow(clippy::too_many_arguments)]
    fn learn_rows_f64(
        w: &Array2<f64>,
        scale: &Array2<f64>,
        qq: &Array2<f64>,
        b: &Array2<f64>,
        qmin: f64,
        qmax: f64,
        iterations: usize,
        opts: &AdaRoundOptions,
    ) -> Array2<f64> {
        let (r, k) = w.dim();
        let floor = Array2::from_shape_fn((r, k), |(i, j)| (w[[i, j]] / scale[[i, j]]).floor());
        let mut v = Array2::from_shape_fn((r, k), |(i, j)| {
            let rest = (w[[i, j]] / scale[[i, j]] - floor[[i, j]]).clamp(1e-6, 1.0 - 1e-6);
            // h(V) = rest  <=>  σ(V) = (rest - γ) / (ζ - γ)
            let p = (rest - GAMMA) / (ZETA - GAMMA);
            (p / (1.0 - p)).ln()
        });
        let (mut m1, mut m2) = (Array2::<f64>::zeros((r, k)), Array2::<f64>::zeros((r, k)));
        let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
        let warm = (iterations as f64 * 0.2) as usize;
        let mut wt = Array2::<f64>::zeros((r, k));
        for it in 0..iterations {
            let h = v.mapv(soft);
            for i in 0..r {
                for j in 0..k {
                    wt[[i, j]] = scale[[i, j]] * (floor[[i, j]] + h[[i, j]]).clamp(qmin, qmax);
                }
            }
            // d rec / d W~ = 2 (W~ G_qq - W G_fq)
            let mut grad = wt.dot(qq);
            grad -= b;
            grad *= 2.0;
            let beta = if it >= warm && iterations > warm {
                let t = (it - warm) as f64 / (iterations - warm) as f64;
                2.0 + 0.5 * (20.0 - 2.0) * (1.0 + (t * std::f64::consts::PI).cos())
            } else {
                0.0
            };
            let t = (it + 1) as i32;
            let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
            for i in 0..r {
                for j in 0..k {
                    let x = floor[[i, j]] + h[[i, j]];
                    let vij = v[[i, j]];
                    let sg = sigmoid(vij);
                    let hin = sg * (ZETA - GAMMA) + GAMMA;
                    let dh_dv = if hin > 0.0 && hin < 1.0 {
                        (ZETA - GAMMA) * sg * (1.0 - sg)
                    } else {
                        0.0
                    };
                    let mut dh = if x > qmin && x < qmax {
                        grad[[i, j]] * scale[[i, j]]
                    } else {
                        0.0
                    };
                    if beta > 0.0 {
                        // d/dh λ(1 - |2h - 1|^β) = -2λβ |2h - 1|^(β-1) sign(2h - 1)
                        let u = 2.0 * h[[i, j]] - 1.0;
                        dh -= 2.0 * opts.lambda * beta * u.abs().powf(beta - 1.0) * u.signum();
                    }
                    let gv = dh * dh_dv;
                    let a = &mut m1[[i, j]];
                    *a = beta1 * *a + (1.0 - beta1) * gv;
                    let bb = &mut m2[[i, j]];
                    *bb = beta2 * *bb + (1.0 - beta2) * gv * gv;
                    v[[i, j]] -=
                        opts.learning_rate * (m1[[i, j]] / c1) / ((m2[[i, j]] / c2).sqrt() + eps);
                }
            }
        }
        Array2::from_shape_fn((r, k), |(i, j)| {
            (floor[[i, j]] + if v[[i, j]] >= 0.0 { 1.0 } else { 0.0 }).clamp(qmin, qmax)
        })
    }

    /// The f32 optimization (`ΔW G + offset` form, the path every layer takes) against the
    /// f64 reference, on correlated layers, with float inputs (`G_fq = G_qq`) and with noisy
    /// "quantized" inputs (`G_fq != G_qq`, the offset path). The optimization is chaotic (a
    /// reassociated f64 sum alone moves the int4 error by -10..+7%), so int4 is compared on
    /// the mean over 8 layers; int8 codes agree almost everywhere.
    /// A layer's float inputs `x` (`n` rows of `k` correlated features: rank 6 plus noise), the
    /// same with small input noise when `noisy` (`xq`, else `x`), and an `o x k` weight.
    fn low_rank_layer(
        seed: u64,
        (o, k, n): (usize, usize, usize),
        noisy: bool,
    ) -> (Array2<f64>, Array2<f64>, Array2<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base = Array2::from_shape_fn((n, 6), |_| rng.random::<f64>() - 0.5);
        let mix = Array2::from_shape_fn((6, k), |_| rng.random::<f64>() - 0.5);
        let x = base.dot(&mix) + Array2::from_shape_fn((n, k), |_| 0.1 * rng.random::<f64>());
        let xq = if noisy {
            &x + &Array2::from_shape_fn((n, k), |_| 0.02 * (rng.random::<f64>() - 0.5))
        } else {
            x.clone()
        };
        let w = Array2::from_shape_fn((o, k), |_| rng.random::<f64>() - 0.5);
        (x, xq, w)
    }

    #[test]
    fn f32_path_matches_the_f64_reference() {
        let (o, k, n) = (40usize, 72usize, 2000usize);
        for noisy in [false, true] {
            let mut ratios = Vec::new();
            for seed in 0..8u64 {
                let (x, xq, w) = low_rank_layer(100 + seed, (o, k, n), noisy);
                // E‖W~ x_q - W x_f‖² on the rows themselves.
                let direct = |m: &Array2<f64>| -> f64 {
                    let d = xq.dot(&m.t()) - x.dot(&w.t());
                    d.iter().map(|v| v * v).sum::<f64>() / n as f64
                };
                let qq = xq.t().dot(&xq) / n as f64;
                let b = w.dot(&(x.t().dot(&xq) / n as f64));
                for qmax in [7.0, 127.0] {
                    let scale = Array2::from_shape_fn((o, k), |(i, _)| {
                        w.row(i).iter().fold(0f64, |m, v| m.max(v.abs())) / qmax
                    });
                    let near = Array2::from_shape_fn((o, k), |(i, j)| {
                        (w[[i, j]] / scale[[i, j]])
                            .round_ties_even()
                            .clamp(-qmax, qmax)
                            * scale[[i, j]]
                    });
                    let opts = AdaRoundOptions::default();
                    let fast = learn_rows(&w, &scale, &qq, &b, -qmax, qmax, 400, &opts);
                    let reference = learn_rows_f64(&w, &scale, &qq, &b, -qmax, qmax, 400, &opts);
                    let (e_fast, e_ref) =
                        (direct(&(&fast * &scale)), direct(&(&reference * &scale)));
                    let e_near = direct(&near);
                    // With noisy inputs part of the error is the input noise itself.
                    let bound = if noisy { 0.99 } else { 0.7 } * e_near;
                    assert!(
                        e_fast < bound && e_ref < bound,
                        "noisy {noisy}, qmax {qmax}: f32 {e_fast}, f64 {e_ref}, nearest {e_near}"
                    );
                    if qmax == 7.0 {
                        ratios.push(e_fast / e_ref);
                    } else {
                        let same = fast.iter().zip(&reference).filter(|(a, b)| a == b).count();
                        assert!(
                            same * 100 >= 99 * o * k,
                            "noisy {noisy}: {same} of {} int8 codes equal",
                            o * k
                        );
                    }
                }
            }
            let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
            assert!(
                mean <= 1.08,
                "noisy {noisy}: f32 / f64 int4 error {ratios:?}"
            );
        }
    }

    /// Block coordinate descent (layers wider than `exact_features`) on correlated layers with
    /// float and with noisy inputs: below nearest on the exact error, and within reach of the
    /// optimization on the whole Gram; blocks are whole channels.
    #[test]
    fn blocked_rows_beat_nearest_and_approach_the_whole_gram() {
        assert_eq!(
            feature_blocks(72, 9, 4096, 1152),
            std::iter::once(0..72).collect::<Vec<_>>()
        );
        assert_eq!(
            feature_blocks(72, 9, 64, 20),
            vec![0..18, 18..36, 36..54, 54..72]
        );
        assert_eq!(feature_blocks(10, 9, 4, 4), vec![0..9, 9..10]);
        assert_eq!(feature_blocks(10, 1, 4, 4), vec![0..4, 4..8, 8..10]);
        let (o, k, n) = (24usize, 72usize, 2000usize);
        let blocks = feature_blocks(k, 9, 64, 20);
        let opts = AdaRoundOptions::default();
        let mut ratios = Vec::new();
        for noisy in [false, true] {
            for seed in 0..4u64 {
                let (x, xq, w) = low_rank_layer(300 + seed, (o, k, n), noisy);
                let direct = |m: &Array2<f64>| -> f64 {
                    let d = xq.dot(&m.t()) - x.dot(&w.t());
                    d.iter().map(|v| v * v).sum::<f64>() / n as f64
                };
                let qq = xq.t().dot(&xq) / n as f64;
                let fq = x.t().dot(&xq) / n as f64;
                let b = w.dot(&fq);
                let qmax = 7.0;
                let scale = Array2::from_shape_fn((o, k), |(i, _)| {
                    w.row(i).iter().fold(0f64, |m, v| m.max(v.abs())) / qmax
                });
                let near = Array2::from_shape_fn((o, k), |(i, j)| {
                    (w[[i, j]] / scale[[i, j]])
                        .round_ties_even()
                        .clamp(-qmax, qmax)
                        * scale[[i, j]]
                });
                let offset = noisy.then(|| (w.dot(&qq) - &b).mapv(|x| x as f32));
                let gp = GroupProblem {
                    w: w.clone(),
                    outs: (0..o).collect(),
                    scales: scale.clone(),
                    near: near.clone(),
                    qq32: blocks
                        .iter()
                        .map(|r| qq.slice(s![r.clone(), r.clone()]).mapv(|x| x as f32))
                        .collect(),
                    qq: qq.clone(),
                    b: b.clone(),
                    c: Array1::zeros(o),
                    offset,
                    rows: None,
                };
                let blocked = learn_blocks(&gp, &blocks, 0..o, qmax, 400, &opts);
                let whole = learn_rows(&w, &scale, &qq, &b, -qmax, qmax, 400, &opts);
                let (e_block, e_whole, e_near) = (
                    direct(&(&blocked * &scale)),
                    direct(&(&whole * &scale)),
                    direct(&near),
                );
                let bound = if noisy { 0.99 } else { 0.7 } * e_near;
                assert!(
                    e_block < bound,
                    "noisy {noisy}: blocks {e_block}, whole {e_whole}, nearest {e_near}"
                );
                assert!(blocked.iter().all(|v| v.fract() == 0.0 && v.abs() <= qmax));
                ratios.push(e_block / e_whole);
            }
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        assert!(mean < 1.5, "blocks / whole Gram error {ratios:?}");
    }

    /// Block-wise codes: one scale per block of the input axis at every other position; a
    /// block's scale is its own peak over 7; the scale tensor has ceil(dim / block) there.
    #[test]
    fn blocked_codes_scale_each_block_by_its_own_peak() {
        // [O=2, I=3, k=2]: blocks of 2 along axis 1 -> scale shape [2, 2, 2].
        let v: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.1).collect();
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 3, 2]), v.clone()).unwrap();
        let c = Codes::nearest_blocked(&a, Blocking { axis: 1, size: 2 }, 4);
        assert_eq!(c.scale_shape(), vec![2, 2, 2]);
        assert_eq!(c.scales.len(), 8);
        // Element [o, i, k] uses scale [o, i / 2, k].
        for o in 0..2 {
            for i in 0..3 {
                for k in 0..2 {
                    let flat = (o * 3 + i) * 2 + k;
                    assert_eq!(c.scale_index(flat), (o * 2 + i / 2) * 2 + k);
                }
            }
        }
        // Block [0, 0, 0] holds elements [0,0,0] and [0,1,0]: |-0.55|, |-0.35|.
        assert!((c.scales[0] - 0.55 / 7.0).abs() < 1e-7);
        // The last block on axis 1 holds one element: [0,2,0] = -0.15.
        assert!((c.scales[2] - 0.15 / 7.0).abs() < 1e-7);
        let d = c.dequantized();
        let err = d
            .iter()
            .zip(&v)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let per_channel = Codes::nearest(&a, Some(0), 4, false).dequantized();
        let err_pc = per_channel
            .iter()
            .zip(&v)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err <= err_pc, "blocked {err} vs per-channel {err_pc}");
        assert_eq!(input_axis(4, Some(0)), Some(1));
        assert_eq!(input_axis(2, Some(1)), Some(0));
        assert_eq!(input_axis(2, Some(0)), Some(1));
        assert_eq!(input_axis(2, None), None);
    }

    #[test]
    fn int4_nearest_codes_use_seven_levels() {
        let a =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.7, -0.35, 0.1, 0.0, 0.0, 0.0]).unwrap();
        let c = Codes::nearest(&a, Some(0), 4, false);
        assert_eq!(c.values, vec![7, -4, 1, 0, 0, 0]);
        assert!((c.scales[0] - 0.1).abs() < 1e-7);
        let d = c.dequantized();
        assert!((d[[0, 1]] + 0.4).abs() < 1e-6);
    }

    /// The im2col rows at every output position, times the weight, equal a direct grouped,
    /// strided, dilated, asymmetrically padded convolution.
    #[test]
    fn patches_reproduce_a_direct_convolution() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (n, cin, h, w, groups, cout, kh, kw) = (2, 4, 7, 6, 2, 6, 3, 2);
        let c = Conv2d {
            kh,
            kw,
            strides: [2, 1],
            pads: [1, 0],
            pad_total: [1, 1],
            dil: [1, 2],
        };
        let x = ArrayD::from_shape_fn(IxDyn(&[n, cin, h, w]), |_| rng.random::<f32>() - 0.5);
        let cg = cin / groups;
        let wt = ArrayD::from_shape_fn(IxDyn(&[cout, cg, kh, kw]), |_| rng.random::<f32>() - 0.5);
        let pos = positions(x.shape(), &c, usize::MAX);
        // Output size: H: (7 + 1 - 3) / 2 + 1 = 3, W: (6 + 1 - 3) / 1 + 1 = 5.
        assert_eq!(pos.len(), n * 3 * 5);
        let og = cout / groups;
        for gi in 0..groups {
            let a = patches(&x, &c, gi, cg, &pos);
            for (r, &(b, oy, ox)) in pos.iter().enumerate() {
                for o in gi * og..(gi + 1) * og {
                    let mut direct = 0f64;
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * 2 + ky) as isize - 1;
                                let ix = (ox + 2 * kx) as isize;
                                if iy < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                direct += f64::from(wt[[o, ci, ky, kx]])
                                    * f64::from(x[[b, gi * cg + ci, iy as usize, ix as usize]]);
                            }
                        }
                    }
                    let via: f64 = (0..cg * kh * kw)
                        .map(|j| {
                            a[[r, j]] * f64::from(wt.as_slice().unwrap()[o * cg * kh * kw + j])
                        })
                        .sum();
                    assert!((via - direct).abs() < 1e-9, "{via} vs {direct}");
                }
            }
        }
    }
}
