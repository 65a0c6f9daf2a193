//! Per-layer Hessian traces of a label-free loss, by Hutchinson's estimator over forward passes.
//!
//! **Loss.** At the fp32 weights `w0` the model is compared with *itself*: for calibration inputs
//! `x`, `L(w) = mean_x ℓ(f(w0; x), f(w; x))` with, per output,
//! - `Kl`: `KL(softmax(f(w0)) || softmax(f(w)))` per row of an `[N, C]` logits output,
//! - `Mse`: `½ ‖f(w) − f(w0)‖²` per row (leading dimension),
//!
//! summed over outputs (`Auto`: KL for `[N, C>1]` outputs not produced by a Softmax/LogSoftmax,
//! MSE otherwise). `L(w0) = 0` and `∇L(w0) = 0`, so the Hessian at `w0` is the generalized
//! Gauss–Newton matrix `G = Jᵀ F J` (`F = I` for MSE, `F = diag(p) − ppᵀ` for KL).
//!
//! **Forward difference.** Expanding along a direction `v`: `L(w0 + εv) = ½ ε² vᵀGv + O(ε³)`
//! (`L(w0) = 0`, `∇L(w0) = 0`), so `vᵀGv = 2 L(w0 + εv) / ε² + O(ε)`: one run per probe. The
//! central difference `(L(w0 + εv) + L(w0 − εv)) / ε²` cancels the O(ε) term but costs two runs;
//! at `rel_eps = 1e-3` that term is about 1e-3 of the value, ten times below the best standard
//! error the estimator stops at (`rel_tol = 1e-2`), so the second run bought nothing measurable
//! (`tests/hessian.rs`: exact Gauss–Newton traces within 5%, estimates within 2% when the step
//! is halved or doubled). KL is evaluated as
//! `log Σ p0 e^{δz} − Σ p0 δz` with `δz = z − z0` in f64 (`ln_1p`/`exp_m1`), so the O(ε²)
//! value is not lost to cancellation. `ε = rel_eps · ‖w0‖ / √n`: the step is the same fraction
//! of the layer's RMS weight for every layer.
//!
//! **Hutchinson.** `Tr(G) = E[vᵀGv]` for Rademacher `v` (ChaCha8 seeded from `seed` and the
//! weight name: deterministic, independent of layer order and threads). Samples are drawn until
//! the standard error of the mean is at most `rel_tol · |mean|` (after `min_samples`) or
//! `max_samples` is reached.
//!
//! **Cost.** One run of the full model (all calibration batches) computes every layer's inputs.
//! Each layer then gets a sub-model: the nodes downstream of its weight, with the values they
//! read from upstream (layer input, residual branches, ...) and the weight itself as graph
//! inputs. tract optimizes that plan once; every probe feeds a perturbed weight and costs one
//! run of the downstream part only.
//!
//! **Responses.** [`sensitivity_with`] also runs each layer's sub-model with given candidate
//! weights (e.g. the weight quantized to int8 and int4) and keeps, per candidate, the output
//! change `δz` whitened by the loss's output Hessian `F`: `ũ = F^½ δz / √N` over all `N` rows
//! (KL rows: `ũ_j = √p0_j (δz_j − Σ_k p0_k δz_k)`, since `F = diag(p0) − p0p0ᵀ`; MSE: `ũ = δz`).
//! Then `½‖ũ‖²` is the second-order loss of that one change, and `½‖Σ_l ũ_l‖²` the loss of
//! several layers changed together, cross-layer terms `ũ_lᵀũ_m` included (the network's
//! response linearized per layer, the loss kept to second order). Responses longer than
//! [`response_dim`] values are count-sketched to that length (one fixed hash and sign per
//! position, the same for every layer and candidate), which keeps inner products unbiased with a
//! relative error of about `√(2 / dim)`; the length shrinks with the layer count (32768 up to
//! ~180 layers, never below 4096) so the selection's Gram matrix stays cheap.
//!
//! **Files.** This file holds the options and result types and [`layers`]; `loss` the
//! per-row loss and Hutchinson's estimator; `submodel` the extraction of the part downstream of
//! one weight; `response` the whitened, count-sketched responses; `driver` [`sensitivity`] and
//! [`sensitivity_with`], which run them over every layer.

mod driver;
mod loss;
mod response;
mod submodel;

use crate::ir::layer::Layer;
use crate::ir::Graph;
use anyhow::Result;
use ndarray::ArrayD;
use serde::Serialize;
use std::collections::HashSet;

pub use driver::{sensitivity, sensitivity_with};
pub use loss::{hutchinson, loss_sum};
pub use response::response_dim;
pub(crate) use submodel::{sub_model, value_info, SubModel};

/// How outputs are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// KL for `[N, C>1]` logits (not produced by Softmax/LogSoftmax), MSE otherwise.
    #[default]
    Auto,
    Kl,
    Mse,
}

#[derive(Debug, Clone)]
pub struct HessianOptions {
    pub loss: Loss,
    /// Probe step as a fraction of the layer's RMS weight.
    pub rel_eps: f64,
    /// Stop when the standard error is at most this fraction of |mean|.
    pub rel_tol: f64,
    pub min_samples: usize,
    pub max_samples: usize,
    pub seed: u64,
    /// Estimate layers in parallel (rayon).
    pub parallel: bool,
}

impl Default for HessianOptions {
    fn default() -> Self {
        HessianOptions {
            loss: Loss::Auto,
            rel_eps: 1e-3,
            rel_tol: 1e-2,
            min_samples: 4,
            max_samples: 64,
            seed: 0,
            parallel: true,
        }
    }
}

/// A Hutchinson estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TraceEstimate {
    pub mean: f64,
    pub stderr: f64,
    pub samples: usize,
}

/// The sensitivity of one weighted layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSensitivity {
    pub node: String,
    pub op_type: String,
    pub weight: String,
    pub weight_shape: Vec<usize>,
    /// Weight output-channel axis (per-channel quantization axis).
    pub out_axis: usize,
    /// Weight input-channel axis (the block axis of block-wise quantization).
    pub in_axis: usize,
    pub params: usize,
    /// `Tr(G)` of the label-free loss w.r.t. this weight.
    pub hessian_trace: f64,
    pub hessian_trace_stderr: f64,
    /// `Tr(G) / params`.
    pub trace_per_param: f64,
    pub samples: usize,
    /// Absolute probe step used.
    pub eps: f64,
    pub seconds: f64,
    /// Whitened output responses `ũ`, one per candidate weight (see the module docs).
    #[serde(skip)]
    pub responses: Vec<Vec<f32>>,
}

/// Candidate weights whose output responses [`sensitivity_with`] records, per layer.
pub type Candidates<'a> = dyn Fn(&Layer, &ArrayD<f32>) -> Vec<ArrayD<f32>> + Sync + 'a;

/// Every Conv/ConvTranspose/Gemm/MatMul with a constant weight, in topological order (each
/// weight once: a weight shared by several nodes is one layer, named after its first reader).
pub fn layers(graph: &Graph) -> Result<Vec<Layer>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for ix in graph.topo_order()? {
        if let Some(l) = Layer::of(graph, ix) {
            if seen.insert(l.weight.clone()) {
                out.push(l);
            }
        }
    }
    Ok(out)
}
