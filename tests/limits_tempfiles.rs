//! Temp files: each write goes through `.<file>.tmp-<PID>-<random>` beside the target; a run
//! removes those a killed run left (process gone), never a live writer's.

mod common;
use common::*;
use onnx_compress::onnx::save::{remove_stale_temp_files, temp_file_for};
use std::path::Path;

/// A PID that no process holds: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn temp_files_are_named_after_their_target_and_process() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = temp_file_for(&dir.path().join("out.onnx")).unwrap();
    let name = tmp
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let prefix = format!(".out.onnx.tmp-{}-", std::process::id());
    assert!(
        name.starts_with(&prefix) && name.len() > prefix.len(),
        "{name}"
    );
    assert_eq!(tmp.path().parent(), Some(dir.path()));
}

#[test]
fn stale_temp_files_are_removed_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.onnx");
    let dead = format!(".out.onnx.tmp-{}-abc123", dead_pid());
    let live = format!(".out.onnx.tmp-{}-def456", std::process::id());
    let other = format!(".other.onnx.tmp-{}-abc123", dead_pid());
    let not_ours = ".out.onnx.tmp-notapid-x".to_string();
    for n in [&dead, &live, &other, &not_ours] {
        std::fs::write(dir.path().join(n), b"partial").unwrap();
    }
    let removed = remove_stale_temp_files(&target);
    assert_eq!(removed, vec![dir.path().join(&dead)]);
    let mut want = vec![live, other, not_ours];
    want.sort();
    assert_eq!(names(dir.path()), want);
}

#[test]
fn a_run_removes_stale_temp_files_of_its_output_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", &conv_relu());
    let out = dir.path().join("out.onnx");
    let dead = format!(".out.onnx.tmp-{}-abc123", dead_pid());
    let dead_data = format!(".out.onnx.data.tmp-{}-abc123", dead_pid());
    // The test process is alive: to the run, this is a concurrent writer's file.
    let live = format!(".out.onnx.tmp-{}-def456", std::process::id());
    for n in [&dead, &dead_data, &live] {
        std::fs::write(dir.path().join(n), b"partial").unwrap();
    }
    let (code, _, err) = run(&[input.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    assert_eq!(code, 0, "{err}");
    let mut want = vec!["in.onnx".to_string(), "out.onnx".into(), live];
    want.sort();
    assert_eq!(names(dir.path()), want);
}
