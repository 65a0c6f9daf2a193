//! The `cleanup` pass beyond what the fixture harness checks: per-rule counts and wiring on
//! the `tests/fixtures/cleanup` cases (one per rule; `tests/fixtures.rs` checks their
//! snapshots, idempotence and outputs), and cases built in code that must stay untouched.

mod common;

use common::fuse_builder::*;
use onnx_compress::ir::op::attr_int;
use onnx_compress::ir::Model;
use onnx_compress::passes::cleanup::Cleanup;
use onnx_compress::passes::PassStats;

/// Run `tests/fixtures/cleanup/<case>.onnxtxt` (the harness in `tests/fixtures.rs` checks
/// it and its snapshot): (before, after, the pass's stats); the case must change something.
fn run_fixture(case: &str) -> (Model, Model, PassStats) {
    let run = common::fixtures::run_fixture(&common::fixtures::case_path("cleanup", case));
    let r = &run.records[0];
    assert!(r.changes > 0, "{case}: nothing changed");
    let stats = PassStats {
        changes: r.changes,
        notes: r.notes.clone(),
        details: r.details.clone(),
        table: vec![],
        facts: r.facts.clone(),
    };
    (
        Model::from_proto(run.original.clone()).unwrap(),
        run.after,
        stats,
    )
}

fn ops(m: &Model) -> Vec<String> {
    let gp = m.graph.to_proto().unwrap();
    gp.node.iter().map(|n| n.op_type().to_string()).collect()
}

fn init_names(m: &Model) -> Vec<&str> {
    m.graph.initializers.keys().map(|s| s.as_str()).collect()
}

#[test]
fn identity() {
    let (_, after, stats) = run_fixture("identity");
    assert_eq!(ops(&after), ["Relu", "Sigmoid", "Identity"]);
    assert_eq!(stats.details["identity"], 2);
    // Output names survive: Sigmoid now produces `y`; `z` still comes from its Identity.
    let gp = after.graph.to_proto().unwrap();
    assert_eq!(gp.node[1].output, ["y"]);
    assert_eq!(
        (gp.node[2].input[0].as_str(), gp.node[2].output[0].as_str()),
        ("x", "z")
    );
}

#[test]
fn dropout() {
    let (_, after, stats) = run_fixture("dropout");
    assert_eq!(count_op(&after, "Dropout"), 1);
    assert_eq!(stats.details["dropout"], 2);
}

#[test]
fn dropout_in_training_mode_stays() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 4]).output("y", &[1, 4]);
    b.init(onnx_compress::onnx::tensor::raw_tensor(
        "t",
        onnx_compress::onnx::proto::tensor_proto::DataType::Bool,
        &[],
        vec![1],
    ));
    b.f32("r", &[], vec![0.5]);
    b.node("Dropout", &["x", "r", "t"], &["y"], vec![]);
    // Opset 6: is_test = 0 is training mode.
    let mut old = Builder::new(6);
    old.input("x", &[1, 4]).output("y", &[1, 4]);
    old.node("Dropout", &["x"], &["y"], vec![attr_int("is_test", 0)]);
    for m in [b.model(), old.model()] {
        let mut after = m.clone();
        let stats =
            onnx_compress::passes::Pass::run(&Cleanup, &mut after, &Default::default()).unwrap();
        assert_eq!(stats.changes, 0);
        assert_eq!(count_op(&after, "Dropout"), 1);
    }
}

#[test]
fn dead_nodes_and_unused_initializers() {
    let (_, after, stats) = run_fixture("dead_nodes");
    assert_eq!(ops(&after), ["Relu"]);
    assert!(init_names(&after).is_empty());
    assert_eq!(stats.details["dead-node"], 3);
    assert_eq!(stats.details["unused-initializer"], 2);
}

#[test]
fn duplicate_initializers() {
    let (_, after, stats) = run_fixture("duplicate_initializers");
    assert_eq!(init_names(&after), ["w1", "w3"]);
    assert_eq!(stats.details["duplicate-initializer"], 1);
    let gp = after.graph.to_proto().unwrap();
    assert_eq!(gp.node[1].input, ["a", "w1"]);
}

#[test]
fn shape_chain_folds() {
    let (_, after, _) = run_fixture("shape_chain");
    assert_eq!(ops(&after), ["Reshape", "Add"]);
    let gp = after.graph.to_proto().unwrap();
    let shp = &after.graph.initializers[&gp.node[0].input[1]];
    assert_eq!(onnx_compress::onnx::tensor::to_i64(shp).unwrap(), [2, -1]);
    let k = &after.graph.initializers[&gp.node[1].input[0]];
    let k = onnx_compress::onnx::tensor::to_f64(k).unwrap();
    assert_eq!(k.iter().copied().collect::<Vec<_>>(), [4.5, 7.5, 10.5]);
}

#[test]
fn matmul_add_becomes_gemm_only_for_2d_input() {
    let (_, after, _) = run_fixture("matmul_add");
    assert_eq!(ops(&after), ["Gemm", "MatMul", "Add"]);
    let gp = after.graph.to_proto().unwrap();
    assert_eq!(gp.node[0].input, ["x", "w", "b"]);
    assert_eq!(gp.node[0].output, ["y"]);
}

#[test]
fn shape_of_symbolic_input_is_not_folded() {
    let mut b = Builder::new(17);
    b.input("x", &[-1, 4]).output("y", &[-1, 4]);
    b.node("Shape", &["x"], &["s"], vec![]);
    b.node("Reshape", &["x", "s"], &["y"], vec![]);
    let before = b.model();
    let (after, stats) = check_pass(&Cleanup, &before, 0.0);
    assert_eq!(stats.changes, 0);
    assert_eq!(ops(&after), ["Shape", "Reshape"]);
}
