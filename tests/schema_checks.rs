//! Load-time schema checks (`ir::check`): each kind of invalid model is refused by
//! `Model::from_proto` with one line naming the node (or domain, or value) and the problem;
//! valid models, custom domains and every testdata model still load; the binary refuses with
//! exit code 1, one line and no output file.

mod common;
use common::python::require_python;
use common::*;
use onnx_compress::ir::{op, Model};
use onnx_compress::onnx::proto::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto,
};

/// The error loading `m`, which must be refused with a one-line message.
fn refusal(m: ModelProto) -> String {
    let err = match Model::from_proto(m) {
        Ok(_) => panic!("the model was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(!err.contains('\n'), "error is not one line: {err}");
    err
}

fn assert_refused(m: ModelProto, needles: &[&str]) {
    let err = refusal(m);
    for n in needles {
        assert!(err.contains(n), "error lacks '{n}': {err}");
    }
}

fn nodes(m: &mut ModelProto) -> &mut Vec<NodeProto> {
    &mut m.graph.as_mut().unwrap().node
}

/// The Conv node of [`conv_relu`].
fn conv(m: &mut ModelProto) -> &mut NodeProto {
    &mut nodes(m)[0]
}

fn set_opset(m: &mut ModelProto, domain: &str, version: i64) {
    m.opset_import.retain(|o| o.domain() != domain);
    m.opset_import.push(OperatorSetIdProto {
        domain: Some(domain.into()),
        version: Some(version),
    });
}

/// x[1,4] -> OP -> y[1,4], at opset 17.
fn single(op_type: &str) -> ModelProto {
    model(
        vec![node(op_type, "n", &["x"], &["y"])],
        vec![value_info("x", &[1, 4])],
        vec![value_info("y", &[1, 4])],
        vec![],
    )
}

#[test]
fn valid_models_load() {
    Model::from_proto(conv_relu()).unwrap();
    let mut cast = single("Cast");
    cast.graph.as_mut().unwrap().node[0]
        .attribute
        .push(op::attr_int("to", 1));
    Model::from_proto(cast).unwrap();
}

#[test]
fn every_testdata_model_loads() {
    let models = testdata_models();
    assert!(models.len() >= 9, "testdata models missing: {models:?}");
    for path in models {
        if let Err(e) = Model::load(&path) {
            panic!("{}: {e:#}", path.display());
        }
    }
}

#[test]
fn unknown_attribute() {
    let mut m = conv_relu();
    nodes(&mut m)[1].attribute.push(op::attr_int("group", 2));
    assert_refused(
        m,
        &["node 'relu' (Relu)", "unknown attribute 'group'", "Relu-14"],
    );
}

#[test]
fn quantize_linear_with_conv_attributes() {
    let mut q = node("QuantizeLinear", "q", &["x", "s", "z"], &["y"]);
    q.attribute.push(op::attr_ints("kernel_shape", &[3, 3]));
    let m = model(
        vec![q],
        vec![value_info("x", &[1, 4])],
        vec![value_info("y", &[1, 4])],
        vec![f32_tensor("s", &[], 1), f32_tensor("z", &[], 2)],
    );
    assert_refused(
        m,
        &[
            "node 'q' (QuantizeLinear)",
            "unknown attribute 'kernel_shape'",
        ],
    );
}

#[test]
fn wrong_attribute_type() {
    let mut m = conv_relu();
    conv(&mut m).attribute.push(op::attr_float("group", 1.0));
    assert_refused(
        m,
        &[
            "node 'conv' (Conv)",
            "attribute 'group' is FLOAT",
            "expects INT",
        ],
    );
}

#[test]
fn attribute_without_type_or_value() {
    let mut m = conv_relu();
    conv(&mut m).attribute.push(AttributeProto {
        name: Some("group".into()),
        ..Default::default()
    });
    assert_refused(m, &["node 'conv' (Conv)", "attribute 'group' has no value"]);
}

#[test]
fn attribute_with_unset_type_is_read_from_its_value() {
    let mut m = conv_relu();
    conv(&mut m).attribute.push(AttributeProto {
        name: Some("group".into()),
        i: Some(1),
        ..Default::default()
    });
    Model::from_proto(m).unwrap();
}

#[test]
fn duplicated_attribute() {
    let mut m = conv_relu();
    conv(&mut m)
        .attribute
        .push(op::attr_ints("pads", &[0, 0, 0, 0]));
    assert_refused(m, &["node 'conv' (Conv)", "attribute 'pads' appears twice"]);
}

#[test]
fn missing_required_attribute() {
    assert_refused(
        single("Cast"),
        &["node 'n' (Cast)", "required attribute 'to' is missing"],
    );
}

#[test]
fn input_and_output_counts() {
    let mut m = single("Relu");
    nodes(&mut m)[0].input.push("x".into());
    assert_refused(m, &["node 'n' (Relu) has 2 input(s); Relu takes 1"]);
    let mut m = single("Relu");
    nodes(&mut m)[0].output.push("y2".into());
    assert_refused(m, &["node 'n' (Relu) has 2 output(s); Relu produces 1"]);
    let mut m = conv_relu();
    conv(&mut m).input.truncate(1);
    assert_refused(m, &["node 'conv' (Conv) has 1 input(s); Conv takes 2 to 3"]);
}

#[test]
fn required_input_left_empty() {
    let mut m = conv_relu();
    conv(&mut m).input[1] = String::new();
    assert_refused(
        m,
        &[
            "node 'conv' (Conv)",
            "input 1 is required but its name is empty",
        ],
    );
}

#[test]
fn unnamed_node_is_named_by_its_first_output() {
    let mut m = conv_relu();
    nodes(&mut m)[1].name = None;
    nodes(&mut m)[1].attribute.push(op::attr_int("alpha", 1));
    assert_refused(m, &["node 'y' (Relu)", "unknown attribute 'alpha'"]);
}

#[test]
fn window_values_out_of_range() {
    for (attr, needle) in [
        (
            op::attr_int("group", 0),
            "attribute 'group' is 0, must be >= 1",
        ),
        (op::attr_int("group", -2), "attribute 'group' is -2"),
        (
            op::attr_ints("kernel_shape", &[3, -3]),
            "attribute 'kernel_shape' holds -3",
        ),
        (
            op::attr_ints("strides", &[1, 0]),
            "attribute 'strides' holds 0",
        ),
        (
            op::attr_ints("dilations", &[-1, 1]),
            "attribute 'dilations' holds -1",
        ),
        (
            op::attr_ints("strides", &[1, 1, 1]),
            "attribute 'strides' has 3 values, input 0 has 2 spatial dims",
        ),
    ] {
        let mut m = conv_relu();
        conv(&mut m).attribute.push(attr);
        assert_refused(m, &["node 'conv' (Conv)", needle]);
    }
    let mut m = conv_relu();
    conv(&mut m).attribute[0] = op::attr_ints("pads", &[1, -1, 1, 1]);
    assert_refused(m, &["node 'conv' (Conv)", "attribute 'pads' holds -1"]);
    let mut m = conv_relu();
    conv(&mut m).attribute.push(AttributeProto {
        name: Some("auto_pad".into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(b"SAME".to_vec().into()),
        ..Default::default()
    });
    assert_refused(m, &["node 'conv' (Conv)", "attribute 'auto_pad' is 'SAME'"]);
}

#[test]
fn axis_out_of_range_where_the_rank_is_known() {
    let mut m = single("Softmax");
    nodes(&mut m)[0].attribute.push(op::attr_int("axis", 2));
    assert_refused(
        m,
        &[
            "node 'n' (Softmax)",
            "attribute 'axis' is 2, out of range [-2, 1] for input 0 of rank 2",
        ],
    );
    let mut m = single("Softmax");
    nodes(&mut m)[0].attribute.push(op::attr_int("axis", -2));
    Model::from_proto(m).unwrap();
    // Flatten may split after the last dim.
    let mut m = single("Flatten");
    nodes(&mut m)[0].attribute.push(op::attr_int("axis", 2));
    m.graph.as_mut().unwrap().output[0] = value_info("y", &[8, 1]);
    Model::from_proto(m).unwrap();
    let mut m = single("Flatten");
    nodes(&mut m)[0].attribute.push(op::attr_int("axis", 3));
    assert_refused(m, &["node 'n' (Flatten)", "out of range [-2, 2]"]);
    // Unknown rank: nothing to check against.
    let mut m = single("Softmax");
    m.graph.as_mut().unwrap().input[0].r#type = None;
    nodes(&mut m)[0].attribute.push(op::attr_int("axis", 7));
    Model::from_proto(m).unwrap();
}

#[test]
fn axis_out_of_range_where_only_inference_knows_the_rank() {
    // x[1,4] -> Relu -> t (nothing declares t) -> Flatten: t's rank comes from the walk
    // (fuzz_external seed 31, resnet18 case 38: Flatten axis 5 after GlobalAveragePool).
    let flatten = |axis: i64| {
        let mut f = node("Flatten", "f", &["t"], &["y"]);
        f.attribute.push(op::attr_int("axis", axis));
        model(
            vec![node("Relu", "r", &["x"], &["t"]), f],
            vec![value_info("x", &[1, 4])],
            vec![value_info("y", &[4, 1])],
            vec![],
        )
    };
    assert_refused(
        flatten(5),
        &[
            "node 'f' (Flatten)",
            "attribute 'axis' is 5, out of range [-2, 2] for input 0 of rank 2",
        ],
    );
    let mut valid = flatten(2);
    valid.graph.as_mut().unwrap().output[0] = value_info("y", &[4, 1]);
    Model::from_proto(valid).unwrap();
}

#[test]
fn broadcasting_operands_must_agree_where_both_dims_are_known() {
    // x[1,4] * c: ONNX shape inference rejects c[3] ("Incompatible dimensions"); fuzz_external
    // seed 30 rewired a Mul's input to a tensor of other channels (mobilenet_v3_small case 7).
    let mul = |dims: &[usize]| {
        model(
            vec![node("Mul", "m", &["x", "c"], &["y"])],
            vec![value_info("x", &[1, 4])],
            vec![value_info("y", &[1, 4])],
            vec![f32_tensor("c", dims, 1)],
        )
    };
    assert_refused(
        mul(&[3]),
        &[
            "node 'm' (Mul)",
            "its operands do not broadcast: 4 vs 3 on axis -1",
            "[1, 4] and [3]",
        ],
    );
    for ok in [&[4][..], &[1], &[2, 1, 1], &[]] {
        let mut m = mul(ok);
        if ok.len() == 3 {
            m.graph.as_mut().unwrap().output[0] = value_info("y", &[2, 1, 4]);
        }
        Model::from_proto(m).unwrap_or_else(|e| panic!("c{ok:?} broadcasts: {e:#}"));
    }
}

#[test]
fn gemm_takes_matrices_and_flags_of_0_or_1() {
    // x[1,4] -> Gemm(x, W, transB) -> y[1,3]; fuzz_external seeds 34 and 37 (mobilenet_v3_small
    // case 21: a weight reshaped to rank 3; resnet18 case 9: transB = 2^62, which
    // onnx.checker reads as 0 and runtimes as "transposed").
    let gemm = |w_dims: &[usize], trans_b: i64| {
        let mut g = node("Gemm", "g", &["x", "w"], &["y"]);
        g.attribute.push(op::attr_int("transB", trans_b));
        model(
            vec![g],
            vec![value_info("x", &[1, 4])],
            vec![value_info("y", &[1, 3])],
            vec![f32_tensor("w", w_dims, 2)],
        )
    };
    Model::from_proto(gemm(&[3, 4], 1)).unwrap();
    assert_refused(
        gemm(&[3, 4, 1], 1),
        &[
            "node 'g' (Gemm)",
            "input B has rank 3; Gemm multiplies matrices (rank 2)",
        ],
    );
    assert_refused(
        gemm(&[3, 4], 1 << 62),
        &[
            "node 'g' (Gemm)",
            "attribute 'transB' is 4611686018427387904, must be 0 or 1",
        ],
    );
}

#[test]
fn recurrent_ops_take_a_rank_3_input() {
    // fuzz_external seed 36, silero_vad case 29: a value_info inside a branch declared one
    // more dim, and the declaration flowed into the LSTM's X.
    let lstm = |x_dims: &[i64]| {
        let mut l = node("LSTM", "l", &["x", "w", "r"], &["y"]);
        l.attribute.push(op::attr_int("hidden_size", 2));
        model(
            vec![l],
            vec![value_info("x", x_dims)],
            vec![value_info("y", &[5, 1, 1, 2])],
            vec![
                f32_tensor("w", &[1, 8, 4], 3),
                f32_tensor("r", &[1, 8, 2], 4),
            ],
        )
    };
    Model::from_proto(lstm(&[5, 1, 4])).unwrap();
    assert_refused(
        lstm(&[5, 1, 4, 1]),
        &[
            "node 'l' (LSTM)",
            "input X has rank 4; LSTM takes [sequence, batch, features] (rank 3)",
        ],
    );
}

#[test]
fn concat_joins_one_rank_and_conv_needs_a_spatial_dim() {
    // fuzz_external seed 42 (silero_vad_op18_ifless case 29: a Concat input rewired to a
    // rank-2 value) and seeds 40 / 45 (a rank-1 bias or constant rewired into a Conv).
    let concat = |b_dims: &[usize]| {
        let mut c = node("Concat", "c", &["x", "b"], &["y"]);
        c.attribute.push(op::attr_int("axis", 0));
        model(
            vec![c],
            vec![value_info("x", &[1, 4])],
            vec![value_info("y", &[2, 4])],
            vec![f32_tensor("b", b_dims, 5)],
        )
    };
    Model::from_proto(concat(&[1, 4])).unwrap();
    assert_refused(
        concat(&[4]),
        &["node 'c' (Concat)", "its inputs have ranks 2 and 1"],
    );
    let mut m = conv_relu();
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[3]);
    assert_refused(m, &["(Conv)", "input 0 has rank 1; Conv needs at least 3"]);
}

#[test]
fn global_pools_keep_n_and_c_and_set_spatial_dims_to_1() {
    // fuzz_external seed 39 (mobilenet_v3_small case 38): a GlobalAveragePool fed a weight
    // [64, 240, 1, 1] feeds a Conv expecting 288 channels, seen once the pool's dims are known.
    let pooled_conv = |channels: usize| {
        model(
            vec![
                node("GlobalAveragePool", "p", &["x"], &["t"]),
                node("Conv", "c", &["t", "w"], &["y"]),
            ],
            vec![value_info("x", &[1, 4, 5, 5])],
            vec![value_info("y", &[1, 2, 1, 1])],
            vec![f32_tensor("w", &[2, channels, 1, 1], 6)],
        )
    };
    Model::from_proto(pooled_conv(4)).unwrap();
    assert_refused(
        pooled_conv(6),
        &[
            "node 'c' (Conv)",
            "input channels (weight's times group): 4 vs 6",
        ],
    );
}

#[test]
fn conv_weight_rank_and_kernel_shape_follow_the_input_and_the_weight() {
    // fuzz_external seed 50 (mobilenet_v3_small case 14: a Conv's weight rewired to a bias)
    // and seed 52 (case 32: kernel_shape [1, 99] on a 1x1 weight).
    let mut m = conv_relu();
    m.graph.as_mut().unwrap().initializer[0] = f32_tensor("w", &[4], 7);
    let err = refusal(m);
    assert!(
        err.contains("the weight has rank 1, input 0 has rank 4"),
        "{err}"
    );
    let mut m = conv_relu();
    conv(&mut m)
        .attribute
        .retain(|a| a.name() != "kernel_shape");
    conv(&mut m)
        .attribute
        .push(op::attr_ints("kernel_shape", &[1, 99]));
    let err = refusal(m);
    assert!(
        err.contains("attribute 'kernel_shape' [1, 99] disagrees with the weight"),
        "{err}"
    );
}

#[test]
fn squeeze_removes_only_dims_of_1_and_one_value_has_one_declared_type() {
    // fuzz_external seed 50 (silero_vad_half case 27: a weight of 3 output channels feeding a
    // Squeeze of that axis) and seed 49 (silero_vad_op18_ifless case 30: a graph output renamed
    // to a bool value that value_info declares bool, the output float).
    let squeeze = |dims: &[i64]| {
        let mut q = node("Squeeze", "q", &["x", "axes"], &["y"]);
        q.attribute.clear();
        let axes = onnx_compress::onnx::tensor::from_i64("axes", &[1], &[1]);
        model(
            vec![q],
            vec![value_info("x", dims)],
            vec![value_info("y", &[2, 4])],
            vec![axes],
        )
    };
    Model::from_proto(squeeze(&[2, 1, 4])).unwrap();
    assert_refused(
        squeeze(&[2, 3, 4]),
        &[
            "node 'q' (Squeeze)",
            "axis 1 to squeeze has dim 3, must be 1",
        ],
    );
    let mut m = single("Relu");
    m.graph
        .as_mut()
        .unwrap()
        .value_info
        .push(typed(value_info("y", &[1, 4]), 9));
    assert_refused(
        m,
        &["'y' is declared float by its graph output and bool by its value_info"],
    );
}

#[test]
fn resize_needs_scales_or_sizes() {
    // fuzz_external seed 31, mobilenet_v3_small case 32: a GlobalAveragePool turned Resize(x).
    let resize = |inputs: &[&str], inits: Vec<onnx_compress::onnx::proto::TensorProto>| {
        model(
            vec![node("Resize", "rs", inputs, &["y"])],
            vec![value_info("x", &[1, 4])],
            vec![value_info("y", &[1, 4])],
            inits,
        )
    };
    assert_refused(
        resize(&["x"], vec![]),
        &[
            "node 'rs' (Resize)",
            "neither input 2 (scales) nor input 3 (sizes) is given",
        ],
    );
    let scales = onnx_compress::onnx::tensor::from_f32(
        "s",
        &ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2]), vec![1.0f32, 1.0]).unwrap(),
    );
    Model::from_proto(resize(&["x", "", "s"], vec![scales])).unwrap();
}

