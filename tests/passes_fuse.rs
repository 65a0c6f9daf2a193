//! The `fuse` pass beyond what the fixture harness checks: the wiring and the facts the pass
//! records (folded BN statistics, fused activations) on the `tests/fixtures/fuse` cases, cases
//! built in code (opset variants, training mode, Constant-node parameters), and the testdata
//! models (no foldable BN left, outputs unchanged in tract and onnxruntime, digits predictions
//! identical). Snapshots, idempotence and output equality of the fixtures are in
//! `tests/fixtures.rs`.

mod common;

use common::fixtures::run_fixture;
use common::fuse_builder::*;
use onnx_compress::ir::op::{attr_float, attr_int};
use onnx_compress::ir::Model;
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::passes::fuse::{self, ActivationKind, Fuse};
use onnx_compress::passes::PassStats;

const TOL: f64 = 1e-4;

/// Run `tests/fixtures/fuse/<case>.onnxtxt`: (before, after, stats of the fuse pass).
fn run(case: &str) -> (Model, Model, PassStats) {
    let path = common::fixtures::case_path("fuse", case);
    let run = run_fixture(&path);
    let r = &run.records[0];
    assert_eq!(r.name, "fuse");
    let stats = PassStats {
        changes: r.changes,
        notes: r.notes.clone(),
        details: r.details.clone(),
        table: vec![],
        facts: r.facts.clone(),
    };
    let before = Model::from_proto(run.original.clone()).unwrap();
    (before, run.after, stats)
}

/// The fixture model itself.
fn fixture(case: &str) -> ModelProto {
    let text = std::fs::read_to_string(common::fixtures::case_path("fuse", case)).unwrap();
    onnx_compress::onnx::text::parse_model(&text).unwrap()
}

