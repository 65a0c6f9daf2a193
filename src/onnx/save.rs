//! Writing ONNX files atomically (temp file + rename, so no partial or clobbered output), with
//! optional external data for large models (protobuf cannot hold more than 2 GiB).
//!
//! A payload that is still a view of a mapped input file ([`crate::onnx::load::MappedFile`])
//! is copied file to file (`copy_file_range`: the kernel moves the pages, often without
//! reading them, and the process never touches them), so an untouched 2 GiB model is written at
//! the speed of `cp`.
//!
//! Temp files sit beside their target, named `.<target file name>.tmp-<PID>-<random>`: a killed
//! run leaves one recognisable file per target, and [`remove_stale_temp_files`] (called when a
//! run starts writing to the same path) deletes those whose process is gone. A file whose PID
//! is alive (a concurrent writer, or an unrelated process that reused the PID) is kept: losing
//! a stale file's space is harmless, deleting a live writer's file is not.

use crate::onnx::load::{for_each_tensor_mut, MappedFile};
use crate::onnx::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
use anyhow::{bail, Context, Result};
use prost::Message;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// Protobuf's hard limit for one message.
pub const PROTOBUF_LIMIT: usize = 2 * 1024 * 1024 * 1024 - 1;

#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Store tensors of at least `external_threshold` bytes in `<output file name>.data`.
    pub external_data: bool,
    pub external_threshold: usize,
    /// Input files payloads may still be views of (copied file to file when they are).
    pub sources: Vec<Arc<MappedFile>>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            external_data: false,
            external_threshold: 1024,
            sources: Vec::new(),
        }
    }
}

/// Encode a model, refusing sizes protobuf cannot represent.
pub fn encode(model: &ModelProto) -> Result<Vec<u8>> {
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        bail!(
            "the model is {:.2} GiB, above protobuf's 2 GiB limit: save it with --external-data",
            len as f64 / (1u64 << 30) as f64
        );
    }
    Ok(model.encode_to_vec())
}

pub fn save_proto(mut model: ModelProto, path: &Path, opts: &SaveOptions) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("output path {} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let mut data_file = None;
    if opts.external_data {
        let location = format!("{file_name}.data");
        let mut tmp = temp_file_for(&dir.join(&location))?;
        let mut offset = 0u64;
        for_each_tensor_mut(&mut model, &mut |t| {
            let Some(raw) = t.raw_data.as_ref() else {
                return Ok(());
            };
            if raw.len() < opts.external_threshold {
                return Ok(());
            }
            // Align each tensor to 4 KiB so runtimes can memory-map it.
            let padded = offset.div_ceil(4096) * 4096;
            tmp.write_all(&vec![0u8; (padded - offset) as usize])?;
            let source = opts
                .sources
                .iter()
                .find_map(|m| m.locate(raw).map(|at| (m, at)));
            match source {
                Some((m, at)) => copy_payload(&m.file, at, tmp.as_file_mut(), raw)?,
                None => tmp.write_all(raw)?,
            }
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.into()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", location.clone()),
                entry("offset", padded.to_string()),
                entry("length", raw.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            offset = padded + raw.len() as u64;
            t.raw_data = None;
            Ok(())
        })?;
        tmp.flush()?;
        data_file = Some((tmp, dir.join(location)));
    }
    let bytes = encode(&model)?;
    let mut tmp = temp_file_for(path)?;
    tmp.write_all(&bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.flush()?;
    if let Some((data_tmp, data_path)) = data_file {
        data_tmp
            .persist(&data_path)
            .with_context(|| format!("cannot write {}", data_path.display()))?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Append `payload`, which is `src[at..at + payload.len()]`, to `dst` by `copy_file_range`;
/// what the kernel will not copy that way (another file system, an old kernel) is written
/// from memory.
fn copy_payload(
    src: &std::fs::File,
    at: u64,
    dst: &mut std::fs::File,
    payload: &[u8],
) -> Result<()> {
    let mut done = 0usize;
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let mut off_in = at as libc::loff_t;
        while done < payload.len() {
            // SAFETY: both descriptors are open files owned by the caller; `off_in` is a valid
            // pointer for the call; a null output offset appends at `dst`'s position.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    std::ptr::null_mut(),
                    payload.len() - done,
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            done += n as usize;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (src, at);
    dst.write_all(&payload[done..])?;
    Ok(())
}

/// The directory a target file lives in (`.` for a bare file name).
fn parent_dir(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<target file name>.tmp-`: what every temp file for `target` starts with.
fn temp_prefix(target: &Path) -> Result<String> {
    let name = target
        .file_name()
        .with_context(|| format!("output path {} has no file name", target.display()))?;
    Ok(format!(".{}.tmp-", name.to_string_lossy()))
}

/// A temp file beside `target` that becomes it by rename, named
/// `.<target file name>.tmp-<PID>-<random>`. tempfile creates 0600 files (right for secrets,
/// wrong here): ask for 0666 so the result gets the mode any new file would get under the
/// user's umask (0644 usually), as `cp` or ORT's `onnx.save` would give.
pub fn temp_file_for(target: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = parent_dir(target);
    let prefix = format!("{}{}-", temp_prefix(target)?, std::process::id());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))
}

/// Whether process `pid` exists (on Linux: `/proc/<pid>`; elsewhere `kill(pid, 0)`, where
/// EPERM still means it exists). Unknown counts as alive.
fn process_alive(pid: u32) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new(&format!("/proc/{pid}")).exists();
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    true
}

/// Delete temp files a killed run left for `target` (see the module docs): files named
/// `.<target file name>.tmp-<PID>-...` whose process is gone. Best effort: what cannot be
/// read or removed stays. Returns the removed paths.
pub fn remove_stale_temp_files(target: &Path) -> Vec<std::path::PathBuf> {
    let Ok(prefix) = temp_prefix(target) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent_dir(target)) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !process_alive(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}