#[test]
fn transpose_perm_must_be_a_permutation_of_the_rank() {
    let mut m = single("Transpose");
    nodes(&mut m)[0]
        .attribute
        .push(op::attr_ints("perm", &[1, 1]));
    assert_refused(m, &["node 'n' (Transpose)", "not a permutation of 0..2"]);
    let mut m = single("Transpose");
    nodes(&mut m)[0]
        .attribute
        .push(op::attr_ints("perm", &[2, 0, 1]));
    assert_refused(
        m,
        &["node 'n' (Transpose)", "has 3 values, input 0 has rank 2"],
    );
}

#[test]
fn cast_to_an_unknown_type() {
    let mut m = single("Cast");
    nodes(&mut m)[0].attribute.push(op::attr_int("to", 99));
    assert_refused(m, &["node 'n' (Cast)", "attribute 'to' is 99"]);
}

#[test]
fn op_missing_from_the_opset() {
    assert_refused(
        single("Frobnicate"),
        &[
            "node 'n' (Frobnicate)",
            "op Frobnicate does not exist in opset 17",
        ],
    );
    assert_refused(
        single("Gelu"),
        &["op Gelu does not exist in opset 17", "arrives in opset 20"],
    );
    let mut m = single("Upsample");
    set_opset(&mut m, "", 11);
    nodes(&mut m)[0].input.push("scales".into());
    m.graph
        .as_mut()
        .unwrap()
        .initializer
        .push(f32_tensor("scales", &[2], 1));
    assert_refused(
        m,
        &[
            "op Upsample does not exist in opset 11",
            "deprecated since opset 10",
        ],
    );
    let mut m = single("Frobnicate");
    nodes(&mut m)[0].domain = Some("ai.onnx.ml".into());
    set_opset(&mut m, "ai.onnx.ml", 3);
    assert_refused(
        m,
        &["op Frobnicate does not exist in opset 3 of domain 'ai.onnx.ml'"],
    );
}

