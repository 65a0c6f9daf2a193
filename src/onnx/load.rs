//! Reading ONNX files: protobuf decoding with clear errors, and external data inlined from
//! files that must stay inside the model's directory.
//!
//! Files are memory-mapped, not copied: tensor payloads (`raw_data`, a [`Bytes`]) are views of
//! the mapped model file or external data file, so a 2 GiB model costs page cache, not a
//! private copy, and [`MappedFile::locate`] tells the writer where an untouched payload came
//! from (it is copied file to file, `crate::onnx::save`). The tool never writes its input
//! files (outputs are written beside and renamed over), so a mapping stays valid for the run;
//! what cannot be mapped (a pipe, an empty file) is read into memory instead.
//!
//! Mapped pages a run has read count in its resident memory: [`crate::onnx::pages`] drops
//! them once a payload has been read through.

use crate::onnx::proto::{
    tensor_proto::DataLocation, GraphProto, ModelProto, NodeProto, TensorProto,
};
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// A read-only mapping of one input file, shared by the payloads that are views of it.
#[derive(Debug)]
pub struct MappedFile {
    pub path: PathBuf,
    pub file: std::fs::File,
    map: Arc<memmap2::Mmap>,
}

/// A range of a mapped file, the owner behind a payload's [`Bytes`].
struct MappedRange {
    file: Arc<MappedFile>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        &self.file.map[self.start..self.end]
    }
}

impl MappedFile {
    /// Map `path` read-only; `None` when it cannot be mapped (not a regular file, empty).
    fn open(path: &Path, file: std::fs::File) -> Option<Arc<MappedFile>> {
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() == 0 {
            return None;
        }
        // SAFETY: the mapping is read-only and the tool never writes its input files (see
        // the module docs); another process truncating the file mid-run is outside what a
        // model file can do to us.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.ok()?);
        crate::onnx::pages::register(&map);
        Some(Arc::new(MappedFile {
            path: path.to_path_buf(),
            file,
            map,
        }))
    }

    /// The bytes `[start, end)` of the file as a payload sharing the mapping.
    fn slice(self: &Arc<Self>, start: usize, end: usize) -> Bytes {
        Bytes::from_owner(MappedRange {
            file: Arc::clone(self),
            start,
            end,
        })
    }

    fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The offset in this file where `payload` starts, when `payload` is a view of it.
    pub fn locate(&self, payload: &[u8]) -> Option<u64> {
        let base = self.map.as_ptr() as usize;
        let start = payload.as_ptr() as usize;
        (start >= base && start + payload.len() <= base + self.map.len())
            .then(|| (start - base) as u64)
    }
}

/// Whether a model came with external data (callers keep that layout on save by default), and
/// its size on disk.
#[derive(Debug, Clone, Default)]
pub struct LoadInfo {
    pub had_external_data: bool,
    /// The model file plus every external data file it references (each counted once): what
    /// the model costs on disk, so size ratios compare like with like.
    pub file_bytes: u64,
    /// The external data files' part of `file_bytes`.
    pub external_bytes: u64,
    /// The mapped files the payloads are views of (model file first, then external data).
    pub mapped: Vec<Arc<MappedFile>>,
}

/// Decode a model file and inline its external data, without building the IR.
pub fn read_model(path: &Path) -> Result<(ModelProto, LoadInfo)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut mapped = Vec::new();
    let bytes = match MappedFile::open(path, file) {
        Some(m) => {
            let all = m.slice(0, m.map.len());
            mapped.push(m);
            all
        }
        None => Bytes::from(
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        ),
    };
    // Decoding from `Bytes` makes every payload a view of the file, not a copy.
    let mut model = decode_shared(bytes.clone()).with_context(|| format!("{}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    let external_bytes = inline_external_data(&mut model, base, &mut mapped)
        .with_context(|| format!("{}: external data", path.display()))?;
    Ok((
        model,
        LoadInfo {
            had_external_data: external_bytes.is_some(),
            file_bytes: bytes.len() as u64 + external_bytes.unwrap_or(0),
            external_bytes: external_bytes.unwrap_or(0),
            mapped,
        },
    ))
}

/// Decode ONNX protobuf bytes, with an error that says what the bytes look like.
pub fn decode(bytes: &[u8]) -> Result<ModelProto> {
    decode_shared(Bytes::copy_from_slice(bytes))
}

/// [`decode`] whose payloads are views of `bytes` (no copy).
pub fn decode_shared(bytes: Bytes) -> Result<ModelProto> {
    ensure!(!bytes.is_empty(), "the file is empty, not an ONNX model");
    let model = ModelProto::decode(bytes.clone()).map_err(|e| {
        let looks_text = bytes
            .iter()
            .take(256)
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
        if looks_text {
            anyhow::anyhow!("not an ONNX model: the file looks like text, not a binary protobuf ({e})")
        } else {
            anyhow::anyhow!("not an ONNX model: protobuf decoding failed, the file is truncated or not ONNX ({e})")
        }
    })?;
    ensure!(
        model.graph.is_some(),
        "not an ONNX model: no graph (decoded as protobuf, but ModelProto.graph is missing)"
    );
    ensure!(
        model.ir_version.is_some(),
        "not an ONNX model: ir_version is missing"
    );
    Ok(model)
}

/// Visit every TensorProto in the model: initializers, Constant/attribute tensors, sparse
/// tensors, subgraphs, functions and training graphs.
pub fn for_each_tensor_mut(
    model: &mut ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    if let Some(g) = model.graph.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for func in &mut model.functions {
        nodes_tensors_mut(&mut func.node, f)?;
    }
    for ti in &mut model.training_info {
        for g in ti.initialization.iter_mut().chain(ti.algorithm.iter_mut()) {
            graph_tensors_mut(g, f)?;
        }
    }
    Ok(())
}

fn graph_tensors_mut(
    g: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
            f(t)?;
        }
    }
    nodes_tensors_mut(&mut g.node, f)
}

