//! The run summary: what went in, what came out, what each pass did, how the output was
//! checked. Built by [`super::compress`], written as JSON by `--report` (keys documented in the
//! README) and rendered by [`crate::report`].

use crate::ir::facts::ModelStats;
use crate::passes::PassRecord;
use crate::validate::ValidationReport;
use serde::Serialize;

use super::gate::GateReport;
use super::preflight::NonFinite;

/// One side of the run: the input or the output model.
#[derive(Debug, Serialize)]
pub struct ModelSide {
    pub path: String,
    pub file_bytes: u64,
    pub stats: ModelStats,
}

/// The run summary, also written as JSON by `--report`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub tool: String,
    pub version: String,
    pub input: ModelSide,
    pub output: ModelSide,
    pub passes: Vec<PassRecord>,
    /// Float initializers holding NaN/inf, kept float (`--allow-nonfinite`; absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nonfinite_initializers: Vec<NonFinite>,
    /// Graph outputs whose contradicting declared shape was replaced by the computed one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub corrected_outputs: Vec<String>,
    /// What `--fix-input` fixed and folded (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specialized: Option<crate::passes::specialize::Specialized>,
    /// The side-by-side check in tract (absent with --no-validate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationReport>,
    /// A KV-cache decoder's state pairs, how calibration ran it and the generation check
    /// (absent for other models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<crate::validate::generate::DecoderReport>,
    /// The fidelity gate (absent without --max-drop / --min-sqnr / --min-agreement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
    pub size_ratio: f64,
    pub seconds_total: f64,
    /// Worker threads the run's parallel work used (`--threads`, default one per core).
    pub threads: usize,
    /// Wall seconds and peak memory per phase of the run, in order.
    pub timings: Vec<super::timings::Phase>,
}