#[test]
fn custom_domains_pass_untouched() {
    let mut m = single("Frobnicate");
    let n = &mut nodes(&mut m)[0];
    n.domain = Some("com.example".into());
    n.attribute.push(op::attr_float("group", -1.0));
    n.input.push("x".into());
    set_opset(&mut m, "com.example", 1);
    Model::from_proto(m).unwrap();
}

#[test]
fn standard_domain_used_without_an_import() {
    let mut m = single("Relu");
    m.opset_import.clear();
    assert_refused(
        m,
        &[
            "node 'n' (Relu)",
            "domain '' (ai.onnx) is used but the model imports no opset",
        ],
    );
}

#[test]
fn opset_versions_outside_the_supported_range() {
    for version in [0, 99, 1 << 40] {
        let mut m = conv_relu();
        set_opset(&mut m, "", version);
        assert_refused(
            m,
            &[
                &format!("opset {version} of domain '' (ai.onnx) is not supported"),
                "opsets 1 to 28",
            ],
        );
    }
    let mut m = conv_relu();
    set_opset(&mut m, "ai.onnx.ml", 99);
    assert_refused(m, &["opset 99 of domain 'ai.onnx.ml'", "opsets 1 to 5"]);
    let mut m = conv_relu();
    set_opset(&mut m, "ai.onnx", 18);
    assert_refused(m, &["imported twice, at opsets 17 and 18"]);
}

