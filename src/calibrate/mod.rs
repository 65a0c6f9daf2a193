//! Calibration: reading representative inputs of any element type ([`data`], files in `files`), observing tensor ranges over them in
//! one streaming tract run ([`observe`], with the histogram and its range math in
//! [`histogram`]; the Gram matrices `XᵀX` of layer inputs in [`gram`]), and turning ranges into
//! quantization parameters ([`params`]); a KV-cache decoder's windows are run
//! prefill-then-decode-steps into complete feeds by [`sequence`]; the model's own outputs on
//! calibration rows can be kept for validation ([`reference`]).
pub mod data;
pub(crate) mod files;
pub mod gram;
pub mod histogram;
pub mod image;
pub mod inputs;
pub mod observe;
pub mod params;
pub mod reference;
pub mod sequence;

pub use data::{CalibrationSet, DataOptions};
pub use image::{ImageOptions, Layout};
pub use observe::{Method, ObserveOptions, Observed};
pub use params::{ActScheme, QParams};

/// One batch of named graph inputs (what equalization and pruning consume).
pub type NamedBatch = Vec<(String, crate::runtime::Feed)>;
