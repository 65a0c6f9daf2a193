//! The float model's own outputs on calibration rows, kept from the observation run so that
//! in-sample validation does not run the original model on those rows a second time.
//!
//! Calibration runs the model in tract over every calibration row with the observed tensors as
//! extra outputs ([`super::observe`]); the graph's own outputs come with every run. When that
//! model is the very model validation compares against (the run's input: no earlier pass and no
//! decomposition changed it, checked by equality of graph, opsets and functions) and validation
//! compares on the calibration rows (no `--eval`), those outputs are the original's outputs on
//! those rows, and validation takes them instead of running the original again:
//! ```text
//! before: calibrate   64 rows x (model + observed tensors)            -> ranges
//!         validate    32 rows x original  +  32 rows x candidate
//! after:  calibrate   64 rows x (model + observed tensors)            -> ranges, outputs of 64 rows
//!         validate                           32 rows x candidate
//! ```
//! Each kept row is tagged with the [`fingerprint`] of its input feeds; validation uses a row
//! only when its own feeds have the same digest, so rows never pair up by position alone.
//!
//! When passes before quantization rewrote the graph (cleanup turning Constant nodes into
//! initializers, dropping Identity nodes, folding shape arithmetic; or fuse, prune, equalize,
//! which change values), the outputs kept are the rewrite's ([`ReferenceOutputs::are_of_a_rewrite_of`]).
//! Validation then runs the original on the first kept row and takes the rest only if its
//! outputs are the kept ones bit for bit; otherwise the original runs on every row as before:
//! ```text
//! validate    1 row x original (== kept, every bit)  +  32 rows x candidate
//! ```
//!
//! Conditions: only the fixed-method observation run keeps outputs (`auto`'s and the
//! specialized-copy runs do not); at most `max_rows` rows and `max_bytes` of outputs are kept,
//! the first rows in calibration order. The outputs are tract's float run of the same model on
//! the same row; tract fuses no op across an extra output, so a fused op's last ulp could
//! differ from the plain run's. Measured with the observed tensors as extra outputs: the
//! graph's outputs bit-identical to the plain run on resnet18, mobilenet_v2, efficientnet_b0,
//! vit_small and densenet121 (BENCHMARKS.md, issue 17 session 15), and
//! `tests/validate_data_source.rs` asserts equal reports with and without the kept outputs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::ArrayD;

use crate::onnx::proto::{ModelProto, TensorProto};
use crate::runtime::{fingerprint, Feed};

/// What validation asks calibration to keep: the model it compares against and a bound.
#[derive(Debug)]
pub struct ReferenceRequest {
    model: Arc<ModelProto>,
    max_rows: usize,
    max_bytes: usize,
    kept: Mutex<Option<Arc<ReferenceOutputs>>>,
}

/// Most bytes of output values a calibration run keeps for validation (a memory bound, not
/// tuned: 64 rows of a 1000-class classifier hold 250 KiB).
pub const KEPT_OUTPUT_BYTES: usize = 64 << 20;

/// Outputs of the original model kept from calibration, by the fingerprint of each row's feeds.
#[derive(Debug)]
pub struct ReferenceOutputs {
    /// The model validation compares against (the request's).
    model: Arc<ModelProto>,
    /// Whether the observed model was that model; else it was a rewrite of it (the passes
    /// before quantization changed the graph) and the outputs are the rewrite's.
    exact: bool,
    /// The graph's outputs, in graph order (the order of every kept row's values).
    pub output_names: Vec<String>,
    rows: HashMap<u64, Vec<ArrayD<f32>>>,
}

/// Whether `a` and `b` are the same model to tract: the same object, or the same nodes,
/// initializers, inputs, outputs, opsets and functions (what tract reads: value_info is ignored
/// at load, names and docs change no value).
fn same_model(a: &ModelProto, b: &ModelProto) -> bool {
    if std::ptr::eq(a, b) {
        return true;
    }
    let (Some(ga), Some(gb)) = (&a.graph, &b.graph) else {
        return a.graph.is_none() && b.graph.is_none();
    };
    a.opset_import == b.opset_import
        && a.functions == b.functions
        && ga.node == gb.node
        && ga.input == gb.input
        && ga.output == gb.output
        && ga.sparse_initializer == gb.sparse_initializer
        && ga.initializer.len() == gb.initializer.len()
        && ga
            .initializer
            .iter()
            .zip(&gb.initializer)
            .all(|(x, y)| same_tensor(x, y))
}