#[test]
fn ir_version_outside_the_supported_range() {
    for version in [0, 99, 1 << 40] {
        let mut m = conv_relu();
        m.ir_version = Some(version);
        assert_refused(
            m,
            &[&format!("ir_version {version} is not supported"), "1 to 14"],
        );
    }
}

#[test]
fn graph_without_outputs() {
    let mut m = conv_relu();
    m.graph.as_mut().unwrap().output.clear();
    assert_refused(m, &["graph has no outputs: nothing to compute"]);
}

#[test]
fn duplicated_producers_name_both() {
    let mut m = conv_relu();
    nodes(&mut m)[1].output[0] = "c".into();
    assert_refused(
        m,
        &["value 'c' is produced twice, by node 'conv' (Conv) and by node 'relu' (Relu)"],
    );
    let mut m = conv_relu();
    nodes(&mut m)[1].output[0] = "w".into();
    assert_refused(
        m,
        &["value 'w' is produced twice, by initializer 'w' and by node 'relu' (Relu)"],
    );
    let mut m = conv_relu();
    nodes(&mut m)[1].output[0] = "x".into();
    assert_refused(
        m,
        &["value 'x' is produced twice, by graph input 'x' and by node 'relu' (Relu)"],
    );
    let mut m = conv_relu();
    let input = m.graph.as_ref().unwrap().input[0].clone();
    m.graph.as_mut().unwrap().input.push(input);
    assert_refused(m, &["graph input 'x' is declared twice"]);
}

