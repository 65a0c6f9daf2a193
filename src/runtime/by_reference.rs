//! Weights handed to tract by reference: a large payload that is still an untouched view of a
//! memory-mapped input file reaches tract as an ONNX external-data reference into that file,
//! and tract's data resolver copies it from our mapping straight into its own tensor.
//!
//! Why: tract takes a protobuf. Encoding our `ModelProto` copies every weight (our encoding),
//! decoding copies it again (tract's protobuf), and tract's tensors are the third copy: on a
//! 2 GiB model the first two were 4 GiB of transient memory per tract load. By reference, the
//! encoded model is a few kilobytes and each weight is copied once.
//!
//! ```text
//! before: initializer W { raw_data: <view of model.onnx.data at 1024, 256 MiB> }
//! after:  initializer W { data_location: EXTERNAL,
//!                         external_data: { location: "model.onnx.data", offset: "1024",
//!                                          length: "268435456" } }
//! ```
//!
//! Conditions: payloads of at least [`MIN_BYTES`] that [`mapped_origin`] finds in a live
//! mapping whose file is in the chosen directory (tract resolves every location against one
//! model directory: the directory holding most such bytes). Payloads a pass wrote, and small
//! ones, stay inline. The resolver serves bytes from the mapping, not from the path: the path
//! only has to exist for tract's checks, so an output renamed over the input cannot change
//! what tract reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::data_resolver::ModelDataResolver;
use tract_onnx::tract_hir::internal::{ensure, format_err, TractResult};

use crate::onnx::load::{for_each_tensor_mut, mapped_origin, MappedFile};
use crate::onnx::proto::tensor_proto::DataLocation;
use crate::onnx::proto::{ModelProto, StringStringEntryProto};

/// Smaller payloads are cheaper to copy through the encoding than to look up.
pub const MIN_BYTES: usize = 64 * 1024;

/// `model` with its large untouched payloads as references, the directory they are relative
/// to, and the resolver that serves them; `None` when no payload qualifies.
pub(crate) fn with_references(model: &ModelProto) -> Option<(ModelProto, PathBuf, MappedResolver)> {
    let mut light = model.clone();
    // One pass to find the directory holding most referenced bytes, one to rewrite.
    let mut bytes_by_dir: HashMap<PathBuf, u64> = HashMap::new();
    let _ = for_each_tensor_mut(&mut light, &mut |t| {
        let raw = t.raw_data.as_deref().unwrap_or_default();
        if let Some((file, _)) = origin(raw) {
            if let Some(dir) = canonical_dir(&file.path) {
                *bytes_by_dir.entry(dir).or_default() += raw.len() as u64;
            }
        }
        Ok(())
    });
    let dir = bytes_by_dir
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))?
        .0;
    let mut files: HashMap<PathBuf, Arc<MappedFile>> = HashMap::new();
    let _ = for_each_tensor_mut(&mut light, &mut |t| {
        let raw_len = t.raw_data.as_ref().map_or(0, |r| r.len());
        let Some((file, offset)) = origin(t.raw_data.as_deref().unwrap_or_default()) else {
            return Ok(());
        };
        let Some(canonical) = std::fs::canonicalize(&file.path).ok() else {
            return Ok(());
        };
        if canonical.parent() != Some(dir.as_path()) {
            return Ok(());
        }
        let Some(location) = canonical.file_name().and_then(|n| n.to_str()) else {
            return Ok(());
        };
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", raw_len.to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        t.raw_data = None;
        files.insert(canonical, file);
        Ok(())
    });
    Some((light, dir, MappedResolver { files }))
}

fn origin(payload: &[u8]) -> Option<(Arc<MappedFile>, u64)> {
    (payload.len() >= MIN_BYTES)
        .then(|| mapped_origin(payload))
        .flatten()
}

fn canonical_dir(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path)
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

/// Serves tract's external-data reads from the mappings the references were made from.
pub(crate) struct MappedResolver {
    files: HashMap<PathBuf, Arc<MappedFile>>,
}

impl ModelDataResolver for MappedResolver {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        let file = self
            .files
            .get(p)
            .ok_or_else(|| format_err!("{} is not a mapped input file", p.display()))?;
        let bytes = file.bytes();
        let end = length.map_or(bytes.len(), |l| offset.saturating_add(l));
        ensure!(
            offset <= end && end <= bytes.len(),
            "external data range {offset}..{end} is out of bounds ({} bytes)",
            bytes.len()
        );
        buf.extend_from_slice(&bytes[offset..end]);
        Ok(())
    }
}
