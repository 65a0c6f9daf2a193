//! The read-only subcommands as library functions: [`inspect`] describes a model (inputs,
//! outputs, op histogram, parameters, bytes by type, MACs) and [`sensitivity`] estimates each
//! layer's Hessian trace on calibration data without changing the model.

use crate::calibrate::{CalibrationSet, DataOptions, ImageOptions};
use crate::hessian::{HessianOptions, LayerSensitivity};
use crate::ir::facts::{model_stats, value_summary, ModelStats, ValueSummary};
use crate::runtime::value_shapes;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub file_bytes: u64,
    pub ir_version: i64,
    pub producer: String,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    pub stats: ModelStats,
}

/// Describe the model at `path`; `input_shapes` fix symbolic dims for shape-dependent figures.
pub fn inspect(path: &Path, input_shapes: &[(String, Vec<usize>)]) -> Result<Inspection> {
    let (proto, info, model) = super::load_model(path)?;
    super::check_input_shapes(&model, input_shapes)?;
    let shapes = value_shapes(&model, &proto, input_shapes);
    Ok(Inspection {
        path: path.display().to_string(),
        file_bytes: info.file_bytes,
        ir_version: model.shell.ir_version(),
        producer: format!(
            "{} {}",
            model.shell.producer_name(),
            model.shell.producer_version()
        )
        .trim()
        .to_string(),
        inputs: model.graph.inputs.iter().map(value_summary).collect(),
        outputs: model.graph.outputs.iter().map(value_summary).collect(),
        stats: model_stats(&model, &shapes),
    })
}

/// What `sensitivity` reads.
#[derive(Debug, Clone)]
pub struct SensitivityOptions {
    pub model: PathBuf,
    /// Calibration data; `None`: synthetic inputs (the caller warns).
    pub calib: Option<PathBuf>,
    pub calib_samples: usize,
    pub image: ImageOptions,
    pub seed: u64,
    pub hessian: HessianOptions,
}

/// Per-layer Hessian traces of the BN-folded, cleaned-up model, and whether they were measured
/// on synthetic inputs (no calibration data given).
pub fn sensitivity(opts: &SensitivityOptions) -> Result<(Vec<LayerSensitivity>, bool)> {
    let mut model = crate::ir::Model::load(&opts.model)?;
    let data_opts = DataOptions {
        max_samples: Some(opts.calib_samples),
        image: opts.image.clone(),
        ..Default::default()
    };
    let calib = match &opts.calib {
        Some(p) => CalibrationSet::load(p, &model, &data_opts)
            .with_context(|| format!("--calib {}", p.display()))?,
        None => CalibrationSet::synthetic(&model, opts.calib_samples, opts.seed, &data_opts)?,
    };
    crate::pipeline::Pipeline::new()
        .fuse()
        .cleanup()
        .run(&mut model)?;
    let layers = crate::hessian::sensitivity(&model, &calib.batches, &opts.hessian)?;
    Ok((layers, opts.calib.is_none()))
}