/// x -> If(cond) { then: Relu with a bad attribute; else: Identity } -> y
fn if_model(then_node: NodeProto) -> ModelProto {
    let branch = |n: NodeProto| GraphProto {
        name: Some("branch".into()),
        node: vec![n],
        output: vec![value_info("b", &[1, 4])],
        ..Default::default()
    };
    let mut cond = f32_tensor("cond", &[], 1);
    cond.data_type = Some(9);
    cond.raw_data = Some(vec![1u8].into());
    let mut iff = node("If", "if", &["cond"], &["y"]);
    for (name, g) in [
        ("then_branch", branch(then_node)),
        ("else_branch", branch(node("Identity", "e", &["x"], &["b"]))),
    ] {
        iff.attribute.push(AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Graph as i32),
            g: Some(g),
            ..Default::default()
        });
    }
    model(
        vec![iff],
        vec![value_info("x", &[1, 4])],
        vec![value_info("y", &[1, 4])],
        vec![cond],
    )
}

#[test]
fn subgraph_nodes_are_checked() {
    Model::from_proto(if_model(node("Relu", "t", &["x"], &["b"]))).unwrap();
    let mut bad = node("Relu", "t", &["x"], &["b"]);
    bad.attribute.push(op::attr_int("group", 1));
    assert_refused(
        if_model(bad),
        &[
            "in attribute 'then_branch' of node 'if' (If)",
            "node 't' (Relu): unknown attribute 'group'",
        ],
    );
    // Softmax axis against the rank of x, declared in the enclosing graph.
    let mut bad = node("Softmax", "t", &["x"], &["b"]);
    bad.attribute.push(op::attr_int("axis", 5));
    assert_refused(if_model(bad), &["node 't' (Softmax)", "rank 2"]);
}

/// The binary exits 1 with one line naming the file and the problem, and writes nothing.
#[test]
fn cli_refuses_with_one_line_and_no_output() {
    let mut group0 = conv_relu();
    conv(&mut group0).attribute.push(op::attr_int("group", 0));
    let mut opset99 = conv_relu();
    set_opset(&mut opset99, "", 99);
    for (name, m, needle) in [
        (
            "group0.onnx",
            group0,
            "node 'conv' (Conv): attribute 'group' is 0",
        ),
        (
            "opset99.onnx",
            opset99,
            "opset 99 of domain '' (ai.onnx) is not supported",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let input = write(dir.path(), name, &m);
        let out = dir.path().join("out.onnx");
        let (code, _, err) = run(&[input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{name}: one line expected: {err}"
        );
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            files,
            [std::ffi::OsString::from(name)],
            "{name}: output left behind"
        );
    }
}

#[test]
fn constant_holds_exactly_one_value() {
    let constant = |attrs: Vec<AttributeProto>| {
        let mut c = node("Constant", "c", &[], &["k"]);
        c.attribute = attrs;
        model(
            vec![c, node("Add", "add", &["x", "k"], &["y"])],
            vec![value_info("x", &[1, 4])],
            vec![value_info("y", &[1, 4])],
            vec![],
        )
    };
    Model::from_proto(constant(vec![op::attr_float("value_float", 1.0)])).unwrap();
    assert_refused(
        constant(vec![]),
        &["node 'c' (Constant): has 0 value attributes, a Constant needs exactly one"],
    );
    assert_refused(
        constant(vec![
            op::attr_float("value_float", 1.0),
            op::attr_int("value_int", 1),
        ]),
        &["node 'c' (Constant): has 2 value attributes"],
    );
}

#[test]
fn before_ir_4_initializers_are_graph_inputs() {
    let mut m = conv_relu();
    m.ir_version = Some(3);
    assert_refused(
        m,
        &["initializer 'w' is not a graph input, which ir_version 3 requires"],
    );
    let mut m = conv_relu();
    m.ir_version = Some(3);
    let g = m.graph.as_mut().unwrap();
    g.input.push(value_info("w", &[4, 3, 3, 3]));
    g.input.push(value_info("b", &[4]));
    Model::from_proto(m).unwrap();
}

#[test]
fn batch_normalization_training_mode_is_checked() {
    let mut bn = node(
        "BatchNormalization",
        "bn",
        &["x", "s", "b", "m", "v"],
        &["y"],
    );
    bn.attribute
        .push(onnx_compress::ir::op::attr_int("training_mode", i64::MAX));
    let stats: Vec<_> = ["s", "b", "m", "v"]
        .iter()
        .enumerate()
        .map(|(k, n)| f32_tensor(n, &[4], k as u32 + 1))
        .collect();
    let m = model(
        vec![bn],
        vec![value_info("x", &[1, 4, 2, 2])],
        vec![value_info("y", &[1, 4, 2, 2])],
        stats,
    );
    let e = onnx_compress::ir::Model::from_proto(m).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("node 'bn' (BatchNormalization)"), "{msg}");
    assert!(msg.contains("training_mode"), "{msg}");
}

