//! Bad input: every case gives a clear one-line error naming what and where, a non-zero exit
//! code, and no output file.

mod common;
use common::*;
use onnx_compress::onnx::proto::{tensor_proto::DataLocation, StringStringEntryProto};
use prost::Message;
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_onnx-compress"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Compress `input` into a fresh dir; assert failure mentioning every `needles` and no output.
fn assert_rejected(input: &Path, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let (code, _, err) = run(&[input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_ne!(code, 0, "expected failure for {}", input.display());
    assert!(!code.eq(&101), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}': {err}");
    }
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one-line error expected: {err}"
    );
    assert!(!out.exists(), "no output may be written on failure");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn empty_file() {
    let d = tempfile::tempdir().unwrap();
    assert_rejected(
        &write_bytes(d.path(), "empty.onnx", b""),
        &["empty.onnx", "file is empty"],
    );
}

#[test]
fn random_bytes() {
    let d = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..400u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_rejected(
        &write_bytes(d.path(), "random.onnx", &bytes),
        &["random.onnx", "not an ONNX model"],
    );
}

#[test]
fn truncated_protobuf() {
    let d = tempfile::tempdir().unwrap();
    let bytes = conv_relu().encode_to_vec();
    let cut = &bytes[..bytes.len() * 2 / 3];
    assert_rejected(
        &write_bytes(d.path(), "cut.onnx", cut),
        &["cut.onnx", "not an ONNX model"],
    );
}

#[test]
fn text_file() {
    let d = tempfile::tempdir().unwrap();
    let p = write_bytes(d.path(), "notes.onnx", b"this is a README, not a model\n");
    assert_rejected(&p, &["notes.onnx", "looks like text"]);
}

#[test]
fn missing_file() {
    assert_rejected(
        Path::new("/nonexistent/model.onnx"),
        &["cannot read", "/nonexistent/model.onnx"],
    );
}

#[test]
fn graph_with_a_cycle() {
    let d = tempfile::tempdir().unwrap();
    let m = model(
        vec![
            node("Add", "a", &["x", "t2"], &["t1"]),
            node("Relu", "b", &["t1"], &["t2"]),
            node("Relu", "c", &["t2"], &["y"]),
        ],
        vec![value_info("x", &[1, 4])],
        vec![value_info("y", &[1, 4])],
        vec![],
    );
    assert_rejected(&write(d.path(), "cycle.onnx", &m), &["cycle.onnx", "cycle"]);
}

#[test]
fn dangling_input() {
    let d = tempfile::tempdir().unwrap();
    let m = model(
        vec![node("Add", "add1", &["x", "nowhere"], &["y"])],
        vec![value_info("x", &[1, 4])],
        vec![value_info("y", &[1, 4])],
        vec![],
    );
    assert_rejected(
        &write(d.path(), "dangling.onnx", &m),
        &["node 'add1'", "'nowhere'"],
    );
}

#[test]
fn missing_initializer() {
    let d = tempfile::tempdir().unwrap();
    let mut m = conv_relu();
    m.graph
        .as_mut()
        .unwrap()
        .initializer
        .retain(|t| t.name() != "w");
    assert_rejected(
        &write(d.path(), "noweight.onnx", &m),
        &["node 'conv' (Conv)", "reads 'w'"],
    );
}

#[test]
fn wrong_input_count() {
    let d = tempfile::tempdir().unwrap();
    let mut m = conv_relu();
    m.graph.as_mut().unwrap().node[0].input.truncate(1);
    assert_rejected(
        &write(d.path(), "arity.onnx", &m),
        &["node 'conv' (Conv) has 1 input(s)", "2 to 3"],
    );
}

#[test]
fn duplicate_producer() {
    let d = tempfile::tempdir().unwrap();
    let m = model(
        vec![
            node("Relu", "r1", &["x"], &["y"]),
            node("Relu", "r2", &["x"], &["y"]),
        ],
        vec![value_info("x", &[1, 4])],
        vec![value_info("y", &[1, 4])],
        vec![],
    );
    assert_rejected(
        &write(d.path(), "dup.onnx", &m),
        &["'y' is produced twice", "'r1'", "'r2'"],
    );
}

fn external(model: &mut onnx_compress::onnx::proto::ModelProto, location: &str) {
    let t = &mut model.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.data_location = Some(DataLocation::External as i32);
    t.external_data = vec![StringStringEntryProto {
        key: Some("location".into()),
        value: Some(location.into()),
    }];
}

#[test]
fn external_data_missing() {
    let d = tempfile::tempdir().unwrap();
    let mut m = conv_relu();
    external(&mut m, "weights.bin");
    assert_rejected(
        &write(d.path(), "ext.onnx", &m),
        &["tensor 'w'", "'weights.bin' not found"],
    );
}

#[test]
fn external_data_escaping_the_model_directory() {
    let d = tempfile::tempdir().unwrap();
    let inner = d.path().join("models");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(d.path().join("secret.bin"), vec![0u8; 4 * 108]).unwrap();
    let mut m = conv_relu();
    external(&mut m, "../secret.bin");
    assert_rejected(
        &write(&inner, "up.onnx", &m),
        &["'../secret.bin' escapes the model directory"],
    );
    let mut m = conv_relu();
    external(&mut m, "/etc/passwd");
    assert_rejected(
        &write(&inner, "abs.onnx", &m),
        &["'/etc/passwd' is an absolute path"],
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.path().join("secret.bin"), inner.join("link.bin")).unwrap();
        let mut m = conv_relu();
        external(&mut m, "link.bin");
        assert_rejected(
            &write(&inner, "link.onnx", &m),
            &["outside the model directory"],
        );
    }
}