fn nodes_tensors_mut(
    nodes: &mut [NodeProto],
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for n in nodes {
        for a in &mut n.attribute {
            for t in a.t.iter_mut().chain(a.tensors.iter_mut()) {
                f(t)?;
            }
            for s in a
                .sparse_tensor
                .iter_mut()
                .chain(a.sparse_tensors.iter_mut())
            {
                for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
                    f(t)?;
                }
            }
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                graph_tensors_mut(g, f)?;
            }
        }
    }
    Ok(())
}

/// Resolve `location` against the model directory, refusing absolute paths, `..` and links
/// that lead outside it.
pub fn external_path(base: &Path, location: &str) -> Result<PathBuf> {
    let rel = Path::new(location);
    ensure!(!location.is_empty(), "external data location is empty");
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                bail!("external data location '{location}' escapes the model directory ('..' is not allowed)")
            }
            Component::RootDir | Component::Prefix(_) => {
                bail!("external data location '{location}' is an absolute path; it must be relative to the model directory")
            }
        }
    }
    let path = base.join(rel);
    let canon_base = base
        .canonicalize()
        .with_context(|| format!("cannot resolve model directory {}", base.display()))?;
    let canon = path.canonicalize().with_context(|| {
        format!(
            "external data file '{location}' not found next to the model ({})",
            path.display()
        )
    })?;
    ensure!(
        canon.starts_with(&canon_base),
        "external data location '{location}' resolves outside the model directory (through a link)"
    );
    Ok(canon)
}

/// Inline every external tensor; returns the total size of the distinct external files read,
/// or `None` when the model has no external data.
fn inline_external_data(
    model: &mut ModelProto,
    base: &Path,
    mapped: &mut Vec<Arc<MappedFile>>,
) -> Result<Option<u64>> {
    let mut files: HashMap<PathBuf, Arc<MappedFile>> = HashMap::new();
    let mut any = false;
    for_each_tensor_mut(model, &mut |t| {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        any = true;
        let name = t.name().to_string();
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key() == key)
                .map(|e| e.value().to_string())
        };
        let location = entry("location")
            .with_context(|| format!("tensor '{name}' is external but has no location"))?;
        let parse = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.parse::<u64>().with_context(|| {
                        format!("tensor '{name}': external data {key} '{v}' is not a number")
                    })
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = parse("length")?;
        let path = external_path(base, &location).with_context(|| format!("tensor '{name}'"))?;
        let file = match files.entry(path.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let opened = std::fs::File::open(&path)
                    .with_context(|| format!("tensor '{name}': cannot open {}", path.display()))?;
                let is_empty = opened.metadata().is_ok_and(|m| m.len() == 0);
                let m = MappedFile::open(&path, opened).with_context(|| {
                    if is_empty {
                        format!("tensor '{name}': external data file '{location}' is empty")
                    } else {
                        format!("tensor '{name}': cannot map {}", path.display())
                    }
                })?;
                v.insert(m)
            }
        };
        let file_len = file.len();
        let expected = crate::onnx::tensor::payload_bytes(t)? as u64;
        let length = length.unwrap_or(expected);
        ensure!(
            length == expected,
            "tensor '{name}': external data length {length} does not match its shape ({expected} bytes)"
        );
        ensure!(
            offset.checked_add(length).is_some_and(|end| end <= file_len),
            "tensor '{name}': external data [{offset}, {offset}+{length}) lies beyond the end of '{location}' ({file_len} bytes)"
        );
        t.raw_data = Some(file.slice(offset as usize, (offset + length) as usize));
        t.data_location = None;
        t.external_data.clear();
        Ok(())
    })?;
    if !any {
        return Ok(None);
    }
    let mut files: Vec<Arc<MappedFile>> = files.into_values().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let total = files.iter().map(|f| f.len()).sum();
    mapped.extend(files);
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payload.bin");
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mapped = MappedFile::open(&path, std::fs::File::open(&path).unwrap()).unwrap();
        let payload = mapped.slice(100, data.len());
        assert_eq!(&payload[..], &data[100..]);
        crate::onnx::pages::release_pages(&payload);
        assert_eq!(&payload[..], &data[100..]);
        // Heap bytes are never advised: they keep their contents.
        let heap = data.clone();
        crate::onnx::pages::release_pages(&heap);
        assert_eq!(heap, data);
    }
}