#[test]
fn input_element_types_follow_the_op_type_constraints() {
    // Add's inputs share one type parameter: float plus int64 is refused, naming both.
    let mut g = model(
        vec![node("Add", "add", &["x", "k"], &["y"])],
        vec![value_info("x", &[2])],
        vec![value_info("y", &[2])],
        vec![onnx_compress::onnx::tensor::from_i64("k", &[2], &[1, 2])],
    );
    let e = Model::from_proto(g.clone()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("node 'add' (Add)"), "{msg}");
    assert!(msg.contains("must have the same element type"), "{msg}");
    // DequantizeLinear does not dequantize floats.
    g.graph.as_mut().unwrap().node = vec![node("DequantizeLinear", "dq", &["x", "s"], &["y"])];
    g.graph.as_mut().unwrap().initializer = vec![f32_tensor("s", &[], 1)];
    let e = Model::from_proto(g).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("node 'dq' (DequantizeLinear): input 0 'x' is float"),
        "{msg}"
    );
}

/// `v` with element type `elem` instead of float.
fn typed(
    mut v: onnx_compress::onnx::proto::ValueInfoProto,
    elem: i32,
) -> onnx_compress::onnx::proto::ValueInfoProto {
    use onnx_compress::onnx::proto::type_proto;
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.elem_type = Some(elem);
    }
    v
}

#[test]
fn element_types_are_inferred_over_node_outputs() {
    // Fuzz seed 6: a DequantizeLinear swapped in reads a node output that is float.
    let m = model(
        vec![
            node("Relu", "r", &["x"], &["h"]),
            node("DequantizeLinear", "dq", &["h", "s"], &["y"]),
        ],
        vec![value_info("x", &[2])],
        vec![value_info("y", &[2])],
        vec![f32_tensor("s", &[], 1)],
    );
    assert_refused(m, &["node 'dq' (DequantizeLinear): input 0 'h' is float"]);
    // A declared output type the graph does not compute (Shape gives int64).
    let mut shape = single("Shape");
    shape.graph.as_mut().unwrap().output[0] = value_info("y", &[2]);
    assert_refused(
        shape,
        &["node 'n' (Shape): output 'y' is int64, but its graph output declares float"],
    );
    let mut cast = single("Cast");
    cast.graph.as_mut().unwrap().node[0]
        .attribute
        .push(op::attr_int("to", 7));
    cast.graph.as_mut().unwrap().output[0] = typed(value_info("y", &[1, 4]), 7);
    Model::from_proto(cast.clone()).unwrap();
    cast.graph.as_mut().unwrap().value_info = vec![typed(value_info("y", &[1, 4]), 6)];
    // Its value_info disagrees with its graph output before any node is looked at.
    assert_refused(
        cast,
        &["'y' is declared int64 by its graph output and int32 by its value_info"],
    );
}

#[test]
fn element_types_are_inferred_through_if_branches() {
    // The else branch casts to int64 but its output is declared float (fuzz: silero-vad).
    let mut cast = node("Cast", "e", &["x"], &["b"]);
    cast.attribute.push(op::attr_int("to", 7));
    let mut m = if_model(node("Relu", "t", &["x"], &["b"]));
    let iff = &mut m.graph.as_mut().unwrap().node[0];
    iff.attribute[1].g.as_mut().unwrap().node = vec![cast];
    assert_refused(
        m.clone(),
        &[
            "in attribute 'else_branch' of node 'if' (If)",
            "output 'b' is int64",
        ],
    );
    // Both branches consistent but in disagreement with each other.
    let iff = &mut m.graph.as_mut().unwrap().node[0];
    iff.attribute[1].g.as_mut().unwrap().output = vec![typed(value_info("b", &[1, 4]), 7)];
    assert_refused(
        m,
        &["node 'if' (If): output 0 is float in then_branch but int64 in else_branch"],
    );
}

#[test]
fn constants_agree_with_their_declared_types() {
    let mut m = conv_relu();
    let w = m.graph.as_ref().unwrap().initializer[0].name().to_string();
    let declared = typed(value_info(&w, &[4, 3, 3, 3]), 7);
    m.graph.as_mut().unwrap().value_info.push(declared);
    assert_refused(
        m,
        &[&format!(
            "'{w}' is a float constant, but its value_info declares int64"
        )],
    );
}

#[test]
fn if_branches_give_as_many_outputs_as_the_node() {
    let mut m = if_model(node("Relu", "t", &["x"], &["b"]));
    let iff = &mut m.graph.as_mut().unwrap().node[0];
    let then = iff.attribute[0].g.as_mut().unwrap();
    then.node.push(node("Neg", "t2", &["x"], &["b2"]));
    then.output.push(value_info("b2", &[1, 4]));
    assert_refused(
        m,
        &["node 'if' (If): then_branch has 2 output(s), the node 1"],
    );
}

#[test]
fn if_output_rank_agrees_with_its_branches() {
    let mut m = if_model(node("Relu", "t", &["x"], &["b"]));
    m.graph.as_mut().unwrap().output = vec![value_info("y", &[1, 4, 1])];
    assert_refused(
        m,
        &["node 'if' (If): output 'y' is declared with rank 3, but both branches give rank 2"],
    );
}

#[test]
fn unsorted_subgraph_nodes_are_sorted_and_cycles_refused() {
    // Fuzz (silero-vad): two nodes of an If branch swapped; runtimes sort, onnx.checker does not.
    let mut m = if_model(node("Relu", "t2", &["h"], &["b"]));
    let iff = &mut m.graph.as_mut().unwrap().node[0];
    iff.attribute[0]
        .g
        .as_mut()
        .unwrap()
        .node
        .push(node("Neg", "t1", &["x"], &["h"]));
    let loaded = Model::from_proto(m.clone()).unwrap();
    let out = loaded.to_proto().unwrap();
    let then_nodes: Vec<&str> = out.graph.as_ref().unwrap().node[0].attribute[0]
        .g
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.name())
        .collect();
    assert_eq!(then_nodes, ["t1", "t2"]);
    let iff = &mut m.graph.as_mut().unwrap().node[0];
    iff.attribute[0].g.as_mut().unwrap().node[1].input[0] = "b".into();
    assert_refused(m, &["in subgraph 'branch' is on a cycle"]);
}