#[test]
fn external_data_too_short() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("w.bin"), vec![0u8; 10]).unwrap();
    let mut m = conv_relu();
    external(&mut m, "w.bin");
    assert_rejected(
        &write(d.path(), "short.onnx", &m),
        &["tensor 'w'", "beyond the end"],
    );
}

#[test]
fn unknown_domain_passes_through() {
    let d = tempfile::tempdir().unwrap();
    let mut m = conv_relu();
    let g = m.graph.as_mut().unwrap();
    g.node[1].domain = Some("com.example".into());
    g.node[1].op_type = Some("FancyRelu".into());
    m.opset_import
        .push(onnx_compress::onnx::proto::OperatorSetIdProto {
            domain: Some("com.example".into()),
            version: Some(3),
        });
    let input = write(d.path(), "custom.onnx", &m);
    let out = d.path().join("out.onnx");
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "none",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&input).unwrap());
}

#[test]
fn output_never_clobbers_input() {
    let d = tempfile::tempdir().unwrap();
    let input = write(d.path(), "m.onnx", &conv_relu());
    let before = std::fs::read(&input).unwrap();
    let (code, _, err) = run(&[input.to_str().unwrap(), "-o", input.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("refusing to overwrite the input model"),
        "{err}"
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
    // Through another spelling of the same path, too.
    let alias = d.path().join(".").join("m.onnx");
    let (code, _, _) = run(&[input.to_str().unwrap(), "-o", alias.to_str().unwrap()]);
    assert_ne!(code, 0);
}

#[test]
fn unknown_pass_lists_the_valid_ones() {
    let d = tempfile::tempdir().unwrap();
    let input = write(d.path(), "m.onnx", &conv_relu());
    let out = d.path().join("o.onnx");
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "nonsense",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown pass 'nonsense'") && err.contains("valid passes"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn bad_input_shape_spec() {
    let d = tempfile::tempdir().unwrap();
    let input = write(d.path(), "m.onnx", &conv_relu());
    let out = d.path().join("o.onnx");
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--input-shape",
        "x:1xAx8",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("'A' is not a dimension"), "{err}");
    let (code, _, err) = run(&[
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--input-shape",
        "nope:1x3x8x8",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("'nope', which is not a graph input"), "{err}");
    assert!(!out.exists());
}
