//! Calibration: reading representative inputs of any element type ([`data`], files in `files`), observing tensor ranges over them in
//! one streaming tract run ([`observe`]; the Gram matrices `XᵀX` of layer inputs in [`gram`], with the histogram and its range math in
//! [`histogram`]), and turning ranges into quantization parameters ([`params`]).
pub mod data;
pub(crate) mod files;
pub mod gram;
pub mod histogram;
pub mod image;
pub mod inputs;
pub mod observe;
pub mod params;

pub use data::{CalibrationSet, DataOptions};
pub use image::{ImageOptions, Layout};
pub use observe::{Method, ObserveOptions, Observed};
pub use params::{ActScheme, QParams};

/// One batch of named graph inputs (what equalization and pruning consume).
pub type NamedBatch = Vec<(String, crate::runtime::Feed)>;
