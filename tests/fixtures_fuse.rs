//! `.onnxtxt` fixtures for the `fuse` pass (`tests/fixtures/fuse/<case>.onnxtxt`): BN folding
//! per producer kind and the cases that must not fold, run through the shared harness
//! (consistent graph, header expectations, idempotence, tract within 1e-4) with a
//! before/after snapshot in `tests/fixtures/fuse/snapshots` (prefixed `fixtures_fuse__`, beside
//! the builder-based snapshots of `passes_fuse.rs`). Each test also checks the wiring the
//! header's intent states on the output model.

mod common;

use common::fixtures::{check_fixture, read_fixture};
use onnx_compress::ir::Model;
use onnx_compress::onnx::proto::{ModelProto, NodeProto};
use onnx_compress::onnx::text::parse_model;
use onnx_compress::passes::{run_passes, select, PassContext};
use std::path::PathBuf;

fn path(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/fuse/{case}.onnxtxt"))
}

/// Run the harness and snapshot; return (before, after) for structural checks.
fn run(case: &str) -> (ModelProto, ModelProto) {
    let ctx = PassContext::default();
    let snap = check_fixture(&path(case), &ctx);
    insta::with_settings!({snapshot_path => "fixtures/fuse/snapshots"}, {
        insta::assert_snapshot!(case, snap);
    });
    let fx = read_fixture(&path(case));
    let original = parse_model(&fx.text).unwrap();
    let mut model = Model::from_proto(original.clone()).unwrap();
    run_passes(&mut model, &select(&fx.passes).unwrap(), &ctx).unwrap();
    (original, model.to_proto().unwrap())
}

fn nodes(m: &ModelProto) -> &[NodeProto] {
    &m.graph.as_ref().unwrap().node
}

fn producer<'a>(m: &'a ModelProto, value: &str) -> &'a NodeProto {
    nodes(m)
        .iter()
        .find(|n| n.output.iter().any(|o| o == value))
        .unwrap_or_else(|| panic!("nothing produces '{value}'"))
}

/// The producer of `y` is the folded layer: op type, the original layer's name, and a bias
/// input (created when the layer had none).
fn check_folded(after: &ModelProto, op: &str, name: &str, bias_slot: usize) {
    let n = producer(after, "y");
    assert_eq!((n.op_type(), n.name()), (op, name));
    assert!(
        n.input.get(bias_slot).is_some_and(|b| !b.is_empty()),
        "folded {op} has a bias"
    );
    assert_eq!(nodes(after).len(), 1);
}

#[test]
fn conv_bn() {
    let (_, after) = run("conv_bn");
    check_folded(&after, "Conv", "conv", 2);
}

#[test]
fn conv_nobias_bn() {
    let (before, after) = run("conv_nobias_bn");
    assert_eq!(nodes(&before)[0].input.len(), 2);
    check_folded(&after, "Conv", "conv", 2);
}

#[test]
fn depthwise_conv_bn() {
    let (_, after) = run("depthwise_conv_bn");
    check_folded(&after, "Conv", "conv", 2);
}

#[test]
fn grouped_conv_bn() {
    let (_, after) = run("grouped_conv_bn");
    check_folded(&after, "Conv", "conv", 2);
}

#[test]
fn convtranspose_bn() {
    let (_, after) = run("convtranspose_bn");
    check_folded(&after, "ConvTranspose", "deconv", 2);
}

#[test]
fn gemm_transb0_bn() {
    let (_, after) = run("gemm_transb0_bn");
    check_folded(&after, "Gemm", "fc", 2);
}

#[test]
fn gemm_transb1_bn() {
    let (_, after) = run("gemm_transb1_bn");
    check_folded(&after, "Gemm", "fc", 2);
}

#[test]
fn conv_bn_relu() {
    let (_, after) = run("conv_bn_relu");
    let relu = producer(&after, "y");
    assert_eq!(relu.op_type(), "Relu");
    assert_eq!(producer(&after, &relu.input[0]).op_type(), "Conv");
}

#[test]
fn conv_bn_clip6() {
    let (before, after) = run("conv_bn_clip6");
    let clip = producer(&after, "y");
    assert_eq!(clip.op_type(), "Clip");
    assert_eq!(producer(&after, &clip.input[0]).op_type(), "Conv");
    // The bounds are untouched.
    assert_eq!(clip.input[1..], producer(&before, "y").input[1..]);
}

#[test]
fn conv_two_consumers() {
    let (before, after) = run("conv_two_consumers");
    let conv = |m: &ModelProto| producer(m, "t").clone();
    assert_eq!(conv(&before), conv(&after), "the Conv is untouched");
    assert_eq!(producer(&after, "z").input[0], "t");
    let add = producer(&after, "y");
    assert_eq!(add.op_type(), "Add");
    let mul = producer(&after, &add.input[0]);
    assert_eq!((mul.op_type(), mul.input[0].as_str()), ("Mul", "t"));
}

#[test]
fn bn_nonconst_params() {
    let (before, after) = run("bn_nonconst_params");
    assert_eq!(before, after, "the graph is unchanged");
}

#[test]
fn bn_first() {
    let (_, after) = run("bn_first");
    let add = producer(&after, "y");
    assert_eq!(add.op_type(), "Add");
    let mul = producer(&after, &add.input[0]);
    assert_eq!((mul.op_type(), mul.input[0].as_str()), ("Mul", "x"));
}
