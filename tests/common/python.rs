//! Python interop tests (onnx checker, onnxruntime, onnx.parser) need `python3` with some
//! modules. Where they are missing a developer's run prints a note and the check is not made;
//! under CI (`CI` set, as `.ci/run` does) a missing module fails the test, so a green CI run
//! means the interop checks ran.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;

/// Whether `python3 -c "import <modules>"` succeeds (cached per module list).
pub fn python_has(modules: &[&str]) -> bool {
    static SEEN: Mutex<Option<HashMap<String, bool>>> = Mutex::new(None);
    let key = modules.join(", ");
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    if let Some(&ok) = seen.get(&key) {
        return ok;
    }
    let ok = Command::new("python3")
        .args(["-c", &format!("import {key}")])
        .output()
        .is_ok_and(|o| o.status.success());
    seen.insert(key, ok);
    ok
}

/// True when the interop check in `test` can run. When python3 lacks `modules`: panics under
/// CI (`CI` set and not empty/`false`/`0`), else prints a note and returns false.
pub fn require_python(modules: &[&str], test: &str) -> bool {
    if python_has(modules) {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{test}: python3 with {} is required under CI (pip install onnx onnxruntime numpy)",
        modules.join(", ")
    );
    eprintln!(
        "note: {test}: python3 with {} not available: interop check not run",
        modules.join(", ")
    );
    false
}