#[test]
fn window_attribute_lengths_follow_the_weight_when_the_input_rank_is_unknown() {
    // Fuzz (rapidocr): dilations of 3 values on a 2-D Conv whose input rank nothing declares.
    let mut m = conv_relu();
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[]);
    if let Some(onnx_compress::onnx::proto::type_proto::Value::TensorType(t)) =
        m.graph.as_mut().unwrap().input[0]
            .r#type
            .as_mut()
            .and_then(|t| t.value.as_mut())
    {
        t.shape = None;
    }
    Model::from_proto(m.clone()).unwrap();
    conv(&mut m).attribute.retain(|a| a.name() != "dilations");
    conv(&mut m)
        .attribute
        .push(op::attr_ints("dilations", &[1, 1, 1]));
    assert_refused(
        m,
        &["attribute 'dilations' has 3 values, the weight has 2 spatial dims"],
    );
}

#[test]
fn declared_dim_of_minus_one_reads_as_unknown() {
    // Paddle2ONNX writes -1 for a dynamic dim (rapidocr's models): onnx.checker and ORT accept it.
    let mut m = single("Relu");
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[-1, 4]);
    Model::from_proto(m.clone()).unwrap();
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[-2, 4]);
    assert_refused(m, &["graph input 'x' declares dim 0 = -2"]);
}

#[test]
fn before_ir_4_an_output_lists_added_initializers_as_inputs() {
    let mut m = single("Relu");
    m.ir_version = Some(3);
    let mut model = Model::from_proto(m).unwrap();
    model
        .graph
        .initializers
        .insert("extra".into(), f32_tensor("extra", &[1], 2));
    let out = model.to_proto().unwrap();
    let inputs: Vec<&str> = out
        .graph
        .as_ref()
        .unwrap()
        .input
        .iter()
        .map(|i| i.name())
        .collect();
    assert_eq!(inputs, ["x", "extra"]);
}

#[test]
fn subgraph_outputs_are_produced_in_their_graph() {
    // Fuzz (silero-vad): the node giving an If branch's output removed.
    let mut m = if_model(node("Relu", "t", &["x"], &["b"]));
    m.graph.as_mut().unwrap().node[0].attribute[0]
        .g
        .as_mut()
        .unwrap()
        .node
        .clear();
    assert_refused(
        m,
        &["in attribute 'then_branch' of node 'if' (If): graph output 'b' is not produced in its graph"],
    );
}

#[test]
fn declared_dims_of_minus_one_are_not_written_back() {
    // Fuzz (mobilenet_v3_small): an output declared [1, -1] where shape inference knows 1000.
    let mut m = single("Relu");
    m.graph.as_mut().unwrap().output[0] = value_info("y", &[1, -1]);
    let out = Model::from_proto(m).unwrap().to_proto().unwrap();
    let declared = format!("{:?}", out.graph.as_ref().unwrap().output[0]);
    assert!(!declared.contains("DimValue(-1)"), "{declared}");
}

/// `v` with dim 0 symbolic (`batch`): tract cannot compute dims from it, ONNX keeps it symbolic.
fn batch_dim(
    mut v: onnx_compress::onnx::proto::ValueInfoProto,
) -> onnx_compress::onnx::proto::ValueInfoProto {
    use onnx_compress::onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[0].value = Some(Value::DimParam("batch".into()));
    }
    v
}

/// The then-branch of [`if_model`].
fn then_branch(m: &mut ModelProto) -> &mut GraphProto {
    m.graph.as_mut().unwrap().node[0].attribute[0]
        .g
        .as_mut()
        .unwrap()
}

