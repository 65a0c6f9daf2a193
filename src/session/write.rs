//! Atomic writing of the run's text outputs (`--report` JSON, `--html`, `--save-recipe`): a temp
//! file beside the target, renamed over it, so a failed or killed run never leaves a partial
//! file. Files get the mode any new file gets under the user's umask, like the model itself,
//! and their temp files the model's recognisable names ([`crate::onnx::save::temp_file_for`]);
//! stale ones a killed run left for the same path are removed first.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Write JSON atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_text(path, &serde_json::to_string_pretty(value)?)
}

/// Write a text file atomically (temp file + rename).
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::onnx::save::remove_stale_temp_files(path);
    let mut tmp = crate::onnx::save::temp_file_for(path)?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())?;
    // On failure, drop the temp file (PersistError holds it) so nothing is left behind.
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Reports are not secrets: they get the umask's mode like the model, not tempfile's 0600.
    #[test]
    fn text_files_get_the_umask_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        let umask = unsafe {
            let m = libc::umask(0);
            libc::umask(m);
            m
        };
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !(umask as u32), "mode {mode:o}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\n  \"a\": 1\n}");
    }
}
