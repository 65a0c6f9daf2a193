//! The fixture harness shared by the pass tests.
//!
//! A fixture is a model in ONNX text syntax (`tests/fixtures/<pass>/<case>.onnxtxt`) whose
//! leading `#` lines say what to run and what must hold:
//!
//! ```text
//! # passes: fuse,cleanup
//! # intent: BN folds into the conv, the ReLU stays
//! # expect: no BatchNormalization
//! # expect: count Conv 1
//! # tolerance: 1e-4
//! <ir_version: 8, opset_import: ["" : 17]>
//! g (float[1,3,8,8] x) => (float[1,4,8,8] y) { ... }
//! ```
//!
//! [`check_fixture`] runs the passes and asserts: the graph is consistent, every `expect`
//! holds, a second run changes nothing (idempotence), and tract gives the same outputs as the
//! original within the tolerance (max abs error; fixture outputs are O(1)). It
//! returns the snapshot text: header, the model before, and the model after.
#![allow(dead_code)]

use onnx_compress::ir::Model;
use onnx_compress::onnx::text::{parse_model, print_model, PrintOptions};
use onnx_compress::passes::{run_passes, select, PassContext};
use onnx_compress::validate::{validate, Status, ValidateOptions};
use std::path::Path;

pub struct Fixture {
    pub passes: String,
    pub expects: Vec<String>,
    pub tolerance: f64,
    pub header: String,
    pub text: String,
}

pub fn read_fixture(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut fx = Fixture {
        passes: String::new(),
        expects: Vec::new(),
        tolerance: 1e-4,
        header: String::new(),
        text: text.clone(),
    };
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        fx.header.push_str(line);
        fx.header.push('\n');
        let body = line.trim_start_matches('#').trim();
        if let Some(v) = body.strip_prefix("passes:") {
            fx.passes = v.trim().to_string();
        } else if let Some(v) = body.strip_prefix("expect:") {
            fx.expects.push(v.trim().to_string());
        } else if let Some(v) = body.strip_prefix("tolerance:") {
            fx.tolerance = v.trim().parse().expect("tolerance is a number");
        }
    }
    fx
}

fn op_count(model: &Model, op: &str) -> usize {
    model
        .graph
        .node_indices()
        .filter(|&ix| model.graph.node(ix).op_type() == op)
        .count()
}

fn check_expect(model: &Model, expect: &str, name: &str) {
    let words: Vec<&str> = expect.split_whitespace().collect();
    match words.as_slice() {
        ["no", op] => assert_eq!(op_count(model, op), 0, "{name}: expected no {op}"),
        ["count", op, n] => assert_eq!(
            op_count(model, op),
            n.parse::<usize>().unwrap(),
            "{name}: expected {n} {op}"
        ),
        ["some", op] => assert!(op_count(model, op) > 0, "{name}: expected some {op}"),
        _ => panic!("{name}: unknown expectation '{expect}'"),
    }
}

/// Run the fixture's passes with `ctx`; assert everything the header promises; return the
/// snapshot text (header, before, after).
pub fn check_fixture(path: &Path, ctx: &PassContext) -> String {
    let name = path.display().to_string();
    let fx = read_fixture(path);
    let original = parse_model(&fx.text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mut model = Model::from_proto(original.clone()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let names = select(&fx.passes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    run_passes(&mut model, &names, ctx).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    model
        .graph
        .check()
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    for e in &fx.expects {
        check_expect(&model, e, &name);
    }
    let once = model.to_proto().unwrap();
    let mut again = model.clone();
    let records = run_passes(&mut again, &names, ctx).unwrap();
    assert!(
        again.to_proto().unwrap() == once,
        "{name}: not idempotent: {:?}",
        records
            .iter()
            .map(|r| (&r.name, r.changes))
            .collect::<Vec<_>>()
    );
    let report = validate(&original, &once, &ValidateOptions::default()).unwrap();
    assert_eq!(
        report.status,
        Status::Checked,
        "{name}: {:?}",
        report.reason
    );
    for o in &report.outputs {
        // Fixture outputs are O(1) (small weights, standard-normal inputs): an absolute bound.
        assert!(
            o.max_abs_err <= fx.tolerance,
            "{name}: output '{}' max abs error {} above tolerance {}",
            o.name,
            o.max_abs_err,
            fx.tolerance
        );
    }
    let opts = PrintOptions::default();
    format!(
        "{}\n=== before\n{}\n=== after\n{}",
        fx.header,
        print_model(&original, &opts),
        print_model(&once, &opts)
    )
}