fn node_named(m: &Model, name: &str) -> petgraph::stable_graph::NodeIndex {
    m.graph
        .node_indices()
        .find(|&ix| m.graph.node(ix).name() == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// x -> Conv -> BN -> y, with the given weight dims, group and bias.
fn conv_bn(cin: i64, cout: usize, group: i64, kernel: &[usize], bias: bool) -> Builder {
    let mut b = Builder::new(17);
    let spatial: Vec<i64> = kernel.iter().map(|_| 6).collect();
    let mut xdims = vec![1, cin];
    xdims.extend(&spatial);
    let mut ydims = vec![1, cout as i64];
    ydims.extend(&spatial);
    let mut wdims = vec![cout, (cin / group) as usize];
    wdims.extend(kernel);
    b.input("x", &xdims).output("y", &ydims);
    b.rand("w", &wdims, -1.0, 1.0);
    let pads: Vec<i64> = kernel
        .iter()
        .flat_map(|&k| [(k / 2) as i64])
        .cycle()
        .take(2 * kernel.len())
        .collect();
    let mut inputs = vec!["x", "w"];
    if bias {
        b.rand("b", &[cout], -1.0, 1.0);
        inputs.push("b");
    }
    b.node(
        "Conv",
        &inputs,
        &["t"],
        vec![attr_int("group", group), ints("pads", &pads)],
    );
    b.bn("bn", cout, "t", "y");
    b
}

fn assert_folded(after: &Model, stats: &PassStats) {
    assert_eq!(count_op(after, "BatchNormalization"), 0);
    assert_eq!(count_op(after, "Mul"), 0, "folded, not Mul+Add");
    assert!(stats.changes >= 1);
}

#[test]
fn conv_bn_folds() {
    let (_, after, stats) = run("conv_bn_rand");
    assert_folded(&after, &stats);
    let folded = stats.folded_bn().cloned().unwrap_or_default();
    let f = &folded["conv_0"];
    assert_eq!(
        (f.bn.as_str(), f.op.as_str(), f.output.as_str()),
        ("batchnormalization_1", "Conv", "y")
    );
    assert_eq!(f.gamma.len(), 4);
    // The recorded gamma is the BN's scale parameter, bit for bit.
    let b = Model::from_proto(fixture("conv_bn_rand")).unwrap();
    let g = onnx_compress::onnx::tensor::to_f64(&b.graph.initializers["bn_g"]).unwrap();
    assert_eq!(f.gamma, g.iter().copied().collect::<Vec<_>>());
}

#[test]
fn conv_without_bias_bn() {
    let (_, after, stats) = run("conv_nobias_bn_rand");
    assert_folded(&after, &stats);
    assert_eq!(
        graph_proto_node(&after, "Conv")[0].input.len(),
        3,
        "a bias was added"
    );
}

#[test]
fn depthwise_conv_bn() {
    let (_, after, stats) = run("depthwise_conv_bn_rand");
    assert_folded(&after, &stats);
}

#[test]
fn grouped_conv_bn() {
    let (_, after, stats) = run("grouped_conv_bn_rand");
    assert_folded(&after, &stats);
}

#[test]
fn conv1d_and_conv3d_bn() {
    let (_, after, stats) = run("conv1d_bn");
    assert_folded(&after, &stats);
    let (_, after, stats) = run("conv3d_bn");
    assert_folded(&after, &stats);
}

#[test]
fn conv_transpose_grouped_bn() {
    // W [Cin=4, Cout/group=3, 2, 2], group 2: Cout = 6.
    let (_, after, stats) = run("convtranspose_bn_rand");
    assert_folded(&after, &stats);
}

fn gemm_bn(trans_b: bool, alpha: f32, beta: f32, c: Option<&[usize]>) -> Builder {
    let mut b = Builder::new(17);
    b.input("x", &[3, 5]).output("y", &[3, 4]);
    let wdims: &[usize] = if trans_b { &[4, 5] } else { &[5, 4] };
    b.rand("w", wdims, -1.0, 1.0);
    let mut inputs = vec!["x", "w"];
    if let Some(cd) = c {
        b.rand("c", cd, -1.0, 1.0);
        inputs.push("c");
    }
    b.node(
        "Gemm",
        &inputs,
        &["t"],
        vec![
            attr_int("transB", trans_b as i64),
            attr_float("alpha", alpha),
            attr_float("beta", beta),
        ],
    );
    b.bn("bn", 4, "t", "y");
    b
}

#[test]
fn gemm_trans_b0_bn() {
    let (_, after, stats) = run("gemm_transb0_bn_rand");
    assert_folded(&after, &stats);
}

#[test]
fn gemm_trans_b1_bn() {
    let (_, after, stats) = run("gemm_transb1_bn_rand");
    assert_folded(&after, &stats);
}

#[test]
fn gemm_alpha_beta_and_2d_bias_fold_exactly() {
    for (i, c) in [
        Some(&[4usize][..]),
        Some(&[3, 1]),
        Some(&[1, 4]),
        Some(&[3, 4]),
        Some(&[]),
    ]
    .into_iter()
    .enumerate()
    {
        let before = gemm_bn(i % 2 == 0, 0.5, 2.0, c).model();
        let (after, stats) = check_pass(&Fuse, &before, TOL);
        assert_folded(&after, &stats);
        let gemm = graph_proto_node(&after, "Gemm")[0];
        let beta = gemm.attribute.iter().find(|a| a.name() == "beta").unwrap();
        assert_eq!(beta.f, Some(1.0), "beta folded into C");
    }
    let (_, after, stats) = run("gemm_alpha_beta_bn");
    assert_folded(&after, &stats);
}

#[test]
fn matmul_2d_bn_becomes_gemm() {
    let (_, after, stats) = run("matmul_bn");
    assert_folded(&after, &stats);
    assert_eq!(count_op(&after, "Gemm"), 1);
    assert_eq!(count_op(&after, "MatMul"), 0);
}

#[test]
fn conv_bn_relu_marks_relu_as_fused() {
    let (_, after, stats) = run("conv_bn_relu_rand");
    assert_folded(&after, &stats);
    let conv = node_named(&after, "conv_0");
    let act = fuse::activation_info(&after.graph, conv).expect("fused");
    assert_eq!(act.kind, ActivationKind::Relu);
    assert_eq!((act.min, act.max), (0.0, f64::INFINITY));
    assert_eq!(after.graph.node(act.node).op_type(), "Relu");
    assert_eq!(stats.details["fused_activations"][0]["activation"], "Relu");
}

#[test]
fn conv_bn_clip6_keeps_exact_bounds() {
    // Opset 13: bounds are inputs.
    let (_, after, stats) = run("conv_bn_clip6_rand");
    assert_folded(&after, &stats);
    let conv = node_named(&after, "conv_0");
    let act = fuse::activation_info(&after.graph, conv).expect("fused");
    assert_eq!(
        (act.kind, act.min, act.max),
        (ActivationKind::Clip, 0.0, 6.0)
    );
    assert_eq!(count_op(&after, "Clip"), 1);
    assert_eq!(count_op(&after, "Relu"), 0);

    // Opset 10: bounds are attributes.
    let mut b = conv_bn(3, 4, 1, &[3, 3], true);
    b.opset = 10;
    b.graph.node[1].output[0] = "u".into();
    b.node(
        "Clip",
        &["u"],
        &["y"],
        vec![attr_float("min", 0.0), attr_float("max", 6.0)],
    );
    let (after, _) = check_pass(&Fuse, &b.model(), TOL);
    let conv = node_named(&after, "conv_0");
    let act = fuse::activation_info(&after.graph, conv).expect("fused");
    assert_eq!((act.min, act.max), (0.0, 6.0));
}

#[test]
fn conv_with_two_readers_gets_mul_add() {
    let (before, after, stats) = run("conv_two_consumers_rand");
    assert_eq!(count_op(&after, "BatchNormalization"), 0);
    assert_eq!((count_op(&after, "Mul"), count_op(&after, "Add")), (1, 1));
    assert_eq!(count_op(&after, "Conv"), 1);
    // The Conv weights are untouched.
    assert_eq!(
        after.graph.initializers["w"],
        before.graph.initializers["w"]
    );
    assert!(
        stats.notes.iter().any(|n| n.contains("Mul+Add")),
        "{:?}",
        stats.notes
    );
    assert!(stats.folded_bn().cloned().unwrap_or_default().is_empty());
    // The producer now has two readers: no activation fusion for it.
    assert!(fuse::fused_activation(&after.graph, node_named(&after, "conv_0")).is_none());
}

#[test]
fn bn_with_non_constant_params_is_kept() {
    let mut b = conv_bn(3, 4, 1, &[3, 3], true);
    // The mean is an initializer overridable as a graph input: not a constant.
    b.graph.input.push(vi(
        "bn_m",
        onnx_compress::onnx::proto::tensor_proto::DataType::Float,
        &[4],
    ));
    let before = b.model();
    let (after, stats) = check_pass(&Fuse, &before, TOL);
    assert_eq!(stats.changes, 0);
    assert_eq!(after.to_proto().unwrap(), before.to_proto().unwrap());
    assert!(
        stats
            .notes
            .iter()
            .any(|n| n.contains("input_mean 'bn_m' is not a constant")),
        "{:?}",
        stats.notes
    );
}

#[test]
fn bn_in_training_mode_is_kept() {
    let mut b = conv_bn(3, 4, 1, &[3, 3], true);
    b.graph.node[1].attribute.push(attr_int("training_mode", 1));
    b.graph.node[1]
        .output
        .extend(["rm".to_string(), "rv".to_string()]);
    b.output("rm", &[4]);
    let before = b.model();
    let mut after = before.clone();
    let stats = onnx_compress::passes::Pass::run(&Fuse, &mut after, &Default::default()).unwrap();
    assert_eq!(stats.changes, 0);
    assert_eq!(count_op(&after, "BatchNormalization"), 1);
}

#[test]
fn bn_as_first_node_gets_mul_add() {
    let (_, after, stats) = run("bn_first_rand");
    assert_eq!(count_op(&after, "BatchNormalization"), 0);
    assert_eq!((count_op(&after, "Mul"), count_op(&after, "Add")), (1, 1));
    let scale = &graph_proto_node(&after, "Mul")[0].input[1];
    assert_eq!(after.graph.initializers[scale].dims, vec![3, 1, 1]);
    assert_eq!(stats.changes, 1);
}

#[test]
fn shared_weight_is_not_modified() {
    // Two convs share one weight; each is followed by its own BN.
    let (before, after, stats) = run("shared_weight");
    assert_folded(&after, &stats);
    let convs = graph_proto_node(&after, "Conv");
    assert_ne!(
        convs[0].input[1], convs[1].input[1],
        "each conv has its own folded weight"
    );
    // The first fold wrote a new weight (w was shared); the second found w private to it.
    assert_eq!(convs[0].input[1], "w_bnfold");
    assert_ne!(
        after.graph.initializers["w"],
        before.graph.initializers["w"]
    );
    let folded = stats.folded_bn().cloned().unwrap_or_default();
    assert_eq!(folded.len(), 2);
}

#[test]
fn bn_graph_output_name_is_kept() {
    // The BN output is the graph output; the fold must still produce `y`.
    let (after, _) = check_pass(&Fuse, &conv_bn(3, 4, 1, &[1, 1], true).model(), TOL);
    assert_eq!(
        graph_proto_node(&after, "Conv")[0].output,
        vec!["y".to_string()]
    );
}

/// `testdata/*.onnx` through fuse + cleanup: no BatchNormalization left after a Conv/Gemm,
/// outputs equal in tract (SQNR >= 80 dB, i.e. relative RMS error <= 1e-4). Prints node
/// counts and errors (run with --nocapture).
#[test]
fn testdata_models_fuse_and_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut seen = 0;
    for name in [
        "conv_bn_relu",
        "residual",
        "mobilenet_like",
        "mlp",
        "digits_cnn",
        "if_model",
        "external_data",
    ] {
        let path = dir.join(format!("{name}.onnx"));
        let before = onnx_compress::ir::Model::load(&path).expect("loads");
        let mut after = before.clone();
        let records = onnx_compress::passes::run_passes(
            &mut after,
            &["fuse", "cleanup"],
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for ix in after.graph.node_indices() {
            let n = after.graph.node(ix);
            if n.op_type() == "BatchNormalization" {
                let p = after
                    .graph
                    .producer_node(&n.input[0])
                    .map(|p| after.graph.node(p).op_type());
                assert!(
                    !matches!(p, Some("Conv" | "ConvTranspose" | "Gemm")),
                    "{name}: BN '{}' left after {p:?}",
                    n.name()
                );
            }
        }
        let report = onnx_compress::validate::validate(
            &before.to_proto().unwrap(),
            &after.to_proto().unwrap(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            report.status,
            onnx_compress::validate::Status::Checked,
            "{name}: {:?}",
            report.reason
        );
        let sqnr = report
            .outputs
            .iter()
            .map(|o| o.sqnr_db)
            .fold(f64::INFINITY, f64::min);
        let max_abs = report
            .outputs
            .iter()
            .map(|o| o.max_abs_err)
            .fold(0.0, f64::max);
        let ort = ort_max_rel_error(&before, &after);
        eprintln!(
            "{name}: nodes {} -> {} (fuse {} changes, cleanup {}), BN {} -> {}, tract SQNR {sqnr:.1} dB max abs err {max_abs:.2e}, onnxruntime max rel err {ort:?}",
            before.graph.node_count(),
            after.graph.node_count(),
            records[0].changes,
            records[1].changes,
            count_op(&before, "BatchNormalization"),
            count_op(&after, "BatchNormalization"),
        );
        assert!(sqnr >= 80.0, "{name}: SQNR {sqnr} dB");
        if let Some(e) = ort {
            assert!(e <= TOL, "{name}: onnxruntime max rel err {e}");
        }
        seen += 1;
    }
    assert_eq!(seen, 7);
}

/// The trained digits classifier keeps exactly the same prediction on every test sample.
#[test]
fn digits_cnn_predictions_unchanged() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let before = onnx_compress::ir::Model::load(&dir.join("digits_cnn.onnx")).unwrap();
    let mut after = before.clone();
    onnx_compress::passes::run_passes(&mut after, &["fuse", "cleanup"], &Default::default())
        .unwrap();
    assert_eq!(count_op(&after, "BatchNormalization"), 0);
    let x: ndarray::ArrayD<f32> =
        ndarray_npy::read_npy(dir.join("digits_test_x.npy")).expect("digits_test_x.npy");
    let inputs = vec![("input".to_string(), x)];
    let argmax = |m: &Model| -> Vec<usize> {
        let out = onnx_compress::runtime::run_model(&m.to_proto().unwrap(), &inputs, &[]).unwrap();
        let logits = out[0]
            .1
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        logits
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0
            })
            .collect()
    };
    let (pa, pb) = (argmax(&before), argmax(&after));
    assert_eq!(pa.len(), 360);
    let differ = pa.iter().zip(&pb).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of 360 predictions changed");
}

