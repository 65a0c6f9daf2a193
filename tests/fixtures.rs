//! Every fixture under `tests/fixtures/<pass>/<case>.onnxtxt`, found by glob and run through
//! the one harness (`tests/common/fixtures.rs`): consistent graph, header expectations,
//! printed result parses back, idempotence, tract outputs within the stated tolerance (NaN/Inf
//! aware), and the snapshot `<case>.snap` beside the fixture.
//!
//! All fixtures run in one test so that a failure lists every failing case; run one folder with
//! `cargo test --test fixtures -- <pass>` (the folder tests below).

mod common;

use common::compare::max_abs_diff;
use common::fixtures::{all_fixtures, assert_snapshot, check_run, run_fixture};
use std::path::{Path, PathBuf};

/// Run every fixture whose `<pass>/<case>` starts with `prefix`; panic listing the failures.
fn run_all(prefix: &str) {
    let paths: Vec<PathBuf> = all_fixtures()
        .into_iter()
        .filter(|p| fixture_name(p).starts_with(prefix))
        .collect();
    assert!(
        !paths.is_empty(),
        "no fixture under tests/fixtures/{prefix}"
    );
    let mut failed = Vec::new();
    for path in &paths {
        let result = std::panic::catch_unwind(|| {
            let run = run_fixture(path);
            check_run(&run);
            assert_snapshot(&run);
        });
        if result.is_err() {
            failed.push(fixture_name(path));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} fixtures failed (messages above): {failed:?}",
        failed.len(),
        paths.len()
    );
}

fn fixture_name(p: &Path) -> String {
    let dir = p.parent().and_then(|d| d.file_name()).unwrap_or_default();
    format!(
        "{}/{}",
        dir.to_string_lossy(),
        p.file_stem().unwrap_or_default().to_string_lossy()
    )
}

#[test]
fn cleanup() {
    run_all("cleanup/");
}

#[test]
fn equalize() {
    run_all("equalize/");
}

#[test]
fn fuse() {
    run_all("fuse/");
}

#[test]
fn mixed_precision() {
    run_all("mixed_precision/");
}

#[test]
fn prune() {
    run_all("prune/");
}

#[test]
fn weight_only() {
    run_all("weight_only/");
}

#[test]
fn quantize() {
    run_all("quantize/");
}

/// Every folder has a test above, and every snapshot has its fixture (a renamed fixture must
/// not leave a stale snapshot that nothing checks any more).
#[test]
fn every_folder_is_driven_and_every_snapshot_has_its_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let driven = [
        "cleanup",
        "equalize",
        "fuse",
        "mixed_precision",
        "prune",
        "quantize",
        "weight_only",
    ];
    for dir in std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
    {
        if !dir.is_dir() {
            continue;
        }
        let folder = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            driven.contains(&folder.as_str()),
            "tests/fixtures/{folder} is not driven by tests/fixtures.rs"
        );
        for f in std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()) {
            let ext = f.extension().map(|e| e.to_string_lossy().to_string());
            match ext.as_deref() {
                Some("snap") => assert!(
                    f.with_extension("onnxtxt").is_file(),
                    "{}: no fixture beside this snapshot",
                    f.display()
                ),
                Some("onnxtxt") | Some("py") => {}
                _ => panic!("{}: unexpected file in a fixture folder", f.display()),
            }
        }
    }
}

/// The comparison the harness relies on sees non-finite values.
#[test]
fn comparison_fails_on_non_finite_values_on_one_side() {
    let out = |v: &[f32]| {
        vec![(
            "y".to_string(),
            ndarray::ArrayD::from_shape_vec(vec![v.len()], v.to_vec()).unwrap(),
        )]
    };
    assert!(max_abs_diff(&out(&[1.0, 2.0]), &out(&[1.0, f32::INFINITY])).is_err());
    assert!(max_abs_diff(&out(&[f32::NAN, 2.0]), &out(&[1.0, 2.0])).is_err());
    assert!(max_abs_diff(&out(&[f32::INFINITY]), &out(&[f32::NEG_INFINITY])).is_err());
    assert!(max_abs_diff(&out(&[1.0]), &out(&[1.0, 2.0])).is_err());
    assert_eq!(
        max_abs_diff(&out(&[f32::NAN, 2.0]), &out(&[f32::NAN, 2.5])),
        Ok(0.5)
    );
}

#[test]
fn snapshots_tolerate_only_last_digit_float_rounding() {
    use common::fixtures::same_up_to_float_rounding as same;
    assert!(same(
        "float a6_s = {0.007000093},",
        "float a6_s = {0.007000092},",
        1e-6
    ));
    assert!(!same(
        "float a6_s = {0.007000093},",
        "float a6_s = {0.0070002},",
        1e-6
    ));
    // Integers (quantized values, zero points, dims) must match exactly.
    assert!(!same("uint8 a6_z = {95},", "uint8 a6_z = {96},", 1e-6));
    assert!(!same(
        "int32[2] b = {1276, -1675}",
        "int32[2] b = {1276, -1675, 3}",
        1e-6
    ));
    assert!(!same("Relu", "Clip", 1e-6));
}
