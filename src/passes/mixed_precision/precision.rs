//! The vocabulary of `mixed-precision`: the precisions a layer's weight can get, the size
//! budget, how the selection is made, and the pass options.
//!
//! A layer may get fp32 always; fp16, int8 and int4 unless it is kept fp32 by name
//! (`keep_fp32`) or the option forbids them ([`allowed_precisions`], cheapest first, so that
//! knapsack ties go to the smaller option).

use crate::hessian::HessianOptions;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
    Int4,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Int8,
        Precision::Int4,
    ];

    /// Payload bits per weight.
    pub fn bits(self) -> u64 {
        match self {
            Precision::Fp32 => 32,
            Precision::Fp16 => 16,
            Precision::Int8 => 8,
            Precision::Int4 => 4,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Total weight bytes (scales included) of the selected layers.
    Bytes(u64),
    /// Fraction of the layers' fp32 weight bytes.
    Ratio(f64),
    /// Average payload bits per weight.
    AvgBits(f64),
}

/// How the per-layer precisions are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Minimize the joint second-order loss of the actual quantization errors, cross-layer
    /// terms included ([`super::joint`]); the exact knapsack solutions on `Ω` and on the per-layer
    /// terms are its starting points.
    #[default]
    Joint,
    /// HAWQ-v2: minimize `Σ Ω` exactly (per-layer additive; no extra model runs).
    Trace,
}

/// Options of the `mixed-precision` pass.
#[derive(Debug, Clone)]
pub struct MixedPrecisionOptions {
    /// No budget: the pass does nothing.
    pub budget: Option<Budget>,
    /// Node or weight names / regexes (full match) kept fp32.
    pub keep_fp32: Vec<String>,
    pub allow_int4: bool,
    pub allow_fp16: bool,
    pub selection: Selection,
    /// int4 weights in blocks of this many values along the input axis (see [`super::int4_block`]);
    /// `None`: per output channel.
    pub block_size: Option<usize>,
    /// Quantize activations around int8/int4 layers with the `quantize` pass's machinery.
    pub quantize_activations: bool,
    pub hessian: HessianOptions,
    /// Points of the reported size-vs-ΣΩ frontier.
    pub pareto_points: usize,
    /// Also print the frontier in the terminal table.
    pub print_pareto: bool,
    /// Largest DP size axis before costs are rounded to a coarser unit.
    pub max_buckets: usize,
    /// Synthetic calibration samples when no data is given.
    pub synthetic_samples: usize,
}

impl Default for MixedPrecisionOptions {
    fn default() -> Self {
        MixedPrecisionOptions {
            budget: None,
            keep_fp32: vec![],
            allow_int4: true,
            allow_fp16: true,
            selection: Selection::Joint,
            block_size: None,
            quantize_activations: true,
            hessian: HessianOptions::default(),
            pareto_points: 16,
            print_pareto: false,
            max_buckets: 1 << 20,
            synthetic_samples: 16,
        }
    }
}

/// The precisions a layer may get, cheapest first (ties go to the smaller option); fp32 last.
pub(super) fn allowed_precisions(kept: bool, opts: &MixedPrecisionOptions) -> Vec<Precision> {
    Precision::ALL
        .into_iter()
        .rev()
        .filter(|&p| match p {
            Precision::Fp32 => true,
            _ if kept => false,
            Precision::Int4 => opts.allow_int4,
            Precision::Fp16 => opts.allow_fp16,
            Precision::Int8 => true,
        })
        .collect()
}