#[test]
fn bn_params_from_constant_nodes_fold() {
    // Exporters without constant folding emit BN statistics as Constant nodes.
    let mut b = conv_bn(3, 4, 1, &[3, 3], true);
    let inits = std::mem::take(&mut b.graph.initializer);
    for t in inits {
        if t.name().starts_with("bn_") {
            let name = t.name().to_string();
            let mut attr = onnx_compress::ir::op::attr_int("value", 0);
            attr.i = None;
            attr.r#type =
                Some(onnx_compress::onnx::proto::attribute_proto::AttributeType::Tensor as i32);
            attr.t = Some(t);
            b.graph.node.insert(
                0,
                onnx_compress::ir::op::node("Constant", &format!("c_{name}"), &[], &[&name]),
            );
            b.graph.node[0].attribute.push(attr);
        } else {
            b.graph.initializer.push(t);
        }
    }
    let (after, stats) = check_pass(&Fuse, &b.model(), TOL);
    assert_folded(&after, &stats);
    assert_eq!(count_op(&after, "Constant"), 0);
}

/// The hand-written fixtures (1x1 convs, values small enough to read in the snapshot): the
/// wiring each header's intent states.
mod handwritten {
    use super::common::fixtures::{case_path, run_fixture};
    use onnx_compress::onnx::proto::{ModelProto, NodeProto};

    fn run(case: &str) -> (ModelProto, ModelProto) {
        let run = run_fixture(&case_path("fuse", case));
        let after = run.after_proto();
        (run.original, after)
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
}
