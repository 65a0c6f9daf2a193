//! Resource limits: a model declaring sizes no machine can hold is refused in one line, at
//! once and before anything is allocated (it used to abort with `memory allocation of
//! 274877906944 bytes failed`); `--max-memory` sets the budget; synthetic data is bounded in
//! work as well as memory.

mod common;
use common::*;
use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::ir::Model;
use onnx_compress::limits::MemoryBudget;
use onnx_compress::onnx::proto::ModelProto;
use std::path::Path;
use std::time::{Duration, Instant};

/// x[1, 3, h, 1] -> Conv(4x3x1x1) -> y
fn tall_conv(h: i64) -> ModelProto {
    model(
        vec![node("Conv", "conv", &["x", "w"], &["y"])],
        vec![value_info("x", &[1, 3, h, 1])],
        vec![value_info("y", &[1, 4, h, 1])],
        vec![f32_tensor("w", &[4, 3, 1, 1], 1)],
    )
}

/// Run the binary on `m` with `args`; assert a one-line refusal naming `needles`, exit 1, no
/// output or temp file left, in well under a second.
fn assert_refused(m: &ModelProto, args: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", m);
    let out = dir.path().join("out.onnx");
    let mut all = vec![input.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"];
    all.extend_from_slice(args);
    let start = Instant::now();
    let (code, _, err) = run(&all);
    let took = start.elapsed();
    assert_eq!(code, 1, "exit code {code}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}': {err}");
    }
    assert!(took < Duration::from_secs(1), "took {took:?}: {err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "in.onnx")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_dim_of_2_pow_31_is_refused_before_allocation() {
    assert_refused(
        &tall_conv(1 << 31),
        &[],
        &[
            "input 'x'",
            "[1, 3, 2147483648, 1]",
            "memory budget",
            "--input-shape",
            "--max-memory",
        ],
    );
}

#[test]
fn a_dim_of_2_pow_40_is_refused_before_allocation() {
    assert_refused(
        &tall_conv(1 << 40),
        &["--no-validate"],
        &[
            "synthetic calibration data for input 'x'",
            "1099511627776",
            "memory budget",
        ],
    );
}

#[test]
fn an_element_count_overflowing_64_bits_is_an_invalid_model() {
    let mut m = tall_conv(1 << 40);
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[1 << 40, 3, 1 << 40, 1]);
    assert_refused(&m, &[], &["model input 'x'", "overflows", "invalid model"]);
}

#[test]
fn max_memory_too_small_refuses_a_normal_run_naming_the_tensor() {
    // 4 validation batches of x[1, 3, 8, 8] are 3 KiB.
    assert_refused(
        &conv_relu(),
        &["--max-memory", "1K"],
        &[
            "input 'x' [1, 3, 8, 8]",
            "3.0 KiB",
            "1.0 KiB (--max-memory)",
        ],
    );
    // Without validation, the largest activation of one run is what must fit.
    assert_refused(
        &conv_relu(),
        &["--max-memory", "512", "--no-validate", "--passes", "fuse"],
        &["value 'c' [1, 4, 8, 8]", "1.0 KiB", "512 B (--max-memory)"],
    );
}

#[test]
fn max_memory_large_enough_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.onnx", &conv_relu());
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    let args = |o: &Path, extra: &[&str]| {
        let mut v = vec![
            input.to_str().unwrap().to_string(),
            "-o".into(),
            o.to_str().unwrap().into(),
            "-q".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for (o, extra) in [(&a, &[][..]), (&b, &["--max-memory", "64M"][..])] {
        let v = args(o, extra);
        let (code, _, err) = run(&v.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn max_memory_must_be_a_size() {
    assert_refused(
        &conv_relu(),
        &["--max-memory", "lots"],
        &["--max-memory lots", "size"],
    );
}

#[test]
fn synthetic_data_is_bounded_in_work_under_the_budget() {
    // 16 calibration samples of [3, 2^22, 1] are 2^27.6 values: 768 MiB fits the budget of any
    // test machine but took over a minute to generate and observe.
    assert_refused(
        &tall_conv(1 << 22),
        &["--no-validate", "--max-memory", "64G"],
        &[
            "synthetic calibration data for input 'x'",
            "201326592 values",
            "--calib",
        ],
    );
}

#[test]
fn the_library_refuses_huge_synthetic_data_instead_of_aborting() {
    let m = Model::from_proto(tall_conv(1 << 40)).unwrap();
    let e = CalibrationSet::synthetic(&m, 16, 0, &DataOptions::default()).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("'x' [1, 3, 1099511627776, 1]") && e.contains("memory budget"),
        "{e}"
    );
    let small = DataOptions {
        memory: MemoryBudget::user(1000),
        ..Default::default()
    };
    let m = Model::from_proto(tall_conv(8)).unwrap();
    // 2 samples of 24 values, held twice: 384 bytes fit, 1 KiB for 6 samples does not.
    CalibrationSet::synthetic(&m, 2, 0, &small).unwrap();
    let e = format!(
        "{:#}",
        CalibrationSet::synthetic(&m, 6, 0, &small).unwrap_err()
    );
    assert!(e.contains("(--max-memory)"), "{e}");
}

#[test]
fn the_runtime_refuses_overflowing_input_shapes() {
    let mut m = tall_conv(1);
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[1 << 40, 1 << 40, 1 << 40, 1]);
    let e = onnx_compress::runtime::resolve_input_shapes(&m, &[]).unwrap_err();
    assert!(
        e.to_string().contains("input 'x'") && e.to_string().contains("overflows"),
        "{e}"
    );
}
