//! The library API: the same pipeline the command line runs, as a builder.
//!
//! ```no_run
//! use onnx_compress::calibrate::{CalibrationSet, DataOptions};
//! use onnx_compress::passes::quantize::QuantizeOptions;
//! use onnx_compress::Pipeline;
//! use std::path::Path;
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut model = onnx_compress::ir::Model::load(Path::new("testdata/digits_cnn.onnx"))?;
//! let calib = CalibrationSet::load(
//!     Path::new("testdata/digits_calib_x.npy"),
//!     &model,
//!     &DataOptions::default(),
//! )?;
//! let records = Pipeline::new()
//!     .fuse()
//!     .cleanup()
//!     .equalize()
//!     .quantize(QuantizeOptions::default())
//!     .calibration(calib)
//!     .run(&mut model)?;
//! for r in &records {
//!     println!("{}: {} change(s)", r.name, r.changes);
//! }
//! onnx_compress::ir::Model::save(&model, Path::new("digits_int8.onnx"), &Default::default())?;
//! # Ok(())
//! # }
//! ```
//!
//! Passes always run in pipeline order ([`crate::passes::pipeline`]), whatever order the
//! builder calls come in; the graph is checked after each.

use crate::calibrate::CalibrationSet;
use crate::ir::Model;
use crate::passes::{
    self, equalize::EqualizeOptions, prune::PruneOptions, quantize::QuantizeOptions, PassContext,
    PassRecord,
};
use anyhow::Result;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    passes: Vec<&'static str>,
    ctx: PassContext,
}

impl Pipeline {
    /// An empty pipeline (a plain round trip until passes are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// The pipeline `onnx-compress MODEL -o OUT` runs with default options.
    pub fn standard() -> Self {
        Pipeline {
            passes: passes::default_pass_names(),
            ctx: PassContext::default(),
        }
    }

    /// Passes by their user-facing names with explicit options (what the CLI builds).
    pub fn from_parts(passes: Vec<&'static str>, ctx: PassContext) -> Self {
        Pipeline { passes, ctx }
    }

    fn with(mut self, name: &'static str) -> Self {
        if !self.passes.contains(&name) {
            self.passes.push(name);
        }
        self
    }

    /// Fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul.
    pub fn fuse(self) -> Self {
        self.with("fuse")
    }

    /// Remove Identity/Dropout/dead nodes, fold constants.
    pub fn cleanup(self) -> Self {
        self.with("cleanup")
    }

    /// Cross-layer range equalization with default options.
    pub fn equalize(self) -> Self {
        self.with("equalize")
    }

    pub fn equalize_with(mut self, opts: EqualizeOptions) -> Self {
        self.ctx.equalize = opts;
        self.with("equalize")
    }

    /// Calibrated int8 QDQ insertion.
    pub fn quantize(mut self, opts: QuantizeOptions) -> Self {
        self.ctx.quantize = opts;
        self.with("quantize")
    }

    /// Structured channel pruning.
    pub fn prune(mut self, opts: PruneOptions) -> Self {
        self.ctx.prune = opts;
        self.with("prune")
    }

    /// Calibration data for the passes that observe activations.
    pub fn calibration(mut self, set: CalibrationSet) -> Self {
        self.ctx.calibration = Some(Arc::new(set));
        self
    }

    /// Stop each rule-driven pass after `n` rewrites (bisection aid).
    pub fn max_patches(mut self, n: usize) -> Self {
        self.ctx.max_patches = Some(n);
        self
    }

    pub fn pass_names(&self) -> &[&'static str] {
        &self.passes
    }

    pub fn context(&self) -> &PassContext {
        &self.ctx
    }

    /// Run the passes on `model` in place; one record per executed pass.
    pub fn run(&self, model: &mut Model) -> Result<Vec<PassRecord>> {
        passes::run_passes(model, &self.passes, &self.ctx)
    }
}
