//! Weights handed to tract by reference: every large payload reaches tract as an ONNX
//! external-data reference, and tract's data resolver (ours) copies it from our `Bytes`
//! straight into its own tensor.
//!
//! Why: tract takes a protobuf. Encoding our `ModelProto` copies every weight (our encoding),
//! decoding copies it again (tract's protobuf), and tract's tensors are the third copy: on a
//! 2 GiB model the first two were 4 GiB of transient memory per tract load (the original's for
//! calibration and validation, the simulation graph's folded float weights for validation).
//! By reference, the encoded model is a few kilobytes and each weight is copied once.
//!
//! ```text
//! before: initializer W { raw_data: <256 MiB> }
//! after:  initializer W { data_location: EXTERNAL,
//!                         external_data: { location: ".", offset: "3", length: "268435456" } }
//! ```
//!
//! The reference is not a file: tract only requires the location to resolve, inside the model
//! directory it was given, to something that exists, so the location is that directory itself
//! (`.`, an anchor that always exists) and the offset is the payload's index in the table the
//! resolver serves. Nothing is read from disk, so an output renamed over the input cannot change
//! what tract sees. Conditions: payloads of at least [`MIN_BYTES`]; smaller ones stay inline.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tract_onnx::data_resolver::ModelDataResolver;
use tract_onnx::tract_hir::internal::{ensure, format_err, TractResult};

use crate::onnx::load::for_each_tensor_mut;
use crate::onnx::proto::tensor_proto::DataLocation;
use crate::onnx::proto::{ModelProto, StringStringEntryProto};

/// Smaller payloads are cheaper to copy through the encoding than to look up.
pub const MIN_BYTES: usize = 64 * 1024;

/// `model` with its large payloads as references, the directory they are relative to, and the
/// resolver that serves them; `None` when no payload qualifies or no anchor directory resolves.
pub(crate) fn with_references(model: &ModelProto) -> Option<(ModelProto, PathBuf, PayloadTable)> {
    let anchor = std::env::temp_dir().canonicalize().ok()?;
    let mut light = model.clone();
    let mut payloads: Vec<Bytes> = Vec::new();
    let _ = for_each_tensor_mut(&mut light, &mut |t| {
        let Some(raw) = t.raw_data.take_if(|r| r.len() >= MIN_BYTES) else {
            return Ok(());
        };
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        t.external_data = vec![
            entry("location", ".".into()),
            entry("offset", payloads.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        payloads.push(raw);
        Ok(())
    });
    if payloads.is_empty() {
        return None;
    }
    let table = PayloadTable {
        anchor: anchor.clone(),
        payloads,
    };
    Some((light, anchor, table))
}

/// Serves tract's external-data reads from the payloads the references were made from.
pub(crate) struct PayloadTable {
    anchor: PathBuf,
    payloads: Vec<Bytes>,
}

impl ModelDataResolver for PayloadTable {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        index: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        ensure!(
            p == self.anchor,
            "external data {} is not a reference this run made",
            p.display()
        );
        let payload = self
            .payloads
            .get(index)
            .ok_or_else(|| format_err!("payload reference {index} is out of range"))?;
        ensure!(
            length.is_none_or(|l| l == payload.len()),
            "payload reference {index} has {} bytes, not {length:?}",
            payload.len()
        );
        buf.extend_from_slice(payload);
        // tract now holds its own copy: the input file's pages need not stay resident too.
        crate::onnx::pages::release_pages(payload);
        Ok(())
    }
}