/// A dim declared inside an `If` branch that its producer contradicts: ONNX Runtime loads the
/// model (it warns and merges leniently), `onnx.checker` rejects it. The run succeeds, names
/// the value and its node in a note, and declares that dim unknown in the output. Fuzz cases
/// (silero-vad op18): seed 7 case 34 (an Add's dim declared 2^31), seed 4 case 28 (a branch
/// output declared twice, its value_info right and the output wrong), in-repo seed 8 case 151
/// (fixed dims, where tract analyses the branch too).
#[test]
fn cli_declares_unknown_a_branch_dim_its_producer_contradicts() {
    let symbolic = |mut m: ModelProto| {
        let g = m.graph.as_mut().unwrap();
        g.input[0] = batch_dim(g.input[0].clone());
        g.output[0] = batch_dim(g.output[0].clone());
        for a in &mut g.node[0].attribute {
            let b = a.g.as_mut().unwrap();
            b.output[0] = batch_dim(b.output[0].clone());
        }
        m
    };
    // Add(x, x) declared [batch, 2^31] where it gives [batch, 4].
    let mut add = symbolic(if_model(node("Add", "t", &["x", "x"], &["b"])));
    then_branch(&mut add).output = vec![batch_dim(value_info("b", &[1, 1 << 31]))];
    // Declared twice: value_info [batch, 4] (right), the branch output [batch, 1] (wrong).
    let mut twice = symbolic(if_model(node("Relu", "t", &["x"], &["b"])));
    then_branch(&mut twice).value_info = vec![batch_dim(value_info("b", &[1, 4]))];
    then_branch(&mut twice).output = vec![batch_dim(value_info("b", &[1, 1]))];
    // Fixed dims: [1, 5] where Relu gives [1, 4].
    let mut fixed = if_model(node("Relu", "t", &["x"], &["b"]));
    then_branch(&mut fixed).output = vec![value_info("b", &[1, 5])];
    let python = require_python(
        &["onnx", "onnxruntime"],
        "cli_declares_unknown_a_branch_dim_its_producer_contradicts",
    );
    for (name, m, declared) in [
        (
            "add.onnx",
            add,
            "declared with dim 1 = 2147483648, but its producer gives 4",
        ),
        (
            "twice.onnx",
            twice,
            "declared with dim 1 = 1, but its producer gives 4",
        ),
        (
            "fixed.onnx",
            fixed,
            "declared with dim 1 = 5, but its producer gives 4",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let input = write(dir.path(), name, &m);
        let out = dir.path().join("out.onnx");
        let (code, stdout, err) = run(&[
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-validate",
        ]);
        assert_eq!(code, 0, "{name}: {err}");
        let said = format!("{stdout}{err}");
        assert!(
            said.contains(&format!(
                "value 'b' (output of node 't' ({})) is {declared}",
                m.graph.as_ref().unwrap().node[0].attribute[0]
                    .g
                    .as_ref()
                    .unwrap()
                    .node[0]
                    .op_type()
            )),
            "{name}: {said}"
        );
        let written = onnx_compress::onnx::load::decode(&std::fs::read(&out).unwrap()).unwrap();
        let branch = written.graph.as_ref().unwrap().node[0].attribute[0]
            .g
            .as_ref()
            .unwrap();
        for v in branch.output.iter().chain(&branch.value_info) {
            let shown = format!("{:?}", v.r#type);
            assert!(
                !shown.contains("DimValue(5)") && !shown.contains("DimValue(2147483648)"),
                "{name}: {shown}"
            );
        }
        if python {
            // The input: ONNX Runtime loads it, the checker does not; the output: both accept.
            let script = r#"
import sys, onnx, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
def checker(p):
    try:
        onnx.checker.check_model(onnx.load(p), full_check=True); return "ok"
    except Exception as e:
        return "rejects"
for p in sys.argv[1:]:
    ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    print(checker(p))
"#;
            let o = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(&input)
                .arg(&out)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(
                said.split_whitespace().collect::<Vec<_>>(),
                ["rejects", "ok"],
                "{name}"
            );
        }
    }
}

/// An `If` branch output nothing types (its producer is a custom-domain op, its declaration
/// has no type) while the other branch's is float: ONNX type inference fails to merge them
/// ("Mismatched type: inferred=0 declared=1"), and ONNX Runtime rejects `com.microsoft`'s
/// unknown `Identity`. Fuzz seed 10, silero_vad case 32.
#[test]
fn if_branch_output_untyped_from_a_custom_op_against_a_typed_branch() {
    let mut custom = node("Identity", "t", &["x"], &["b"]);
    custom.domain = Some("com.microsoft".into());
    let mut m = if_model(custom);
    set_opset(&mut m, "com.microsoft", 1);
    Model::from_proto(m.clone()).unwrap();
    then_branch(&mut m).output = vec![onnx_compress::onnx::proto::ValueInfoProto {
        name: Some("b".into()),
        ..Default::default()
    }];
    assert_refused(
        m,
        &[
            "node 'if' (If): then_branch output 'b' has no declared type",
            "node 't' (Identity) of domain 'com.microsoft'",
            "else_branch gives float",
        ],
    );
}

/// A rank declared inside an `If` branch that its producer contradicts (a Relu of a rank-4
/// Conv output declared rank 3): ONNX shape inference rejects it, so the tool refuses it,
/// naming the value and the node, where tract could not analyse the branch.
#[test]
fn rank_declared_in_a_branch_contradicting_its_producer() {
    let bytes = std::fs::read(testdata().join("if_model.onnx")).unwrap();
    let mut m = onnx_compress::onnx::load::decode(&bytes).unwrap();
    let iff = nodes(&mut m)
        .iter_mut()
        .find(|n| n.op_type() == "If")
        .unwrap();
    let then = iff
        .attribute
        .iter_mut()
        .find(|a| a.name() == "then_branch")
        .and_then(|a| a.g.as_mut())
        .unwrap();
    let out = &mut then.output[0];
    let Some(onnx_compress::onnx::proto::type_proto::Value::TensorType(t)) =
        out.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        panic!("t_out has a tensor type")
    };
    t.shape.as_mut().unwrap().dim.pop();
    assert_refused(m, &["'t_out'", "rank 3", "rank 4", "Relu"]);
}

/// Slice's constant starts and ends of different lengths (fuzz seed 12, silero_vad case 5: a
/// Constant in an `If` branch grown to 2 values): ONNX and ONNX Runtime reject it.
#[test]
fn slice_constant_inputs_of_different_lengths() {
    let mut m = single("Slice");
    let g = m.graph.as_mut().unwrap();
    g.initializer
        .push(onnx_compress::onnx::tensor::from_i64("starts", &[1], &[0]));
    g.initializer
        .push(onnx_compress::onnx::tensor::from_i64("ends", &[2], &[2, 2]));
    g.node[0].input.extend(["starts".into(), "ends".into()]);
    assert_refused(
        m,
        &["node 'n' (Slice): constant input 'starts' has 1 value(s) but 'ends' has 2"],
    );
}

/// Unsqueeze axes from a constant input that name one axis twice are refused.
#[test]
fn unsqueeze_axes_repeated() {
    let mut m = single("Unsqueeze");
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(onnx_compress::onnx::tensor::from_i64(
        "axes",
        &[2],
        &[0, -4],
    ));
    g.node[0].input.push("axes".into());
    assert_refused(m, &["Unsqueeze", "more than once"]);
}