/// Equal initializers; payloads that are the same bytes in memory (the run's shared, possibly
/// memory-mapped buffers) are equal without reading them, so no mapped page is touched.
fn same_tensor(a: &TensorProto, b: &TensorProto) -> bool {
    let same_payload = match (&a.raw_data, &b.raw_data) {
        (Some(x), Some(y)) => x.len() == y.len() && (x.as_ptr() == y.as_ptr() || x == y),
        (x, y) => x.is_none() && y.is_none(),
    };
    same_payload
        && a.name == b.name
        && a.dims == b.dims
        && a.data_type == b.data_type
        && a.segment == b.segment
        && a.float_data == b.float_data
        && a.int32_data == b.int32_data
        && a.string_data == b.string_data
        && a.int64_data == b.int64_data
        && a.double_data == b.double_data
        && a.uint64_data == b.uint64_data
        && a.external_data == b.external_data
        && a.data_location == b.data_location
}

impl ReferenceOutputs {
    /// Whether these are outputs of `model`.
    pub fn are_of(&self, model: &ModelProto) -> bool {
        self.exact && same_model(model, &self.model)
    }

    /// Whether these are outputs of a rewrite of `model` (the graph calibration observed after
    /// the passes before quantization): usable for `model` only where a row's own run of it
    /// gives the same bits.
    pub fn are_of_a_rewrite_of(&self, model: &ModelProto) -> bool {
        !self.exact && same_model(model, &self.model)
    }

    /// The kept outputs of the row whose named feeds are `feeds`, if that row was kept.
    pub fn outputs_for<'a>(
        &self,
        feeds: impl IntoIterator<Item = (&'a str, &'a Feed)>,
    ) -> Option<&[ArrayD<f32>]> {
        self.rows.get(&fingerprint(feeds)).map(Vec::as_slice)
    }

    /// Rows kept.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl ReferenceRequest {
    /// Keep the outputs of `model` (validation's original) on at most `max_rows` calibration rows
    /// holding at most `max_bytes` of output values.
    pub fn new(model: Arc<ModelProto>, max_rows: usize, max_bytes: usize) -> Self {
        ReferenceRequest {
            model,
            max_rows,
            max_bytes,
            kept: Mutex::new(None),
        }
    }

    /// A capture for an observation run of `observed`: validation's original (same graph,
    /// opsets and functions) or a rewrite of it.
    pub fn capture_for(&self, observed: &ModelProto) -> Option<OutputCapture> {
        let exact = same_model(observed, &self.model);
        let names = observed
            .graph
            .as_ref()?
            .output
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Some(OutputCapture {
            exact,
            output_names: names,
            max_rows: self.max_rows,
            max_bytes: self.max_bytes,
            bytes: 0,
            rows: HashMap::new(),
            seen: 0,
        })
    }

    /// Store what a capture kept (the last one stored wins; calibration keeps at most one).
    pub fn keep(&self, capture: OutputCapture) {
        let kept = ReferenceOutputs {
            model: self.model.clone(),
            exact: capture.exact,
            output_names: capture.output_names,
            rows: capture.rows,
        };
        if let Ok(mut slot) = self.kept.lock() {
            *slot = (!kept.is_empty()).then(|| Arc::new(kept));
        }
    }

    /// The outputs kept by calibration, if any.
    pub fn kept(&self) -> Option<Arc<ReferenceOutputs>> {
        self.kept.lock().ok().and_then(|k| k.clone())
    }
}

/// The outputs of one observation run being kept (see [`ReferenceRequest::capture_for`]).
#[derive(Debug)]
pub struct OutputCapture {
    /// The observed model is validation's original (not a rewrite of it).
    exact: bool,
    output_names: Vec<String>,
    max_rows: usize,
    max_bytes: usize,
    bytes: usize,
    rows: HashMap<u64, Vec<ArrayD<f32>>>,
    /// Rows offered so far, kept or not.
    seen: usize,
}

impl OutputCapture {
    /// How many of the next `n` rows (in calibration order) could still be kept.
    pub fn wanted(&self, n: usize) -> usize {
        if self.bytes > self.max_bytes {
            return 0;
        }
        n.min(self.max_rows.saturating_sub(self.seen))
    }

    /// Offer the next row: its fingerprint and the graph's outputs in graph order. Rows are
    /// offered in calibration order; once `max_rows` rows were offered or `max_bytes` are held,
    /// the rest is dropped.
    pub fn offer(&mut self, row: u64, outputs: Vec<ArrayD<f32>>) {
        if self.wanted(1) == 0 || outputs.len() != self.output_names.len() {
            return;
        }
        self.seen += 1;
        self.bytes += outputs.iter().map(|o| o.len() * 4).sum::<usize>();
        self.rows.entry(row).or_insert(outputs);
    }
}
